//! The router in front of sharded rooms: shard choice, fan-out and
//! cross-shard publishing.
//!
//! A logical room `<room>` behind `/parties/router/<room>` is the set of
//! shard rooms `<room>-1` to `<room>-N`, N from `--shards` or
//! `--shards-for`. A WebSocket joins the shard [`Rooms::pick_shard`] chooses
//! under `--balance`. An HTTP request is fanned out to every shard. It gets a
//! request id (the `Idempotency-Key` header, or a UUID) and is put in every
//! shard's mailbox in the order the router accepted it. A shard whose call
//! trapped is called again, up to `--fanout-attempts` calls. A request whose
//! key was seen within `--idempotency-window` gets the first result. Messages a room publishes reach every shard of its logical room,
//! in the order they were published.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, Shared};
use futures_util::FutureExt;
use rand::Rng;
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Balance;
use crate::registry::{RequestError, Rooms};
use crate::room::RoomEvent;
use crate::runtime::{GuestMessage, GuestRequest};

/// Maximum length of a room id, in bytes.
pub const MAX_ROOM_ID_LEN: usize = 128;

/// Maximum length of a logical room id behind the router: room ids of its
/// shards add `-<k>`, at most 3 bytes for 64 shards.
pub const MAX_LOGICAL_ROOM_ID_LEN: usize = MAX_ROOM_ID_LEN - 3;

/// Header that carries a fanned-out request's id to each shard.
pub const REQUEST_ID_HEADER: &str = "x-partyhost-request-id";

/// Header with the number of the attempt at a fanned-out request that a
/// call is, starting at 1.
pub const ATTEMPT_HEADER: &str = "x-partyhost-attempt";

/// Maximum length of an `Idempotency-Key`, in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;

/// Keys the idempotency cache remembers at once. Past it, requests run
/// without deduplication until old keys expire.
const MAX_REMEMBERED_KEYS: usize = 100_000;

/// Locks that order the fan-outs of one logical room. Rooms share a lock
/// when their names hash alike, which costs only a short wait.
const SEQUENCER_STRIPES: usize = 64;

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
            id.escape_debug(),
            bad.escape_debug()
        ));
    }
    if id == "." || id == ".." {
        return Err(format!("room id `{id}` is invalid: it must not be `.` or `..`"));
    }
    Ok(())
}

/// Checks a logical room id behind the router: short enough that its shard
/// ids `<room>-<k>` are valid room ids too.
pub fn validate_logical_room_id(room: &str) -> Result<(), String> {
    if room.len() > MAX_LOGICAL_ROOM_ID_LEN {
        return Err(format!(
            "routed room id is {} bytes long: the limit is {MAX_LOGICAL_ROOM_ID_LEN}, so that shard ids              `<room>-<k>` stay within {MAX_ROOM_ID_LEN}",
            room.len()
        ));
    }
    Ok(())
}

/// Room id of shard `k` (1-based) of a logical room.
pub fn shard_id(room: &str, k: u32) -> String {
    format!("{room}-{k}")
}

/// Splits a room id `<room>-<k>` into the logical room and k.
pub fn split_shard_id(id: &str) -> Option<(&str, u32)> {
    let (room, suffix) = id.rsplit_once('-')?;
    if room.is_empty() || suffix.starts_with('0') {
        return None;
    }
    let k: u32 = suffix.parse().ok()?;
    Some((room, k))
}

/// Shard number of a room id, for the `shard` field of log lines; `None`
/// for a room that is not a shard.
pub fn shard_number(id: &str) -> Option<u32> {
    split_shard_id(id).map(|(_, k)| k)
}

/// Shard of connection id `conn` under `--balance sticky`. FNV's low bits
/// follow the low bits of the last bytes, so the hash goes through the
/// SplitMix64 finalizer before the modulo.
fn sticky_shard(conn: &str, shards: u32) -> u32 {
    let mut x = fnv_hash(conn);
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (x % u64::from(shards)) as u32 + 1
}

fn fnv_hash(value: &str) -> u64 {
    let mut hasher = fnv::FnvHasher::default();
    value.hash(&mut hasher);
    hasher.finish()
}

impl Rooms {
    /// Room ids of every shard of `room`'s logical room, `room` included,
    /// or just `room` when it is not a shard.
    pub fn siblings(&self, room: &str) -> Vec<String> {
        match split_shard_id(room) {
            Some((logical, k)) if k <= self.config.shards_for(logical) => {
                (1..=self.config.shards_for(logical)).map(|k| shard_id(logical, k)).collect()
            }
            _ => vec![room.to_string()],
        }
    }

