//! Scenario 1, fan-out: a fleet of WebSocket clients in one logical room,
//! and HTTP POSTs to `/parties/router/<room>` sent open-loop at a fixed
//! rate. Every POST carries a step number, a sequence number and its send
//! time, so each client can count what it received, spot duplicates and
//! measure end-to-end latency. The scenario steps through increasing rates
//! and reports the highest delivery rate that stayed within the p99 limit
//! with nothing lost.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::clients::{self, Client, FleetArgs, FleetReport, Socket, TargetArgs};
use crate::procstat::{self, PeakRss};
use crate::clients::CLOSE_TIMEOUT;
use crate::report::{self, LatencySummary, ResourceUse, MAX_LATENCY_MICROS};

/// Histograms the readers record into; a reader uses stripe
/// `index % LATENCY_STRIPES`, which keeps lock contention low.
const LATENCY_STRIPES: usize = 64;

/// Time a POST may take before it counts as failed.
const POST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, clap::Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub target: TargetArgs,

    #[command(flatten)]
    pub fleet: FleetArgs,

    /// POST rates to step through, in POSTs per second, lowest first. Each
    /// POST is delivered to every client.
    #[arg(long, value_delimiter = ',', default_value = "20,50,100", value_name = "PER_SECOND,...")]
    pub rates: Vec<u32>,

    /// Seconds each rate is sent for.
    #[arg(long, default_value_t = 10, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..=600))]
    pub step_seconds: u64,

    /// Size of each POST body, in bytes. Bodies are padded to it; the
    /// header of step, sequence number and timestamp takes about 20 bytes.
    #[arg(long, default_value_t = 100, value_name = "BYTES")]
    pub message_bytes: usize,

    /// POSTs in flight at once, at most. A POST due while all are in flight
    /// waits; its timestamp stays the time it was due, so the wait counts
    /// as latency.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_in_flight: u32,

    /// p99 end-to-end latency a step must stay under, in milliseconds.
    #[arg(long, default_value_t = 50.0, value_name = "MS")]
    pub p99_limit_ms: f64,

    /// Seconds to wait for outstanding deliveries after a step's last POST.
    #[arg(long, default_value_t = 5, value_name = "SECONDS")]
    pub drain_seconds: u64,

    /// POSTs one step sends, at most.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub max_messages_per_step: u64,

    /// Try every rate even after one missed the p99 limit or lost
    /// deliveries.
    #[arg(long)]
    pub keep_going: bool,
}

/// One delivery parsed from `received <step> <seq> <micros> ... (via room <shard>)`.
#[derive(Debug, PartialEq, Eq)]
struct Delivery {
    step: u32,
    seq: u64,
    sent_micros: u64,
}

fn parse_delivery(text: &str) -> Option<Delivery> {
    let mut fields = text.strip_prefix("received ")?.split_ascii_whitespace();
    Some(Delivery {
        step: fields.next()?.parse().ok()?,
        seq: fields.next()?.parse().ok()?,
        sent_micros: fields.next()?.parse().ok()?,
    })
}

/// Builds a POST body of at least `bytes` bytes: step, sequence number and
/// send time in microseconds, padded with dots.
fn message_body(step: u32, seq: u64, sent_micros: u64, bytes: usize) -> String {
    let mut body = format!("{step} {seq} {sent_micros} ");
    if body.len() < bytes {
        body.extend(std::iter::repeat_n('.', bytes - body.len()));
    }
    body
}

/// Counters of the current step, shared by every reader.
struct Tracker {
    /// Time zero of every timestamp in POST bodies.
    origin: Instant,
    step: AtomicU32,
    max_seq: AtomicU64,
    unique: AtomicU64,
    duplicates: AtomicU64,
    /// Deliveries of an earlier step that arrived after it ended.
    late: AtomicU64,
    /// Text messages that are not deliveries.
    unexpected: AtomicU64,
    /// Sockets the fleet connected.
    opened: AtomicU64,
    /// Sockets that closed or failed since the run started.
    closed: AtomicU64,
    last_delivery_micros: AtomicU64,
    latencies: Vec<Mutex<Histogram<u64>>>,
}

