//! The messages boxes and the data center exchange. Every message travels in an [`Envelope`]
//! carrying the sender's [`Generation`], so fencing never depends on a message type
//! remembering to include it.
//!
//! Compatibility rules (see [`crate::PROTOCOL_VERSION`]): variants and fields are only ever
//! appended; [`Envelope`] and [`Hello`] keep their leading fields forever, so a peer of any
//! version can read at least the protocol version out of a `Hello` and refuse clearly.

use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::control::{
    ActivationGrant, ActivationRequest, ActivationRequestJson, BoxReport, Denial, PairState,
    Promotion,
};
use crate::ids::{Generation, Role, ServerId};
use crate::path::RelPath;
use crate::sync::{BlockSum, DirDigest, ManifestEntry};
use crate::version::{ProtocolVersion, SoftwareVersion};

/// One frame's payload: the sender's generation and the message.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Envelope {
    /// The highest generation the sender knows of for its pair.
    pub generation: Generation,
    /// What the sender says.
    pub message: Message,
}

impl crate::frame::FromFrame for Envelope {
    /// A [`Message::SyncData`] of at least [`SHARED_DATA_MIN`] bytes keeps its bytes as a
    /// slice of the frame: on the receiver of a large file, copying each chunk out of the
    /// frame was a third of the connection thread's memory traffic. Anything else, or
    /// anything the quick look does not recognise, is decoded by postcard.
    fn from_frame(payload: bytes::Bytes) -> Result<Self, crate::frame::FrameError> {
        if payload.len() >= SHARED_DATA_MIN
            && let Some(envelope) = sync_data_in(&payload)
        {
            return Ok(envelope);
        }
        crate::frame::decode_payload(&payload)
    }
}

/// Smaller [`Message::SyncData`] frames are copied out of the read buffer: a slice of a small
/// one would keep the whole buffer it shares with other frames alive for as long as it waits.
pub const SHARED_DATA_MIN: usize = 64 * 1024;

/// The variant index of [`Message::SyncData`] as postcard writes it (an empty chunk is the
/// index and a zero length).
fn sync_data_tag() -> &'static [u8] {
    static TAG: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    TAG.get_or_init(|| {
        let mut empty = postcard::to_stdvec(&Message::SyncData {
            bytes: bytes::Bytes::new(),
        })
        .unwrap_or_default();
        empty.pop();
        empty
    })
}

/// The envelope in `payload` if it is a [`Message::SyncData`] in postcard's canonical form:
/// its generation, the variant's index and the length as varints, then exactly that many
/// bytes.
fn sync_data_in(payload: &bytes::Bytes) -> Option<Envelope> {
    let tag = sync_data_tag();
    let (generation, mut at) = canonical_varint(payload)?;
    let rest = payload.get(at..)?;
    if tag.is_empty() || !rest.starts_with(tag) {
        return None;
    }
    at += tag.len();
    let (len, used) = canonical_varint(payload.get(at..)?)?;
    at += used;
    (usize::try_from(len).ok()? == payload.len() - at).then(|| Envelope {
        generation: Generation(generation),
        message: Message::SyncData {
            bytes: payload.slice(at..),
        },
    })
}

/// The start of the frame of a [`Message::SyncData`] envelope carrying `len` bytes, up to
/// those bytes: the frame's length prefix, then the generation, the variant's index and the
/// length as postcard writes them. The head and the bytes written one after the other are the
/// frame [`crate::frame::encode`] makes, without copying the bytes into it. `None` when the
/// frame would exceed [`crate::MAX_FRAME_LEN`].
pub fn sync_data_head(generation: Generation, len: usize) -> Option<Vec<u8>> {
    let mut head = vec![0u8; crate::frame::HEADER_LEN];
    push_varint(&mut head, generation.0);
    head.extend_from_slice(sync_data_tag());
    push_varint(&mut head, len as u64);
    let payload = head.len() - crate::frame::HEADER_LEN + len;
    if payload > crate::MAX_FRAME_LEN {
        return None;
    }
    let prefix = u32::try_from(payload).ok()?.to_be_bytes();
    head[..crate::frame::HEADER_LEN].copy_from_slice(&prefix);
    Some(head)
}

