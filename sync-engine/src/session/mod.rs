//! A sync session over an established lbs [`Connection`] (mutual TLS in production, any
//! stream in tests): [`serve`] on the sending side, [`pull`] on the receiving side.
//!
//! The receiver asks for the manifest (the sender scans first, so it is current), plans, and
//! executes the plan on a blocking thread; each fetch crosses to the async side through
//! bounded channels, so at most a few [`SYNC_CHUNK_LEN`] chunks are in memory whatever the
//! file size, and a slow disk slows the sender down instead of filling memory.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use lbs_protocol::sync::{
    BlockSum, DirDigest, MAX_SKIP_ERROR_LEN, MAX_SKIPPED_SENT, ManifestEntry, ManifestKind,
    SkipReason, SkippedEntry, group_digest, listing_digests,
};
use lbs_protocol::{
    Connection, Envelope, FrameError, Generation, Message, ProtocolVersion, RelPath, Role,
    SYNC_CHUNK_LEN,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::apply::{ApplyError, Durability, Root};
use crate::execute::{ExecuteReport, Fetcher, Progress, Sink, manifest_entry};
use crate::index::BlockList;
use crate::index::{Index, IndexError};
use crate::journal::{Recovery, recover};
use crate::plan::{Action, Basis, PlanError, PlanSummary, plan_with_links};
use crate::scan::{ScanError, ScanOptions, ScanReport, scan_from};
use crate::trash::Trash;
use crate::tree::{BlockSize, Cv};

mod pack;
mod pipeline;
mod pull;
mod ready;
mod serve;
mod whole;
mod wire;

pub use pull::{PullOptions, pull};
use serve::send_digests;
pub use serve::serve;
use wire::*;

/// The most manifest entries a receiver accepts (a PBX has thousands; this stops a hostile
/// sender from exhausting memory).
pub const MAX_MANIFEST_ENTRIES: usize = 5_000_000;

/// The most bytes of names (paths, link targets) a peer's manifest or digests may hold: what
/// the receiver keeps in memory is bounded by bytes, not only by entries (5 million entries of
/// 4 KiB paths would be 20 GB).
pub const MAX_MANIFEST_BYTES: u64 = 1 << 30;

/// The largest file lbs syncs (1 TiB): a size a peer announces beyond it is refused before
/// anything is planned, allocated or written for it.
pub const MAX_FILE_LEN: u64 = 1 << 40;

/// What a peer's manifest (or digests) has taken so far, against the limits.
#[derive(Default)]
struct Intake {
    entries: usize,
    bytes: u64,
}

impl Intake {
    /// Counts `entries` more holding `bytes` of names.
    fn take(&mut self, entries: usize, bytes: u64) -> Result<(), SessionError> {
        self.entries = self.entries.saturating_add(entries);
        self.bytes = self.bytes.saturating_add(bytes);
        if self.entries > MAX_MANIFEST_ENTRIES || self.bytes > MAX_MANIFEST_BYTES {
            return Err(SessionError::ManifestTooLarge);
        }
        Ok(())
    }

    /// Counts a part of the manifest, checking every size it announces.
    fn manifest(&mut self, part: &[ManifestEntry]) -> Result<(), SessionError> {
        let mut bytes = 0u64;
        for entry in part {
            bytes += entry.path.as_bytes().len() as u64;
            match &entry.kind {
                ManifestKind::File { size, .. } if *size > MAX_FILE_LEN => {
                    return Err(SessionError::Unreasonable(format!(
                        "{} announced at {size} bytes, more than the {MAX_FILE_LEN} bytes of \
                         the largest file lbs syncs",
                        entry.path
                    )));
                }
                ManifestKind::Symlink { target } => bytes += target.len() as u64,
                _ => {}
            }
        }
        self.take(part.len(), bytes)
    }
}

fn path_bytes(path: &Option<RelPath>) -> u64 {
    path.as_ref().map_or(0, |p| p.as_bytes().len() as u64)
}
/// Roughly how many bytes of entries go into one manifest frame.
const MANIFEST_CHUNK_BYTES: usize = 256 * 1024;
/// Block summaries per `SyncFetchChanges` frame (at most about 230 KiB).
const BLOCKS_PER_FRAME: usize = 16 * 1024;
/// Chunks in flight between the network and the disk, per file.
const CHUNKS_IN_FLIGHT: usize = 8;

impl From<FrameError> for SessionError {
    fn from(err: FrameError) -> SessionError {
        match err {
            FrameError::Lost(how) => SessionError::Lost(how),
            err => SessionError::Frame(err),
        }
    }
}

impl From<PlanError> for SessionError {
    fn from(err: PlanError) -> SessionError {
        SessionError::Plan(err)
    }
}

/// Why a session failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The connection failed or carried garbage.
    // The causes of this and `Plan` are in their messages, not also their sources: `{:#}`
    // says them once.
    #[error("connection: {0}")]
    Frame(FrameError),
    /// The peer hung up in the middle.
    #[error("the peer closed the connection during {0}")]
    Closed(&'static str),
    /// The connection broke under the session (how, in the text): the peer stopped or the
    /// link went down.
    #[error(
        "the connection to the peer broke ({0}): the peer stopped or the link went down; \
         the next pass goes on from what is already in place"
    )]
    Lost(&'static str),
    /// The sender went quiet in the middle of an answer: stopped (`SIGSTOP`, a hung disk)
    /// or the link went down without a reset.
    #[error(
        "the peer sent nothing for {secs} s during {0}: it is stopped (frozen) or the link \
         is down; the next pass goes on from what is already in place",
        secs = STALLED.as_secs()
    )]
    Stalled(&'static str),
    /// The peer read nothing of what this side sent for [`STALLED`]: stopped, or the link
    /// went down without a reset.
    #[error(
        "the peer read nothing of what this side sent for {secs} s: it is stopped (frozen) or \
         the link is down; the next pass goes on from what is already in place",
        secs = STALLED.as_secs()
    )]
    NotReading,
    /// The peer sent something that does not belong here.
    #[error("the peer sent {got} during {during}")]
    Unexpected {
        /// What it sent.
        got: &'static str,
        /// What we were doing.
        during: &'static str,
    },
    /// The peer's manifest is larger than any real tree.
    #[error(
        "the peer's manifest has more than {MAX_MANIFEST_ENTRIES} entries or \
         {MAX_MANIFEST_BYTES} bytes of names; refused"
    )]
    ManifestTooLarge,
    /// The peer announced a size no real file has.
    #[error("the peer's manifest: {0}; refused")]
    Unreasonable(String),
    /// Scanning a tree failed.
    #[error(transparent)]
    Scan(#[from] ScanError),
    /// The index failed.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// The peer broke a rule of a file transfer (the rule in the text).
    #[error("the peer {0}; refused")]
    Refused(String),
    /// The peer's manifest is not a tree.
    #[error("the peer's manifest: {0}")]
    Plan(PlanError),
    /// Changing the receiver's tree failed in a way that stops the run.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// The operator cancelled the pull.
    #[error(
        "cancelled: files completed so far are in place, the file in transfer was kept to \
         resume from, the rest waits for the next pull"
    )]
    Cancelled,
    /// A worker thread died (a bug).
    #[error("internal: {0}")]
    Internal(String),
}

