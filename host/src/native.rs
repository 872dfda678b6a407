//! A native Rust twin of the built-in default room, for benchmarks.
//!
//! `--native-default-room` runs this code in place of the WebAssembly
//! component. It behaves like `examples/sharding` and reaches connections
//! through the same host functions a guest calls, so a benchmark that runs
//! both shows what the WebAssembly layer costs. It has no instance to trap
//! or restart, and no production use.

use crate::guest::RoomHost;
use crate::runtime::bindings::partyhost::room::room::Host as _;
use crate::runtime::{GuestAdmission, GuestMessage, GuestRequest, GuestResponse};

/// Greets a connection with the room's id.
pub fn on_connect(host: &mut RoomHost, connection: &str) {
    let greeting = format!("connected to {}", host.room);
    host.send(connection.to_string(), GuestMessage::Text(greeting));
}

/// Broadcasts the request body to the room's connections and answers `OK`.
pub fn on_request(host: &mut RoomHost, request: &GuestRequest) -> GuestResponse {
    let body = String::from_utf8_lossy(&request.body);
    let text = format!("received {body} (via room {})", host.room);
    host.broadcast(GuestMessage::Text(text), Vec::new());
    GuestResponse {
        status: 200,
        headers: vec![("content-type".into(), "text/plain; charset=utf-8".into())],
        body: b"OK".to_vec(),
    }
}

/// Broadcasts a published message, as the SDK's default `on-publish` does.
pub fn on_publish(host: &mut RoomHost, message: &GuestMessage) {
    host.broadcast(message.clone(), Vec::new());
}

/// Admits every connection and request unchanged.
pub fn admit() -> GuestAdmission {
    GuestAdmission::Allow(Vec::new())
}