impl Tracker {
    fn new() -> Tracker {
        Tracker {
            origin: Instant::now(),
            step: AtomicU32::new(0),
            max_seq: AtomicU64::new(0),
            unique: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            late: AtomicU64::new(0),
            unexpected: AtomicU64::new(0),
            opened: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            last_delivery_micros: AtomicU64::new(0),
            latencies: (0..LATENCY_STRIPES).map(|_| Mutex::new(report::latency_histogram())).collect(),
        }
    }

    /// Clients still open: those connected minus those closed so far.
    fn open_clients(&self) -> u64 {
        self.opened.load(Ordering::Relaxed).saturating_sub(self.closed.load(Ordering::Relaxed))
    }

    fn micros_at(&self, instant: Instant) -> u64 {
        instant.saturating_duration_since(self.origin).as_micros() as u64
    }

    /// Resets the counters for `step`, which may send up to `max_seq` POSTs.
    fn begin_step(&self, step: u32, max_seq: u64) {
        self.max_seq.store(max_seq, Ordering::Relaxed);
        self.unique.store(0, Ordering::Relaxed);
        self.duplicates.store(0, Ordering::Relaxed);
        self.late.store(0, Ordering::Relaxed);
        self.unexpected.store(0, Ordering::Relaxed);
        self.last_delivery_micros.store(0, Ordering::Relaxed);
        for stripe in &self.latencies {
            stripe.lock().expect("latency lock").reset();
        }
        self.step.store(step, Ordering::Release);
    }

