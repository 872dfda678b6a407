//! Command-line options: every limit the server enforces, with its default.
//!
//! Defaults serve a developer on a laptop. Operators raise the connection and
//! room limits for production; each option's help gives what it bounds and in
//! which unit.

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

    /// Number of shard rooms behind each `/parties/router/<room>`, 1 to 64.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub shards: u32,

    /// Shard rooms for logical rooms whose name matches PATTERN, as
    /// `PATTERN=N`; `*` in PATTERN matches any run of characters. Repeatable;
    /// the first match wins, and other rooms get `--shards`.
    #[arg(long = "shards-for", value_name = "PATTERN=N", value_parser = parse_shards_for)]
    pub shards_for: Vec<ShardsFor>,

    /// Policy by which the router assigns a new WebSocket to a shard.
    #[arg(long, value_enum, default_value_t = Balance::LeastConnections)]
    pub balance: Balance,

    /// Attempts the router makes per shard for one fanned-out request: a
    /// shard whose call trapped is called again, with the same request id,
    /// after its instance restarted.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=10))]
    pub fanout_attempts: u32,

    /// Seconds during which a router request with an `Idempotency-Key`
    /// already seen for the same room is answered with the first result
    /// instead of running again.
    #[arg(long = "idempotency-window", default_value_t = 60, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub idempotency_window_secs: u64,

    /// Separate address for operators: `/metrics`, `/healthz`, `/readyz` and
    /// `GET /parties/router/<room>`, which lists a logical room's shards with
    /// their connection counts. Without it, `/metrics` is served on
    /// `--listen`.
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,

    /// Runs the default room as native Rust code instead of WebAssembly.
    /// For benchmarks that measure what the WebAssembly layer costs; it
    /// cannot be combined with `--module`.
    #[arg(long, conflicts_with = "module")]
    pub native_default_room: bool,

    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Directory of the rooms' durable storage and alarms: one SQLite
    /// database, `partyhost.sqlite3`, created if missing. One partyhost
    /// process at a time may use it.
    #[arg(long, default_value = ".partyhost", value_name = "DIR")]
    pub data_dir: PathBuf,

    /// Variable every room can read with `env("KEY")`, as `KEY=VALUE`.
    /// Repeatable; overrides the same key in `--env-file`. Values are never
    /// logged.
    // Parsed after clap, because clap repeats an invalid value in its
    // error, and the value may be a secret.
    #[arg(long = "var", value_name = "KEY=VALUE")]
    pub vars: Vec<String>,

    /// File of `KEY=VALUE` lines that rooms read with `env("KEY")`: `#`
    /// starts a comment line or, after a space, a comment at the end of an
    /// unquoted value; `export ` and single or double quotes are optional.
    /// No variable expansion or multi-line values.
    #[arg(long, value_name = "PATH")]
    pub env_file: Option<PathBuf>,

    #[command(flatten)]
    pub limits: Limits,
}

/// Bounds on guests, sockets and requests.
#[derive(Debug, Clone, clap::Args)]
pub struct Limits {
    /// Time one guest call may run, in milliseconds, before it is
    /// interrupted and fails as a trap. The clock runs from the start of the
    /// call, including the time it yields to other rooms. PartyKit's
    /// platform allows 30 s; a room here should answer in far less, because
    /// its other events wait.
    #[arg(long = "call-timeout", default_value_t = 1000, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub call_timeout_ms: u64,

    /// Linear memory one room instance may grow to, in MiB. Growth past it
    /// fails inside the guest.
    #[arg(long = "memory-limit", default_value_t = 128, value_name = "MIB",
          value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub memory_limit_mib: u64,

    /// Elements one table of a room instance may hold. Function tables of
    /// large Rust rooms stay well below the default.
    #[arg(long, default_value_t = 20_000, value_name = "ELEMENTS")]
    pub table_elements: usize,

    /// Room instances that may run at once. Each takes one slot of the
    /// instance pool; an HTTP request for a room past it is answered 503,
    /// and a WebSocket is closed with 1013 (try again later).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_rooms: u32,

    /// Largest WebSocket message a client may send, in bytes. A larger one
    /// closes the socket with code 1009.
    #[arg(long, default_value_t = 1 << 20, value_name = "BYTES")]
    pub max_message_bytes: usize,

    /// Largest HTTP request body, in bytes. A larger one is answered 413.
    #[arg(long, default_value_t = 1 << 20, value_name = "BYTES")]
    pub max_body_bytes: usize,

