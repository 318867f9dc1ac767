//! Carrying out a [`Plan`] on the receiving side, and the sender's side of it: its manifest.
//!
//! Content comes from a [`Fetcher`] (the session over mutual TLS; [`LocalFetcher`] for a
//! sender tree on the same machine). A file whose result does not verify (it changed on the
//! sender meanwhile, a copy source was not what the index said) is reported and left for the
//! next pass; a full disk or an unusable root stops the run.

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::Path;

use lbs_protocol::RelPath;
use lbs_protocol::sync::{FileMeta, ManifestEntry, ManifestKind};

use crate::apply::{ApplyError, Root, Target};
use crate::index::{BlockList, PatchedList};
use crate::index::{Entry, EntryKind, Index, IndexError, Known};
use crate::plan::{Action, Basis, Plan, Source};
use crate::tree::{BlockSize, TreeHash};

mod group;
mod receiver;

pub use group::Record;
use group::{Group, with_committer};

use receiver::{Received, Receiver};

/// Receives one file's content as it arrives from a [`Fetcher`].
pub trait Sink {
    /// The next bytes of the whole file.
    fn data(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// The next `len` bytes of the whole file are zeros the sender stores as a hole.
    fn hole(&mut self, len: u64) -> io::Result<()>;
    /// A block transfer begins: `changed` bytes of changed blocks follow, for a file that
    /// will be `size` bytes long.
    fn changes(&mut self, changed: u64, size: u64) -> io::Result<()>;
    /// Changed bytes at `offset`, in increasing order; the bytes between are the receiver's.
    fn at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()>;
    /// The next part of an rsync-style delta against the receiver's version.
    fn delta(&mut self, bytes: &[u8]) -> io::Result<()>;
}

/// Where content the plan needs from the sender comes from.
pub trait Fetcher {
    /// Delivers the sender's current content of `path` (announced as `size` bytes) to
    /// `sink`. With `basis` (the receiver's block values of its version) the sender may send
    /// only the blocks that differ. Returns the file's final size.
    fn fetch(
        &mut self,
        path: &RelPath,
        size: u64,
        basis: Option<(BlockSize, BlockList)>,
        sink: &mut dyn Sink,
    ) -> io::Result<u64>;

    /// Like [`Fetcher::fetch`], asking for a delta against the receiver's version, whose
    /// signature ([`crate::delta::signature_of`]) this is; the sender may send the whole file
    /// instead. Fetchers without deltas send the whole file.
    fn fetch_delta(
        &mut self,
        path: &RelPath,
        size: u64,
        _signature: Vec<u8>,
        sink: &mut dyn Sink,
    ) -> io::Result<u64> {
        self.fetch(path, size, None, sink)
    }
}

/// Looks up what the receiver's index knows of a file about to be replaced.
pub type OldBlocks<'a> = dyn Fn(&RelPath) -> Option<Known> + 'a;

/// Fetches from a sender tree on this machine (whole files).
#[derive(Debug)]
pub struct LocalFetcher {
    root: Root,
}

impl LocalFetcher {
    /// Reads content from the tree at `root`.
    pub fn new(root: &Path) -> Result<Self, ApplyError> {
        Ok(Self {
            root: Root::open(root)?,
        })
    }
}

impl Fetcher for LocalFetcher {
    fn fetch(
        &mut self,
        path: &RelPath,
        _size: u64,
        _basis: Option<(BlockSize, BlockList)>,
        sink: &mut dyn Sink,
    ) -> io::Result<u64> {
        let mut file = self.root.open_file(path).map_err(io::Error::other)?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                return Ok(size);
            }
            sink.data(&buf[..n])?;
            size += n as u64;
        }
    }
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecuteReport {
    /// Actions carried out.
    pub done: u64,
    /// Bytes received from the fetcher.
    pub fetched_bytes: u64,
    /// Bytes copied locally.
    pub copied_bytes: u64,
    /// Files changed in place (a few blocks, behind the journal) rather than rewritten.
    pub patched: u64,
    /// Files whose changed blocks could not be used (and why): fetched whole instead.
    pub refetched: Vec<(RelPath, String)>,
    /// Transfers resumed from what an interrupted pull had kept.
    pub resumed: u64,
    /// Entries left for the next pass, with the reason.
    pub deferred: Vec<(RelPath, String)>,
    /// Owner or group names unknown on this box (left to the default).
    pub unknown_owners: Vec<String>,
    /// Files written and not recorded during the run (see [`execute`]'s `record`), with the
    /// tree hash computed as they were written: the receiver's index records them without
    /// reading them again.
    pub installed: Vec<(RelPath, TreeHash)>,
    /// Files patched in place, with what their new block lists are made of.
    pub patched_lists: Vec<(RelPath, PatchedList)>,
}

