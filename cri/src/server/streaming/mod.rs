//! The streaming server behind the Exec, Attach and PortForward RPCs.
//!
//! Each RPC validates its request and parks it here under a random
//! single-use token; the client (the kubelet's proxy, kubectl, crictl,
//! critest) then opens `/exec/<token>`, `/attach/<token>` or
//! `/portforward/<token>` and upgrades the connection to one of the
//! protocols the upstream kubelet serves:
//!
//! - SPDY/3.1 ([`spdy`]) with the remotecommand protocols
//!   `v4.channel.k8s.io` … `channel.k8s.io` (one SPDY stream per stdin,
//!   stdout, stderr, error and resize), or `portforward.k8s.io` (a data and
//!   an error stream per forwarded connection);
//! - WebSocket with `v5.channel.k8s.io`, `v4.channel.k8s.io` or
//!   `channel.k8s.io` (the first byte of each message names the channel),
//!   and for port forwarding `SPDY/3.1+portforward.k8s.io`: SPDY carried in
//!   WebSocket messages, as client-go's tunnelling dialer sends it.

mod portforward;
mod remotecommand;
pub mod spdy;
mod websocket;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

pub use portforward::PortForwardSpec;
pub use remotecommand::{AttachSpec, ExecSpec};

/// How long a URL stays usable (the kubelet's default too).
const TOKEN_TTL: Duration = Duration::from_secs(60);
/// How long a SPDY client may take to open the streams it announced (the
/// kubelet's default).
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the streaming server cannot start or hand out a URL.
#[derive(Debug, thiserror::Error)]
pub enum StreamingError {
    /// `stream_address` is not `ip:port` or cannot be bound.
    #[error("streaming server on {address}: {source}")]
    Bind {
        /// The configured address.
        address: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// No randomness for a token.
    #[error("read /dev/urandom: {0}")]
    Random(#[source] std::io::Error),
}

/// A validated request, served when its URL is opened.
#[derive(Debug, Clone)]
pub enum Pending {
    /// Run a command in a container.
    Exec(ExecSpec),
    /// Connect to a container's stdio.
    Attach(AttachSpec),
    /// Forward connections into a pod's network namespace.
    PortForward(PortForwardSpec),
}

impl Pending {
    fn path(&self) -> &'static str {
        match self {
            Pending::Exec(_) => "exec",
            Pending::Attach(_) => "attach",
            Pending::PortForward(_) => "portforward",
        }
    }
}

/// The token cache and where the server listens.
pub struct Streaming {
    addr: SocketAddr,
    /// Console sockets of tty execs.
    console_dir: PathBuf,
    pending: Mutex<HashMap<String, (Pending, Instant)>>,
}

impl Streaming {
    /// Binds `address` (`ip:port`, port 0 for any); `console_dir` holds
    /// the console sockets of tty execs.
    pub async fn bind(
        address: &str,
        console_dir: PathBuf,
    ) -> Result<(Arc<Self>, TcpListener), StreamingError> {
        let bind_error = |source| StreamingError::Bind {
            address: address.to_owned(),
            source,
        };
        let listener = TcpListener::bind(address).await.map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        let streaming = Arc::new(Self {
            addr,
            console_dir,
            pending: Mutex::new(HashMap::new()),
        });
        Ok((streaming, listener))
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Parks `request` under a fresh token and returns its URL.
    pub fn url(&self, request: Pending) -> Result<String, StreamingError> {
        let mut bytes = [0u8; 16];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
            .map_err(StreamingError::Random)?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let url = format!("http://{}/{}/{token}", self.addr, request.path());
        let now = Instant::now();
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        // Unused URLs would pile up otherwise.
        pending.retain(|_, (_, expires)| *expires > now);
        pending.insert(token, (request, now + TOKEN_TTL));
        Ok(url)
    }

    /// The request behind `/<kind>/<token>`, once.
    fn take(&self, kind: &str, token: &str) -> Option<Pending> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = pending
            .get(token)
            .is_some_and(|(request, expires)| request.path() == kind && *expires > Instant::now());
        fresh
            .then(|| pending.remove(token))
            .flatten()
            .map(|(r, _)| r)
    }
}

/// Serves HTTP/1 on `listener` until the task is dropped.
pub async fn serve(streaming: Arc<Streaming>, listener: TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("streaming server accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let streaming = streaming.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(streaming.clone(), req));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await
            {
                tracing::debug!("streaming connection: {e}");
            }
        });
    }
}

