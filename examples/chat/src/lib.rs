//! A chat room: every message a connection sends is relayed to everyone else
//! in the room, and not back to the sender.

use partyhost_sdk::{export_room, Connection, Message, Room};

struct Chat;

impl Room for Chat {
    fn new() -> Self {
        Chat
    }

    fn on_message(&mut self, sender: &Connection, message: Message) {
        partyhost_sdk::broadcast_except(&message, &[sender.id()]);
    }
}

export_room!(Chat);
