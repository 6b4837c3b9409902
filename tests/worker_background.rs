//! Background channels: an HTTP request (an `http.request` message sent through the layer, as
//! the interface server would) starts a job on a task channel; the job's consumer, on whichever
//! worker, notifies a group; a WebSocket connection in that group receives the result.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::{Backend, Fixture};
use switchyard::layer::{LayerSettings, LocalChannel};
use switchyard::routing::asgi::{HttpRequest, HttpResponse, WebsocketConnect};
use switchyard::routing::{
    ByteString, ConsumerError, Ctx, Kwargs, Map, Message, Router, Value, WebsocketConsumer, route,
    route_class,
};
use switchyard::worker::Worker;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

async fn start_job(m: Message, ctx: Ctx) -> Result<(), ConsumerError> {
    let job = ctx.kwarg("job").to_owned();
    let body = m
        .get("body")
        .and_then(Value::as_bytes)
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default();
    ctx.send(
        "thumbnails",
        &Map::new().with("job", job.as_str()).with("image", body),
    )?;
    ctx.reply(&HttpResponse::new(
        202,
        vec![(
            ByteString::from("content-type"),
            ByteString::from("text/plain"),
        )],
        format!("job {job} queued").into_bytes(),
    ))
}

async fn make_thumbnail(m: Message, ctx: Ctx) -> Result<(), ConsumerError> {
    let job = m.get_str("job").unwrap_or_default();
    let image = m.get_str("image").unwrap_or_default();
    ctx.group_send_text(
        &format!("job-{job}"),
        format!(
            "job {job} done: thumbnail of {image} ({} bytes)",
            image.len()
        ),
    )
}

struct Watcher;

impl WebsocketConsumer for Watcher {
    fn groups(&self, kwargs: &Kwargs) -> Vec<String> {
        vec![format!("job-{}", kwargs["job"])]
    }
}

fn router() -> Router {
    Router::new([
        route("http.request", start_job)
            .method("POST")
            .path(r"^/jobs/(?P<job>\d+)/$"),
        route("thumbnails", make_thumbnail),
        route_class(Watcher).path(r"^/ws/jobs/(?P<job>\d+)/$"),
    ])
    .unwrap()
}

async fn next(ch: &mut LocalChannel) -> Map {
    ch.recv_timeout(WAIT)
        .await
        .expect("a message within 10 s")
        .to_map()
        .unwrap()
}

async fn http_request_starts_job_that_notifies_group(backend: Backend) {
    let fx = Fixture::new(backend, LayerSettings::default()).await;
    let router = Arc::new(router());
    let token = CancellationToken::new();
    // Web-facing workers and a task worker, as two processes would be deployed.
    let web = Worker::new(fx.peer(LayerSettings::default()).await, router.clone())
        .exclude_channels(&["thumbnails"])
        .receive_timeout(Duration::from_millis(200));
    let tasks = Worker::new(fx.peer(LayerSettings::default()).await, router.clone())
        .only_channels(&["thumbnails"])
        .receive_timeout(Duration::from_millis(200));
    let task_metrics = tasks.metrics();
    let handles = [
        tokio::spawn(web.run(token.clone())),
        tokio::spawn(tasks.run(token.clone())),
    ];

    let inbox = fx.layer.inbox("test.server").await.unwrap();
    let mut socket = inbox.new_channel();
    fx.layer
        .send(
            "websocket.connect",
            &WebsocketConnect::new(socket.name(), "/ws/jobs/7/"),
        )
        .await
        .unwrap();
    assert_eq!(next(&mut socket).await, Map::new().with("accept", true));
    assert_eq!(
        fx.layer.group_channels("job-7").await.unwrap(),
        [socket.name().to_owned()]
    );

    let mut http = inbox.new_channel();
    let mut request = HttpRequest::new(http.name(), "POST", "/jobs/7/");
    request.body = ByteString::from("cat.png");
    fx.layer.send("http.request", &request).await.unwrap();

    let response: HttpResponse = http.recv_timeout(WAIT).await.unwrap().decode().unwrap();
    assert_eq!(response.status, Some(202));
    assert_eq!(response.content.as_slice(), b"job 7 queued");

    assert_eq!(
        next(&mut socket).await,
        Map::new().with("text", "job 7 done: thumbnail of cat.png (7 bytes)")
    );
    assert_eq!(
        task_metrics.snapshot().consumed,
        1,
        "the task worker ran the job"
    );

    token.cancel();
    for h in handles {
        tokio::time::timeout(WAIT, h)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

#[tokio::test]
async fn http_request_starts_job_that_notifies_group_memory() {
    http_request_starts_job_that_notifies_group(Backend::Memory).await;
}

#[tokio::test]
async fn http_request_starts_job_that_notifies_group_redis() {
    http_request_starts_job_that_notifies_group(Backend::Redis).await;
}
