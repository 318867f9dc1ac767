//! One pass over a sync root that brings its [`Index`] up to date.
//!
//! Every entry is `lstat`ed; a regular file is read (and hashed) only when its content key
//! (size, mtime, ctime, inode) differs from the index, or its last hash was racy. Symlinks are
//! recorded as links and never followed; sockets, FIFOs and devices are skipped and reported.
//! A file that changes while it is hashed is reported as unstable and left without a trusted
//! hash, for the next pass.

use std::collections::HashMap;
use std::fs::{self, File, Metadata};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use lbs_protocol::RelPath;
use lbs_protocol::sync::{SkipReason, SkippedEntry};

use crate::index::{
    BlockList, ContentHash, Entry, EntryKind, Index, IndexError, Meta, PatchedList,
};
use crate::tree::{BlockSize, Cv, PART_CVS, RootBuilder, TreeError, hash_file_parts};

mod hash;
mod installed;
use hash::{Failure, Grown, Unhashable, grew, hash_appended, hash_stable};
pub use installed::record_installed;

/// How close to the end of hashing a file's mtime may be before its hash is distrusted: file
/// times come from a coarse kernel clock, so a write just after we read can leave them equal.
const RACY_WINDOW: Duration = Duration::from_secs(1);

/// How a pass is run.
#[derive(Clone, Debug, Default)]
pub struct ScanOptions {
    /// The block size for new per-block hashes.
    pub block_size: BlockSize,
    /// Remove lbs's own temporary files left by an interrupted run (receiving side only,
    /// while it holds the root's lock: nobody else may be writing one).
    pub remove_stale_temps: bool,
}

/// What a pass found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanReport {
    /// Regular files seen.
    pub files: u64,
    /// Directories seen (the root not counted).
    pub dirs: u64,
    /// Symlinks seen.
    pub symlinks: u64,
    /// Files read and hashed in this pass.
    pub hashed_files: u64,
    /// Bytes read to hash them.
    pub hashed_bytes: u64,
    /// Entries whose only change was metadata (mode, owner).
    pub metadata_updates: u64,
    /// Entries that were in the index but are gone.
    pub removed: u64,
    /// Entries not synced, with the reason (sockets, FIFOs, devices, unreadable files).
    pub skipped: Vec<SkippedEntry>,
    /// Files that changed while being hashed; the next pass tries again.
    pub unstable: Vec<RelPath>,
    /// Files that grew while being hashed (a call being recorded): listed as the length they
    /// had when hashing began, and hashed again by the next pass that finds them still.
    pub growing: Vec<RelPath>,
    /// Temporary files of an interrupted run that were removed.
    pub stale_temps_removed: u64,
    /// Partial new versions an interrupted pull kept to resume from (see
    /// [`crate::apply::PARTIAL_PREFIX`]); never part of the tree.
    pub partials: Vec<RelPath>,
    /// How long the pass took.
    pub elapsed: Duration,
}

