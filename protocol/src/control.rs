//! What boxes and the data center say to each other: activation (a box without a certificate
//! yet, over server-authenticated TLS) and the control API (mutual TLS): reports answered by
//! the pair's state, promotion, registration as backup.
//!
//! The generation a box believes in travels in every [`crate::Envelope`]; the data center
//! compares it with the pair's and answers a stale primary that it is fenced.

use std::net::{Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::ids::{Generation, Role, ServerId};
use crate::inventory::Inventory;
use crate::version::{ProtocolVersion, SoftwareVersion};

/// The largest activation request the data center reads: a CSR, two keys and an inventory.
pub const MAX_ACTIVATION_LEN: usize = 64 * 1024;

/// The largest control message either side sends.
pub const MAX_CONTROL_LEN: usize = 64 * 1024;

/// A box asks to be activated. `I` is how its hardware inventory travels: typed
/// ([`ActivationRequest`], protocol 1.7) or as JSON text ([`ActivationRequestJson`], 1.0–1.6);
/// the other fields are the same in both, in the same order on the wire.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivationForm<I> {
    /// The protocol the box speaks (activation has no `Hello`: this is its version check).
    pub protocol: ProtocolVersion,
    /// The box's release.
    pub software: SoftwareVersion,
    /// The SID from the provisioning sheet.
    pub sid: ServerId,
    /// The one-time activation key from the sheet.
    pub key: String,
    /// A PKCS #10 signing request (DER) for the box's TLS key.
    #[serde(with = "serde_bytes")]
    pub csr: Vec<u8>,
    /// The box's WireGuard public key (base64).
    pub wireguard_key: String,
    /// The box's address on the office LAN.
    pub lan_address: Ipv4Addr,
    /// The box's hardware inventory.
    pub inventory: I,
}

/// The activation request of protocol 1.7 ([`crate::Message::Activate`]).
pub type ActivationRequest = ActivationForm<Inventory>;

/// The activation request of protocols 1.0–1.6 ([`crate::Message::ActivateJson`]): the
/// inventory as `lbs net inventory --json` prints it. A 1.7 data center still reads it; a
/// 1.7 box sends it only to a data center that could not read [`ActivationRequest`].
pub type ActivationRequestJson = ActivationForm<String>;

impl<I> ActivationForm<I> {
    /// The same request with its inventory in another form.
    fn map_inventory<J>(self, convert: impl FnOnce(I) -> J) -> ActivationForm<J> {
        ActivationForm {
            inventory: convert(self.inventory),
            protocol: self.protocol,
            software: self.software,
            sid: self.sid,
            key: self.key,
            csr: self.csr,
            wireguard_key: self.wireguard_key,
            lan_address: self.lan_address,
        }
    }
}

impl From<ActivationRequest> for ActivationRequestJson {
    fn from(request: ActivationRequest) -> Self {
        // An inventory is strings and numbers: JSON always has a text for it.
        request.map_inventory(|inventory| serde_json::to_string(&inventory).unwrap_or_default())
    }
}

impl TryFrom<ActivationRequestJson> for ActivationRequest {
    type Error = serde_json::Error;

    /// Fails when the text is not an inventory `lbs net inventory --json` wrote.
    fn try_from(request: ActivationRequestJson) -> Result<Self, Self::Error> {
        let inventory: Inventory = serde_json::from_str(&request.inventory)?;
        Ok(request.map_inventory(|_| inventory))
    }
}

impl<I: std::fmt::Debug> std::fmt::Debug for ActivationForm<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the one-time key: requests end up in logs.
        f.debug_struct("ActivationRequest")
            .field("protocol", &self.protocol)
            .field("software", &self.software)
            .field("sid", &self.sid)
            .field("key", &"…")
            .field("csr", &format_args!("<{} bytes>", self.csr.len()))
            .field("wireguard_key", &self.wireguard_key)
            .field("lan_address", &self.lan_address)
            .field("inventory", &self.inventory)
            .finish()
    }
}

