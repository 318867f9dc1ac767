use super::pipeline::*;
use super::ready::Ready;
use super::serve::*;
use super::whole::*;
use super::*;
use crate::tree::PART_CVS;

#[test]
fn a_manifest_is_bounded_by_bytes_and_every_size_it_announces() {
    let entry = |path: &str, kind: ManifestKind| ManifestEntry {
        path: RelPath::try_from(path).unwrap(),
        kind,
        meta: lbs_protocol::sync::FileMeta {
            mode: 0o644,
            owner: "asterisk".into(),
            group: "asterisk".into(),
            mtime_ns: 0,
        },
    };
    let mut intake = Intake::default();
    let huge = entry(
        "rec.wav",
        ManifestKind::File {
            size: 1 << 63,
            blake3: [0; 32],
        },
    );
    let err = intake.manifest(&[huge]).unwrap_err();
    assert!(matches!(err, SessionError::Unreasonable(_)), "{err}");
    assert!(err.to_string().contains("rec.wav announced at"), "{err}");
    // Few entries, but a gigabyte of link targets: refused by bytes.
    let target = vec![b'x'; 64 << 20];
    let links: Vec<ManifestEntry> = (0..17)
        .map(|i| {
            entry(
                &format!("link{i}"),
                ManifestKind::Symlink {
                    target: target.clone(),
                },
            )
        })
        .collect();
    let mut intake = Intake::default();
    assert!(matches!(
        intake.manifest(&links),
        Err(SessionError::ManifestTooLarge)
    ));
    // A real tree passes.
    let mut intake = Intake::default();
    let file = entry(
        "msg0001.wav",
        ManifestKind::File {
            size: 1 << 30,
            blake3: [0; 32],
        },
    );
    intake.manifest(&[file]).unwrap();
}

fn cvs(n: usize, seed: u8) -> Vec<Cv> {
    (0..n)
        .map(|i| *blake3::hash(&[seed, i as u8, (i >> 8) as u8]).as_bytes())
        .collect()
}

/// A sender that answers every whole-file request, in order, with the messages `answer`
/// gives for its path, then an end; it returns the paths asked for.
fn answering_sender(
    answer: fn(&RelPath) -> Vec<Message>,
    mut conn: Connection<tokio::io::DuplexStream>,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut asked = Vec::new();
        while let Some(Ok(envelope)) = conn.next().await {
            let Message::SyncFetch { path } = envelope.message else {
                break;
            };
            asked.push(path.to_string());
            let mut messages = answer(&path);
            let bytes: Vec<u8> = messages
                .iter()
                .flat_map(|m| match m {
                    Message::SyncData { bytes } => bytes.to_vec(),
                    _ => Vec::new(),
                })
                .collect();
            messages.push(Message::SyncDataEnd {
                size: bytes.len() as u64,
                blake3: *blake3::hash(&bytes).as_bytes(),
            });
            for message in messages {
                let envelope = Envelope {
                    generation: Generation(1),
                    message,
                };
                if conn.send(envelope).await.is_err() {
                    return asked;
                }
            }
        }
        asked
    })
}

/// The path as content.
fn echo(path: &RelPath) -> Vec<Message> {
    let bytes = path.as_bytes().to_vec();
    vec![Message::SyncData {
        bytes: bytes.into(),
    }]
}

/// For "big" twelve chunks of zeros (far more than any small file it is listed as), for any
/// other path the path.
fn big_or_echo(path: &RelPath) -> Vec<Message> {
    if path.as_bytes() != b"big" {
        return echo(path);
    }
    (0..12)
        .map(|_| Message::SyncData {
            bytes: vec![0u8; SYNC_CHUNK_LEN].into(),
        })
        .collect()
}

/// A sender that answers every whole-file request, in order, with the path as content.
fn echo_sender(conn: Connection<tokio::io::DuplexStream>) -> tokio::task::JoinHandle<Vec<String>> {
    answering_sender(echo, conn)
}

