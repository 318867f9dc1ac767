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
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use lbs_protocol::sync::{
    BlockSum, DirDigest, ManifestEntry, ManifestKind, group_digest, listing_digests,
};
use lbs_protocol::{
    Connection, Envelope, FrameError, Generation, Message, RelPath, Role, SYNC_CHUNK_LEN,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::mpsc;

use crate::apply::{ApplyError, Durability, Root};
use crate::execute::{ExecuteReport, Fetcher, Progress, Sink, execute, manifest_entry};
use crate::index::{Index, IndexError};
use crate::journal::{Recovery, recover};
use crate::plan::{Action, Basis, PlanError, PlanSummary, plan};
use crate::scan::{ScanError, ScanOptions, ScanReport, scan_from};
use crate::trash::Trash;
use crate::tree::{BlockSize, Cv};

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
        SessionError::Frame(err)
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
}

/// Sends a message and flushes it (with anything queued before it).
async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    generation: Generation,
    message: Message,
) -> Result<(), SessionError> {
    feed(conn, generation, message).await?;
    conn.flush().await?;
    Ok(())
}

/// Queues a message without flushing it: for bursts (pipelined requests, the chunks of a
/// file). It goes out at the latest before this side next waits for the peer
/// ([`next_envelope`]), so a burst shares TLS records and write calls.
async fn feed<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    generation: Generation,
    message: Message,
) -> Result<(), SessionError> {
    conn.feed(Envelope {
        generation,
        message,
    })
    .await?;
    Ok(())
}

/// The peer's next envelope (`None` when it hung up). What this side queued is flushed
/// first — unless the peer's next message has already arrived in full (a burst of pipelined
/// requests): then the answers keep filling the buffer, which flushes itself when full.
async fn next_envelope<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
) -> Option<Result<Envelope, SessionError>> {
    let arrived = matches!(
        lbs_protocol::frame::check(conn.read_buffer(), lbs_protocol::MAX_FRAME_LEN),
        Ok(Some(_))
    );
    if !arrived && let Err(err) = conn.flush().await {
        return Some(Err(err.into()));
    }
    conn.next().await.map(|envelope| Ok(envelope?))
}

async fn receive<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    during: &'static str,
) -> Result<Message, SessionError> {
    match next_envelope(conn).await {
        Some(envelope) => Ok(envelope?.message),
        None => Err(SessionError::Closed(during)),
    }
}

fn blocking_join<T>(result: Result<T, tokio::task::JoinError>) -> Result<T, SessionError> {
    result.map_err(|e| SessionError::Internal(format!("worker thread failed: {e}")))
}

/// The sender's side of a reconcile: a fresh scan, and the manifest it gives.
fn scan_manifest(root: &Path, index: &Mutex<Index>) -> Result<Vec<ManifestEntry>, SessionError> {
    let mut index = index
        .lock()
        .map_err(|_| SessionError::Internal("index lock poisoned".into()))?;
    let known = index.take_entries()?;
    let (_, entries) = scan_from(root, &mut index, &ScanOptions::default(), known)?;
    let manifest = entries.iter().cloned().map(manifest_entry).collect();
    index.remember(entries)?;
    Ok(manifest)
}

/// Serves the tree at `root` to one receiver until it says goodbye or hangs up.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    root: PathBuf,
    index: Arc<Mutex<Index>>,
    generation: Generation,
) -> Result<(), SessionError> {
    let files = Root::open(&root)?;
    // This box may have been a backup that stopped in the middle of a patch: finish it
    // before serving the file.
    blocking_join(
        tokio::task::spawn_blocking({
            let root = root.clone();
            move || Root::open(&root).and_then(|files| recover(&files))
        })
        .await,
    )??;
    loop {
        let Some(envelope) = next_envelope(conn).await else {
            return Ok(());
        };
        match envelope?.message {
            Message::SyncManifestRequest => {
                let (root, index) = (root.clone(), index.clone());
                let entries = blocking_join(
                    tokio::task::spawn_blocking(move || scan_manifest(&root, &index)).await,
                )??;
                send_manifest(conn, generation, entries).await?;
            }
            Message::SyncManifestDigests { dirs, last } => {
                // Scan while the rest of the receiver's digests arrive.
                let scanning = {
                    let (root, index) = (root.clone(), index.clone());
                    tokio::task::spawn_blocking(move || scan_manifest(&root, &index))
                };
                let theirs = receive_digests(conn, dirs, last).await;
                // The scan is awaited whatever happened, so it never outlives this session.
                let entries = blocking_join(scanning.await)??;
                let theirs = theirs?;
                let same: std::collections::BTreeSet<Option<RelPath>> = listing_digests(&entries)
                    .into_iter()
                    .filter(|(dir, digest)| theirs.get(dir) == Some(digest))
                    .map(|(dir, _)| dir)
                    .collect();
                send_same(conn, generation, &same).await?;
                let same = SameDirs::from_iter(same);
                let rest = entries
                    .into_iter()
                    .filter(|entry| !same.holds(&entry.path))
                    .collect();
                send_manifest(conn, generation, rest).await?;
            }
            Message::SyncFetch { path } => send_file(conn, generation, &files, path).await?,
            Message::SyncFetchDelta { path, signature } => {
                send_delta(conn, generation, &files, path, signature).await?;
            }
            Message::SyncFetchChanges {
                path,
                block_size,
                blocks,
                last,
            } => {
                // Only as many values as our own version has blocks are of any use: keeping no
                // more bounds memory by our file, not by what the peer sends.
                let useful = {
                    let index = index
                        .lock()
                        .map_err(|_| SessionError::Internal("index lock poisoned".into()))?;
                    index.get(&path)?.map_or(0, |entry| {
                        entry.meta.size.div_ceil(u64::from(block_size.max(1))) as usize
                    })
                };
                let mut theirs = Vec::new();
                let mut covered = 0u64;
                let mut keep = |part: Vec<BlockSum>| {
                    for sum in part {
                        if covered >= useful as u64 {
                            break;
                        }
                        covered += sum.blocks();
                        theirs.push(sum);
                    }
                };
                keep(blocks);
                let mut done = last;
                while !done {
                    match receive(conn, "a block list").await? {
                        Message::SyncFetchChanges {
                            path: more_path,
                            blocks,
                            last,
                            ..
                        } if more_path == path => {
                            keep(blocks);
                            done = last;
                        }
                        other => {
                            return Err(SessionError::unexpected(&other, "a block list"));
                        }
                    }
                }
                send_changes(conn, generation, &files, &index, path, block_size, theirs).await?;
            }
            Message::Heartbeat { seq, .. } => {
                send(
                    conn,
                    generation,
                    Message::HeartbeatAck {
                        seq,
                        role: Role::Primary,
                    },
                )
                .await?;
            }
            Message::Goodbye { .. } => return Ok(()),
            other => {
                return Err(SessionError::unexpected(&other, "serving"));
            }
        }
    }
}

