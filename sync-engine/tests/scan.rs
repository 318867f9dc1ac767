//! A pass over a tree reads only what changed, and the index never vouches for content a file
//! does not have.

// In tests a panic is the failure report; helpers outside #[test] fns unwrap too.
#![allow(clippy::unwrap_used)]

mod common;

use common::write_old;

use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;

use lbs_protocol::RelPath;
use lbs_sync::{EntryKind, Index, ScanOptions, scan, scan_from};

fn rel(text: &str) -> RelPath {
    RelPath::try_from(text).unwrap()
}

fn tree(root: &Path) {
    write_old(
        &root.join("extensions.conf"),
        b"[default]\nexten => 100,1,Dial(PJSIP/100)\n",
    );
    write_old(
        &root.join("voicemail/1234/INBOX/msg0000.wav"),
        &vec![7u8; 50_000],
    );
    write_old(
        &root.join("voicemail/1234/INBOX/msg0001.wav"),
        &vec![9u8; 20_000],
    );
    write_old(
        &root.join("moh/big.wav"),
        &(0..3_000_000u32)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<_>>(),
    );
}

#[test]
fn a_second_pass_over_an_unchanged_tree_reads_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    tree(&root);
    let db = dir.path().join("index.sqlite");
    let options = ScanOptions::default();

    let first = scan(&root, &mut Index::open(&db).unwrap(), &options).unwrap();
    assert_eq!(first.files, 4);
    assert_eq!(first.hashed_files, 4);
    assert_eq!(first.hashed_bytes, 3_000_000 + 50_000 + 20_000 + 41);

    // Reopened from disk, as after a restart.
    let mut index = Index::open(&db).unwrap();
    let second = scan(&root, &mut index, &options).unwrap();
    assert_eq!(second.files, 4);
    assert_eq!(second.hashed_files, 0, "{second:?}");
    assert_eq!(second.hashed_bytes, 0);
    assert_eq!(second.metadata_updates, 0);

    let big = index.get(&rel("moh/big.wav")).unwrap().unwrap();
    let content = fs::read(root.join("moh/big.wav")).unwrap();
    assert_eq!(big.hash.unwrap().root, *blake3::hash(&content).as_bytes());
    let (block_size, blocks) = index.blocks(&rel("moh/big.wav")).unwrap().unwrap();
    assert_eq!(
        blocks.len() as u64,
        block_size.blocks_for(content.len() as u64)
    );
    assert_eq!(
        lbs_sync::root_from_blocks(&blocks, block_size, content.len() as u64).unwrap(),
        Some(blake3::hash(&content))
    );
}

#[test]
fn a_same_size_rewrite_with_its_old_mtime_restored_is_still_noticed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    tree(&root);
    let mut index = Index::in_memory().unwrap();
    scan(&root, &mut index, &ScanOptions::default()).unwrap();

    // Same size, and the mtime put back as it was: only the ctime tells.
    write_old(
        &root.join("voicemail/1234/INBOX/msg0001.wav"),
        &vec![8u8; 20_000],
    );
    let pass = scan(&root, &mut index, &ScanOptions::default()).unwrap();
    assert_eq!(pass.hashed_files, 1, "{pass:?}");
    let entry = index
        .get(&rel("voicemail/1234/INBOX/msg0001.wav"))
        .unwrap()
        .unwrap();
    assert_eq!(
        entry.hash.unwrap().root,
        *blake3::hash(&vec![8u8; 20_000]).as_bytes()
    );
}

