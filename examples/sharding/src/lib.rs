//! The default room: the main party of PartyKit's reference sharding example
//! (partykit/example-sharding), which partyhost runs when no `--module` is
//! given.
//!
//! Each shard greets a new connection with its own room id, and broadcasts
//! the body of every HTTP request to its connections. Behind the router, one
//! POST to `/parties/router/<room>` reaches every shard, so every client of
//! the logical room receives it.

use partyhost_sdk::{export_room, Connection, Request, Response, Room};

struct Shard;

impl Room for Shard {
    fn new() -> Self {
        Shard
    }

    fn on_connect(&mut self, connection: &Connection, _request: &Request) {
        connection.send(format!("connected to {}", partyhost_sdk::room_id()));
    }

    fn on_request(&mut self, request: Request) -> Response {
        let body = String::from_utf8_lossy(&request.body);
        let room = partyhost_sdk::room_id();
        partyhost_sdk::broadcast(format!("received {body} (via room {room})"));
        Response::text(200, "OK")
    }
}

export_room!(Shard);
