//! Random trees and random edits on a real file system: scan both sides, plan, execute with
//! a local fetcher, and the receiver's tree is then identical to the sender's by BLAKE3 and
//! metadata; a second round has nothing left to do.

// In tests a panic is the failure report; helpers outside #[test] fns unwrap too.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs::{self, File, FileTimes};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use lbs_protocol::RelPath;
use lbs_sync::{Index, LocalFetcher, Root, ScanOptions, Trash, execute, manifest, plan, scan};
use proptest::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Spec {
    Dir { mode: u32 },
    File { content: Vec<u8>, mode: u32 },
    Link { target: String },
}

type Tree = BTreeMap<String, Spec>;

fn content(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u8)
                .wrapping_mul(seed | 1)
                .wrapping_add((i >> 12) as u8)
        })
        .collect()
}

fn arb_content() -> impl Strategy<Value = Vec<u8>> {
    // Small files, files of a few blocks, and one past a stripe boundary now and then.
    (
        any::<u8>(),
        prop_oneof![0usize..200, 4000usize..20_000, Just(1_100_000)],
    )
        .prop_map(|(seed, len)| content(seed, len))
}

fn arb_tree() -> impl Strategy<Value = Tree> {
    let names = ["a", "b", "c"];
    let mut paths = Vec::new();
    for x in names {
        paths.push(x.to_owned());
        for y in names {
            paths.push(format!("{x}/{y}"));
        }
    }
    let n = paths.len();
    prop::collection::vec((0u8..4, arb_content(), any::<bool>()), n).prop_map(move |choices| {
        let mut tree = Tree::new();
        for (path, (kind, bytes, flag)) in paths.iter().zip(choices) {
            if let Some((parent, _)) = path.rsplit_once('/')
                && !matches!(tree.get(parent), Some(Spec::Dir { .. }))
            {
                continue;
            }
            let mode = if flag { 0o640 } else { 0o755 };
            let spec = match kind {
                0 => continue,
                1 => Spec::Dir { mode },
                2 => Spec::File {
                    content: bytes,
                    mode,
                },
                _ => Spec::Link {
                    target: format!("../elsewhere/{}", bytes.len()),
                },
            };
            tree.insert(path.clone(), spec);
        }
        tree
    })
}

#[derive(Clone, Debug)]
enum Edit {
    Overwrite { at: prop::sample::Index, byte: u8 },
    Append(Vec<u8>),
    Truncate,
    Insert(u8),
    Chmod,
    Delete,
    Rename,
    FileToDir,
}

fn arb_edit() -> impl Strategy<Value = (prop::sample::Index, Edit)> {
    let edit = prop_oneof![
        (any::<prop::sample::Index>(), any::<u8>())
            .prop_map(|(at, byte)| Edit::Overwrite { at, byte }),
        prop::collection::vec(any::<u8>(), 1..5000).prop_map(Edit::Append),
        Just(Edit::Truncate),
        any::<u8>().prop_map(Edit::Insert),
        Just(Edit::Chmod),
        Just(Edit::Delete),
        Just(Edit::Rename),
        Just(Edit::FileToDir),
    ];
    (any::<prop::sample::Index>(), edit)
}

fn apply_edit(tree: &mut Tree, (which, edit): &(prop::sample::Index, Edit)) {
    if tree.is_empty() {
        return;
    }
    let path = tree.keys().nth(which.index(tree.len())).unwrap().clone();
    let spec = tree.get_mut(&path).unwrap();
    match (edit, spec) {
        (Edit::Overwrite { at, byte }, Spec::File { content, .. }) if !content.is_empty() => {
            let i = at.index(content.len());
            content[i] = content[i].wrapping_add(*byte | 1);
        }
        (Edit::Append(more), Spec::File { content, .. }) => content.extend_from_slice(more),
        (Edit::Truncate, Spec::File { content, .. }) => content.truncate(content.len() / 2),
        (Edit::Insert(byte), Spec::File { content, .. }) => content.insert(0, *byte),
        (Edit::Chmod, Spec::File { mode, .. } | Spec::Dir { mode }) => *mode ^= 0o022,
        (Edit::Delete, _) => {
            tree.retain(|p, _| !(p == &path || p.starts_with(&format!("{path}/"))));
        }
        (Edit::Rename, Spec::File { .. }) => {
            let spec = tree.remove(&path).unwrap();
            tree.insert(format!("{path}.renamed"), spec);
        }
        (Edit::FileToDir, Spec::File { .. }) => {
            tree.insert(path, Spec::Dir { mode: 0o750 });
        }
        (Edit::FileToDir, Spec::Dir { .. }) => {
            tree.retain(|p, _| !p.starts_with(&format!("{path}/")));
            tree.insert(
                path,
                Spec::File {
                    content: b"was a directory".to_vec(),
                    mode: 0o644,
                },
            );
        }
        _ => {}
    }
}

fn mtime_of(path: &str) -> SystemTime {
    let n: u64 = path.bytes().map(u64::from).sum();
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000 + n * 1000)
}

