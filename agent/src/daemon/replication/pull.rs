//! The backup's side: one pull at a time, sets taking turns, after every change notice, on
//! every (re)connect and at the reconcile interval.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{ASTDB_SET, SyncSet};
use crate::peer::Peer;
use crate::pull::{Pull, purge_trash};
use crate::status::SetState;

use crate::daemon::replication::astdb::install_astdb;
use crate::daemon::replication::partner::watch_partner;
use crate::daemon::replication::{open_sets, peer};
use crate::daemon::state::{RETRY, Shared, lock, now_ms};

/// The backup: pulls sets from the partner, highest priority first.
pub(crate) async fn pull_sets(shared: Arc<Shared>, stop: CancellationToken) -> anyhow::Result<()> {
    let sets = open_sets(&shared)?;
    let wake = Arc::new(Notify::new());
    let pending: Arc<Mutex<BTreeSet<usize>>> = Arc::new(Mutex::new((0..sets.len()).collect()));
    let names: Vec<String> = sets.iter().map(|(s, _, _)| s.name.clone()).collect();
    // Owned: it stops with this pull, however it ends (an early error return included).
    let watch_task = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(watch_partner(
        shared.clone(),
        names.clone(),
        pending.clone(),
        wake.clone(),
        stop.clone(),
    )));
    let mut next_reconcile = Instant::now() + shared.config().reconcile_interval;
    // Sets take turns: after a pass of one, the next due set after it goes first, so a set
    // that changes without pause (a recording) cannot starve the others. A set whose files
    // were still changing waits a moment before its next pass, without holding up the rest.
    let mut cursor = 0usize;
    let mut not_before: Vec<Option<Instant>> = vec![None; sets.len()];
    // Each set's trash is emptied of what is older than the retention after a pass, at most
    // hourly (what the primary deleted stays recoverable that long, and no longer).
    let mut purged: Vec<Option<Instant>> = vec![None; sets.len()];
    loop {
        let now = Instant::now();
        let (next, waiting) = {
            let pending = lock(&pending);
            let ready = |i: &&usize| not_before[**i].is_none_or(|t| t <= now);
            let next = pending
                .range(cursor..)
                .find(ready)
                .or_else(|| pending.iter().find(ready))
                .copied();
            let waiting = pending.iter().filter_map(|&i| not_before[i]).min();
            (next, waiting)
        };
        let Some(i) = next else {
            if waiting.is_none() {
                cursor = 0;
            }
            let until = waiting.map_or(next_reconcile, |t| t.min(next_reconcile));
            tokio::select! {
                () = stop.cancelled() => break,
                () = wake.notified() => {}
                () = tokio::time::sleep_until(until.into()) => {
                    if Instant::now() >= next_reconcile {
                        lock(&pending).extend(0..sets.len());
                        next_reconcile = Instant::now() + shared.config().reconcile_interval;
                    }
                }
            }
            continue;
        };
        cursor = i + 1;
        not_before[i] = None;
        let (set, index, _) = &sets[i];
        let peer = match peer(&shared) {
            Ok(Some(peer)) => peer,
            Ok(None) => {
                for (set, _, _) in &sets {
                    shared.set_status(&set.name, |s| {
                        s.state = SetState::Waiting;
                        s.last_error = Some("the partner's address is not known yet".into());
                    });
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(RETRY) => continue,
                }
            }
            Err(err) => return Err(err),
        };
        let pass_started_ms = now_ms();
        shared.set_status(&set.name, |s| {
            s.state = SetState::Syncing;
            s.pass_started_ms = Some(pass_started_ms);
            s.changed_during_pass_ms = None;
        });
        let started = Instant::now();
        let pass = stop.child_token();
        let pulling = pull_one(peer, set, index.clone(), pass.clone(), |total, done| {
            shared.set_status(&set.name, |s| {
                s.pending_bytes = total.saturating_sub(done);
                s.pass_bytes = Some((total, done.min(total)));
            });
        });
        tokio::pin!(pulling);
        let outcome = tokio::select! {
            () = stop.cancelled() => break,
            outcome = &mut pulling => outcome,
            silent = primary_silent(&shared) => {
                // Frozen or gone mid-pass: stop at the next chunk (what is complete stays),
                // and if even that does not come, leave the pass where it is.
                pass.cancel();
                match tokio::time::timeout(GIVE_UP, &mut pulling).await {
                    Ok(Ok(report)) => Ok(report),
                    _ => Err(anyhow::anyhow!(
                        "the primary has not been heard for {} s: this pass was given up \
                         (what was complete is kept; the next pass resumes it)",
                        silent.as_secs()
                    )),
                }
            }
        };
        let took = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        match outcome {
            Ok(report) => {
                let complete = report.executed.deferred.is_empty() && report.plan.pending == 0;
                if complete {
                    lock(&pending).remove(&i);
                }
                if purged[i].is_none_or(|at| at.elapsed() >= PURGE_EVERY) {
                    purged[i] = Some(Instant::now());
                    purge_set_trash(&set.name, &set.path, shared.config().trash_retention).await;
                }
                if set.name == ASTDB_SET
                    && let Some(target) = shared.config().astdb.clone()
                    && report.plan.fetch_files + report.plan.local_copies > 0
                {
                    let copy = set.path.clone();
                    let installed =
                        tokio::task::spawn_blocking(move || install_astdb(&copy, &target)).await;
                    match installed {
                        Ok(Ok(())) => {}
                        Ok(Err(err)) => tracing::error!("installing the astdb copy: {err:#}"),
                        Err(err) => tracing::error!("installing the astdb copy: {err}"),
                    }
                }
                let fetched = report.plan.fetch_files;
                let left = report.plan.pending + report.executed.deferred.len() as u64;
                let skipped = skipped_of(&report);
                let before = lock(&shared.sets)
                    .iter()
                    .find(|s| s.name == set.name)
                    .map(|s| s.skipped.clone());
                if before.as_ref() != Some(&skipped) {
                    // Said once per change, not at every pass.
                    for entry in skipped.on_primary.iter().chain(&skipped.here) {
                        tracing::warn!(set = set.name, path = %entry.path, "not synced: {}", entry.reason);
                    }
                }
                let mut caught_up = false;
                shared.set_status(&set.name, |s| {
                    s.pending_files = left;
                    s.pending_bytes = 0;
                    s.last_pass_ms = Some(took);
                    s.last_fetched_files = fetched;
                    s.last_fetched_bytes = report.executed.fetched_bytes;
                    s.skipped = skipped;
                    s.last_error = None;
                    s.pass_started_ms = None;
                    s.pass_bytes = None;
                    if complete {
                        // The copy holds what the primary had when the pass began; a change
                        // announced since then is still to come.
                        s.last_in_sync_ms = Some(pass_started_ms);
                        s.changed_since_ms = s.changed_during_pass_ms.take();
                        caught_up = s.changed_since_ms.is_none();
                        s.state = if caught_up {
                            SetState::InSync
                        } else {
                            SetState::Changed
                        };
                    } else {
                        s.state = SetState::Changed;
                    }
                });
                if complete && !caught_up {
                    lock(&pending).insert(i);
                }
                if fetched > 0 {
                    tracing::info!(
                        set = set.name,
                        files = fetched,
                        bytes = report.executed.fetched_bytes,
                        packed_from = report.packed.data,
                        packed_to = report.packed.packed,
                        ms = took,
                        "pulled"
                    );
                }
                if !complete {
                    // Files still being written on the primary: give them a moment rather
                    // than asking again at once (the other sets go meanwhile).
                    not_before[i] = Some(
                        Instant::now() + shared.config().debounce.max(Duration::from_millis(500)),
                    );
                }
            }
            Err(err) => {
                let text = format!("{err:#}");
                tracing::warn!(set = set.name, "pull failed: {text}");
                shared.set_status(&set.name, |s| {
                    s.state = SetState::Error;
                    s.last_error = Some(text);
                    s.pass_started_ms = None;
                    s.pass_bytes = None;
                    s.changed_during_pass_ms = None;
                });
                // Try again after a while, or as soon as the watch connection gets through.
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(RETRY) => {}
                    () = wake.notified() => {}
                }
            }
        }
    }
    let _ = watch_task.await;
    Ok(())
}

