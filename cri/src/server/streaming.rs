//! The streaming server: Exec over WebSocket with the Kubernetes
//! remotecommand channel protocols (`v5.channel.k8s.io`,
//! `v4.channel.k8s.io`, `channel.k8s.io`).
//!
//! The Exec RPC validates the request and parks it here under a random
//! single-use token; the client (kubelet proxy, `crictl --transport
//! websocket`) then upgrades `GET /exec/<token>`. Every message is binary,
//! its first byte the channel: 0 stdin, 1 stdout, 2 stderr, 3 status,
//! 4 resize, and in v5 255 "close" (`[255, n]`: the sender is done with n).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// How long an Exec URL stays usable (the kubelet's default too).
const TOKEN_TTL: Duration = Duration::from_secs(60);

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const STATUS: u8 = 3;
const RESIZE: u8 = 4;
const CLOSE: u8 = 255;

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

/// A validated Exec request, run when its URL is opened.
#[derive(Debug, Clone)]
pub struct ExecSpec {
    /// The container's OCI runtime binary.
    pub runtime: PathBuf,
    /// Its `--root`.
    pub root: PathBuf,
    /// Container ID.
    pub id: String,
    /// The command and its arguments.
    pub cmd: Vec<String>,
    /// Run it on a pty (stdout and stderr merged).
    pub tty: bool,
    /// Which streams the client wants.
    pub stdin: bool,
    /// See `stdin`.
    pub stdout: bool,
    /// See `stdin`.
    pub stderr: bool,
}

/// The token cache and where the server listens.
pub struct Streaming {
    addr: SocketAddr,
    /// Console sockets of tty execs.
    console_dir: PathBuf,
    pending: Mutex<HashMap<String, (ExecSpec, Instant)>>,
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

    /// Parks `spec` under a fresh token and returns its URL.
    pub fn exec_url(&self, spec: ExecSpec) -> Result<String, StreamingError> {
        let mut bytes = [0u8; 16];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
            .map_err(StreamingError::Random)?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let now = Instant::now();
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        // Unused URLs would pile up otherwise.
        pending.retain(|_, (_, expires)| *expires > now);
        pending.insert(token.clone(), (spec, now + TOKEN_TTL));
        Ok(format!("http://{}/exec/{token}", self.addr))
    }

    /// The request behind `token`, once.
    fn take(&self, token: &str) -> Option<ExecSpec> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending
            .remove(token)
            .filter(|(_, expires)| *expires > Instant::now())
            .map(|(spec, _)| spec)
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

/// The remotecommand dialects we speak, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    V5,
    V4,
    V1,
}

impl Protocol {
    const ALL: [(Protocol, &'static str); 3] = [
        (Protocol::V5, "v5.channel.k8s.io"),
        (Protocol::V4, "v4.channel.k8s.io"),
        (Protocol::V1, "channel.k8s.io"),
    ];

    fn negotiate(headers: &HeaderMap) -> Option<(Protocol, &'static str)> {
        let offered: Vec<&str> = headers
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        Self::ALL
            .into_iter()
            .find(|(_, name)| offered.contains(name))
    }
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
    let Some(token) = req.uri().path().strip_prefix("/exec/") else {
        return Ok(reply(StatusCode::NOT_FOUND, "not found"));
    };
    let is_websocket = req
        .headers()
        .get("upgrade")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let key = req.headers().get("sec-websocket-key").cloned();
    let (Some(key), true) = (key, is_websocket) else {
        return Ok(reply(
            StatusCode::BAD_REQUEST,
            "only WebSocket streaming is served (no SPDY)",
        ));
    };
    let Some((protocol, name)) = Protocol::negotiate(req.headers()) else {
        return Ok(reply(
            StatusCode::BAD_REQUEST,
            "no supported subprotocol: v5.channel.k8s.io, v4.channel.k8s.io, channel.k8s.io",
        ));
    };
    let Some(spec) = streaming.take(token) else {
        return Ok(reply(StatusCode::NOT_FOUND, "unknown or expired token"));
    };
    let upgrade = hyper::upgrade::on(&mut req);
    let console_dir = streaming.console_dir.clone();
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                session(ws, spec, protocol, console_dir).await;
            }
            Err(e) => tracing::warn!("exec upgrade: {e}"),
        }
    });
    let mut response = Response::new(String::new());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert("upgrade", HeaderValue::from_static("websocket"));
    headers.insert("connection", HeaderValue::from_static("Upgrade"));
    headers.insert("sec-websocket-protocol", HeaderValue::from_static(name));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        headers.insert("sec-websocket-accept", accept);
    }
    Ok(response)
}

