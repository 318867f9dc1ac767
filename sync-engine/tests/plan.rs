//! Plans, executed on a model file system: whatever the two trees, executing the plan makes
//! the receiver's tree equal the sender's, every step is possible when it runs (parents exist,
//! copy sources hold the promised content), and directory metadata is set after everything
//! inside them changed.

// In tests a panic is the failure report; helpers outside #[test] fns unwrap too.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use lbs_protocol::RelPath;
use lbs_protocol::sync::{FileMeta, ManifestEntry, ManifestKind};
use lbs_sync::{Action, Basis, ContentHash, Entry, EntryKind, Meta, Source, plan};
use proptest::prelude::*;

#[derive(Clone, PartialEq, Eq, Debug)]
enum Node {
    /// Only in sender trees: a file the sender could not hash.
    Pending,
    File {
        hash: [u8; 32],
        meta: FileMeta,
    },
    Dir {
        meta: FileMeta,
    },
    Link {
        target: Vec<u8>,
        meta: FileMeta,
    },
}

impl Node {
    fn meta_mut(&mut self) -> &mut FileMeta {
        match self {
            Node::File { meta, .. } | Node::Dir { meta } | Node::Link { meta, .. } => meta,
            Node::Pending => unreachable!("pending nodes exist only in manifests"),
        }
    }
}

type Tree = BTreeMap<RelPath, Node>;

fn rel(text: &str) -> RelPath {
    RelPath::try_from(text).unwrap()
}

fn meta(n: u8) -> FileMeta {
    FileMeta {
        mode: 0o640 + u32::from(n % 2),
        owner: ["asterisk", "root"][usize::from(n / 2 % 2)].into(),
        group: "asterisk".into(),
        mtime_ns: 1_700_000_000_000_000_000 + i64::from(n / 4),
    }
}

fn hash(n: u8) -> [u8; 32] {
    [n; 32]
}

fn manifest(tree: &Tree) -> Vec<ManifestEntry> {
    tree.iter()
        .map(|(path, node)| {
            let (kind, meta) = match node {
                Node::Pending => (
                    ManifestKind::Pending,
                    &FileMeta {
                        mode: 0,
                        owner: String::new(),
                        group: String::new(),
                        mtime_ns: 0,
                    },
                ),
                Node::File { hash, meta } => (
                    ManifestKind::File {
                        size: u64::from(hash[0]) * 1000,
                        blake3: *hash,
                    },
                    meta,
                ),
                Node::Dir { meta } => (ManifestKind::Dir, meta),
                Node::Link { target, meta } => (
                    ManifestKind::Symlink {
                        target: target.clone(),
                    },
                    meta,
                ),
            };
            ManifestEntry {
                path: path.clone(),
                kind,
                meta: meta.clone(),
            }
        })
        .collect()
}

fn index(tree: &Tree, racy: &[bool]) -> Vec<Entry> {
    tree.iter()
        .enumerate()
        .map(|(i, (path, node))| {
            let (kind, m, content) = match node {
                Node::Pending => unreachable!("receivers have no pending entries"),
                Node::File { hash, meta } => (EntryKind::File, meta, Some(*hash)),
                Node::Dir { meta } => (EntryKind::Dir, meta, None),
                Node::Link { target, meta } => (EntryKind::Symlink(target.clone()), meta, None),
            };
            Entry {
                path: path.clone(),
                kind,
                meta: Meta {
                    size: 0,
                    mtime_ns: m.mtime_ns,
                    ctime_ns: 0,
                    inode: i as u64,
                    mode: m.mode,
                    uid: 0,
                    gid: 0,
                    owner: m.owner.clone(),
                    group: m.group.clone(),
                },
                hash: content.map(|root| ContentHash {
                    root,
                    racy: racy.get(i).copied().unwrap_or(false),
                }),
            }
        })
        .collect()
}

/// The model executor: each step checks what a real one would find on disk.
struct Model {
    fs: Tree,
    trash: Tree,
}

/// What writing into a directory does to it.
const TOUCHED: i64 = -1;

impl Model {
    fn touch_parent(&mut self, path: &RelPath) {
        if let Some(parent) = path.parent() {
            self.fs.get_mut(&parent).unwrap().meta_mut().mtime_ns = TOUCHED;
        }
    }

    fn parent_is_dir(&self, path: &RelPath) -> bool {
        path.parent()
            .is_none_or(|p| matches!(self.fs.get(&p), Some(Node::Dir { .. })))
    }

    fn put(&mut self, path: &RelPath, node: Node) -> Result<(), String> {
        if !self.parent_is_dir(path) {
            return Err(format!("{path}: parent missing or not a directory"));
        }
        match (self.fs.get(path), &node) {
            (None, _) => {}
            (Some(Node::File { .. }), Node::File { .. }) => {}
            (Some(Node::Link { .. }), Node::Link { .. }) => {}
            (Some(old), _) => return Err(format!("{path}: would overwrite {old:?}")),
        }
        self.fs.insert(path.clone(), node);
        self.touch_parent(path);
        Ok(())
    }

