//! Pulls over a real lbs connection (framed, in memory): the receiver ends up identical, a
//! second pull moves nothing, and a lying or hostile sender changes nothing it should not.

// In tests a panic is the failure report; helpers outside #[test] fns unwrap too.
#![allow(clippy::unwrap_used)]

mod common;

use common::write_old;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use lbs_protocol::sync::{FileMeta, ManifestEntry, ManifestKind, SkipReason, SkippedEntry};
use lbs_protocol::{Envelope, FrameCodec, Generation, Message, RelPath, frame};
use lbs_sync::{
    Index, PullOptions, PullReport, ScanOptions, SessionError, Trash, manifest, pull, scan, serve,
};
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio_util::codec::Framed;

const GEN: Generation = Generation(1);

/// A receiver's index, empty, as a pull takes it.
fn fresh_index() -> Arc<Mutex<Index>> {
    Arc::new(Mutex::new(Index::in_memory().unwrap()))
}

/// One pull with the default options.
async fn pull_default<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    client: &mut Framed<S, FrameCodec<Envelope>>,
    receiver: &Path,
    index: Arc<Mutex<Index>>,
    trash: &Trash,
) -> Result<PullReport, SessionError> {
    pull(client, receiver, index, trash, GEN, PullOptions::default()).await
}

/// One pull that reports its progress to `progress`.
async fn pull_watched<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    client: &mut Framed<S, FrameCodec<Envelope>>,
    receiver: &Path,
    index: Arc<Mutex<Index>>,
    trash: &Trash,
    progress: tokio::sync::watch::Sender<lbs_sync::Progress>,
) -> Result<PullReport, SessionError> {
    let options = PullOptions {
        progress: Some(progress),
        ..PullOptions::default()
    };
    pull(client, receiver, index, trash, GEN, options).await
}

fn state(root: &Path) -> Vec<ManifestEntry> {
    let mut index = Index::in_memory().unwrap();
    scan(root, &mut index, &ScanOptions::default()).unwrap();
    manifest(&index).unwrap()
}

fn connections() -> (
    Framed<DuplexStream, FrameCodec<Envelope>>,
    Framed<DuplexStream, FrameCodec<Envelope>>,
) {
    let (a, b) = tokio::io::duplex(256 * 1024);
    (
        Framed::new(a, FrameCodec::new()),
        Framed::new(b, FrameCodec::new()),
    )
}

type Conn = Framed<DuplexStream, FrameCodec<Envelope>>;

/// A primary serving the tree at `sender` (fresh index) over an in-memory connection; the
/// other end is the receiver's.
fn start_primary(sender: &Path) -> (tokio::task::JoinHandle<Result<(), SessionError>>, Conn) {
    start_primary_with(sender, fresh_index(), lbs_protocol::PROTOCOL_VERSION)
}

/// Like [`start_primary`], with the primary's index and its protocol version.
fn start_primary_with(
    sender: &Path,
    index: Arc<Mutex<Index>>,
    version: lbs_protocol::ProtocolVersion,
) -> (tokio::task::JoinHandle<Result<(), SessionError>>, Conn) {
    let (mut server_conn, client_conn) = connections();
    let sender = sender.to_owned();
    let server =
        tokio::spawn(async move { serve(&mut server_conn, sender, index, GEN, version).await });
    (server, client_conn)
}

/// One pull from a primary serving `sender` (fresh index on its side) into `receiver`, whose
/// index is `index`; the primary is stopped after it.
async fn pull_from(
    sender: &Path,
    receiver: &Path,
    index: Arc<Mutex<Index>>,
    trash: &Trash,
) -> PullReport {
    let (server, mut client) = start_primary(sender);
    let report = pull_default(&mut client, receiver, index, trash)
        .await
        .unwrap();
    stop_primary(server, client).await;
    report
}

