//! Everything in a sync root but a file's content: opening a file to read, directories,
//! hard links, symlinks, metadata, and moving an entry to the trash — each by directory
//! handle, never through a symlink.

use super::*;

impl Root {
    /// Opens an existing regular file for reading, never through a symlink.
    pub fn open_file(&self, rel: &RelPath) -> Result<File, ApplyError> {
        self.open_file_stat(rel).map(|(file, _)| file)
    }

    /// [`Root::open_file`], with the file's status as it was opened (a sender's every small
    /// file: one `fstat` instead of two).
    pub fn open_file_stat(
        &self,
        rel: &RelPath,
    ) -> Result<(File, nix::sys::stat::FileStat), ApplyError> {
        let dir = self.parent_dir(rel, false)?;
        let fd = self.open_in(&dir, rel)?;
        let stat = nix::sys::stat::fstat(&fd).map_err(|err| self.io(rel, "opening", err))?;
        if !is_kind(&stat, SFlag::S_IFREG) {
            let err = io::Error::other("not a regular file (a FIFO, socket or device): left alone");
            return Err(self.io(rel, "opening", err));
        }
        Ok((File::from(fd), stat))
    }

    /// Opens `rel`'s entry in `dir` for reading, never through a symlink. Non-blocking: a
    /// FIFO put where a file was (after the scan) would otherwise hold the open until someone
    /// writes to it. A regular file or directory ignores the flag.
    fn open_in(&self, dir: &File, rel: &RelPath) -> Result<std::os::fd::OwnedFd, ApplyError> {
        openat(
            dir.as_fd(),
            rel.file_name(),
            OFlag::O_RDONLY
                | OFlag::O_NOFOLLOW
                | OFlag::O_CLOEXEC
                | OFlag::O_NOCTTY
                | OFlag::O_NONBLOCK,
            Mode::empty(),
        )
        .map_err(|err| self.io(rel, "opening", err))
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
        let fd = self.open_in(&dir, rel)?;
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
