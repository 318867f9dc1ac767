//! The role state machine (DESIGN §9), pure: a [`RoleState`] and an [`Event`] in, the next
//! state and the [`Action`]s to carry out, no IO. The daemon persists the new state *before*
//! it acts ([`RoleRecord::save`]), so after a crash or power loss [`RoleMachine::resume`]
//! re-issues the action of the step it was in; every action is idempotent (taking an address
//! this box already holds, stopping a stopped PBX, asking the data center for a promotion it
//! already granted) so doing one twice is harmless.
//!
//! ```text
//! unactivated ─activated→ primary | backup
//! backup ─P→ promoting(ask → take address → start PBX) → primary
//! primary ─fenced→ fenced ─B→ demoting(stop PBX → give up address → register) → backup
//! ```

use std::path::Path;

use lbs_protocol::{Generation, Role};
use serde::{Deserialize, Serialize};

/// The steps of a promotion, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PromoteStep {
    /// Ask the data center to compare-and-set the generation.
    AskAuthority,
    /// Take the primary's address on the LAN.
    TakeAddress,
    /// Start the PBX services.
    StartPbx,
}

/// The steps of a demotion, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DemoteStep {
    /// Stop the PBX services.
    StopPbx,
    /// Give the shared address back (return to this box's own).
    GiveUpAddress,
    /// Tell the data center this box is the backup now.
    Register,
}

/// The office address a promotion takes: the configured one, or what the operator typed
/// instead at the console (persisted with the promotion, so a restart takes the same).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedAddress {
    /// The address phones use.
    pub address: std::net::Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
    /// The office gateway.
    pub gateway: std::net::Ipv4Addr,
}

impl std::fmt::Display for SharedAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} via {}", self.address, self.prefix, self.gateway)
    }
}

/// Where this box is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "state", content = "step")]
pub enum RoleState {
    /// Not activated yet.
    Unactivated,
    /// Serving phones; the source of every sync.
    Primary,
    /// Keeping a verified copy and waiting for **P**.
    Backup,
    /// Becoming primary.
    Promoting(PromoteStep),
    /// Was primary, learned of a higher generation: PBX stopped, address dropped, waiting
    /// for **B**.
    Fenced,
    /// Becoming backup.
    Demoting(DemoteStep),
}

impl RoleState {
    /// The role announced on the wire.
    pub fn wire_role(self) -> Role {
        match self {
            RoleState::Unactivated => Role::Unactivated,
            RoleState::Primary | RoleState::Promoting(PromoteStep::StartPbx) => Role::Primary,
            RoleState::Backup | RoleState::Promoting(_) => Role::Backup,
            RoleState::Fenced | RoleState::Demoting(_) => Role::Fenced,
        }
    }
}

impl std::fmt::Display for RoleState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RoleState::Unactivated => f.write_str("unactivated"),
            RoleState::Primary => f.write_str("PRIMARY"),
            RoleState::Backup => f.write_str("BACKUP"),
            RoleState::Fenced => f.write_str("FENCED"),
            RoleState::Promoting(step) => write!(f, "promoting ({step:?})"),
            RoleState::Demoting(step) => write!(f, "demoting ({step:?})"),
        }
    }
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The data center activated this box.
    Activated {
        /// The role it gave.
        role: Role,
        /// The pair's generation.
        generation: Generation,
    },
    /// The operator pressed **P** (or ran `lbs promote`), maybe with another address than
    /// the configured one.
    PromoteRequested(Option<SharedAddress>),
    /// The operator pressed **P** with the data center unreachable and consented to go on
    /// without it (`lbs promote --offline`): promoted at the same generation, to be
    /// reconciled with the data center when it answers again.
    PromoteOffline(Option<SharedAddress>),
    /// The operator pressed **B** (or ran `lbs demote`).
    DemoteRequested,
    /// The data center granted the promotion at this generation.
    Promoted(Generation),
    /// The data center (or the partner) says the pair is at `generation` and this box's role
    /// is `role` there.
    Authority {
        /// What the data center records for this box.
        role: Role,
        /// The pair's generation.
        generation: Generation,
    },
    /// Another machine answers ARP for the shared address this box (primary) is about to
    /// announce: the partner took over while this box was away.
    AddressTaken {
        /// Who answers (its MAC).
        by: String,
    },
    /// The current step's action finished.
    StepDone,
    /// The current step's action failed, and why.
    StepFailed(String),
}