/// Hangs up and waits (bounded) for the primary to end cleanly.
async fn stop_primary(server: tokio::task::JoinHandle<Result<(), SessionError>>, client: Conn) {
    drop(client);
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_makes_the_trees_identical_and_a_second_moves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (sender, receiver) = (dir.path().join("primary"), dir.path().join("backup"));
    write_old(
        &sender.join("extensions.conf"),
        b"[default]\nexten => 100,1,Dial(PJSIP/100)\n",
    );
    let big: Vec<u8> = (0..3_300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    write_old(&sender.join("moh/default/song.wav"), &big);
    write_old(&sender.join("voicemail/1234/INBOX/msg0000.wav"), b"hello");
    write_old(&receiver.join("voicemail/1234/INBOX/msg0000.wav"), b"stale");
    write_old(&receiver.join("leftover.conf"), b"gone on the primary");
    let trash = Trash::open(&dir.path().join("trash")).unwrap();

    let (mut server_conn, mut client_conn) = connections();
    let server_index = fresh_index();
    let server = tokio::spawn({
        let (sender, server_index) = (sender.clone(), server_index.clone());
        async move {
            serve(
                &mut server_conn,
                sender,
                server_index,
                GEN,
                lbs_protocol::PROTOCOL_VERSION,
            )
            .await
        }
    });
    let client_index = fresh_index();
    let (progress, watch) = tokio::sync::watch::channel(lbs_sync::Progress::default());
    let first = pull_watched(
        &mut client_conn,
        &receiver,
        client_index.clone(),
        &trash,
        progress,
    )
    .await
    .unwrap();
    assert_eq!(first.plan.fetch_files, 3, "{first:?}");
    assert_eq!(first.plan.trashed, 1);
    assert_eq!(first.executed.fetched_bytes, big.len() as u64 + 5 + 41);
    assert!(first.executed.deferred.is_empty(), "{first:?}");
    assert_eq!(state(&receiver), state(&sender));
    // Progress ends complete: every action and every byte of the plan accounted for.
    let last = *watch.borrow();
    assert_eq!(last.actions_done, last.actions_total);
    assert!(last.actions_total > 0);
    assert_eq!(last.bytes_done, last.bytes_total);
    assert_eq!(last.current_bytes, 0, "between files nothing is in flight");
    assert_eq!(last.bytes_total, big.len() as u64 + 5 + 41);

    let second = pull_default(&mut client_conn, &receiver, client_index, &trash)
        .await
        .unwrap();
    assert_eq!(second.plan.fetch_files, 0, "{second:?}");
    assert_eq!(second.executed.fetched_bytes, 0);
    // What the first pull wrote was recorded as it was written: nothing is read again.
    assert_eq!(second.scan.hashed_files, 0, "{second:?}");

    client_conn
        .send(Envelope {
            generation: GEN,
            message: Message::Goodbye {
                reason: "done".into(),
            },
        })
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_recording_moves_only_its_changed_blocks_and_tail() {
    let dir = tempfile::tempdir().unwrap();
    let (sender, receiver) = (dir.path().join("primary"), dir.path().join("backup"));
    let recording: Vec<u8> = (0..8_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    write_old(&sender.join("monitor/call.wav"), &recording);
    write_old(&receiver.join("monitor/call.wav"), &recording);
    // The call goes on: WAV header sizes rewritten, 300 KB more audio, and (for the in-place
    // path) three scattered blocks changed.
    let mut grown = recording.clone();
    grown[4..8].copy_from_slice(&[1, 2, 3, 4]);
    grown[40..44].copy_from_slice(&[5, 6, 7, 8]);
    for at in [1_000_000, 4_000_000, 6_500_000] {
        grown[at] ^= 0xff;
    }
    grown.extend((0..300_000u32).map(|i| (i % 253) as u8));
    write_old(&sender.join("monitor/call.wav"), &grown);
    let trash = Trash::open(&dir.path().join("trash")).unwrap();

    let (server, mut client_conn) = start_primary(&sender);
    let index = fresh_index();
    let inode = fs::metadata(receiver.join("monitor/call.wav"))
        .unwrap()
        .ino();
    let report = pull_default(&mut client_conn, &receiver, index, &trash)
        .await
        .unwrap();
    assert!(report.executed.deferred.is_empty(), "{report:?}");
    assert_eq!(fs::read(receiver.join("monitor/call.wav")).unwrap(), grown);
    // Few blocks changed: the file was patched in place (same inode), the journal is gone, and
    // the sender's mtime carried over.
    assert_eq!(report.executed.patched, 1, "{report:?}");
    let after = fs::metadata(receiver.join("monitor/call.wav")).unwrap();
    assert_eq!(after.ino(), inode);
    assert_eq!(
        after.modified().unwrap(),
        fs::metadata(sender.join("monitor/call.wav"))
            .unwrap()
            .modified()
            .unwrap()
    );
    assert!(!receiver.join(lbs_sync::JOURNAL_NAME).exists());
    // The file grew, so its middle was summarised by groups of 16 blocks: header block + the
    // 3 groups holding the changes + the old partial last block + 300 KB of tail.
    let moved = report.executed.fetched_bytes;
    let block = lbs_sync::BlockSize::DEFAULT.get();
    assert!(
        moved <= 2 * block + 3 * 16 * block + 300_000,
        "moved {moved} bytes for a {} byte file",
        grown.len()
    );
    assert!(moved >= 300_000, "moved {moved}");
    stop_primary(server, client_conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_whose_block_list_spans_parts_is_patched_by_its_changed_blocks() {
    // 70 MiB: more values than one part of the index holds (4,096 blocks of 16 KiB), so both
    // sides read their lists a part at a time; changes on both sides of the part boundary.
    let dir = tempfile::tempdir().unwrap();
    let (sender, receiver) = (dir.path().join("primary"), dir.path().join("backup"));
    let len = 70 << 20;
    let old: Vec<u8> = (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    write_old(&sender.join("archive/day.wav"), &old);
    write_old(&receiver.join("archive/day.wav"), &old);
    let block = lbs_sync::BlockSize::DEFAULT.get() as usize;
    let mut new = old;
    for at in [5, 4095 * block + 7, 4096 * block, 4400 * block + 3] {
        new[at] ^= 0x5a;
    }
    write_old(&sender.join("archive/day.wav"), &new);
    let trash = Trash::open(&dir.path().join("trash")).unwrap();

    let (server, mut client_conn) = start_primary(&sender);
    let index = fresh_index();
    let report = pull_default(&mut client_conn, &receiver, index.clone(), &trash)
        .await
        .unwrap();
    assert!(report.executed.deferred.is_empty(), "{report:?}");
    assert_eq!(report.executed.patched, 1, "{report:?}");
    assert_eq!(report.executed.fetched_bytes, 4 * block as u64);
    assert!(fs::read(receiver.join("archive/day.wav")).unwrap() == new);
    // The new list was recorded from the old one and the received values.
    recorded_exactly(
        &mut client_conn,
        &receiver,
        index,
        &trash,
        "archive/day.wav",
    )
    .await;
    stop_primary(server, client_conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_file_whose_block_list_spans_parts_is_recorded_as_written() {
    // 70 MiB arriving whole: its list, longer than one part, is recorded as it was written
    // (lists of files over 1 GiB are staged a part at a time; see the BlockHasher's tests).
    let dir = tempfile::tempdir().unwrap();
    let (sender, receiver) = (dir.path().join("primary"), dir.path().join("backup"));
    let len = 70 << 20;
    let content: Vec<u8> = (0..len as u32)
        .map(|i| (i.wrapping_mul(2_246_822_519) >> 9) as u8)
        .collect();
    write_old(&sender.join("archive/new.wav"), &content);
    fs::create_dir_all(&receiver).unwrap();
    let trash = Trash::open(&dir.path().join("trash")).unwrap();
    let (server, mut client_conn) = start_primary(&sender);
    let index = fresh_index();
    let report = pull_default(&mut client_conn, &receiver, index.clone(), &trash)
        .await
        .unwrap();
    assert!(report.executed.deferred.is_empty(), "{report:?}");
    assert!(fs::read(receiver.join("archive/new.wav")).unwrap() == content);
    recorded_exactly(
        &mut client_conn,
        &receiver,
        index,
        &trash,
        "archive/new.wav",
    )
    .await;
    stop_primary(server, client_conn).await;
}

/// The receiver's index holds exactly `path`'s list as the file now is, so the next pull
/// reads nothing and moves nothing.
async fn recorded_exactly<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    client: &mut Framed<S, FrameCodec<Envelope>>,
    receiver: &Path,
    index: Arc<Mutex<Index>>,
    trash: &Trash,
    path: &str,
) {
    let rel = RelPath::try_from(path).unwrap();
    let stored = index.lock().unwrap().blocks(&rel).unwrap().unwrap().1;
    let file = fs::File::open(receiver.join(path)).unwrap();
    let len = file.metadata().unwrap().len();
    let expected = lbs_sync::hash_file(&file, len, lbs_sync::BlockSize::DEFAULT).unwrap();
    assert!(stored == expected.blocks, "{path}: the recorded list");
    let again = pull_default(client, receiver, index, trash).await.unwrap();
    assert_eq!(again.scan.hashed_files, 0, "{again:?}");
    assert_eq!(again.executed.fetched_bytes, 0, "{again:?}");
}

fn meta() -> FileMeta {
    FileMeta {
        mode: 0o644,
        owner: "root".into(),
        group: "root".into(),
        mtime_ns: 1_650_000_000_000_000_000,
    }
}

/// Reads the receiver's manifest request: its directory digests, in parts.
async fn expect_digests(conn: &mut Framed<DuplexStream, FrameCodec<Envelope>>) {
    loop {
        match expect_request(conn).await {
            Message::SyncManifestDigests { last: true, .. } => return,
            Message::SyncManifestDigests { last: false, .. } => {}
            other => panic!("expected the manifest request, got {other:?}"),
        }
    }
}

/// Sends `message` as a sender of generation [`GEN`] would.
async fn say(conn: &mut Conn, message: Message) {
    conn.send(Envelope {
        generation: GEN,
        message,
    })
    .await
    .unwrap();
}

/// Sends a whole manifest as a sender would: its one part, then the (empty) lists of what it
/// skipped and of its hard links.
async fn say_manifest(conn: &mut Conn, entries: Vec<ManifestEntry>) {
    say(
        conn,
        Message::SyncManifest {
            entries,
            last: true,
        },
    )
    .await;
    say(
        conn,
        Message::SyncSkipped {
            entries: Vec::new(),
            more: 0,
        },
    )
    .await;
    say(
        conn,
        Message::SyncLinks {
            groups: Vec::new(),
            last: true,
        },
    )
    .await;
}

/// A sender's manifest entry for a file holding `content`.
fn file_entry(path: &str, content: &[u8]) -> ManifestEntry {
    ManifestEntry {
        path: RelPath::try_from(path).unwrap(),
        kind: ManifestKind::File {
            size: content.len() as u64,
            blake3: *blake3::hash(content).as_bytes(),
        },
        meta: meta(),
    }
}

async fn expect_request(conn: &mut Framed<DuplexStream, FrameCodec<Envelope>>) -> Message {
    tokio::time::timeout(Duration::from_secs(10), conn.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_that_does_not_match_the_announced_hash_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = dir.path().join("backup");
    write_old(&receiver.join("sip.conf"), b"old and good");
    let trash = Trash::open(&dir.path().join("trash")).unwrap();
    let (mut liar, mut client) = connections();
    let fake = tokio::spawn(async move {
        expect_digests(&mut liar).await;
        let entries = vec![ManifestEntry {
            path: RelPath::try_from("sip.conf").unwrap(),
            kind: ManifestKind::File {
                size: 3,
                blake3: *blake3::hash(b"new").as_bytes(),
            },
            meta: meta(),
        }];
        say_manifest(&mut liar, entries).await;
        // The receiver holds an old version, so it asks for changes against its blocks.
        assert!(matches!(
            expect_request(&mut liar).await,
            Message::SyncFetch { .. } | Message::SyncFetchChanges { last: true, .. }
        ));
        say(
            &mut liar,
            Message::SyncData {
                bytes: bytes::Bytes::from_static(b"bad"),
            },
        )
        .await;
        say(
            &mut liar,
            Message::SyncDataEnd {
                size: 3,
                blake3: *blake3::hash(b"bad").as_bytes(),
            },
        )
        .await;
        liar
    });
    let index = fresh_index();
    let report = pull_default(&mut client, &receiver, index, &trash)
        .await
        .unwrap();
    assert_eq!(report.executed.deferred.len(), 1, "{report:?}");
    assert!(
        report.executed.deferred[0].1.contains("hashes to"),
        "{report:?}"
    );
    assert_eq!(
        fs::read(receiver.join("sip.conf")).unwrap(),
        b"old and good"
    );
    drop(fake.await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_longer_than_the_manifest_announced_is_refused_as_it_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = dir.path().join("backup");
    write_old(&receiver.join("sip.conf"), b"old and good");
    let trash = Trash::open(&dir.path().join("trash")).unwrap();
    let (mut liar, mut client) = connections();
    let fake = tokio::spawn(async move {
        expect_digests(&mut liar).await;
        let entries = vec![ManifestEntry {
            path: RelPath::try_from("sip.conf").unwrap(),
            kind: ManifestKind::File {
                size: 3,
                blake3: *blake3::hash(b"new").as_bytes(),
            },
            meta: meta(),
        }];
        say_manifest(&mut liar, entries).await;
        // The receiver holds an old version, so it asks for changes against its blocks.
        assert!(matches!(
            expect_request(&mut liar).await,
            Message::SyncFetch { .. } | Message::SyncFetchChanges { last: true, .. }
        ));
        say(
            &mut liar,
            Message::SyncData {
                bytes: bytes::Bytes::from_static(b"evil"),
            },
        )
        .await;
        say(
            &mut liar,
            Message::SyncDataEnd {
                size: 4,
                blake3: *blake3::hash(b"evil").as_bytes(),
            },
        )
        .await;
        liar
    });
    let index = fresh_index();
    let report = pull_default(&mut client, &receiver, index, &trash)
        .await
        .unwrap();
    assert_eq!(report.executed.deferred.len(), 1, "{report:?}");
    assert!(
        report.executed.deferred[0]
            .1
            .contains("beyond the 3 bytes planned"),
        "{report:?}"
    );
    assert_eq!(
        fs::read(receiver.join("sip.conf")).unwrap(),
        b"old and good"
    );
    drop(fake.await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_path_escaping_the_root_is_refused_before_anything_changes() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = dir.path().join("backup");
    write_old(&receiver.join("sip.conf"), b"keep me");
    let trash = Trash::open(&dir.path().join("trash")).unwrap();
    let (io_hostile, io_client) = tokio::io::duplex(64 * 1024);
    let mut client = Framed::new(io_client, FrameCodec::<Envelope>::new());
    let hostile = tokio::spawn(async move {
        let mut io = io_hostile;
        // A well-formed frame, then the path bytes patched to climb out of the root.
        let mut wire = BytesMut::new();
        frame::encode(
            &Envelope {
                generation: GEN,
                message: Message::SyncManifest {
                    entries: vec![ManifestEntry {
                        path: RelPath::try_from("ab/passwd").unwrap(),
                        kind: ManifestKind::Dir,
                        meta: meta(),
                    }],
                    last: true,
                },
            },
            &mut wire,
            lbs_protocol::MAX_FRAME_LEN,
        )
        .unwrap();
        let at = wire.windows(9).position(|w| w == b"ab/passwd").unwrap();
        wire[at..at + 2].copy_from_slice(b"..");
        io.write_all(&wire).await.unwrap();
        io
    });
    let index = fresh_index();
    let err = pull_default(&mut client, &receiver, index, &trash)
        .await
        .unwrap_err();
    assert!(matches!(err, SessionError::Frame(_)), "{err}");
    // postcard drops the custom message; the frame is refused as malformed.
    assert!(err.to_string().contains("malformed"), "{err}");
    assert_eq!(fs::read(receiver.join("sip.conf")).unwrap(), b"keep me");
    assert!(!dir.path().join("passwd").exists());
    drop(hostile.await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_directories_are_not_listed_again_and_a_removed_one_is_trashed() {
    let dir = tempfile::tempdir().unwrap();
    let (sender, receiver) = (dir.path().join("primary"), dir.path().join("backup"));
    for d in ["sounds/en", "sounds/fr", "voicemail/1234/INBOX"] {
        for i in 0..200 {
            write_old(
                &sender.join(format!("{d}/prompt-{i:03}.gsm")),
                format!("{d} {i}").as_bytes(),
            );
        }
    }
    fs::create_dir_all(&receiver).unwrap();
    let trash = Trash::open(&dir.path().join("trash")).unwrap();
    let (a, b) = tokio::io::duplex(256 * 1024);
    let (b, meter) = lbs_protocol::Metered::new(b);
    let (mut server_conn, mut client_conn) = (
        Framed::new(a, FrameCodec::<Envelope>::new()),
        Framed::new(b, FrameCodec::<Envelope>::new()),
    );
    let server = tokio::spawn({
        let sender = sender.clone();
        async move {
            let index = fresh_index();
            serve(
                &mut server_conn,
                sender,
                index,
                GEN,
                lbs_protocol::PROTOCOL_VERSION,
            )
            .await
        }
    });
    let index = fresh_index();
    let first = pull_default(&mut client_conn, &receiver, index.clone(), &trash)
        .await
        .unwrap();
    assert_eq!(first.plan.fetch_files, 600, "{first:?}");
    let first_bytes = meter.received();

    // Nothing changed: the answer is a list of unchanged directories, not 600 entries.
    let second = pull_default(&mut client_conn, &receiver, index.clone(), &trash)
        .await
        .unwrap();
    assert_eq!(second.plan.unchanged, 600, "{second:?}");
    assert_eq!(second.executed.done, 0, "{second:?}");
    let listing = meter.received() - first_bytes;
    assert!(listing < 2_000, "an unchanged tree cost {listing} bytes");

    // A message arrives in one directory; another directory goes away entirely.
    write_old(
        &sender.join("voicemail/1234/INBOX/msg0000.wav"),
        b"a new message",
    );
    fs::remove_dir_all(sender.join("sounds/fr")).unwrap();
    let third = pull_default(&mut client_conn, &receiver, index, &trash)
        .await
        .unwrap();
    assert_eq!(third.plan.fetch_files, 1, "{third:?}");
    assert_eq!(third.plan.trashed, 1, "{third:?}");
    assert_eq!(state(&receiver), state(&sender));
    drop(client_conn);
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// A sender that lists one file and sends only its first `sent` bytes, then hangs up
/// (`hang_up`) or stalls until it is dropped.
fn half_sender(
    mut conn: Framed<DuplexStream, FrameCodec<Envelope>>,
    content: Vec<u8>,
    sent: usize,
    hang_up: bool,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        expect_digests(&mut conn).await;
        let entries = vec![
            ManifestEntry {
                path: RelPath::try_from("moh").unwrap(),
                kind: ManifestKind::Dir,
                meta: FileMeta {
                    mode: 0o755,
                    ..meta()
                },
            },
            file_entry("moh/default.wav", &content),
        ];
        say_manifest(&mut conn, entries).await;
        assert!(matches!(
            expect_request(&mut conn).await,
            Message::SyncFetch { .. }
        ));
        say_data(&mut conn, &content[..sent]).await;
        if !hang_up {
            // Stall: the receiver must be able to give up on its own.
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    })
}

/// Sends `content` as a sender's data chunks (at most 256 KiB each).
async fn say_data(conn: &mut Conn, content: &[u8]) {
    for chunk in content.chunks(256 * 1024) {
        let bytes = bytes::Bytes::copy_from_slice(chunk);
        say(conn, Message::SyncData { bytes }).await;
    }
}

fn music(len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_transfer_resumes_from_what_was_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (sender, receiver) = (dir.path().join("primary"), dir.path().join("backup"));
    let content = music(3_000_000);
    write_old(&sender.join("moh/default.wav"), &content);
    fs::create_dir_all(&receiver).unwrap();
    let trash = Trash::open(&dir.path().join("trash")).unwrap();
    let index = fresh_index();

    // The connection drops after 1 MiB.
    let (fake, mut client) = connections();
    let fake = half_sender(fake, content.clone(), 1 << 20, true);
    let err = pull_default(&mut client, &receiver, index.clone(), &trash)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("closed"), "{err}");
    fake.await.unwrap();
    let partial = receiver
        .join("moh")
        .join(lbs_sync::partial_name(&blake3::hash(&content)));
    assert_eq!(fs::read(&partial).unwrap(), &content[..1 << 20]);
    assert!(!receiver.join("moh/default.wav").exists());

    // The next pull asks only for what is missing, and leaves no partial behind.
    let (server, mut client_conn) = start_primary(&sender);
    let report = pull_default(&mut client_conn, &receiver, index, &trash)
        .await
        .unwrap();
    assert_eq!(report.executed.resumed, 1, "{report:?}");
    let block = lbs_sync::BlockSize::DEFAULT.get();
    let moved = report.executed.fetched_bytes;
    assert!(
        moved <= content.len() as u64 - (1 << 20) + block,
        "moved {moved} bytes of {}",
        content.len()
    );
    assert_eq!(fs::read(receiver.join("moh/default.wav")).unwrap(), content);
    assert!(!partial.exists());
    stop_primary(server, client_conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_packing_saved_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (sender, receiver) = (dir.path().join("primary"), dir.path().join("backup"));
    let dialplan = dialplan(0..20_000).into_bytes();
    write_old(&sender.join("extensions.conf"), &dialplan);
    // Noise does not pack: it crosses as it is and is not counted.
    let mut noise = vec![0u8; 300_000];
    blake3::Hasher::new().finalize_xof().fill(&mut noise);
    write_old(&sender.join("moh.wav"), &noise);
    fs::create_dir_all(&receiver).unwrap();
    let trash = Trash::open(&dir.path().join("trash")).unwrap();
    let report = pull_from(&sender, &receiver, fresh_index(), &trash).await;
    assert_eq!(
        fs::read(receiver.join("extensions.conf")).unwrap(),
        dialplan
    );
    assert_eq!(fs::read(receiver.join("moh.wav")).unwrap(), noise);
    let packed = report.packed;
    assert_eq!(packed.data, dialplan.len() as u64, "{packed:?}");
    assert!(
        packed.packed > 0 && packed.packed < packed.data / 4,
        "{packed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_in_place_before_the_connection_broke_are_in_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = dir.path().join("backup");
    fs::create_dir_all(&receiver).unwrap();
    let trash = Trash::open(&dir.path().join("trash")).unwrap();
    // Three whole files fill more than one group of new files (16 MiB); the fourth breaks off.
    let names = ["a.wav", "b.wav", "c.wav", "d.wav"];
    let contents: Vec<Vec<u8>> = (0..4)
        .map(|n| {
            let mut content = music(6 << 20);
            content[0] = n;
            content
        })
        .collect();
    let (mut fake, mut client) = connections();
    let sent = contents.clone();
    let fake = tokio::spawn(async move {
        expect_digests(&mut fake).await;
        let entries = names
            .iter()
            .zip(&sent)
            .map(|(name, content)| file_entry(name, content))
            .collect();
        say_manifest(&mut fake, entries).await;
        for content in &sent {
            assert!(matches!(
                expect_request(&mut fake).await,
                Message::SyncFetch { .. }
            ));
            let last = content == &sent[3];
            let upto = if last { 1 << 20 } else { content.len() };
            say_data(&mut fake, &content[..upto]).await;
            if last {
                return;
            }
            say(
                &mut fake,
                Message::SyncDataEnd {
                    size: content.len() as u64,
                    blake3: *blake3::hash(content).as_bytes(),
                },
            )
            .await;
        }
    });
    let index = fresh_index();
    let err = pull_default(&mut client, &receiver, index.clone(), &trash)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("closed"), "{err}");
    fake.await.unwrap();

    // The first three are in place and known: the next pass does not read them again.
    let held = index.lock().unwrap();
    for (name, content) in names.iter().zip(&contents).take(3) {
        assert_eq!(&fs::read(receiver.join(name)).unwrap(), content);
        let entry = held.get(&RelPath::try_from(*name).unwrap()).unwrap();
        let hash = entry.and_then(|entry| entry.hash).map(|hash| hash.root);
        assert_eq!(hash, Some(*blake3::hash(content).as_bytes()), "{name}");
    }
    assert!(!receiver.join("d.wav").exists());
    assert_eq!(
        held.get(&RelPath::try_from("d.wav").unwrap()).unwrap(),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_killed_mid_file_is_resumed_from_what_reached_the_disk() {
    resumed_after_a_hard_stop(3_000_000, 2 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_partial_is_resumed_from_a_list_hashed_a_part_at_a_time() {
    // 66 MiB kept: more blocks than one part of a list holds, so the partial's list is
    // hashed from the file as the request reads it, never held whole.
    resumed_after_a_hard_stop(70 << 20, 66 << 20).await;
}

/// A file of `len` bytes pulled into a receiver where a pull killed with SIGKILL left its
/// first `kept` bytes, one 4 KiB write in their middle lost: only the rest and the group of
/// blocks holding the lost write cross, and the file ends whole.
async fn resumed_after_a_hard_stop(len: usize, kept: usize) {
    let dir = tempfile::tempdir().unwrap();
    let (sender, receiver) = (dir.path().join("primary"), dir.path().join("backup"));
    let content = music(len);
    write_old(&sender.join("moh/default.wav"), &content);
    // What a pull killed with SIGKILL while fetching the file leaves: its temporary file,
    // named after the version, with `kept` bytes written — of which a block in the middle
    // never reached the disk (power lost: zeros where data should be).
    let hash = blake3::hash(&content);
    let mut on_disk = content[..kept].to_vec();
    let lost = kept / 2 / 4096 * 4096;
    on_disk[lost..lost + 4096].fill(0);
    fs::create_dir_all(receiver.join("moh")).unwrap();
    let temp = receiver.join("moh").join(format!(
        "{}{}.4242.7.default.wav",
        lbs_sync::TEMP_PREFIX,
        &hash.to_hex()[..32]
    ));
    fs::write(&temp, &on_disk).unwrap();
    assert_eq!(
        lbs_sync::partial_of_temp(temp.file_name().unwrap().as_encoded_bytes()),
        Some(lbs_sync::partial_name(&hash))
    );
    // A temporary file that names no version (a symlink's, say) is only removed.
    let other = receiver.join(format!("{}4242.8.link", lbs_sync::TEMP_PREFIX));
    fs::write(&other, b"x").unwrap();

    let trash = Trash::open(&dir.path().join("trash")).unwrap();
    let (server, mut client_conn) = start_primary(&sender);
    let report = pull_default(&mut client_conn, &receiver, fresh_index(), &trash)
        .await
        .unwrap();
    assert_eq!(report.executed.resumed, 1, "{report:?}");
    let block = lbs_sync::BlockSize::DEFAULT.get();
    let moved = report.executed.fetched_bytes;
    // The tail after what was kept, and the group of 16 blocks holding the lost write (a
    // grown file's middle is compared by groups; see the recording test above).
    assert!(
        moved <= (content.len() - kept) as u64 + 16 * block + block,
        "moved {moved} bytes of {}",
        content.len()
    );
    assert!(
        fs::read(receiver.join("moh/default.wav")).unwrap() == content,
        "the file ends whole"
    );
    assert!(!temp.exists() && !other.exists());
    assert!(
        !receiver
            .join("moh")
            .join(lbs_sync::partial_name(&hash))
            .exists()
    );
    stop_primary(server, client_conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_pull_stops_promptly_and_keeps_the_old_file_and_the_partial() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = dir.path().join("backup");
    fs::create_dir_all(&receiver).unwrap();
    let content = music(2_000_000);
    let trash = Trash::open(&dir.path().join("trash")).unwrap();
    let (fake, mut client) = connections();
    let fake = half_sender(fake, content.clone(), 512 * 1024, false);
    let cancel = tokio_util::sync::CancellationToken::new();
    tokio::spawn({
        let cancel = cancel.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            cancel.cancel();
        }
    });
    let index = fresh_index();
    let options = PullOptions {
        cancel: Some(cancel),
        ..PullOptions::default()
    };
    let outcome = tokio::time::timeout(
        Duration::from_secs(10),
        pull(&mut client, &receiver, index, &trash, GEN, options),
    )
    .await
    .expect("a cancelled pull must end promptly");
    assert!(
        matches!(outcome, Err(SessionError::Cancelled)),
        "{outcome:?}"
    );
    let partial = receiver
        .join("moh")
        .join(lbs_sync::partial_name(&blake3::hash(&content)));
    assert_eq!(fs::read(&partial).unwrap(), &content[..512 * 1024]);
    fake.abort();
}

fn dialplan(lines: std::ops::Range<u32>) -> String {
    lines
        .map(|i| format!("exten => {i},1,Dial(PJSIP/{i},30,tT)\n"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_inserted_in_a_config_file_move_as_a_small_delta() {
    let dir = tempfile::tempdir().unwrap();
    let (sender, receiver) = (dir.path().join("primary"), dir.path().join("backup"));
    let old = dialplan(0..4000);
    write_old(&receiver.join("extensions.conf"), old.as_bytes());
    // New extensions in the middle: every block after them shifts.
    let new = format!(
        "{}exten => 7001,1,Voicemail(7001)\nexten => 7002,1,Voicemail(7002)\n{}",
        dialplan(0..100),
        dialplan(100..4000)
    );
    write_old(&sender.join("extensions.conf"), new.as_bytes());
    let trash = Trash::open(&dir.path().join("trash")).unwrap();
    let (server, mut client_conn) = start_primary(&sender);
    let index = fresh_index();
    let report = pull_default(&mut client_conn, &receiver, index, &trash)
        .await
        .unwrap();
    assert!(report.executed.deferred.is_empty(), "{report:?}");
    assert_eq!(
        fs::read(receiver.join("extensions.conf")).unwrap(),
        new.as_bytes()
    );
    let moved = report.executed.fetched_bytes;
    assert!(
        moved < 4096,
        "moved {moved} bytes of a {} byte file",
        new.len()
    );
    stop_primary(server, client_conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_delta_is_refused_and_the_whole_file_fetched_instead() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = dir.path().join("backup");
    let old = dialplan(0..2000);
    write_old(&receiver.join("extensions.conf"), old.as_bytes());
    let new = dialplan(0..2100).into_bytes();
    let trash = Trash::open(&dir.path().join("trash")).unwrap();
    let (mut liar, mut client) = connections();
    let fake = tokio::spawn({
        let new = new.clone();
        async move {
            expect_digests(&mut liar).await;
            let entries = vec![file_entry("extensions.conf", &new)];
            say_manifest(&mut liar, entries).await;
            assert!(matches!(
                expect_request(&mut liar).await,
                Message::SyncFetchDelta { .. }
            ));
            // Garbage where a delta should be, with the right hash at the end.
            say(
                &mut liar,
                Message::SyncDelta {
                    bytes: b"rs\x026not a delta at all".to_vec(),
                },
            )
            .await;
            let end = Message::SyncDataEnd {
                size: new.len() as u64,
                blake3: *blake3::hash(&new).as_bytes(),
            };
            say(&mut liar, end.clone()).await;
            // The receiver asks for the whole file; this time it is honest.
            assert!(matches!(
                expect_request(&mut liar).await,
                Message::SyncFetch { .. }
            ));
            say(
                &mut liar,
                Message::SyncData {
                    bytes: new.clone().into(),
                },
            )
            .await;
            say(&mut liar, end).await;
            liar
        }
    });
    let index = fresh_index();
    let report = pull_default(&mut client, &receiver, index, &trash)
        .await
        .unwrap();
    assert_eq!(report.executed.refetched.len(), 1, "{report:?}");
    assert!(report.executed.deferred.is_empty(), "{report:?}");
    assert_eq!(fs::read(receiver.join("extensions.conf")).unwrap(), new);
    drop(fake.await.unwrap());
}

/// A day of recording calls: every pass adds recordings and grows a log, and deletes
/// nothing, so the trash holds no batch at all; the one pass that deletes makes one batch,
/// holding the deleted file, and the purge takes it when its time is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_that_delete_nothing_leave_nothing_in_the_trash() {
    let dir = tempfile::tempdir().unwrap();
    let (sender, receiver) = (dir.path().join("primary"), dir.path().join("backup"));
    let trash_dir = dir.path().join("trash");
    let trash = Trash::open(&trash_dir).unwrap();
    let batches = || fs::read_dir(&trash_dir).unwrap().count();
    fs::create_dir_all(&receiver).unwrap();
    let index = fresh_index();
    let mut log = Vec::new();
    for call in 0..40u32 {
        write_old(
            &sender.join(format!("monitor/2026/12/05/call-{call:04}.wav")),
            &vec![call as u8; 20_000 + call as usize],
        );
        log.extend_from_slice(format!("call {call} recorded\n").as_bytes());
        write_old(&sender.join("cdr/Master.csv"), &log);
        let report = pull_from(&sender, &receiver, index.clone(), &trash).await;
        assert_eq!(report.plan.trashed, 0);
        assert_eq!(batches(), 0, "pass {call} left a batch in the trash");
    }
    assert_eq!(state(&receiver), state(&sender));

    fs::remove_file(sender.join("monitor/2026/12/05/call-0007.wav")).unwrap();
    let report = pull_from(&sender, &receiver, index.clone(), &trash).await;
    assert_eq!(report.plan.trashed, 1);
    assert_eq!(batches(), 1);
    let batch = fs::read_dir(&trash_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert!(batch.join("monitor/2026/12/05/call-0007.wav").is_file());
    assert_eq!(
        trash.purge(Duration::from_secs(3600)).unwrap(),
        0,
        "kept within retention"
    );
    let in_two_hours = std::time::SystemTime::now() + Duration::from_secs(7200);
    assert_eq!(
        trash
            .purge_at(Duration::from_secs(3600), in_two_hours)
            .unwrap(),
        1
    );
    assert_eq!(batches(), 0);
}

/// One pull from `sender` into `receiver` (fresh indexes) as two boxes of protocol 1.5 make
/// it.
async fn pull_between_1_5_boxes(sender: &Path, receiver: &Path, trash: &Trash) -> PullReport {
    let old = lbs_protocol::ProtocolVersion { major: 1, minor: 5 };
    let (server, mut client) = start_primary_with(sender, fresh_index(), old);
    let options = PullOptions {
        version: old,
        ..PullOptions::default()
    };
    let report = pull(&mut client, receiver, fresh_index(), trash, GEN, options)
        .await
        .unwrap();
    stop_primary(server, client).await;
    report
}

fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_either_side_skips_is_reported_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (sender, receiver) = (dir.path().join("primary"), dir.path().join("backup"));
    write_old(&sender.join("voicemail/1234/INBOX/msg0000.wav"), b"hello");
    mkfifo(&sender.join("voicemail/1234/agi.pipe"));
    let _socket = std::os::unix::net::UnixListener::bind(sender.join("asterisk.ctl")).unwrap();
    fs::create_dir_all(&receiver).unwrap();
    mkfifo(&receiver.join("local.pipe"));
    let trash = Trash::open(&dir.path().join("trash")).unwrap();

    let (server, mut client) = start_primary(&sender);
    let report = pull_default(&mut client, &receiver, fresh_index(), &trash)
        .await
        .unwrap();
    let mut sent: Vec<(String, SkipReason)> = report
        .sender_skipped
        .entries
        .iter()
        .map(|e| (e.path.to_string(), e.reason.clone()))
        .collect();
    sent.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        sent,
        vec![
            ("asterisk.ctl".to_owned(), SkipReason::Socket),
            ("voicemail/1234/agi.pipe".to_owned(), SkipReason::Fifo),
        ]
    );
    assert_eq!(report.sender_skipped.more, 0);
    assert_eq!(report.scan.skipped.len(), 1, "{report:?}");
    assert_eq!(report.scan.skipped[0].path.to_string(), "local.pipe");
    assert_eq!(report.scan.skipped[0].reason, SkipReason::Fifo);
    // The rest synced as usual.
    assert_eq!(
        fs::read(receiver.join("voicemail/1234/INBOX/msg0000.wav")).unwrap(),
        b"hello"
    );
    stop_primary(server, client).await;

    // A primary of protocol 1.5 sends no list, and a 1.6 receiver that knows it expects none.
    let report = pull_between_1_5_boxes(&sender, &receiver, &trash).await;
    assert!(report.sender_skipped.entries.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_listing_more_skipped_entries_than_allowed_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = dir.path().join("backup");
    fs::create_dir_all(&receiver).unwrap();
    let trash = Trash::open(&dir.path().join("trash")).unwrap();
    let (mut liar, mut client) = connections();
    let fake = tokio::spawn(async move {
        expect_digests(&mut liar).await;
        say(
            &mut liar,
            Message::SyncManifest {
                entries: Vec::new(),
                last: true,
            },
        )
        .await;
        let entries = (0..=lbs_protocol::sync::MAX_SKIPPED_SENT)
            .map(|i| SkippedEntry {
                path: RelPath::try_from(format!("p{i}").as_str()).unwrap(),
                reason: SkipReason::Fifo,
            })
            .collect();
        say(&mut liar, Message::SyncSkipped { entries, more: 0 }).await;
        liar
    });
    let err = pull_default(&mut client, &receiver, fresh_index(), &trash)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("skipped entries"), "{err}");
    drop(fake.await.unwrap());
}

/// A file of `len` bytes with `islands` of data at the given offsets and holes elsewhere.
fn sparse_file(path: &Path, len: u64, islands: &[(u64, &[u8])]) {
    use std::os::unix::fs::FileExt;
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let file = fs::File::create(path).unwrap();
    file.set_len(len).unwrap();
    for (at, bytes) in islands {
        file.write_all_at(bytes, *at).unwrap();
    }
    file.set_modified(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_650_000_000))
        .unwrap();
}

fn allocated(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sparse_file_arrives_sparse_and_its_holes_do_not_cross_the_wire() {
    let dir = tempfile::tempdir().unwrap();
    let (sender, receiver) = (dir.path().join("primary"), dir.path().join("backup"));
    let len = 256 << 20;
    let island = music(100_000);
    let file = sender.join("images/disk.img");
    sparse_file(&file, len, &[(0, &island), (100 << 20, &island)]);
    if allocated(&file) > 4 << 20 {
        eprintln!("skipped: this file system does not keep holes");
        return;
    }
    fs::create_dir_all(&receiver).unwrap();
    let trash = Trash::open(&dir.path().join("trash")).unwrap();

    // Protocol 1.6 both sides: the holes travel as holes.
    let report = pull_from(&sender, &receiver, fresh_index(), &trash).await;
    let copy = receiver.join("images/disk.img");
    assert_eq!(state(&receiver), state(&sender));
    // The data, to the file system's 4 KiB pages.
    assert!(
        report.executed.fetched_bytes <= 2 * (island.len() as u64).next_multiple_of(4096),
        "fetched {} bytes of a {len}-byte file with {} bytes of data",
        report.executed.fetched_bytes,
        2 * island.len()
    );
    assert!(
        allocated(&copy) <= 1 << 20,
        "the copy takes {} bytes on disk",
        allocated(&copy)
    );

    // From a 1.5 primary the zeros come as data; the copy is sparse all the same.
    fs::remove_dir_all(&receiver).unwrap();
    fs::create_dir_all(&receiver).unwrap();
    let report = pull_between_1_5_boxes(&sender, &receiver, &trash).await;
    assert_eq!(report.executed.fetched_bytes, len);
    assert_eq!(state(&receiver), state(&sender));
    assert!(allocated(&copy) <= 1 << 20, "{}", allocated(&copy));
}

fn inode(path: &Path) -> u64 {
    fs::symlink_metadata(path).unwrap().ino()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_links_arrive_as_hard_links_after_edits_and_renames_too() {
    let dir = tempfile::tempdir().unwrap();
    let (sender, receiver) = (dir.path().join("primary"), dir.path().join("backup"));
    let greeting = music(300_000);
    write_old(&sender.join("vm/1234/greet.wav"), &greeting);
    fs::create_dir_all(sender.join("vm/5678")).unwrap();
    // One greeting shared by two mailboxes, and a copy that is not a link.
    fs::hard_link(
        sender.join("vm/1234/greet.wav"),
        sender.join("vm/5678/greet.wav"),
    )
    .unwrap();
    write_old(&sender.join("vm/9999/greet.wav"), &greeting);
    fs::create_dir_all(&receiver).unwrap();
    let trash = Trash::open(&dir.path().join("trash")).unwrap();
    let index = fresh_index();
    let server_index = fresh_index();
    let trash_dir = dir.path().join("trash");
    let pull_once = |index: Arc<Mutex<Index>>, server_index: Arc<Mutex<Index>>| {
        let (sender, receiver, trash_dir) = (sender.clone(), receiver.clone(), trash_dir.clone());
        async move {
            let trash = Trash::open(&trash_dir).unwrap();
            let (server, mut client) =
                start_primary_with(&sender, server_index, lbs_protocol::PROTOCOL_VERSION);
            let report = pull_default(&mut client, &receiver, index, &trash)
                .await
                .unwrap();
            stop_primary(server, client).await;
            report
        }
    };
    let (a, b, c) = (
        receiver.join("vm/1234/greet.wav"),
        receiver.join("vm/5678/greet.wav"),
        receiver.join("vm/9999/greet.wav"),
    );

    let report = pull_once(index.clone(), server_index.clone()).await;
    assert_eq!(report.plan.links, 1, "{report:?}");
    assert_eq!(
        inode(&a),
        inode(&b),
        "the two mailboxes' greeting is one file"
    );
    assert_ne!(inode(&a), inode(&c), "the copy stays a copy");
    assert_eq!(fs::read(&b).unwrap(), greeting);
    // A second pass changes nothing.
    let report = pull_once(index.clone(), server_index.clone()).await;
    assert_eq!(report.plan.links, 0, "{report:?}");
    assert_eq!(report.plan.fetch_files, 0, "{report:?}");

    // Edited through one name (both names see it on the primary): still one file here.
    let edited = music(310_000);
    write_old(&sender.join("vm/1234/greet.wav"), &edited);
    assert_eq!(
        inode(&sender.join("vm/1234/greet.wav")),
        inode(&sender.join("vm/5678/greet.wav"))
    );
    pull_once(index.clone(), server_index.clone()).await;
    assert_eq!(inode(&a), inode(&b));
    assert_eq!(fs::read(&b).unwrap(), edited);

    // One name renamed: the new name is linked, the old one gone.
    fs::rename(
        sender.join("vm/5678/greet.wav"),
        sender.join("vm/5678/old-greet.wav"),
    )
    .unwrap();
    pull_once(index.clone(), server_index.clone()).await;
    assert!(!b.exists());
    assert_eq!(inode(&a), inode(&receiver.join("vm/5678/old-greet.wav")));
    assert_eq!(state(&receiver), state(&sender));

    // A 1.5 pair knows no links: separate copies, as before.
    let fresh = dir.path().join("backup-old");
    fs::create_dir_all(&fresh).unwrap();
    let report = pull_between_1_5_boxes(&sender, &fresh, &trash).await;
    assert_eq!(report.plan.links, 0);
    assert_ne!(
        inode(&fresh.join("vm/1234/greet.wav")),
        inode(&fresh.join("vm/5678/old-greet.wav"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_of_many_small_files_wakes_its_progress_watcher_now_and_then_not_per_file() {
    let dir = tempfile::tempdir().unwrap();
    let (sender, receiver) = (dir.path().join("primary"), dir.path().join("backup"));
    const FILES: u64 = 2_000;
    for n in 0..FILES {
        write_old(
            &sender.join(format!("sounds/{:02}/prompt-{n}.wav", n % 20)),
            format!("prompt {n}").as_bytes(),
        );
    }
    fs::create_dir_all(&receiver).unwrap();
    let trash = Trash::open(&dir.path().join("trash")).unwrap();
    let (server, mut client) = start_primary(&sender);
    let (progress, mut watch) = tokio::sync::watch::channel(lbs_sync::Progress::default());
    // Counts the wake-ups until the pull drops its end.
    let watcher = tokio::spawn(async move {
        let mut wakes = 0u64;
        while watch.changed().await.is_ok() {
            wakes += 1;
        }
        (wakes, *watch.borrow())
    });
    let report = pull_watched(&mut client, &receiver, fresh_index(), &trash, progress)
        .await
        .unwrap();
    assert_eq!(report.plan.fetch_files, FILES, "{report:?}");
    let (wakes, last) = tokio::time::timeout(Duration::from_secs(10), watcher)
        .await
        .unwrap()
        .unwrap();
    // Every 100 ms and at the end (each file woke it twice or more before): the watcher
    // (a status task, a progress bar) and the writer stop trading places for every file.
    assert!(wakes < FILES / 4, "{wakes} wake-ups for {FILES} files");
    assert_eq!(last.actions_done, last.actions_total);
    assert_eq!(last.bytes_done, last.bytes_total);
    assert_eq!(state(&receiver), state(&sender));
    stop_primary(server, client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_that_finds_the_tree_in_sync_keeps_its_scan_and_the_next_still_sees_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (sender, receiver) = (dir.path().join("primary"), dir.path().join("backup"));
    for i in 0..20 {
        write_old(&sender.join(format!("sounds/p{i:02}.gsm")), &[i as u8; 700]);
    }
    write_old(&sender.join("extensions.conf"), b"[default]\n");
    std::fs::create_dir(&receiver).unwrap();
    let trash = Trash::open(&dir.path().join("trash")).unwrap();
    let index = fresh_index();
    pull_from(&sender, &receiver, index.clone(), &trash).await;
    // It wrote what it fetched into the index: nothing is kept in memory.
    assert!(!index.lock().unwrap().remembers());
    let in_sync = pull_from(&sender, &receiver, index.clone(), &trash).await;
    assert_eq!(in_sync.plan.fetch_files, 0, "{in_sync:?}");
    assert!(index.lock().unwrap().remembers());
    // A change on either side after that pass is seen by the next, which starts from the
    // entries kept in memory.
    write_old(
        &sender.join("extensions.conf"),
        b"[default]\nexten => 100\n",
    );
    write_old(&receiver.join("sounds/p03.gsm"), b"edited on the backup");
    let next = pull_from(&sender, &receiver, index.clone(), &trash).await;
    assert_eq!(next.plan.fetch_files, 2, "{next:?}");
    assert_eq!(state(&receiver), state(&sender));
    assert!(!index.lock().unwrap().remembers());
    let again = pull_from(&sender, &receiver, index.clone(), &trash).await;
    assert_eq!(again.plan.fetch_files, 0, "{again:?}");
}
