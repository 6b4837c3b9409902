//! Networking for the bench: target URL parsing with the loopback-only rule, client sockets
//! bound to spread 127.0.0.x source addresses (one ephemeral-port range per address), WebSocket
//! handshakes with small buffers, failure classification, and the open-file limit.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue, Uri};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::BenchError;

/// The client side of one bench WebSocket.
pub type Ws = WebSocketStream<TcpStream>;

/// A parsed, checked load target.
#[derive(Debug, Clone)]
pub struct Target {
    /// The URL as given (after `{room}` substitution).
    pub url: String,
    /// Where to connect: always a loopback address.
    pub addr: SocketAddr,
    /// `host[:port]` for the Host header.
    pub authority: String,
    /// Path and query, `/` when empty.
    pub path: String,
}

/// Parses `url`, requiring one of `schemes` and a loopback host (127.0.0.0/8, ::1, localhost).
pub fn parse_target(url: &str, schemes: &[&str]) -> Result<Target, BenchError> {
    let uri: Uri = url
        .parse()
        .map_err(|e| BenchError::BadUrl(format!("{url:?}: {e}")))?;
    let scheme = uri.scheme_str().unwrap_or("");
    if !schemes.contains(&scheme) {
        return Err(BenchError::BadUrl(format!(
            "{url:?}: the scheme must be {}",
            schemes.join(" or ")
        )));
    }
    let host = uri
        .host()
        .ok_or_else(|| BenchError::BadUrl(format!("{url:?}: no host")))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let ip = loopback_ip(bare).ok_or_else(|| BenchError::NotLoopback(host.to_owned()))?;
    let port = uri
        .port_u16()
        .unwrap_or(if scheme == "wss" || scheme == "https" {
            443
        } else {
            80
        });
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_else(|| host.to_owned());
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| !p.is_empty())
        .unwrap_or("/")
        .to_owned();
    Ok(Target {
        url: url.to_owned(),
        addr: SocketAddr::new(ip, port),
        authority,
        path,
    })
}

/// A handshake header given as `Name: value`.
pub type Header = (HeaderName, HeaderValue);

/// Parses `--header` values (`Name: value`).
pub fn parse_headers(given: &[String]) -> Result<Vec<Header>, BenchError> {
    given
        .iter()
        .map(|h| {
            let bad = || BenchError::Usage(format!("--header takes `Name: value`, got {h:?}"));
            let (name, value) = h.split_once(':').ok_or_else(bad)?;
            let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| bad())?;
            let value = HeaderValue::from_str(value.trim()).map_err(|_| bad())?;
            Ok((name, value))
        })
        .collect()
}

/// The address for a loopback host name or literal; `None` for anything else.
fn loopback_ip(host: &str) -> Option<IpAddr> {
    if host.eq_ignore_ascii_case("localhost") {
        return Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    let ip: IpAddr = host.parse().ok()?;
    let canonical = ip.to_canonical();
    canonical.is_loopback().then_some(canonical)
}

/// The source address for the `index`-th connection to `target`: spread over
/// 127.0.0.1 ..= 127.0.0.`spread` for IPv4 targets, so each address brings its own ephemeral
/// port range; `None` (let the kernel choose) for IPv6 or `spread <= 1`.
pub fn source_addr(target: SocketAddr, index: usize, spread: u8) -> Option<SocketAddr> {
    if !target.is_ipv4() || spread <= 1 {
        return None;
    }
    let last = 1 + (index % usize::from(spread)) as u8;
    Some(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)),
        0,
    ))
}

