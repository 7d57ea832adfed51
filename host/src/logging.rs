//! The process's log output: the tracing subscriber (`RUST_LOG` filter, records on stderr
//! as text lines or, with `--log-format json`, one JSON object per line with the record's
//! span) and the writer under text records, which escapes control characters so that no
//! record can be forged (JSON records escape them themselves). A plugin's log line, a client's topic or an error a plugin returns may
//! carry newlines, carriage returns or terminal escapes; written raw, one such value could
//! end a record and start a fake one (`ERROR cinder::runtime: plugin quarantined ...`).
//! Here every record stays on its one line whatever its fields hold.

use std::io::{self, IsTerminal as _, Write};

use tracing_subscriber::fmt::MakeWriter;

use crate::config::LogFormat;

/// `RUST_LOG`, or `info`.
fn filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
}

/// The subscriber Cinder logs through, writing records to `writer`: `RUST_LOG` (default
/// `info`), text records, control characters escaped. `ansi` colours the records (the
/// escape sequences this module writes itself; a plugin's are escaped).
pub fn subscriber<W>(writer: W, ansi: bool) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_ansi(ansi)
        .with_writer(Escaping {
            inner: writer,
            ansi,
        })
        .finish()
}

/// The subscriber of `--log-format json`, writing to `writer`: `RUST_LOG` (default
/// `info`), one JSON object per record with `timestamp`, `level`, `target`, the event's
/// fields (`message` among them) at the top level, and `span`, the innermost span's name
/// and fields (a plugin call's plugin, version, topic and export).
pub fn json_subscriber<W>(writer: W) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_env_filter(filter())
        .with_writer(writer)
        .finish()
}

/// Logs to stderr for the rest of the process (stdout carries the listen address and
/// generated secrets). Text has colours only on a terminal.
pub fn init(format: LogFormat) {
    let installed = match format {
        LogFormat::Text => {
            let ansi = io::stderr().is_terminal();
            tracing::subscriber::set_global_default(subscriber(io::stderr, ansi))
        }
        LogFormat::Json => tracing::subscriber::set_global_default(json_subscriber(io::stderr)),
    };
    if installed.is_err() {
        eprintln!("a log subscriber was already installed");
    }
}

/// A [`MakeWriter`] whose writers escape control characters.
pub struct Escaping<W> {
    inner: W,
    ansi: bool,
}

impl<'a, W: MakeWriter<'a>> MakeWriter<'a> for Escaping<W> {
    type Writer = EscapingWriter<W::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        EscapingWriter {
            inner: self.inner.make_writer(),
            ansi: self.ansi,
        }
    }
}

/// Writes each record it is given (the formatter hands over one whole record, with its
/// final newline, per write) with every other control character escaped.
pub struct EscapingWriter<W> {
    inner: W,
    ansi: bool,
}

impl<W: Write> Write for EscapingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        self.inner
            .write_all(escape_record(&text, self.ansi).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// `record` with its control characters escaped, but for a final newline, tabs and (with
/// `ansi`) colour sequences (`ESC [ digits ; m`), which cannot move the cursor or start a
/// line.
pub fn escape_record(record: &str, ansi: bool) -> String {
    let (body, newline) = match record.strip_suffix('\n') {
        Some(body) => (body, "\n"),
        None => (record, ""),
    };
    let mut out = String::with_capacity(record.len() + 8);
    let mut chars = body.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '\t' => out.push(c),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\u{1b}' if ansi && colour_len(&body[i..]).is_some() => {
                let len = colour_len(&body[i..]).unwrap_or(1);
                out.push_str(&body[i..i + len]);
                while chars.peek().is_some_and(|(j, _)| *j < i + len) {
                    chars.next();
                }
            }
            c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => {
                out.push_str(&c.escape_unicode().to_string());
            }
            c => out.push(c),
        }
    }
    out.push_str(newline);
    out
}

/// The length of the colour sequence `ESC [ (digit | ;)* m` at the start of `s`, if it
/// starts with one.
fn colour_len(s: &str) -> Option<usize> {
    let rest = s.strip_prefix("\u{1b}[")?;
    let params = rest
        .bytes()
        .take_while(|b| b.is_ascii_digit() || *b == b';')
        .count();
    (rest.as_bytes().get(params) == Some(&b'm')).then_some(2 + params + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_stays_on_one_line_whatever_it_carries() {
        let forged =
            "INFO plugin: hi\nERROR cinder::runtime: plugin quarantined\r\u{1b}[2K\u{0}\u{2028}x\n";
        let escaped = escape_record(forged, false);
        assert_eq!(escaped.lines().count(), 1);
        assert_eq!(
            escaped,
            "INFO plugin: hi\\nERROR cinder::runtime: plugin quarantined\\r\\u{1b}[2K\\u{0}\\u{2028}x\n"
        );
    }

    #[test]
    fn colours_pass_when_asked_for_and_other_escapes_never() {
        let record = "\u{1b}[2mtime\u{1b}[0m \u{1b}[31mERROR\u{1b}[0m \u{1b}[1A up\n";
        assert_eq!(
            escape_record(record, true),
            "\u{1b}[2mtime\u{1b}[0m \u{1b}[31mERROR\u{1b}[0m \\u{1b}[1A up\n"
        );
        assert!(!escape_record(record, false).contains('\u{1b}'));
    }
}