    fn record(&self, text: &str, stripe: usize, seen: &mut SeenSet) {
        let received_micros = self.micros_at(Instant::now());
        let Some(delivery) = parse_delivery(text) else {
            self.unexpected.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if delivery.step != self.step.load(Ordering::Acquire) {
            self.late.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if delivery.seq >= self.max_seq.load(Ordering::Relaxed) {
            self.unexpected.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if !seen.insert(delivery.step, delivery.seq) {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.unique.fetch_add(1, Ordering::Relaxed);
        self.last_delivery_micros.fetch_max(received_micros, Ordering::Relaxed);
        let latency = received_micros.saturating_sub(delivery.sent_micros).clamp(1, MAX_LATENCY_MICROS);
        self.latencies[stripe]
            .lock()
            .expect("latency lock")
            .record(latency)
            .expect("latency is within the histogram bounds");
    }

    fn latency_summary(&self) -> LatencySummary {
        let mut merged = report::latency_histogram();
        for stripe in &self.latencies {
            merged.add(&*stripe.lock().expect("latency lock")).expect("histograms share bounds");
        }
        LatencySummary::from_histogram(&merged)
    }
}

/// Sequence numbers one client has received in the current step.
#[derive(Default)]
struct SeenSet {
    step: Option<u32>,
    bits: Vec<u64>,
}

impl SeenSet {
    /// Marks `seq` of `step` as received; returns false when it already was.
    fn insert(&mut self, step: u32, seq: u64) -> bool {
        if self.step != Some(step) {
            self.step = Some(step);
            self.bits.clear();
        }
        let word = (seq / 64) as usize;
        let bit = 1u64 << (seq % 64);
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        let fresh = self.bits[word] & bit == 0;
        self.bits[word] |= bit;
        fresh
    }
}

/// Reads deliveries from one socket until it closes or `stop` changes, and
/// then closes it.
async fn read_deliveries(client: Client, tracker: Arc<Tracker>, mut stop: watch::Receiver<bool>) {
    let stripe = client.index as usize % LATENCY_STRIPES;
    let mut socket: Socket = client.socket;
    let mut seen = SeenSet::default();
    loop {
        tokio::select! {
            _ = stop.changed() => {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, socket.close(None)).await;
                return;
            }
            message = socket.next() => match message {
                Some(Ok(Message::Text(text))) => tracker.record(text.as_str(), stripe, &mut seen),
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    tracker.closed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Some(Ok(_)) => {}
            },
        }
    }
}

/// Outcome of the POSTs of one step.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PostReport {
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    /// Failed POSTs per status or error.
    pub failures: BTreeMap<String, u32>,
    /// Time from sending a POST to its response.
    pub response_time: LatencySummary,
}

/// Results at one rate.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub rate_per_second: u32,
    /// Clients open when the step started.
    pub clients: u64,
    pub posts: PostReport,
    /// POSTs sent times clients open at the start of the step.
    pub expected: u64,
    pub delivered: u64,
    pub missing: u64,
    pub duplicated: u64,
    pub late: u64,
    pub unexpected: u64,
    /// Sockets that closed during the step.
    pub closed_sockets: u64,
    /// Seconds from the first POST's due time to the last delivery.
    pub seconds: f64,
    pub deliveries_per_second: f64,
    /// Rate times clients: what the step offered.
    pub offered_deliveries_per_second: f64,
    pub latency: LatencySummary,
    pub server: Option<ResourceUse>,
    /// The load client's own CPU and memory, to tell when it is the bound.
    pub client: ResourceUse,
    /// p99 under the limit, nothing missing and every POST answered 2xx.
    pub passed: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct FanoutReport {
    pub scenario: &'static str,
    pub server: String,
    pub room: String,
    pub message_bytes: usize,
    pub p99_limit_ms: f64,
    pub fleet: FleetReport,
    pub steps: Vec<StepReport>,
    /// Index in `steps` of the passed step with the most deliveries per
    /// second.
    pub best_step: Option<usize>,
    /// Why the run ended before the last rate, if it did.
    pub stopped_early: Option<String>,
}

pub async fn run(args: FanoutArgs, deadline: Instant) -> Result<FanoutReport> {
    let fleet = clients::connect_fleet(args.target.server, &args.fleet, "fanout", deadline).await?;
    fleet.report.print();
    let tracker = Arc::new(Tracker::new());
    tracker.opened.store(fleet.clients.len() as u64, Ordering::Relaxed);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut readers = JoinSet::new();
    for client in fleet.clients {
        readers.spawn(read_deliveries(client, tracker.clone(), stop_rx.clone()));
    }

    let http = reqwest::Client::builder()
        .local_address(Some(std::net::IpAddr::from([127, 0, 0, 1])).filter(|_| args.target.server.is_ipv4()))
        .pool_max_idle_per_host(args.max_in_flight as usize)
        .timeout(POST_TIMEOUT)
        .build()
        .context("failed to build the HTTP client")?;
    let url = format!("http://{}/parties/router/{}", args.target.server, args.fleet.room);

    let mut report = FanoutReport {
        scenario: "fanout",
        server: args.target.server.to_string(),
        room: args.fleet.room.clone(),
        message_bytes: args.message_bytes,
        p99_limit_ms: args.p99_limit_ms,
        fleet: fleet.report,
        steps: Vec::new(),
        best_step: None,
        stopped_early: None,
    };
    for (index, &rate) in args.rates.iter().enumerate() {
        let step_time = Duration::from_secs(args.step_seconds + args.drain_seconds);
        if Instant::now() + step_time > deadline {
            report.stopped_early = Some(format!("the time limit left no room for the step at {rate}/s"));
            break;
        }
        let step = run_step(&args, &http, &url, &tracker, index as u32 + 1, rate, deadline).await?;
        print_step(&step);
        let passed = step.passed;
        report.steps.push(step);
        if !passed && !args.keep_going {
            report.stopped_early = Some(format!("the step at {rate}/s missed the p99 limit or lost deliveries"));
            break;
        }
    }
    report.best_step = report
        .steps
        .iter()
        .enumerate()
        .filter(|(_, step)| step.passed)
        .max_by(|(_, a), (_, b)| a.deliveries_per_second.total_cmp(&b.deliveries_per_second))
        .map(|(index, _)| index);

    let _ = stop_tx.send(true);
    let closing = async { while readers.join_next().await.is_some() {} };
    if tokio::time::timeout(CLOSE_TIMEOUT * 2, closing).await.is_err() {
        readers.abort_all();
    }
    Ok(report)
}

async fn run_step(
    args: &FanoutArgs,
    http: &reqwest::Client,
    url: &str,
    tracker: &Arc<Tracker>,
    step: u32,
    rate: u32,
    deadline: Instant,
) -> Result<StepReport> {
    let messages = (u64::from(rate) * args.step_seconds).clamp(1, args.max_messages_per_step);
    let clients_open = tracker.open_clients();
    let closed_before = tracker.closed.load(Ordering::Relaxed);
    tracker.begin_step(step, messages);

    let server_before = args.target.server_pid.map(|pid| procstat::sample(&pid.to_string())).transpose()?;
    let client_before = procstat::sample("self")?;
    let sampler = args.target.server_pid.map(PeakRss::start);
    let client_sampler = PeakRss::start(std::process::id());

    let started = Instant::now();
    let posts = send_posts(args, http, url, tracker, step, rate, messages, started).await;

    let expected = messages * clients_open;
    let drain_until = (Instant::now() + Duration::from_secs(args.drain_seconds)).min(deadline);
    while tracker.unique.load(Ordering::Relaxed) < expected && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let server = match (args.target.server_pid, server_before, sampler) {
        (Some(pid), Some(before), Some(sampler)) => {
            let peak = sampler.finish().await;
            let after = procstat::sample(&pid.to_string())?;
            Some(ResourceUse::between(&before, &after, peak))
        }
        _ => None,
    };
    let client_peak = client_sampler.finish().await;
    let client = ResourceUse::between(&client_before, &procstat::sample("self")?, client_peak);

    let delivered = tracker.unique.load(Ordering::Relaxed);
    let last_micros = tracker.last_delivery_micros.load(Ordering::Relaxed);
    let seconds = last_micros.saturating_sub(tracker.micros_at(started)) as f64 / 1e6;
    let latency = tracker.latency_summary();
    let missing = expected.saturating_sub(delivered);
    let passed = missing == 0 && posts.failed == 0 && latency.p99_ms <= args.p99_limit_ms;
    Ok(StepReport {
        rate_per_second: rate,
        clients: clients_open,
        expected,
        delivered,
        missing,
        duplicated: tracker.duplicates.load(Ordering::Relaxed),
        late: tracker.late.load(Ordering::Relaxed),
        unexpected: tracker.unexpected.load(Ordering::Relaxed),
        closed_sockets: tracker.closed.load(Ordering::Relaxed) - closed_before,
        seconds,
        deliveries_per_second: if seconds > 0.0 { delivered as f64 / seconds } else { 0.0 },
        offered_deliveries_per_second: f64::from(rate) * clients_open as f64,
        latency,
        posts,
        server,
        client,
        passed,
    })
}

/// Sends `messages` POSTs, one every `1 / rate` seconds from `started`,
/// and waits for every response.
#[allow(clippy::too_many_arguments)]
async fn send_posts(
    args: &FanoutArgs,
    http: &reqwest::Client,
    url: &str,
    tracker: &Arc<Tracker>,
    step: u32,
    rate: u32,
    messages: u64,
    started: Instant,
) -> PostReport {
    let in_flight = Arc::new(Semaphore::new(args.max_in_flight as usize));
    let outcomes = Arc::new(Mutex::new((PostReport::default(), report::latency_histogram())));
    let progress = clients::progress_bar(messages, &format!("{rate}/s"));
    let mut tasks = JoinSet::new();

    for seq in 0..messages {
        let due = started + Duration::from_secs_f64(seq as f64 / f64::from(rate));
        tokio::time::sleep_until(due).await;
        let permit = in_flight.clone().acquire_owned().await.expect("the semaphore is never closed");
        let body = message_body(step, seq, tracker.micros_at(due), args.message_bytes);
        let request = http.post(url).body(body);
        let outcomes = outcomes.clone();
        tasks.spawn(async move {
            let sent = Instant::now();
            let result = request.send().await;
            let response_micros = (sent.elapsed().as_micros() as u64).clamp(1, MAX_LATENCY_MICROS);
            let failure = match result {
                Ok(response) if response.status().is_success() => None,
                Ok(response) => Some(format!("HTTP {}", response.status())),
                Err(err) if err.is_timeout() => Some("timed out".to_string()),
                Err(err) if err.is_connect() => Some("connect failed".to_string()),
                Err(err) => Some(format!("request failed: {err}")),
            };
            drop(permit);
            let mut outcomes = outcomes.lock().expect("post outcome lock");
            let (posts, response_time) = &mut *outcomes;
            posts.sent += 1;
            match failure {
                None => posts.ok += 1,
                Some(failure) => {
                    posts.failed += 1;
                    clients::count_error(&mut posts.failures, failure);
                }
            }
            let _ = response_time.record(response_micros);
        });
        progress.inc(1);
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    progress.finish_and_clear();

    let outcomes = outcomes.lock().expect("post outcome lock");
    let (posts, response_time) = &*outcomes;
    let mut posts = posts.clone();
    posts.response_time = LatencySummary::from_histogram(response_time);
    posts
}

fn print_step(step: &StepReport) {
    println!(
        "rate {}/s x {} clients: delivered {}/{} (missing {}, duplicated {}, late {}), {:.0} deliveries/s \
         (offered {:.0}) -> {}",
        step.rate_per_second,
        step.clients,
        step.delivered,
        step.expected,
        step.missing,
        step.duplicated,
        step.late,
        step.deliveries_per_second,
        step.offered_deliveries_per_second,
        if step.passed { "passed" } else { "FAILED" }
    );
    println!("  latency: {}", step.latency.line());
    println!(
        "  POSTs: {} ok, {} failed; response time {}",
        step.posts.ok,
        step.posts.failed,
        step.posts.response_time.line()
    );
    for (failure, count) in &step.posts.failures {
        println!("  POST failure ({count}x): {failure}");
    }
    if let Some(server) = &step.server {
        println!("  server: {}", server.line());
    }
    println!("  client: {}", step.client.line());
}

pub fn print_summary(report: &FanoutReport) {
    match report.best_step.map(|index| &report.steps[index]) {
        Some(best) => println!(
            "best: {:.0} deliveries/s at {}/s x {} clients, p99 {:.2} ms (limit {} ms)",
            best.deliveries_per_second, best.rate_per_second, best.clients, best.latency.p99_ms, report.p99_limit_ms
        ),
        None => println!("best: no step stayed under the p99 limit of {} ms without loss", report.p99_limit_ms),
    }
    if let Some(reason) = &report.stopped_early {
        println!("stopped early: {reason}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_round_trips_through_body() {
        let body = message_body(3, 42, 123_456, 100);
        assert_eq!(body.len(), 100);
        let text = format!("received {body} (via room bench-2)");
        assert_eq!(
            parse_delivery(&text),
            Some(Delivery {
                step: 3,
                seq: 42,
                sent_micros: 123_456
            })
        );
    }

    #[test]
    fn greeting_is_not_a_delivery() {
        assert_eq!(parse_delivery("connected to bench-1"), None);
        assert_eq!(parse_delivery("received hello (via room bench-1)"), None);
    }

    #[test]
    fn seen_set_flags_duplicates_per_step() {
        let mut seen = SeenSet::default();
        assert!(seen.insert(1, 0));
        assert!(seen.insert(1, 200));
        assert!(!seen.insert(1, 200));
        assert!(seen.insert(2, 200), "a new step starts empty");
    }
}
