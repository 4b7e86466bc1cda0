//! Exec and attach, whatever carries them: the transports (SPDY here,
//! WebSocket in [`super::websocket`]) turn their streams or channels into
//! a [`SessionIo`], [`run`] does the work, and the transport reports how it
//! ended in the protocol's status format ([`status`]).

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::spdy::{self, Connection};
use super::{Pending, STREAM_CREATION_TIMEOUT};
use crate::monitor::{self, ATTACH_SOCKET};

/// A validated Exec request.
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

/// A validated Attach request.
#[derive(Debug, Clone)]
pub struct AttachSpec {
    /// Container ID.
    pub id: String,
    /// The container monitor's state directory (its attach socket).
    pub monitor_dir: PathBuf,
    /// The client asked for a terminal (it then sends resizes).
    pub tty: bool,
    /// Which streams the client wants.
    pub stdin: bool,
    /// See `stdin`.
    pub stdout: bool,
    /// See `stdin`.
    pub stderr: bool,
}

/// What a remotecommand session runs.
pub(super) enum Target {
    Exec(ExecSpec),
    Attach(AttachSpec),
}

impl Target {
    pub(super) fn of(pending: Pending) -> Option<Self> {
        match pending {
            Pending::Exec(spec) => Some(Target::Exec(spec)),
            Pending::Attach(spec) => Some(Target::Attach(spec)),
            Pending::PortForward(_) => None,
        }
    }

    /// (stdin, stdout, stderr, tty) as the client was told to open them.
    pub(super) fn streams(&self) -> (bool, bool, bool, bool) {
        match self {
            Target::Exec(s) => (s.stdin, s.stdout, s.stderr, s.tty),
            Target::Attach(s) => (s.stdin, s.stdout, s.stderr, s.tty),
        }
    }

    fn id(&self) -> &str {
        match self {
            Target::Exec(s) => &s.id,
            Target::Attach(s) => &s.id,
        }
    }
}

/// A terminal size as clients send it.
#[derive(Debug, Clone, Copy, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct TermSize {
    pub width: u16,
    pub height: u16,
}

/// The client's side of a session. Closed input channels mean EOF;
/// dropping the output senders ends those streams.
pub(super) struct SessionIo {
    pub stdin: Option<mpsc::Receiver<Vec<u8>>>,
    pub stdout: Option<mpsc::Sender<Vec<u8>>>,
    pub stderr: Option<mpsc::Sender<Vec<u8>>>,
    pub resize: Option<mpsc::Receiver<TermSize>>,
    /// Resolves once the client has disconnected.
    pub gone: oneshot::Receiver<()>,
}

/// Runs the session; the exit code (0 for an attach that ended).
pub(super) async fn run(target: &Target, io: SessionIo, console_dir: &Path) -> Result<i32, String> {
    let result = match target {
        Target::Exec(spec) => exec(spec, io, console_dir).await,
        Target::Attach(spec) => attach(spec, io).await,
    };
    if let Err(e) = &result {
        tracing::warn!(container = %target.id(), "streaming session: {e}");
    }
    result
}

/// How a session ended, as protocol `version` reports it: v4 and later a
/// `metav1.Status` in JSON, earlier ones the error text alone (nothing on
/// success).
pub(super) fn status(version: u8, result: &Result<i32, String>) -> Option<String> {
    let message =
        |code: i32| format!("command terminated with non-zero exit code: exit status {code}");
    if version < 4 {
        return match result {
            Ok(0) => None,
            Ok(code) => Some(message(*code)),
            Err(e) => Some(e.clone()),
        };
    }
    let status = match result {
        Ok(0) => serde_json::json!({"metadata": {}, "status": "Success"}),
        Ok(code) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": message(*code),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
        Err(e) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("Internal error occurred: {e}"),
            "reason": "InternalError",
            "details": {"causes": [{"message": e}]},
            "code": 500,
        }),
    };
    Some(status.to_string())
}

type Input = Box<dyn AsyncWrite + Send + Unpin>;