/// Appends `value` as postcard writes a `u64` (LEB128).
fn push_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A `u64` varint as postcard writes it (LEB128, no redundant trailing byte) at the start of
/// `bytes`, and the bytes it took.
fn canonical_varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, byte) in bytes.iter().take(10).enumerate() {
        let bits = u64::from(byte & 0x7f);
        if i == 9 && *byte > 1 {
            return None;
        }
        value |= bits << (7 * i);
        if byte & 0x80 == 0 {
            // A last byte of zero after others is redundant: not postcard's own writing.
            return (i == 0 || *byte != 0).then_some((value, i + 1));
        }
    }
    None
}

/// Everything that can be said on an lbs connection.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Message {
    /// The first message each way on every connection. Must stay variant 0.
    Hello(Hello),
    /// The sender will not go on with this connection, and says why; it closes next.
    Refused(Refusal),
    /// A liveness probe: the peer answers with [`Message::HeartbeatAck`] carrying the same
    /// `seq`, so the sender measures the round trip through every layer it cares about.
    Heartbeat {
        /// Chosen by the sender; echoed back.
        seq: u64,
        /// The sender's role when it sent this.
        role: Role,
    },
    /// The answer to a [`Message::Heartbeat`].
    HeartbeatAck {
        /// The `seq` of the heartbeat being answered.
        seq: u64,
        /// The answering side's role.
        role: Role,
    },
    /// An orderly close: the sender is shutting down or done, not failing.
    Goodbye {
        /// Shown to the operator on the other side ("agent stopping for upgrade").
        reason: String,
    },
    /// Receiver → sender: scan your tree and send its manifest.
    SyncManifestRequest,
    /// Sender → receiver: a part of the manifest, in path order; `last` closes it.
    SyncManifest {
        /// The entries of this part (bounded so the frame stays under the limit).
        entries: Vec<ManifestEntry>,
        /// Whether this is the final part.
        last: bool,
    },
    /// Receiver → sender: send this file's content.
    SyncFetch { path: RelPath },
    /// Sender → receiver: the next bytes of the file being sent (at most
    /// [`SYNC_CHUNK_LEN`] each). On the wire as a byte string, as `serde_bytes` wrote it;
    /// [`crate::frame::FrameCodec`] hands a large one over as a slice of the frame it read,
    /// not a copy.
    SyncData { bytes: bytes::Bytes },
    /// Sender → receiver: the file is complete at `size` bytes.
    SyncDataEnd {
        /// How many bytes were sent.
        size: u64,
        /// Their BLAKE3 hash; after a block transfer, and from protocol 1.6 after a whole file
        /// too, the hash the sender's index holds for the version it listed (the receiver
        /// verifies what it wrote against the manifest's hash either way).
        blake3: [u8; 32],
    },
    /// Receiver → sender: send this file's changes against the version the receiver holds,
    /// whose per-block BLAKE3 chaining values follow in parts (`last` closes them).
    SyncFetchChanges {
        path: RelPath,
        /// The block size of the values.
        block_size: u32,
        /// The receiver's block summaries of this part, in order.
        blocks: Vec<BlockSum>,
        /// Whether this is the final part.
        last: bool,
    },
    /// Sender → receiver: bytes of the file at an offset, in increasing offset order; the
    /// receiver keeps its own bytes between them.
    SyncDataAt {
        /// Where the bytes go.
        offset: u64,
        /// The bytes (at most [`SYNC_CHUNK_LEN`]).
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// Sender → receiver: the request could not be served (the file vanished, say); the
    /// receiver leaves that path for the next pass.
    SyncUnavailable {
        path: RelPath,
        /// Why, for the operator.
        reason: String,
    },
    /// Sender → receiver, before the [`Message::SyncDataAt`] of a block transfer: how many
    /// bytes of changed blocks follow and the file's new size, so the receiver can choose to
    /// patch its file in place (few changes) or write a new one (many).
    SyncChanges {
        /// Bytes of changed blocks that follow.
        changed: u64,
        /// The file's size once changed.
        size: u64,
    },
    /// Receiver → sender: scan your tree and send its manifest, leaving out the directories
    /// whose listing has one of these digests (the receiver's own, in parts; `last` closes
    /// them). See [`crate::sync::listing_digests`].
    SyncManifestDigests {
        /// The receiver's directories and their listing digests.
        dirs: Vec<DirDigest>,
        /// Whether this is the final part.
        last: bool,
    },
    /// Sender → receiver, before the [`Message::SyncManifest`] parts: the directories whose
    /// listing matched the receiver's digest; their entries are not sent.
    SyncManifestSame {
        /// The matching directories (`None`: the root).
        dirs: Vec<Option<RelPath>>,
        /// Whether this is the final part.
        last: bool,
    },
    /// Receiver → sender: send this file as an rsync-style delta against the version the
    /// receiver holds, whose fast_rsync (librsync) signature this is. For content that shifted
    /// (lines inserted in a config file); the sender answers with [`Message::SyncDelta`]
    /// parts, or with the whole file, then [`Message::SyncDataEnd`].
    SyncFetchDelta {
        path: RelPath,
        /// The receiver's signature of its version (at most a few hundred KiB).
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
    },
    /// Sender → receiver: the next part of a delta (at most [`SYNC_CHUNK_LEN`]).
    SyncDelta {
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// Box → data center, on an activation connection (protocols 1.0–1.6, and a 1.7 box to
    /// a data center that could not read [`Message::Activate`]): activate me.
    ActivateJson(ActivationRequestJson),
    /// Data center → box: activated, with the box's role, certificate and pair.
    Activated(ActivationGrant),
    /// Box → data center: the box's periodic report; answered with [`Message::PairState`].
    Report(BoxReport),
    /// Data center → box: the role the box must have now and its pair.
    PairState(PairState),
    /// Backup → data center: make me primary, advertising this address. The envelope's
    /// generation is the one the box saw: the promotion happens only if it is still current.
    Promote {
        /// Where the pair's name should point from now on.
        advertised: Ipv4Addr,
    },
    /// Data center → box: promoted.
    Promoted(Promotion),
    /// Fenced box → data center: I am the pair's backup now (after **B**).
    RegisterBackup,
    /// Data center → box: the request was refused; the connection stays open.
    Denied(Denial),
    /// Backup → primary, first after the hello on a sync connection: which sync set this
    /// connection is about (the session that follows is the one of `lbs sync`).
    SyncSet {
        /// The set's name (`config`, `voicemail`, …).
        name: String,
    },
    /// Backup → primary, first after the hello: keep this connection open and tell me when
    /// sets change.
    SyncWatch,
    /// Primary → backup on a watch connection: these sets changed (or, with `overflow`, the
    /// watch lost events: reconcile everything).
    SyncChanged {
        sets: Vec<String>,
        /// The kernel dropped events; only a full reconcile is safe.
        overflow: bool,
    },
    /// Data center → backup, answering its report (protocol 1.2, never to an older box): the
    /// pair's state, and a promotion the provider asked for.
    PromotionRequested {
        /// What a `PairState` answer would have said.
        state: crate::control::PairState,
        request: crate::control::RemotePromotion,
    },
    /// Data center → box, answering its report (protocol 1.2, never to an older box): the
    /// pair's state and its DNS names.
    PairStateWithDns {
        /// What a `PairState` answer would have said.
        state: crate::control::PairState,
        /// The pair's names and whether the DNS server has them.
        dns: Vec<crate::control::DnsRecordState>,
    },
    /// Box → data center (protocol 1.2): the requested promotion cannot go ahead, and why;
    /// answered with a `PairState`.
    PromotionRefused {
        /// The request's number.
        id: u64,
        /// Why, as the checks of **P** said it.
        reason: String,
    },
    /// Data-center site → the main site's control API (protocol 1.3): which boxes may use
    /// the tunnel endpoints; answered with [`Message::TunnelPeers`].
    TunnelPeersRequest,
    /// Main site → data-center site: every activated box's key and overlay address.
    TunnelPeers {
        /// The peers, ordered by key.
        peers: Vec<crate::control::TunnelPeer>,
    },
    /// Box → data center (protocol 1.4, else [`Message::Promote`]): make me primary at the
    /// next generation, and how the promotion came about (for the audit log).
    PromoteAs {
        /// The address the new primary serves on.
        advertised: std::net::Ipv4Addr,
        /// Who or what asked.
        how: crate::control::PromotionKind,
    },
    /// Primary → data center (protocol 1.4): its PBX stays down after every restart; hand
    /// the role to the backup (the data center refuses when the backup is not in sync, not
    /// heard, or a hand-over was made lately). Answered with a `PairState`.
    HandOver {
        /// What the PBX check said.
        reason: String,
    },
    /// Data center → backup, answering its report (protocol 1.4, never to an older box): the
    /// primary asked to hand over; the backup promotes itself if it is in sync.
    HandOverRequested {
        /// What a `PairState` answer would have said.
        state: crate::control::PairState,
        /// The request (refused with [`Message::PromotionRefused`] like the provider's).
        request: crate::control::RemotePromotion,
        /// Why the primary asked.
        reason: String,
    },
    /// Data-center site → the main site (protocol 1.5, else [`Message::TunnelPeersRequest`]):
    /// the boxes that may use the tunnels, pair by pair; answered with
    /// [`Message::TunnelPairs`].
    TunnelPairsRequest,
    /// Main site → data-center site: every activated box's key and overlay address, grouped
    /// by pair (an endpoint forwards a box's packets only to its partner).
    TunnelPairs {
        /// The pairs, each its boxes ordered by key.
        pairs: Vec<Vec<crate::control::TunnelPeer>>,
    },
    /// Box → data center (protocol 1.5): the partner's current TLS key, so this box accepts
    /// only that one (a box activated again has a new key; its old certificate must no
    /// longer reach the partner's files). Answered with [`Message::PartnerKey`].
    PartnerKeyRequest,
    /// Data center → box: the partner and the fingerprint of the key its latest activation
    /// certified (`tls::key_fingerprint`); `None` while it has none.
    PartnerKey {
        /// The partner.
        partner: Option<crate::ServerId>,
        /// Its key's fingerprint.
        key: Option<String>,
    },
    /// Primary → backup, after the last part of its manifest (protocol 1.6, never to an older
    /// receiver): what its scan left out and why (FIFOs, sockets, devices, unreadable files),
    /// at most [`crate::sync::MAX_SKIPPED_SENT`] of them; `more` counts the rest.
    SyncSkipped {
        entries: Vec<crate::sync::SkippedEntry>,
        more: u64,
    },
    /// Sender → receiver, inside a whole-file transfer (protocol 1.6, never to an older
    /// receiver): the next `len` bytes are a hole (zeros the sender's file system does not
    /// store); the receiver leaves them unwritten, so a sparse file stays sparse.
    SyncHole { len: u64 },
    /// Primary → backup, after [`Message::SyncSkipped`] (protocol 1.6, never to an older
    /// receiver): the files of the manifest that are hard links of each other, a group per
    /// inode (two paths at least each), in parts (`last` closes them).
    SyncLinks {
        groups: Vec<Vec<RelPath>>,
        last: bool,
    },
    /// Box → data center, on an activation connection (protocol 1.7): activate me, the
    /// hardware inventory typed.
    Activate(ActivationRequest),
    /// Data center → box, the answer to an activation from a box of protocol 1.8 or later:
    /// the grant, and the certificates between the box's and the root (the CA of the site
    /// that signed it), which the box presents after its own.
    ActivatedWithChain {
        grant: ActivationGrant,
        chain: Vec<serde_bytes::ByteBuf>,
    },
    /// Box → data center (protocol 1.8): the root's revocation list of sites' CAs, please.
    RevocationListRequest,
    /// Data center → box: the list in force (DER, signed by the root), if one was issued.
    /// The box refuses data centers and partners whose certificate a revoked CA signed.
    RevocationList {
        #[serde(with = "serde_bytes")]
        crl: Option<Vec<u8>>,
    },
    /// Box → data center (protocol 1.8): resource samples for the portal's history, oldest
    /// first, at most [`crate::control::MAX_SAMPLES`].
    ResourceSamples {
        samples: Vec<crate::control::ResourceSample>,
    },
    /// Data center → box: the samples are kept, up to this time (the box sends what is newer
    /// next time).
    ResourceSamplesKept { upto_ms: u64 },
    /// Box → data center (protocol 1.9): a report with what the portal shows of the box
    /// beside it (each set's state and lag, the PBX check, the last role steps); answered
    /// as [`Message::Report`] is.
    DetailedReport {
        report: BoxReport,
        details: crate::control::ReportDetails,
    },
    /// Box → data center (protocol 1.10, else [`Message::PromoteAs`]): as `PromoteAs`, but only
    /// if the data center has not heard the pair's primary for `quiet_ms` either — the backup
    /// decided on a silence that may have ended while it asked (the primary's cable back, its
    /// box booted). Refused with [`crate::control::Denial::NotAllowed`] when it has.
    PromoteIfQuiet {
        /// The address the new primary serves on.
        advertised: std::net::Ipv4Addr,
        /// Who or what asked.
        how: crate::control::PromotionKind,
        /// How long the primary must have been silent, milliseconds.
        quiet_ms: u64,
    },
    /// Sender → receiver, in a whole-file transfer (protocol 1.11, never to an older
    /// receiver): the next `len` bytes of the file (at most [`SYNC_CHUNK_LEN`]) as one zstd
    /// frame. Sent instead of [`Message::SyncData`] only where it is smaller; the receiver
    /// unpacks into at most `len` bytes and refuses a frame that gives any other length.
    SyncDataPacked {
        len: u32,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// Sender → receiver, while its scan makes the manifest (protocol 1.12, never to an older
    /// receiver): still scanning, every [`SYNC_SCANNING_EVERY`]. A first scan may hash for
    /// minutes; this lets the receiver tell that from a sender that stopped.
    SyncScanning,
    /// Receiver → sender, while it works on its own side between requests — its scan, its
    /// plan, the end of its writing (protocol 1.13, never to an older sender): still at work,
    /// every [`SYNC_SCANNING_EVERY`]. Lets the sender tell that from a receiver that stopped.
    SyncWorking,
}

/// How often a sender says [`Message::SyncScanning`] while its scan runs (and a receiver
/// [`Message::SyncWorking`]).
pub const SYNC_SCANNING_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// The largest `SyncData` payload: big enough to keep a link busy, small enough that a frame
/// never nears [`crate::MAX_FRAME_LEN`] and memory stays bounded.
pub const SYNC_CHUNK_LEN: usize = 256 * 1024;

impl Message {
    /// A short name for logs and errors ("hello", "heartbeat").
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Refused(_) => "refused",
            Message::Heartbeat { .. } => "heartbeat",
            Message::HeartbeatAck { .. } => "heartbeat-ack",
            Message::Goodbye { .. } => "goodbye",
            Message::SyncManifestRequest => "sync-manifest-request",
            Message::SyncManifest { .. } => "sync-manifest",
            Message::SyncFetch { .. } => "sync-fetch",
            Message::SyncData { .. } => "sync-data",
            Message::SyncDataEnd { .. } => "sync-data-end",
            Message::SyncUnavailable { .. } => "sync-unavailable",
            Message::SyncFetchChanges { .. } => "sync-fetch-changes",
            Message::SyncDataAt { .. } => "sync-data-at",
            Message::SyncChanges { .. } => "sync-changes",
            Message::SyncManifestDigests { .. } => "sync-manifest-digests",
            Message::SyncManifestSame { .. } => "sync-manifest-same",
            Message::SyncFetchDelta { .. } => "sync-fetch-delta",
            Message::SyncDelta { .. } => "sync-delta",
            Message::ActivateJson(_) => "activate-json",
            Message::Activate(_) => "activate",
            Message::Activated(_) => "activated",
            Message::Report(_) => "report",
            Message::PairState(_) => "pair-state",
            Message::Promote { .. } => "promote",
            Message::Promoted(_) => "promoted",
            Message::RegisterBackup => "register-backup",
            Message::Denied(_) => "denied",
            Message::SyncSet { .. } => "sync-set",
            Message::SyncWatch => "sync-watch",
            Message::SyncChanged { .. } => "sync-changed",
            Message::PromotionRequested { .. } => "promotion-requested",
            Message::PromotionRefused { .. } => "promotion-refused",
            Message::PairStateWithDns { .. } => "pair-state-with-dns",
            Message::TunnelPeersRequest => "tunnel-peers-request",
            Message::TunnelPeers { .. } => "tunnel-peers",
            Message::PromoteAs { .. } => "promote-as",
            Message::PromoteIfQuiet { .. } => "promote-if-quiet",
            Message::SyncDataPacked { .. } => "sync-data-packed",
            Message::SyncScanning => "sync-scanning",
            Message::SyncWorking => "sync-working",
            Message::HandOver { .. } => "hand-over",
            Message::HandOverRequested { .. } => "hand-over-requested",
            Message::TunnelPairsRequest => "tunnel-pairs-request",
            Message::TunnelPairs { .. } => "tunnel-pairs",
            Message::PartnerKeyRequest => "partner-key-request",
            Message::PartnerKey { .. } => "partner-key",
            Message::SyncSkipped { .. } => "sync-skipped",
            Message::SyncHole { .. } => "sync-hole",
            Message::SyncLinks { .. } => "sync-links",
            Message::ActivatedWithChain { .. } => "activated",
            Message::RevocationListRequest => "revocation-list-request",
            Message::RevocationList { .. } => "revocation-list",
            Message::ResourceSamples { .. } => "resource-samples",
            Message::ResourceSamplesKept { .. } => "resource-samples-kept",
            Message::DetailedReport { .. } => "detailed-report",
        }
    }
}

