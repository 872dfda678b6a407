//! One WebSocket connection: its outbound queue, the task that writes it to
//! the socket, and the loop that reads the socket and feeds the room.
//!
//! The outbound queue is bounded in bytes (`--max-outbound-bytes`). A room
//! never waits on a socket: `send` appends a frame and wakes the writer,
//! which drains everything queued into one flush. A client that reads too
//! slowly to keep its queue under the bound is a slow consumer: its queue is
//! dropped and it is closed with code 1008, and the room carries on. The
//! bound counts frames the writer has not taken yet; the batch the writer is
//! writing comes on top, so one socket holds at most about twice the bound.
//!
//! The reader forwards text and binary messages to the room's mailbox,
//! waiting while the mailbox is full, which stops reading the socket and so
//! pushes back on that client alone. It pings a silent client every
//! `--ping-interval` and closes one that stays silent for two intervals.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::room::{RoomEvent, RoomHandle};

/// Standard WebSocket close codes the host sends.
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// The peer vanished without a close frame; reported to rooms, never
    /// sent.
    pub const ABNORMAL: u16 = 1006;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// How long the writer keeps trying to deliver a close frame before it drops
/// the socket.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Source of connection serial numbers, which tell apart two connections
/// that share a `_pk` id.
static NEXT_SERIAL: AtomicU64 = AtomicU64::new(1);

/// A room's handle on one connection. Cloning it is cheap.
#[derive(Clone)]
pub struct ConnectionHandle {
    /// Connection id that the guest receives.
    pub id: Arc<str>,
    /// Unique per socket, unlike `id`, which a reconnecting client reuses.
    pub serial: u64,
    shared: Arc<Shared>,
}

struct Shared {
    room: Arc<str>,
    queue: Mutex<Queue>,
    /// Wakes the writer when frames or a close were queued.
    wake: Notify,
    /// Cancelled when the writer must stop writing data at once: the queue
    /// overflowed or the reader is gone.
    abort: CancellationToken,
    /// Cancelled when the writer has finished, so the socket is closed.
    writer_done: CancellationToken,
    max_bytes: usize,
    /// What the room keeps with the connection. It lives here, with the
    /// connection rather than the instance, so it survives a restart.
    attachment: Mutex<Attachment>,
}

/// The guest's state of a connection and the tags `on-connect` returned.
#[derive(Default)]
struct Attachment {
    state: Option<Vec<u8>>,
    tags: Vec<String>,
}

#[derive(Default)]
struct Queue {
    frames: VecDeque<Message>,
    bytes: usize,
    /// The close frame to send after the queued frames. Once set, nothing
    /// more is queued.
    close: Option<CloseFrame>,
}

impl ConnectionHandle {
    pub fn new(id: Arc<str>, room: Arc<str>, max_bytes: usize) -> ConnectionHandle {
        ConnectionHandle {
            id,
            serial: NEXT_SERIAL.fetch_add(1, Ordering::Relaxed),
            shared: Arc::new(Shared {
                room,
                queue: Mutex::new(Queue::default()),
                wake: Notify::new(),
                abort: CancellationToken::new(),
                writer_done: CancellationToken::new(),
                max_bytes,
                attachment: Mutex::default(),
            }),
        }
    }

    /// Replaces the guest's state of the connection; `None` clears it. The
    /// caller checks its size.
    pub fn set_state(&self, state: Option<Vec<u8>>) {
        self.attachment().state = state;
    }

    pub fn state(&self) -> Option<Vec<u8>> {
        self.attachment().state.clone()
    }

    /// Replaces the connection's tags. The caller checks their bounds.
    pub fn set_tags(&self, tags: Vec<String>) {
        self.attachment().tags = tags;
    }

    pub fn tags(&self) -> Vec<String> {
        self.attachment().tags.clone()
    }

    pub fn has_tag(&self, tag: &str) -> bool {
        self.attachment().tags.iter().any(|own| own == tag)
    }