/// The data center's answer to a successful activation.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ActivationGrant {
    /// The role the box has now: primary for the pair's first box, backup for the second.
    pub role: Role,
    /// The pair's generation.
    pub generation: Generation,
    /// The pair's name.
    pub pair: String,
    /// The name phones and trunks use.
    pub fqdn: String,
    /// The box's certificate (DER), naming its SID.
    #[serde(with = "serde_bytes")]
    pub certificate: Vec<u8>,
    /// The data center's CA (PEM): the only issuer the box trusts from now on.
    pub ca_pem: String,
    /// The box's overlay address.
    pub overlay: Ipv4Addr,
    /// The overlay network's prefix length.
    pub overlay_prefix: u8,
    /// The partner, once provisioned.
    pub partner: Option<PartnerInfo>,
    /// The data center's tunnel endpoints.
    pub endpoints: Vec<TunnelEndpoint>,
    /// Where the box sends its reports (the control API).
    pub control: Vec<SocketAddr>,
    /// The certificates between the box's and the root (DER; the signing site's CA), which
    /// the box presents after its own. Travels in [`crate::Message::ActivatedWithChain`]
    /// (protocol 1.8); empty when the root signed the box itself.
    #[serde(skip)]
    pub chain: Vec<Vec<u8>>,
}

/// One resource sample of a box, as its agent took it (protocol 1.8, in
/// [`crate::Message::ResourceSamples`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceSample {
    /// When, ms since the epoch.
    pub at_ms: u64,
    /// CPU busy since the sample before, per mille of all cores (0–1000).
    pub cpu_permille: Option<u16>,
    /// Memory in use and in total, bytes.
    pub memory_used: u64,
    pub memory_total: u64,
    /// The state directory's file system, used and in total, bytes.
    pub disk_used: u64,
    pub disk_total: u64,
    /// Bytes per second received and sent on all interfaces but loopback.
    pub rx_per_s: Option<u64>,
    pub tx_per_s: Option<u64>,
}

/// At most this many samples travel in one message (an hour at the agent's 10 s).
pub const MAX_SAMPLES: usize = 360;

/// The first protocol whose boxes are sent promotion requests by the data center.
pub const PROMOTION_REQUESTS: crate::ProtocolVersion =
    crate::ProtocolVersion { major: 1, minor: 2 };

/// The first protocol that knows pairs: a site asks for the tunnels' boxes pair by pair
/// ([`crate::Message::TunnelPairsRequest`]) and a box for its partner's current key
/// ([`crate::Message::PartnerKeyRequest`]).
pub const PAIRS: crate::ProtocolVersion = crate::ProtocolVersion { major: 1, minor: 5 };

/// The first protocol that knows hand-overs ([`crate::Message::HandOver`]) and how a promotion
/// came about ([`crate::Message::PromoteAs`]).
pub const HAND_OVERS: crate::ProtocolVersion = crate::ProtocolVersion { major: 1, minor: 4 };

/// The first protocol that knows [`crate::Message::PromoteIfQuiet`].
pub const QUIET_PROMOTION: crate::ProtocolVersion = crate::ProtocolVersion {
    major: 1,
    minor: 10,
};

/// The first protocol told a refused promotion's reason [`Denial::PrimaryAlive`] as such
/// (older boxes get its words in [`Denial::NotAllowed`]).
pub const ALIVE_DENIALS: crate::ProtocolVersion = crate::ProtocolVersion {
    major: 1,
    minor: 14,
};

/// The first protocol whose reports carry [`ReportDetails`].
pub const DETAILED_REPORTS: crate::ProtocolVersion = crate::ProtocolVersion { major: 1, minor: 9 };

/// What a box tells beside its report for the portal (protocol 1.9, in
/// [`crate::Message::DetailedReport`]). Bounded: at most [`MAX_DETAIL_SETS`] sets,
/// [`MAX_DETAIL_STEPS`] steps, texts of [`MAX_DETAIL_TEXT`] characters; the data center
/// refuses more.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportDetails {
    pub sets: Vec<SetReport>,
    /// The PBX health check, when one is configured and this box runs the PBX.
    pub pbx: Option<PbxReport>,
    /// The latest role steps, oldest first.
    pub steps: Vec<StepReport>,
}