/// The protocol a connection was upgraded to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upgrade {
    /// SPDY with the remotecommand protocol of this version (1–4), or 0
    /// for port forwarding.
    Spdy(u8),
    /// WebSocket channels of this remotecommand version (1, 4 or 5).
    WebSocket(u8),
    /// SPDY for port forwarding, tunnelled in WebSocket messages.
    WebSocketSpdy,
}

/// Remotecommand over SPDY, best first.
const SPDY_EXEC: [(&str, u8); 4] = [
    ("v4.channel.k8s.io", 4),
    ("v3.channel.k8s.io", 3),
    ("v2.channel.k8s.io", 2),
    ("channel.k8s.io", 1),
];
/// Remotecommand over WebSocket, best first.
const WS_EXEC: [(&str, u8); 3] = [
    ("v5.channel.k8s.io", 5),
    ("v4.channel.k8s.io", 4),
    ("channel.k8s.io", 1),
];
const PORT_FORWARD: &str = "portforward.k8s.io";
const WS_PORT_FORWARD: &str = "SPDY/3.1+portforward.k8s.io";

/// Every value of a comma-separated, possibly repeated header.
fn offered<'a>(headers: &'a HeaderMap, name: &str) -> Vec<&'a str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect()
}

/// Picks the protocol for a `kind` request: the SPDY handshake follows the
/// client's order of `X-Stream-Protocol-Version` (as the kubelet does),
/// WebSocket our order of preference. `Err` is the reply to send.
fn negotiate(
    kind: &str,
    headers: &HeaderMap,
) -> Result<(Upgrade, &'static str), (StatusCode, String)> {
    let upgrade = headers
        .get("upgrade")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let forward = kind == "portforward";
    if upgrade.eq_ignore_ascii_case("websocket") {
        let offered = offered(headers, "sec-websocket-protocol");
        let found = if forward {
            offered
                .contains(&WS_PORT_FORWARD)
                .then_some((Upgrade::WebSocketSpdy, WS_PORT_FORWARD))
        } else {
            WS_EXEC
                .into_iter()
                .find(|(name, _)| offered.contains(name))
                .map(|(name, v)| (Upgrade::WebSocket(v), name))
        };
        return found.ok_or_else(|| {
            let supported = if forward {
                WS_PORT_FORWARD.to_owned()
            } else {
                WS_EXEC.map(|(name, _)| name).join(", ")
            };
            (
                StatusCode::BAD_REQUEST,
                format!(
                    "no supported WebSocket subprotocol among {offered:?}; supported: {supported}"
                ),
            )
        });
    }
    if upgrade.eq_ignore_ascii_case(spdy::PROTOCOL) {
        let offered = offered(headers, "x-stream-protocol-version");
        let found = if forward {
            offered
                .contains(&PORT_FORWARD)
                .then_some((Upgrade::Spdy(0), PORT_FORWARD))
        } else if offered.is_empty() {
            // Clients from before protocol negotiation speak v1.
            Some((Upgrade::Spdy(1), ""))
        } else {
            offered.iter().find_map(|o| {
                SPDY_EXEC
                    .into_iter()
                    .find(|(name, _)| name == o)
                    .map(|(name, v)| (Upgrade::Spdy(v), name))
            })
        };
        return found.ok_or_else(|| {
            (
                StatusCode::FORBIDDEN,
                format!("no supported stream protocol among {offered:?}"),
            )
        });
    }
    Err((
        StatusCode::BAD_REQUEST,
        format!("upgrade to {} or WebSocket required", spdy::PROTOCOL),
    ))
}

fn reply(status: StatusCode, text: &str) -> Response<String> {
    let mut response = Response::new(format!("{text}\n"));
    *response.status_mut() = status;
    response
}

