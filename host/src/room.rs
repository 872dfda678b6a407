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
//! need it get "unavailable".
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
use crate::native;
use crate::registry::{Answered, RequestError, Rooms};
use crate::router::ATTEMPT_HEADER;
use crate::alarm;
use crate::runtime::{self, GuestAdmission, GuestMessage, GuestRequest, GuestResponse, Party, Runtime};

/// First wait before restarting an instance that trapped in `on-start`.
const FIRST_RESTART_BACKOFF: Duration = Duration::from_millis(100);

/// Maximum wait between two restarts of an instance that keeps trapping in
/// `on-start`.
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(30);

/// An event in a room's mailbox.
pub enum RoomEvent {
    /// A WebSocket asks to join. The reply says whether `on-before-connect`
    /// and `on-connect` accepted it.
    Connect {
        handle: ConnectionHandle,
        request: GuestRequest,
        reply: oneshot::Sender<ConnectOutcome>,
    },
    /// A connection sent a message.
    Message { conn: Arc<str>, serial: u64, message: GuestMessage },
    /// A connection's socket is gone.
    Close { conn: Arc<str>, serial: u64, code: u16, reason: String },
    /// A connection's socket failed; its `Close` follows.
    Error { conn: Arc<str>, serial: u64, error: String },
    /// The room's alarm may be due.
    Alarm,
    /// A message a shard of the same logical room published.
    Publish { origin: Arc<str>, message: GuestMessage },
    /// An HTTP request for the room. A call that traps is made again, up to
    /// `attempts` calls in all, once the instance restarted.
    Request {
        request: GuestRequest,
        attempts: u32,
        reply: oneshot::Sender<Answered>,
    },
    /// The server is stopping: close every socket with 1001 and exit.
    Shutdown,
    /// The room pool is full: leave it now if the room has no connections,
    /// rather than after the idle timeout.
    Evict,
}

/// Outcome of a WebSocket's request to join a room.
#[derive(Debug)]
pub enum ConnectOutcome {
    /// `on-connect` ran, and the connection is in the room.
    Accepted,
    /// `on-before-connect` rejected the upgrade with this HTTP response.
    Refused(GuestResponse),
    /// The room failed to take the connection: the socket is closed with
    /// this code and reason right after the upgrade.
    Rejected(Rejection),
}

/// Rejection of a connection: the close code and reason it gets.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub code: u16,
    pub reason: String,
}

/// Reason a guest call returned no result.
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
    /// Handshakes sent to the room that it has not handled yet. The router
    /// counts them as load, so a burst of connects spreads over the shards.
    pub joining: AtomicUsize,
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

    /// Puts an event in the mailbox if it has room; returns whether it did.
    pub fn try_notify(&self, event: RoomEvent) -> bool {
        self.mailbox.try_send(event).is_ok()
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
    let (publishes, published) = mpsc::channel(crate::guest::MAX_PENDING_PUBLISHES);
    tokio::spawn(crate::router::forward_publishes(rooms.clone(), id.clone(), published));
    let actor = RoomActor {
        host: Some(RoomHost::new(id.clone(), publishes, rooms.services().clone())),
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
    BeforeConnect(GuestRequest),
    Connect(Arc<str>, GuestRequest),
    Message(Arc<str>, GuestMessage),
    Close(Arc<str>, u16, String),
    Error(Arc<str>, String),
    Alarm,
    Publish(Arc<str>, GuestMessage),
    BeforeRequest(GuestRequest),
    Request(GuestRequest),
}

impl Call {
    fn export(&self) -> &'static str {
        match self {
            Call::BeforeConnect(..) => "on-before-connect",
            Call::Connect(..) => "on-connect",
            Call::Message(..) => "on-message",
            Call::Close(..) => "on-close",
            Call::Error(..) => "on-error",
            Call::Alarm => "on-alarm",
            Call::Publish(..) => "on-publish",
            Call::BeforeRequest(..) => "on-before-request",
            Call::Request(..) => "on-request",
        }
    }

    fn connection(&self) -> Option<&str> {
        match self {
            Call::Connect(conn, _) | Call::Message(conn, _) | Call::Close(conn, ..) | Call::Error(conn, _) => {
                Some(conn)
            }
            Call::BeforeConnect(_) | Call::Alarm | Call::Publish(..) | Call::BeforeRequest(_) | Call::Request(_) => {
                None
            }
        }
    }
}

