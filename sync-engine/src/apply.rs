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
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lbs_protocol::RelPath;

use crate::tree::{BlockSize, Cv, TreeHash, block_cv, root_from_blocks};
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
#[derive(Debug)]
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
        self.open_temp(rel, None)
    }

    /// Like [`Root::create_temp`], for the version hashing to `expected` written from its
    /// start: if this process dies before it is finished, the next scan keeps what reached
    /// the disk as that version's partial (see [`partial_of_temp`]).
    pub fn create_resumable_temp(
        &self,
        rel: &RelPath,
        expected: &blake3::Hash,
    ) -> Result<TempFile<'_>, ApplyError> {
        self.open_temp(rel, Some(expected))
    }

    fn open_temp(
        &self,
        rel: &RelPath,
        expected: Option<&blake3::Hash>,
    ) -> Result<TempFile<'_>, ApplyError> {
        let dir = self.parent_dir(rel, true)?;
        let temp = temp_name(rel.file_name(), expected);
        let fd = openat(
            dir.as_fd(),
            temp.as_os_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|err| self.io(rel, "creating a temporary file", err))?;
        let block_size = BlockSize::DEFAULT;
        Ok(TempFile {
            root: self,
            rel: rel.clone(),
            dir,
            name: Some(temp),
            file: File::from(fd),
            hash: BlockHasher {
                block_size,
                pending: Vec::with_capacity(block_size.get() as usize),
                blocks: Vec::new(),
                written: 0,
            },
            short: false,
        })
    }

    /// Puts staged files in place: their content is made durable first (one `syncfs` for the
    /// group, or already by [`Root::stage`] when every step is synced), then each is renamed
    /// over its old version, and the renames are synced. Returns the files now in place with
    /// their tree hashes, and those that could not be (their temporary files removed). An
    /// error means the group could not be synced: nothing was renamed, all were removed.
    #[allow(clippy::type_complexity)]
    pub fn commit(
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
        self.sync()?;
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

impl Root {
    /// Opens an existing regular file for reading, never through a symlink.
    pub fn open_file(&self, rel: &RelPath) -> Result<File, ApplyError> {
        let dir = self.parent_dir(rel, false)?;
        let fd = openat(
            dir.as_fd(),
            rel.file_name(),
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
            Mode::empty(),
        )
        .map_err(|err| self.io(rel, "opening", err))?;
        Ok(File::from(fd))
    }

    /// Creates a directory whose parent exists; an existing directory is fine (a re-run).
    pub fn make_dir(&self, rel: &RelPath) -> Result<(), ApplyError> {
        let dir = self.parent_dir(rel, false)?;
        match mkdirat(
            dir.as_fd(),
            rel.file_name(),
            Mode::from_bits_truncate(0o755),
        ) {
            Ok(()) => {}
            Err(Errno::EEXIST) if is_kind(&self.stat(&dir, rel)?, SFlag::S_IFDIR) => {}
            Err(err) => return Err(self.io(rel, "creating a directory", err)),
        }
        self.step_sync(&dir, rel, "syncing the directory")
    }

    fn stat(&self, dir: &File, rel: &RelPath) -> Result<FileStat, ApplyError> {
        fstatat(dir.as_fd(), rel.file_name(), AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|err| self.io(rel, "reading metadata", err))
    }

    /// Makes `to` another name of the file at `from` (a hard link), replacing what is at `to`
    /// atomically: linked under a temporary name, then renamed. Neither name is followed if it
    /// is a symlink; `from` must be a regular file.
    pub fn hard_link(&self, from: &RelPath, to: &RelPath) -> Result<(), ApplyError> {
        let from_dir = self.parent_dir(from, false)?;
        let to_dir = self.parent_dir(to, false)?;
        let is_file = self.stat(&from_dir, from).is_ok_and(|st| {
            SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG
        });
        if !is_file {
            return Err(self.io(
                to,
                "linking",
                io::Error::other(format!("{from} is not a file")),
            ));
        }
        let temp = temp_name(to.file_name(), None);
        nix::unistd::linkat(
            from_dir.as_fd(),
            from.file_name(),
            to_dir.as_fd(),
            temp.as_os_str(),
            AtFlags::empty(),
        )
        .map_err(|err| self.io(to, "linking", err))?;
        let renamed = renameat(
            to_dir.as_fd(),
            temp.as_os_str(),
            to_dir.as_fd(),
            to.file_name(),
        )
        .map_err(|err| self.io(to, "renaming into place", err));
        if renamed.is_err() {
            let _ = unlinkat(to_dir.as_fd(), temp.as_os_str(), UnlinkatFlags::NoRemoveDir);
        }
        renamed?;
        self.step_sync(&to_dir, to, "syncing the directory")
    }

    /// Creates or replaces a symlink atomically (temp link + rename), with owner and mtime.
    pub fn symlink(&self, rel: &RelPath, target: &[u8], meta: &Target) -> Result<(), ApplyError> {
        let dir = self.parent_dir(rel, false)?;
        let temp = temp_name(rel.file_name(), None);
        symlinkat(OsStr::from_bytes(target), dir.as_fd(), temp.as_os_str())
            .map_err(|err| self.io(rel, "creating a symlink", err))?;
        let result = self
            .link_meta(&dir, temp.as_os_str(), rel, meta)
            .and_then(|()| {
                renameat(dir.as_fd(), temp.as_os_str(), dir.as_fd(), rel.file_name())
                    .map_err(|err| self.io(rel, "renaming into place", err))
            });
        if result.is_err() {
            let _ = unlinkat(dir.as_fd(), temp.as_os_str(), UnlinkatFlags::NoRemoveDir);
        }
        result?;
        self.step_sync(&dir, rel, "syncing the directory")
    }

    fn link_meta(
        &self,
        dir: &File,
        name: &OsStr,
        rel: &RelPath,
        meta: &Target,
    ) -> Result<(), ApplyError> {
        if let Some((uid, gid)) = meta.owner {
            fchownat(
                dir.as_fd(),
                name,
                Some(Uid::from_raw(uid)),
                Some(Gid::from_raw(gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|err| self.io(rel, "setting the owner", err))?;
        }
        let mtime = timespec(meta.mtime_ns);
        utimensat(
            dir.as_fd(),
            name,
            &mtime,
            &mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|err| self.io(rel, "setting the modification time", err))
    }

    /// Sets owner, mode and mtime of an existing entry (a symlink's mode is left alone).
    pub fn set_meta(&self, rel: &RelPath, meta: &Target) -> Result<(), ApplyError> {
        let dir = self.parent_dir(rel, false)?;
        if is_kind(&self.stat(&dir, rel)?, SFlag::S_IFLNK) {
            return self.link_meta(&dir, rel.file_name(), rel, meta);
        }
        let fd = openat(
            dir.as_fd(),
            rel.file_name(),
            OFlag::O_RDONLY
                | OFlag::O_NOFOLLOW
                | OFlag::O_CLOEXEC
                | OFlag::O_NONBLOCK
                | OFlag::O_NOCTTY,
            Mode::empty(),
        )
        .map_err(|err| self.io(rel, "opening", err))?;
        set_fd_meta(&fd, meta).map_err(|err| self.io(rel, "setting metadata", err))?;
        self.step_sync(&fd, rel, "syncing metadata")
    }

    /// Moves `rel` (and everything under it) to the same relative path under `to`, which
    /// must be on the same file system.
    pub fn move_to(&self, rel: &RelPath, to: &Root) -> Result<(), ApplyError> {
        // A directory may be what moves: no handle opened by path survives it.
        *self.cached_dir() = None;
        *to.cached_dir() = None;
        let from_dir = self.parent_dir(rel, false)?;
        let to_dir = to.parent_dir(rel, true)?;
        renameat(
            from_dir.as_fd(),
            rel.file_name(),
            to_dir.as_fd(),
            rel.file_name(),
        )
        .map_err(|err| match err {
            Errno::EXDEV => ApplyError::Io {
                path: rel.clone(),
                what: "moving to the trash",
                source: io::Error::other(format!(
                    "the trash {} is on another file system than {}; configure a trash \
                         directory on the same file system",
                    to.path.display(),
                    self.path.display()
                )),
            },
            other => self.io(rel, "moving to the trash", other),
        })?;
        self.step_sync(&to_dir, rel, "syncing the trash")?;
        self.step_sync(&from_dir, rel, "syncing the directory")
    }
}

fn is_kind(stat: &FileStat, kind: SFlag) -> bool {
    stat.st_mode & SFlag::S_IFMT.bits() == kind.bits()
}

fn timespec(ns: i64) -> TimeSpec {
    TimeSpec::new(ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000))
}

/// Opens the directory at `path`, one component at a time with `O_NOFOLLOW`, following a
/// symlink on the way only where nobody but root (or this process's own user) could have put
/// it: in a directory they own that no group or other may write. A sync root often sits in a
/// directory its application's account owns (`/var/spool/asterisk`); a link there is that
/// account's to change, and lbs, running as root, must not write or serve where it points.
/// Such a link is refused with an error that names it and where it points.
pub fn open_dir_nofollow(path: &Path) -> io::Result<File> {
    const MAX_LINKS: u32 = 16;
    let mut path = path.to_owned();
    let mut links = 0;
    'restart: loop {
        use std::path::Component;
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let start = if path.is_absolute() { "/" } else { "." };
        let mut dir = File::open(start)?;
        let mut walked = PathBuf::from(start);
        let components: Vec<Component<'_>> = path.components().collect();
        for (i, component) in components.iter().enumerate() {
            let name = match component {
                Component::RootDir | Component::CurDir => continue,
                Component::Prefix(_) => return Err(io::Error::other("not a Unix path")),
                Component::ParentDir => OsStr::new(".."),
                Component::Normal(name) => name,
            };
            let parent = walked.clone();
            walked.push(name);
            match openat(dir.as_fd(), name, flags, Mode::empty()) {
                Ok(fd) => dir = File::from(fd),
                // A symlink gives ELOOP or (with O_DIRECTORY) ENOTDIR: look at what it is.
                Err(Errno::ELOOP | Errno::ENOTDIR) => {
                    let is_link = fstatat(dir.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW)
                        .is_ok_and(|stat| is_kind(&stat, SFlag::S_IFLNK));
                    if !is_link {
                        return Err(io::Error::new(
                            io::ErrorKind::NotADirectory,
                            format!("{} is not a directory", walked.display()),
                        ));
                    }
                    let target = PathBuf::from(OsString::from_vec(
                        nix::fcntl::readlinkat(dir.as_fd(), name)?.into_encoded_bytes(),
                    ));
                    let trusted = nix::sys::stat::fstat(dir.as_fd()).is_ok_and(|stat| {
                        (stat.st_uid == 0 || stat.st_uid == nix::unistd::geteuid().as_raw())
                            && stat.st_mode & 0o022 == 0
                    });
                    if !trusted {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!(
                                "{} is a symbolic link (to {}) in a directory others may \
                                 change; lbs follows none there on the way to a tree it writes \
                                 or serves: configure the real path",
                                walked.display(),
                                target.display()
                            ),
                        ));
                    }
                    links += 1;
                    if links > MAX_LINKS {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!("too many symbolic links on the way to {}", path.display()),
                        ));
                    }
                    // Go on from where the link points, then the rest of the path.
                    let mut next = parent.join(target);
                    for rest in &components[i + 1..] {
                        next.push(rest.as_os_str());
                    }
                    path = next;
                    continue 'restart;
                }
                Err(err) => return Err(err.into()),
            }
        }
        return Ok(dir);
    }
}

