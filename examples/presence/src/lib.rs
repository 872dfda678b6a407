//! Who is in the room: each connection's name and role live in its state,
//! held by the host, and its role is also a tag.
//!
//! A client connects with `?name=<name>&role=<role>`. Everyone gets
//! `{"type": "presence", "users": [{"id", "name", "role"}, ...]}` when
//! someone joins, renames or leaves, and `{"type": "left", "id", "code",
//! "reason"}` when someone leaves. Messages:
//! - `rename <name>`: changes the sender's name;
//! - `to <role> <text>`: sends `<name>: <text>` to every connection with
//!   that role, through a tag broadcast.
//!
//! The room keeps nothing in the instance's memory, so a restarted instance
//! answers exactly as before: the state is the host's.

use partyhost_sdk::{export_room, Connection, LogLevel, Message, Request, Room};
use serde::{Deserialize, Serialize};

struct Presence;

/// The state of one connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct User {
    name: String,
    role: String,
}

#[derive(Serialize)]
struct Entry {
    id: String,
    name: String,
    role: String,
}

impl Presence {
    fn broadcast_presence() {
        let users: Vec<Entry> = partyhost_sdk::connections()
            .into_iter()
            .filter_map(|connection| {
                let user: User = connection.state_json().ok().flatten()?;
                Some(Entry {
                    id: connection.id().to_string(),
                    name: user.name,
                    role: user.role,
                })
            })
            .collect();
        partyhost_sdk::broadcast(Message::json(&serde_json::json!({ "type": "presence", "users": users })));
    }
}

fn role(request: &Request) -> String {
    request.query("role").unwrap_or("guest").to_string()
}

impl Room for Presence {
    fn new() -> Self {
        Presence
    }

    fn connection_tags(&mut self, _connection: &Connection, request: &Request) -> Vec<String> {
        vec![role(request)]
    }

    fn on_connect(&mut self, connection: &Connection, request: &Request) {
        let user = User {
            name: request.query("name").unwrap_or(connection.id()).to_string(),
            role: role(request),
        };
        if let Err(err) = connection.set_state_json(&user) {
            connection.close(4000, &format!("invalid name: {err}"));
            return;
        }
        Presence::broadcast_presence();
    }

    fn on_message(&mut self, sender: &Connection, message: Message) {
        let text = message.as_text().unwrap_or("");
        let Ok(Some(mut user)) = sender.state_json::<User>() else {
            return;
        };
        if let Some(name) = text.strip_prefix("rename ") {
            user.name = name.to_string();
            match sender.set_state_json(&user) {
                Ok(()) => Presence::broadcast_presence(),
                Err(err) => {
                    sender.send(format!("error: {err}"));
                }
            }
        } else if let Some((role, text)) = text.strip_prefix("to ").and_then(|rest| rest.split_once(' ')) {
            partyhost_sdk::broadcast_to_tag(role, format!("{}: {text}", user.name));
        } else {
            sender.send("unknown command: use `rename <name>` or `to <role> <text>`");
        }
    }

    fn on_close(&mut self, connection: &Connection, code: u16, reason: &str) {
        let left = serde_json::json!({ "type": "left", "id": connection.id(), "code": code, "reason": reason });
        partyhost_sdk::broadcast(Message::json(&left));
        Presence::broadcast_presence();
    }

    fn on_error(&mut self, connection: &Connection, error: &str) {
        partyhost_sdk::log(LogLevel::Warn, &format!("connection {} failed: {error}", connection.id()));
    }
}

export_room!(Presence);
