//! The interface server's WebSocket side over loopback with a real tokio-tungstenite client: the
//! paused handshake (101 / 403 / 503), frames through the layer with their `order`, closes and
//! disconnect codes, group fan-out, bad input (1009, 1007, 1002), slow readers, a full layer
//! (1013), keepalive, idle and lifetime closes, Redis outages and graceful shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod server_support;
mod support;

use std::time::Duration;

use futures_util::SinkExt;
use server_support::*;
use support::{Backend, Fixture, eventually};
use switchyard::asgi::{
    WEBSOCKET_CONNECT, WEBSOCKET_DISCONNECT, WEBSOCKET_RECEIVE, WebsocketConnect,
    WebsocketDisconnect, WebsocketReceive, WebsocketSend,
};
use switchyard::layer::{Layer, LayerSettings, Receiver};
use switchyard::server::{ServerConfig, SlowClientPolicy};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};

async fn echo_round_trip(backend: Backend) {
    let fx = Fixture::new(backend, LayerSettings::default()).await;
    let server = TestServer::start(fx.layer.clone(), ServerConfig::default()).await;
    let mut worker = Worker::echo(&fx.layer).await;
    let mut ws = ws_connect(&server.ws_url("/chat/l%C3%B6bby/?token=a%20b")).await;

    let connect: WebsocketConnect = worker.next_on(WEBSOCKET_CONNECT).await.decode().unwrap();
    assert_eq!(connect.path, "/chat/löbby/");
    assert_eq!(connect.query_string.as_slice(), b"token=a%20b");
    assert_eq!(connect.order, 0);
    assert_eq!(connect.scheme, "ws");
    assert!(connect.header("sec-websocket-key").is_some());
    assert_eq!(connect.client.as_ref().unwrap().0, "127.0.0.1");

    send_text(&mut ws, "héllo").await;
    assert_eq!(next_message(&mut ws).await, Some(Message::text("héllo")));
    ws.send(Message::binary(vec![0u8, 159, 146, 150]))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut ws).await,
        Some(Message::binary(vec![0u8, 159, 146, 150]))
    );

    let first: WebsocketReceive = worker.next_on(WEBSOCKET_RECEIVE).await.decode().unwrap();
    assert_eq!(
        (first.text.as_deref(), first.bytes.as_ref(), first.order),
        (Some("héllo"), None, 1)
    );
    assert_eq!(first.reply_channel, connect.reply_channel);
    assert_eq!(first.path, "/chat/löbby/");
    let second: WebsocketReceive = worker.next_on(WEBSOCKET_RECEIVE).await.decode().unwrap();
    assert_eq!(second.bytes.unwrap().as_slice(), &[0u8, 159, 146, 150]);
    assert_eq!(second.order, 2);

    ws.close(Some(CloseFrame {
        code: CloseCode::Away,
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    let gone: WebsocketDisconnect = worker.next_on(WEBSOCKET_DISCONNECT).await.decode().unwrap();
    assert_eq!((gone.code, gone.order), (1001, 3));
    assert_eq!(gone.reply_channel, connect.reply_channel);
    let m = server.metrics.snapshot();
    assert_eq!((m.ws_frames_in, m.ws_frames_out, m.ws_accepted), (2, 2, 1));
}

#[tokio::test]
async fn websocket_echo_memory() {
    echo_round_trip(Backend::Memory).await;
}

#[tokio::test]
async fn websocket_echo_redis() {
    echo_round_trip(Backend::Redis).await;
}

#[tokio::test]
async fn handshake_rejections_timeouts_and_implicit_accept() {
    let (layer, server) = TestServer::on_memory(ServerConfig {
        websocket_connect_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    })
    .await;
    let mut worker = Worker::spawn(&layer, &[WEBSOCKET_CONNECT, WEBSOCKET_DISCONNECT], |e| {
        if e.channel != WEBSOCKET_CONNECT {
            return vec![];
        }
        let m: WebsocketConnect = e.decode().unwrap();
        let reply = match m.path.as_str() {
            "/close" => WebsocketSend::close(None),
            "/deny" => {
                let mut deny = WebsocketSend::default();
                deny.accept = Some(false);
                deny
            }
            "/hello" => WebsocketSend::text("welcome"),
            _ => return vec![],
        };
        vec![out(&m.reply_channel, &reply)]
    })
    .await;
    assert_eq!(ws_refused_status(&server.ws_url("/close")).await, 403);
    assert_eq!(ws_refused_status(&server.ws_url("/deny")).await, 403);
    assert_eq!(ws_refused_status(&server.ws_url("/silent")).await, 503);
    // A frame as the first reply accepts and is delivered.
    let mut ws = ws_connect(&server.ws_url("/hello")).await;
    assert_eq!(next_message(&mut ws).await, Some(Message::text("welcome")));
    // Each refused handshake told the worker the socket is gone.
    for _ in 0..3 {
        let d: WebsocketDisconnect = worker.next_on(WEBSOCKET_DISCONNECT).await.decode().unwrap();
        assert_eq!((d.code, d.order), (1006, 1));
    }
    let m = server.metrics.snapshot();
    assert_eq!((m.ws_rejected, m.ws_connect_timeouts), (2, 1));
}

#[tokio::test]
async fn server_close_with_code_reaches_client_and_worker() {
    let (layer, server) = TestServer::on_memory(ServerConfig::default()).await;
    let mut worker = Worker::spawn(
        &layer,
        &[WEBSOCKET_CONNECT, WEBSOCKET_RECEIVE, WEBSOCKET_DISCONNECT],
        |e| match e.channel.as_str() {
            WEBSOCKET_CONNECT => {
                let m: WebsocketConnect = e.decode().unwrap();
                vec![out(&m.reply_channel, &WebsocketSend::accept())]
            }
            WEBSOCKET_RECEIVE => {
                let m: WebsocketReceive = e.decode().unwrap();
                let mut reply = WebsocketSend::text("last words");
                reply.close = WebsocketSend::close(Some(4001)).close;
                vec![out(&m.reply_channel, &reply)]
            }
            _ => vec![],
        },
    )
    .await;
    let mut ws = ws_connect(&server.ws_url("/kick")).await;
    send_text(&mut ws, "kick me").await;
    assert_eq!(
        next_message(&mut ws).await,
        Some(Message::text("last words"))
    );
    assert_eq!(close_code(&mut ws).await, Some(4001));
    let d: WebsocketDisconnect = worker.next_on(WEBSOCKET_DISCONNECT).await.decode().unwrap();
    assert_eq!((d.code, d.order), (4001, 2));
}

#[tokio::test]
async fn unsendable_close_codes_from_workers_become_1011() {
    let (layer, server) = TestServer::on_memory(ServerConfig::default()).await;
    // Closes with the code the client sends as text.
    let mut worker = Worker::spawn(
        &layer,
        &[WEBSOCKET_CONNECT, WEBSOCKET_RECEIVE, WEBSOCKET_DISCONNECT],
        |e| match e.channel.as_str() {
            WEBSOCKET_CONNECT => {
                let m: WebsocketConnect = e.decode().unwrap();
                vec![out(&m.reply_channel, &WebsocketSend::accept())]
            }
            WEBSOCKET_RECEIVE => {
                let m: WebsocketReceive = e.decode().unwrap();
                let code: u16 = m.text.unwrap().parse().unwrap();
                vec![out(&m.reply_channel, &WebsocketSend::close(Some(code)))]
            }
            _ => vec![],
        },
    )
    .await;
    for (asked, expected) in [(1006, 1011), (5000, 1011), (1015, 1011), (4000, 4000)] {
        let mut ws = ws_connect(&server.ws_url("/bad-close")).await;
        send_text(&mut ws, &asked.to_string()).await;
        assert_eq!(close_code(&mut ws).await, Some(expected), "asked {asked}");
        let d: WebsocketDisconnect = worker.next_on(WEBSOCKET_DISCONNECT).await.decode().unwrap();
        assert_eq!(d.code, expected, "asked {asked}");
    }
    assert_eq!(server.metrics.snapshot().bad_replies, 3);
}

async fn group_fan_out(backend: Backend) {
    let fx = Fixture::new(backend, LayerSettings::default()).await;
    let server = TestServer::start(fx.layer.clone(), ServerConfig::default()).await;
    let mut worker = Worker::echo(&fx.layer).await;
    let mut sockets = Vec::new();
    for i in 0..5 {
        let ws = ws_connect(&server.ws_url(&format!("/room/{i}"))).await;
        let c: WebsocketConnect = worker.next_on(WEBSOCKET_CONNECT).await.decode().unwrap();
        fx.layer.group_add("room", &c.reply_channel).await.unwrap();
        sockets.push(ws);
    }
    let report = fx
        .layer
        .group_send("room", &WebsocketSend::text("to everyone"))
        .await
        .unwrap();
    assert_eq!((report.members, report.full), (5, 0));
    for ws in &mut sockets {
        assert_eq!(next_message(ws).await, Some(Message::text("to everyone")));
    }
    let report = fx
        .layer
        .group_send("room", &WebsocketSend::bytes(vec![1u8, 2, 3]))
        .await
        .unwrap();
    assert_eq!(report.members, 5);
    for ws in &mut sockets {
        assert_eq!(
            next_message(ws).await,
            Some(Message::binary(vec![1u8, 2, 3]))
        );
    }
    assert_eq!(server.metrics.snapshot().ws_frames_out, 10);
}

#[tokio::test]
async fn group_message_reaches_every_local_socket_memory() {
    group_fan_out(Backend::Memory).await;
}

#[tokio::test]
async fn group_message_reaches_every_local_socket_redis() {
    group_fan_out(Backend::Redis).await;
}

async fn bad_input_server(layer: &Layer) -> TestServer {
    TestServer::start(
        layer.clone(),
        ServerConfig {
            ws_max_frame_size: 1024,
            ws_max_message_size: 4096,
            ..ServerConfig::default()
        },
    )
    .await
}

#[tokio::test]
async fn oversized_frames_and_messages_close_1009() {
    let layer = Layer::from_url("memory://", LayerSettings::default())
        .await
        .unwrap();
    let server = bad_input_server(&layer).await;
    let mut worker = Worker::echo(&layer).await;
    let mut ws = ws_connect(&server.ws_url("/big")).await;
    send_text(&mut ws, &"a".repeat(1024)).await;
    assert_eq!(
        next_message(&mut ws).await,
        Some(Message::text("a".repeat(1024)))
    );
    ws.send(Message::binary(vec![7u8; 1025])).await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(1009));
    let d: WebsocketDisconnect = worker.next_on(WEBSOCKET_DISCONNECT).await.decode().unwrap();
    assert_eq!((d.code, d.order), (1009, 2));

    // A message of small frames over the message limit.
    let mut ws = ws_connect(&server.ws_url("/fragments")).await;
    let first = Frame::message(vec![b'x'; 1000], OpCode::Data(Data::Text), false);
    ws.send(Message::Frame(first)).await.unwrap();
    for _ in 0..5 {
        let more = Frame::message(vec![b'x'; 1000], OpCode::Data(Data::Continue), false);
        if ws.send(Message::Frame(more)).await.is_err() {
            break;
        }
    }
    assert_eq!(close_code(&mut ws).await, Some(1009));
}

#[tokio::test]
async fn invalid_utf8_closes_1007_and_protocol_errors_1002() {
    let layer = Layer::from_url("memory://", LayerSettings::default())
        .await
        .unwrap();
    let server = bad_input_server(&layer).await;
    let mut worker = Worker::echo(&layer).await;
    let mut ws = ws_connect(&server.ws_url("/utf8")).await;
    let bad = Frame::message(
        vec![0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xff],
        OpCode::Data(Data::Text),
        true,
    );
    ws.send(Message::Frame(bad)).await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(1007));
    let d: WebsocketDisconnect = worker.next_on(WEBSOCKET_DISCONNECT).await.decode().unwrap();
    assert_eq!((d.code, d.order), (1007, 1));

    let mut ws = ws_connect(&server.ws_url("/rsv")).await;
    let mut frame = Frame::message(b"x".to_vec(), OpCode::Data(Data::Text), true);
    frame.header_mut().rsv1 = true;
    ws.send(Message::Frame(frame)).await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(1002));

    // A continuation with no message started.
    let mut ws = ws_connect(&server.ws_url("/continuation")).await;
    let stray = Frame::message(b"x".to_vec(), OpCode::Data(Data::Continue), true);
    ws.send(Message::Frame(stray)).await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(1002));
    // Nothing of the bad frames reached the worker.
    assert_eq!(server.metrics.snapshot().ws_frames_in, 0);
}