fn frame(channel: u8, data: &[u8]) -> Message {
    let mut bytes = Vec::with_capacity(data.len() + 1);
    bytes.push(channel);
    bytes.extend_from_slice(data);
    Message::binary(bytes)
}

/// Runs one exec on an upgraded connection and reports how it ended.
async fn session<S>(ws: WebSocketStream<S>, spec: ExecSpec, protocol: Protocol, dir: PathBuf)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, incoming) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Message>(16);
    let writer = tokio::spawn(async move {
        while let Some(message) = rx.recv().await {
            if sink.send(message).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    // As the kubelet: an empty frame on the first output channel tells the
    // client the streams are up.
    let first = if spec.stdout {
        STDOUT
    } else if spec.stderr {
        STDERR
    } else {
        STATUS
    };
    let _ = tx.send(frame(first, &[])).await;
    let result = run(&spec, incoming, &tx, &dir).await;
    if let Err(e) = &result {
        tracing::warn!(container = %spec.id, "exec {:?}: {e}", spec.cmd);
    }
    let status = match (protocol, result) {
        (Protocol::V1, Ok(0)) => None,
        (Protocol::V1, Ok(code)) => Some(format!(
            "command terminated with non-zero exit code: exit status {code}"
        )),
        (Protocol::V1, Err(e)) => Some(e),
        (_, Ok(0)) => Some(serde_json::json!({"metadata": {}, "status": "Success"}).to_string()),
        (_, Ok(code)) => Some(
            serde_json::json!({
                "metadata": {},
                "status": "Failure",
                "message": format!("command terminated with non-zero exit code: exit status {code}"),
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
            })
            .to_string(),
        ),
        (_, Err(e)) => Some(
            serde_json::json!({
                "metadata": {}, "status": "Failure", "message": e, "reason": "InternalError",
            })
            .to_string(),
        ),
    };
    if let Some(status) = status {
        let _ = tx.send(frame(STATUS, status.as_bytes())).await;
    }
    let _ = tx
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        })))
        .await;
    drop(tx);
    let _ = writer.await;
}

type Input = Box<dyn AsyncWrite + Send + Unpin>;

