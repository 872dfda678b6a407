//! Write partyhost rooms in Rust.
//!
//! A room is a type that implements [`Room`]. The host runs one instance of
//! it per room id, and calls its handlers one at a time: when a WebSocket
//! connects, sends a message or closes, and when an HTTP request arrives.
//! [`export_room!`] turns the type into the exports of a WebAssembly
//! component, which you build with `cargo build --target wasm32-wasip2` and
//! run with `partyhost --module room.wasm`.
//!
//! ```no_run
//! use partyhost_sdk::{export_room, Connection, Message, Request, Response, Room};
//!
//! /// Counts the messages it relays to everyone in the room.
//! struct Relay {
//!     relayed: u64,
//! }
//!
//! impl Room for Relay {
//!     fn new() -> Self {
//!         Relay { relayed: 0 }
//!     }
//!
//!     fn on_connect(&mut self, connection: &Connection, _request: &Request) {
//!         connection.send(format!("welcome to {}", partyhost_sdk::room_id()));
//!     }
//!
//!     fn on_message(&mut self, sender: &Connection, message: Message) {
//!         self.relayed += 1;
//!         partyhost_sdk::broadcast_except(&message, &[sender.id()]);
//!     }
//!
//!     fn on_request(&mut self, _request: Request) -> Response {
//!         Response::text(200, format!("{} messages relayed", self.relayed))
//!     }
//! }
//!
//! export_room!(Relay);
//! ```
//!
//! State lives in the instance's memory. The host restarts an instance that
//! traps (a panic, a call past its deadline, memory exhaustion), and the new
//! instance starts from [`Room::new`] again; the connections stay open.

mod http;
mod message;

#[doc(hidden)]
pub mod __bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "party",
        pub_export_macro: true,
        export_macro_name: "__export_party",
        default_bindings_module: "partyhost_sdk::__bindings",
        additional_derives: [PartialEq, Eq],
    });
}

use __bindings::partyhost::room::room as host;

pub use __bindings::partyhost::room::types::{Message, Request, Response};
pub use host::LogLevel;

/// The logic of one room. Every handler has a default, so a room implements
/// only the ones it needs.
///
/// The host calls the handlers of one instance one at a time, never
/// concurrently, so `&mut self` needs no locking.
pub trait Room: 'static {
    /// Creates the room's state. The host calls it when the instance starts,
    /// and again after a restart that followed a trap.
    fn new() -> Self
    where
        Self: Sized;

    /// Called when a WebSocket joins the room. `request` is the upgrade
    /// request: its URL carries the client's query string.
    fn on_connect(&mut self, connection: &Connection, request: &Request) {
        let _ = (connection, request);
    }

    /// Called for every message a connection sends.
    fn on_message(&mut self, sender: &Connection, message: Message) {
        let _ = (sender, message);
    }

    /// Called after a connection closed, whichever side closed it.
    fn on_close(&mut self, connection: &Connection) {
        let _ = connection;
    }

    /// Answers an HTTP request to the room. The default answers 404.
    fn on_request(&mut self, request: Request) -> Response {
        let _ = request;
        Response::text(404, "this room does not handle HTTP requests")
    }
}

/// One WebSocket connection of the room.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Connection {
    id: String,
}

impl Connection {
    /// Returns a handle for the connection with this id. Sending through it
    /// does nothing once that connection has closed.
    pub fn new(id: impl Into<String>) -> Self {
        Connection { id: id.into() }
    }

    /// The connection's id: the client's `_pk` query parameter, or a UUID
    /// when the client sent none.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Queues a message for this connection. Returns false when the
    /// connection is no longer open.
    pub fn send(&self, message: impl Into<Message>) -> bool {
        host::send(&self.id, &message.into())
    }

    /// Closes the connection with a close code (1000, or 3000 to 4999) and a
    /// reason of at most 123 bytes. Returns false when the connection is no
    /// longer open.
    pub fn close(&self, code: u16, reason: &str) -> bool {
        host::close(&self.id, code, reason)
    }
}

/// Returns this room's id: `<room>-<k>` for shard k of a routed room.
pub fn room_id() -> String {
    host::id()
}

/// Sends a message to every connection of this room.
pub fn broadcast(message: impl Into<Message>) {
    host::broadcast(&message.into(), &[]);
}

/// Sends a message to every connection of this room except those listed.
pub fn broadcast_except(message: &Message, without: &[&str]) {
    let without: Vec<String> = without.iter().map(|id| id.to_string()).collect();
    host::broadcast(message, &without);
}

/// Returns the room's open connections, oldest first.
pub fn connections() -> Vec<Connection> {
    host::connections().into_iter().map(Connection::new).collect()
}

/// Writes a line to the host's log, tagged with the room id.
pub fn log(level: LogLevel, message: &str) {
    host::log(level, message);
}

/// Exports a [`Room`] type as the component's room.
///
/// Use it once per crate, at the crate root: `export_room!(MyRoom);`.
#[macro_export]
macro_rules! export_room {
    ($room:ty) => {
        #[doc(hidden)]
        struct __PartyhostExport;

        impl $crate::__bindings::Guest for __PartyhostExport {
            fn on_start() {
                $crate::__private::start::<$room>();
            }

            fn on_connect(connection: ::std::string::String, request: $crate::Request) {
                $crate::__private::with_room::<$room, _>(|room| {
                    room.on_connect(&$crate::Connection::new(connection), &request)
                })
            }

            fn on_message(connection: ::std::string::String, message: $crate::Message) {
                $crate::__private::with_room::<$room, _>(|room| {
                    room.on_message(&$crate::Connection::new(connection), message)
                })
            }

            fn on_close(connection: ::std::string::String) {
                $crate::__private::with_room::<$room, _>(|room| {
                    room.on_close(&$crate::Connection::new(connection))
                })
            }

            fn on_request(request: $crate::Request) -> $crate::Response {
                $crate::__private::with_room::<$room, _>(|room| room.on_request(request))
            }
        }

        $crate::__bindings::__export_party!(__PartyhostExport);
    };
}

#[doc(hidden)]
pub mod __private {
    use super::Room;
    use std::any::Any;
    use std::cell::RefCell;

    thread_local! {
        /// The one room of this instance. A component instance is single
        /// threaded, so a thread-local is the instance's global.
        static ROOM: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
    }

    pub fn start<R: Room>() {
        ROOM.with(|cell| *cell.borrow_mut() = Some(Box::new(R::new())));
    }

    /// Runs `f` on the room, creating it first if the host skipped
    /// `on-start`.
    pub fn with_room<R: Room, T>(f: impl FnOnce(&mut R) -> T) -> T {
        ROOM.with(|cell| {
            let mut slot = cell.borrow_mut();
            let room = slot.get_or_insert_with(|| Box::new(R::new()));
            let room = room
                .downcast_mut::<R>()
                .expect("export_room! registers exactly one room type");
            f(room)
        })
    }
}
