//! WebSocket transports: the remotecommand channel protocols (every
//! message binary, its first byte the channel: 0 stdin, 1 stdout, 2
//! stderr, 3 status, 4 resize, and in v5 255 "close", `[255, n]`: the
//! sender is done with channel n), and a byte tunnel for SPDY.

use std::path::PathBuf;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::remotecommand::{self, SessionIo, Target, TermSize};

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const STATUS: u8 = 3;
const RESIZE: u8 = 4;
const CLOSE: u8 = 255;

fn frame(channel: u8, data: &[u8]) -> Message {
    let mut bytes = Vec::with_capacity(data.len() + 1);
    bytes.push(channel);
    bytes.extend_from_slice(data);
    Message::binary(bytes)
}

/// Runs one exec or attach on an upgraded connection and reports how it
/// ended.
pub(super) async fn remotecommand<S>(io: S, target: Target, version: u8, console_dir: PathBuf)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
    let (mut sink, mut incoming) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Message>(16);
    let writer = tokio::spawn(async move {
        while let Some(message) = rx.recv().await {
            if sink.send(message).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let (stdin, stdout, stderr, tty) = target.streams();
    // As the kubelet: an empty frame on the first output channel tells the
    // client the streams are up.
    let first = match (stdout, stderr) {
        (true, _) => STDOUT,
        (false, true) => STDERR,
        (false, false) => STATUS,
    };
    let _ = tx.send(frame(first, &[])).await;

    let (stdin_tx, stdin_rx) = channel_if(stdin);
    let (resize_tx, resize_rx) = channel_if(tty);
    let (gone_tx, gone) = oneshot::channel::<()>();
    let reader = tokio::spawn(async move {
        let mut stdin_tx = stdin_tx;
        while let Some(Ok(message)) = incoming.next().await {
            let Message::Binary(data) = message else {
                continue;
            };
            match data.split_first() {
                Some((&STDIN, bytes)) => {
                    if let Some(stdin) = &stdin_tx {
                        let _ = stdin.send(bytes.to_vec()).await;
                    }
                }
                Some((&CLOSE, [STDIN])) => stdin_tx = None,
                Some((&RESIZE, bytes)) => {
                    if let (Some(resize), Ok(size)) =
                        (&resize_tx, serde_json::from_slice::<TermSize>(bytes))
                    {
                        let _ = resize.send(size).await;
                    }
                }
                _ => {}
            }
        }
        drop(gone_tx);
    });
    let mut forwarders = Vec::new();
    let mut output = |wanted: bool, channel: u8| {
        wanted.then(|| {
            let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(16);
            let tx = tx.clone();
            forwarders.push(tokio::spawn(async move {
                while let Some(data) = out_rx.recv().await {
                    if tx.send(frame(channel, &data)).await.is_err() {
                        break;
                    }
                }
            }));
            out_tx
        })
    };
    let io = SessionIo {
        stdout: output(stdout, STDOUT),
        stderr: output(stderr, STDERR),
        stdin: stdin_rx,
        resize: resize_rx,
        gone,
    };
    let result = remotecommand::run(&target, io, &console_dir).await;
    for forwarder in forwarders {
        let _ = forwarder.await;
    }
    if let Some(status) = remotecommand::status(version, &result) {
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
    reader.abort();
}

fn channel_if<T>(wanted: bool) -> (Option<mpsc::Sender<T>>, Option<mpsc::Receiver<T>>) {
    if wanted {
        let (tx, rx) = mpsc::channel(16);
        (Some(tx), Some(rx))
    } else {
        (None, None)
    }
}

/// A byte stream carried in binary WebSocket messages, as client-go's
/// tunnelling dialer sends SPDY; a normal close is EOF.
pub(super) async fn tunnel<S>(io: S) -> DuplexStream
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
    let (mut sink, mut incoming) = ws.split();
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
    let (mut from_us, mut to_us) = tokio::io::split(ours);
    tokio::spawn(async move {
        while let Some(Ok(message)) = incoming.next().await {
            match message {
                Message::Binary(data) if to_us.write_all(&data).await.is_err() => break,
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = to_us.shutdown().await;
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = from_us.read(&mut buf).await {
            if sink.send(Message::binary(buf[..n].to_vec())).await.is_err() {
                return;
            }
        }
        let _ = sink
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            })))
            .await;
        let _ = sink.close().await;
    });
    theirs
}
