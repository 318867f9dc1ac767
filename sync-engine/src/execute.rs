//! Carrying out a [`Plan`] on the receiving side, and the sender's side of it: its manifest.
//!
//! Content comes from a [`Fetcher`] (the session over mutual TLS; [`LocalFetcher`] for a
//! sender tree on the same machine). A file whose result does not verify (it changed on the
//! sender meanwhile, a copy source was not what the index said) is reported and left for the
//! next pass; a full disk or an unusable root stops the run.

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use lbs_protocol::RelPath;
use lbs_protocol::sync::{FileMeta, ManifestEntry, ManifestKind};

use crate::apply::{ApplyError, Root, Target};
use crate::index::{Entry, EntryKind, Index, IndexError};
use crate::plan::{Action, Basis, Plan, Source};
use crate::tree::{BlockSize, Cv, TreeHash};

/// The receiver's current version of a file it is about to replace: the sender then sends
/// only the blocks whose values differ, and the rest is copied from here.
#[derive(Debug)]
pub struct OldVersion {
    /// The old file, open for reading (it stays in place until the new one is renamed over it).
    pub file: std::fs::File,
    /// The block size of `blocks`.
    pub block_size: BlockSize,
    /// Its per-block chaining values, from the receiver's index.
    pub blocks: Vec<Cv>,
}

/// Where content the plan needs from the sender comes from.
pub trait Fetcher {
    /// Writes the sender's current content of `path` (announced as `size` bytes) to `out`,
    /// using `old` (the receiver's current version) where the fetcher can; returns the bytes
    /// that came from the sender (blocks kept from `old` not counted).
    fn fetch(
        &mut self,
        path: &RelPath,
        size: u64,
        old: Option<OldVersion>,
        out: &mut dyn Write,
    ) -> io::Result<u64>;
}

/// Looks up the receiver's block values of a file (from its index).
pub type OldBlocks<'a> = dyn Fn(&RelPath) -> Option<(BlockSize, Vec<Cv>)> + 'a;

/// Fetches from a sender tree on this machine.
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
        _old: Option<OldVersion>,
        out: &mut dyn Write,
    ) -> io::Result<u64> {
        let mut file = self.root.open_file(path).map_err(io::Error::other)?;
        io::copy(&mut file, out)
    }
}

/// A root's trash: a directory on the same file system holding one batch per pass (named by
/// its start time), emptied after a retention period. Deleted and replaced-by-another-kind
/// entries go here, never straight to nothing.
#[derive(Debug)]
pub struct Trash {
    path: PathBuf,
}

impl Trash {
    /// The default trash of a root: `.<name>.lbs-trash` beside it (same file system as long
    /// as the root is not itself a mount point).
    pub fn default_for(root: &Path) -> PathBuf {
        let name = root
            .file_name()
            .map_or_else(|| "root".into(), |n| n.to_string_lossy().into_owned());
        root.with_file_name(format!(".{name}.lbs-trash"))
    }

    /// Opens (creating, owner-only) the trash at `path`.
    pub fn open(path: &Path) -> Result<Self, ApplyError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|source| ApplyError::Root {
                root: path.to_owned(),
                source,
            })?;
        Ok(Self {
            path: path.to_owned(),
        })
    }

    /// Starts a new batch for one pass.
    pub fn batch(&self) -> Result<Root, ApplyError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let secs = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let name = format!(
            "{secs}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = self.path.join(name);
        std::fs::create_dir(&path).map_err(|source| ApplyError::Root {
            root: path.clone(),
            source,
        })?;
        Root::open(&path)
    }

    /// Removes batches older than `retention`; returns how many went.
    pub fn purge(&self, retention: Duration) -> io::Result<u64> {
        self.purge_at(retention, SystemTime::now())
    }

    /// [`Trash::purge`] as if the time were `now`.
    pub fn purge_at(&self, retention: Duration, now: SystemTime) -> io::Result<u64> {
        let now = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut removed = 0;
        for item in std::fs::read_dir(&self.path)? {
            let item = item?;
            let name = item.file_name();
            let Some(started) = name
                .to_str()
                .and_then(|n| n.split('-').next())
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            if now.saturating_sub(started) > retention.as_secs() {
                // Symlinks inside are removed, never followed.
                std::fs::remove_dir_all(item.path())?;
                removed += 1;
            }
        }
        Ok(removed)
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
    /// Entries left for the next pass, with the reason.
    pub deferred: Vec<(RelPath, String)>,
    /// Owner or group names unknown on this box (left to the default).
    pub unknown_owners: Vec<String>,
    /// Files written, with the tree hash computed as they were written: the receiver's index
    /// records them without reading them again.
    pub installed: Vec<(RelPath, TreeHash)>,
}

