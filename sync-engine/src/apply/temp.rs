//! A file's next version on its way in: the temporary file beside it ([`TempFile`]), written
//! sparse and hashed block by block as it is written ([`HashingWriter`]), so its tree hash
//! needs no second read.

use super::*;

/// A temporary name beside `name`, unique within this process; it names the version it will
/// hold when that is known (see [`partial_of_temp`]).
pub(super) fn temp_name(name: &OsStr, expected: Option<&blake3::Hash>) -> OsString {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // Keep within NAME_MAX: the original name is only a hint for a person looking.
    let hint: Vec<u8> = name.as_bytes().iter().take(160).copied().collect();
    let version = expected.map_or(String::new(), |hash| format!("{}.", &hash.to_hex()[..32]));
    // The process id once (it is a system call each time).
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let pid = PID.get_or_init(std::process::id);
    let mut temp = OsString::from(format!("{TEMP_PREFIX}{version}{pid}.{n}."));
    temp.push(OsStr::from_bytes(&hint));
    temp
}

/// A temporary file being filled with a file's next version (see [`Root::create_temp`]).
#[derive(Debug)]
pub struct TempFile<'r> {
    root: &'r Root,
    rel: RelPath,
    dir: Arc<File>,
    /// `None` once it is handed over to a [`Staged`].
    name: Option<OsString>,
    file: File,
    hash: BlockHasher,
    /// Whether the file is shorter than what was written (it ends in a hole).
    short: bool,
    /// Up to where its write-out to disk was started (`None`: never, nothing is synced).
    written_out: Option<u64>,
}

impl<'r> TempFile<'r> {
    /// A temporary file `name` (open as `file`) in `dir`, for `rel`'s next version.
    pub(super) fn new(
        root: &'r Root,
        rel: RelPath,
        dir: Arc<File>,
        name: OsString,
        file: File,
    ) -> TempFile<'r> {
        let block_size = BlockSize::DEFAULT;
        let sink = root.part_sink.clone().map(|sink| (sink, rel.clone()));
        TempFile {
            root,
            rel,
            dir,
            name: Some(name),
            file,
            hash: BlockHasher {
                block_size,
                pending: Vec::with_capacity(block_size.get() as usize),
                blocks: Vec::new(),
                written: 0,
                root: RootBuilder::default(),
                sink,
                staged_parts: 0,
            },
            short: false,
            written_out: (root.durability != Durability::Off).then_some(0),
        }
    }
}

impl TempFile<'_> {
    /// A writer that appends to the file, hashing what passes.
    pub fn writer(&mut self) -> HashingWriter<'_> {
        HashingWriter {
            file: &mut self.file,
            hash: &mut self.hash,
            short: &mut self.short,
            written_out: self.written_out.as_mut(),
        }
    }

    /// How many bytes were written so far.
    pub fn len(&self) -> u64 {
        self.hash.written
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.hash.written == 0
    }

    /// Checks the content against `expected`, gives it its metadata (and syncs it when every
    /// step is synced): ready for [`Root::commit`]. On a mismatch the file is removed.
    pub fn finish(
        mut self,
        expected: &blake3::Hash,
        target: &Target,
    ) -> Result<Staged, ApplyError> {
        let root = self.root;
        let rel = self.rel.clone();
        // A file that ends in a hole was not written that far.
        if self.short {
            self.file
                .set_len(self.hash.written)
                .map_err(|err| root.io(&rel, "setting the length", err))?;
        }
        let tree = self.hash.finish();
        if tree.root != *expected {
            return Err(ApplyError::HashMismatch {
                path: rel,
                want: *expected,
                got: tree.root,
            });
        }
        set_fd_meta(&self.file, target).map_err(|err| root.io(&rel, "setting metadata", err))?;
        root.step_sync(&self.file, &rel, "syncing the file")?;
        let temp = self.name.take().unwrap_or_default();
        let dir = self.dir.clone();
        Ok(Staged {
            rel,
            dir,
            temp,
            tree,
        })
    }
}

