//! State and tags of connections, which the host keeps so that they outlive
//! the instance.

use crate::__bindings::partyhost::room::connection as host;
use crate::{Connection, Error, Message};

/// Maximum size of one connection's state, in bytes.
pub const MAX_STATE_BYTES: usize = 2048;

impl Connection {
    /// Stores `state` with the connection, replacing what it had. Fails when
    /// the state is larger than [`MAX_STATE_BYTES`] or the connection is no
    /// longer open.
    pub fn set_state(&self, state: impl Into<Vec<u8>>) -> Result<(), Error> {
        Ok(host::set_state(self.id(), Some(&state.into()))?)
    }

    /// Stores `value`, serialised as JSON, as the connection's state.
    pub fn set_state_json(&self, value: &impl serde::Serialize) -> Result<(), Error> {
        self.set_state(serde_json::to_vec(value)?)
    }

    /// Clears the connection's state.
    pub fn clear_state(&self) -> Result<(), Error> {
        Ok(host::set_state(self.id(), None)?)
    }

    /// Returns the connection's state, or `None` when it has none or is no
    /// longer open.
    pub fn state(&self) -> Option<Vec<u8>> {
        host::state(self.id())
    }

    /// Parses the connection's state as JSON. Returns `Ok(None)` when it has
    /// none.
    pub fn state_json<T: serde::de::DeserializeOwned>(&self) -> Result<Option<T>, Error> {
        match self.state() {
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Returns the tags [`Room::connection_tags`](crate::Room::connection_tags)
    /// gave the connection.
    pub fn tags(&self) -> Vec<String> {
        host::tags(self.id())
    }
}

/// Returns the room's open connections that have `tag`, oldest first.
pub fn connections_tagged(tag: &str) -> Vec<Connection> {
    host::tagged(tag).into_iter().map(Connection::new).collect()
}

/// Sends a message to every connection of this room that has `tag`.
pub fn broadcast_to_tag(tag: &str, message: impl Into<Message>) {
    host::broadcast_tagged(&message.into(), tag, &[]);
}

/// Sends a message to every connection of this room that has `tag`, except
/// those listed.
pub fn broadcast_to_tag_except(tag: &str, message: &Message, without: &[&str]) {
    let without: Vec<String> = without.iter().map(|id| id.to_string()).collect();
    host::broadcast_tagged(message, tag, &without);
}
