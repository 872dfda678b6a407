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
//! State in the instance's memory is lost when the host restarts an
//! instance that trapped (a panic, a call past its deadline, memory
//! exhaustion): the new instance starts from [`Room::new`] again, and the
//! connections stay open. What must outlive the instance goes to the host:
//!
//! - per connection, with [`Connection::set_state`] and the tags that
//!   [`Room::connection_tags`] returns; [`Room::on_start`] reads them back
//!   after a restart, the way a hibernated PartyKit room wakes up;
//! - per room, in [`storage`], which also survives a restart of the host and
//!   holds the room's alarm ([`storage::set_alarm`], [`Room::on_alarm`]).
//!
//! [`Room::on_before_connect`] and [`Room::on_before_request`] run before
//! the room accepts a socket or handles a request, to check a token, and
//! [`env()`] reads the variables the operator passed with `--var` and
//! `--env-file`.

mod error;
mod http;
mod message;
mod state;
pub mod storage;

pub use error::Error;
pub use state::{broadcast_to_tag, broadcast_to_tag_except, connections_tagged, MAX_STATE_BYTES};

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

pub use __bindings::partyhost::room::types::{Admission, Message, Request, Response};
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

    /// Called once after [`Room::new`], before any other handler. After a
    /// restart the room's connections are still open: [`connections`] lists
    /// them, and [`Connection::state`] returns what each stored.
    fn on_start(&mut self) {}

    /// Decides whether a WebSocket may join, before the upgrade is accepted.
    /// [`Admission::allow`] lets it through to [`Room::on_connect`], whose
    /// request then carries the headers it adds (as PartyKit's
    /// `onBeforeConnect` forwards a modified request);
    /// [`Admission::reject`] answers the upgrade with an HTTP response. The
    /// default allows every socket unchanged.
    fn on_before_connect(&mut self, request: &Request) -> Admission {
        let _ = request;
        Admission::allow()
    }

    /// Returns the tags of a joining connection, before
    /// [`Room::on_connect`] runs: at most 10, each 1 to 256 bytes. More fail
    /// the connection with close code 1011. The host applies them when
    /// `on_connect` has returned, so [`connections_tagged`] and
    /// [`broadcast_to_tag`] include the connection from then on. The
    /// default returns none.
    fn connection_tags(&mut self, connection: &Connection, request: &Request) -> Vec<String> {
        let _ = (connection, request);
        Vec::new()
    }

    /// Called when a WebSocket joins the room. `request` is the upgrade
    /// request: its URL carries the client's query string.
    fn on_connect(&mut self, connection: &Connection, request: &Request) {
        let _ = (connection, request);
    }

    /// Called for every message a connection sends.
    fn on_message(&mut self, sender: &Connection, message: Message) {
        let _ = (sender, message);
    }

    /// Called after a connection closed, whichever side closed it, with the
    /// close code and reason (1006 when the socket vanished without a close
    /// frame).
    fn on_close(&mut self, connection: &Connection, code: u16, reason: &str) {
        let _ = (connection, code, reason);
    }

    /// Called when a connection's socket failed (a protocol error, a message
    /// over the size limit, a lost peer). [`Room::on_close`] follows.
    fn on_error(&mut self, connection: &Connection, error: &str) {
        let _ = (connection, error);
    }

    /// Called when the alarm set with [`storage::set_alarm`] is due. The
    /// host starts the room for it if it is not running. The alarm is
    /// deleted when this returns, unless it set a new one.
    fn on_alarm(&mut self) {}

    /// Called for every message a shard of this logical room published with
    /// [`publish`], this room included. `origin` is the publishing room's
    /// id. The default broadcasts the message to this room's connections,
    /// so one `publish` reaches every client of the logical room.
    fn on_publish(&mut self, origin: &str, message: Message) {
        let _ = origin;
        broadcast(message);
    }

    /// Decides whether an HTTP request reaches [`Room::on_request`]:
    /// [`Admission::allow`] passes it on with the headers it adds,
    /// [`Admission::reject`] answers it. The default allows every request
    /// unchanged.
    fn on_before_request(&mut self, request: &Request) -> Admission {
        let _ = request;
        Admission::allow()
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
    /// reason of at most 123 bytes. Returns false, and closes nothing, when
    /// the connection is no longer open or the code is not one of those.
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

/// Delivers a message to every shard of this room's logical room, this one
/// included, through their [`Room::on_publish`]. Each shard receives one
/// room's messages in the order it published them.
///
/// Fails when too many published messages of this room are still waiting
/// for delivery; the message is then not sent.
pub fn publish(message: impl Into<Message>) -> Result<(), String> {
    host::publish(&message.into())
}

/// Returns the room's open connections, oldest first.
pub fn connections() -> Vec<Connection> {
    host::connections().into_iter().map(Connection::new).collect()
}

/// Writes a line to the host's log, tagged with the room id.
pub fn log(level: LogLevel, message: &str) {
    host::log(level, message);
}

/// Returns the value of a variable the operator set with `--var KEY=VALUE`
/// or `--env-file`, or `None` when it is not set. The host never logs the
/// values.
pub fn env(key: &str) -> Option<String> {
    __bindings::partyhost::room::env::get(key)
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

            fn on_before_connect(request: $crate::Request) -> $crate::Admission {
                $crate::__private::with_room::<$room, _>(|room| room.on_before_connect(&request))
            }

            fn on_connect(
                connection: ::std::string::String,
                request: $crate::Request,
            ) -> ::std::vec::Vec<::std::string::String> {
                $crate::__private::with_room::<$room, _>(|room| {
                    let connection = $crate::Connection::new(connection);
                    let tags = room.connection_tags(&connection, &request);
                    room.on_connect(&connection, &request);
                    tags
                })
            }

            fn on_message(connection: ::std::string::String, message: $crate::Message) {
                $crate::__private::with_room::<$room, _>(|room| {
                    room.on_message(&$crate::Connection::new(connection), message)
                })
            }

            fn on_close(connection: ::std::string::String, code: u16, reason: ::std::string::String) {
                $crate::__private::with_room::<$room, _>(|room| {
                    room.on_close(&$crate::Connection::new(connection), code, &reason)
                })
            }

            fn on_error(connection: ::std::string::String, error: ::std::string::String) {
                $crate::__private::with_room::<$room, _>(|room| {
                    room.on_error(&$crate::Connection::new(connection), &error)
                })
            }

            fn on_alarm() {
                $crate::__private::with_room::<$room, _>(|room| room.on_alarm())
            }

            fn on_before_request(request: $crate::Request) -> $crate::Admission {
                $crate::__private::with_room::<$room, _>(|room| room.on_before_request(&request))
            }

            fn on_request(request: $crate::Request) -> $crate::Response {
                $crate::__private::with_room::<$room, _>(|room| room.on_request(request))
            }

            fn on_publish(origin: ::std::string::String, message: $crate::Message) {
                $crate::__private::with_room::<$room, _>(|room| room.on_publish(&origin, message))
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
        with_room::<R, _>(|room| room.on_start());
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
