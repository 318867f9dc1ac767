#![allow(clippy::unwrap_used)]
//! Crash injection for in-place patches: whatever point a run dies at, the file is its old
//! version or its new one after `recover`, and a damaged journal is never replayed.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::write_old;
use lbs_protocol::RelPath;
use lbs_sync::{
    BlockSize, Index, JOURNAL_NAME, Patch, PatchError, Recovery, Root, ScanOptions, Target,
    hash_file, recover, scan,
};
use proptest::prelude::*;

/// `BlockSize::DEFAULT`, the receiver's block size.
const BS: usize = 16 * 1024;
const CHUNK: usize = 256 * 1024;

fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The block-aligned ranges where `new` differs from `old` (as a sender finds them).
fn changed(old: &Path, new: &Path) -> Vec<(u64, u64)> {
    let tree = |p: &Path| {
        let f = fs::File::open(p).unwrap();
        let len = f.metadata().unwrap().len();
        hash_file(&f, len, BlockSize::DEFAULT).unwrap()
    };
    let (old, new) = (tree(old), tree(new));
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for (i, cv) in new.blocks.iter().enumerate() {
        if old.blocks.get(i) == Some(cv) {
            continue;
        }
        let start = (i * BS) as u64;
        let end = (start + BS as u64).min(new.len);
        match ranges.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => ranges.push((start, end)),
        }
    }
    ranges
}

#[test]
fn the_block_size_is_the_receivers() {
    assert_eq!(BS as u64, BlockSize::DEFAULT.get());
}

fn target() -> Target {
    Target {
        mode: 0o640,
        owner: None,
        mtime_ns: 1_700_000_500_000_000_000,
    }
}

/// Builds a receiver root holding `old` and a sender file holding `new`, and seals a patch
/// from one to the other. Returns the sealed journal's bytes and the changed ranges; the
/// receiver's file is still `old` and the journal is on disk.
fn sealed_journal(dir: &Path, old: &[u8], new: &[u8]) -> (Vec<u8>, Vec<(u64, u64)>) {
    let (root_path, sender) = (dir.join("backup"), dir.join("primary"));
    write_old(&root_path.join("rec.wav"), old);
    write_old(&sender.join("rec.wav"), new);
    let mut index = Index::in_memory().unwrap();
    scan(&root_path, &mut index, &ScanOptions::default()).unwrap();
    let rel = RelPath::try_from("rec.wav").unwrap();
    let known = index.known(&rel).unwrap().unwrap();
    let root = Root::open(&root_path).unwrap();
    let ranges = changed(&root_path.join("rec.wav"), &sender.join("rec.wav"));
    let sent: u64 = ranges.iter().map(|(start, end)| end - start).sum();
    let mut patch = Patch::begin(&root, &rel, known, new.len() as u64, sent).unwrap();
    for (start, end) in &ranges {
        let mut at = *start as usize;
        while at < *end as usize {
            let n = (*end as usize - at).min(CHUNK);
            patch.at(at as u64, &new[at..at + n]).unwrap();
            at += n;
        }
    }
    let sealed = patch.seal(new.len() as u64, &blake3::hash(new)).unwrap();
    // The process dies here: nothing has touched the file yet.
    drop(sealed);
    let journal = fs::read(root_path.join(JOURNAL_NAME)).unwrap();
    assert_eq!(fs::read(root_path.join("rec.wav")).unwrap(), old);
    (journal, ranges)
}