async fn handle(
    streaming: Arc<Streaming>,
    mut req: Request<Incoming>,
) -> Result<Response<String>, Infallible> {
    let path = req.uri().path().trim_start_matches('/').to_owned();
    let Some((kind, token)) = path.split_once('/') else {
        return Ok(reply(StatusCode::NOT_FOUND, "not found"));
    };
    if !matches!(kind, "exec" | "attach" | "portforward") {
        return Ok(reply(StatusCode::NOT_FOUND, "not found"));
    }
    let (upgrade, protocol) = match negotiate(kind, req.headers()) {
        Ok(found) => found,
        Err((status, text)) => return Ok(reply(status, &text)),
    };
    let ws_key = req.headers().get("sec-websocket-key").cloned();
    if ws_key.is_none() && !matches!(upgrade, Upgrade::Spdy(_)) {
        return Ok(reply(StatusCode::BAD_REQUEST, "Sec-WebSocket-Key missing"));
    }
    let Some(pending) = streaming.take(kind, token) else {
        return Ok(reply(StatusCode::NOT_FOUND, "unknown or expired token"));
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let console_dir = streaming.console_dir.clone();
    let mut response = Response::new(String::new());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert("connection", HeaderValue::from_static("Upgrade"));
    match upgrade {
        Upgrade::Spdy(_) => {
            headers.insert("upgrade", HeaderValue::from_static(spdy::PROTOCOL));
            if !protocol.is_empty() {
                headers.insert(
                    "x-stream-protocol-version",
                    HeaderValue::from_static(protocol),
                );
            }
        }
        Upgrade::WebSocket(_) | Upgrade::WebSocketSpdy => {
            headers.insert("upgrade", HeaderValue::from_static("websocket"));
            headers.insert("sec-websocket-protocol", HeaderValue::from_static(protocol));
            let key = ws_key.unwrap_or_else(|| HeaderValue::from_static(""));
            if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
                headers.insert("sec-websocket-accept", accept);
            }
        }
    }
    tokio::spawn(async move {
        let io = match on_upgrade.await {
            Ok(upgraded) => TokioIo::new(upgraded),
            Err(e) => {
                tracing::warn!("streaming upgrade: {e}");
                return;
            }
        };
        match (upgrade, pending) {
            (Upgrade::Spdy(0), Pending::PortForward(spec)) => {
                portforward::serve(spdy::Connection::start(io), spec).await
            }
            (Upgrade::WebSocketSpdy, Pending::PortForward(spec)) => {
                let tunnel = websocket::tunnel(io).await;
                portforward::serve(spdy::Connection::start(tunnel), spec).await
            }
            (Upgrade::Spdy(version), request) => {
                let Some(target) = remotecommand::Target::of(request) else {
                    return;
                };
                remotecommand::over_spdy(spdy::Connection::start(io), target, version, console_dir)
                    .await
            }
            (Upgrade::WebSocket(version), request) => {
                let Some(target) = remotecommand::Target::of(request) else {
                    return;
                };
                websocket::remotecommand(io, target, version, console_dir).await
            }
            (Upgrade::WebSocketSpdy, _) => {}
        }
    });
    Ok(response)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn spdy_follows_the_clients_order() {
        let h = headers(&[
            ("upgrade", "SPDY/3.1"),
            ("x-stream-protocol-version", "v4.channel.k8s.io"),
            ("x-stream-protocol-version", "v3.channel.k8s.io"),
        ]);
        assert_eq!(
            negotiate("exec", &h).unwrap(),
            (Upgrade::Spdy(4), "v4.channel.k8s.io")
        );
        let h = headers(&[
            ("upgrade", "SPDY/3.1"),
            (
                "x-stream-protocol-version",
                "v2.channel.k8s.io, v4.channel.k8s.io",
            ),
        ]);
        assert_eq!(negotiate("attach", &h).unwrap().0, Upgrade::Spdy(2));
        let h = headers(&[("upgrade", "SPDY/3.1")]);
        assert_eq!(negotiate("exec", &h).unwrap().0, Upgrade::Spdy(1));
        let h = headers(&[
            ("upgrade", "SPDY/3.1"),
            ("x-stream-protocol-version", "v9.channel.k8s.io"),
        ]);
        assert_eq!(negotiate("exec", &h).unwrap_err().0, StatusCode::FORBIDDEN);
    }

    #[test]
    fn port_forward_needs_its_protocol() {
        let h = headers(&[
            ("upgrade", "SPDY/3.1"),
            ("x-stream-protocol-version", "portforward.k8s.io"),
        ]);
        assert_eq!(negotiate("portforward", &h).unwrap().0, Upgrade::Spdy(0));
        let h = headers(&[
            ("upgrade", "SPDY/3.1"),
            ("x-stream-protocol-version", "v4.channel.k8s.io"),
        ]);
        assert!(negotiate("portforward", &h).is_err());
        let h = headers(&[
            ("upgrade", "websocket"),
            ("sec-websocket-protocol", "SPDY/3.1+portforward.k8s.io"),
        ]);
        assert_eq!(
            negotiate("portforward", &h).unwrap().0,
            Upgrade::WebSocketSpdy
        );
    }

    #[test]
    fn websocket_takes_our_best() {
        let h = headers(&[
            ("upgrade", "websocket"),
            (
                "sec-websocket-protocol",
                "channel.k8s.io, v5.channel.k8s.io, v4.channel.k8s.io",
            ),
        ]);
        assert_eq!(negotiate("exec", &h).unwrap().0, Upgrade::WebSocket(5));
        let h = headers(&[("upgrade", "h2c")]);
        assert!(negotiate("exec", &h).is_err());
    }
}
