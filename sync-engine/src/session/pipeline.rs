//! Asking the sender ahead of the writer: requests go out in plan order while the writer
//! stores earlier files, small files' answers are read into [`Ready`] before the writer asks,
//! and each other answer is forwarded to the writer through a bounded channel as it asks.

use super::ready::Ready;
use super::serve::block_sums;
use super::*;

/// A fetch the plan will make: which file, how large on the sender, and the receiver's
/// block values when it holds an older version.
#[derive(Debug)]
pub(super) struct Planned {
    pub(super) path: RelPath,
    pub(super) size: u64,
    pub(super) ask: Ask,
    /// Whether it may be asked for ahead of the writer (not a delta, whose signature comes
    /// from the writer, nor a large file: then `ask` is not kept).
    pub(super) ahead: bool,
}

impl Planned {
    /// Roughly how many bytes its request takes on the wire.
    pub(super) fn request_bytes(&self) -> usize {
        64 + self.path.as_bytes().len()
            + match &self.ask {
                Ask::Whole => 0,
                Ask::Blocks(_, blocks) => blocks.len() as usize * 10,
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
pub(super) struct Pipeline {
    /// Fetches not requested yet, in plan order.
    pub(super) upcoming: VecDeque<Planned>,
    /// Requested, answers not read yet, in order.
    pub(super) ahead: VecDeque<Planned>,
    /// Unpacks packed data as it is read, off the writer's thread.
    pub(super) unpacker: Unpacker,
}

/// Files with more blocks than this (1 MiB at 16 KiB) are asked for by the writer itself.
pub(super) const AHEAD_MAX_BLOCKS: usize = 64;

/// At most this many requests run ahead of the writer (the byte bounds below bound them
/// first for all but small files). 64 left the PBX tree's initial copy waiting on round trips:
/// 256 took it from 0.61–0.68 s to 0.53–0.61 s (medians, taking turns with the old build).
pub(super) const AHEAD_FILES: usize = 256;

/// At most this many bytes of files are requested ahead of the writer.
pub(super) const AHEAD_BYTES: u64 = 16 << 20;

/// At most this many bytes of requests are outstanding while an answer is being read.
pub(super) const AHEAD_REQUEST_BYTES: usize = 32 * 1024;

impl Pipeline {
    /// Makes the next answer on the connection the one for `path`: answers to requests the
    /// writer skipped are read and dropped; a request outside the plan's order (a fallback)
    /// goes out after the outstanding ones are drained and put back in line.
    pub(super) async fn ready<S: AsyncRead + AsyncWrite + Unpin>(
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
    pub(super) async fn top_up<S: AsyncRead + AsyncWrite + Unpin>(
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
            flush(conn).await?;
        }
        Ok(())
    }
}

/// Asks the sender for one file: whole, its changes against the receiver's blocks, or a delta.
pub(super) async fn request<S: AsyncRead + AsyncWrite + Unpin>(
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
    // Summaries are made a frame at a time, not all before the first is sent.
    let count = blocks.len();
    let mut sums = block_sums(blocks.iter(), count, block_size, size).peekable();
    loop {
        let part: Vec<BlockSum> = sums.by_ref().take(BLOCKS_PER_FRAME).collect();
        let last = sums.peek().is_none();
        feed(
            conn,
            generation,
            Message::SyncFetchChanges {
                path: path.clone(),
                block_size: block_size.get() as u32,
                blocks: part,
                last,
            },
        )
        .await?;
        if last {
            break;
        }
    }
    Ok(())
}

/// Reads one answer to its end and drops it.
pub(super) async fn discard<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
) -> Result<(), SessionError> {
    loop {
        match receive_answer(conn, "a file transfer").await? {
            Message::SyncData { .. }
            | Message::SyncDataPacked { .. }
            | Message::SyncHole { .. }
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
pub(super) async fn forward<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    chunks: &mpsc::Sender<Chunk>,
    progress: Option<&tokio::sync::watch::Sender<Progress>>,
    notified: &mut Instant,
    unpacker: &mut Unpacker,
) -> Result<(), SessionError> {
    loop {
        let chunk = chunk_of(receive_answer(conn, "a file transfer").await?, unpacker)?;
        note_progress(progress, &chunk, notified);
        let done = matches!(chunk, Chunk::End(_) | Chunk::Failed(_));
        // The writer gave up on this file (an error on its side): drain the rest regardless.
        let _ = chunks.send(chunk).await;
        if done {
            return Ok(());
        }
    }
}

/// What a message of a file transfer gives the writer (packed data unpacked).
pub(super) fn chunk_of(message: Message, unpacker: &mut Unpacker) -> Result<Chunk, SessionError> {
    Ok(match message {
        Message::SyncData { bytes } => Chunk::Data(bytes),
        Message::SyncDataPacked { len, bytes } => Chunk::Data(unpacker.unpack(len, &bytes)?.into()),
        Message::SyncHole { len } => Chunk::Hole(len),
        Message::SyncDataAt { offset, bytes } => Chunk::At(offset, bytes),
        Message::SyncChanges { changed, size } => Chunk::Changes(changed, size),
        Message::SyncDelta { bytes } => Chunk::Delta(bytes),
        // The writer verifies the content against the manifest's hash itself.
        Message::SyncDataEnd { size, .. } => Chunk::End(size),
        Message::SyncUnavailable { path, reason } => {
            Chunk::Failed(format!("the sender could not send {path}: {reason}"))
        }
        other => return Err(SessionError::unexpected(&other, "a file transfer")),
    })
}

/// Unpacks [`Message::SyncDataPacked`] chunks, each into at most the length it announced.
#[derive(Default)]
pub(super) struct Unpacker {
    /// Started at the first packed chunk.
    zstd: Option<zstd::bulk::Decompressor<'static>>,
    /// What the chunks unpacked so far held, and what they took packed.
    pub(super) packed: PackedData,
}

impl Unpacker {
    /// The `len` bytes packed in `packed`; refused unless `len` is at most [`SYNC_CHUNK_LEN`]
    /// and `packed` is a zstd frame of exactly that many bytes.
    pub(super) fn unpack(&mut self, len: u32, packed: &[u8]) -> Result<Vec<u8>, SessionError> {
        let refused = |what: String| SessionError::Refused(format!("sent packed data {what}"));
        let len = len as usize;
        if len == 0 || len > SYNC_CHUNK_LEN {
            return Err(refused(format!(
                "of {len} bytes (at most {SYNC_CHUNK_LEN})"
            )));
        }
        let zstd = match &mut self.zstd {
            Some(zstd) => zstd,
            None => self.zstd.insert(
                zstd::bulk::Decompressor::new().map_err(|err| refused(format!("({err})")))?,
            ),
        };
        // Room for `len` bytes only: a frame that holds more is refused, not unpacked further.
        let mut out = Vec::with_capacity(len);
        let got = zstd
            .decompress_to_buffer(packed, &mut out)
            .map_err(|err| refused(format!("that does not unpack ({err})")))?;
        if got != len {
            return Err(refused(format!(
                "that gave {got} bytes, not the {len} announced"
            )));
        }
        self.packed.data += len as u64;
        self.packed.packed += packed.len() as u64;
        Ok(out)
    }
}

/// How often a pull's progress wakes those who watch it (every change is kept).
pub(super) const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// The file being received advances by `chunk`; watchers hear of it at most every
/// [`PROGRESS_EVERY`] (`notified`: when they last did).
fn note_progress(
    progress: Option<&tokio::sync::watch::Sender<Progress>>,
    chunk: &Chunk,
    notified: &mut Instant,
) {
    let Some(progress) = progress else {
        return;
    };
    let advance = |p: &mut Progress| match chunk {
        Chunk::Data(bytes) => p.current_bytes += bytes.len() as u64,
        Chunk::Delta(bytes) => p.current_bytes += bytes.len() as u64,
        Chunk::Hole(len) => p.current_bytes = p.current_bytes.saturating_add(*len),
        Chunk::At(offset, bytes) => p.current_bytes = offset + bytes.len() as u64,
        _ => {}
    };
    progress.send_if_modified(|p| {
        advance(p);
        let due = notified.elapsed() >= PROGRESS_EVERY;
        if due {
            *notified = Instant::now();
        }
        due
    });
}

/// Only answers of files up to this long are read ahead; longer ones stream through the
/// writer's bounded channel as it asks.
pub(super) const READY_FILE_MAX: u64 = 1 << 20;

/// At most this many chunks make one answer read ahead (a small sparse file is many holes).
const READY_CHUNKS: usize = 4096;

impl Pipeline {
    /// Reads the answer to the oldest request in flight and leaves it in `ready`. An answer
    /// larger than the file's listed size (plus one chunk) or of more than [`READY_CHUNKS`]
    /// chunks is not kept: the writer gets a failure for that file, the rest is read and
    /// dropped.
    pub(super) async fn read_ahead<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Connection<S>,
        ready: &Ready,
    ) -> Result<(), SessionError> {
        let Some(planned) = self.ahead.pop_front() else {
            return Ok(());
        };
        let limit = planned.size.saturating_add(SYNC_CHUNK_LEN as u64);
        let mut chunks = Vec::new();
        let mut bytes = 0u64;
        loop {
            let chunk = chunk_of(
                receive_answer(conn, "a file transfer").await?,
                &mut self.unpacker,
            )?;
            bytes += match &chunk {
                Chunk::Data(data) => data.len() as u64,
                Chunk::At(_, data) | Chunk::Delta(data) => data.len() as u64,
                _ => 0,
            };
            let done = matches!(chunk, Chunk::End(_) | Chunk::Failed(_));
            if bytes > limit || chunks.len() >= READY_CHUNKS {
                if !done {
                    discard(conn).await?;
                }
                chunks = vec![Chunk::Failed(format!(
                    "the sender sent more for {} than the {} bytes it listed",
                    planned.path, planned.size
                ))];
                bytes = 0;
                break;
            }
            chunks.push(chunk);
            if done {
                break;
            }
        }
        ready.push(planned.path, chunks, bytes);
        Ok(())
    }

    /// The listed size of the next answer on the connection, if it may be read ahead.
    pub(super) fn read_ahead_next(&self) -> Option<u64> {
        self.ahead
            .front()
            .map(|p| p.size)
            .filter(|size| *size <= READY_FILE_MAX)
    }

    /// Whether `path` is a planned fetch not answered yet (so everything read ahead comes
    /// before it in plan order).
    pub(super) fn holds(&self, path: &RelPath) -> bool {
        self.ahead.iter().any(|p| &p.path == path) || self.upcoming.iter().any(|p| &p.path == path)
    }
}