impl TempFile<'_> {
    /// Keeps what was written so far (a prefix of the version hashing to `expected`) under
    /// its partial name, for the next pull to resume from. Returns the bytes kept.
    pub fn keep_partial(mut self, expected: &blake3::Hash) -> u64 {
        let written = self.hash.written;
        if written == 0 || (self.short && self.file.set_len(written).is_err()) {
            return 0;
        }
        let Some(temp) = self.name.take() else {
            return 0;
        };
        let partial = partial_name(expected);
        match renameat(
            self.dir.as_fd(),
            temp.as_os_str(),
            self.dir.as_fd(),
            partial.as_str(),
        ) {
            Ok(()) => written,
            Err(_) => {
                let _ = unlinkat(
                    self.dir.as_fd(),
                    temp.as_os_str(),
                    UnlinkatFlags::NoRemoveDir,
                );
                0
            }
        }
    }
}

impl Drop for TempFile<'_> {
    fn drop(&mut self) {
        if let Some(name) = &self.name {
            // Nothing half-written stays behind; the old version was never touched.
            let _ = unlinkat(
                self.dir.as_fd(),
                name.as_os_str(),
                UnlinkatFlags::NoRemoveDir,
            );
        }
    }
}

impl HashingWriter<'_> {
    /// `len` zero bytes that are not written: a hole in the file, hashed all the same.
    pub fn hole(&mut self, len: u64) {
        self.hash.zeros(len);
        *self.short |= len > 0;
    }
}

/// The file system's unit of allocation, as far as holes go.
const PAGE: u64 = 4096;

static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// Holes of at least this many whole blocks (64 MiB at 16 KiB) are hashed on two threads.
const PARALLEL_ZERO_BLOCKS: u64 = 4096;

/// Writes `buf` at `at`, leaving the pages it covers whole and that hold only zeros
/// unwritten: holes, as `rsync -S` and `cp --sparse` make them, so a sparse file (a
/// preallocated recording, a disk image) stays sparse. Returns whether the buffer's end was
/// written: if not, the length is set when the file is finished ([`TempFile::finish`]).
fn write_sparse(file: &File, at: u64, buf: &[u8]) -> io::Result<bool> {
    let mut pending = 0;
    let mut i = 0;
    while i < buf.len() {
        let abs = at + i as u64;
        let page_end = (((abs / PAGE + 1) * PAGE - at) as usize).min(buf.len());
        let page = &buf[i..page_end];
        if abs.is_multiple_of(PAGE) && page.len() as u64 == PAGE && page == &ZEROS[..page.len()] {
            if pending < i {
                file.write_all_at(&buf[pending..i], at + pending as u64)?;
            }
            pending = page_end;
        }
        i = page_end;
    }
    if pending < buf.len() {
        file.write_all_at(&buf[pending..], at + pending as u64)?;
        return Ok(true);
    }
    Ok(buf.is_empty())
}

/// Parts of a list held before any is handed to the sink: a file of up to 1 GiB (2 MiB of
/// values at 16 KiB blocks) is recorded with its list in one insert. Staged and then renamed,
/// every part was written three times (staged, journalled, moved): 15-50 ms after the last
/// byte of a 256 MiB recording.
const HELD_PARTS: usize = 16;

/// Per-block chaining values of a stream, computed as it passes, and the hash rebuilt from
/// them as they come. With a sink, full parts of the list are handed on and let go beyond the
/// first [`HELD_PARTS`].
struct BlockHasher {
    block_size: BlockSize,
    pending: Vec<u8>,
    /// The values not handed on (all of them without a sink).
    blocks: Vec<Cv>,
    written: u64,
    root: RootBuilder,
    sink: Option<(Arc<dyn PartSink>, RelPath)>,
    /// Parts handed to the sink.
    staged_parts: u64,
}

impl std::fmt::Debug for BlockHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockHasher")
            .field("written", &self.written)
            .field("staged_parts", &self.staged_parts)
            .finish_non_exhaustive()
    }
}

impl BlockHasher {
    /// Values so far.
    fn count(&self) -> u64 {
        self.staged_parts * PART_CVS as u64 + self.blocks.len() as u64
    }