async fn send_manifest<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    generation: Generation,
    entries: Vec<ManifestEntry>,
) -> Result<(), SessionError> {
    let mut chunk = Vec::new();
    let mut bytes = 0;
    for entry in entries {
        bytes += 64 + entry.path.as_bytes().len() + entry.meta.owner.len() + entry.meta.group.len();
        if let lbs_protocol::sync::ManifestKind::Symlink { target } = &entry.kind {
            bytes += target.len();
        }
        chunk.push(entry);
        if bytes >= MANIFEST_CHUNK_BYTES {
            let entries = std::mem::take(&mut chunk);
            send(
                conn,
                generation,
                Message::SyncManifest {
                    entries,
                    last: false,
                },
            )
            .await?;
            bytes = 0;
        }
    }
    send(
        conn,
        generation,
        Message::SyncManifest {
            entries: chunk,
            last: true,
        },
    )
    .await
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

/// The receiver's half of the manifest exchange: our listing digests out (from `before`,
/// our index as it was before this pass's scan), the sender's differing entries in, and the
/// sender's full manifest back, unchanged directories filled in from `before`.
async fn exchange_manifests<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    generation: Generation,
    before: tokio::sync::oneshot::Receiver<Vec<ManifestEntry>>,
) -> Result<Vec<ManifestEntry>, SessionError> {
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
        match receive(conn, "the manifest").await? {
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
    // The unchanged directories' entries are ours, as they were when we sent the digests.
    entries.extend(before.into_iter().filter(|entry| same.holds(&entry.path)));
    if entries.len() > MAX_MANIFEST_ENTRIES {
        return Err(SessionError::ManifestTooLarge);
    }
    Ok(entries)
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

/// Sends the digests of this side's directory listings (see [`listing_digests`]).
async fn send_digests<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    generation: Generation,
    entries: &[ManifestEntry],
) -> Result<(), SessionError> {
    let digests: Vec<DirDigest> = listing_digests(entries)
        .into_iter()
        .map(|(dir, digest)| DirDigest { dir, digest })
        .collect();
    let parts = parts(digests, |d| {
        48 + d.dir.as_ref().map_or(0, |p| p.as_bytes().len())
    });
    let count = parts.len();
    for (i, dirs) in parts.into_iter().enumerate() {
        let last = i + 1 == count;
        send(
            conn,
            generation,
            Message::SyncManifestDigests { dirs, last },
        )
        .await?;
    }
    Ok(())
}

/// Tells the receiver which directories' listings it already has.
async fn send_same<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    generation: Generation,
    same: &std::collections::BTreeSet<Option<RelPath>>,
) -> Result<(), SessionError> {
    let same: Vec<Option<RelPath>> = same.iter().cloned().collect();
    let parts = parts(same, |d| 16 + d.as_ref().map_or(0, |p| p.as_bytes().len()));
    let count = parts.len();
    for (i, dirs) in parts.into_iter().enumerate() {
        let last = i + 1 == count;
        send(conn, generation, Message::SyncManifestSame { dirs, last }).await?;
    }
    Ok(())
}

