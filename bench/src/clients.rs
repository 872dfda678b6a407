//! Options shared by every scenario, and the fleet of WebSocket clients of
//! one logical room: opened at a bounded rate from one or more loopback
//! source addresses, each waiting for its greeting, which names the shard
//! that took it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::loopback;

/// Time a client waits for the server's reply to its close frame.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The prefix of the default room's greeting; the rest names the shard.
const GREETING_PREFIX: &str = "connected to ";

/// Distinct connection errors a report keeps; further kinds are counted
/// under "other errors".
const MAX_ERROR_KINDS: usize = 20;

/// Ephemeral ports the client plans to use per source address when the
/// kernel's range cannot be read.
const DEFAULT_PORTS_PER_ADDRESS: usize = 28_000;

/// Read buffer of each client socket. tungstenite 0.29 allocates its read
/// buffer eagerly (128 KiB by default), so the default would make the load
/// client run out of memory before the server. Deliveries are small.
const CLIENT_READ_BUFFER_BYTES: usize = 8 * 1024;

/// Share of each source address's ephemeral ports the fleet plans to use.
/// The rest stays free for sockets in TIME_WAIT from earlier runs: with the
/// range nearly full, bind(2) to port 0 slows down and then fails with
/// "Address already in use".
const PORT_SHARE: f64 = 0.4;

/// Options that say which server to measure and how long to run.
#[derive(Debug, Clone, clap::Args)]
pub struct TargetArgs {
    /// Address of the server under test. Only loopback addresses
    /// (127.0.0.0/8, ::1) are accepted.
    #[arg(long, default_value = "127.0.0.1:1999", value_name = "ADDR")]
    pub server: SocketAddr,

    /// PID of the server process, to read its memory and CPU time from
    /// /proc. Without it, server figures are left out.
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,

    /// Time limit of the whole run, in seconds. The scenario stops starting
    /// new steps before it, and the process exits at it plus 30 s in any
    /// case.
    #[arg(long, default_value_t = 300, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub time_limit: u64,

    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
}

/// Options of the WebSocket client fleet.
#[derive(Debug, Clone, clap::Args)]
pub struct FleetArgs {
    /// WebSocket clients to open.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=200_000))]
    pub clients: u32,

    /// Logical room: clients connect to /parties/router/<ROOM>.
    #[arg(long, default_value = "bench")]
    pub room: String,

    /// Connections opened per second, at most.
    #[arg(long, default_value_t = 2000, value_name = "PER_SECOND",
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub connect_rate: u32,

    /// WebSocket handshakes in flight at once, at most.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub connect_concurrency: u32,

    /// Source addresses 127.0.0.1 to 127.0.0.N to spread the sockets over.
    /// The client adds addresses when the clients need more ephemeral ports
    /// than N addresses have.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub source_addresses: u8,

    /// Seconds one connection may take from TCP connect to greeting.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub greeting_timeout: u64,
}

pub type Socket = WebSocketStream<TcpStream>;

/// One connected client.
pub struct Client {
    pub index: u32,
    pub socket: Socket,
}

/// Outcome of opening the fleet.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FleetReport {
    pub requested: u32,
    pub connected: u32,
    pub failed: u32,
    /// Seconds from the first connect to the last greeting.
    pub seconds: f64,
    pub source_addresses: Vec<String>,
    /// Clients per shard, keyed by the room the greeting named.
    pub shards: BTreeMap<String, u32>,
    /// Failed connections per error message.
    pub errors: BTreeMap<String, u32>,
}

impl FleetReport {
    pub fn print(&self) {
        println!(
            "clients: {} of {} connected in {:.2} s from {} source address(es), {} failed",
            self.connected,
            self.requested,
            self.seconds,
            self.source_addresses.len(),
            self.failed
        );
        let shards: Vec<String> = self.shards.iter().map(|(room, count)| format!("{room}: {count}")).collect();
        println!("shard distribution: {}", shards.join(", "));
        for (error, count) in &self.errors {
            println!("  connect error ({count}x): {error}");
        }
    }
}

/// The open clients and how opening them went.
pub struct Fleet {
    pub clients: Vec<Client>,
    pub report: FleetReport,
}

/// Opens `args.clients` WebSockets to `/parties/router/<room>?_pk=<id>`, at
/// most `connect_rate` per second, and waits for each greeting. Stops
/// opening at `deadline`. Failed connections are counted, not fatal.
pub async fn connect_fleet(server: SocketAddr, args: &FleetArgs, id_prefix: &str, deadline: Instant) -> Result<Fleet> {
    loopback::check_server(server)?;
    let sources = plan_source_addresses(server, args.clients as usize, args.source_addresses)?;
    let mut report = FleetReport {
        requested: args.clients,
        source_addresses: sources.iter().map(IpAddr::to_string).collect(),
        ..FleetReport::default()
    };

    let progress = progress_bar(u64::from(args.clients), "connecting");
    let handshakes = Arc::new(Semaphore::new(args.connect_concurrency as usize));
    let pace = Duration::from_secs_f64(1.0 / f64::from(args.connect_rate));
    let greeting_timeout = Duration::from_secs(args.greeting_timeout);
    let started = Instant::now();
    let mut pending = JoinSet::new();
    let mut clients = Vec::with_capacity(args.clients as usize);

    for index in 0..args.clients {
        let due = started + pace.mul_f64(f64::from(index));
        if due >= deadline {
            report.errors.insert("not attempted: the time limit was reached".into(), args.clients - index);
            report.failed += args.clients - index;
            break;
        }
        tokio::time::sleep_until(due).await;
        let permit = handshakes.clone().acquire_owned().await.expect("the semaphore is never closed");
        let source = sources[index as usize % sources.len()];
        let url = format!("ws://{server}/parties/router/{}?_pk={id_prefix}-{index}", args.room);
        pending.spawn(async move {
            let result = connect_one(server, source, &url, greeting_timeout).await;
            drop(permit);
            (index, result)
        });
        while let Some(joined) = pending.try_join_next() {
            collect(joined, &mut clients, &mut report, &progress);
        }
    }
    while let Some(joined) = pending.join_next().await {
        collect(joined, &mut clients, &mut report, &progress);
    }
    progress.finish_and_clear();
    report.seconds = started.elapsed().as_secs_f64();
    clients.sort_by_key(|client| client.index);
    Ok(Fleet { clients, report })
}

