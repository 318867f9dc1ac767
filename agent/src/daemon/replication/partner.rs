//! The backup's watch connection to the primary: heartbeats and change notices.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use futures_util::{SinkExt, StreamExt};
use lbs_protocol::{Envelope, Message, Role};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::daemon::replication::peer;
use crate::daemon::state::{HEARTBEAT, Shared, lock, now_ms};
use crate::status::SetState;

/// Keeps a watch connection to the primary; every notice marks its sets due.
pub(crate) async fn watch_partner(
    shared: Arc<Shared>,
    names: Vec<String>,
    pending: Arc<Mutex<BTreeSet<usize>>>,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    // Quick at first (the partner's agent may be starting too), slower while it stays away.
    let mut delay = Duration::from_millis(250);
    loop {
        let connected = std::sync::atomic::AtomicBool::new(false);
        let session = async {
            let Some((peer, address)) = peer(&shared)? else {
                bail!("the partner's address is not known yet");
            };
            let (mut conn, _, _) = peer.connect(address, Role::Backup).await?;
            crate::daemon::guard::learn_partner_mac(&shared, address.ip());
            conn.send(Envelope {
                generation: peer.generation,
                message: Message::SyncWatch,
            })
            .await?;
            // Connected: whatever happened while we were not, a reconcile finds it.
            connected.store(true, std::sync::atomic::Ordering::Relaxed);
            *lock(&shared.partner_heard_ms) = Some(now_ms());
            lock(&pending).extend(0..names.len());
            wake.notify_one();
            // A heartbeat a second: this backup's own view of whether the primary lives
            // (automatic failover needs it besides the data center's).
            let mut beat = tokio::time::interval(HEARTBEAT);
            let mut seq = 0u64;
            let mut heard = Instant::now();
            loop {
                let envelope = tokio::select! {
                    next = conn.next() => match next {
                        Some(envelope) => envelope?,
                        None => break,
                    },
                    _ = beat.tick() => {
                        if heard.elapsed() > 3 * HEARTBEAT {
                            bail!("the primary did not answer heartbeats for {:?}", heard.elapsed());
                        }
                        seq += 1;
                        conn.send(Envelope {
                            generation: peer.generation,
                            message: Message::Heartbeat { seq, role: Role::Backup },
                        })
                        .await?;
                        continue;
                    }
                };
                heard = Instant::now();
                *lock(&shared.partner_heard_ms) = Some(now_ms());
                if let Message::SyncChanged { sets, overflow } = envelope.message {
                    let now = now_ms();
                    let due: Vec<usize> = if overflow {
                        (0..names.len()).collect()
                    } else {
                        sets.iter()
                            .filter_map(|s| names.iter().position(|n| n == s))
                            .collect()
                    };
                    for &i in &due {
                        shared.set_status(&names[i], |s| {
                            s.changed_since_ms.get_or_insert(now);
                            if s.pass_started_ms.is_some() {
                                s.changed_during_pass_ms.get_or_insert(now);
                            }
                            if s.state == SetState::InSync {
                                s.state = SetState::Changed;
                            }
                        });
                    }
                    lock(&pending).extend(due);
                    wake.notify_one();
                }
            }
            anyhow::Result::<()>::Err(anyhow::anyhow!("the primary closed the watch connection"))
        };
        tokio::select! {
            () = stop.cancelled() => return,
            result = session => if let Err(err) = result {
                tracing::debug!("watch: {err:#}");
            },
        }
        if connected.load(std::sync::atomic::Ordering::Relaxed) {
            delay = Duration::from_millis(250);
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(4));
    }
}
