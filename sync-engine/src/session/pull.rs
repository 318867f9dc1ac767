//! The receiving side: plan against the primary's manifest, execute the plan on a blocking
//! writer, and feed it the content [`Pipeline`] asks for ahead of it.

use super::pipeline::{AHEAD_MAX_BLOCKS, PROGRESS_EVERY, Pipeline, Planned, Unpacker, forward};
use super::ready::Ready;
use super::*;
use crate::execute::execute;
use crate::index::{EntryKind, Known};
use crate::tree::{PART_CVS, TreeHash};

/// The receiver's fetcher: takes a file's answer from what was read ahead, or asks the async
/// side for it, and hands it to the writing side's sink.
pub(super) struct Bridge {
    pub(super) requests: mpsc::Sender<Request>,
    pub(super) ready: Arc<Ready>,
}

impl Fetcher for Bridge {
    fn fetch(
        &mut self,
        path: &RelPath,
        size: u64,
        basis: Option<(BlockSize, BlockList)>,
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

/// The connection ended before the answer did.
fn gone() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "the sync connection is gone",
    )
}

/// Gives one chunk to `sink`; the file's size once it is complete.
fn give(chunk: Chunk, sink: &mut dyn Sink) -> std::io::Result<Option<u64>> {
    match chunk {
        Chunk::Data(bytes) => sink.data(&bytes)?,
        Chunk::Hole(len) => sink.hole(len)?,
        Chunk::Changes(changed, size) => sink.changes(changed, size)?,
        Chunk::At(offset, bytes) => sink.at(offset, &bytes)?,
        Chunk::Delta(bytes) => sink.delta(&bytes)?,
        Chunk::End(size) => return Ok(Some(size)),
        Chunk::Failed(reason) => return Err(std::io::Error::other(reason)),
        Chunk::Aborted(reason) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                reason,
            ));
        }
    }
    Ok(None)
}

impl Bridge {
    pub(super) fn ask(
        &mut self,
        path: &RelPath,
        size: u64,
        ask: Ask,
        sink: &mut dyn Sink,
    ) -> std::io::Result<u64> {
        if let Some(chunks) = self.ready.take(path) {
            for chunk in chunks {
                if let Some(size) = give(chunk, sink)? {
                    return Ok(size);
                }
            }
            return Err(gone());
        }
        let (tx, mut rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
        self.requests
            .blocking_send((path.clone(), size, ask, tx))
            .map_err(|_| gone())?;
        // Returning early drops `rx`: the async side then drains the rest of the transfer.
        while let Some(chunk) = rx.blocking_recv() {
            if let Some(size) = give(chunk, sink)? {
                return Ok(size);
            }
        }
        Err(gone())
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
    /// The protocol both sides speak (from the `Hello` exchange); this build's unless set.
    pub version: ProtocolVersion,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            progress: None,
            durability: Durability::Grouped,
            cancel: None,
            version: lbs_protocol::PROTOCOL_VERSION,
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
        version,
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
        let scanned = scan_from(&scan_root, &mut index, &options, known)?;
        Ok((scanned, index.writes()))
    });

