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
        loop {
            let event = if pending.is_empty() && !overflow {
                due = None;
                tokio::select! {
                    () = token.cancelled() => return,
                    event = rx.recv() => event,
                }
            } else {
                let deadline = *due.get_or_insert_with(|| tokio::time::Instant::now() + debounce);
                tokio::select! {
                    () = token.cancelled() => return,
                    event = rx.recv() => event,
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