    fn push(&mut self, cv: Cv) {
        self.root.push(cv);
        self.blocks.push(cv);
        // Up to HELD_PARTS parts are held; beyond, every full part is handed on.
        let handed = if self.staged_parts == 0 {
            self.blocks.len() > HELD_PARTS * PART_CVS
        } else {
            self.blocks.len() >= PART_CVS
        };
        let Some((sink, rel)) = self.sink.as_ref().filter(|_| handed) else {
            return;
        };
        let mut staged = 0;
        for part in self.blocks.chunks_exact(PART_CVS) {
            if sink.stage(rel, self.staged_parts, part).is_err() {
                // The list is kept here from this part on; what was handed on stays valid.
                self.sink = None;
                break;
            }
            self.staged_parts += 1;
            staged += part.len();
        }
        self.blocks.drain(..staged);
    }

    /// The value of the full pending block (more follows it).
    fn push_pending(&mut self) {
        let cv = block_cv(&self.pending, self.count(), self.block_size);
        self.push(cv);
        self.pending.clear();
    }

    fn update(&mut self, buf: &[u8]) {
        let bs = self.block_size.get() as usize;
        let mut rest = buf;
        while !rest.is_empty() {
            if self.pending.is_empty() && rest.len() > bs {
                // A whole block with more after it: hashed where it lies, not copied first.
                let (block, after) = rest.split_at(bs);
                let cv = block_cv(block, self.count(), self.block_size);
                self.push(cv);
                rest = after;
                continue;
            }
            let take = (bs - self.pending.len()).min(rest.len());
            self.pending.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            // A full block is hashed once we know more follows (the last one may be the root).
            if self.pending.len() == bs && !rest.is_empty() {
                self.push_pending();
            }
        }
        self.written += buf.len() as u64;
    }

    /// `len` zeros: whole zero blocks of a large hole are hashed on both cores (each block's
    /// value depends only on its position), a part at a time, the rest as it comes.
    fn zeros(&mut self, len: u64) {
        let bs = self.block_size.get();
        let mut left = len;
        let feed = |hasher: &mut BlockHasher, mut n: u64| {
            while n > 0 {
                let take = n.min(ZEROS.len() as u64);
                hasher.update(&ZEROS[..take as usize]);
                n -= take;
            }
        };
        // Up to a block boundary first.
        let to_boundary = (bs - self.pending.len() as u64 % bs) % bs;
        let head = to_boundary.min(left);
        feed(self, head);
        left -= head;
        // Whole blocks, but not the last block of the hole: it stays pending in case nothing
        // follows (a file's last block may be its root).
        let whole = left.saturating_sub(1) / bs;
        // Here the pending block is full, or empty at the very start of the file.
        let aligned = self.pending.is_empty() || self.pending.len() as u64 == bs;
        if whole >= PARALLEL_ZERO_BLOCKS && bs as usize <= ZEROS.len() && aligned {
            if !self.pending.is_empty() {
                // The pending full block is followed by more: hashed now, as `update` would.
                self.push_pending();
            }
            let zero_block = &ZEROS[..bs as usize];
            let block_size = self.block_size;
            let cvs = |from: u64, to: u64| -> Vec<Cv> {
                (from..to)
                    .map(|i| block_cv(zero_block, i, block_size))
                    .collect()
            };
            let mut done = 0u64;
            while done < whole {
                let first = self.count();
                let n = (whole - done).min(PART_CVS as u64);
                let half = n / 2;
                let (low, high) = std::thread::scope(|scope| {
                    let high = scope.spawn(|| cvs(first + half, first + n));
                    (cvs(first, first + half), high.join())
                });
                // A panic in block_cv cannot happen (it hashes a slice); recompute to be safe.
                let high = high.unwrap_or_else(|_| cvs(first + half, first + n));
                for cv in low.into_iter().chain(high) {
                    self.push(cv);
                }
                done += n;
            }
            // The last of these blocks is hashed: more follows (`left` was not a multiple).
            self.written += whole * bs;
            left -= whole * bs;
            // `update` hashes a full pending block only when more follows; the blocks pushed
            // above were all followed by more, so the state is as `update` would leave it,
            // with an empty pending buffer.
        }
        feed(self, left);
    }

