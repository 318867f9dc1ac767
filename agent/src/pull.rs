//! One pull of one tree from the partner: the single path that `lbs sync pull` and the
//! backup's daemon both take (connect, name the set, pull into the root with its trash beside
//! it, say goodbye), and the trash's emptying by retention that both apply.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures_util::SinkExt;
use lbs_protocol::{Envelope, Message, Meter, Negotiated, Role};
use lbs_sync::{Durability, Index, Progress, PullOptions, PullReport, Trash};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::peer::Peer;

/// What to pull, from where, into where.
pub(crate) struct Pull<'a> {
    pub peer: &'a Peer,
    pub from: SocketAddr,
    /// The set to ask for, when the partner serves several (the daemon); `lbs sync serve`
    /// serves one tree and is asked for none.
    pub set: Option<&'a str>,
    pub root: &'a Path,
    pub index: Arc<Mutex<Index>>,
    pub trash: &'a Path,
    pub durability: Durability,
    /// Cancelling it stops at the next chunk; what is complete stays.
    pub cancel: CancellationToken,
}

/// The partner answered: who it is and the meter of what crosses the wire. [`Connected::pull`]
/// does the rest.
pub(crate) struct Connected<'a> {
    pull: Pull<'a>,
    conn: lbs_protocol::Connection<
        lbs_protocol::tls::ClientStream<
            lbs_protocol::Metered<tokio::io::BufReader<tokio::net::TcpStream>>,
        >,
    >,
    pub negotiated: Negotiated,
    pub meter: Meter,
}

impl<'a> Pull<'a> {
    /// Dials the partner (mutual TLS, hello) and names the set.
    pub(crate) async fn connect(self) -> anyhow::Result<Connected<'a>> {
        let (mut conn, negotiated, meter) = self.peer.connect(self.from, Role::Backup).await?;
        if let Some(name) = self.set {
            conn.send(Envelope {
                generation: self.peer.generation,
                message: Message::SyncSet { name: name.into() },
            })
            .await
            .with_context(|| format!("asking {} for the set {name}", self.peer.partner))?;
        }
        Ok(Connected {
            pull: self,
            conn,
            negotiated,
            meter,
        })
    }
}

impl Connected<'_> {
    /// Pulls, calling `on_progress` as it goes, and says goodbye. A failure of the session is
    /// an [`lbs_sync::SessionError`] inside the error (callers tell a cancelled or interrupted
    /// pull from a failed one with `downcast_ref`).
    pub(crate) async fn pull(
        mut self,
        mut on_progress: impl FnMut(Progress),
    ) -> anyhow::Result<PullReport> {
        let Pull {
            peer,
            root,
            index,
            trash,
            durability,
            cancel,
            ..
        } = self.pull;
        let trash =
            Trash::open(trash).with_context(|| format!("opening the trash {}", trash.display()))?;
        let (progress, mut follow) = watch::channel(Progress::default());
        let report = {
            let pull = lbs_sync::pull(
                &mut self.conn,
                root,
                index,
                &trash,
                peer.generation,
                PullOptions {
                    progress: Some(progress),
                    durability,
                    cancel: Some(cancel),
                    version: self.negotiated.version,
                },
            );
            tokio::pin!(pull);
            loop {
                tokio::select! {
                    report = &mut pull => break report?,
                    Ok(()) = follow.changed() => on_progress(*follow.borrow_and_update()),
                }
            }
        };
        let _ = self
            .conn
            .send(Envelope {
                generation: peer.generation,
                message: Message::Goodbye {
                    reason: "pull complete".into(),
                },
            })
            .await;
        Ok(report)
    }
}

/// Empties the trash at `dir` of the batches older than `retention`, on a blocking thread
/// (removing many files takes a while). Returns how many batches went.
pub(crate) async fn purge_trash(dir: PathBuf, retention: Duration) -> anyhow::Result<u64> {
    let shown = dir.display().to_string();
    tokio::task::spawn_blocking(move || {
        let why = || format!("cannot empty old trash in {}", dir.display());
        let trash = Trash::open(&dir).with_context(why)?;
        trash.purge(retention).with_context(why)
    })
    .await
    .with_context(|| format!("emptying {shown}"))?
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn the_trash_is_emptied_of_what_is_older_than_the_retention_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(".voicemail.lbs-trash");
        let trash = Trash::open(&dir).unwrap();
        drop(trash.batch().unwrap());
        let batches = || std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(batches(), 1);
        let month = Duration::from_secs(30 * 86_400);
        assert_eq!(purge_trash(dir.clone(), month).await.unwrap(), 0);
        assert_eq!(batches(), 1);
        // Batches are named by the second they began: one second on, a zero retention has it.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(purge_trash(dir.clone(), Duration::ZERO).await.unwrap(), 1);
        assert_eq!(batches(), 0);
    }
}
