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
        lbs_protocol::write_file_atomic(path, &text, 0o600)
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
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn at(state: RoleState, generation: u64) -> RoleMachine {
        RoleMachine::new(RoleRecord {
            state,
            generation: Generation(generation),
            since_unix_ms: 0,
            last_error: None,
            shared: None,
            offline: false,
            abandoned: None,
        })
    }

    #[test]
    fn a_promotion_given_up_on_is_finished_only_when_its_grant_arrives() {
        let mut m = at(RoleState::Backup, 1);
        m.handle(Event::PromoteRequested(None), 10).unwrap();
        // The data center did not answer in time: back to backup, the attempt remembered.
        let actions = m
            .handle(Event::StepFailed("no answer within 12 s".into()), 20)
            .unwrap();
        assert_eq!(m.record.state, RoleState::Backup);
        assert!(actions.contains(&Action::PullSync));
        assert_eq!(m.record.abandoned, Some(Generation(1)));
        // A report that says nothing new changes nothing.
        let actions = m
            .handle(
                Event::Authority {
                    role: Role::Backup,
                    generation: Generation(1),
                },
                30,
            )
            .unwrap();
        assert!(actions.is_empty());
        assert_eq!(m.record.state, RoleState::Backup);
        // The grant arrives after all: the data center fences the other box, so this one
        // finishes, and says so; the mark stays until it is primary (it makes the take-over
        // of the address a checked one).
        let actions = m
            .handle(
                Event::Authority {
                    role: Role::Primary,
                    generation: Generation(2),
                },
                40,
            )
            .unwrap();
        assert_eq!(
            m.record.state,
            RoleState::Promoting(PromoteStep::TakeAddress)
        );
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::Say(t) if t.contains("given up on earlier")))
        );
        assert_eq!(m.record.abandoned, Some(Generation(1)));
        m.handle(Event::StepDone, 50).unwrap();
        m.handle(Event::StepDone, 60).unwrap();
        assert_eq!(m.record.state, RoleState::Primary);
        assert_eq!(m.record.abandoned, None);
        // A new P starts without the mark.
        let mut m = at(RoleState::Backup, 1);
        m.record.abandoned = Some(Generation(1));
        m.handle(Event::PromoteRequested(None), 10).unwrap();
        assert_eq!(m.record.abandoned, None);
    }

    #[test]
    fn activation_gives_the_role_the_data_center_decided() {
        let mut m = at(RoleState::Unactivated, 0);
        let actions = m
            .handle(
                Event::Activated {
                    role: Role::Backup,
                    generation: Generation(1),
                },
                5,
            )
            .unwrap();
        assert_eq!(m.record.state, RoleState::Backup);
        assert_eq!(m.record.since_unix_ms, 5);
        assert!(actions.contains(&Action::PullSync));
        assert!(
            m.handle(
                Event::Activated {
                    role: Role::Primary,
                    generation: Generation(1)
                },
                6
            )
            .is_err()
        );
    }

    #[test]
    fn a_promotion_walks_its_steps_and_resumes_where_it_stopped() {
        let mut m = at(RoleState::Backup, 1);
        assert_eq!(
            m.handle(Event::PromoteRequested(None), 1).unwrap(),
            [
                Action::StopSync,
                Action::AskPromotion {
                    believed: Generation(1)
                }
            ]
        );
        // A crash here: the restart asks again (the data center answers a repeat).
        assert_eq!(
            m.resume(),
            [Action::AskPromotion {
                believed: Generation(1)
            }]
        );
        assert_eq!(
            m.handle(Event::Promoted(Generation(2)), 2).unwrap(),
            [Action::TakeAddress]
        );
        assert_eq!(m.record.generation, Generation(2));
        assert_eq!(m.resume(), [Action::TakeAddress]);
        // A failed step after the grant is retried, never rolled back.
        let retry = m
            .handle(Event::StepFailed("eth0 is down".into()), 3)
            .unwrap();
        assert_eq!(retry.last(), Some(&Action::TakeAddress));
        assert_eq!(m.record.last_error.as_deref(), Some("eth0 is down"));
        assert_eq!(m.handle(Event::StepDone, 4).unwrap(), [Action::StartPbx]);
        assert_eq!(m.record.state.wire_role(), Role::Primary);
        let done = m.handle(Event::StepDone, 5).unwrap();
        assert_eq!(m.record.state, RoleState::Primary);
        assert_eq!(m.record.last_error, None);
        assert!(done.contains(&Action::ServeSync));
    }

    #[test]
    fn a_refused_promotion_goes_back_to_backup_and_says_why() {
        let mut m = at(RoleState::Backup, 1);
        m.handle(Event::PromoteRequested(None), 1).unwrap();
        let actions = m
            .handle(Event::StepFailed("the primary answers ARP".into()), 2)
            .unwrap();
        assert_eq!(m.record.state, RoleState::Backup);
        assert!(actions.contains(&Action::PullSync));
        assert!(
            m.handle(Event::PromoteRequested(None), 3).is_ok(),
            "P can be pressed again"
        );
    }

    #[test]
    fn only_the_backup_is_promoted_and_only_a_fenced_box_is_demoted() {
        for state in [
            RoleState::Primary,
            RoleState::Fenced,
            RoleState::Unactivated,
        ] {
            assert!(
                at(state, 1)
                    .handle(Event::PromoteRequested(None), 0)
                    .is_err(),
                "{state}"
            );
        }
        for state in [RoleState::Primary, RoleState::Backup] {
            assert!(
                at(state, 1).handle(Event::DemoteRequested, 0).is_err(),
                "{state}"
            );
        }
    }

    #[test]
    fn a_primary_told_of_a_higher_generation_fences_itself_then_b_makes_it_backup() {
        let mut m = at(RoleState::Primary, 1);
        // The same generation, or a report that still calls it primary, changes nothing.
        assert!(
            m.handle(
                Event::Authority {
                    role: Role::Primary,
                    generation: Generation(1)
                },
                1
            )
            .unwrap()
            .is_empty()
        );
        let actions = m
            .handle(
                Event::Authority {
                    role: Role::Fenced,
                    generation: Generation(2),
                },
                2,
            )
            .unwrap();
        assert_eq!(m.record.state, RoleState::Fenced);
        assert!(actions.contains(&Action::StopPbx) && actions.contains(&Action::GiveUpAddress));
        assert_eq!(
            m.resume(),
            [Action::StopSync, Action::StopPbx, Action::GiveUpAddress]
        );
        assert_eq!(
            m.handle(Event::DemoteRequested, 3).unwrap(),
            [Action::StopPbx]
        );
        assert_eq!(
            m.handle(Event::StepDone, 4).unwrap(),
            [Action::GiveUpAddress]
        );
        assert_eq!(m.resume(), [Action::GiveUpAddress]);
        assert_eq!(
            m.handle(Event::StepDone, 5).unwrap(),
            [Action::RegisterBackup]
        );
        let actions = m.handle(Event::StepDone, 6).unwrap();
        assert_eq!(m.record.state, RoleState::Backup);
        assert!(actions.contains(&Action::PullSync));
    }

    const ALL_STATES: [RoleState; 10] = [
        RoleState::Unactivated,
        RoleState::Primary,
        RoleState::Backup,
        RoleState::Fenced,
        RoleState::Promoting(PromoteStep::AskAuthority),
        RoleState::Promoting(PromoteStep::TakeAddress),
        RoleState::Promoting(PromoteStep::StartPbx),
        RoleState::Demoting(DemoteStep::StopPbx),
        RoleState::Demoting(DemoteStep::GiveUpAddress),
        RoleState::Demoting(DemoteStep::Register),
    ];

    fn all_events(generation: u64) -> Vec<Event> {
        let mut events = vec![
            Event::AddressTaken {
                by: "5a:ec:b4:27:71:cf".into(),
            },
            Event::PromoteRequested(None),
            Event::PromoteOffline(None),
            Event::DemoteRequested,
            Event::StepDone,
            Event::StepFailed("cable pulled".into()),
        ];
        for g in [generation.saturating_sub(1), generation, generation + 1] {
            events.push(Event::Promoted(Generation(g)));
            for role in [Role::Unactivated, Role::Primary, Role::Backup, Role::Fenced] {
                events.push(Event::Activated {
                    role,
                    generation: Generation(g),
                });
                events.push(Event::Authority {
                    role,
                    generation: Generation(g),
                });
            }
        }
        events
    }

    /// Every event in every state: a refusal changes nothing; the generation never goes
    /// down; a box only starts serving phones (wire role primary) from a promotion's address
    /// step (granted by the data center, or consented offline), never straight from backup,
    /// fenced or a demotion (split brain); a higher generation where another box is primary always
    /// fences a primary; and whatever the state, `resume` has something sensible to do.
    #[test]
    fn every_event_in_every_state_keeps_the_rules() {
        for state in ALL_STATES {
            for event in all_events(5) {
                let mut m = at(state, 5);
                let before = m.record.clone();
                let result = m.handle(event.clone(), 100);
                let after = m.record.clone();
                let case = format!("{state} + {event:?} -> {}", after.state);
                match &result {
                    Err(_) => assert_eq!(after, before, "{case}: refused but changed"),
                    // An unactivated box takes the data center's generation, whatever it is.
                    Ok(_) if state == RoleState::Unactivated => {}
                    Ok(_) => assert!(after.generation >= before.generation, "{case}"),
                }
                let serving_before = before.state.wire_role() == Role::Primary;
                let serving_after = after.state.wire_role() == Role::Primary;
                if serving_after && !serving_before && state != RoleState::Unactivated {
                    assert!(
                        matches!(
                            (state, &event),
                            (
                                RoleState::Promoting(PromoteStep::TakeAddress),
                                Event::StepDone
                            )
                        ),
                        "{case}: became primary without the address step"
                    );
                    assert!(after.generation >= Generation(5), "{case}");
                }
                if matches!(state, RoleState::Backup | RoleState::Fenced)
                    || matches!(state, RoleState::Demoting(_))
                {
                    assert!(
                        !matches!(after.state, RoleState::Primary),
                        "{case}: primary without a promotion"
                    );
                }
                if let Event::Authority { role, generation } = &event
                    && *generation > Generation(5)
                    && *role != Role::Primary
                    && matches!(state, RoleState::Primary | RoleState::Promoting(_))
                {
                    assert_eq!(after.state, RoleState::Fenced, "{case}");
                    let actions = result.as_ref().unwrap();
                    assert!(actions.contains(&Action::GiveUpAddress), "{case}");
                    assert!(actions.contains(&Action::StopPbx), "{case}");
                }
                // After a crash in any state, the restart knows what to do.
                let resumed = m.resume();
                match after.state {
                    RoleState::Unactivated => assert!(resumed.is_empty(), "{case}"),
                    RoleState::Promoting(_) | RoleState::Demoting(_) => {
                        assert_eq!(resumed, vec![m.current_step().unwrap()], "{case}")
                    }
                    RoleState::Fenced => {
                        assert!(resumed.contains(&Action::GiveUpAddress), "{case}")
                    }
                    RoleState::Primary => {
                        assert_eq!(resumed, [Action::ServeSync, Action::StartPbx], "{case}")
                    }
                    RoleState::Backup => {
                        assert_eq!(resumed, [Action::PullSync, Action::StopPbx], "{case}")
                    }
                }
            }
        }
    }

    #[test]
    fn a_promotion_granted_but_not_recorded_is_finished_at_the_next_report() {
        // The box crashed between the data center's grant and recording it; after the
        // restart the data center was unreachable, so the step failed and it went back to
        // backup. The next report says it is primary at gen 2: it finishes the promotion.
        for state in [
            RoleState::Backup,
            RoleState::Promoting(PromoteStep::AskAuthority),
        ] {
            let mut m = at(state, 1);
            let actions = m
                .handle(
                    Event::Authority {
                        role: Role::Primary,
                        generation: Generation(2),
                    },
                    1,
                )
                .unwrap();
            assert_eq!(
                m.record.state,
                RoleState::Promoting(PromoteStep::TakeAddress)
            );
            assert_eq!(actions.last(), Some(&Action::TakeAddress));
            assert_eq!(m.record.generation, Generation(2));
        }
        // The same generation (a primary that knows it is) changes nothing for a backup.
        let mut m = at(RoleState::Backup, 2);
        let actions = m
            .handle(
                Event::Authority {
                    role: Role::Primary,
                    generation: Generation(2),
                },
                1,
            )
            .unwrap();
        assert!(actions.is_empty());
        assert_eq!(m.record.state, RoleState::Backup);
    }

    #[test]
    fn a_returning_primary_that_finds_its_address_taken_steps_back() {
        let mut m = at(RoleState::Primary, 1);
        let actions = m
            .handle(
                Event::AddressTaken {
                    by: "5a:ec:b4:27:71:cf".into(),
                },
                1,
            )
            .unwrap();
        assert_eq!(m.record.state, RoleState::Fenced);
        assert!(actions.contains(&Action::GiveUpAddress) && actions.contains(&Action::StopPbx));
        // A backup (or anyone else) finding the address answered changes nothing.
        let mut m = at(RoleState::Backup, 1);
        let actions = m.handle(Event::AddressTaken { by: "x".into() }, 1).unwrap();
        assert!(actions.is_empty());
        assert_eq!(m.record.state, RoleState::Backup);
    }

    #[test]
    fn an_offline_promotion_is_reconciled_when_the_data_center_answers() {
        let mut m = at(RoleState::Backup, 3);
        let actions = m.handle(Event::PromoteOffline(None), 1).unwrap();
        assert_eq!(actions.last(), Some(&Action::TakeAddress));
        assert!(m.record.offline);
        m.handle(Event::StepDone, 2).unwrap();
        m.handle(Event::StepDone, 3).unwrap();
        assert_eq!(m.record.state, RoleState::Primary);
        assert_eq!(
            m.record.generation,
            Generation(3),
            "no grant, no new generation"
        );
        // A restart reconciles too (the step the machine waits for).
        assert_eq!(
            m.current_step(),
            Some(Action::AskPromotion {
                believed: Generation(3)
            })
        );
        // The data center answers, not knowing of it (it calls this box fenced at gen 3):
        // it is asked for the promotion from gen 3.
        let fenced_here = Event::Authority {
            role: Role::Fenced,
            generation: Generation(3),
        };
        assert_eq!(
            m.handle(fenced_here.clone(), 4).unwrap(),
            [Action::AskPromotion {
                believed: Generation(3)
            }]
        );
        assert_eq!(m.record.state, RoleState::Primary);
        // A failure is kept and asked again at the next answer.
        assert!(
            m.handle(Event::StepFailed("timeout".into()), 5)
                .unwrap()
                .is_empty()
        );
        assert!(m.record.last_error.is_some());
        assert_eq!(m.handle(fenced_here, 6).unwrap().len(), 1);
        m.handle(Event::Promoted(Generation(4)), 7).unwrap();
        assert_eq!(
            (m.record.state, m.record.generation, m.record.offline),
            (RoleState::Primary, Generation(4), false)
        );
        assert_eq!(m.current_step(), None);
        // Meanwhile the pair moved on: the data center's word wins, this box steps back.
        let mut m = at(RoleState::Backup, 3);
        m.handle(Event::PromoteOffline(None), 1).unwrap();
        m.handle(Event::StepDone, 2).unwrap();
        m.handle(Event::StepDone, 3).unwrap();
        let actions = m
            .handle(
                Event::Authority {
                    role: Role::Fenced,
                    generation: Generation(4),
                },
                4,
            )
            .unwrap();
        assert_eq!(m.record.state, RoleState::Fenced);
        assert!(!m.record.offline);
        assert!(actions.contains(&Action::GiveUpAddress));
    }

    #[test]
    fn two_presses_of_p_promote_once() {
        let mut m = at(RoleState::Backup, 1);
        m.handle(Event::PromoteRequested(None), 1).unwrap();
        let second = m.handle(Event::PromoteRequested(None), 1).unwrap_err();
        assert!(second.0.contains("under way"), "{second}");
        // The grant arrives once; a second grant in the next step does not apply.
        m.handle(Event::Promoted(Generation(2)), 2).unwrap();
        assert!(m.handle(Event::Promoted(Generation(2)), 2).is_err());
        assert_eq!(
            m.record.state,
            RoleState::Promoting(PromoteStep::TakeAddress)
        );
    }

    #[test]
    fn the_record_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("role.json");
        assert_eq!(RoleRecord::load(&path).unwrap(), RoleRecord::new());
        let record = at(RoleState::Demoting(DemoteStep::GiveUpAddress), 7).record;
        record.save(&path).unwrap();
        assert_eq!(RoleRecord::load(&path).unwrap(), record);
        std::fs::write(&path, "{ torn").unwrap();
        assert!(RoleRecord::load(&path).is_err());
    }
}
