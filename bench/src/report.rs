//! Shared pieces of the reports: latency percentiles from an HDR histogram,
//! server resource figures, and writing a report as JSON.

use std::path::Path;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::procstat::ProcessSample;

/// Highest latency a histogram records, in microseconds (60 s). Larger
/// values are clamped to it.
pub const MAX_LATENCY_MICROS: u64 = 60_000_000;

/// Creates a histogram of microsecond latencies with 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_MICROS, 3).expect("histogram bounds are valid")
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl LatencySummary {
    pub fn from_histogram(histogram: &Histogram<u64>) -> LatencySummary {
        if histogram.is_empty() {
            return LatencySummary::default();
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        LatencySummary {
            count: histogram.len(),
            mean_ms: histogram.mean() / 1000.0,
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p90_ms: ms(histogram.value_at_quantile(0.90)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            p999_ms: ms(histogram.value_at_quantile(0.999)),
            max_ms: ms(histogram.max()),
        }
    }

    /// Formats the percentiles on one line.
    pub fn line(&self) -> String {
        format!(
            "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms ({} samples)",
            self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms, self.count
        )
    }
}

/// What a process used between two samples.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ResourceUse {
    /// CPU seconds (user plus system) used between the samples.
    pub cpu_seconds: f64,
    /// Resident set at the end, in bytes.
    pub rss_bytes: u64,
    /// Highest resident set sampled in between, in bytes, or the end value
    /// when no sampler ran.
    pub peak_rss_bytes: u64,
}

impl ResourceUse {
    pub fn between(before: &ProcessSample, after: &ProcessSample, sampled_peak_bytes: u64) -> ResourceUse {
        ResourceUse {
            cpu_seconds: after.cpu_seconds - before.cpu_seconds,
            rss_bytes: after.rss_bytes,
            peak_rss_bytes: sampled_peak_bytes.max(after.rss_bytes),
        }
    }

    pub fn line(&self) -> String {
        format!(
            "{:.2} CPU s, RSS {}, peak RSS {}",
            self.cpu_seconds,
            mebibytes(self.rss_bytes),
            mebibytes(self.peak_rss_bytes)
        )
    }
}

pub fn mebibytes(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Writes `report` as pretty-printed JSON to `path`.
pub fn write_json(path: &Path, report: &impl Serialize) -> Result<()> {
    let json = serde_json::to_string_pretty(report).context("failed to serialise the report")?;
    std::fs::write(path, json + "\n").with_context(|| format!("failed to write the JSON report to {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_uniform_latencies() {
        let mut histogram = latency_histogram();
        for micros in 1..=1000 {
            histogram.record(micros * 10).unwrap();
        }
        let summary = LatencySummary::from_histogram(&histogram);
        assert_eq!(summary.count, 1000);
        assert!((summary.p50_ms - 5.0).abs() < 0.01, "p50 {}", summary.p50_ms);
        assert!((summary.p99_ms - 9.9).abs() < 0.01, "p99 {}", summary.p99_ms);
        assert!((summary.max_ms - 10.0).abs() < 0.01, "max {}", summary.max_ms);
    }

    #[test]
    fn summary_of_empty_histogram_is_zero() {
        let summary = LatencySummary::from_histogram(&latency_histogram());
        assert_eq!(summary.count, 0);
        assert_eq!(summary.max_ms, 0.0);
    }
}
