//! Host limits and bad input on the wire: message and body sizes,
//! connection limits, slow consumers, silent peers, connection storms,
//! invalid frames and graceful shutdown.

mod common;

use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

/// Asks the faulty room `room` how many connections it has open.
async fn open_connections(server: &Server, room: &str) -> String {
    let (status, body) = request("POST", &server.http(&format!("/parties/main/{room}")), "connections").await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Keeps reading a socket in the background, so it answers pings, and
/// counts the text and binary messages it receives.
fn drain(mut socket: Socket) -> Arc<AtomicUsize> {
    let received = Arc::new(AtomicUsize::new(0));
    let counter = received.clone();
    tokio::spawn(async move {
        while let Some(Ok(message)) = socket.next().await {
            if matches!(message, Message::Text(_) | Message::Binary(_)) {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    received
}

#[tokio::test]
async fn oversized_message_closes_1009() {
    let server = Server::with_example("faulty", &["--max-message-bytes", "1024"]);
    let mut bystander = connect(&server.ws("/parties/main/sizes?_pk=bystander")).await;
    let mut sender = connect(&server.ws("/parties/main/sizes?_pk=sender")).await;

    send_text(&mut sender, &format!("echo {}", "x".repeat(1019))).await;
    assert_eq!(recv_text(&mut sender).await.len(), 1019, "a message of exactly 1024 bytes passes");

    send_text(&mut sender, &"x".repeat(2000)).await;
    let (code, reason) = recv_close(&mut sender).await;
    assert_eq!(code, 1009, "{reason}");

    send_text(&mut bystander, "echo fine").await;
    assert_eq!(recv_text(&mut bystander).await, "fine");
}

#[tokio::test]
async fn oversized_body_gets_413() {
    let server = Server::with_example("echo", &["--max-body-bytes", "1024"]);
    let url = server.http("/parties/main/bodies");

    let (status, body) = request("POST", &url, &"y".repeat(1024)).await;
    assert_eq!(status, 200, "a body of exactly 1024 bytes passes: {body}");
    let (status, body) = request("POST", &url, &"y".repeat(1025)).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("larger than 1024 bytes (--max-body-bytes)"), "{body}");

    // A chunked body declares no length; the limit applies while reading.
    let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let chunk = "z".repeat(1500);
    write!(
        stream,
        "POST /parties/main/bodies HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         {:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
}

#[tokio::test]
async fn connection_limits_answer_503_before_upgrade() {
    let server = Server::with_example("echo", &["--max-connections-per-room", "2", "--max-connections", "3"]);
    let _a = connect(&server.ws("/parties/main/full?_pk=a")).await;
    let _b = connect(&server.ws("/parties/main/full?_pk=b")).await;

    let error = tokio_tungstenite::connect_async(server.ws("/parties/main/full?_pk=c")).await.unwrap_err();
    let tokio_tungstenite::tungstenite::Error::Http(response) = error else {
        panic!("expected an HTTP answer, got {error}");
    };
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned();
    assert!(body.contains("maximum of 2 connections open (--max-connections-per-room)"), "{body}");

    let _other = connect(&server.ws("/parties/main/other?_pk=d")).await;
    let error = tokio_tungstenite::connect_async(server.ws("/parties/main/third?_pk=e")).await.unwrap_err();
    let tokio_tungstenite::tungstenite::Error::Http(response) = error else {
        panic!("expected an HTTP answer, got {error}");
    };
    assert_eq!(response.status(), 503, "the fourth connection exceeds --max-connections");
    let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned();
    assert!(body.contains("maximum of 3 connections open (--max-connections)"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_closed_without_delaying_others() {
    let server = Server::with_example("faulty", &["--max-outbound-bytes", "1048576"]);
    let mut slow = RawSocket::connect(server.addr, "/parties/main/stream?_pk=slow").expect("handshake");
    let readers: Vec<_> = futures_util::future::join_all(
        (0..3).map(|i| connect_owned(server.ws(&format!("/parties/main/stream?_pk=reader-{i}")))),
    )
    .await
    .into_iter()
    .map(drain)
    .collect();

    // A stream of 1000 bursts of 20 broadcasts of 1 KiB: 20 MB, far more
    // than the kernel buffers of a socket that nobody reads plus its 1 MiB
    // queue, while a reader falls behind by a whole queue only if it misses
    // 50 bursts in a row.
    for _ in 0..1000 {
        let (status, body) = request("POST", &server.http("/parties/main/stream"), "flood 20").await;
        assert_eq!((status, body.as_str()), (200, "flooded 20"));
    }

    server.wait_for_log(&["closing slow consumer", "room=stream", "conn=slow"]).await;
    let deadline = Instant::now() + WAIT;
    while readers.iter().any(|count| count.load(Ordering::Relaxed) < 20_000) {
        assert!(Instant::now() < deadline, "readers got {:?} of 20000 messages",
            readers.iter().map(|c| c.load(Ordering::Relaxed)).collect::<Vec<_>>());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for count in &readers {
        assert_eq!(count.load(Ordering::Relaxed), 20_000, "every reader gets every message exactly once");
    }

    server.wait_for_log(&["on-close slow"]).await;
    assert_eq!(open_connections(&server, "stream").await, "3");

    // The slow client finds its stream ended once it reads: either the
    // close frame got through, or the socket was dropped.
    slow.stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        match slow.stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(_) => continue,
        }
    }
}

async fn connect_owned(url: String) -> Socket {
    connect(&url).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peer_is_closed_after_two_ping_intervals() {
    let server = Server::with_example("faulty", &["--ping-interval", "1"]);
    let live = connect(&server.ws("/parties/main/pings?_pk=live")).await;
    let _live_reader = drain(live);
    // The raw client completes the handshake, then never reads or writes
    // again and keeps its TCP connection open: a peer that dropped off the
    // network.
    let _silent = RawSocket::connect(server.addr, "/parties/main/pings?_pk=silent").expect("handshake");
    assert_eq!(open_connections(&server, "pings").await, "2");

    server.wait_for_log(&["closing silent connection", "conn=silent"]).await;
    server.wait_for_log(&["on-close silent"]).await;
    assert_eq!(open_connections(&server, "pings").await, "1", "the live client answers pings and stays:\n{}", server.logs().join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_storm_is_admitted_at_bounded_rate() {
    let server = Server::with_example("faulty", &["--connect-rate", "50", "--connect-burst", "20"]);
    let clients = 150;

    let attempts = futures_util::future::join_all((0..clients).map(|i| {
        let url = server.ws(&format!("/parties/main/storm?_pk=client-{i}"));
        async move {
            let mut rejected = 0;
            for _ in 0..100 {
                match tokio_tungstenite::connect_async(&url).await {
                    Ok((socket, _)) => return (socket, rejected),
                    Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                        assert_eq!(response.status(), 503);
                        assert_eq!(response.headers()["retry-after"], "1");
                        rejected += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(other) => panic!("client {i} failed: {other}"),
                }
            }
            panic!("client {i} was rejected 100 times");
        }
    }))
    .await;

    let rejected: usize = attempts.iter().map(|(_, rejected)| rejected).sum();
    assert!(rejected > 0, "{clients} simultaneous handshakes exceeded the burst of 20 without a 503");
    let sockets: Vec<Socket> = attempts.into_iter().map(|(socket, _)| socket).collect();
    let readers: Vec<_> = sockets.into_iter().map(drain).collect();
    assert_eq!(open_connections(&server, "storm").await, clients.to_string(), "every client got in on retry");
    drop(readers);
}

#[tokio::test]
async fn invalid_utf8_closes_1007_before_guest() {
    let server = Server::with_example("faulty", &[]);
    let mut raw = RawSocket::connect(server.addr, "/parties/main/bytes?_pk=raw").expect("handshake");

    raw.send_frame(0x1, &[b'o', b'k', 0xff, 0xfe]);
    assert_eq!(raw.read_close_code(), 1007);

    let (status, body) = request("POST", &server.http("/parties/main/bytes"), "count").await;
    assert_eq!((status, body.as_str()), (200, "1"), "the invalid frame never reached the guest");
}

#[tokio::test]
async fn malformed_http_gets_400() {
    let server = Server::with_example("echo", &[]);
    let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(b"THIS IS NOT HTTP\r\n\r\n").unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");

    let (status, _) = request("GET", &server.http("/healthz"), "").await;
    assert_eq!(status, 200, "the server keeps serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_sockets_1001_and_exits_0() {
    let mut server = Server::with_example("faulty", &[]);
    let mut first = connect(&server.ws("/parties/main/bye?_pk=first")).await;
    let mut second = connect(&server.ws("/parties/main/bye?_pk=second")).await;

    let url = server.http("/parties/main/bye");
    let in_flight = tokio::spawn(async move { request("POST", &url, "spin 500").await });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let status = tokio::task::block_in_place(|| server.terminate());
    assert_eq!(status.code(), Some(0), "{}", server.logs().join("\n"));

    let (status, body) = in_flight.await.unwrap();
    assert_eq!((status, body.as_str()), (200, "spun 500"), "the in-flight request finished");
    for socket in [&mut first, &mut second] {
        let (code, reason) = recv_close(socket).await;
        assert_eq!(code, 1001, "{reason}");
    }
    server.wait_for_log(&["on-close first"]).await;
    server.wait_for_log(&["on-close second"]).await;
}