/// A memory layer whose `websocket.receive` holds one message, a server retrying a full
/// channel for `retry`, and a worker that accepts every socket and reads nothing else.
async fn full_receive_stack(retry: Duration) -> (Layer, TestServer, Worker) {
    let settings = LayerSettings {
        channel_capacity: vec![("websocket.receive".into(), 1)],
        ..LayerSettings::default()
    };
    let layer = Layer::from_url("memory://", settings).await.unwrap();
    let server = TestServer::start(
        layer.clone(),
        ServerConfig {
            backpressure_timeout: retry,
            ..ServerConfig::default()
        },
    )
    .await;
    let worker = Worker::spawn(&layer, &[WEBSOCKET_CONNECT, WEBSOCKET_DISCONNECT], |e| {
        if e.channel != WEBSOCKET_CONNECT {
            return vec![];
        }
        let m: WebsocketConnect = e.decode().unwrap();
        vec![out(&m.reply_channel, &WebsocketSend::accept())]
    })
    .await;
    (layer, server, worker)
}

/// A socket on a [`full_receive_stack`] retrying for 20 s, with its connect: its frame "fits"
/// filled `websocket.receive`, and its next frame, `waiting`, is in the retry loop (the layer
/// has refused it as full).
async fn a_frame_waiting_for_room(
    waiting: &str,
) -> (Layer, TestServer, Worker, Client, WebsocketConnect) {
    let (layer, server, mut worker) = full_receive_stack(Duration::from_secs(20)).await;
    let mut ws = ws_connect(&server.ws_url("/room")).await;
    let connect: WebsocketConnect = worker.next_on(WEBSOCKET_CONNECT).await.decode().unwrap();
    send_text(&mut ws, "fits").await;
    send_text(&mut ws, waiting).await;
    tokio::time::timeout(Duration::from_secs(5), async {
        while layer.metrics().snapshot().channel_full < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("a frame finds websocket.receive full");
    (layer, server, worker, ws, connect)
}

/// The next `websocket.receive` the server sent, read by the test itself.
async fn next_receive(receiver: &mut Receiver) -> WebsocketReceive {
    receiver
        .receive(&[WEBSOCKET_RECEIVE.to_owned()], Duration::from_secs(5))
        .await
        .unwrap()
        .expect("a frame reaches the layer")
        .decode()
        .unwrap()
}

#[tokio::test]
async fn full_receive_channel_closes_1013() {
    let (layer, server, mut worker) = full_receive_stack(Duration::from_millis(100)).await;
    let mut ws = ws_connect(&server.ws_url("/busy")).await;
    send_text(&mut ws, "fits").await;
    send_text(&mut ws, "does not fit").await;
    assert_eq!(close_code(&mut ws).await, Some(1013));
    let d: WebsocketDisconnect = worker.next_on(WEBSOCKET_DISCONNECT).await.decode().unwrap();
    assert_eq!((d.code, d.order), (1013, 2));
    let m = server.metrics.snapshot();
    assert_eq!(m.ws_receive_full_closes, 1);
    assert_eq!((m.backpressure_waits, m.backpressure_refusals), (1, 1));
    assert_eq!(layer.channel_depth(WEBSOCKET_RECEIVE).await.unwrap(), 1);
}

/// The default bound (10 s): a socket sending faster than a slow worker reads `websocket.receive`
/// (room for one frame) is slowed down, not closed, and every frame arrives once, in order.
#[tokio::test]
async fn a_socket_hitting_a_full_receive_channel_is_slowed_not_closed() {
    let settings = LayerSettings {
        channel_capacity: vec![("websocket.receive".into(), 1)],
        ..LayerSettings::default()
    };
    let layer = Layer::from_url("memory://", settings).await.unwrap();
    let config = ServerConfig::default();
    assert_eq!(config.backpressure_timeout, Duration::from_secs(10));
    let server = TestServer::start(layer.clone(), config).await;
    let _worker = Worker::spawn(&layer, &[WEBSOCKET_CONNECT, WEBSOCKET_DISCONNECT], |e| {
        if e.channel != WEBSOCKET_CONNECT {
            return vec![];
        }
        let m: WebsocketConnect = e.decode().unwrap();
        vec![out(&m.reply_channel, &WebsocketSend::accept())]
    })
    .await;
    let mut ws = ws_connect(&server.ws_url("/flood")).await;
    const FRAMES: u64 = 40;
    for i in 1..=FRAMES {
        ws.feed(Message::text(format!("frame {i}"))).await.unwrap();
    }
    ws.flush().await.unwrap();
    // The server met the full channel before anything was read: the reader is paused now.
    eventually(
        Duration::from_secs(5),
        "a frame finds websocket.receive full",
        || layer.metrics().snapshot().channel_full >= 1,
    )
    .await;
    // A slow worker catches up within the bound (10 s), but over a second: one frame every
    // 25 ms, so a bound as short as the old half second would have closed the socket.
    let mut receiver = layer.receiver().await.unwrap();
    for i in 1..=FRAMES {
        tokio::time::sleep(Duration::from_millis(25)).await;
        let r = next_receive(&mut receiver).await;
        assert_eq!(
            (r.text.as_deref(), r.order),
            (Some(format!("frame {i}").as_str()), i)
        );
    }
    // Still open: a later frame goes through with the next order.
    send_text(&mut ws, "after").await;
    let r = next_receive(&mut receiver).await;
    assert_eq!((r.text.as_deref(), r.order), (Some("after"), FRAMES + 1));
    let m = server.metrics.snapshot();
    assert_eq!((m.ws_receive_full_closes, m.backpressure_refusals), (0, 0));
    assert!(m.backpressure_waits >= 1, "{m:?}");
    assert_eq!(m.ws_frames_in, FRAMES + 1);
}

/// A full `websocket.connect` holds the handshake until a worker makes room (101), and answers
/// 503 only past the bound; both counted.
#[tokio::test]
async fn a_full_connect_channel_waits_for_room_then_503_past_the_bound() {
    let settings = LayerSettings {
        channel_capacity: vec![("websocket.connect".into(), 1)],
        ..LayerSettings::default()
    };
    let layer = Layer::from_url("memory://", settings).await.unwrap();
    let filler = WebsocketConnect::new("filler.x!y".to_owned(), "/filler".to_owned());
    layer.send(WEBSOCKET_CONNECT, &filler).await.unwrap();
    let server = TestServer::start(
        layer.clone(),
        ServerConfig {
            backpressure_timeout: Duration::from_millis(300),
            ..ServerConfig::default()
        },
    )
    .await;
    assert_eq!(ws_refused_status(&server.ws_url("/late")).await, 503);
    let m = server.metrics.snapshot();
    assert_eq!((m.backpressure_waits, m.backpressure_refusals), (1, 1));

    let patient = TestServer::start(layer.clone(), ServerConfig::default()).await;
    let url = patient.ws_url("/patient");
    let handshake = tokio::spawn(async move { ws_connect(&url).await });
    eventually(
        Duration::from_secs(5),
        "the handshake waits for room",
        || patient.metrics.snapshot().backpressure_waits == 1,
    )
    .await;
    // The worker takes the filler, then the waiting connect, and accepts it.
    let mut worker = Worker::echo(&layer).await;
    let first: WebsocketConnect = worker.next_on(WEBSOCKET_CONNECT).await.decode().unwrap();
    assert_eq!(first.path, "/filler");
    let mut ws = tokio::time::timeout(WAIT, handshake)
        .await
        .unwrap()
        .unwrap();
    send_text(&mut ws, "hello").await;
    assert_eq!(next_message(&mut ws).await, Some(Message::text("hello")));
    assert_eq!(patient.metrics.snapshot().backpressure_refusals, 0);
}

#[tokio::test]
async fn replies_keep_flowing_while_a_frame_waits_for_room() {
    // The test reads websocket.receive itself, when it wants room.
    let (layer, server, _worker, mut ws, connect) =
        a_frame_waiting_for_room("waits for room").await;
    // Broadcasts to this socket (a room member that also sends) must not wait behind the frame,
    // or a busy sender's own queue overflows and it is closed as a slow client.
    for text in ["meanwhile 1", "meanwhile 2"] {
        layer
            .send(&connect.reply_channel, &WebsocketSend::text(text))
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), next_message(&mut ws))
            .await
            .expect("a reply arrives while the frame still waits");
        assert_eq!(got, Some(Message::text(text)));
    }
    // Room again: the waiting frame goes out, in order, and the socket lives on.
    let mut receiver = layer.receiver().await.unwrap();
    for (text, order) in [("fits", 1), ("waits for room", 2)] {
        let r = next_receive(&mut receiver).await;
        assert_eq!((r.text.as_deref(), r.order), (Some(text), order));
    }
    send_text(&mut ws, "after").await;
    let r = next_receive(&mut receiver).await;
    assert_eq!((r.text.as_deref(), r.order), (Some("after"), 3));
    assert_eq!(server.metrics.snapshot().ws_receive_full_closes, 0);
}