/// Opens a TCP connection to `target` from the `index`-th source address, with TCP_NODELAY.
pub async fn connect_tcp(target: SocketAddr, index: usize, spread: u8) -> io::Result<TcpStream> {
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(source) = source_addr(target, index, spread) {
        socket.bind(source)?;
    }
    let stream = socket.connect(target).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// WebSocket buffers sized for many connections: tungstenite's 128 KiB defaults would cost more
/// memory than the server under test. The read buffer holds one message and its header: tungstenite
/// zeroes the buffer's free room before every read, so a 4 KiB buffer for 64-byte messages made
/// that zeroing most of the client's own instructions per message (callgrind).
pub fn ws_config(message_size: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size((message_size + 64).clamp(1024, 64 * 1024))
        .write_buffer_size(16 * 1024)
}

/// A bench payload as a WebSocket message: binary, or text (bench payloads are ASCII, so the
/// UTF-8 check always passes; a payload that failed it would go out as binary).
pub fn ws_message(bytes: bytes::Bytes, binary: bool) -> Message {
    if binary {
        return Message::Binary(bytes);
    }
    match Utf8Bytes::try_from(bytes.clone()) {
        Ok(text) => Message::Text(text),
        Err(_) => Message::Binary(bytes),
    }
}

/// Why a connection attempt failed, as a short stable label for counting.
#[derive(Debug, Clone)]
pub struct ConnectFailure {
    /// `refused`, `timeout`, `reset`, `no_source_port`, `fd_limit`, `http_<status>`, ...
    pub kind: String,
    /// The full error, for the first few reports.
    pub detail: String,
}

/// Opens a TCP connection and completes the WebSocket handshake (with `headers` besides its
/// own), within `timeout`.
pub async fn connect_ws(
    target: &Target,
    index: usize,
    spread: u8,
    config: WebSocketConfig,
    timeout: Duration,
    headers: &[Header],
) -> Result<Ws, ConnectFailure> {
    let attempt = async {
        let stream = connect_tcp(target.addr, index, spread)
            .await
            .map_err(|e| ConnectFailure {
                kind: io_kind(&e).to_owned(),
                detail: format!("connect: {e}"),
            })?;
        let mut request = target
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| ws_failure(&e))?;
        for (name, value) in headers {
            request.headers_mut().insert(name.clone(), value.clone());
        }
        let (ws, _response) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(config))
                .await
                .map_err(|e| ws_failure(&e))?;
        Ok(ws)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(ConnectFailure {
            kind: "timeout".to_owned(),
            detail: format!("no handshake within {timeout:?}"),
        }),
    }
}

fn ws_failure(e: &tokio_tungstenite::tungstenite::Error) -> ConnectFailure {
    use tokio_tungstenite::tungstenite::Error;
    let kind = match e {
        Error::Io(io) => io_kind(io).to_owned(),
        Error::Http(response) => format!("http_{}", response.status().as_u16()),
        Error::Protocol(_) | Error::HttpFormat(_) | Error::Utf8(_) => "handshake".to_owned(),
        Error::ConnectionClosed | Error::AlreadyClosed => "closed".to_owned(),
        _ => "other".to_owned(),
    };
    ConnectFailure {
        kind,
        detail: format!("handshake: {e}"),
    }
}

/// A short label for an I/O error.
pub fn io_kind(e: &io::Error) -> &'static str {
    // EMFILE and ENFILE have no stable ErrorKind; these are their Linux numbers.
    match e.raw_os_error() {
        Some(24 | 23) => return "fd_limit",
        Some(99) => return "no_source_port",
        _ => {}
    }
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "refused",
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => "reset",
        io::ErrorKind::BrokenPipe => "broken_pipe",
        io::ErrorKind::TimedOut => "timeout",
        io::ErrorKind::AddrNotAvailable => "no_source_port",
        io::ErrorKind::AddrInUse => "addr_in_use",
        io::ErrorKind::UnexpectedEof => "eof",
        _ => "io",
    }
}

/// Raises the open-file limit for a run that needs `wanted` descriptors: the soft limit up to
/// the hard one, then, when that is still short and the process may (root or
/// CAP_SYS_RESOURCE), the hard limit too, up to the kernel's `fs.nr_open`. Returns the soft
/// limit in force and warns on stderr when it stays below `wanted`.
pub fn raise_fd_limit(wanted: u64) -> u64 {
    let mut limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            eprintln!("bench: warning: cannot raise the open-file limit: {e}");
            return 0;
        }
    };
    if limit < wanted {
        let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(wanted);
        let target = wanted.min(ceiling);
        if target > limit && rlimit::setrlimit(rlimit::Resource::NOFILE, target, target).is_ok() {
            limit = target;
        }
    }
    if limit < wanted {
        eprintln!(
            "bench: warning: open-file limit is {limit}, below the {wanted} this run needs \
             (raise the hard limit: ulimit -Hn)"
        );
    }
    limit
}

