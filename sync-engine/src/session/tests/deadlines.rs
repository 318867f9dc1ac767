//! A peer that breaks, goes quiet or stops reading: what each side says, and after how long.

use super::*;

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

/// Reads one answer from `conn` until the pass gives up on a silent sender: the error (a
/// stall during the file transfer), how long it took, and what reached the writer.
async fn forward_until_stalled<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
) -> (SessionError, Duration, mpsc::Receiver<Chunk>) {
    let (tx, rx) = mpsc::channel(8);
    let started = tokio::time::Instant::now();
    let mut unpacker = Unpacker::default();
    let err = forward(conn, &tx, None, &mut Instant::now(), &mut unpacker)
        .await
        .unwrap_err();
    assert!(
        matches!(err, SessionError::Stalled("a file transfer")),
        "{err}"
    );
    (err, started.elapsed(), rx)
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
    let (err, took, mut rx) = forward_until_stalled(&mut conn).await;
    assert_eq!(took, STALLED);
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
    let fed = async {
        for _ in 0..64 {
            let chunk = Message::SyncData {
                bytes: vec![5u8; 64 * 1024].into(),
            };
            feed(&mut conn, Generation(1), chunk).await?;
        }
        Ok(())
    };
    // Bounded here too: without its deadline the write would wait for good.
    let err = tokio::time::timeout(2 * STALLED, fed)
        .await
        .expect("the write gave up within two minutes")
        .expect_err("64 chunks cannot fit in 4 KiB");
    assert!(matches!(err, SessionError::NotReading), "{err}");
    assert_eq!(started.elapsed(), STALLED);
    assert!(
        err.to_string()
            .starts_with("the peer read nothing of what this side sent for 60 s"),
        "{err}"
    );
    // A flush waits as long, and no longer.
    let started = tokio::time::Instant::now();
    let flushed = tokio::time::timeout(2 * STALLED, flush(&mut conn)).await;
    assert!(matches!(flushed, Ok(Err(SessionError::NotReading))));
    assert_eq!(started.elapsed(), STALLED);
    drop(b);
}

#[tokio::test(start_paused = true)]
async fn a_sender_waits_for_a_working_receiver_and_a_minute_for_a_silent_one() {
    for version in [V1_13, V1_12] {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut sender: Connection<_> =
            tokio_util::codec::Framed::new(a, lbs_protocol::FrameCodec::new());
        let mut receiver: Connection<_> =
            tokio_util::codec::Framed::new(b, lbs_protocol::FrameCodec::new());
        let root = dir.path().to_owned();
        let mut serving = tokio::spawn(async move {
            let index = Arc::new(Mutex::new(Index::in_memory().unwrap()));
            serve(&mut sender, root, index, Generation(1), version).await
        });
        if version >= V1_13 {
            // 100 s at work on its side, said every 10 s: the session stays.
            for _ in 0..10 {
                tokio::time::sleep(lbs_protocol::SYNC_SCANNING_EVERY).await;
                let working = Envelope {
                    generation: Generation(1),
                    message: Message::SyncWorking,
                };
                receiver.send(working).await.unwrap();
            }
            assert!(!serving.is_finished());
            // Then nothing, its connection open: it stopped.
            let silent = tokio::time::Instant::now();
            let ended = tokio::time::timeout(2 * STALLED, &mut serving).await;
            let err = ended
                .expect("the session ended within two minutes")
                .unwrap()
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    SessionError::Stalled("the wait for the receiver's next request")
                ),
                "{err}"
            );
            assert_eq!(silent.elapsed(), STALLED);
        } else {
            // An older receiver never says so: it is waited for as long as it takes.
            let waited = tokio::time::timeout(Duration::from_secs(600), &mut serving).await;
            assert!(waited.is_err(), "a 1.12 receiver's session ended by itself");
            drop(receiver);
            serving.await.unwrap().unwrap();
        }
    }
}