#[test]
fn mode_changes_deletions_links_and_special_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    tree(&root);
    let mut index = Index::in_memory().unwrap();
    scan(&root, &mut index, &ScanOptions::default()).unwrap();

    fs::set_permissions(
        root.join("extensions.conf"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    fs::remove_file(root.join("voicemail/1234/INBOX/msg0000.wav")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("escape")).unwrap();
    nix::unistd::mkfifo(
        &root.join("pipe"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();

    let pass = scan(&root, &mut index, &ScanOptions::default()).unwrap();
    // The chmod moved the ctime, so that one file was read again to be sure; nothing else.
    assert_eq!(pass.hashed_files, 1, "{pass:?}");
    assert_eq!(pass.hashed_bytes, 41);
    // extensions.conf's mode, and INBOX's mtime (a file left it).
    assert_eq!(pass.metadata_updates, 2);
    assert_eq!(pass.removed, 1);
    assert_eq!(pass.symlinks, 1);
    assert_eq!(pass.skipped.len(), 1);
    assert_eq!(pass.skipped[0].path, rel("pipe"));
    assert!(
        pass.skipped[0].reason.to_string().contains("FIFO"),
        "{:?}",
        pass.skipped
    );

    assert_eq!(
        index
            .get(&rel("extensions.conf"))
            .unwrap()
            .unwrap()
            .meta
            .mode,
        0o600
    );
    assert!(
        index
            .get(&rel("voicemail/1234/INBOX/msg0000.wav"))
            .unwrap()
            .is_none()
    );
    let link = index.get(&rel("escape")).unwrap().unwrap();
    assert_eq!(link.kind, EntryKind::Symlink(b"/etc/passwd".to_vec()));
    assert!(link.hash.is_none(), "a symlink's target must never be read");
    assert!(index.get(&rel("pipe")).unwrap().is_none());
}

#[test]
fn unfinished_temporary_files_of_a_receiver_are_not_part_of_the_tree() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    write_old(&root.join("sip.conf"), b"x");
    write_old(
        &root.join(format!("{}123.0.sip.conf", lbs_sync::TEMP_PREFIX)),
        b"half",
    );
    let mut index = Index::in_memory().unwrap();
    let pass = scan(&root, &mut index, &ScanOptions::default()).unwrap();
    assert_eq!(pass.files, 1);
    assert_eq!(index.entries().unwrap().len(), 1);
    assert_eq!(pass.stale_temps_removed, 0);
    assert_eq!(
        fs::read_dir(&root).unwrap().count(),
        2,
        "a sender never deletes them"
    );

    // A receiver holding the root's lock removes what an interrupted run left behind.
    let options = ScanOptions {
        remove_stale_temps: true,
        ..ScanOptions::default()
    };
    let pass = scan(&root, &mut index, &options).unwrap();
    assert_eq!(pass.stale_temps_removed, 1);
    assert_eq!(fs::read_dir(&root).unwrap().count(), 1);
}

#[test]
fn a_file_modified_just_now_is_hashed_again_next_time() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir_all(&root).unwrap();
    fs::write(root.join("recording.wav"), b"RIFF....fresh").unwrap();
    let mut index = Index::in_memory().unwrap();
    let first = scan(&root, &mut index, &ScanOptions::default()).unwrap();
    assert_eq!(first.hashed_files, 1);
    let entry = index.get(&rel("recording.wav")).unwrap().unwrap();
    assert!(entry.hash.as_ref().unwrap().racy);
    let second = scan(&root, &mut index, &ScanOptions::default()).unwrap();
    assert_eq!(second.hashed_files, 1, "a racy hash must not be trusted");
}

#[test]
fn identical_content_is_found_by_hash() {
    // Scanned for real, the receiver's index lets the plan copy a message it already holds
    // under another name instead of fetching it.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    write_old(&root.join("INBOX/msg0001.wav"), b"the same message");
    write_old(&root.join("INBOX/msg0002.wav"), b"another message");
    let mut index = Index::in_memory().unwrap();
    scan(&root, &mut index, &ScanOptions::default()).unwrap();
    let mut wanted = lbs_sync::manifest(&index).unwrap();
    let mut moved = wanted
        .iter()
        .find(|e| e.path == rel("INBOX/msg0001.wav"))
        .unwrap()
        .clone();
    moved.path = rel("Old/msg0007.wav");
    let mut old_dir = wanted
        .iter()
        .find(|e| e.path == rel("INBOX"))
        .unwrap()
        .clone();
    old_dir.path = rel("Old");
    wanted.extend([old_dir, moved]);
    let plan = lbs_sync::plan(&wanted, &index.entries().unwrap()).unwrap();
    assert_eq!(plan.summary.fetch_files, 0, "{:#?}", plan.actions);
    assert!(plan.actions.iter().any(|a| matches!(
        a,
        lbs_sync::Action::CopyLocal { path, from: lbs_sync::Source::Path(from), .. }
            if *path == rel("Old/msg0007.wav") && *from == rel("INBOX/msg0001.wav")
    )));
}

#[test]
fn a_root_that_is_a_symlink_is_followed_once_and_a_missing_root_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("usr-share-moh");
    write_old(&real.join("song.wav"), b"la la la");
    let link = dir.path().join("var-lib-moh");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let mut index = Index::in_memory().unwrap();
    let pass = scan(&link, &mut index, &ScanOptions::default()).unwrap();
    assert_eq!(pass.files, 1);

    let err = scan(
        &dir.path().join("nope"),
        &mut index,
        &ScanOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
}

#[test]
fn a_pass_from_known_entries_returns_exactly_what_the_index_then_holds() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    tree(&root);
    let mut index = Index::in_memory().unwrap();
    scan(&root, &mut index, &ScanOptions::default()).unwrap();

    // Every kind of change, with names that sort around '/' ("a-b" < "a.b" < "a/b").
    write_old(&root.join("a/b"), b"new in a new directory");
    write_old(&root.join("a.b"), b"dot");
    write_old(&root.join("a-b"), b"dash");
    fs::remove_file(root.join("voicemail/1234/INBOX/msg0000.wav")).unwrap();
    write_old(&root.join("extensions.conf"), b"[default]\n");
    fs::remove_file(root.join("moh/big.wav")).unwrap();
    fs::create_dir(root.join("moh/big.wav")).unwrap();
    std::os::unix::fs::symlink("../extensions.conf", root.join("moh/link")).unwrap();

    let known = index.entries().unwrap();
    let (pass, entries) = scan_from(&root, &mut index, &ScanOptions::default(), known).unwrap();
    assert_eq!(pass.removed, 1, "{pass:?}");
    assert_eq!(entries, index.entries().unwrap());
    let paths: Vec<String> = entries.iter().map(|e| e.path.to_string()).collect();
    let mut sorted = paths.clone();
    sorted.sort();
    assert_eq!(paths, sorted);
    assert!(paths.contains(&"a/b".to_owned()) && paths.contains(&"a-b".to_owned()));

    // And over an unchanged tree, what it started from.
    let known = index.entries().unwrap();
    let (pass, entries) =
        scan_from(&root, &mut index, &ScanOptions::default(), known.clone()).unwrap();
    assert_eq!(pass.hashed_files, 0, "{pass:?}");
    assert_eq!(entries, known);
}

