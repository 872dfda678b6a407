//! A chat room: every text message a connection sends reaches everyone else
//! in the logical room, and not the sender.
//!
//! Behind the router, the room is one of several shards. It publishes each
//! message to all shards of its logical room, and each shard relays it to
//! its own connections, so clients on different shards chat with each
//! other. Published messages of one shard arrive everywhere in the order it
//! published them. Binary messages stay within the sender's shard.

use partyhost_sdk::{export_room, Connection, Message, Room};
use serde::{Deserialize, Serialize};

struct Chat;

/// A message on its way between shards.
#[derive(Serialize, Deserialize)]
struct Relayed {
    from: String,
    text: String,
}

impl Room for Chat {
    fn new() -> Self {
        Chat
    }

    fn on_message(&mut self, sender: &Connection, message: Message) {
        let Message::Text(text) = message else {
            partyhost_sdk::broadcast_except(&message, &[sender.id()]);
            return;
        };
        let relayed = Relayed {
            from: sender.id().to_string(),
            text,
        };
        if let Err(err) = partyhost_sdk::publish(Message::json(&relayed)) {
            sender.send(format!("message not sent: {err}"));
        }
    }

    fn on_publish(&mut self, _origin: &str, message: Message) {
        let Some(relayed) = message.as_text().and_then(|text| serde_json::from_str::<Relayed>(text).ok()) else {
            return;
        };
        partyhost_sdk::broadcast_except(&Message::Text(relayed.text), &[relayed.from.as_str()]);
    }
}

export_room!(Chat);
