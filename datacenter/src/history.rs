//! Boxes' resource history for the portal, kept by each site in its own SQLite file
//! (`history.db`) beside the authority: every sample for a day, 5-minute averages for 90 days,
//! older ones deleted, so its size is bounded by the fleet, not by time. Samples too far in the
//! future or older than the coarse tier are not kept; a sample sent twice is kept once.
//!
//! Not on etcd: a fleet's samples are far more than the authority's records and change every
//! few seconds; with several sites each keeps what its boxes sent it.

use std::path::Path;

use anyhow::Context;
use lbs_protocol::control::ResourceSample;
use rusqlite::{Connection, OptionalExtension, params};

/// Every sample is kept this long.
pub const FINE: i64 = 24 * 3_600_000;
/// 5-minute averages this long.
pub const COARSE: i64 = 90 * 24 * 3_600_000;
/// The coarse tier's step.
pub const BUCKET: i64 = 5 * 60_000;
/// Samples dated later than now plus this are refused (a box's clock far ahead).
const FUTURE: i64 = 10 * 60_000;
/// Old samples are deleted at most this often.
const PRUNE_EVERY: i64 = 10 * 60_000;

/// One point of a series: when, and the values (averages for the coarse tier).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    pub at: i64,
    /// Percent of all cores.
    pub cpu: Option<f64>,
    /// Percent of memory in use.
    pub memory: Option<f64>,
    /// Percent of the disk in use.
    pub disk: Option<f64>,
    /// Bytes per second.
    pub rx: Option<f64>,
    pub tx: Option<f64>,
}

/// The history file.
#[derive(Debug)]
pub struct History {
    db: Connection,
    pruned_at: i64,
}

fn percent(part: f64, total: f64) -> Option<f64> {
    (total > 0.0).then(|| 100.0 * part / total)
}

impl History {
    pub fn open(path: &Path) -> anyhow::Result<History> {
        let db = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        db.execute_batch(
            "PRAGMA journal_mode = wal;
             PRAGMA synchronous = normal;
             CREATE TABLE IF NOT EXISTS fine (
                 sid TEXT NOT NULL, at INTEGER NOT NULL, cpu INTEGER,
                 mem_used INTEGER NOT NULL, mem_total INTEGER NOT NULL,
                 disk_used INTEGER NOT NULL, disk_total INTEGER NOT NULL,
                 rx INTEGER, tx INTEGER,
                 PRIMARY KEY (sid, at)) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS coarse (
                 sid TEXT NOT NULL, bucket INTEGER NOT NULL, n INTEGER NOT NULL,
                 cpu_sum INTEGER NOT NULL, cpu_n INTEGER NOT NULL,
                 mem REAL NOT NULL, disk REAL NOT NULL,
                 rx_sum INTEGER NOT NULL, rx_n INTEGER NOT NULL,
                 tx_sum INTEGER NOT NULL, tx_n INTEGER NOT NULL,
                 PRIMARY KEY (sid, bucket)) WITHOUT ROWID;
             CREATE INDEX IF NOT EXISTS fine_at ON fine (at);
             CREATE INDEX IF NOT EXISTS coarse_bucket ON coarse (bucket);",
        )
        .with_context(|| format!("preparing {}", path.display()))?;
        Ok(History { db, pruned_at: 0 })
    }

    /// Keeps `samples` of box `sid` (at `now`); returns the newest sample's time now kept for
    /// it (what the box need not send again).
    pub fn record(
        &mut self,
        sid: &str,
        samples: &[ResourceSample],
        now: i64,
    ) -> anyhow::Result<u64> {
        let tx = self.db.transaction()?;
        for s in samples {
            let at = i64::try_from(s.at_ms).unwrap_or(i64::MAX);
            if at > now + FUTURE || at < now - COARSE {
                continue;
            }
            let added = tx.execute(
                "INSERT OR IGNORE INTO fine (sid, at, cpu, mem_used, mem_total, disk_used, disk_total, rx, tx)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    sid,
                    at,
                    s.cpu_permille,
                    s.memory_used as i64,
                    s.memory_total as i64,
                    s.disk_used as i64,
                    s.disk_total as i64,
                    s.rx_per_s.map(|v| v as i64),
                    s.tx_per_s.map(|v| v as i64),
                ],
            )?;
            if added == 0 {
                continue;
            }
            let mem = percent(s.memory_used as f64, s.memory_total as f64).unwrap_or(0.0);
            let disk = percent(s.disk_used as f64, s.disk_total as f64).unwrap_or(0.0);
            // A running average per bucket: sums and counts, the percentages averaged.
            tx.execute(
                "INSERT INTO coarse (sid, bucket, n, cpu_sum, cpu_n, mem, disk, rx_sum, rx_n, tx_sum, tx_n)
                 VALUES (?1, ?2, 1, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT (sid, bucket) DO UPDATE SET
                     mem = (mem * n + excluded.mem) / (n + 1),
                     disk = (disk * n + excluded.disk) / (n + 1),
                     n = n + 1,
                     cpu_sum = cpu_sum + excluded.cpu_sum, cpu_n = cpu_n + excluded.cpu_n,
                     rx_sum = rx_sum + excluded.rx_sum, rx_n = rx_n + excluded.rx_n,
                     tx_sum = tx_sum + excluded.tx_sum, tx_n = tx_n + excluded.tx_n",
                params![
                    sid,
                    at - at.rem_euclid(BUCKET),
                    s.cpu_permille.map_or(0, i64::from),
                    i64::from(s.cpu_permille.is_some()),
                    mem,
                    disk,
                    s.rx_per_s.map_or(0, |v| v as i64),
                    i64::from(s.rx_per_s.is_some()),
                    s.tx_per_s.map_or(0, |v| v as i64),
                    i64::from(s.tx_per_s.is_some()),
                ],
            )?;
        }
        let newest: Option<i64> = tx
            .query_row("SELECT MAX(at) FROM fine WHERE sid = ?1", [sid], |r| {
                r.get(0)
            })
            .optional()?
            .flatten();
        tx.commit()?;
        if now - self.pruned_at >= PRUNE_EVERY {
            self.prune(now)?;
        }
        Ok(newest.map_or(0, |at| at.max(0) as u64))
    }

