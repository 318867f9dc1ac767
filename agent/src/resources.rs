//! This machine's resource history: CPU, memory, disk and network, sampled by the daemon and
//! kept for a week in `resources.sqlite` under the state directory. It describes this
//! physical box only (it is never synced: the partner keeps its own).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// How long samples are kept.
const KEEP: Duration = Duration::from_secs(7 * 24 * 3600);
/// How many of the latest samples `lbs status` carries.
const RECENT: usize = 60;

/// One sample.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// When (ms since the epoch).
    pub at_ms: u64,
    /// CPU busy since the previous sample, percent of all cores (`None` for the first).
    pub cpu_percent: Option<f64>,
    /// Memory in use (total minus available), bytes.
    pub memory_used: u64,
    /// Memory in total, bytes.
    pub memory_total: u64,
    /// Disk used on the state directory's filesystem, bytes.
    pub disk_used: u64,
    /// That filesystem's size, bytes.
    pub disk_total: u64,
    /// Bytes received per second on all interfaces but loopback since the previous sample.
    pub rx_per_s: Option<f64>,
    /// Bytes sent per second likewise.
    pub tx_per_s: Option<f64>,
}

impl Sample {
    /// The sample as the data center keeps it for the portal.
    pub fn to_wire(&self) -> lbs_protocol::control::ResourceSample {
        lbs_protocol::control::ResourceSample {
            at_ms: self.at_ms,
            cpu_permille: self
                .cpu_percent
                .map(|p| (p * 10.0).round().clamp(0.0, 1000.0) as u16),
            memory_used: self.memory_used,
            memory_total: self.memory_total,
            disk_used: self.disk_used,
            disk_total: self.disk_total,
            rx_per_s: self.rx_per_s.map(|r| r.max(0.0).round() as u64),
            tx_per_s: self.tx_per_s.map(|t| t.max(0.0).round() as u64),
        }
    }
}

/// Reads the kernel's counters and turns them into samples.
#[derive(Debug)]
pub struct Sampler {
    dir: PathBuf,
    last: Option<(std::time::Instant, u64, u64, u64, u64)>,
}

fn cpu_ticks() -> anyhow::Result<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat")?;
    let line = text
        .lines()
        .next()
        .filter(|l| l.starts_with("cpu "))
        .context("/proc/stat has no cpu line")?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().sum();
    // idle + iowait
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    Ok((total, total.saturating_sub(idle)))
}

fn memory() -> anyhow::Result<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    let total = field("MemTotal:").context("/proc/meminfo has no MemTotal")?;
    let available = field("MemAvailable:").unwrap_or(0);
    Ok((total.saturating_sub(available), total))
}

fn network() -> anyhow::Result<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/net/dev")?;
    let mut rx = 0u64;
    let mut tx = 0u64;
    for line in text.lines().skip(2) {
        let Some((name, counters)) = line.split_once(':') else {
            continue;
        };
        if name.trim() == "lo" {
            continue;
        }
        let values: Vec<u64> = counters
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        rx += values.first().copied().unwrap_or(0);
        tx += values.get(8).copied().unwrap_or(0);
    }
    Ok((rx, tx))
}

fn disk(dir: &Path) -> anyhow::Result<(u64, u64)> {
    let stat =
        nix::sys::statvfs::statvfs(dir).with_context(|| format!("statvfs {}", dir.display()))?;
    let block = stat.fragment_size();
    let total = stat.blocks() * block;
    let free = stat.blocks_available() * block;
    Ok((total.saturating_sub(free), total))
}

impl Sampler {
    /// A sampler measuring the filesystem of `dir`.
    pub fn new(dir: PathBuf) -> Sampler {
        Sampler { dir, last: None }
    }