/// One pass of `set` over the shared pull path; `on_progress(total, done)` as it goes, so that
/// if the primary dies half way, P says how much of this set's last changes the copy lacks.
pub(crate) async fn pull_one(
    (peer, address): (Peer, SocketAddr),
    set: &SyncSet,
    index: Arc<Mutex<lbs_sync::Index>>,
    stop: CancellationToken,
    on_progress: impl Fn(u64, u64),
) -> anyhow::Result<lbs_sync::PullReport> {
    Pull {
        peer: &peer,
        from: address,
        set: Some(&set.name),
        root: &set.path,
        index,
        trash: &lbs_sync::Trash::default_for(&set.path),
        durability: lbs_sync::Durability::Grouped,
        cancel: stop,
    }
    .connect()
    .await?
    .pull(|now| on_progress(now.bytes_total, now.bytes_done + now.current_bytes))
    .await
}

/// A pass is given up when the primary has not been heard for this long: its watch
/// connection hears it every second while it lives, however busy its disk, so only a frozen
/// or vanished primary stays silent.
const PRIMARY_SILENT: Duration = Duration::from_secs(10);
/// How long a pass given up may take to stop at its next chunk before it is dropped.
const GIVE_UP: Duration = Duration::from_secs(5);

/// Returns once the primary was last heard more than [`PRIMARY_SILENT`] ago (how long ago);
/// never while it has not been heard at all (the watch connection is not up yet).
async fn primary_silent(shared: &Shared) -> Duration {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let heard = *lock(&shared.partner_heard_ms);
        if let Some(heard) = heard {
            let silent = Duration::from_millis(now_ms().saturating_sub(heard));
            if silent > PRIMARY_SILENT {
                return silent;
            }
        }
    }
}

/// How often a set's trash is emptied of what is older than the retention.
const PURGE_EVERY: Duration = Duration::from_secs(3600);

/// Empties the trash of the set at `root` of what is older than `retention`; a failure is
/// said, not fatal.
async fn purge_set_trash(name: &str, root: &Path, retention: Duration) {
    match purge_trash(lbs_sync::Trash::default_for(root), retention).await {
        Ok(0) => {}
        Ok(batches) => tracing::info!(
            set = name,
            batches,
            "emptied the trash of what is older than {} days",
            retention.as_secs() / 86_400
        ),
        Err(err) => tracing::warn!(set = name, "{err:#}"),
    }
}

/// What a pass could not sync, on both sides, for `lbs status`.
fn skipped_of(report: &lbs_sync::PullReport) -> crate::status::Skipped {
    const LISTED: usize = lbs_protocol::sync::MAX_SKIPPED_SENT;
    let mut here = report.scan.skipped.clone();
    let more_here = here.len().saturating_sub(LISTED) as u64;
    here.truncate(LISTED);
    crate::status::Skipped {
        on_primary: report.sender_skipped.entries.clone(),
        here,
        more: report.sender_skipped.more + more_here,
    }
}
