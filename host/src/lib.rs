//! partyhost: a self-hosted server for PartyKit-style multiplayer rooms.
//!
//! A room is a WebAssembly component built with the partyhost SDK. The host
//! runs one isolated instance of it per room id, owns every socket, and
//! splits a busy logical room across shard rooms behind a router. The
//! modules follow the path of a request:
//!
//! - [`accept`]: the HTTP accept loop, its connection cap and header timeout;
//! - [`server`]: HTTP routes, request limits, shutdown;
//! - [`handshake`]: admission of a WebSocket and its hand-over to a room;
//! - [`router`]: shard choice, fan-out and publishing across shards;
//! - [`registry`]: the live rooms of the process;
//! - [`room`]: the actor that owns one room's instance and calls its exports;
//! - [`connection`]: one socket's reader, writer and outbound queue;
//! - [`guest`]: the host functions a room calls;
//! - [`guest_log`]: a room's log lines and output, escaped and rate-limited;
//! - [`native`]: a native twin of the default room, for benchmarks;
//! - [`runtime`]: the wasmtime engine, the compiled component and its limits;
//! - [`metrics`]: what the server counts, in Prometheus format;
//! - [`storage`]: each room's durable key-value storage and alarm, in SQLite;
//! - [`alarm`]: the schedule of room alarms and the task that fires them;
//! - [`env`]: the variables rooms read, from `--var` and `--env-file`.

pub mod alarm;
pub mod accept;
pub mod config;
pub mod connection;
pub mod env;
pub mod guest;
pub mod guest_log;
pub mod handshake;
pub mod metrics;
pub mod native;
pub mod registry;
pub mod room;
pub mod router;
pub mod runtime;
pub mod server;
pub mod storage;

/// The built-in default room: the main party of PartyKit's reference
/// sharding example, built from `examples/sharding` by the build script.
pub const DEFAULT_ROOM_WASM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sharding.wasm"));
