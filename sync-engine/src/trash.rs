//! A root's trash: what a pull deletes or replaces by another kind goes here, one batch per
//! pass that trashes anything, never straight to nothing; batches older than the retention
//! are purged. The trash directory is held open, so a link planted at its path changes
//! nothing.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use crate::apply::{ApplyError, Root};

/// A root's trash: a directory on the same file system holding one batch per pass (named by
/// its start time), emptied after a retention period. Deleted and replaced-by-another-kind
/// entries go here, never straight to nothing.
#[derive(Debug)]
pub struct Trash {
    path: PathBuf,
    /// The trash directory itself, opened once without following links: batches are made
    /// and emptied through it, so a link planted at its path later changes nothing.
    dir: std::fs::File,
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

    /// Opens (creating, owner-only) the trash at `path`. It sits beside the root, in a
    /// directory the application's account may own: a symlink there, or a directory someone
    /// else made, is refused rather than used.
    pub fn open(path: &Path) -> Result<Self, ApplyError> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt};
        let refused = |source: io::Error| ApplyError::Root {
            root: path.to_owned(),
            source,
        };
        match std::fs::DirBuilder::new().mode(0o700).create(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .map_err(refused)?,
            Err(e) => return Err(refused(e)),
        }
        let dir = crate::apply::open_dir_nofollow(path).map_err(refused)?;
        let meta = dir.metadata().map_err(refused)?;
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != me || meta.mode() & 0o022 != 0 {
            return Err(refused(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "the trash belongs to uid {} with mode {:o}, not to lbs (uid {me}) alone; \
                     remove it and lbs makes its own",
                    meta.uid(),
                    meta.mode() & 0o7777
                ),
            )));
        }
        Ok(Self {
            path: path.to_owned(),
            dir,
        })
    }

    /// The trash directory as opened, as a path (`/proc/self/fd/N`: whatever is at
    /// [`Self::path`] now, this is the directory checked at open).
    fn opened(&self) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}", self.dir.as_raw_fd()))
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
        let path = self.path.join(&name);
        let failed = |source: io::Error| ApplyError::Root {
            root: path.clone(),
            source,
        };
        use std::os::fd::AsFd;
        nix::sys::stat::mkdirat(
            self.dir.as_fd(),
            name.as_str(),
            nix::sys::stat::Mode::from_bits_truncate(0o700),
        )
        .map_err(|e| failed(e.into()))?;
        let dir = nix::fcntl::openat(
            self.dir.as_fd(),
            name.as_str(),
            nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_NOFOLLOW
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| failed(e.into()))?;
        Ok(Root::from_dir(std::fs::File::from(dir), path))
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
        let opened = self.opened();
        for item in std::fs::read_dir(&opened)? {
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
                // Symlinks inside are removed, never followed (and the batch is looked up
                // in the directory opened, not at a path someone may have changed since).
                std::fs::remove_dir_all(opened.join(&name))?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}
