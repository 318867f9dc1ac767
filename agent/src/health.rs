//! Is this box well? A pure judgement of what the agent knows, for `lbs status`'s exit code
//! (0 well, 1 degraded) and its first line, so that monitoring (Nagios, a provider's probe)
//! and the operator read the same verdict.

use crate::role::RoleState;
use crate::status::{Problem, SetState};

/// What the judgement reads.
#[derive(Clone, Debug)]
pub struct Facts<'a> {
    /// Now (ms since the epoch).
    pub now_ms: u64,
    pub state: RoleState,
    /// Per set: name, state, oldest change waiting (ms since the epoch).
    pub sets: Vec<(&'a str, SetState, Option<u64>)>,
    /// When the data center last answered.
    pub datacenter_answered_ms: Option<u64>,
    /// How long the data center has not heard the partner (aged to now), when told.
    pub partner_silent_ms: Option<u64>,
    /// Whether a partner is provisioned at all.
    pub has_partner: bool,
    /// When this backup last heard the primary itself.
    pub primary_heard_ms: Option<u64>,
    /// Whether the shared address is withdrawn.
    pub withdrawn: bool,
    /// A device other than the partner last seen answering for the shared address (its MAC,
    /// when).
    pub stranger: Option<(String, u64)>,
    /// The PBX check's failures, restarts and verdict, when its last check failed.
    pub pbx_down: Option<(u32, u32, bool)>,
    /// Why the last start of the PBX failed, when it did (and none succeeded since).
    pub pbx_start_failed: Option<String>,
    /// Silence longer than this is a problem (ms): three report intervals.
    pub silent_after_ms: u64,
}

/// How long a stranger answering for the shared address stays an alarm after it was last seen.
const STRANGER_REMEMBERED_MS: u64 = 10 * 60 * 1000;

/// Why the last start of the PBX failed, if the last one recorded did (`steps`: the role
/// steps, oldest first).
pub fn pbx_start_failed(steps: &[lbs_protocol::control::StepReport]) -> Option<String> {
    steps
        .iter()
        .rev()
        .find(|step| step.step == "start-pbx")
        .and_then(|step| step.error.clone())
}