fn collect(
    joined: Result<(u32, Result<(String, Socket)>), tokio::task::JoinError>,
    clients: &mut Vec<Client>,
    report: &mut FleetReport,
    progress: &ProgressBar,
) {
    progress.inc(1);
    let (index, result) = match joined {
        Ok(joined) => joined,
        Err(err) => {
            report.failed += 1;
            count_error(&mut report.errors, format!("connect task failed: {err}"));
            return;
        }
    };
    match result {
        Ok((greeting, socket)) => {
            let shard = greeting.strip_prefix(GREETING_PREFIX).unwrap_or("(unrecognised greeting)");
            *report.shards.entry(shard.to_string()).or_default() += 1;
            report.connected += 1;
            clients.push(Client { index, socket });
        }
        Err(err) => {
            report.failed += 1;
            count_error(&mut report.errors, format!("{err:#}"));
        }
    }
}

/// Counts one error, merging kinds past [`MAX_ERROR_KINDS`].
pub fn count_error(errors: &mut BTreeMap<String, u32>, message: String) {
    let key = if errors.len() < MAX_ERROR_KINDS || errors.contains_key(&message) {
        message
    } else {
        "other errors".to_string()
    };
    *errors.entry(key).or_default() += 1;
}

/// Connects from `source`, performs the WebSocket handshake and returns the
/// first text message with the socket.
async fn connect_one(server: SocketAddr, source: IpAddr, url: &str, timeout: Duration) -> Result<(String, Socket)> {
    let attempt = async {
        let socket = if source.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }
            .context("failed to create a socket")?;
        socket
            .bind(SocketAddr::new(source, 0))
            .with_context(|| format!("failed to bind to {source}"))?;
        let stream = socket.connect(server).await.context("TCP connect failed")?;
        stream.set_nodelay(true).context("failed to set TCP_NODELAY")?;
        let config = WebSocketConfig::default().read_buffer_size(CLIENT_READ_BUFFER_BYTES);
        let (mut socket, _response) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
            .await
            .context("WebSocket handshake failed")?;
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(greeting))) => return Ok((greeting.to_string(), socket)),
                Some(Ok(Message::Close(frame))) => {
                    let reason = frame.map_or_else(|| "no close frame".to_string(), |f| format!("{} {}", f.code, f.reason));
                    bail!("server closed the socket before the greeting: {reason}")
                }
                Some(Ok(_)) => continue,
                Some(Err(err)) => return Err(anyhow!(err).context("failed to read the greeting")),
                None => bail!("server closed the connection before the greeting"),
            }
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| anyhow!("timed out after {} s waiting for the greeting", timeout.as_secs()))?
}

/// Chooses the source addresses: at least `requested`, and enough that no
/// address needs more ephemeral ports than the kernel's range offers.
fn plan_source_addresses(server: SocketAddr, clients: usize, requested: u8) -> Result<Vec<IpAddr>> {
    if server.is_ipv6() {
        return Ok(vec![IpAddr::V6(Ipv6Addr::LOCALHOST)]);
    }
    let per_address = ((ephemeral_ports() as f64 * PORT_SHARE) as usize).max(1);
    let needed = clients.div_ceil(per_address);
    let count = needed.max(usize::from(requested)).min(usize::from(loopback::MAX_SOURCE_ADDRESSES));
    loopback::source_addresses(count as u8)
}

/// Number of ports in /proc/sys/net/ipv4/ip_local_port_range.
fn ephemeral_ports() -> usize {
    let Ok(range) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else {
        return DEFAULT_PORTS_PER_ADDRESS;
    };
    let bounds: Vec<usize> = range.split_whitespace().filter_map(|bound| bound.parse().ok()).collect();
    match bounds.as_slice() {
        [low, high] if high >= low => high - low + 1,
        _ => DEFAULT_PORTS_PER_ADDRESS,
    }
}

/// A progress bar on stderr, hidden when stderr is not a terminal.
pub fn progress_bar(length: u64, label: &str) -> ProgressBar {
    let bar = ProgressBar::new(length);
    bar.set_style(
        ProgressStyle::with_template("{msg:>12} [{elapsed_precise}] {bar:40} {pos}/{len} ({per_sec})")
            .expect("the progress template is valid"),
    );
    bar.set_message(label.to_string());
    bar
}
