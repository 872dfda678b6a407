//! A room's log: the `log` host function and the guest's stdout and stderr.
//!
//! Guest text is untrusted. Each line is cut to [`MAX_LINE_BYTES`] with a
//! marker, and control characters are escaped so a guest cannot forge a
//! line of the host's own. A room may write [`LINES_PER_SECOND`] lines per
//! second, in bursts of up to [`BURST_LINES`]. Lines past the rate are dropped, counted, and
//! reported in one warning when the room may log again.

use std::borrow::Cow;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder};

use crate::router::shard_number;

/// Maximum length of a guest log line, in bytes.
pub const MAX_LINE_BYTES: usize = 4096;

/// Lines per second one room may log, on average.
pub const LINES_PER_SECOND: u32 = 200;

/// Lines one room may log at once before the rate applies.
pub const BURST_LINES: u32 = 1000;

/// Level of a guest log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// The log of one room, shared by its `log` host function and its output
/// streams. Cloning it is cheap.
#[derive(Clone)]
pub struct GuestLog {
    room: Arc<str>,
    budget: Arc<Budget>,
}

struct Budget {
    lines: DefaultDirectRateLimiter,
    dropped: AtomicU64,
}

impl GuestLog {
    pub fn new(room: Arc<str>) -> GuestLog {
        let quota = Quota::per_second(NonZeroU32::new(LINES_PER_SECOND).expect("a positive rate"))
            .allow_burst(NonZeroU32::new(BURST_LINES).expect("a positive burst"));
        GuestLog {
            room,
            budget: Arc::new(Budget {
                lines: RateLimiter::direct(quota),
                dropped: AtomicU64::new(0),
            }),
        }
    }

    /// Logs one line of guest text, within the room's rate.
    pub fn write(&self, level: Level, stream: Option<&'static str>, text: &str) {
        if self.budget.lines.check().is_err() {
            self.budget.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let room = tracing::field::display(&*self.room);
        let shard = shard_number(&self.room);
        let dropped = self.budget.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(room, shard, dropped, "guest log lines dropped: the room logs faster than {LINES_PER_SECOND} lines per second");
        }

        let text = clean(text);
        match level {
            Level::Trace => tracing::trace!(target: "guest", room, shard, stream, "{text}"),
            Level::Debug => tracing::debug!(target: "guest", room, shard, stream, "{text}"),
            Level::Info => tracing::info!(target: "guest", room, shard, stream, "{text}"),
            Level::Warn => tracing::warn!(target: "guest", room, shard, stream, "{text}"),
            Level::Error => tracing::error!(target: "guest", room, shard, stream, "{text}"),
        }
    }

    /// WASI for the guest: no files, no sockets, no environment; stdout and
    /// stderr go to this log, stderr at warning level.
    pub fn wasi(&self) -> WasiCtx {
        WasiCtxBuilder::new()
            .stdout(GuestOutput {
                log: self.clone(),
                stream: "stdout",
            })
            .stderr(GuestOutput {
                log: self.clone(),
                stream: "stderr",
            })
            .build()
    }
}

/// Cuts `text` to [`MAX_LINE_BYTES`] with a marker, and escapes control
/// characters other than tab.
fn clean(text: &str) -> Cow<'_, str> {
    let cut = crate::guest::truncate(text, MAX_LINE_BYTES);
    let needs_escape = cut.chars().any(|c| c.is_control() && c != '\t');
    if cut.len() == text.len() && !needs_escape {
        return Cow::Borrowed(text);
    }
    let mut cleaned = String::with_capacity(cut.len() + 16);
    for c in cut.chars() {
        if c.is_control() && c != '\t' {
            cleaned.extend(c.escape_default());
        } else {
            cleaned.push(c);
        }
    }
    if cut.len() < text.len() {
        cleaned.push_str(" [truncated]");
    }
    Cow::Owned(cleaned)
}

/// A guest's stdout or stderr.
struct GuestOutput {
    log: GuestLog,
    stream: &'static str,
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LineLogger {
            log: self.log.clone(),
            stream: self.stream,
            line: Vec::new(),
            cut: false,
        })
    }
}

/// Splits guest output into lines and logs each one.
struct LineLogger {
    log: GuestLog,
    stream: &'static str,
    line: Vec<u8>,
    /// Whether the current line lost bytes past [`MAX_LINE_BYTES`].
    cut: bool,
}

impl LineLogger {
    fn emit(&mut self) {
        if self.line.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(&self.line);
        let mut text = text.trim_end().to_string();
        if self.cut {
            text.push_str(" [truncated]");
        }
        let level = if self.stream == "stderr" { Level::Warn } else { Level::Info };
        self.log.write(level, Some(self.stream), &text);
        self.line.clear();
        self.cut = false;
    }
}

impl AsyncWrite for LineLogger {
    fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        for &byte in buf {
            if byte == b'\n' {
                self.emit();
            } else if self.line.len() < MAX_LINE_BYTES {
                self.line.push(byte);
            } else {
                self.cut = true;
            }
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.emit();
        Poll::Ready(Ok(()))
    }
}

impl Drop for LineLogger {
    fn drop(&mut self) {
        self.emit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_escapes_newlines_and_marks_cuts() {
        assert_eq!(clean("plain\ttext"), "plain\ttext");
        assert_eq!(clean("one\nINFO forged"), "one\\nINFO forged");
        let long = "x".repeat(MAX_LINE_BYTES + 10);
        let cleaned = clean(&long);
        assert!(cleaned.ends_with(" [truncated]"), "a cut line says so");
        assert_eq!(cleaned.len(), MAX_LINE_BYTES + " [truncated]".len());
    }
}