    /// The tree hash of everything so far; call once, at the end.
    fn finish(&mut self) -> TreeHash {
        let single = self.written <= self.block_size.get();
        if !self.pending.is_empty() || (single && self.written > 0) {
            let cv = block_cv(&self.pending, self.count(), self.block_size);
            self.push(cv);
        }
        let root = if single {
            blake3::hash(&self.pending)
        } else {
            // The count matches the length by construction, and the file has several blocks.
            std::mem::take(&mut self.root)
                .finish(self.block_size, self.written)
                .ok()
                .flatten()
                .unwrap_or_else(|| blake3::hash(b""))
        };
        TreeHash {
            len: self.written,
            block_size: self.block_size,
            root,
            blocks: std::mem::take(&mut self.blocks),
            staged_parts: self.staged_parts,
        }
    }
}

/// The writer of a [`TempFile`]: computes the per-block chaining values of every byte on its
/// way to the file, so verification (the root rebuilt from them) and the index's block list
/// need no second read.
#[derive(Debug)]
pub struct HashingWriter<'a> {
    file: &'a mut File,
    hash: &'a mut BlockHasher,
    /// Whether the file ends before what was written to it (a hole at the end).
    short: &'a mut bool,
    written_out: Option<&'a mut u64>,
}

/// A large file's write-out to disk is started every this many bytes as it arrives: the disk
/// works while the rest crosses the network, and the sync before its rename finds most of it
/// written instead of writing it all while the transfer waits.
const WRITE_OUT_STEP: u64 = 8 << 20;

