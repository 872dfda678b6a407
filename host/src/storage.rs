//! Durable storage of rooms: a key-value map per room and one alarm per room,
//! in one SQLite database per process, `<--data-dir>/partyhost.sqlite3`.
//!
//! Every row's primary key starts with the room id, so a room reads and
//! writes only its own keys. Shard `chat-2` and shard `chat-3` are two rooms
//! with two maps. The database runs in WAL mode with `synchronous = FULL`: a
//! write that returned to the guest has been synced to disk and survives a
//! crash of the process or of the machine. It is opened in exclusive locking
//! mode, so a second `partyhost` on the same data directory fails at start
//! instead of firing the same alarms twice.
//!
//! One connection behind a mutex serves the whole process. SQLite admits one
//! writer per database at a time whatever the number of connections, so a
//! connection per room would add a file handle and a page cache per room
//! (up to `--max-rooms` of each) and `SQLITE_BUSY` retries, without adding
//! write throughput. The cost is that storage calls run on the calling
//! room's actor and block its thread for the statement and the fsync of the
//! commit, and rooms that write at the same moment wait for each other. The
//! calls run under `tokio::task::block_in_place`, so the other tasks of that
//! worker thread move to another thread meanwhile.
//! Every guest input is bounded before SQLite sees it, so the mutex is held
//! for one short statement or one transaction of at most [`MAX_BATCH_WRITES`]
//! rows:
//!
//! - a key is 1 to [`MAX_KEY_BYTES`] bytes of UTF-8;
//! - a value is at most [`MAX_VALUE_BYTES`] (128 KiB);
//! - a batch holds at most [`MAX_BATCH_WRITES`] puts and deletes;
//! - a list returns at most [`MAX_LIST_ENTRIES`] entries and
//!   [`MAX_LIST_BYTES`] of keys and values;
//! - an alarm time is at most [`MAX_ALARM_TIME_MS`].
//!
//! An input past a bound is a [`StorageError::Invalid`] whose message names
//! the value and the limit; the guest gets it as the error of its call.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use rusqlite::{params, Connection, OptionalExtension};

use crate::guest::RoomHost;
use crate::runtime::bindings::partyhost::room::storage as wit;

/// Maximum key length, in bytes.
pub const MAX_KEY_BYTES: usize = 2048;

/// Maximum value size, in bytes.
pub const MAX_VALUE_BYTES: usize = 128 << 10;

/// Maximum number of puts and deletes in one atomic batch.
pub const MAX_BATCH_WRITES: usize = 128;

/// Maximum number of entries one `list` returns, and its limit when the
/// guest sets none.
pub const MAX_LIST_ENTRIES: u32 = 1000;

/// Maximum bytes of keys and values one `list` returns. A guest that lists
/// large values requests fewer entries at a time.
pub const MAX_LIST_BYTES: usize = 16 << 20;

/// Latest alarm time, in milliseconds since the Unix epoch: the last
/// millisecond of the year 9999.
pub const MAX_ALARM_TIME_MS: u64 = 253_402_300_799_999;

/// Name of the database file inside the data directory.
pub const DATABASE_FILE: &str = "partyhost.sqlite3";

/// How long opening the database waits for a lock held by another process.
const LOCK_TIMEOUT: Duration = Duration::from_secs(1);

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS entries (
        room  TEXT NOT NULL,
        key   BLOB NOT NULL,
        value BLOB NOT NULL,
        PRIMARY KEY (room, key)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS alarms (
        room TEXT PRIMARY KEY,
        at   INTEGER NOT NULL
    ) WITHOUT ROWID;
";

/// Error of a storage call.
#[derive(Debug)]
pub enum StorageError {
    /// The guest's input is past a bound or malformed; the message names
    /// the value and the limit.
    Invalid(String),
    /// SQLite failed: a full disk, an I/O error, a corrupt file.
    Database(rusqlite::Error),
}

impl std::fmt::Display for StorageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StorageError::Invalid(message) => f.write_str(message),
            StorageError::Database(err) => write!(f, "storage failed: {err}"),
        }
    }
}

impl From<rusqlite::Error> for StorageError {
    fn from(err: rusqlite::Error) -> Self {
        StorageError::Database(err)
    }
}

