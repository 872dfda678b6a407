//! Cases found by trying to break the server from outside. They cover room
//! responses that would desynchronise HTTP, idle and trickling connections,
//! one large broadcast, oversized module files and reserved close codes.
//! Ambiguous connection ids, odd room ids and floods of guest log lines
//! complete the list.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;

/// Sends one raw HTTP/1.1 request with `Connection: close` and returns the
/// whole response.
fn raw_request(server: &Server, request_head: &str, body: &str) -> String {
    let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        stream,
        "{request_head}\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("the server closes the connection");
    response
}

#[tokio::test]
async fn guest_framing_headers_are_dropped() {
    let server = Server::with_example("faulty", &[]);
    let response = raw_request(&server, "POST /parties/main/frames HTTP/1.1", "respond 200 content-length 1000");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.to_ascii_lowercase().contains("content-length: 5\r\n"), "{response}");
    assert!(response.ends_with("\r\n\r\nshort"), "{response}");

    let response = raw_request(&server, "POST /parties/main/frames HTTP/1.1", "respond 200 transfer-encoding chunked");
    assert!(response.ends_with("\r\n\r\nshort"), "{response}");
    server.wait_for_log(&["guest response header is set by the host: dropped", "header=transfer-encoding"]).await;

    let (status, body) = request("POST", &server.http("/parties/main/frames"), "respond 200 x-custom yes").await;
    assert_eq!((status, body.as_str()), (200, "short"), "ordinary headers pass");
}

#[tokio::test]
async fn guest_status_outside_200_599_is_500() {
    let server = Server::with_example("faulty", &[]);
    for status in [101, 100, 600, 999] {
        let (answered, body) = request("POST", &server.http("/parties/main/codes"), &format!("respond {status}")).await;
        assert_eq!(answered, 500, "status {status}: {body}");
        assert!(body.contains(&format!("room answered invalid status {status}")), "{body}");
    }
    let (status, body) = request("POST", &server.http("/parties/main/codes"), "respond 204").await;
    assert_eq!((status, body.as_str()), (204, ""), "204 passes, without a body");
    let response = raw_request(&server, "POST /parties/main/codes HTTP/1.1", "respond 204");
    assert!(!response.to_ascii_lowercase().contains("content-length"), "a 204 has no length: {response}");

    let response = raw_request(&server, "POST /parties/main/codes HTTP/1.1", "respond 200 content-type text/html");
    let content_types = response.to_ascii_lowercase().matches("content-type:").count();
    assert_eq!(content_types, 1, "with_header replaces the SDK's content-type: {response}");
}

#[tokio::test]
async fn silent_http_connection_times_out() {
    let server = Server::with_example("echo", &["--header-timeout", "1"]);
    let mut silent = std::net::TcpStream::connect(server.addr).unwrap();
    let mut trickling = std::net::TcpStream::connect(server.addr).unwrap();
    trickling.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").unwrap();

    for (name, stream) in [("silent", &mut silent), ("trickling", &mut trickling)] {
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut buffer = [0u8; 512];
        match stream.read(&mut buffer) {
            Ok(0) => {}
            Ok(n) => {
                let answer = String::from_utf8_lossy(&buffer[..n]).into_owned();
                assert!(answer.starts_with("HTTP/1.1 408"), "{name}: {answer}");
            }
            Err(err) => assert_ne!(err.kind(), std::io::ErrorKind::WouldBlock, "{name} stayed open for {WAIT:?}"),
        }
    }
}