pub const MAX_DETAIL_SETS: usize = 64;
pub const MAX_DETAIL_STEPS: usize = 8;
pub const MAX_DETAIL_TEXT: usize = 300;

impl ReportDetails {
    /// Why these details are more than a data center reads, if they are.
    pub fn too_large(&self) -> Option<String> {
        let texts = self
            .sets
            .iter()
            .flat_map(|s| [Some(&s.name), s.error.as_ref()])
            .chain(
                self.steps
                    .iter()
                    .flat_map(|s| [Some(&s.step), s.error.as_ref()]),
            )
            .chain(self.pbx.iter().map(|p| p.last_failure.as_ref()))
            .flatten();
        if self.sets.len() > MAX_DETAIL_SETS {
            Some(format!(
                "{} sets (at most {MAX_DETAIL_SETS})",
                self.sets.len()
            ))
        } else if self.steps.len() > MAX_DETAIL_STEPS {
            Some(format!(
                "{} steps (at most {MAX_DETAIL_STEPS})",
                self.steps.len()
            ))
        } else {
            let mut texts = texts;
            texts
                .find(|t| t.chars().count() > MAX_DETAIL_TEXT)
                .map(|long| {
                    format!(
                        "a text of {} characters (at most {MAX_DETAIL_TEXT})",
                        long.chars().count()
                    )
                })
        }
    }
}

/// Cuts `text` to [`MAX_DETAIL_TEXT`] characters (an ellipsis says it was).
pub fn detail_text(text: &str) -> String {
    if text.chars().count() <= MAX_DETAIL_TEXT {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(MAX_DETAIL_TEXT - 1).collect();
    cut.push('…');
    cut
}

/// One sync set as the box reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetReport {
    pub name: String,
    pub phase: SetPhase,
    /// How long the oldest change not yet copied has waited (ms; 0 when in sync; `None` when
    /// not known, or on the primary).
    pub lag_ms: Option<u64>,
    /// Files and bytes not copied yet.
    pub pending_files: u64,
    pub pending_bytes: u64,
    /// What went wrong last, until a pass succeeds.
    pub error: Option<String>,
}

/// Where a set's replication stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SetPhase {
    InSync,
    Syncing,
    /// Waiting for the partner.
    Waiting,
    /// A change is due.
    Changed,
    /// The last pass failed.
    Error,
    /// This box is the source.
    Serving,
    /// Stopped for a role change.
    Stopped,
}

impl std::fmt::Display for SetPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SetPhase::InSync => "in sync",
            SetPhase::Syncing => "syncing",
            SetPhase::Waiting => "waiting",
            SetPhase::Changed => "changed",
            SetPhase::Error => "error",
            SetPhase::Serving => "serving",
            SetPhase::Stopped => "stopped",
        })
    }
}

/// The PBX health check's last word (also `lbs status`'s).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PbxReport {
    /// When it last ran (ms since the epoch).
    pub checked_ms: u64,
    pub ok: bool,
    /// Failed checks in a row, and restarts tried since it was last healthy.
    pub failures: u32,
    pub restarts: u32,
    /// Declared down: unhealthy after every restart.
    pub down: bool,
    /// What the last failed check said (its output's last line, or why it did not run).
    pub last_failure: Option<String>,
}

/// A role step the box carried out (take the address, start the PBX, …).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepReport {
    /// When it ended (ms since the epoch).
    pub at_ms: u64,
    /// Its name (`ask-promotion`, `take-address`, `start-pbx`, `stop-pbx`,
    /// `give-up-address`, `register-backup`).
    pub step: String,
    pub took_ms: u64,
    /// Why it failed; `None`: it succeeded.
    pub error: Option<String>,
}

/// The first protocol whose grant carries the signing site's CA.
pub const CHAIN_IN_GRANT: crate::ProtocolVersion = crate::ProtocolVersion { major: 1, minor: 8 };