#[tokio::test]
async fn a_close_while_a_frame_waits_for_room_counts_the_frame_and_keeps_the_order() {
    let (layer, server, mut worker, mut ws, connect) = a_frame_waiting_for_room("never fits").await;
    // The worker closes the socket while the frame still waits: the close goes out now (not after
    // 20 s of retries), the frame is given up and counted, and the disconnect takes order 2.
    layer
        .send(&connect.reply_channel, &WebsocketSend::close(Some(4000)))
        .await
        .unwrap();
    assert_eq!(close_code(&mut ws).await, Some(4000));
    let d: WebsocketDisconnect = worker.next_on(WEBSOCKET_DISCONNECT).await.decode().unwrap();
    assert_eq!((d.code, d.order), (4000, 2));
    let m = server.metrics.snapshot();
    assert_eq!((m.ws_frames_in, m.ws_frames_lost), (1, 1));
}

/// A memory layer with room for any flood, a server with `config`, and a worker that floods each
/// accepted socket with `n` frames of 64 KiB.
async fn flood_stack(config: ServerConfig, n: usize) -> (Layer, TestServer, Worker) {
    let settings = LayerSettings {
        capacity: 100_000,
        ..LayerSettings::default()
    };
    let layer = Layer::from_url("memory://", settings).await.unwrap();
    let server = TestServer::start(layer.clone(), config).await;
    let flood = layer.clone();
    let worker = Worker::spawn(
        &layer,
        &[WEBSOCKET_CONNECT, WEBSOCKET_DISCONNECT],
        move |e| {
            if e.channel != WEBSOCKET_CONNECT {
                return vec![];
            }
            let m: WebsocketConnect = e.decode().unwrap();
            let layer = flood.clone();
            let reply = m.reply_channel.clone();
            tokio::spawn(async move {
                let big = WebsocketSend::bytes(vec![0u8; 64 << 10]);
                for _ in 0..n {
                    let _ = layer.send(&reply, &big).await;
                    tokio::task::yield_now().await;
                }
            });
            vec![out(&m.reply_channel, &WebsocketSend::accept())]
        },
    )
    .await;
    (layer, server, worker)
}

