//! The receiving side changes files only through `Root`: verified, atomic, never outside the
//! root, and a failure leaves the old version and no debris.

// In tests a panic is the failure report; helpers outside #[test] fns unwrap too.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use lbs_protocol::RelPath;
use lbs_sync::{ApplyError, Root, TEMP_PREFIX, Target};

fn rel(text: &str) -> RelPath {
    RelPath::try_from(text).unwrap()
}

fn target(mode: u32) -> Target {
    Target {
        mode,
        owner: None,
        mtime_ns: 1_700_000_000_123_456_789,
    }
}

/// Every name under `dir`, recursively, so a test can see that nothing stray was left.
fn all_names(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type().unwrap().is_dir() {
            out.extend(
                all_names(&entry.path())
                    .into_iter()
                    .map(|n| format!("{name}/{n}")),
            );
        }
        out.push(name);
    }
    out.sort();
    out
}

#[test]
fn a_new_file_lands_verified_with_its_metadata_and_directories() {
    let dir = tempfile::tempdir().unwrap();
    let root = Root::open(dir.path()).unwrap();
    let content = b"[general]\ncontext=default\n";
    let path = rel("voicemail/1234/INBOX/msg0000.txt");
    let written = root
        .install(&path, &blake3::hash(content), &target(0o640), |w| {
            w.write_all(content)
        })
        .unwrap();
    assert_eq!(written.len, content.len() as u64);
    assert_eq!(written.root, blake3::hash(content));
    let on_disk = dir.path().join("voicemail/1234/INBOX/msg0000.txt");
    assert_eq!(fs::read(&on_disk).unwrap(), content);
    let meta = fs::metadata(&on_disk).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
    assert_eq!(meta.mtime(), 1_700_000_000);
    assert_eq!(meta.mtime_nsec(), 123_456_789);
    assert!(
        all_names(dir.path())
            .iter()
            .all(|n| !n.contains(TEMP_PREFIX)),
        "{:?}",
        all_names(dir.path())
    );
}

#[test]
fn the_tree_hash_computed_while_writing_matches_a_fresh_read() {
    // Written in uneven pieces that straddle block boundaries, as the network delivers them.
    let dir = tempfile::tempdir().unwrap();
    let root = Root::open(dir.path()).unwrap();
    for len in [0usize, 1, 16_384, 16_385, 100_000, 3 * 16_384] {
        let content: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let path = rel(&format!("f{len}"));
        let tree = root
            .install(&path, &blake3::hash(&content), &target(0o644), |w| {
                for piece in content.chunks(7_777) {
                    w.write_all(piece)?;
                }
                Ok(())
            })
            .unwrap();
        let file = fs::File::open(dir.path().join(format!("f{len}"))).unwrap();
        let fresh = lbs_sync::hash_file(&file, len as u64, tree.block_size).unwrap();
        assert_eq!(tree, fresh, "len {len}");
    }
}

#[test]
fn a_wrong_hash_keeps_the_old_version_and_leaves_no_debris() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("sip.conf"), b"old").unwrap();
    let root = Root::open(dir.path()).unwrap();
    let err = root
        .install(
            &rel("sip.conf"),
            &blake3::hash(b"new"),
            &target(0o644),
            |w| w.write_all(b"tampered"),
        )
        .unwrap_err();
    match &err {
        ApplyError::HashMismatch { want, got, .. } => {
            assert_eq!(*want, blake3::hash(b"new"));
            assert_eq!(*got, blake3::hash(b"tampered"));
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("old version kept"), "{err}");
    assert_eq!(fs::read(dir.path().join("sip.conf")).unwrap(), b"old");
    assert_eq!(all_names(dir.path()), vec!["sip.conf"]);
}

#[test]
fn a_full_disk_is_named_and_keeps_the_old_version() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("moh.wav"), b"old music").unwrap();
    let root = Root::open(dir.path()).unwrap();
    let err = root
        .install(&rel("moh.wav"), &blake3::hash(b"x"), &target(0o644), |w| {
            w.write_all(b"partial")?;
            Err(io::Error::from_raw_os_error(28)) // ENOSPC, as write(2) reports it
        })
        .unwrap_err();
    assert!(matches!(err, ApplyError::DiskFull { .. }), "{err}");
    assert!(err.to_string().contains("no space left"), "{err}");
    assert_eq!(fs::read(dir.path().join("moh.wav")).unwrap(), b"old music");
    assert_eq!(all_names(dir.path()), vec!["moh.wav"]);
}

