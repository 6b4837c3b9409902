//! The app's store on Redis: capped lists (`{prefix}:list:{key}`) and recency indexes
//! (`{prefix}:index:{key}`), one key each, under the prefix where no channel name can be.

use super::*;
use crate::layer::backend::AppStore;

impl RedisLayer {
    /// The key of app data `key` of `kind`, its shard and that shard's connection.
    fn data_home(&self, kind: &str, key: &str) -> (String, usize, SharedConn) {
        let key = format!("{}:{kind}:{key}", self.inner.settings.prefix);
        let shard = consistent_hash(&key, self.inner.shards.len());
        let conn = self.inner.shards[shard].conn.clone();
        (key, shard, conn)
    }

    /// One atomic write to app data `key` of `kind`: the commands `write` adds for the key,
    /// then its lifetime renewed to `ttl`.
    async fn write_lapsing(
        &self,
        kind: &str,
        key: &str,
        ttl: Duration,
        write: impl FnOnce(&mut redis::Pipeline, &str),
    ) -> Result<(), LayerError> {
        let (key, shard, mut conn) = self.data_home(kind, key);
        let mut pipe = redis::pipe();
        pipe.atomic();
        write(&mut pipe, &key);
        pipe.cmd("EXPIRE")
            .arg(&key)
            .arg(ttl.as_secs().max(1))
            .ignore();
        self.run(
            shard,
            async move { pipe.query_async::<()>(&mut conn).await },
        )
        .await
    }
}

impl AppStore for RedisLayer {
    async fn list_push(
        &self,
        key: &str,
        item: &[u8],
        keep: usize,
        ttl: Duration,
    ) -> Result<(), LayerError> {
        self.write_lapsing("list", key, ttl, |pipe, key| {
            pipe.cmd("RPUSH")
                .arg(key)
                .arg(item)
                .ignore()
                .cmd("LTRIM")
                .arg(key)
                .arg(-(keep as i64))
                .arg(-1)
                .ignore();
        })
        .await
    }

    async fn list_items(&self, key: &str) -> Result<Vec<Bytes>, LayerError> {
        let (key, shard, mut conn) = self.data_home("list", key);
        let cmd = redis::cmd("LRANGE").arg(&key).arg(0).arg(-1).to_owned();
        let items: Vec<Vec<u8>> = self
            .run(shard, async move { cmd.query_async(&mut conn).await })
            .await?;
        Ok(items.into_iter().map(Bytes::from).collect())
    }

    async fn index_touch(
        &self,
        key: &str,
        member: &str,
        keep: usize,
        ttl: Duration,
    ) -> Result<(), LayerError> {
        self.write_lapsing("index", key, ttl, |pipe, key| {
            pipe.cmd("ZADD")
                .arg(key)
                .arg(format!("{:.6}", now_secs()))
                .arg(member)
                .ignore()
                .cmd("ZREMRANGEBYRANK")
                .arg(key)
                .arg(0)
                .arg(-(keep as i64) - 1)
                .ignore();
        })
        .await
    }

    async fn index_recent(&self, key: &str, limit: usize) -> Result<Vec<String>, LayerError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (key, shard, mut conn) = self.data_home("index", key);
        let cmd = redis::cmd("ZREVRANGE")
            .arg(&key)
            .arg(0)
            .arg(limit - 1)
            .to_owned();
        self.run(shard, async move { cmd.query_async(&mut conn).await })
            .await
    }
}