    /// Open and joining connections of room `id`; 0 when it is not running.
    pub fn load(&self, id: &str) -> usize {
        self.find(id).map_or(0, |handle| {
            handle.stats.connections.load(std::sync::atomic::Ordering::Relaxed)
                + handle.stats.joining.load(std::sync::atomic::Ordering::Relaxed)
        })
    }

    /// Chooses the shard (1..=N) for a new WebSocket of logical room `room`
    /// whose connection id is `conn`.
    pub fn pick_shard(&self, room: &str, conn: &str) -> u32 {
        let shards = self.config.shards_for(room);
        match self.config.balance {
            Balance::Random => rand::rng().random_range(1..=shards),
            Balance::LeastConnections => (1..=shards)
                .min_by_key(|&k| (self.load(&shard_id(room, k)), k))
                .expect("a logical room has at least one shard"),
            Balance::PowerOfTwo => {
                let mut rng = rand::rng();
                let first = rng.random_range(1..=shards);
                let second = rng.random_range(1..=shards);
                if self.load(&shard_id(room, second)) < self.load(&shard_id(room, first)) {
                    second
                } else {
                    first
                }
            }
            Balance::Sticky => sticky_shard(conn, shards),
        }
    }
}

/// One shard's outcome in a fan-out.
#[derive(Debug, Clone, Serialize)]
pub struct ShardOutcome {
    pub room: String,
    pub status: u16,
    /// Guest calls made; more than 1 when calls trapped and were retried.
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The router's response to a fanned-out request.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FanOutSummary {
    pub room: String,
    pub request_id: String,
    pub shards: Vec<ShardOutcome>,
    /// Shards that did not respond with 2xx.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<String>,
}

/// Orders, bounds and deduplicates fanned-out requests. Cloning it is
/// cheap.
#[derive(Clone)]
pub struct Router {
    inner: Arc<RouterState>,
}

struct RouterState {
    sequencers: Vec<tokio::sync::Mutex<()>>,
    remembered: Mutex<HashMap<(String, String), Remembered>>,
    /// KiB of request bodies that fan-outs in flight hold, one copy per
    /// shard, bounded by `--max-fanout-bytes`.
    budget: Arc<Semaphore>,
    budget_kib: u32,
}

/// A fan-out's summary, awaited by the first request with a key and by its
/// repetitions.
type SharedSummary = Shared<BoxFuture<'static, FanOutSummary>>;

/// A request with an idempotency key, and its result once known.
struct Remembered {
    first_seen: Instant,
    /// Hash of the method and body, to catch a key reused for another
    /// request.
    fingerprint: u64,
    summary: SharedSummary,
}

/// Reason a fan-out did not run.
#[derive(Debug)]
pub enum FanOutError {
    /// The `Idempotency-Key` came back with a different request within the
    /// window.
    KeyReused,
    /// One copy of the body per shard is larger than `--max-fanout-bytes`.
    TooLarge { bytes: u64, max: u64 },
    /// Fan-outs in flight hold `--max-fanout-bytes` for the whole call
    /// timeout.
    Busy,
}