async fn content(conn: &mut Connection<tokio::io::DuplexStream>) -> Vec<u8> {
    let (tx, mut rx) = mpsc::channel(8);
    forward(
        conn,
        &tx,
        None,
        &mut Instant::now(),
        &mut Unpacker::default(),
    )
    .await
    .unwrap();
    drop(tx);
    let mut out = Vec::new();
    while let Some(chunk) = rx.recv().await {
        if let Chunk::Data(bytes) = chunk {
            out.extend(bytes);
        }
    }
    out
}

#[tokio::test]
async fn answers_the_writer_skipped_are_dropped_and_a_fallback_waits_its_turn() {
    let (a, b) = tokio::io::duplex(1 << 20);
    let mut conn = tokio_util::codec::Framed::new(a, lbs_protocol::FrameCodec::new());
    let sender = echo_sender(tokio_util::codec::Framed::new(
        b,
        lbs_protocol::FrameCodec::new(),
    ));
    let rel = |p: &str| RelPath::try_from(p).unwrap();
    let upcoming = ["a", "b", "c", "d"]
        .into_iter()
        .map(|p| Planned {
            path: rel(p),
            size: 1,
            ask: Ask::Whole,
            ahead: true,
        })
        .collect();
    let mut pipeline = Pipeline {
        upcoming,
        ahead: VecDeque::new(),
        unpacker: Unpacker::default(),
    };
    let generation = Generation(1);
    pipeline
        .ready(&mut conn, generation, rel("a"), 1, Ask::Whole)
        .await
        .unwrap();
    assert_eq!(content(&mut conn).await, b"a");
    // b, c and d are asked for while "a" is being stored.
    pipeline.top_up(&mut conn, generation).await.unwrap();
    assert_eq!(pipeline.ahead.len(), 3);
    // The writer skips b (its step failed before fetching): b's answer is dropped.
    pipeline
        .ready(&mut conn, generation, rel("c"), 1, Ask::Whole)
        .await
        .unwrap();
    assert_eq!(content(&mut conn).await, b"c");
    // A fallback fetch of "a" (a local copy that did not verify): d's answer in flight is
    // dropped and d goes back in line, asked again on the next top-up.
    pipeline
        .ready(&mut conn, generation, rel("a"), 1, Ask::Whole)
        .await
        .unwrap();
    assert_eq!(content(&mut conn).await, b"a");
    pipeline.top_up(&mut conn, generation).await.unwrap();
    pipeline
        .ready(&mut conn, generation, rel("d"), 1, Ask::Whole)
        .await
        .unwrap();
    assert_eq!(content(&mut conn).await, b"d");
    drop(conn);
    let asked = sender.await.unwrap();
    assert_eq!(asked, ["a", "b", "c", "d", "a", "d"]);
}

/// What `send_file` sends for `path` after the file grew past its listed version: the
/// data bytes and the size its end announces.
async fn sent_after_growth(len: usize) -> (Vec<u8>, Vec<u8>, u64) {
    let dir = tempfile::tempdir().unwrap();
    let listed: Vec<u8> = (0..len as u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.path().join("rec.wav"), &listed).unwrap();
    let mut index = Index::in_memory().unwrap();
    crate::scan::scan(dir.path(), &mut index, &ScanOptions::default()).unwrap();
    // The call goes on being recorded after the scan listed it.
    use std::io::Write;
    let mut recording = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join("rec.wav"))
        .unwrap();
    recording.write_all(&[7u8; 50_000]).unwrap();
    let (a, b) = tokio::io::duplex(1 << 20);
    let mut sender = tokio_util::codec::Framed::new(a, lbs_protocol::FrameCodec::new());
    let mut receiver =
        tokio_util::codec::Framed::new(b, lbs_protocol::FrameCodec::<Envelope>::new());
    let files = Root::open(dir.path()).unwrap();
    let index = Arc::new(Mutex::new(index));
    let path = RelPath::try_from("rec.wav").unwrap();
    let sending = tokio::spawn(async move {
        let peer = Reads {
            holes: true,
            packed: false,
        };
        send_file(&mut sender, Generation(1), &files, &index, path, peer)
            .await
            .unwrap();
        sender.flush().await.unwrap();
        sender
    });
    let mut data = Vec::new();
    let end = loop {
        match receiver.next().await.unwrap().unwrap().message {
            Message::SyncData { bytes } => data.extend(bytes),
            Message::SyncDataEnd { size, .. } => break size,
            other => panic!("unexpected {}", other.kind()),
        }
    };
    drop(sending.await.unwrap());
    (listed, data, end)
}

