//! What the agent reports about itself: the status `lbs status`, the console and the health
//! rules read (the control socket sends it as JSON).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::activate::BoxInfo;
use crate::resources::Sample;
use crate::role::RoleRecord;

/// Where the replication of one set stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SetState {
    /// The last pass, begun after the last change notice, left nothing behind.
    #[serde(rename = "in sync")]
    InSync,
    /// A pass is under way.
    #[serde(rename = "syncing")]
    Syncing,
    /// For the partner (its address, its agent).
    #[default]
    #[serde(rename = "waiting")]
    Waiting,
    /// A change is due.
    #[serde(rename = "changed")]
    Changed,
    /// The last pass failed.
    #[serde(rename = "error")]
    Error,
    /// This box is the source (primary).
    #[serde(rename = "serving")]
    Serving,
    /// Replication is stopped (a role change).
    #[serde(rename = "stopped")]
    Stopped,
}

impl std::fmt::Display for SetState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SetState::InSync => "in sync",
            SetState::Syncing => "syncing",
            SetState::Waiting => "waiting",
            SetState::Changed => "changed",
            SetState::Error => "error",
            SetState::Serving => "serving",
            SetState::Stopped => "stopped",
        })
    }
}

/// What replication does on this box.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Replication {
    /// The primary's side.
    Serving,
    /// The backup's side.
    Pulling,
    /// Neither (a role change, fenced).
    Stopped,
}

impl std::fmt::Display for Replication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Replication::Serving => "serving",
            Replication::Pulling => "pulling",
            Replication::Stopped => "stopped",
        })
    }
}

/// Replication of one set, as `lbs status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetStatus {
    pub name: String,
    pub path: PathBuf,
    /// Where its replication stands.
    pub state: SetState,
    /// When the last pass that left nothing behind ended (ms since the epoch).
    pub last_in_sync_ms: Option<u64>,
    /// When the oldest change not yet pulled was announced.
    pub changed_since_ms: Option<u64>,
    /// Files and bytes fetched by the last pass.
    pub last_fetched_files: u64,
    /// Bytes fetched by the last pass.
    pub last_fetched_bytes: u64,
    /// How long the last pass took (ms).
    pub last_pass_ms: Option<u64>,
    /// Files the last pass left for the next one (still changing on the primary, or
    /// deferred).
    pub pending_files: u64,
    /// Bytes of the pass under way not copied yet (as the pass stood when it broke off, if
    /// it did); 0 once a pass completes.
    #[serde(default)]
    pub pending_bytes: u64,
    /// What went wrong last, until a pass succeeds.
    pub last_error: Option<String>,
    /// When the pass under way began (ms since the epoch).
    #[serde(default)]
    pub pass_started_ms: Option<u64>,
    /// Bytes the pass under way copies, and how many of them it has copied (for percent,
    /// rate and time left).
    #[serde(default)]
    pub pass_bytes: Option<(u64, u64)>,
    /// The first change announced while the pass under way ran (it may have missed it).
    #[serde(default)]
    pub changed_during_pass_ms: Option<u64>,
    /// What the last pass could not sync (FIFOs, sockets, devices, unreadable files), on the
    /// primary's side and on this box's.
    #[serde(default)]
    pub skipped: Skipped,
}

/// Entries a set does not sync, and why (see [`SetStatus::skipped`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// On the primary (the sender's list; at most 100).
    pub on_primary: Vec<lbs_protocol::sync::SkippedEntry>,
    /// On this box, the copy's side (at most 100).
    pub here: Vec<lbs_protocol::sync::SkippedEntry>,
    /// How many more, on both sides, than those listed.
    pub more: u64,
}

/// The office network as `[network]` configures it (with the operator's choice at **P**).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkView {
    /// The office interface.
    pub interface: String,
    /// The primary's address, the one phones use (`192.168.1.2/24`).
    pub shared: String,
    /// This box's own address.
    pub own: String,
    /// The office gateway.
    pub gateway: Ipv4Addr,
}

/// The operator's notes (`promote_note`, `demote_note`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notes {
    /// Shown at P.
    pub promote: Option<String>,
    /// Shown at B.
    pub demote: Option<String>,
}

/// The data center link.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataCenterStatus {
    /// The address answering.
    pub connected_to: Option<SocketAddr>,
    /// When the last report was answered.
    pub last_answer_ms: Option<u64>,
    /// The last failure.
    pub last_error: Option<String>,
    /// The pair's DNS names as the data center last told (data centers of protocol 1.2).
    #[serde(default)]
    pub dns: Option<Vec<lbs_protocol::control::DnsRecordState>>,
}