/// Sends the blocks of `path` whose values differ from the receiver's (`theirs`), and the
/// tail past the receiver's length; falls back to the whole file when the sender's index has
/// no block values of that size for it.
async fn send_changes<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    generation: Generation,
    files: &Root,
    index: &Arc<Mutex<Index>>,
    path: RelPath,
    block_size: u32,
    theirs: Vec<BlockSum>,
) -> Result<(), SessionError> {
    let ours = {
        let index = index
            .lock()
            .map_err(|_| SessionError::Internal("index lock poisoned".into()))?;
        match (index.get(&path)?, index.blocks(&path)?) {
            (Some(entry), Some((size, blocks))) if size.get() == u64::from(block_size) => entry
                .hash
                .map(|hash| (entry.meta.size, hash.root, size, blocks)),
            _ => None,
        }
    };
    let Some((len, root_hash, size, blocks)) = ours else {
        return send_file(conn, generation, files, path).await;
    };
    let file = match files.open_file(&path) {
        Ok(file) => Arc::new(file),
        Err(err) => {
            let reason = err.to_string();
            return send(conn, generation, Message::SyncUnavailable { path, reason }).await;
        }
    };
    let ranges = changed_ranges(&blocks, &theirs, size, len);
    let changed = ranges.iter().map(|(start, end)| end - start).sum();
    send(
        conn,
        generation,
        Message::SyncChanges { changed, size: len },
    )
    .await?;
    for (start, end) in ranges {
        let mut at = start;
        while at < end {
            let n = (end - at).min(SYNC_CHUNK_LEN as u64) as usize;
            let reader = file.clone();
            let read = tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                let mut bytes = vec![0u8; n];
                reader.read_exact_at(&mut bytes, at).map(|()| bytes)
            })
            .await;
            match blocking_join(read)? {
                Ok(bytes) => {
                    feed(conn, generation, Message::SyncDataAt { offset: at, bytes }).await?;
                }
                Err(err) => {
                    let reason = format!("reading at {at} failed: {err}");
                    return send(conn, generation, Message::SyncUnavailable { path, reason }).await;
                }
            }
            at += n as u64;
        }
    }
    send(
        conn,
        generation,
        Message::SyncDataEnd {
            size: len,
            blake3: root_hash,
        },
    )
    .await
}

/// The byte ranges of a `len`-byte file whose blocks (`ours`) differ from what the receiver
/// summarised (`theirs`), adjacent blocks merged.
fn changed_ranges(
    ours: &[Cv],
    theirs: &[BlockSum],
    block_size: BlockSize,
    len: u64,
) -> Vec<(u64, u64)> {
    let mut same = vec![false; ours.len()];
    let mut at = 0usize;
    for sum in theirs {
        let count = sum.blocks() as usize;
        let end = at.saturating_add(count);
        if end > ours.len() {
            break;
        }
        let matches = match sum {
            BlockSum::One(prefix) => ours[at][..8] == prefix[..],
            BlockSum::Group { digest, .. } => group_digest(&ours[at..end]) == *digest,
        };
        if matches {
            same[at..end].fill(true);
        }
        at = end;
    }
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for (idx, unchanged) in same.iter().enumerate() {
        if *unchanged {
            continue;
        }
        let start = idx as u64 * block_size.get();
        let end = (start + block_size.get()).min(len);
        match ranges.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => ranges.push((start, end)),
        }
    }
    ranges
}

/// Blocks per group where a file's middle is summarised coarsely (256 KiB at 16 KiB blocks:
/// a 1 GiB file's summary is about 50 KiB instead of 2 MiB, and a change in its middle costs
/// at most one group).
const GROUP_BLOCKS: usize = 16;
/// Blocks at each end of such a file still summarised one by one (a WAV header, a tail).
const EDGE_BLOCKS: usize = 4;

/// What the receiver sends about its blocks (`ours`) when asking for a file that will be
/// `new_len` bytes: one summary per block when the block count stays (in-place rewrites
/// anywhere), otherwise one per block only at the ends and one per group in between (the
/// file grew or shrank: its middle is most likely unchanged).
fn block_sums(ours: &[Cv], block_size: BlockSize, new_len: u64) -> Vec<BlockSum> {
    if block_size.blocks_for(new_len) == ours.len() as u64 || ours.len() <= 2 * EDGE_BLOCKS {
        return ours.iter().map(BlockSum::one).collect();
    }
    let middle_end = ours.len() - EDGE_BLOCKS;
    let mut sums: Vec<BlockSum> = ours[..EDGE_BLOCKS].iter().map(BlockSum::one).collect();
    for group in ours[EDGE_BLOCKS..middle_end].chunks(GROUP_BLOCKS) {
        sums.push(BlockSum::Group {
            count: group.len() as u32,
            digest: group_digest(group),
        });
    }
    sums.extend(ours[middle_end..].iter().map(BlockSum::one));
    sums
}

/// Sends a small file as a delta against the receiver's version (its `signature`), or whole
/// when the signature is unusable, the delta would not be smaller, or the file is not small.
/// The hash sent is of exactly the bytes the delta was made from.
async fn send_delta<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    generation: Generation,
    files: &Root,
    path: RelPath,
    signature: Vec<u8>,
) -> Result<(), SessionError> {
    let file = match files.open_file(&path) {
        Ok(file) => file,
        Err(err) => {
            let reason = err.to_string();
            return send(conn, generation, Message::SyncUnavailable { path, reason }).await;
        }
    };
    let made = tokio::task::spawn_blocking(move || {
        let mut data = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(file, crate::delta::DELTA_MAX_FILE + 1),
            &mut data,
        )
        .map(|_| data)
        .map(|data| {
            let small = data.len() as u64 <= crate::delta::DELTA_MAX_FILE;
            let delta = small
                .then(|| crate::delta::delta_for(signature, &data))
                .flatten();
            (small, data, delta)
        })
    })
    .await;
    let (data, delta) = match blocking_join(made)? {
        Ok((true, data, delta)) => (data, delta),
        // It grew past the delta limit since it was listed: stream it whole.
        Ok((false, ..)) => return send_file(conn, generation, files, path).await,
        Err(err) => {
            let reason = format!("reading failed: {err}");
            return send(conn, generation, Message::SyncUnavailable { path, reason }).await;
        }
    };
    match delta {
        Some(delta) => {
            for part in delta.chunks(SYNC_CHUNK_LEN) {
                let bytes = part.to_vec();
                feed(conn, generation, Message::SyncDelta { bytes }).await?;
            }
        }
        None => {
            for part in data.chunks(SYNC_CHUNK_LEN) {
                let bytes = part.to_vec();
                feed(conn, generation, Message::SyncData { bytes }).await?;
            }
        }
    }
    send(
        conn,
        generation,
        Message::SyncDataEnd {
            size: data.len() as u64,
            blake3: *blake3::hash(&data).as_bytes(),
        },
    )
    .await
}