impl SessionError {
    /// The peer sent `got` where it does not belong, during `during`.
    fn unexpected(got: &Message, during: &'static str) -> SessionError {
        SessionError::Unexpected {
            got: got.kind(),
            during,
        }
    }
}

/// What a pull did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PullReport {
    /// The receiver's own scan before planning.
    pub scan: ScanReport,
    /// The plan's numbers.
    pub plan: PlanSummary,
    /// What executing it did.
    pub executed: ExecuteReport,
    /// Time to get the sender's manifest (its scan included).
    pub manifest_time: Duration,
    /// Time for the whole pull.
    pub elapsed: Duration,
    /// What an interrupted earlier run left in the journal, and what became of it.
    pub recovery: Option<Recovery>,
    /// What the sender did not sync, and why (empty from a sender older than protocol 1.6).
    pub sender_skipped: SenderSkipped,
    /// File data that came packed (from a sender of protocol 1.11), and its size packed.
    pub packed: PackedData,
}

/// File data that crossed packed with zstd.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackedData {
    /// Bytes of file content that came packed.
    pub data: u64,
    /// What those bytes took packed (frames' payloads, before TLS).
    pub packed: u64,
}

fn blocking_join<T>(result: Result<T, tokio::task::JoinError>) -> Result<T, SessionError> {
    result.map_err(|e| SessionError::Internal(format!("worker thread failed: {e}")))
}