/// A 256 KiB data frame in 4 KiB pieces, one every 30 s (about 1 kbit/s), on a raw stream.
async fn trickle(stream: &mut (impl tokio::io::AsyncWrite + Unpin), frame: &[u8]) {
    use tokio::io::AsyncWriteExt;
    for (at, piece) in frame.chunks(4096).enumerate() {
        if at > 0 {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        stream.write_all(piece).await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_chunk_that_trickles_in_over_a_slow_link_is_waited_for_while_it_comes() {
    let (a, mut b) = tokio::io::duplex(1 << 20);
    let mut conn = tokio_util::codec::Framed::new(a, lbs_protocol::FrameCodec::new());
    let chunk = Envelope {
        generation: Generation(1),
        message: Message::SyncData {
            bytes: vec![3u8; 256 * 1024].into(),
        },
    };
    let mut frame = bytes::BytesMut::new();
    tokio_util::codec::Encoder::encode(&mut lbs_protocol::FrameCodec::new(), chunk, &mut frame)
        .unwrap();
    let pieces = frame.len().div_ceil(4096) as u32;
    let sending = tokio::spawn(async move {
        trickle(&mut b, &frame).await;
        // Then nothing: the sender stopped, its connection open.
        b
    });
    let (_, took, mut rx) = forward_until_stalled(&mut conn).await;
    // The whole chunk came (its pieces took 32 minutes) and reached the writer; the pass
    // gave up a minute after the last piece.
    assert!(matches!(rx.try_recv(), Ok(Chunk::Data(bytes)) if bytes.len() == 256 * 1024));
    assert_eq!(took, Duration::from_secs(30) * (pieces - 1) + STALLED);
    drop(sending.await.unwrap());
}

/// A receiver on a 4 KiB stream that takes 4 KiB every 30 s (about 1 kbit/s) until it has
/// `len` bytes, then stops reading; it gives its end back with what it took.
fn slow_reader(
    len: usize,
) -> (
    tokio::io::DuplexStream,
    tokio::task::JoinHandle<(tokio::io::DuplexStream, usize)>,
) {
    use tokio::io::AsyncReadExt;
    let (a, mut b) = tokio::io::duplex(4096);
    let reading = tokio::spawn(async move {
        let mut taken = 0usize;
        let mut buf = vec![0u8; 4096];
        while taken < len {
            tokio::time::sleep(Duration::from_secs(30)).await;
            taken += b.read(&mut buf).await.unwrap();
        }
        (b, taken)
    });
    (a, reading)
}

#[tokio::test(start_paused = true)]
async fn a_chunk_to_a_receiver_that_reads_slowly_is_written_and_one_it_stops_reading_is_not() {
    let (a, reading) = slow_reader(256 * 1024);
    let mut conn: Connection<_> =
        tokio_util::codec::Framed::new(a, lbs_protocol::FrameCodec::new());
    let started = tokio::time::Instant::now();
    write_data(&mut conn, Generation(1), &vec![9u8; 256 * 1024])
        .await
        .expect("a chunk the receiver keeps reading is written");
    assert!(started.elapsed() > 20 * STALLED, "{:?}", started.elapsed());
    let (b, taken) = reading.await.unwrap();
    assert!(taken >= 256 * 1024);
    // Nothing read any more: the next chunk waits a minute for room, and no longer.
    let started = tokio::time::Instant::now();
    let err = write_data(&mut conn, Generation(1), &vec![9u8; 256 * 1024])
        .await
        .unwrap_err();
    assert!(matches!(err, SessionError::NotReading), "{err}");
    assert_eq!(started.elapsed(), STALLED);
    drop(b);
}

#[tokio::test(start_paused = true)]
async fn queued_messages_to_a_receiver_that_reads_slowly_go_out_and_stop_when_it_stops() {
    // Packed chunks and short data go through the frame buffer (`feed`, `flush`).
    let (a, reading) = slow_reader(200 * 1024);
    let mut conn: Connection<_> =
        tokio_util::codec::Framed::new(a, lbs_protocol::FrameCodec::new());
    let started = tokio::time::Instant::now();
    for _ in 0..4 {
        let packed = Message::SyncDataPacked {
            len: 256 * 1024,
            bytes: vec![4u8; 50 * 1024],
        };
        feed(&mut conn, Generation(1), packed)
            .await
            .expect("queued while the receiver reads");
    }
    flush(&mut conn)
        .await
        .expect("written out while the receiver reads");
    assert!(started.elapsed() > 20 * STALLED, "{:?}", started.elapsed());
    let (b, taken) = reading.await.unwrap();
    assert!(taken >= 200 * 1024);
    // It stopped reading: the next message waits a minute for room, and no longer.
    let started = tokio::time::Instant::now();
    let more = Message::SyncDataPacked {
        len: 256 * 1024,
        bytes: vec![4u8; 50 * 1024],
    };
    feed(&mut conn, Generation(1), more).await.unwrap();
    let err = flush(&mut conn).await.unwrap_err();
    assert!(matches!(err, SessionError::NotReading), "{err}");
    assert_eq!(started.elapsed(), STALLED);
    drop(b);
}