/// The next data frame's bytes from a WebSocket stream: `Ok(None)` once `stop` resolves, `Err`
/// saying why the stream ended otherwise (close frame, error, end). Control frames are skipped.
pub async fn next_data<S, F>(stream: &mut S, stop: &mut F) -> Result<Option<bytes::Bytes>, String>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
    F: std::future::Future<Output = ()> + Unpin,
{
    use futures_util::StreamExt;
    loop {
        let next = tokio::select! {
            biased;
            () = &mut *stop => return Ok(None),
            m = stream.next() => m,
        };
        match next {
            Some(Ok(Message::Text(t))) => return Ok(Some(bytes::Bytes::from(t))),
            Some(Ok(Message::Binary(b))) => return Ok(Some(b)),
            Some(Ok(Message::Close(frame))) => {
                return Err(format!("closed by the server: {frame:?}"));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("receive: {e}")),
            None => return Err("connection closed by the server".to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_name_colon_value() {
        let h = parse_headers(&[
            "Origin: http://bench.example".to_owned(),
            "authorization:Bearer a.b.c".to_owned(),
        ])
        .unwrap();
        assert_eq!(h[0].0, "origin");
        assert_eq!(h[0].1, "http://bench.example");
        assert_eq!(h[1].1, "Bearer a.b.c");
        assert!(parse_headers(&["no colon".to_owned()]).is_err());
        assert!(parse_headers(&["bad name: x".to_owned()]).is_err());
    }

    #[test]
    fn loopback_targets_are_accepted() {
        let t = parse_target("ws://127.0.0.1:8000/ws/echo/", &["ws"]).unwrap();
        assert_eq!(t.addr, "127.0.0.1:8000".parse().unwrap());
        assert_eq!(t.path, "/ws/echo/");
        assert_eq!(t.authority, "127.0.0.1:8000");
        let t = parse_target("ws://localhost/x", &["ws"]).unwrap();
        assert_eq!(t.addr, "127.0.0.1:80".parse().unwrap());
        let t = parse_target("http://[::1]:9000", &["http"]).unwrap();
        assert_eq!(t.addr, "[::1]:9000".parse().unwrap());
        assert_eq!(t.path, "/");
        let t = parse_target("ws://127.3.4.5:1/", &["ws"]).unwrap();
        assert_eq!(t.addr.ip(), "127.3.4.5".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn other_hosts_are_refused() {
        for url in [
            "ws://10.0.0.1:8000/ws/echo/",
            "ws://192.168.1.2/",
            "ws://example.com/",
            "ws://[2001:db8::1]/",
            "ws://0.0.0.0:8000/",
            "ws://128.0.0.1/",
        ] {
            match parse_target(url, &["ws"]) {
                Err(BenchError::NotLoopback(_)) => {}
                other => panic!("{url} gave {other:?}"),
            }
        }
    }

    #[test]
    fn bad_urls_are_usage_errors() {
        assert!(matches!(
            parse_target("http://127.0.0.1/", &["ws"]),
            Err(BenchError::BadUrl(_))
        ));
        assert!(matches!(
            parse_target("not a url", &["ws"]),
            Err(BenchError::BadUrl(_))
        ));
    }

    #[test]
    fn sources_spread_over_loopback_addresses() {
        let v4: SocketAddr = "127.0.0.1:80".parse().unwrap();
        assert_eq!(
            source_addr(v4, 0, 250).unwrap().ip().to_string(),
            "127.0.0.1"
        );
        assert_eq!(
            source_addr(v4, 249, 250).unwrap().ip().to_string(),
            "127.0.0.250"
        );
        assert_eq!(
            source_addr(v4, 250, 250).unwrap().ip().to_string(),
            "127.0.0.1"
        );
        assert_eq!(source_addr(v4, 7, 1), None);
        assert_eq!(source_addr("[::1]:80".parse().unwrap(), 3, 250), None);
    }
}