impl ActivationGrant {
    /// The answer that carries this grant to a box speaking `protocol`: with the site's CA
    /// from [`CHAIN_IN_GRANT`] on, in the older form (without it) before.
    pub fn into_answer(self, protocol: crate::ProtocolVersion) -> crate::Message {
        if protocol < CHAIN_IN_GRANT {
            return crate::Message::Activated(self);
        }
        let chain = self
            .chain
            .iter()
            .map(|c| serde_bytes::ByteBuf::from(c.clone()))
            .collect();
        crate::Message::ActivatedWithChain { grant: self, chain }
    }
}

/// What a box knows about its partner.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct PartnerInfo {
    /// The partner's SID.
    pub sid: ServerId,
    /// Its role as the data center records it.
    pub role: Role,
    /// Its overlay address, once activated.
    pub overlay: Option<Ipv4Addr>,
    /// Its LAN address, once activated.
    pub lan: Option<Ipv4Addr>,
    /// How long ago the data center last heard from it (ms), if ever.
    pub silent_ms: Option<u64>,
}

/// One of the data center's WireGuard endpoints.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct TunnelEndpoint {
    /// Its name ("dc1").
    pub name: String,
    /// Where boxes send their WireGuard packets.
    pub endpoint: SocketAddr,
    /// Its WireGuard public key (base64).
    pub public_key: String,
    /// Its overlay address (the heartbeat responder).
    pub overlay: Ipv4Addr,
}

/// A box whose tunnels an endpoint must accept: what the data center's main site tells an
/// endpoint running at another site ([`crate::Message::TunnelPeers`], protocol 1.3).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Debug, Serialize, Deserialize)]
pub struct TunnelPeer {
    /// The box's WireGuard public key (base64), as it sent it at activation.
    pub public_key: String,
    /// The box's overlay address.
    pub overlay: Ipv4Addr,
}

/// A box's periodic report (its heartbeat to the data center).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct BoxReport {
    /// The role the box believes it has.
    pub role: Role,
    /// The box's release.
    pub software: SoftwareVersion,
    /// The address it serves phones on (where the pair's name should point while it is
    /// primary).
    pub advertised: Ipv4Addr,
    /// Replication, as the box sees it.
    pub sync: SyncSummary,
    pub tunnels: Vec<TunnelSummary>,
}

/// Replication in a few numbers.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct SyncSummary {
    /// When the last complete sync pass ended (ms since the Unix epoch).
    pub last_complete_ms: Option<u64>,
    /// Files known to differ from the primary.
    pub pending_files: u64,
    /// Bytes known to differ.
    pub pending_bytes: u64,
}

/// One tunnel in a report.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct TunnelSummary {
    /// The endpoint's name.
    pub name: String,
    /// Whether its heartbeats answer.
    pub healthy: bool,
    /// Whether the overlay is routed through it.
    pub active: bool,
}

/// The data center's answer to a report or a registration: what the box must be now.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct PairState {
    /// The role the data center records for this box. `Fenced` for a box that believes it is
    /// primary at an older generation: it must stop the PBX and drop the shared address.
    pub role: Role,
    /// The pair's generation.
    pub generation: Generation,
    /// The pair's primary.
    pub primary: Option<ServerId>,
    pub partner: Option<PartnerInfo>,
    /// How the two boxes' hardware differs (`None` until both reported an inventory; empty:
    /// identical).
    pub hardware_differences: Option<Vec<String>>,
}

/// One of the pair's DNS names as the data center keeps it (protocol 1.2): where it must
/// point and whether the DNS server has it yet.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct DnsRecordState {
    /// The name (`pbx.example.com`, `primary.…`, `backup.…`).
    pub name: String,
    /// Where it must point.
    pub want: String,
    /// `done`, `pending` or `retrying (n failed: why)`.
    pub state: String,
}

