//! `partyhost-bench`: the load client of partyhost's benchmark suite.
//!
//! It speaks only the public protocol (`/parties/router/<room>` WebSockets
//! and POSTs, `/parties/main/<room>` requests), so it can measure any server
//! with PartyKit's router URLs. Each subcommand is one scenario. Every
//! socket targets a loopback address, every count is bounded, and a run
//! stops by itself at `--time-limit`. Reports are printed as text and, with
//! `--json PATH`, written as JSON.

mod clients;
mod connections;
mod fanout;
mod loopback;
mod procstat;
mod report;
mod rooms;
mod summary;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tokio::time::Instant;

/// Grace time past `--time-limit` before the process exits regardless.
const HARD_STOP_GRACE: Duration = Duration::from_secs(30);

/// Load client for partyhost: fan-out throughput and latency, idle
/// connections, room start cost.
#[derive(Debug, Parser)]
#[command(name = "partyhost-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Open WebSocket clients in one router room and POST to it at
    /// increasing rates: deliveries, loss, duplicates and end-to-end
    /// latency per rate.
    Fanout(fanout::FanoutArgs),
    /// Open idle WebSockets and report the server's memory per connection.
    Connections(connections::ConnectionsArgs),
    /// Start many rooms with one HTTP request each and report time, CPU and
    /// memory per room.
    Rooms(rooms::RoomsArgs),
    /// Print the medians of the JSON reports in a folder as Markdown
    /// tables.
    Summarize(summary::SummarizeArgs),
}

impl Scenario {
    fn target(&self) -> Option<&clients::TargetArgs> {
        match self {
            Scenario::Fanout(args) => Some(&args.target),
            Scenario::Connections(args) => Some(&args.target),
            Scenario::Rooms(args) => Some(&args.target),
            Scenario::Summarize(_) => None,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(target) = cli.scenario.target().cloned() else {
        if let Scenario::Summarize(args) = &cli.scenario {
            if let Err(err) = summary::run(args) {
                eprintln!("error: {err:#}");
                return ExitCode::FAILURE;
            }
        }
        return ExitCode::SUCCESS;
    };
    if let Err(err) = loopback::check_server(target.server) {
        eprintln!("error: {err:#}");
        return ExitCode::from(2);
    }
    let open_files = procstat::raise_open_files_limit();
    eprintln!("partyhost-bench: open file limit {open_files}");

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: failed to start the tokio runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let time_limit = Duration::from_secs(target.time_limit);
    let result = runtime.block_on(async {
        let deadline = Instant::now() + time_limit;
        match tokio::time::timeout(time_limit + HARD_STOP_GRACE, run(cli.scenario, deadline)).await {
            Ok(result) => result,
            Err(_) => Err(anyhow::anyhow!(
                "the run timed out {} s after its time limit of {} s",
                HARD_STOP_GRACE.as_secs(),
                target.time_limit
            )),
        }
    });
    // Sockets still closing must not keep the process alive.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(scenario: Scenario, deadline: Instant) -> Result<()> {
    match scenario {
        Scenario::Fanout(args) => {
            let json = args.target.json.clone();
            let report = fanout::run(args, deadline).await?;
            fanout::print_summary(&report);
            write_json(json, &report)
        }
        Scenario::Connections(args) => {
            let json = args.target.json.clone();
            let report = connections::run(args, deadline).await?;
            connections::print_report(&report);
            write_json(json, &report)
        }
        Scenario::Rooms(args) => {
            let json = args.target.json.clone();
            let report = rooms::run(args, deadline).await?;
            rooms::print_report(&report);
            write_json(json, &report)
        }
        Scenario::Summarize(_) => unreachable!("summarize runs without a server"),
    }
}

fn write_json(path: Option<std::path::PathBuf>, report: &impl serde::Serialize) -> Result<()> {
    let Some(path) = path else {
        return Ok(());
    };
    report::write_json(&path, report).context("failed to save the report")?;
    eprintln!("partyhost-bench: JSON report written to {}", path.display());
    Ok(())
}
