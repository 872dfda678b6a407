//! A counter kept in the room's storage, so it survives restarts of the
//! instance and of the host, with an alarm that fires even when the room
//! has gone idle.
//!
//! HTTP, to `/parties/main/<room>`:
//! - `GET`: answers `{"count": n, "alarm": time or null, "alarms_fired": k}`;
//! - `POST increment`: adds one, broadcasts `count <n>` and answers `n`;
//! - `POST history <start> <limit>`: answers the counts from `start` on,
//!   at most `limit`, as a JSON array (each increment is logged under
//!   `history/<count>`);
//! - `POST alarm <ms>`: sets the alarm `ms` milliseconds from now;
//! - `POST cancel-alarm`: deletes the alarm;
//! - `POST reset`: deletes the count and its history.
//!
//! When the alarm fires, the room adds one to `alarms_fired`, logs
//! `alarm fired <k> times` and broadcasts `alarm`.
//!
//! A WebSocket gets `count <n>` when it connects, and may send `increment`.

use std::time::Duration;

use partyhost_sdk::storage::{self, Batch, ListOptions};
use partyhost_sdk::{export_room, Connection, LogLevel, Message, Request, Response, Room};

/// Width of the zero-padded count in history keys, so that keys sort in
/// the order of the counts.
const HISTORY_DIGITS: usize = 12;

struct Counter;

impl Counter {
    fn count() -> Result<u64, partyhost_sdk::Error> {
        Ok(storage::get_json("count")?.unwrap_or(0))
    }

    /// Adds one to the count and logs it in the history, both in one batch.
    fn increment() -> Result<u64, partyhost_sdk::Error> {
        let count = Counter::count()? + 1;
        Batch::new()
            .put_json("count", &count)?
            .put_json(&history_key(count), &storage::now_ms())?
            .commit()?;
        partyhost_sdk::broadcast(format!("count {count}"));
        Ok(count)
    }

    fn history(start: u64, limit: u32) -> Result<Vec<u64>, partyhost_sdk::Error> {
        let start = history_key(start);
        let entries = storage::list(ListOptions {
            prefix: Some("history/"),
            start: Some(&start),
            limit: Some(limit),
        })?;
        Ok(entries
            .iter()
            .filter_map(|(key, _)| key.strip_prefix("history/")?.parse().ok())
            .collect())
    }

    /// Deletes the count and its history, a batch at a time.
    fn reset() -> Result<(), partyhost_sdk::Error> {
        loop {
            let limit = storage::MAX_BATCH_WRITES as u32;
            let page = storage::list(ListOptions {
                prefix: Some("history/"),
                limit: Some(limit),
                ..ListOptions::default()
            })?;
            if page.is_empty() {
                break;
            }
            let batch = page.iter().fold(Batch::new(), |batch, (key, _)| batch.delete(key));
            batch.commit()?;
        }
        storage::delete("count")?;
        Ok(())
    }

    fn run(command: &str) -> Result<Response, partyhost_sdk::Error> {
        let mut words = command.split_whitespace();
        let response = match words.next().unwrap_or("") {
            "increment" => Response::text(200, Counter::increment()?.to_string()),
            "history" => {
                let start = words.next().and_then(|word| word.parse().ok()).unwrap_or(0);
                let limit = words.next().and_then(|word| word.parse().ok()).unwrap_or(100);
                Response::json(200, &Counter::history(start, limit)?)
            }
            "alarm" => {
                let millis = words.next().and_then(|word| word.parse().ok()).unwrap_or(0);
                storage::set_alarm_after(Duration::from_millis(millis))?;
                Response::text(200, "alarm set")
            }
            "cancel-alarm" => {
                storage::delete_alarm()?;
                Response::text(200, "alarm deleted")
            }
            "reset" => {
                Counter::reset()?;
                Response::text(200, "reset")
            }
            other => Response::text(400, format!("unknown command `{other}`: use increment, history, alarm, cancel-alarm or reset")),
        };
        Ok(response)
    }
}

fn history_key(count: u64) -> String {
    format!("history/{count:0width$}", width = HISTORY_DIGITS)
}

impl Room for Counter {
    fn new() -> Self {
        Counter
    }

    fn on_connect(&mut self, connection: &Connection, _request: &Request) {
        match Counter::count() {
            Ok(count) => connection.send(format!("count {count}")),
            Err(err) => connection.send(format!("error: {err}")),
        };
    }

    fn on_message(&mut self, sender: &Connection, message: Message) {
        if message.as_text() != Some("increment") {
            sender.send("unknown command: send `increment`");
            return;
        }
        if let Err(err) = Counter::increment() {
            sender.send(format!("error: {err}"));
        }
    }

    fn on_alarm(&mut self) {
        let fired = storage::get_json::<u64>("alarms_fired").ok().flatten().unwrap_or(0) + 1;
        if let Err(err) = storage::put_json("alarms_fired", &fired) {
            partyhost_sdk::log(LogLevel::Error, &format!("failed to count the alarm: {err}"));
        }
        partyhost_sdk::log(LogLevel::Info, &format!("alarm fired {fired} times"));
        partyhost_sdk::broadcast("alarm");
    }

    fn on_request(&mut self, request: Request) -> Response {
        let result = if request.method == "GET" {
            (|| {
                let body = serde_json::json!({
                    "count": Counter::count()?,
                    "alarm": storage::alarm()?,
                    "alarms_fired": storage::get_json::<u64>("alarms_fired")?.unwrap_or(0),
                });
                Ok(Response::json(200, &body))
            })()
        } else {
            Counter::run(request.text().unwrap_or(""))
        };
        result.unwrap_or_else(|err: partyhost_sdk::Error| Response::text(500, format!("storage error: {err}")))
    }
}

export_room!(Counter);