    /// Deletes what is older than each tier keeps.
    pub fn prune(&mut self, now: i64) -> anyhow::Result<()> {
        self.db
            .execute("DELETE FROM fine WHERE at < ?1", [now - FINE])?;
        self.db
            .execute("DELETE FROM coarse WHERE bucket < ?1", [now - COARSE])?;
        self.pruned_at = now;
        Ok(())
    }

    /// Box `sid`'s points from `from` to `to`: every sample when the range is within the fine
    /// tier, 5-minute averages otherwise.
    pub fn series(&self, sid: &str, from: i64, to: i64, now: i64) -> anyhow::Result<Vec<Point>> {
        if from >= now - FINE {
            let mut statement = self.db.prepare_cached(
                "SELECT at, cpu, mem_used, mem_total, disk_used, disk_total, rx, tx FROM fine
                 WHERE sid = ?1 AND at >= ?2 AND at <= ?3 ORDER BY at",
            )?;
            let rows = statement.query_map(params![sid, from, to], |r| {
                let (mem_used, mem_total): (i64, i64) = (r.get(2)?, r.get(3)?);
                let (disk_used, disk_total): (i64, i64) = (r.get(4)?, r.get(5)?);
                Ok(Point {
                    at: r.get(0)?,
                    cpu: r.get::<_, Option<i64>>(1)?.map(|p| p as f64 / 10.0),
                    memory: percent(mem_used as f64, mem_total as f64),
                    disk: percent(disk_used as f64, disk_total as f64),
                    rx: r.get::<_, Option<i64>>(6)?.map(|v| v as f64),
                    tx: r.get::<_, Option<i64>>(7)?.map(|v| v as f64),
                })
            })?;
            return Ok(rows.collect::<Result<_, _>>()?);
        }
        let mut statement = self.db.prepare_cached(
            "SELECT bucket, cpu_sum, cpu_n, mem, disk, rx_sum, rx_n, tx_sum, tx_n FROM coarse
             WHERE sid = ?1 AND bucket >= ?2 AND bucket <= ?3 ORDER BY bucket",
        )?;
        let average = |sum: i64, n: i64| (n > 0).then(|| sum as f64 / n as f64);
        let rows = statement.query_map(params![sid, from - BUCKET, to], |r| {
            Ok(Point {
                at: r.get::<_, i64>(0)? + BUCKET / 2,
                cpu: average(r.get(1)?, r.get(2)?).map(|p| p / 10.0),
                memory: Some(r.get(3)?),
                disk: Some(r.get(4)?),
                rx: average(r.get(5)?, r.get(6)?),
                tx: average(r.get(7)?, r.get(8)?),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_ms: u64, cpu: u16) -> ResourceSample {
        ResourceSample {
            at_ms,
            cpu_permille: Some(cpu),
            memory_used: 1 << 30,
            memory_total: 4 << 30,
            disk_used: 10,
            disk_total: 100,
            rx_per_s: Some(1000),
            tx_per_s: None,
        }
    }

    #[test]
    fn samples_are_kept_once_averaged_per_five_minutes_and_pruned_by_age() {
        let dir = tempfile::tempdir().unwrap();
        let mut history = History::open(&dir.path().join("history.db")).unwrap();
        let now = 100 * 24 * 3_600_000_i64;
        let base = (now - 2 * 3_600_000) as u64;
        let samples: Vec<ResourceSample> = (0..30)
            .map(|i| sample(base + i * 10_000, if i % 2 == 0 { 100 } else { 300 }))
            .collect();
        assert_eq!(
            history.record("box-a", &samples, now).unwrap(),
            base + 290_000
        );
        // Sent again: kept once (the coarse averages are not counted twice).
        history.record("box-a", &samples, now).unwrap();
        // A clock far ahead, and a sample older than the coarse tier: not kept.
        let odd = [
            sample((now + 3_600_000) as u64, 500),
            sample((now - COARSE - 1) as u64, 500),
        ];
        history.record("box-a", &odd, now).unwrap();
        let fine = history
            .series("box-a", now - 3 * 3_600_000, now, now)
            .unwrap();
        assert_eq!(fine.len(), 30);
        assert_eq!(fine[0].cpu, Some(10.0));
        assert_eq!(fine[0].memory, Some(25.0));
        assert_eq!(fine[0].tx, None);
        let coarse = history
            .series("box-a", now - 7 * 24 * 3_600_000, now, now)
            .unwrap();
        // 30 samples 10 s apart from a bucket's start fill one bucket (and the next's first).
        let total: usize = coarse.len();
        assert!((1..=2).contains(&total), "{coarse:?}");
        assert_eq!(coarse[0].cpu, Some(20.0), "the average of 10 % and 30 %");
        assert!(
            history
                .series("box-b", now - FINE, now, now)
                .unwrap()
                .is_empty()
        );
        // A day later the fine tier is gone, the coarse one stays.
        let later = now + FINE + 3 * 3_600_000;
        history.prune(later).unwrap();
        assert!(
            history
                .series("box-a", later - FINE, later, later)
                .unwrap()
                .is_empty()
        );
        assert!(
            !history
                .series("box-a", later - 7 * 24 * 3_600_000, later, later)
                .unwrap()
                .is_empty()
        );
    }
}