/// The sender's side of a reconcile: a fresh scan, and the manifest it gives.
/// What a sender's scan found: its manifest, what it left out, and its hard-link groups.
struct Scanned {
    manifest: Vec<ManifestEntry>,
    skipped: Vec<SkippedEntry>,
    links: Vec<Vec<RelPath>>,
}

fn scan_manifest(root: &Path, index: &Mutex<Index>) -> Result<Scanned, SessionError> {
    let mut index = index
        .lock()
        .map_err(|_| SessionError::Internal("index lock poisoned".into()))?;
    let known = index.take_entries()?;
    let (report, entries) = scan_from(root, &mut index, &ScanOptions::default(), known)?;
    let links = crate::links::groups(root, &entries);
    let manifest = entries.iter().cloned().map(manifest_entry).collect();
    index.remember(entries)?;
    Ok(Scanned {
        manifest,
        skipped: report.skipped,
        links,
    })
}

/// The first protocol whose senders list what they skipped ([`Message::SyncSkipped`]) and
/// send holes as holes ([`Message::SyncHole`]).
const V1_6: ProtocolVersion = ProtocolVersion { major: 1, minor: 6 };

/// The first protocol whose receivers unpack [`Message::SyncDataPacked`].
const V1_11: ProtocolVersion = ProtocolVersion {
    major: 1,
    minor: 11,
};

/// The first protocol whose senders say [`Message::SyncScanning`] while they scan.
const V1_12: ProtocolVersion = ProtocolVersion {
    major: 1,
    minor: 12,
};

/// The first protocol whose receivers say [`Message::SyncWorking`] while they work between
/// requests, so their sender waits for each request within [`STALLED`].
const V1_13: ProtocolVersion = ProtocolVersion {
    major: 1,
    minor: 13,
};

/// Ticks every [`lbs_protocol::SYNC_SCANNING_EVERY`], the first one after a whole interval:
/// when a side that works on its own says so to its peer.
fn notice_ticks() -> tokio::time::Interval {
    let every = lbs_protocol::SYNC_SCANNING_EVERY;
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks
}

/// Awaits `work` (a blocking task of this side's), telling the peer `notice`, if any, every
/// [`notice_ticks`] while it runs. The work is awaited even when the peer is gone, so it
/// never outlives the session; a notice that could not be sent is the error then.
async fn saying<S: AsyncRead + AsyncWrite + Unpin, T>(
    conn: &mut Connection<S>,
    generation: Generation,
    notice: Option<Message>,
    mut work: tokio::task::JoinHandle<T>,
) -> Result<T, SessionError> {
    let mut ticks = notice_ticks();
    let said = loop {
        tokio::select! {
            joined = &mut work => return blocking_join(joined),
            _ = ticks.tick(), if notice.is_some() => {
                if let Some(notice) = notice.clone()
                    && let Err(err) = send(conn, generation, notice).await
                {
                    break err;
                }
            }
        }
    };
    blocking_join(work.await)?;
    Err(said)
}

/// What the sender's scan left out, as it said after its manifest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SenderSkipped {
    /// At most [`MAX_SKIPPED_SENT`] of them.
    pub entries: Vec<SkippedEntry>,
    /// How many more there were.
    pub more: u64,
}

impl SenderSkipped {
    /// What a sender sends of its scan's `skipped`: the first ones, error texts cut short.
    fn from_scan(mut skipped: Vec<SkippedEntry>) -> SenderSkipped {
        let more = skipped.len().saturating_sub(MAX_SKIPPED_SENT) as u64;
        skipped.truncate(MAX_SKIPPED_SENT);
        for entry in &mut skipped {
            if let SkipReason::Unreadable { error } = &mut entry.reason
                && error.len() > MAX_SKIP_ERROR_LEN
            {
                let mut cut = MAX_SKIP_ERROR_LEN;
                while !error.is_char_boundary(cut) {
                    cut -= 1;
                }
                error.truncate(cut);
            }
        }
        SenderSkipped {
            entries: skipped,
            more,
        }
    }

