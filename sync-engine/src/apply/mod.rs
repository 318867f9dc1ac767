//! Changing files on the receiving side, safely.
//!
//! Every operation goes through a [`Root`]: an open directory handle from which paths are
//! resolved one name at a time with `O_NOFOLLOW`, so neither a symlink in the tree nor a
//! directory swapped for a symlink in the middle of a sync can lead outside the root.
//!
//! A new file version is written by [`Root::install`]: a temporary file in the destination's
//! own directory, hashed as it is written, verified against the sender's BLAKE3, given its
//! mode, owner and mtime, fsynced, renamed over the old version, and the directory fsynced.
//! A crash at any point leaves the old version or the new one; a failure (a wrong hash, a
//! full disk) leaves the old version and no temporary file.
//!
//! Many small files make an fsync per file the whole cost of a sync (about 20 ms each on a
//! plain disk), so a root opened with [`Durability::Grouped`] splits installing in two:
//! [`Root::stage`] writes and verifies the temporary file, and [`Root::commit`] makes a whole
//! group of them durable with one `syncfs`, renames them into place, and syncs again. The
//! promise is the same: a file is renamed only once its content is on disk.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lbs_protocol::RelPath;

use crate::tree::{BlockSize, Cv, PART_CVS, PartSink, RootBuilder, TreeHash, block_cv};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, renameat};
use nix::sys::stat::{
    FileStat, Mode, SFlag, UtimensatFlags, fchmod, fstatat, futimens, mkdirat, utimensat,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, fsync, symlinkat, unlinkat};

/// Names starting with this are lbs's own temporary files; a scan of a receiving root skips
/// them and a restart removes them.
pub const TEMP_PREFIX: &str = ".lbs-tmp.";

/// A new version whose transfer was interrupted is kept beside its file under this prefix
/// and the first 32 hex digits of its BLAKE3: the next pull resumes from it.
pub const PARTIAL_PREFIX: &str = ".lbs-partial.";

/// The name of the partial of content `expected` (see [`PARTIAL_PREFIX`]).
pub fn partial_name(expected: &blake3::Hash) -> String {
    format!("{PARTIAL_PREFIX}{}", &expected.to_hex()[..32])
}

/// The partial name a temporary file left by a run that was killed (`kill -9`, power loss)
/// becomes: the temporary files of fetched versions carry the first 32 hex digits of the
/// version's BLAKE3 right after [`TEMP_PREFIX`], so what reached the disk is resumed from
/// (its blocks are checked against the sender's like any partial's) instead of fetched again.
/// `None` for other temporary files.
pub fn partial_of_temp(name: &[u8]) -> Option<String> {
    let rest = name.strip_prefix(TEMP_PREFIX.as_bytes())?;
    let (hex, after) = (rest.get(..32)?, rest.get(32)?);
    let lower_hex = |b: &u8| b.is_ascii_digit() || (b'a'..=b'f').contains(b);
    (*after == b'.' && hex.iter().all(lower_hex))
        .then(|| format!("{PARTIAL_PREFIX}{}", String::from_utf8_lossy(hex)))
}

/// The metadata a new file version gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Permission bits.
    pub mode: u32,
    /// Owner and group ids on this box (already mapped from the sender's names), or `None`
    /// to leave them as created (when not running as root).
    pub owner: Option<(u32, u32)>,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
}

/// Why a change could not be made. The old version is untouched in every case.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A directory on the way is a symlink or not a directory.
    #[error(
        "{path}: {name:?} on the way is not a plain directory (a symlink?); refusing to follow it"
    )]
    NotADirectory {
        /// The path being changed.
        path: RelPath,
        /// The offending name.
        name: OsString,
    },
    /// What was written does not hash to what the sender announced.
    #[error(
        "{path}: received content hashes to {got}, the sender announced {want}; old version kept"
    )]
    HashMismatch {
        path: RelPath,
        /// The sender's hash.
        want: blake3::Hash,
        /// The received content's hash.
        got: blake3::Hash,
    },
    /// The disk is full.
    #[error(
        "{path}: no space left on the backup's disk in {}; old version kept, free space and \
         sync again",
        root.display()
    )]
    DiskFull {
        path: RelPath,
        /// The root whose file system is full.
        root: PathBuf,
    },
    /// Any other system call failed.
    #[error("{path}: {what}: {source}")]
    Io {
        path: RelPath,
        what: &'static str,
        /// What the OS said.
        source: io::Error,
    },
    /// The transfer stopped (connection lost, or the operator cancelled): the run ends here.
    #[error("{path}: transfer interrupted ({reason}); {kept} byte(s) kept to resume from")]
    Interrupted {
        /// The file being received.
        path: RelPath,
        /// What happened.
        reason: String,
        /// How much of the new version was kept beside it for the next pull.
        kept: u64,
    },
    /// The root itself cannot be opened.
    #[error("sync root {}: {source}", root.display())]
    Root {
        root: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
}

