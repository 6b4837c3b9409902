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
        .counter(
            "switchyard_layer_state_losses_total",
            "Times Redis was found to have lost this process's state (restart without persistence, FLUSHALL, stale failover).",
            m.state_losses,
        )
        .counter(
            "switchyard_layer_reasserted_memberships_total",
            "Group memberships put back by this process after Redis lost state.",
            m.reasserted_memberships,
        )
        .counter(
            "switchyard_layer_reaped_processes_total",
            "Processes whose lease lapsed and whose memberships and inbox this process removed.",
            m.reaped_processes,
        )
        .counter(
            "switchyard_layer_reaped_memberships_total",
            "Group memberships removed with lapsed processes.",
            m.reaped_memberships,
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

/// Says whether the process can do its job: `(healthy, JSON body)` for `GET /healthz`.
pub type Health = Arc<dyn Fn() -> (bool, String) + Send + Sync>;

/// Answers `GET /metrics` (and `GET /healthz` when `health` is given) on `listener` until
/// `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    render: Render,
    health: Option<Health>,
    shutdown: CancellationToken,
) {
    serve_guarded(listener, render, health, None, shutdown).await;
}

/// As [`serve`], answering 401 unless the request carries `Authorization: Bearer <bearer>`
/// (when `bearer` is set).
pub async fn serve_guarded(
    listener: TcpListener,
    render: Render,
    health: Option<Health>,
    bearer: Option<String>,
    shutdown: CancellationToken,
) {
    let bearer: Option<Arc<str>> = bearer.map(Arc::from);
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let render = Arc::clone(&render);
                let health = health.clone();
                let bearer = bearer.clone();
                tokio::spawn(async move {
                    if let Err(e) =
                        answer(stream, &render, health.as_ref(), bearer.as_deref()).await
                    {
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
    health: Option<Health>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    spawn_guarded(addr, render, health, None, shutdown).await
}

/// As [`spawn`], requiring `Authorization: Bearer <bearer>` when `bearer` is set.
pub async fn spawn_guarded(
    addr: SocketAddr,
    render: Render,
    health: Option<Health>,
    bearer: Option<String>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(serve_guarded(listener, render, health, bearer, shutdown));
    Ok(local)
}

/// Whether a request head carries `Authorization: Bearer <expected>`.
fn head_has_bearer(head: &[u8], expected: &str) -> bool {
    head.split(|b| *b == b'\n').skip(1).any(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        line.split_at_checked(14).is_some_and(|(name, value)| {
            name.eq_ignore_ascii_case(b"authorization:")
                && crate::server::auth::bearer_matches(expected, value.trim_ascii())
        })
    })
}

async fn answer(
    mut stream: TcpStream,
    render: &Render,
    health: Option<&Health>,
    bearer: Option<&str>,
) -> std::io::Result<()> {
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
    let wants_health =
        first_line.starts_with(b"GET /healthz ") || first_line.starts_with(b"GET /healthz?");
    let allowed = bearer.is_none_or(|expected| head_has_bearer(&head, expected));
    let (status, content_type, body) = if (ok || wants_health) && !allowed {
        (
            "401 Unauthorized\r\nwww-authenticate: Bearer",
            "text/plain; charset=utf-8",
            "Authentication required\n".to_owned(),
        )
    } else if let (true, Some(health)) = (wants_health, health) {
        let (healthy, body) = health();
        let status = if healthy {
            "200 OK"
        } else {
            "503 Service Unavailable"
        };
        (status, "application/json", body)
    } else if ok {
        (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(),
        )
    } else {
        (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "only GET /metrics and GET /healthz are served here\n".to_owned(),
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
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let flag = Arc::clone(&healthy);
        let health: Health = Arc::new(move || {
            let ok = flag.load(std::sync::atomic::Ordering::Relaxed);
            (ok, format!("{{\"ok\":{ok}}}"))
        });
        let addr = spawn(
            "127.0.0.1:0".parse().expect("addr"),
            render,
            Some(health),
            token.clone(),
        )
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
        let up = get(addr, "/healthz").await;
        assert!(
            up.starts_with("HTTP/1.1 200 OK\r\n") && up.ends_with("\r\n\r\n{\"ok\":true}"),
            "{up}"
        );
        healthy.store(false, std::sync::atomic::Ordering::Relaxed);
        let down = get(addr, "/healthz").await;
        assert!(
            down.starts_with("HTTP/1.1 503 Service Unavailable\r\n")
                && down.ends_with("\r\n\r\n{\"ok\":false}"),
            "{down}"
        );
        token.cancel();
    }

    #[test]
    fn the_bearer_is_read_from_the_head() {
        let head = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\n\r\n";
        assert!(head_has_bearer(head, "tok"));
        assert!(!head_has_bearer(head, "to"));
        assert!(!head_has_bearer(
            b"GET /metrics HTTP/1.1\r\nX-Authorization: Bearer tok\r\n\r\n",
            "tok"
        ));
        assert!(!head_has_bearer(b"GET /metrics HTTP/1.1\r\n\r\n", "tok"));
    }
}