/// Runs the command; its exit code.
async fn run<R>(
    spec: &ExecSpec,
    incoming: R,
    tx: &mpsc::Sender<Message>,
    dir: &Path,
) -> Result<i32, String>
where
    R: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
        + Unpin
        + Send
        + 'static,
{
    let mut command = tokio::process::Command::new(&spec.runtime);
    command
        .arg("--root")
        .arg(&spec.root)
        .arg("exec")
        .kill_on_drop(true);
    let piped = |wanted: bool| {
        if wanted {
            Stdio::piped()
        } else {
            Stdio::null()
        }
    };
    let mut pumps = Vec::new();
    let (mut child, input, pty) = if spec.tty {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        // Short names: unix socket paths are limited; a stale one is from
        // an earlier daemon.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = dir.join(format!("{}.sock", NEXT.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_file(&path);
        let console = tokio::net::UnixListener::bind(&path)
            .map_err(|e| format!("bind {}: {e}", path.display()))?;
        command
            .arg("--tty")
            .arg("--console-socket")
            .arg(&path)
            .arg(&spec.id)
            .args(&spec.cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|e| format!("run runtime: {e}"))?;
        // The runtime's own errors: the client sees them as terminal output.
        if let Some(err) = child.stderr.take() {
            pumps.push(tokio::spawn(pump(err, STDOUT, tx.clone())));
        }
        let accepted = tokio::select! {
            accepted = console.accept() => accepted.map_err(|e| format!("console socket: {e}")),
            status = child.wait() => Err(format!("runtime exited ({status:?}) without a pty")),
        };
        let _ = std::fs::remove_file(&path);
        let stream = accepted?
            .0
            .into_std()
            .map_err(|e| format!("console socket: {e}"))?;
        let master =
            tokio::task::spawn_blocking(move || crate::monitor::supervise::receive_fd(&stream))
                .await
                .map_err(|e| e.to_string())??;
        let master = std::fs::File::from(master);
        let clone = || master.try_clone().map_err(|e| format!("dup pty: {e}"));
        let input: Option<Input> = spec
            .stdin
            .then(clone)
            .transpose()?
            .map(|f| Box::new(tokio::fs::File::from_std(f)) as Input);
        let reader = tokio::fs::File::from_std(clone()?);
        pumps.push(tokio::spawn(pump(reader, STDOUT, tx.clone())));
        (child, input, Some(OwnedFd::from(master)))
    } else {
        command
            .arg(&spec.id)
            .args(&spec.cmd)
            .stdin(piped(spec.stdin))
            .stdout(piped(spec.stdout))
            .stderr(piped(spec.stderr));
        let mut child = command.spawn().map_err(|e| format!("run runtime: {e}"))?;
        if let Some(out) = child.stdout.take() {
            pumps.push(tokio::spawn(pump(out, STDOUT, tx.clone())));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(tokio::spawn(pump(err, STDERR, tx.clone())));
        }
        let input = child.stdin.take().map(|i| Box::new(i) as Input);
        (child, input, None)
    };
    let reader = tokio::spawn(read_client(incoming, input, pty));
    let status = child.wait().await.map_err(|e| format!("wait: {e}"))?;
    for pump in pumps {
        let _ = pump.await;
    }
    reader.abort();
    Ok(status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(255))
}

/// Copies a process output onto `channel` until EOF (EIO on a pty).
async fn pump(mut from: impl AsyncRead + Unpin, channel: u8, tx: mpsc::Sender<Message>) {
    let mut buf = vec![0u8; 32 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        if tx.send(frame(channel, &buf[..n])).await.is_err() {
            break;
        }
    }
}

/// Feeds stdin, closes it on v5's `[255, 0]`, applies resizes to the pty.
async fn read_client<R>(mut incoming: R, mut input: Option<Input>, pty: Option<OwnedFd>)
where
    R: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    while let Some(Ok(message)) = incoming.next().await {
        let Message::Binary(data) = message else {
            continue;
        };
        let Some((&channel, bytes)) = data.split_first() else {
            continue;
        };
        match (channel, bytes) {
            (STDIN, bytes) => {
                if let Some(stdin) = input.as_mut() {
                    let written = stdin.write_all(bytes).await;
                    if written.is_err() || stdin.flush().await.is_err() {
                        input = None;
                    }
                }
            }
            (CLOSE, [STDIN]) => {
                if let Some(mut stdin) = input.take() {
                    let _ = stdin.shutdown().await;
                }
            }
            (RESIZE, bytes) => {
                #[derive(serde::Deserialize)]
                #[serde(rename_all = "PascalCase")]
                struct Size {
                    width: u16,
                    height: u16,
                }
                let (Some(pty), Ok(size)) = (&pty, serde_json::from_slice::<Size>(bytes)) else {
                    continue;
                };
                let size = rustix::termios::Winsize {
                    ws_row: size.height,
                    ws_col: size.width,
                    ws_xpixel: 0,
                    ws_ypixel: 0,
                };
                if let Err(e) = rustix::termios::tcsetwinsize(pty, size) {
                    tracing::debug!("resize pty: {e}");
                }
            }
            _ => {}
        }
    }
}