/// One change of an atomic batch.
#[derive(Debug, Clone, Copy)]
pub enum Write<'a> {
    Put(&'a str, &'a [u8]),
    Delete(&'a str),
}

/// Selection of `list`: keys that start with `prefix`, from `start` on, in
/// ascending byte order, at most `limit` of them.
#[derive(Debug, Clone, Copy, Default)]
pub struct ListOptions<'a> {
    pub prefix: Option<&'a str>,
    pub start: Option<&'a str>,
    pub limit: Option<u32>,
}

/// The storage of every room of the process.
pub struct Storage {
    db: Mutex<Connection>,
    /// The database file, for logs.
    pub path: PathBuf,
}

impl Storage {
    /// Opens or creates the database in `dir`, creating `dir` if needed.
    pub fn open(dir: &Path) -> anyhow::Result<Storage> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create the data directory `{}` (--data-dir)", dir.display()))?;
        let path = dir.join(DATABASE_FILE);
        let db = Connection::open(&path).with_context(|| format!("failed to open `{}`", path.display()))?;
        let set_up = || -> rusqlite::Result<()> {
            db.busy_timeout(LOCK_TIMEOUT)?;
            // The locking mode must be set before the first access in WAL
            // mode, so that the lock is taken by the schema write below.
            db.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
            db.pragma_update(None, "journal_mode", "WAL")?;
            db.pragma_update(None, "synchronous", "FULL")?;
            db.execute_batch(SCHEMA)
        };
        set_up().map_err(|err| {
            let hint = match err.sqlite_error_code() {
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                    "another partyhost is using this --data-dir"
                }
                Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt) => {
                    "the file is not a partyhost database, or it is corrupt; move it away to start afresh"
                }
                _ => "check the file and its directory",
            };
            anyhow::anyhow!("failed to set up `{}`: {err}: {hint}", path.display())
        })?;
        Ok(Storage {
            db: Mutex::new(db),
            path,
        })
    }

    /// Returns the value of `key` in `room`.
    pub fn get(&self, room: &str, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        check_key(key)?;
        let db = self.lock();
        let value = db
            .prepare_cached("SELECT value FROM entries WHERE room = ?1 AND key = ?2")?
            .query_row(params![room, key.as_bytes()], |row| row.get(0))
            .optional()?;
        Ok(value)
    }

    /// Stores `value` under `key` in `room`, replacing any previous value.
    pub fn put(&self, room: &str, key: &str, value: &[u8]) -> Result<(), StorageError> {
        self.batch(room, &[Write::Put(key, value)])
    }

    /// Deletes `key` from `room`. Returns whether it existed.
    pub fn delete(&self, room: &str, key: &str) -> Result<bool, StorageError> {
        check_key(key)?;
        let db = self.lock();
        let deleted = db
            .prepare_cached("DELETE FROM entries WHERE room = ?1 AND key = ?2")?
            .execute(params![room, key.as_bytes()])?;
        Ok(deleted > 0)
    }

    /// Applies `writes` in order, all or none.
    pub fn batch(&self, room: &str, writes: &[Write<'_>]) -> Result<(), StorageError> {
        if writes.len() > MAX_BATCH_WRITES {
            return Err(StorageError::Invalid(format!(
                "batch has {} writes: the limit is {MAX_BATCH_WRITES}; split it",
                writes.len()
            )));
        }
        for write in writes {
            match write {
                Write::Put(key, value) => {
                    check_key(key)?;
                    check_value(key, value)?;
                }
                Write::Delete(key) => check_key(key)?,
            }
        }

        let mut db = self.lock();
        let transaction = db.transaction()?;
        {
            let mut put = transaction
                .prepare_cached("INSERT OR REPLACE INTO entries (room, key, value) VALUES (?1, ?2, ?3)")?;
            let mut delete = transaction.prepare_cached("DELETE FROM entries WHERE room = ?1 AND key = ?2")?;
            for write in writes {
                match write {
                    Write::Put(key, value) => put.execute(params![room, key.as_bytes(), value])?,
                    Write::Delete(key) => delete.execute(params![room, key.as_bytes()])?,
                };
            }
        }
        transaction.commit()?;
        Ok(())
    }

    /// Returns the entries of `room` that `options` selects, as key and
    /// value pairs in ascending key order.
    pub fn list(&self, room: &str, options: ListOptions<'_>) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        let limit = options.limit.unwrap_or(MAX_LIST_ENTRIES);
        if limit > MAX_LIST_ENTRIES {
            return Err(StorageError::Invalid(format!(
                "list limit {limit} is too large: the maximum is {MAX_LIST_ENTRIES}; page with `start`"
            )));
        }
        for bound in [options.prefix, options.start].into_iter().flatten() {
            if bound.len() > MAX_KEY_BYTES {
                return Err(StorageError::Invalid(format!(
                    "list prefix or start is {} bytes long: the limit is {MAX_KEY_BYTES}",
                    bound.len()
                )));
            }
        }

        let prefix = options.prefix.unwrap_or_default().as_bytes();
        let start = options.start.unwrap_or_default().as_bytes().max(prefix);
        // Keys are compared as bytes, so every key with the prefix sorts
        // below the prefix with its last byte raised by one.
        let end = prefix_end(prefix);

        let db = self.lock();
        let mut statement = db.prepare_cached(
            "SELECT key, value FROM entries
             WHERE room = ?1 AND key >= ?2 AND (?3 IS NULL OR key < ?3)
             ORDER BY key LIMIT ?4",
        )?;
        let mut rows = statement.query(params![room, start, end, limit])?;
        let mut entries = Vec::new();
        let mut bytes = 0;
        while let Some(row) = rows.next()? {
            let key: Vec<u8> = row.get(0)?;
            let value: Vec<u8> = row.get(1)?;
            bytes += key.len() + value.len();
            if bytes > MAX_LIST_BYTES {
                return Err(StorageError::Invalid(format!(
                    "list would return more than {MAX_LIST_BYTES} bytes: lower its limit (it was {limit})"
                )));
            }
            entries.push((String::from_utf8_lossy(&key).into_owned(), value));
        }
        Ok(entries)
    }

    /// Returns the alarm time of `room`, in milliseconds since the Unix
    /// epoch.
    pub fn alarm(&self, room: &str) -> Result<Option<u64>, StorageError> {
        let db = self.lock();
        let at: Option<i64> = db
            .prepare_cached("SELECT at FROM alarms WHERE room = ?1")?
            .query_row(params![room], |row| row.get(0))
            .optional()?;
        Ok(at.map(|at| at.max(0) as u64))
    }

    /// Sets the alarm of `room`, replacing any previous one.
    pub fn set_alarm(&self, room: &str, at_ms: u64) -> Result<(), StorageError> {
        if at_ms > MAX_ALARM_TIME_MS {
            return Err(StorageError::Invalid(format!(
                "alarm time {at_ms} is past the year 9999: give milliseconds since the Unix epoch"
            )));
        }
        let db = self.lock();
        db.prepare_cached("INSERT OR REPLACE INTO alarms (room, at) VALUES (?1, ?2)")?
            .execute(params![room, at_ms as i64])?;
        Ok(())
    }

    /// Deletes the alarm of `room`. Returns whether it had one.
    pub fn delete_alarm(&self, room: &str) -> Result<bool, StorageError> {
        let db = self.lock();
        let deleted = db.prepare_cached("DELETE FROM alarms WHERE room = ?1")?.execute(params![room])?;
        Ok(deleted > 0)
    }

    /// Returns every persisted alarm as room id and time, for the scan at
    /// start-up.
    pub fn alarms(&self) -> Result<Vec<(String, u64)>, StorageError> {
        let db = self.lock();
        let mut statement = db.prepare("SELECT room, at FROM alarms")?;
        let alarms = statement
            .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?.max(0) as u64)))?
            .collect::<Result<_, _>>()?;
        Ok(alarms)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while the lock was held left no transaction open: rusqlite
        // rolls back an unfinished transaction when it is dropped.
        self.db.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn check_key(key: &str) -> Result<(), StorageError> {
    if key.is_empty() {
        return Err(StorageError::Invalid("storage key is empty: use 1 or more bytes".into()));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(StorageError::Invalid(format!(
            "storage key is {} bytes long: the limit is {MAX_KEY_BYTES}",
            key.len()
        )));
    }
    Ok(())
}