/// Streams one file, hashing exactly the bytes sent.
async fn send_file<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    generation: Generation,
    files: &Root,
    path: RelPath,
) -> Result<(), SessionError> {
    let file = match files.open_file(&path) {
        Ok(file) => file,
        Err(err) => {
            let reason = err.to_string();
            return send(conn, generation, Message::SyncUnavailable { path, reason }).await;
        }
    };
    let mut file = tokio::fs::File::from_std(file);
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    loop {
        let mut bytes = vec![0u8; SYNC_CHUNK_LEN];
        let n = match file.read(&mut bytes).await {
            Ok(n) => n,
            Err(err) => {
                let reason = format!("reading failed after {size} bytes: {err}");
                return send(conn, generation, Message::SyncUnavailable { path, reason }).await;
            }
        };
        if n == 0 {
            break;
        }
        bytes.truncate(n);
        hasher.update(&bytes);
        size += n as u64;
        feed(conn, generation, Message::SyncData { bytes }).await?;
    }
    let blake3 = *hasher.finalize().as_bytes();
    feed(conn, generation, Message::SyncDataEnd { size, blake3 }).await
}

/// What crosses from the network to the thread writing a file.
enum Chunk {
    /// The next bytes of a whole-file transfer.
    Data(Vec<u8>),
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
    Blocks(BlockSize, Vec<Cv>),
    /// A delta against the version with this signature.
    Delta(Vec<u8>),
}

impl Ask {
    fn from_basis(basis: Option<(BlockSize, Vec<Cv>)>) -> Ask {
        match basis {
            Some((block_size, blocks)) if !blocks.is_empty() => Ask::Blocks(block_size, blocks),
            _ => Ask::Whole,
        }
    }
}

/// The receiver's fetcher: asks the async side for a file and hands what arrives to the
/// writing side's sink.
struct Bridge {
    requests: mpsc::Sender<Request>,
}

impl Fetcher for Bridge {
    fn fetch(
        &mut self,
        path: &RelPath,
        size: u64,
        basis: Option<(BlockSize, Vec<Cv>)>,
        sink: &mut dyn Sink,
    ) -> std::io::Result<u64> {
        self.ask(path, size, Ask::from_basis(basis), sink)
    }

    fn fetch_delta(
        &mut self,
        path: &RelPath,
        size: u64,
        signature: Vec<u8>,
        sink: &mut dyn Sink,
    ) -> std::io::Result<u64> {
        self.ask(path, size, Ask::Delta(signature), sink)
    }
}

impl Bridge {
    fn ask(
        &mut self,
        path: &RelPath,
        size: u64,
        ask: Ask,
        sink: &mut dyn Sink,
    ) -> std::io::Result<u64> {
        let (tx, mut rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
        self.requests
            .blocking_send((path.clone(), size, ask, tx))
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "the sync connection is gone",
                )
            })?;
        // Returning early drops `rx`: the async side then drains the rest of the transfer.
        while let Some(chunk) = rx.blocking_recv() {
            match chunk {
                Chunk::Data(bytes) => sink.data(&bytes)?,
                Chunk::Changes(changed, size) => sink.changes(changed, size)?,
                Chunk::At(offset, bytes) => sink.at(offset, &bytes)?,
                Chunk::Delta(bytes) => sink.delta(&bytes)?,
                Chunk::End(size) => return Ok(size),
                Chunk::Failed(reason) => return Err(std::io::Error::other(reason)),
                Chunk::Aborted(reason) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        reason,
                    ));
                }
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "the sync connection is gone",
        ))
    }
}

/// How a pull runs.
#[derive(Debug)]
pub struct PullOptions {
    /// Updated after every step of the plan, and as file data arrives.
    pub progress: Option<tokio::sync::watch::Sender<Progress>>,
    /// When changes reach the disk; [`Durability::Grouped`] unless set.
    pub durability: Durability,
    /// Cancelling it stops the pull at the next chunk: completed files stay, the file in
    /// transfer is kept to resume from, and the pull ends with [`SessionError::Cancelled`].
    pub cancel: Option<tokio_util::sync::CancellationToken>,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            progress: None,
            durability: Durability::Grouped,
            cancel: None,
        }
    }
}