/// How a promotion came about, for the audit log (protocol 1.4).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum PromotionKind {
    /// P at the console or `lbs promote`, the checks passed.
    Operator,
    /// P with `--force`: the primary may have been alive.
    Forced,
    /// The data center confirming a promotion made with `--offline`.
    Offline,
    /// The backup promoted itself (`auto_failover`).
    Automatic,
    /// The provider asked (`lbs-datacenter promote`).
    Requested,
    /// The primary handed over (its PBX down).
    HandOver,
}

impl std::fmt::Display for PromotionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PromotionKind::Operator => "P",
            PromotionKind::Forced => "P --force",
            PromotionKind::Offline => "P --offline, confirmed",
            PromotionKind::Automatic => "automatic failover",
            PromotionKind::Requested => "requested by the provider",
            PromotionKind::HandOver => "hand-over by the primary",
        })
    }
}

/// A promotion the provider asked the data center for (`lbs-datacenter promote <pair>`): the
/// backup's agent carries it out with the same checks as **P** at its console, or refuses it
/// with [`crate::Message::PromotionRefused`]. Protocol 1.2.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct RemotePromotion {
    /// The request's number.
    pub id: u64,
    /// Who asked (the provider's operator, as the data center logged it).
    pub by: String,
}

/// The data center's answer to a successful promotion.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Promotion {
    /// The new generation: this box is primary at it.
    pub generation: Generation,
    /// The box that was primary and is fenced now.
    pub previous: Option<ServerId>,
    /// How long the previous primary had been silent (ms), if it ever reported.
    pub previous_silent_ms: Option<u64>,
}

/// Why the data center refused a request; the connection stays usable.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Denial {
    /// The activation key is wrong, used or expired, or the SID unknown.
    Activation(String),
    /// Too many attempts from this address; try again after `retry_after_ms`.
    RateLimited {
        /// How long to wait.
        retry_after_ms: u64,
    },
    /// The request is not allowed in the pair's state (with the reason).
    NotAllowed(String),
    /// Another box was promoted first: the pair is at `current`.
    StaleGeneration {
        /// The pair's generation.
        current: Generation,
    },
    /// The data center failed (its database); the request may be retried.
    Unavailable(String),
    /// A promotion that needs the pair's primary silent for `quiet_ms` was refused: it
    /// reported `silent_ms` ago (protocol 1.14, [`ALIVE_DENIALS`]). Asked again once the
    /// primary is silent for long enough, it may be granted.
    PrimaryAlive {
        /// How long ago the primary last reported.
        silent_ms: u64,
        /// How long the promotion needed it silent.
        quiet_ms: u64,
    },
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Denial::Activation(why) | Denial::NotAllowed(why) => f.write_str(why),
            Denial::RateLimited { retry_after_ms } => write!(
                f,
                "too many attempts from this address; try again in {:.0} s",
                (*retry_after_ms as f64 / 1000.0).ceil()
            ),
            Denial::StaleGeneration { current } => write!(
                f,
                "another box was promoted first: the pair is at {current} now"
            ),
            Denial::Unavailable(why) => write!(f, "the data center cannot answer now: {why}"),
            Denial::PrimaryAlive {
                silent_ms,
                quiet_ms,
            } => write!(
                f,
                "the primary reported {:.1} s ago: it is alive; a promotion that needs it \
                 silent for {:.1} s is refused",
                *silent_ms as f64 / 1000.0,
                *quiet_ms as f64 / 1000.0
            ),
        }
    }
}

impl From<crate::FrameError> for CallError {
    fn from(err: crate::FrameError) -> CallError {
        CallError::Frame(err)
    }
}

/// How a box comes back to the data center after losing it: waits doubling from this one
/// (each drawn from the upper half of its range, `lbs_host::backoff`) …
pub const RECONNECT_FIRST: std::time::Duration = std::time::Duration::from_secs(2);
/// … up to this one: after a data-center restart every box is back within it.
pub const RECONNECT_CAP: std::time::Duration = std::time::Duration::from_secs(30);