    fn attachment(&self) -> std::sync::MutexGuard<'_, Attachment> {
        self.shared.attachment.lock().expect("connection attachment lock")
    }

    /// Queues a frame. Returns false when the connection is closing. A frame
    /// that would push the queue past its byte bound closes the connection
    /// as a slow consumer instead.
    pub fn send(&self, frame: Message) -> bool {
        let size = frame_payload_len(&frame);
        let mut queue = self.shared.queue.lock().expect("connection queue lock");
        if queue.close.is_some() {
            return false;
        }
        // One frame larger than the bound still goes to a client whose queue
        // is empty: it is slow only if more piles up behind it.
        if queue.bytes > 0 && queue.bytes + size > self.shared.max_bytes {
            tracing::warn!(room = %self.shared.room, shard = crate::router::shard_number(&self.shared.room), conn = %self.id, queued_bytes = queue.bytes,
                max_bytes = self.shared.max_bytes, "closing slow consumer: outbound queue full");
            metrics::counter!("partyhost_slow_consumer_disconnects_total", &crate::metrics::room_labels(&self.shared.room))
                .increment(1);
            queue.frames.clear();
            queue.bytes = 0;
            queue.close = Some(close_frame(close_code::POLICY_VIOLATION, "slow consumer: outbound queue full"));
            drop(queue);
            self.shared.abort.cancel();
            self.shared.wake.notify_one();
            return false;
        }
        queue.bytes += size;
        queue.frames.push_back(frame);
        drop(queue);
        self.shared.wake.notify_one();
        true
    }

    /// Sends the queued frames, then a close frame. Does nothing when the
    /// connection is already closing.
    pub fn close(&self, code: u16, reason: &str) {
        let mut queue = self.shared.queue.lock().expect("connection queue lock");
        if queue.close.is_some() {
            return;
        }
        queue.close = Some(close_frame(code, reason));
        drop(queue);
        self.shared.wake.notify_one();
    }

    /// Returns the close code and reason the host chose, if it is closing
    /// the connection.
    fn host_close(&self) -> Option<(u16, String)> {
        let queue = self.shared.queue.lock().expect("connection queue lock");
        queue.close.as_ref().map(|frame| (frame.code, frame.reason.to_string()))
    }

    /// Waits for frames or a close; returns the frames and whether a close
    /// frame follows them.
    async fn next_batch(&self, frames: &mut Vec<Message>) -> Option<CloseFrame> {
        loop {
            // Register interest before checking, so a wake-up between the
            // check and the wait is not lost.
            let notified = self.shared.wake.notified();
            {
                let mut queue = self.shared.queue.lock().expect("connection queue lock");
                frames.extend(queue.frames.drain(..));
                queue.bytes = 0;
                if !frames.is_empty() || queue.close.is_some() {
                    return queue.close.clone();
                }
            }
            notified.await;
        }
    }
}

/// Payload bytes of a frame.
pub fn frame_payload_len(frame: &Message) -> usize {
    match frame {
        Message::Text(text) => text.len(),
        Message::Binary(bytes) | Message::Ping(bytes) | Message::Pong(bytes) => bytes.len(),
        Message::Close(_) => 0,
    }
}

pub fn close_frame(code: u16, reason: &str) -> CloseFrame {
    CloseFrame {
        code,
        reason: reason.into(),
    }
}

/// Socket-level limits of a connection.
#[derive(Debug, Clone, Copy)]
pub struct SocketLimits {
    pub ping_interval: Duration,
}

/// Runs one accepted WebSocket until it closes: starts the writer, reads
/// messages into the room, and tells the room when the socket is gone.
///
/// The room has already accepted the connection (`on-connect` ran) when this
/// is called.
pub async fn serve(socket: WebSocket, handle: ConnectionHandle, room: RoomHandle, limits: SocketLimits) {
    let (sink, stream) = socket.split();
    let writer = tokio::spawn(write_loop(sink, handle.clone()));

    let (code, reason) = read_loop(stream, &handle, &room, limits).await;
    // The socket failed, rather than closed, when it ended with an error
    // code that the host did not choose.
    let failed = handle.host_close().is_none()
        && matches!(
            code,
            close_code::ABNORMAL | close_code::PROTOCOL_ERROR | close_code::INVALID_PAYLOAD | close_code::MESSAGE_TOO_BIG
        );

    // The reader is done: let the writer send what the room queued and the
    // close frame, but not wait forever on a client that stopped reading.
    handle.close(code, &reason);
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, handle.shared.writer_done.cancelled()).await;
    handle.shared.abort.cancel();
    let _ = writer.await;

    if failed {
        room.notify(RoomEvent::Error {
            conn: handle.id.clone(),
            serial: handle.serial,
            error: reason.clone(),
        })
        .await;
    }
    let (code, reason) = handle.host_close().unwrap_or((code, reason));
    room.notify(RoomEvent::Close {
        conn: handle.id.clone(),
        serial: handle.serial,
        code,
        reason,
    })
    .await;
}

