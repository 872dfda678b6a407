//! Rooms reached directly at `/parties/main/<room>`: HTTP, WebSocket text
//! and binary messages, and a chat relay between connections.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn main_http_reaches_the_room() {
    let server = Server::with_example("echo", &[]);

    let (status, body) = request("PUT", &server.http("/parties/main/room-1.a_b?x=1"), "payload").await;
    assert_eq!(status, 200, "{body}");
    let echoed = json(&body);
    assert_eq!(echoed["room"], "room-1.a_b");
    assert_eq!(echoed["method"], "PUT");
    assert_eq!(echoed["url"], "/parties/main/room-1.a_b?x=1");
    assert_eq!(echoed["body"], "payload");
}

#[tokio::test]
async fn main_websocket_echoes_text_and_binary() {
    let server = Server::with_example("echo", &[]);
    let mut socket = connect(&server.ws("/parties/main/echo-room?_pk=bob")).await;

    let greeting = json(&recv_text(&mut socket).await);
    assert_eq!(greeting["room"], "echo-room");
    assert_eq!(greeting["connection"], "bob");

    send_text(&mut socket, "héllo").await;
    assert_eq!(recv_text(&mut socket).await, "héllo");

    let bytes = vec![0u8, 1, 2, 255, 254];
    socket.send(Message::binary(bytes.clone())).await.unwrap();
    match recv(&mut socket).await {
        Message::Binary(received) => assert_eq!(received.to_vec(), bytes),
        other => panic!("expected the binary message back, got {other:?}"),
    }
}

#[tokio::test]
async fn chat_relays_to_everyone_but_sender() {
    let server = Server::with_example("chat", &[]);
    let url = server.ws("/parties/main/chat");
    let mut alice = connect(&format!("{url}?_pk=alice")).await;
    let mut bob = connect(&format!("{url}?_pk=bob")).await;
    let mut carol = connect(&format!("{url}?_pk=carol")).await;
    // The handshake completes after on-connect ran, so all three are in the
    // room now.
    send_text(&mut alice, "hi from alice").await;
    assert_eq!(recv_text(&mut bob).await, "hi from alice");
    assert_eq!(recv_text(&mut carol).await, "hi from alice");
    assert_silent(&mut alice, Duration::from_millis(300)).await;
}
