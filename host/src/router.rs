//! The registry of live rooms and the router in front of sharded rooms.
//!
//! A room is started on first use and removes itself when idle. A logical
//! room `<room>` behind `/parties/router/<room>` is the set of shard rooms
//! `<room>-1` to `<room>-N`: a WebSocket is assigned to one shard by
//! [`pick_shard`], and an HTTP request is fanned out to every shard. The
//! fan-out waits for all shards and reports each one's status.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::room::{self, CallFailure, RoomEvent, RoomHandle};
use crate::runtime::{GuestRequest, GuestResponse, Runtime};

/// Longest room id, in bytes.
pub const MAX_ROOM_ID_LEN: usize = 128;

/// Checks a room id from a URL: 1 to 128 bytes of `[A-Za-z0-9._-]`.
pub fn validate_room_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("room id is empty: use /parties/<party>/<room>".into());
    }
    if id.len() > MAX_ROOM_ID_LEN {
        return Err(format!(
            "room id is {} bytes long: the limit is {MAX_ROOM_ID_LEN}",
            id.len()
        ));
    }
    if let Some(bad) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!(
            "room id `{}` is invalid: `{}` is not allowed; use letters, digits, `.`, `_` or `-`",
            id.escape_default(),
            bad.escape_default()
        ));
    }
    Ok(())
}

/// Room id of shard `k` (1-based) of a logical room.
pub fn shard_id(room: &str, k: u32) -> String {
    format!("{room}-{k}")
}

/// Picks the shard (1..=shards) for a new WebSocket of a logical room.
pub fn pick_shard(shards: u32) -> u32 {
    rand::rng().random_range(1..=shards)
}

/// Why a room could not be reached.
#[derive(Debug, Clone)]
pub enum RoomsError {
    /// `--max-rooms` rooms are already running.
    Full(u32),
    /// The server is shutting down.
    ShuttingDown,
}

impl std::fmt::Display for RoomsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RoomsError::Full(max) => write!(f, "the server runs its maximum of {max} rooms (--max-rooms)"),
            RoomsError::ShuttingDown => write!(f, "the server is shutting down"),
        }
    }
}

/// All live rooms of the process.
pub struct Rooms {
    runtime: Arc<Runtime>,
    live: Mutex<HashMap<Arc<str>, RoomHandle>>,
    next_generation: AtomicU64,
    shutting_down: AtomicBool,
}

