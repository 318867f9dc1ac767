//! The plan: what the receiver must do to make its tree equal the sender's manifest, cheapest
//! first, in an order that always works.
//!
//! Phases, in this order:
//! 1. **Trash** every receiver entry the sender no longer has, or has as another kind (file,
//!    directory, symlink). Only the topmost such path is listed: its subtree goes with it.
//!    Also a file that a local copy will replace when the sender has its content nowhere (a
//!    deleted voicemail renumbered over): nothing the primary deleted is lost without a trash
//!    copy. Trash keeps content, so a trashed file can still be a local-copy source.
//! 2. **MakeDir** for new directories, parents first.
//! 3. Files and symlinks: nothing (same content and metadata), **SetMeta**, **CopyLocal** (the
//!    receiver holds the same BLAKE3 under another path: Asterisk renumbers voicemail
//!    `msg0002 → msg0001` when one is deleted), else **Fetch** (with the old version at the same
//!    path as a basis for block/append/delta transfer when there is one); **Symlink**.
//! 4. **SetMeta** for directories, deepest first, after everything inside them has changed
//!    (writing into a directory moves its mtime).
//!
//! A local-copy source is only ever a file this plan does not write, so copies never read a
//! file that an earlier step already replaced; where no such source exists, the file is
//! fetched. The executor verifies every result by BLAKE3 anyway.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use lbs_protocol::RelPath;
use lbs_protocol::sync::{FileMeta, ManifestEntry, ManifestKind};

use crate::index::{Entry, EntryKind, Meta};

/// Where a local copy reads from.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Source {
    /// A receiver file that stays where it is.
    Path(RelPath),
    /// A receiver file that phase 1 moved to the trash (itself, or with a directory above it),
    /// named by the path it had.
    Trashed(RelPath),
}

/// What the receiver already has at a fetched path.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Basis {
    /// Nothing usable: the whole file is streamed.
    None,
    /// An older version of the same file: blocks, an append or a delta may do.
    Existing,
}

/// One step of a plan.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Action {
    /// Move an entry (and everything under it) to the trash.
    Trash {
        /// What to move.
        path: RelPath,
    },
    /// Create a directory (metadata follows in phase 4).
    MakeDir {
        /// Where.
        path: RelPath,
    },
    /// Get a file's content from the sender.
    Fetch {
        /// Where.
        path: RelPath,
        size: u64,
        /// The hash the result must have.
        blake3: [u8; 32],
        meta: FileMeta,
        /// What can serve as a basis.
        basis: Basis,
    },
    /// Copy a file the receiver already has.
    CopyLocal {
        /// Where.
        path: RelPath,
        /// From where.
        from: Source,
        size: u64,
        /// The hash the result must have.
        blake3: [u8; 32],
        meta: FileMeta,
    },
    /// Create or replace a symlink.
    Symlink {
        /// Where.
        path: RelPath,
        target: Vec<u8>,
        meta: FileMeta,
    },
    /// Make `path` another name of the file at `to` (a hard link, as on the sender); both
    /// hold the same content by then.
    Link { path: RelPath, to: RelPath },
    /// Set mode, owner and mtime of an entry whose content is right.
    SetMeta {
        path: RelPath,
        /// To what.
        meta: FileMeta,
    },
}

/// What a plan will do, in numbers (for progress and the status line).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct PlanSummary {
    /// Files and symlinks already right.
    pub unchanged: u64,
    /// Entries whose metadata alone changes.
    pub metadata_only: u64,
    /// Files to fetch.
    pub fetch_files: u64,
    /// Their total length (the most that can cross the wire).
    pub fetch_bytes: u64,
    /// Files copied locally.
    pub local_copies: u64,
    /// Their total length.
    pub local_copy_bytes: u64,
    /// Entries moved to the trash (topmost only).
    pub trashed: u64,
    /// Directories created.
    pub new_dirs: u64,
    /// Symlinks created or replaced.
    pub symlinks: u64,
    /// Files the sender could not hash (still changing): left as they are for now.
    pub pending: u64,
    /// Names made hard links of another, as on the sender.
    pub links: u64,
}

