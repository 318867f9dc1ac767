//! Whole files to the receiver: small ones read several at a time on one blocking thread,
//! large ones streamed chunk by chunk, holes sent as such to a receiver that knows them.

use lbs_protocol::message::SHARED_DATA_MIN;
use nix::sys::stat::FileStat;

use crate::tree::{Region, next_region};

use super::pack::{PackHistory, Packer, Piece};

use super::*;

/// Files up to this long are read whole in one blocking call ([`read_small`]).
pub(super) const SMALL_FILE: u64 = 1 << 20;

/// At most this many fetches already waiting in the connection's buffer are read together (as
/// many as a receiver asks ahead, [`super::pipeline::AHEAD_FILES`]).
const BATCH_FILES: usize = 256;

/// The reader hands small files over in sub-batches of at most this many files...
const SUB_BATCH_FILES: usize = 8;

/// ... or of at least this many bytes read.
const SUB_BATCH_BYTES: u64 = 1 << 20;

/// Sub-batches read ahead of the connection, at most.
const READ_AHEAD_BATCHES: usize = 2;

/// A small file as read: the version its index listed and its pieces, or why it cannot be
/// sent.
type Small = Result<(Option<Listed>, Vec<Piece>), String>;

/// Small files read, in the order asked (`None`: a large one, streamed by [`send_file`]).
type SubBatch = Result<Vec<(RelPath, Option<Small>)>, SessionError>;

/// Answers the fetches of `first` and of the ones already waiting behind it in the
/// connection's buffer (a receiver pipelines its requests): their small files are read on one
/// blocking thread, handed over a few at a time (a hand-off per file was most of the sender's
/// time in an initial copy of a PBX's thousands of prompts), and sent in the order asked.
/// Returns the first message that was not a fetch, read from the buffer, for the caller to
/// handle next.
pub(super) async fn send_files<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    generation: Generation,
    files: &Arc<Root>,
    index: &Arc<Mutex<Index>>,
    first: RelPath,
    peer: &Reads,
) -> Result<Option<Message>, SessionError> {
    let mut paths = vec![first];
    let mut next = None;
    while paths.len() < BATCH_FILES && arrived(conn) {
        match conn.next().await {
            Some(envelope) => match envelope?.message {
                Message::SyncFetch { path } => paths.push(path),
                other => {
                    next = Some(other);
                    break;
                }
            },
            None => break,
        }
    }
    // A reader thread reads (and packs) the small files in sub-batches while the connection
    // sends the ones before: reading and packing overlap with sending, and the hand-offs are
    // one per sub-batch, not one per file.
    let (batches, mut read) = mpsc::channel(READ_AHEAD_BATCHES);
    let reader = {
        let (files, index, peer) = (files.clone(), index.clone(), peer.clone());
        tokio::task::spawn_blocking(move || read_batches(&files, &index, paths, peer, &batches))
    };
    let sent = async {
        while let Some(batch) = read.recv().await {
            for (path, read) in batch? {
                match read {
                    Some(small) => {
                        send_small(conn, generation, path, small, peer.packing.as_deref()).await?
                    }
                    None => send_file(conn, generation, files, index, path, peer).await?,
                }
            }
        }
        Ok::<(), SessionError>(())
    }
    .await;
    // On an error the reader stops at its next sub-batch (its channel is gone).
    drop(read);
    blocking_join(reader.await)?;
    sent?;
    Ok(next)
}

/// Whether the peer's next message is already in the connection's buffer, whole.
fn arrived<S: AsyncRead + AsyncWrite + Unpin>(conn: &mut Connection<S>) -> bool {
    matches!(
        lbs_protocol::frame::check(conn.read_buffer(), lbs_protocol::MAX_FRAME_LEN),
        Ok(Some(_))
    )
}