#[test]
fn a_symlinked_directory_on_the_way_is_never_followed() {
    let dir = tempfile::tempdir().unwrap();
    let root_dir = dir.path().join("root");
    let outside = dir.path().join("outside");
    fs::create_dir_all(&root_dir).unwrap();
    fs::create_dir_all(&outside).unwrap();
    // As if an attacker (or a race) swapped a directory for a link to elsewhere.
    std::os::unix::fs::symlink(&outside, root_dir.join("voicemail")).unwrap();
    let root = Root::open(&root_dir).unwrap();
    let err = root
        .install(
            &rel("voicemail/evil.txt"),
            &blake3::hash(b"x"),
            &target(0o644),
            |w| w.write_all(b"x"),
        )
        .unwrap_err();
    assert!(matches!(err, ApplyError::NotADirectory { .. }), "{err}");
    assert!(
        fs::read_dir(&outside).unwrap().next().is_none(),
        "wrote outside the root"
    );
}

#[test]
fn a_file_where_a_directory_should_be_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("INBOX"), b"i am a file").unwrap();
    let root = Root::open(dir.path()).unwrap();
    let err = root
        .install(
            &rel("INBOX/msg0000.wav"),
            &blake3::hash(b"x"),
            &target(0o644),
            |w| w.write_all(b"x"),
        )
        .unwrap_err();
    assert!(matches!(err, ApplyError::NotADirectory { .. }), "{err}");
    assert_eq!(fs::read(dir.path().join("INBOX")).unwrap(), b"i am a file");
}

