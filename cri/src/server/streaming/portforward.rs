//! Port forwarding over SPDY (`portforward.k8s.io`), as the kubelet serves
//! it: for every forwarded connection the client opens an error stream and
//! a data stream carrying the same `requestID` and the target `port`; we
//! connect to that port on localhost inside the pod's network namespace
//! and copy both ways. Failures go to the error stream as text, and the
//! error stream ends once the connection is done — the client waits for
//! that.

use std::collections::HashMap;
use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::spdy::{self, Connection, Stream};
use super::STREAM_CREATION_TIMEOUT;

/// How long connecting to the pod's port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A validated PortForward request.
#[derive(Debug, Clone)]
pub struct PortForwardSpec {
    /// Sandbox ID (for messages).
    pub sandbox_id: String,
    /// The pod's network namespace file; `None` for host networking.
    pub netns: Option<PathBuf>,
}

/// A forwarded connection whose two streams are not both open yet.
#[derive(Default)]
struct Half {
    error: Option<Stream>,
    data: Option<Stream>,
    since: Option<Instant>,
}

/// Serves one SPDY connection until the client closes it.
pub(super) async fn serve(connection: (Connection, mpsc::Receiver<Stream>), spec: PortForwardSpec) {
    let (conn, mut incoming) = connection;
    let mut halves: HashMap<String, Half> = HashMap::new();
    while let Some(stream) = incoming.recv().await {
        let now = Instant::now();
        // Streams whose partner never came: the kubelet's timeout.
        let expired: Vec<String> = halves
            .iter()
            .filter(|(_, h)| h.since.is_some_and(|t| now - t > STREAM_CREATION_TIMEOUT))
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            if let Some(half) = halves.remove(&id) {
                tokio::spawn(fail(
                    half,
                    "timed out waiting for the data or error stream".into(),
                ));
            }
        }
        let Some(id) = stream
            .header("requestid")
            .or_else(|| stream.header("port"))
            .map(str::to_owned)
        else {
            stream.writer.reset(spdy::REFUSED_STREAM).await;
            continue;
        };
        let half = halves.entry(id.clone()).or_default();
        half.since.get_or_insert(now);
        match stream.header("streamtype") {
            Some("error") if half.error.is_none() => half.error = Some(stream),
            Some("data") if half.data.is_none() => half.data = Some(stream),
            other => {
                tracing::debug!("port forward: unexpected stream type {other:?}");
                stream.writer.reset(spdy::REFUSED_STREAM).await;
                continue;
            }
        }
        if half.error.is_some() && half.data.is_some() {
            if let Some(Half {
                error: Some(error),
                data: Some(data),
                ..
            }) = halves.remove(&id)
            {
                tokio::spawn(forward(spec.clone(), error, data));
            }
        }
    }
    conn.close().await;
}

async fn fail(half: Half, message: String) {
    if let Some(error) = half.error {
        error.writer.write(message.as_bytes()).await;
        error.writer.finish().await;
    }
    if let Some(data) = half.data {
        data.writer.finish().await;
    }
}

/// One forwarded connection.
async fn forward(spec: PortForwardSpec, error: Stream, data: Stream) {
    let port = data.header("port").unwrap_or_default().to_owned();
    let Stream {
        data: mut from_client,
        writer: to_client,
        ..
    } = data;
    let result: Result<(), String> = async {
        let number = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("invalid port {port:?}"))?;
        let tcp = connect(spec.netns.clone(), number).await?;
        let (mut from_pod, mut to_pod) = tcp.into_split();
        let upstream = tokio::spawn(async move {
            while let Some(bytes) = from_client.recv().await {
                if to_pod.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            // The client is done sending: half-close towards the pod.
            let _ = to_pod.shutdown().await;
        });
        let mut buf = vec![0u8; 32 * 1024];
        let downstream = loop {
            match from_pod.read(&mut buf).await {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    if !to_client.write(&buf[..n]).await {
                        break Ok(());
                    }
                }
                Err(e) => break Err(format!("read from pod: {e}")),
            }
        };
        // The pod is done: the client closes its side only after it saw
        // the error stream end, so nothing more is waited for.
        upstream.abort();
        downstream
    }
    .await;
    if let Err(e) = result {
        let message = format!(
            "error forwarding port {port} to pod {}: {e}",
            spec.sandbox_id
        );
        tracing::debug!("{message}");
        error.writer.write(message.as_bytes()).await;
    }
    to_client.finish().await;
    error.writer.finish().await;
}

/// Connects to `localhost:port` in the network namespace `netns` (the
/// host's when `None`), IPv4 first, as the kubelet's runtimes do.
async fn connect(netns: Option<PathBuf>, port: u16) -> Result<TcpStream, String> {
    let (tx, rx) = oneshot::channel();
    // A thread of its own: setns changes only the calling thread, and this
    // one ends right after, so no pooled thread is left in the pod's
    // namespace. The socket keeps the namespace it was made in.
    std::thread::spawn(move || {
        let result = (|| {
            if let Some(path) = &netns {
                let file = File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("enter {}: {e}", path.display()))?;
            }
            let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
            std::net::TcpStream::connect_timeout(&v4, CONNECT_TIMEOUT).or_else(|e4| {
                std::net::TcpStream::connect_timeout(&v6, CONNECT_TIMEOUT)
                    .map_err(|_| format!("dial tcp {v4}: {e4}"))
            })
        })();
        let _ = tx.send(result);
    });
    let stream = rx.await.map_err(|_| "connect thread died".to_owned())??;
    stream
        .set_nonblocking(true)
        .and_then(|()| TcpStream::from_std(stream))
        .map_err(|e| format!("socket: {e}"))
}
