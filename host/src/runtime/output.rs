//! A plugin's stdout and stderr: complete lines go to the host's log, tagged with plugin,
//! topic and stream, at most a configured number of lines per second per plugin (shared
//! with the `log` import). Lines past the rate are dropped and counted, so a printing loop
//! cannot flood the log; control characters in them are escaped by the log writer
//! (crate::logging).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use crate::limit::SharedBucket;
use crate::stats::Stats;

/// Longest plugin log line (stdout, stderr or the `log` import); the rest is cut.
pub const MAX_LINE: usize = 4096;

/// Where one stream of one room instance writes.
#[derive(Clone)]
pub struct LogTarget {
    plugin: Arc<str>,
    topic: Arc<str>,
    stream: &'static str,
    limiter: Arc<SharedBucket>,
    stats: Arc<Stats>,
}

impl LogTarget {
    /// A target for `stream` ("stdout" or "stderr") of a room of `plugin`.
    pub fn new(
        plugin: Arc<str>,
        topic: Arc<str>,
        stream: &'static str,
        limiter: Arc<SharedBucket>,
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
        if !self.limiter.take() {
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
    fn lines_past_the_rate_are_counted_as_dropped() {
        let stats = Arc::new(Stats::default());
        let target = LogTarget::new(
            "p".into(),
            "t".into(),
            "stdout",
            Arc::new(SharedBucket::per_sec(2)),
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