#[tokio::test]
async fn http_connection_cap_pauses_accepting() {
    let server = Server::with_example("echo", &["--max-http-connections", "3", "--header-timeout", "1"]);
    // Three silent clients take every slot until the header timeout frees
    // them; the server keeps serving afterwards.
    let held: Vec<_> = (0..3).map(|_| std::net::TcpStream::connect(server.addr).unwrap()).collect();
    let (status, body) = request("GET", &server.http("/healthz"), "").await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    server.wait_for_log(&["HTTP connections at --max-http-connections: accepting paused"]).await;
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_large_broadcast_reaches_readers() {
    let server = Server::with_example("faulty", &["--max-outbound-bytes", "65536"]);
    let mut readers = Vec::new();
    for i in 0..3 {
        readers.push(connect(&server.ws(&format!("/parties/main/large?_pk=r{i}"))).await);
    }

    let (status, body) = request("POST", &server.http("/parties/main/large"), "big 200000").await;
    assert_eq!((status, body.as_str()), (200, "broadcast 200000 bytes"));
    for (i, reader) in readers.iter_mut().enumerate() {
        let text = recv_text(reader).await;
        assert_eq!(text.len(), 200_000, "reader {i}");
    }
    assert!(
        !server.logs().iter().any(|line| line.contains("slow consumer")),
        "a reader that keeps up is not a slow consumer"
    );
}

#[test]
fn oversized_module_file_is_rejected() {
    let dir = std::env::temp_dir().join(format!("partyhost-big-module-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("huge.wasm");
    // Sparse: the length is declared, no disk is used.
    std::fs::File::create(&path).unwrap().set_len(300 << 20).unwrap();

    let (status, stderr) = run_to_exit(&["--module", path.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is larger than 256 MiB"), "{stderr}");
}

#[tokio::test]
async fn silent_peer_close_has_no_reserved_code() {
    let server = Server::with_example("faulty", &["--ping-interval", "1"]);
    let mut silent = RawSocket::connect(server.addr, "/parties/main/quiet?_pk=silent").expect("handshake");
    server.wait_for_log(&["closing silent connection", "conn=silent"]).await;

    let code = tokio::task::spawn_blocking(move || silent.read_close()).await.unwrap();
    assert_eq!(code, None, "1006 must not be sent: the close frame carries no code");
}

#[tokio::test]
async fn invalid_utf8_pk_is_rejected() {
    let server = Server::with_example("echo", &[]);
    for pk in ["%ff", "%fe", "a%c3"] {
        let error = tokio_tungstenite::connect_async(server.ws(&format!("/parties/main/ids?_pk={pk}")))
            .await
            .expect_err("an id that is not UTF-8 is rejected");
        let tokio_tungstenite::tungstenite::Error::Http(response) = error else {
            panic!("expected an HTTP answer for {pk}, got {error}");
        };
        assert_eq!(response.status(), 400, "{pk}");
    }

    let mut socket = connect(&server.ws("/parties/main/ids?_pk=caf%C3%A9+au+lait")).await;
    let greeting = json(&recv_text(&mut socket).await);
    assert_eq!(greeting["connection"], "café au lait", "valid percent-encoding and `+` decode");
}

#[tokio::test]
async fn odd_room_ids_are_handled() {
    let server = Server::with_example("echo", &[]);
    // HTTP clients remove dot segments, so these go out raw.
    for path in ["/parties/main/..", "/parties/main/.", "/parties/main/../../etc/passwd"] {
        let response = raw_request(&server, &format!("GET {path} HTTP/1.1"), "");
        assert!(response.starts_with("HTTP/1.1 400"), "{path}: {response}");
        assert!(response.contains("must not be `.` or `..`"), "{path}: {response}");
    }
    let cases = [
        (&*format!("/parties/router/{}", "r".repeat(126)), 400),
        (&*format!("/parties/router/{}", "r".repeat(125)), 200),
        ("/parties/main/trailing/", 200),
        ("/parties/main/trailing/sub/path", 200),
    ];
    for (path, expected) in cases {
        let (status, body) = request("POST", &server.http(path), "").await;
        assert_eq!(status, expected, "{path}: {body}");
    }
    let (_, body) = request("GET", &server.http("/parties/main/caf%C3%A9"), "").await;
    assert!(body.contains("`café` is invalid: `é` is not allowed"), "{body}");
}

#[tokio::test]
async fn guest_log_lines_are_escaped_and_limited() {
    let server = Server::with_example("faulty", &[]);
    let (status, _) = request("POST", &server.http("/parties/main/chatty"), "log one\nFORGED line").await;
    assert_eq!(status, 200);
    server.wait_for_log(&["one\\nFORGED line"]).await;
    assert!(
        !server.logs().iter().any(|line| line.starts_with("FORGED")),
        "a guest newline does not start a log line"
    );

    let (status, body) = request("POST", &server.http("/parties/main/chatty"), "log-flood 5000").await;
    assert_eq!((status, body.as_str()), (200, "logged 5000"));
    // The room may log again once its bucket refills a little.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, _) = request("POST", &server.http("/parties/main/chatty"), "log after the flood").await;
    assert_eq!(status, 200);
    server.wait_for_log(&["after the flood"]).await;
    let logs = server.logs();
    let logged = logs.iter().filter(|line| line.contains("flood line")).count() as u64;
    let dropped: u64 = logs
        .iter()
        .filter(|line| line.contains("guest log lines dropped") && line.contains("room=chatty"))
        .filter_map(|line| line.split("dropped=").nth(1)?.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    assert!(logged < 1500, "{logged} of 5000 flood lines were logged: the burst is 1000");
    assert_eq!(logged + dropped, 5000, "every flood line is logged or counted as dropped");
}

#[tokio::test]
async fn vanished_client_not_protocol_error() {
    let server = Server::with_example("echo", &[]);
    let mut socket = connect(&server.ws("/parties/main/leaver?_pk=gone")).await;
    recv_text(&mut socket).await;
    drop(socket);
    let (status, _) = request("GET", &server.http("/healthz"), "").await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !server.logs().iter().any(|line| line.contains("protocol error")),
        "{}",
        server.logs().join("\n")
    );
}

#[tokio::test]
async fn invalid_client_close_code_fails_connection() {
    let server = Server::with_example("faulty", &[]);
    for (i, (name, payload)) in [("code 999", vec![0x03, 0xe7]), ("code 1005", vec![0x03, 0xed])].into_iter().enumerate() {
        let path = format!("/parties/main/closer?_pk=raw-{i}");
        let mut raw = RawSocket::connect(server.addr, &path).expect("handshake");
        raw.send_frame(0x8, &payload);
        // Failing the connection may skip the close frame: the socket ends.
        let ended = tokio::task::spawn_blocking(move || {
            let mut buffer = [0u8; 256];
            loop {
                match raw.stream.read(&mut buffer) {
                    Ok(0) | Err(_) => return true,
                    Ok(_) => continue,
                }
            }
        });
        assert!(ended.await.unwrap(), "{name}: the server ends the connection");
    }
    // The room sees each close as a protocol error.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let closes = server.logs().iter().filter(|line| line.contains("1002 Protocol violation") && line.contains("on-close raw-")).count();
        if closes == 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "on-close ran {closes} times with 1002, not 2");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (status, body) = request("POST", &server.http("/parties/main/closer"), "connections").await;
        assert_eq!(status, 200);
        if body == "0" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the room still counts {body} connections");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn bad_environment_fails_before_listening() {
    let (status, stderr) = run_to_exit(&["--env-file", "/nonexistent/.env"]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("failed to read env file `/nonexistent/.env`"), "{stderr}");
    assert!(!stderr.contains("listening"), "the server never announced an address: {stderr}");
}
