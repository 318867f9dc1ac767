//! The primary's inotify watch of its sets, debounced into change notices.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::config::ASTDB_SET;

use crate::daemon::replication::astdb::snapshot_astdb;
use crate::daemon::replication::{Indexes, astdb_dir};
use crate::daemon::state::Shared;

/// The inotify watch of the primary's sets, debounced into change notices.
pub(crate) struct SetWatcher {
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

impl SetWatcher {
    pub(crate) async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

pub(crate) fn watch_sets(
    shared: &Arc<Shared>,
    sets: &Indexes,
    changes: broadcast::Sender<Vec<String>>,
) -> anyhow::Result<SetWatcher> {
    use notify::Watcher;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<notify::Result<notify::Event>>();
    let mut watcher = notify::recommended_watcher(move |event| {
        let _ = tx.send(event);
    })
    .context("starting the inotify watch")?;
    let mut roots: Vec<(String, PathBuf)> = Vec::new();
    for (set, _, _) in sets {
        if set.name == ASTDB_SET {
            continue;
        }
        let root = std::fs::canonicalize(&set.path).unwrap_or_else(|_| set.path.clone());
        if let Err(err) = watcher.watch(&root, notify::RecursiveMode::Recursive) {
            // Out of watches (fs.inotify.max_user_watches): say so; the reconcile still runs.
            tracing::error!(
                set = set.name,
                "cannot watch {}: {err}; changes wait for the reconcile",
                root.display()
            );
            shared.set_status(&set.name, |s| {
                s.last_error = Some(format!("not watched ({err}); relying on the reconcile"));
            });
        }
        roots.push((set.name.clone(), root));
    }
    let astdb = shared.config().astdb.clone();
    if let Some(source) = &astdb
        && let Some(dir) = source.parent()
        && dir.exists()
        && let Err(err) = watcher.watch(dir, notify::RecursiveMode::NonRecursive)
    {
        tracing::error!("cannot watch {}: {err}", dir.display());
    }
    let stop = CancellationToken::new();
    let token = stop.clone();
    let debounce = shared.config().debounce;
    let snapshot_dir = astdb_dir(&shared.paths);
    let task = tokio::spawn(async move {
        let mut pending: BTreeSet<String> = BTreeSet::new();
        let mut overflow = false;
        // A notice goes out `debounce` after the first change it carries, however many follow:
        // a file written without pause (a call being recorded) must not hold back every
        // notice until it stops.
        let mut due: Option<tokio::time::Instant> = None;
        let mut room = tokio::time::interval(ROOM_EVERY);
        room.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut full: BTreeSet<String> = BTreeSet::new();
        loop {
            let event = if pending.is_empty() && !overflow {
                due = None;
                tokio::select! {
                    () = token.cancelled() => return,
                    event = rx.recv() => event,
                    _ = room.tick() => {
                        pending.extend(room_again(&mut full, &roots).await);
                        continue;
                    }
                }
            } else {
                let deadline = *due.get_or_insert_with(|| tokio::time::Instant::now() + debounce);
                tokio::select! {
                    () = token.cancelled() => return,
                    event = rx.recv() => event,
                    _ = room.tick() => {
                        pending.extend(room_again(&mut full, &roots).await);
                        continue;
                    }
                    () = tokio::time::sleep_until(deadline) => {
                        due = None;
                        if pending.remove(ASTDB_SET)
                            && let Some(source) = astdb.clone()
                        {
                            let dir = snapshot_dir.clone();
                            match tokio::task::spawn_blocking(move || snapshot_astdb(&source, &dir)).await {
                                Ok(Ok(())) => { pending.insert(ASTDB_SET.to_owned()); }
                                Ok(Err(err)) => tracing::warn!("astdb snapshot: {err:#}"),
                                Err(err) => tracing::warn!("astdb snapshot: {err}"),
                            }
                        }
                        let sets: Vec<String> = std::mem::take(&mut pending).into_iter().collect();
                        let sets = if overflow { Vec::new() } else { sets };
                        overflow = false;
                        let _ = changes.send(sets);
                        continue;
                    }
                }
            };
            let Some(event) = event else { return };
            match event {
                // Reading (our own sync server reads every file it serves) is not a change;
                // counting it would make every pass trigger the next.
                Ok(event) if matches!(event.kind, notify::EventKind::Access(_)) => {}
                Ok(event) => {
                    if event.need_rescan() {
                        overflow = true;
                    }
                    for path in &event.paths {
                        if let Some(source) = &astdb
                            && path.parent() == source.parent()
                            && path
                                .file_name()
                                .zip(source.file_name())
                                .is_some_and(|(p, s)| {
                                    p.to_string_lossy().starts_with(&*s.to_string_lossy())
                                })
                        {
                            pending.insert(ASTDB_SET.to_owned());
                        }
                        for (name, root) in &roots {
                            if path.starts_with(root) {
                                pending.insert(name.clone());
                            }
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!("inotify: {err}");
                    overflow = true;
                }
            }
        }
    });
    Ok(SetWatcher {
        _watcher: watcher,
        task,
        stop,
    })
}

/// A file system with less room than this counts as full (a PBX's write of a few blocks
/// fails there).
const FULL_BELOW: u64 = 1 << 20;

/// How often the sets' file systems are looked at for space (see [`room_again`]).
const ROOM_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// The sets whose file system has room again since the last look (`full`: those that had
/// none then, kept up to date). A write that fails for lack of space still stamps the file's
/// mtime, and the kernel notifies only for bytes written: no notice would carry that change
/// until the next reconcile, 30 minutes later by default (chaos seed 2807 runs 80 and 97: the
/// backup's copy the same bytes with an older mtime, `lbs sync verify` differing). A set whose
/// file system comes back from full gets a notice.
async fn room_again(full: &mut BTreeSet<String>, roots: &[(String, PathBuf)]) -> Vec<String> {
    // statvfs blocks (a hung network mount would hold a runtime thread): off the runtime.
    let roots = roots.to_vec();
    let now = tokio::task::spawn_blocking(move || {
        roots
            .into_iter()
            .filter_map(|(name, root)| {
                let stat = nix::sys::statvfs::statvfs(root.as_path()).ok()?;
                let room = stat.blocks_available().saturating_mul(stat.fragment_size());
                Some((name, room < FULL_BELOW))
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    full_to_room(full, now)
}

/// [`room_again`]'s rule on what was looked at: each set that was full and is not now.
fn full_to_room(full: &mut BTreeSet<String>, now: Vec<(String, bool)>) -> Vec<String> {
    let mut again = Vec::new();
    for (name, is_full) in now {
        if is_full {
            full.insert(name);
        } else if full.remove(&name) {
            tracing::info!(
                set = name,
                "its file system has room again: the set is looked at"
            );
            again.push(name);
        }
    }
    again
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chaos_seed_2807_run_80_a_set_whose_disk_had_no_room_gets_a_notice_when_it_has_again() {
        let mut full = BTreeSet::new();
        let look = |v: &[(&str, bool)]| -> Vec<(String, bool)> {
            v.iter().map(|(n, f)| (n.to_string(), *f)).collect()
        };
        assert!(full_to_room(&mut full, look(&[("recordings", false)])).is_empty());
        assert!(
            full_to_room(&mut full, look(&[("recordings", true), ("config", false)])).is_empty()
        );
        assert!(full_to_room(&mut full, look(&[("recordings", true)])).is_empty());
        assert_eq!(
            full_to_room(&mut full, look(&[("recordings", false), ("config", false)])),
            vec!["recordings".to_owned()]
        );
        // Once: room that stays is no news.
        assert!(full_to_room(&mut full, look(&[("recordings", false)])).is_empty());
    }
}