/// The id of `name` (looked up once, remembered), or the name itself when it is a number
/// (a sender whose owner has no name).
fn lookup(
    cache: &mut HashMap<String, Option<u32>>,
    name: &str,
    resolve: impl FnOnce(&str) -> Option<u32>,
) -> Option<u32> {
    if let Some(id) = cache.get(name) {
        return *id;
    }
    let id = resolve(name).or_else(|| name.parse().ok());
    cache.insert(name.to_owned(), id);
    id
}

/// Owner and group names to this box's ids (only when we may chown, i.e. as root).
#[derive(Debug, Default)]
struct Ids {
    /// Whether this process may chown (asked once per run, not per file).
    root: bool,
    users: HashMap<String, Option<u32>>,
    groups: HashMap<String, Option<u32>>,
}

impl Ids {
    fn target(&mut self, meta: &FileMeta, report: &mut ExecuteReport) -> Target {
        let owner = if self.root {
            let uid = lookup(&mut self.users, &meta.owner, |name| {
                nix::unistd::User::from_name(name)
                    .ok()
                    .flatten()
                    .map(|u| u.uid.as_raw())
            });
            let gid = lookup(&mut self.groups, &meta.group, |name| {
                nix::unistd::Group::from_name(name)
                    .ok()
                    .flatten()
                    .map(|g| g.gid.as_raw())
            });
            for (name, id) in [(&meta.owner, uid), (&meta.group, gid)] {
                if id.is_none() && !report.unknown_owners.contains(name) {
                    report.unknown_owners.push(name.clone());
                }
            }
            uid.zip(gid)
        } else {
            None
        };
        Target {
            mode: meta.mode,
            owner,
            mtime_ns: meta.mtime_ns,
        }
    }
}

/// Carries out `plan` on `root`, moving deletions into `trash` (a batch from
/// [`crate::Trash::batch`]; needed only when [`Plan::trashes`]) and getting content from
/// `fetcher`; `old_blocks` finds the receiver's block values of a file about to be replaced;
/// `on_progress` hears after every action; `record`, when given, records each group of new
/// files in the receiver's index as soon as it is in place (on the committing thread, while
/// the next group is written), instead of leaving them in [`ExecuteReport::installed`].
///
/// New files are put in place in groups (see [`group`]), committed on a second thread while
/// the next group is written, and always all in place before the directories' metadata steps,
/// so directories get their metadata after their content changed. A fatal error removes the
/// files still staged.
pub fn execute(
    plan: &Plan,
    root: &Root,
    trash: Option<&Root>,
    fetcher: &mut dyn Fetcher,
    old_blocks: &OldBlocks<'_>,
    on_progress: &mut dyn FnMut(&Progress),
    record: Option<&Record<'_>>,
) -> Result<ExecuteReport, ApplyError> {
    with_committer(root, record, |group| {
        run(plan, root, trash, fetcher, old_blocks, on_progress, group)
    })
}

/// The pass's trash batch, which a plan that trashes must be given.
fn no_batch<'t>(trash: Option<&'t Root>, path: &RelPath) -> Result<&'t Root, ApplyError> {
    trash.ok_or_else(|| ApplyError::Io {
        path: path.clone(),
        what: "moving to the trash",
        source: io::Error::other("no trash batch was made for this pass"),
    })
}