/// Return value of an export.
enum Output {
    /// The export returns nothing.
    Done,
    Response(GuestResponse),
    Admission(GuestAdmission),
    Tags(Vec<String>),
}

impl Output {
    fn into_response(self) -> GuestResponse {
        match self {
            Output::Response(response) => response,
            _ => unreachable!("on-request returns a response"),
        }
    }

    fn into_admission(self) -> GuestAdmission {
        match self {
            Output::Admission(admission) => admission,
            _ => unreachable!("on-before-connect and on-before-request return an admission"),
        }
    }

    fn into_tags(self) -> Vec<String> {
        match self {
            Output::Tags(tags) => tags,
            _ => unreachable!("on-connect returns tags"),
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
            let native = self.rooms.config.native_default_room;
            if !native && self.instance.is_none() && self.restart_at.is_some_and(|at| at <= Instant::now()) {
                // Failures are logged and counted inside. Events meanwhile
                // get "unavailable" until the backoff ends.
                let _ = self.start_instance().await;
            }

            let idle = self.host().connections.is_empty();
            let restart_at = self.restart_at.filter(|_| !native && self.instance.is_none());
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
                Some(RoomEvent::Evict) => {
                    if idle && self.rooms.remove_if_current(&self.id, self.generation) {
                        tracing::info!(room = %self.id, shard = crate::router::shard_number(&self.id),
                            "room evicted early: the room pool is full");
                        self.evict(mailbox).await;
                        return;
                    }
                }
                Some(event) => self.handle(event).await,
            }
            let open = self.host().connections.len();
            self.host().metrics.connections.set(open as f64);
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
                self.host().metrics.messages_in.increment(1);
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
                tracing::debug!(room = %self.id, shard = crate::router::shard_number(&self.id), conn = %conn, code, reason, "connection closed");
                let _ = self.call(Call::Close(conn, code, reason)).await;
            }
            RoomEvent::Error { conn, serial, error } => {
                if !self.is_current(&conn, serial) {
                    return;
                }
                tracing::debug!(room = %self.id, shard = crate::router::shard_number(&self.id), conn = %conn, error, "socket failed");
                let _ = self.call(Call::Error(conn, error)).await;
            }
            RoomEvent::Alarm => self.alarm().await,
            RoomEvent::Publish { origin, message } => {
                let _ = self.call(Call::Publish(origin, message)).await;
            }
            RoomEvent::Request { request, attempts, reply } => {
                let answered = self.request(request, attempts.max(1)).await;
                let _ = reply.send(answered);
            }
            RoomEvent::Shutdown | RoomEvent::Evict => unreachable!("handled by the event loop"),
        }
    }

    /// Calls `on-request`, again after a trap while attempts remain. The
    /// retry runs before the next event in the mailbox, so requests keep
    /// the order in which they arrived.
    async fn request(&mut self, request: GuestRequest, attempts: u32) -> Answered {
        let request = match self.before_request(request).await {
            Ok(request) => request,
            Err(result) => return Answered { result, attempts: 1 },
        };
        let call_timeout = self.runtime.limits().call_timeout();
        let mut attempt = 1;
        loop {
            let mut this_attempt = request.clone();
            this_attempt.headers.push((ATTEMPT_HEADER.to_string(), attempt.to_string()));
            let result = self.call(Call::Request(this_attempt)).await;
            let retry = match &result {
                Ok(_) => false,
                Err(CallFailure::Trap(_)) => true,
                // A restart that is near enough is worth waiting for.
                Err(CallFailure::Unavailable(_)) => {
                    self.restart_at.is_some_and(|at| at <= Instant::now() + call_timeout)
                }
            };
            if !retry || attempt >= attempts {
                let result = result.map(Output::into_response).map_err(RequestError::Call);
                return Answered { result, attempts: attempt };
            }
            attempt += 1;
            if let Some(at) = self.restart_at {
                tokio::time::sleep_until(at).await;
            }
            tracing::info!(room = %self.id, shard = crate::router::shard_number(&self.id), attempt, "retrying request after a failed call");
        }
    }

    /// Runs `on-before-request`. Returns the request to pass on, with the
    /// headers it added, or the answer that ends the request here.
    async fn before_request(
        &mut self,
        mut request: GuestRequest,
    ) -> Result<GuestRequest, Result<GuestResponse, RequestError>> {
        match self.call(Call::BeforeRequest(request.clone())).await.map(Output::into_admission) {
            Ok(GuestAdmission::Allow(headers)) => {
                add_headers(&mut request, headers);
                Ok(request)
            }
            Ok(GuestAdmission::Reject(response)) => {
                tracing::debug!(room = %self.id, shard = crate::router::shard_number(&self.id), status = response.status, "on-before-request rejected a request");
                Err(Ok(response))
            }
            Err(failure) => Err(Err(RequestError::Call(failure))),
        }
    }

    async fn connect(&mut self, handle: ConnectionHandle, mut request: GuestRequest, reply: oneshot::Sender<ConnectOutcome>) {
        self.stats.joining.fetch_sub(1, Ordering::Relaxed);
        let conn = handle.id.clone();

        // on-before-connect runs before the socket joins, so a client it
        // rejects never appears in the room, and an older socket with the
        // same id stays.
        match self.call(Call::BeforeConnect(request.clone())).await.map(Output::into_admission) {
            Ok(GuestAdmission::Allow(headers)) => add_headers(&mut request, headers),
            Ok(GuestAdmission::Reject(response)) => {
                tracing::info!(room = %self.id, shard = crate::router::shard_number(&self.id), conn = %conn, status = response.status,
                    "on-before-connect rejected a connection");
                let _ = reply.send(ConnectOutcome::Refused(response));
                return;
            }
            Err(failure) => {
                let _ = reply.send(ConnectOutcome::Rejected(failure.rejection()));
                return;
            }
        }

        if let Some(previous) = self.host_mut().connections.shift_remove(&*conn) {
            // A reconnecting client reuses its `_pk`: the newer socket wins.
            let reason = "replaced by a newer connection with the same id";
            previous.close(close_code::NORMAL, reason);
            self.stats.connections.fetch_sub(1, Ordering::Relaxed);
            let _ = self.call(Call::Close(conn.clone(), close_code::NORMAL, reason.into())).await;
        }

        self.host_mut().connections.insert(conn.clone(), handle.clone());
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        let result = self.call(Call::Connect(conn.clone(), request)).await;
        let tags = match result.map(|output| crate::guest::check_tags(output.into_tags())) {
            Ok(Ok(tags)) => tags,
            Ok(Err(message)) => {
                tracing::warn!(room = %self.id, shard = crate::router::shard_number(&self.id), conn = %conn, "connection rejected: {message}");
                self.remove_joining(&conn, handle.serial);
                let rejection = Rejection {
                    code: close_code::INTERNAL_ERROR,
                    reason: format!("room error: {message}"),
                };
                // on-connect ran and may have counted the connection in, so
                // the room hears that it left.
                let close = Call::Close(conn.clone(), rejection.code, rejection.reason.clone());
                let _ = self.call(close).await;
                let _ = reply.send(ConnectOutcome::Rejected(rejection));
                return;
            }
            Err(failure) => {
                self.remove_joining(&conn, handle.serial);
                let _ = reply.send(ConnectOutcome::Rejected(failure.rejection()));
                return;
            }
        };
        handle.set_tags(tags);
        let _ = reply.send(ConnectOutcome::Accepted);
    }

    /// Removes a connection that failed to join, unless a newer socket with
    /// the same id replaced it meanwhile.
    fn remove_joining(&mut self, conn: &str, serial: u64) {
        if self.is_current(conn, serial) {
            self.host_mut().connections.shift_remove(conn);
            self.stats.connections.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Runs `on-alarm` if the room's alarm is due, then deletes the alarm
    /// unless the guest set or deleted one during the call.
    async fn alarm(&mut self) {
        let services = self.host().services.clone();
        let now = alarm::now_ms();
        let retry_at = now + alarm::RETRY_DELAY.as_millis() as u64;
        let due = match services.storage.alarm(&self.id) {
            Ok(Some(at)) if at <= now => at,
            // Deleted, or moved later after the scheduler took it; a new
            // time is in the schedule.
            Ok(_) => return,
            Err(err) => {
                tracing::error!(room = %self.id, shard = crate::router::shard_number(&self.id), err = %err, "failed to read the alarm: trying again");
                services.alarms.schedule(&self.id, retry_at);
                return;
            }
        };
        tracing::info!(room = %self.id, shard = crate::router::shard_number(&self.id), late_ms = now - due, "alarm fired");

        self.host_mut().alarm_changed = false;
        match self.call(Call::Alarm).await {
            Ok(_) => {}
            Err(CallFailure::Unavailable(reason)) => {
                tracing::warn!(room = %self.id, shard = crate::router::shard_number(&self.id), reason, "alarm could not run: trying again");
                services.alarms.schedule(&self.id, retry_at);
                return;
            }
            // NOTE: an on-alarm that traps is not retried; its alarm is
            // deleted like one that ran, and the trap is logged by `call`.
            Err(CallFailure::Trap(_)) => {}
        }
        if self.host().alarm_changed {
            return;
        }
        if let Err(err) = services.storage.delete_alarm(&self.id) {
            tracing::error!(room = %self.id, shard = crate::router::shard_number(&self.id), err = %err, "failed to delete the alarm that fired");
        }
    }

    /// Closes a connection whose event the room could not handle.
    fn reject_connection(&mut self, conn: &str, failure: &CallFailure) {
        let rejection = failure.rejection();
        if let Some(handle) = self.host().connections.get(conn) {
            handle.close(rejection.code, &rejection.reason);
        }
    }

    /// Returns whether `conn` is open in this room as the socket with
    /// `serial`, and not as a newer socket that reused the id.
    fn is_current(&self, conn: &str, serial: u64) -> bool {
        self.host().connections.get(conn).is_some_and(|handle| handle.serial == serial)
    }

    /// Calls an export, starting an instance first if none runs. A trap
    /// drops the instance and schedules a restart.
    async fn call(&mut self, call: Call) -> Result<Output, CallFailure> {
        if self.rooms.config.native_default_room {
            return Ok(self.call_native(&call));
        }
        if self.instance.is_none() {
            self.start_instance().await?;
        }
        let export = call.export();
        let instance = self.instance.as_mut().expect("an instance runs after a start");
        arm_deadline(&mut instance.store, self.runtime.limits().call_timeout());

        let started = Instant::now();
        let store = &mut instance.store;
        let party = &instance.party;
        let result = match &call {
            Call::BeforeConnect(request) => {
                party.call_on_before_connect(store, request).await.map(Output::Admission)
            }
            Call::Connect(conn, request) => {
                party.call_on_connect(store, &conn.to_string(), request).await.map(Output::Tags)
            }
            Call::Message(conn, message) => {
                party.call_on_message(store, &conn.to_string(), message).await.map(|()| Output::Done)
            }
            Call::Close(conn, code, reason) => {
                party.call_on_close(store, &conn.to_string(), *code, reason).await.map(|()| Output::Done)
            }
            Call::Error(conn, error) => {
                party.call_on_error(store, &conn.to_string(), error).await.map(|()| Output::Done)
            }
            Call::Alarm => party.call_on_alarm(store).await.map(|()| Output::Done),
            Call::Publish(origin, message) => {
                party.call_on_publish(store, &origin.to_string(), message).await.map(|()| Output::Done)
            }
            Call::BeforeRequest(request) => {
                party.call_on_before_request(store, request).await.map(Output::Admission)
            }
            Call::Request(request) => party.call_on_request(store, request).await.map(Output::Response),
        };

        crate::metrics::guest_call(export, started.elapsed());
        match result {
            Ok(output) => Ok(output),
            Err(err) => {
                self.host().metrics.trap(export);
                let reason = self.trap_reason(&err);
                let conn = call.connection().map(tracing::field::display);
                tracing::error!(room = %self.id, shard = crate::router::shard_number(&self.id), export, conn, reason, "guest trapped");
                self.stats.traps.fetch_add(1, Ordering::Relaxed);
                self.drop_instance(Instant::now());
                Err(CallFailure::Trap(reason))
            }
        }
    }

    /// Runs a call on the native twin of the default room.
    fn call_native(&mut self, call: &Call) -> Output {
        let started = Instant::now();
        let host = self.host_mut();
        let output = match call {
            Call::BeforeConnect(_) | Call::BeforeRequest(_) => Output::Admission(native::admit()),
            Call::Connect(conn, _) => {
                native::on_connect(host, conn);
                Output::Tags(Vec::new())
            }
            Call::Request(request) => Output::Response(native::on_request(host, request)),
            Call::Publish(_, message) => {
                native::on_publish(host, message);
                Output::Done
            }
            Call::Message(..) | Call::Close(..) | Call::Error(..) | Call::Alarm => Output::Done,
        };
        crate::metrics::guest_call(call.export(), started.elapsed());
        output
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

        let mut host = self.host.take().expect("no instance runs, so the room keeps its data");
        host.reset_instance_state();
        let mut store = self.runtime.new_store(host);
        let party = match self.runtime.instantiate(&mut store).await {
            Ok(party) => party,
            Err(err) if runtime::is_pool_exhausted(&err) => {
                self.host = Some(store.into_data());
                self.restart_at = None;
                tracing::warn!(room = %self.id, shard = crate::router::shard_number(&self.id), err = %err, "instance pool is full: raise --max-rooms");
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
            store.data().metrics.restarts.increment(1);
            tracing::info!(room = %self.id, shard = crate::router::shard_number(&self.id), "instance restarted");
        }
        self.started_once = true;
        self.instance = Some(Instance { store, party });
        self.restart_at = None;
        self.backoff = FIRST_RESTART_BACKOFF;
        Ok(())
    }

    fn start_failed(&mut self, store: Store<RoomHost>, export: &'static str, reason: String) -> CallFailure {
        store.data().metrics.trap(export);
        tracing::error!(room = %self.id, shard = crate::router::shard_number(&self.id), export, reason, retry_in_ms = self.backoff.as_millis() as u64,
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
            (None, None) => unreachable!("a room always keeps its data"),
        }
    }

    fn host_mut(&mut self) -> &mut RoomHost {
        match (&mut self.instance, &mut self.host) {
            (Some(instance), _) => instance.store.data_mut(),
            (None, Some(host)) => host,
            (None, None) => unreachable!("a room always keeps its data"),
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
        tracing::debug!(room = %self.id, shard = crate::router::shard_number(&self.id), late_events = late.len(), "room idle: stopping its instance");
        self.host().metrics.connections.set(0.0);
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
            let reason = "server is shutting down".to_string();
            let _ = self.call(Call::Close(handle.id.clone(), close_code::GOING_AWAY, reason)).await;
        }
        self.host().metrics.connections.set(0.0);
        self.rooms.remove_if_current(&self.id, self.generation);
    }
}

/// Adds headers that `on-before-connect` or `on-before-request` returned to
/// `request`, each replacing the client's headers of the same name.
fn add_headers(request: &mut GuestRequest, headers: Vec<(String, String)>) {
    if headers.is_empty() {
        return;
    }
    let headers: Vec<(String, String)> =
        headers.into_iter().map(|(name, value)| (name.to_ascii_lowercase(), value)).collect();
    let replaced: std::collections::HashSet<&str> = headers.iter().map(|(name, _)| name.as_str()).collect();
    request.headers.retain(|(name, _)| !replaced.contains(name.to_ascii_lowercase().as_str()));
    request.headers.extend(headers.iter().cloned());
}

/// Gives the next guest call `timeout` of CPU time.
fn arm_deadline(store: &mut Store<RoomHost>, timeout: Duration) {
    store.data_mut().call_deadline = std::time::Instant::now() + timeout;
    store.set_epoch_deadline(1);
}
