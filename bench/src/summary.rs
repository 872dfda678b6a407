//! The `summarize` subcommand: reads the JSON reports of several runs from
//! a folder and prints, as Markdown tables, the median of each figure over
//! the runs of the same scenario and size.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;

#[derive(Debug, Clone, clap::Args)]
pub struct SummarizeArgs {
    /// Folder of JSON reports written with `--json`.
    pub folder: PathBuf,
}

pub fn run(args: &SummarizeArgs) -> Result<()> {
    let reports = read_reports(&args.folder)?;
    let by_scenario = |name: &str| -> Vec<&Value> {
        reports.iter().filter(|report| report["scenario"] == name).collect()
    };
    print_fanout(&by_scenario("fanout"));
    print_connections(&by_scenario("connections"));
    print_rooms(&by_scenario("rooms"));
    Ok(())
}

fn read_reports(folder: &Path) -> Result<Vec<Value>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(folder)
        .with_context(|| format!("failed to list {}", folder.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).with_context(|| format!("failed to read {}", path.display()))?;
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
        })
        .collect()
}

/// Median of `values`; the mean of the middle two for an even count, and
/// NaN for none.
fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|value| !value.is_nan());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

fn number(value: &Value, pointer: &str) -> f64 {
    value.pointer(pointer).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

/// Median of the figure at `pointer` over `values`.
fn median_of(values: &[&Value], pointer: &str) -> f64 {
    median(values.iter().map(|value| number(value, pointer)).collect())
}

fn print_fanout(reports: &[&Value]) {
    if reports.is_empty() {
        return;
    }
    // Steps grouped by (clients requested, POST rate).
    let mut steps: BTreeMap<(u64, u64), Vec<&Value>> = BTreeMap::new();
    let mut best: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    let mut runs: BTreeMap<u64, usize> = BTreeMap::new();
    for report in reports {
        let clients = report["fleet"]["requested"].as_u64().unwrap_or(0);
        *runs.entry(clients).or_default() += 1;
        let report_steps = report["steps"].as_array().map(Vec::as_slice).unwrap_or_default();
        for step in report_steps {
            let rate = step["rate_per_second"].as_u64().unwrap_or(0);
            steps.entry((clients, rate)).or_default().push(step);
        }
        let best_rate = report["best_step"]
            .as_u64()
            .and_then(|index| report_steps.get(index as usize))
            .map_or(0.0, |step| number(step, "/deliveries_per_second"));
        best.entry(clients).or_default().push(best_rate);
    }

    println!("### Fan-out: medians per step\n");
    println!(
        "| clients | POSTs/s | offered deliveries/s | deliveries/s | missing | duplicated | p50 ms | p90 ms | p99 ms | \
         p99.9 ms | max ms | server CPU s/s | client CPU s/s | passed | runs |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for ((clients, rate), group) in &steps {
        let seconds = median_of(group, "/seconds");
        let passed = group.iter().filter(|step| step["passed"] == true).count();
        println!(
            "| {clients} | {rate} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {passed}/{} | {} |",
            median_of(group, "/offered_deliveries_per_second"),
            median_of(group, "/deliveries_per_second"),
            median_of(group, "/missing"),
            median_of(group, "/duplicated"),
            median_of(group, "/latency/p50_ms"),
            median_of(group, "/latency/p90_ms"),
            median_of(group, "/latency/p99_ms"),
            median_of(group, "/latency/p999_ms"),
            median_of(group, "/latency/max_ms"),
            median_of(group, "/server/cpu_seconds") / seconds,
            median_of(group, "/client/cpu_seconds") / seconds,
            group.len(),
            group.len(),
        );
    }
    println!("\n### Fan-out: best passing step per run, median\n");
    println!("| clients | deliveries/s | runs |");
    println!("|---:|---:|---:|");
    for (clients, values) in &best {
        println!("| {clients} | {:.0} | {} |", median(values.clone()), runs[clients]);
    }
    println!();
}

fn print_connections(reports: &[&Value]) {
    if reports.is_empty() {
        return;
    }
    println!("### Idle connections: medians\n");
    println!("| sockets | server KiB per socket | client KiB per socket | server RSS baseline MiB | server RSS loaded MiB | server RSS after close MiB | connect failures | dropped | runs |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mib = |bytes: f64| bytes / (1024.0 * 1024.0);
    let mut groups: BTreeMap<u64, Vec<&Value>> = BTreeMap::new();
    for report in reports {
        let sockets = report["fleet"]["connected"].as_u64().unwrap_or(0) + report["warmup"]["connected"].as_u64().unwrap_or(0);
        groups.entry(sockets / 1000 * 1000).or_default().push(report);
    }
    for group in groups.values() {
        println!(
            "| {:.0} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {} |",
            median_of(group, "/fleet/connected") + median_of(group, "/warmup/connected"),
            median_of(group, "/server_bytes_per_connection") / 1024.0,
            median_of(group, "/client_bytes_per_connection") / 1024.0,
            mib(median_of(group, "/baseline/rss_bytes")),
            mib(median_of(group, "/held/rss_bytes")),
            mib(median_of(group, "/closed/rss_bytes")),
            median_of(group, "/fleet/failed"),
            median_of(group, "/dropped_during_hold"),
            group.len()
        );
    }
    println!();
}

fn print_rooms(reports: &[&Value]) {
    if reports.is_empty() {
        return;
    }
    println!("### Room start over the wire: medians\n");
    println!("| rooms | cold pass s | rooms started/s | cold p50 ms | cold p99 ms | warm p50 ms | start latency us | start CPU us | KiB per room | failed | runs |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut groups: BTreeMap<u64, Vec<&Value>> = BTreeMap::new();
    for report in reports {
        groups.entry(report["rooms"].as_u64().unwrap_or(0)).or_default().push(report);
    }
    for (rooms, group) in &groups {
        let failed = median(
            group
                .iter()
                .map(|report| number(report, "/cold/requests") - number(report, "/cold/ok"))
                .collect(),
        );
        println!(
            "| {rooms} | {:.2} | {:.0} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {failed:.0} | {} |",
            median_of(group, "/cold/seconds"),
            median_of(group, "/cold/requests_per_second"),
            median_of(group, "/cold/latency/p50_ms"),
            median_of(group, "/cold/latency/p99_ms"),
            median_of(group, "/warm/latency/p50_ms"),
            median_of(group, "/start_latency_micros"),
            median_of(group, "/start_cpu_micros"),
            median_of(group, "/bytes_per_room") / 1024.0,
            group.len()
        );
    }
    println!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }
}