fn edited(old: &[u8], edits: &[(f64, usize)], grow: usize, seed: u64) -> Vec<u8> {
    let mut new = old.to_vec();
    for (i, (at, len)) in edits.iter().enumerate() {
        let start = ((new.len() - 1) as f64 * at) as usize;
        let end = (start + len).min(new.len());
        new[start..end].copy_from_slice(&noise(seed + i as u64, end - start));
    }
    new.extend(noise(seed ^ 0xabcd, grow));
    // A WAV writer rewrites the sizes in its header as the file grows.
    let len = new.len() as u32;
    new[4..8].copy_from_slice(&len.to_le_bytes());
    new
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn a_crash_at_any_point_leaves_the_old_or_the_new_version(
        old_blocks in 3usize..10,
        edits in prop::collection::vec((0.0f64..1.0, 1usize..2 * BS), 1..5),
        grow in 0usize..3 * BS,
        seed in any::<u64>(),
        crash in 0.0f64..1.0,
        replayed in 0.0f64..1.0,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let old = noise(seed, old_blocks * BS + 1000);
        let new = edited(&old, &edits, grow, seed);
        let (journal, ranges) = sealed_journal(dir.path(), &old, &new);
        let root_path = dir.path().join("backup");
        let file = root_path.join("rec.wav");

        // Crash while the journal was being written: any prefix of it.
        let cut = (crash * journal.len() as f64) as usize;
        fs::write(root_path.join(JOURNAL_NAME), &journal[..cut]).unwrap();
        let outcome = recover(&Root::open(&root_path).unwrap()).unwrap();
        prop_assert!(matches!(outcome, Recovery::Discarded(_)), "{outcome:?}");
        prop_assert_eq!(fs::read(&file).unwrap(), old.clone());
        prop_assert!(!root_path.join(JOURNAL_NAME).exists());

        // Crash after sealing, part way through writing the blocks into the file.
        fs::write(root_path.join(JOURNAL_NAME), &journal).unwrap();
        let handle = fs::OpenOptions::new().write(true).open(&file).unwrap();
        let done = (replayed * ranges.len() as f64) as usize;
        for (start, end) in &ranges[..done] {
            handle.write_all_at(&new[*start as usize..*end as usize], *start).unwrap();
        }
        if replayed > 0.5 {
            handle.set_len(new.len() as u64).unwrap();
        }
        drop(handle);
        let outcome = recover(&Root::open(&root_path).unwrap()).unwrap();
        prop_assert_eq!(outcome, Recovery::Finished(RelPath::try_from("rec.wav").unwrap()));
        prop_assert_eq!(fs::read(&file).unwrap(), new);
        prop_assert!(!root_path.join(JOURNAL_NAME).exists());
    }

    #[test]
    fn a_damaged_journal_is_never_replayed(
        seed in any::<u64>(),
        flip in 0.0f64..1.0,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let old = noise(seed, 6 * BS);
        let new = edited(&old, &[(0.3, 100), (0.8, BS)], BS, seed);
        let (mut journal, _) = sealed_journal(dir.path(), &old, &new);
        let at = (flip * (journal.len() - 1) as f64) as usize;
        journal[at] ^= 0x40;
        let root_path = dir.path().join("backup");
        fs::write(root_path.join(JOURNAL_NAME), &journal).unwrap();
        let outcome = recover(&Root::open(&root_path).unwrap()).unwrap();
        prop_assert!(matches!(outcome, Recovery::Discarded(_)), "{outcome:?}");
        prop_assert_eq!(fs::read(root_path.join("rec.wav")).unwrap(), old);
    }
}

