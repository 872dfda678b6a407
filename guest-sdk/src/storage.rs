//! Durable key-value storage of this room, and its alarm.
//!
//! The host keeps the storage in SQLite on disk: a call that returned has
//! been written, and the data survives restarts of the instance and of the
//! host. Each room has its own keys; two shards of one logical room do not
//! share them. Bounds, checked by the host, which returns an [`Error`]
//! naming the value past them:
//!
//! - a key is 1 to [`MAX_KEY_BYTES`] bytes;
//! - a value is at most [`MAX_VALUE_BYTES`] (128 KiB);
//! - a [`Batch`] holds at most [`MAX_BATCH_WRITES`] puts and deletes;
//! - a [`list`] returns at most [`MAX_LIST_ENTRIES`] entries and 16 MiB.
//!
//! ```no_run
//! use partyhost_sdk::storage;
//!
//! # fn count() -> Result<u64, partyhost_sdk::Error> {
//! let count: u64 = storage::get_json("count")?.unwrap_or(0) + 1;
//! storage::put_json("count", &count)?;
//! // Run `Room::on_alarm` in a minute, even if the room is idle by then.
//! storage::set_alarm_after(std::time::Duration::from_secs(60))?;
//! # Ok(count)
//! # }
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::__bindings::partyhost::room::storage as host;
use crate::Error;

/// Maximum key length, in bytes.
pub const MAX_KEY_BYTES: usize = 2048;

/// Maximum value size, in bytes.
pub const MAX_VALUE_BYTES: usize = 128 << 10;

/// Maximum number of puts and deletes in one [`Batch`].
pub const MAX_BATCH_WRITES: usize = 128;

/// Maximum number of entries one [`list`] returns.
pub const MAX_LIST_ENTRIES: u32 = 1000;

/// Returns the value of `key`, or `None` when it is not set.
pub fn get(key: &str) -> Result<Option<Vec<u8>>, Error> {
    Ok(host::get(key)?)
}

/// Returns the value of `key` parsed as JSON, or `None` when it is not set.
pub fn get_json<T: serde::de::DeserializeOwned>(key: &str) -> Result<Option<T>, Error> {
    match get(key)? {
        Some(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
        None => Ok(None),
    }
}

/// Stores `value` under `key`, replacing any previous value.
pub fn put(key: &str, value: impl AsRef<[u8]>) -> Result<(), Error> {
    Ok(host::put(key, value.as_ref())?)
}

/// Stores `value`, serialised as JSON, under `key`.
pub fn put_json(key: &str, value: &impl serde::Serialize) -> Result<(), Error> {
    put(key, serde_json::to_vec(value)?)
}

/// Deletes `key`. Returns whether it was set.
pub fn delete(key: &str) -> Result<bool, Error> {
    Ok(host::delete(key)?)
}

/// Selection of [`list`]. The default selects the first
/// [`MAX_LIST_ENTRIES`] keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListOptions<'a> {
    /// Only keys that start with this.
    pub prefix: Option<&'a str>,
    /// Only keys that sort at or after this; pass the key after the last
    /// one returned to read the next page.
    pub start: Option<&'a str>,
    /// At most this many entries, up to [`MAX_LIST_ENTRIES`].
    pub limit: Option<u32>,
}

/// Returns the entries `options` selects as key and value pairs, in
/// ascending byte order of their keys.
pub fn list(options: ListOptions<'_>) -> Result<Vec<(String, Vec<u8>)>, Error> {
    let options = host::ListOptions {
        prefix: options.prefix.map(str::to_string),
        start: options.start.map(str::to_string),
        limit: options.limit,
    };
    let entries = host::list(&options)?;
    Ok(entries.into_iter().map(|entry| (entry.key, entry.value)).collect())
}

/// Puts and deletes that [`Batch::commit`] applies all at once, or not at
/// all.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    writes: Vec<host::Write>,
}

impl Batch {
    /// Creates an empty batch.
    pub fn new() -> Self {
        Batch::default()
    }

    /// Adds a put of `value` under `key`.
    pub fn put(mut self, key: &str, value: impl Into<Vec<u8>>) -> Self {
        self.writes.push(host::Write::Put(host::Entry {
            key: key.to_string(),
            value: value.into(),
        }));
        self
    }

    /// Adds a put of `value`, serialised as JSON, under `key`.
    pub fn put_json(self, key: &str, value: &impl serde::Serialize) -> Result<Self, Error> {
        Ok(self.put(key, serde_json::to_vec(value)?))
    }

    /// Adds a delete of `key`.
    pub fn delete(mut self, key: &str) -> Self {
        self.writes.push(host::Write::Delete(key.to_string()));
        self
    }

    /// Applies the writes in the order they were added. When one is past a
    /// bound, none is applied.
    pub fn commit(self) -> Result<(), Error> {
        Ok(host::batch(&self.writes)?)
    }
}

/// Returns the current time in milliseconds since the Unix epoch, the unit
/// of alarm times.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// Sets the room's one alarm to `time_ms`, in milliseconds since the Unix
/// epoch, replacing any previous alarm. At that time the host calls
/// [`Room::on_alarm`](crate::Room::on_alarm), starting the room if it is
/// not running. A time in the past fires at once.
pub fn set_alarm(time_ms: u64) -> Result<(), Error> {
    Ok(host::set_alarm(time_ms)?)
}

/// Sets the room's alarm to `delay` from now.
pub fn set_alarm_after(delay: Duration) -> Result<(), Error> {
    set_alarm(now_ms().saturating_add(delay.as_millis() as u64))
}

/// Returns the time of the room's alarm, or `None` when none is set.
pub fn alarm() -> Result<Option<u64>, Error> {
    Ok(host::alarm()?)
}

/// Deletes the room's alarm.
pub fn delete_alarm() -> Result<(), Error> {
    Ok(host::delete_alarm()?)
}
