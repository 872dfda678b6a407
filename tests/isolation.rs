//! Misbehaving rooms: endless loops, unbounded allocation and recursion,
//! panics in `on-start`. Each fault stays inside its room: the call fails,
//! the room restarts with its sockets open, and other rooms serve on.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Asserts that `room` on `server` runs and answers a well-behaved call.
async fn assert_room_serves(server: &Server, room: &str) {
    let (status, body) = request("POST", &server.http(&format!("/parties/main/{room}")), "echo alive").await;
    assert_eq!((status, body.as_str()), (200, "alive"), "room {room} serves alongside the fault");
}

#[tokio::test]
async fn endless_loop_is_interrupted_at_deadline() {
    let server = Server::with_example("faulty", &["--call-timeout", "300"]);
    let url = server.http("/parties/main/spinner");

    let started = Instant::now();
    let (status, body) = request("POST", &url, "loop").await;
    let elapsed = started.elapsed();
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("exceeded its 300 ms deadline"), "{body}");
    assert!(elapsed >= Duration::from_millis(300), "the loop was stopped after {elapsed:?}, before its deadline");
    server.wait_for_log(&["guest trapped", "room=spinner", "export=\"on-request\"", "deadline"]).await;

    let (status, body) = request("POST", &url, "count").await;
    assert_eq!((status, body.as_str()), (200, "1"), "the room restarted with a fresh instance");
    assert_room_serves(&server, "bystander").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_loop_leaves_other_rooms_latency() {
    let server = Server::with_example("faulty", &["--call-timeout", "4000"]);
    let mut socket = connect(&server.ws("/parties/main/steady?_pk=probe")).await;

    async fn median_round_trip(socket: &mut Socket, rounds: usize) -> Duration {
        let mut samples = Vec::with_capacity(rounds);
        for i in 0..rounds {
            let started = Instant::now();
            send_text(socket, &format!("echo {i}")).await;
            assert_eq!(recv_text(socket).await, i.to_string());
            samples.push(started.elapsed());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        samples.sort();
        samples[rounds / 2]
    }

    let baseline = median_round_trip(&mut socket, 60).await;

    let spin_url = server.http("/parties/main/spinner");
    let spinner = tokio::spawn(async move { request("POST", &spin_url, "loop").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let during = median_round_trip(&mut socket, 60).await;
    assert!(!spinner.is_finished(), "the spinning call ended before the measurement did");

    let (status, _) = spinner.await.unwrap();
    assert_eq!(status, 500, "the spinning call is interrupted at its deadline");
    // A guest yields to other tasks at every epoch tick (5 ms), so another
    // room waits at most about one tick for a worker thread.
    assert!(
        during <= baseline + Duration::from_millis(10),
        "median echo round trip rose from {baseline:?} to {during:?} while another room spun"
    );
}

#[tokio::test]
async fn memory_growth_fails_inside_guest() {
    let server = Server::with_example("faulty", &["--memory-limit", "16"]);
    let url = server.http("/parties/main/hog");

    let (status, body) = request("POST", &url, "alloc").await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("the room trapped"), "{body}");
    server.wait_for_log(&["guest trapped", "room=hog"]).await;

    let (status, body) = request("POST", &url, "count").await;
    assert_eq!((status, body.as_str()), (200, "1"), "the room restarted with a fresh instance");
    assert_room_serves(&server, "bystander").await;
}

#[tokio::test]
async fn unbounded_recursion_is_a_trap() {
    let server = Server::with_example("faulty", &[]);
    let url = server.http("/parties/main/deep");

    let (status, body) = request("POST", &url, "recurse").await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("the room trapped: stack overflow"), "{body}");
    server.wait_for_log(&["guest trapped", "room=deep"]).await;

    let (status, body) = request("POST", &url, "count").await;
    assert_eq!((status, body.as_str()), (200, "1"));
    assert_room_serves(&server, "bystander").await;
}

#[tokio::test]
async fn trap_restart_keeps_sockets_open() {
    let server = Server::with_example("faulty", &[]);
    let mut first = connect(&server.ws("/parties/main/shaky?_pk=first")).await;
    let mut second = connect(&server.ws("/parties/main/shaky?_pk=second")).await;

    let (status, _) = request("POST", &server.http("/parties/main/shaky"), "panic").await;
    assert_eq!(status, 500);
    server.wait_for_log(&["instance restarted", "room=shaky"]).await;

    for (name, socket) in [("first", &mut first), ("second", &mut second)] {
        send_text(socket, &format!("echo {name} still open")).await;
        assert_eq!(recv_text(socket).await, format!("{name} still open"));
    }
    let (status, body) = request("POST", &server.http("/parties/main/shaky"), "connections").await;
    assert_eq!((status, body.as_str()), (200, "2"), "the new instance sees both connections");
}

#[tokio::test]
async fn crash_on_start_backs_off() {
    let server = Server::with_example("faulty", &[]);
    let url = server.http("/parties/main/crash-on-start-1");

    let until = Instant::now() + Duration::from_millis(1500);
    let mut answers = 0;
    while Instant::now() < until {
        let (status, body) = request("POST", &url, "count").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("room is unavailable"), "{body}");
        answers += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(answers > 20, "only {answers} requests were answered in 1.5 s");

    let starts: Vec<u64> = server
        .logs()
        .iter()
        .filter(|line| line.contains("guest trapped while starting") && line.contains("room=crash-on-start-1"))
        .map(|line| {
            let value = line.split("retry_in_ms=").nth(1).expect("start failures log retry_in_ms");
            value.split_whitespace().next().unwrap().parse().unwrap()
        })
        .collect();
    // Backoff from 100 ms, doubling: starts at 0, 0.1, 0.3, 0.7 and 1.5 s.
    assert!((2..=6).contains(&starts.len()), "{} start attempts in 1.5 s: {starts:?}", starts.len());
    assert!(starts.windows(2).all(|pair| pair[1] == pair[0] * 2), "backoff doubles: {starts:?}");
    assert_room_serves(&server, "bystander").await;
}

#[tokio::test]
async fn full_room_pool_answers_503_and_1013() {
    let server = Server::with_example("faulty", &["--max-rooms", "2", "--room-idle-timeout", "3600"]);
    // Rooms with a connection are not idle, so they keep their slots.
    let first = connect(&server.ws("/parties/main/one?_pk=a")).await;
    let second = connect(&server.ws("/parties/main/two?_pk=b")).await;

    let client = reqwest::Client::new();
    let response = client.post(server.http("/parties/main/three")).body("echo x").send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let body = response.text().await.unwrap();
    assert!(body.contains("maximum of 2 rooms (--max-rooms)"), "{body}");

    let mut socket = connect(&server.ws("/parties/main/three")).await;
    let (code, reason) = recv_close(&mut socket).await;
    assert_eq!(code, 1013, "{reason}");

    // Once its connection is gone, a room leaves the full pool at the next
    // miss, long before --room-idle-timeout.
    drop(first);
    drop(second);
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = request("POST", &server.http("/parties/main/three"), "echo in").await;
        if status == 200 {
            assert_eq!(body, "in");
            break;
        }
        assert!(Instant::now() < deadline, "room three never got a slot: {status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.wait_for_log(&["room evicted early: the room pool is full"]).await;
}
