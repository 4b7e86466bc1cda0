//! Runtime logs in logrus' formats, because callers parse them: containerd's
//! shim reads the last `"level":"error"` line of the `--log` file (json) to
//! explain a failed create, and podman shows runc-style text errors.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use chrono::{SecondsFormat, Utc};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// Formats one log line as logrus does.
pub fn format_line(format: Format, level: Level, msg: &str, time: &str) -> String {
    let level = match level {
        Level::ERROR => "error",
        Level::WARN => "warning",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    };
    match format {
        Format::Json => {
            let v = serde_json::json!({"level": level, "msg": msg, "time": time});
            format!("{v}\n")
        }
        Format::Text => {
            let quoted = serde_json::to_string(msg).unwrap_or_default();
            format!("time=\"{time}\" level={level} msg={quoted}\n")
        }
    }
}

struct LogrusLayer {
    format: Format,
    max: Level,
    /// libcontainer logs each failure at every level it passes through; without
    /// --debug only our own one-line summary is shown, as runc shows one line.
    debug: bool,
    out: Mutex<Box<dyn Write + Send>>,
}

#[derive(Default)]
struct MessageVisitor(String);

impl Visit for MessageVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

impl<S: Subscriber> Layer<S> for LogrusLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        if level > self.max || (!self.debug && !event.metadata().target().starts_with("bosun")) {
            return;
        }
        let mut v = MessageVisitor::default();
        event.record(&mut v);
        let time = Utc::now().to_rfc3339_opts(SecondsFormat::Nanos, true);
        let line = format_line(self.format, level, v.0.trim_start(), &time);
        if let Ok(mut out) = self.out.lock() {
            let _ = out.write_all(line.as_bytes());
        }
    }
}

/// Installs the logger: to `log` if given (appending, as runc), else stderr.
/// Returns whether errors already reach stderr through it.
pub fn init(log: Option<&Path>, format: Format, debug: bool) -> bool {
    let max = if debug { Level::DEBUG } else { Level::WARN };
    let (out, to_stderr): (Box<dyn Write + Send>, bool) =
        match log.map(|p| OpenOptions::new().create(true).append(true).open(p)) {
            Some(Ok(f)) => (Box::new(f), false),
            Some(Err(e)) => {
                eprintln!("bosun-runc: cannot open log file: {e}; logging to stderr");
                (Box::new(std::io::stderr()), true)
            }
            None => (Box::new(std::io::stderr()), true),
        };
    let layer = LogrusLayer {
        format,
        max,
        debug,
        out: Mutex::new(out),
    };
    let _ = tracing_subscriber::registry().with(layer).try_init();
    to_stderr
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line_as_containerd_parses_it() {
        let l = format_line(Format::Json, Level::ERROR, "container not running", "T");
        let v: serde_json::Value = serde_json::from_str(&l).unwrap_or_default();
        assert_eq!(v["level"], "error");
        assert_eq!(v["msg"], "container not running");
        assert_eq!(v["time"], "T");
    }

    #[test]
    fn text_line_as_logrus() {
        let l = format_line(Format::Text, Level::WARN, "a \"b\"", "T");
        assert_eq!(l, "time=\"T\" level=warning msg=\"a \\\"b\\\"\"\n");
    }
}
