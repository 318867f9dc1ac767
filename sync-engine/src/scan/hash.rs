//! Hashing a file the walk met: whole, checked to be the version it was when opened, or by
//! the blocks appended since the index last listed it (a call being recorded).

use super::*;

/// Why a file's hash was not taken: the file, or the index the list was going to.
pub(super) enum Failure {
    File(Unhashable),
    Index(IndexError),
}

impl From<Unhashable> for Failure {
    fn from(unhashable: Unhashable) -> Failure {
        Failure::File(unhashable)
    }
}

impl From<TreeError> for Failure {
    fn from(err: TreeError) -> Failure {
        Failure::File(match err {
            TreeError::Changed { .. } => Unhashable::Changed,
            TreeError::Io(e) => Unhashable::Io(e),
            other => Unhashable::Io(io::Error::other(other)),
        })
    }
}

pub(super) enum Unhashable {
    Changed,
    Gone,
    Io(io::Error),
}

/// Files at least this long are hashed by their appended blocks when they only grew.
const APPEND_MIN_LEN: u64 = 1 << 20;

/// Whether `now` looks like `prev` with more appended: same inode, longer, long enough for
/// the append path to pay, and hashed before (with blocks to build on).
pub(super) fn grew(prev: &Entry, now: &Meta, block_size: BlockSize) -> bool {
    prev.kind == EntryKind::File
        && prev.hash.is_some()
        && prev.meta.inode == now.inode
        && now.size > prev.meta.size
        && prev.meta.size >= APPEND_MIN_LEN.max(2 * block_size.get())
}

/// A file that grew: as seen now, its length when last hashed, the block size of its list.
pub(super) struct Grown<'m> {
    pub(super) seen: &'m Meta,
    pub(super) old_len: u64,
    pub(super) block_size: BlockSize,
}

/// The tree hash of a file that grew from `old_len` bytes, whose list `batch` holds: the first
/// block is read again (a WAV header holds the length and is rewritten as the recording
/// grows), the previous version's last partial block and everything after it are read; the
/// blocks between are taken as they were, one of them checked. The old list is read and the
/// new one staged a part at a time. Returns the hash, the metadata that goes with it, and the
/// bytes read.
pub(super) fn hash_appended(
    abs: &Path,
    grown: Grown<'_>,
    names: &mut Names,
    batch: &crate::index::Batch<'_>,
    path: &RelPath,
) -> Result<(blake3::Hash, Meta, u64), Failure> {
    use std::os::unix::fs::FileExt;
    let Grown {
        seen,
        old_len,
        block_size,
    } = grown;
    let bs = block_size.get();
    let file = open_to_hash(abs)?;
    let before = fstat(&file)?;
    let len = before.len();
    if !before.is_file() || before.ino() != seen.inode || len <= old_len {
        return Err(Unhashable::Changed.into());
    }
    let old_count = block_size.blocks_for(old_len);
    let full = old_len / bs;
    let count = block_size.blocks_for(len);
    // One of the blocks taken as they were is read again, a different one each pass: a file
    // truncated and written anew on the same inode (a log rewritten in place) is caught at
    // once instead of being announced with a hash of blocks it no longer has.
    let sample =
        (full >= 2).then(|| 1 + (full.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 7) % (full - 1));
    let mut buf = vec![0u8; bs as usize];
    let mut read = 0u64;
    let mut block_at = |index: u64| -> Result<Cv, Unhashable> {
        let start = index * bs;
        let n = (len - start).min(bs) as usize;
        file.read_exact_at(&mut buf[..n], start)
            .map_err(|e| match e.kind() {
                // Shorter than when we looked: it changed.
                io::ErrorKind::UnexpectedEof => Unhashable::Changed,
                _ => Unhashable::Io(e),
            })?;
        read += n as u64;
        Ok(crate::tree::block_cv(&buf[..n], index, block_size))
    };
    let mut root = RootBuilder::default();
    let mut out: Vec<Cv> = Vec::with_capacity(PART_CVS);
    for part in 0..count.div_ceil(PART_CVS as u64) {
        let first = part * PART_CVS as u64;
        let end = (first + PART_CVS as u64).min(count);
        let old = if first < full {
            let old = batch.block_part(path, part).map_err(Failure::Index)?;
            let want = (old_count - first).min(PART_CVS as u64) as usize;
            match old {
                Some(old) if old.len() == want => old,
                // The stored list does not fit the length it was stored with.
                _ => return Err(Unhashable::Changed.into()),
            }
        } else {
            Vec::new()
        };
        out.clear();
        for index in first..end {
            let cv = if index == 0 || index >= full {
                block_at(index)?
            } else {
                let kept = old[(index - first) as usize];
                if Some(index) == sample && block_at(index)? != kept {
                    return Err(Unhashable::Changed.into());
                }
                kept
            };
            root.push(cv);
            out.push(cv);
        }
        batch.stage_part(path, part, &out).map_err(Failure::Index)?;
    }
    let root = root
        .finish(block_size, len)
        .ok()
        .flatten()
        .ok_or(Unhashable::Changed)?;
    let after = fstat(&file)?;
    let (before, after) = (to_meta(&before, names), to_meta(&after, names));
    if !before.content_key_matches(&after) {
        return Err(Unhashable::Changed.into());
    }
    Ok((root, after, read))
}

