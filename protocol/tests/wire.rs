//! Frames and the hello exchange under good, odd and hostile input.

// In tests a panic is the failure report; helpers outside #[test] fns unwrap too.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use futures_util::{SinkExt, StreamExt};
use lbs_protocol::frame::{self, HEADER_LEN};
use lbs_protocol::handshake::exchange_hello;
use lbs_protocol::sync::{BlockSum, DirDigest, FileMeta, ManifestEntry, ManifestKind};
use lbs_protocol::{
    Envelope, FrameCodec, FrameError, Generation, HandshakeError, Hello, MAX_FRAME_LEN, Message,
    PeerName, ProtocolVersion, Refusal, RelPath, Role, Sender, ServerId, SoftwareVersion,
};
use proptest::prelude::*;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_util::codec::Decoder;

fn arb_sid() -> impl Strategy<Value = ServerId> {
    any::<[u8; 6]>().prop_map(ServerId::from_bytes)
}

fn arb_role() -> impl Strategy<Value = Role> {
    prop_oneof![
        Just(Role::Unactivated),
        Just(Role::Primary),
        Just(Role::Backup),
        Just(Role::Fenced)
    ]
}

fn arb_protocol() -> impl Strategy<Value = ProtocolVersion> {
    (any::<u16>(), any::<u16>()).prop_map(|(major, minor)| ProtocolVersion { major, minor })
}

fn arb_hello() -> impl Strategy<Value = Hello> {
    let sender = prop_oneof![
        (arb_sid(), arb_role()).prop_map(|(sid, role)| Sender::Box { sid, role }),
        ".{0,24}".prop_map(|site| Sender::DataCenter { site }),
    ];
    (arb_protocol(), any::<(u32, u32, u32)>(), sender).prop_map(
        |(protocol, (major, minor, patch), sender)| Hello {
            protocol,
            software: SoftwareVersion {
                major,
                minor,
                patch,
            },
            sender,
        },
    )
}

fn arb_message() -> impl Strategy<Value = Message> {
    let refusal = prop_oneof![
        (arb_protocol(), arb_protocol())
            .prop_map(|(ours, yours)| Refusal::IncompatibleProtocol { ours, yours }),
        (".{0,40}", ".{0,40}")
            .prop_map(|(certificate, hello)| Refusal::IdentityMismatch { certificate, hello }),
        ".{0,80}".prop_map(|detail| Refusal::ProtocolViolation { detail }),
    ];
    prop_oneof![
        arb_hello().prop_map(Message::Hello),
        refusal.prop_map(Message::Refused),
        (any::<u64>(), arb_role()).prop_map(|(seq, role)| Message::Heartbeat { seq, role }),
        (any::<u64>(), arb_role()).prop_map(|(seq, role)| Message::HeartbeatAck { seq, role }),
        ".{0,200}".prop_map(|reason| Message::Goodbye { reason }),
        Just(Message::SyncManifestRequest),
        (
            prop::collection::vec(arb_manifest_entry(), 0..8),
            any::<bool>()
        )
            .prop_map(|(entries, last)| Message::SyncManifest { entries, last }),
        arb_rel_path().prop_map(|path| Message::SyncFetch { path }),
        prop::collection::vec(any::<u8>(), 0..2048).prop_map(|bytes| Message::SyncData {
            bytes: bytes.into()
        }),
        (any::<u64>(), any::<[u8; 32]>())
            .prop_map(|(size, blake3)| Message::SyncDataEnd { size, blake3 }),
        (arb_rel_path(), ".{0,80}")
            .prop_map(|(path, reason)| Message::SyncUnavailable { path, reason }),
        (
            arb_rel_path(),
            any::<u32>(),
            prop::collection::vec(arb_block_sum(), 0..16),
            any::<bool>()
        )
            .prop_map(
                |(path, block_size, blocks, last)| Message::SyncFetchChanges {
                    path,
                    block_size,
                    blocks,
                    last
                }
            ),
        (any::<u64>(), prop::collection::vec(any::<u8>(), 0..2048))
            .prop_map(|(offset, bytes)| Message::SyncDataAt { offset, bytes }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(changed, size)| Message::SyncChanges { changed, size }),
        (
            prop::collection::vec(
                (prop::option::of(arb_rel_path()), any::<[u8; 32]>())
                    .prop_map(|(dir, digest)| DirDigest { dir, digest }),
                0..8
            ),
            any::<bool>()
        )
            .prop_map(|(dirs, last)| Message::SyncManifestDigests { dirs, last }),
        (
            prop::collection::vec(prop::option::of(arb_rel_path()), 0..8),
            any::<bool>()
        )
            .prop_map(|(dirs, last)| Message::SyncManifestSame { dirs, last }),
        (arb_rel_path(), prop::collection::vec(any::<u8>(), 0..256))
            .prop_map(|(path, signature)| Message::SyncFetchDelta { path, signature }),
        prop::collection::vec(any::<u8>(), 0..256).prop_map(|bytes| Message::SyncDelta { bytes }),
    ]
}