/// Makes the tree at `root` equal to the sender's, over `conn`.
///
/// The caller must make sure no other pull writes to `root` at the same time (the `lbs`
/// binary holds a lock per root): temporary files left by an interrupted pull are removed.
pub async fn pull<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    root: &Path,
    index: Arc<Mutex<Index>>,
    trash: &Trash,
    generation: Generation,
    options: PullOptions,
) -> Result<PullReport, SessionError> {
    let PullOptions {
        progress,
        durability,
        cancel,
    } = options;
    let started = Instant::now();
    // A crash in the middle of a patch is finished (or undone) before anything looks at
    // the tree.
    let files = Root::open(root)?.with_durability(durability);
    let recovery = blocking_join(
        tokio::task::spawn_blocking({
            let root = root.to_owned();
            move || Root::open(&root).and_then(|files| recover(&files))
        })
        .await,
    )??;
    let scan_root = root.to_owned();
    let scan_index = index.clone();
    // What this side held before its scan: the sender leaves out directories whose listing
    // matches, and their entries come from here.
    let (before_tx, before_rx) = tokio::sync::oneshot::channel();
    let own_scan = tokio::task::spawn_blocking(move || -> Result<_, SessionError> {
        let mut index = scan_index
            .lock()
            .map_err(|_| SessionError::Internal("index lock poisoned".into()))?;
        let known = index.take_entries()?;
        let _ = before_tx.send(known.iter().cloned().map(manifest_entry).collect());
        let options = ScanOptions {
            remove_stale_temps: true,
            ..ScanOptions::default()
        };
        Ok(scan_from(&scan_root, &mut index, &options, known)?)
    });

    let manifest_started = Instant::now();
    let exchanged = exchange_manifests(conn, generation, before_rx).await;
    // Our scan is awaited whatever happened, so it never outlives the pull; its own error,
    // if any, says best what went wrong.
    let scanned = blocking_join(own_scan.await)?;
    let (scan_report, have) = scanned?;
    let entries = exchanged?;
    let manifest_time = manifest_started.elapsed();
    let plan = plan(&entries, &have)?;
    drop(entries);
    // Partials of versions the sender no longer has are of no use any more.
    let wanted: std::collections::BTreeSet<RelPath> = plan
        .actions
        .iter()
        .filter_map(|action| match action {
            Action::Fetch { path, blake3, .. } => {
                let name = crate::apply::partial_name(&blake3::Hash::from(*blake3));
                match path.parent() {
                    Some(dir) => dir.join(std::ffi::OsStr::new(&name)).ok(),
                    None => RelPath::from_bytes(name.into_bytes()).ok(),
                }
            }
            _ => None,
        })
        .collect();
    for stale in scan_report.partials.iter().filter(|p| !wanted.contains(*p)) {
        files.remove_own_file(stale);
    }
    let files = if scan_report.partials.is_empty() {
        files.without_partials()
    } else {
        files
    };

    // Every fetch the plan will make, in its order, so requests can run ahead of the writer.
    let planned = {
        let index = index.clone();
        let fetches: Vec<(RelPath, u64, bool)> = plan
            .actions
            .iter()
            .filter_map(|action| match action {
                Action::Fetch {
                    path, size, basis, ..
                } => Some((path.clone(), *size, *basis == Basis::Existing)),
                _ => None,
            })
            .collect();
        blocking_join(
            tokio::task::spawn_blocking(move || -> Result<_, SessionError> {
                let index = index
                    .lock()
                    .map_err(|_| SessionError::Internal("index lock poisoned".into()))?;
                let mut planned = VecDeque::with_capacity(fetches.len());
                for (path, size, existing) in fetches {
                    let known = if existing { index.known(&path)? } else { None };
                    let delta = known
                        .as_ref()
                        .is_some_and(|k| crate::delta::wants_delta(k.meta.size, size));
                    // Large files are not asked for ahead: their block lists would make this
                    // list grow with the data, and their transfer dwarfs a round trip.
                    let small = known
                        .as_ref()
                        .is_none_or(|k| k.blocks.len() <= AHEAD_MAX_BLOCKS);
                    let ask = if small {
                        Ask::from_basis(known.map(|k| (k.block_size, k.blocks)))
                    } else {
                        Ask::Whole
                    };
                    planned.push_back(Planned {
                        path,
                        size,
                        ask,
                        ahead: !delta && small,
                    });
                }
                Ok(planned)
            })
            .await,
        )??
    };
    let (requests, mut incoming) = mpsc::channel(1);
    // A batch only for a pass that trashes: a quiet day's passes leave no empty directories.
    let batch = if plan.trashes() {
        Some(trash.batch()?)
    } else {
        None
    };
    let summary = plan.summary;
    let worker_index = index.clone();
    let progress_tx = progress.clone();
    let worker = tokio::task::spawn_blocking(move || {
        let old_blocks = |path: &RelPath| worker_index.lock().ok()?.known(path).ok().flatten();
        let mut on_progress = |now: &Progress| {
            if let Some(progress) = &progress {
                progress.send_replace(*now);
            }
        };
        execute(
            &plan,
            &files,
            batch.as_ref(),
            &mut Bridge { requests },
            &old_blocks,
            &mut on_progress,
        )
    });
    let mut connection_error = None;
    let mut pipeline = Pipeline {
        upcoming: planned,
        ahead: VecDeque::new(),
    };
    while let Some((path, size, ask, chunks)) = incoming.recv().await {
        if let Some(err) = &connection_error {
            let _ = chunks.send(Chunk::Aborted(format!("{err}"))).await;
            continue;
        }
        let relayed = async {
            pipeline.ready(conn, generation, path, size, ask).await?;
            forward(conn, &chunks, progress_tx.as_ref()).await?;
            pipeline.top_up(conn, generation).await
        };
        let outcome = match &cancel {
            Some(token) => tokio::select! {
                outcome = relayed => outcome,
                () = token.cancelled() => Err(SessionError::Cancelled),
            },
            None => relayed.await,
        };
        if let Err(err) = outcome {
            let _ = chunks.send(Chunk::Aborted(err.to_string())).await;
            connection_error = Some(err);
        }
    }
    let executed = blocking_join(worker.await)?;
    // A lost connection or a cancellation explains the writer's interruption best.
    if let Some(err) = connection_error.take() {
        return Err(err);
    }
    let mut executed = executed?;
    // What was just written is known: record it so the next pass does not read it again.
    let installed = std::mem::take(&mut executed.installed);
    let record_root = root.to_owned();
    blocking_join(
        tokio::task::spawn_blocking(move || -> Result<u64, SessionError> {
            let mut index = index
                .lock()
                .map_err(|_| SessionError::Internal("index lock poisoned".into()))?;
            Ok(crate::scan::record_installed(
                &record_root,
                &mut index,
                &installed,
            )?)
        })
        .await,
    )??;
    if let Some(err) = connection_error {
        return Err(err);
    }
    Ok(PullReport {
        scan: scan_report,
        plan: summary,
        executed,
        manifest_time,
        elapsed: started.elapsed(),
        recovery: (recovery != Recovery::Clean).then_some(recovery),
    })
}

