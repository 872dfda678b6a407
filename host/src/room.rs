//! One room: an actor (a tokio task) that owns the room's wasmtime `Store`,
//! takes events off a bounded mailbox one at a time, and calls the guest.
//!
//! The actor is the only code that touches the store, so a room's exports
//! never run concurrently and need no locks. Connections belong to the host,
//! not to the instance: when a call traps, the poisoned store is dropped,
//! its data (the connections) moves into a fresh store, and a new instance
//! starts with `on-start`. Clients notice only that the guest's in-memory
//! state is gone. An instance that traps in `on-start` is retried with an
//! exponential backoff, capped at [`MAX_RESTART_BACKOFF`], while events that
//! need it are answered "unavailable".
//!
//! A room with no connections and no events for `--room-idle-timeout`
//! removes itself from the registry and frees its instance slot.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use wasmtime::Store;

use crate::connection::{close_code, ConnectionHandle};
use crate::guest::RoomHost;
use crate::router::Rooms;
use crate::runtime::{self, GuestMessage, GuestRequest, GuestResponse, Party, Runtime};

/// First wait before restarting an instance that trapped in `on-start`.
const FIRST_RESTART_BACKOFF: Duration = Duration::from_millis(100);

/// Longest wait between two restarts of an instance that keeps trapping in
/// `on-start`.
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(30);

/// An event in a room's mailbox.
pub enum RoomEvent {
    /// A WebSocket was upgraded and wants to join. The reply says whether
    /// `on-connect` accepted it.
    Connect {
        handle: ConnectionHandle,
        request: GuestRequest,
        reply: oneshot::Sender<Result<(), Rejection>>,
    },
    /// A connection sent a message.
    Message { conn: Arc<str>, serial: u64, message: GuestMessage },
    /// A connection's socket is gone.
    Close { conn: Arc<str>, serial: u64, code: u16, reason: String },
    /// An HTTP request for the room.
    Request {
        request: GuestRequest,
        reply: oneshot::Sender<Result<GuestResponse, CallFailure>>,
    },
    /// The server is stopping: close every socket with 1001 and exit.
    Shutdown,
}

/// Why a connection was not accepted: the close code and reason it gets.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub code: u16,
    pub reason: String,
}

/// Why a guest call did not return a result.
#[derive(Debug, Clone)]
pub enum CallFailure {
    /// The guest trapped: a panic, a call past its deadline, memory or stack
    /// exhaustion. The instance was dropped.
    Trap(String),
    /// No instance could run the call: the instance pool is full, or the
    /// room is waiting to restart an instance that keeps trapping.
    Unavailable(String),
}

impl CallFailure {
    fn rejection(&self) -> Rejection {
        match self {
            CallFailure::Trap(reason) => Rejection {
                code: close_code::INTERNAL_ERROR,
                reason: format!("room error: {reason}"),
            },
            CallFailure::Unavailable(reason) => Rejection {
                code: close_code::TRY_AGAIN_LATER,
                reason: reason.clone(),
            },
        }
    }
}

impl std::fmt::Display for CallFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallFailure::Trap(reason) => write!(f, "the room trapped: {reason}"),
            CallFailure::Unavailable(reason) => write!(f, "the room is unavailable: {reason}"),
        }
    }
}

/// Counters of one room, read by the router and the metrics.
#[derive(Debug, Default)]
pub struct RoomStats {
    /// Open connections.
    pub connections: AtomicUsize,
    /// Guest calls that trapped.
    pub traps: AtomicU64,
    /// Instances started after the first one.
    pub restarts: AtomicU64,
}

/// A sender's handle on a running room.
#[derive(Clone)]
pub struct RoomHandle {
    pub id: Arc<str>,
    /// Tells this room apart from a later room with the same id.
    pub generation: u64,
    pub stats: Arc<RoomStats>,
    mailbox: mpsc::Sender<RoomEvent>,
}

impl RoomHandle {
    /// Puts an event in the mailbox, waiting while it is full. Returns false
    /// when the room has stopped.
    pub async fn notify(&self, event: RoomEvent) -> bool {
        self.mailbox.send(event).await.is_ok()
    }

