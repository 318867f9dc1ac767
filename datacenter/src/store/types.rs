//! What the store answers with and is asked with: plain data, no SQL.

use super::*;

/// A server as provisioned: its SID and one-time activation key (shown once, stored hashed).
#[derive(Clone, Debug)]
pub struct Provisioned {
    pub sid: ServerId,
    /// Its activation key.
    pub key: ActivationKey,
    /// Until when the key works.
    pub expires_at: Millis,
}

/// What a box sends to activate.
#[derive(Clone, Debug)]
pub struct ActivationRequest {
    pub sid: ServerId,
    /// The key from its sheet.
    pub key: String,
    /// Its WireGuard public key (base64).
    pub wireguard_key: String,
    /// The fingerprint of the TLS key its certificate is issued for.
    pub tls_key: String,
    /// Its office LAN address.
    pub lan_address: Ipv4Addr,
    /// Its software version.
    pub software: String,
    /// Its hardware inventory (JSON, as `lbs net inventory --json` prints it).
    pub inventory: String,
    /// Where the request came from, for the log.
    pub source: String,
}

/// What activation decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Activated {
    /// The role: primary for the pair's first box, backup for the second.
    pub role: Role,
    /// The pair's generation.
    pub generation: Generation,
    /// The box's overlay address.
    pub overlay: Ipv4Addr,
    /// The partner, if provisioned.
    pub partner: Option<ServerId>,
}

/// One server as `status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServerView {
    /// The SID.
    pub sid: String,
    pub role: String,
    /// Its overlay address once activated.
    pub overlay: Option<String>,
    /// Its LAN address once activated.
    pub lan: Option<String>,
    /// Its software version.
    pub software: Option<String>,
    /// Last heartbeat, ms since the epoch.
    pub last_heartbeat_at: Option<Millis>,
    /// The generation it last reported.
    pub reported_generation: Option<u64>,
    /// The address it serves phones on, as it last said.
    pub advertised: Option<String>,
    /// Its last report (role, sync, tunnels).
    pub report: Option<StoredReport>,
}

/// One DNS record the data center keeps pointed at the pair.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DnsView {
    pub name: String,
    /// Where it must point.
    pub want: String,
    /// Where the data center last made it point.
    pub have: Option<String>,
    pub state: DnsState,
    /// Failed attempts since the last change.
    pub attempts: i64,
    /// The last failure, in words.
    pub last_error: Option<String>,
    /// When the current value was decided.
    pub changed_at: Millis,
    /// When it was last written.
    pub done_at: Option<Millis>,
}

/// A DNS record that must be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsWork {
    pub pair_id: i64,
    /// The pair's name.
    pub pair: String,
    pub name: String,
    /// Where it must point.
    pub want: Ipv4Addr,
    /// Where the data center last made it point (`None`: never, so it must not exist yet).
    pub have: Option<Ipv4Addr>,
    /// Failed attempts so far.
    pub attempts: i64,
}

impl DnsWork {
    /// The audit log's words for this update done.
    pub fn updated(&self) -> String {
        format!(
            "{} → {} (was {})",
            self.name,
            self.want,
            self.have.map_or("absent".to_owned(), |h| h.to_string())
        )
    }
}

/// Why a DNS update failed, and whether waiting can help.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsFailure {
    /// What went wrong, for status and the log.
    pub why: String,
    /// The server refused it for a reason that stays until someone changes a configuration
    /// (a rejected key, a zone it does not serve, a refusal): not a server that is down.
    pub needs_operator: bool,
}

/// What a box said in its report, as the store keeps it.
#[derive(Clone, Debug)]
pub struct Report {
    /// The generation it believes in.
    pub believed: Generation,
    /// Its software version.
    pub software: String,
    /// The address it serves phones on.
    pub advertised: Ipv4Addr,
    /// The whole report, JSON.
    pub json: String,
}

/// What a promotion did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Promoted {
    /// The pair's new generation.
    pub generation: Generation,
    /// The primary before, now fenced.
    pub previous: Option<ServerId>,
    /// The same box asked again for the promotion it had been granted: nothing changed.
    pub repeat: bool,
}

/// A promotion the provider asked for (`lbs-datacenter promote`), carried out by the
/// backup's agent with the same checks as **P** at its console.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PromotionRequest {
    pub id: i64,
    pub pair: String,
    /// Who asked.
    pub requested_by: String,
    /// When.
    pub requested_at: Millis,
    /// Until when the backup may act on it.
    pub expires_at: Millis,
    pub state: RequestState,
    /// The backup's answer: the generation it was promoted at, or why it refused.
    pub answer: Option<String>,
    /// Set when the primary asked (a hand-over): why.
    pub hand_over: Option<String>,
}

/// The bounds of a hand-over.
#[derive(Clone, Copy, Debug)]
pub struct HandOverLimits {
    /// How long the backup may act on it.
    pub ttl: Duration,
    /// The backup must have reported within this.
    pub alive: Duration,
    /// No second hand-over of a pair within this.
    pub holdoff: Duration,
}

/// One pair as `status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PairView {
    pub name: String,
    /// The FQDN the phones use.
    pub fqdn: String,
    /// Its generation (0 before the first activation).
    pub generation: u64,
    /// The primary's SID, once there is one.
    pub primary: Option<String>,
    /// Its servers, in provisioning order.
    pub servers: Vec<ServerView>,
    /// Hardware differences between the two boxes (`None` until both reported an
    /// inventory; empty: they match).
    pub hardware_differences: Option<Vec<String>>,
    /// Its DNS records.
    pub dns: Vec<DnsView>,
    /// A promotion request not answered yet (it may be past its time: see `expires_at`).
    pub pending: Option<PromotionRequest>,
}

/// One audit-log entry.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Event {
    /// Its sequence number.
    pub id: i64,
    /// When, ms since the epoch.
    pub at: Millis,
    /// The pair's name.
    pub pair: Option<String>,
    /// The server concerned.
    pub sid: Option<String>,
    /// What happened (`provisioned`, `activated`, `promoted`, …).
    pub kind: String,
    /// The generation before.
    pub from_generation: Option<u64>,
    /// The generation after.
    pub to_generation: Option<u64>,
    /// Who asked (an address, `cli`).
    pub actor: String,
    /// The rest, in words.
    pub detail: String,
}

/// Who sends the DNS updates ([`Store::dns_sender`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsSender {
    /// This site's store is its own: its `serve` sends them.
    OwnSite,
    /// The sites share the store; this one holds the role now.
    Site(String),
    /// The sites share the store and none holds the role now (no `serve` running, or the
    /// holder gone and its lease not yet run out).
    Nobody,
}

impl std::fmt::Display for DnsSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DnsSender::OwnSite => f.write_str("DNS updates: sent by this site's serve"),
            DnsSender::Site(site) => write!(f, "DNS updates: sent by site {site}"),
            DnsSender::Nobody => f.write_str(
                "DNS updates: NO SITE sends them now (is serve running at any site? a site gone hands the role on within its lease)",
            ),
        }
    }
}

/// What answering a box's report needs ([`Store::look`]).
#[derive(Clone, Debug)]
pub struct Look {
    pub kind: ReportKind,
    /// The pending promotion the box (the backup) is to act on.
    pub request: Option<PromotionRequest>,
    /// Its pair as the store shows it.
    pub pair: PairView,
}
