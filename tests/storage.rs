//! Room storage and alarms end to end: SQLite files in a temporary data
//! directory, kept across a restart of the host, one key space per room and
//! per shard, and guest inputs past the bounds.

mod common;

use std::time::Duration;

use common::*;

/// Starts the counter room on `data_dir`.
fn counter(data_dir: &std::path::Path) -> Server {
    Server::with_example("counter", &["--data-dir", data_dir.to_str().expect("UTF-8 path")])
}

async fn post(server: &Server, room: &str, command: &str) -> String {
    let (status, body) = request("POST", &server.http(&format!("/parties/main/{room}")), command).await;
    assert_eq!(status, 200, "`{command}` failed: {body}");
    body
}

async fn get(server: &Server, room: &str) -> serde_json::Value {
    let (status, body) = request("GET", &server.http(&format!("/parties/main/{room}")), "").await;
    assert_eq!(status, 200, "{body}");
    json(&body)
}

#[tokio::test]
async fn storage_survives_host_restart() {
    let data_dir = tempfile::tempdir().unwrap();
    let mut server = counter(data_dir.path());
    for expected in ["1", "2", "3"] {
        assert_eq!(post(&server, "clicks", "increment").await, expected);
    }
    assert!(server.terminate().success(), "partyhost exits cleanly on SIGTERM");
    assert!(data_dir.path().join("partyhost.sqlite3").exists(), "the database is in --data-dir");

    let server = counter(data_dir.path());
    assert_eq!(get(&server, "clicks").await["count"], 3);
    assert_eq!(post(&server, "clicks", "history 2 10").await, "[2,3]", "list honours start");
    assert_eq!(post(&server, "clicks", "history 0 1").await, "[1]", "list honours limit");
    assert_eq!(post(&server, "clicks", "increment").await, "4");
}

#[tokio::test]
async fn rooms_and_shards_have_own_storage() {
    let data_dir = tempfile::tempdir().unwrap();
    let server = counter(data_dir.path());

    let (status, body) = request("POST", &server.http("/parties/router/tally"), "increment").await;
    assert_eq!(status, 200, "{body}");
    for k in 1..=5 {
        assert_eq!(get(&server, &format!("tally-{k}")).await["count"], 1, "shard tally-{k} counted once");
    }
    assert_eq!(get(&server, "tally").await["count"], 0, "the logical room's name is a room of its own");
}

#[tokio::test]
async fn reset_deletes_in_batches() {
    let data_dir = tempfile::tempdir().unwrap();
    let server = counter(data_dir.path());
    for expected in 1..=3 {
        assert_eq!(post(&server, "temp", "increment").await, expected.to_string());
    }
    assert_eq!(post(&server, "temp", "reset").await, "reset");
    assert_eq!(get(&server, "temp").await["count"], 0);
    assert_eq!(post(&server, "temp", "history 0 10").await, "[]");
}

#[tokio::test]
async fn storage_bounds_return_errors() {
    let server = Server::with_example("faulty", &[]);
    let cases = [
        ("store 2049 1", "error: storage key is 2049 bytes long: the limit is 2048"),
        ("store 0 1", "error: storage key is empty: use 1 or more bytes"),
        ("store 1 131073", "error: value of `k` is 131073 bytes: the limit is 131072 bytes (128 KiB)"),
        ("store 2048 131072", "stored"),
        ("list 1001", "error: list limit 1001 is too large: the maximum is 1000; page with `start`"),
        ("list 1000", "listed 1"),
        ("batch 129", "error: batch has 129 writes: the limit is 128; split it"),
        ("batch 128", "committed"),
    ];
    for (command, expected) in cases {
        let (status, body) = request("POST", &server.http("/parties/main/bounded"), command).await;
        assert_eq!(status, 200, "`{command}`: {body}");
        assert_eq!(body, expected, "answer to `{command}`");
    }
}

#[tokio::test]
async fn alarm_fires_and_is_deleted() {
    let data_dir = tempfile::tempdir().unwrap();
    let server = counter(data_dir.path());
    let mut socket = connect(&server.ws("/parties/main/ticker?_pk=watcher")).await;
    assert_eq!(recv_text(&mut socket).await, "count 0");

    assert_eq!(post(&server, "ticker", "alarm 200").await, "alarm set");
    assert!(get(&server, "ticker").await["alarm"].is_u64(), "the alarm time is stored");
    assert_eq!(recv_text(&mut socket).await, "alarm");

    let state = get(&server, "ticker").await;
    assert_eq!(state["alarms_fired"], 1);
    assert_eq!(state["alarm"], serde_json::Value::Null, "the alarm that fired is deleted");
}

#[tokio::test]
async fn cancelled_alarm_does_not_fire() {
    let data_dir = tempfile::tempdir().unwrap();
    let server = counter(data_dir.path());
    assert_eq!(post(&server, "quiet", "alarm 300").await, "alarm set");
    assert_eq!(post(&server, "quiet", "cancel-alarm").await, "alarm deleted");

    tokio::time::sleep(Duration::from_millis(800)).await;
    let state = get(&server, "quiet").await;
    assert_eq!(state["alarms_fired"], 0);
    assert_eq!(state["alarm"], serde_json::Value::Null);
}

#[tokio::test]
async fn alarm_fires_after_host_restart() {
    let data_dir = tempfile::tempdir().unwrap();
    let mut server = counter(data_dir.path());
    assert_eq!(post(&server, "sleeper", "alarm 500").await, "alarm set");
    assert!(server.terminate().success());
    // The alarm comes due while the host is down.
    tokio::time::sleep(Duration::from_millis(700)).await;

    // Nothing asks for the room after the restart: the scan of persisted
    // alarms starts it.
    let server = counter(data_dir.path());
    let line = server.wait_for_log(&["alarm fired", "sleeper"]).await;
    assert!(line.contains("late_ms="), "the host logs how late the alarm fired: {line}");
    server.wait_for_log(&["alarm fired 1 times"]).await;
    let state = get(&server, "sleeper").await;
    assert_eq!(state["alarms_fired"], 1);
    assert_eq!(state["alarm"], serde_json::Value::Null);
}

#[tokio::test]
async fn second_host_on_data_dir_fails() {
    let data_dir = tempfile::tempdir().unwrap();
    let _first = counter(data_dir.path());
    let (status, stderr) = run_to_exit(&["--data-dir", data_dir.path().to_str().unwrap()]);
    assert!(!status.success(), "a second partyhost on the same --data-dir must not run");
    assert!(stderr.contains("another partyhost is using this --data-dir"), "{stderr}");
    assert!(!stderr.contains("listening"), "the second host never listened: {stderr}");
}

#[tokio::test]
async fn corrupt_database_is_named() {
    let data_dir = tempfile::tempdir().unwrap();
    std::fs::write(data_dir.path().join("partyhost.sqlite3"), vec![b'x'; 8192]).unwrap();
    let (status, stderr) = run_to_exit(&["--data-dir", data_dir.path().to_str().unwrap()]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is not a partyhost database, or it is corrupt"), "{stderr}");
}