/// Reads the small files of `paths` in order, packed where that pays, and hands them over
/// in sub-batches of at most [`SUB_BATCH_FILES`] files or [`SUB_BATCH_BYTES`] bytes; a large
/// file is left (`None`) for [`send_file`]. Stops when the sending side is gone.
fn read_batches(
    files: &Root,
    index: &Mutex<Index>,
    paths: Vec<RelPath>,
    peer: Reads,
    batches: &mpsc::Sender<SubBatch>,
) {
    let mut packer = Packer::new(peer.packing);
    let mut batch = Vec::new();
    let mut held = 0u64;
    let listed = match listed_each(index, &paths, peer.holes) {
        Ok(listed) => listed,
        Err(err) => {
            let _ = batches.blocking_send(Err(err));
            return;
        }
    };
    for (path, listed) in paths.into_iter().zip(listed) {
        let read = match files.open_file_stat(&path) {
            Ok((file, stat)) if stat.st_size as u64 <= SMALL_FILE => Some(read_listed(
                &path,
                (&file, &stat),
                listed,
                peer.holes,
                &mut packer,
            )),
            Ok(_) => None,
            Err(err) => Some(Err(err.to_string())),
        };
        if let Some(Ok((_, pieces))) = &read {
            held += pieces.iter().map(Piece::held).sum::<u64>();
        }
        batch.push((path, read));
        if batch.len() >= SUB_BATCH_FILES || held >= SUB_BATCH_BYTES {
            held = 0;
            if batches
                .blocking_send(Ok(std::mem::take(&mut batch)))
                .is_err()
            {
                return;
            }
        }
    }
    if !batch.is_empty() {
        let _ = batches.blocking_send(Ok(batch));
    }
}

/// Reads a small file (whose status is `stat`) to the length its index lists (see
/// [`read_small`]), packed where that pays (only a listed version: otherwise the sender
/// hashes what it sends).
fn read_listed(
    path: &RelPath,
    (file, stat): (&std::fs::File, &FileStat),
    listed: Option<Listed>,
    holes: bool,
    packer: &mut Packer,
) -> Small {
    let limit = listed.map_or(4 * SMALL_FILE, |l| l.size);
    packer.next_file(path, listed.is_some());
    read_small(file, holes && may_have_holes(stat), limit)
        .map(|pieces| {
            let pieces = pieces.into_iter().map(|piece| packer.pack(piece)).collect();
            (listed, pieces)
        })
        .map_err(|err| format!("reading failed: {err}"))
}

/// [`crate::tree::may_have_holes`] of a file's status: one that has all its blocks is read
/// without asking its file system where its holes are (two `lseek`s a file). A file with
/// blocks beyond its end (`fallocate`) and holes inside sends zeros, which the receiver
/// leaves unwritten all the same.
fn may_have_holes(stat: &FileStat) -> bool {
    crate::tree::may_have_holes(stat.st_blocks.max(0) as u64, stat.st_size.max(0) as u64)
}

/// Sends a small file as read: its pieces and its end, or why it is unavailable.
async fn send_small<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    generation: Generation,
    path: RelPath,
    small: Small,
    history: Option<&PackHistory>,
) -> Result<(), SessionError> {
    let (listed, pieces) = match small {
        Ok(read) => read,
        Err(reason) => {
            return send(conn, generation, Message::SyncUnavailable { path, reason }).await;
        }
    };
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    for piece in pieces {
        let message = match piece {
            Piece::Hole(len) => {
                if listed.is_none() {
                    hash_zeros(&mut hasher, len);
                }
                size += len;
                Message::SyncHole { len }
            }
            Piece::Data(bytes) => {
                if listed.is_none() {
                    hasher.update(&bytes);
                }
                size += bytes.len() as u64;
                Message::SyncData {
                    bytes: bytes.into(),
                }
            }
            Piece::Packed { len, bytes } => {
                size += u64::from(len);
                Message::SyncDataPacked { len, bytes }
            }
        };
        feed_data(conn, generation, message, history).await?;
    }
    let blake3 = listed.map_or_else(|| *hasher.finalize().as_bytes(), |l| l.hash);
    feed(conn, generation, Message::SyncDataEnd { size, blake3 }).await
}