impl Router {
    /// Creates a router whose fan-outs in flight hold at most
    /// `max_fanout_bytes` of request bodies.
    pub fn new(max_fanout_bytes: u64) -> Router {
        let budget_kib = (max_fanout_bytes / 1024).clamp(1, u64::from(u32::MAX)) as u32;
        Router {
            inner: Arc::new(RouterState {
                sequencers: (0..SEQUENCER_STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
                remembered: Mutex::new(HashMap::new()),
                budget: Arc::new(Semaphore::new(budget_kib as usize)),
                budget_kib,
            }),
        }
    }

    /// Reserves the memory of a fan-out of `request` to `shards` shards,
    /// waiting up to `wait` for fan-outs in flight to release it.
    async fn reserve(&self, request: &GuestRequest, shards: u32, wait: Duration) -> Result<OwnedSemaphorePermit, FanOutError> {
        let bytes = (request.body.len() as u64).saturating_mul(u64::from(shards));
        let kib = bytes.div_ceil(1024).max(1);
        let max_kib = u64::from(self.inner.budget_kib);
        if kib > max_kib {
            return Err(FanOutError::TooLarge { bytes, max: max_kib * 1024 });
        }
        let reserved = self.inner.budget.clone().acquire_many_owned(kib as u32);
        match tokio::time::timeout(wait, reserved).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(FanOutError::Busy),
        }
    }
    /// Fans `request` out to every shard of `room` and returns the summary.
    ///
    /// The fan-out runs in its own task, so it reaches every shard even if
    /// the client goes away. With an idempotency key seen within the window,
    /// returns the first request's summary instead, waiting for it if it is
    /// still running. A summary with failed shards is forgotten once known,
    /// so that a retry runs again.
    pub async fn fan_out(
        &self,
        rooms: &Arc<Rooms>,
        room: &str,
        request: GuestRequest,
        idempotency_key: Option<String>,
    ) -> Result<FanOutSummary, FanOutError> {
        let shards = rooms.config.shards_for(room);
        let reserved = self.reserve(&request, shards, rooms.runtime().limits().call_timeout()).await?;
        let Some(key) = idempotency_key else {
            let request_id = uuid::Uuid::new_v4().to_string();
            return Ok(self.spawn(rooms, room, request, request_id, reserved).await);
        };
        let id = (room.to_string(), key.clone());
        let fingerprint = fingerprint(&request);
        let window = rooms.config.idempotency_window();

        let summary = {
            let mut remembered = self.inner.remembered.lock().expect("idempotency cache lock");
            match remembered.get(&id) {
                Some(entry) if entry.first_seen.elapsed() < window => {
                    if entry.fingerprint != fingerprint {
                        return Err(FanOutError::KeyReused);
                    }
                    entry.summary.clone()
                }
                _ => {
                    if remembered.len() >= MAX_REMEMBERED_KEYS {
                        remembered.retain(|_, entry| entry.first_seen.elapsed() < window);
                    }
                    let summary = self.spawn(rooms, room, request, key, reserved);
                    if remembered.len() < MAX_REMEMBERED_KEYS {
                        let entry = Remembered {
                            first_seen: Instant::now(),
                            fingerprint,
                            summary: summary.clone(),
                        };
                        remembered.insert(id.clone(), entry);
                    } else {
                        tracing::warn!(room = %room, max = MAX_REMEMBERED_KEYS,
                            "idempotency cache full: request runs without deduplication");
                    }
                    summary
                }
            }
        };

        let result = summary.clone().await;
        if !result.failed.is_empty() {
            let mut remembered = self.inner.remembered.lock().expect("idempotency cache lock");
            if remembered.get(&id).is_some_and(|entry| entry.summary.ptr_eq(&summary)) {
                remembered.remove(&id);
            }
        }
        Ok(result)
    }

    /// Starts a fan-out in its own task and returns its shared summary.
    fn spawn(
        &self,
        rooms: &Arc<Rooms>,
        room: &str,
        request: GuestRequest,
        request_id: String,
        reserved: OwnedSemaphorePermit,
    ) -> SharedSummary {
        let state = self.inner.clone();
        let rooms = rooms.clone();
        let room = room.to_string();
        let task = tokio::spawn({
            let room = room.clone();
            let request_id = request_id.clone();
            async move {
                let summary = fan_out_once(&state, &rooms, &room, request, request_id).await;
                drop(reserved);
                summary
            }
        });
        async move {
            task.await.unwrap_or_else(|err| {
                tracing::error!(room = %room, err = %err, "fan-out task failed");
                FanOutSummary {
                    failed: vec![room.clone()],
                    room,
                    request_id,
                    shards: Vec::new(),
                }
            })
        }
        .boxed()
        .shared()
    }
}

/// Hash of what makes two requests the same request.
fn fingerprint(request: &GuestRequest) -> u64 {
    let mut hasher = fnv::FnvHasher::default();
    request.method.hash(&mut hasher);
    request.body.hash(&mut hasher);
    hasher.finish()
}

