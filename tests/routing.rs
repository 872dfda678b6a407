//! The router beyond the reference example: balancing policies, shard
//! counts per room, retried and ordered fan-out, idempotency keys, and
//! messages published across shards.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::*;
use futures_util::SinkExt;

/// Connects to the default room behind the router and returns the socket
/// with the shard number its greeting names.
async fn join(server: &Server, room: &str, pk: &str) -> (Socket, u32) {
    let mut socket = connect(&server.ws(&format!("/parties/router/{room}?_pk={pk}"))).await;
    let greeting = recv_text(&mut socket).await;
    let shard = greeting
        .strip_prefix(&format!("connected to {room}-"))
        .and_then(|k| k.parse().ok())
        .unwrap_or_else(|| panic!("`{greeting}` is not a greeting from a shard of {room}"));
    (socket, shard)
}

/// Joins `count` clients one after another, with ids `<prefix><i>`.
async fn join_many(server: &Server, room: &str, prefix: &str, count: usize) -> (Vec<Socket>, Vec<u32>) {
    let mut sockets = Vec::new();
    let mut shards = Vec::new();
    for i in 0..count {
        let (socket, shard) = join(server, room, &format!("{prefix}{i}")).await;
        sockets.push(socket);
        shards.push(shard);
    }
    (sockets, shards)
}

fn counts(shards: &[u32]) -> BTreeMap<u32, usize> {
    let mut counts = BTreeMap::new();
    for shard in shards {
        *counts.entry(*shard).or_insert(0) += 1;
    }
    counts
}

