//! Scenario 3, instance cost over the wire: one HTTP GET to each of K new
//! rooms `/parties/main/<prefix>-<i>` starts K instances (cold pass); the
//! same GETs again reach running rooms (warm pass). The difference between
//! the passes, in server CPU time and in latency, estimates what starting a
//! room costs beyond serving a request; the RSS growth over the cold pass
//! divided by K is the memory per room.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::clients::{self, TargetArgs};
use crate::loopback;
use crate::procstat::{self, ProcessSample};
use crate::report::{self, mebibytes, LatencySummary, MAX_LATENCY_MICROS};

/// Time one request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, clap::Args)]
pub struct RoomsArgs {
    #[command(flatten)]
    pub target: TargetArgs,

    /// Rooms to start, one GET each. The server needs `--max-rooms` at
    /// least this high, and a `--room-idle-timeout` longer than the run.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rooms: u32,

    /// Requests in flight at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub concurrency: u32,

    /// Room id prefix: rooms are `<PREFIX>-0` to `<PREFIX>-<ROOMS - 1>`.
    /// Use a fresh prefix per run so that the cold pass really starts rooms.
    #[arg(long, default_value = "start")]
    pub prefix: String,
}

/// One pass over every room.
#[derive(Debug, Clone, Serialize)]
pub struct PassReport {
    pub requests: u32,
    pub ok: u32,
    /// Failed requests per status or error.
    pub failures: BTreeMap<String, u32>,
    pub seconds: f64,
    pub requests_per_second: f64,
    pub latency: LatencySummary,
    pub server_before: Option<ProcessSample>,
    pub server_after: Option<ProcessSample>,
}