#[test]
fn remembered_entries_are_used_only_while_nothing_changed_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    tree(&root);
    let db = dir.path().join("index.sqlite");
    let mut index = Index::open(&db).unwrap();
    let known = index.take_entries().unwrap();
    let (_, entries) = scan_from(&root, &mut index, &ScanOptions::default(), known).unwrap();
    index.remember(entries.clone()).unwrap();
    assert_eq!(index.take_entries().unwrap(), entries);

    // Another process changes the index: what was remembered is stale and not used.
    index.remember(entries.clone()).unwrap();
    {
        let mut other = Index::open(&db).unwrap();
        write_old(&root.join("new.wav"), b"riff");
        scan(&root, &mut other, &ScanOptions::default()).unwrap();
    }
    let fresh = index.take_entries().unwrap();
    assert_ne!(fresh, entries);
    assert_eq!(fresh, index.entries().unwrap());

    // So does a batch on the same handle.
    index.remember(entries.clone()).unwrap();
    scan(&root, &mut index, &ScanOptions::default()).unwrap();
    assert_eq!(index.take_entries().unwrap(), index.entries().unwrap());
}

/// Appends `more` to `path` and gives it an mtime well in the past (as a quiet file has).
fn append_old(path: &Path, more: &[u8], mtime_s: u64) {
    use std::io::Write;
    let mut file = fs::OpenOptions::new().append(true).open(path).unwrap();
    file.write_all(more).unwrap();
    file.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime_s))
        .unwrap();
}

