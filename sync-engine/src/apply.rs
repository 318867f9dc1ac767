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

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

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
        /// The path.
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
        /// The path.
        path: RelPath,
        /// The root whose file system is full.
        root: PathBuf,
    },
    /// Any other system call failed.
    #[error("{path}: {what}: {source}")]
    Io {
        /// The path.
        path: RelPath,
        /// Which step.
        what: &'static str,
        /// What the OS said.
        source: io::Error,
    },
    /// The root itself cannot be opened.
    #[error("sync root {}: {source}", root.display())]
    Root {
        /// The root.
        root: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
}

/// An open sync root on the receiving side.
#[derive(Debug)]
pub struct Root {
    dir: File,
    path: PathBuf,
}

impl Root {
    /// Opens the root directory (following a symlink at the root itself, never below).
    pub fn open(path: &Path) -> Result<Root, ApplyError> {
        let dir = File::open(path).map_err(|source| ApplyError::Root {
            root: path.to_owned(),
            source,
        })?;
        let meta = dir.metadata().map_err(|source| ApplyError::Root {
            root: path.to_owned(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(ApplyError::Root {
                root: path.to_owned(),
                source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
            });
        }
        Ok(Root {
            dir,
            path: path.to_owned(),
        })
    }

    /// The root's path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the directory that holds `rel`, one name at a time without following symlinks;
    /// with `create`, missing directories are made (mode 0755, adjusted later by the plan).
    pub fn parent_dir(&self, rel: &RelPath, create: bool) -> Result<File, ApplyError> {
        let mut dir = self.dir.try_clone().map_err(|source| ApplyError::Io {
            path: rel.clone(),
            what: "duplicating the root handle",
            source,
        })?;
        let names: Vec<&OsStr> = rel.names().collect();
        for name in &names[..names.len().saturating_sub(1)] {
            dir = self.open_dir_in(&dir, rel, name, create)?;
        }
        Ok(dir)
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
        let dir = self.parent_dir(rel, true)?;
        let name = rel.file_name();
        let temp = temp_name(name);
        let fd = openat(
            dir.as_fd(),
            temp.as_os_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|err| self.io(rel, "creating a temporary file", err))?;
        let mut file = File::from(fd);
        let result =
            self.fill_and_rename(rel, &dir, &mut file, &temp, name, expected, target, write);
        if result.is_err() {
            // Nothing half-written stays behind; the old version was never touched.
            let _ = unlinkat(dir.as_fd(), temp.as_os_str(), UnlinkatFlags::NoRemoveDir);
        }
        result
    }

    #[allow(clippy::too_many_arguments)] // One step of `install`, split out for its cleanup.
    fn fill_and_rename(
        &self,
        rel: &RelPath,
        dir: &File,
        file: &mut File,
        temp: &OsStr,
        name: &OsStr,
        expected: &blake3::Hash,
        target: &Target,
        write: impl FnOnce(&mut HashingWriter<'_>) -> io::Result<()>,
    ) -> Result<TreeHash, ApplyError> {
        let block_size = BlockSize::DEFAULT;
        let mut writer = HashingWriter {
            file,
            block_size,
            pending: Vec::with_capacity(block_size.get() as usize),
            blocks: Vec::new(),
            written: 0,
        };
        write(&mut writer).map_err(|err| self.io(rel, "writing", err))?;
        let tree = writer.finish();
        let file = writer.file;
        let got = tree.root;
        if got != *expected {
            return Err(ApplyError::HashMismatch {
                path: rel.clone(),
                want: *expected,
                got,
            });
        }
        set_fd_meta(file, target).map_err(|err| self.io(rel, "setting metadata", err))?;
        fsync(file.as_fd()).map_err(|err| self.io(rel, "syncing the file", err))?;
        renameat(dir.as_fd(), temp, dir.as_fd(), name)
            .map_err(|err| self.io(rel, "renaming into place", err))?;
        fsync(dir.as_fd()).map_err(|err| self.io(rel, "syncing the directory", err))?;
        Ok(tree)
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
        fsync(dir.as_fd()).map_err(|err| self.io(rel, "syncing the directory", err))
    }

    fn stat(&self, dir: &File, rel: &RelPath) -> Result<FileStat, ApplyError> {
        fstatat(dir.as_fd(), rel.file_name(), AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|err| self.io(rel, "reading metadata", err))
    }

    /// Creates or replaces a symlink atomically (temp link + rename), with owner and mtime.
    pub fn symlink(&self, rel: &RelPath, target: &[u8], meta: &Target) -> Result<(), ApplyError> {
        let dir = self.parent_dir(rel, false)?;
        let temp = temp_name(rel.file_name());
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
        fsync(dir.as_fd()).map_err(|err| self.io(rel, "syncing the directory", err))
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
        fsync(fd.as_fd()).map_err(|err| self.io(rel, "syncing metadata", err))
    }

    /// Moves `rel` (and everything under it) to the same relative path under `to`, which
    /// must be on the same file system.
    pub fn move_to(&self, rel: &RelPath, to: &Root) -> Result<(), ApplyError> {
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
        fsync(to_dir.as_fd()).map_err(|err| self.io(rel, "syncing the trash", err))?;
        fsync(from_dir.as_fd()).map_err(|err| self.io(rel, "syncing the directory", err))
    }
}

fn is_kind(stat: &FileStat, kind: SFlag) -> bool {
    stat.st_mode & SFlag::S_IFMT.bits() == kind.bits()
}

fn timespec(ns: i64) -> TimeSpec {
    TimeSpec::new(ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000))
}

/// Owner first (chown clears set-id bits), then mode, then mtime.
fn set_fd_meta(fd: &impl AsFd, meta: &Target) -> nix::Result<()> {
    if let Some((uid, gid)) = meta.owner {
        fchown(
            fd.as_fd(),
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
        )?;
    }
    fchmod(fd.as_fd(), Mode::from_bits_truncate(meta.mode & 0o7777))?;
    let mtime = timespec(meta.mtime_ns);
    futimens(fd.as_fd(), &mtime, &mtime)
}

/// A temporary name beside `name`, unique within this process.
fn temp_name(name: &OsStr) -> OsString {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // Keep within NAME_MAX: the original name is only a hint for a person looking.
    let hint: Vec<u8> = name.as_bytes().iter().take(180).copied().collect();
    let mut temp = OsString::from(format!("{TEMP_PREFIX}{}.{n}.", std::process::id()));
    temp.push(OsStr::from_bytes(&hint));
    temp
}

/// The writer [`Root::install`] hands out: computes the per-block chaining values of every
/// byte on its way to the file, so verification (the root rebuilt from them) and the index's
/// block list need no second read.
#[derive(Debug)]
pub struct HashingWriter<'a> {
    file: &'a mut File,
    block_size: BlockSize,
    pending: Vec<u8>,
    blocks: Vec<Cv>,
    written: u64,
}

impl HashingWriter<'_> {
    /// The tree hash of everything written so far; call once, at the end.
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

impl Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        let bs = self.block_size.get() as usize;
        let mut rest = &buf[..n];
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
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}
