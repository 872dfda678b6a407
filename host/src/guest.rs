//! The host side of the room contract: the data each room's `Store` carries,
//! and the host functions (`broadcast`, `send`, `close`, ...) a guest calls.
//!
//! Every host function acts on the calling room's own connections and never
//! blocks: a message is queued on each connection's outbound queue, and a
//! connection whose queue is full is closed as a slow consumer instead of
//! slowing the room down. Guest output on stdout and stderr goes to the log,
//! one event per line, tagged with the room id.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::ws::Message;
use indexmap::IndexMap;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{ResourceTable, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::connection::ConnectionHandle;
use crate::runtime::bindings::partyhost::room::{room, types};
use crate::runtime::GuestMessage;

/// Longest log line or stdout line a guest may write; the rest is cut off.
const MAX_GUEST_LOG_LINE: usize = 4096;

/// Longest close reason the WebSocket protocol allows, in bytes.
const MAX_CLOSE_REASON: usize = 123;

/// Data of one room's `Store`. It outlives the store: when an instance traps,
/// the room takes it back with `Store::into_data` and starts the next
/// instance with it, so the connections survive the restart.
pub struct RoomHost {
    /// The room's id, `<room>-<k>` for a shard.
    pub room: Arc<str>,
    /// Open connections in the order they joined.
    pub connections: IndexMap<Arc<str>, ConnectionHandle>,
    /// When the current guest call must end. The epoch callback interrupts
    /// the guest past it.
    pub call_deadline: Instant,
    wasi: WasiCtx,
    table: ResourceTable,
}

impl RoomHost {
    pub fn new(room: Arc<str>) -> RoomHost {
        RoomHost {
            wasi: guest_wasi(&room),
            room,
            connections: IndexMap::new(),
            call_deadline: Instant::now(),
            table: ResourceTable::new(),
        }
    }

    /// Clears what belonged to the dropped instance (WASI state, resources)
    /// and keeps the connections.
    pub fn reset_instance_state(&mut self) {
        self.wasi = guest_wasi(&self.room);
        self.table = ResourceTable::new();
    }
}

impl WasiView for RoomHost {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for RoomHost {}

impl room::Host for RoomHost {
    fn id(&mut self) -> String {
        self.room.to_string()
    }

    fn broadcast(&mut self, message: GuestMessage, without: Vec<String>) {
        let frame = to_frame(message);
        for (id, connection) in &self.connections {
            if without.iter().any(|excluded| excluded.as_str() == &**id) {
                continue;
            }
            connection.send(frame.clone());
        }
    }

    fn send(&mut self, connection: String, message: GuestMessage) -> bool {
        let Some(handle) = self.connections.get(connection.as_str()) else {
            return false;
        };
        handle.send(to_frame(message))
    }

    fn close(&mut self, connection: String, code: u16, reason: String) -> bool {
        if code != 1000 && !(3000..=4999).contains(&code) {
            tracing::warn!(room = %self.room, conn = %connection, code,
                "guest asked to close a connection with an invalid code: use 1000 or 3000-4999");
            return false;
        }
        let Some(handle) = self.connections.get(connection.as_str()) else {
            return false;
        };
        handle.close(code, truncate(&reason, MAX_CLOSE_REASON));
        true
    }

    fn connections(&mut self) -> Vec<String> {
        self.connections.keys().map(|id| id.to_string()).collect()
    }

    fn log(&mut self, level: room::LogLevel, message: String) {
        let room = &*self.room;
        let message = truncate(&message, MAX_GUEST_LOG_LINE);
        match level {
            room::LogLevel::Trace => tracing::trace!(target: "guest", room, "{message}"),
            room::LogLevel::Debug => tracing::debug!(target: "guest", room, "{message}"),
            room::LogLevel::Info => tracing::info!(target: "guest", room, "{message}"),
            room::LogLevel::Warn => tracing::warn!(target: "guest", room, "{message}"),
            room::LogLevel::Error => tracing::error!(target: "guest", room, "{message}"),
        }
    }
}

/// Converts a guest message into a WebSocket frame. The frame's payload is
/// reference-counted, so a broadcast shares one copy across all sockets.
pub fn to_frame(message: GuestMessage) -> Message {
    match message {
        GuestMessage::Text(text) => Message::Text(text.into()),
        GuestMessage::Binary(bytes) => Message::Binary(bytes.into()),
    }
}

/// Cuts `text` to at most `max` bytes, at a character boundary.
pub(crate) fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// WASI for a guest: no files, no sockets, no environment; stdout and stderr
/// go to the log.
fn guest_wasi(room: &Arc<str>) -> WasiCtx {
    WasiCtxBuilder::new()
        .stdout(GuestOutput { room: room.clone(), stream: "stdout" })
        .stderr(GuestOutput { room: room.clone(), stream: "stderr" })
        .build()
}

/// A guest's stdout or stderr.
struct GuestOutput {
    room: Arc<str>,
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
            room: self.room.clone(),
            stream: self.stream,
            line: Vec::new(),
        })
    }
}

/// Splits guest output into lines and logs each one.
struct LineLogger {
    room: Arc<str>,
    stream: &'static str,
    line: Vec<u8>,
}

impl LineLogger {
    fn emit(&mut self) {
        if self.line.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(&self.line);
        let text = text.trim_end();
        if self.stream == "stderr" {
            tracing::warn!(target: "guest", room = %self.room, stream = self.stream, "{text}");
        } else {
            tracing::info!(target: "guest", room = %self.room, stream = self.stream, "{text}");
        }
        self.line.clear();
    }
}

impl AsyncWrite for LineLogger {
    fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        for &byte in buf {
            if byte == b'\n' {
                self.emit();
            } else if self.line.len() < MAX_GUEST_LOG_LINE {
                self.line.push(byte);
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