/// When changes reach the disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// Every change is durable before the next begins (fsync per file and directory).
    #[default]
    EachStep,
    /// Changes are made durable in groups ([`Root::commit`], [`Root::sync`]): new content
    /// is synced before it is renamed into place, so each file is still old or new after a
    /// crash, at a fraction of the cost.
    Grouped,
    /// Nothing is synced: for measuring only; a crash can leave files empty.
    Off,
}

/// An open sync root on the receiving side.
pub struct Root {
    dir: File,
    path: PathBuf,
    durability: Durability,
    /// Whether partial versions may lie in the tree (see [`Root::without_partials`]).
    partials: bool,
    /// The directory last opened by [`Root::parent_dir`], by its path: a plan writes in path
    /// order, so most files share the previous one's directory (one handle for them all,
    /// instead of a walk from the root and a handle per file). Dropped when a directory
    /// moves ([`Root::move_to`]).
    last_dir: std::sync::Mutex<Option<(Vec<u8>, Arc<File>)>>,
    /// Where new files' block lists go as they are made (see [`Root::with_part_sink`]).
    part_sink: Option<Arc<dyn crate::tree::PartSink>>,
}

impl std::fmt::Debug for Root {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Root")
            .field("path", &self.path)
            .field("durability", &self.durability)
            .field("partials", &self.partials)
            .field("part_sink", &self.part_sink.is_some())
            .finish_non_exhaustive()
    }
}

/// A new file version written and verified beside its destination, waiting for
/// [`Root::commit`] to rename it into place.
#[derive(Debug)]
pub struct Staged {
    rel: RelPath,
    /// The directory the temporary file is in (and its destination).
    dir: Arc<File>,
    temp: OsString,
    tree: TreeHash,
}

impl Staged {
    pub fn path(&self) -> &RelPath {
        &self.rel
    }

    pub fn len(&self) -> u64 {
        self.tree.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.tree.len == 0
    }
}

impl Root {
    /// Opens the root directory. No component of `path` may be a symlink (see
    /// [`open_dir_nofollow`]): a sync root often sits in a directory its application's
    /// account owns, and that account must not be able to point lbs, running as root,
    /// elsewhere.
    pub fn open(path: &Path) -> Result<Root, ApplyError> {
        let dir = open_dir_nofollow(path).map_err(|source| ApplyError::Root {
            root: path.to_owned(),
            source,
        })?;
        Ok(Root::from_dir(dir, path.to_owned()))
    }

    /// A root on an open directory (`path` for messages).
    pub(crate) fn from_dir(dir: File, path: PathBuf) -> Root {
        Root {
            dir,
            path,
            durability: Durability::EachStep,
            partials: true,
            last_dir: std::sync::Mutex::new(None),
            part_sink: None,
        }
    }

    /// When this root's changes reach the disk.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// The root directory's handle.
    pub(crate) fn handle(&self) -> &File {
        &self.dir
    }

    /// An error about `rel` from a failed step (a full disk recognised as such).
    pub(crate) fn error(
        &self,
        rel: &RelPath,
        what: &'static str,
        err: impl Into<io::Error>,
    ) -> ApplyError {
        self.io(rel, what, err)
    }

    /// Gives an open file its owner, mode and mtime.
    pub(crate) fn set_file_meta(
        &self,
        file: &File,
        rel: &RelPath,
        target: &Target,
    ) -> Result<(), ApplyError> {
        set_fd_meta(file, target).map_err(|err| self.io(rel, "setting metadata", err))
    }