    /// Checks what a sender sent against the limits it must keep.
    fn check(entries: &[SkippedEntry]) -> Result<(), SessionError> {
        let too_long = entries.iter().any(|entry| {
            matches!(&entry.reason, SkipReason::Unreadable { error } if error.len() > MAX_SKIP_ERROR_LEN)
        });
        if entries.len() > MAX_SKIPPED_SENT || too_long {
            return Err(SessionError::Unreasonable(format!(
                "the list of skipped entries after it is over {MAX_SKIPPED_SENT} entries or \
                 {MAX_SKIP_ERROR_LEN} bytes of error text each"
            )));
        }
        Ok(())
    }
}

/// Splits `items` into parts of about [`MANIFEST_CHUNK_BYTES`] each (by `size`), so every
/// frame stays far below the frame limit whatever the path lengths; always one part at least.
fn parts<T>(items: Vec<T>, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut parts = vec![Vec::new()];
    let mut bytes = 0;
    for item in items {
        bytes += size(&item);
        if let Some(part) = parts.last_mut() {
            part.push(item);
        }
        if bytes >= MANIFEST_CHUNK_BYTES {
            parts.push(Vec::new());
            bytes = 0;
        }
    }
    if parts.len() > 1 && parts.last().is_some_and(Vec::is_empty) {
        parts.pop();
    }
    parts
}

/// The next message of the sender's manifest. A sender of protocol 1.12 says
/// [`Message::SyncScanning`] every [`lbs_protocol::SYNC_SCANNING_EVERY`] while it scans, so
/// each message comes within [`STALLED`] or the sender has stopped; an older one is silent
/// until its scan ends, however long that takes.
async fn receive_manifest<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    version: ProtocolVersion,
) -> Result<Message, SessionError> {
    if version < V1_12 {
        return receive(conn, "the manifest").await;
    }
    loop {
        match receive_answer(conn, "the manifest").await? {
            Message::SyncScanning => {}
            other => return Ok(other),
        }
    }
}

/// The receiver's half of the manifest exchange: our listing digests out (from `before`,
/// our index as it was before this pass's scan), the sender's differing entries in, and the
/// sender's full manifest back, unchanged directories filled in from `before`.
async fn exchange_manifests<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    generation: Generation,
    version: ProtocolVersion,
    before: tokio::sync::oneshot::Receiver<Vec<ManifestEntry>>,
) -> Result<Exchanged, SessionError> {
    // An empty first part lets the sender start its scan while we read our index.
    send(
        conn,
        generation,
        Message::SyncManifestDigests {
            dirs: Vec::new(),
            last: false,
        },
    )
    .await?;
    let before = before
        .await
        .map_err(|_| SessionError::Internal("the index snapshot was lost".into()))?;
    send_digests(conn, generation, &before).await?;
    let mut same = SameDirs::default();
    let mut entries = Vec::new();
    let mut intake = Intake::default();
    loop {
        match receive_manifest(conn, version).await? {
            Message::SyncManifestSame { dirs, last: _ } => {
                intake.take(dirs.len(), dirs.iter().map(path_bytes).sum())?;
                same.extend(dirs);
            }
            Message::SyncManifest {
                entries: part,
                last,
            } => {
                intake.manifest(&part)?;
                entries.extend(part);
                if last {
                    break;
                }
            }
            other => {
                return Err(SessionError::unexpected(&other, "the manifest"));
            }
        }
    }
    let mut skipped = SenderSkipped::default();
    let mut links = Vec::new();
    if version >= V1_6 {
        match receive_answer(conn, "the list of skipped entries").await? {
            Message::SyncSkipped { entries, more } => {
                SenderSkipped::check(&entries)?;
                skipped = SenderSkipped { entries, more };
            }
            other => {
                return Err(SessionError::unexpected(
                    &other,
                    "the list of skipped entries",
                ));
            }
        }
        loop {
            match receive_answer(conn, "the hard links").await? {
                Message::SyncLinks { groups, last } => {
                    let paths: usize = groups.iter().map(Vec::len).sum();
                    let bytes = groups
                        .iter()
                        .flatten()
                        .map(|p| p.as_bytes().len() as u64)
                        .sum();
                    intake.take(paths, bytes)?;
                    links.extend(groups);
                    if last {
                        break;
                    }
                }
                other => return Err(SessionError::unexpected(&other, "the hard links")),
            }
        }
    }
    // The unchanged directories' entries are ours, as they were when we sent the digests.
    entries.extend(before.into_iter().filter(|entry| same.holds(&entry.path)));
    if entries.len() > MAX_MANIFEST_ENTRIES {
        return Err(SessionError::ManifestTooLarge);
    }
    Ok(Exchanged {
        entries,
        skipped,
        links,
    })
}

