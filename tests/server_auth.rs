//! Authentication at the edge over real sockets: JWTs (HS256, RS256, ES256) from the
//! Authorization header, a `bearer.<token>` subprotocol or a `token` query parameter, verified by
//! the interface server; the claims reach the worker under `user` in `http.request`,
//! `websocket.connect` and `websocket.receive`; invalid, expired, unsigned (`alg: none`) and
//! algorithm-confused tokens are refused (401 on HTTP, 403 at the handshake) before any worker
//! hears of them; paths can require a token; a socket is closed with 4001 when its token expires,
//! unless a refresh frame brought a new token for the same `sub` (any other refresh closes it);
//! `/healthz` can require a bearer token.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod server_support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use switchyard::asgi::{
    HTTP_REQUEST, HttpRequest, WEBSOCKET_CONNECT, WEBSOCKET_DISCONNECT, WEBSOCKET_RECEIVE,
    WebsocketConnect, WebsocketDisconnect, WebsocketReceive,
};
use switchyard::server::{AuthConfig, JwtConfig, JwtKey, ServerConfig};
use switchyard::{Map, Value};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use server_support::*;

const SECRET: &[u8] = b"edge-secret-for-tests";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hs256(claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET).unwrap(),
    )
    .unwrap()
}

fn alice(exp: u64) -> serde_json::Value {
    json!({"sub": "alice", "name": "Alice", "role": "admin", "secret_claim": "x", "exp": exp})
}

fn jwt_config(key: JwtKey) -> JwtConfig {
    JwtConfig {
        key,
        claims: vec!["name".into(), "role".into()],
        leeway: Duration::ZERO,
        audience: None,
        issuer: None,
    }
}

fn config(key: JwtKey, required: &[&str]) -> ServerConfig {
    ServerConfig {
        auth: AuthConfig {
            jwt: Some(jwt_config(key)),
            required_paths: required.iter().map(|p| (*p).to_owned()).collect(),
            ops_token: Some("ops-token".into()),
            expired_close_code: None,
            refresh_prefix: None,
        },
        ..ServerConfig::default()
    }
}

fn expected_user() -> Map {
    Map::new()
        .with("sub", "alice")
        .with("name", "Alice")
        .with("role", "admin")
}

