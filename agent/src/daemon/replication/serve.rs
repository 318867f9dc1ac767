//! The primary's side: a sync server for every set (the partner's certificate only).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use lbs_protocol::listen::{Admission, serve_until};
use lbs_protocol::tls;
use lbs_protocol::{Envelope, Message, Role};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::peer::{Peer, partner_port};
use crate::status::SetState;

use crate::daemon::replication::astdb::snapshot_astdb;
use crate::daemon::replication::watch::watch_sets;
use crate::daemon::replication::{ServedSet, astdb_dir, open_sets};
use crate::daemon::state::{Shared, lock};

/// The primary: serves every set to the partner and tells it what changed.
pub(crate) async fn serve_sets(shared: Arc<Shared>, stop: CancellationToken) -> anyhow::Result<()> {
    // Serving needs the partner's SID (only its certificate gets in), not its address.
    let partner = lock(&shared.info).partner.as_ref().map(|p| p.sid);
    let Some(partner) = partner else {
        tracing::info!("no partner provisioned: nothing to serve");
        stop.cancelled().await;
        return Ok(());
    };
    let generation = lock(&shared.machine).record.generation;
    let pin = lock(&shared.info).partner_key.clone();
    let peer = Peer::from_state(&shared.paths, partner, generation)?.pinned(pin.as_ref());
    let peer = Arc::new(peer);
    let sets = open_sets(&shared)?;
    let astdb = astdb_dir(&shared.paths);
    if let Some(source) = shared.config().astdb.clone() {
        let dir = astdb.clone();
        match tokio::task::spawn_blocking(move || snapshot_astdb(&source, &dir)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!("astdb snapshot: {err:#}"),
            Err(err) => tracing::warn!("astdb snapshot: {err}"),
        }
    }
    for (set, _, _) in &sets {
        shared.set_status(&set.name, |s| s.state = SetState::Serving);
    }
    let (changes, _) = broadcast::channel::<Vec<String>>(64);
    let watcher = watch_sets(&shared, &sets, changes.clone())?;
    let listener = TcpListener::bind(SocketAddr::from((
        Ipv4Addr::UNSPECIFIED,
        shared.config().sync_port,
    )))
    .await
    .with_context(|| {
        format!(
            "listening for the partner on port {}",
            shared.config().sync_port
        )
    })?;
    let config = peer.server_config()?;
    let roots: Arc<Vec<ServedSet>> = Arc::new(
        sets.iter()
            .map(|(set, index, _)| (set.name.clone(), set.path.clone(), index.clone()))
            .collect(),
    );
    tracing::info!(port = shared.config().sync_port, partner = %peer.partner, "serving the sync sets");
    let serving = partner_port("the sync port", Duration::ZERO);
    serve_until(listener, stop.clone(), serving, |tcp, remote, admission| {
        let (peer, config, roots, changes) = (
            peer.clone(),
            config.clone(),
            roots.clone(),
            changes.subscribe(),
        );
        let stop = stop.clone();
        let shared = shared.clone();
        let proven = move || crate::daemon::guard::learn_partner_mac(&shared, remote.ip());
        async move {
            let session = serve_one(peer, config, tcp, admission, roots, changes, proven);
            tokio::select! {
                () = stop.cancelled() => {}
                result = session => if let Err(err) = result {
                    if err.is::<NotLetIn>() {
                        // Only the partner may reach this port: anything else is worth a look.
                        tracing::warn!(%remote, "refused a connection to the sync port: {err:#}");
                    } else {
                        tracing::info!(%remote, "sync session ended: {err:#}");
                    }
                },
            }
        }
    })
    .await;
    watcher.stop().await;
    drop(sets);
    Ok(())
}

/// The backup heartbeats its watch connection every second: this much silence means it is
/// gone (or frozen), and the session ends rather than wait for it.
const WATCH_SILENCE: Duration = Duration::from_secs(15);

/// A connection to the sync port that did not get past TLS and the hello (not the partner's
/// certificate, not the partner, or not the protocol).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct NotLetIn(String);

pub(crate) async fn serve_one(
    peer: Arc<Peer>,
    config: Arc<tls::ServerConfig>,
    tcp: TcpStream,
    admission: Admission,
    roots: Arc<Vec<ServedSet>>,
    mut changes: broadcast::Receiver<Vec<String>>,
    proven: impl FnOnce(),
) -> anyhow::Result<()> {
    let (mut conn, negotiated) = peer
        .accept(config, tcp, Role::Primary)
        .await
        .map_err(|err| anyhow::Error::new(NotLetIn(format!("{err:#}"))))?;
    admission.proven();
    proven();
    let first = tokio::time::timeout(Duration::from_secs(10), conn.next())
        .await
        .context("the partner said nothing")?
        .context("the partner hung up")??;
    match first.message {
        Message::SyncSet { name } => {
            let Some((_, root, index)) = roots.iter().find(|(n, _, _)| *n == name) else {
                let _ = conn
                    .send(Envelope {
                        generation: peer.generation,
                        message: Message::Refused(lbs_protocol::Refusal::ProtocolViolation {
                            detail: format!("this box has no sync set {name:?}"),
                        }),
                    })
                    .await;
                bail!("the partner asked for an unknown set {name:?}");
            };
            lbs_sync::serve(
                &mut conn,
                root.clone(),
                index.clone(),
                peer.generation,
                negotiated.version,
            )
            .await?;
            Ok(())
        }
        Message::SyncWatch => loop {
            tokio::select! {
                incoming = tokio::time::timeout(WATCH_SILENCE, conn.next()) => match incoming {
                    Err(_) => bail!("the partner's watch was silent for {WATCH_SILENCE:?}; closed"),
                    Ok(None | Some(Err(_))) => return Ok(()),
                    Ok(Some(Ok(Envelope { message: Message::Heartbeat { seq, .. }, .. }))) => {
                        conn.send(Envelope {
                            generation: peer.generation,
                            message: Message::HeartbeatAck { seq, role: Role::Primary },
                        })
                        .await?;
                    }
                    Ok(Some(Ok(_))) => {}
                },
                changed = changes.recv() => {
                    let (sets, overflow) = match changed {
                        Ok(sets) => (sets, false),
                        Err(broadcast::error::RecvError::Lagged(_)) => (Vec::new(), true),
                        Err(broadcast::error::RecvError::Closed) => return Ok(()),
                    };
                    conn.send(Envelope {
                        generation: peer.generation,
                        message: Message::SyncChanged { sets, overflow },
                    })
                    .await?;
                }
            }
        },
        other => bail!("the partner opened with {}", other.kind()),
    }
}