/// What the daemon must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Ask the data center for a promotion from `believed`.
    AskPromotion {
        /// The generation this box saw.
        believed: Generation,
    },
    /// Take the primary's address.
    TakeAddress,
    /// Start the PBX services.
    StartPbx,
    /// Stop the PBX services.
    StopPbx,
    /// Give the shared address up.
    GiveUpAddress,
    /// Register with the data center as backup.
    RegisterBackup,
    /// Serve the sync sets to the partner (this box is the source).
    ServeSync,
    /// Pull the sync sets from the partner.
    PullSync,
    /// Stop all replication (fenced: this box's data is no longer the reference).
    StopSync,
    /// Tell the operator.
    Say(String),
}

impl Action {
    /// The step's name in progress lines and `--crash-after` (`None` for what is not a step).
    pub fn step_name(&self) -> Option<&'static str> {
        Some(match self {
            Action::AskPromotion { .. } => "ask-promotion",
            Action::TakeAddress => "take-address",
            Action::StartPbx => "start-pbx",
            Action::StopPbx => "stop-pbx",
            Action::GiveUpAddress => "give-up-address",
            Action::RegisterBackup => "register-backup",
            Action::ServeSync | Action::PullSync | Action::StopSync | Action::Say(_) => {
                return None;
            }
        })
    }
}

/// Why an event was not accepted in a state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// The persisted role: state, generation, and when it last changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleRecord {
    /// Where the box is.
    #[serde(flatten)]
    pub state: RoleState,
    /// The highest generation this box knows of.
    pub generation: Generation,
    /// When the state last changed (ms since the Unix epoch).
    pub since_unix_ms: u64,
    /// The last failure of a step, kept until the step succeeds.
    pub last_error: Option<String>,
    /// The address the operator chose at **P** instead of the configured one, kept while
    /// this box holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared: Option<SharedAddress>,
    /// Promoted without the data center (`--offline`): the data center has not confirmed it
    /// yet; the first answer from it starts the reconciliation.
    #[serde(default)]
    pub offline: bool,
    /// The generation of a promotion given up on because the data center did not answer in
    /// time. Should its grant arrive after all, the promotion is finished only where nobody
    /// answers for the shared address (no forced take-over the operator did not confirm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abandoned: Option<Generation>,
}

impl RoleRecord {
    /// An unactivated box.
    pub fn new() -> RoleRecord {
        RoleRecord {
            state: RoleState::Unactivated,
            generation: Generation::default(),
            since_unix_ms: 0,
            last_error: None,
            shared: None,
            offline: false,
            abandoned: None,
        }
    }

    /// Reads the record; a missing file is an unactivated box.
    pub fn load(path: &Path) -> anyhow::Result<RoleRecord> {
        use anyhow::Context;
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).with_context(|| {
                format!("{} is damaged; restore it from its .bak", path.display())
            }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(RoleRecord::new()),
            Err(err) => Err(err).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes the record atomically (temp file, fsync, rename, fsync of the directory).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        use anyhow::Context;
        let text = serde_json::to_vec_pretty(self)?;
        lbs_host::write_file_atomic(path, &text, 0o600)
            .with_context(|| format!("writing {}", path.display()))
    }
}

impl Default for RoleRecord {
    fn default() -> Self {
        RoleRecord::new()
    }
}

/// The machine: the record and the rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleMachine {
    /// The current record.
    pub record: RoleRecord,
}

impl RoleMachine {
    /// A machine at `record`.
    pub fn new(record: RoleRecord) -> RoleMachine {
        RoleMachine { record }
    }

    /// What to do after a (re)start in the current state: the current step again, or the
    /// steady state's replication and PBX.
    pub fn resume(&self) -> Vec<Action> {
        match self.record.state {
            RoleState::Unactivated => Vec::new(),
            // The PBX runs on the primary only (DESIGN §9): started after a restart (the hook
            // is idempotent), and kept stopped on the backup, whatever the boot started.
            RoleState::Primary => vec![Action::ServeSync, Action::StartPbx],
            RoleState::Backup => vec![Action::PullSync, Action::StopPbx],
            // The fencing's steps again: a crash may have come between the record and them.
            RoleState::Fenced => vec![Action::StopSync, Action::StopPbx, Action::GiveUpAddress],
            RoleState::Promoting(step) => vec![self.promote_action(step)],
            RoleState::Demoting(step) => vec![demote_action(step)],
        }
    }

    /// The step under way (a promotion's or a demotion's), whose outcome the machine waits for.
    pub fn current_step(&self) -> Option<Action> {
        match self.record.state {
            RoleState::Primary if self.record.offline => Some(Action::AskPromotion {
                believed: self.record.generation,
            }),
            RoleState::Promoting(step) => Some(self.promote_action(step)),
            RoleState::Demoting(step) => Some(demote_action(step)),
            _ => None,
        }
    }