/// Opens a file the walk met, to read it, never through a symlink.
pub(super) fn open_to_hash(abs: &Path) -> Result<File, Unhashable> {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits() | nix::fcntl::OFlag::O_NOCTTY.bits())
        .open(abs)
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Unhashable::Gone,
            // O_NOFOLLOW on a symlink: the file was replaced by a link since the lstat.
            _ if e.raw_os_error() == Some(nix::libc::ELOOP) => Unhashable::Changed,
            _ => Unhashable::Io(e),
        })
}

/// A file hashed whole: its hash, the metadata that goes with it (its size is what was
/// read), whether it grew while it was read, and its list when it is one part (held, not
/// staged).
pub(super) struct Stable {
    pub(super) root: blake3::Hash,
    pub(super) meta: Meta,
    pub(super) grew: bool,
    pub(super) held: Option<Vec<Cv>>,
}

/// Hashes the file at `abs` as it is when opened; returns its tree, the metadata the tree
/// belongs to, and whether it grew meanwhile. A file that only grew while it was read (same
/// inode, longer) is the version of the length it had: its first bytes are what was hashed,
/// and a recording that never stops growing is listed all the same (refused as changed, it
/// was left out of every pass until the call ended). Any other change is
/// [`Unhashable::Changed`].
pub(super) fn hash_stable(
    abs: &Path,
    seen: &Meta,
    block_size: BlockSize,
    names: &mut Names,
    batch: &crate::index::Batch<'_>,
    path: &RelPath,
) -> Result<Stable, Failure> {
    let file = open_to_hash(abs)?;
    let before = fstat(&file)?;
    if !before.is_file() || before.ino() != seen.inode {
        return Err(Unhashable::Changed.into());
    }
    let len = before.len();
    // A list of one part (files up to 64 MiB: nearly all) is held and stored with its entry;
    // longer ones are staged a part at a time from the second part on.
    let mut held: Option<Vec<Cv>> = None;
    let mut part = 0u64;
    let root = hash_file_parts(&file, len, block_size, |cvs| {
        if part == 0 {
            held = Some(cvs.to_vec());
        } else {
            if let Some(first) = held.take() {
                batch.stage_part(path, 0, &first).map_err(Failure::Index)?;
            }
            batch.stage_part(path, part, cvs).map_err(Failure::Index)?;
        }
        part += 1;
        Ok::<(), Failure>(())
    })?;
    // An empty file has an empty list.
    let held = if part <= 1 {
        Some(held.unwrap_or_default())
    } else {
        None
    };
    let after = fstat(&file)?;
    let (before, after) = (to_meta(&before, names), to_meta(&after, names));
    if before.content_key_matches(&after) {
        return Ok(Stable {
            root,
            meta: after,
            grew: false,
            held,
        });
    }
    if after.inode == before.inode && after.size > before.size {
        return Ok(Stable {
            root,
            meta: before,
            grew: true,
            held,
        });
    }
    Err(Unhashable::Changed.into())
}

pub(super) fn fstat(file: &File) -> Result<Metadata, Unhashable> {
    file.metadata().map_err(Unhashable::Io)
}
