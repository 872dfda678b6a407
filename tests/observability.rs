//! What operators see: Prometheus metrics, health and readiness, the admin
//! listing of a logical room's shards, and JSON logs.

mod common;

use common::*;

/// The value of the sample whose line starts with `series` (name and
/// labels), or `None` when the metrics have no such sample.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

#[tokio::test]
async fn metrics_count_connections_messages_and_fan_outs() {
    let server = Server::start(&[]);
    let mut sockets = Vec::new();
    for i in 0..3 {
        let mut socket = connect(&server.ws(&format!("/parties/router/obs?_pk=c{i}"))).await;
        recv_text(&mut socket).await;
        sockets.push(socket);
    }
    let (status, _) = request("POST", &server.http("/parties/router/obs"), "hi").await;
    assert_eq!(status, 200);
    for socket in sockets.iter_mut() {
        recv_text(socket).await;
    }

    let (status, metrics) = request("GET", &server.http("/metrics"), "").await;
    assert_eq!(status, 200);
    for k in 1..=3 {
        let shard = format!("{{room=\"obs\",shard=\"{k}\"}}");
        assert_eq!(sample(&metrics, &format!("partyhost_connections{shard}")), Some(1.0), "{metrics}");
        // The greeting and the broadcast.
        assert_eq!(sample(&metrics, &format!("partyhost_messages_out_total{shard}")), Some(2.0), "{metrics}");
    }
    assert_eq!(sample(&metrics, "partyhost_fanout_duration_seconds_count"), Some(1.0), "{metrics}");
    assert_eq!(
        sample(&metrics, "partyhost_guest_call_duration_seconds_count{export=\"on-connect\"}"),
        Some(3.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn metrics_count_traps_and_restarts() {
    let server = Server::with_example("faulty", &[]);
    let (status, _) = request("POST", &server.http("/parties/main/oops"), "panic").await;
    assert_eq!(status, 500);
    server.wait_for_log(&["instance restarted", "room=oops"]).await;

    let (_, metrics) = request("GET", &server.http("/metrics"), "").await;
    assert_eq!(
        sample(&metrics, "partyhost_traps_total{room=\"oops\",shard=\"\",export=\"on-request\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(sample(&metrics, "partyhost_restarts_total{room=\"oops\",shard=\"\"}"), Some(1.0), "{metrics}");
}

#[tokio::test]
async fn admin_listener_lists_shards_and_serves_metrics() {
    let server = Server::start(&["--admin-listen", "127.0.0.1:0"]);
    let admin = server.admin_addr().await;
    let mut sockets = Vec::new();
    for i in 0..2 {
        let mut socket = connect(&server.ws(&format!("/parties/router/lobby?_pk=c{i}"))).await;
        recv_text(&mut socket).await;
        sockets.push(socket);
    }

    let (status, body) = request("GET", &format!("http://{admin}/parties/router/lobby"), "").await;
    assert_eq!(status, 200, "{body}");
    let listing = json(&body);
    let loads: Vec<(String, u64)> = listing["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|shard| (shard["room"].as_str().unwrap().to_string(), shard["connections"].as_u64().unwrap()))
        .collect();
    let expected: Vec<(String, u64)> = [("lobby-1", 1), ("lobby-2", 1), ("lobby-3", 0), ("lobby-4", 0), ("lobby-5", 0)]
        .into_iter()
        .map(|(room, n)| (room.to_string(), n))
        .collect();
    assert_eq!(loads, expected);

    let (status, _) = request("GET", &format!("http://{admin}/metrics"), "").await;
    assert_eq!(status, 200);
    let (status, _) = request("GET", &server.http("/metrics"), "").await;
    assert_eq!(status, 404, "with --admin-listen, metrics stay off the public port");
}

#[tokio::test]
async fn health_and_readiness() {
    let server = Server::start(&[]);
    assert_eq!(request("GET", &server.http("/healthz"), "").await, (200, "ok".to_string()));
    assert_eq!(request("GET", &server.http("/readyz"), "").await, (200, "ready".to_string()));
}

#[tokio::test]
async fn json_logs_carry_room_and_conn_fields() {
    let server = Server::with_example("faulty", &["--log-format", "json"]);
    // The first client of a routed room lands on shard 1.
    let mut socket = connect(&server.ws("/parties/router/logged?_pk=writer")).await;
    send_text(&mut socket, "panic").await;
    recv_close(&mut socket).await;

    let line = server.wait_for_log(&["guest trapped"]).await;
    let event = json(&line);
    assert_eq!(event["level"], "ERROR", "{line}");
    assert_eq!(event["fields"]["room"], "logged-1", "{line}");
    assert_eq!(event["fields"]["shard"], 1, "{line}");
    assert_eq!(event["fields"]["conn"], "writer", "{line}");
    assert_eq!(event["fields"]["export"], "on-message", "{line}");
}