    fn promote_action(&self, step: PromoteStep) -> Action {
        match step {
            PromoteStep::AskAuthority => Action::AskPromotion {
                believed: self.record.generation,
            },
            PromoteStep::TakeAddress => Action::TakeAddress,
            PromoteStep::StartPbx => Action::StartPbx,
        }
    }

    fn set(&mut self, state: RoleState, now_ms: u64) {
        if self.record.state != state {
            self.record.since_unix_ms = now_ms;
        }
        self.record.state = state;
        self.record.last_error = None;
    }

    /// Applies `event` at `now_ms`: the record changes (persist it before acting) and the
    /// actions to carry out are returned. An event the state does not allow changes nothing.
    pub fn handle(&mut self, event: Event, now_ms: u64) -> Result<Vec<Action>, Refused> {
        use RoleState as S;
        let state = self.record.state;
        match (state, event) {
            (S::Unactivated, Event::Activated { role, generation }) => match role {
                Role::Primary => {
                    self.record.generation = generation;
                    self.set(S::Primary, now_ms);
                    Ok(vec![
                        Action::Say(format!("this box is the PRIMARY ({generation})")),
                        Action::ServeSync,
                    ])
                }
                Role::Backup => {
                    self.record.generation = generation;
                    self.set(S::Backup, now_ms);
                    Ok(vec![
                        Action::Say(format!(
                            "this box is the BACKUP ({generation}); first full sync started"
                        )),
                        Action::PullSync,
                    ])
                }
                other => Err(Refused(format!(
                    "the data center activated this box as {other}, which makes no sense; ask the provider"
                ))),
            },
            (_, Event::Activated { .. }) => {
                Err(Refused(format!("this box is activated already ({state})")))
            }
            (S::Backup, Event::PromoteRequested(shared)) => {
                self.set(S::Promoting(PromoteStep::AskAuthority), now_ms);
                self.record.shared = shared;
                self.record.abandoned = None;
                Ok(vec![
                    Action::StopSync,
                    self.promote_action(PromoteStep::AskAuthority),
                ])
            }
            (S::Backup, Event::PromoteOffline(shared)) => {
                self.set(S::Promoting(PromoteStep::TakeAddress), now_ms);
                self.record.shared = shared;
                self.record.offline = true;
                Ok(vec![
                    Action::StopSync,
                    Action::Say(format!(
                        "OFFLINE promotion at {}: the data center is not asked now; it is told when it answers again",
                        self.record.generation
                    )),
                    Action::TakeAddress,
                ])
            }
            (S::Promoting(_), Event::PromoteRequested(_) | Event::PromoteOffline(_)) => {
                Err(Refused("a promotion is under way already".into()))
            }
            (_, Event::PromoteRequested(_) | Event::PromoteOffline(_)) => Err(Refused(format!(
                "only the backup can be promoted; this box is {state}"
            ))),
            (S::Promoting(PromoteStep::AskAuthority), Event::Promoted(generation))
                if generation > self.record.generation =>
            {
                self.record.generation = generation;
                self.set(S::Promoting(PromoteStep::TakeAddress), now_ms);
                Ok(vec![Action::TakeAddress])
            }
            (S::Promoting(PromoteStep::TakeAddress), Event::StepDone) => {
                self.set(S::Promoting(PromoteStep::StartPbx), now_ms);
                Ok(vec![Action::StartPbx])
            }
            (S::Promoting(PromoteStep::StartPbx), Event::StepDone) => {
                self.set(S::Primary, now_ms);
                self.record.abandoned = None;
                Ok(vec![
                    Action::Say(format!(
                        "this box is the PRIMARY now ({})",
                        self.record.generation
                    )),
                    Action::ServeSync,
                ])
            }
            (S::Promoting(PromoteStep::AskAuthority), Event::StepFailed(why)) => {
                // The data center said no (or was unreachable): nothing was changed yet, so
                // back to backup.
                self.set(S::Backup, now_ms);
                self.record.shared = None;
                self.record.last_error = Some(why.clone());
                // Its grant may still come (the request may have reached the data center).
                self.record.abandoned = Some(self.record.generation);
                Ok(vec![
                    Action::Say(format!("promotion refused: {why}")),
                    Action::PullSync,
                ])
            }
            (S::Promoting(_) | S::Demoting(_), Event::StepFailed(why)) => {
                // Past the point of no return: stay in the step, keep the reason, retry.
                self.record.last_error = Some(why.clone());
                let retry = match state {
                    S::Demoting(step) => demote_action(step),
                    S::Promoting(step) => self.promote_action(step),
                    _ => return Ok(Vec::new()),
                };
                Ok(vec![
                    Action::Say(format!("{state}: {why}; retrying")),
                    retry,
                ])
            }
            (
                S::Backup | S::Promoting(PromoteStep::AskAuthority),
                Event::Authority {
                    role: Role::Primary,
                    generation,
                },
            ) if generation > self.record.generation => {
                // The data center granted this box's promotion but the answer was lost (or
                // the box crashed before recording it): finish what the operator started. The
                // data center now fences the old primary, so leaving it half done would leave
                // the office with none. A promotion given up on is finished too, but its
                // address only taken once nobody answers for it.
                self.record.generation = generation;
                self.set(S::Promoting(PromoteStep::TakeAddress), now_ms);
                let said = match self.record.abandoned {
                    Some(from) => format!(
                        "the data center granted the promotion from {from} given up on earlier: this box is primary at {generation}; finishing it, the address taken only when nobody else answers for it"
                    ),
                    None => format!(
                        "the data center made this box primary at {generation}: finishing the promotion"
                    ),
                };
                Ok(vec![
                    Action::Say(said),
                    Action::StopSync,
                    Action::TakeAddress,
                ])
            }
            (S::Primary, Event::Authority { role, generation })
                if self.record.offline
                    && generation == self.record.generation
                    && role != Role::Primary =>
            {
                // The data center answers again and does not know of the offline promotion:
                // ask it now, from the generation both know.
                Ok(vec![Action::AskPromotion {
                    believed: generation,
                }])
            }
            (S::Primary, Event::Promoted(generation))
                if self.record.offline && generation > self.record.generation =>
            {
                self.record.generation = generation;
                self.record.offline = false;
                self.record.last_error = None;
                Ok(vec![Action::Say(format!(
                    "the data center confirmed the offline promotion: this box is the PRIMARY at {generation}"
                ))])
            }
            (S::Primary, Event::StepFailed(why)) if self.record.offline => {
                // Asked again at the next answer.
                self.record.last_error = Some(format!("reconciling the offline promotion: {why}"));
                Ok(Vec::new())
            }
            (S::Primary | S::Promoting(_), Event::Authority { role, generation })
                if generation > self.record.generation && role != Role::Primary =>
            {
                self.record.generation = generation;
                self.record.offline = false;
                self.set(S::Fenced, now_ms);
                Ok(vec![
                    Action::Say(format!(
                        "FENCED: the pair is at {generation} and another box is primary; stopping the PBX and giving up the address"
                    )),
                    Action::StopSync,
                    Action::StopPbx,
                    Action::GiveUpAddress,
                ])
            }
            (_, Event::Authority { generation, .. }) => {
                if generation > self.record.generation {
                    self.record.generation = generation;
                }
                Ok(Vec::new())
            }
            (S::Primary, Event::AddressTaken { by }) => {
                // Stepping back is always safe; the data center confirms the generation when
                // it is reachable again.
                self.set(S::Fenced, now_ms);
                Ok(vec![
                    Action::Say(format!(
                        "FENCED: {by} answers for the shared address: the other box took over; stopping the PBX and giving up the address"
                    )),
                    Action::StopSync,
                    Action::StopPbx,
                    Action::GiveUpAddress,
                ])
            }
            (_, Event::AddressTaken { .. }) => Ok(Vec::new()),
            (S::Fenced, Event::DemoteRequested) => {
                self.set(S::Demoting(DemoteStep::StopPbx), now_ms);
                Ok(vec![demote_action(DemoteStep::StopPbx)])
            }
            (_, Event::DemoteRequested) => Err(Refused(format!(
                "only a fenced box becomes the backup with B; this box is {state}"
            ))),
            (S::Demoting(DemoteStep::StopPbx), Event::StepDone) => {
                self.set(S::Demoting(DemoteStep::GiveUpAddress), now_ms);
                Ok(vec![demote_action(DemoteStep::GiveUpAddress)])
            }
            (S::Demoting(DemoteStep::GiveUpAddress), Event::StepDone) => {
                self.set(S::Demoting(DemoteStep::Register), now_ms);
                Ok(vec![demote_action(DemoteStep::Register)])
            }
            (S::Demoting(DemoteStep::Register), Event::StepDone) => {
                self.set(S::Backup, now_ms);
                // The next P starts from the configured address again.
                self.record.shared = None;
                Ok(vec![
                    Action::Say(format!(
                        "this box is the BACKUP now ({}); full sync started",
                        self.record.generation
                    )),
                    Action::PullSync,
                ])
            }
            (state, event) => Err(Refused(format!("{event:?} does not apply to {state}"))),
        }
    }
}

fn demote_action(step: DemoteStep) -> Action {
    match step {
        DemoteStep::StopPbx => Action::StopPbx,
        DemoteStep::GiveUpAddress => Action::GiveUpAddress,
        DemoteStep::Register => Action::RegisterBackup,
    }
}

#[cfg(test)]
mod tests;
