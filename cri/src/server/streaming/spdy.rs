//! SPDY/3.1 as Kubernetes streaming clients speak it (client-go over
//! moby/spdystream): after an HTTP/1.1 upgrade the client opens streams
//! with SYN_STREAM frames whose headers say what each is for, the server
//! answers each with SYN_REPLY, and both sides send DATA frames; a FIN flag
//! half-closes a stream. Header blocks are zlib-compressed with the SPDY/3
//! dictionary, one compression context per direction for the connection.
//!
//! No flow control: spdystream neither sends nor honours WINDOW_UPDATE, so
//! enforcing windows here would only stall transfers above 64 KiB.

use std::collections::HashMap;
use std::sync::OnceLock;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The `Upgrade` token.
pub const PROTOCOL: &str = "SPDY/3.1";

const VERSION: u16 = 3;
const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const FLAG_FIN: u8 = 1;
/// RST_STREAM status for a stream we refuse.
pub const REFUSED_STREAM: u32 = 3;
/// Bigger control frames are refused: ours are a few hundred bytes.
const MAX_CONTROL: usize = 1 << 20;
/// Bigger decompressed header blocks are refused.
const MAX_HEADERS: usize = 1 << 20;
/// Outgoing data is cut into frames of at most this much.
const MAX_DATA: usize = 64 * 1024;

/// A protocol violation by the peer.
#[derive(Debug, thiserror::Error)]
pub enum SpdyError {
    /// Not SPDY/3.
    #[error("unsupported SPDY version {0}")]
    Version(u16),
    /// A control frame above [`MAX_CONTROL`].
    #[error("control frame of {0} bytes is too large")]
    TooLarge(usize),
    /// A frame shorter than its fixed fields.
    #[error("truncated {0} frame")]
    Truncated(&'static str),
    /// The header block does not decompress or parse.
    #[error("header block: {0}")]
    Headers(String),
    /// The connection failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The SPDY/3 header compression dictionary (draft-mbelshe-httpbis-spdy-00
/// §2.6.10.1): these names, each with a 4-byte big-endian length, then
/// [`DICTIONARY_TAIL`].
const DICTIONARY_WORDS: [&str; 65] = [
    "options",
    "head",
    "post",
    "put",
    "delete",
    "trace",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "connection",
    "content-base",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-md5",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "location",
    "max-forwards",
    "pragma",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "retry-after",
    "server",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "vary",
    "via",
    "warning",
    "www-authenticate",
    "method",
    "get",
    "status",
    "200 OK",
    "version",
    "HTTP/1.1",
    "url",
    "public",
    "set-cookie",
    "keep-alive",
    "origin",
];

const DICTIONARY_TAIL: &str = "100101201202205206300302303304305306307402405406407408409410\
411412413414415416417502504505203 Non-Authoritative Information204 No Content301 Moved \
Permanently400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server \
Error501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov \
Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,\
image/gif,application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivate\
max-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.";

fn dictionary() -> &'static [u8] {
    static DICTIONARY: OnceLock<Vec<u8>> = OnceLock::new();
    DICTIONARY.get_or_init(|| {
        let mut bytes = Vec::with_capacity(1424);
        for word in DICTIONARY_WORDS {
            bytes.extend_from_slice(&(word.len() as u32).to_be_bytes());
            bytes.extend_from_slice(word.as_bytes());
        }
        bytes.extend_from_slice(DICTIONARY_TAIL.as_bytes());
        bytes
    })
}

/// Header names are lowercase in SPDY; several values of one name travel
/// NUL-separated and come back as separate pairs.
pub type Headers = Vec<(String, String)>;

/// Compresses header blocks for one direction of a connection.
pub struct HeaderEncoder(Compress);

impl Default for HeaderEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderEncoder {
    /// A fresh compression context.
    pub fn new() -> Self {
        let mut z = Compress::new(Compression::best(), true);
        // Only fails for a stream already in progress.
        let _ = z.set_dictionary(dictionary());
        Self(z)
    }

    /// The compressed block for `headers`, flushed so the peer can
    /// decompress it on its own.
    pub fn encode(&mut self, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut plain = Vec::new();
        plain.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        for (name, value) in headers {
            for part in [name.to_ascii_lowercase().as_bytes(), value.as_bytes()] {
                plain.extend_from_slice(&(part.len() as u32).to_be_bytes());
                plain.extend_from_slice(part);
            }
        }
        let mut out = Vec::with_capacity(plain.len() + 64);
        let mut input = &plain[..];
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(256);
            }
            let before = self.0.total_in();
            // In-memory compression of a valid stream cannot fail.
            let _ = self.0.compress_vec(input, &mut out, FlushCompress::Sync);
            input = &input[(self.0.total_in() - before) as usize..];
            // A sync flush is complete once it leaves output space unused.
            if input.is_empty() && out.len() < out.capacity() {
                return out;
            }
        }
    }
}