#[test]
fn owner_is_set_when_running_as_root() {
    if !lbs_tests::require_root("owner_is_set_when_running_as_root", "chown") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = Root::open(dir.path()).unwrap();
    let mut t = target(0o4755);
    t.owner = Some((65534, 65534));
    root.install(
        &rel("agi-bin/script"),
        &blake3::hash(b"#!/bin/sh\n"),
        &t,
        |w| w.write_all(b"#!/bin/sh\n"),
    )
    .unwrap();
    let meta = fs::metadata(dir.path().join("agi-bin/script")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    // The mode is set after the owner (chown would clear it), but a set-uid bit from the
    // sender never lands: a compromised partner must not plant a set-uid program.
    assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
}

#[test]
fn set_id_bits_never_come_from_the_sender_on_files_but_directories_keep_set_group_id() {
    let dir = tempfile::tempdir().unwrap();
    let root = Root::open(dir.path()).unwrap();
    for (name, mode) in [("suid", 0o4755), ("sgid", 0o2755), ("both", 0o6777)] {
        root.install(
            &rel(&format!("bin/{name}")),
            &blake3::hash(b"#!/bin/sh\n"),
            &target(mode),
            |w| w.write_all(b"#!/bin/sh\n"),
        )
        .unwrap();
        let got = fs::metadata(dir.path().join("bin").join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(got, mode & 0o1777, "{name}");
    }
    root.make_dir(&rel("shared")).unwrap();
    root.set_meta(&rel("shared"), &target(0o2775)).unwrap();
    let got = fs::metadata(dir.path().join("shared"))
        .unwrap()
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(got, 0o2775);
}

#[test]
fn a_root_reached_through_a_symlink_is_refused_and_nothing_is_written_where_it_points() {
    // The asterisk account replaces its voicemail directory with a link to a directory it
    // cannot write (/etc on a box; here a directory of the test's own). Its spool directory
    // is one others may change (the account's own, on a box).
    let dir = tempfile::tempdir().unwrap();
    let precious = dir.path().join("etc");
    fs::create_dir(&precious).unwrap();
    fs::write(precious.join("passwd"), b"root:x:0:0\n").unwrap();
    let spool = dir.path().join("spool");
    fs::create_dir(&spool).unwrap();
    fs::set_permissions(&spool, fs::Permissions::from_mode(0o777)).unwrap();
    std::os::unix::fs::symlink(&precious, spool.join("voicemail")).unwrap();
    let err = Root::open(&spool.join("voicemail")).unwrap_err();
    assert!(
        err.to_string()
            .contains("voicemail is a symbolic link (to ")
            && err.to_string().contains("configure the real path"),
        "{err}"
    );
    // The scan of a sender refuses it too (it would serve /etc).
    let mut index = lbs_sync::Index::in_memory().unwrap();
    let err = lbs_sync::scan(
        &spool.join("voicemail"),
        &mut index,
        &lbs_sync::ScanOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("is a symbolic link"), "{err}");
    // A link that only this user (root, on a box) could have made is followed: Debian's
    // /var/lib/asterisk/moh -> /usr/share/asterisk/moh kind, with the link in a directory
    // nobody else may change.
    let trusted = dir.path().join("lib");
    fs::create_dir(&trusted).unwrap();
    fs::create_dir(spool.join("moh")).unwrap();
    std::os::unix::fs::symlink(spool.join("moh"), trusted.join("moh")).unwrap();
    Root::open(&trusted.join("moh")).unwrap();
    // A trash beside the root planted as a link (or made by someone else) is refused, and
    // nothing is created where it points.
    std::os::unix::fs::symlink(&precious, spool.join(".recordings.lbs-trash")).unwrap();
    let trash = lbs_sync::Trash::default_for(&spool.join("recordings"));
    let err = lbs_sync::Trash::open(&trash).unwrap_err();
    assert!(err.to_string().contains("is a symbolic link"), "{err}");
    let names: Vec<_> = fs::read_dir(&precious).unwrap().collect();
    assert_eq!(names.len(), 1);
    fs::remove_file(spool.join(".recordings.lbs-trash")).unwrap();
    fs::create_dir(&trash).unwrap();
    fs::set_permissions(&trash, fs::Permissions::from_mode(0o777)).unwrap();
    let err = lbs_sync::Trash::open(&trash).unwrap_err();
    assert!(err.to_string().contains("not to lbs"), "{err}");
}

#[test]
fn the_trash_keeps_working_on_the_directory_it_opened_when_its_path_is_swapped_for_a_link() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("home");
    // A directory whose entries look like old trash batches.
    fs::create_dir_all(victim.join("1000-1-1")).unwrap();
    let path = dir.path().join(".voicemail.lbs-trash");
    let trash = lbs_sync::Trash::open(&path).unwrap();
    drop(trash.batch().unwrap());
    // Swapped after opening: the real trash moved away, a link to the victim in its place.
    fs::rename(&path, dir.path().join("moved")).unwrap();
    std::os::unix::fs::symlink(&victim, &path).unwrap();
    let batch = trash.batch().unwrap();
    drop(batch);
    assert_eq!(fs::read_dir(dir.path().join("moved")).unwrap().count(), 2);
    assert_eq!(fs::read_dir(&victim).unwrap().count(), 1);
    trash.purge(std::time::Duration::ZERO).unwrap();
    assert!(
        victim.join("1000-1-1").exists(),
        "the purge followed the link"
    );
}

#[test]
fn a_crash_in_a_group_commit_leaves_each_file_old_or_new() {
    use lbs_sync::{Durability, Index, ScanOptions, scan};
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..6).map(|i| format!("vm/msg{i:04}.wav")).collect();
    for name in &names {
        fs::create_dir_all(dir.path().join("vm")).unwrap();
        fs::write(dir.path().join(name), format!("old {name}")).unwrap();
    }
    let root = Root::open(dir.path())
        .unwrap()
        .with_durability(Durability::Grouped);
    let new = |name: &str| format!("new {name}").into_bytes();
    let mut staged: Vec<_> = names
        .iter()
        .map(|name| {
            let content = new(name);
            root.stage(&rel(name), &blake3::hash(&content), &target(0o600), |w| {
                w.write_all(&content)
            })
            .unwrap()
        })
        .collect();
    // Staged but not committed: nothing visible has changed yet.
    for name in &names {
        assert_eq!(
            fs::read(dir.path().join(name)).unwrap(),
            format!("old {name}").as_bytes()
        );
    }
    // The process dies after renaming the first half of the group.
    let rest = staged.split_off(3);
    let (done, failed) = root.commit(staged).unwrap();
    assert_eq!((done.len(), failed.len()), (3, 0));
    drop(rest); // Staged files have no destructor: their temporaries stay, as after a crash.

    // The next run's scan removes the unfinished temporary files; each file is old or new.
    let mut index = Index::in_memory().unwrap();
    let options = ScanOptions {
        remove_stale_temps: true,
        ..ScanOptions::default()
    };
    let report = scan(dir.path(), &mut index, &options).unwrap();
    assert_eq!(report.stale_temps_removed, 3);
    for (i, name) in names.iter().enumerate() {
        let want = if i < 3 {
            new(name)
        } else {
            format!("old {name}").into_bytes()
        };
        assert_eq!(fs::read(dir.path().join(name)).unwrap(), want, "{name}");
    }
    assert!(
        !all_names(dir.path())
            .iter()
            .any(|n| n.contains(TEMP_PREFIX)),
        "{:?}",
        all_names(dir.path())
    );
}