fn run(
    plan: &Plan,
    root: &Root,
    trash: Option<&Root>,
    fetcher: &mut dyn Fetcher,
    old_blocks: &OldBlocks<'_>,
    on_progress: &mut dyn FnMut(&Progress),
    group: &mut Group<'_>,
) -> Result<ExecuteReport, ApplyError> {
    let mut report = ExecuteReport::default();
    let mut ids = Ids {
        root: nix::unistd::geteuid().is_root(),
        ..Ids::default()
    };
    let mut progress = Progress {
        actions_total: plan.actions.len() as u64,
        bytes_total: plan.summary.fetch_bytes + plan.summary.local_copy_bytes,
        ..Progress::default()
    };
    on_progress(&progress);
    for (at, action) in plan.actions.iter().enumerate() {
        // Links are made to files in place, directories' metadata set after their content.
        if at == plan.dirs_from || matches!(action, Action::Link { .. }) {
            group.commit(root, &mut report)?;
        } else if group.full() {
            group.hand_off(root, &mut report)?;
        }
        let outcome = match action {
            Action::Trash { path } => root.move_to(path, no_batch(trash, path)?),
            Action::MakeDir { path } => root.make_dir(path),
            Action::SetMeta { path, meta } => root.set_meta(path, &ids.target(meta, &mut report)),
            Action::Link { path, to } => {
                // A member this pass could not bring would spread or lose content.
                match report.deferred.iter().find(|(p, _)| p == to || p == path) {
                    Some((p, _)) => Err(ApplyError::Io {
                        path: path.clone(),
                        what: "linking",
                        source: io::Error::other(format!("{p} was left for the next pass")),
                    }),
                    None => root.hard_link(to, path),
                }
            }
            Action::Symlink { path, target, meta } => {
                root.symlink(path, target, &ids.target(meta, &mut report))
            }
            Action::Fetch {
                path,
                size,
                blake3,
                meta,
                basis,
            } => {
                let target = ids.target(meta, &mut report);
                let known = match basis {
                    Basis::Existing => old_blocks(path),
                    Basis::None => None,
                };
                let expected = blake3::Hash::from(*blake3);
                let job = Job {
                    path,
                    size: *size,
                    expected: &expected,
                    target: &target,
                };
                receive(root, fetcher, &job, known, &mut report, group)
            }
            Action::CopyLocal {
                path,
                from,
                size,
                blake3,
                meta,
            } => {
                let target = ids.target(meta, &mut report);
                let expected = blake3::Hash::from(*blake3);
                let job = Job {
                    path,
                    size: *size,
                    expected: &expected,
                    target: &target,
                };
                let copied = match from {
                    Source::Path(p) => root.open_file(p),
                    Source::Trashed(p) => no_batch(trash, p).and_then(|t| t.open_file(p)),
                }
                .and_then(|mut source| {
                    root.stage(path, &expected, &target, |out| {
                        io::copy(&mut source, out).map(drop)
                    })
                });
                match copied {
                    Ok(staged) => {
                        report.copied_bytes += staged.len();
                        group.add(staged);
                        Ok(())
                    }
                    // The source was not what the index said: get it from the sender.
                    Err(ApplyError::HashMismatch { .. } | ApplyError::Io { .. }) => {
                        receive(root, fetcher, &job, None, &mut report, group)
                    }
                    Err(other) => Err(other),
                }
            }
        };
        match outcome {
            Ok(()) => report.done += 1,
            // This file only (its source changed, a step failed): the next pass retries it.
            Err(err @ (ApplyError::HashMismatch { .. } | ApplyError::Io { .. })) => {
                report
                    .deferred
                    .push((action_path(action).clone(), err.to_string()));
            }
            Err(err @ ApplyError::Interrupted { .. }) => {
                // What is complete and verified goes in place; the rest waits.
                group.commit(root, &mut report)?;
                root.sync()?;
                return Err(err);
            }
            Err(fatal) => return Err(fatal),
        }
        progress.actions_done += 1;
        if let Action::Fetch { size, .. } | Action::CopyLocal { size, .. } = action {
            progress.bytes_done += size;
        }
        on_progress(&progress);
    }
    group.commit(root, &mut report)?;
    root.sync()?;
    Ok(report)
}

/// One file to fetch.
/// The block list of a kept partial: held when it fits in a part, else hashed from the file a
/// part at a time as the request reads it (a partial of a huge recording is not held whole).
fn partial_list(file: &std::fs::File) -> Option<BlockList> {
    use crate::tree::{BlockSize, PART_CVS};
    let len = file.metadata().ok()?.len();
    let block_size = BlockSize::DEFAULT;
    let count = block_size.blocks_for(len);
    if count <= PART_CVS as u64 {
        let tree = crate::tree::hash_file(file, len, block_size).ok()?;
        return Some(BlockList::from(tree.blocks));
    }
    let parts = PartialParts {
        file: file.try_clone().ok()?,
        len,
    };
    Some(BlockList::Stored {
        parts: std::sync::Arc::new(parts),
        count,
    })
}

/// A partial's list, hashed from the file as each part is read.
struct PartialParts {
    file: std::fs::File,
    len: u64,
}

impl crate::index::StoredParts for PartialParts {
    fn part(&self, n: u64) -> Option<Vec<crate::tree::Cv>> {
        let block_size = crate::tree::BlockSize::DEFAULT;
        crate::tree::hash_part(&self.file, self.len, block_size, n).ok()
    }
}

struct Job<'a> {
    path: &'a RelPath,
    size: u64,
    expected: &'a blake3::Hash,
    target: &'a Target,
}