fn check_value(key: &str, value: &[u8]) -> Result<(), StorageError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(StorageError::Invalid(format!(
            "value of `{}` is {} bytes: the limit is {MAX_VALUE_BYTES} bytes (128 KiB)",
            key.escape_default(),
            value.len()
        )));
    }
    Ok(())
}

/// Runs a database call, telling tokio first that it blocks, so the other
/// tasks of this worker thread (other rooms) move to another thread while
/// the call waits for the lock or the disk. Outside a multi-threaded
/// runtime the call runs as is.
fn off_worker<T>(call: impl FnOnce() -> T) -> T {
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|handle| handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi_thread {
        tokio::task::block_in_place(call)
    } else {
        call()
    }
}

/// Returns the smallest byte string above every string that starts with
/// `prefix`, or `None` when no such bound exists (an empty prefix, or one of
/// 0xFF bytes only).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// The storage functions a guest calls. Each acts on the calling room's own
/// keys and alarm; an error goes back to the guest, and a database failure
/// is also logged.
impl wit::Host for RoomHost {
    fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, String> {
        let result = off_worker(|| self.services.storage.get(&self.room, &key));
        self.guest_result("get", result)
    }

    fn put(&mut self, key: String, value: Vec<u8>) -> Result<(), String> {
        let result = off_worker(|| self.services.storage.put(&self.room, &key, &value));
        self.guest_result("put", result)
    }