impl PassReport {
    fn server_cpu_seconds(&self) -> Option<f64> {
        Some(self.server_after?.cpu_seconds - self.server_before?.cpu_seconds)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RoomsReport {
    pub scenario: &'static str,
    pub server: String,
    pub rooms: u32,
    pub concurrency: u32,
    /// First request to each room: starts its instance.
    pub cold: PassReport,
    /// Second request to each room: the instance runs already.
    pub warm: PassReport,
    /// Mean latency of a cold request minus that of a warm one, in
    /// microseconds.
    pub start_latency_micros: f64,
    /// (Server CPU of the cold pass - that of the warm pass) / rooms, in
    /// microseconds.
    pub start_cpu_micros: Option<f64>,
    /// Server RSS growth over the cold pass / rooms, in bytes.
    pub bytes_per_room: Option<f64>,
}

pub async fn run(args: RoomsArgs, deadline: Instant) -> Result<RoomsReport> {
    loopback::check_server(args.target.server)?;
    let http = reqwest::Client::builder()
        .local_address(Some(std::net::IpAddr::from([127, 0, 0, 1])).filter(|_| args.target.server.is_ipv4()))
        .pool_max_idle_per_host(args.concurrency as usize)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .context("failed to build the HTTP client")?;

    let cold = run_pass(&args, &http, "cold", deadline).await?;
    print_pass("cold", &cold);
    let warm = run_pass(&args, &http, "warm", deadline).await?;
    print_pass("warm", &warm);

    let start_cpu_micros = match (cold.server_cpu_seconds(), warm.server_cpu_seconds()) {
        (Some(cold_cpu), Some(warm_cpu)) => Some((cold_cpu - warm_cpu) * 1e6 / f64::from(args.rooms)),
        _ => None,
    };
    let bytes_per_room = match (cold.server_before, cold.server_after) {
        (Some(before), Some(after)) => Some((after.rss_bytes as f64 - before.rss_bytes as f64) / f64::from(cold.ok.max(1))),
        _ => None,
    };
    Ok(RoomsReport {
        scenario: "rooms",
        server: args.target.server.to_string(),
        rooms: args.rooms,
        concurrency: args.concurrency,
        start_latency_micros: (cold.latency.mean_ms - warm.latency.mean_ms) * 1000.0,
        start_cpu_micros,
        bytes_per_room,
        cold,
        warm,
    })
}

/// Sends one GET to every room with `concurrency` workers.
async fn run_pass(args: &RoomsArgs, http: &reqwest::Client, label: &str, deadline: Instant) -> Result<PassReport> {
    let pid = args.target.server_pid.map(|pid| pid.to_string());
    let server_before = pid.as_deref().map(procstat::sample).transpose()?;
    let next_room = Arc::new(AtomicU32::new(0));
    let outcomes = Arc::new(Mutex::new((0u32, BTreeMap::new(), report::latency_histogram())));
    let progress = clients::progress_bar(u64::from(args.rooms), label);
    let started = Instant::now();

    let mut workers = JoinSet::new();
    for _ in 0..args.concurrency {
        let http = http.clone();
        let next_room = next_room.clone();
        let outcomes = outcomes.clone();
        let progress = progress.clone();
        let base = format!("http://{}/parties/main/{}", args.target.server, args.prefix);
        let rooms = args.rooms;
        workers.spawn(async move {
            loop {
                let room = next_room.fetch_add(1, Ordering::Relaxed);
                if room >= rooms || Instant::now() >= deadline {
                    return;
                }
                let sent = Instant::now();
                let result = http.get(format!("{base}-{room}")).send().await;
                let micros = (sent.elapsed().as_micros() as u64).clamp(1, MAX_LATENCY_MICROS);
                let failure = match result {
                    Ok(response) if response.status().is_success() => None,
                    Ok(response) => Some(format!("HTTP {}", response.status())),
                    Err(err) if err.is_timeout() => Some("timed out".to_string()),
                    Err(err) => Some(format!("request failed: {err}")),
                };
                let mut outcomes = outcomes.lock().expect("outcome lock");
                let (ok, failures, latency): &mut (u32, BTreeMap<String, u32>, Histogram<u64>) = &mut outcomes;
                match failure {
                    None => *ok += 1,
                    Some(failure) => clients::count_error(failures, failure),
                }
                let _ = latency.record(micros);
                progress.inc(1);
            }
        });
    }
    while workers.join_next().await.is_some() {}
    progress.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let server_after = pid.as_deref().map(procstat::sample).transpose()?;

    let outcomes = outcomes.lock().expect("outcome lock");
    let (ok, failures, latency) = &*outcomes;
    let requests = latency.len() as u32;
    Ok(PassReport {
        requests,
        ok: *ok,
        failures: failures.clone(),
        seconds,
        requests_per_second: f64::from(requests) / seconds,
        latency: LatencySummary::from_histogram(latency),
        server_before,
        server_after,
    })
}

fn print_pass(label: &str, pass: &PassReport) {
    println!(
        "{label} pass: {}/{} ok in {:.2} s ({:.0} requests/s); latency {}",
        pass.ok,
        pass.requests,
        pass.seconds,
        pass.requests_per_second,
        pass.latency.line()
    );
    if let (Some(before), Some(after)) = (pass.server_before, pass.server_after) {
        println!(
            "  server: {:.2} CPU s, RSS {} -> {}",
            after.cpu_seconds - before.cpu_seconds,
            mebibytes(before.rss_bytes),
            mebibytes(after.rss_bytes)
        );
    }
    for (failure, count) in &pass.failures {
        println!("  failure ({count}x): {failure}");
    }
}

pub fn print_report(report: &RoomsReport) {
    println!(
        "room start over the wire: +{:.1} us latency per cold request vs warm",
        report.start_latency_micros
    );
    if let Some(cpu) = report.start_cpu_micros {
        println!("room start server CPU: {cpu:.1} us per room (cold pass CPU - warm pass CPU) / rooms");
    }
    if let Some(bytes) = report.bytes_per_room {
        println!("server memory per running room: {:.1} KiB", bytes / 1024.0);
    }
}