/// Decompresses header blocks for one direction of a connection.
pub struct HeaderDecoder(Decompress);

impl Default for HeaderDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderDecoder {
    /// A fresh decompression context.
    pub fn new() -> Self {
        Self(Decompress::new(true))
    }

    /// Decompresses and parses one header block.
    pub fn decode(&mut self, block: &[u8]) -> Result<Headers, SpdyError> {
        let bad = |e: String| SpdyError::Headers(e);
        let mut out = Vec::with_capacity(block.len() * 4 + 256);
        let mut input = block;
        loop {
            if out.len() == out.capacity() {
                if out.len() >= MAX_HEADERS {
                    return Err(bad(format!("more than {MAX_HEADERS} bytes")));
                }
                out.reserve(out.len());
            }
            let (before_in, before_out) = (self.0.total_in(), out.len());
            let status = match self
                .0
                .decompress_vec(input, &mut out, FlushDecompress::Sync)
            {
                Ok(status) => status,
                Err(e) if e.needs_dictionary().is_some() => {
                    self.0
                        .set_dictionary(dictionary())
                        .map_err(|e| bad(e.to_string()))?;
                    Status::Ok
                }
                Err(e) => return Err(bad(e.to_string())),
            };
            let used = (self.0.total_in() - before_in) as usize;
            input = &input[used..];
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
            let stuck = used == 0 && out.len() == before_out && status != Status::Ok;
            if stuck || status == Status::StreamEnd {
                return Err(bad("compressed stream ended".into()));
            }
        }
        parse_headers(&out)
    }
}

fn parse_headers(mut block: &[u8]) -> Result<Headers, SpdyError> {
    fn take<'a>(block: &mut &'a [u8], n: usize) -> Result<&'a [u8], SpdyError> {
        if block.len() < n {
            return Err(SpdyError::Headers("truncated".into()));
        }
        let (head, rest) = block.split_at(n);
        *block = rest;
        Ok(head)
    }
    fn length(block: &mut &[u8]) -> Result<usize, SpdyError> {
        let bytes = take(block, 4)?;
        Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize)
    }
    let count = length(&mut block)?;
    let mut headers = Vec::new();
    for _ in 0..count {
        let n = length(&mut block)?;
        let name = String::from_utf8_lossy(take(&mut block, n)?).to_ascii_lowercase();
        let n = length(&mut block)?;
        let value = String::from_utf8_lossy(take(&mut block, n)?).into_owned();
        for part in value.split('\0') {
            headers.push((name.clone(), part.to_owned()));
        }
    }
    Ok(headers)
}

/// One frame as read from the peer.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A new stream.
    SynStream {
        /// Stream ID (odd from a client).
        id: u32,
        /// The peer sends nothing on it.
        fin: bool,
        /// Its headers.
        headers: Headers,
    },
    /// The answer to a stream we opened.
    SynReply {
        /// Stream ID.
        id: u32,
        /// Its headers.
        headers: Headers,
    },
    /// Payload.
    Data {
        /// Stream ID.
        id: u32,
        /// Last frame from the peer on it.
        fin: bool,
        /// The bytes.
        data: Vec<u8>,
    },
    /// The stream is aborted.
    RstStream {
        /// Stream ID.
        id: u32,
        /// Why.
        status: u32,
    },
    /// Liveness check, answered with the same ID.
    Ping(u32),
    /// The peer opens no more streams.
    GoAway,
    /// SETTINGS, WINDOW_UPDATE, HEADERS and unknown types: nothing to do.
    Ignored,
}

fn be32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

