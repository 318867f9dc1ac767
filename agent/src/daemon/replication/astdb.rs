//! The astdb (Asterisk's SQLite database): a consistent snapshot on the primary, installed
//! atomically on the backup.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};

/// Copies the astdb consistently (SQLite's online backup) into the snapshot directory.
pub(crate) fn snapshot_astdb(source: &Path, dir: &Path) -> anyhow::Result<()> {
    let Some(name) = source.file_name() else {
        bail!("astdb {} has no file name", source.display());
    };
    match std::fs::symlink_metadata(source) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err).with_context(|| format!("looking at {}", source.display())),
        // Asterisk's account owns the directory: a link there could name any database of
        // the box, which would then travel to the partner.
        Ok(meta) if meta.file_type().is_symlink() => bail!(
            "{} is a symbolic link; lbs copies only the file itself (configure the real path)",
            source.display()
        ),
        Ok(_) => {}
    }
    let tmp = dir.join(format!(".{}.lbs-snapshot", name.to_string_lossy()));
    let _ = std::fs::remove_file(&tmp);
    let db = rusqlite::Connection::open_with_flags(
        source,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening {}", source.display()))?;
    db.busy_timeout(Duration::from_secs(5))?;
    db.backup(
        rusqlite::MAIN_DB,
        &tmp,
        None::<fn(rusqlite::backup::Progress)>,
    )
    .with_context(|| format!("copying {} with SQLite's online backup", source.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

/// Puts the pulled astdb copy in place, atomically (the PBX is stopped on a backup), with
/// the owner and mode of the file it replaces (Asterisk, running as its own account, must
/// still write it after P; with no file yet, the directory's owner and 0640).
///
/// The directory is Asterisk's account's own: everything happens relative to it as opened
/// (no symlink followed on the way), the temporary file is created exclusively and never
/// through a link, and the rename replaces whatever is at the name, link or file, itself.
pub(crate) fn install_astdb(copy_dir: &Path, target: &Path) -> anyhow::Result<()> {
    use nix::fcntl::{AtFlags, OFlag, openat, renameat};
    use nix::sys::stat::{Mode, SFlag, fchmod, fstat, fstatat};
    use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, unlinkat};
    use std::os::fd::AsFd;
    use std::os::unix::fs::OpenOptionsExt;

    let Some(name) = target.file_name() else {
        bail!("astdb {} has no file name", target.display());
    };
    let copy = copy_dir.join(name);
    let mut source = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&copy)
    {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err).with_context(|| format!("opening {}", copy.display())),
    };
    let dir_path = target.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir_path)
        .with_context(|| format!("creating {}", dir_path.display()))?;
    let dir = lbs_sync::open_dir_nofollow(dir_path)
        .with_context(|| format!("opening {}", dir_path.display()))?;
    let dir_stat = fstat(dir.as_fd())?;
    let (uid, gid, mode) = match fstatat(dir.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(now) if now.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFREG.bits() => {
            (now.st_uid, now.st_gid, now.st_mode & 0o777)
        }
        _ => (dir_stat.st_uid, dir_stat.st_gid, 0o640),
    };
    let tmp = format!(".{}.lbs-install", name.to_string_lossy());
    // A leftover, or a link planted at the name: removed itself, never followed.
    let _ = unlinkat(dir.as_fd(), tmp.as_str(), UnlinkatFlags::NoRemoveDir);
    let fd = openat(
        dir.as_fd(),
        tmp.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .with_context(|| format!("creating {}/{tmp}", dir_path.display()))?;
    let mut file = std::fs::File::from(fd);
    let written = (|| -> anyhow::Result<()> {
        std::io::copy(&mut source, &mut file)?;
        if nix::unistd::geteuid().is_root() {
            fchown(
                file.as_fd(),
                Some(Uid::from_raw(uid)),
                Some(Gid::from_raw(gid)),
            )?;
        }
        fchmod(file.as_fd(), Mode::from_bits_truncate(mode))?;
        file.sync_all()?;
        renameat(dir.as_fd(), tmp.as_str(), dir.as_fd(), name)?;
        dir.sync_all()?;
        Ok(())
    })();
    if written.is_err() {
        let _ = unlinkat(dir.as_fd(), tmp.as_str(), UnlinkatFlags::NoRemoveDir);
    }
    written.with_context(|| format!("installing {}", target.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    struct Boxes {
        _tmp: tempfile::TempDir,
        copies: std::path::PathBuf,
        asterisk: std::path::PathBuf,
        precious: std::path::PathBuf,
    }

    /// lbs's copy of the primary's astdb, Asterisk's directory and a file root owns.
    fn boxes() -> Boxes {
        let tmp = tempfile::tempdir().unwrap();
        let copies = tmp.path().join("lbs/astdb");
        let asterisk = tmp.path().join("var/lib/asterisk");
        std::fs::create_dir_all(&copies).unwrap();
        std::fs::create_dir_all(&asterisk).unwrap();
        std::fs::write(copies.join("astdb.sqlite3"), b"the primary's astdb").unwrap();
        let precious = tmp.path().join("shadow");
        std::fs::write(&precious, b"root:secret").unwrap();
        Boxes {
            _tmp: tmp,
            copies,
            asterisk,
            precious,
        }
    }

    #[test]
    fn links_planted_at_the_temporary_name_or_the_target_are_replaced_never_written_through() {
        let b = boxes();
        let target = b.asterisk.join("astdb.sqlite3");
        std::os::unix::fs::symlink(&b.precious, b.asterisk.join(".astdb.sqlite3.lbs-install"))
            .unwrap();
        std::os::unix::fs::symlink(&b.precious, &target).unwrap();
        install_astdb(&b.copies, &target).unwrap();
        assert_eq!(std::fs::read(&b.precious).unwrap(), b"root:secret");
        let meta = std::fs::symlink_metadata(&target).unwrap();
        assert!(meta.is_file());
        assert_eq!(std::fs::read(&target).unwrap(), b"the primary's astdb");
        assert!(!b.asterisk.join(".astdb.sqlite3.lbs-install").exists());
    }

    #[test]
    fn the_installed_copy_keeps_the_owner_and_mode_of_the_file_it_replaces() {
        let b = boxes();
        let target = b.asterisk.join("astdb.sqlite3");
        std::fs::write(&target, b"the backup's old astdb").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o660)).unwrap();
        let root = nix::unistd::geteuid().is_root();
        if root {
            // Asterisk's account (nobody, here).
            std::os::unix::fs::chown(&target, Some(65534), Some(65534)).unwrap();
        }
        install_astdb(&b.copies, &target).unwrap();
        let meta = std::fs::metadata(&target).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"the primary's astdb");
        assert_eq!(meta.mode() & 0o777, 0o660);
        if root {
            assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
        }
    }

    #[test]
    fn a_symlinked_astdb_on_the_primary_is_not_copied() {
        let b = boxes();
        let link = b.asterisk.join("astdb.sqlite3");
        std::os::unix::fs::symlink(&b.precious, &link).unwrap();
        let out = b.copies.join("snapshot");
        std::fs::create_dir_all(&out).unwrap();
        let err = snapshot_astdb(&link, &out).unwrap_err();
        assert!(format!("{err:#}").contains("is a symbolic link"), "{err:#}");
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
    }
}
