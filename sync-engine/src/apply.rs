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
use nix::errno::Errno;
use nix::fcntl::{OFlag, openat, renameat};
use nix::sys::stat::{Mode, fchmod, futimens, mkdirat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fsync, unlinkat};

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
    /// what passes); the result must hash to `expected`. Returns the bytes written.
    pub fn install(
        &self,
        rel: &RelPath,
        expected: &blake3::Hash,
        target: &Target,
        write: impl FnOnce(&mut HashingWriter<'_>) -> io::Result<()>,
    ) -> Result<u64, ApplyError> {
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
    ) -> Result<u64, ApplyError> {
        let mut writer = HashingWriter {
            file,
            hasher: blake3::Hasher::new(),
            written: 0,
        };
        write(&mut writer).map_err(|err| self.io(rel, "writing", err))?;
        let HashingWriter {
            file,
            hasher,
            written,
        } = writer;
        let got = hasher.finalize();
        if got != *expected {
            return Err(ApplyError::HashMismatch {
                path: rel.clone(),
                want: *expected,
                got,
            });
        }
        if let Some((uid, gid)) = target.owner {
            fchown(
                file.as_fd(),
                Some(Uid::from_raw(uid)),
                Some(Gid::from_raw(gid)),
            )
            .map_err(|err| self.io(rel, "setting the owner", err))?;
        }
        // After chown, which clears set-id bits.
        fchmod(file.as_fd(), Mode::from_bits_truncate(target.mode & 0o7777))
            .map_err(|err| self.io(rel, "setting the mode", err))?;
        let mtime = TimeSpec::new(
            target.mtime_ns.div_euclid(1_000_000_000),
            target.mtime_ns.rem_euclid(1_000_000_000),
        );
        futimens(file.as_fd(), &mtime, &mtime)
            .map_err(|err| self.io(rel, "setting the modification time", err))?;
        fsync(file.as_fd()).map_err(|err| self.io(rel, "syncing the file", err))?;
        renameat(dir.as_fd(), temp, dir.as_fd(), name)
            .map_err(|err| self.io(rel, "renaming into place", err))?;
        fsync(dir.as_fd()).map_err(|err| self.io(rel, "syncing the directory", err))?;
        Ok(written)
    }
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

/// The writer [`Root::install`] hands out: hashes every byte on its way to the file, so
/// verification needs no second read.
#[derive(Debug)]
pub struct HashingWriter<'a> {
    file: &'a mut File,
    hasher: blake3::Hasher,
    written: u64,
}

impl Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}
