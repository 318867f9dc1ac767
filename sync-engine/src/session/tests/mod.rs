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

/// What the writer gets for `name` (a one-byte whole file) when it asks the pipeline.
async fn fetched(
    pipeline: &mut Pipeline,
    conn: &mut Connection<tokio::io::DuplexStream>,
    name: &str,
) -> Vec<u8> {
    pipeline
        .ready(conn, Generation(1), rel(name), 1, Ask::Whole)
        .await
        .unwrap();
    content(conn).await
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
async fn the_scan_starts_before_the_request_and_ends_before_the_session_does() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..200 {
        std::fs::write(dir.path().join(format!("f{i:03}")), [i as u8; 100]).unwrap();
    }
    let index = Arc::new(Mutex::new(Index::in_memory().unwrap()));
    let (a, b) = tokio::io::duplex(1 << 16);
    let mut sender = tokio_util::codec::Framed::new(a, lbs_protocol::FrameCodec::new());
    // The receiver hangs up without asking for anything.
    drop(b);
    let served = serve(
        &mut sender,
        dir.path().to_owned(),
        index.clone(),
        Generation(1),
        lbs_protocol::PROTOCOL_VERSION,
    );
    tokio::time::timeout(std::time::Duration::from_secs(20), served)
        .await
        .expect("the session ended")
        .unwrap();
    // The scan that began with the session ran to its end before serve returned.
    let known = index.lock().unwrap().entries().unwrap();
    assert_eq!(known.len(), 200);
    assert!(known.iter().all(|entry| entry.hash.is_some()));
}

#[tokio::test]
async fn answers_the_writer_skipped_are_dropped_and_a_fallback_waits_its_turn() {
    let (a, b) = tokio::io::duplex(1 << 20);
    let mut conn = tokio_util::codec::Framed::new(a, lbs_protocol::FrameCodec::new());
    let sender = echo_sender(tokio_util::codec::Framed::new(
        b,
        lbs_protocol::FrameCodec::new(),
    ));
    let mut pipeline = whole_files(&["a", "b", "c", "d"], 1);
    let generation = Generation(1);
    assert_eq!(fetched(&mut pipeline, &mut conn, "a").await, b"a");
    // b, c and d are asked for while "a" is being stored.
    pipeline.top_up(&mut conn, generation).await.unwrap();
    assert_eq!(pipeline.ahead.len(), 3);
    // The writer skips b (its step failed before fetching): b's answer is dropped.
    assert_eq!(fetched(&mut pipeline, &mut conn, "c").await, b"c");
    // A fallback fetch of "a" (a local copy that did not verify): d's answer in flight is
    // dropped and d goes back in line, asked again on the next top-up.
    assert_eq!(fetched(&mut pipeline, &mut conn, "a").await, b"a");
    pipeline.top_up(&mut conn, generation).await.unwrap();
    assert_eq!(fetched(&mut pipeline, &mut conn, "d").await, b"d");
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
            packing: None,
        };
        send_file(&mut sender, Generation(1), &files, &index, path, &peer)
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
    use super::pack::{Packer, Piece};
    let mut packer = Packer::new(Some(Default::default()));
    packer.next_file(&rel("noise"), true);
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
    packer.next_file(&rel("ones"), true);
    let Piece::Packed { len, bytes } = packer.pack(Piece::Data(vec![7; 4096])) else {
        panic!("a run of one byte did not pack");
    };
    packer.next_file(&rel("unlisted"), false);
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

fn rel(p: &str) -> RelPath {
    RelPath::try_from(p).unwrap()
}

/// A pipeline with whole-file fetches of `paths`, each `size` bytes, all to be asked ahead.
fn whole_files(paths: &[&str], size: u64) -> Pipeline {
    Pipeline {
        upcoming: paths
            .iter()
            .map(|p| Planned {
                path: rel(p),
                size,
                ask: Ask::Whole,
                ahead: true,
            })
            .collect(),
        ahead: VecDeque::new(),
        unpacker: Unpacker::default(),
    }
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
    let mut pipeline = whole_files(&["one", "big", "two"], 3);
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
    let mut pipeline = whole_files(&["large"], READY_FILE_MAX + 1);
    pipeline.top_up(&mut conn, Generation(1)).await.unwrap();
    assert_eq!(pipeline.ahead.len(), 1, "requested ahead");
    assert_eq!(
        pipeline.read_ahead_next(),
        None,
        "but streamed as the writer asks"
    );
}

mod deadlines;
mod summaries;
