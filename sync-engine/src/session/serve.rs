//! The sending side: the primary's manifest, the digests of its listings, the entries that
//! differ, and file content as changed blocks, deltas or whole.

use super::*;
use crate::tree::PART_CVS;
use whole::{send_file, send_files};

/// Serves the tree at `root` to one receiver until it says goodbye or hangs up.
/// `version` is the protocol both sides speak (from the `Hello` exchange): what an older
/// receiver cannot read is not sent to it.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    root: PathBuf,
    index: Arc<Mutex<Index>>,
    generation: Generation,
    version: ProtocolVersion,
) -> Result<(), SessionError> {
    // This box may have been a backup that stopped in the middle of a patch: finish it
    // before serving the file.
    blocking_join(
        tokio::task::spawn_blocking({
            let root = root.clone();
            move || Root::open(&root).and_then(|files| recover(&files))
        })
        .await,
    )??;
    // A pull asks for the manifest first: the scan for it starts now, while the receiver
    // opens its index and makes its listings' digests (reading the index was a fifth of the
    // receiver's CPU in a pull of 100,000 unchanged files). Changes made after the scan
    // passed a file are the next pass's, as changes made during any scan are. The scan is
    // awaited before this returns, whatever happened, so it never outlives the session.
    let mut early = Some(spawn_scan(&root, &index));
    let served = serve_requests(conn, root, index, generation, version, &mut early).await;
    if let Some(scan) = early.take() {
        let _ = scan.await;
    }
    served
}

/// A scan of `root` for a manifest, on a blocking thread.
fn spawn_scan(
    root: &Path,
    index: &Arc<Mutex<Index>>,
) -> tokio::task::JoinHandle<Result<Scanned, SessionError>> {
    let (root, index) = (root.to_owned(), index.clone());
    tokio::task::spawn_blocking(move || scan_manifest(&root, &index))
}

/// [`serve`]'s requests, the first manifest from the scan `early` started.
async fn serve_requests<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    root: PathBuf,
    index: Arc<Mutex<Index>>,
    generation: Generation,
    version: ProtocolVersion,
    early: &mut Option<tokio::task::JoinHandle<Result<Scanned, SessionError>>>,
) -> Result<(), SessionError> {
    let files = Arc::new(Root::open(&root)?);
    // Holes travel as such to a receiver that knows them (1.6), as zeros to an older one;
    // data packed only to one that unpacks it (1.11).
    let peer = whole::Reads {
        holes: version >= V1_6,
        packing: (version >= V1_11).then(Default::default),
    };
    // A message read ahead while answering a batch of fetches, handled next.
    let mut pending = None;
    loop {
        let message = match pending.take() {
            Some(message) => message,
            None => match next_request(conn, version).await? {
                Some(message) => message,
                None => return Ok(()),
            },
        };
        match message {
            Message::SyncManifestRequest => {
                let scanning = early.take().unwrap_or_else(|| spawn_scan(&root, &index));
                let scanned = saying_scanning(conn, generation, version, scanning).await?;
                let Scanned {
                    manifest,
                    skipped,
                    links,
                } = scanned;
                send_manifest(conn, generation, manifest).await?;
                send_after_manifest(conn, generation, version, skipped, links).await?;
            }
            Message::SyncManifestDigests { dirs, last } => {
                // Scan while the rest of the receiver's digests arrive.
                let scanning = early.take().unwrap_or_else(|| spawn_scan(&root, &index));
                let theirs = receive_digests(conn, dirs, last).await;
                // The scan is awaited whatever happened, so it never outlives this session.
                let Scanned {
                    manifest: entries,
                    skipped,
                    links,
                } = match &theirs {
                    Ok(_) => saying_scanning(conn, generation, version, scanning).await?,
                    Err(_) => blocking_join(scanning.await)??,
                };
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
                send_after_manifest(conn, generation, version, skipped, links).await?;
            }
            Message::SyncFetch { path } => {
                pending = send_files(conn, generation, &files, &index, path, &peer).await?;
            }
            Message::SyncFetchDelta { path, signature } => {
                let asked = (path, signature);
                send_delta(conn, generation, &files, &index, asked, &peer).await?;
            }
            Message::SyncFetchChanges {
                path,
                block_size,
                blocks,
                last,
            } => {
                // The receiver's summaries are compared frame by frame as they arrive, with
                // our blocks of that size: what this keeps grows with our file and with what
                // differs, never with what the peer sends.
                let ours = our_blocks(&index, &path, block_size)?;
                let mut differ = ours.as_ref().map(Differ::new);
                let load = |part: u64| -> Result<Option<Vec<Cv>>, SessionError> {
                    let index = index
                        .lock()
                        .map_err(|_| SessionError::Internal("index lock poisoned".into()))?;
                    Ok(index.block_part(&path, part)?)
                };
                let mut compare = |sums: &[BlockSum]| match differ.as_mut() {
                    Some(differ) => differ.feed(sums, load),
                    None => Ok(()),
                };
                compare(&blocks)?;
                let mut done = last;
                while !done {
                    match receive(conn, "a block list").await? {
                        Message::SyncFetchChanges {
                            path: more_path,
                            blocks,
                            last,
                            ..
                        } if more_path == path => {
                            compare(&blocks)?;
                            done = last;
                        }
                        other => {
                            return Err(SessionError::unexpected(&other, "a block list"));
                        }
                    }
                }
                let ranges = differ.and_then(Differ::finish);
                // Our list was read a part at a time while the summaries came: if the index
                // moved on meanwhile, the file goes whole.
                let unchanged = match &ours {
                    Some(ours) => our_blocks(&index, &path, block_size)?
                        .is_some_and(|now| now.root == ours.root && now.len == ours.len),
                    None => false,
                };
                let changes = ours.zip(ranges).filter(|_| unchanged);
                send_changes(conn, generation, &files, &index, path, changes, &peer).await?;
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
            // The receiver is at work on its side (1.13): its next request follows.
            Message::SyncWorking => {}
            other => {
                return Err(SessionError::unexpected(&other, "serving"));
            }
        }
    }
}

/// The receiver's next message (`None`: it hung up). One of protocol 1.13 says when it works
/// on its side between requests, so it is waited for within [`STALLED`]: a receiver that
/// stopped (its kernel still answers keepalive probes) does not hold its session forever.
/// An older one is waited for as long as it takes.
async fn next_request<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    version: ProtocolVersion,
) -> Result<Option<Message>, SessionError> {
    if version >= V1_13 {
        return next_while_heard(conn, "the wait for the receiver's next request").await;
    }
    next_envelope(conn)
        .await
        .map(|envelope| Ok(envelope?.message))
        .transpose()
}