fn arb_block_sum() -> impl Strategy<Value = BlockSum> {
    prop_oneof![
        any::<[u8; 8]>().prop_map(BlockSum::One),
        (any::<u32>(), any::<[u8; 8]>())
            .prop_map(|(count, digest)| BlockSum::Group { count, digest }),
    ]
}

fn arb_rel_path() -> impl Strategy<Value = RelPath> {
    prop::collection::vec("[a-zA-Z0-9._-]{1,12}", 1..4).prop_filter_map("not a path", |names| {
        RelPath::from_bytes(names.join("/").into_bytes()).ok()
    })
}

fn arb_manifest_entry() -> impl Strategy<Value = ManifestEntry> {
    let kind = prop_oneof![
        (any::<u64>(), any::<[u8; 32]>())
            .prop_map(|(size, blake3)| ManifestKind::File { size, blake3 }),
        Just(ManifestKind::Dir),
        prop::collection::vec(any::<u8>(), 1..64)
            .prop_map(|target| ManifestKind::Symlink { target }),
        Just(ManifestKind::Pending),
    ];
    (
        arb_rel_path(),
        kind,
        any::<u32>(),
        "[a-z]{0,8}",
        "[a-z]{0,8}",
        any::<i64>(),
    )
        .prop_map(|(path, kind, mode, owner, group, mtime_ns)| ManifestEntry {
            path,
            kind,
            meta: FileMeta {
                mode,
                owner,
                group,
                mtime_ns,
            },
        })
}

fn arb_envelope() -> impl Strategy<Value = Envelope> {
    (any::<u64>(), arb_message()).prop_map(|(generation, message)| Envelope {
        generation: Generation(generation),
        message,
    })
}

fn encode_all(envelopes: &[Envelope]) -> BytesMut {
    let mut wire = BytesMut::new();
    for envelope in envelopes {
        frame::encode(envelope, &mut wire, MAX_FRAME_LEN).unwrap();
    }
    wire
}