/// Feeds a piece of a file to the connection, timing for `history` how long the connection
/// takes to accept data (see [`PackHistory::needed`]; a hole is not data).
async fn feed_data<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    generation: Generation,
    message: Message,
    history: Option<&PackHistory>,
) -> Result<(), SessionError> {
    let bytes = match &message {
        Message::SyncData { bytes } => bytes.len(),
        Message::SyncDataPacked { bytes, .. } => bytes.len(),
        _ => 0,
    };
    let started = Instant::now();
    // A chunk as long as a receiver keeps as a slice of the frame it read goes to the stream
    // as it is; a shorter one is queued with the messages around it.
    match message {
        Message::SyncData { bytes } if bytes.len() >= SHARED_DATA_MIN => {
            write_data(conn, generation, &bytes).await?;
        }
        message => feed(conn, generation, message).await?,
    }
    if let Some(history) = history.filter(|_| bytes > 0) {
        history.sent(bytes as u64, started.elapsed());
    }
    Ok(())
}

/// Writes a [`Message::SyncData`] frame to the connection's stream after what is queued: its
/// head, then `bytes` as they are, so the TLS layer's copy is the only one (encoding the frame
/// first copied every byte sent once more, 7% of a sender's CPU on a large file). Each write
/// is given [`STALLED`] to take some of it (behind TLS: up to rustls's 64 KiB buffer), so a
/// chunk crossing a slow link is not cut while the peer keeps reading it.
pub(super) async fn write_data<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    generation: Generation,
    bytes: &[u8],
) -> Result<(), SessionError> {
    let head =
        lbs_protocol::sync_data_head(generation, bytes.len()).ok_or(FrameError::TooLarge {
            len: bytes.len(),
            max: lbs_protocol::MAX_FRAME_LEN,
        })?;
    flush(conn).await?;
    let stream = conn.get_mut();
    let mut slices = [std::io::IoSlice::new(&head), std::io::IoSlice::new(bytes)];
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let write = tokio::io::AsyncWriteExt::write_vectored(stream, rest);
        let written = tokio::time::timeout(STALLED, write)
            .await
            .map_err(|_| SessionError::NotReading)?
            .map_err(FrameError::from)?;
        if written == 0 {
            return Err(
                FrameError::from(std::io::Error::from(std::io::ErrorKind::WriteZero)).into(),
            );
        }
        std::io::IoSlice::advance_slices(&mut rest, written);
    }
    Ok(())
}