/// A fetch the plan will make: which file, how large on the sender, and the receiver's
/// block values when it holds an older version.
#[derive(Debug)]
struct Planned {
    path: RelPath,
    size: u64,
    ask: Ask,
    /// Whether it may be asked for ahead of the writer (not a delta, whose signature comes
    /// from the writer, nor a large file: then `ask` is not kept).
    ahead: bool,
}

impl Planned {
    /// Roughly how many bytes its request takes on the wire.
    fn request_bytes(&self) -> usize {
        64 + self.path.as_bytes().len()
            + match &self.ask {
                Ask::Whole => 0,
                Ask::Blocks(_, blocks) => blocks.len() * 10,
                Ask::Delta(signature) => signature.len(),
            }
    }
}

/// While the writer stores one file, the next files' requests are already with the sender:
/// a tree of small files then costs one round trip, not one per file.
///
/// The sender answers requests strictly in order. Requests only run ahead while their total
/// stays small ([`AHEAD_REQUEST_BYTES`]), so they always fit in the socket buffers and the
/// sender never waits on us to read while we wait on it to read.
struct Pipeline {
    /// Fetches not requested yet, in plan order.
    upcoming: VecDeque<Planned>,
    /// Requested, answers not read yet, in order.
    ahead: VecDeque<Planned>,
}

/// Files with more blocks than this (1 MiB at 16 KiB) are asked for by the writer itself.
const AHEAD_MAX_BLOCKS: usize = 64;
/// At most this many requests run ahead of the writer.
const AHEAD_FILES: usize = 64;
/// At most this many bytes of files are requested ahead of the writer.
const AHEAD_BYTES: u64 = 16 << 20;
/// At most this many bytes of requests are outstanding while an answer is being read.
const AHEAD_REQUEST_BYTES: usize = 32 * 1024;

impl Pipeline {
    /// Makes the next answer on the connection the one for `path`: answers to requests the
    /// writer skipped are read and dropped; a request outside the plan's order (a fallback)
    /// goes out after the outstanding ones are drained and put back in line.
    async fn ready<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Connection<S>,
        generation: Generation,
        path: RelPath,
        size: u64,
        ask: Ask,
    ) -> Result<(), SessionError> {
        if let Some(at) = self.ahead.iter().position(|p| p.path == path) {
            // The writer skipped the ones before it (their steps failed early).
            for _ in 0..at {
                self.ahead.pop_front();
                discard(conn).await?;
            }
            self.ahead.pop_front();
            return Ok(());
        }
        if let Some(at) = self.upcoming.iter().position(|p| p.path == path) {
            // Skipped too, everything requested and everything planned before it.
            while self.ahead.pop_front().is_some() {
                discard(conn).await?;
            }
            self.upcoming.drain(..=at);
        } else {
            // Not in the plan's line: the answers in flight are dropped and asked again later.
            while let Some(back) = self.ahead.pop_back() {
                discard(conn).await?;
                self.upcoming.push_front(back);
            }
        }
        request(conn, generation, path, size, ask).await
    }

    /// Sends the next planned requests, within the limits. Requests go out in batches (once
    /// half of what runs ahead is answered), so they share TLS records and write calls.
    async fn top_up<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Connection<S>,
        generation: Generation,
    ) -> Result<(), SessionError> {
        let mut files: u64 = self.ahead.iter().map(|p| p.size).sum();
        let mut requests: usize = self.ahead.iter().map(Planned::request_bytes).sum();
        if self.ahead.len() > AHEAD_FILES / 2
            || files > AHEAD_BYTES / 2
            || requests > AHEAD_REQUEST_BYTES / 2
        {
            // The sender has plenty to do still.
            return Ok(());
        }
        let before = self.ahead.len();
        while let Some(next) = self.upcoming.front() {
            if !next.ahead {
                // Its request is the writer's to make; nothing goes past it.
                break;
            }
            let fits = self.ahead.is_empty()
                || (self.ahead.len() < AHEAD_FILES
                    && files + next.size <= AHEAD_BYTES
                    && requests + next.request_bytes() <= AHEAD_REQUEST_BYTES);
            if !fits {
                break;
            }
            let Some(next) = self.upcoming.pop_front() else {
                break;
            };
            files += next.size;
            requests += next.request_bytes();
            request(
                conn,
                generation,
                next.path.clone(),
                next.size,
                next.ask.clone(),
            )
            .await?;
            self.ahead.push_back(next);
        }
        if self.ahead.len() > before {
            // Out now: the writer may take a while before it asks for the next answer.
            conn.flush().await?;
        }
        Ok(())
    }
}