/// Fetches one file: patched in place when few of its blocks changed and `known` (the index's
/// view of the old version) allows, otherwise a new version staged into `group`.
fn receive(
    root: &Root,
    fetcher: &mut dyn Fetcher,
    job: &Job<'_>,
    known: Option<Known>,
    report: &mut ExecuteReport,
    group: &mut Group<'_>,
) -> Result<(), ApplyError> {
    // An interrupted earlier pull may have left part of this very version: resume from it.
    let partial = root
        .open_partial(job.path, job.expected)
        .and_then(|file| partial_list(&file).map(|list| (file, list)));
    let resuming = partial.is_some();
    let (basis, partial) = match partial {
        Some((file, list)) => (Some((crate::tree::BlockSize::DEFAULT, list)), Some(file)),
        None => (
            known.as_ref().map(|k| (k.block_size, k.blocks.clone())),
            None,
        ),
    };
    // Content that shifted in a small file: a rolling delta against the old version.
    let signature = match &known {
        Some(known) if !resuming && crate::delta::wants_delta(known.meta.size, job.size) => {
            old_signature(root, job.path)
        }
        _ => None,
    };
    let mut receiver = Receiver::new(
        root,
        job.path,
        if resuming { None } else { known },
        job.size,
    );
    receiver.partial = partial;
    receiver.expected = Some(*job.expected);
    receiver.mode = job.target.mode;
    let fetched = match signature {
        Some(signature) => fetcher.fetch_delta(job.path, job.size, signature, &mut receiver),
        None => fetcher.fetch(job.path, job.size, basis, &mut receiver),
    };
    report.fetched_bytes += receiver.fetched;
    let size = match fetched {
        Ok(size) => size,
        Err(err) => {
            if let Some(failed) = receiver.failed.take() {
                return Err(failed);
            }
            if err.kind() == io::ErrorKind::ConnectionAborted {
                let kept = receiver.keep_partial(job.expected);
                return Err(ApplyError::Interrupted {
                    path: job.path.clone(),
                    reason: err.to_string(),
                    kept,
                });
            }
            return Err(root.error(job.path, "fetching", err));
        }
    };
    if resuming {
        report.resumed += 1;
    }
    let received = receiver.finish(size, job.expected, job.target);
    if resuming {
        // Used (or proven useless): either way it has served.
        root.remove_partial(job.path, job.expected);
    }
    match received? {
        Received::Staged(staged) => group.add(staged),
        Received::Patched(list) => {
            report.patched += 1;
            report.patched_lists.push((job.path.clone(), list));
        }
        // The old version is untouched: fetch the whole file instead.
        Received::Refetch(reason) => {
            report.refetched.push((job.path.clone(), reason));
            return receive(root, fetcher, job, None, report, group);
        }
    }
    Ok(())
}

/// The rsync signature of the receiver's current version of `path` (small files only).
fn old_signature(root: &Root, path: &RelPath) -> Option<Vec<u8>> {
    let file = root.open_file(path).ok()?;
    let mut old = Vec::new();
    file.take(crate::delta::DELTA_MAX_FILE + 1)
        .read_to_end(&mut old)
        .ok()?;
    (old.len() as u64 <= crate::delta::DELTA_MAX_FILE).then(|| crate::delta::signature_of(&old))
}

/// The path an action is about.
fn action_path(action: &Action) -> &RelPath {
    match action {
        Action::Trash { path }
        | Action::MakeDir { path }
        | Action::Fetch { path, .. }
        | Action::CopyLocal { path, .. }
        | Action::Symlink { path, .. }
        | Action::Link { path, .. }
        | Action::SetMeta { path, .. } => path,
    }
}

/// How far a run has come, for progress bars and status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Actions finished (done or deferred).
    pub actions_done: u64,
    /// Actions in the plan.
    pub actions_total: u64,
    /// Bytes of files fetched or copied so far (their full length, whatever crossed the wire).
    pub bytes_done: u64,
    /// Bytes of all files to fetch or copy.
    pub bytes_total: u64,
    /// How far into the file being fetched now the transfer is (the session updates it as
    /// data arrives; zero between files).
    pub current_bytes: u64,
}

/// The sender's manifest from its (freshly scanned) index. Files with no trusted hash are
/// [`ManifestKind::Pending`]: the receiver keeps what it has until they settle.
pub fn manifest(index: &Index) -> Result<Vec<ManifestEntry>, IndexError> {
    Ok(manifest_of(index.entries()?))
}

/// The manifest of entries as [`Index::entries`] (or [`crate::scan::scan_from`]) gave them.
pub fn manifest_of(entries: Vec<Entry>) -> Vec<ManifestEntry> {
    entries.into_iter().map(manifest_entry).collect()
}

/// One entry as the sender announces it.
pub fn manifest_entry(entry: Entry) -> ManifestEntry {
    let kind = match (entry.kind, entry.hash) {
        (EntryKind::File, Some(hash)) => ManifestKind::File {
            size: entry.meta.size,
            blake3: hash.root,
        },
        (EntryKind::File, None) => ManifestKind::Pending,
        (EntryKind::Dir, _) => ManifestKind::Dir,
        (EntryKind::Symlink(target), _) => ManifestKind::Symlink { target },
    };
    ManifestEntry {
        path: entry.path,
        kind,
        meta: FileMeta {
            mode: entry.meta.mode,
            owner: entry.meta.owner,
            group: entry.meta.group,
            mtime_ns: entry.meta.mtime_ns,
        },
    }
}
