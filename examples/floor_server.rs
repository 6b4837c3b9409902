//! The floor under the benchmarks: the HTTP/WebSocket stack of `switchyard serve` and nothing
//! else. hyper http1 with upgrades, tokio-tungstenite with serve's buffer sizes, one task per
//! socket that writes a batch of queued frames with one flush, mimalloc — but no channel layer,
//! no worker, no routing, no protocol checks. `/ws/echo/` echoes every frame from the socket's
//! own task; `/ws/relay/<room>/` hands every frame to each member of an in-process room (sender
//! included, as the reference app's relay does); any other path answers a fixed page of
//! `--page-bytes` bytes.
//!
//! `scripts/bench.sh --peer bare` runs the suite's loads against it beside Switchyard, so
//! BENCHMARKS.md can show what this machine allows at all (loopback TCP, wake-ups, the load
//! client on the same cores) next to what Switchyard does with a channel layer in between.
//!
//! ```text
//! cargo run --release --example floor_server -- --port 8090 [--threads 1] [--page-bytes 2061]
//! ```

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    CONNECTION, CONTENT_TYPE, HeaderValue, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Frames queued per socket (serve's `--outbound-queue` default).
const OUTBOUND_QUEUE: usize = 64;
/// Frames written per flush at most (serve's `WRITE_BATCH`).
const WRITE_BATCH: usize = 32;

type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;
type Room = Mutex<HashMap<u64, mpsc::Sender<Message>>>;

struct State {
    rooms: Mutex<HashMap<String, Arc<Room>>>,
    next_member: AtomicU64,
    /// Frames a full member queue refused (the load client counts them as lost too).
    dropped: AtomicU64,
    page: Bytes,
}

struct Flags {
    port: u16,
    threads: usize,
    page_bytes: usize,
}

fn parse_flags() -> anyhow::Result<Flags> {
    let mut flags = Flags {
        port: 8090,
        threads: 1,
        page_bytes: 2061,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--port" => flags.port = value.parse().context("--port")?,
            "--threads" => flags.threads = value.parse().context("--threads")?,
            "--page-bytes" => flags.page_bytes = value.parse().context("--page-bytes")?,
            other => anyhow::bail!(
                "unknown flag {other} (flags: --port N, --threads N (0 = one per CPU), --page-bytes N)"
            ),
        }
    }
    Ok(flags)
}

fn main() -> anyhow::Result<()> {
    let flags = parse_flags()?;
    let runtime = if flags.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if flags.threads > 0 {
            builder.worker_threads(flags.threads);
        }
        builder.enable_all().build()?
    };
    let state = Arc::new(State {
        rooms: Mutex::new(HashMap::new()),
        next_member: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        page: Bytes::from(vec![b'x'; flags.page_bytes]),
    });
    runtime.block_on(serve(flags.port, state))
}

async fn serve(port: u16, state: Arc<State>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("binding 127.0.0.1:{port}"))?;
    eprintln!("floor server on http://127.0.0.1:{port}/ (Ctrl-C stops)");
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => accepted,
        };
        let Ok((tcp, _)) = accepted else {
            // EMFILE and friends: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(Arc::clone(&state), req));
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .keep_alive(true)
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades()
                .await;
        });
    }
    eprintln!(
        "floor server stopped; frames dropped on full queues: {}",
        state.dropped.load(Ordering::Relaxed)
    );
    Ok(())
}

async fn handle(
    state: Arc<State>,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path();
    let Some(key) = req.headers().get(SEC_WEBSOCKET_KEY) else {
        let mut resp = Response::new(Full::new(state.page.clone()));
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/html"));
        return Ok(resp);
    };
    let room = match path {
        "/ws/echo/" => None,
        _ => match path
            .strip_prefix("/ws/relay/")
            .and_then(|r| r.strip_suffix('/'))
        {
            Some(room) if !room.is_empty() => Some(room.to_owned()),
            _ => {
                let mut resp = Response::new(Full::new(Bytes::from_static(b"no such socket\n")));
                *resp.status_mut() = StatusCode::NOT_FOUND;
                return Ok(resp);
            }
        },
    };
    let accept = HeaderValue::from_str(&derive_accept_key(key.as_bytes()));
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let config = WebSocketConfig::default()
            .read_buffer_size(1024)
            .write_buffer_size(8 << 10)
            .max_write_buffer_size(16 << 20);
        let ws = Ws::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
        match room {
            None => echo(ws).await,
            Some(room) => relay(&state, &room, ws).await,
        }
    });
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = resp.headers_mut();
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = accept {
        headers.insert(SEC_WEBSOCKET_ACCEPT, accept);
    }
    Ok(resp)
}

/// Every data frame straight back (one write each); ends when the client closes.
async fn echo(mut ws: Ws) {
    while let Some(Ok(message)) = ws.next().await {
        if matches!(message, Message::Text(_) | Message::Binary(_))
            && ws.send(message).await.is_err()
        {
            break;
        }
    }
}

enum Event {
    Incoming(Option<Result<Message, WsError>>),
    Outgoing(Option<Message>),
}

/// A room member: its frames go to every member's queue, its queue goes out in batches.
async fn relay(state: &State, room_name: &str, mut ws: Ws) {
    let (tx, mut rx) = mpsc::channel(OUTBOUND_QUEUE);
    let id = state.next_member.fetch_add(1, Ordering::Relaxed);
    let room = {
        let Ok(mut rooms) = state.rooms.lock() else {
            return;
        };
        Arc::clone(rooms.entry(room_name.to_owned()).or_default())
    };
    if let Ok(mut members) = room.lock() {
        members.insert(id, tx);
    }
    loop {
        let event = tokio::select! {
            incoming = ws.next() => Event::Incoming(incoming),
            outgoing = rx.recv() => Event::Outgoing(outgoing),
        };
        match event {
            Event::Incoming(Some(Ok(message @ (Message::Text(_) | Message::Binary(_))))) => {
                let Ok(members) = room.lock() else { break };
                for member in members.values() {
                    if member.try_send(message.clone()).is_err() {
                        state.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Event::Incoming(Some(Ok(_))) => {}
            Event::Incoming(_) | Event::Outgoing(None) => break,
            Event::Outgoing(Some(first)) => {
                let mut written = ws.feed(first).await;
                for _ in 1..WRITE_BATCH {
                    let Ok(next) = rx.try_recv() else { break };
                    if written.is_ok() {
                        written = ws.feed(next).await;
                    }
                }
                if written.is_err() || ws.flush().await.is_err() {
                    break;
                }
            }
        }
    }
    if let Ok(mut members) = room.lock() {
        members.remove(&id);
    }
}