/// Everything `lbs status` shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentStatus {
    /// This box and its pair.
    pub info: BoxInfo,
    /// Its role record.
    pub role: RoleRecord,
    /// What replication does now.
    pub replication: Replication,
    /// Per set.
    pub sets: Vec<SetStatus>,
    /// The data center link.
    pub datacenter: DataCenterStatus,
    /// The tunnels, when this box runs them.
    pub tunnels: Option<lbs_vpn::VpnStatus>,
    /// Why the tunnels are not running, if they should be.
    pub tunnels_error: Option<String>,
    /// This machine's recent resource samples (oldest first).
    pub resources: Vec<Sample>,
    /// The address this box serves on now.
    pub serving_at: Ipv4Addr,
    /// The office network (`None`: a remote box that keeps its own address; phones follow
    /// the DNS name).
    pub network: Option<NetworkView>,
    /// The operator's notes at P and B.
    pub notes: Notes,
    /// Automatic failover: `None` when off, else what it last decided.
    pub auto_failover: Option<String>,
    /// When this box (as backup) last heard the primary itself.
    pub primary_heard_ms: Option<u64>,
    /// Why this primary does not hold the shared address now (its cable is out), if so.
    #[serde(default)]
    pub address_withdrawn: Option<Withdrawn>,
    pub software: String,
    pub protocol: String,
    /// When the status was made (ms since the epoch).
    pub at_ms: u64,
    /// What is not well (empty: all is).
    #[serde(default)]
    pub health: Vec<Problem>,
    /// The PBX health check on this primary, when one is configured.
    #[serde(default)]
    pub pbx: Option<PbxHealth>,
    /// The latest role steps carried out (kept across restarts), oldest first: what the
    /// data center's portal shows too.
    #[serde(default)]
    pub recent_steps: Vec<lbs_protocol::control::StepReport>,
}

// What the PBX health check found is what the box reports to the data center.
pub use lbs_protocol::control::PbxReport as PbxHealth;

/// The primary's shared address, off the interface until the cable is back and checked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Withdrawn {
    /// Why, for the operator.
    pub reason: String,
    /// Since when (ms since the epoch).
    pub since_ms: u64,
}

/// One reason this box is not fully well.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "problem")]
pub enum Problem {
    /// Stepped back after the other box took over: waits for **B**.
    Fenced,
    /// A promotion or demotion is under way.
    RoleChanging {
        /// The state, as `lbs status` shows it.
        state: String,
    },
    /// The backup's copy of a set is behind the primary (or not known to be current).
    NotInSync {
        set: String,
        /// Its state (changed, syncing, error, waiting).
        state: SetState,
        /// How long the oldest change not copied has waited (ms), when known.
        behind_ms: Option<u64>,
    },
    /// The partner has not been heard for a while (by this backup or by the data center).
    PartnerSilent {
        /// For how long (ms), or `None`: never heard.
        for_ms: Option<u64>,
    },
    /// The data center has not answered lately.
    DataCenterSilent {
        /// Since its last answer (ms), or `None`: never.
        for_ms: Option<u64>,
    },
    /// The primary's shared address is off its interface (no carrier).
    AddressWithdrawn,
    /// Another device, not the partner, answers for the shared address: the primary keeps
    /// it (the data center does not say another box is primary) and somebody must find the
    /// device.
    DuplicateAddress {
        /// Its MAC.
        by: String,
        /// When it was last seen answering (ms ago).
        ago_ms: u64,
    },
    /// The primary's last start of the PBX failed (nothing answers the phones).
    PbxNotStarted {
        /// What the start said.
        why: String,
    },
    /// The PBX fails its health check.
    PbxUnhealthy {
        /// Failures in a row since the last restart.
        failures: u32,
        /// Restarts tried.
        restarts: u32,
        /// Declared down: every restart tried.
        down: bool,
    },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = |ms: u64| format!("{:.0} s", ms as f64 / 1000.0);
        match self {
            Problem::Fenced => {
                f.write_str("fenced: the other box is primary; B makes this one the backup")
            }
            Problem::RoleChanging { state } => write!(f, "role change under way ({state})"),
            Problem::NotInSync {
                set,
                state,
                behind_ms: Some(ms),
            } => write!(f, "{set} {state}, {} behind", secs(*ms)),
            Problem::NotInSync { set, state, .. } => write!(f, "{set} {state}"),
            Problem::PartnerSilent { for_ms: Some(ms) } => {
                write!(f, "partner not heard for {}", secs(*ms))
            }
            Problem::PartnerSilent { for_ms: None } => f.write_str("partner never heard"),
            Problem::DataCenterSilent { for_ms: Some(ms) } => {
                write!(f, "data center silent for {}", secs(*ms))
            }
            Problem::DataCenterSilent { for_ms: None } => f.write_str("data center never answered"),
            Problem::AddressWithdrawn => f.write_str("shared address withdrawn (no carrier)"),
            Problem::PbxNotStarted { why } => write!(f, "the PBX did not start: {why}"),
            Problem::DuplicateAddress { by, ago_ms } => write!(
                f,
                "{by} (not the partner) answers for the shared address, last {} ago: find that device",
                secs(*ago_ms)
            ),
            Problem::PbxUnhealthy {
                restarts,
                down: true,
                ..
            } => {
                write!(f, "PBX DOWN: unhealthy after {restarts} restart(s)")
            }
            Problem::PbxUnhealthy {
                failures, restarts, ..
            } => write!(
                f,
                "PBX check failed {failures} time(s) in a row ({restarts} restart(s) so far)"
            ),
        }
    }
}
