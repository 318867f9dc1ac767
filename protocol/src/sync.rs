//! What a sending side says about its tree: one [`ManifestEntry`] per file, directory and
//! symlink below a sync root. Owners travel by name (ids differ between boxes); inode and
//! ctime are local and never travel.

use std::collections::BTreeMap;

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
        size: u64,
        /// The BLAKE3 hash of its content.
        blake3: [u8; 32],
    },
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

/// Why a side left an entry out of its tree: only files, directories and symlinks are synced.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum SkipReason {
    Socket,
    Fifo,
    /// A block or character device.
    Device,
    /// It could not be read (permissions, I/O error); the system's words.
    Unreadable {
        error: String,
    },
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self {
            SkipReason::Socket => "socket",
            SkipReason::Fifo => "FIFO",
            SkipReason::Device => "device node",
            SkipReason::Unreadable { error } => return write!(f, "unreadable: {error}"),
        };
        write!(f, "{what}: only files, directories and symlinks are synced")
    }
}

/// An entry a side did not sync, and why.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct SkippedEntry {
    pub path: RelPath,
    pub reason: SkipReason,
}

/// The most skipped entries a sender lists after its manifest (the rest are only counted),
/// and the longest error text it sends with one.
pub const MAX_SKIPPED_SENT: usize = 100;
/// See [`MAX_SKIPPED_SENT`].
pub const MAX_SKIP_ERROR_LEN: usize = 200;

/// One entry of a sending side's tree.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Where, relative to the sync root.
    pub path: RelPath,
    /// What.
    pub kind: ManifestKind,
    pub meta: FileMeta,
}

/// What a receiver says about a run of its blocks when asking for changes: a block's value
/// cut to 8 bytes, or one digest for a group of blocks (used where whole groups are likely
/// unchanged, as in the middle of a file that grew). A false match costs a re-fetch, never a
/// wrong file: the result is verified against the full BLAKE3.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum BlockSum {
    /// One block: the first 8 bytes of its chaining value.
    One([u8; 8]),
    /// `count` consecutive blocks: [`group_digest`] of their chaining values.
    Group {
        /// How many blocks.
        count: u32,
        /// Their digest.
        digest: [u8; 8],
    },
}

impl BlockSum {
    /// A single block's summary.
    pub fn one(cv: &[u8; 32]) -> BlockSum {
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(&cv[..8]);
        BlockSum::One(prefix)
    }

    /// How many blocks it covers.
    pub fn blocks(&self) -> u64 {
        match self {
            BlockSum::One(_) => 1,
            BlockSum::Group { count, .. } => u64::from(*count),
        }
    }
}

/// The digest of a group of consecutive blocks' chaining values (see [`BlockSum::Group`]).
pub fn group_digest(cvs: &[[u8; 32]]) -> [u8; 8] {
    let mut hasher = blake3::Hasher::new();
    for cv in cvs {
        hasher.update(cv);
    }
    let mut digest = [0u8; 8];
    digest.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
    digest
}

/// The digest of one directory's listing: its direct children's manifest entries.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct DirDigest {
    /// The directory (`None`: the root).
    pub dir: Option<RelPath>,
    /// BLAKE3 of its children's entries, as [`listing_digests`] computes it.
    pub digest: [u8; 32],
}

/// The digest of every directory's listing in `entries` (a whole manifest): a receiver sends
/// its own, and the sender leaves out the directories whose listing is the same, so an
/// unchanged tree of 100,000 files costs a few kilobytes, not a manifest.
///
/// Each digest covers the wire form of the directory's direct children in path order, so it
/// changes when anything a manifest would say about them changes.
pub fn listing_digests(entries: &[ManifestEntry]) -> BTreeMap<Option<RelPath>, [u8; 32]> {
    let mut listings: BTreeMap<Option<&[u8]>, Vec<&ManifestEntry>> = BTreeMap::new();
    for entry in entries {
        listings
            .entry(entry.path.parent_bytes())
            .or_default()
            .push(entry);
    }
    let mut buf = Vec::new();
    listings
        .into_iter()
        .map(|(dir, mut children)| {
            // A parent of a valid path is a valid path.
            let dir = dir.and_then(|bytes| RelPath::from_bytes(bytes).ok());
            children.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
            let mut hasher = blake3::Hasher::new();
            for child in children {
                // One buffer for every record: a vector each was a fifth of a sender's scan
                // of 100,000 unchanged files. Serialising our own types cannot fail; an empty
                // record would still differ.
                buf.clear();
                buf = postcard::to_extend(child, std::mem::take(&mut buf)).unwrap_or_default();
                hasher.update(&(buf.len() as u64).to_le_bytes());
                hasher.update(&buf);
            }
            (dir, *hasher.finalize().as_bytes())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, byte: u8) -> ManifestEntry {
        ManifestEntry {
            path: RelPath::try_from(path).unwrap(),
            kind: ManifestKind::File {
                size: 1,
                blake3: [byte; 32],
            },
            meta: FileMeta {
                mode: 0o644,
                owner: "asterisk".into(),
                group: "asterisk".into(),
                mtime_ns: 1,
            },
        }
    }

    #[test]
    fn a_listing_digest_changes_with_its_children_only() {
        let before = vec![file("a", 1), file("d/x", 2), file("d/y", 3), file("e/z", 4)];
        let mut after = before.clone();
        after[2] = file("d/y", 9);
        let (old, new) = (listing_digests(&before), listing_digests(&after));
        let d = Some(RelPath::try_from("d").unwrap());
        let e = Some(RelPath::try_from("e").unwrap());
        assert_ne!(old[&d], new[&d]);
        assert_eq!(old[&e], new[&e]);
        assert_eq!(old[&None], new[&None]);
        // Order of the input does not matter; a removed child does.
        let mut shuffled = before.clone();
        shuffled.reverse();
        assert_eq!(listing_digests(&shuffled), old);
        assert_ne!(listing_digests(&before[..2]).get(&d), old.get(&d));
    }

    #[test]
    fn a_listing_digest_is_the_one_older_peers_compute() {
        // Every version hashes each child's own postcard record after its length:
        // a digest made any other way would never match an older partner's.
        let children = vec![file("d/a", 1), file("d/bb", 2)];
        let mut hasher = blake3::Hasher::new();
        for child in &children {
            let bytes = postcard::to_stdvec(child).unwrap();
            hasher.update(&(bytes.len() as u64).to_le_bytes());
            hasher.update(&bytes);
        }
        let d = Some(RelPath::try_from("d").unwrap());
        assert_eq!(
            listing_digests(&children)[&d],
            *hasher.finalize().as_bytes()
        );
    }
}
