//! Automatic failover: the decision, pure, and the task that gathers its facts.

use std::sync::Arc;
use std::time::Duration;

use lbs_protocol::control::{self};
use tokio_util::sync::CancellationToken;

use crate::role::RoleState;

use crate::daemon::checks::{Asked, promote_checks};
use crate::daemon::state::{Shared, lock, now_ms, promote_unattended};

/// Automatic failover's decisions, a pure function of the time and what the backup knows
/// (shaped like `vpn::Failover`): the task feeds it facts four times a second and carries out what
/// it says.
#[derive(Clone, Debug)]
pub(crate) struct AutoFailover {
    /// When the agent started: a backup that has not heard the primary since counts its
    /// silence from then, not from never.
    started_ms: u64,
    /// When this box last became the backup (B after a fencing, a hand-over): it has not had
    /// the chance to hear the primary before, so its silence counts from then (chaos seed
    /// 2808 run 31: B pressed, and 1.6 s later the backup promoted itself over a primary whose
    /// cable had just come back, on a silence it had counted while fenced).
    backup_since_ms: u64,
    /// Whether the last tick saw a backup.
    was_backup: bool,
    gone_after_ms: u64,
    /// After a promotion attempt, the next waits a while.
    not_before_ms: u64,
}

/// What the backup knows, each tick.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AutoFacts {
    pub(crate) enabled: bool,
    pub(crate) state: RoleState,
    /// When this box last heard the primary itself.
    pub(crate) primary_heard_ms: Option<u64>,
}

/// What to do this tick.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Tick {
    /// Nothing: off, not the backup, or waiting after an attempt.
    Idle,
    /// The primary was heard lately: nothing, and this is why.
    Hold(String),
    /// The primary is gone for this box: run P's checks, and promote if they pass.
    Check,
}

impl AutoFailover {
    pub(crate) fn new(started_ms: u64, gone_after_ms: u64) -> AutoFailover {
        AutoFailover {
            started_ms,
            backup_since_ms: started_ms,
            was_backup: true,
            gone_after_ms,
            not_before_ms: started_ms,
        }
    }

    pub(crate) fn tick(&mut self, now_ms: u64, facts: AutoFacts) -> Tick {
        let is_backup = facts.state == RoleState::Backup;
        if is_backup && !self.was_backup {
            self.backup_since_ms = now_ms;
        }
        self.was_backup = is_backup;
        if !facts.enabled || !is_backup || now_ms < self.not_before_ms {
            return Tick::Idle;
        }
        let heard = facts.primary_heard_ms.unwrap_or(0);
        // Never before the agent started: `backup_since_ms` starts there and only moves on.
        let baseline = self.backup_since_ms;
        let silent = now_ms.saturating_sub(heard.max(baseline));
        if silent < self.gone_after_ms {
            let ago = silent as f64 / 1000.0;
            return Tick::Hold(if heard >= baseline {
                format!("on: this box heard the primary {ago:.1} s ago")
            } else if self.backup_since_ms > self.started_ms {
                format!("on: this box became the backup {ago:.1} s ago")
            } else {
                format!("on: this box started {ago:.1} s ago")
            });
        }
        Tick::Check
    }

    /// A promotion was started: the next attempt (if the data center refused this one) waits
    /// 30 s.
    pub(crate) fn promoted(&mut self, now_ms: u64) {
        self.not_before_ms = now_ms.saturating_add(30_000);
    }

    /// Why it promotes, for the journal and `lbs status`.
    pub(crate) fn why(&self) -> String {
        format!(
            "AUTOMATIC FAILOVER: neither this box nor the data center heard the primary for {} s; promoting",
            self.gone_after_ms / 1000
        )
    }
}

/// How often the facts are looked at: the primary's death is acted on within this of
/// `primary_gone_after_s` (a look is a few reads of memory).
const LOOK_EVERY: Duration = Duration::from_millis(250);

/// After P's checks refused (they probe the shared address with ARP), the next try waits this.
const CHECK_AGAIN: Duration = Duration::from_secs(1);