/// Who is speaking, what it runs and which protocol it speaks.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Hello {
    /// Must stay the first field: peers read it even when they cannot read the rest.
    pub protocol: ProtocolVersion,
    /// The sender's lbs release.
    pub software: SoftwareVersion,
    /// The sender's identity; it must match the name in its TLS certificate.
    pub sender: Sender,
}

/// The identity a [`Hello`] claims.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Sender {
    /// A PBX box.
    Box {
        /// Its server ID.
        sid: ServerId,
        /// Its role as it believes it.
        role: Role,
    },
    /// A data-center endpoint.
    DataCenter {
        /// Which site ("dc1"), so a box can tell its two tunnels' ends apart in status.
        site: String,
    },
}

impl fmt::Display for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sender::Box { sid, role } => write!(f, "box {sid} ({role})"),
            Sender::DataCenter { site } => write!(f, "data center {site:?}"),
        }
    }
}

/// Why a peer refused a connection.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Refusal {
    /// The two sides speak different major protocol versions.
    IncompatibleProtocol {
        /// The refusing side's version.
        ours: ProtocolVersion,
        /// The version the refusing side received.
        yours: ProtocolVersion,
    },
    /// The `Hello` claimed an identity other than the one in the TLS certificate.
    IdentityMismatch {
        /// The identity the certificate proves.
        certificate: String,
        /// The identity the `Hello` claimed.
        hello: String,
    },
    /// The first message was not a `Hello`, or a message could not be read.
    ProtocolViolation {
        /// What was wrong.
        detail: String,
    },
}

