//! Hard links inside a set: which files of the sender are one inode under several names
//! ([`groups`]), and which of those groups a receiver can make ([`consistent`]); the plan
//! links the receiver's names after every member holds its content
//! ([`crate::plan::plan_with_links`]). A name the plan rewrote is a new inode, so an edited
//! or renamed member is linked again on the pass that brings it.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use lbs_protocol::RelPath;
use lbs_protocol::sync::{ManifestEntry, ManifestKind};

use crate::index::{Entry, EntryKind};

/// The sender's hard-link groups among `entries` (a scan of `root`): files sharing an inode
/// number are checked again by `lstat` (device, inode, more than one link), so files of two
/// file systems mounted inside the set are never taken for links. Paths in path order, groups
/// by their first path.
pub fn groups(root: &Path, entries: &[Entry]) -> Vec<Vec<RelPath>> {
    // Sorted by inode, candidates are the runs of one inode: a map of a vector per inode was
    // a hundred thousand allocations in a large tree, nearly all for files with one name.
    let mut by_inode: Vec<(u64, &RelPath)> = entries
        .iter()
        .filter(|e| e.kind == EntryKind::File)
        .map(|e| (e.meta.inode, &e.path))
        .collect();
    by_inode.sort_unstable_by_key(|(inode, _)| *inode);
    let mut groups = Vec::new();
    for candidates in by_inode.chunk_by(|a, b| a.0 == b.0) {
        if candidates.len() < 2 {
            continue;
        }
        let mut by_file: HashMap<(u64, u64), Vec<RelPath>> = HashMap::new();
        for (_, path) in candidates {
            let Ok(meta) = std::fs::symlink_metadata(root.join(path.as_path())) else {
                continue;
            };
            if meta.is_file() && meta.nlink() > 1 {
                by_file
                    .entry((meta.dev(), meta.ino()))
                    .or_default()
                    .push((*path).clone());
            }
        }
        for mut group in by_file.into_values().filter(|paths| paths.len() > 1) {
            group.sort();
            groups.push(group);
        }
    }
    groups.sort();
    groups
}

/// The groups a receiver can make from what the sender said: every member a file of the
/// manifest with one content (a file that changed between two of its names' hashes waits for
/// the next pass), no path in two groups.
pub fn consistent(groups: Vec<Vec<RelPath>>, manifest: &[ManifestEntry]) -> Vec<Vec<RelPath>> {
    // Nearly every tree has none: no map of its every file's content (a twelfth of a pull of
    // 100,000 unchanged files).
    if groups.is_empty() {
        return groups;
    }
    let content: HashMap<&RelPath, &[u8; 32]> = manifest
        .iter()
        .filter_map(|entry| match &entry.kind {
            ManifestKind::File { blake3, .. } => Some((&entry.path, blake3)),
            _ => None,
        })
        .collect();
    let mut seen: HashSet<RelPath> = HashSet::new();
    groups
        .into_iter()
        .filter(|group| {
            let hashes: Option<Vec<&[u8; 32]>> =
                group.iter().map(|p| content.get(p).copied()).collect();
            let one_content =
                hashes.is_some_and(|h| h.len() > 1 && h.windows(2).all(|w| w[0] == w[1]));
            one_content && group.iter().all(|p| seen.insert(p.clone()))
        })
        .collect()
}
