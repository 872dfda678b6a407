//! The host side of the room contract: the data each room's `Store` carries,
//! and the host functions (`broadcast`, `send`, `close`, ...) a guest calls.
//!
//! Every host function acts on the calling room's own connections and never
//! blocks: a message is queued on each connection's outbound queue, and a
//! connection whose queue is full is closed as a slow consumer instead of
//! slowing the room down. Guest output on stdout and stderr goes to the log,
//! one event per line, tagged with the room id.
//!
//! Connection state and tags live in each [`ConnectionHandle`], so they
//! survive an instance restart with the connections. Storage and alarm
//! functions are implemented next to the database, in [`crate::storage`].

use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::Message;
use indexmap::IndexMap;
use tokio::sync::mpsc;
use wasmtime_wasi::{ResourceTable, WasiCtx, WasiCtxView, WasiView};

use crate::connection::{frame_payload_len, ConnectionHandle};
use crate::metrics::RoomMetrics;
use crate::alarm::Alarms;
use crate::config::Config;
use crate::env::Environment;
use crate::guest_log::{GuestLog, Level};
use crate::runtime::bindings::partyhost::room::{connection, env, room, types};
use crate::storage::Storage;
use crate::runtime::GuestMessage;

/// Published messages one room may have waiting for delivery to its sibling
/// shards. A room that publishes faster than its siblings handle the
/// messages gets an error from `publish` past it.
pub const MAX_PENDING_PUBLISHES: usize = 1024;

/// Longest close reason the WebSocket protocol allows, in bytes.
const MAX_CLOSE_REASON: usize = 123;

/// Maximum size of one connection's state, in bytes (2 KiB).
pub const MAX_STATE_BYTES: usize = 2048;

/// Maximum number of tags of one connection.
pub const MAX_TAGS: usize = 10;

/// Maximum tag length, in bytes.
pub const MAX_TAG_BYTES: usize = 256;

/// Process-wide services behind the host functions, shared by every room.
#[derive(Clone)]
pub struct Services {
    /// Durable key-value storage and alarm times of every room.
    pub storage: Arc<Storage>,
    /// The schedule that fires alarms.
    pub alarms: Arc<Alarms>,
    /// Variables from `--var` and `--env-file`.
    pub env: Arc<Environment>,
}

impl Services {
    /// Opens the storage in `--data-dir`, loads its alarms and reads the
    /// environment.
    pub fn open(config: &Config) -> anyhow::Result<Services> {
        let env = Environment::load(config.env_file.as_deref(), &config.vars)?;
        let storage = Storage::open(&config.data_dir)?;
        let alarms = Alarms::load(&storage)?;
        tracing::info!(path = %storage.path.display(), alarms = alarms.len(), env_vars = env.len(),
            "storage opened");
        Ok(Services {
            storage: Arc::new(storage),
            alarms,
            env: Arc::new(env),
        })
    }
}

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
    /// Handles of the room's metrics.
    pub metrics: RoomMetrics,
    /// Messages this room published, on their way to the shards of its
    /// logical room. Bounded by [`MAX_PENDING_PUBLISHES`].
    publishes: mpsc::Sender<GuestMessage>,
    /// Storage, alarms and environment.
    pub services: Services,
    /// Set when the guest sets or deletes its alarm, so the room can tell
    /// whether `on-alarm` replaced the alarm that fired.
    pub alarm_changed: bool,
    wasi: WasiCtx,
    /// The room's log, for the `log` host function and guest output.
    log: GuestLog,
    table: ResourceTable,
}

impl RoomHost {
    /// Creates the data of room `room`, whose published messages go to
    /// `publishes`.
    pub fn new(room: Arc<str>, publishes: mpsc::Sender<GuestMessage>, services: Services) -> RoomHost {
        let log = GuestLog::new(room.clone());
        RoomHost {
            wasi: log.wasi(),
            log,
            metrics: RoomMetrics::new(&room),
            room,
            connections: IndexMap::new(),
            call_deadline: Instant::now(),
            publishes,
            services,
            alarm_changed: false,
            table: ResourceTable::new(),
        }
    }

    /// Clears what belonged to the dropped instance (WASI state, resources)
    /// and keeps the connections.
    pub fn reset_instance_state(&mut self) {
        self.wasi = self.log.wasi();
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
        let size = frame_payload_len(&frame) as u64;
        let mut sent = 0;
        for (id, connection) in &self.connections {
            if without.iter().any(|excluded| excluded.as_str() == &**id) {
                continue;
            }
            if connection.send(frame.clone()) {
                sent += 1;
            }
        }
        self.metrics.messages_out.increment(sent);
        self.metrics.bytes_out.increment(sent * size);
    }