/// A complete plan.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Plan {
    /// The steps, in execution order.
    pub actions: Vec<Action>,
    /// Where the directories' metadata steps begin in `actions` (everything before them has
    /// to be in place first: a new file changes its directory's mtime).
    pub dirs_from: usize,
    pub summary: PlanSummary,
}

impl Plan {
    /// Whether carrying it out moves anything to the trash (only then is a batch made).
    pub fn trashes(&self) -> bool {
        self.actions
            .iter()
            .any(|action| matches!(action, Action::Trash { .. }))
    }
}

/// A manifest that does not describe a tree (a buggy or hostile sender).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The same path twice.
    #[error("manifest lists {0} twice")]
    Duplicate(RelPath),
    /// An entry whose parent is not a directory of the manifest.
    #[error("manifest lists {0} but its parent is not a directory in the manifest")]
    Orphan(RelPath),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    File,
    Dir,
    Symlink,
    Pending,
}

fn sender_class(kind: &ManifestKind) -> Class {
    match kind {
        ManifestKind::File { .. } => Class::File,
        ManifestKind::Dir => Class::Dir,
        ManifestKind::Symlink { .. } => Class::Symlink,
        ManifestKind::Pending => Class::Pending,
    }
}

fn receiver_class(kind: &EntryKind) -> Class {
    match kind {
        EntryKind::File => Class::File,
        EntryKind::Dir => Class::Dir,
        EntryKind::Symlink(_) => Class::Symlink,
    }
}

/// Whether the receiver's metadata already is the sender's (mode is meaningless on symlinks).
fn meta_matches(have: &Meta, want: &FileMeta, class: Class) -> bool {
    (class == Class::Symlink || have.mode == want.mode)
        && have.owner == want.owner
        && have.group == want.group
        && have.mtime_ns == want.mtime_ns
}

/// Computes the plan that turns the receiver's tree (`receiver`, its index) into the sender's
/// (`sender`, its manifest).
pub fn plan(sender: &[ManifestEntry], receiver: &[Entry]) -> Result<Plan, PlanError> {
    plan_with_links(sender, receiver, &[])
}