    /// The same root, known to hold no partial versions (its scan found none): no file's
    /// directory is searched for one.
    pub fn without_partials(mut self) -> Root {
        self.partials = false;
        self
    }

    /// The same root, handing the block lists of new files longer than 1 GiB (16 parts) to
    /// `sink` as they are written (their [`TreeHash`]es then hold only what was not handed).
    pub fn with_part_sink(mut self, sink: Arc<dyn crate::tree::PartSink>) -> Root {
        self.part_sink = Some(sink);
        self
    }

    /// The same root with another [`Durability`].
    pub fn with_durability(mut self, durability: Durability) -> Root {
        self.durability = durability;
        self
    }

    /// Syncs `fd` when every step must be durable on its own.
    fn step_sync(
        &self,
        fd: &impl AsFd,
        rel: &RelPath,
        what: &'static str,
    ) -> Result<(), ApplyError> {
        if self.durability == Durability::EachStep {
            fsync(fd.as_fd()).map_err(|err| self.io(rel, what, err))?;
        }
        Ok(())
    }

    /// Makes every change so far durable with one `syncfs` of the root's file system, when
    /// durability is [`Durability::Grouped`] (with `EachStep` they already are).
    pub fn sync(&self) -> Result<(), ApplyError> {
        if self.durability != Durability::Grouped {
            return Ok(());
        }
        nix::unistd::syncfs(self.dir.as_fd()).map_err(|err| ApplyError::Root {
            root: self.path.clone(),
            source: err.into(),
        })
    }

    /// The root's path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the directory that holds `rel`, one name at a time without following symlinks;
    /// with `create`, missing directories are made (mode 0755, adjusted later by the plan).
    pub fn parent_dir(&self, rel: &RelPath, create: bool) -> Result<Arc<File>, ApplyError> {
        let parent = rel.parent_bytes().unwrap_or_default();
        if let Some((cached, dir)) = &*self.cached_dir()
            && cached.as_slice() == parent
        {
            return Ok(dir.clone());
        }
        let mut dir = self.dir.try_clone().map_err(|source| ApplyError::Io {
            path: rel.clone(),
            what: "duplicating the root handle",
            source,
        })?;
        let names: Vec<&OsStr> = rel.names().collect();
        for name in &names[..names.len().saturating_sub(1)] {
            dir = self.open_dir_in(&dir, rel, name, create)?;
        }
        let dir = Arc::new(dir);
        *self.cached_dir() = Some((parent.to_vec(), dir.clone()));
        Ok(dir)
    }