    fn delete(&mut self, key: String) -> Result<bool, String> {
        let result = off_worker(|| self.services.storage.delete(&self.room, &key));
        self.guest_result("delete", result)
    }

    fn list(&mut self, options: wit::ListOptions) -> Result<Vec<wit::Entry>, String> {
        let options = ListOptions {
            prefix: options.prefix.as_deref(),
            start: options.start.as_deref(),
            limit: options.limit,
        };
        let result = off_worker(|| self.services.storage.list(&self.room, options)).map(|entries| {
            entries.into_iter().map(|(key, value)| wit::Entry { key, value }).collect()
        });
        self.guest_result("list", result)
    }

    fn batch(&mut self, writes: Vec<wit::Write>) -> Result<(), String> {
        let writes: Vec<Write<'_>> = writes
            .iter()
            .map(|write| match write {
                wit::Write::Put(entry) => Write::Put(&entry.key, &entry.value),
                wit::Write::Delete(key) => Write::Delete(key),
            })
            .collect();
        let result = off_worker(|| self.services.storage.batch(&self.room, &writes));
        self.guest_result("batch", result)
    }

    fn set_alarm(&mut self, time: u64) -> Result<(), String> {
        let result = off_worker(|| self.services.storage.set_alarm(&self.room, time));
        if result.is_ok() {
            self.services.alarms.schedule(&self.room, time);
            self.alarm_changed = true;
        }
        self.guest_result("set-alarm", result)
    }

    fn alarm(&mut self) -> Result<Option<u64>, String> {
        let result = off_worker(|| self.services.storage.alarm(&self.room));
        self.guest_result("alarm", result)
    }

    fn delete_alarm(&mut self) -> Result<(), String> {
        let result = off_worker(|| self.services.storage.delete_alarm(&self.room)).map(|_| ());
        if result.is_ok() {
            self.services.alarms.cancel(&self.room);
            self.alarm_changed = true;
        }
        self.guest_result("delete-alarm", result)
    }
}