/// Like [`plan`], with the sender's hard-link groups ([`crate::links::consistent`] ones: files
/// of the manifest with one content): after the writes, every member that is not already the
/// same file as the group's first (by the receiver's index; a name written by this plan is a
/// new file) is linked to it, and its directory's metadata set again.
pub fn plan_with_links(
    sender: &[ManifestEntry],
    receiver: &[Entry],
    links: &[Vec<RelPath>],
) -> Result<Plan, PlanError> {
    // Both sides in path order (every pass below follows it, so a plan does not depend on
    // the order entries arrived in), joined by path: one sequential pass each, no lookups.
    let mut wanted: Vec<&ManifestEntry> = sender.iter().collect();
    wanted.sort_by(|a, b| a.path.cmp(&b.path));
    if let Some(twice) = wanted.windows(2).find(|pair| pair[0].path == pair[1].path) {
        return Err(PlanError::Duplicate(twice[0].path.clone()));
    }
    let dirs: HashSet<&[u8]> = wanted
        .iter()
        .filter(|entry| entry.kind == ManifestKind::Dir)
        .map(|entry| entry.path.as_bytes())
        .collect();
    // Entries of one directory come together: its name is looked up once for them all.
    let mut parent_seen: Option<&[u8]> = None;
    for entry in &wanted {
        if let Some(parent) = entry.path.parent_bytes()
            && parent_seen != Some(parent)
        {
            if !dirs.contains(parent) {
                return Err(PlanError::Orphan(entry.path.clone()));
            }
            parent_seen = Some(parent);
        }
    }
    let mut held: Vec<&Entry> = receiver.iter().collect();
    held.sort_by(|a, b| a.path.cmp(&b.path));
    held.dedup_by(|a, b| a.path == b.path);
    let pairs = join(&wanted, &held);

    // Phase 1: what goes to the trash (topmost paths only). Whatever lies at or under a
    // pending path stays as it is.
    let pending: BTreeSet<RelPath> = wanted
        .iter()
        .filter(|e| e.kind == ManifestKind::Pending)
        .map(|e| e.path.clone())
        .collect();
    let mut trashed: BTreeSet<RelPath> = BTreeSet::new();
    for pair in &pairs {
        let Some(entry) = pair.have else { continue };
        let path = &entry.path;
        let keep = is_under(&pending, path)
            || pair
                .want
                .is_some_and(|w| sender_class(&w.kind) == receiver_class(&entry.kind));
        if !keep && !is_under(&trashed, path) {
            trashed.insert(path.clone());
        }
    }
    // A file about to be replaced by a copy of another file the receiver holds (Asterisk
    // renumbering a voicemail box over a deleted message) goes to the trash first when the
    // sender no longer has its content anywhere: the copy would otherwise destroy the only
    // trace of it. A file the sender changed (fetched against its old version, a patch) is not
    // kept: its old version is not something the primary deleted.
    // Only files whose content changes are candidates; both sides' hashes are gathered once
    // there is one (a pass over an unchanged tree builds neither set).
    let changing: Vec<(&[u8; 32], &Entry)> = pairs
        .iter()
        .filter_map(|pair| {
            let (want, have) = (pair.want?, pair.present(&trashed)?);
            let ManifestKind::File { blake3: new, .. } = &want.kind else {
                return None;
            };
            (have.kind == EntryKind::File && trusted_hash(have) != Some(new)).then_some((new, have))
        })
        .collect();
    if !changing.is_empty() {
        let sender_hashes: HashSet<&[u8; 32]> = wanted
            .iter()
            .filter_map(|entry| match &entry.kind {
                ManifestKind::File { blake3, .. } => Some(blake3),
                _ => None,
            })
            .collect();
        let held_hashes: HashSet<&[u8; 32]> = held.iter().filter_map(|e| trusted_hash(e)).collect();
        for (new, have) in changing {
            // Held by the receiver and not here: somewhere else, so the plan copies it locally.
            let copied_from_elsewhere = held_hashes.contains(new);
            let lost = trusted_hash(have).is_none_or(|old| !sender_hashes.contains(old));
            if copied_from_elsewhere && lost {
                trashed.insert(have.path.clone());
            }
        }
    }
    // What is in place after phase 1 (`Pair::present`): a receiver entry survives unless it
    // or an ancestor went.

    // Which paths this plan writes: no local copy may read from those.
    let written: Vec<bool> = pairs
        .iter()
        .map(|pair| {
            let Some(entry) = pair.want else {
                return false;
            };
            let same = match (&entry.kind, pair.present(&trashed)) {
                (ManifestKind::File { blake3, .. }, Some(have)) => {
                    trusted_hash(have) == Some(blake3)
                }
                (ManifestKind::Symlink { target }, Some(have)) => {
                    have.kind == EntryKind::Symlink(target.clone())
                }
                (ManifestKind::Dir | ManifestKind::Pending, _) => true,
                (_, None) => false,
            };
            !same
        })
        .collect();
    // Trusted content on the receiver, by hash, of what the written files need: files this
    // plan leaves alone (or only trashes) first, in path order; files it rewrites after them,
    // usable only if the copy runs before the rewrite (see `order_writes`).
    let needed: HashSet<&[u8; 32]> = pairs
        .iter()
        .zip(&written)
        .filter(|(_, written)| **written)
        .filter_map(|(pair, _)| match &pair.want?.kind {
            ManifestKind::File { blake3, .. } => Some(blake3),
            _ => None,
        })
        .collect();
    let mut by_hash: HashMap<&[u8; 32], Vec<Source>> = HashMap::new();
    let mut rewritten_sources: Vec<(&[u8; 32], Source)> = Vec::new();
    if !needed.is_empty() {
        for (pair, written) in pairs.iter().zip(&written) {
            let Some(entry) = pair.have else { continue };
            let path = &entry.path;
            let Some(hash) = trusted_hash(entry).filter(|hash| needed.contains(hash)) else {
                continue;
            };
            if is_under(&trashed, path) {
                by_hash
                    .entry(hash)
                    .or_default()
                    .push(Source::Trashed(path.clone()));
            } else if *written {
                rewritten_sources.push((hash, Source::Path(path.clone())));
            } else {
                by_hash
                    .entry(hash)
                    .or_default()
                    .push(Source::Path(path.clone()));
            }
        }
    }
    for (hash, source) in rewritten_sources {
        by_hash.entry(hash).or_default().push(source);
    }

    let mut plan = Plan::default();
    let summary = &mut plan.summary;
    for path in &trashed {
        plan.actions.push(Action::Trash { path: path.clone() });
        summary.trashed += 1;
    }
    // Directories touched by this plan need their metadata set again at the end.
    let mut touched_dirs: BTreeSet<RelPath> = trashed.iter().filter_map(RelPath::parent).collect();

    // Phase 2.
    let mut new_dirs: BTreeSet<&RelPath> = BTreeSet::new();
    for pair in &pairs {
        let Some(entry) = pair.want else { continue };
        let path = &entry.path;
        if entry.kind == ManifestKind::Dir && pair.present(&trashed).is_none() {
            plan.actions.push(Action::MakeDir { path: path.clone() });
            summary.new_dirs += 1;
            new_dirs.insert(path);
            touched_dirs.extend(path.parent());
        }
    }

    // Phase 3: entries whose content stays first (metadata only), then the writes in an
    // order where every local copy reads its source before anything replaces it.
    let mut writes: BTreeMap<RelPath, Action> = BTreeMap::new();
    // The receiver's entries at the paths written (for `order_writes`).
    let mut replaced: HashMap<&RelPath, &Entry> = HashMap::new();
    for (pair, written) in pairs.iter().zip(&written) {
        let Some(entry) = pair.want else { continue };
        let current = pair.present(&trashed);
        let class = sender_class(&entry.kind);
        if class == Class::Dir {
            continue;
        }
        if class == Class::Pending {
            summary.pending += 1;
            continue;
        }
        if !*written {
            match current {
                Some(have) if !meta_matches(&have.meta, &entry.meta, class) => {
                    plan.actions.push(Action::SetMeta {
                        path: entry.path.clone(),
                        meta: entry.meta.clone(),
                    });
                    summary.metadata_only += 1;
                }
                _ => summary.unchanged += 1,
            }
            continue;
        }
        if let Some(have) = current {
            replaced.insert(&entry.path, have);
        }
        let path = entry.path.clone();
        touched_dirs.extend(path.parent());
        let action = match &entry.kind {
            ManifestKind::Dir | ManifestKind::Pending => continue,
            ManifestKind::Symlink { target } => Action::Symlink {
                path: path.clone(),
                target: target.clone(),
                meta: entry.meta.clone(),
            },
            ManifestKind::File { size, blake3 } => {
                let source = by_hash.get(blake3).and_then(|sources| {
                    sources
                        .iter()
                        .find(|s| !matches!(s, Source::Path(p) if *p == path))
                });
                match source {
                    Some(from) => Action::CopyLocal {
                        path: path.clone(),
                        from: from.clone(),
                        size: *size,
                        blake3: *blake3,
                        meta: entry.meta.clone(),
                    },
                    None => fetch(&path, *size, *blake3, &entry.meta, current),
                }
            }
        };
        writes.insert(path, action);
    }
    for action in order_writes(writes, &replaced) {
        match &action {
            Action::CopyLocal { size, .. } => {
                summary.local_copies += 1;
                summary.local_copy_bytes += size;
            }
            Action::Fetch { size, .. } => {
                summary.fetch_files += 1;
                summary.fetch_bytes += size;
            }
            Action::Symlink { .. } => summary.symlinks += 1,
            _ => {}
        }
        plan.actions.push(action);
    }

    // Hard links, once every member holds its content (nothing to look up without any).
    if !links.is_empty() {
        // Hard links, once every member holds its content.
        let written_paths: HashSet<&RelPath> = plan
            .actions
            .iter()
            .filter_map(|action| match action {
                Action::Fetch { path, .. } | Action::CopyLocal { path, .. } => Some(path),
                _ => None,
            })
            .collect();
        let inode_of: HashMap<&RelPath, u64> = pairs
            .iter()
            .filter_map(|pair| {
                let have = pair.present(&trashed)?;
                (have.kind == EntryKind::File).then_some((&have.path, have.meta.inode))
            })
            .collect();
        let mut linked = Vec::new();
        for group in links {
            let Some((first, rest)) = group.split_first() else {
                continue;
            };
            let first_inode = (!written_paths.contains(first))
                .then(|| inode_of.get(first))
                .flatten();
            for path in rest {
                let same = !written_paths.contains(path)
                    && first_inode.is_some_and(|inode| inode_of.get(path) == Some(inode));
                if !same {
                    linked.push(Action::Link {
                        path: path.clone(),
                        to: first.clone(),
                    });
                    touched_dirs.extend(path.parent());
                }
            }
        }
        summary.links = linked.len() as u64;
        plan.actions.extend(linked);
    }

    // Phase 4: deepest first, so setting a child's mtime never disturbs a finished parent.
    plan.dirs_from = plan.actions.len();
    let mut dirs: Vec<(usize, &Pair<'_>)> = pairs
        .iter()
        .filter(|pair| pair.want.is_some_and(|e| e.kind == ManifestKind::Dir))
        .map(|pair| (pair.path.names().count(), pair))
        .collect();
    dirs.sort_by_key(|(depth, _)| std::cmp::Reverse(*depth));
    for (_, pair) in dirs {
        let Some(entry) = pair.want else { continue };
        let path = &entry.path;
        let stale = match pair.present(&trashed) {
            Some(have) if !new_dirs.contains(path) => {
                touched_dirs.contains(path) || !meta_matches(&have.meta, &entry.meta, Class::Dir)
            }
            _ => true,
        };
        if stale {
            if !new_dirs.contains(path) {
                summary.metadata_only += 1;
            }
            plan.actions.push(Action::SetMeta {
                path: path.clone(),
                meta: entry.meta.clone(),
            });
        }
    }
    Ok(plan)
}

/// One path and what each side has there.
struct Pair<'a> {
    path: &'a RelPath,
    want: Option<&'a ManifestEntry>,
    have: Option<&'a Entry>,
}