#[test]
fn a_growing_recording_costs_its_new_blocks_and_is_checked_whole_once_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let call = root.join("monitor/call.wav");
    let mut content: Vec<u8> = (0..4_000_000u32).map(|i| (i % 253) as u8).collect();
    write_old(&call, &content);
    let mut index = Index::in_memory().unwrap();
    let options = ScanOptions::default();
    scan(&root, &mut index, &options).unwrap();
    let block = lbs_sync::BlockSize::DEFAULT.get();
    let hash_of = |index: &Index| {
        index
            .get(&rel("monitor/call.wav"))
            .unwrap()
            .unwrap()
            .hash
            .unwrap()
    };

    // It grows three times: each pass reads the header block, one old block to check, the old
    // last block and what was appended — not 4 MB.
    for step in 0..3u32 {
        let more: Vec<u8> = (0..100_000u32)
            .map(|i| (i % 199) as u8 + step as u8)
            .collect();
        // Asterisk rewrites the WAV header's length as it goes.
        let riff_len = (content.len() as u32).to_le_bytes();
        content[4..8].copy_from_slice(&riff_len);
        fs::OpenOptions::new()
            .write(true)
            .open(&call)
            .unwrap()
            .write_all_at(&content[..8], 0)
            .unwrap();
        content.extend_from_slice(&more);
        append_old(&call, &more, 1_650_000_000 + u64::from(step));
        let pass = scan(&root, &mut index, &options).unwrap();
        assert_eq!(pass.hashed_files, 1);
        assert!(
            pass.hashed_bytes <= 100_000 + 3 * block,
            "pass {step} read {} bytes",
            pass.hashed_bytes
        );
        let hash = hash_of(&index);
        assert_eq!(hash.root, *blake3::hash(&content).as_bytes(), "pass {step}");
        assert!(
            hash.racy,
            "a hash built on old blocks is checked again later"
        );
    }

    // A write into the middle while it grew is not seen by the append path, but the first
    // pass after it stops growing reads it whole and finds it.
    content[2_000_000] ^= 0xff;
    fs::OpenOptions::new()
        .write(true)
        .open(&call)
        .unwrap()
        .write_all_at(&content[2_000_000..2_000_001], 2_000_000)
        .unwrap();
    content.extend_from_slice(b"last words");
    append_old(&call, b"last words", 1_650_000_100);
    scan(&root, &mut index, &options).unwrap();
    let quiet = scan(&root, &mut index, &options).unwrap();
    assert_eq!(quiet.hashed_bytes, content.len() as u64, "{quiet:?}");
    let hash = hash_of(&index);
    assert_eq!(hash.root, *blake3::hash(&content).as_bytes());
    assert!(!hash.racy);
    // And then it is left alone.
    assert_eq!(scan(&root, &mut index, &options).unwrap().hashed_files, 0);
}

