//! What a sending side says about its tree: one [`ManifestEntry`] per file, directory and
//! symlink below a sync root. Owners travel by name (ids differ between boxes); inode and
//! ctime are local and never travel.

use serde::{Deserialize, Serialize};

use crate::path::RelPath;

/// The metadata carried with every entry.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct FileMeta {
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner user name.
    pub owner: String,
    /// Owner group name.
    pub group: String,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
}

/// What an entry is, with what identifies its content.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum ManifestKind {
    /// A regular file.
    File {
        /// Its length.
        size: u64,
        /// The BLAKE3 hash of its content.
        blake3: [u8; 32],
    },
    /// A directory.
    Dir,
    /// A symbolic link and its target, as raw bytes (copied, never followed).
    Symlink {
        /// Where it points.
        target: Vec<u8>,
    },
    /// A file that kept changing while the sender hashed it: the receiver keeps whatever it
    /// has at this path (never trashes it for being unlisted) until a later pass settles it.
    Pending,
}

/// One entry of a sending side's tree.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Where, relative to the sync root.
    pub path: RelPath,
    /// What.
    pub kind: ManifestKind,
    /// Its metadata.
    pub meta: FileMeta,
}