/// Every problem, in the order an operator should look at them; empty when all is well.
pub fn judge(facts: &Facts<'_>) -> Vec<Problem> {
    let mut problems = Vec::new();
    let since = |at: Option<u64>| at.map(|at| facts.now_ms.saturating_sub(at));
    match facts.state {
        RoleState::Fenced => problems.push(Problem::Fenced),
        RoleState::Promoting(_) | RoleState::Demoting(_) => {
            problems.push(Problem::RoleChanging {
                state: facts.state.to_string(),
            });
        }
        RoleState::Backup => {
            for (set, state, changed) in &facts.sets {
                if *state != SetState::InSync {
                    problems.push(Problem::NotInSync {
                        set: (*set).to_owned(),
                        state: *state,
                        behind_ms: since(*changed),
                    });
                }
            }
            if facts.has_partner {
                let heard = since(facts.primary_heard_ms);
                if heard.is_none_or(|ms| ms > facts.silent_after_ms) {
                    problems.push(Problem::PartnerSilent { for_ms: heard });
                }
            }
        }
        RoleState::Primary => {
            if let Some(why) = &facts.pbx_start_failed {
                problems.push(Problem::PbxNotStarted { why: why.clone() });
            }
            if let Some((failures, restarts, down)) = facts.pbx_down {
                problems.push(Problem::PbxUnhealthy {
                    failures,
                    restarts,
                    down,
                });
            }
            if facts.withdrawn {
                problems.push(Problem::AddressWithdrawn);
            }
            if let Some((mac, at)) = &facts.stranger
                && facts.now_ms.saturating_sub(*at) < STRANGER_REMEMBERED_MS
            {
                problems.push(Problem::DuplicateAddress {
                    by: mac.clone(),
                    ago_ms: facts.now_ms.saturating_sub(*at),
                });
            }
            if facts.has_partner
                && facts
                    .partner_silent_ms
                    .is_none_or(|ms| ms > facts.silent_after_ms)
            {
                problems.push(Problem::PartnerSilent {
                    for_ms: facts.partner_silent_ms,
                });
            }
        }
        RoleState::Unactivated => {}
    }
    let answered = since(facts.datacenter_answered_ms);
    if answered.is_none_or(|ms| ms > facts.silent_after_ms) {
        problems.push(Problem::DataCenterSilent { for_ms: answered });
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn well_backup() -> Facts<'static> {
        Facts {
            now_ms: 100_000,
            state: RoleState::Backup,
            sets: vec![
                ("voicemail", SetState::InSync, None),
                ("config", SetState::InSync, None),
            ],
            datacenter_answered_ms: Some(99_000),
            partner_silent_ms: Some(1_000),
            has_partner: true,
            primary_heard_ms: Some(99_500),
            withdrawn: false,
            stranger: None,
            pbx_down: None,
            pbx_start_failed: None,
            silent_after_ms: 15_000,
        }
    }

    #[test]
    fn a_primary_whose_last_pbx_start_failed_is_degraded_until_one_succeeds() {
        let step = |step: &str, error: Option<&str>| lbs_protocol::control::StepReport {
            at_ms: 1,
            step: step.into(),
            took_ms: 5,
            error: error.map(Into::into),
        };
        let failed = vec![
            step("take-address", None),
            step("start-pbx", Some("`pbx-start` failed: exit status: 255")),
        ];
        let why = pbx_start_failed(&failed);
        let facts = Facts {
            state: RoleState::Primary,
            pbx_start_failed: why.clone(),
            ..well_backup()
        };
        assert_eq!(
            judge(&facts),
            vec![Problem::PbxNotStarted {
                why: "`pbx-start` failed: exit status: 255".into()
            }]
        );
        assert_eq!(
            judge(&facts)[0].to_string(),
            "the PBX did not start: `pbx-start` failed: exit status: 255"
        );
        // Started again since (the guard, after taking the address back): well.
        let mut again = failed.clone();
        again.push(step("start-pbx", None));
        assert_eq!(pbx_start_failed(&again), None);
        // Other steps after the failure do not hide it.
        let mut later = failed;
        later.push(step("register-backup", None));
        assert_eq!(pbx_start_failed(&later), why);
    }

    #[test]
    fn a_backup_in_sync_that_hears_everyone_is_well() {
        assert_eq!(judge(&well_backup()), Vec::new());
    }

    #[test]
    fn each_fault_is_named_with_its_size() {
        let mut facts = well_backup();
        facts.sets[0] = ("voicemail", SetState::Changed, Some(97_000));
        facts.primary_heard_ms = Some(80_000);
        facts.datacenter_answered_ms = None;
        let problems = judge(&facts);
        assert_eq!(
            problems,
            vec![
                Problem::NotInSync {
                    set: "voicemail".into(),
                    state: SetState::Changed,
                    behind_ms: Some(3_000)
                },
                Problem::PartnerSilent {
                    for_ms: Some(20_000)
                },
                Problem::DataCenterSilent { for_ms: None },
            ]
        );
        assert_eq!(problems[0].to_string(), "voicemail changed, 3 s behind");
    }

    #[test]
    fn a_primary_is_judged_on_its_address_and_its_backup_not_on_copies() {
        let mut facts = well_backup();
        facts.state = RoleState::Primary;
        facts.sets = vec![("voicemail", SetState::Serving, None)];
        facts.primary_heard_ms = None;
        assert_eq!(judge(&facts), Vec::new());
        facts.withdrawn = true;
        facts.partner_silent_ms = Some(60_000);
        assert_eq!(
            judge(&facts),
            vec![
                Problem::AddressWithdrawn,
                Problem::PartnerSilent {
                    for_ms: Some(60_000)
                }
            ]
        );
        // A primary without a partner provisioned yet is not degraded for that.
        facts.has_partner = false;
        facts.withdrawn = false;
        assert_eq!(judge(&facts), Vec::new());
    }

    #[test]
    fn fenced_and_changing_boxes_are_degraded() {
        let mut facts = well_backup();
        facts.state = RoleState::Fenced;
        assert_eq!(judge(&facts), vec![Problem::Fenced]);
        facts.state = RoleState::Promoting(crate::role::PromoteStep::TakeAddress);
        assert!(matches!(judge(&facts)[0], Problem::RoleChanging { .. }));
    }
}
