//! Room alarms: when each room's one alarm fires, and the task that fires
//! them.
//!
//! An alarm is persisted in [`Storage`] by the room's `set-alarm` call, and
//! scheduled here in memory. One scheduler task serves the whole process
//! rather than a timer per room actor, so that a room evicted while idle, or
//! not started since the host started, still wakes up. At start the host
//! loads every persisted alarm, and an alarm that came due while the host
//! was down fires at once, late. When an alarm is due, the scheduler
//! delivers [`RoomEvent::Alarm`] to the room, starting it if it is not
//! running. The room then runs `on-alarm` and deletes the alarm unless the
//! guest set a new one meanwhile.
//!
//! The schedule holds one entry per room with an alarm, so its memory grows
//! with the number of such rooms, about 100 bytes each. An alarm whose room
//! cannot run (the instance pool is full, or its instance keeps trapping in
//! `on-start`) is tried again every [`RETRY_DELAY`] while it stays
//! persisted.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::registry::Rooms;
use crate::room::RoomEvent;
use crate::storage::Storage;

/// Wait before an alarm whose room could not run is tried again.
pub const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Maximum time the scheduler sleeps before it reads the schedule again, so
/// a far-off alarm never becomes a sleep whose deadline overflows.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Milliseconds since the Unix epoch, the unit of alarm times.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// The alarms of every room of the process, by time.
#[derive(Default)]
pub struct Alarms {
    schedule: Mutex<Schedule>,
    /// Wakes the scheduler when an alarm earlier than the ones it waits for
    /// may have been set.
    changed: Notify,
}

#[derive(Default)]
struct Schedule {
    by_time: BTreeSet<(u64, Arc<str>)>,
    by_room: HashMap<Arc<str>, u64>,
}

impl Alarms {
    /// Creates the schedule from the alarms persisted in `storage`.
    pub fn load(storage: &Storage) -> anyhow::Result<Arc<Alarms>> {
        let persisted = storage
            .alarms()
            .map_err(|err| anyhow::anyhow!("failed to read the persisted alarms: {err}"))?;
        let alarms = Arc::new(Alarms::default());
        for (room, at) in persisted {
            alarms.schedule(&room, at);
        }
        Ok(alarms)
    }

    /// Schedules the alarm of `room` at `at_ms`, replacing its previous one.
    pub fn schedule(&self, room: &str, at_ms: u64) {
        let mut schedule = self.lock();
        let room: Arc<str> = room.into();
        if let Some(previous) = schedule.by_room.insert(room.clone(), at_ms) {
            schedule.by_time.remove(&(previous, room.clone()));
        }
        schedule.by_time.insert((at_ms, room));
        drop(schedule);
        self.changed.notify_one();
    }

    /// Removes the alarm of `room` from the schedule.
    pub fn cancel(&self, room: &str) {
        let mut schedule = self.lock();
        if let Some((room, at)) = schedule.by_room.remove_entry(room) {
            schedule.by_time.remove(&(at, room));
        }
    }

    /// Number of scheduled alarms.
    pub fn len(&self) -> usize {
        self.lock().by_room.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes and returns the rooms whose alarm is due at `now_ms`, and the
    /// time of the next alarm after them.
    fn take_due(&self, now_ms: u64) -> (Vec<Arc<str>>, Option<u64>) {
        let mut schedule = self.lock();
        let mut due = Vec::new();
        while let Some((at, room)) = schedule.by_time.first().cloned() {
            if at > now_ms {
                return (due, Some(at));
            }
            schedule.by_time.pop_first();
            schedule.by_room.remove(&room);
            due.push(room);
        }
        (due, None)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Schedule> {
        self.schedule.lock().expect("alarm schedule lock")
    }
}

/// Starts the task that fires due alarms until it is aborted.
pub fn spawn_scheduler(alarms: Arc<Alarms>, rooms: Arc<Rooms>) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            // Register for a wake-up before reading the schedule, so an alarm
            // set between the read and the wait is not missed.
            let changed = alarms.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();

            let now = now_ms();
            let (due, next) = alarms.take_due(now);
            for room in due {
                tokio::spawn(fire(alarms.clone(), rooms.clone(), room));
            }

            let sleep = next.map_or(MAX_SLEEP, |at| Duration::from_millis(at - now).min(MAX_SLEEP));
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    })
}

/// Delivers a due alarm to its room, or schedules another try when the room
/// cannot take it.
async fn fire(alarms: Arc<Alarms>, rooms: Arc<Rooms>, room: Arc<str>) {
    tracing::debug!(room = %room, "alarm due");
    if rooms.deliver(&room, RoomEvent::Alarm).await {
        return;
    }
    tracing::warn!(room = %room, retry_in_ms = RETRY_DELAY.as_millis() as u64,
        "alarm could not reach its room: trying again");
    alarms.schedule(&room, now_ms() + RETRY_DELAY.as_millis() as u64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alarms_take_due_in_time_order() {
        let alarms = Alarms::default();
        alarms.schedule("late", 300);
        alarms.schedule("early", 100);
        alarms.schedule("moved", 50);
        alarms.schedule("moved", 500);
        alarms.schedule("cancelled", 10);
        alarms.cancel("cancelled");

        let (due, next) = alarms.take_due(300);
        let due: Vec<&str> = due.iter().map(|room| &**room).collect();
        assert_eq!(due, ["early", "late"], "due alarms come out oldest first; a moved alarm keeps only its new time");
        assert_eq!(next, Some(500));
        assert_eq!(alarms.len(), 1, "only the moved alarm is left");
    }
}