/// Asks the sender for one file: whole, its changes against the receiver's blocks, or a delta.
async fn request<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    generation: Generation,
    path: RelPath,
    size: u64,
    ask: Ask,
) -> Result<(), SessionError> {
    let (block_size, blocks) = match ask {
        Ask::Whole => return feed(conn, generation, Message::SyncFetch { path }).await,
        Ask::Delta(signature) => {
            return send(
                conn,
                generation,
                Message::SyncFetchDelta { path, signature },
            )
            .await;
        }
        Ask::Blocks(block_size, blocks) => (block_size, blocks),
    };
    let sums = block_sums(&blocks, block_size, size);
    let mut parts = sums.chunks(BLOCKS_PER_FRAME).peekable();
    while let Some(part) = parts.next() {
        let last = parts.peek().is_none();
        feed(
            conn,
            generation,
            Message::SyncFetchChanges {
                path: path.clone(),
                block_size: block_size.get() as u32,
                blocks: part.to_vec(),
                last,
            },
        )
        .await?;
    }
    Ok(())
}

/// Reads one answer to its end and drops it.
async fn discard<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
) -> Result<(), SessionError> {
    loop {
        match receive(conn, "a file transfer").await? {
            Message::SyncData { .. }
            | Message::SyncDataAt { .. }
            | Message::SyncChanges { .. }
            | Message::SyncDelta { .. } => {}
            Message::SyncDataEnd { .. } | Message::SyncUnavailable { .. } => return Ok(()),
            other => {
                return Err(SessionError::unexpected(&other, "a file transfer"));
            }
        }
    }
}

