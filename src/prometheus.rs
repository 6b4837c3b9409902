//! Prometheus metrics: a small writer for the text exposition format and a `/metrics` listener.
//!
//! `serve` and `worker` each expose their counters on `--metrics-bind`. The listener answers
//! `GET /metrics` (anything else is 404), reads at most 8 KiB of request head with a timeout, and
//! renders the text afresh per scrape from a caller-supplied closure, so there is no registry to
//! keep in sync: the counters live where they are counted (atomics).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::layer::MetricsSnapshot;

/// Builds one exposition text.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    /// An empty exposition.
    pub fn new() -> Self {
        Exposition::default()
    }

    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    /// A counter with no labels.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> &mut Self {
        self.header(name, "counter", help);
        let _ = writeln!(self.text, "{name} {value}");
        self
    }

    /// A gauge with no labels.
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) -> &mut Self {
        self.header(name, "gauge", help);
        let _ = writeln!(self.text, "{name} {value}");
        self
    }

    /// A counter with one label, one sample per `(label value, count)`.
    pub fn counter_by(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        samples: &[(&str, u64)],
    ) -> &mut Self {
        self.header(name, "counter", help);
        for (value, count) in samples {
            let _ = writeln!(
                self.text,
                "{name}{{{label}=\"{}\"}} {count}",
                escape_label(value)
            );
        }
        self
    }

    /// A gauge with one label, one sample per `(label value, value)`.
    pub fn gauge_by(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        samples: &[(&str, f64)],
    ) -> &mut Self {
        self.header(name, "gauge", help);
        for (value, v) in samples {
            let _ = writeln!(
                self.text,
                "{name}{{{label}=\"{}\"}} {v}",
                escape_label(value)
            );
        }
        self
    }

    /// A histogram from cumulative-ready bucket counts: `buckets` are `(upper bound in seconds,
    /// observations in that bucket alone)`, plus the total sum in seconds and count.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        buckets: &[(f64, u64)],
        sum_seconds: f64,
        count: u64,
    ) -> &mut Self {
        self.header(name, "histogram", help);
        let mut cumulative = 0;
        for (le, n) in buckets {
            cumulative += n;
            let _ = writeln!(self.text, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(self.text, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(self.text, "{name}_sum {sum_seconds}");
        let _ = writeln!(self.text, "{name}_count {count}");
        self
    }

    /// The channel layer's counters, under `switchyard_layer_*`.
    pub fn layer(&mut self, m: &MetricsSnapshot) -> &mut Self {
        self.counter(
            "switchyard_layer_sent_total",
            "Messages accepted by the channel layer.",
            m.sent,
        )
        .counter(
            "switchyard_layer_received_total",
            "Messages handed to a receiver.",
            m.received,
        )
        .counter(
            "switchyard_layer_channel_full_total",
            "Sends refused because the channel was full (ChannelFull).",
            m.channel_full,
        )
        .counter(
            "switchyard_layer_group_sends_total",
            "group_send calls.",
            m.group_sends,
        )
        .counter(
            "switchyard_layer_group_member_full_total",
            "Group members that missed a message because their channel was full.",
            m.group_member_full,
        )
        .counter(
            "switchyard_layer_expired_total",
            "Messages found expired at receive and dropped.",
            m.expired,
        )
        .counter(
            "switchyard_layer_local_full_total",
            "Messages dropped because a local channel's buffer was full (slow consumer).",
            m.local_full,
        )
        .counter(
            "switchyard_layer_local_unknown_total",
            "Messages dropped because no one held their local channel any more.",
            m.local_unknown,
        )
        .counter(
            "switchyard_layer_garbage_total",
            "Stored messages that could not be decoded (dropped).",
            m.garbage,
        )
        .counter(
            "switchyard_layer_unavailable_total",
            "Operations that failed because the backend was unreachable.",
            m.unavailable,
        )
        .counter(
            "switchyard_layer_reconnects_total",
            "Redis connections re-established after a failure.",
            m.reconnects,
        )
    }

    /// The finished text.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.text)
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders the metrics text for one scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Answers `GET /metrics` on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, render: Render, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let render = Arc::clone(&render);
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, &render).await {
                        tracing::debug!(error = %e, "metrics request failed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Binds `addr` and serves metrics on it in a background task; returns the bound address.
pub async fn spawn(
    addr: SocketAddr,
    render: Render,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(serve(listener, render, shutdown));
    Ok(local)
}

async fn answer(mut stream: TcpStream, render: &Render) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await?;
            if n == 0 || head.len() + n > 8192 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "bad request head",
                ));
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request head timeout"))??;
    let first_line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let ok = first_line.starts_with(b"GET /metrics ") || first_line.starts_with(b"GET /metrics?");
    let (status, content_type, body) = if ok {
        (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(),
        )
    } else {
        (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "only GET /metrics is served here\n".to_owned(),
        )
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format() {
        let text = Exposition::new()
            .counter("a_total", "A thing.", 3)
            .counter_by(
                "b_total",
                "By type.",
                "type",
                &[("websocket.receive", 2), ("x\"y", 1)],
            )
            .histogram(
                "lat_seconds",
                "Latency.",
                &[(0.001, 2), (0.01, 1)],
                0.012,
                4,
            )
            .finish();
        assert_eq!(
            text,
            "# HELP a_total A thing.\n# TYPE a_total counter\na_total 3\n\
             # HELP b_total By type.\n# TYPE b_total counter\nb_total{type=\"websocket.receive\"} 2\nb_total{type=\"x\\\"y\"} 1\n\
             # HELP lat_seconds Latency.\n# TYPE lat_seconds histogram\nlat_seconds_bucket{le=\"0.001\"} 2\n\
             lat_seconds_bucket{le=\"0.01\"} 3\nlat_seconds_bucket{le=\"+Inf\"} 4\nlat_seconds_sum 0.012\nlat_seconds_count 4\n"
        );
    }

    #[tokio::test]
    async fn serves_metrics_and_404s_the_rest() {
        let token = CancellationToken::new();
        let render: Render = Arc::new(|| "x_total 1\n".to_owned());
        let addr = spawn("127.0.0.1:0".parse().expect("addr"), render, token.clone())
            .await
            .expect("binds");
        async fn get(addr: SocketAddr, path: &str) -> String {
            let mut s = TcpStream::connect(addr).await.expect("connects");
            s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
                .await
                .expect("writes");
            let mut out = String::new();
            s.read_to_string(&mut out).await.expect("reads");
            out
        }
        let ok = get(addr, "/metrics").await;
        assert!(
            ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.ends_with("\r\n\r\nx_total 1\n"),
            "{ok}"
        );
        assert!(get(addr, "/").await.starts_with("HTTP/1.1 404"));
        token.cancel();
    }
}
