//! The registry of live rooms: every room actor of the process, by room id.
//!
//! A room is started on first use and removes itself when idle, so the
//! registry contains at most `--max-rooms` rooms. A request for a new room
//! past that is rejected with [`RoomsError::Full`]. Senders look a room up,
//! then put an event in its mailbox. A room that stopped in between is
//! replaced and the event delivered again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::config::Config;
use crate::guest::Services;
use crate::room::{self, CallFailure, RoomEvent, RoomHandle};
use crate::runtime::{GuestRequest, GuestResponse, Runtime};

/// Reason a room could not be reached.
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

/// Idle rooms asked to leave each time a new room finds the pool full.
const EVICTIONS_PER_MISS: usize = 8;

/// All live rooms of the process.
pub struct Rooms {
    runtime: Arc<Runtime>,
    /// Shard counts and the balancing policy of the router.
    pub config: Config,
    live: Mutex<HashMap<Arc<str>, RoomHandle>>,
    next_generation: AtomicU64,
    shutting_down: AtomicBool,
    /// Storage, alarms and environment, handed to every room.
    services: Services,
}

impl Rooms {
    pub fn new(runtime: Arc<Runtime>, config: Config, services: Services) -> Arc<Rooms> {
        Arc::new(Rooms {
            runtime,
            config,
            services,
            live: Mutex::new(HashMap::new()),
            next_generation: AtomicU64::new(1),
            shutting_down: AtomicBool::new(false),
        })
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    pub fn services(&self) -> &Services {
        &self.services
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
            // Ask a few rooms without connections to leave now, so that a
            // burst of short-lived rooms does not lock out new ones for the
            // whole idle timeout. The client retries after `Retry-After`.
            let idle = live.values().filter(|handle| {
                handle.stats.connections.load(Ordering::Relaxed) == 0 && handle.stats.joining.load(Ordering::Relaxed) == 0
            });
            for handle in idle.take(EVICTIONS_PER_MISS) {
                handle.try_notify(RoomEvent::Evict);
            }
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

    /// Sends an HTTP request to room `id` and waits for its response.
    /// `attempts` is how often the room calls its guest when calls trap.
    pub async fn request(self: &Arc<Self>, id: &str, request: GuestRequest, attempts: u32) -> Answered {
        match self.enqueue_request(id, request, attempts).await {
            Ok(answer) => answer.await.unwrap_or(Answered {
                result: Err(RequestError::Stopped),
                attempts: 0,
            }),
            Err(err) => Answered {
                result: Err(err),
                attempts: 0,
            },
        }
    }

    /// Puts an HTTP request in room `id`'s mailbox, waiting at most the call
    /// timeout while the mailbox is full, and returns the pending reply.
    pub async fn enqueue_request(
        self: &Arc<Self>,
        id: &str,
        request: GuestRequest,
        attempts: u32,
    ) -> Result<impl std::future::Future<Output = Result<Answered, oneshot::error::RecvError>>, RequestError> {
        let wait = self.runtime.limits().call_timeout();
        let mut pending = Some(request);
        for _ in 0..3 {
            let handle = self.get(id).map_err(RequestError::Rooms)?;
            let (reply, answer) = oneshot::channel();
            let event = RoomEvent::Request {
                request: pending.take().expect("request is pending"),
                attempts,
                reply,
            };
            match handle.notify_within(event, wait).await {
                Ok(()) => return Ok(answer),
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

    /// Stops accepting rooms, then asks every room to close its sockets
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

/// A room's response to an HTTP request, and the guest calls it took.
#[derive(Debug)]
pub struct Answered {
    pub result: Result<GuestResponse, RequestError>,
    /// Guest calls made: more than one when calls trapped and were retried.
    pub attempts: u32,
}

/// Reason an HTTP request to a room got no response from the guest.
#[derive(Debug, Clone)]
pub enum RequestError {
    Rooms(RoomsError),
    Call(CallFailure),
    /// The mailbox stayed full for the whole call timeout.
    MailboxFull,
    /// The room stopped before it responded.
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
            RequestError::Stopped => write!(f, "the room stopped before it responded; retry"),
        }
    }
}