/// Sends `path` whole: its data as it is read, and (with `holes`, to a receiver of protocol
/// 1.6) each hole its file system reports as a [`Message::SyncHole`] instead of its zeros, and
/// the hash its index holds for the version it listed, as a block transfer does (the receiver
/// verifies what it wrote against the manifest itself: hashing it here again cost the primary
/// a core for every byte sent). Only the listed version's length is sent: a recording that
/// grows while it is sent arrives as the version listed (its beginning is unchanged), and the
/// next pass brings what was appended; sent to its end, it was longer than the receiver had
/// planned for, refused, and taken again in every pass for as long as the call lasted.
/// Without a listed version (a receiver older than 1.6) the file is sent to its end.
pub(super) async fn send_file<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    generation: Generation,
    files: &Root,
    index: &Arc<Mutex<Index>>,
    path: RelPath,
    peer: &Reads,
) -> Result<(), SessionError> {
    let (file, stat) = match files.open_file_stat(&path) {
        Ok(opened) => opened,
        Err(err) => {
            let reason = err.to_string();
            return send(conn, generation, Message::SyncUnavailable { path, reason }).await;
        }
    };
    let holes = peer.holes && may_have_holes(&stat);
    // A small file (most of a PBX's) is read in one go on a blocking thread: one hand-off,
    // not one per read, seek and end of file.
    if stat.st_size as u64 <= SMALL_FILE {
        let (index, at, reads) = (index.clone(), path.clone(), peer.clone());
        let read = tokio::task::spawn_blocking(move || {
            let listed = listed(&index, &at, reads.holes)?;
            let mut packer = Packer::new(reads.packing);
            let read = read_listed(&at, (&file, &stat), listed, reads.holes, &mut packer);
            Ok::<_, SessionError>(read)
        });
        let small = blocking_join(read.await)??;
        return send_small(conn, generation, path, small, peer.packing.as_deref()).await;
    }
    let listed = {
        let (index, at, holes) = (index.clone(), path.clone(), peer.holes);
        blocking_join(tokio::task::spawn_blocking(move || listed(&index, &at, holes)).await)??
    };
    let limit = listed.map_or(u64::MAX, |l| l.size);
    // A reader thread stays ahead of the connection by a few chunks: reading and sending
    // overlap, and the reader sleeps only when it is that far ahead (a hand-off to the
    // blocking pool per chunk was a sleep and two wake-ups per 256 KiB).
    let (pieces, mut read) = mpsc::channel(READ_AHEAD_CHUNKS);
    let (at, packing) = (path.clone(), peer.packing.clone());
    let reader = tokio::task::spawn_blocking(move || {
        let mut packer = Packer::new(packing);
        packer.next_file(&at, listed.is_some());
        let sent = read_pieces(&file, holes, limit, |piece| {
            pieces.blocking_send(Ok(packer.pack(piece))).is_ok()
        });
        if let Err(err) = sent {
            let _ = pieces.blocking_send(Err(err));
        }
    });
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    while let Some(piece) = read.recv().await {
        let message = match piece {
            Ok(Piece::Hole(len)) => {
                if listed.is_none() {
                    hash_zeros(&mut hasher, len);
                }
                size += len;
                Message::SyncHole { len }
            }
            Ok(Piece::Data(bytes)) => {
                if listed.is_none() {
                    hasher.update(&bytes);
                }
                size += bytes.len() as u64;
                Message::SyncData {
                    bytes: bytes.into(),
                }
            }
            Ok(Piece::Packed { len, bytes }) => {
                size += u64::from(len);
                Message::SyncDataPacked { len, bytes }
            }
            Err(err) => {
                let reason = format!("reading failed after {size} bytes: {err}");
                return send(conn, generation, Message::SyncUnavailable { path, reason }).await;
            }
        };
        // On an error the reader stops at its next chunk (its channel is gone).
        feed_data(conn, generation, message, peer.packing.as_deref()).await?;
    }
    blocking_join(reader.await)?;
    let blake3 = listed.map_or_else(|| *hasher.finalize().as_bytes(), |l| l.hash);
    feed(conn, generation, Message::SyncDataEnd { size, blake3 }).await
}

/// How many chunks of a large file the reader thread may be ahead of the connection.
const READ_AHEAD_CHUNKS: usize = 4;

/// The hash the index holds for `path` (sent instead of hashing it again, with `holes`:
/// to a receiver of protocol 1.6). On a blocking thread: a scan may hold the index.
fn listed(
    index: &Mutex<Index>,
    path: &RelPath,
    holes: bool,
) -> Result<Option<Listed>, SessionError> {
    Ok(listed_each(index, std::slice::from_ref(path), holes)?
        .pop()
        .flatten())
}

/// [`listed`] for each of `paths`, in one read of the index.
fn listed_each(
    index: &Mutex<Index>,
    paths: &[RelPath],
    holes: bool,
) -> Result<Vec<Option<Listed>>, SessionError> {
    if !holes {
        return Ok(vec![None; paths.len()]);
    }
    let index = index
        .lock()
        .map_err(|_| SessionError::Internal("index lock poisoned".into()))?;
    Ok(index
        .get_each(paths)?
        .into_iter()
        .map(|entry| entry.and_then(Listed::of))
        .collect())
}

/// The version of a file the sender's index holds (and its manifest listed).
#[derive(Clone, Copy)]
pub(super) struct Listed {
    hash: [u8; 32],
    size: u64,
}

impl Listed {
    /// The version an index entry lists, if it holds a hash.
    fn of(entry: crate::index::Entry) -> Option<Listed> {
        entry.hash.map(|hash| Listed {
            hash: hash.root,
            size: entry.meta.size,
        })
    }
}

