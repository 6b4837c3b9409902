//! Prometheus metrics: each metric defined once, encoded by `prometheus-client`, served by hyper.
//!
//! [`metric_set!`] declares a set of counters in one place: the atomic each is counted in, its
//! field in the snapshot tests and logs read, and its exported name, label and help text (the
//! field's doc comment). Sets with labels only known at run time (per-channel counts, a latency
//! histogram) write themselves through the same [`Exposition`]. The text is rendered afresh per
//! scrape, so there is no registry to keep in sync: the counters live where they are counted.
//!
//! `serve` and `worker` serve `GET /metrics` and `GET /healthz` on `--metrics-bind` (anything
//! else is 404), optionally behind a bearer token.

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Declares a set of counters once: the struct of atomics (`$name`, fields `pub(crate)`), its
/// snapshot (`$snap`, plain `u64`s documented by the field's doc comment),
/// `snapshot()`, and `expose()`, which writes each field as the metric named on its line. A
/// field is `counter` or `gauge`; fields in a row with the same name form one family, told apart
/// by their `[label = "value"]`, whose help is the first one's `help "…"`. A field marked
/// `@shared` is an `Arc<AtomicU64>`, for a counter another component counts in too.
macro_rules! metric_set {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident => $snap:ident {
            $(
                $(#[doc = $doc:literal])*
                $(@$shared:ident)? $field:ident: $kind:ident $metric:literal
                    $([$lk:literal = $lv:literal])? $(help $help:literal)?;
            )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        $vis struct $name {
            $( $(#[doc = $doc])* pub(crate) $field: $crate::prometheus::metric_set!(@ty $($shared)?), )*
        }

        /// A copy of the counters at one instant.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
        $vis struct $snap {
            $( $(#[doc = $doc])* pub $field: u64, )*
        }

        impl $name {
            /// Reads every counter.
            pub fn snapshot(&self) -> $snap {
                $snap {
                    $( $field: self.$field.load(::std::sync::atomic::Ordering::Relaxed), )*
                }
            }

            /// Writes every counter of the set as its metric.
            pub fn expose(&self, out: &mut $crate::prometheus::Exposition<'_>) {
                let s = self.snapshot();
                out.samples(&[
                    $(
                        $crate::prometheus::Sample {
                            kind: $crate::prometheus::Kind::$kind,
                            name: $metric,
                            help: $crate::prometheus::metric_set!(@help $($help)? ; $($doc),*),
                            label: $crate::prometheus::metric_set!(@label $($lk, $lv)?),
                            value: s.$field,
                        },
                    )*
                ]);
            }
        }
    };
    (@help $help:literal ; $($doc:literal),*) => { $help };
    (@help ; $($doc:literal),*) => { concat!($($doc),*) };
    (@label $lk:literal, $lv:literal) => { Some(($lk, $lv)) };
    (@label) => { None };
    (@ty shared) => { ::std::sync::Arc<::std::sync::atomic::AtomicU64> };
    (@ty) => { ::std::sync::atomic::AtomicU64 };
}
pub(crate) use metric_set;

/// What a [`metric_set!`] field is exported as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (exported with `_total`).
    #[allow(non_camel_case_types)]
    counter,
    /// A level.
    #[allow(non_camel_case_types)]
    gauge,
}

/// Writes metrics for one scrape, in the Prometheus text format (0.0.4).
#[derive(Debug)]
pub struct Exposition<'a> {
    encoder: DescriptorEncoder<'a>,
    result: fmt::Result,
}

impl<'a> Exposition<'a> {
    fn new(encoder: DescriptorEncoder<'a>) -> Self {
        Exposition {
            encoder,
            result: Ok(()),
        }
    }

    /// The samples of a [`metric_set!`]; consecutive samples of one name form one family.
    pub fn samples(&mut self, samples: &[Sample]) {
        let mut rest = samples;
        while let Some(first) = rest.first() {
            let len = rest
                .iter()
                .take_while(|s| s.name == first.name && s.label.is_some() && first.label.is_some())
                .count()
                .max(1);
            let (family, tail) = rest.split_at(len);
            rest = tail;
            let help = first.help.trim();
            let (base, kind) = match first.kind {
                Kind::counter => counter_name(first.name),
                Kind::gauge => (first.name, MetricType::Gauge),
            };
            self.write(|e| {
                let mut m = e.encode_descriptor(base, help, None, kind)?;
                match first.label {
                    None => encode_value(m, kind, first.value),
                    Some(_) => {
                        for s in family {
                            let label = s.label.unwrap_or_default();
                            encode_value(m.encode_family(&[label])?, kind, s.value)?;
                        }
                        Ok(())
                    }
                }
            });
        }
    }

    fn write(&mut self, f: impl FnOnce(&mut DescriptorEncoder<'a>) -> fmt::Result) -> &mut Self {
        if self.result.is_ok() {
            self.result = f(&mut self.encoder);
        }
        self
    }

    /// A counter with no labels (`name` ends in `_total`).
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> &mut Self {
        let (base, kind) = counter_name(name);
        self.write(|e| encode_value(e.encode_descriptor(base, help, None, kind)?, kind, value))
    }

    /// A gauge with no labels.
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) -> &mut Self {
        self.write(|e| {
            ConstGauge::new(value).encode(e.encode_descriptor(
                name,
                help,
                None,
                MetricType::Gauge,
            )?)
        })
    }

    /// A counter with one label, one sample per `(label value, count)`.
    pub fn counter_by(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        samples: &[(&str, u64)],
    ) -> &mut Self {
        let (base, kind) = counter_name(name);
        self.write(|e| {
            let mut m = e.encode_descriptor(base, help, None, kind)?;
            for (value, n) in samples {
                encode_value(m.encode_family(&[(label, *value)])?, kind, *n)?;
            }
            Ok(())
        })
    }

    /// A gauge with one label, one sample per `(label value, value)`.
    pub fn gauge_by(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        samples: &[(&str, f64)],
    ) -> &mut Self {
        self.write(|e| {
            let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (value, v) in samples {
                ConstGauge::new(*v).encode(m.encode_family(&[(label, *value)])?)?;
            }
            Ok(())
        })
    }

    /// A histogram from per-bucket counts: `buckets` are `(upper bound in seconds, observations
    /// in that bucket alone)`, plus the total sum in seconds and count.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        buckets: &[(f64, u64)],
        sum_seconds: f64,
        count: u64,
    ) -> &mut Self {
        self.write(|e| {
            e.encode_descriptor(name, help, None, MetricType::Histogram)?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    sum_seconds,
                    count,
                    buckets,
                    None,
                )
        })
    }
}

/// A counter's name as the encoder wants it (it appends `_total`); a name that does not end in
/// `_total` (a summary's `_count`) is exported as it is, untyped.
fn counter_name(name: &str) -> (&str, MetricType) {
    match name.strip_suffix("_total") {
        Some(base) => (base, MetricType::Counter),
        None => (name, MetricType::Unknown),
    }
}

fn encode_value(
    mut m: prometheus_client::encoding::MetricEncoder<'_>,
    kind: MetricType,
    value: u64,
) -> fmt::Result {
    match kind {
        MetricType::Counter => ConstCounter::new(value).encode(m),
        _ => m.encode_gauge(&value),
    }
}

/// One sample of a [`metric_set!`].
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Counter or gauge.
    pub kind: Kind,
    /// The metric's name (a counter's ends in `_total`).
    pub name: &'static str,
    /// Its help text (the first sample's, for a family).
    pub help: &'static str,
    /// Its one label, for a family.
    pub label: Option<(&'static str, &'static str)>,
    /// Its value.
    pub value: u64,
}