fn materialize(root: &Path, tree: &Tree) {
    fs::create_dir_all(root).unwrap();
    for (path, spec) in tree {
        let abs = root.join(path);
        match spec {
            Spec::Dir { .. } => fs::create_dir(&abs).unwrap(),
            Spec::File { content, mode } => {
                fs::write(&abs, content).unwrap();
                fs::set_permissions(&abs, fs::Permissions::from_mode(*mode)).unwrap();
                File::options()
                    .write(true)
                    .open(&abs)
                    .unwrap()
                    .set_times(FileTimes::new().set_modified(mtime_of(path)))
                    .unwrap();
            }
            Spec::Link { target } => std::os::unix::fs::symlink(target, &abs).unwrap(),
        }
    }
    // Directories last and deepest first: filling them moved their mtimes.
    for (path, spec) in tree.iter().rev() {
        if let Spec::Dir { mode } = spec {
            let abs = root.join(path);
            fs::set_permissions(&abs, fs::Permissions::from_mode(*mode)).unwrap();
            File::open(&abs)
                .unwrap()
                .set_times(FileTimes::new().set_modified(mtime_of(path)))
                .unwrap();
        }
    }
}

/// The state a receiver must reach: every entry's kind, content hash and carried metadata.
fn state(root: &Path) -> Vec<(String, String)> {
    let mut index = Index::in_memory().unwrap();
    let report = scan(root, &mut index, &ScanOptions::default()).unwrap();
    assert!(
        report.unstable.is_empty() && report.skipped.is_empty(),
        "{report:?}"
    );
    manifest(&index)
        .unwrap()
        .into_iter()
        .map(|e| (e.path.to_string(), format!("{:?} {:?}", e.kind, e.meta)))
        .collect()
}

fn pull(sender: &Path, receiver: &Path, trash: &Trash) -> lbs_sync::Plan {
    let mut sender_index = Index::in_memory().unwrap();
    scan(sender, &mut sender_index, &ScanOptions::default()).unwrap();
    let mut receiver_index = Index::in_memory().unwrap();
    scan(receiver, &mut receiver_index, &ScanOptions::default()).unwrap();
    let plan = plan(
        &manifest(&sender_index).unwrap(),
        &receiver_index.entries().unwrap(),
    )
    .unwrap();
    let report = execute(
        &plan,
        &Root::open(receiver).unwrap(),
        plan.trashes().then(|| trash.batch().unwrap()).as_ref(),
        &mut LocalFetcher::new(sender).unwrap(),
        &|path: &RelPath| receiver_index.known(path).unwrap(),
        &mut |_| {},
        None,
    )
    .unwrap();
    assert!(report.deferred.is_empty(), "{report:?}");
    plan
}

/// A sender holding `edited` and a receiver holding `base`, side by side in `dir`, and the
/// receiver's trash.
fn two_sides(
    dir: &Path,
    base: &Tree,
    edited: &Tree,
) -> (std::path::PathBuf, std::path::PathBuf, Trash) {
    let (sender, receiver) = (dir.join("sender"), dir.join("receiver"));
    materialize(&sender, edited);
    materialize(&receiver, base);
    let trash = Trash::open(&dir.join("trash")).unwrap();
    (sender, receiver, trash)
}

/// `base` with `edits` applied.
fn edited(base: &Tree, edits: &[(prop::sample::Index, Edit)]) -> Tree {
    let mut edited = base.clone();
    for edit in edits {
        apply_edit(&mut edited, edit);
    }
    edited
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn after_a_pull_the_trees_are_identical(
        base in arb_tree(),
        edits in prop::collection::vec(arb_edit(), 0..8),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (sender, receiver, trash) = two_sides(dir.path(), &base, &edited(&base, &edits));

        pull(&sender, &receiver, &trash);
        prop_assert_eq!(state(&receiver), state(&sender));

        let again = pull(&sender, &receiver, &trash);
        prop_assert!(again.actions.is_empty(), "second pull: {:#?}", again.actions);
    }
}

/// Mostly files, of the sizes that take each path: whole (tiny), delta (config-sized, when
/// the size changes), block transfer and in-place patch (over a megabyte).
fn arb_file_tree() -> impl Strategy<Value = Tree> {
    let sizes = prop_oneof![0usize..200, 9000usize..60_000, Just(1_100_000)];
    prop::collection::vec((any::<u8>(), sizes), 6).prop_map(|files| {
        let mut tree = Tree::new();
        tree.insert("d".into(), Spec::Dir { mode: 0o755 });
        for (i, (seed, len)) in files.into_iter().enumerate() {
            let path = if i % 2 == 0 {
                format!("f{i}")
            } else {
                format!("d/f{i}")
            };
            tree.insert(
                path,
                Spec::File {
                    content: content(seed, len),
                    mode: 0o644,
                },
            );
        }
        tree
    })
}