    fn run(&mut self, action: &Action) -> Result<(), String> {
        match action {
            Action::Trash { path } => {
                let moved: Vec<RelPath> = self
                    .fs
                    .keys()
                    .filter(|p| p.starts_with(path))
                    .cloned()
                    .collect();
                if moved.is_empty() {
                    return Err(format!("trash {path}: nothing there"));
                }
                for p in moved {
                    let node = self.fs.remove(&p).unwrap();
                    self.trash.insert(p, node);
                }
                self.touch_parent(path);
                Ok(())
            }
            Action::MakeDir { path } => {
                if self.fs.contains_key(path) {
                    return Err(format!("mkdir {path}: exists"));
                }
                self.put(path, Node::Dir { meta: meta(99) })
            }
            Action::Fetch {
                path, blake3, meta, ..
            } => self.put(
                path,
                Node::File {
                    hash: *blake3,
                    meta: meta.clone(),
                },
            ),
            Action::CopyLocal {
                path,
                from,
                blake3,
                meta,
                ..
            } => {
                let source = match from {
                    Source::Path(p) => self.fs.get(p),
                    Source::Trashed(p) => self.trash.get(p),
                };
                match source {
                    Some(Node::File { hash, .. }) if hash == blake3 => {}
                    other => return Err(format!("copy to {path} from {from:?}: found {other:?}")),
                }
                self.put(
                    path,
                    Node::File {
                        hash: *blake3,
                        meta: meta.clone(),
                    },
                )
            }
            Action::Symlink { path, target, meta } => self.put(
                path,
                Node::Link {
                    target: target.clone(),
                    meta: meta.clone(),
                },
            ),
            Action::Link { path, to } => match self.fs.get(to).cloned() {
                Some(node @ Node::File { .. }) => self.put(path, node),
                other => Err(format!("link {path} to {to}: found {other:?}")),
            },
            Action::SetMeta { path, meta } => {
                let node = self
                    .fs
                    .get_mut(path)
                    .ok_or_else(|| format!("setmeta {path}: missing"))?;
                *node.meta_mut() = meta.clone();
                Ok(())
            }
        }
    }
}

/// A random tree over a small name space, so the two sides overlap a lot: the same paths
/// with other kinds, the same contents under other paths.
fn arb_tree() -> impl Strategy<Value = Tree> {
    arb_tree_with(false)
}

fn arb_tree_with(pending: bool) -> impl Strategy<Value = Tree> {
    let names = ["a", "b", "c"];
    let mut paths = Vec::new();
    for x in names {
        paths.push(x.to_owned());
        for y in names {
            paths.push(format!("{x}/{y}"));
            for z in names {
                paths.push(format!("{x}/{y}/{z}"));
            }
        }
    }
    let kinds = if pending { 0u8..6 } else { 0u8..5 };
    prop::collection::vec((kinds, 0u8..4, 0u8..8), paths.len()).prop_map(move |choices| {
        let mut tree = Tree::new();
        for (path, (kind, content, m)) in paths.iter().zip(choices) {
            let path = rel(path);
            let parent_ok = path
                .parent()
                .is_none_or(|p| matches!(tree.get(&p), Some(Node::Dir { .. })));
            if !parent_ok {
                continue;
            }
            let node = match kind {
                0 => continue,
                1 | 2 => Node::Dir { meta: meta(m) },
                3 => Node::File {
                    hash: hash(content),
                    meta: meta(m),
                },
                5 => Node::Pending,
                _ => Node::Link {
                    target: format!("../t{content}").into_bytes(),
                    // Linux reports every symlink as 0777; its mode is never carried.
                    meta: FileMeta {
                        mode: 0o777,
                        ..meta(m)
                    },
                },
            };
            tree.insert(path, node);
        }
        tree
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn executing_the_plan_yields_the_senders_tree(
        sender in arb_tree_with(true),
        receiver in arb_tree(),
        racy in prop::collection::vec(prop::bool::weighted(0.2), 40),
    ) {
        let plan = plan(&manifest(&sender), &index(&receiver, &racy)).unwrap();
        let mut model = Model { fs: receiver.clone(), trash: Tree::new() };
        for action in &plan.actions {
            if let Err(err) = model.run(action) {
                prop_assert!(false, "{err}\nplan: {:#?}", plan.actions);
            }
        }
        // Pending paths keep whatever the receiver had there, subtree included.
        let pending: Vec<&RelPath> = sender
            .iter()
            .filter(|(_, n)| **n == Node::Pending)
            .map(|(p, _)| p)
            .collect();
        let under_pending = |p: &RelPath| pending.iter().any(|q| p.starts_with(q));
        let mut expected: Tree = sender
            .iter()
            .filter(|(p, _)| !under_pending(p))
            .map(|(p, n)| (p.clone(), n.clone()))
            .collect();
        expected.extend(
            receiver
                .iter()
                .filter(|(p, _)| under_pending(p))
                .map(|(p, n)| (p.clone(), n.clone())),
        );
        prop_assert_eq!(&model.fs, &expected, "plan: {:#?}", plan.actions);
        // Nothing the sender no longer has is lost without a trash copy, except the old
        // version of a file fetched against it (a patch).
        let sender_hashes: Vec<[u8; 32]> = sender
            .values()
            .filter_map(|n| match n { Node::File { hash, .. } => Some(*hash), _ => None })
            .collect();
        let patched: Vec<&RelPath> = plan
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Fetch { path, basis: Basis::Existing, .. } => Some(path),
                _ => None,
            })
            .collect();
        for (path, node) in &receiver {
            let Node::File { hash, .. } = node else { continue };
            if sender_hashes.contains(hash) || under_pending(path) || patched.contains(&path) {
                continue;
            }
            prop_assert!(
                model.trash.get(path) == Some(node),
                "{path}'s content is neither at the sender nor in the trash\nplan: {:#?}",
                plan.actions
            );
        }
    }

    #[test]
    fn equal_trees_need_nothing(tree in arb_tree()) {
        let plan = plan(&manifest(&tree), &index(&tree, &[])).unwrap();
        prop_assert!(plan.actions.is_empty(), "{:#?}", plan.actions);
    }
}

