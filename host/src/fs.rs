//! Files that survive a crash half way, and secrets only their owner may read.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// A key or a TSIG secret is a few hundred bytes; a larger file is not one.
const SECRET_MAX: u64 = 64 * 1024;

/// Refuses `path` (already open, `meta` its metadata) when its group or others may read or
/// write it: a secret anyone on the box can read is no longer a secret.
pub fn check_private(path: &Path, meta: &fs::Metadata) -> io::Result<()> {
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "a secret its group or others may read (mode {mode:o}); run: chmod 600 {}",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Reads a secret (a private key, a TSIG secret) that only its owner may read; a file its
/// group or others can read, or one too large to be a secret, is refused with what to do.
pub fn read_secret(path: &Path) -> io::Result<String> {
    let file = fs::File::open(path)?;
    let meta = file.metadata()?;
    check_private(path, &meta)?;
    if meta.len() > SECRET_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is {} bytes: too large for a key (at most {SECRET_MAX})",
                path.display(),
                meta.len()
            ),
        ));
    }
    let mut text = String::new();
    file.take(SECRET_MAX).read_to_string(&mut text)?;
    Ok(text)
}

/// Writes a file by temp file + fsync + rename + fsync of the directory, so a crash leaves
/// either the old file or the new one, and creates it with `mode` from the start (a key is
/// never readable by others, not even for a moment).
pub fn write_file_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file path"))?;
    let tmp = dir.join(format!(".{}.tmp", file_name.to_string_lossy()));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_secret_others_may_read_is_refused_with_the_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let key = tmp.path().join("tsig.key");
        fs::write(&key, "c2VjcmV0\n").unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620] {
            fs::set_permissions(&key, fs::Permissions::from_mode(mode)).unwrap();
            let err = read_secret(&key).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{mode:o}");
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
        for mode in [0o600, 0o400] {
            fs::set_permissions(&key, fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(read_secret(&key).unwrap(), "c2VjcmV0\n");
        }
        let big = tmp.path().join("big.key");
        write_file_atomic(&big, &vec![b'a'; 100_000], 0o600).unwrap();
        assert_eq!(
            read_secret(&big).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[test]
    fn the_new_version_replaces_the_old_with_its_mode_and_leaves_no_temporary_file() {
        let tmp = tempfile::tempdir().unwrap();
        let key = tmp.path().join("box.key");
        write_file_atomic(&key, b"old", 0o644).unwrap();
        write_file_atomic(&key, b"new", 0o600).unwrap();
        assert_eq!(fs::read(&key).unwrap(), b"new");
        // The mode of the file written last (the temporary file's, renamed into place).
        let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = fs::read_dir(tmp.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn a_failed_write_leaves_the_old_version_and_no_temporary_file() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("state.json");
        write_file_atomic(&file, b"old", 0o644).unwrap();
        // The target is a directory: the rename fails after the temporary file was written.
        let dir = tmp.path().join("taken");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("inside"), b"x").unwrap();
        assert!(write_file_atomic(&dir, b"new", 0o644).is_err());
        assert_eq!(fs::read(&file).unwrap(), b"old");
        let left: Vec<String> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!left.iter().any(|n| n.ends_with(".tmp")), "{left:?}");
    }
}