/// Reads one frame; `None` at a clean end of the connection.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    headers: &mut HeaderDecoder,
) -> Result<Option<Frame>, SpdyError> {
    let mut head = [0u8; 8];
    match reader.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let (word, flags, len) = (
        be32(&head),
        head[4],
        (be32(&head[4..]) & 0xff_ffff) as usize,
    );
    let control = word & 0x8000_0000 != 0;
    if control && len > MAX_CONTROL {
        return Err(SpdyError::TooLarge(len));
    }
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).await?;
    if !control {
        return Ok(Some(Frame::Data {
            id: word & 0x7fff_ffff,
            fin: flags & FLAG_FIN != 0,
            data: payload,
        }));
    }
    let version = ((word >> 16) & 0x7fff) as u16;
    if version != VERSION {
        return Err(SpdyError::Version(version));
    }
    let fixed = |n: usize, name: &'static str| {
        if payload.len() < n {
            Err(SpdyError::Truncated(name))
        } else {
            Ok(())
        }
    };
    let frame = match (word & 0xffff) as u16 {
        SYN_STREAM => {
            fixed(10, "SYN_STREAM")?;
            Frame::SynStream {
                id: be32(&payload) & 0x7fff_ffff,
                fin: flags & FLAG_FIN != 0,
                headers: headers.decode(&payload[10..])?,
            }
        }
        SYN_REPLY => {
            fixed(4, "SYN_REPLY")?;
            Frame::SynReply {
                id: be32(&payload) & 0x7fff_ffff,
                headers: headers.decode(&payload[4..])?,
            }
        }
        RST_STREAM => {
            fixed(8, "RST_STREAM")?;
            Frame::RstStream {
                id: be32(&payload) & 0x7fff_ffff,
                status: be32(&payload[4..]),
            }
        }
        PING => {
            fixed(4, "PING")?;
            Frame::Ping(be32(&payload))
        }
        GOAWAY => Frame::GoAway,
        _ => Frame::Ignored,
    };
    Ok(Some(frame))
}