    /// Bytes of request bodies that router fan-outs in flight may hold,
    /// counting one copy per shard. A fan-out waits up to the call timeout
    /// for room (then 503); one larger than the whole limit gets 413.
    #[arg(long, default_value_t = 256 << 20, value_name = "BYTES",
          value_parser = clap::value_parser!(u64).range(1024..=(1 << 40)))]
    pub max_fanout_bytes: u64,

    /// Bytes that may wait in one connection's outbound queue. A client that
    /// reads too slowly to stay under it is closed with code 1008.
    #[arg(long, default_value_t = 4 << 20, value_name = "BYTES")]
    pub max_outbound_bytes: usize,

    /// Events that may wait in one room's mailbox. Senders wait while it is
    /// full: a WebSocket reader stops reading, an HTTP request waits up to
    /// the call timeout and is then answered 503.
    #[arg(long, default_value_t = 1024, value_name = "EVENTS")]
    pub mailbox: usize,

    /// Open WebSockets the whole server accepts. A handshake past it is
    /// answered 503 with `Retry-After`.
    #[arg(long, default_value_t = 10_000, value_name = "CONNECTIONS")]
    pub max_connections: usize,

    /// HTTP connections served at once, WebSockets not counted once
    /// upgraded. Past it, the server stops accepting until one ends.
    #[arg(long, default_value_t = 1024, value_name = "CONNECTIONS",
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_http_connections: u64,

    /// Seconds a client has to send the headers of a request, which also
    /// closes a keep-alive connection that stays silent that long.
    #[arg(long = "header-timeout", default_value_t = 10, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_timeout_secs: u64,

    /// Open WebSockets one room accepts. A handshake past it is answered 503
    /// with `Retry-After`.
    #[arg(long, default_value_t = 5_000, value_name = "CONNECTIONS")]
    pub max_connections_per_room: usize,

    /// WebSocket handshakes accepted per second, on average. A burst of
    /// reconnecting clients past it is answered 503 with `Retry-After`
    /// instead of starting rooms faster than the host can.
    #[arg(long, default_value_t = 2_000, value_name = "PER_SECOND",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub connect_rate: u32,

    /// Handshakes accepted at once before `--connect-rate` applies.
    #[arg(long, default_value_t = 500, value_name = "CONNECTIONS",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub connect_burst: u32,

    /// Seconds of silence after which a socket is pinged. A socket that
    /// stays silent for two intervals is closed and the room runs
    /// `on-close`.
    #[arg(long = "ping-interval", default_value_t = 30, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub ping_interval_secs: u64,

    /// Seconds that shutdown waits for in-flight requests and `on-close`
    /// calls before the process exits anyway.
    #[arg(long = "shutdown-timeout", default_value_t = 10, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub shutdown_timeout_secs: u64,

    /// Seconds a room with no connections and no events stays in memory
    /// before its instance is dropped.
    #[arg(long = "room-idle-timeout", default_value_t = 30, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub room_idle_timeout_secs: u64,
}

impl Config {
    /// Shard count of logical room `room`.
    pub fn shards_for(&self, room: &str) -> u32 {
        self.shards_for
            .iter()
            .find(|rule| wildmatch::WildMatch::new(&rule.pattern).matches(room))
            .map_or(self.shards, |rule| rule.shards)
    }

    pub fn idempotency_window(&self) -> Duration {
        Duration::from_secs(self.idempotency_window_secs)
    }
}

impl Limits {
    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms)
    }

    pub fn memory_limit_bytes(&self) -> usize {
        (self.memory_limit_mib as usize) << 20
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout_secs)
    }

    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.ping_interval_secs)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_secs)
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

/// Shard policy of a router.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Balance {
    /// A shard chosen uniformly at random, as the reference sharding
    /// example does.
    Random,
    /// The shard with the fewest open and joining sockets; ties go to the
    /// lowest shard number.
    LeastConnections,
    /// The less loaded of two shards chosen at random.
    PowerOfTwo,
    /// A hash of the connection id (`_pk`), so a reconnecting client
    /// returns to its shard while the shard count stays the same.
    Sticky,
}

/// A `--shards-for PATTERN=N` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardsFor {
    pub pattern: String,
    pub shards: u32,
}

fn parse_shards_for(text: &str) -> Result<ShardsFor, String> {
    let (pattern, shards) = text
        .rsplit_once('=')
        .ok_or_else(|| format!("`{text}` is not PATTERN=N, as in `big-*=10`"))?;
    let shards: u32 = shards
        .parse()
        .map_err(|_| format!("`{shards}` in `{text}` is not a shard count"))?;
    if !(1..=64).contains(&shards) {
        return Err(format!("shard count {shards} in `{text}` is outside 1..=64"));
    }
    if pattern.is_empty() {
        return Err(format!("`{text}` has an empty pattern"));
    }
    Ok(ShardsFor {
        pattern: pattern.to_string(),
        shards,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}
