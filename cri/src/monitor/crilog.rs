//! The CRI container log format, as the kubelet reads it
//! (`pkg/kubelet/kuberuntime/logs`) and containerd / CRI-O write it:
//!
//! ```text
//! 2016-10-06T00:17:09.669794202Z stdout F a complete line
//! 2016-10-06T00:17:09.669794202Z stderr P first 16 KiB of a long line
//! ```
//!
//! `F` marks the end of a line (its `\n` is not stored, the reader adds it
//! back); `P` a chunk of a line that continues in the next record of the same
//! stream. Like containerd, lines longer than [`MAX_LINE`] are cut into `P`
//! chunks, a last line that never got its newline is written as `P` (so the
//! kubelet does not invent one), and a `\r` before the `\n` is dropped.

use chrono::{DateTime, FixedOffset, SecondsFormat, Utc};

/// Longest content of one record (containerd's `max_container_log_line_size`).
pub const MAX_LINE: usize = 16 * 1024;

/// Which container stream a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Whether a record ends its line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag {
    /// `P`: the line continues in the next record of this stream.
    Partial,
    /// `F`: the line ends here.
    Full,
}

/// The timestamp of a record: RFC 3339, UTC, always nine fractional digits.
pub fn timestamp(now: DateTime<Utc>) -> String {
    now.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

/// Appends one record to `out`.
pub fn write_record(out: &mut Vec<u8>, timestamp: &str, stream: Stream, tag: Tag, content: &[u8]) {
    out.extend_from_slice(timestamp.as_bytes());
    out.push(b' ');
    out.extend_from_slice(stream.as_str().as_bytes());
    out.extend_from_slice(match tag {
        Tag::Partial => b" P ",
        Tag::Full => b" F ",
    });
    out.extend_from_slice(content);
    out.push(b'\n');
}

/// Turns one stream's bytes, as they arrive, into whole records.
#[derive(Debug)]
pub struct LineSplitter {
    stream: Stream,
    max_line: usize,
    /// The start of a line whose end has not arrived yet; at most
    /// `max_line` bytes.
    pending: Vec<u8>,
}

impl LineSplitter {
    pub fn new(stream: Stream) -> Self {
        Self::with_max_line(stream, MAX_LINE)
    }

    /// A splitter with a smaller chunk size (at least 1), for tests.
    pub fn with_max_line(stream: Stream, max_line: usize) -> Self {
        Self {
            stream,
            max_line: max_line.max(1),
            pending: Vec::new(),
        }
    }

    /// Appends to `out` a record for every line `data` completes and for
    /// every `max_line` chunk of a longer one; keeps the unfinished rest.
    pub fn push(&mut self, mut data: &[u8], timestamp: &str, out: &mut Vec<u8>) {
        while let Some(&first) = data.first() {
            if self.pending.len() == self.max_line {
                // Written only once the next byte is known, so a line of
                // exactly `max_line` bytes stays one `F` record however the
                // reads fall.
                let tag = if first == b'\n' {
                    data = &data[1..];
                    Tag::Full
                } else {
                    Tag::Partial
                };
                self.emit(tag, timestamp, out);
                continue;
            }
            let room = self.max_line - self.pending.len();
            match data.iter().position(|&b| b == b'\n') {
                Some(end) if end <= room => {
                    if self.pending.is_empty() {
                        let line = &data[..end];
                        let line = line.strip_suffix(b"\r").unwrap_or(line);
                        write_record(out, timestamp, self.stream, Tag::Full, line);
                    } else {
                        self.pending.extend_from_slice(&data[..end]);
                        self.emit(Tag::Full, timestamp, out);
                    }
                    data = &data[end + 1..];
                }
                _ => {
                    let take = room.min(data.len());
                    self.pending.extend_from_slice(&data[..take]);
                    data = &data[take..];
                }
            }
        }
    }

    /// Writes `pending` as one record and empties it.
    fn emit(&mut self, tag: Tag, timestamp: &str, out: &mut Vec<u8>) {
        let mut content = self.pending.as_slice();
        if tag == Tag::Full {
            content = content.strip_suffix(b"\r").unwrap_or(content);
        }
        write_record(out, timestamp, self.stream, tag, content);
        self.pending.clear();
    }

    /// At end of stream: writes the unfinished line, if any, as `P`.
    pub fn finish(&mut self, timestamp: &str, out: &mut Vec<u8>) {
        if !self.pending.is_empty() {
            self.emit(Tag::Partial, timestamp, out);
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("log record has no {0}")]
    Missing(&'static str),
    #[error("bad timestamp {0:?} in log record")]
    Timestamp(String),
    #[error("unknown stream {0:?} in log record")]
    Stream(String),
}

/// One parsed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    pub timestamp: DateTime<FixedOffset>,
    pub stream: Stream,
    pub tag: Tag,
    /// The content, without the record's trailing newline.
    pub content: &'a [u8],
}

/// Parses one record; `line` may still end in its `\n`. Like the kubelet,
/// any tag other than `P` (or a `P:...` with options) counts as full.
pub fn parse_record(line: &[u8]) -> Result<Record<'_>, ParseError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let (timestamp, rest) = split_field(line).ok_or(ParseError::Missing("timestamp"))?;
    let (stream, rest) = split_field(rest).ok_or(ParseError::Missing("stream"))?;
    let (tag, content) = split_field(rest).ok_or(ParseError::Missing("tag"))?;
    let text = String::from_utf8_lossy(timestamp);
    let timestamp = DateTime::parse_from_rfc3339(&text)
        .map_err(|_| ParseError::Timestamp(text.into_owned()))?;
    let stream = match stream {
        b"stdout" => Stream::Stdout,
        b"stderr" => Stream::Stderr,
        other => return Err(ParseError::Stream(String::from_utf8_lossy(other).into())),
    };
    let tag = match tag.split(|&b| b == b':').next() {
        Some(b"P") => Tag::Partial,
        _ => Tag::Full,
    };
    Ok(Record {
        timestamp,
        stream,
        tag,
        content,
    })
}

fn split_field(text: &[u8]) -> Option<(&[u8], &[u8])> {
    let space = text.iter().position(|&b| b == b' ')?;
    Some((&text[..space], &text[space + 1..]))
}

/// A line put back together from its records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub stream: Stream,
    /// The timestamp of the record that ended it.
    pub timestamp: DateTime<FixedOffset>,
    /// The line without its newline.
    pub line: Vec<u8>,
    /// False for a line that never got its newline (ends in `P` at EOF).
    pub complete: bool,
}