/// Owner and group names to this box's ids (only when we may chown, i.e. as root).
#[derive(Debug, Default)]
struct Ids {
    users: HashMap<String, Option<u32>>,
    groups: HashMap<String, Option<u32>>,
}

impl Ids {
    fn target(&mut self, meta: &FileMeta, report: &mut ExecuteReport) -> Target {
        let owner = if nix::unistd::geteuid().is_root() {
            let uid = *self.users.entry(meta.owner.clone()).or_insert_with(|| {
                nix::unistd::User::from_name(&meta.owner)
                    .ok()
                    .flatten()
                    .map(|u| u.uid.as_raw())
                    .or_else(|| meta.owner.parse().ok())
            });
            let gid = *self.groups.entry(meta.group.clone()).or_insert_with(|| {
                nix::unistd::Group::from_name(&meta.group)
                    .ok()
                    .flatten()
                    .map(|g| g.gid.as_raw())
                    .or_else(|| meta.group.parse().ok())
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
/// [`Trash::batch`]) and getting content from `fetcher`; `old_blocks` finds the receiver's
/// block values of a file about to be replaced; `on_progress` hears after every action.
pub fn execute(
    plan: &Plan,
    root: &Root,
    trash: &Root,
    fetcher: &mut dyn Fetcher,
    old_blocks: &OldBlocks<'_>,
    on_progress: &mut dyn FnMut(&Progress),
) -> Result<ExecuteReport, ApplyError> {
    let mut report = ExecuteReport::default();
    let mut ids = Ids::default();
    let mut progress = Progress {
        actions_total: plan.actions.len() as u64,
        bytes_total: plan.summary.fetch_bytes + plan.summary.local_copy_bytes,
        ..Progress::default()
    };
    on_progress(&progress);
    for action in &plan.actions {
        let outcome = match action {
            Action::Trash { path } => root.move_to(path, trash),
            Action::MakeDir { path } => root.make_dir(path),
            Action::SetMeta { path, meta } => root.set_meta(path, &ids.target(meta, &mut report)),
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
                let old = match basis {
                    Basis::Existing => old_blocks(path).and_then(|(block_size, blocks)| {
                        let file = root.open_file(path).ok()?;
                        Some(OldVersion {
                            file,
                            block_size,
                            blocks,
                        })
                    }),
                    Basis::None => None,
                };
                root.install(path, &blake3::Hash::from(*blake3), &target, |out| {
                    report.fetched_bytes += fetcher.fetch(path, *size, old, out)?;
                    Ok(())
                })
                .map(|tree| report.installed.push((path.clone(), tree)))
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
                let copied = match from {
                    Source::Path(p) => root.open_file(p),
                    Source::Trashed(p) => trash.open_file(p),
                }
                .and_then(|mut source| {
                    root.install(path, &expected, &target, |out| {
                        io::copy(&mut source, out).map(drop)
                    })
                });
                match copied {
                    Ok(tree) => {
                        report.copied_bytes += tree.len;
                        report.installed.push((path.clone(), tree));
                        Ok(())
                    }
                    // The source was not what the index said: get it from the sender.
                    Err(ApplyError::HashMismatch { .. } | ApplyError::Io { .. }) => root
                        .install(path, &expected, &target, |out| {
                            report.fetched_bytes += fetcher.fetch(path, *size, None, out)?;
                            Ok(())
                        })
                        .map(|tree| report.installed.push((path.clone(), tree))),
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
            Err(fatal) => return Err(fatal),
        }
        progress.actions_done += 1;
        if let Action::Fetch { size, .. } | Action::CopyLocal { size, .. } = action {
            progress.bytes_done += size;
        }
        on_progress(&progress);
    }
    Ok(report)
}

/// The path an action is about.
fn action_path(action: &Action) -> &RelPath {
    match action {
        Action::Trash { path }
        | Action::MakeDir { path }
        | Action::Fetch { path, .. }
        | Action::CopyLocal { path, .. }
        | Action::Symlink { path, .. }
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
    Ok(index.entries()?.into_iter().map(manifest_entry).collect())
}

fn manifest_entry(entry: Entry) -> ManifestEntry {
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