proptest! {
    #[test]
    fn every_message_round_trips(envelope in arb_envelope()) {
        let mut wire = encode_all(std::slice::from_ref(&envelope));
        let len = u32::from_be_bytes(wire[..HEADER_LEN].try_into().unwrap()) as usize;
        prop_assert_eq!(len, wire.len() - HEADER_LEN);
        let decoded = frame::decode::<Envelope>(&mut wire, MAX_FRAME_LEN).unwrap();
        prop_assert_eq!(decoded, Some(envelope));
        prop_assert!(wire.is_empty());
    }

    #[test]
    fn frames_split_anywhere_decode_in_order(
        envelopes in prop::collection::vec(arb_envelope(), 1..6),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let wire = encode_all(&envelopes);
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(wire.len())).collect();
        cuts.push(wire.len());
        cuts.sort_unstable();
        let mut codec = FrameCodec::<Envelope>::new();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut start = 0;
        for cut in cuts {
            buf.extend_from_slice(&wire[start..cut]);
            start = cut;
            while let Some(envelope) = codec.decode(&mut buf).unwrap() {
                got.push(envelope);
            }
        }
        prop_assert_eq!(got, envelopes);
    }

    #[test]
    fn a_truncated_frame_is_incomplete_then_an_error_at_eof(
        envelope in arb_envelope(),
        keep in any::<prop::sample::Index>(),
    ) {
        let wire = encode_all(&[envelope]);
        let keep = keep.index(wire.len()).max(1);
        let mut buf = BytesMut::from(&wire[..keep]);
        let mut codec = FrameCodec::<Envelope>::new();
        prop_assert_eq!(codec.decode(&mut buf).unwrap(), None);
        let eof = codec.decode_eof(&mut buf);
        prop_assert!(
            matches!(eof, Err(FrameError::Truncated { buffered }) if buffered == keep),
            "{:?}", eof
        );
    }

    #[test]
    fn random_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..512)) {
        lbs_protocol::fuzzing::decode_untrusted(&data);
    }

    #[test]
    fn corrupted_frames_never_panic(
        envelope in arb_envelope(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut wire = encode_all(&[envelope]).to_vec();
        for (idx, byte) in flips {
            let idx = idx.index(wire.len());
            wire[idx] ^= byte | 1;
        }
        lbs_protocol::fuzzing::decode_untrusted(&wire);
        lbs_protocol::fuzzing::decode_untrusted(&wire[HEADER_LEN.min(wire.len())..]);
    }

    #[test]
    fn announced_lengths_over_the_limit_are_refused(len in (MAX_FRAME_LEN as u32 + 1)..=u32::MAX) {
        let mut buf = BytesMut::new();
        buf.put_u32(len);
        buf.put_slice(&[0; 16]);
        let err = FrameCodec::<Envelope>::new().decode(&mut buf).unwrap_err();
        prop_assert!(matches!(err, FrameError::TooLarge { .. }), "{}", err);
    }
}

const A: &str = "00-1A-2B-3C-4D-5E";
const B: &str = "00-1A-2B-3C-4D-5F";

fn box_name(text: &str) -> PeerName {
    PeerName::Box(text.parse().unwrap())
}

fn hello(sid: &str, protocol: ProtocolVersion) -> Hello {
    Hello {
        protocol,
        software: SoftwareVersion::current(),
        sender: Sender::Box {
            sid: sid.parse().unwrap(),
            role: Role::Backup,
        },
    }
}

const TIMEOUT: Duration = Duration::from_secs(5);

async fn run_pair(
    a: ProtocolVersion,
    b: ProtocolVersion,
) -> (
    Result<lbs_protocol::Negotiated, HandshakeError>,
    Result<lbs_protocol::Negotiated, HandshakeError>,
) {
    let (io_a, io_b) = tokio::io::duplex(4096);
    let (name_a, name_b) = (box_name(A), box_name(B));
    let side_a = async {
        exchange_hello(io_a, &name_b, hello(A, a), Generation(1), TIMEOUT)
            .await
            .map(|(_, n)| n)
    };
    let side_b = async {
        exchange_hello(io_b, &name_a, hello(B, b), Generation(1), TIMEOUT)
            .await
            .map(|(_, n)| n)
    };
    tokio::join!(side_a, side_b)
}

fn v(major: u16, minor: u16) -> ProtocolVersion {
    ProtocolVersion { major, minor }
}

#[tokio::test]
async fn a_compatible_minor_difference_uses_the_lower_minor() {
    let (a, b) = run_pair(v(1, 0), v(1, 3)).await;
    assert_eq!(a.unwrap().version, v(1, 0));
    assert_eq!(b.unwrap().version, v(1, 0));
}

#[tokio::test]
async fn an_incompatible_major_is_refused_naming_both_versions() {
    let (a, b) = run_pair(v(1, 2), v(2, 0)).await;
    for (err, ours, theirs) in [
        (a.unwrap_err(), "1.2", "2.0"),
        (b.unwrap_err(), "2.0", "1.2"),
    ] {
        assert!(
            matches!(err, HandshakeError::IncompatibleProtocol { .. }),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains(&format!(
                "speaks protocol {theirs} but this side speaks {ours}"
            )),
            "{text}"
        );
    }
}