    fn cached_dir(&self) -> std::sync::MutexGuard<'_, Option<(Vec<u8>, Arc<File>)>> {
        self.last_dir.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn open_dir_in(
        &self,
        dir: &File,
        rel: &RelPath,
        name: &OsStr,
        create: bool,
    ) -> Result<File, ApplyError> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        match openat(dir.as_fd(), name, flags, Mode::empty()) {
            Ok(fd) => Ok(File::from(fd)),
            Err(Errno::ENOENT) if create => {
                match mkdirat(dir.as_fd(), name, Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(err) => return Err(self.io(rel, "creating a directory", err)),
                }
                openat(dir.as_fd(), name, flags, Mode::empty())
                    .map(File::from)
                    .map_err(|err| self.not_dir_or(rel, name, err))
            }
            Err(err) => Err(self.not_dir_or(rel, name, err)),
        }
    }

    fn not_dir_or(&self, rel: &RelPath, name: &OsStr, err: Errno) -> ApplyError {
        match err {
            // ELOOP: a symlink under O_NOFOLLOW; ENOTDIR: a file where a directory should be.
            Errno::ELOOP | Errno::ENOTDIR => ApplyError::NotADirectory {
                path: rel.clone(),
                name: name.to_owned(),
            },
            other => self.io(rel, "opening a directory", other),
        }
    }

    fn io(&self, rel: &RelPath, what: &'static str, err: impl Into<io::Error>) -> ApplyError {
        let source: io::Error = err.into();
        if source.raw_os_error() == Some(Errno::ENOSPC as i32)
            || source.kind() == io::ErrorKind::StorageFull
        {
            return ApplyError::DiskFull {
                path: rel.clone(),
                root: self.path.clone(),
            };
        }
        ApplyError::Io {
            path: rel.clone(),
            what,
            source,
        }
    }

    /// Writes a new version of `rel`. `write` fills the new file (through a writer that hashes
    /// what passes); the result must hash to `expected`. Returns its tree hash (length, root,
    /// block values) for the index.
    pub fn install(
        &self,
        rel: &RelPath,
        expected: &blake3::Hash,
        target: &Target,
        write: impl FnOnce(&mut HashingWriter<'_>) -> io::Result<()>,
    ) -> Result<TreeHash, ApplyError> {
        let staged = self.stage(rel, expected, target, write)?;
        let (mut done, failed) = self.commit(vec![staged])?;
        match (done.pop(), failed.into_iter().next()) {
            (Some((_, tree)), _) => Ok(tree),
            (None, Some((_, err))) => Err(err),
            (None, None) => Err(self.io(rel, "renaming into place", Errno::EIO)),
        }
    }

    /// Writes and verifies a new version of `rel` beside it (see [`Root::install`]), without
    /// putting it in place: [`Root::commit`] does that, or [`Root::discard`] removes it.
    pub fn stage(
        &self,
        rel: &RelPath,
        expected: &blake3::Hash,
        target: &Target,
        write: impl FnOnce(&mut HashingWriter<'_>) -> io::Result<()>,
    ) -> Result<Staged, ApplyError> {
        let mut temp = self.create_temp(rel)?;
        write(&mut temp.writer()).map_err(|err| self.io(rel, "writing", err))?;
        temp.finish(expected, target)
    }

    /// A new, empty temporary file beside `rel` to write its next version into; dropped
    /// without [`TempFile::finish`], it is removed.
    pub fn create_temp(&self, rel: &RelPath) -> Result<TempFile<'_>, ApplyError> {
        self.open_temp(rel, None, 0o600)
    }

    /// Like [`Root::create_temp`], for the version hashing to `expected` written from its
    /// start: if this process dies before it is finished, the next scan keeps what reached
    /// the disk as that version's partial (see [`partial_of_temp`]). It is made with the
    /// permission bits of `mode` (the version's own, never set-id or sticky, within this
    /// process's umask) and read-write for this process (which owns it until it is finished):
    /// no wider for anyone else than the file will be, and mostly already right, so
    /// [`TempFile::finish`] need not change them.
    pub fn create_resumable_temp(
        &self,
        rel: &RelPath,
        expected: &blake3::Hash,
        mode: u32,
    ) -> Result<TempFile<'_>, ApplyError> {
        self.open_temp(rel, Some(expected), (mode & 0o777) | 0o600)
    }

    fn open_temp(
        &self,
        rel: &RelPath,
        expected: Option<&blake3::Hash>,
        mode: u32,
    ) -> Result<TempFile<'_>, ApplyError> {
        let dir = self.parent_dir(rel, true)?;
        let temp = temp_name(rel.file_name(), expected);
        let fd = openat(
            dir.as_fd(),
            temp.as_os_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(mode),
        )
        .map_err(|err| self.io(rel, "creating a temporary file", err))?;
        Ok(TempFile::new(self, rel.clone(), dir, temp, File::from(fd)))
    }

    /// Puts staged files in place and syncs the renames: [`Root::put_in_place`], then
    /// [`Root::sync`].
    #[allow(clippy::type_complexity)]
    pub fn commit(
        &self,
        staged: Vec<Staged>,
    ) -> Result<(Vec<(RelPath, TreeHash)>, Vec<(RelPath, ApplyError)>), ApplyError> {
        let placed = self.put_in_place(staged)?;
        self.sync()?;
        Ok(placed)
    }

    /// Puts staged files in place: their content is made durable first (one `syncfs` for the
    /// group, or already by [`Root::stage`] when every step is synced), then each is renamed
    /// over its old version. The renames are durable after the next [`Root::sync`] (a crash
    /// before it leaves each name at its old or its new version, both complete). Returns the
    /// files now in place with their tree hashes, and those that could not be (their
    /// temporary files removed). An error means the group could not be synced: nothing was
    /// renamed, all were removed.
    #[allow(clippy::type_complexity)]
    pub fn put_in_place(
        &self,
        staged: Vec<Staged>,
    ) -> Result<(Vec<(RelPath, TreeHash)>, Vec<(RelPath, ApplyError)>), ApplyError> {
        if staged.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        if let Err(err) = self.sync() {
            self.discard(staged);
            return Err(err);
        }
        let mut done = Vec::with_capacity(staged.len());
        let mut failed = Vec::new();
        for item in staged {
            let dir = &item.dir;
            let renamed = renameat(
                dir.as_fd(),
                item.temp.as_os_str(),
                dir.as_fd(),
                item.rel.file_name(),
            )
            .map_err(|err| self.io(&item.rel, "renaming into place", err))
            .and_then(|()| self.step_sync(dir, &item.rel, "syncing the directory"));
            if renamed.is_err() {
                let _ = unlinkat(
                    dir.as_fd(),
                    item.temp.as_os_str(),
                    UnlinkatFlags::NoRemoveDir,
                );
            }
            match renamed {
                Ok(()) => done.push((item.rel, item.tree)),
                Err(err) => failed.push((item.rel, err)),
            }
        }
        Ok((done, failed))
    }

    /// The partial of content `expected` beside `rel` that an interrupted pull left, if any.
    pub fn open_partial(&self, rel: &RelPath, expected: &blake3::Hash) -> Option<File> {
        if !self.partials {
            return None;
        }
        let dir = self.parent_dir(rel, false).ok()?;
        openat(
            dir.as_fd(),
            partial_name(expected).as_str(),
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .ok()
        .map(File::from)
    }

    /// Removes the partial of content `expected` beside `rel`, if there is one.
    pub fn remove_partial(&self, rel: &RelPath, expected: &blake3::Hash) {
        if let Ok(dir) = self.parent_dir(rel, false) {
            let _ = unlinkat(
                dir.as_fd(),
                partial_name(expected).as_str(),
                UnlinkatFlags::NoRemoveDir,
            );
        }
    }

    /// Removes a file of lbs's own (a stale partial) at `rel`.
    pub fn remove_own_file(&self, rel: &RelPath) {
        if let Ok(dir) = self.parent_dir(rel, false) {
            let _ = unlinkat(dir.as_fd(), rel.file_name(), UnlinkatFlags::NoRemoveDir);
        }
    }

    /// Removes staged files that will not be put in place.
    pub fn discard(&self, staged: Vec<Staged>) {
        for item in staged {
            let _ = unlinkat(
                item.dir.as_fd(),
                item.temp.as_os_str(),
                UnlinkatFlags::NoRemoveDir,
            );
        }
    }
}