impl Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !buf.is_empty() {
            *self.short = !write_sparse(self.file, self.hash.written, buf)?;
        }
        self.hash.update(buf);
        if let Some(out) = self.written_out.as_deref_mut()
            && self.hash.written - *out >= WRITE_OUT_STEP
        {
            start_write_out(self.file, *out, self.hash.written);
            *out = self.hash.written;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Starts writing `from..to` of `file` to disk without waiting for it. `POSIX_FADV_DONTNEED`
/// starts write-back of the range's dirty pages (and drops those already clean: a received
/// file is not read again here); neither nix nor rustix wraps `sync_file_range`, and it would
/// need `unsafe`. Advice only: when it fails, the sync before the rename does it all.
fn start_write_out(file: &File, from: u64, to: u64) {
    use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
    if let (Ok(offset), Ok(len)) = (i64::try_from(from), i64::try_from(to - from)) {
        let _ = posix_fadvise(file, offset, len, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hasher at the start of a file, with no sink.
    fn new() -> BlockHasher {
        BlockHasher {
            block_size: BlockSize::DEFAULT,
            pending: Vec::new(),
            blocks: Vec::new(),
            written: 0,
            root: RootBuilder::default(),
            sink: None,
            staged_parts: 0,
        }
    }

    /// Keeps the parts handed to it; refuses every one from `fail_at` on.
    #[derive(Default)]
    struct Parts {
        kept: std::sync::Mutex<Vec<(u64, Vec<Cv>)>>,
        fail_at: Option<u64>,
    }

    impl PartSink for Parts {
        fn stage(&self, _: &RelPath, part: u64, cvs: &[Cv]) -> io::Result<()> {
            if self.fail_at.is_some_and(|at| part >= at) {
                return Err(io::Error::other("index full"));
            }
            self.kept.lock().unwrap().push((part, cvs.to_vec()));
            Ok(())
        }
    }

    fn cv(i: usize) -> Cv {
        let mut cv = [0u8; 32];
        cv[..8].copy_from_slice(&(i as u64).to_le_bytes());
        cv
    }

    /// Pushes `count` values through a hasher handing its parts to `sink`; returns the values
    /// it kept and how many parts it handed on.
    fn pushed(count: usize, sink: &Arc<Parts>) -> (Vec<Cv>, u64) {
        let mut hasher = new();
        let sink: Arc<dyn PartSink> = sink.clone();
        hasher.sink = Some((sink, RelPath::try_from("rec.wav").unwrap()));
        (0..count).for_each(|i| hasher.push(cv(i)));
        (hasher.blocks, hasher.staged_parts)
    }

    #[test]
    fn lists_up_to_the_held_parts_stay_whole_longer_ones_go_a_part_at_a_time() {
        let whole = HELD_PARTS * PART_CVS;
        let sink = Arc::new(Parts::default());
        let (kept, staged) = pushed(whole, &sink);
        assert_eq!((kept.len(), staged), (whole, 0));
        assert!(sink.kept.lock().unwrap().is_empty());

        // One value more than held: still held. One part more: the held parts go at once,
        // then each part as it fills.
        let sink = Arc::new(Parts::default());
        let (kept, staged) = pushed(whole + 2 * PART_CVS + 5, &sink);
        assert_eq!(staged, HELD_PARTS as u64 + 2);
        assert_eq!(
            kept,
            (0..5)
                .map(|i| cv(whole + 2 * PART_CVS + i))
                .collect::<Vec<_>>()
        );
        let parts = sink.kept.lock().unwrap();
        assert_eq!(parts.len(), HELD_PARTS + 2);
        for (n, (part, cvs)) in parts.iter().enumerate() {
            assert_eq!(*part, n as u64);
            let first = n * PART_CVS;
            assert!(*cvs == (first..first + PART_CVS).map(cv).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_sink_that_fails_leaves_the_list_held_from_the_part_it_refused() {
        let sink = Arc::new(Parts {
            fail_at: Some(3),
            ..Parts::default()
        });
        let count = (HELD_PARTS + 1) * PART_CVS + 7;
        let (kept, staged) = pushed(count, &sink);
        assert_eq!(staged, 3);
        assert!(kept == (3 * PART_CVS..count).map(cv).collect::<Vec<_>>());
        assert_eq!(sink.kept.lock().unwrap().len(), 3);
    }

    /// What the hash of a stream with a hole must be: the same as of its zeros written out.
    fn both_ways(before: usize, hole: u64, after: usize) -> (TreeHash, TreeHash) {
        let (mut holes, mut zeros) = (new(), new());
        let data: Vec<u8> = (0..before.max(after))
            .map(|i| (i % 251) as u8 + 1)
            .collect();
        holes.update(&data[..before]);
        zeros.update(&data[..before]);
        holes.zeros(hole);
        let mut left = hole;
        while left > 0 {
            let n = left.min(1 << 20);
            zeros.update(&vec![0u8; n as usize]);
            left -= n;
        }
        holes.update(&data[..after]);
        zeros.update(&data[..after]);
        (holes.finish(), zeros.finish())
    }

    #[test]
    fn data_written_in_any_pieces_hashes_as_blake3_and_as_written_at_once() {
        let bs = BlockSize::DEFAULT.get() as usize;
        for len in [0, 1, bs - 1, bs, bs + 1, 3 * bs, 3 * bs + 5] {
            let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
            let mut at_once = new();
            at_once.update(&data);
            let at_once = at_once.finish();
            assert_eq!(at_once.root, blake3::hash(&data), "{len}");
            assert_eq!(
                at_once.blocks.len() as u64,
                BlockSize::DEFAULT.blocks_for(len as u64)
            );
            for piece in [1, 7, bs - 1, bs, bs + 1, 2 * bs + 3] {
                let mut pieces = new();
                for part in data.chunks(piece) {
                    pieces.update(part);
                }
                assert_eq!(pieces.finish(), at_once, "{len} in pieces of {piece}");
            }
        }
    }

    #[test]
    fn a_hole_hashes_as_its_zeros_wherever_it_starts_and_ends() {
        let bs = BlockSize::DEFAULT.get();
        let big = PARALLEL_ZERO_BLOCKS * bs;
        for before in [0, 1, 100, bs as usize, bs as usize + 7] {
            for hole in [0, 1, bs - 1, bs, bs + 1, 3 * bs] {
                for after in [0, 5] {
                    let (holes, zeros) = both_ways(before, hole, after);
                    assert_eq!(holes, zeros, "{before} + hole {hole} + {after}");
                }
            }
        }
        // Large enough for two threads: at the start, after a partial block, after a full
        // one, ending on a boundary or not, at the end of the file or not.
        for (before, hole, after) in [
            (0, big + bs, 0),
            (100, big + 3, 9),
            (bs as usize, big + bs, 0),
            (7, 2 * big, 1),
        ] {
            let (holes, zeros) = both_ways(before, hole, after);
            assert_eq!(holes, zeros, "{before} + hole {hole} + {after}");
        }
    }
}
