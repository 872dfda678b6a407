//! The room API beyond messages: connection state and tags, close codes
//! and socket errors, auth hooks before the upgrade and before a request,
//! and the environment.

mod common;

use std::time::Duration;

use common::*;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// Receives text messages until one satisfies `matches`; returns it.
async fn recv_matching(socket: &mut Socket, matches: impl Fn(&str) -> bool) -> String {
    for _ in 0..50 {
        let text = recv_text(socket).await;
        if matches(&text) {
            return text;
        }
    }
    panic!("no matching message among the next 50");
}

/// Receives messages for `quiet` and returns the texts.
async fn drain(socket: &mut Socket, quiet: Duration) -> Vec<String> {
    let mut texts = Vec::new();
    let deadline = tokio::time::Instant::now() + quiet;
    while let Ok(Some(Ok(message))) = tokio::time::timeout_at(deadline, futures_util::StreamExt::next(socket)).await {
        if let Message::Text(text) = message {
            texts.push(text.to_string());
        }
    }
    texts
}

#[tokio::test]
async fn state_survives_instance_restart() {
    let server = Server::with_example("faulty", &[]);
    let url = server.ws("/parties/main/keeper");
    let mut alice = connect(&format!("{url}?_pk=alice")).await;
    let mut bob = connect(&format!("{url}?_pk=bob")).await;

    send_text(&mut alice, "set-state-text seat 12").await;
    assert_eq!(recv_text(&mut alice).await, "state set");

    // A trap in bob's message closes bob and restarts the instance.
    send_text(&mut bob, "panic").await;
    let (code, _) = recv_close(&mut bob).await;
    assert_eq!(code, 1011);

    let line = server.wait_for_log(&["on-start alice state="]).await;
    assert!(line.contains("on-start alice state=seat 12"), "on-start lists alice with her state: {line}");
    send_text(&mut alice, "count").await;
    assert_eq!(recv_text(&mut alice).await, "1", "alice talks to a new instance");
}

#[tokio::test]
async fn state_over_limit_is_rejected() {
    let server = Server::with_example("faulty", &[]);
    let mut alice = connect(&server.ws("/parties/main/big-state?_pk=alice")).await;

    send_text(&mut alice, "set-state 2049").await;
    assert_eq!(
        recv_text(&mut alice).await,
        "error: state of connection `alice` is 2049 bytes: the limit is 2048"
    );
    send_text(&mut alice, "set-state 2048").await;
    assert_eq!(recv_text(&mut alice).await, "state set");
}

#[tokio::test]
async fn presence_lists_users_from_state() {
    let server = Server::with_example("presence", &[]);
    let url = server.ws("/parties/main/lobby");
    let mut alice = connect(&format!("{url}?_pk=a&name=alice&role=admin")).await;
    let joined = json(&recv_text(&mut alice).await);
    assert_eq!(joined, serde_json::json!({
        "type": "presence",
        "users": [{"id": "a", "name": "alice", "role": "admin"}],
    }));

    let mut bob = connect(&format!("{url}?_pk=b&name=bob&role=guest")).await;
    let both = json(&recv_text(&mut bob).await);
    assert_eq!(both["users"][1], serde_json::json!({"id": "b", "name": "bob", "role": "guest"}));

    send_text(&mut bob, "rename robert").await;
    let renamed = recv_matching(&mut alice, |text| text.contains("robert")).await;
    assert_eq!(json(&renamed)["users"][1]["name"], "robert");
}