/// Why a request to the data center got no answer it could use.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The data center refused, and said why.
    #[error("the data center refused: {0}")]
    Denied(Denial),
    /// It refused the connection (a protocol problem), and said why.
    #[error("the data center refused the connection: {0}")]
    Refused(crate::Refusal),
    /// It answered with something that does not answer the request.
    #[error("the data center answered {request} with {answer}; expected {expected}")]
    Unexpected {
        /// What was asked.
        request: &'static str,
        /// What came back.
        answer: &'static str,
        /// What should have come back.
        expected: &'static str,
    },
    /// No answer in time.
    #[error("the data center did not answer {request} within {timeout:?}")]
    Timeout {
        /// What was asked.
        request: &'static str,
        /// How long we waited.
        timeout: std::time::Duration,
    },
    /// The connection closed before the answer.
    #[error("the data center closed the connection before answering {0}")]
    Closed(&'static str),
    /// The connection failed.
    // The cause is in the message, not also the error's source: `{:#}` says it once.
    #[error("talking to the data center: {0}")]
    Frame(crate::FrameError),
}

/// Sends `message` with our `generation` on a connection and waits (at most `timeout`) for
/// the answer. A [`crate::Message::Denied`] or [`crate::Message::Refused`] answer is an error.
pub async fn call<S>(
    conn: &mut crate::Connection<S>,
    generation: Generation,
    message: crate::Message,
    timeout: std::time::Duration,
) -> Result<(Generation, crate::Message), CallError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::{SinkExt, StreamExt};
    let request = message.kind();
    let exchange = async {
        conn.send(crate::Envelope {
            generation,
            message,
        })
        .await?;
        match conn.next().await {
            None => Err(CallError::Closed(request)),
            Some(Err(err)) => Err(err.into()),
            Some(Ok(envelope)) => match envelope.message {
                crate::Message::Denied(denial) => Err(CallError::Denied(denial)),
                crate::Message::Refused(refusal) => Err(CallError::Refused(refusal)),
                other => Ok((envelope.generation, other)),
            },
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| CallError::Timeout { request, timeout })?
}

/// Activates with the data center that `connect` opens a TLS stream to: sends the typed
/// request (protocol 1.7) and returns the grant. A data center older than 1.7 cannot read
/// it and refuses the connection as a protocol violation; then the request goes again, on a
/// new connection, in the 1.6 form ([`ActivationRequestJson`]) that it reads.
pub async fn activate<S, C, F, E>(
    mut connect: C,
    request: ActivationRequest,
    timeout: std::time::Duration,
) -> Result<Result<ActivationGrant, CallError>, E>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    C: FnMut() -> F,
    F: std::future::Future<Output = Result<S, E>>,
{
    let first = activate_with(
        connect().await?,
        crate::Message::Activate(request.clone()),
        timeout,
    )
    .await;
    match first {
        Err(CallError::Refused(crate::Refusal::ProtocolViolation { detail })) => {
            tracing::info!(
                "the data center could not read a protocol 1.7 activation ({detail}); \
                 sending it in the 1.6 form"
            );
            let json = crate::Message::ActivateJson(request.into());
            Ok(activate_with(connect().await?, json, timeout).await)
        }
        other => Ok(other),
    }
}

/// Sends one activation `message` (either form) on `io` and returns the grant.
pub async fn activate_with<S>(
    io: S,
    message: crate::Message,
    timeout: std::time::Duration,
) -> Result<ActivationGrant, CallError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut conn =
        tokio_util::codec::Framed::new(io, crate::FrameCodec::with_max_len(crate::MAX_FRAME_LEN));
    match call(&mut conn, Generation::default(), message, timeout).await? {
        (_, crate::Message::Activated(grant)) => Ok(grant),
        (_, crate::Message::ActivatedWithChain { mut grant, chain }) => {
            grant.chain = chain.into_iter().map(|c| c.into_vec()).collect();
            Ok(grant)
        }
        (_, other) => Err(CallError::Unexpected {
            request: "activate",
            answer: other.kind(),
            expected: "activated",
        }),
    }
}