    fn send(&mut self, connection: String, message: GuestMessage) -> bool {
        let Some(handle) = self.connections.get(connection.as_str()) else {
            return false;
        };
        let frame = to_frame(message);
        let size = frame_payload_len(&frame) as u64;
        let sent = handle.send(frame);
        if sent {
            self.metrics.messages_out.increment(1);
            self.metrics.bytes_out.increment(size);
        }
        sent
    }

    fn close(&mut self, connection: String, code: u16, reason: String) -> bool {
        if code != 1000 && !(3000..=4999).contains(&code) {
            tracing::warn!(room = %self.room, shard = crate::router::shard_number(&self.room), conn = %connection, code,
                "guest asked to close a connection with an invalid code: use 1000 or 3000-4999");
            return false;
        }
        let Some(handle) = self.connections.get(connection.as_str()) else {
            return false;
        };
        handle.close(code, truncate(&reason, MAX_CLOSE_REASON));
        true
    }

    fn publish(&mut self, message: GuestMessage) -> Result<(), String> {
        match self.publishes.try_send(message) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(room = %self.room, shard = crate::router::shard_number(&self.room), max = MAX_PENDING_PUBLISHES, "publish rejected: too many messages waiting");
                Err(format!(
                    "{MAX_PENDING_PUBLISHES} published messages are still waiting for delivery; publish less often"
                ))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err("the room is stopping".into()),
        }
    }

    fn connections(&mut self) -> Vec<String> {
        self.connections.keys().map(|id| id.to_string()).collect()
    }

    fn log(&mut self, level: room::LogLevel, message: String) {
        let level = match level {
            room::LogLevel::Trace => Level::Trace,
            room::LogLevel::Debug => Level::Debug,
            room::LogLevel::Info => Level::Info,
            room::LogLevel::Warn => Level::Warn,
            room::LogLevel::Error => Level::Error,
        };
        self.log.write(level, None, &message);
    }
}

impl connection::Host for RoomHost {
    fn set_state(&mut self, connection: String, state: Option<Vec<u8>>) -> Result<(), String> {
        if let Some(state) = &state {
            if state.len() > MAX_STATE_BYTES {
                return Err(format!(
                    "state of connection `{}` is {} bytes: the limit is {MAX_STATE_BYTES}",
                    connection.escape_default(),
                    state.len()
                ));
            }
        }
        let Some(handle) = self.connections.get(connection.as_str()) else {
            return Err(format!("connection `{}` is not open in this room", connection.escape_default()));
        };
        handle.set_state(state);
        Ok(())
    }

    fn state(&mut self, connection: String) -> Option<Vec<u8>> {
        self.connections.get(connection.as_str())?.state()
    }

    fn tags(&mut self, connection: String) -> Vec<String> {
        self.connections.get(connection.as_str()).map(|handle| handle.tags()).unwrap_or_default()
    }

    fn tagged(&mut self, tag: String) -> Vec<String> {
        self.connections
            .iter()
            .filter(|(_, handle)| handle.has_tag(&tag))
            .map(|(id, _)| id.to_string())
            .collect()
    }

    fn broadcast_tagged(&mut self, message: GuestMessage, tag: String, without: Vec<String>) {
        let frame = to_frame(message);
        for (id, handle) in &self.connections {
            if !handle.has_tag(&tag) || without.iter().any(|excluded| excluded.as_str() == &**id) {
                continue;
            }
            handle.send(frame.clone());
        }
    }
}

impl env::Host for RoomHost {
    fn get(&mut self, key: String) -> Option<String> {
        self.services.env.get(&key).map(str::to_string)
    }
}

/// Checks the tags `on-connect` returned: at most [`MAX_TAGS`], each 1 to
/// [`MAX_TAG_BYTES`] bytes. Returns them in order without duplicates.
pub fn check_tags(returned: Vec<String>) -> Result<Vec<String>, String> {
    if returned.len() > MAX_TAGS {
        return Err(format!("on-connect returned {} tags: the limit is {MAX_TAGS}", returned.len()));
    }
    let mut tags: Vec<String> = Vec::with_capacity(returned.len());
    for tag in returned {
        if !tags.contains(&tag) {
            tags.push(tag);
        }
    }
    if let Some(tag) = tags.iter().find(|tag| tag.is_empty() || tag.len() > MAX_TAG_BYTES) {
        return Err(format!(
            "on-connect returned a tag of {} bytes: tags are 1 to {MAX_TAG_BYTES} bytes",
            tag.len()
        ));
    }
    Ok(tags)
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