#[tokio::test]
async fn a_recording_that_grew_since_it_was_listed_is_sent_as_listed() {
    // Small files are read in one go, large ones streamed: both stop at the listed length,
    // so the receiver gets the version it planned for (not one it must refuse).
    for len in [300_000, 3_000_000] {
        let (listed, sent, end) = sent_after_growth(len).await;
        assert_eq!(end, len as u64, "the end announces the listed length");
        assert!(
            sent == listed,
            "{len}: sent {} bytes, listed {}",
            sent.len(),
            listed.len()
        );
    }
}

#[test]
fn pipelined_fetches_are_answered_in_the_order_asked() {
    // A runtime of its own, shut down without waiting for a reader stuck in the kernel: a
    // regression (a FIFO opened for reading waits for a writer) fails the test in 20 s
    // instead of hanging it.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for (version, packs) in [(V1_6, false), (lbs_protocol::PROTOCOL_VERSION, true)] {
        let answered = runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(20), pipelined_fetches(version)).await
        });
        let packed = answered.expect("every fetch and the heartbeat answered within 20 s");
        // Every file is made of a short repeated pattern: packed whenever the receiver can
        // unpack, small (read in sub-batches) and large (streamed) alike.
        assert_eq!(
            packed.iter().any(|n| n == "f010"),
            packs,
            "{version}: {packed:?}"
        );
        assert_eq!(
            packed.iter().any(|n| n == "f040"),
            packs,
            "{version}: {packed:?}"
        );
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
}