/// Reads until the socket ends; returns the close code and reason to report.
async fn read_loop(
    mut stream: SplitStream<WebSocket>,
    handle: &ConnectionHandle,
    room: &RoomHandle,
    limits: SocketLimits,
) -> (u16, String) {
    let mut last_heard = Instant::now();
    let mut pinged = false;
    loop {
        let deadline = last_heard + limits.ping_interval * if pinged { 2 } else { 1 };
        let next = tokio::select! {
            _ = handle.shared.writer_done.cancelled() => {
                return handle.host_close().unwrap_or((close_code::ABNORMAL, "socket closed".into()));
            }
            next = tokio::time::timeout_at(deadline, stream.next()) => next,
        };

        let message = match next {
            Err(_elapsed) if pinged => {
                tracing::info!(room = %handle.shared.room, shard = crate::router::shard_number(&handle.shared.room), conn = %handle.id, "closing silent connection: no pong");
                return (close_code::ABNORMAL, "no answer to ping".into());
            }
            Err(_elapsed) => {
                pinged = true;
                handle.send(Message::Ping(Default::default()));
                continue;
            }
            Ok(None) => return (close_code::ABNORMAL, "connection lost".into()),
            Ok(Some(Err(err))) => return read_error_close(handle, err),
            Ok(Some(Ok(message))) => message,
        };

        last_heard = Instant::now();
        pinged = false;
        let message = match message {
            Message::Text(text) => crate::runtime::GuestMessage::Text(text.to_string()),
            Message::Binary(bytes) => crate::runtime::GuestMessage::Binary(bytes.to_vec()),
            Message::Ping(_) | Message::Pong(_) => continue,
            Message::Close(frame) => {
                let (code, reason) = frame.map_or((1005, String::new()), |f| (f.code, f.reason.to_string()));
                return (code, reason);
            }
        };
        let delivered = room
            .notify(RoomEvent::Message {
                conn: handle.id.clone(),
                serial: handle.serial,
                message,
            })
            .await;
        if !delivered {
            return (close_code::INTERNAL_ERROR, "room stopped".into());
        }
    }
}

/// Maps a read error to the close code the client gets.
fn read_error_close(handle: &ConnectionHandle, err: axum::Error) -> (u16, String) {
    use tungstenite::error::{CapacityError, Error};

    let err = err.into_inner();
    let (code, reason) = match err.downcast_ref::<Error>() {
        Some(Error::Capacity(CapacityError::MessageTooLong { .. })) => {
            (close_code::MESSAGE_TOO_BIG, "message too big")
        }
        Some(Error::Utf8(_)) => (close_code::INVALID_PAYLOAD, "text message is not valid UTF-8"),
        Some(Error::Protocol(tungstenite::error::ProtocolError::ResetWithoutClosingHandshake)) => {
            tracing::debug!(room = %handle.shared.room, conn = %handle.id, "peer left without a close frame");
            return (close_code::ABNORMAL, "connection lost".into());
        }
        Some(Error::Protocol(_)) => (close_code::PROTOCOL_ERROR, "WebSocket protocol error"),
        _ => {
            tracing::debug!(room = %handle.shared.room, shard = crate::router::shard_number(&handle.shared.room), conn = %handle.id, err = %err, "socket read failed");
            return (close_code::ABNORMAL, "connection lost".into());
        }
    };
    tracing::info!(room = %handle.shared.room, shard = crate::router::shard_number(&handle.shared.room), conn = %handle.id, code, err = %err, "closing connection: {reason}");
    (code, reason.to_string())
}

/// Writes queued frames until a close frame was sent or the socket failed.
async fn write_loop(mut sink: SplitSink<WebSocket, Message>, handle: ConnectionHandle) {
    let shared = &handle.shared;
    let mut frames = Vec::new();
    loop {
        let close = tokio::select! {
            close = handle.next_batch(&mut frames) => close,
            _ = shared.abort.cancelled() => handle.host_close().map(|(code, reason)| close_frame(code, &reason)),
        };

        let written = tokio::select! {
            result = write_frames(&mut sink, &mut frames) => result.is_ok(),
            _ = shared.abort.cancelled() => false,
        };
        frames.clear();

        if let Some(frame) = close {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                // 1005, 1006 and 1015 are reserved for reports and must not
                // be sent; such a close goes out without a code.
                let frame = (!matches!(frame.code, 1005 | 1006 | 1015)).then_some(frame);
                sink.send(Message::Close(frame)).await?;
                sink.close().await
            })
            .await;
            break;
        }
        if !written {
            break;
        }
    }
    shared.writer_done.cancel();
}

async fn write_frames(sink: &mut SplitSink<WebSocket, Message>, frames: &mut Vec<Message>) -> Result<(), axum::Error> {
    if frames.is_empty() {
        return Ok(());
    }
    for frame in frames.drain(..) {
        sink.feed(frame).await?;
    }
    sink.flush().await
}