/// Reads one answer and hands its chunks to the writing thread.
async fn forward<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    chunks: &mpsc::Sender<Chunk>,
    progress: Option<&tokio::sync::watch::Sender<Progress>>,
) -> Result<(), SessionError> {
    loop {
        let chunk = match receive(conn, "a file transfer").await? {
            Message::SyncData { bytes } => {
                if let Some(progress) = progress {
                    progress.send_modify(|p| p.current_bytes += bytes.len() as u64);
                }
                Chunk::Data(bytes)
            }
            Message::SyncDataAt { offset, bytes } => {
                if let Some(progress) = progress {
                    progress.send_modify(|p| p.current_bytes = offset + bytes.len() as u64);
                }
                Chunk::At(offset, bytes)
            }
            Message::SyncChanges { changed, size } => Chunk::Changes(changed, size),
            Message::SyncDelta { bytes } => {
                if let Some(progress) = progress {
                    progress.send_modify(|p| p.current_bytes += bytes.len() as u64);
                }
                Chunk::Delta(bytes)
            }
            // The writer verifies the content against the manifest's hash itself.
            Message::SyncDataEnd { size, .. } => Chunk::End(size),
            Message::SyncUnavailable { path, reason } => {
                Chunk::Failed(format!("the sender could not send {path}: {reason}"))
            }
            other => {
                return Err(SessionError::unexpected(&other, "a file transfer"));
            }
        };
        let done = matches!(chunk, Chunk::End(_) | Chunk::Failed(_));
        // The writer gave up on this file (an error on its side): drain the rest regardless.
        let _ = chunks.send(chunk).await;
        if done {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_is_bounded_by_bytes_and_every_size_it_announces() {
        let entry = |path: &str, kind: ManifestKind| ManifestEntry {
            path: RelPath::try_from(path).unwrap(),
            kind,
            meta: lbs_protocol::sync::FileMeta {
                mode: 0o644,
                owner: "asterisk".into(),
                group: "asterisk".into(),
                mtime_ns: 0,
            },
        };
        let mut intake = Intake::default();
        let huge = entry(
            "rec.wav",
            ManifestKind::File {
                size: 1 << 63,
                blake3: [0; 32],
            },
        );
        let err = intake.manifest(&[huge]).unwrap_err();
        assert!(matches!(err, SessionError::Unreasonable(_)), "{err}");
        assert!(err.to_string().contains("rec.wav announced at"), "{err}");
        // Few entries, but a gigabyte of link targets: refused by bytes.
        let target = vec![b'x'; 64 << 20];
        let links: Vec<ManifestEntry> = (0..17)
            .map(|i| {
                entry(
                    &format!("link{i}"),
                    ManifestKind::Symlink {
                        target: target.clone(),
                    },
                )
            })
            .collect();
        let mut intake = Intake::default();
        assert!(matches!(
            intake.manifest(&links),
            Err(SessionError::ManifestTooLarge)
        ));
        // A real tree passes.
        let mut intake = Intake::default();
        let file = entry(
            "msg0001.wav",
            ManifestKind::File {
                size: 1 << 30,
                blake3: [0; 32],
            },
        );
        intake.manifest(&[file]).unwrap();
    }

    fn cvs(n: usize, seed: u8) -> Vec<Cv> {
        (0..n)
            .map(|i| *blake3::hash(&[seed, i as u8, (i >> 8) as u8]).as_bytes())
            .collect()
    }

    /// A sender that answers every whole-file request, in order, with the path as content.
    fn echo_sender(
        mut conn: Connection<tokio::io::DuplexStream>,
    ) -> tokio::task::JoinHandle<Vec<String>> {
        tokio::spawn(async move {
            let mut asked = Vec::new();
            while let Some(Ok(envelope)) = conn.next().await {
                let Message::SyncFetch { path } = envelope.message else {
                    break;
                };
                asked.push(path.to_string());
                let bytes = path.as_bytes().to_vec();
                let size = bytes.len() as u64;
                let blake3 = *blake3::hash(&bytes).as_bytes();
                for message in [
                    Message::SyncData { bytes },
                    Message::SyncDataEnd { size, blake3 },
                ] {
                    let envelope = Envelope {
                        generation: Generation(1),
                        message,
                    };
                    if conn.send(envelope).await.is_err() {
                        return asked;
                    }
                }
            }
            asked
        })
    }

    async fn content(conn: &mut Connection<tokio::io::DuplexStream>) -> Vec<u8> {
        let (tx, mut rx) = mpsc::channel(8);
        forward(conn, &tx, None).await.unwrap();
        drop(tx);
        let mut out = Vec::new();
        while let Some(chunk) = rx.recv().await {
            if let Chunk::Data(bytes) = chunk {
                out.extend(bytes);
            }
        }
        out
    }

    #[tokio::test]
    async fn answers_the_writer_skipped_are_dropped_and_a_fallback_waits_its_turn() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut conn = tokio_util::codec::Framed::new(a, lbs_protocol::FrameCodec::new());
        let sender = echo_sender(tokio_util::codec::Framed::new(
            b,
            lbs_protocol::FrameCodec::new(),
        ));
        let rel = |p: &str| RelPath::try_from(p).unwrap();
        let upcoming = ["a", "b", "c", "d"]
            .into_iter()
            .map(|p| Planned {
                path: rel(p),
                size: 1,
                ask: Ask::Whole,
                ahead: true,
            })
            .collect();
        let mut pipeline = Pipeline {
            upcoming,
            ahead: VecDeque::new(),
        };
        let generation = Generation(1);
        pipeline
            .ready(&mut conn, generation, rel("a"), 1, Ask::Whole)
            .await
            .unwrap();
        assert_eq!(content(&mut conn).await, b"a");
        // b, c and d are asked for while "a" is being stored.
        pipeline.top_up(&mut conn, generation).await.unwrap();
        assert_eq!(pipeline.ahead.len(), 3);
        // The writer skips b (its step failed before fetching): b's answer is dropped.
        pipeline
            .ready(&mut conn, generation, rel("c"), 1, Ask::Whole)
            .await
            .unwrap();
        assert_eq!(content(&mut conn).await, b"c");
        // A fallback fetch of "a" (a local copy that did not verify): d's answer in flight is
        // dropped and d goes back in line, asked again on the next top-up.
        pipeline
            .ready(&mut conn, generation, rel("a"), 1, Ask::Whole)
            .await
            .unwrap();
        assert_eq!(content(&mut conn).await, b"a");
        pipeline.top_up(&mut conn, generation).await.unwrap();
        pipeline
            .ready(&mut conn, generation, rel("d"), 1, Ask::Whole)
            .await
            .unwrap();
        assert_eq!(content(&mut conn).await, b"d");
        drop(conn);
        let asked = sender.await.unwrap();
        assert_eq!(asked, ["a", "b", "c", "d", "a", "d"]);
    }

    #[test]
    fn summaries_find_exactly_the_changed_blocks_of_a_same_size_file() {
        let bs = BlockSize::DEFAULT;
        let theirs = cvs(300, 1);
        let mut ours = theirs.clone();
        ours[7] = [9; 32];
        ours[250] = [9; 32];
        let len = 300 * bs.get();
        let sums = block_sums(&theirs, bs, len);
        assert!(sums.iter().all(|s| matches!(s, BlockSum::One(_))));
        let ranges = changed_ranges(&ours, &sums, bs, len);
        assert_eq!(
            ranges,
            vec![
                (7 * bs.get(), 8 * bs.get()),
                (250 * bs.get(), 251 * bs.get())
            ]
        );
    }

    #[test]
    fn a_grown_file_is_summarised_coarsely_in_the_middle_and_finely_at_the_ends() {
        let bs = BlockSize::DEFAULT;
        let theirs = cvs(1000, 2);
        // Header rewritten, last block changed, 40 blocks appended.
        let mut ours = theirs.clone();
        ours[0] = [1; 32];
        ours[999] = [2; 32];
        ours.extend(cvs(40, 3));
        let len = 1040 * bs.get();
        let sums = block_sums(&theirs, bs, len);
        assert!(sums.len() < 80, "{} summaries for 1000 blocks", sums.len());
        let ranges = changed_ranges(&ours, &sums, bs, len);
        assert_eq!(
            ranges,
            vec![(0, bs.get()), (999 * bs.get(), 1040 * bs.get())]
        );
        // A change in the middle costs its whole group, never a wrong block.
        ours[500] = [3; 32];
        let ranges = changed_ranges(&ours, &sums, bs, len);
        let sent: u64 = ranges.iter().map(|(a, b)| b - a).sum();
        assert!(
            ranges
                .iter()
                .any(|(a, b)| *a <= 500 * bs.get() && 501 * bs.get() <= *b)
        );
        assert!(sent <= (1 + GROUP_BLOCKS as u64 + 41) * bs.get(), "{sent}");
    }
}
