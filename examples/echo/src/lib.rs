//! A room that echoes every message back to its sender, text as text and
//! binary as binary.
//!
//! On connect it sends one JSON line saying what it sees: the room id, the
//! connection id and the URL of the upgrade request. HTTP requests are
//! answered with the same kind of JSON, plus the method and the body.

use partyhost_sdk::{export_room, Connection, Message, Request, Response, Room};
use serde_json::json;

struct Echo;

impl Room for Echo {
    fn new() -> Self {
        Echo
    }

    fn on_connect(&mut self, connection: &Connection, request: &Request) {
        connection.send(Message::json(&json!({
            "room": partyhost_sdk::room_id(),
            "connection": connection.id(),
            "url": request.url,
        })));
    }

    fn on_message(&mut self, sender: &Connection, message: Message) {
        sender.send(message);
    }

    fn on_request(&mut self, request: Request) -> Response {
        Response::json(
            200,
            &json!({
                "room": partyhost_sdk::room_id(),
                "method": request.method,
                "url": request.url,
                "body": String::from_utf8_lossy(&request.body),
            }),
        )
    }
}

export_room!(Echo);