/// Serves pipelined fetches at `version`; the names of the files that came packed.
async fn pipelined_fetches(version: ProtocolVersion) -> Vec<String> {
    // Small files are read as a batch, a large one streamed, a missing one refused, and the
    // message after the fetches (read ahead with them) still answered.
    let dir = tempfile::tempdir().unwrap();
    let content = |i: usize, len: usize| (0..len).map(|b| (b * 7 + i) as u8).collect::<Vec<u8>>();
    let files: Vec<(String, Vec<u8>)> = (0..100)
        .map(|i| {
            let len = if i == 40 { 3 << 20 } else { 1000 + i * 300 };
            (format!("f{i:03}"), content(i, len))
        })
        .collect();
    for (name, bytes) in &files {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    let mut index = Index::in_memory().unwrap();
    crate::scan::scan(dir.path(), &mut index, &ScanOptions::default()).unwrap();
    std::fs::remove_file(dir.path().join("f070")).unwrap();
    // A FIFO where a listed file was: refused at once, never waited on for a writer.
    std::fs::remove_file(dir.path().join("f050")).unwrap();
    nix::unistd::mkfifo(&dir.path().join("f050"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let (a, b) = tokio::io::duplex(1 << 16);
    let mut sender = tokio_util::codec::Framed::new(a, lbs_protocol::FrameCodec::new());
    let mut receiver =
        tokio_util::codec::Framed::new(b, lbs_protocol::FrameCodec::<Envelope>::new());
    let root = dir.path().to_owned();
    let serving = tokio::spawn(async move {
        let index = Arc::new(Mutex::new(index));
        serve(&mut sender, root, index, Generation(1), version).await
    });
    let envelope = |message| Envelope {
        generation: Generation(1),
        message,
    };
    for (name, _) in &files {
        let path = RelPath::try_from(name.as_str()).unwrap();
        receiver
            .feed(envelope(Message::SyncFetch { path }))
            .await
            .unwrap();
    }
    receiver
        .feed(envelope(Message::Heartbeat {
            seq: 9,
            role: Role::Backup,
        }))
        .await
        .unwrap();
    receiver.flush().await.unwrap();
    let mut unpacker = Unpacker::default();
    let mut packed = Vec::new();
    let answers = async {
        for (i, (name, bytes)) in files.iter().enumerate() {
            let mut data = Vec::new();
            loop {
                match receiver.next().await.unwrap().unwrap().message {
                    Message::SyncData { bytes } => data.extend(bytes),
                    Message::SyncDataPacked { len, bytes } => {
                        assert!(bytes.len() < len as usize, "{name}: packed larger");
                        data.extend(unpacker.unpack(len, &bytes).unwrap());
                        packed.push(name.clone());
                    }
                    Message::SyncDataEnd { size, blake3 } => {
                        assert_eq!(size, bytes.len() as u64, "{name}");
                        assert_eq!(blake3, *blake3::hash(bytes).as_bytes(), "{name}");
                        break;
                    }
                    Message::SyncUnavailable { path, reason } => {
                        let expected = match i {
                            50 => "not a regular file",
                            70 => "No such file",
                            _ => panic!("{name} unavailable: {reason}"),
                        };
                        assert_eq!(path.to_string(), *name);
                        assert!(reason.contains(expected), "{name}: {reason}");
                        break;
                    }
                    other => panic!("{name}: unexpected {}", other.kind()),
                }
            }
            if i != 50 && i != 70 {
                assert!(data == *bytes, "{name}: {} bytes", data.len());
            }
        }
        match receiver.next().await.unwrap().unwrap().message {
            Message::HeartbeatAck { seq, .. } => assert_eq!(seq, 9),
            other => panic!("unexpected {}", other.kind()),
        }
    };
    answers.await;
    drop(receiver);
    serving.await.unwrap().unwrap();
    packed
}

#[test]
fn data_that_does_not_pack_is_sent_as_it_is_and_a_bad_frame_is_refused() {
    use super::whole::{Packer, Piece};
    let mut packer = Packer::new(true);
    packer.next_file(true);
    let mut noise = vec![0u8; SYNC_CHUNK_LEN];
    blake3::Hasher::new().finalize_xof().fill(&mut noise);
    // Noise does not pack; after a few tries the rest of the file is not even tried.
    for _ in 0..4 {
        assert!(matches!(
            packer.pack(Piece::Data(noise.clone())),
            Piece::Data(_)
        ));
    }
    assert!(matches!(
        packer.pack(Piece::Data(vec![7; 4096])),
        Piece::Data(_)
    ));
    // The next file is tried afresh; one listed nowhere is never packed.
    packer.next_file(true);
    let Piece::Packed { len, bytes } = packer.pack(Piece::Data(vec![7; 4096])) else {
        panic!("a run of one byte did not pack");
    };
    packer.next_file(false);
    assert!(matches!(
        packer.pack(Piece::Data(vec![7; 4096])),
        Piece::Data(_)
    ));
    let mut unpacker = Unpacker::default();
    assert_eq!(unpacker.unpack(len, &bytes).unwrap(), vec![7u8; 4096]);
    // A frame that gives more or less than announced, or is no frame, is refused.
    let err = unpacker.unpack(len - 1, &bytes).unwrap_err();
    assert!(err.to_string().contains("does not unpack"), "{err}");
    let err = unpacker.unpack(len + 1, &bytes).unwrap_err();
    assert!(err.to_string().contains("not the 4097"), "{err}");
    assert!(unpacker.unpack(len, b"not zstd at all").is_err());
    // A packed length beyond a chunk, or none, is refused before anything is unpacked.
    let too_long = Message::SyncDataPacked {
        len: SYNC_CHUNK_LEN as u32 + 1,
        bytes: bytes.clone(),
    };
    let err = chunk_of(too_long, &mut unpacker).err().unwrap();
    assert!(err.to_string().contains("at most"), "{err}");
    assert!(chunk_of(Message::SyncDataPacked { len: 0, bytes }, &mut unpacker).is_err());
}

#[test]
fn summaries_find_exactly_the_changed_blocks_of_a_same_size_file() {
    let bs = BlockSize::DEFAULT;
    let theirs = cvs(300, 1);
    let mut ours = theirs.clone();
    ours[7] = [9; 32];
    ours[250] = [9; 32];
    let len = 300 * bs.get();
    let sums: Vec<BlockSum> =
        block_sums(theirs.iter().copied(), theirs.len() as u64, bs, len).collect();
    assert!(sums.iter().all(|s| matches!(s, BlockSum::One(_))));
    let ranges = changed_ranges(&ours, &sums, bs, len);
    assert_eq!(
        ranges,
        vec![
            (7 * bs.get(), 8 * bs.get()),
            (250 * bs.get(), 251 * bs.get())
        ]
    );
}

#[test]
fn a_grown_file_is_summarised_coarsely_in_the_middle_and_finely_at_the_ends() {
    let bs = BlockSize::DEFAULT;
    let theirs = cvs(1000, 2);
    // Header rewritten, last block changed, 40 blocks appended.
    let mut ours = theirs.clone();
    ours[0] = [1; 32];
    ours[999] = [2; 32];
    ours.extend(cvs(40, 3));
    let len = 1040 * bs.get();
    let sums: Vec<BlockSum> =
        block_sums(theirs.iter().copied(), theirs.len() as u64, bs, len).collect();
    assert!(sums.len() < 80, "{} summaries for 1000 blocks", sums.len());
    let ranges = changed_ranges(&ours, &sums, bs, len);
    assert_eq!(
        ranges,
        vec![(0, bs.get()), (999 * bs.get(), 1040 * bs.get())]
    );
    // A change in the middle costs its whole group, never a wrong block.
    ours[500] = [3; 32];
    let ranges = changed_ranges(&ours, &sums, bs, len);
    let sent: u64 = ranges.iter().map(|(a, b)| b - a).sum();
    assert!(
        ranges
            .iter()
            .any(|(a, b)| *a <= 500 * bs.get() && 501 * bs.get() <= *b)
    );
    assert!(sent <= (1 + GROUP_BLOCKS as u64 + 41) * bs.get(), "{sent}");
}

fn rel(p: &str) -> RelPath {
    RelPath::try_from(p).unwrap()
}

fn data(chunks: &[Chunk]) -> Vec<u8> {
    chunks
        .iter()
        .flat_map(|c| match c {
            Chunk::Data(bytes) => bytes.to_vec(),
            _ => Vec::new(),
        })
        .collect()
}

#[tokio::test]
async fn answers_are_read_ahead_in_plan_order_and_an_oversized_one_is_refused() {
    let (a, b) = tokio::io::duplex(1 << 20);
    let mut conn = tokio_util::codec::Framed::new(a, lbs_protocol::FrameCodec::new());
    let asked = answering_sender(
        big_or_echo,
        tokio_util::codec::Framed::new(b, lbs_protocol::FrameCodec::new()),
    );
    let upcoming = ["one", "big", "two"]
        .into_iter()
        .map(|p| Planned {
            path: RelPath::try_from(p).unwrap(),
            size: 3,
            ask: Ask::Whole,
            ahead: true,
        })
        .collect();
    let mut pipeline = Pipeline {
        upcoming,
        ahead: VecDeque::new(),
        unpacker: Unpacker::default(),
    };
    pipeline.top_up(&mut conn, Generation(1)).await.unwrap();
    assert_eq!(pipeline.read_ahead_next(), Some(3));
    let ready = Ready::default();
    for _ in 0..3 {
        pipeline.read_ahead(&mut conn, &ready).await.unwrap();
    }
    assert_eq!(pipeline.read_ahead_next(), None);
    // Only what was listed is held: 6 bytes of the two small answers, nothing of "big".
    assert_eq!(ready.held_bytes(), 6);
    let big = ready.take(&rel("big")).unwrap();
    assert!(
        matches!(&big[..], [Chunk::Failed(why)] if why.contains("more for big than the 3 bytes")),
        "{:?}",
        big.len()
    );
    // "one" came before "big": the writer went past it.
    assert!(ready.take(&rel("one")).is_none());
    // The rest of "big" was read and dropped: the next answer is whole and in step.
    assert_eq!(data(&ready.take(&rel("two")).unwrap()), b"two");
    drop(conn);
    assert_eq!(asked.await.unwrap(), ["one", "big", "two"]);
}

#[tokio::test]
async fn files_over_a_mebibyte_are_not_read_ahead() {
    let (a, _b) = tokio::io::duplex(1 << 16);
    let mut conn = tokio_util::codec::Framed::new(a, lbs_protocol::FrameCodec::new());
    let mut pipeline = Pipeline {
        upcoming: [Planned {
            path: rel("large"),
            size: READY_FILE_MAX + 1,
            ask: Ask::Whole,
            ahead: true,
        }]
        .into(),
        ahead: VecDeque::new(),
        unpacker: Unpacker::default(),
    };
    pipeline.top_up(&mut conn, Generation(1)).await.unwrap();
    assert_eq!(pipeline.ahead.len(), 1, "requested ahead");
    assert_eq!(
        pipeline.read_ahead_next(),
        None,
        "but streamed as the writer asks"
    );
}

#[test]
fn summaries_compared_frame_by_frame_find_what_they_find_at_once() {
    let bs = BlockSize::DEFAULT;
    let theirs = cvs(1000, 4);
    let mut ours = theirs.clone();
    for changed in [0, 3, 4, 500, 998] {
        ours[changed] = [8; 32];
    }
    ours.truncate(990);
    let len = 990 * bs.get() - 100;
    for new_len in [1000 * bs.get(), 1200 * bs.get()] {
        let sums: Vec<BlockSum> =
            block_sums(theirs.iter().copied(), theirs.len() as u64, bs, new_len).collect();
        let at_once = changed_ranges(&ours, &sums, bs, len);
        assert_eq!(changed_ranges_in_frames(&ours, &sums, bs, len, 7), at_once);
        assert!(at_once.first().is_some_and(|r| r.0 == 0));
        assert!(
            at_once
                .iter()
                .any(|r| r.0 <= 500 * bs.get() && 501 * bs.get() <= r.1)
        );
    }
}

#[test]
fn summaries_of_a_list_of_several_parts_are_compared_across_part_boundaries() {
    let bs = BlockSize::DEFAULT;
    let theirs = cvs(3 * PART_CVS + 50, 6);
    let mut ours = theirs.clone();
    // Changed on both sides of a part boundary, and the file grew: the middle goes in groups
    // that straddle the boundaries.
    let boundary = PART_CVS;
    for changed in [1, boundary - 1, boundary, 2 * boundary + 3] {
        ours[changed] = [7; 32];
    }
    ours.extend(cvs(30, 1));
    let len = ours.len() as u64 * bs.get();
    let sums: Vec<BlockSum> =
        block_sums(theirs.iter().copied(), theirs.len() as u64, bs, len).collect();
    let ranges = changed_ranges_in_frames(&ours, &sums, bs, len, 100);
    for changed in [1, boundary - 1, boundary, 2 * boundary + 3] {
        let at = changed as u64 * bs.get();
        assert!(
            ranges.iter().any(|r| r.0 <= at && at + bs.get() <= r.1),
            "block {changed} not sent: {ranges:?}"
        );
    }
    let sent: u64 = ranges.iter().map(|r| r.1 - r.0).sum();
    assert!(
        sent <= (4 * GROUP_BLOCKS as u64 + 30 + 8) * bs.get(),
        "{ranges:?}"
    );
    assert_eq!(ranges.last().map(|r| r.1), Some(len));
}

#[test]
fn a_large_grown_file_is_summarised_in_at_most_so_many_groups() {
    let bs = BlockSize::DEFAULT;
    // A 1 GiB file that grew: its middle in groups of 64 blocks, not 16.
    let theirs = cvs(65_536, 8);
    let mut ours = theirs.clone();
    ours[30_000] = [4; 32];
    ours.extend(cvs(100, 9));
    let len = ours.len() as u64 * bs.get();
    let sums: Vec<BlockSum> =
        block_sums(theirs.iter().copied(), theirs.len() as u64, bs, len).collect();
    assert!(
        sums.len() as u64 <= MAX_MIDDLE_GROUPS + 2 * EDGE_BLOCKS as u64,
        "{} summaries",
        sums.len()
    );
    assert!(sums.iter().any(|s| s.blocks() == 64));
    // Made as the values pass, the digests are group_digest's.
    let first_group = &theirs[EDGE_BLOCKS..EDGE_BLOCKS + 64];
    assert!(sums.contains(&BlockSum::Group {
        count: 64,
        digest: group_digest(first_group),
    }));
    let ranges = changed_ranges(&ours, &sums, bs, len);
    let sent: u64 = ranges.iter().map(|r| r.1 - r.0).sum();
    assert!(
        ranges
            .iter()
            .any(|r| r.0 <= 30_000 * bs.get() && 30_001 * bs.get() <= r.1)
    );
    assert!(sent <= (64 + 100 + 1) * bs.get(), "{ranges:?}");
}

#[test]
fn a_broken_connection_is_said_plainly() {
    let eof = std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "peer closed connection without sending TLS close_notify: https://docs.rs/rustls/",
    );
    let said = SessionError::from(FrameError::from(eof)).to_string();
    assert!(
        said.starts_with("the connection to the peer broke (it hung up"),
        "{said}"
    );
    assert!(!said.contains("https://"), "{said}");
    let reset = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
    let said = SessionError::from(FrameError::from(reset)).to_string();
    assert!(said.contains("(it was reset)"), "{said}");
    // The kernel's own deadline (TCP_USER_TIMEOUT, keepalive) for a peer that stopped reading.
    let gave_up = std::io::Error::from_raw_os_error(nix::libc::ETIMEDOUT);
    let said = SessionError::from(FrameError::from(gave_up)).to_string();
    assert!(
        said.starts_with(
            "the connection to the peer broke (nothing sent was acknowledged in time): the peer \
             stopped"
        ),
        "{said}"
    );
    // Anything else keeps its own words.
    let other = std::io::Error::other("no buffer space");
    let said = SessionError::from(FrameError::from(other)).to_string();
    assert_eq!(said, "connection: no buffer space");
}

#[tokio::test(start_paused = true)]
async fn a_sender_that_goes_quiet_in_the_middle_of_a_file_ends_the_pass_after_a_minute() {
    let (a, b) = tokio::io::duplex(1 << 20);
    let mut conn = tokio_util::codec::Framed::new(a, lbs_protocol::FrameCodec::new());
    let mut sender = tokio_util::codec::Framed::new(b, lbs_protocol::FrameCodec::new());
    // One chunk of the file, then nothing: the sender is stopped, its connection stays open.
    let first = Envelope {
        generation: Generation(1),
        message: Message::SyncData {
            bytes: vec![7u8; 1000].into(),
        },
    };
    sender.send(first).await.unwrap();
    let (tx, mut rx) = mpsc::channel(8);
    let started = tokio::time::Instant::now();
    let mut unpacker = Unpacker::default();
    let err = forward(&mut conn, &tx, None, &mut Instant::now(), &mut unpacker)
        .await
        .unwrap_err();
    assert!(
        matches!(err, SessionError::Stalled("a file transfer")),
        "{err}"
    );
    assert_eq!(started.elapsed(), STALLED);
    assert!(
        err.to_string()
            .starts_with("the peer sent nothing for 60 s during a file transfer"),
        "{err}"
    );
    // What came before the silence reached the writer.
    assert!(matches!(rx.try_recv(), Ok(Chunk::Data(bytes)) if bytes.len() == 1000));
    drop(sender);
}

#[tokio::test(start_paused = true)]
async fn a_long_scan_is_said_every_ten_seconds_to_a_receiver_that_reads_it() {
    for (version, said) in [(V1_12, 2), (V1_11, 0)] {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut sender = tokio_util::codec::Framed::new(a, lbs_protocol::FrameCodec::new());
        let mut receiver: Connection<_> =
            tokio_util::codec::Framed::new(b, lbs_protocol::FrameCodec::new());
        // A scan of 25 s: said at 10 s and 20 s.
        let scanning = tokio::spawn(async {
            tokio::time::sleep(Duration::from_secs(25)).await;
            Ok(Scanned {
                manifest: Vec::new(),
                skipped: Vec::new(),
                links: Vec::new(),
            })
        });
        let started = tokio::time::Instant::now();
        let scanned = saying_scanning(&mut sender, Generation(1), version, scanning)
            .await
            .unwrap();
        assert!(scanned.manifest.is_empty());
        assert_eq!(started.elapsed(), Duration::from_secs(25));
        drop(sender);
        let mut notices = 0;
        while let Some(envelope) = receiver.next().await {
            assert!(matches!(envelope.unwrap().message, Message::SyncScanning));
            notices += 1;
        }
        assert_eq!(notices, said, "to a receiver of {version}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_manifest_waits_out_scanning_notices_but_not_a_silent_sender() {
    let (a, b) = tokio::io::duplex(1 << 16);
    let mut conn = tokio_util::codec::Framed::new(a, lbs_protocol::FrameCodec::new());
    let mut sender = tokio_util::codec::Framed::new(b, lbs_protocol::FrameCodec::new());
    let part = Message::SyncManifest {
        entries: Vec::new(),
        last: true,
    };
    for message in [Message::SyncScanning, Message::SyncScanning, part] {
        let envelope = Envelope {
            generation: Generation(1),
            message,
        };
        sender.send(envelope).await.unwrap();
    }
    let got = receive_manifest(&mut conn, V1_12).await.unwrap();
    assert!(matches!(got, Message::SyncManifest { last: true, .. }));
    // Then nothing, the connection open: the sender stopped mid-scan.
    let started = tokio::time::Instant::now();
    let err = receive_manifest(&mut conn, V1_12).await.unwrap_err();
    assert!(
        matches!(err, SessionError::Stalled("the manifest")),
        "{err}"
    );
    assert_eq!(started.elapsed(), STALLED);
    drop(sender);
}

#[tokio::test(start_paused = true)]
async fn a_sender_whose_receiver_stops_reading_ends_its_session_after_a_minute() {
    let (a, b) = tokio::io::duplex(4096);
    let mut conn: Connection<_> =
        tokio_util::codec::Framed::new(a, lbs_protocol::FrameCodec::new());
    // A file's chunks to a receiver that is stopped: its connection open, nothing read.
    let started = tokio::time::Instant::now();
    let mut err = None;
    for _ in 0..64 {
        let chunk = Message::SyncData {
            bytes: vec![5u8; 64 * 1024].into(),
        };
        if let Err(failed) = feed(&mut conn, Generation(1), chunk).await {
            err = Some(failed);
            break;
        }
    }
    let err = err.expect("64 chunks cannot fit in 4 KiB");
    assert!(matches!(err, SessionError::NotReading), "{err}");
    assert_eq!(started.elapsed(), STALLED);
    assert!(
        err.to_string()
            .starts_with("the peer read nothing of what this side sent for 60 s"),
        "{err}"
    );
    // A flush waits as long, and no longer.
    let started = tokio::time::Instant::now();
    assert!(matches!(
        flush(&mut conn).await,
        Err(SessionError::NotReading)
    ));
    assert_eq!(started.elapsed(), STALLED);
    drop(b);
}
