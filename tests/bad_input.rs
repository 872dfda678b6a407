//! Bad input at every door: module files, URLs, handshakes and guests that
//! trap. Each gets a clear error, and the server keeps serving everyone
//! else.

mod common;

use common::*;

#[test]
fn missing_module_names_path_and_fails() {
    let (status, stderr) = run_to_exit(&["--module", "/nonexistent/room.wasm"]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("failed to read module `/nonexistent/room.wasm`"), "{stderr}");
}

#[test]
fn garbage_module_is_not_a_component() {
    let dir = std::env::temp_dir().join(format!("partyhost-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases: [(&str, &[u8]); 2] = [
        ("garbage.wasm", b"this is not wasm at all"),
        // A valid core module header: WebAssembly, but not a component.
        ("core.wasm", b"\0asm\x01\0\0\0"),
    ];
    for (name, bytes) in cases {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let (status, stderr) = run_to_exit(&["--module", path.to_str().unwrap()]);
        assert_eq!(status.code(), Some(1), "{name}: {stderr}");
        let expected = format!("`{}` is not a WebAssembly component", path.display());
        assert!(stderr.contains(&expected), "{name}: {stderr}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn component_without_room_exports_is_rejected() {
    let module = example("not-a-room");
    let (status, stderr) = run_to_exit(&["--module", module.to_str().unwrap()]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    let expected = format!("`{}` is not a partyhost room", module.display());
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(stderr.contains("on-start"), "the error names the missing export: {stderr}");
}

#[tokio::test]
async fn bad_urls_get_client_errors() {
    let server = Server::with_example("echo", &[]);
    let long_id = "a".repeat(129);
    let cases = [
        ("/parties/lobby/room", 404, "unknown party `lobby`"),
        ("/parties/main/", 400, "room id is empty"),
        ("/parties/router", 400, "room id is empty"),
        (&*format!("/parties/main/{long_id}"), 400, "room id is 129 bytes long: the limit is 128"),
        ("/parties/main/a%2Fb", 400, "room id `a/b` is invalid"),
        ("/parties/main/caf%C3%A9", 400, "is invalid"),
        ("/elsewhere", 404, "rooms live at /parties/<party>/<room>"),
    ];
    for (path, expected_status, expected_body) in cases {
        let (status, body) = request("GET", &server.http(path), "").await;
        assert_eq!(status, expected_status, "{path}: {body}");
        assert!(body.contains(expected_body), "{path}: `{body}` lacks `{expected_body}`");
    }

    let max_id = "b".repeat(128);
    let (status, body) = request("GET", &server.http(&format!("/parties/main/{max_id}")), "").await;
    assert_eq!(status, 200, "a 128-byte room id is valid: {body}");
}

#[tokio::test]
async fn bad_handshakes_get_400() {
    let server = Server::with_example("echo", &[]);
    let long_pk = "p".repeat(257);
    let error = tokio_tungstenite::connect_async(server.ws(&format!("/parties/main/r?_pk={long_pk}")))
        .await
        .expect_err("a 257-byte connection id is rejected");
    match error {
        tokio_tungstenite::tungstenite::Error::Http(response) => assert_eq!(response.status(), 400),
        other => panic!("expected an HTTP 400, got {other}"),
    }

    // Upgrade headers without a Sec-WebSocket-Key.
    let client = reqwest::Client::new();
    let response = client
        .get(server.http("/parties/main/r"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body = response.text().await.unwrap();
    assert!(body.contains("invalid WebSocket handshake"), "{body}");

    let (status, _) = request("GET", &server.http("/healthz"), "").await;
    assert_eq!(status, 200, "the server keeps serving");
}

#[tokio::test]
async fn http_trap_answers_500_and_room_recovers() {
    let server = Server::with_example("faulty", &[]);
    let url = server.http("/parties/main/fragile");

    let (status, body) = request("POST", &url, "count").await;
    assert_eq!((status, body.as_str()), (200, "1"));
    let (status, body) = request("POST", &url, "panic").await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("the room trapped"), "{body}");
    server.wait_for_log(&["guest trapped", "room=fragile", "export=\"on-request\""]).await;

    let (status, body) = request("POST", &url, "count").await;
    assert_eq!((status, body.as_str()), (200, "1"), "a fresh instance counts from zero");
}

#[tokio::test]
async fn websocket_trap_closes_socket_1011() {
    let server = Server::with_example("faulty", &[]);
    let mut bystander = connect(&server.ws("/parties/main/fragile?_pk=bystander")).await;
    let mut culprit = connect(&server.ws("/parties/main/fragile?_pk=culprit")).await;

    send_text(&mut culprit, "panic").await;
    let (code, reason) = recv_close(&mut culprit).await;
    assert_eq!(code, 1011, "{reason}");
    assert!(reason.contains("room error"), "{reason}");
    server.wait_for_log(&["guest trapped", "room=fragile", "conn=culprit", "export=\"on-message\""]).await;

    send_text(&mut bystander, "echo still here").await;
    assert_eq!(recv_text(&mut bystander).await, "still here");
    send_text(&mut bystander, "count").await;
    assert_eq!(recv_text(&mut bystander).await, "2", "the restarted instance served two calls");
}

#[test]
fn module_over_instance_limits_names_flag() {
    let module = example("echo");
    let (status, stderr) = run_to_exit(&["--module", module.to_str().unwrap(), "--table-elements", "1"]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    let expected = format!("`{}` does not fit the instance limits", module.display());
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(stderr.contains("Raise --table-elements"), "{stderr}");
}