/// Connection counts per shard from the admin listing.
async fn shard_loads(server: &Server, room: &str) -> Vec<u64> {
    let admin = server.admin_addr().await;
    let (status, body) = request("GET", &format!("http://{admin}/parties/router/{room}"), "").await;
    assert_eq!(status, 200, "{body}");
    json(&body)["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|shard| shard["connections"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn least_connections_fills_emptiest_shard() {
    let server = Server::start(&["--admin-listen", "127.0.0.1:0"]);
    let mut sockets = Vec::new();
    let mut shards = Vec::new();
    for i in 0..20 {
        let (socket, shard) = join(&server, "even", &format!("c{i}")).await;
        sockets.push((socket, shard));
        shards.push(shard);
    }
    assert_eq!(counts(&shards), BTreeMap::from([(1, 4), (2, 4), (3, 4), (4, 4), (5, 4)]));

    // Two clients of shard 3 leave; the next two joins fill shard 3 again.
    let leaving: Vec<usize> = sockets.iter().enumerate().filter(|(_, (_, k))| *k == 3).map(|(i, _)| i).take(2).collect();
    for i in leaving.into_iter().rev() {
        let (mut socket, _) = sockets.remove(i);
        socket.close(None).await.unwrap();
    }
    let deadline = std::time::Instant::now() + WAIT;
    while shard_loads(&server, "even").await != [4, 4, 2, 4, 4] {
        assert!(std::time::Instant::now() < deadline, "shard 3 never showed 2 connections");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..2 {
        let (_socket, shard) = join(&server, "even", &format!("late-{i}")).await;
        assert_eq!(shard, 3, "late joiner {i} goes to the emptiest shard");
        sockets.push((_socket, shard));
    }
}

#[tokio::test]
async fn random_balance_uses_every_shard() {
    let server = Server::start(&["--balance", "random"]);
    let (_sockets, shards) = join_many(&server, "dice", "c", 100).await;
    // Each shard stays empty with probability 0.8^100 (about 2e-10).
    assert_eq!(counts(&shards).len(), 5, "{:?}", counts(&shards));
}

#[tokio::test]
async fn power_of_two_keeps_shards_close() {
    let server = Server::start(&["--balance", "power-of-two"]);
    let (_sockets, shards) = join_many(&server, "pair", "c", 100).await;
    let counts = counts(&shards);
    let max = counts.values().max().copied().unwrap_or(0);
    let min = if counts.len() == 5 { counts.values().min().copied().unwrap_or(0) } else { 0 };
    assert!(max - min <= 6, "power-of-two left shards at {counts:?}");
}

#[tokio::test]
async fn sticky_returns_client_to_its_shard() {
    let server = Server::start(&["--balance", "sticky"]);
    let (mut first, home) = join(&server, "home", "alice").await;
    first.close(None).await.unwrap();
    for attempt in 0..5 {
        let (mut socket, shard) = join(&server, "home", "alice").await;
        assert_eq!(shard, home, "reconnect {attempt} of alice");
        socket.close(None).await.unwrap();
    }

    let (_sockets, shards) = join_many(&server, "home", "user-", 30).await;
    assert!(counts(&shards).len() > 1, "30 ids all hashed to one shard: {shards:?}");
}

#[tokio::test]
async fn shards_for_pattern_sets_shard_count() {
    let server = Server::start(&["--shards", "3", "--shards-for", "big-*=8"]);
    for (room, expected) in [("big-hall", 8), ("small", 3)] {
        let (status, body) = request("POST", &server.http(&format!("/parties/router/{room}")), "x").await;
        assert_eq!(status, 200, "{body}");
        let shards = json(&body)["shards"].as_array().unwrap().len();
        assert_eq!(shards, expected, "{room}: {body}");
    }
}

#[tokio::test]
async fn fan_out_retries_trapped_shard_once() {
    let server = Server::with_example("faulty", &[]);
    let mut sockets = Vec::new();
    for i in 0..10 {
        sockets.push(connect(&server.ws(&format!("/parties/router/relay?_pk=c{i}"))).await);
    }

    let (status, body) = request("POST", &server.http("/parties/router/relay"), "flaky relay-2 hello").await;
    assert_eq!(status, 200, "{body}");
    let summary = json(&body);
    for shard in summary["shards"].as_array().unwrap() {
        let expected_attempts = if shard["room"] == "relay-2" { 2 } else { 1 };
        assert_eq!(shard["attempts"], expected_attempts, "{shard}");
        assert_eq!(shard["status"], 200, "{shard}");
    }

    for (i, socket) in sockets.iter_mut().enumerate() {
        assert_eq!(recv_text(socket).await, "hello", "client {i}");
    }
    for socket in sockets.iter_mut() {
        assert_silent(socket, Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn idempotency_key_runs_request_once() {
    let server = Server::start(&[]);
    let (mut socket, shard) = join(&server, "dedupe", "watcher").await;

    let client = reqwest::Client::new();
    let mut request_ids = Vec::new();
    for _ in 0..3 {
        let response = client
            .post(server.http("/parties/router/dedupe"))
            .header("idempotency-key", "order-42")
            .body("once")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let summary = json(&response.text().await.unwrap());
        request_ids.push(summary["requestId"].as_str().unwrap().to_string());
    }
    assert_eq!(request_ids, ["order-42", "order-42", "order-42"]);
    assert_eq!(recv_text(&mut socket).await, format!("received once (via room dedupe-{shard})"));
    assert_silent(&mut socket, Duration::from_millis(300)).await;

    let response = client
        .post(server.http("/parties/router/dedupe"))
        .header("idempotency-key", "x".repeat(257))
        .body("too long")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400, "an overlong key is rejected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_fan_outs_keep_one_order() {
    let server = Server::start(&[]);
    let mut sockets = Vec::new();
    for i in 0..10 {
        sockets.push(join(&server, "order", &format!("c{i}")).await.0);
    }

    let posts = (0..20).map(|j| {
        let url = server.http("/parties/router/order");
        tokio::spawn(async move { request("POST", &url, &format!("m{j}")).await })
    });
    for post in futures_util::future::join_all(posts).await {
        assert_eq!(post.unwrap().0, 200);
    }

    let mut orders = Vec::new();
    for socket in sockets.iter_mut() {
        let mut order = Vec::new();
        for _ in 0..20 {
            let text = recv_text(socket).await;
            let body = text.strip_prefix("received ").and_then(|rest| rest.split(' ').next()).unwrap().to_string();
            order.push(body);
        }
        orders.push(order);
    }
    for (i, order) in orders.iter().enumerate() {
        assert_eq!(order, &orders[0], "client {i} saw the requests in another order than client 0");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_publish_reaches_every_shard_in_order() {
    let server = Server::with_example("chat", &[]);
    let clients = 10;
    let per_client = 5;
    let mut sockets = Vec::new();
    for i in 0..clients {
        sockets.push(connect(&server.ws(&format!("/parties/router/talk?_pk=c{i}"))).await);
    }
    for (i, socket) in sockets.iter_mut().enumerate() {
        for j in 0..per_client {
            socket.send(tokio_tungstenite::tungstenite::Message::text(format!("c{i} m{j}"))).await.unwrap();
        }
    }

    for (i, socket) in sockets.iter_mut().enumerate() {
        let mut by_sender: HashMap<String, Vec<u32>> = HashMap::new();
        for _ in 0..(clients - 1) * per_client {
            let text = recv_text(socket).await;
            let (sender, message) = text.split_once(' ').unwrap();
            assert_ne!(sender, format!("c{i}"), "client {i} got its own message back");
            by_sender.entry(sender.to_string()).or_default().push(message[1..].parse().unwrap());
        }
        assert_eq!(by_sender.len(), clients - 1, "client {i} heard from {} senders", by_sender.len());
        for (sender, sequence) in &by_sender {
            assert_eq!(sequence, &(0..per_client as u32).collect::<Vec<_>>(), "client {i}: messages of {sender}");
        }
        assert_silent(socket, Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_survives_client_disconnect() {
    let server = Server::with_example("faulty", &[]);
    let url = server.http("/parties/router/dup");

    // The first client gives up while every shard is still busy.
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(100)).build().unwrap();
    let first = impatient.post(&url).header("idempotency-key", "k1").body("spin 500").send().await;
    assert!(first.is_err(), "the first client timed out");

    let client = reqwest::Client::new();
    let retry = client.post(&url).header("idempotency-key", "k1").body("spin 500").send().await.unwrap();
    assert_eq!(retry.status(), 200);
    let summary = json(&retry.text().await.unwrap());
    assert_eq!(summary["requestId"], "k1");

    for k in 1..=5 {
        let (status, body) = request("POST", &server.http(&format!("/parties/main/dup-{k}")), "count").await;
        assert_eq!((status, body.as_str()), (200, "2"), "shard {k} ran the spin once, then this count");
    }

    let other = client.post(&url).header("idempotency-key", "k1").body("spin 1").send().await.unwrap();
    assert_eq!(other.status(), 422, "the key came back with another body");
}

#[tokio::test]
async fn failed_fan_out_is_not_remembered() {
    let server = Server::with_example("faulty", &[]);
    let url = server.http("/parties/router/fails");
    let client = reqwest::Client::new();
    for attempt in 1..=2 {
        let response = client.post(&url).header("idempotency-key", "k2").body("respond 500").send().await.unwrap();
        assert_eq!(response.status(), 502, "attempt {attempt}");
    }
    let (status, body) = request("POST", &server.http("/parties/main/fails-1"), "count").await;
    assert_eq!((status, body.as_str()), (200, "3"), "both attempts ran, then this count");
}

#[tokio::test]
async fn fan_out_bytes_are_bounded() {
    let server = Server::start(&["--shards", "5", "--max-fanout-bytes", "4096"]);
    let url = server.http("/parties/router/heavy");

    let (status, body) = request("POST", &url, &"x".repeat(1000)).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("takes 5000 bytes: the limit is 4096 (--max-fanout-bytes)"), "{body}");

    let (status, body) = request("POST", &url, &"x".repeat(500)).await;
    assert_eq!(status, 200, "2,500 bytes over 5 shards fit: {body}");
}