#[test]
fn a_patch_that_does_not_verify_leaves_the_file_and_no_journal() {
    let dir = tempfile::tempdir().unwrap();
    let old = noise(1, 8 * BS);
    let new = edited(&old, &[(0.5, 10)], 0, 7);
    let root_path = dir.path().join("backup");
    write_old(&root_path.join("rec.wav"), &old);
    let mut index = Index::in_memory().unwrap();
    scan(&root_path, &mut index, &ScanOptions::default()).unwrap();
    let rel = RelPath::try_from("rec.wav").unwrap();
    let root = Root::open(&root_path).unwrap();
    let mut patch = Patch::begin(
        &root,
        &rel,
        index.known(&rel).unwrap().unwrap(),
        new.len() as u64,
        new.len() as u64,
    )
    .unwrap();
    // The sender lies: it sends a block that is not the one its hash describes.
    patch.at(0, &new[..BS]).unwrap();
    let err = patch
        .finish(new.len() as u64, &blake3::hash(&new), &target())
        .unwrap_err();
    assert!(matches!(err, PatchError::Mismatch { .. }), "{err}");
    assert_eq!(fs::read(root_path.join("rec.wav")).unwrap(), old);
    assert!(!root_path.join(JOURNAL_NAME).exists());

    // A file changed on this box after it was indexed is never patched.
    let mut patch = Patch::begin(
        &root,
        &rel,
        index.known(&rel).unwrap().unwrap(),
        new.len() as u64,
        new.len() as u64,
    )
    .unwrap();
    for (start, end) in changed(&root_path.join("rec.wav"), &{
        let p = dir.path().join("new.wav");
        fs::write(&p, &new).unwrap();
        p
    }) {
        patch.at(start, &new[start as usize..end as usize]).unwrap();
    }
    fs::OpenOptions::new()
        .append(true)
        .open(root_path.join("rec.wav"))
        .unwrap()
        .write_all_at(b"local", 0)
        .unwrap();
    let err = patch
        .finish(new.len() as u64, &blake3::hash(&new), &target())
        .unwrap_err();
    assert!(matches!(err, PatchError::Changed), "{err}");
    assert!(!root_path.join(JOURNAL_NAME).exists());
}

#[test]
fn a_sealed_journal_is_never_overwritten_by_the_next_patch() {
    let dir = tempfile::tempdir().unwrap();
    let old = noise(5, 6 * BS);
    let new = edited(&old, &[(0.5, 100)], BS, 9);
    let (journal, _) = sealed_journal(dir.path(), &old, &new);
    let root_path = dir.path().join("backup");
    write_old(&root_path.join("other.wav"), &noise(6, 6 * BS));
    let mut index = Index::in_memory().unwrap();
    scan(&root_path, &mut index, &ScanOptions::default()).unwrap();
    let other = RelPath::try_from("other.wav").unwrap();
    let root = Root::open(&root_path).unwrap();
    let refused = Patch::begin(
        &root,
        &other,
        index.known(&other).unwrap().unwrap(),
        7 * BS as u64,
        BS as u64,
    );
    assert!(refused.is_err());
    // The sealed journal is intact, and the next run finishes its file.
    assert_eq!(fs::read(root_path.join(JOURNAL_NAME)).unwrap(), journal);
    assert_eq!(
        recover(&root).unwrap(),
        Recovery::Finished(RelPath::try_from("rec.wav").unwrap())
    );
    assert_eq!(fs::read(root_path.join("rec.wav")).unwrap(), new);
}

#[test]
fn sizes_and_offsets_from_the_sender_are_checked_before_anything_is_allocated_or_added() {
    let dir = tempfile::tempdir().unwrap();
    let root_path = dir.path().join("backup");
    write_old(&root_path.join("rec.wav"), &noise(7, 6 * BS));
    let mut index = Index::in_memory().unwrap();
    scan(&root_path, &mut index, &ScanOptions::default()).unwrap();
    let rel = RelPath::try_from("rec.wav").unwrap();
    let root = Root::open(&root_path).unwrap();
    let known = || index.known(&rel).unwrap().unwrap();
    // An 8 EiB file from a few changed bytes: refused, nothing allocated for its blocks.
    let refused = Patch::begin(&root, &rel, known(), 1 << 63, BS as u64);
    assert!(
        matches!(&refused, Err(PatchError::Unfit(why)) if why.contains("cannot come from")),
        "{:?}",
        refused.err()
    );
    // Offsets at the end of the number range: refused, no overflow.
    let mut patch = Patch::begin(&root, &rel, known(), 6 * BS as u64, BS as u64).unwrap();
    let block = vec![1u8; BS];
    let err = patch.at(u64::MAX - 10, &block).unwrap_err();
    assert!(matches!(err, PatchError::Unfit(_)), "{err}");
    let err = patch.at(6 * BS as u64, &block).unwrap_err();
    assert!(matches!(err, PatchError::Unfit(_)), "{err}");
    drop(patch);
    assert_eq!(
        fs::read(root_path.join("rec.wav")).unwrap(),
        noise(7, 6 * BS)
    );
}