/// Automatic failover (`auto_failover = true`): the backup promotes itself when it has not
/// heard the primary itself for `primary_gone_after_s` *and* the data center (reachable) has
/// not either — then the same checks as **P** (nobody answers ARP for the shared address
/// included) and the same steps. The data center's compare-and-set keeps it to one primary.
pub(crate) async fn auto_failover(shared: Arc<Shared>, shutdown: CancellationToken) {
    let gone_ms = u64::try_from(shared.config().primary_gone_after.as_millis()).unwrap_or(u64::MAX);
    let mut decide = AutoFailover::new(now_ms(), gone_ms);
    let mut said = String::new();
    let mut wait = LOOK_EVERY;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        wait = LOOK_EVERY;
        // One lock at a time (a guard in the struct expression would live to its end).
        let state = lock(&shared.machine).record.state;
        let primary_heard_ms = *lock(&shared.partner_heard_ms);
        let facts = AutoFacts {
            enabled: shared.config().auto_failover,
            state,
            primary_heard_ms,
        };
        let decision = match decide.tick(now_ms(), facts) {
            Tick::Idle => continue,
            Tick::Hold(why) => Err(why),
            Tick::Check => {
                // Checks that were refused (they may have probed the LAN) wait longer.
                wait = CHECK_AGAIN;
                promote_checks(&shared, Asked::default(), None)
                    .await
                    .map_err(|why| format!("on: not promoting: {why}"))
            }
        };
        match decision {
            Ok(checks) => {
                let why = decide.why();
                *lock(&shared.auto_failover) = Some(format!("on: promoted itself ({why})"));
                *lock(&shared.promotion_kind) = control::PromotionKind::Automatic;
                promote_unattended(&shared, &why, &checks);
                decide.promoted(now_ms());
            }
            Err(why) => {
                // Logged when the reason changes, not when only its seconds do.
                let kind: String = why.chars().filter(|c| !c.is_ascii_digit()).collect();
                if kind != said {
                    tracing::info!("automatic failover {why}");
                    said = kind;
                }
                *lock(&shared.auto_failover) = Some(why);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GONE: u64 = 10_000;

    fn backup(heard: Option<u64>) -> AutoFacts {
        AutoFacts {
            enabled: true,
            state: RoleState::Backup,
            primary_heard_ms: heard,
        }
    }

    #[test]
    fn the_backup_promotes_itself_only_after_the_primary_is_silent_long_enough() {
        let start = 1_000_000;
        let mut auto = AutoFailover::new(start, GONE);
        // Never heard since the agent started: silence counts from the start, not from never.
        assert!(matches!(
            auto.tick(start + 1_000, backup(None)),
            Tick::Hold(_)
        ));
        assert_eq!(auto.tick(start + GONE, backup(None)), Tick::Check);
        // Heard 2 s ago: alive.
        let now = start + 60_000;
        assert_eq!(
            auto.tick(now, backup(Some(now - 2_000))),
            Tick::Hold("on: this box heard the primary 2.0 s ago".into())
        );
        assert_eq!(auto.tick(now, backup(Some(now - GONE))), Tick::Check);
        // Heard before the agent started (a stale record): counts from the start.
        let mut fresh = AutoFailover::new(now, GONE);
        assert!(matches!(
            fresh.tick(now + 1, backup(Some(1))),
            Tick::Hold(_)
        ));
    }

    #[test]
    fn chaos_seed_2808_run_31_a_box_that_just_became_the_backup_gives_the_primary_time() {
        let start = 1_000_000;
        let mut auto = AutoFailover::new(start, GONE);
        // The primary was last heard long ago, while this box was fenced (its cable was out).
        let fenced = AutoFacts {
            state: RoleState::Fenced,
            ..backup(Some(start + 1_000))
        };
        assert_eq!(auto.tick(start + 60_000, fenced), Tick::Idle);
        // B: the backup from now; silence counts from here, not from the last word.
        let b = start + 61_000;
        assert!(matches!(
            auto.tick(b, backup(Some(start + 1_000))),
            Tick::Hold(_)
        ));
        assert_eq!(
            auto.tick(b + 1_500, backup(Some(start + 1_000))),
            Tick::Hold("on: this box became the backup 1.5 s ago".into())
        );
        // Heard meanwhile: that counts as ever.
        assert_eq!(
            auto.tick(b + 3_000, backup(Some(b + 2_000))),
            Tick::Hold("on: this box heard the primary 1.0 s ago".into())
        );
        // Still silent a whole GONE after becoming the backup: the primary is gone.
        assert_eq!(
            auto.tick(b + 1_500 + GONE, backup(Some(start + 1_000))),
            Tick::Check
        );
    }

    #[test]
    fn only_an_enabled_backup_acts_and_an_attempt_waits_before_the_next() {
        let mut auto = AutoFailover::new(0, GONE);
        let now = 100_000;
        for state in [
            RoleState::Primary,
            RoleState::Fenced,
            RoleState::Promoting(crate::role::PromoteStep::AskAuthority),
        ] {
            let facts = AutoFacts {
                state,
                ..backup(None)
            };
            assert_eq!(auto.tick(now - GONE - 1, facts), Tick::Idle, "{state:?}");
        }
        let off = AutoFacts {
            enabled: false,
            ..backup(None)
        };
        // Off, but the backup since now: its silence counts from here when it is turned on.
        assert_eq!(auto.tick(now - GONE, off), Tick::Idle);
        assert_eq!(auto.tick(now, backup(None)), Tick::Check);
        auto.promoted(now);
        assert_eq!(auto.tick(now + 29_000, backup(None)), Tick::Idle);
        assert_eq!(auto.tick(now + 30_000, backup(None)), Tick::Check);
    }
}