impl<'a> Pair<'a> {
    /// The receiver's entry, unless it or an ancestor goes to the trash.
    fn present(&self, trashed: &BTreeSet<RelPath>) -> Option<&'a Entry> {
        self.have.filter(|have| !is_under(trashed, &have.path))
    }
}

/// Both sides (each sorted by path, no path twice) joined by path, in path order.
fn join<'a>(wanted: &[&'a ManifestEntry], held: &[&'a Entry]) -> Vec<Pair<'a>> {
    let mut pairs = Vec::with_capacity(wanted.len().max(held.len()));
    let (mut w, mut h) = (wanted.iter().peekable(), held.iter().peekable());
    loop {
        let pair = match (w.peek(), h.peek()) {
            (None, None) => break,
            (Some(want), Some(have)) if want.path == have.path => Pair {
                path: &want.path,
                want: w.next().copied(),
                have: h.next().copied(),
            },
            (Some(want), Some(have)) if want.path < have.path => Pair {
                path: &want.path,
                want: w.next().copied(),
                have: None,
            },
            (Some(want), None) => Pair {
                path: &want.path,
                want: w.next().copied(),
                have: None,
            },
            (_, Some(have)) => Pair {
                path: &have.path,
                want: None,
                have: h.next().copied(),
            },
        };
        pairs.push(pair);
    }
    pairs
}

fn fetch(
    path: &RelPath,
    size: u64,
    blake3: [u8; 32],
    meta: &FileMeta,
    current: Option<&Entry>,
) -> Action {
    let basis = match current {
        Some(have) if have.kind == EntryKind::File => Basis::Existing,
        _ => Basis::None,
    };
    Action::Fetch {
        path: path.clone(),
        size,
        blake3,
        meta: meta.clone(),
        basis,
    }
}

/// Orders the writes so that a local copy from a file this plan rewrites runs before that
/// rewrite. Each copy has one source, so dependencies form chains and simple cycles (two files
/// that swapped contents); a cycle is broken by fetching one of its files instead.
fn order_writes(
    mut writes: BTreeMap<RelPath, Action>,
    replaced: &HashMap<&RelPath, &Entry>,
) -> Vec<Action> {
    // readers[x]: the copies that read x's current content.
    let mut readers: BTreeMap<RelPath, Vec<RelPath>> = BTreeMap::new();
    for (path, action) in &writes {
        if let Action::CopyLocal {
            from: Source::Path(from),
            ..
        } = action
            && writes.contains_key(from)
        {
            readers.entry(from.clone()).or_default().push(path.clone());
        }
    }
    if readers.is_empty() {
        // No copy reads a file this plan rewrites (an initial copy, most passes): path order.
        return writes.into_values().collect();
    }
    let mut ordered = Vec::with_capacity(writes.len());
    let mut on_stack: BTreeSet<RelPath> = BTreeSet::new();
    let mut done: BTreeSet<RelPath> = BTreeSet::new();
    let paths: Vec<RelPath> = writes.keys().cloned().collect();
    for path in paths {
        visit(
            &path,
            &mut writes,
            &mut readers,
            &mut on_stack,
            &mut done,
            &mut ordered,
            replaced,
        );
    }
    ordered
}

/// Emits `path`'s write after every copy that reads its current content.
fn visit(
    path: &RelPath,
    writes: &mut BTreeMap<RelPath, Action>,
    readers: &mut BTreeMap<RelPath, Vec<RelPath>>,
    on_stack: &mut BTreeSet<RelPath>,
    done: &mut BTreeSet<RelPath>,
    ordered: &mut Vec<Action>,
    replaced: &HashMap<&RelPath, &Entry>,
) {
    if done.contains(path) || on_stack.contains(path) {
        return;
    }
    on_stack.insert(path.clone());
    for reader in readers.remove(path).unwrap_or_default() {
        if on_stack.contains(&reader) {
            // A cycle: this reader's source would be gone before it reads; fetch it instead.
            if let Some(Action::CopyLocal {
                path,
                size,
                blake3,
                meta,
                ..
            }) = writes.get(&reader)
            {
                let current = replaced.get(path).copied();
                let replacement = fetch(path, *size, *blake3, meta, current);
                writes.insert(reader.clone(), replacement);
            }
        } else {
            visit(&reader, writes, readers, on_stack, done, ordered, replaced);
        }
    }
    on_stack.remove(path);
    done.insert(path.clone());
    if let Some(action) = writes.get(path) {
        ordered.push(action.clone());
    }
}

/// The receiver's hash for a file.
///
/// A racy hash (taken within a second of the file's last write, typically by our own install
/// in the previous pass) is used too: copies from it are verified like any other, and the next
/// scan hashes a racy file again, so a write that slipped past it is caught one pass later
/// instead of every just-synced file being fetched again.
fn trusted_hash(entry: &Entry) -> Option<&[u8; 32]> {
    match (&entry.kind, &entry.hash) {
        (EntryKind::File, Some(hash)) => Some(&hash.root),
        _ => None,
    }
}

/// Whether `path` or one of its ancestors is in `set`.
fn is_under(set: &BTreeSet<RelPath>, path: &RelPath) -> bool {
    !set.is_empty() && path.ancestors_bytes().any(|at| set.contains(at))
}