/// Writes a scrape's metrics.
pub type Expose = Arc<dyn Fn(&mut Exposition<'_>) + Send + Sync>;

struct ExposeCollector(Expose);

impl fmt::Debug for ExposeCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ExposeCollector")
    }
}

impl Collector for ExposeCollector {
    fn encode(&self, encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let mut out = Exposition::new(encoder);
        (self.0)(&mut out);
        out.result
    }
}

/// Renders a scrape's text.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// A [`Render`] writing what `expose` writes, in the Prometheus text format.
pub fn render(expose: impl Fn(&mut Exposition<'_>) + Send + Sync + 'static) -> Render {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ExposeCollector(Arc::new(expose))));
    Arc::new(move || {
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry) {
            tracing::warn!(error = %e, "cannot render the metrics");
        }
        text
    })
}

/// Answers `/healthz`: healthy or not, and a JSON body.
pub type Health = Arc<dyn Fn() -> (bool, String) + Send + Sync>;

/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` (and `GET /healthz` with `health`) on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    render: Render,
    health: Option<Health>,
    shutdown: CancellationToken,
) {
    serve_guarded(listener, render, health, None, shutdown).await;
}

/// [`serve`], with both paths requiring `Authorization: Bearer <bearer>` when it is set.
pub async fn serve_guarded(
    listener: TcpListener,
    render: Render,
    health: Option<Health>,
    bearer: Option<String>,
    shutdown: CancellationToken,
) {
    let routes = Arc::new(Routes {
        render,
        health,
        bearer,
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .keep_alive(false);
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let routes = Arc::clone(&routes);
                let connection = builder.serve_connection(
                    TokioIo::new(stream),
                    hyper::service::service_fn(move |req| {
                        let routes = Arc::clone(&routes);
                        async move { Ok::<_, Infallible>(routes.answer(&req)) }
                    }),
                );
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
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

/// Binds `addr` and serves metrics there in the background; returns the bound address.
pub async fn spawn(
    addr: SocketAddr,
    render: Render,
    health: Option<Health>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    spawn_guarded(addr, render, health, None, shutdown).await
}

/// [`spawn`] behind a bearer token.
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

struct Routes {
    render: Render,
    health: Option<Health>,
    bearer: Option<String>,
}

impl Routes {
    fn answer(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        let known = path == "/metrics" || (path == "/healthz" && self.health.is_some());
        if req.method() != Method::GET || !known {
            return text(
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "only GET /metrics and GET /healthz are served here\n".to_owned(),
            );
        }
        if let Some(expected) = &self.bearer {
            let presented = req.headers().get(AUTHORIZATION).map(HeaderValue::as_bytes);
            if !presented.is_some_and(|v| crate::server::auth::bearer_matches(expected, v)) {
                let mut response = text(
                    StatusCode::UNAUTHORIZED,
                    "text/plain; charset=utf-8",
                    "Authentication required\n".to_owned(),
                );
                response
                    .headers_mut()
                    .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return response;
            }
        }
        match (&self.health, path) {
            (Some(health), "/healthz") => {
                let (healthy, body) = health();
                let status = if healthy {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                text(status, "application/json", body)
            }
            _ => text(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                (self.render)(),
            ),
        }
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    metric_set! {
        /// Test counters.
        pub struct TestMetrics => TestSnapshot {
            /// Things done.
            done: counter "t_done_total";
            /// Open now.
            open: gauge "t_open";
            /// Refused for host.
            by_host: counter "t_refused_total" ["rule" = "host"] help "Refusals, by rule.";
            /// Refused for origin.
            by_origin: counter "t_refused_total" ["rule" = "origin"];
        }
    }

    #[test]
    fn text_format() {
        let render = render(|e| {
            e.counter("a_total", "A thing.", 3)
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
                );
        });
        assert_eq!(
            render(),
            "# HELP a_total A thing.\n# TYPE a_total counter\na_total 3\n\
             # HELP b_total By type.\n# TYPE b_total counter\nb_total{type=\"websocket.receive\"} 2\nb_total{type=\"x\\\"y\"} 1\n\
             # HELP lat_seconds Latency.\n# TYPE lat_seconds histogram\nlat_seconds_bucket{le=\"0.001\"} 2\n\
             lat_seconds_bucket{le=\"0.01\"} 3\nlat_seconds_bucket{le=\"+Inf\"} 4\nlat_seconds_sum 0.012\nlat_seconds_count 4\n"
        );
    }

    #[test]
    fn a_metric_set_is_defined_once_and_exported_as_declared() {
        let m = Arc::new(TestMetrics::default());
        m.done.store(3, std::sync::atomic::Ordering::Relaxed);
        m.open.store(2, std::sync::atomic::Ordering::Relaxed);
        m.by_origin.store(1, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            m.snapshot(),
            TestSnapshot {
                done: 3,
                open: 2,
                by_host: 0,
                by_origin: 1
            }
        );
        let exposed = Arc::clone(&m);
        let render = render(move |e| exposed.expose(e));
        assert_eq!(
            render(),
            "# HELP t_done_total Things done.\n# TYPE t_done_total counter\nt_done_total 3\n\
             # HELP t_open Open now.\n# TYPE t_open gauge\nt_open 2\n\
             # HELP t_refused_total Refusals, by rule.\n# TYPE t_refused_total counter\n\
             t_refused_total{rule=\"host\"} 0\nt_refused_total{rule=\"origin\"} 1\n"
        );
    }

    async fn get(addr: SocketAddr, path: &str, auth: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n{auth}\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
            .await
            .unwrap()
            .unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_and_health_and_404s_the_rest() {
        let token = CancellationToken::new();
        let render: Render = Arc::new(|| "x_total 1\n".to_owned());
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let flag = Arc::clone(&healthy);
        let health: Health = Arc::new(move || {
            let ok = flag.load(std::sync::atomic::Ordering::Relaxed);
            (ok, format!("{{\"ok\":{ok}}}"))
        });
        let addr = spawn(
            "127.0.0.1:0".parse().unwrap(),
            render,
            Some(health),
            token.clone(),
        )
        .await
        .unwrap();
        let ok = get(addr, "/metrics", "").await;
        assert!(
            ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.ends_with("\r\n\r\nx_total 1\n"),
            "{ok}"
        );
        assert!(
            ok.contains("content-type: text/plain; version=0.0.4"),
            "{ok}"
        );
        assert!(get(addr, "/", "").await.starts_with("HTTP/1.1 404"));
        let up = get(addr, "/healthz", "").await;
        assert!(
            up.starts_with("HTTP/1.1 200 OK\r\n") && up.ends_with("\r\n\r\n{\"ok\":true}"),
            "{up}"
        );
        healthy.store(false, std::sync::atomic::Ordering::Relaxed);
        let down = get(addr, "/healthz", "").await;
        assert!(
            down.starts_with("HTTP/1.1 503 Service Unavailable\r\n")
                && down.ends_with("\r\n\r\n{\"ok\":false}"),
            "{down}"
        );
        token.cancel();
    }

    #[tokio::test]
    async fn a_bearer_token_guards_both_paths() {
        let token = CancellationToken::new();
        let render: Render = Arc::new(|| "x_total 1\n".to_owned());
        let health: Health = Arc::new(|| (true, "{}".to_owned()));
        let addr = spawn_guarded(
            "127.0.0.1:0".parse().unwrap(),
            render,
            Some(health),
            Some("tok".to_owned()),
            token.clone(),
        )
        .await
        .unwrap();
        for path in ["/metrics", "/healthz"] {
            let refused = get(addr, path, "").await;
            assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
            assert!(refused.contains("www-authenticate: Bearer"), "{refused}");
            let wrong = get(addr, path, "authorization: Bearer to\r\n").await;
            assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
            let right = get(addr, path, "authorization: Bearer tok\r\n").await;
            assert!(right.starts_with("HTTP/1.1 200"), "{right}");
        }
        token.cancel();
    }
}