    /// Takes a sample.
    pub fn sample(&mut self) -> anyhow::Result<Option<Sample>> {
        let now = std::time::Instant::now();
        let (total, busy) = cpu_ticks()?;
        let (memory_used, memory_total) = memory()?;
        let (disk_used, disk_total) = disk(&self.dir)?;
        let (rx, tx) = network()?;
        let previous = self.last.replace((now, total, busy, rx, tx));
        let (cpu_percent, rx_per_s, tx_per_s) = match previous {
            Some((then, t0, b0, rx0, tx0)) => {
                let seconds = now.duration_since(then).as_secs_f64().max(0.001);
                let ticks = total.saturating_sub(t0);
                let cpu =
                    (ticks > 0).then(|| 100.0 * busy.saturating_sub(b0) as f64 / ticks as f64);
                (
                    cpu,
                    Some(rx.saturating_sub(rx0) as f64 / seconds),
                    Some(tx.saturating_sub(tx0) as f64 / seconds),
                )
            }
            None => (None, None, None),
        };
        Ok(Some(Sample {
            at_ms: lbs_vpn::tunnels::unix_ms(),
            cpu_percent,
            memory_used,
            memory_total,
            disk_used,
            disk_total,
            rx_per_s,
            tx_per_s,
        }))
    }
}

/// The stored history.
#[derive(Debug)]
pub struct ResourceHistory {
    db: rusqlite::Connection,
}

impl ResourceHistory {
    /// Opens (creating) the history at `path`.
    pub fn open(path: &Path) -> anyhow::Result<ResourceHistory> {
        let db = rusqlite::Connection::open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        db.execute_batch(
            "PRAGMA journal_mode = wal;
             CREATE TABLE IF NOT EXISTS samples (at_ms INTEGER PRIMARY KEY, sample TEXT NOT NULL);",
        )
        .with_context(|| format!("preparing {}", path.display()))?;
        Ok(ResourceHistory { db })
    }

    /// Keeps a sample, forgetting those older than a week.
    pub fn record(&mut self, sample: Sample) -> anyhow::Result<()> {
        let at = i64::try_from(sample.at_ms).unwrap_or(i64::MAX);
        let keep = i64::try_from(KEEP.as_millis()).unwrap_or(i64::MAX);
        self.db.execute(
            "INSERT OR REPLACE INTO samples (at_ms, sample) VALUES (?1, ?2)",
            rusqlite::params![at, serde_json::to_string(&sample)?],
        )?;
        self.db.execute(
            "DELETE FROM samples WHERE at_ms < ?1",
            [at.saturating_sub(keep)],
        )?;
        Ok(())
    }

    /// Up to `limit` samples taken after `after_ms`, oldest first (what the data center has
    /// not been sent yet).
    pub fn after(&self, after_ms: u64, limit: usize) -> Vec<Sample> {
        let read = || -> rusqlite::Result<Vec<Sample>> {
            let mut statement = self
                .db
                .prepare("SELECT sample FROM samples WHERE at_ms > ?1 ORDER BY at_ms LIMIT ?2")?;
            let after = i64::try_from(after_ms).unwrap_or(i64::MAX);
            let rows = statement.query_map([after, limit as i64], |r| r.get::<_, String>(0))?;
            Ok(rows
                .filter_map(|r| r.ok())
                .filter_map(|text| serde_json::from_str(&text).ok())
                .collect())
        };
        read().unwrap_or_default()
    }

    /// The latest samples, oldest first.
    pub fn recent(&self) -> Vec<Sample> {
        let read = || -> rusqlite::Result<Vec<Sample>> {
            let mut statement = self
                .db
                .prepare("SELECT sample FROM samples ORDER BY at_ms DESC LIMIT ?1")?;
            let rows = statement.query_map([RECENT as i64], |r| r.get::<_, String>(0))?;
            let mut samples: Vec<Sample> = rows
                .filter_map(|r| r.ok())
                .filter_map(|text| serde_json::from_str(&text).ok())
                .collect();
            samples.reverse();
            Ok(samples)
        };
        read().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn samples_are_measured_and_kept_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let mut sampler = Sampler::new(dir.path().to_owned());
        let first = sampler.sample().unwrap().unwrap();
        assert!(first.cpu_percent.is_none() && first.memory_total > 0 && first.disk_total > 0);
        std::thread::sleep(Duration::from_millis(20));
        let second = sampler.sample().unwrap().unwrap();
        assert!(second.rx_per_s.is_some());
        let path = dir.path().join("resources.sqlite");
        let mut history = ResourceHistory::open(&path).unwrap();
        history.record(first.clone()).unwrap();
        let mut later = second.clone();
        later.at_ms = first.at_ms + KEEP.as_millis() as u64 + 1;
        history.record(later.clone()).unwrap();
        drop(history);
        // The week-old sample is gone; the new one survived the reopen.
        assert_eq!(ResourceHistory::open(&path).unwrap().recent(), [later]);
    }
}