/// A handshake request with extra headers.
fn ws_request(
    url: &str,
    headers: &[(&'static str, &str)],
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut req = url.into_client_request().unwrap();
    for (name, value) in headers {
        req.headers_mut().insert(*name, value.parse().unwrap());
    }
    req
}

async fn connect_with(
    url: &str,
    headers: &[(&'static str, &str)],
) -> Result<(Client, u16, Option<String>), u16> {
    match tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async(ws_request(url, headers)),
    )
    .await
    .expect("handshake timed out")
    {
        Ok((ws, resp)) => {
            let protocol = resp
                .headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().unwrap().to_owned());
            Ok((ws, resp.status().as_u16(), protocol))
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("unexpected handshake error {e}"),
    }
}

async fn get(url: &str, bearer: Option<&str>) -> (u16, Option<String>, String) {
    let mut req = http_client().get(url).header("user", "mallory");
    if let Some(token) = bearer {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, challenge, resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_hs256_token_rides_as_user_in_request_connect_and_receive() {
    let (layer, server) = TestServer::on_memory(config(JwtKey::Secret(SECRET.to_vec()), &[])).await;
    let mut worker = Worker::echo(&layer).await;
    let token = hs256(&alice(now() + 600));

    // HTTP, with a client-sent `user` header that must not become the identity.
    let (status, _, body) = get(&server.url("/api/me"), Some(&token)).await;
    assert_eq!((status, body.as_str()), (200, "echo: /api/me"));
    let request: HttpRequest = worker.next_on(HTTP_REQUEST).await.decode().unwrap();
    assert_eq!(request.user, Some(expected_user()));

    // Anonymous on a path that does not require a token: no `user` at all.
    let (status, _, _) = get(&server.url("/api/public"), None).await;
    assert_eq!(status, 200);
    let request: HttpRequest = worker.next_on(HTTP_REQUEST).await.decode().unwrap();
    assert_eq!(request.user, None);

    // WebSocket: connect and every frame carry the claims.
    let auth = format!("Bearer {token}");
    let (mut ws, status, _) = connect_with(
        &server.ws_url("/ws/room/?user=mallory"),
        &[("authorization", &auth)],
    )
    .await
    .unwrap();
    assert_eq!(status, 101);
    let connect: WebsocketConnect = worker.next_on(WEBSOCKET_CONNECT).await.decode().unwrap();
    assert_eq!(connect.user, Some(expected_user()));
    send_text(&mut ws, "hello").await;
    assert_eq!(next_message(&mut ws).await, Some(Message::text("hello")));
    let receive = worker.next_on(WEBSOCKET_RECEIVE).await;
    let raw = receive.to_map().unwrap();
    assert_eq!(raw.get("user"), Some(&Value::Map(expected_user())));
    let receive: WebsocketReceive = receive.decode().unwrap();
    assert_eq!(receive.user, Some(expected_user()));
    assert_eq!(server.metrics.snapshot().auth_refused, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_may_come_as_a_subprotocol_or_a_query_parameter() {
    let (layer, server) =
        TestServer::on_memory(config(JwtKey::Secret(SECRET.to_vec()), &["/ws/private/*"])).await;
    let mut worker = Worker::echo(&layer).await;
    let token = hs256(&alice(now() + 600));

    let offered = format!("bearer, bearer.{token}");
    let (mut ws, _, protocol) = connect_with(
        &server.ws_url("/ws/private/a"),
        &[("sec-websocket-protocol", &offered)],
    )
    .await
    .unwrap();
    assert_eq!(
        protocol.as_deref(),
        Some("bearer"),
        "the browser needs one echoed"
    );
    let connect: WebsocketConnect = worker.next_on(WEBSOCKET_CONNECT).await.decode().unwrap();
    assert_eq!(connect.user, Some(expected_user()));
    send_text(&mut ws, "x").await;
    assert_eq!(next_message(&mut ws).await, Some(Message::text("x")));

    let (_ws, _, _) = connect_with(
        &server.ws_url(&format!("/ws/private/b?room=1&token={token}")),
        &[],
    )
    .await
    .unwrap();
    let connect: WebsocketConnect = worker.next_on(WEBSOCKET_CONNECT).await.decode().unwrap();
    assert_eq!(connect.path, "/ws/private/b");
    assert_eq!(connect.user, Some(expected_user()));
}

/// Every kind of bad token, refused at HTTP (401 + challenge) and at the handshake (403), with
/// nothing reaching the worker.
async fn assert_refused(server: &TestServer, worker: &mut Worker, token: &str, what: &str) {
    let (status, challenge, body) = get(&server.url("/api/x"), Some(token)).await;
    assert_eq!(status, 401, "{what}: HTTP status");
    assert_eq!(challenge.as_deref(), Some("Bearer"), "{what}");
    assert_eq!(body, "Invalid or expired token\n", "{what}");
    let auth = format!("Bearer {token}");
    let refused = connect_with(&server.ws_url("/ws/x"), &[("authorization", &auth)]).await;
    assert_eq!(refused.err(), Some(403), "{what}: handshake status");
    let via_query = connect_with(&server.ws_url(&format!("/ws/x?token={token}")), &[]).await;
    assert_eq!(via_query.err(), Some(403), "{what}: query token");
    assert!(
        worker.seen.try_recv().is_err(),
        "{what}: a worker heard of a refused client"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_forged_unsigned_and_malformed_tokens_are_refused() {
    let (layer, server) = TestServer::on_memory(config(JwtKey::Secret(SECRET.to_vec()), &[])).await;
    let mut worker = Worker::echo(&layer).await;

    let expired = hs256(&alice(now() - 60));
    assert_refused(&server, &mut worker, &expired, "expired").await;

    let wrong_key = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &alice(now() + 600),
        &EncodingKey::from_secret(b"another secret").unwrap(),
    )
    .unwrap();
    assert_refused(&server, &mut worker, &wrong_key, "wrong signature").await;

    // `alg: none`, no signature: a token anyone can write.
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let unsigned = format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(alice(now() + 600).to_string())
    );
    assert_refused(&server, &mut worker, &unsigned, "alg none").await;

    // A valid signature over changed claims.
    let good = hs256(&json!({"sub": "bob", "exp": now() + 600}));
    let parts: Vec<&str> = good.split('.').collect();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64.encode(json!({"sub": "alice", "exp": now() + 600}).to_string()),
        parts[2]
    );
    assert_refused(&server, &mut worker, &tampered, "tampered claims").await;

    let no_sub = hs256(&json!({"exp": now() + 600}));
    assert_refused(&server, &mut worker, &no_sub, "no sub").await;
    let no_exp = hs256(&json!({"sub": "alice"}));
    assert_refused(&server, &mut worker, &no_exp, "no exp").await;
    assert_refused(&server, &mut worker, "not-a-jwt", "garbage").await;
    assert_eq!(server.metrics.snapshot().auth_refused, 7 * 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_can_require_a_token_at_the_edge() {
    let (layer, server) = TestServer::on_memory(config(
        JwtKey::Secret(SECRET.to_vec()),
        &["/ws/private/*", "/api/*"],
    ))
    .await;
    let mut worker = Worker::echo(&layer).await;

    let (status, challenge, body) = get(&server.url("/api/orders"), None).await;
    assert_eq!((status, challenge.as_deref()), (401, Some("Bearer")));
    assert_eq!(body, "Authentication required\n");
    assert_eq!(
        connect_with(&server.ws_url("/ws/private/room"), &[])
            .await
            .err(),
        Some(403)
    );
    assert!(
        worker.seen.try_recv().is_err(),
        "the worker heard of a refused client"
    );
    // Public paths stay open, anonymously.
    let (status, _, _) = get(&server.url("/public/page"), None).await;
    assert_eq!(status, 200);
    let (_ws, status, _) = connect_with(&server.ws_url("/ws/lobby/"), &[])
        .await
        .unwrap();
    assert_eq!(status, 101);
    let connect: WebsocketConnect = worker.next_on(WEBSOCKET_CONNECT).await.decode().unwrap();
    assert_eq!(connect.user, None);
    // With a token, the private path opens.
    let token = hs256(&alice(now() + 600));
    let (status, _, _) = get(&server.url("/api/orders"), Some(&token)).await;
    assert_eq!(status, 200);
    assert_eq!(server.metrics.snapshot().auth_refused, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_is_closed_with_4001_when_its_token_expires() {
    let (layer, server) = TestServer::on_memory(config(JwtKey::Secret(SECRET.to_vec()), &[])).await;
    let mut worker = Worker::echo(&layer).await;
    // exp has one-second resolution: 2-3 s from now.
    let token = hs256(&alice(now() + 3));
    let auth = format!("Bearer {token}");
    let (mut ws, _, _) = connect_with(&server.ws_url("/ws/short/"), &[("authorization", &auth)])
        .await
        .unwrap();
    send_text(&mut ws, "still valid").await;
    assert_eq!(
        next_message(&mut ws).await,
        Some(Message::text("still valid"))
    );
    assert_eq!(close_code(&mut ws).await, Some(4001));
    let gone: WebsocketDisconnect = worker.next_on(WEBSOCKET_DISCONNECT).await.decode().unwrap();
    assert_eq!(gone.code, 4001);
    assert_eq!(server.metrics.snapshot().token_expired_closes, 1);
}

const REFRESH: &str = "\u{1}token:";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refreshed_token_keeps_its_socket_open_past_the_old_expiry() {
    let mut config = config(JwtKey::Secret(SECRET.to_vec()), &[]);
    config.auth.refresh_prefix = Some(REFRESH.into());
    let (layer, server) = TestServer::on_memory(config).await;
    let mut worker = Worker::echo(&layer).await;
    let first_exp = now() + 2;
    let auth = format!("Bearer {}", hs256(&alice(first_exp)));
    let (mut ws, _, _) = connect_with(&server.ws_url("/ws/long/"), &[("authorization", &auth)])
        .await
        .unwrap();
    let renewed = json!({"sub": "alice", "name": "Alice B", "role": "admin", "exp": now() + 600});
    send_text(&mut ws, &format!("{REFRESH}{}", hs256(&renewed))).await;
    // The deadline under test is the first token's: the socket must outlive it.
    let past_first = UNIX_EPOCH + Duration::from_secs(first_exp + 1);
    let wait = past_first
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(wait).await;
    send_text(&mut ws, "after the old expiry").await;
    assert_eq!(
        next_message(&mut ws).await,
        Some(Message::text("after the old expiry"))
    );
    // The worker never saw the refresh frame, and sees the new claims.
    let receive: WebsocketReceive = worker.next_on(WEBSOCKET_RECEIVE).await.decode().unwrap();
    assert_eq!(receive.text.as_deref(), Some("after the old expiry"));
    assert_eq!(
        receive.user,
        Some(
            Map::new()
                .with("sub", "alice")
                .with("name", "Alice B")
                .with("role", "admin")
        )
    );
    let m = server.metrics.snapshot();
    assert_eq!(
        (
            m.token_refreshes,
            m.token_refreshes_refused,
            m.token_expired_closes
        ),
        (1, 0, 0)
    );

    // Another user's token, or a bad one, closes the socket with the expiry code.
    let mallory = hs256(&json!({"sub": "mallory", "exp": now() + 600}));
    for refresh in [mallory.as_str(), "not.a.token"] {
        let auth = format!("Bearer {}", hs256(&alice(now() + 600)));
        let (mut ws, _, _) = connect_with(&server.ws_url("/ws/x/"), &[("authorization", &auth)])
            .await
            .unwrap();
        send_text(&mut ws, &format!("{REFRESH}{refresh}")).await;
        assert_eq!(close_code(&mut ws).await, Some(4001));
    }
    assert_eq!(server.metrics.snapshot().token_refreshes_refused, 2);
}

/// openssl makes the RSA pair (rcgen cannot); rcgen the P-256 one.
fn rsa_pair(dir: &std::path::Path) -> (Vec<u8>, Vec<u8>) {
    let private = dir.join("rsa.pem");
    let made = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&private)
        .output()
        .expect("openssl runs");
    assert!(made.status.success(), "{made:?}");
    let public = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&private)
        .output()
        .expect("openssl runs");
    assert!(public.status.success(), "{public:?}");
    (std::fs::read(&private).unwrap(), public.stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_and_es256_public_keys_and_the_hs256_confusion_attack() {
    let dir = std::env::temp_dir().join(format!("switchyard-jwt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (rsa_private, rsa_public) = rsa_pair(&dir);
    let (layer, server) =
        TestServer::on_memory(config(JwtKey::RsaPem(rsa_public.clone()), &[])).await;
    let mut worker = Worker::echo(&layer).await;
    let signed = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &alice(now() + 600),
        &EncodingKey::from_rsa_pem(&rsa_private).unwrap(),
    )
    .unwrap();
    let (status, _, _) = get(&server.url("/rs"), Some(&signed)).await;
    assert_eq!(status, 200);
    let request: HttpRequest = worker.next_on(HTTP_REQUEST).await.decode().unwrap();
    assert_eq!(request.user, Some(expected_user()));
    // The classic confusion: HS256 with the server's public key as the HMAC secret.
    let confused = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &alice(now() + 600),
        &EncodingKey::from_secret(&rsa_public).unwrap(),
    )
    .unwrap();
    assert_refused(
        &server,
        &mut worker,
        &confused,
        "HS256 with the RSA public key",
    )
    .await;
    drop(server);

    let ec = rcgen::KeyPair::generate().unwrap();
    let (layer, server) =
        TestServer::on_memory(config(JwtKey::EcPem(ec.public_key_pem().into_bytes()), &[])).await;
    let mut worker = Worker::echo(&layer).await;
    let signed = jsonwebtoken::encode(
        &Header::new(Algorithm::ES256),
        &alice(now() + 600),
        &EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap(),
    )
    .unwrap();
    let auth = format!("Bearer {signed}");
    let (_ws, status, _) = connect_with(&server.ws_url("/ws/ec/"), &[("authorization", &auth)])
        .await
        .unwrap();
    assert_eq!(status, 101);
    let connect: WebsocketConnect = worker.next_on(WEBSOCKET_CONNECT).await.decode().unwrap();
    assert_eq!(connect.user, Some(expected_user()));
    // An RS256 token is not accepted by an ES256 server.
    let rs = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &alice(now() + 600),
        &EncodingKey::from_rsa_pem(&rsa_private).unwrap(),
    )
    .unwrap();
    assert_refused(&server, &mut worker, &rs, "RS256 at an ES256 server").await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_requires_the_ops_token_when_one_is_set() {
    let (_layer, server) =
        TestServer::on_memory(config(JwtKey::Secret(SECRET.to_vec()), &[])).await;
    let (status, challenge, _) = get(&server.url("/healthz"), None).await;
    assert_eq!((status, challenge.as_deref()), (401, Some("Bearer")));
    let (status, _, _) = get(&server.url("/healthz"), Some("wrong")).await;
    assert_eq!(status, 401);
    // A user's JWT is not the ops token.
    let (status, _, _) = get(&server.url("/healthz"), Some(&hs256(&alice(now() + 60)))).await;
    assert_eq!(status, 401);
    let (status, _, body) = get(&server.url("/healthz"), Some("ops-token")).await;
    assert_eq!(status, 200);
    assert!(body.contains("\"status\":\"ok\""), "{body}");
    assert_eq!(server.metrics.snapshot().auth_refused, 3);
}

#[tokio::test]
async fn bad_auth_settings_stop_the_server_from_starting() {
    let refused = |config: ServerConfig| async move {
        switchyard::server::Server::bind(ServerConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            ..config
        })
        .await
        .unwrap_err()
        .to_string()
    };
    let err = refused(ServerConfig {
        auth: AuthConfig {
            required_paths: vec!["/api/*".into()],
            ..AuthConfig::default()
        },
        ..ServerConfig::default()
    })
    .await;
    assert!(err.contains("need a JWT key"), "{err}");
    let err = refused(config(
        JwtKey::RsaPem(b"-----BEGIN PUBLIC KEY-----\nxx\n-----END PUBLIC KEY-----\n".to_vec()),
        &[],
    ))
    .await;
    assert!(err.contains("RSA PEM"), "{err}");
    let err = refused(config(JwtKey::Secret(Vec::new()), &[])).await;
    assert!(err.contains("secret is empty"), "{err}");
}