#[tokio::test]
async fn slow_reader_is_closed_with_1013_and_counted() {
    let (_layer, server, mut worker) = flood_stack(
        ServerConfig {
            outbound_queue: 8,
            write_timeout: Duration::from_millis(500),
            ..ServerConfig::default()
        },
        2000,
    )
    .await;
    // Connect, then never read: the kernel buffers fill, writes stall, the queue overflows.
    let _ws = ws_connect(&server.ws_url("/slow")).await;
    let d: WebsocketDisconnect = worker.next_on(WEBSOCKET_DISCONNECT).await.decode().unwrap();
    assert!(d.code == 1013 || d.code == 1006, "code {}", d.code);
    let m = server.metrics.snapshot();
    assert!(m.slow_client_drops > 0 || m.slow_client_closes > 0, "{m:?}");
    assert_eq!(m.slow_client_closes, 1, "{m:?}");
}

#[tokio::test]
async fn a_write_stalled_past_the_write_timeout_drops_the_socket() {
    // 400 × 64 KiB: far more than the kernel buffers of a loopback socket hold.
    let (_layer, server, mut worker) = flood_stack(
        ServerConfig {
            // Room for the whole flood: only the stalled write can end this socket.
            outbound_queue: 1_000,
            slow_client: SlowClientPolicy::Drop,
            write_timeout: Duration::from_millis(300),
            ..ServerConfig::default()
        },
        400,
    )
    .await;
    let connected = std::time::Instant::now();
    let _ws = ws_connect(&server.ws_url("/stalled")).await;
    let d: WebsocketDisconnect = worker.next_on(WEBSOCKET_DISCONNECT).await.decode().unwrap();
    // Not before the timeout: a full write buffer (`WriteBufferFull`) would end it at once.
    assert!(
        connected.elapsed() >= Duration::from_millis(300),
        "{:?}",
        connected.elapsed()
    );
    assert_eq!(
        d.code, 1006,
        "dropped, not closed: no close frame can get through"
    );
    let m = server.metrics.snapshot();
    assert_eq!((m.slow_client_closes, m.slow_client_drops), (1, 0), "{m:?}");
}

