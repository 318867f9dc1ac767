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
    if !source.exists() {
        return Ok(());
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

/// Puts the pulled astdb copy in place, atomically (the PBX is stopped on a backup).
pub(crate) fn install_astdb(copy_dir: &Path, target: &Path) -> anyhow::Result<()> {
    let Some(name) = target.file_name() else {
        bail!("astdb {} has no file name", target.display());
    };
    let copy = copy_dir.join(name);
    if !copy.exists() {
        return Ok(());
    }
    let dir = target.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.lbs-install", name.to_string_lossy()));
    std::fs::copy(&copy, &tmp).with_context(|| format!("copying to {}", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, target).with_context(|| format!("installing {}", target.display()))?;
    Ok(())
}
