//! Replication: the primary serves its sets and says what changed; the backup pulls. One task
//! follows the role's mode and starts and stops the side that runs.

mod astdb;
mod partner;
mod pull;
mod serve;
mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::activate::StatePaths;
use crate::config::{SyncOver, SyncSet};
use crate::peer::Peer;

use crate::daemon::replication::pull::pull_sets;
use crate::daemon::replication::serve::serve_sets;
use crate::daemon::state::{Mode, RETRY, Shared, current_address, lock, network};

/// Starts and stops the serving or pulling side as the mode changes. A side that ends by
/// itself (the sync port taken, the partner's certificate unreadable) is said and started
/// again after a pause; the side is owned here (aborted if this task is).
pub(crate) async fn replication(shared: Arc<Shared>, shutdown: CancellationToken) {
    use tokio_util::task::AbortOnDropHandle;
    let mut modes = shared.mode.subscribe();
    loop {
        let mode = *modes.borrow_and_update();
        let token = shutdown.child_token();
        let mut side = match mode {
            Mode::Serve => Some(AbortOnDropHandle::new(tokio::spawn(serve_sets(
                shared.clone(),
                token.clone(),
            )))),
            Mode::Pull => Some(AbortOnDropHandle::new(tokio::spawn(pull_sets(
                shared.clone(),
                token.clone(),
            )))),
            Mode::Stopped => None,
        };
        let ended = async {
            match side.as_mut() {
                Some(side) => side.await,
                None => std::future::pending().await,
            }
        };
        let by_itself = tokio::select! {
            () = shutdown.cancelled() => None,
            changed = modes.changed() => {
                if changed.is_err() {
                    shutdown.cancel();
                }
                None
            }
            result = ended => Some(result),
        };
        token.cancel();
        let early = by_itself.is_some();
        let result = match (by_itself, side) {
            (Some(result), _) => Some(result),
            (None, Some(mut side)) => Some(
                stopped(&mut side, STOP_SAID_EVERY, |waited| {
                    tracing::warn!(
                        "replication ({mode:?}) was told to stop {} s ago and has not yet; \
                         the next side waits for it (a disk or the partner not answering?)",
                        waited.as_secs()
                    );
                })
                .await,
            ),
            (None, None) => None,
        };
        match result {
            Some(Ok(Err(err))) => tracing::warn!("replication ({mode:?}) ended: {err:#}"),
            Some(Err(err)) => tracing::error!("replication ({mode:?}) failed: {err}"),
            Some(Ok(Ok(()))) | None => {}
        }
        if shutdown.is_cancelled() {
            return;
        }
        if early {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = modes.changed() => {}
                () = tokio::time::sleep(RETRY) => {}
            }
        }
    }
}

/// How often a side told to stop and still running is said.
const STOP_SAID_EVERY: Duration = Duration::from_secs(10);

/// Waits for a side told to stop, calling `still` with the time waited every `every` it has
/// not: it stops at its next step (a pull at its next chunk), and a step that hangs (a disk
/// that stopped answering) would otherwise hold the next side back unsaid. It is never left
/// behind: a pull still writing must not overlap the serving that follows it after P.
async fn stopped<F: Future + Unpin>(
    side: &mut F,
    every: Duration,
    mut still: impl FnMut(Duration),
) -> F::Output {
    let since = tokio::time::Instant::now();
    loop {
        match tokio::time::timeout(every, &mut *side).await {
            Ok(output) => return output,
            Err(_) => still(since.elapsed()),
        }
    }
}

/// The astdb snapshot directory (primary) and the copy's directory (backup).
pub(crate) fn astdb_dir(paths: &StatePaths) -> PathBuf {
    paths.dir.join("astdb")
}

/// A set the primary serves: name, root, index.
pub(crate) type ServedSet = (String, PathBuf, Arc<Mutex<lbs_sync::Index>>);

pub(crate) type Indexes = Vec<(
    SyncSet,
    Arc<Mutex<lbs_sync::Index>>,
    crate::sync_cmd::RootLock,
)>;

pub(crate) fn open_sets(shared: &Shared) -> anyhow::Result<Indexes> {
    let mut opened = Vec::new();
    for set in shared.all_sets(&astdb_dir(&shared.paths)) {
        std::fs::create_dir_all(&set.path)
            .with_context(|| format!("set {}: creating {}", set.name, set.path.display()))?;
        let (index, lock) = crate::sync_cmd::open_index(&shared.paths.dir, &set.path)
            .with_context(|| format!("set {}", set.name))?;
        opened.push((set, index, lock));
    }
    Ok(opened)
}

/// The partner's replication address, if it is known.
pub(crate) fn partner_address(shared: &Shared) -> Option<(lbs_protocol::ServerId, SocketAddr)> {
    let (sid, ip) = {
        let info = lock(&shared.info);
        let partner = info.partner.as_ref()?;
        let ip = match shared.config().sync_over {
            SyncOver::Lan => partner.lan?,
            SyncOver::Overlay => partner.overlay?,
        };
        (partner.sid, ip)
    };
    // Right after B the data center may still give the partner's address from before P —
    // the one this box has just taken: the primary is at the shared address then.
    let ip = match network(shared) {
        Some(network) if ip == current_address(shared) && ip != network.shared.addr => {
            network.shared.addr
        }
        _ => ip,
    };
    Some((sid, SocketAddr::from((ip, shared.config().sync_port))))
}

pub(crate) fn peer(shared: &Shared) -> anyhow::Result<Option<(Peer, SocketAddr)>> {
    let Some((partner, address)) = partner_address(shared) else {
        return Ok(None);
    };
    let generation = lock(&shared.machine).record.generation;
    let pin = lock(&shared.info).partner_key.clone();
    Ok(Some((
        Peer::from_state(&shared.paths, partner, generation)?.pinned(pin.as_ref()),
        address,
    )))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_side_slow_to_stop_is_said_every_interval_and_waited_for() {
        let mut side = Box::pin(async {
            tokio::time::sleep(Duration::from_secs(25)).await;
            "stopped"
        });
        let mut said = Vec::new();
        let out = stopped(&mut side, Duration::from_secs(10), |waited| {
            said.push(waited.as_secs());
        })
        .await;
        assert_eq!(out, "stopped");
        assert_eq!(said, [10, 20]);
        // One that stops at once is not said at all.
        let mut quick = Box::pin(async { 7 });
        let mut said = 0;
        assert_eq!(
            stopped(&mut quick, Duration::from_secs(10), |_| said += 1).await,
            7
        );
        assert_eq!(said, 0);
    }
}
