//! Command-line options: every limit the server enforces, with its default.
//!
//! Defaults serve a developer on a laptop. Operators raise the connection and
//! room limits for production; each option says what it bounds and in which
//! unit.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Runs PartyKit-style rooms, written as WebAssembly components, behind a
/// sharding router.
#[derive(Debug, Clone, Parser)]
#[command(name = "partyhost", version, about)]
pub struct Config {
    /// Room component to run (a `.wasm` file built for wasm32-wasip2 with the
    /// partyhost SDK). Without it, the built-in default room runs: the main
    /// party of PartyKit's reference sharding example.
    #[arg(long, value_name = "PATH")]
    pub module: Option<PathBuf>,

    /// Address to listen on. Port 0 picks a free port, which the start-up log
    /// reports.
    #[arg(long, default_value = "127.0.0.1:1999", value_name = "ADDR")]
    pub listen: SocketAddr,

    /// Number of shard rooms behind each `/parties/router/<room>`.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub shards: u32,

    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(flatten)]
    pub limits: Limits,
}

/// Bounds on guests, sockets and requests.
#[derive(Debug, Clone, clap::Args)]
pub struct Limits {
    /// CPU time one guest call may take, in milliseconds, before it is
    /// interrupted and fails as a trap. PartyKit's platform allows 30 s; a
    /// room here should answer in far less, because its other events wait.
    #[arg(long = "call-timeout", default_value_t = 1000, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub call_timeout_ms: u64,

    /// Linear memory one room instance may grow to, in MiB. Growth past it
    /// fails inside the guest.
    #[arg(long = "memory-limit", default_value_t = 128, value_name = "MIB",
          value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub memory_limit_mib: u64,

    /// Room instances that may run at once. Each holds one slot of the
    /// instance pool; a request for a room past it is answered 503.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_rooms: u32,

    /// Largest WebSocket message a client may send, in bytes. A larger one
    /// closes the socket with code 1009.
    #[arg(long, default_value_t = 1 << 20, value_name = "BYTES")]
    pub max_message_bytes: usize,

    /// Largest HTTP request body, in bytes. A larger one is answered 413.
    #[arg(long, default_value_t = 1 << 20, value_name = "BYTES")]
    pub max_body_bytes: usize,

    /// Bytes that may wait in one connection's outbound queue. A client that
    /// reads too slowly to stay under it is closed with code 1008.
    #[arg(long, default_value_t = 4 << 20, value_name = "BYTES")]
    pub max_outbound_bytes: usize,

    /// Events that may wait in one room's mailbox. Senders wait while it is
    /// full: a WebSocket reader stops reading, an HTTP request waits up to
    /// the call timeout and is then answered 503.
    #[arg(long, default_value_t = 1024, value_name = "EVENTS")]
    pub mailbox: usize,

    /// Seconds a room with no connections and no events stays in memory
    /// before its instance is dropped.
    #[arg(long = "room-idle-timeout", default_value_t = 30, value_name = "SECONDS")]
    pub room_idle_timeout_secs: u64,
}

impl Limits {
    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms)
    }

    pub fn memory_limit_bytes(&self) -> usize {
        (self.memory_limit_mib as usize) << 20
    }

    pub fn room_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.room_idle_timeout_secs)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Config::parse_from(["partyhost"]).limits
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}
