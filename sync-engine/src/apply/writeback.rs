//! `sync_file_range(2)`, which neither nix nor rustix wrap.
// The one call below passes a borrowed, open descriptor and integer arguments; it touches no
// memory of ours.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::AsRawFd;

/// Starts the write-out of every dirty page of `file` (`SYNC_FILE_RANGE_WRITE`): returns
/// once the writes are queued, not when they are done; durability still comes from a sync.
pub(super) fn start(file: &File) {
    // SAFETY: the descriptor is open for as long as `file` is borrowed; offset 0 and length
    // 0 mean "to the end of the file".
    let _ = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}