/// Runs the command through the container's runtime; its exit code.
async fn exec(spec: &ExecSpec, io: SessionIo, dir: &Path) -> Result<i32, String> {
    let SessionIo {
        stdin,
        stdout,
        stderr,
        resize,
        gone,
    } = io;
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
        if let (Some(err), Some(out)) = (child.stderr.take(), &stdout) {
            pumps.push(tokio::spawn(pump(err, out.clone())));
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
        if let Some(out) = &stdout {
            let reader = tokio::fs::File::from_std(clone()?);
            pumps.push(tokio::spawn(pump(reader, out.clone())));
        }
        (child, input, Some(OwnedFd::from(master)))
    } else {
        command
            .arg(&spec.id)
            .args(&spec.cmd)
            .stdin(piped(spec.stdin))
            .stdout(piped(spec.stdout))
            .stderr(piped(spec.stderr));
        let mut child = command.spawn().map_err(|e| format!("run runtime: {e}"))?;
        if let (Some(from), Some(to)) = (child.stdout.take(), &stdout) {
            pumps.push(tokio::spawn(pump(from, to.clone())));
        }
        if let (Some(from), Some(to)) = (child.stderr.take(), &stderr) {
            pumps.push(tokio::spawn(pump(from, to.clone())));
        }
        let input = child.stdin.take().map(|i| Box::new(i) as Input);
        (child, input, None)
    };
    drop((stdout, stderr));
    let feeder = match (stdin, input) {
        (Some(rx), Some(input)) => Some(tokio::spawn(feed(rx, input))),
        _ => None,
    };
    let resizer = match (resize, pty) {
        (Some(rx), Some(pty)) => Some(tokio::spawn(resize_pty(rx, pty))),
        _ => None,
    };
    let status = tokio::select! {
        status = child.wait() => status.map_err(|e| format!("wait: {e}"))?,
        _ = gone => {
            // Nobody to report to; the runtime passes the signal on.
            let _ = child.start_kill();
            child.wait().await.map_err(|e| format!("wait: {e}"))?
        }
    };
    for pump in pumps {
        let _ = pump.await;
    }
    for task in [feeder, resizer].into_iter().flatten() {
        task.abort();
    }
    Ok(status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(255))
}

/// Copies a process output into `to` until EOF (EIO on a pty).
async fn pump(mut from: impl AsyncRead + Unpin, to: mpsc::Sender<Vec<u8>>) {
    let mut buf = vec![0u8; 32 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        if to.send(buf[..n].to_vec()).await.is_err() {
            break;
        }
    }
}

/// Feeds the client's input to the process; closes it at the client's EOF.
async fn feed(mut rx: mpsc::Receiver<Vec<u8>>, mut input: Input) {
    while let Some(data) = rx.recv().await {
        if input.write_all(&data).await.is_err() || input.flush().await.is_err() {
            return;
        }
    }
    let _ = input.shutdown().await;
}