/// Awaits this side's scan, telling a receiver of protocol 1.12 every
/// [`lbs_protocol::SYNC_SCANNING_EVERY`] that it is still scanning. The scan is awaited even
/// when the receiver is gone, so it never outlives the session.
pub(super) async fn saying_scanning<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    generation: Generation,
    version: ProtocolVersion,
    scanning: tokio::task::JoinHandle<Result<Scanned, SessionError>>,
) -> Result<Scanned, SessionError> {
    let notice = (version >= V1_12).then_some(Message::SyncScanning);
    saying(conn, generation, notice, scanning).await?
}

/// Tells a receiver that reads them (protocol 1.6) what this side's scan left out and which
/// of its files are hard links of each other.
async fn send_after_manifest<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    generation: Generation,
    version: ProtocolVersion,
    skipped: Vec<SkippedEntry>,
    links: Vec<Vec<RelPath>>,
) -> Result<(), SessionError> {
    if version < V1_6 {
        return Ok(());
    }
    let SenderSkipped { entries, more } = SenderSkipped::from_scan(skipped);
    feed(conn, generation, Message::SyncSkipped { entries, more }).await?;
    let size = |group: &Vec<RelPath>| group.iter().map(|p| p.as_bytes().len() + 16).sum();
    let parts = parts(links, size);
    let count = parts.len();
    for (i, groups) in parts.into_iter().enumerate() {
        let last = i + 1 == count;
        feed(conn, generation, Message::SyncLinks { groups, last }).await?;
    }
    flush(conn).await
}