/// Puts `request` in every shard's mailbox in the order the router accepted
/// it, then waits for every shard's response.
async fn fan_out_once(
    state: &RouterState,
    rooms: &Arc<Rooms>,
    room: &str,
    mut request: GuestRequest,
    request_id: String,
) -> FanOutSummary {
    let started = Instant::now();
    let shards = rooms.config.shards_for(room);
    let attempts = rooms.config.fanout_attempts;
    request.headers.retain(|(name, _)| name != REQUEST_ID_HEADER && name != ATTEMPT_HEADER);
    request.headers.push((REQUEST_ID_HEADER.to_string(), request_id.clone()));

    // Enqueue on every shard while holding the room's turn, so two
    // requests reach all shards in the same order.
    let mut pending = Vec::with_capacity(shards as usize);
    {
        let stripe = (fnv_hash(room) % SEQUENCER_STRIPES as u64) as usize;
        let _turn = state.sequencers[stripe].lock().await;
        for k in 1..=shards {
            let id = shard_id(room, k);
            let queued = rooms.enqueue_request(&id, request.clone(), attempts).await;
            pending.push((id, queued));
        }
    }

    let answers = pending.into_iter().map(|(id, queued)| async move {
        let answered = match queued {
            Ok(answer) => answer.await.map_err(|_| RequestError::Stopped),
            Err(err) => Err(err),
        };
        let (result, attempts) = match answered {
            Ok(answered) => (answered.result, answered.attempts),
            Err(err) => (Err(err), 0),
        };
        match result {
            Ok(response) => ShardOutcome {
                error: (!(200..300).contains(&response.status))
                    .then(|| format!("the room answered {}", response.status)),
                room: id,
                status: response.status,
                attempts,
            },
            Err(err) => {
                tracing::warn!(room = %room, shard = %id, attempts, err = %err, "fan-out to shard failed");
                ShardOutcome {
                    room: id,
                    status: err.status(),
                    attempts,
                    error: Some(err.to_string()),
                }
            }
        }
    });
    let outcomes = futures_util::future::join_all(answers).await;
    let failed = outcomes
        .iter()
        .filter(|outcome| outcome.error.is_some())
        .map(|outcome| outcome.room.clone())
        .collect();
    metrics::histogram!("partyhost_fanout_duration_seconds").record(started.elapsed().as_secs_f64());
    FanOutSummary {
        room: room.to_string(),
        request_id,
        shards: outcomes,
        failed,
    }
}

/// Delivers the messages room `origin` publishes to every shard of its
/// logical room, one message at a time, so each shard receives them in the
/// order they were published. Ends when the room drops its sender.
pub async fn forward_publishes(
    rooms: Arc<Rooms>,
    origin: Arc<str>,
    mut published: tokio::sync::mpsc::Receiver<GuestMessage>,
) {
    let siblings = rooms.siblings(&origin);
    while let Some(message) = published.recv().await {
        for sibling in &siblings {
            let event = RoomEvent::Publish {
                origin: origin.clone(),
                message: message.clone(),
            };
            if !rooms.deliver(sibling, event).await {
                tracing::warn!(room = %origin, shard = %sibling, "published message not delivered: the shard is unavailable");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_shard_id_accepts_only_shard_ids() {
        assert_eq!(split_shard_id("lobby-3"), Some(("lobby", 3)));
        assert_eq!(split_shard_id("a-b-12"), Some(("a-b", 12)));
        assert_eq!(split_shard_id("lobby"), None, "no suffix");
        assert_eq!(split_shard_id("lobby-0"), None, "shards count from 1");
        assert_eq!(split_shard_id("lobby-01"), None, "shard numbers have no leading zero");
        assert_eq!(split_shard_id("-3"), None, "empty logical room");
        assert_eq!(split_shard_id("lobby-x"), None, "suffix is not a number");
    }

    #[test]
    fn sticky_shard_spreads_similar_ids() {
        // Ids that differ only in a few low bits of their last bytes.
        let letters = ['a', 'e', 'i', 'm', 'q', 'u', 'y'];
        let mut counts = [0usize; 4];
        for first in letters {
            for second in letters {
                let id = format!("p{first}{second}");
                let shard = sticky_shard(&id, 4);
                assert_eq!(shard, sticky_shard(&id, 4), "the same id always lands on the same shard");
                counts[shard as usize - 1] += 1;
            }
        }
        assert!(counts.iter().all(|&n| n >= 5), "49 similar ids over 4 shards: {counts:?}");
    }

    #[test]
    fn validate_room_id_bounds() {
        assert!(validate_room_id(&"a".repeat(128)).is_ok());
        assert!(validate_room_id(&"a".repeat(129)).is_err(), "129 bytes is too long");
        assert!(validate_room_id("").is_err());
        assert!(validate_room_id("a b").is_err());
        assert!(validate_room_id("A-z_0.9").is_ok());
        assert!(validate_room_id("..").is_err(), "`..` is not a room id");
        assert!(validate_room_id(".").is_err(), "`.` is not a room id");
        assert!(validate_logical_room_id(&"r".repeat(125)).is_ok());
        assert!(validate_logical_room_id(&"r".repeat(126)).is_err(), "shard ids would pass 128 bytes");
    }
}
