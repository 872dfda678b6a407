//! Memory and CPU use of a process, read from Linux's /proc: the server's,
//! given its PID, and the load client's own.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

/// Interval at which [`PeakRss`] samples the resident set.
const RSS_SAMPLE_INTERVAL: Duration = Duration::from_millis(50);

/// One reading of a process's resources.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ProcessSample {
    /// Resident set size now (`VmRSS`), in bytes.
    pub rss_bytes: u64,
    /// Peak resident set size over the process's life (`VmHWM`), in bytes.
    pub lifetime_peak_rss_bytes: u64,
    /// User plus system CPU time used so far, in seconds.
    pub cpu_seconds: f64,
}

/// Reads `/proc/<pid>/status` and `/proc/<pid>/stat`. `pid` "self" reads
/// the calling process.
pub fn sample(pid: &str) -> Result<ProcessSample> {
    let status_path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&status_path).with_context(|| format!("failed to read {status_path}"))?;
    let rss_bytes = status_kib(&status, "VmRSS:").with_context(|| format!("VmRSS missing in {status_path}"))? * 1024;
    let lifetime_peak_rss_bytes =
        status_kib(&status, "VmHWM:").with_context(|| format!("VmHWM missing in {status_path}"))? * 1024;

    let stat_path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&stat_path).with_context(|| format!("failed to read {stat_path}"))?;
    let cpu_seconds = cpu_seconds(&stat).with_context(|| format!("{stat_path} has an unexpected format"))?;
    Ok(ProcessSample {
        rss_bytes,
        lifetime_peak_rss_bytes,
        cpu_seconds,
    })
}

/// Reads a `Key:   1234 kB` line of `/proc/<pid>/status`.
fn status_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// Adds `utime` and `stime` (fields 14 and 15 of `/proc/<pid>/stat`, in
/// clock ticks). The command name in field 2 may contain spaces, so fields
/// are counted after its closing parenthesis.
fn cpu_seconds(stat: &str) -> Option<f64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // `fields[0]` is field 3 (state), so field N is `fields[N - 3]`.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks_per_second = if ticks_per_second > 0 { ticks_per_second as f64 } else { 100.0 };
    Some((utime + stime) as f64 / ticks_per_second)
}

/// Raises this process's soft limit on open files to its hard limit, since
/// every socket needs a descriptor. Returns the new soft limit.
pub fn raise_open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for getrlimit and setrlimit to use.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    limit.rlim_cur
}

/// A background sampler of a process's resident set that keeps the
/// maximum it saw. Unlike `VmHWM`, it covers only the time it runs.
pub struct PeakRss {
    peak_bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl PeakRss {
    /// Starts sampling `/proc/<pid>/status` every 50 ms.
    pub fn start(pid: u32) -> PeakRss {
        let peak_bytes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let peak_bytes = peak_bytes.clone();
            let stop = stop.clone();
            async move {
                let pid = pid.to_string();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(now) = sample(&pid) {
                        peak_bytes.fetch_max(now.rss_bytes, Ordering::Relaxed);
                    }
                    tokio::time::sleep(RSS_SAMPLE_INTERVAL).await;
                }
            }
        });
        PeakRss { peak_bytes, stop, task }
    }

    /// Stops sampling and returns the peak resident set, in bytes.
    pub async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.peak_bytes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_in_name_parses() {
        let stat = "42 (my (odd) name) S 1 42 42 0 -1 4194304 100 0 0 0 250 50 0 0 20 0 1 0 1 1 1";
        let seconds = cpu_seconds(stat).unwrap();
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        assert!((seconds - 300.0 / ticks).abs() < 1e-9);
    }

    #[test]
    fn own_process_sample_is_positive() {
        let now = sample("self").unwrap();
        assert!(now.rss_bytes > 0);
        assert!(now.lifetime_peak_rss_bytes >= now.rss_bytes);
    }
}