/// Why a pass could not run.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The root is missing or not a directory.
    #[error("sync root {}: {reason}", root.display())]
    Root {
        /// The configured root.
        root: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The index failed.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// Reading the tree failed in a way that makes the pass meaningless.
    #[error("{}: {source}", path.display())]
    Io {
        /// Where.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
}

/// Brings `index` up to date with the tree at `root`.
///
/// The root itself may be a symlink (Debian's `/var/lib/asterisk/moh` is one) and is resolved
/// once; nothing below it is ever followed.
pub fn scan(
    root: &Path,
    index: &mut Index,
    options: &ScanOptions,
) -> Result<ScanReport, ScanError> {
    let known = index.entries()?;
    Ok(scan_from(root, index, options, known)?.0)
}

/// Like [`scan`], starting from `known` — what [`Index::entries`] returned just before, which
/// the caller needed anyway — and returning the index's entries after the pass (sorted by
/// path, as [`Index::entries`] gives them), so that a pass over a large tree reads the index
/// once instead of three times.
pub fn scan_from(
    root: &Path,
    index: &mut Index,
    options: &ScanOptions,
    known: Vec<Entry>,
) -> Result<(ScanReport, Vec<Entry>), ScanError> {
    let started = Instant::now();
    // No symlink on the way to the root: its application's account could otherwise point
    // the scan (and what is served from it) at any directory of the box.
    crate::apply::open_dir_nofollow(root).map_err(|e| ScanError::Root {
        root: root.to_owned(),
        reason: e.to_string(),
    })?;
    let root = fs::canonicalize(root).map_err(|e| ScanError::Root {
        root: root.to_owned(),
        reason: e.to_string(),
    })?;
    // Slots in the index's (path) order: what an entry was, taken out when the walk meets
    // it, then what it is now. The result comes out in path order with no sort. The walk
    // finds a path's slot through the index's paths copied into one buffer: a copy of each
    // path, a hundred thousand small allocations, was a tenth of a large tree's scan.
    let mut path_bytes = Vec::with_capacity(known.iter().map(|e| e.path.as_bytes().len()).sum());
    let mut ends = Vec::with_capacity(known.len());
    for entry in &known {
        path_bytes.extend_from_slice(entry.path.as_bytes());
        ends.push(path_bytes.len());
    }
    let slot_of: HashMap<&[u8], usize> = ends
        .iter()
        .enumerate()
        .map(|(slot, &end)| {
            let start = slot.checked_sub(1).map_or(0, |before| ends[before]);
            (&path_bytes[start..end], slot)
        })
        .collect();
    let batch = index.batch()?;
    let mut pass = Pass {
        batch: &batch,
        block_size: options.block_size,
        names: Names::default(),
        report: ScanReport::default(),
        slot: None,
        met: vec![false; known.len()],
        slots: known.into_iter().map(Some).collect(),
        added: Vec::new(),
    };

    let mut pending: Vec<(PathBuf, Option<RelPath>)> = vec![(root.clone(), None)];
    while let Some((dir, rel_dir)) = pending.pop() {
        let listing = match fs::read_dir(&dir) {
            Ok(listing) => listing,
            // Removed while we walked: its entries count as gone.
            Err(e) if e.kind() == io::ErrorKind::NotFound && rel_dir.is_some() => continue,
            Err(source) => return Err(ScanError::Io { path: dir, source }),
        };
        for item in listing {
            let item = item.map_err(|source| ScanError::Io {
                path: dir.clone(),
                source,
            })?;
            let name = item.file_name();
            if name
                .as_bytes()
                .starts_with(crate::apply::TEMP_PREFIX.as_bytes())
            {
                // A receiver's own unfinished write, never part of the tree. One that names
                // its version (a run killed while fetching it) becomes that version's partial,
                // unless there is one already: the next pull resumes from it.
                if options.remove_stale_temps {
                    let partial = crate::apply::partial_of_temp(name.as_bytes())
                        .filter(|partial| !dir.join(partial).exists())
                        .filter(|partial| fs::rename(item.path(), dir.join(partial)).is_ok());
                    let rel = partial.and_then(|partial| match &rel_dir {
                        Some(parent) => parent.join(std::ffi::OsStr::new(&partial)).ok(),
                        None => RelPath::from_bytes(partial.into_bytes()).ok(),
                    });
                    match rel {
                        Some(rel) => pass.report.partials.push(rel),
                        None => {
                            if fs::remove_file(item.path()).is_ok() {
                                pass.report.stale_temps_removed += 1;
                            }
                        }
                    }
                }
                continue;
            }
            if name
                .as_bytes()
                .starts_with(crate::apply::PARTIAL_PREFIX.as_bytes())
            {
                let rel = match &rel_dir {
                    Some(parent) => parent.join(&name),
                    None => RelPath::from_bytes(name.as_bytes()),
                };
                if let Ok(rel) = rel {
                    pass.report.partials.push(rel);
                }
                continue;
            }
            if rel_dir.is_none() && name.as_bytes() == crate::journal::JOURNAL_NAME.as_bytes() {
                // The receiver's patch journal: `recover` deals with it before any scan.
                continue;
            }
            let rel = match &rel_dir {
                Some(parent) => parent.join(&name),
                None => RelPath::from_bytes(name.as_bytes()),
            };
            let Ok(rel) = rel else {
                // read_dir never yields '.', '..' or names with '/'; nothing else can fail.
                continue;
            };
            let abs = item.path();
            // Relative to the open directory (fstatat, no path walk), never following a link.
            let meta = match item.metadata() {
                Ok(meta) => meta,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    pass.report.skipped.push(unreadable(rel, &e));
                    continue;
                }
            };
            let file_type = meta.file_type();
            let kind = if file_type.is_dir() {
                EntryKind::Dir
            } else if file_type.is_symlink() {
                match fs::read_link(&abs) {
                    Ok(target) => EntryKind::Symlink(target.into_os_string().into_vec()),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        pass.report.skipped.push(unreadable(rel, &e));
                        continue;
                    }
                }
            } else if file_type.is_file() {
                EntryKind::File
            } else {
                let reason = if file_type.is_socket() {
                    SkipReason::Socket
                } else if file_type.is_fifo() {
                    SkipReason::Fifo
                } else {
                    SkipReason::Device
                };
                pass.report.skipped.push(SkippedEntry { path: rel, reason });
                continue;
            };
            let meta = to_meta(&meta, &mut pass.names);
            pass.slot = slot_of.get(rel.as_bytes()).copied();
            let previous = pass.slot.and_then(|slot| {
                // Met twice (readdir may repeat a name renamed meanwhile): no previous.
                let first = !std::mem::replace(&mut pass.met[slot], true);
                if first { pass.slots[slot].take() } else { None }
            });
            match kind {
                EntryKind::Dir => {
                    pass.report.dirs += 1;
                    pending.push((abs, Some(rel.clone())));
                    record_simple(&mut pass, previous, rel, EntryKind::Dir, meta)?;
                }
                EntryKind::Symlink(_) => {
                    pass.report.symlinks += 1;
                    record_simple(&mut pass, previous, rel, kind, meta)?;
                }
                EntryKind::File => {
                    pass.report.files += 1;
                    record_file(&mut pass, previous, rel, &abs, meta)?;
                }
            }
        }
    }
    // What the walk did not meet (or skipped) is gone.
    for (slot, met) in pass.met.iter().enumerate() {
        if !met && let Some(entry) = pass.slots[slot].take() {
            batch.remove(&entry.path)?;
            pass.report.removed += 1;
        }
    }
    let Pass {
        mut report,
        slots,
        mut added,
        ..
    } = pass;
    batch.commit()?;
    // A path met twice (readdir may repeat a name renamed meanwhile): the index holds the
    // later one.
    added.sort_by(|a, b| a.path.cmp(&b.path));
    added.dedup_by(|later, earlier| {
        let same = later.path == earlier.path;
        if same {
            std::mem::swap(later, earlier);
        }
        same
    });
    let entries = merge_sorted(slots.into_iter().flatten(), added);
    report.elapsed = started.elapsed();
    Ok((report, entries))
}