/// What a hypothetical protocol 2 `Hello` might look like: the same leading fields, then a
/// layout protocol 1 cannot read.
#[derive(Serialize)]
struct FutureHello {
    generation: u64,
    variant: u32,
    protocol: ProtocolVersion,
    capabilities: Vec<String>,
    sender_kind: u32,
}

async fn send_raw(io: &mut DuplexStream, payload: &[u8]) {
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(payload);
    io.write_all(&frame).await.unwrap();
}

/// Reads the frame the side under test sent, then the frame it sends in reply (if any).
async fn next_envelope(io: &mut DuplexStream) -> Option<Envelope> {
    let mut header = [0u8; 4];
    io.read_exact(&mut header).await.ok()?;
    let mut payload = vec![0; u32::from_be_bytes(header) as usize];
    io.read_exact(&mut payload).await.ok()?;
    frame::decode_payload(&payload).ok()
}

#[tokio::test]
async fn a_future_major_hello_is_refused_even_though_it_cannot_be_read() {
    let (io, mut peer) = tokio::io::duplex(4096);
    let future = postcard::to_stdvec(&FutureHello {
        generation: 9,
        variant: 0,
        protocol: v(2, 5),
        capabilities: vec!["quantum-sync".into()],
        sender_kind: 77,
    })
    .unwrap();
    send_raw(&mut peer, &future).await;
    let err = exchange_hello(io, &box_name(B), hello(A, v(1, 0)), Generation(1), TIMEOUT)
        .await
        .unwrap_err();
    assert!(
        matches!(err, HandshakeError::IncompatibleProtocol { theirs, .. } if theirs == v(2, 5)),
        "{err}"
    );
    // The future peer is told why, in a form it can read: its hello, then our refusal.
    assert!(matches!(
        next_envelope(&mut peer).await.map(|e| e.message),
        Some(Message::Hello(_))
    ));
    assert_eq!(
        next_envelope(&mut peer).await.map(|e| e.message),
        Some(Message::Refused(Refusal::IncompatibleProtocol {
            ours: v(1, 0),
            yours: v(2, 5)
        }))
    );
}