#[tokio::test]
async fn slow_reader_with_drop_policy_keeps_the_socket() {
    let (layer, server, _worker) = flood_stack(
        ServerConfig {
            outbound_queue: 4,
            slow_client: SlowClientPolicy::Drop,
            ..ServerConfig::default()
        },
        300,
    )
    .await;
    let mut ws = ws_connect(&server.ws_url("/slow")).await;
    // Read nothing until drops have happened, then read what is left: the socket is still open.
    eventually(WAIT, "a drop counted", || {
        layer.metrics().snapshot().local_full > 0
    })
    .await;
    let mut got = 0;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(
        Duration::from_millis(500),
        futures_util::StreamExt::next(&mut ws),
    )
    .await
    {
        if m.is_binary() {
            got += 1;
        }
    }
    let m = server.metrics.snapshot();
    assert!(got > 0 && got < 300, "received {got}");
    // Every message was either written or dropped and counted (by the inbox at once, by the
    // server when the socket task next looks).
    assert_eq!(
        got as u64 + layer.metrics().snapshot().local_full,
        300,
        "{m:?}"
    );
    assert!(m.slow_client_drops > 0, "{m:?}");
    assert_eq!(m.slow_client_closes, 0);
    send_text(&mut ws, "still here").await;
}

/// The socket loop polls the client's stream only after the stream woke it, and replies wake
/// it far more often: a ping that arrives while the socket's reply buffer is full must be read
/// and answered while those replies go out, not after the last of them.
#[tokio::test]
async fn a_ping_during_a_reply_flood_is_answered_before_the_flood_ends() {
    use futures_util::StreamExt;
    // 600 × 64 KiB (39 MB): several times what loopback socket buffers hold even when tuned up.
    const FLOOD: usize = 600;
    let (layer, server, _worker) = flood_stack(
        ServerConfig {
            // Room for the whole flood: nothing is dropped, the client reads every message.
            outbound_queue: FLOOD,
            slow_client: SlowClientPolicy::Drop,
            ..ServerConfig::default()
        },
        FLOOD,
    )
    .await;
    let mut ws = ws_connect(&server.ws_url("/flood")).await;
    // Read nothing until the inbox has handed out the whole flood (plus the connect, to the
    // worker, and the accept): the socket's write is stalled on full loopback buffers and the
    // rest of the flood waits in its reply buffer.
    eventually(WAIT, "the flood in the socket's buffer", || {
        layer.metrics().snapshot().received >= FLOOD as u64 + 2
    })
    .await;
    ws.send(Message::Ping(b"mid-flood".to_vec().into()))
        .await
        .unwrap();
    let (mut binaries, mut pong_after) = (0usize, None);
    tokio::time::timeout(WAIT, async {
        while binaries < FLOOD {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => {
                    assert_eq!(b.len(), 64 << 10);
                    binaries += 1;
                }
                Some(Ok(Message::Pong(p))) => {
                    assert_eq!(&p[..], b"mid-flood");
                    pong_after = Some(binaries);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .expect("the flood did not arrive");
    let m = server.metrics.snapshot();
    assert_eq!((m.slow_client_drops, m.slow_client_closes), (0, 0), "{m:?}");
    // A loop that read only once its replies ran out would answer after all of them; a fair
    // one answers after what the socket buffers held and a write batch or two.
    let pong_after = pong_after.expect("the ping was not answered before the flood ended");
    assert!(
        pong_after < FLOOD - 64,
        "pong only after {pong_after} of {FLOOD}"
    );
}

/// With an idle timeout, activity moves the socket's deadline later; the loop lets its timer
/// fire at the earlier deadline and finds nothing due then, instead of moving the timer on every
/// message. A busy socket stays open past several idle timeouts and closes one timeout after
/// it falls quiet.
#[tokio::test]
async fn activity_keeps_a_socket_past_its_idle_timeout_until_it_falls_quiet() {
    const IDLE: Duration = Duration::from_millis(300);
    let layer = Layer::from_url("memory://", LayerSettings::default())
        .await
        .unwrap();
    let _worker = Worker::echo(&layer).await;
    let server = TestServer::start(
        layer,
        ServerConfig {
            idle_timeout: Some(IDLE),
            ..ServerConfig::default()
        },
    )
    .await;
    let mut ws = ws_connect(&server.ws_url("/busy")).await;
    let started = std::time::Instant::now();
    let mut last_echo = started;
    // One echo every 100 ms for 1 s: more than three idle timeouts, never idle for one.
    for i in 0..10 {
        let text = format!("busy {i}");
        send_text(&mut ws, &text).await;
        match next_message(&mut ws).await {
            Some(Message::Text(t)) => assert_eq!(t.as_str(), text),
            other => panic!(
                "closed while busy, after {:?}: {other:?}",
                started.elapsed()
            ),
        }
        last_echo = std::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(close_code(&mut ws).await, Some(1000));
    // The server's last activity was the last echo's write, a little before the client read
    // it: the close comes one idle timeout after that, give or take the loopback.
    let waited = last_echo.elapsed();
    assert!(
        waited + Duration::from_millis(50) >= IDLE,
        "closed {waited:?} after the last echo"
    );
    assert!(
        waited < IDLE * 4,
        "closed only {waited:?} after the last echo"
    );
}

#[tokio::test]
async fn unanswered_pings_drop_the_connection() {
    let (layer, server) = TestServer::on_memory(ServerConfig {
        ping_interval: Duration::from_millis(200),
        ping_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    })
    .await;
    let mut worker = Worker::echo(&layer).await;
    // A client that reads answers pings (tungstenite does it) and stays.
    let mut alive = ws_connect(&server.ws_url("/alive")).await;
    // A client that never reads never answers.
    let _dead = ws_connect(&server.ws_url("/dead")).await;
    let reader = tokio::spawn(async move {
        let mut pings = 0;
        let until = tokio::time::Instant::now() + Duration::from_millis(1500);
        while let Ok(Some(Ok(m))) =
            tokio::time::timeout_at(until, futures_util::StreamExt::next(&mut alive)).await
        {
            if m.is_ping() {
                pings += 1;
            }
        }
        (pings, alive)
    });
    let d: WebsocketDisconnect = worker.next_on(WEBSOCKET_DISCONNECT).await.decode().unwrap();
    assert_eq!(d.path, "/dead");
    assert_eq!(d.code, 1006);
    let (pings, mut alive) = reader.await.unwrap();
    assert!(pings >= 2, "pings {pings}");
    send_text(&mut alive, "still alive").await;
    assert_eq!(
        next_message(&mut alive).await,
        Some(Message::text("still alive"))
    );
    assert_eq!(server.metrics.snapshot().ping_timeouts, 1);
}

#[tokio::test]
async fn idle_and_lifetime_limits_close_1000() {
    let layer = Layer::from_url("memory://", LayerSettings::default())
        .await
        .unwrap();
    let mut worker = Worker::echo(&layer).await;
    let idle = TestServer::start(
        layer.clone(),
        ServerConfig {
            idle_timeout: Some(Duration::from_millis(300)),
            ..ServerConfig::default()
        },
    )
    .await;
    let mut ws = ws_connect(&idle.ws_url("/idle")).await;
    assert_eq!(close_code(&mut ws).await, Some(1000));
    let d: WebsocketDisconnect = worker.next_on(WEBSOCKET_DISCONNECT).await.decode().unwrap();
    assert_eq!((d.path.as_str(), d.code), ("/idle", 1000));

    // Lifetime: the socket is busy, yet closed when its time is up (group expiry by default).
    let short = LayerSettings {
        group_expiry: Duration::from_millis(600),
        ..LayerSettings::default()
    };
    let short_layer = Layer::from_url("memory://", short).await.unwrap();
    let mut short_worker = Worker::echo(&short_layer).await;
    let lifetime = TestServer::start(short_layer.clone(), ServerConfig::default()).await;
    let mut ws = ws_connect(&lifetime.ws_url("/life")).await;
    let started = tokio::time::Instant::now();
    let code = loop {
        send_text(&mut ws, "busy").await;
        match next_message(&mut ws).await {
            Some(Message::Text(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            Some(Message::Close(f)) => break f.map(|f| u16::from(f.code)),
            other => panic!("unexpected {other:?}"),
        }
        assert!(started.elapsed() < WAIT, "lifetime never enforced");
    };
    assert_eq!(code, Some(1000));
    let d: WebsocketDisconnect = short_worker
        .next_on(WEBSOCKET_DISCONNECT)
        .await
        .decode()
        .unwrap();
    assert_eq!(d.code, 1000);
}

/// A client that floods frames as fast as it can still gets its echoes, and its lifetime close:
/// a server reading first would always find another frame and never look at anything else. Over
/// Redis each frame costs the server a round trip, so the client outpaces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flooding_client_still_gets_replies_and_its_lifetime_close() {
    use futures_util::StreamExt;
    let settings = LayerSettings {
        channel_capacity: vec![("websocket.receive".into(), 1_000_000)],
        ..LayerSettings::default()
    };
    let fx = Fixture::new(Backend::Redis, settings).await;
    let server = TestServer::start(
        fx.layer.clone(),
        ServerConfig {
            websocket_lifetime: Some(Duration::from_secs(1)),
            slow_client: SlowClientPolicy::Drop,
            ..ServerConfig::default()
        },
    )
    .await;
    let _worker = Worker::echo(&fx.layer).await;
    let ws = ws_connect(&server.ws_url("/flood")).await;
    let (mut sink, mut stream) = ws.split();
    let flood = tokio::spawn(async move {
        let mut sent = 0u64;
        'flood: loop {
            for _ in 0..64 {
                if sink.feed(Message::text("flood")).await.is_err() {
                    break 'flood;
                }
                sent += 1;
            }
            if sink.flush().await.is_err() {
                break;
            }
        }
        sent
    });
    let (echoes, code) = tokio::time::timeout(WAIT, async {
        let mut echoes = 0u64;
        loop {
            match stream.next().await {
                Some(Ok(Message::Text(t))) => {
                    assert_eq!(t.as_str(), "flood");
                    echoes += 1;
                }
                Some(Ok(Message::Close(frame))) => {
                    return (echoes, frame.map(|f| u16::from(f.code)));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("socket failed before its close: {e}"),
                None => panic!("socket ended without a close frame"),
            }
        }
    })
    .await
    .expect("a flooding client was never closed at its lifetime");
    assert_eq!(code, Some(1000));
    assert!(echoes > 0, "no echo reached the flooding client");
    let sent = tokio::time::timeout(WAIT, flood).await.unwrap().unwrap();
    assert!(sent >= echoes);
}

#[tokio::test]
async fn sockets_survive_a_redis_outage() {
    let mut fx = Fixture::new(Backend::Redis, LayerSettings::default()).await;
    let server = TestServer::start(fx.layer.clone(), ServerConfig::default()).await;
    let _worker = Worker::echo(&fx.layer).await;
    let mut ws = ws_connect(&server.ws_url("/outage")).await;
    send_text(&mut ws, "before").await;
    assert_eq!(next_message(&mut ws).await, Some(Message::text("before")));
    fx.redis.as_mut().unwrap().stop();
    send_text(&mut ws, "during").await;
    tokio::time::timeout(WAIT, async {
        while server.metrics.snapshot().ws_frames_lost == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the frame sent during the outage was not counted as lost");
    fx.redis.as_mut().unwrap().restart();
    // Same socket, no reconnect: echoes flow again once the layer is back.
    let mut n = 0;
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            n += 1;
            send_text(&mut ws, &format!("after {n}")).await;
            if let Ok(Some(m)) = tokio::time::timeout(
                Duration::from_millis(500),
                futures_util::StreamExt::next(&mut ws),
            )
            .await
            {
                let m = m.unwrap();
                if let Message::Text(t) = m {
                    assert!(t.starts_with("after "), "{t}");
                    break;
                }
            }
        }
    })
    .await
    .expect("socket did not recover after Redis came back");
    assert_eq!(server.metrics.snapshot().open_websockets, 1);
}

#[tokio::test]
async fn shutdown_closes_sockets_with_1001_and_tells_workers() {
    let (layer, mut server) = TestServer::on_memory(ServerConfig::default()).await;
    let mut worker = Worker::echo(&layer).await;
    let mut a = ws_connect(&server.ws_url("/a")).await;
    let mut b = ws_connect(&server.ws_url("/b")).await;
    send_text(&mut a, "one").await;
    assert_eq!(next_message(&mut a).await, Some(Message::text("one")));
    let stopping = tokio::spawn(async move {
        server.stop().await;
        server
    });
    assert_eq!(close_code(&mut a).await, Some(1001));
    assert_eq!(close_code(&mut b).await, Some(1001));
    let mut seen = Vec::new();
    for _ in 0..2 {
        let d: WebsocketDisconnect = worker.next_on(WEBSOCKET_DISCONNECT).await.decode().unwrap();
        seen.push((d.path, d.code, d.order));
    }
    seen.sort();
    assert_eq!(
        seen,
        [("/a".to_owned(), 1001, 2), ("/b".to_owned(), 1001, 1)]
    );
    let server = tokio::time::timeout(WAIT, stopping).await.unwrap().unwrap();
    assert_eq!(server.metrics.snapshot().open_websockets, 0);
}

/// Many sockets closing at once on shutdown into a `websocket.disconnect` channel that holds two:
/// every disconnect still reaches the worker (retried while full), none is lost.
#[tokio::test]
async fn shutdown_disconnects_are_retried_while_the_channel_is_full() {
    let settings = LayerSettings {
        channel_capacity: vec![("websocket.disconnect".into(), 2)],
        ..LayerSettings::default()
    };
    let layer = Layer::from_url("memory://", settings).await.unwrap();
    let mut server = TestServer::start(layer.clone(), ServerConfig::default()).await;
    let mut worker = Worker::echo(&layer).await;
    const SOCKETS: usize = 30;
    let mut sockets = Vec::new();
    for i in 0..SOCKETS {
        sockets.push(ws_connect(&server.ws_url(&format!("/s{i}"))).await);
    }
    let metrics = std::sync::Arc::clone(&server.metrics);
    let stopping = tokio::spawn(async move { server.stop().await });
    for ws in &mut sockets {
        assert_eq!(close_code(ws).await, Some(1001));
    }
    let mut paths = Vec::new();
    for _ in 0..SOCKETS {
        let d: WebsocketDisconnect = worker.next_on(WEBSOCKET_DISCONNECT).await.decode().unwrap();
        assert_eq!((d.code, d.order), (1001, 1));
        paths.push(d.path);
    }
    paths.sort();
    paths.dedup();
    assert_eq!(paths.len(), SOCKETS);
    tokio::time::timeout(WAIT, stopping).await.unwrap().unwrap();
    assert_eq!(metrics.snapshot().ws_disconnects_lost, 0);
}

/// A disconnect the layer still refuses when the shutdown grace ends is counted as lost.
#[tokio::test]
async fn disconnects_refused_past_the_grace_are_counted_lost() {
    let settings = LayerSettings {
        channel_capacity: vec![("websocket.disconnect".into(), 1)],
        ..LayerSettings::default()
    };
    let layer = Layer::from_url("memory://", settings).await.unwrap();
    let mut server = TestServer::start(
        layer.clone(),
        ServerConfig {
            shutdown_grace: Duration::from_millis(1500),
            ..ServerConfig::default()
        },
    )
    .await;
    // Accepts sockets, never reads websocket.disconnect.
    let _worker = Worker::spawn(&layer, &[WEBSOCKET_CONNECT], echo_answer).await;
    let mut sockets = Vec::new();
    for i in 0..3 {
        sockets.push(ws_connect(&server.ws_url(&format!("/l{i}"))).await);
    }
    let metrics = std::sync::Arc::clone(&server.metrics);
    server.stop().await;
    for ws in &mut sockets {
        assert_eq!(close_code(ws).await, Some(1001));
    }
    assert_eq!(layer.channel_depth(WEBSOCKET_DISCONNECT).await.unwrap(), 1);
    // Tasks past the grace are not waited for by `serve`; the last retry ends with it.
    tokio::time::timeout(WAIT, async {
        while metrics.snapshot().ws_disconnects_lost < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("refused disconnects were not counted");
    assert_eq!(metrics.snapshot().ws_disconnects_lost, 2);
}

#[tokio::test]
async fn subprotocol_is_chosen_from_the_allowed_list() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let (layer, server) = TestServer::on_memory(ServerConfig {
        ws_protocols: vec!["chat.v2".into(), "chat.v1".into()],
        ..ServerConfig::default()
    })
    .await;
    let _worker = Worker::echo(&layer).await;
    let mut request = server.ws_url("/proto").into_client_request().unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "mqtt, chat.v1, chat.v2".parse().unwrap(),
    );
    let (_ws, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "chat.v1");
    // Nothing offered that is allowed: no header.
    let mut request = server.ws_url("/proto").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "mqtt".parse().unwrap());
    let result = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .unwrap();
    // tungstenite's client refuses a response without the protocol it asked for; the server
    // answered 101 without one, which is what the RFC allows.
    assert!(
        result.is_err()
            || result
                .unwrap()
                .1
                .headers()
                .get("sec-websocket-protocol")
                .is_none()
    );
}
