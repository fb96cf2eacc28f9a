//! The agent's log: one record per line, coloured only for a person at a terminal.
//!
//! Errors often carry several lines (a refused config lists every problem, Docker's messages embed
//! newlines). Written as they are, one record would read as several to journald, `grep` or a log
//! shipper, and the later lines would lose the record's time and level. So the text format writes
//! each record's inner line breaks out as `\n`; the JSON format escapes them already.

use std::io::{self, IsTerminal, Write};
use tracing_subscriber::fmt::MakeWriter;

/// Starts the agent's log on stderr. `HOIST_LOG` filters (default `info`); `HOIST_LOG_FORMAT=json`
/// writes JSON records.
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HOIST_LOG").unwrap_or_else(|_| "info".into());
    let json = std::env::var("HOIST_LOG_FORMAT").is_ok_and(|f| f == "json");
    let ansi = colour(io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi && !json);
    if json { builder.with_writer(io::stderr).json().init() } else { builder.with_writer(OneLine).init() }
}

/// Colour only for a terminal, and never when `NO_COLOR` is set to anything but empty
/// (<https://no-color.org>).
fn colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// stderr, each record's inner line breaks written out (`MakeWriter` hands out one per record).
struct OneLine;

impl<'a> MakeWriter<'a> for OneLine {
    type Writer = OneLineWriter;
    fn make_writer(&'a self) -> Self::Writer {
        OneLineWriter(Vec::new())
    }
}

/// Collects one record and writes it to stderr as one line when dropped.
struct OneLineWriter(Vec<u8>);

impl Write for OneLineWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for OneLineWriter {
    fn drop(&mut self) {
        // A log that cannot be written has nowhere to say so.
        let _ = io::stderr().lock().write_all(&one_line(&self.0));
    }
}

/// `record` with every line break but the final one written out as `\n` (and `\r` as `\r`).
fn one_line(record: &[u8]) -> Vec<u8> {
    let body = record.strip_suffix(b"\n").unwrap_or(record);
    let mut out = Vec::with_capacity(record.len() + 8);
    for &b in body {
        match b {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b => out.push(b),
        }
    }
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn a_record_of_several_lines_is_written_as_one() {
        let record = b"2026-12-01T10:00:00Z ERROR hoist: config refused error=web.yaml: web: image: missing\nweb.yaml: db: ports: bad\n";
        let line = one_line(record);
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        assert!(line.ends_with(b"missing\\nweb.yaml: db: ports: bad\n"), "{}", String::from_utf8_lossy(&line));
        assert_eq!(one_line(b"plain\n"), b"plain\n");
        assert_eq!(one_line(b"no newline"), b"no newline\n");
        assert_eq!(one_line(b"a\r\nb\n"), b"a\\r\\nb\n");
    }

    #[test]
    fn colour_only_for_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))), "an empty NO_COLOR does not count");
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None), "a pipe or journald gets no escapes");
    }
}