impl RoomHost {
    /// Converts a storage result for the guest, logging database failures,
    /// which are the host's problem rather than the guest's.
    fn guest_result<T>(&self, call: &str, result: Result<T, StorageError>) -> Result<T, String> {
        result.map_err(|err| {
            if let StorageError::Database(db_err) = &err {
                tracing::error!(room = %self.room, call, err = %db_err, "storage call failed");
            }
            err.to_string()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> (tempfile::TempDir, Storage) {
        let dir = tempfile::tempdir().expect("temporary directory");
        let storage = Storage::open(dir.path()).expect("storage opens");
        (dir, storage)
    }

    fn keys(entries: &[(String, Vec<u8>)]) -> Vec<&str> {
        entries.iter().map(|(key, _)| key.as_str()).collect()
    }

    #[test]
    fn storage_rooms_do_not_share_keys() {
        let (_dir, storage) = open();
        storage.put("room-1", "k", b"one").unwrap();
        storage.put("room-2", "k", b"two").unwrap();
        assert_eq!(storage.get("room-1", "k").unwrap().as_deref(), Some(&b"one"[..]));
        assert_eq!(storage.get("room-2", "k").unwrap().as_deref(), Some(&b"two"[..]));
        assert!(storage.delete("room-1", "k").unwrap(), "the key existed");
        assert_eq!(storage.get("room-2", "k").unwrap().as_deref(), Some(&b"two"[..]), "room-2 keeps its key");
        assert!(!storage.delete("room-1", "k").unwrap(), "the key is gone");
    }

    #[test]
    fn storage_list_honours_prefix_start_limit() {
        let (_dir, storage) = open();
        for key in ["a", "b/1", "b/2", "b/3", "b0", "c"] {
            storage.put("room", key, key.as_bytes()).unwrap();
        }
        let all = storage.list("room", ListOptions::default()).unwrap();
        assert_eq!(keys(&all), ["a", "b/1", "b/2", "b/3", "b0", "c"]);

        let prefixed = ListOptions { prefix: Some("b/"), ..Default::default() };
        assert_eq!(keys(&storage.list("room", prefixed).unwrap()), ["b/1", "b/2", "b/3"]);

        let paged = ListOptions { prefix: Some("b/"), start: Some("b/2"), limit: Some(1) };
        assert_eq!(keys(&storage.list("room", paged).unwrap()), ["b/2"]);

        let from = ListOptions { start: Some("b0"), ..Default::default() };
        assert_eq!(keys(&storage.list("room", from).unwrap()), ["b0", "c"]);
    }

    #[test]
    fn storage_prefix_end_skips_max_bytes() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }

    #[test]
    fn storage_batch_is_all_or_nothing() {
        let (_dir, storage) = open();
        storage.put("room", "old", b"1").unwrap();
        let big = vec![0u8; MAX_VALUE_BYTES + 1];
        let err = storage
            .batch("room", &[Write::Delete("old"), Write::Put("new", b"2"), Write::Put("big", &big)])
            .unwrap_err();
        assert!(err.to_string().contains("131073 bytes"), "error names the size: {err}");
        assert!(storage.get("room", "old").unwrap().is_some(), "a rejected batch deletes nothing");
        assert!(storage.get("room", "new").unwrap().is_none(), "a rejected batch puts nothing");

        storage.batch("room", &[Write::Delete("old"), Write::Put("new", b"2")]).unwrap();
        assert!(storage.get("room", "old").unwrap().is_none());
        assert_eq!(storage.get("room", "new").unwrap().as_deref(), Some(&b"2"[..]));
    }

    #[test]
    fn storage_rejects_inputs_past_bounds() {
        let (_dir, storage) = open();
        let long_key = "k".repeat(MAX_KEY_BYTES + 1);
        assert!(matches!(storage.put("room", &long_key, b""), Err(StorageError::Invalid(_))));
        assert!(matches!(storage.get("room", ""), Err(StorageError::Invalid(_))));
        let too_many = ListOptions { limit: Some(MAX_LIST_ENTRIES + 1), ..Default::default() };
        assert!(matches!(storage.list("room", too_many), Err(StorageError::Invalid(_))));
        let writes = vec![Write::Delete("k"); MAX_BATCH_WRITES + 1];
        assert!(matches!(storage.batch("room", &writes), Err(StorageError::Invalid(_))));
        assert!(matches!(storage.set_alarm("room", MAX_ALARM_TIME_MS + 1), Err(StorageError::Invalid(_))));
    }

    #[test]
    fn storage_alarms_persist_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let storage = Storage::open(dir.path()).unwrap();
            storage.set_alarm("room-1", 1_000).unwrap();
            storage.set_alarm("room-2", 2_000).unwrap();
            assert!(storage.delete_alarm("room-2").unwrap());
            storage.put("room-1", "k", b"v").unwrap();
        }
        let storage = Storage::open(dir.path()).unwrap();
        assert_eq!(storage.alarms().unwrap(), vec![("room-1".to_string(), 1_000)]);
        assert_eq!(storage.alarm("room-1").unwrap(), Some(1_000));
        assert_eq!(storage.get("room-1", "k").unwrap().as_deref(), Some(&b"v"[..]));
    }

    #[test]
    fn storage_second_opener_is_rejected() {
        let (dir, _storage) = open();
        let second = Storage::open(dir.path());
        assert!(second.is_err(), "the exclusive lock keeps a second process, or opener, out");
    }
}