    let manifest_started = Instant::now();
    let exchanged = exchange_manifests(conn, generation, version, before_rx).await;
    // While this side works between requests, a sender of 1.13 is told so every 10 s: it
    // waits for each request within a minute.
    let working = |say: bool| (say && version >= V1_13).then_some(Message::SyncWorking);
    // Our scan is awaited whatever happened, so it never outlives the pull; its own error,
    // if any, says best what went wrong.
    let scanned = saying(conn, generation, working(exchanged.is_ok()), own_scan).await?;
    let ((scan_report, have), scanned_at) = scanned?;
    let Exchanged {
        entries,
        skipped: sender_skipped,
        links,
    } = exchanged?;
    let manifest_time = manifest_started.elapsed();
    // The sender's hard links the manifest vouches for (members files of one content).
    let links = crate::links::consistent(links, &entries);
    let plan = plan_with_links(&entries, &have, &links)?;
    drop(entries);
    // With no partial none is looked for; otherwise those of versions the sender no longer
    // has are of no use any more (the set of wanted ones, a hex name per fetch, only then).
    let files = if scan_report.partials.is_empty() {
        files.without_partials()
    } else {
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
        files
    };
    // New files' lists are staged in the index as they are written (a large file's is not
    // held whole); what an interrupted pass staged is dropped first.
    index
        .lock()
        .map_err(|_| SessionError::Internal("index lock poisoned".into()))?
        .drop_all_staged()?;
    let files = files.with_part_sink(Arc::new(IndexSink {
        index: index.clone(),
    }));

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
        let planning = tokio::task::spawn_blocking(move || -> Result<_, SessionError> {
            let index = index
                .lock()
                .map_err(|_| SessionError::Internal("index lock poisoned".into()))?;
            let mut planned = VecDeque::with_capacity(fetches.len());
            for (path, size, existing) in fetches {
                // Large files are not asked for ahead: their block lists would make this
                // list grow with the data, and their transfer dwarfs a round trip. Nor
                // are their lists read here.
                let large = existing && index_blocks(&index, &path)? > AHEAD_MAX_BLOCKS as u64;
                let known = if existing && !large {
                    index.known(&path)?
                } else {
                    None
                };
                let delta = known
                    .as_ref()
                    .is_some_and(|k| crate::delta::wants_delta(k.meta.size, size));
                let small = !large
                    && known
                        .as_ref()
                        .is_none_or(|k| k.blocks.len() <= AHEAD_MAX_BLOCKS as u64);
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
        });
        saying(conn, generation, working(true), planning).await??
    };
    let (requests, mut incoming) = mpsc::channel(1);
    let ready = Arc::new(Ready::default());
    let writer_ready = ready.clone();
    // A batch only for a pass that trashes: a quiet day's passes leave no empty directories.
    let batch = if plan.trashes() {
        Some(trash.batch()?)
    } else {
        None
    };
    let summary = plan.summary;
    let worker_index = index.clone();
    let progress_tx = progress.clone();
    let record_index = index.clone();
    let record_root = root.to_owned();
    let worker = tokio::task::spawn_blocking(move || {
        let old_blocks = |path: &RelPath| known_of(&worker_index, path);
        // Each group of new files is recorded as soon as it is in place; a group that cannot
        // be (its transaction rolled back) is recorded with the rest after the run.
        let record = |done: &[(RelPath, TreeHash)]| {
            record_index.lock().is_ok_and(|mut held| {
                crate::scan::record_installed(&record_root, &mut held, done, &[]).is_ok()
            })
        };
        let mut notified: Option<Instant> = None;
        let mut on_progress = |now: &Progress| {
            if let Some(progress) = &progress {
                // Every change is kept; watchers are woken at the start, now and then, and at
                // the end: waking them for every file cost more than writing it.
                progress.send_if_modified(|shown| {
                    *shown = *now;
                    let due = notified.is_none_or(|at| at.elapsed() >= PROGRESS_EVERY)
                        || now.actions_done == now.actions_total;
                    if due {
                        notified = Some(Instant::now());
                    }
                    due
                });
            }
        };
        execute(
            &plan,
            &files,
            batch.as_ref(),
            &mut Bridge {
                requests,
                ready: writer_ready,
            },
            &old_blocks,
            &mut on_progress,
            Some(&record),
        )
    });
    let mut connection_error = None;
    let mut notified = Instant::now();
    let mut pipeline = Pipeline {
        upcoming: planned,
        ahead: VecDeque::new(),
        unpacker: Unpacker::default(),
    };
    // A pull nobody cancels waits on a token nobody cancels.
    let cancel = cancel.unwrap_or_default();
    let mut still_working = notice_ticks();
    let say_working = working(true).is_some();
    loop {
        let (path, size, ask, chunks) = match incoming.try_recv() {
            Ok(request) => request,
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) => {
                let next = pipeline.read_ahead_next();
                if connection_error.is_none() && next.is_some_and(|size| ready.has_room(size)) {
                    // While the writer stores a file, the next one's answer is read for it.
                    let step = async {
                        pipeline.read_ahead(conn, &ready).await?;
                        pipeline.top_up(conn, generation).await
                    };
                    let outcome = tokio::select! {
                        outcome = step => outcome,
                        () = cancel.cancelled() => Err(SessionError::Cancelled),
                    };
                    if let Err(err) = outcome {
                        ready.close();
                        connection_error = Some(err);
                    }
                    continue;
                }
                tokio::select! {
                    request = incoming.recv() => match request {
                        Some(request) => request,
                        None => break,
                    },
                    () = ready.room(), if connection_error.is_none() => continue,
                    // The writer is at work on this side (a local copy, a group's sync).
                    _ = still_working.tick(), if say_working && connection_error.is_none() => {
                        if let Err(err) = send(conn, generation, Message::SyncWorking).await {
                            ready.close();
                            connection_error = Some(err);
                        }
                        continue;
                    }
                    () = cancel.cancelled(), if connection_error.is_none() => {
                        ready.close();
                        connection_error = Some(SessionError::Cancelled);
                        continue;
                    }
                }
            }
        };
        if let Some(err) = &connection_error {
            let _ = chunks.send(Chunk::Aborted(format!("{err}"))).await;
            continue;
        }
        // Read ahead just after the writer looked: handed over from the queue after all.
        if let Some(answer) = ready.take(&path) {
            for chunk in answer {
                if chunks.send(chunk).await.is_err() {
                    break;
                }
            }
            continue;
        }
        if pipeline.holds(&path) {
            // It comes after everything read ahead: the writer went past those files.
            ready.clear();
        }
        let relayed = async {
            pipeline.ready(conn, generation, path, size, ask).await?;
            let unpacker = &mut pipeline.unpacker;
            forward(conn, &chunks, progress_tx.as_ref(), &mut notified, unpacker).await?;
            pipeline.top_up(conn, generation).await
        };
        let outcome = tokio::select! {
            outcome = relayed => outcome,
            () = cancel.cancelled() => Err(SessionError::Cancelled),
        };
        if let Err(err) = outcome {
            let _ = chunks.send(Chunk::Aborted(err.to_string())).await;
            ready.close();
            connection_error = Some(err);
        }
    }
    let executed = saying(
        conn,
        generation,
        working(connection_error.is_none()),
        worker,
    )
    .await?;
    // A lost connection or a cancellation explains the writer's interruption best.
    if let Some(err) = connection_error.take() {
        return Err(err);
    }
    let mut executed = executed?;
    // What was just written and not recorded yet is known: record it so the next pass does
    // not read it again.
    let installed = std::mem::take(&mut executed.installed);
    let patched = std::mem::take(&mut executed.patched_lists);
    let record_root = root.to_owned();
    let recording = tokio::task::spawn_blocking(move || -> Result<u64, SessionError> {
        let mut index = index
            .lock()
            .map_err(|_| SessionError::Internal("index lock poisoned".into()))?;
        if installed.is_empty() && patched.is_empty() && index.writes() == scanned_at {
            // Nothing written since this side's scan (a pass that found the tree in sync):
            // its entries are the index's, and the next pass's scan starts from them instead
            // of reading every row again (a fifth of the receiver's CPU in a pull of 100,000
            // unchanged files).
            index.remember(have)?;
            return Ok(0);
        }
        Ok(crate::scan::record_installed(
            &record_root,
            &mut index,
            &installed,
            &patched,
        )?)
    });
    saying(conn, generation, working(true), recording).await??;
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
        sender_skipped,
        packed: pipeline.unpacker.packed,
    })
}