/// Owner first (chown clears set-id bits), then mode, then mtime. Set-user-id and
/// set-group-id never come from the sender on a file (a partner must not be able to plant a
/// set-uid program); a directory keeps set-group-id (group inheritance) and sticky.
fn set_fd_meta(fd: &impl AsFd, meta: &Target) -> nix::Result<()> {
    if let Some((uid, gid)) = meta.owner {
        fchown(
            fd.as_fd(),
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
        )?;
    }
    let mut mode = meta.mode & 0o1777;
    if meta.mode & 0o2000 != 0
        && nix::sys::stat::fstat(fd.as_fd())?.st_mode & SFlag::S_IFMT.bits()
            == SFlag::S_IFDIR.bits()
    {
        mode |= 0o2000;
    }
    fchmod(fd.as_fd(), Mode::from_bits_truncate(mode))?;
    let mtime = timespec(meta.mtime_ns);
    futimens(fd.as_fd(), &mtime, &mtime)
}

/// A temporary name beside `name`, unique within this process; it names the version it will
/// hold when that is known (see [`partial_of_temp`]).
fn temp_name(name: &OsStr, expected: Option<&blake3::Hash>) -> OsString {
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
}

impl TempFile<'_> {
    /// A writer that appends to the file, hashing what passes.
    pub fn writer(&mut self) -> HashingWriter<'_> {
        HashingWriter {
            file: &mut self.file,
            hash: &mut self.hash,
            short: &mut self.short,
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

/// Per-block chaining values of a stream, computed as it passes.
#[derive(Debug)]
struct BlockHasher {
    block_size: BlockSize,
    pending: Vec<u8>,
    blocks: Vec<Cv>,
    written: u64,
}

impl BlockHasher {
    fn update(&mut self, buf: &[u8]) {
        let bs = self.block_size.get() as usize;
        let mut rest = buf;
        while !rest.is_empty() {
            let take = (bs - self.pending.len()).min(rest.len());
            self.pending.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            // A full block is hashed once we know more follows (the last one may be the root).
            if self.pending.len() == bs && !rest.is_empty() {
                let idx = self.blocks.len() as u64;
                self.blocks
                    .push(block_cv(&self.pending, idx, self.block_size));
                self.pending.clear();
            }
        }
        self.written += buf.len() as u64;
    }

    /// `len` zeros: whole zero blocks of a large hole are hashed on both cores (each block's
    /// value depends only on its position), the rest as it comes.
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
                let idx = self.blocks.len() as u64;
                self.blocks
                    .push(block_cv(&self.pending, idx, self.block_size));
                self.pending.clear();
            }
            let first = self.blocks.len() as u64;
            let zero_block = &ZEROS[..bs as usize];
            let half = whole / 2;
            let block_size = self.block_size;
            let cvs = |from: u64, to: u64| -> Vec<Cv> {
                (from..to)
                    .map(|i| block_cv(zero_block, i, block_size))
                    .collect()
            };
            let (low, high) = std::thread::scope(|scope| {
                let high = scope.spawn(|| cvs(first + half, first + whole));
                (cvs(first, first + half), high.join())
            });
            self.blocks.extend(low);
            match high {
                Ok(high) => self.blocks.extend(high),
                // A panic in block_cv cannot happen (it hashes a slice); recompute to be safe.
                Err(_) => self.blocks.extend(cvs(first + half, first + whole)),
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
            let idx = self.blocks.len() as u64;
            self.blocks
                .push(block_cv(&self.pending, idx, self.block_size));
        }
        let root = if single {
            blake3::hash(&self.pending)
        } else {
            // The count matches the length by construction, and the file has several blocks.
            root_from_blocks(&self.blocks, self.block_size, self.written)
                .ok()
                .flatten()
                .unwrap_or_else(|| blake3::hash(b""))
        };
        TreeHash {
            len: self.written,
            block_size: self.block_size,
            root,
            blocks: std::mem::take(&mut self.blocks),
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
}

impl Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !buf.is_empty() {
            *self.short = !write_sparse(self.file, self.hash.written, buf)?;
        }
        self.hash.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the hash of a stream with a hole must be: the same as of its zeros written out.
    fn both_ways(before: usize, hole: u64, after: usize) -> (TreeHash, TreeHash) {
        let new = || BlockHasher {
            block_size: BlockSize::DEFAULT,
            pending: Vec::new(),
            blocks: Vec::new(),
            written: 0,
        };
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