    /// Puts an event in the mailbox, waiting at most `timeout` while it is
    /// full. Returns the event when the room has stopped or the wait timed
    /// out, with `true` for a stopped room.
    pub async fn notify_within(&self, event: RoomEvent, timeout: Duration) -> Result<(), (RoomEvent, bool)> {
        match self.mailbox.send_timeout(event, timeout).await {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendTimeoutError::Closed(event)) => Err((event, true)),
            Err(mpsc::error::SendTimeoutError::Timeout(event)) => Err((event, false)),
        }
    }
}

/// Starts the actor for room `id` and returns its handle.
pub fn spawn(id: Arc<str>, generation: u64, runtime: Arc<Runtime>, rooms: Arc<Rooms>) -> RoomHandle {
    let limits = runtime.limits();
    let (sender, receiver) = mpsc::channel(limits.mailbox.max(1));
    let stats = Arc::new(RoomStats::default());
    let handle = RoomHandle {
        id: id.clone(),
        generation,
        stats: stats.clone(),
        mailbox: sender,
    };
    let actor = RoomActor {
        host: Some(RoomHost::new(id.clone())),
        instance: None,
        id,
        generation,
        runtime,
        rooms,
        stats,
        started_once: false,
        restart_at: Some(Instant::now()),
        backoff: FIRST_RESTART_BACKOFF,
    };
    tokio::spawn(actor.run(receiver));
    handle
}

/// A live instance of the room component.
struct Instance {
    store: Store<RoomHost>,
    party: Party,
}

/// A guest export call.
enum Call {
    Connect(Arc<str>, GuestRequest),
    Message(Arc<str>, GuestMessage),
    Close(Arc<str>),
    Request(GuestRequest),
}

impl Call {
    fn export(&self) -> &'static str {
        match self {
            Call::Connect(..) => "on-connect",
            Call::Message(..) => "on-message",
            Call::Close(..) => "on-close",
            Call::Request(..) => "on-request",
        }
    }

    fn connection(&self) -> Option<&str> {
        match self {
            Call::Connect(conn, _) | Call::Message(conn, _) | Call::Close(conn) => Some(conn),
            Call::Request(_) => None,
        }
    }
}

struct RoomActor {
    id: Arc<str>,
    generation: u64,
    runtime: Arc<Runtime>,
    rooms: Arc<Rooms>,
    stats: Arc<RoomStats>,
    /// The running instance, or `None` between a trap and the next start.
    instance: Option<Instance>,
    /// The store data while no instance runs. Exactly one of `instance` and
    /// `host` is `Some`.
    host: Option<RoomHost>,
    /// Whether an instance has started before, so the next start counts as
    /// a restart.
    started_once: bool,
    /// When to start the next instance, while none runs.
    restart_at: Option<Instant>,
    /// Wait before the next restart if this one traps in `on-start`.
    backoff: Duration,
}