async fn resize_pty(mut rx: mpsc::Receiver<TermSize>, pty: OwnedFd) {
    while let Some(size) = rx.recv().await {
        let size = rustix::termios::Winsize {
            ws_row: size.height,
            ws_col: size.width,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        if let Err(e) = rustix::termios::tcsetwinsize(&pty, size) {
            tracing::debug!("resize pty: {e}");
        }
    }
}

/// Connects the client to the container's monitor (its attach socket;
/// protocol in [`crate::monitor`]) until the container exits or the client
/// goes.
async fn attach(spec: &AttachSpec, io: SessionIo) -> Result<i32, String> {
    let path = spec.monitor_dir.join(ATTACH_SOCKET);
    let socket = tokio::net::UnixStream::connect(&path)
        .await
        .map_err(|e| format!("attach to container {}: {e}", spec.id))?;
    let (mut read, mut write) = socket.into_split();
    let hello: &[u8] = if io.stdin.is_some() { b"1" } else { b"0" };
    write
        .write_all(hello)
        .await
        .map_err(|e| format!("attach to container {}: {e}", spec.id))?;
    let input = tokio::spawn(async move {
        let Some(mut rx) = io.stdin else {
            // Held open: EOF would read as "done with stdin".
            std::future::pending::<()>().await;
            return;
        };
        while let Some(data) = rx.recv().await {
            if write.write_all(&data).await.is_err() {
                return;
            }
        }
        let _ = write.shutdown().await;
        std::future::pending::<()>().await;
    });
    let resizer = io.resize.map(|mut rx| {
        let dir = spec.monitor_dir.clone();
        tokio::spawn(async move {
            while let Some(size) = rx.recv().await {
                let dir = dir.clone();
                let resized = tokio::task::spawn_blocking(move || {
                    monitor::resize(&dir, size.height, size.width)
                })
                .await;
                if let Ok(Err(e)) = resized {
                    tracing::debug!("attach resize: {e}");
                }
            }
        })
    });
    let (stdout, stderr) = (io.stdout, io.stderr);
    let relay = async move {
        let mut head = [0u8; 5];
        let mut data = Vec::new();
        while read.read_exact(&mut head).await.is_ok() {
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            data.resize(len, 0);
            if read.read_exact(&mut data).await.is_err() {
                break;
            }
            let to = if head[0] == 2 { &stderr } else { &stdout };
            if let Some(to) = to {
                if to.send(data.clone()).await.is_err() {
                    break;
                }
            }
        }
    };
    tokio::select! {
        () = relay => {}
        _ = io.gone => {}
    }
    input.abort();
    if let Some(resizer) = resizer {
        resizer.abort();
    }
    Ok(0)
}

/// Remotecommand over SPDY, as the kubelet serves it: wait for the
/// client's streams (error, and stdin/stdout/stderr/resize as requested),
/// run, write the status on the error stream, close.
pub(super) async fn over_spdy(
    connection: (Connection, mpsc::Receiver<spdy::Stream>),
    target: Target,
    version: u8,
    console_dir: PathBuf,
) {
    let (conn, mut incoming) = connection;
    let (stdin, stdout, stderr, tty) = target.streams();
    let wanted: Vec<&str> = [
        (true, "error"),
        (stdin, "stdin"),
        (stdout, "stdout"),
        (stderr, "stderr"),
        (tty && version >= 3, "resize"),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect();
    let mut streams: HashMap<String, spdy::Stream> = HashMap::new();
    let deadline = tokio::time::sleep(STREAM_CREATION_TIMEOUT);
    tokio::pin!(deadline);
    while streams.len() < wanted.len() {
        tokio::select! {
            stream = incoming.recv() => {
                let Some(stream) = stream else { return };
                let kind = stream.header("streamtype").unwrap_or_default().to_owned();
                if wanted.contains(&kind.as_str()) && !streams.contains_key(&kind) {
                    streams.insert(kind, stream);
                } else {
                    tracing::debug!("unexpected stream {kind:?} refused");
                    stream.writer.reset(spdy::REFUSED_STREAM).await;
                }
            }
            () = &mut deadline => {
                tracing::warn!(container = %target.id(), "client opened {:?} of {wanted:?} in time", streams.keys());
                conn.close().await;
                return;
            }
        }
    }
    // Later streams are refused; the end of them means the client left.
    let (gone_tx, gone) = oneshot::channel();
    let watcher = tokio::spawn(async move {
        while let Some(stream) = incoming.recv().await {
            stream.writer.reset(spdy::REFUSED_STREAM).await;
        }
        drop(gone_tx);
    });
    let mut take = |name: &str| streams.remove(name);
    let error = take("error");
    let mut forwarders = Vec::new();
    let mut output = |stream: Option<spdy::Stream>| {
        stream.map(|stream| {
            let (tx, rx) = mpsc::channel(16);
            forwarders.push(tokio::spawn(forward(rx, stream.writer)));
            tx
        })
    };
    let io = SessionIo {
        stdout: output(take("stdout")),
        stderr: output(take("stderr")),
        stdin: take("stdin").map(|s| s.data),
        resize: take("resize").map(|s| decode_sizes(s.data)),
        gone,
    };
    let result = run(&target, io, &console_dir).await;
    for forwarder in forwarders {
        let _ = forwarder.await;
    }
    if let Some(error) = error {
        if let Some(status) = status(version, &result) {
            error.writer.write(status.as_bytes()).await;
        }
        error.writer.finish().await;
    }
    watcher.abort();
    conn.close().await;
}

/// Sends what arrives on `rx` on a stream, then half-closes it.
async fn forward(mut rx: mpsc::Receiver<Vec<u8>>, writer: spdy::StreamWriter) {
    while let Some(data) = rx.recv().await {
        if !writer.write(&data).await {
            return;
        }
    }
    writer.finish().await;
}

/// Terminal sizes from a resize stream: JSON objects back to back.
pub(super) fn decode_sizes(mut data: mpsc::Receiver<Vec<u8>>) -> mpsc::Receiver<TermSize> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut buffer = Vec::new();
        while let Some(chunk) = data.recv().await {
            buffer.extend_from_slice(&chunk);
            let mut sizes = serde_json::Deserializer::from_slice(&buffer).into_iter::<TermSize>();
            let mut used = 0;
            while let Some(size) = sizes.next() {
                match size {
                    Ok(size) => {
                        used = sizes.byte_offset();
                        if tx.send(size).await.is_err() {
                            return;
                        }
                    }
                    // Incomplete: wait for more. Garbage: drop it all.
                    Err(e) if e.is_eof() => break,
                    Err(_) => {
                        used = buffer.len();
                        break;
                    }
                }
            }
            buffer.drain(..used);
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn statuses_per_version() {
        assert_eq!(status(2, &Ok(0)), None);
        assert_eq!(
            status(1, &Ok(3)).unwrap(),
            "command terminated with non-zero exit code: exit status 3"
        );
        let v4: serde_json::Value = serde_json::from_str(&status(4, &Ok(3)).unwrap()).unwrap();
        assert_eq!(v4["reason"], "NonZeroExitCode");
        assert_eq!(v4["details"]["causes"][0]["message"], "3");
        let ok: serde_json::Value = serde_json::from_str(&status(5, &Ok(0)).unwrap()).unwrap();
        assert_eq!(ok["status"], "Success");
        let err: serde_json::Value =
            serde_json::from_str(&status(4, &Err("boom".into())).unwrap()).unwrap();
        assert_eq!(err["reason"], "InternalError");
    }

    #[tokio::test]
    async fn sizes_decode_across_chunks() {
        let (tx, rx) = mpsc::channel(4);
        let mut sizes = decode_sizes(rx);
        tx.send(br#"{"Width":80,"Hei"#.to_vec()).await.unwrap();
        tx.send(br#"ght":24}{"Width":100,"Height":40}"#.to_vec())
            .await
            .unwrap();
        let first = sizes.recv().await.unwrap();
        let second = sizes.recv().await.unwrap();
        assert_eq!((first.width, first.height), (80, 24));
        assert_eq!((second.width, second.height), (100, 40));
        drop(tx);
        assert!(sizes.recv().await.is_none());
    }
}