/// What the receiver's index knows of `path`'s current version; a list longer than a part
/// is read from the index a part at a time as it is used, never held whole.
fn known_of(index: &Arc<Mutex<Index>>, path: &RelPath) -> Option<Known> {
    let held = index.lock().ok()?;
    let entry = held.get(path).ok()??;
    if entry.kind != EntryKind::File || entry.hash.is_none() {
        return None;
    }
    let block_size = held.block_size(path).ok()??;
    let count = block_size.blocks_for(entry.meta.size);
    if count <= PART_CVS as u64 {
        return held.known(path).ok()?;
    }
    let parts = Arc::new(IndexParts {
        index: index.clone(),
        path: path.clone(),
    });
    Some(Known {
        block_size,
        blocks: BlockList::Stored { parts, count },
        meta: entry.meta,
    })
}

/// One file's list in the receiver's index.
struct IndexParts {
    index: Arc<Mutex<Index>>,
    path: RelPath,
}

impl crate::index::StoredParts for IndexParts {
    fn part(&self, n: u64) -> Option<Vec<Cv>> {
        self.index.lock().ok()?.block_part(&self.path, n).ok()?
    }
}

/// How many blocks the list stored for `path` has, by its entry's length (0 without one).
fn index_blocks(index: &Index, path: &RelPath) -> Result<u64, SessionError> {
    let Some(entry) = index.get(path)? else {
        return Ok(0);
    };
    Ok(index
        .block_size(path)?
        .map_or(0, |size| size.blocks_for(entry.meta.size)))
}

/// Stages new files' lists in the receiver's index as they are written.
struct IndexSink {
    index: Arc<Mutex<Index>>,
}

impl crate::tree::PartSink for IndexSink {
    fn stage(&self, path: &RelPath, part: u64, cvs: &[Cv]) -> std::io::Result<()> {
        self.index
            .lock()
            .map_err(|_| std::io::Error::other("index lock poisoned"))?
            .stage_part(path, part, cvs)
            .map_err(std::io::Error::other)
    }
}
