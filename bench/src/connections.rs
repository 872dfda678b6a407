//! Scenario 2, idle connections: opens as many WebSockets as asked, keeps
//! them idle but answered (pings get pongs), and reports the server's
//! memory per connection as (RSS with all sockets - RSS after a warm-up) /
//! sockets. The warm-up sockets start the shard rooms first, so room start
//! cost stays out of the figure.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::clients::{self, Client, FleetArgs, FleetReport, TargetArgs};
use crate::procstat::{self, ProcessSample};
use crate::clients::CLOSE_TIMEOUT;
use crate::report::mebibytes;

/// Time the server gets to settle before a memory reading.
const SETTLE_TIME: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionsArgs {
    #[command(flatten)]
    pub target: TargetArgs,

    #[command(flatten)]
    pub fleet: FleetArgs,

    /// Sockets opened before the baseline reading. They count in
    /// `--clients`.
    #[arg(long, default_value_t = 100)]
    pub warmup: u32,

    /// Seconds to hold every socket open before the final reading.
    #[arg(long, default_value_t = 5, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(0..=600))]
    pub hold_seconds: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConnectionsReport {
    pub scenario: &'static str,
    pub server: String,
    /// Server before any socket.
    pub empty: ProcessSample,
    /// Server after the warm-up sockets.
    pub baseline: ProcessSample,
    /// Server with every socket open.
    pub loaded: ProcessSample,
    /// Server after the hold time.
    pub held: ProcessSample,
    /// Server after every socket closed.
    pub closed: ProcessSample,
    pub warmup: FleetReport,
    pub fleet: FleetReport,
    /// Sockets the server closed during the hold.
    pub dropped_during_hold: u64,
    /// (held RSS - baseline RSS) / sockets opened after the warm-up, in bytes.
    pub server_bytes_per_connection: f64,
    /// The load client's own (RSS growth) / sockets, in bytes.
    pub client_bytes_per_connection: f64,
}

pub async fn run(args: ConnectionsArgs, deadline: Instant) -> Result<ConnectionsReport> {
    let Some(pid) = args.target.server_pid else {
        bail!("the connections scenario measures server memory: pass --server-pid");
    };
    let pid = pid.to_string();
    let warmup_count = args.warmup.clamp(1, args.fleet.clients);

    let empty = procstat::sample(&pid)?;
    let warmup_args = FleetArgs {
        clients: warmup_count,
        ..args.fleet.clone()
    };
    let warmup = clients::connect_fleet(args.target.server, &warmup_args, "idle-warmup", deadline).await?;
    tokio::time::sleep(SETTLE_TIME).await;
    let baseline = procstat::sample(&pid)?;
    let client_baseline = procstat::sample("self")?;

    let main_args = FleetArgs {
        clients: args.fleet.clients - warmup_count,
        ..args.fleet.clone()
    };
    let fleet = if main_args.clients > 0 {
        clients::connect_fleet(args.target.server, &main_args, "idle", deadline).await?
    } else {
        clients::Fleet {
            clients: Vec::new(),
            report: FleetReport::default(),
        }
    };
    fleet.report.print();
    let opened = fleet.report.connected;

    let dropped = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut readers = JoinSet::new();
    for client in warmup.clients.into_iter().chain(fleet.clients) {
        readers.spawn(hold_idle(client, dropped.clone(), stop_rx.clone()));
    }
    tokio::time::sleep(SETTLE_TIME).await;
    let loaded = procstat::sample(&pid)?;
    let client_loaded = procstat::sample("self")?;

    let hold_until = (Instant::now() + Duration::from_secs(args.hold_seconds)).min(deadline);
    tokio::time::sleep_until(hold_until).await;
    let held = procstat::sample(&pid)?;
    let dropped_during_hold = dropped.load(Ordering::Relaxed);

    let _ = stop_tx.send(true);
    let closing = async { while readers.join_next().await.is_some() {} };
    if tokio::time::timeout(CLOSE_TIMEOUT * 4, closing).await.is_err() {
        readers.abort_all();
    }
    tokio::time::sleep(SETTLE_TIME).await;
    let closed = procstat::sample(&pid)?;

    let per_connection = |after: u64, before: u64| {
        if opened == 0 {
            0.0
        } else {
            (after as f64 - before as f64) / f64::from(opened)
        }
    };
    Ok(ConnectionsReport {
        scenario: "connections",
        server: args.target.server.to_string(),
        server_bytes_per_connection: per_connection(held.rss_bytes, baseline.rss_bytes),
        client_bytes_per_connection: per_connection(client_loaded.rss_bytes, client_baseline.rss_bytes),
        empty,
        baseline,
        loaded,
        held,
        closed,
        warmup: warmup.report,
        fleet: fleet.report,
        dropped_during_hold,
    })
}

/// Reads one idle socket, so that pings are answered, until it closes or
/// `stop` changes.
async fn hold_idle(client: Client, dropped: Arc<AtomicU64>, mut stop: watch::Receiver<bool>) {
    let mut socket = client.socket;
    loop {
        tokio::select! {
            _ = stop.changed() => {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, socket.close(None)).await;
                return;
            }
            message = socket.next() => match message {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) | Some(Err(_)) | None => {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Some(Ok(_)) => {}
            },
        }
    }
}

pub fn print_report(report: &ConnectionsReport) {
    println!(
        "server RSS: empty {}, after {} warm-up sockets {}, with {} more sockets {}, after hold {}, after close {}",
        mebibytes(report.empty.rss_bytes),
        report.warmup.connected,
        mebibytes(report.baseline.rss_bytes),
        report.fleet.connected,
        mebibytes(report.loaded.rss_bytes),
        mebibytes(report.held.rss_bytes),
        mebibytes(report.closed.rss_bytes)
    );
    println!(
        "server memory per idle connection: {:.0} bytes ({:.2} KiB); load client: {:.2} KiB per socket",
        report.server_bytes_per_connection,
        report.server_bytes_per_connection / 1024.0,
        report.client_bytes_per_connection / 1024.0
    );
    println!("sockets closed by the server during the hold: {}", report.dropped_during_hold);
}