#[tokio::test]
async fn a_first_message_other_than_hello_is_refused() {
    let (io, mut peer) = tokio::io::duplex(4096);
    let mut wire = BytesMut::new();
    frame::encode(
        &Envelope {
            generation: Generation(1),
            message: Message::Heartbeat {
                seq: 1,
                role: Role::Primary,
            },
        },
        &mut wire,
        MAX_FRAME_LEN,
    )
    .unwrap();
    peer.write_all(&wire).await.unwrap();
    let err = exchange_hello(io, &box_name(B), hello(A, v(1, 0)), Generation(1), TIMEOUT)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            HandshakeError::NotHello {
                kind: "heartbeat",
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn a_refusal_instead_of_hello_is_reported_with_its_reason() {
    let (io, mut peer) = tokio::io::duplex(4096);
    let mut wire = BytesMut::new();
    frame::encode(
        &Envelope {
            generation: Generation(1),
            message: Message::Refused(Refusal::ProtocolViolation {
                detail: "going away".into(),
            }),
        },
        &mut wire,
        MAX_FRAME_LEN,
    )
    .unwrap();
    peer.write_all(&wire).await.unwrap();
    let err = exchange_hello(io, &box_name(B), hello(A, v(1, 0)), Generation(1), TIMEOUT)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("going away"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_silent_peer_times_out() {
    let (io, _peer) = tokio::io::duplex(4096);
    let err = exchange_hello(io, &box_name(B), hello(A, v(1, 0)), Generation(1), TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(err, HandshakeError::Timeout { .. }), "{err}");
}

#[tokio::test]
async fn a_peer_that_hangs_up_or_lies_about_length_is_an_error() {
    let (io, peer) = tokio::io::duplex(4096);
    drop(peer);
    let err = exchange_hello(io, &box_name(B), hello(A, v(1, 0)), Generation(1), TIMEOUT)
        .await
        .unwrap_err();
    // Our hello cannot even be written to a closed pipe; either way it is not a success.
    assert!(
        matches!(err, HandshakeError::Closed { .. } | HandshakeError::Tls(_)),
        "{err}"
    );

    let (io, mut peer) = tokio::io::duplex(4096);
    peer.write_all(&(MAX_FRAME_LEN as u32 + 1).to_be_bytes())
        .await
        .unwrap();
    let err = exchange_hello(io, &box_name(B), hello(A, v(1, 0)), Generation(1), TIMEOUT)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            HandshakeError::Frame {
                source: FrameError::TooLarge { .. },
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn messages_flow_after_the_hello_exchange() {
    let (io_a, io_b) = tokio::io::duplex(4096);
    let (name_a, name_b) = (box_name(A), box_name(B));
    let (a, b) = tokio::join!(
        exchange_hello(io_a, &name_b, hello(A, v(1, 0)), Generation(4), TIMEOUT),
        exchange_hello(io_b, &name_a, hello(B, v(1, 0)), Generation(4), TIMEOUT),
    );
    let (mut a, _) = a.unwrap();
    let (mut b, negotiated) = b.unwrap();
    assert_eq!(negotiated.peer_generation, Generation(4));
    let ping = Envelope {
        generation: Generation(4),
        message: Message::Heartbeat {
            seq: 42,
            role: Role::Primary,
        },
    };
    a.send(ping.clone()).await.unwrap();
    assert_eq!(b.next().await.unwrap().unwrap(), ping);
}

fn activation_request() -> lbs_protocol::control::ActivationRequest {
    lbs_protocol::control::ActivationRequest {
        protocol: lbs_protocol::PROTOCOL_VERSION,
        software: SoftwareVersion::current(),
        sid: ServerId::from_bytes([0, 0x1a, 0x2b, 0x3c, 0x4d, 0x5e]),
        key: "1111-2222-3333-4444-5555-6666".into(),
        csr: vec![1, 2, 3],
        wireguard_key: "k".repeat(44),
        lan_address: "192.168.1.2".parse().unwrap(),
        inventory: lbs_protocol::inventory::Inventory {
            cpu_model: "Test CPU".into(),
            cpus: 4,
            memory_bytes: 8 << 30,
            disks: Vec::new(),
            nics: Vec::new(),
            telephony: Vec::new(),
        },
    }
}

/// The variant index of an envelope's message, as postcard writes it (generation 0 first).
fn variant_index(message: Message) -> u8 {
    let wire = postcard::to_stdvec(&Envelope {
        generation: Generation(0),
        message,
    })
    .unwrap();
    assert_eq!(wire[0], 0, "generation 0");
    wire[1]
}

#[test]
fn the_1_6_activation_keeps_its_place_on_the_wire_and_the_typed_one_is_new() {
    let request = activation_request();
    // Index 18 was `Activate` in protocols 1.0–1.6; 43 (`SyncLinks`) was 1.6's last.
    assert_eq!(
        variant_index(Message::ActivateJson(request.clone().into())),
        18
    );
    assert_eq!(variant_index(Message::Activate(request.clone())), 44);
    // The 1.6 form carries the inventory as the JSON `lbs net inventory --json` prints, and
    // reads back as the same typed request.
    let json = lbs_protocol::control::ActivationRequestJson::from(request.clone());
    assert!(
        json.inventory
            .starts_with(r#"{"cpu_model":"Test CPU","cpus":4,"#)
    );
    assert_eq!(
        lbs_protocol::control::ActivationRequest::try_from(json).unwrap(),
        request
    );
}

/// A data center of protocol 1.6 on one end of `io`: it cannot read a message past
/// `SyncLinks` (index 43) and refuses the connection as its code does; it grants a request
/// in the 1.6 form. Returns what it was sent.
async fn data_center_1_6(mut io: DuplexStream) -> Message {
    let mut header = [0u8; 4];
    io.read_exact(&mut header).await.unwrap();
    let mut payload = vec![0; u32::from_be_bytes(header) as usize];
    io.read_exact(&mut payload).await.unwrap();
    let message = frame::decode_payload::<Envelope>(&payload).unwrap().message;
    let reply = if payload[1] > 43 {
        Message::Refused(Refusal::ProtocolViolation {
            detail: "activation request unreadable: malformed frame".into(),
        })
    } else {
        Message::Denied(lbs_protocol::control::Denial::Activation(
            "granted in the 1.6 form (a test stand-in)".into(),
        ))
    };
    let mut wire = BytesMut::new();
    frame::encode(
        &Envelope {
            generation: Generation(0),
            message: reply,
        },
        &mut wire,
        MAX_FRAME_LEN,
    )
    .unwrap();
    io.write_all(&wire).await.unwrap();
    message
}

#[tokio::test]
async fn a_data_center_older_than_1_7_gets_the_activation_again_in_the_1_6_form() {
    let mut seen = Vec::new();
    let mut connections = 0;
    let answer = lbs_protocol::control::activate(
        || {
            connections += 1;
            let (io, peer) = tokio::io::duplex(64 * 1024);
            let dc = tokio::spawn(data_center_1_6(peer));
            seen.push(dc);
            async move { Ok::<_, std::convert::Infallible>(io) }
        },
        activation_request(),
        TIMEOUT,
    )
    .await
    .unwrap();
    assert_eq!(connections, 2, "one typed attempt, one in the 1.6 form");
    assert!(
        matches!(
            &answer,
            Err(lbs_protocol::control::CallError::Denied(
                lbs_protocol::control::Denial::Activation(why)
            )) if why.contains("1.6 form")
        ),
        "{answer:?}"
    );
    let mut sent = Vec::new();
    for dc in seen {
        sent.push(dc.await.unwrap());
    }
    assert!(matches!(sent[0], Message::Activate(_)));
    match &sent[1] {
        Message::ActivateJson(json) => assert_eq!(
            lbs_protocol::control::ActivationRequest::try_from(json.clone()).unwrap(),
            activation_request()
        ),
        other => panic!("expected the 1.6 form, got {}", other.kind()),
    }
}

fn a_grant() -> lbs_protocol::control::ActivationGrant {
    lbs_protocol::control::ActivationGrant {
        role: Role::Primary,
        generation: Generation(1),
        pair: "office".into(),
        fqdn: "pbx.example.net".into(),
        certificate: vec![1, 2, 3],
        ca_pem: String::new(),
        overlay: "100.64.0.2".parse().unwrap(),
        overlay_prefix: 24,
        partner: None,
        endpoints: Vec::new(),
        control: Vec::new(),
        chain: Vec::new(),
    }
}

/// A data center on one end of `io` that answers one activation with `reply`.
async fn data_center_answering(mut io: DuplexStream, reply: Message) {
    let mut header = [0u8; 4];
    io.read_exact(&mut header).await.unwrap();
    let mut payload = vec![0; u32::from_be_bytes(header) as usize];
    io.read_exact(&mut payload).await.unwrap();
    let mut wire = BytesMut::new();
    let envelope = Envelope {
        generation: Generation(0),
        message: reply,
    };
    frame::encode(&envelope, &mut wire, MAX_FRAME_LEN).unwrap();
    io.write_all(&wire).await.unwrap();
}

#[tokio::test]
async fn a_grant_with_its_site_ca_is_new_in_1_8_and_the_older_form_still_reads() {
    // After `Activate` (44): the 1.8 answer, so a 1.7 box never meets it by index.
    let with_chain = Message::ActivatedWithChain {
        grant: a_grant(),
        chain: vec![serde_bytes::ByteBuf::from(vec![9u8; 40])],
    };
    assert_eq!(variant_index(with_chain.clone()), 45);
    for (reply, want) in [
        (with_chain, vec![vec![9u8; 40]]),
        (Message::Activated(a_grant()), Vec::new()),
    ] {
        let (io, peer) = tokio::io::duplex(64 * 1024);
        let dc = tokio::spawn(data_center_answering(peer, reply));
        let mut io = Some(io);
        let grant = lbs_protocol::control::activate(
            || {
                let io = io.take().expect("one connection");
                async move { Ok::<_, std::convert::Infallible>(io) }
            },
            activation_request(),
            TIMEOUT,
        )
        .await
        .unwrap()
        .unwrap();
        dc.await.unwrap();
        assert_eq!(grant.chain, want);
        assert_eq!(grant.pair, "office");
    }
}

#[test]
fn a_detailed_report_is_new_in_1_9_and_its_bounds_are_checked() {
    use lbs_protocol::control::{
        MAX_DETAIL_SETS, MAX_DETAIL_STEPS, MAX_DETAIL_TEXT, ReportDetails, SetPhase, SetReport,
        StepReport, SyncSummary, detail_text,
    };
    let report = lbs_protocol::control::BoxReport {
        role: lbs_protocol::Role::Backup,
        software: lbs_protocol::SoftwareVersion::current(),
        advertised: "192.168.1.3".parse().unwrap(),
        sync: SyncSummary::default(),
        tunnels: Vec::new(),
    };
    let set = |name: &str| SetReport {
        name: name.into(),
        phase: SetPhase::Syncing,
        lag_ms: Some(1200),
        pending_files: 1,
        pending_bytes: 10,
        error: None,
    };
    let step = StepReport {
        at_ms: 1,
        step: "take-address".into(),
        took_ms: 3,
        error: None,
    };
    let details = ReportDetails {
        sets: vec![set("voicemail")],
        pbx: None,
        steps: vec![step.clone()],
    };
    // After `ResourceSamplesKept` (49): a 1.8 data center never meets it by index.
    let message = Message::DetailedReport {
        report,
        details: details.clone(),
    };
    assert_eq!(variant_index(message.clone()), 50);
    let wire = postcard::to_stdvec(&message).unwrap();
    assert_eq!(postcard::from_bytes::<Message>(&wire).unwrap(), message);
    assert_eq!(details.too_large(), None);
    let many_sets = ReportDetails {
        sets: vec![set("s"); MAX_DETAIL_SETS + 1],
        ..details.clone()
    };
    assert!(many_sets.too_large().unwrap().contains("65 sets"));
    let many_steps = ReportDetails {
        steps: vec![step; MAX_DETAIL_STEPS + 1],
        ..details.clone()
    };
    assert!(many_steps.too_large().is_some());
    let long = "x".repeat(MAX_DETAIL_TEXT + 1);
    let long_error = ReportDetails {
        sets: vec![SetReport {
            error: Some(long.clone()),
            ..set("voicemail")
        }],
        ..details
    };
    assert!(long_error.too_large().unwrap().contains("301 characters"));
    // The agent cuts its texts to fit.
    let cut = detail_text(&long);
    assert_eq!(cut.chars().count(), MAX_DETAIL_TEXT);
    assert!(cut.ends_with('…'));
    assert_eq!(detail_text("short"), "short");
}

#[test]
fn promote_if_quiet_comes_after_every_older_message_and_round_trips() {
    // After `DetailedReport` (50): a 1.9 data center never meets it by index.
    let message = Message::PromoteIfQuiet {
        advertised: std::net::Ipv4Addr::new(192, 168, 1, 2),
        how: lbs_protocol::control::PromotionKind::Automatic,
        quiet_ms: 2_000,
    };
    assert_eq!(variant_index(message.clone()), 51);
    let wire = postcard::to_stdvec(&message).unwrap();
    assert_eq!(postcard::from_bytes::<Message>(&wire).unwrap(), message);
}

#[test]
fn a_primary_alive_denial_comes_after_every_older_denial_and_round_trips() {
    use lbs_protocol::control::Denial;
    // After `Unavailable` (4): a 1.13 box never meets it, the data center sends it words.
    let denied = |denial| postcard::to_stdvec(&Message::Denied(denial)).unwrap();
    let old = denied(Denial::Unavailable("busy".into()));
    let message = Message::Denied(Denial::PrimaryAlive {
        silent_ms: 1_200,
        quiet_ms: 10_000,
    });
    let wire = postcard::to_stdvec(&message).unwrap();
    assert_eq!((old[0], old[1]), (variant_index(message.clone()), 4));
    assert_eq!(wire[1], 5);
    assert_eq!(postcard::from_bytes::<Message>(&wire).unwrap(), message);
    // What an operator reads.
    let Message::Denied(denial) = message else {
        unreachable!()
    };
    assert_eq!(
        denial.to_string(),
        "the primary reported 1.2 s ago: it is alive; a promotion that needs it silent for \
         10.0 s is refused"
    );
}
