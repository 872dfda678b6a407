//! Prometheus metrics: the recorder, the names partyhost records, and the
//! per-room handles the hot paths use.
//!
//! Every metric carries the labels that apply: `room` (the logical room, or
//! the room id of a room that is not a shard), `shard` (k of a shard room,
//! empty otherwise) and `export` for guest calls. A room looks its handles
//! up once when it starts, so recording on the message path is an atomic
//! add, not a registry lookup.

use std::time::Duration;

use metrics::{Counter, Gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

use crate::router::split_shard_id;

/// Histogram buckets for latencies, in seconds: 50 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Time after which a series that was not updated leaves `/metrics`.
const SERIES_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// Installs the process-wide recorder and returns the handle that renders
/// it. Call once; a second call returns an error.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    // Room names come from clients, so series of rooms that come and go
    // would pile up forever. A series not updated for SERIES_IDLE_TIMEOUT
    // is dropped, and comes back with its next update.
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .idle_timeout(MetricKindMask::ALL, Some(SERIES_IDLE_TIMEOUT))
        .install_recorder()?;
    describe();

    // Histograms drain their samples on upkeep; without the exporter's HTTP
    // listener, that is our job.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

    describe_gauge!("partyhost_connections", "Open WebSockets per room and shard");
    describe_gauge!("partyhost_rooms", "Rooms whose instance is in memory");
    describe_counter!("partyhost_messages_in_total", "WebSocket messages received from clients");
    describe_counter!("partyhost_messages_out_total", "WebSocket messages queued for clients");
    describe_counter!("partyhost_bytes_out_total", Unit::Bytes, "Payload bytes queued for clients");
    describe_histogram!("partyhost_fanout_duration_seconds", Unit::Seconds, "Time from a router request to the answer of its last shard");
    describe_histogram!("partyhost_guest_call_duration_seconds", Unit::Seconds, "Duration of one guest export call");
    describe_counter!("partyhost_traps_total", "Guest calls that trapped");
    describe_counter!("partyhost_restarts_total", "Room instances started again after a trap");
    describe_counter!("partyhost_slow_consumer_disconnects_total", "Connections closed because their outbound queue was full");
    describe_counter!("partyhost_rejected_connections_total", "WebSocket handshakes answered with an error, by reason");
}

/// Returns the `room` and `shard` labels of a room id.
pub fn room_labels(room_id: &str) -> [(&'static str, String); 2] {
    match split_shard_id(room_id) {
        Some((room, k)) => [("room", room.to_string()), ("shard", k.to_string())],
        None => [("room", room_id.to_string()), ("shard", String::new())],
    }
}

/// Handles of one room's metrics.
#[derive(Clone)]
pub struct RoomMetrics {
    pub connections: Gauge,
    pub messages_in: Counter,
    pub messages_out: Counter,
    pub bytes_out: Counter,
    pub restarts: Counter,
    labels: [(&'static str, String); 2],
}

impl RoomMetrics {
    pub fn new(room_id: &str) -> RoomMetrics {
        let labels = room_labels(room_id);
        RoomMetrics {
            connections: metrics::gauge!("partyhost_connections", &labels),
            messages_in: metrics::counter!("partyhost_messages_in_total", &labels),
            messages_out: metrics::counter!("partyhost_messages_out_total", &labels),
            bytes_out: metrics::counter!("partyhost_bytes_out_total", &labels),
            restarts: metrics::counter!("partyhost_restarts_total", &labels),
            labels,
        }
    }

    /// Counts a trap in `export`.
    pub fn trap(&self, export: &'static str) {
        let [room, shard] = self.labels.clone();
        metrics::counter!("partyhost_traps_total", &[room, shard, ("export", export.to_string())]).increment(1);
    }
}

/// Records the duration of a guest call to `export`.
pub fn guest_call(export: &'static str, duration: Duration) {
    metrics::histogram!("partyhost_guest_call_duration_seconds", "export" => export).record(duration.as_secs_f64());
}

/// Counts a rejected handshake.
pub fn rejected_connection(reason: &'static str) {
    metrics::counter!("partyhost_rejected_connections_total", "reason" => reason).increment(1);
}