/// What the receiver reads beyond plain data, from the protocol both sides speak.
#[derive(Clone)]
pub(super) struct Reads {
    /// Holes as [`Message::SyncHole`] (1.6).
    pub(super) holes: bool,
    /// Data packed as [`Message::SyncDataPacked`] (1.11), learning what packs into this
    /// history of the session's.
    pub(super) packing: Option<Arc<PackHistory>>,
}

/// Reads a small file to its end or to `limit` bytes (with `holes`, holes as such), in parts
/// of at most [`SYNC_CHUNK_LEN`]. Without a listed length, one that grew meanwhile is read to
/// at most four times [`SMALL_FILE`]; the receiver's hash check then finds it short and the
/// next pass takes it again.
fn read_small(file: &std::fs::File, holes: bool, limit: u64) -> std::io::Result<Vec<Piece>> {
    let mut pieces = Vec::new();
    read_pieces(file, holes, limit, |piece| {
        pieces.push(piece);
        true
    })?;
    Ok(pieces)
}

/// Reads `file` from its start to its end or to `limit` bytes (with `holes`, holes as such,
/// as its file system reports them), in parts of at most [`SYNC_CHUNK_LEN`], handing each to
/// `take` for as long as it returns true. `file` is read through its own offset, which is
/// expected at its start (a file just opened): reading so fills each part's fresh buffer
/// without zeroing it first (zeroing was 5% of a sender's CPU in an initial copy).
fn read_pieces(
    mut file: &std::fs::File,
    holes: bool,
    limit: u64,
    mut take: impl FnMut(Piece) -> bool,
) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut at = 0u64;
    // Where the file's offset is, when known (looking for holes moves it).
    let mut offset = Some(0u64);
    let mut data_end = if holes { None } else { Some(u64::MAX) };
    while at < limit {
        let end = match data_end {
            Some(end) if at < end => end,
            _ => match next_region(file, at) {
                Region::Hole(len) => {
                    offset = None;
                    let len = len.min(limit - at);
                    at += len;
                    data_end = None;
                    if !take(Piece::Hole(len)) {
                        return Ok(());
                    }
                    continue;
                }
                Region::Data(end) => {
                    offset = None;
                    data_end = Some(end);
                    end
                }
                Region::Unknown => {
                    offset = None;
                    data_end = Some(u64::MAX);
                    u64::MAX
                }
            },
        };
        let end = end.min(limit);
        let want = SYNC_CHUNK_LEN.min(usize::try_from(end - at).unwrap_or(usize::MAX));
        if offset != Some(at) {
            file.seek(SeekFrom::Start(at))?;
        }
        let mut bytes = Vec::with_capacity(want);
        let n = file.take(want as u64).read_to_end(&mut bytes)?;
        if n == 0 {
            // The end (a file that shrank meanwhile is caught by the receiver's hash).
            break;
        }
        at += n as u64;
        offset = Some(at);
        if !take(Piece::Data(bytes)) {
            return Ok(());
        }
    }
    Ok(())
}

fn hash_zeros(hasher: &mut blake3::Hasher, len: u64) {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROS.len() as u64) as usize;
        hasher.update(&ZEROS[..n]);
        left -= n as u64;
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn only_a_file_missing_blocks_is_asked_where_its_holes_are() {
        let dir = tempfile::tempdir().unwrap();
        let stat_of = |name: &str, write: &dyn Fn(&mut std::fs::File)| {
            let path = dir.path().join(name);
            let mut file = std::fs::File::create(&path).unwrap();
            write(&mut file);
            file.sync_all().unwrap();
            nix::sys::stat::stat(&path).unwrap()
        };
        let full = stat_of("full", &|f| f.write_all(&[1; 100_000]).unwrap());
        let empty = stat_of("empty", &|_| {});
        let sparse = stat_of("sparse", &|f| {
            f.write_all(b"RIFF").unwrap();
            f.set_len(8 << 20).unwrap();
        });
        assert!(!may_have_holes(&full));
        assert!(!may_have_holes(&empty));
        assert!(may_have_holes(&sparse));
    }
}