/// Reassembles a whole log file into lines, joining each stream's `P`
/// chunks with the record that ends them.
pub fn reassemble(log: &[u8]) -> Result<Vec<Message>, ParseError> {
    let mut messages = Vec::new();
    // Per stream: the index in `messages` of a line still being assembled.
    let mut open: [Option<usize>; 2] = [None, None];
    for line in log.split_inclusive(|&b| b == b'\n') {
        let record = parse_record(line)?;
        let slot = &mut open[record.stream as usize];
        let index = *slot.get_or_insert_with(|| {
            messages.push(Message {
                stream: record.stream,
                timestamp: record.timestamp,
                line: Vec::new(),
                complete: false,
            });
            messages.len() - 1
        });
        let message = &mut messages[index];
        message.line.extend_from_slice(record.content);
        message.timestamp = record.timestamp;
        if record.tag == Tag::Full {
            message.complete = true;
            *slot = None;
        }
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const TS: &str = "2016-10-06T00:17:09.669794202Z";

    fn split(max: usize, chunks: &[&[u8]], eof: bool) -> String {
        let mut s = LineSplitter::with_max_line(Stream::Stdout, max);
        let mut out = Vec::new();
        for chunk in chunks {
            s.push(chunk, TS, &mut out);
        }
        if eof {
            s.finish(TS, &mut out);
        }
        String::from_utf8(out).unwrap().replace(TS, "T")
    }

    #[test]
    fn timestamp_has_nine_digits_in_utc() {
        let t = DateTime::parse_from_rfc3339("2016-10-06T02:17:09.5+02:00").unwrap();
        assert_eq!(
            timestamp(t.with_timezone(&Utc)),
            "2016-10-06T00:17:09.500000000Z"
        );
    }

    #[test]
    fn complete_lines_are_full() {
        assert_eq!(
            split(16, &[b"a\nbc\n\n"], false),
            "T stdout F a\nT stdout F bc\nT stdout F \n"
        );
    }

    #[test]
    fn lines_may_arrive_in_pieces() {
        assert_eq!(
            split(16, &[b"he", b"llo", b"\nwo"], false),
            "T stdout F hello\n"
        );
        assert_eq!(
            split(16, &[b"he", b"llo", b"\nwo"], true),
            "T stdout F hello\nT stdout P wo\n"
        );
    }

    #[test]
    fn long_lines_split_into_partial_chunks() {
        assert_eq!(
            split(4, &[b"abcdefghij\n"], false),
            "T stdout P abcd\nT stdout P efgh\nT stdout F ij\n"
        );
        // Exactly max_line before the newline still fits one full record.
        assert_eq!(split(4, &[b"abcd\n"], false), "T stdout F abcd\n");
        assert_eq!(split(4, &[b"abcd", b"\n"], false), "T stdout F abcd\n");
        assert_eq!(split(4, &[b"abcd"], true), "T stdout P abcd\n");
        assert_eq!(
            split(4, &[b"abcde", b"\n"], false),
            "T stdout P abcd\nT stdout F e\n"
        );
        assert_eq!(
            split(2, &[b"ab", b"cd", b"\n"], false),
            "T stdout P ab\nT stdout F cd\n"
        );
    }

    #[test]
    fn carriage_return_before_newline_is_dropped() {
        assert_eq!(
            split(16, &[b"tty\r\n", b"a\rb\n"], false),
            "T stdout F tty\nT stdout F a\rb\n"
        );
        assert_eq!(split(16, &[b"x\r", b"\n"], false), "T stdout F x\n");
    }

    #[test]
    fn finish_without_pending_writes_nothing() {
        assert_eq!(split(16, &[b"a\n"], true), "T stdout F a\n");
        assert_eq!(split(16, &[], true), "");
    }

    #[test]
    fn parses_records_like_the_kubelet() {
        let line = format!("{TS} stderr F hello world\n");
        let r = parse_record(line.as_bytes()).unwrap();
        assert_eq!(r.stream, Stream::Stderr);
        assert_eq!(r.tag, Tag::Full);
        assert_eq!(r.content, b"hello world");
        assert_eq!(r.timestamp.timestamp_subsec_nanos(), 669_794_202);
        let line = format!("{TS} stdout P:x part");
        let r = parse_record(line.as_bytes()).unwrap();
        assert_eq!(r.tag, Tag::Partial);
        assert_eq!(r.content, b"part");
        let line = format!("{TS} stdout F ");
        let r = parse_record(line.as_bytes()).unwrap();
        assert_eq!(r.content, b"");
    }

    #[test]
    fn rejects_malformed_records() {
        assert_eq!(parse_record(b"x"), Err(ParseError::Missing("timestamp")));
        assert_eq!(
            parse_record(format!("{TS} stdout F").as_bytes()),
            Err(ParseError::Missing("tag"))
        );
        assert_eq!(
            parse_record(b"yesterday stdout F x"),
            Err(ParseError::Timestamp("yesterday".into()))
        );
        assert_eq!(
            parse_record(format!("{TS} stdin F x").as_bytes()),
            Err(ParseError::Stream("stdin".into()))
        );
    }

    #[test]
    fn reassembles_interleaved_streams() {
        let mut out = Vec::new();
        let mut o = LineSplitter::with_max_line(Stream::Stdout, 3);
        let mut e = LineSplitter::with_max_line(Stream::Stderr, 3);
        o.push(b"abcd", TS, &mut out);
        e.push(b"err\nxy", TS, &mut out);
        o.push(b"ef\n", TS, &mut out);
        o.finish(TS, &mut out);
        e.finish(TS, &mut out);
        let messages = reassemble(&out).unwrap();
        let lines: Vec<(Stream, &[u8], bool)> = messages
            .iter()
            .map(|m| (m.stream, m.line.as_slice(), m.complete))
            .collect();
        assert_eq!(
            lines,
            [
                (Stream::Stdout, &b"abcdef"[..], true),
                (Stream::Stderr, &b"err"[..], true),
                (Stream::Stderr, &b"xy"[..], false),
            ]
        );
    }
}