#[test]
fn a_renumbered_voicemail_box_is_copied_locally_not_fetched() {
    let dir = |m| Node::Dir { meta: meta(m) };
    let file = |h| Node::File {
        hash: hash(h),
        meta: meta(0),
    };
    let mut receiver = Tree::new();
    receiver.insert(rel("INBOX"), dir(0));
    receiver.insert(rel("INBOX/msg0000.wav"), file(1));
    receiver.insert(rel("INBOX/msg0001.wav"), file(2));
    receiver.insert(rel("INBOX/msg0002.wav"), file(3));
    // msg0000 was deleted on the primary; Asterisk moved 0001 → 0000 and 0002 → 0001.
    let mut sender = Tree::new();
    sender.insert(rel("INBOX"), dir(1));
    sender.insert(rel("INBOX/msg0000.wav"), file(2));
    sender.insert(rel("INBOX/msg0001.wav"), file(3));

    let plan = plan(&manifest(&sender), &index(&receiver, &[])).unwrap();
    assert_eq!(plan.summary.fetch_files, 0, "{:#?}", plan.actions);
    assert_eq!(plan.summary.local_copies, 2);
    // msg0002 (gone on the primary) and the deleted message's content under msg0000, which
    // the copy of msg0001 would otherwise overwrite.
    assert_eq!(plan.summary.trashed, 2);
    assert!(plan.actions.contains(&Action::Trash {
        path: rel("INBOX/msg0000.wav")
    }));
    assert!(plan.actions.contains(&Action::CopyLocal {
        path: rel("INBOX/msg0001.wav"),
        from: Source::Trashed(rel("INBOX/msg0002.wav")),
        size: 3000,
        blake3: hash(3),
        meta: meta(0),
    }));
}

#[test]
fn a_changed_file_is_fetched_against_its_old_version() {
    let mut receiver = Tree::new();
    receiver.insert(
        rel("rec.wav"),
        Node::File {
            hash: hash(1),
            meta: meta(0),
        },
    );
    let mut sender = Tree::new();
    sender.insert(
        rel("rec.wav"),
        Node::File {
            hash: hash(2),
            meta: meta(4),
        },
    );
    let plan = plan(&manifest(&sender), &index(&receiver, &[])).unwrap();
    assert!(matches!(
        plan.actions.as_slice(),
        [Action::Fetch {
            basis: Basis::Existing,
            ..
        }]
    ));
}

#[test]
fn a_manifest_that_is_not_a_tree_is_refused() {
    let entry = |path: &str, kind| ManifestEntry {
        path: rel(path),
        kind,
        meta: meta(0),
    };
    let orphan = vec![entry("a/b", ManifestKind::Dir)];
    assert!(plan(&orphan, &[]).is_err());
    let under_file = vec![
        entry(
            "a",
            ManifestKind::File {
                size: 1,
                blake3: hash(1),
            },
        ),
        entry("a/b", ManifestKind::Dir),
    ];
    assert!(plan(&under_file, &[]).is_err());
    let twice = vec![entry("a", ManifestKind::Dir), entry("a", ManifestKind::Dir)];
    assert!(plan(&twice, &[]).is_err());
}