impl Rooms {
    pub fn new(runtime: Arc<Runtime>) -> Arc<Rooms> {
        Arc::new(Rooms {
            runtime,
            live: Mutex::new(HashMap::new()),
            next_generation: AtomicU64::new(1),
            shutting_down: AtomicBool::new(false),
        })
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Returns the room `id`, starting it if it is not running.
    pub fn get(self: &Arc<Self>, id: &str) -> Result<RoomHandle, RoomsError> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(RoomsError::ShuttingDown);
        }
        let mut live = self.live.lock().expect("room registry lock");
        if let Some(handle) = live.get(id) {
            return Ok(handle.clone());
        }
        let max_rooms = self.runtime.limits().max_rooms;
        if live.len() >= max_rooms as usize {
            return Err(RoomsError::Full(max_rooms));
        }
        let id: Arc<str> = id.into();
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let handle = room::spawn(id.clone(), generation, self.runtime.clone(), self.clone());
        live.insert(id, handle.clone());
        Ok(handle)
    }

    /// Returns the room `id` if it is running, without starting it.
    pub fn find(&self, id: &str) -> Option<RoomHandle> {
        self.live.lock().expect("room registry lock").get(id).cloned()
    }

    /// Removes room `id` from the registry if it is still the room of
    /// `generation`. Returns whether it was removed.
    pub fn remove_if_current(&self, id: &str, generation: u64) -> bool {
        let mut live = self.live.lock().expect("room registry lock");
        if live.get(id).is_some_and(|handle| handle.generation == generation) {
            live.remove(id);
            return true;
        }
        false
    }

    /// Delivers an event to room `id`, starting the room if needed and
    /// retrying once if the room stopped between lookup and delivery.
    /// Returns false when no room could take it.
    pub async fn deliver(self: &Arc<Self>, id: &str, mut event: RoomEvent) -> bool {
        for _ in 0..3 {
            let Ok(handle) = self.get(id) else {
                return false;
            };
            match handle.notify_within(event, Duration::MAX).await {
                Ok(()) => return true,
                Err((returned, _)) => {
                    self.remove_if_current(id, handle.generation);
                    event = returned;
                }
            }
        }
        tracing::warn!(room = id, "event lost: the room kept stopping while it was delivered");
        false
    }

    /// Sends an HTTP request to room `id` and waits for its response. The
    /// mailbox wait is bounded by the call timeout.
    pub async fn request(self: &Arc<Self>, id: &str, request: GuestRequest) -> Result<GuestResponse, RequestError> {
        let wait = self.runtime.limits().call_timeout();
        let mut pending = Some(request);
        for _ in 0..3 {
            let handle = self.get(id).map_err(RequestError::Rooms)?;
            let (reply, response) = oneshot::channel();
            let event = RoomEvent::Request {
                request: pending.take().expect("request is pending"),
                reply,
            };
            match handle.notify_within(event, wait).await {
                Ok(()) => {
                    return match response.await {
                        Ok(result) => result.map_err(RequestError::Call),
                        Err(_) => Err(RequestError::Stopped),
                    };
                }
                Err((RoomEvent::Request { request, .. }, stopped)) => {
                    if !stopped {
                        return Err(RequestError::MailboxFull);
                    }
                    self.remove_if_current(id, handle.generation);
                    pending = Some(request);
                }
                Err(_) => unreachable!("the mailbox returns the event it was given"),
            }
        }
        Err(RequestError::Stopped)
    }

    /// Stops accepting rooms, then tells every room to close its sockets
    /// and waits until all have stopped or `deadline` passed.
    pub async fn shutdown(&self, deadline: Duration) {
        self.shutting_down.store(true, Ordering::Release);
        let rooms: Vec<RoomHandle> = self.live.lock().expect("room registry lock").values().cloned().collect();
        for handle in &rooms {
            handle.notify_within(RoomEvent::Shutdown, deadline).await.ok();
        }
        let drained = async {
            while !self.live.lock().expect("room registry lock").is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        if tokio::time::timeout(deadline, drained).await.is_err() {
            tracing::warn!("some rooms did not stop before the shutdown deadline");
        }
    }

    /// Number of live rooms.
    pub fn len(&self) -> usize {
        self.live.lock().expect("room registry lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why an HTTP request to a room got no response from the guest.
#[derive(Debug, Clone)]
pub enum RequestError {
    Rooms(RoomsError),
    Call(CallFailure),
    /// The mailbox stayed full for the whole call timeout.
    MailboxFull,
    /// The room stopped before it answered.
    Stopped,
}

impl RequestError {
    /// HTTP status for this failure.
    pub fn status(&self) -> u16 {
        match self {
            RequestError::Call(CallFailure::Trap(_)) => 500,
            RequestError::Rooms(_) | RequestError::Call(CallFailure::Unavailable(_)) | RequestError::MailboxFull => 503,
            RequestError::Stopped => 503,
        }
    }
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestError::Rooms(err) => err.fmt(f),
            RequestError::Call(failure) => failure.fmt(f),
            RequestError::MailboxFull => write!(f, "the room's mailbox is full (--mailbox); retry later"),
            RequestError::Stopped => write!(f, "the room stopped before it answered"),
        }
    }
}

/// One shard's outcome in a fan-out.
#[derive(Debug, Clone, Serialize)]
pub struct ShardOutcome {
    pub room: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The router's answer to a fanned-out request.
#[derive(Debug, Clone, Serialize)]
pub struct FanOutSummary {
    pub room: String,
    pub shards: Vec<ShardOutcome>,
    /// Shards that did not answer 2xx.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<String>,
}

/// Sends `request` to every shard of logical room `room` at once and waits
/// for all of them.
pub async fn fan_out(rooms: &Arc<Rooms>, room: &str, shards: u32, request: GuestRequest) -> FanOutSummary {
    let calls = (1..=shards).map(|k| {
        let id = shard_id(room, k);
        let request = request.clone();
        async move {
            match rooms.request(&id, request).await {
                Ok(response) => ShardOutcome {
                    error: (!(200..300).contains(&response.status)).then(|| {
                        format!("the room answered {}", response.status)
                    }),
                    room: id,
                    status: response.status,
                },
                Err(err) => {
                    tracing::warn!(room = %room, shard = %id, err = %err, "fan-out to shard failed");
                    ShardOutcome {
                        room: id,
                        status: err.status(),
                        error: Some(err.to_string()),
                    }
                }
            }
        }
    });
    let outcomes = futures_util::future::join_all(calls).await;
    let failed = outcomes
        .iter()
        .filter(|outcome| outcome.error.is_some())
        .map(|outcome| outcome.room.clone())
        .collect();
    FanOutSummary {
        room: room.to_string(),
        shards: outcomes,
        failed,
    }
}
