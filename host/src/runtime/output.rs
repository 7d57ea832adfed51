//! A plugin's stdout and stderr: complete lines go to the host's log, tagged with plugin,
//! topic and stream, at most a configured number of lines per second per plugin. Lines past
//! the rate are dropped and counted, so a printing loop cannot flood the log.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use crate::stats::Stats;

/// Longest plugin log line (stdout, stderr or the `log` import); the rest is cut.
pub const MAX_LINE: usize = 4096;

/// A token bucket of log lines, shared by every instance of one plugin.
pub struct LogLimiter {
    per_sec: f64,
    state: Mutex<(f64, Instant)>,
}

impl LogLimiter {
    /// Allows `per_sec` lines per second, with a burst of as many.
    pub fn new(per_sec: u32) -> Self {
        let per_sec = f64::from(per_sec);
        LogLimiter {
            per_sec,
            state: Mutex::new((per_sec, Instant::now())),
        }
    }

    fn allow(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = &mut *state;
        let now = Instant::now();
        *tokens =
            (*tokens + now.duration_since(*last).as_secs_f64() * self.per_sec).min(self.per_sec);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Where one stream of one room instance writes.
#[derive(Clone)]
pub struct LogTarget {
    plugin: Arc<str>,
    topic: Arc<str>,
    stream: &'static str,
    limiter: Arc<LogLimiter>,
    stats: Arc<Stats>,
}

impl LogTarget {
    /// A target for `stream` ("stdout" or "stderr") of a room of `plugin`.
    pub fn new(
        plugin: Arc<str>,
        topic: Arc<str>,
        stream: &'static str,
        limiter: Arc<LogLimiter>,
        stats: Arc<Stats>,
    ) -> Self {
        LogTarget {
            plugin,
            topic,
            stream,
            limiter,
            stats,
        }
    }

    fn emit(&self, line: &[u8]) {
        if !self.limiter.allow() {
            Stats::bump(&self.stats.plugin_log_dropped);
            return;
        }
        let line = String::from_utf8_lossy(&line[..line.len().min(MAX_LINE)]);
        let line = line.trim_end();
        tracing::info!(target: "plugin", plugin = %self.plugin, topic = %self.topic, stream = self.stream, "{line}");
    }
}

/// Buffers bytes into lines for one stream handle.
struct LineWriter {
    target: LogTarget,
    pending: Vec<u8>,
}

impl LineWriter {
    fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            self.target.emit(&line);
        }
        if self.pending.len() > MAX_LINE {
            self.target.emit(&self.pending);
            self.pending.clear();
        }
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            self.target.emit(&self.pending);
        }
    }
}

impl OutputStream for LineWriter {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 << 10)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LineWriter {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for LineWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.get_mut().push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for LogTarget {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogTarget {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(LineWriter {
            target: self.clone(),
            pending: Vec::new(),
        })
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(LineWriter {
            target: self.clone(),
            pending: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limiter_allows_a_burst_then_refuses() {
        let limiter = LogLimiter::new(3);
        assert_eq!((0..5).filter(|_| limiter.allow()).count(), 3);
    }

    #[test]
    fn lines_past_the_rate_are_counted_as_dropped() {
        let stats = Arc::new(Stats::default());
        let target = LogTarget::new(
            "p".into(),
            "t".into(),
            "stdout",
            Arc::new(LogLimiter::new(2)),
            stats.clone(),
        );
        let mut w = LineWriter {
            target,
            pending: Vec::new(),
        };
        w.push(b"a\nb\nc\nd");
        drop(w);
        assert_eq!(
            stats
                .plugin_log_dropped
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
    }
}