/// What a receiver learnt from the sender before planning.
struct Exchanged {
    entries: Vec<ManifestEntry>,
    skipped: SenderSkipped,
    links: Vec<Vec<RelPath>>,
}

/// The directories (`None`: the root) whose listings both sides hold alike.
#[derive(Default)]
struct SameDirs {
    root: bool,
    dirs: std::collections::HashSet<RelPath>,
}

impl SameDirs {
    /// Whether `path` lies directly in one of these directories.
    fn holds(&self, path: &RelPath) -> bool {
        match path.parent_bytes() {
            None => self.root,
            Some(dir) => self.dirs.contains(dir),
        }
    }
}

impl Extend<Option<RelPath>> for SameDirs {
    fn extend<I: IntoIterator<Item = Option<RelPath>>>(&mut self, dirs: I) {
        for dir in dirs {
            match dir {
                None => self.root = true,
                Some(dir) => {
                    self.dirs.insert(dir);
                }
            }
        }
    }
}

impl FromIterator<Option<RelPath>> for SameDirs {
    fn from_iter<I: IntoIterator<Item = Option<RelPath>>>(dirs: I) -> Self {
        let mut same = SameDirs::default();
        same.extend(dirs);
        same
    }
}

/// Reads the rest of the receiver's directory digests, the first part being `dirs`.
async fn receive_digests<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    dirs: Vec<DirDigest>,
    last: bool,
) -> Result<std::collections::BTreeMap<Option<RelPath>, [u8; 32]>, SessionError> {
    let mut theirs = std::collections::BTreeMap::new();
    let mut part = dirs;
    let mut done = last;
    let mut intake = Intake::default();
    loop {
        intake.take(part.len(), part.iter().map(|d| path_bytes(&d.dir)).sum())?;
        theirs.extend(part.into_iter().map(|d| (d.dir, d.digest)));
        if done {
            return Ok(theirs);
        }
        match receive(conn, "the receiver's digests").await? {
            Message::SyncManifestDigests { dirs, last } => {
                part = dirs;
                done = last;
            }
            other => {
                return Err(SessionError::unexpected(&other, "the receiver's digests"));
            }
        }
    }
}

/// What crosses from the network to the thread writing a file.
enum Chunk {
    /// The next bytes of a whole-file transfer (a large chunk shares the frame it came in).
    Data(bytes::Bytes),
    /// The next bytes of a whole-file transfer are a hole this long.
    Hole(u64),
    /// A block transfer begins: changed bytes to follow, the file's new size.
    Changes(u64, u64),
    /// Bytes at an offset of a block transfer; the gap before them is kept from the old file.
    At(u64, Vec<u8>),
    /// A part of a delta against the receiver's version.
    Delta(Vec<u8>),
    /// The file is complete at this size.
    End(u64),
    /// The sender could not send this file (it says why); the run goes on.
    Failed(String),
    /// The connection is gone or the pull was cancelled: the run stops.
    Aborted(String),
}

/// A fetch request from the writing thread: the path, its size, and how to ask for it.
type Request = (RelPath, u64, Ask, mpsc::Sender<Chunk>);

/// How a file is asked for.
#[derive(Clone, Debug)]
enum Ask {
    /// The whole file.
    Whole,
    /// The blocks whose values differ from these (the receiver's).
    Blocks(BlockSize, BlockList),
    /// A delta against the version with this signature.
    Delta(Vec<u8>),
}

impl Ask {
    fn from_basis(basis: Option<(BlockSize, BlockList)>) -> Ask {
        match basis {
            Some((block_size, blocks)) if !blocks.is_empty() => Ask::Blocks(block_size, blocks),
            _ => Ask::Whole,
        }
    }
}

#[cfg(test)]
mod tests;