/// Two lists of entries, each in path order and with no path in both, as one.
fn merge_sorted(first: impl Iterator<Item = Entry>, second: Vec<Entry>) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut second = second.into_iter().peekable();
    for entry in first {
        while let Some(before) = second.next_if(|other| other.path < entry.path) {
            out.push(before);
        }
        out.push(entry);
    }
    out.extend(second);
    out
}

/// The state of one pass.
struct Pass<'b, 'i> {
    batch: &'b crate::index::Batch<'i>,
    block_size: BlockSize,
    names: Names,
    report: ScanReport,
    /// The index's slot of the entry being looked at, if it had one.
    slot: Option<usize>,
    /// Whether the walk met each slot's path.
    met: Vec<bool>,
    /// Per slot: what the index held before the pass, until the walk meets it; then what it
    /// holds now.
    slots: Vec<Option<Entry>>,
    /// What the index holds now for entries it did not have.
    added: Vec<Entry>,
}

impl Pass<'_, '_> {
    /// Notes what the index holds for the entry being looked at.
    fn keep(&mut self, entry: Entry) {
        match self.slot {
            Some(slot) => self.slots[slot] = Some(entry),
            None => self.added.push(entry),
        }
    }

    /// Records a new or changed entry.
    fn put(&mut self, entry: Entry, blocks: Option<(BlockSize, &[Cv])>) -> Result<(), ScanError> {
        self.batch.put(&entry, blocks)?;
        self.keep(entry);
        Ok(())
    }
}

/// Directories and symlinks: recorded whole whenever anything about them changed.
fn record_simple(
    pass: &mut Pass<'_, '_>,
    previous: Option<Entry>,
    path: RelPath,
    kind: EntryKind,
    meta: Meta,
) -> Result<(), ScanError> {
    match previous {
        Some(previous) if previous.kind == kind && same_visible_meta(&previous.meta, &meta) => {
            pass.keep(previous);
            Ok(())
        }
        previous => {
            if previous.is_some_and(|p| p.kind == kind) {
                pass.report.metadata_updates += 1;
            }
            let entry = Entry {
                path,
                kind,
                meta,
                hash: None,
            };
            pass.put(entry, None)
        }
    }
}

