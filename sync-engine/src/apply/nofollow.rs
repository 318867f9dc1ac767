//! Reaching a sync root (or the trash) without following a symlink anyone but root could
//! have planted on the way.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{Mode, SFlag, fstatat};

use super::is_kind;

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
