//! What a peer's bytes and a crash's leftovers reach on the receiving side, as harnesses
//! shared by the `cargo fuzz` targets (`sync-engine/fuzz`) and the property tests that run
//! them over random bytes in CI (feature `fuzzing`). Each may fail; none may panic, hang,
//! or change anything outside its own temporary root.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lbs_protocol::{FrameCodec, Generation};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::Framed;

use crate::{Index, JOURNAL_NAME, PullOptions, Recovery, Root, Trash};

/// The files a receiver holds before the primary speaks: a configuration file a delta fits, a
/// recording large enough for in-place patches, a directory and a symlink.
fn seed(root: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(root.join("voicemail/1234/INBOX"))?;
    let conf: String = (0..400)
        .map(|i| format!("exten => {i},1,Dial(PJSIP/{i},30)\n"))
        .collect();
    std::fs::write(root.join("extensions.conf"), conf)?;
    let wav: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(root.join("voicemail/1234/INBOX/msg0000.wav"), wav)?;
    std::os::unix::fs::symlink("extensions.conf", root.join("link.conf"))
}

/// `data` as frames: each a big-endian `u16` length and that many bytes of payload (the last
/// one cut to what is left). The frame codec has its own target (`protocol/fuzz`); here the
/// fuzzer's effort goes into messages that decode and what the pull does with them.
fn framed(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 64);
    let mut rest = data;
    while let [hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        out.extend_from_slice(&u32::try_from(len).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&tail[..len]);
        rest = &tail[len..];
    }
    out
}

/// A pull whose primary sends `data` as frames (see [`framed`]), then hangs up, to a
/// receiver holding [`seed`]'s files. The pull ends with an error or a report within its deadline; nothing
/// appears outside the receiver's root and its trash.
pub fn receive(data: &[u8]) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let root = dir.path().join("root");
    seed(&root).expect("the receiver's files");
    let trash = Trash::open(&dir.path().join("trash")).expect("the trash");
    let index = Arc::new(Mutex::new(Index::in_memory().expect("an index")));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let finished = runtime.block_on(async {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (mut from_client, mut to_client) = tokio::io::split(server);
        // The primary reads what the receiver asks (never answering it) while it sends
        // `data`, then hangs up.
        let drain = async move {
            let mut sink = [0u8; 8192];
            while matches!(from_client.read(&mut sink).await, Ok(n) if n > 0) {}
        };
        let frames = framed(data);
        let send = async move {
            let _ = to_client.write_all(&frames).await;
            let _ = to_client.shutdown().await;
        };
        let (root, trash) = (&root, &trash);
        let pull = async move {
            let mut conn = Framed::new(client, FrameCodec::new());
            let result = crate::pull(
                &mut conn,
                root,
                index,
                trash,
                Generation(1),
                PullOptions::default(),
            )
            .await;
            // Hanging up ends the primary's reading.
            drop(conn);
            drop(result);
        };
        tokio::time::timeout(Duration::from_secs(20), async {
            tokio::join!(drain, send, pull);
        })
        .await
    });
    assert!(
        finished.is_ok(),
        "the pull neither finished nor failed in 20 s"
    );
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .expect("the temporary directory")
        .map(|e| e.expect("an entry").file_name())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["root", "trash"],
        "something appeared beside the root"
    );
}

/// A signature and a delta from the wire (`data` split by its first byte): building a delta
/// against the signature and applying the delta to a base never panic, and an applied delta
/// never writes beyond the size allowed; a real delta of `data` rebuilds it exactly.
pub fn delta(data: &[u8]) {
    let split = data
        .first()
        .map_or(0, |b| usize::from(*b) * 4)
        .min(data.len());
    let (signature, delta) = data.split_at(split);
    let base: Vec<u8> = (0..16_384u32).map(|i| (i * 7 % 253) as u8).collect();
    let _ = crate::delta::delta_for(signature.to_vec(), &base);
    let limit = 64 * 1024;
    let mut out = Vec::new();
    if crate::delta::apply_delta(&base, delta, &mut out, limit).is_ok() {
        assert!(out.len() as u64 <= limit, "{} bytes out", out.len());
    }
    if let Some(real) = crate::delta::delta_for(crate::delta::signature_of(&base), data) {
        let mut rebuilt = Vec::new();
        crate::delta::apply_delta(&base, &real, &mut rebuilt, data.len() as u64)
            .expect("a delta made here applies");
        assert!(rebuilt == data, "the delta did not rebuild the data");
    }
}

/// A journal left by a crash holding `data`: recovery finishes it or discards it without
/// panicking, the journal is gone afterwards, and a discarded one left the file as it was.
pub fn journal(data: &[u8]) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let root_path = dir.path().join("root");
    seed(&root_path).expect("the receiver's files");
    let file = root_path.join("voicemail/1234/INBOX/msg0000.wav");
    let before = std::fs::read(&file).expect("the recording");
    std::fs::File::create(root_path.join(JOURNAL_NAME))
        .and_then(|mut journal| journal.write_all(data))
        .expect("the journal");
    let root = Root::open(&root_path).expect("the root");
    match crate::recover(&root) {
        Ok(Recovery::Discarded(_) | Recovery::Clean) => {
            assert!(std::fs::read(&file).expect("the recording") == before);
            assert!(!root_path.join(JOURNAL_NAME).exists(), "the journal stayed");
        }
        Ok(Recovery::Finished(_)) => {
            assert!(!root_path.join(JOURNAL_NAME).exists(), "the journal stayed");
        }
        Err(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn random_bytes_from_a_primary_never_panic_or_hang_a_pull(
            data in prop::collection::vec(any::<u8>(), 0..4096)
        ) {
            super::receive(&data);
        }

        #[test]
        fn random_signatures_and_deltas_never_panic(
            data in prop::collection::vec(any::<u8>(), 0..20_000)
        ) {
            super::delta(&data);
        }

        #[test]
        fn a_random_journal_is_never_replayed_and_never_stays(
            data in prop::collection::vec(any::<u8>(), 0..4096)
        ) {
            super::journal(&data);
        }
    }
}