impl fmt::Display for Refusal {
    /// Written from the refusing side's point of view, for the refused side's operator.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::IncompatibleProtocol { ours, yours } => write!(
                f,
                "it speaks protocol {ours} and cannot talk to protocol {yours}; \
                 update the older side so both run the same major version"
            ),
            Refusal::IdentityMismatch { certificate, hello } => write!(
                f,
                "the certificate names {certificate} but the hello claimed {hello}"
            ),
            Refusal::ProtocolViolation { detail } => write!(f, "protocol violation: {detail}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{FromFrame, decode_payload};
    use proptest::prelude::*;

    fn payload(generation: u64, bytes: Vec<u8>) -> bytes::Bytes {
        let envelope = Envelope {
            generation: Generation(generation),
            message: Message::SyncData {
                bytes: bytes.into(),
            },
        };
        postcard::to_stdvec(&envelope).unwrap().into()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn a_large_data_frame_is_shared_and_decodes_as_postcard_does(
            generation in any::<u64>(),
            len in prop_oneof![0usize..300, SHARED_DATA_MIN - 2..SHARED_DATA_MIN + 300],
            seed in any::<u8>(),
        ) {
            let bytes: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed)).collect();
            let payload = payload(generation, bytes);
            let quick = Envelope::from_frame(payload.clone()).unwrap();
            prop_assert_eq!(&quick, &decode_payload::<Envelope>(&payload).unwrap());
            if payload.len() >= SHARED_DATA_MIN {
                let Message::SyncData { bytes } = &quick.message else { unreachable!() };
                let end = payload.as_ptr_range().end;
                prop_assert_eq!(bytes.as_ptr_range().end, end, "a slice of the frame");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn a_data_frame_head_then_its_bytes_is_the_encoded_frame(
            generation in prop_oneof![0u64..300, any::<u64>()],
            len in prop_oneof![0usize..300, 16_000usize..17_000, SYNC_CHUNK_LEN..SYNC_CHUNK_LEN + 1],
        ) {
            let bytes = bytes::Bytes::from(vec![0xa5; len]);
            let envelope = Envelope {
                generation: Generation(generation),
                message: Message::SyncData { bytes: bytes.clone() },
            };
            let mut encoded = bytes::BytesMut::new();
            crate::frame::encode(&envelope, &mut encoded, crate::MAX_FRAME_LEN).unwrap();
            let mut written = sync_data_head(Generation(generation), len).unwrap();
            written.extend_from_slice(&bytes);
            prop_assert_eq!(&written[..], &encoded[..]);
        }
    }

    #[test]
    fn a_data_frame_head_beyond_the_frame_limit_is_refused() {
        assert!(sync_data_head(Generation(1), crate::MAX_FRAME_LEN).is_none());
        let most = crate::MAX_FRAME_LEN - 1 - sync_data_tag().len() - 3;
        assert!(sync_data_head(Generation(1), most).is_some());
        assert!(sync_data_head(Generation(1), most + 1).is_none());
    }

    #[test]
    fn anything_but_postcards_own_data_frame_is_left_to_postcard() {
        let good = payload(300, vec![5; SHARED_DATA_MIN]);
        assert!(sync_data_in(&good).is_some());
        // A byte too many or too few: postcard's error, not a quietly cut chunk.
        let mut longer = good.to_vec();
        longer.push(0);
        assert!(sync_data_in(&longer.clone().into()).is_none());
        assert!(Envelope::from_frame(longer.into()).is_err());
        let shorter = good.slice(..good.len() - 1);
        assert!(sync_data_in(&shorter).is_none());
        assert!(Envelope::from_frame(shorter).is_err());
        // A generation written with a redundant byte is not postcard's writing.
        let mut padded = vec![0x80 | good[0], good[1] | 0x80, 0x00];
        padded.extend_from_slice(&good[2..]);
        assert!(sync_data_in(&padded.into()).is_none());
        // Another message of the same size is decoded by postcard.
        let other = Envelope {
            generation: Generation(1),
            message: Message::SyncDelta {
                bytes: vec![1; SHARED_DATA_MIN],
            },
        };
        let other_payload: bytes::Bytes = postcard::to_stdvec(&other).unwrap().into();
        assert!(sync_data_in(&other_payload).is_none());
        assert_eq!(Envelope::from_frame(other_payload).unwrap(), other);
        assert_eq!(canonical_varint(&[0xff; 10]), None, "beyond 64 bits");
        assert_eq!(canonical_varint(&[0x80, 0x01]), Some((128, 2)));
    }
}