fn control_frame(kind: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(8 + payload.len());
    frame.extend_from_slice(
        &(0x8000_0000 | u32::from(VERSION) << 16 | u32::from(kind)).to_be_bytes(),
    );
    frame.extend_from_slice(&(u32::from(flags) << 24 | payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A SYN_STREAM frame (what a client sends; used by tests).
pub fn syn_stream(id: u32, headers: &[(&str, &str)], encoder: &mut HeaderEncoder) -> Vec<u8> {
    let mut payload = Vec::new();
    payload.extend_from_slice(&id.to_be_bytes());
    payload.extend_from_slice(&0u32.to_be_bytes());
    payload.extend_from_slice(&[0, 0]);
    payload.extend_from_slice(&encoder.encode(headers));
    control_frame(SYN_STREAM, 0, &payload)
}

/// A SYN_REPLY frame with no headers.
pub fn syn_reply(id: u32, encoder: &mut HeaderEncoder) -> Vec<u8> {
    let mut payload = id.to_be_bytes().to_vec();
    payload.extend_from_slice(&encoder.encode(&[]));
    control_frame(SYN_REPLY, 0, &payload)
}

/// A DATA frame.
pub fn data_frame(id: u32, fin: bool, data: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(8 + data.len());
    frame.extend_from_slice(&(id & 0x7fff_ffff).to_be_bytes());
    let flags = if fin { FLAG_FIN } else { 0 };
    frame.extend_from_slice(&(u32::from(flags) << 24 | data.len() as u32).to_be_bytes());
    frame.extend_from_slice(data);
    frame
}

fn rst_stream(id: u32, status: u32) -> Vec<u8> {
    let mut payload = id.to_be_bytes().to_vec();
    payload.extend_from_slice(&status.to_be_bytes());
    control_frame(RST_STREAM, 0, &payload)
}

fn ping(id: u32) -> Vec<u8> {
    control_frame(PING, 0, &id.to_be_bytes())
}

fn goaway(last: u32) -> Vec<u8> {
    let mut payload = last.to_be_bytes().to_vec();
    payload.extend_from_slice(&0u32.to_be_bytes());
    control_frame(GOAWAY, 0, &payload)
}

/// What the connection's writer task sends.
enum Outgoing {
    Reply(u32),
    Data(u32, Vec<u8>, bool),
    Reset(u32, u32),
    Ping(u32),
    GoAway,
}

/// A stream the peer opened.
pub struct Stream {
    /// Its headers.
    pub headers: Headers,
    /// What the peer sends on it; closed at its FIN, a reset or the end of
    /// the connection.
    pub data: mpsc::Receiver<Vec<u8>>,
    /// Our side of it.
    pub writer: StreamWriter,
}

impl Stream {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends on one stream.
#[derive(Clone)]
pub struct StreamWriter {
    id: u32,
    tx: mpsc::Sender<Outgoing>,
}

impl StreamWriter {
    /// Sends `data`; false once the connection is gone.
    pub async fn write(&self, data: &[u8]) -> bool {
        for chunk in data.chunks(MAX_DATA) {
            let frame = Outgoing::Data(self.id, chunk.to_vec(), false);
            if self.tx.send(frame).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Half-closes the stream: we send nothing more.
    pub async fn finish(&self) {
        let _ = self
            .tx
            .send(Outgoing::Data(self.id, Vec::new(), true))
            .await;
    }

    /// Aborts the stream.
    pub async fn reset(&self, status: u32) {
        let _ = self.tx.send(Outgoing::Reset(self.id, status)).await;
    }
}

/// A server-side SPDY connection.
pub struct Connection {
    tx: mpsc::Sender<Outgoing>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Connection {
    /// Runs the protocol on `io` (an upgraded HTTP connection). Streams
    /// the peer opens come out of the receiver, already answered with
    /// SYN_REPLY; it closes when the peer is gone.
    pub fn start<S>(io: S) -> (Self, mpsc::Receiver<Stream>)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read, write) = tokio::io::split(io);
        let (tx, rx) = mpsc::channel(64);
        let (streams_tx, streams) = mpsc::channel(16);
        let writer = tokio::spawn(write_frames(write, rx));
        let reader = tokio::spawn(read_frames(read, tx.clone(), streams_tx));
        let connection = Self { tx, reader, writer };
        (connection, streams)
    }

    /// Sends GOAWAY after everything queued, then closes the connection.
    pub async fn close(self) {
        let _ = self.tx.send(Outgoing::GoAway).await;
        drop(self.tx);
        let _ = self.writer.await;
        self.reader.abort();
    }
}

async fn write_frames<W: AsyncWrite>(write: W, mut rx: mpsc::Receiver<Outgoing>) {
    tokio::pin!(write);
    let mut encoder = HeaderEncoder::new();
    let mut last_seen = 0;
    while let Some(outgoing) = rx.recv().await {
        let bytes = match outgoing {
            Outgoing::Reply(id) => {
                last_seen = id;
                syn_reply(id, &mut encoder)
            }
            Outgoing::Data(id, data, fin) => data_frame(id, fin, &data),
            Outgoing::Reset(id, status) => rst_stream(id, status),
            Outgoing::Ping(id) => ping(id),
            Outgoing::GoAway => {
                let _ = write.write_all(&goaway(last_seen)).await;
                break;
            }
        };
        if write.write_all(&bytes).await.is_err() {
            return;
        }
        // Batch whatever else is queued before flushing.
        if rx.is_empty() && write.flush().await.is_err() {
            return;
        }
    }
    let _ = write.shutdown().await;
}

async fn read_frames<R: AsyncRead>(
    read: R,
    tx: mpsc::Sender<Outgoing>,
    streams: mpsc::Sender<Stream>,
) {
    tokio::pin!(read);
    let mut decoder = HeaderDecoder::new();
    let mut open: HashMap<u32, mpsc::Sender<Vec<u8>>> = HashMap::new();
    loop {
        let frame = match read_frame(&mut read, &mut decoder).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!("spdy: {e}");
                break;
            }
        };
        match frame {
            Frame::SynStream { id, fin, headers } => {
                let (data_tx, data) = mpsc::channel(32);
                if !fin {
                    open.insert(id, data_tx);
                }
                // Queued before the stream is handed out, so the reply
                // precedes anything sent on it.
                if tx.send(Outgoing::Reply(id)).await.is_err() {
                    break;
                }
                let writer = StreamWriter { id, tx: tx.clone() };
                let stream = Stream {
                    headers,
                    data,
                    writer,
                };
                if streams.send(stream).await.is_err() {
                    let _ = tx.send(Outgoing::Reset(id, REFUSED_STREAM)).await;
                }
            }
            Frame::Data { id, fin, data } => {
                if let Some(sender) = open.get(&id) {
                    if !data.is_empty() && sender.send(data).await.is_err() {
                        open.remove(&id);
                    }
                }
                if fin {
                    open.remove(&id);
                }
            }
            Frame::RstStream { id, .. } => {
                open.remove(&id);
            }
            Frame::Ping(id) => {
                let _ = tx.send(Outgoing::Ping(id)).await;
            }
            Frame::GoAway => break,
            Frame::SynReply { .. } | Frame::Ignored => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn dictionary_is_the_specs() {
        // The Adler-32 a zlib stream with the SPDY/3 dictionary names.
        let mut z = Compress::new(Compression::best(), true);
        assert_eq!(z.set_dictionary(dictionary()).ok(), Some(0xe3c6_a7c2));
        assert_eq!(dictionary().len(), 1423);
    }

    #[test]
    fn header_blocks_round_trip_across_one_context() {
        let mut encoder = HeaderEncoder::new();
        let mut decoder = HeaderDecoder::new();
        for round in 0..3 {
            let port = round.to_string();
            let block = encoder.encode(&[("streamType", "data"), ("port", &port)]);
            let headers = decoder.decode(&block).unwrap();
            assert_eq!(
                headers,
                vec![
                    ("streamtype".to_owned(), "data".to_owned()),
                    ("port".to_owned(), port)
                ]
            );
        }
    }

    #[test]
    fn multi_valued_headers_split_on_nul() {
        let mut encoder = HeaderEncoder::new();
        let block = encoder.encode(&[("a", "x\0y")]);
        let headers = HeaderDecoder::new().decode(&block).unwrap();
        assert_eq!(headers.len(), 2);
    }

    #[test]
    fn garbage_header_blocks_are_errors() {
        assert!(HeaderDecoder::new().decode(b"not zlib at all").is_err());
        assert!(parse_headers(&[0, 0, 0, 2, 0, 0, 0, 9]).is_err());
    }

    #[tokio::test]
    async fn frames_parse_back() {
        let mut encoder = HeaderEncoder::new();
        let mut bytes = syn_stream(1, &[("streamtype", "error")], &mut encoder);
        bytes.extend(data_frame(1, true, b"hi"));
        bytes.extend(ping(7));
        bytes.extend(rst_stream(3, REFUSED_STREAM));
        bytes.extend(control_frame(9, 0, &[0; 8]));
        let mut decoder = HeaderDecoder::new();
        let mut reader = &bytes[..];
        let mut frames = Vec::new();
        while let Some(frame) = read_frame(&mut reader, &mut decoder).await.unwrap() {
            frames.push(frame);
        }
        assert_eq!(
            frames,
            vec![
                Frame::SynStream {
                    id: 1,
                    fin: false,
                    headers: vec![("streamtype".into(), "error".into())]
                },
                Frame::Data {
                    id: 1,
                    fin: true,
                    data: b"hi".to_vec()
                },
                Frame::Ping(7),
                Frame::RstStream {
                    id: 3,
                    status: REFUSED_STREAM
                },
                Frame::Ignored,
            ]
        );
    }

    #[tokio::test]
    async fn wrong_versions_and_huge_control_frames_are_refused() {
        let mut v2 = control_frame(PING, 0, &[0, 0, 0, 1]);
        v2[1] = 2;
        let mut decoder = HeaderDecoder::new();
        assert!(matches!(
            read_frame(&mut &v2[..], &mut decoder).await,
            Err(SpdyError::Version(2))
        ));
        let mut huge = control_frame(PING, 0, &[]);
        huge[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(
            read_frame(&mut &huge[..], &mut decoder).await,
            Err(SpdyError::TooLarge(_))
        ));
    }

    #[tokio::test]
    async fn a_connection_replies_and_delivers_data() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (conn, mut streams) = Connection::start(server);
        let (mut read, mut write) = tokio::io::split(client);
        let mut encoder = HeaderEncoder::new();
        let mut bytes = syn_stream(1, &[("streamtype", "stdin")], &mut encoder);
        bytes.extend(data_frame(1, true, b"input"));
        write.write_all(&bytes).await.unwrap();
        let mut stream = streams.recv().await.unwrap();
        assert_eq!(stream.header("streamtype"), Some("stdin"));
        assert_eq!(stream.data.recv().await.unwrap(), b"input");
        assert!(stream.data.recv().await.is_none(), "FIN closes it");
        stream.writer.write(b"out").await;
        stream.writer.finish().await;
        conn.close().await;
        let mut decoder = HeaderDecoder::new();
        let mut frames = Vec::new();
        while let Some(frame) = read_frame(&mut read, &mut decoder).await.unwrap() {
            frames.push(frame);
        }
        assert_eq!(
            frames,
            vec![
                Frame::SynReply {
                    id: 1,
                    headers: vec![]
                },
                Frame::Data {
                    id: 1,
                    fin: false,
                    data: b"out".to_vec()
                },
                Frame::Data {
                    id: 1,
                    fin: true,
                    data: vec![]
                },
                Frame::GoAway,
            ]
        );
    }
}