fn is_kind(stat: &FileStat, kind: SFlag) -> bool {
    stat.st_mode & SFlag::S_IFMT.bits() == kind.bits()
}

fn timespec(ns: i64) -> TimeSpec {
    TimeSpec::new(ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000))
}

/// Owner first (chown clears set-id bits), then mode, then mtime. Set-user-id and
/// set-group-id never come from the sender on a file (a partner must not be able to plant a
/// set-uid program); a directory keeps set-group-id (group inheritance) and sticky. An owner
/// or mode the file already has is not set again (each is an inode update through the
/// journal: a new file of the right owner skips its chown).
fn set_fd_meta(fd: &impl AsFd, meta: &Target) -> nix::Result<()> {
    let stat = nix::sys::stat::fstat(fd.as_fd())?;
    let mut chowned = false;
    if let Some((uid, gid)) = meta.owner
        && (stat.st_uid != uid || stat.st_gid != gid)
    {
        fchown(
            fd.as_fd(),
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
        )?;
        chowned = true;
    }
    let mut mode = meta.mode & 0o1777;
    if meta.mode & 0o2000 != 0 && stat.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFDIR.bits() {
        mode |= 0o2000;
    }
    // After a chown the set-id bits may have gone: the mode is set whatever it was.
    if chowned || stat.st_mode & 0o7777 != mode {
        fchmod(fd.as_fd(), Mode::from_bits_truncate(mode))?;
    }
    let mtime = timespec(meta.mtime_ns);
    futimens(fd.as_fd(), &mtime, &mtime)
}

mod entries;
mod nofollow;
mod temp;

pub use nofollow::open_dir_nofollow;

use temp::temp_name;
pub use temp::{HashingWriter, TempFile};