fn record_file(
    pass: &mut Pass<'_, '_>,
    mut previous: Option<Entry>,
    path: RelPath,
    abs: &Path,
    meta: Meta,
) -> Result<(), ScanError> {
    if let Some(mut prev) = previous.take_if(|prev| {
        prev.kind == EntryKind::File
            && prev.meta.content_key_matches(&meta)
            && prev.hash.as_ref().is_some_and(|h| !h.racy)
    }) {
        if !same_visible_meta(&prev.meta, &meta) {
            pass.report.metadata_updates += 1;
            pass.batch.put_meta(&path, &meta)?;
            prev.meta = meta;
        }
        pass.keep(prev);
        return Ok(());
    }
    // A file that only grew since it was hashed (a call being recorded): its new blocks, not
    // its whole length, every pass. Either way the new block list is staged a part at a time
    // as it is made, and replaces the stored one only if the hash is kept.
    let block_size = pass.block_size;
    let batch = pass.batch;
    let appended = match &previous {
        Some(prev)
            if grew(prev, &meta, block_size) && batch.block_size(&path)? == Some(block_size) =>
        {
            let grown = Grown {
                seen: &meta,
                old_len: prev.meta.size,
                block_size,
            };
            match hash_appended(abs, grown, &mut pass.names, batch, &path) {
                Ok(done) => Some(done),
                Err(Failure::Index(e)) => return Err(e.into()),
                Err(Failure::File(_)) => None,
            }
        }
        _ => None,
    };
    let hashed = match appended {
        Some((root, after, read)) => Ok((root, after, read, true, None)),
        None => hash_stable(abs, &meta, block_size, &mut pass.names, batch, &path).map(|hashed| {
            if hashed.grew {
                pass.report.growing.push(path.clone());
            }
            // What was read: the length the hash is of.
            let read = hashed.meta.size;
            (hashed.root, hashed.meta, read, hashed.grew, hashed.held)
        }),
    };
    match hashed {
        Ok((root, after, read, by_append, held)) => {
            let report = &mut pass.report;
            report.hashed_files += 1;
            report.hashed_bytes += read;
            // A chmod or chown also moves the ctime, so the content was re-verified: report
            // it as what it was.
            let same_content = previous
                .as_ref()
                .is_some_and(|p| p.hash.as_ref().is_some_and(|h| h.root == *root.as_bytes()));
            if same_content && previous.is_some_and(|p| !same_visible_meta(&p.meta, &after)) {
                report.metadata_updates += 1;
            }
            // A hash built on the previous version's blocks, or of a file that grew while it
            // was read, is checked by a full one once the file stops growing (a racy hash is
            // hashed again when its file looks unchanged): a write into the middle of a
            // growing file is not seen by the append path.
            let racy = by_append || is_racy(after.mtime_ns);
            let entry = Entry {
                path,
                kind: EntryKind::File,
                meta: after,
                hash: Some(ContentHash {
                    root: *root.as_bytes(),
                    racy,
                }),
            };
            match held {
                Some(cvs) => pass.batch.put(&entry, Some((block_size, &cvs)))?,
                None => pass.batch.commit_staged(&entry, block_size)?,
            }
            pass.keep(entry);
        }
        Err(Failure::Index(e)) => return Err(e.into()),
        Err(Failure::File(unhashable)) => {
            pass.batch.drop_staged(&path)?;
            match unhashable {
                Unhashable::Changed => {
                    // Keep the entry but with no hash anyone could trust.
                    pass.report.unstable.push(path.clone());
                    let entry = Entry {
                        path,
                        kind: EntryKind::File,
                        meta,
                        hash: None,
                    };
                    pass.put(entry, None)?;
                }
                // The index keeps what it had until the next pass sees the file again (or not).
                Unhashable::Gone => previous.into_iter().for_each(|p| pass.keep(p)),
                Unhashable::Io(e) => {
                    pass.report.skipped.push(unreadable(path, &e));
                    previous.into_iter().for_each(|p| pass.keep(p));
                }
            }
        }
    }
    Ok(())
}

fn is_racy(mtime_ns: i64) -> bool {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    now.saturating_sub(mtime_ns) < RACY_WINDOW.as_nanos() as i64
}

/// The metadata that is carried to the other side (what `ls -l` shows).
fn same_visible_meta(a: &Meta, b: &Meta) -> bool {
    a.mode == b.mode
        && a.owner == b.owner
        && a.group == b.group
        && a.mtime_ns == b.mtime_ns
        && a.size == b.size
        && a.uid == b.uid
        && a.gid == b.gid
}

fn to_meta(meta: &Metadata, names: &mut Names) -> Meta {
    Meta {
        size: if meta.is_file() { meta.len() } else { 0 },
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
        inode: meta.ino(),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        owner: names.user(meta.uid()),
        group: names.group(meta.gid()),
    }
}

/// User and group names by id, looked up once each (through NSS, like `ls`).
#[derive(Default)]
struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Names {
    fn user(&mut self, uid: u32) -> String {
        self.users
            .entry(uid)
            .or_insert_with(|| {
                nix::unistd::User::from_uid(uid.into())
                    .ok()
                    .flatten()
                    .map_or_else(|| uid.to_string(), |user| user.name)
            })
            .clone()
    }

    fn group(&mut self, gid: u32) -> String {
        self.groups
            .entry(gid)
            .or_insert_with(|| {
                nix::unistd::Group::from_gid(gid.into())
                    .ok()
                    .flatten()
                    .map_or_else(|| gid.to_string(), |group| group.name)
            })
            .clone()
    }
}

fn unreadable(path: RelPath, error: &io::Error) -> SkippedEntry {
    SkippedEntry {
        path,
        reason: SkipReason::Unreadable {
            error: error.to_string(),
        },
    }
}