#[test]
fn a_growing_file_whose_list_spans_parts_is_hashed_by_its_new_blocks() {
    // 1 KiB blocks: a 9 MiB file's list is three parts of the index.
    let options = ScanOptions {
        block_size: lbs_sync::BlockSize::new(1024).unwrap(),
        ..ScanOptions::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let call = root.join("monitor/long.wav");
    let mut content: Vec<u8> = (0..9_000_000u32).map(|i| (i % 239) as u8).collect();
    write_old(&call, &content);
    let mut index = Index::in_memory().unwrap();
    scan(&root, &mut index, &options).unwrap();
    for step in 0..3u32 {
        let more: Vec<u8> = (0..300_000u32)
            .map(|i| (i % 17) as u8 + step as u8)
            .collect();
        content.extend_from_slice(&more);
        append_old(&call, &more, 1_650_000_000 + u64::from(step));
        let pass = scan(&root, &mut index, &options).unwrap();
        assert!(pass.hashed_bytes <= 300_000 + 3 * 1024, "{pass:?}");
        let path = rel("monitor/long.wav");
        let hash = index.get(&path).unwrap().unwrap().hash.unwrap();
        assert_eq!(hash.root, *blake3::hash(&content).as_bytes(), "pass {step}");
        let (_, blocks) = index.blocks(&path).unwrap().unwrap();
        let expected: Vec<[u8; 32]> = content
            .chunks(1024)
            .enumerate()
            .map(|(i, block)| lbs_sync::block_cv(block, i as u64, options.block_size))
            .collect();
        assert!(blocks == expected, "pass {step}: the stored list");
    }
}

#[test]
fn a_file_written_anew_on_its_inode_and_longer_is_hashed_whole() {
    // A log truncated and rewritten in place looks like an append (same inode, longer): the
    // append path read only its first and last blocks and announced a hash of old blocks it
    // no longer had, every pass while it grew.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let log = root.join("log/pbx.log");
    let before: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
    write_old(&log, &before);
    let mut index = Index::in_memory().unwrap();
    let options = ScanOptions::default();
    scan(&root, &mut index, &options).unwrap();
    let after: Vec<u8> = (0..4_100_000u32).map(|i| (i % 241) as u8 ^ 0x5a).collect();
    fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .write_all_at(&after, 0)
        .unwrap();
    append_old(&log, b"", 1_650_000_000);
    let pass = scan(&root, &mut index, &options).unwrap();
    assert_eq!(pass.hashed_files, 1);
    let hash = index
        .get(&rel("log/pbx.log"))
        .unwrap()
        .unwrap()
        .hash
        .unwrap();
    assert_eq!(hash.root, *blake3::hash(&after).as_bytes());
}

#[test]
fn a_recording_growing_while_it_is_hashed_is_listed_as_its_beginning() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir_all(&root).unwrap();
    let path = root.join("monitor/call.wav");
    let start: Vec<u8> = (0..32u32 << 20).map(|i| (i % 253) as u8).collect();
    write_old(&path, &start);
    // The call goes on: 4 kB every half millisecond, all through the pass.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let recorder = std::thread::spawn({
        let (path, stop) = (path.clone(), stop.clone());
        move || {
            use std::io::Write;
            let mut file = fs::OpenOptions::new().append(true).open(&path).unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                file.write_all(&[9u8; 4096]).unwrap();
                std::thread::sleep(std::time::Duration::from_micros(500));
            }
        }
    });
    while fs::metadata(&path).unwrap().len() == start.len() as u64 {
        std::thread::yield_now();
    }
    let mut index = Index::in_memory().unwrap();
    let report = scan(&root, &mut index, &ScanOptions::default()).unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    recorder.join().unwrap();
    // Listed (it was left out of every pass while it grew), as the length it had when the
    // pass began to read it, its hash that of those bytes, and not trusted for long.
    assert!(report.unstable.is_empty(), "{report:?}");
    assert_eq!(report.growing, [rel("monitor/call.wav")]);
    let entry = index.get(&rel("monitor/call.wav")).unwrap().unwrap();
    let listed = entry.meta.size;
    let now = fs::read(&path).unwrap();
    assert!(
        listed >= start.len() as u64 && listed < now.len() as u64,
        "{listed}"
    );
    let prefix = dir.path().join("prefix");
    fs::write(&prefix, &now[..listed as usize]).unwrap();
    let expected = lbs_sync::hash_file(
        &fs::File::open(&prefix).unwrap(),
        listed,
        lbs_sync::BlockSize::DEFAULT,
    )
    .unwrap();
    let hash = entry.hash.unwrap();
    assert_eq!(hash.root, *expected.root.as_bytes());
    assert!(hash.racy, "hashed again by the next pass");
}
