//! Liveness in memory: each report that only says a box is alive is kept here and written to
//! the store in one transaction every [`WRITE_EVERY`] (see `store/liveness.rs`). It is soft
//! state: after a restart the next reports rebuild it, and meanwhile the store holds what was
//! written at most [`WRITE_EVERY`] before. Answers to boxes see it at once ([`Liveness::overlay`]);
//! decisions that read a box's last report from the store (a promotion's audit, a hand-over)
//! write what is pending first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lbs_protocol::ServerId;
use tokio_util::sync::CancellationToken;

use super::{Inner, with_store};
use crate::store::{Millis, PairView, Report, Store, StoreError};

/// How often reports kept in memory are written to the store.
pub(super) const WRITE_EVERY: Duration = Duration::from_secs(1);

/// Reports not yet written, the latest per box.
#[derive(Default)]
pub(super) struct Liveness {
    pending: Mutex<HashMap<ServerId, (Report, Millis)>>,
}

impl Liveness {
    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<ServerId, (Report, Millis)>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `sid` reported `report` at `at`.
    pub(super) fn note(&self, sid: ServerId, report: Report, at: Millis) {
        self.pending().insert(sid, (report, at));
    }

    /// A report of `sid` recorded at once supersedes the one kept.
    pub(super) fn forget(&self, sid: ServerId) {
        self.pending().remove(&sid);
    }

    /// The reports kept, taken out.
    fn take(&self) -> Vec<(ServerId, Report, Millis)> {
        self.pending()
            .drain()
            .map(|(sid, (report, at))| (sid, report, at))
            .collect()
    }

    /// Writes the reports kept to `store` in one transaction; on an error they are kept for
    /// the next try (unless a newer report came meanwhile).
    pub(super) fn write(&self, store: &mut dyn Store) -> Result<usize, StoreError> {
        let batch = self.take();
        match store.heartbeats(&batch) {
            Ok(()) => Ok(batch.len()),
            Err(err) => {
                let mut pending = self.pending();
                for (sid, report, at) in batch {
                    pending.entry(sid).or_insert((report, at));
                }
                Err(err)
            }
        }
    }

    /// `sid`'s pair as the store shows it, with the reports kept here not yet written.
    pub(super) fn pair_of(&self, store: &dyn Store, sid: ServerId) -> Result<PairView, StoreError> {
        let mut pair = store.pair_of(sid)?;
        self.overlay(&mut pair);
        Ok(pair)
    }

    /// `pair` as the store shows it, with the reports kept here not yet written.
    pub(super) fn overlay(&self, pair: &mut PairView) {
        let pending = self.pending();
        for server in &mut pair.servers {
            let Some((report, at)) = server
                .sid
                .parse::<ServerId>()
                .ok()
                .and_then(|sid| pending.get(&sid))
            else {
                continue;
            };
            if server.last_heartbeat_at.is_some_and(|known| known > *at) {
                continue;
            }
            server.last_heartbeat_at = Some(*at);
            server.reported_generation = Some(report.believed.0);
            server.software = Some(report.software.clone());
            server.advertised = Some(report.advertised.to_string());
        }
    }
}

/// Writes the reports kept every [`WRITE_EVERY`], and once more on shutdown; renews the
/// alive file each time (removed on shutdown).
pub(super) async fn liveness_writer(inner: Arc<Inner>, shutdown: CancellationToken) {
    stamp(&inner, true).await;
    loop {
        let stopping = tokio::select! {
            () = shutdown.cancelled() => true,
            () = tokio::time::sleep(WRITE_EVERY) => false,
        };
        let written = with_store(&inner, {
            let inner = inner.clone();
            move |s| inner.liveness.write(s)
        })
        .await;
        if let Err(err) = written {
            tracing::warn!("recording the boxes' reports: {err}");
        }
        stamp(&inner, !stopping).await;
        if stopping {
            return;
        }
    }
}

/// Renews the alive file's modification time (`running`) or removes it (a clean stop), on a
/// blocking thread; a failure is logged.
async fn stamp(inner: &Inner, running: bool) {
    let path = inner.alive.clone();
    let done = tokio::task::spawn_blocking(move || {
        if !running {
            return std::fs::remove_file(&path);
        }
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?
            .set_modified(std::time::SystemTime::now())
    })
    .await;
    if let Ok(Err(err)) = done {
        tracing::warn!("{}: {err}", inner.alive.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ServerView;
    use lbs_protocol::Generation;

    fn report(address: [u8; 4]) -> Report {
        Report {
            believed: Generation(3),
            software: "lbs 1.0".into(),
            advertised: address.into(),
            json: "{}".into(),
        }
    }

    #[test]
    fn the_latest_report_per_box_is_kept_and_shown_over_an_older_stored_one() {
        let liveness = Liveness::default();
        let sid: ServerId = "00-1A-2B-3C-4D-5E".parse().unwrap();
        liveness.note(sid, report([10, 0, 0, 1]), 1_000);
        liveness.note(sid, report([10, 0, 0, 2]), 2_000);
        let mut pair = PairView::default();
        pair.servers.push(ServerView {
            sid: sid.to_string(),
            last_heartbeat_at: Some(500),
            ..ServerView::default()
        });
        liveness.overlay(&mut pair);
        let server = &pair.servers[0];
        assert_eq!(server.last_heartbeat_at, Some(2_000));
        assert_eq!(server.advertised.as_deref(), Some("10.0.0.2"));
        assert_eq!(server.reported_generation, Some(3));
        // One entry per box, whatever the number of reports.
        assert_eq!(liveness.take().len(), 1);
        assert!(liveness.take().is_empty());
    }

    #[test]
    fn a_newer_stored_report_is_not_overlaid_and_a_forgotten_one_is_gone() {
        let liveness = Liveness::default();
        let sid: ServerId = "00-1A-2B-3C-4D-5E".parse().unwrap();
        liveness.note(sid, report([10, 0, 0, 1]), 1_000);
        let mut pair = PairView::default();
        pair.servers.push(ServerView {
            sid: sid.to_string(),
            last_heartbeat_at: Some(5_000),
            ..ServerView::default()
        });
        liveness.overlay(&mut pair);
        assert_eq!(pair.servers[0].last_heartbeat_at, Some(5_000));
        liveness.forget(sid);
        assert!(liveness.take().is_empty());
    }
}
