//! Helpers shared by the sync engine's integration tests.

use std::fs::{self, File, FileTimes};
use std::path::Path;
use std::time::{Duration, SystemTime};

/// A fixed time well in the past, so no file written with it counts as "racy".
pub fn long_ago() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

/// Writes a file (creating its directories) and dates it [`long_ago`], as most of a PBX's
/// files are.
pub fn write_old(path: &Path, content: &[u8]) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(path, content).unwrap();
    File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_times(
            FileTimes::new()
                .set_modified(long_ago())
                .set_accessed(long_ago()),
        )
        .unwrap();
}