pub(super) async fn send_manifest<S: AsyncRead + AsyncWrite + Unpin>(
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

/// Sends the digests of this side's directory listings (see [`listing_digests`]).
pub(super) async fn send_digests<S: AsyncRead + AsyncWrite + Unpin>(
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
pub(super) async fn send_same<S: AsyncRead + AsyncWrite + Unpin>(
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

/// Our version of a file as the index has it, in blocks of the receiver's size.
pub(super) struct Ours {
    len: u64,
    root: [u8; 32],
    block_size: BlockSize,
}

/// What the index holds for `path` in blocks of `block_size` bytes, if anything (the list
/// itself is read a part at a time, by [`Differ::feed`]).
fn our_blocks(
    index: &Arc<Mutex<Index>>,
    path: &RelPath,
    block_size: u32,
) -> Result<Option<Ours>, SessionError> {
    let index = index
        .lock()
        .map_err(|_| SessionError::Internal("index lock poisoned".into()))?;
    let Some(entry) = index.get(path)? else {
        return Ok(None);
    };
    let Some(hash) = entry.hash else {
        return Ok(None);
    };
    Ok(match index.block_size(path)? {
        Some(size) if size.get() == u64::from(block_size) => Some(Ours {
            len: entry.meta.size,
            root: hash.root,
            block_size: size,
        }),
        _ => None,
    })
}

/// Sends the byte ranges of `path` that differ from the receiver's version (`changes`: our
/// version and the ranges); the whole file when the index had no block values of the
/// receiver's size for it.
pub(super) async fn send_changes<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    generation: Generation,
    files: &Root,
    index: &Arc<Mutex<Index>>,
    path: RelPath,
    changes: Option<(Ours, Vec<(u64, u64)>)>,
    peer: &whole::Reads,
) -> Result<(), SessionError> {
    let Some((ours, ranges)) = changes else {
        return send_file(conn, generation, files, index, path, peer).await;
    };
    let (len, root_hash) = (ours.len, ours.root);
    let file = match files.open_file(&path) {
        Ok(file) => Arc::new(file),
        Err(err) => {
            let reason = err.to_string();
            return send(conn, generation, Message::SyncUnavailable { path, reason }).await;
        }
    };
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

/// Compares the receiver's summaries, in order and a frame at a time, with our blocks (read
/// a part at a time, at most two parts held), and collects the byte ranges that differ
/// (adjacent ones merged). Blocks its summaries do not cover — ours is longer, or a summary
/// runs past our end — are sent.
pub(super) struct Differ {
    block_size: BlockSize,
    len: u64,
    /// How many blocks we have.
    count: usize,
    /// Our values from block `window_start` on (a multiple of [`PART_CVS`]).
    window: Vec<Cv>,
    window_start: usize,
    /// The next block a summary describes.
    at: usize,
    /// A summary ran past our blocks: the rest is not compared.
    past_end: bool,
    /// A part of our list was missing or short: the index changed under us.
    torn: bool,
    ranges: Vec<(u64, u64)>,
}

impl Differ {
    pub(super) fn new(ours: &Ours) -> Differ {
        Differ {
            block_size: ours.block_size,
            len: ours.len,
            count: ours.block_size.blocks_for(ours.len) as usize,
            window: Vec::new(),
            window_start: 0,
            at: 0,
            past_end: false,
            torn: false,
            ranges: Vec::new(),
        }
    }

    /// Compares `sums`, the next summaries; `load` reads a part of our list.
    pub(super) fn feed<E>(
        &mut self,
        sums: &[BlockSum],
        mut load: impl FnMut(u64) -> Result<Option<Vec<Cv>>, E>,
    ) -> Result<(), E> {
        for sum in sums {
            if self.past_end || self.torn {
                return Ok(());
            }
            let start = self.at;
            let end = start.saturating_add(sum.blocks() as usize);
            if end > self.count {
                self.past_end = true;
                return Ok(());
            }
            if !self.hold(start, end, &mut load)? {
                self.torn = true;
                return Ok(());
            }
            let ours = &self.window[start - self.window_start..end - self.window_start];
            let matches = match sum {
                BlockSum::One(prefix) => ours[0][..8] == prefix[..],
                BlockSum::Group { digest, .. } => group_digest(ours) == *digest,
            };
            if !matches {
                self.changed(start, end);
            }
            self.at = end;
        }
        Ok(())
    }

    /// Makes the window hold blocks `start..end`: parts before `start` are let go, the parts
    /// up to `end` read. False if a part is missing or not as long as our length says.
    fn hold<E>(
        &mut self,
        start: usize,
        end: usize,
        load: &mut impl FnMut(u64) -> Result<Option<Vec<Cv>>, E>,
    ) -> Result<bool, E> {
        while self.window_start + PART_CVS <= start && self.window.len() >= PART_CVS {
            self.window.drain(..PART_CVS);
            self.window_start += PART_CVS;
        }
        while self.window_start + self.window.len() < end {
            let next = self.window_start + self.window.len();
            let want = (self.count - next).min(PART_CVS);
            match load((next / PART_CVS) as u64)? {
                Some(part) if part.len() == want => self.window.extend_from_slice(&part),
                _ => return Ok(false),
            }
        }
        Ok(true)
    }

    fn changed(&mut self, first: usize, end: usize) {
        if first >= end {
            return;
        }
        let bs = self.block_size.get();
        let start = first as u64 * bs;
        let stop = (end as u64 * bs).min(self.len);
        match self.ranges.last_mut() {
            Some(last) if last.1 == start => last.1 = stop,
            _ => self.ranges.push((start, stop)),
        }
    }

    /// The ranges to send; `None` if our list turned out torn (send the file whole).
    pub(super) fn finish(mut self) -> Option<Vec<(u64, u64)>> {
        if self.torn {
            return None;
        }
        self.changed(self.at, self.count);
        Some(self.ranges)
    }
}

/// The byte ranges of a `len`-byte file whose blocks (`ours`) differ from what the receiver
/// summarised (`theirs`), adjacent blocks merged, fed in frames of `frame` summaries.
#[cfg(test)]
pub(super) fn changed_ranges_in_frames(
    ours: &[Cv],
    theirs: &[BlockSum],
    block_size: BlockSize,
    len: u64,
    frame: usize,
) -> Vec<(u64, u64)> {
    let mut differ = Differ::new(&Ours {
        len,
        root: [0; 32],
        block_size,
    });
    differ.count = ours.len();
    let load = |part: u64| -> Result<Option<Vec<Cv>>, std::convert::Infallible> {
        let from = part as usize * PART_CVS;
        Ok(ours
            .get(from..(from + PART_CVS).min(ours.len()))
            .map(<[Cv]>::to_vec))
    };
    for sums in theirs.chunks(frame.max(1)) {
        let Ok(()) = differ.feed(sums, load);
    }
    differ.finish().unwrap_or_default()
}

/// [`changed_ranges_in_frames`] with all summaries in one frame.
#[cfg(test)]
pub(super) fn changed_ranges(
    ours: &[Cv],
    theirs: &[BlockSum],
    block_size: BlockSize,
    len: u64,
) -> Vec<(u64, u64)> {
    changed_ranges_in_frames(ours, theirs, block_size, len, usize::MAX)
}

/// Blocks per group, at least, where a file's middle is summarised coarsely (256 KiB at
/// 16 KiB blocks; a change in the middle costs at most one group).
pub(super) const GROUP_BLOCKS: usize = 16;

/// At most this many groups summarise a file's middle: a larger file's groups hold more
/// blocks (a power of two; 64 at 1 GiB, so a grown 1 GiB file's request is about 10 KiB
/// instead of 41 KiB), up to a part of the list (so the sender compares a group within the
/// two parts it holds).
pub(super) const MAX_MIDDLE_GROUPS: u64 = 1024;

/// Blocks at each end of such a file still summarised one by one (a WAV header, a tail).
pub(super) const EDGE_BLOCKS: usize = 4;

/// What the receiver sends about its blocks (`ours`) when asking for a file that will be
/// `new_len` bytes: one summary per block when the block count stays (in-place rewrites
/// anywhere), otherwise one per block only at the ends and one per group in between (the
/// file grew or shrank: its middle is most likely unchanged).
pub(super) fn block_sums(
    ours: impl Iterator<Item = Cv>,
    count: u64,
    block_size: BlockSize,
    new_len: u64,
) -> impl Iterator<Item = BlockSum> {
    let fine = block_size.blocks_for(new_len) == count || count <= 2 * EDGE_BLOCKS as u64;
    let middle = EDGE_BLOCKS as u64..count.saturating_sub(EDGE_BLOCKS as u64);
    let group_blocks = (GROUP_BLOCKS as u64)
        .max(
            (middle.end.saturating_sub(middle.start))
                .div_ceil(MAX_MIDDLE_GROUPS)
                .next_power_of_two(),
        )
        .min(PART_CVS as u64);
    let mut ours = (0u64..).zip(ours);
    std::iter::from_fn(move || {
        let (index, cv) = ours.next()?;
        if fine || !middle.contains(&index) {
            return Some(BlockSum::one(&cv));
        }
        // Groups start at the middle's start, every `group_blocks` blocks; their digest is
        // made as the values pass (as `group_digest` makes it).
        let end = (index + group_blocks).min(middle.end);
        let mut digest = blake3::Hasher::new();
        digest.update(&cv);
        let mut taken = 1u64;
        while taken < end - index {
            match ours.next() {
                Some((_, cv)) => {
                    digest.update(&cv);
                    taken += 1;
                }
                None => break,
            }
        }
        let mut short = [0u8; 8];
        short.copy_from_slice(&digest.finalize().as_bytes()[..8]);
        Some(BlockSum::Group {
            count: taken as u32,
            digest: short,
        })
    })
}

/// Sends a small file as a delta against the receiver's version (its `signature`), or whole
/// when the signature is unusable, the delta would not be smaller, or the file is not small.
/// The hash sent is of exactly the bytes the delta was made from.
pub(super) async fn send_delta<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    generation: Generation,
    files: &Root,
    index: &Arc<Mutex<Index>>,
    (path, signature): (RelPath, Vec<u8>),
    peer: &whole::Reads,
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
        Ok((false, ..)) => return send_file(conn, generation, files, index, path, peer).await,
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
                let bytes = bytes::Bytes::copy_from_slice(part);
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