/// A pull over a real session (framed, in memory): block transfers, in-place patches, deltas
/// and the request pipeline all take part.
fn session_pull(
    sender: &Path,
    receiver: &Path,
    trash: &Trash,
    receiver_index: &std::sync::Arc<std::sync::Mutex<Index>>,
) -> lbs_sync::PullReport {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (a, b) = tokio::io::duplex(256 * 1024);
        let codec = || lbs_protocol::FrameCodec::<lbs_protocol::Envelope>::new();
        let (mut server_conn, mut client_conn) = (
            tokio_util::codec::Framed::new(a, codec()),
            tokio_util::codec::Framed::new(b, codec()),
        );
        let generation = lbs_protocol::Generation(1);
        let server = tokio::spawn({
            let sender = sender.to_owned();
            async move {
                let index = std::sync::Arc::new(std::sync::Mutex::new(Index::in_memory().unwrap()));
                lbs_sync::serve(
                    &mut server_conn,
                    sender,
                    index,
                    generation,
                    lbs_protocol::PROTOCOL_VERSION,
                )
                .await
            }
        });
        let report = lbs_sync::pull(
            &mut client_conn,
            receiver,
            receiver_index.clone(),
            trash,
            generation,
            lbs_sync::PullOptions::default(),
        )
        .await
        .unwrap();
        drop(client_conn);
        tokio::time::timeout(Duration::from_secs(30), server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        report
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn after_a_pull_over_a_session_the_trees_are_identical(
        base in arb_file_tree(),
        edits in prop::collection::vec(arb_edit(), 1..10),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (sender, receiver, trash) = two_sides(dir.path(), &base, &edited(&base, &edits));
        let index = std::sync::Arc::new(std::sync::Mutex::new(Index::in_memory().unwrap()));

        let first = session_pull(&sender, &receiver, &trash, &index);
        prop_assert!(first.executed.deferred.is_empty(), "{:?}", first);
        prop_assert_eq!(state(&receiver), state(&sender));

        let again = session_pull(&sender, &receiver, &trash, &index);
        prop_assert_eq!(again.executed.done, 0, "second pull: {:?}", again);
        prop_assert!(!receiver.join(lbs_sync::JOURNAL_NAME).exists());
    }
}

#[test]
fn deleted_files_go_to_the_trash_and_the_trash_is_purged_after_retention() {
    let dir = tempfile::tempdir().unwrap();
    let mut base = Tree::new();
    base.insert("INBOX".into(), Spec::Dir { mode: 0o750 });
    base.insert(
        "INBOX/msg0000.wav".into(),
        Spec::File {
            content: content(3, 5000),
            mode: 0o640,
        },
    );
    let mut edited = base.clone();
    edited.remove("INBOX/msg0000.wav");
    let (sender, receiver, trash) = two_sides(dir.path(), &base, &edited);
    pull(&sender, &receiver, &trash);
    assert!(!receiver.join("INBOX/msg0000.wav").exists());
    let batch = fs::read_dir(dir.path().join("trash"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(
        fs::read(batch.join("INBOX/msg0000.wav")).unwrap(),
        content(3, 5000),
        "the deleted message must be kept in the trash"
    );
    let day = Duration::from_secs(24 * 3600);
    assert_eq!(trash.purge(day).unwrap(), 0, "a fresh batch is kept");
    assert!(batch.exists());
    // Two days on, with a one-day retention, the batch goes.
    let later = SystemTime::now() + 2 * day;
    assert_eq!(trash.purge_at(day, later).unwrap(), 1);
    assert!(!batch.exists());
}

#[test]
fn thousands_of_new_files_are_committed_in_groups_and_directories_get_their_mtimes_after() {
    let dir = tempfile::tempdir().unwrap();
    let mut edited = Tree::new();
    // Three directories of 900 files: groups of at most 1,024 files are handed to the
    // committer thread several times, and each directory's mtime is set only once all of
    // them are renamed in.
    for box_no in 0..3 {
        let mailbox = format!("vm{box_no}");
        edited.insert(mailbox.clone(), Spec::Dir { mode: 0o750 });
        for msg in 0..900 {
            edited.insert(
                format!("{mailbox}/msg{msg:04}.txt"),
                Spec::File {
                    content: content(msg as u8, 100 + msg % 7),
                    mode: 0o640,
                },
            );
        }
    }
    let (sender, receiver, trash) = two_sides(dir.path(), &Tree::new(), &edited);
    let mut sender_index = Index::in_memory().unwrap();
    scan(&sender, &mut sender_index, &ScanOptions::default()).unwrap();
    let plan = plan(&manifest(&sender_index).unwrap(), &[]).unwrap();
    let root = Root::open(&receiver)
        .unwrap()
        .with_durability(lbs_sync::Durability::Grouped);
    let report = execute(
        &plan,
        &root,
        plan.trashes().then(|| trash.batch().unwrap()).as_ref(),
        &mut LocalFetcher::new(&sender).unwrap(),
        &|_: &RelPath| None,
        &mut |_| {},
        None,
    )
    .unwrap();
    assert!(report.deferred.is_empty(), "{report:?}");
    assert_eq!(report.installed.len(), 2700);
    assert_eq!(state(&receiver), state(&sender));
    // No temporary file is left beside the ones put in place.
    for box_no in 0..3 {
        let names = fs::read_dir(receiver.join(format!("vm{box_no}"))).unwrap();
        assert_eq!(names.count(), 900);
    }
}
