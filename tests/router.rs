//! The router: WebSockets spread over shard rooms, HTTP fanned out to all
//! of them, and the connection id and URL passed through to the guest.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_post_reaches_every_client_once() {
    let server = Server::start(&["--shards", "5"]);

    let mut clients = Vec::new();
    let mut shard_of = HashMap::new();
    for i in 0..20 {
        let mut socket = connect(&server.ws(&format!("/parties/router/lobby?_pk=client-{i}"))).await;
        let greeting = recv_text(&mut socket).await;
        let shard = greeting
            .strip_prefix("connected to ")
            .unwrap_or_else(|| panic!("client {i} got `{greeting}` instead of a greeting"))
            .to_string();
        let k: u32 = shard
            .strip_prefix("lobby-")
            .and_then(|k| k.parse().ok())
            .unwrap_or_else(|| panic!("greeting names `{shard}`, not a shard lobby-<k>"));
        assert!((1..=5).contains(&k), "shard number {k} is outside 1..=5");
        shard_of.insert(i, shard);
        clients.push(socket);
    }
    let shards: BTreeSet<&String> = shard_of.values().collect();
    assert!(shards.len() > 1, "20 clients all landed on {shards:?}");

    let (status, body) = request("POST", &server.http("/parties/router/lobby"), "hello").await;
    assert_eq!(status, 200, "fan-out answered {body}");
    let summary = json(&body);
    let rooms: Vec<&str> = summary["shards"]
        .as_array()
        .expect("summary lists shards")
        .iter()
        .map(|shard| shard["room"].as_str().expect("shard has a room"))
        .collect();
    assert_eq!(rooms, ["lobby-1", "lobby-2", "lobby-3", "lobby-4", "lobby-5"]);
    for shard in summary["shards"].as_array().unwrap() {
        assert_eq!(shard["status"], 200, "shard answered {shard}");
    }

    for (i, socket) in clients.iter_mut().enumerate() {
        let expected = format!("received hello (via room {})", shard_of[&i]);
        assert_eq!(recv_text(socket).await, expected, "client {i}");
    }
    for (i, socket) in clients.iter_mut().enumerate() {
        assert_silent(socket, if i == 0 { Duration::from_millis(300) } else { Duration::from_millis(10) }).await;
    }
}

#[tokio::test]
async fn router_passes_pk_and_query_to_guest() {
    let server = Server::with_example("echo", &["--shards", "3"]);
    let mut socket = connect(&server.ws("/parties/router/game?_pk=alice&team=red")).await;

    let greeting = json(&recv_text(&mut socket).await);
    assert_eq!(greeting["connection"], "alice");
    assert_eq!(greeting["url"], "/parties/router/game?_pk=alice&team=red");
    let room = greeting["room"].as_str().unwrap();
    assert!(
        ["game-1", "game-2", "game-3"].contains(&room),
        "connection landed in `{room}`, not a shard of game"
    );
}

#[tokio::test]
async fn router_generates_uuid_without_pk() {
    let server = Server::with_example("echo", &[]);
    let mut socket = connect(&server.ws("/parties/router/game")).await;

    let greeting = json(&recv_text(&mut socket).await);
    let id = greeting["connection"].as_str().unwrap();
    assert_eq!(id.len(), 36, "`{id}` is not a UUID");
    assert_eq!(id.matches('-').count(), 4, "`{id}` is not a UUID");
}

#[tokio::test]
async fn router_fan_out_reports_failed_shards() {
    let server = Server::with_example("faulty", &["--shards", "4"]);

    let (status, body) = request("POST", &server.http("/parties/router/broken"), "panic").await;
    assert_eq!(status, 502, "fan-out answered {body}");
    let summary = json(&body);
    assert_eq!(
        summary["failed"],
        serde_json::json!(["broken-1", "broken-2", "broken-3", "broken-4"])
    );
    for shard in summary["shards"].as_array().unwrap() {
        assert_eq!(shard["status"], 500, "shard {shard}");
        let error = shard["error"].as_str().unwrap();
        assert!(error.contains("trapped"), "shard error `{error}` does not say it trapped");
    }

    let (status, body) = request("POST", &server.http("/parties/router/broken"), "echo fine").await;
    assert_eq!(status, 200, "after the traps every shard serves again: {body}");
}

#[tokio::test]
async fn native_default_room_behaves_like_wasm() {
    let server = Server::start(&["--native-default-room", "--shards", "2"]);
    let mut sockets = Vec::new();
    for i in 0..2 {
        let mut socket = connect(&server.ws(&format!("/parties/router/twin?_pk=c{i}"))).await;
        assert_eq!(recv_text(&mut socket).await, format!("connected to twin-{}", i + 1));
        sockets.push(socket);
    }

    let (status, body) = request("POST", &server.http("/parties/router/twin"), "same").await;
    assert_eq!(status, 200, "{body}");
    for (i, socket) in sockets.iter_mut().enumerate() {
        assert_eq!(recv_text(socket).await, format!("received same (via room twin-{})", i + 1));
    }
    let (status, body) = request("GET", &server.http("/parties/main/twin-9"), "").await;
    assert_eq!((status, body.as_str()), (200, "OK"));

    let (status, stderr) = run_to_exit(&["--native-default-room", "--module", "room.wasm"]);
    assert_eq!(status.code(), Some(2), "clap rejects the combination: {stderr}");
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}