impl RoomActor {
    async fn run(mut self, mut mailbox: mpsc::Receiver<RoomEvent>) {
        let idle_timeout = self.runtime.limits().room_idle_timeout();
        loop {
            if self.instance.is_none() && self.restart_at.is_some_and(|at| at <= Instant::now()) {
                // Failures are logged and counted inside; events meanwhile
                // are answered "unavailable" until the backoff ends.
                let _ = self.start_instance().await;
            }

            let idle = self.host().connections.is_empty();
            let restart_at = self.restart_at.filter(|_| self.instance.is_none());
            let event = tokio::select! {
                event = mailbox.recv() => event,
                _ = tokio::time::sleep(idle_timeout), if idle => {
                    if self.rooms.remove_if_current(&self.id, self.generation) {
                        self.evict(mailbox).await;
                        return;
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(restart_at.unwrap_or_else(Instant::now)), if restart_at.is_some() => continue,
            };

            match event {
                Some(RoomEvent::Shutdown) | None => break,
                Some(event) => self.handle(event).await,
            }
        }
        self.shut_down().await;
    }

    async fn handle(&mut self, event: RoomEvent) {
        match event {
            RoomEvent::Connect { handle, request, reply } => self.connect(handle, request, reply).await,
            RoomEvent::Message { conn, serial, message } => {
                if !self.is_current(&conn, serial) {
                    return;
                }
                if let Err(failure) = self.call(Call::Message(conn.clone(), message)).await {
                    self.reject_connection(&conn, &failure);
                }
            }
            RoomEvent::Close { conn, serial, code, reason } => {
                if !self.is_current(&conn, serial) {
                    return;
                }
                self.host_mut().connections.shift_remove(&*conn);
                self.stats.connections.fetch_sub(1, Ordering::Relaxed);
                tracing::debug!(room = %self.id, conn = %conn, code, reason, "connection closed");
                let _ = self.call(Call::Close(conn)).await;
            }
            RoomEvent::Request { request, reply } => {
                let result = self.call(Call::Request(request)).await.map(|output| {
                    output.expect("on-request returns a response")
                });
                let _ = reply.send(result);
            }
            RoomEvent::Shutdown => unreachable!("handled by the event loop"),
        }
    }

    async fn connect(
        &mut self,
        handle: ConnectionHandle,
        request: GuestRequest,
        reply: oneshot::Sender<Result<(), Rejection>>,
    ) {
        let conn = handle.id.clone();
        if let Some(previous) = self.host_mut().connections.shift_remove(&*conn) {
            // A reconnecting client reuses its `_pk`: the newer socket wins.
            previous.close(close_code::NORMAL, "replaced by a newer connection with the same id");
            self.stats.connections.fetch_sub(1, Ordering::Relaxed);
            let _ = self.call(Call::Close(conn.clone())).await;
        }

        self.host_mut().connections.insert(conn.clone(), handle.clone());
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        match self.call(Call::Connect(conn.clone(), request)).await {
            Ok(_) => {
                let _ = reply.send(Ok(()));
            }
            Err(failure) => {
                if self.is_current(&conn, handle.serial) {
                    self.host_mut().connections.shift_remove(&*conn);
                    self.stats.connections.fetch_sub(1, Ordering::Relaxed);
                }
                let _ = reply.send(Err(failure.rejection()));
            }
        }
    }

    /// Closes a connection whose event the room could not handle.
    fn reject_connection(&mut self, conn: &str, failure: &CallFailure) {
        let rejection = failure.rejection();
        if let Some(handle) = self.host().connections.get(conn) {
            handle.close(rejection.code, &rejection.reason);
        }
    }

    /// Whether `conn` is open in this room as the socket with `serial`, and
    /// not as a newer socket that reused the id.
    fn is_current(&self, conn: &str, serial: u64) -> bool {
        self.host().connections.get(conn).is_some_and(|handle| handle.serial == serial)
    }

    /// Calls an export, starting an instance first if none runs. A trap
    /// drops the instance and schedules a restart.
    async fn call(&mut self, call: Call) -> Result<Option<GuestResponse>, CallFailure> {
        if self.instance.is_none() {
            self.start_instance().await?;
        }
        let export = call.export();
        let instance = self.instance.as_mut().expect("an instance runs after a start");
        arm_deadline(&mut instance.store, self.runtime.limits().call_timeout());

        let store = &mut instance.store;
        let party = &instance.party;
        let result = match &call {
            Call::Connect(conn, request) => {
                party.call_on_connect(store, &conn.to_string(), request).await.map(|()| None)
            }
            Call::Message(conn, message) => {
                party.call_on_message(store, &conn.to_string(), message).await.map(|()| None)
            }
            Call::Close(conn) => party.call_on_close(store, &conn.to_string()).await.map(|()| None),
            Call::Request(request) => party.call_on_request(store, request).await.map(Some),
        };

        match result {
            Ok(output) => Ok(output),
            Err(err) => {
                let reason = self.trap_reason(&err);
                let conn = call.connection().map(tracing::field::display);
                tracing::error!(room = %self.id, export, conn, reason, "guest trapped");
                self.stats.traps.fetch_add(1, Ordering::Relaxed);
                self.drop_instance(Instant::now());
                Err(CallFailure::Trap(reason))
            }
        }
    }

    /// Starts an instance and runs `on-start`, unless a backoff is pending.
    async fn start_instance(&mut self) -> Result<(), CallFailure> {
        let now = Instant::now();
        if let Some(at) = self.restart_at.filter(|at| *at > now) {
            let wait = at - now;
            return Err(CallFailure::Unavailable(format!(
                "room is restarting after a trap in on-start; retry in {} ms",
                wait.as_millis().max(1)
            )));
        }

        let mut host = self.host.take().expect("no instance runs, so the room holds its data");
        host.reset_instance_state();
        let mut store = self.runtime.new_store(host);
        let party = match self.runtime.instantiate(&mut store).await {
            Ok(party) => party,
            Err(err) if runtime::is_pool_exhausted(&err) => {
                self.host = Some(store.into_data());
                self.restart_at = None;
                tracing::warn!(room = %self.id, err = %err, "instance pool is full: raise --max-rooms");
                return Err(CallFailure::Unavailable("instance pool is full".into()));
            }
            Err(err) => {
                let reason = self.trap_reason(&err);
                return Err(self.start_failed(store, "instantiate", reason));
            }
        };

        arm_deadline(&mut store, self.runtime.limits().call_timeout());
        if let Err(err) = party.call_on_start(&mut store).await {
            let reason = self.trap_reason(&err);
            return Err(self.start_failed(store, "on-start", reason));
        }

        if self.started_once {
            self.stats.restarts.fetch_add(1, Ordering::Relaxed);
            tracing::info!(room = %self.id, "instance restarted");
        }
        self.started_once = true;
        self.instance = Some(Instance { store, party });
        self.restart_at = None;
        self.backoff = FIRST_RESTART_BACKOFF;
        Ok(())
    }

    fn start_failed(&mut self, store: Store<RoomHost>, export: &str, reason: String) -> CallFailure {
        tracing::error!(room = %self.id, export, reason, retry_in_ms = self.backoff.as_millis() as u64,
            "guest trapped while starting");
        self.stats.traps.fetch_add(1, Ordering::Relaxed);
        self.host = Some(store.into_data());
        self.restart_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_RESTART_BACKOFF);
        CallFailure::Unavailable(format!("room failed to start: {reason}"))
    }

    /// Drops the running instance, keeping its data, and schedules the next
    /// start at `restart_at`.
    fn drop_instance(&mut self, restart_at: Instant) {
        if let Some(instance) = self.instance.take() {
            self.host = Some(instance.store.into_data());
        }
        self.restart_at = Some(restart_at);
    }

    /// Describes a failed call for logs and clients.
    fn trap_reason(&self, err: &wasmtime::Error) -> String {
        match err.downcast_ref::<wasmtime::Trap>() {
            Some(wasmtime::Trap::Interrupt) => format!(
                "call exceeded its {} ms deadline (--call-timeout)",
                self.runtime.limits().call_timeout().as_millis()
            ),
            Some(wasmtime::Trap::StackOverflow) => "stack overflow".into(),
            Some(trap) => trap.to_string(),
            None => format!("{err:#}"),
        }
    }

    fn host(&self) -> &RoomHost {
        match (&self.instance, &self.host) {
            (Some(instance), _) => instance.store.data(),
            (None, Some(host)) => host,
            (None, None) => unreachable!("a room always holds its data"),
        }
    }

    fn host_mut(&mut self) -> &mut RoomHost {
        match (&mut self.instance, &mut self.host) {
            (Some(instance), _) => instance.store.data_mut(),
            (None, Some(host)) => host,
            (None, None) => unreachable!("a room always holds its data"),
        }
    }

    /// Leaves the registry after an idle timeout. Events that reached the
    /// mailbox after the last check go to the room's next actor, in order.
    async fn evict(mut self, mut mailbox: mpsc::Receiver<RoomEvent>) {
        mailbox.close();
        let mut late = Vec::new();
        while let Ok(event) = mailbox.try_recv() {
            late.push(event);
        }
        tracing::debug!(room = %self.id, late_events = late.len(), "room idle: stopping its instance");
        self.instance = None;
        if late.is_empty() {
            return;
        }
        let rooms = self.rooms.clone();
        let id = self.id.clone();
        tokio::spawn(async move {
            for event in late {
                rooms.deliver(&id, event).await;
            }
        });
    }

    /// Closes every connection with 1001 and runs `on-close` for each.
    async fn shut_down(&mut self) {
        let connections: Vec<ConnectionHandle> = self.host_mut().connections.drain(..).map(|(_, h)| h).collect();
        for handle in &connections {
            handle.close(close_code::GOING_AWAY, "server is shutting down");
            self.stats.connections.fetch_sub(1, Ordering::Relaxed);
        }
        for handle in connections {
            if self.instance.is_none() {
                break;
            }
            let _ = self.call(Call::Close(handle.id.clone())).await;
        }
        self.rooms.remove_if_current(&self.id, self.generation);
    }
}

/// Gives the next guest call `timeout` of CPU time.
fn arm_deadline(store: &mut Store<RoomHost>, timeout: Duration) {
    store.data_mut().call_deadline = std::time::Instant::now() + timeout;
    store.set_epoch_deadline(1);
}