#[tokio::test]
async fn tag_broadcast_reaches_only_tagged() {
    let server = Server::with_example("presence", &[]);
    let url = server.ws("/parties/main/ops");
    let mut admin_1 = connect(&format!("{url}?_pk=a1&name=ann&role=admin")).await;
    let mut guest = connect(&format!("{url}?_pk=g&name=gus&role=guest")).await;
    let mut admin_2 = connect(&format!("{url}?_pk=a2&name=abe&role=admin")).await;
    for socket in [&mut admin_1, &mut guest, &mut admin_2] {
        drain(socket, Duration::from_millis(300)).await;
    }

    send_text(&mut guest, "to admin the build is red").await;
    assert_eq!(recv_text(&mut admin_1).await, "gus: the build is red");
    assert_eq!(recv_text(&mut admin_2).await, "gus: the build is red");
    assert_silent(&mut guest, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn tags_over_limit_fail_connection() {
    let server = Server::with_example("faulty", &[]);
    let ten: Vec<String> = (1..=10).map(|i| format!("t{i}")).collect();
    let mut accepted = connect(&server.ws(&format!("/parties/main/tagged?_pk=ok&tags={}", ten.join(",")))).await;
    send_text(&mut accepted, "echo in").await;
    assert_eq!(recv_text(&mut accepted).await, "in", "ten tags are allowed");

    let eleven: Vec<String> = (1..=11).map(|i| format!("t{i}")).collect();
    let mut rejected = connect(&server.ws(&format!("/parties/main/tagged?_pk=no&tags={}", eleven.join(",")))).await;
    let (code, reason) = recv_close(&mut rejected).await;
    assert_eq!(code, 1011);
    assert_eq!(reason, "room error: on-connect returned 11 tags: the limit is 10");
    // on-connect ran, so the room hears that the rejected connection left.
    server.wait_for_log(&["on-close no 1011"]).await;
}

#[tokio::test]
async fn on_close_gets_code_and_reason() {
    let server = Server::with_example("faulty", &[]);
    let mut alice = connect(&server.ws("/parties/main/closing?_pk=alice")).await;
    alice
        .close(Some(CloseFrame {
            code: CloseCode::from(4001),
            reason: "gone for lunch".into(),
        }))
        .await
        .expect("close frame sent");
    server.wait_for_log(&["on-close alice 4001 gone for lunch"]).await;
}

#[tokio::test]
async fn on_error_runs_when_socket_fails() {
    let server = Server::with_example("faulty", &[]);
    let mut raw = RawSocket::connect(server.addr, "/parties/main/failing?_pk=raw").expect("handshake accepted");
    // A text frame whose payload is not UTF-8.
    raw.send_frame(0x1, &[0xff, 0xfe]);
    assert_eq!(raw.read_close_code(), 1007);

    server.wait_for_log(&["on-error raw: text message is not valid UTF-8"]).await;
    server.wait_for_log(&["on-close raw 1007"]).await;
}

#[tokio::test]
async fn before_connect_rejects_with_http_response() {
    let server = Server::with_example("auth", &["--var", "AUTH_TOKEN=open-sesame"]);

    for (query, status, body) in [("user=eve", 401, "missing token"), ("token=guess&user=eve", 403, "invalid token")] {
        let url = server.ws(&format!("/parties/main/vault?{query}"));
        let err = tokio_tungstenite::connect_async(&url).await.expect_err("the upgrade is rejected");
        let tokio_tungstenite::tungstenite::Error::Http(response) = err else {
            panic!("expected an HTTP response to the upgrade, got {err}");
        };
        assert_eq!(response.status().as_u16(), status, "status for `{query}`");
        let received = String::from_utf8(response.body().clone().unwrap_or_default()).unwrap();
        assert_eq!(received, body, "body for `{query}`");
    }
}

#[tokio::test]
async fn before_connect_adds_headers() {
    let server = Server::with_example("auth", &["--var", "AUTH_TOKEN=open-sesame"]);
    let mut request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        server.ws("/parties/main/vault?token=open-sesame&user=alice"),
    )
    .unwrap();
    // A forged header is replaced by the one on-before-connect adds.
    request.headers_mut().insert("x-user", "mallory".parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.expect("the upgrade is accepted");
    assert_eq!(recv_text(&mut socket).await, "welcome alice");
}

#[tokio::test]
async fn before_request_guards_http() {
    let server = Server::with_example("auth", &["--var", "AUTH_TOKEN=open-sesame"]);
    let url = server.http("/parties/main/vault?user=bob");

    let (status, body) = request("GET", &url, "").await;
    assert_eq!((status, body.as_str()), (401, "missing token"));

    let client = reqwest::Client::new();
    let response = client
        .get(&url)
        .header("authorization", "Bearer open-sesame")
        .header("x-user", "mallory")
        .send()
        .await
        .expect("request sent");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.text().await.unwrap(), "hello bob");
}

#[tokio::test]
async fn env_file_is_read_and_never_logged() {
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("room.env");
    std::fs::write(&env_file, "# the room's secret\nAUTH_TOKEN=\"file-secret-42\"\n").unwrap();
    let env_path = env_file.to_str().unwrap();
    let server = Server::with_example("auth", &["--env-file", env_path]);

    let mut socket = connect(&server.ws("/parties/main/vault?token=file-secret-42&user=carol")).await;
    assert_eq!(recv_text(&mut socket).await, "welcome carol");

    let leaked: Vec<String> = server.logs().into_iter().filter(|line| line.contains("file-secret-42")).collect();
    assert!(leaked.is_empty(), "the secret reached the log: {leaked:?}");
}

#[tokio::test]
async fn env_var_overrides_env_file() {
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("room.env");
    std::fs::write(&env_file, "AUTH_TOKEN=from-file\n").unwrap();
    let env_path = env_file.to_str().unwrap();
    let server = Server::with_example("auth", &["--env-file", env_path, "--var", "AUTH_TOKEN=from-flag"]);

    let (status, body) = request("GET", &server.http("/parties/main/vault?user=dan"), "").await;
    assert_eq!((status, body.as_str()), (401, "missing token"));
    let client = reqwest::Client::new();
    for (token, status) in [("from-file", 403), ("from-flag", 200)] {
        let response = client
            .get(server.http("/parties/main/vault?user=dan"))
            .header("authorization", format!("Bearer {token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "token `{token}`");
    }
}

#[tokio::test]
async fn invalid_var_fails_start() {
    let (status, stderr) = run_to_exit(&["--var", "no-equals-sign"]);
    assert!(!status.success(), "a --var without `=` is rejected");
    assert!(stderr.contains("expected KEY=VALUE"), "{stderr}");
    assert!(!stderr.contains("no-equals-sign"), "the value, maybe a secret, is not repeated: {stderr}");
}
