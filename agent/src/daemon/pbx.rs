//! The primary's PBX health check (`pbx_check`) and the hand-over it leads to with
//! `auto_failover`: the primary asks the data center, the backup takes it only in sync.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use lbs_protocol::Message;
use lbs_protocol::control::{self, RemotePromotion};
use tokio_util::sync::CancellationToken;

use crate::daemon::dc::{
    DC_DEADLINE, PROMOTION_DEADLINE, apply_pair_state, connect_dc_negotiated, restart_replication,
};
use crate::daemon::state::{HEARTBEAT, RoleNotice, Shared, lock, now_ms, promote_unattended};
use crate::daemon::steps::hook;
use crate::role::RoleState;
use crate::status::{PbxHealth, SetState, SetStatus};

/// The primary's PBX health check (`pbx_check`, like keepalived's `track_script`): run every
/// interval within its deadline; after `fails` failures in a row the PBX is restarted
/// (`pbx_stop`, `pbx_start`) up to `restart_tries` times, then declared down: status degraded,
/// the journal and the notify hook told. Only on the primary; the state resets elsewhere.
pub(crate) async fn pbx_health(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut last_hand_over: Option<Instant> = None;
    loop {
        let config = shared.config();
        let interval = config
            .pbx_check
            .as_ref()
            .map_or(Duration::from_secs(5), |c| c.interval);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let (Some(check), RoleState::Primary) =
            (config.pbx_check.clone(), lock(&shared.machine).record.state)
        else {
            *lock(&shared.pbx) = None;
            continue;
        };
        let outcome = tokio::select! {
            () = shutdown.cancelled() => return,
            outcome = run_check(&check) => outcome,
        };
        let mut health = lock(&shared.pbx).clone().unwrap_or_default();
        health.checked_ms = now_ms();
        health.ok = outcome.is_ok();
        match outcome {
            Ok(()) => {
                if health.failures > 0 {
                    tracing::info!("the PBX is healthy again (`{}`)", check.command);
                }
                health = PbxHealth {
                    checked_ms: health.checked_ms,
                    ok: true,
                    ..PbxHealth::default()
                };
            }
            Err(why) => {
                health.failures += 1;
                tracing::warn!(
                    "PBX check `{}` failed ({} in a row): {why}",
                    check.command,
                    health.failures
                );
                health.last_failure = Some(why);
            }
        }
        let restart =
            !health.ok && health.failures >= check.fails && health.restarts < check.restart_tries;
        let declare = !health.ok
            && health.failures >= check.fails
            && health.restarts >= check.restart_tries
            && !health.down;
        if restart {
            health.restarts += 1;
            health.failures = 0;
        }
        if declare {
            health.down = true;
        }
        *lock(&shared.pbx) = Some(health.clone());
        if restart {
            tracing::warn!(
                "the PBX failed its check {} times in a row: restarting it ({} of {})",
                check.fails,
                health.restarts,
                check.restart_tries
            );
            let stop = hook(&config.pbx_stop, "pbx_stop", "PBX stop").await;
            let start = hook(&config.pbx_start, "pbx_start", "PBX start").await;
            for outcome in [stop, start] {
                if let Err(err) = outcome {
                    tracing::error!("restarting the PBX: {err:#}");
                }
            }
        }
        if health.down
            && config.auto_failover
            && last_hand_over.is_none_or(|at: Instant| at.elapsed() >= HAND_OVER_RETRY)
        {
            last_hand_over = Some(Instant::now());
            let reason = format!(
                "its PBX stays unhealthy after {} restart(s): {}",
                health.restarts,
                health.last_failure.as_deref().unwrap_or("no reason given")
            );
            match ask_hand_over(&shared, &reason).await {
                Ok(()) => tracing::warn!(
                    "automatic failover: asked the data center to hand the role to the backup ({reason})"
                ),
                Err(err) => tracing::warn!(
                    "automatic failover: no hand-over: {err:#}; again in {} s",
                    HAND_OVER_RETRY.as_secs()
                ),
            }
        }
        if declare {
            let why = format!(
                "the PBX stays unhealthy after {} restart(s): {}; phones may get no service — fix it, or press P on the backup",
                health.restarts,
                health.last_failure.as_deref().unwrap_or("no reason given")
            );
            tracing::error!("{why}");
            let _ = shared.notices.send(RoleNotice {
                role: "pbx-down".into(),
                generation: lock(&shared.machine).record.generation,
                reason: why,
            });
        }
    }
}

/// How often a primary whose PBX is down asks again to hand over (the data center refuses
/// while the backup is not in sync or within its hold-off).
const HAND_OVER_RETRY: Duration = Duration::from_secs(30);

/// Asks the data center to hand this primary's role to the backup.
async fn ask_hand_over(shared: &Shared, reason: &str) -> anyhow::Result<()> {
    tokio::time::timeout(PROMOTION_DEADLINE, async {
        let (mut conn, address, version) = connect_dc_negotiated(shared).await?;
        if version < control::HAND_OVERS {
            bail!("the data center at {address} speaks protocol {version}: hand-overs need 1.4");
        }
        let generation = lock(&shared.machine).record.generation;
        let answer = control::call(
            &mut conn,
            generation,
            Message::HandOver {
                reason: reason.to_owned(),
            },
            DC_DEADLINE,
        )
        .await
        .with_context(|| format!("data center at {address}"))?;
        if let (_, Message::PairState(state)) = answer
            && apply_pair_state(shared, state)
        {
            restart_replication(shared);
        }
        anyhow::Ok(())
    })
    .await
    .unwrap_or_else(|_| {
        Err(anyhow::anyhow!(
            "no answer from the data center within {} s",
            PROMOTION_DEADLINE.as_secs()
        ))
    })
}

/// Runs the PBX check once: `Ok` on exit 0, else what went wrong (its output's last line).
async fn run_check(check: &crate::config::PbxCheck) -> Result<(), String> {
    let run = crate::hook::run(&check.command, &[], &[], true, check.timeout);
    match run.await {
        Ok(crate::hook::Ended::TimedOut) => {
            Err(format!("no answer within {} s", check.timeout.as_secs()))
        }
        Err(err) => Err(format!("cannot run it: {err}")),
        Ok(crate::hook::Ended::Exited(status, _)) if status.success() => Ok(()),
        Ok(crate::hook::Ended::Exited(status, said)) => {
            let last = said
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            Err(format!(
                "{}{}",
                status,
                if last.is_empty() {
                    String::new()
                } else {
                    format!(": {last}")
                }
            ))
        }
    }
}

/// The primary hands over (its PBX is down): this backup promotes itself only when every set
/// is in sync as of a pass after the primary's last notice and the primary's watch
/// connection is alive (so that is current); the data center's "heard the primary" and the
/// ARP check do not apply — the primary lives and asked. Its address is taken with force, and
/// the primary steps back the moment it sees this box announce it. The reason when refused.
pub(crate) fn take_hand_over(
    shared: &Shared,
    request: &RemotePromotion,
    why: &str,
) -> Option<String> {
    tracing::warn!(
        "the primary hands over to this box (request {}): {why}",
        request.id
    );
    let refusal = hand_over_refusal(
        lock(&shared.machine).record.state,
        &lock(&shared.sets),
        *lock(&shared.partner_heard_ms),
        now_ms(),
    );
    if let Some(why) = &refusal {
        tracing::warn!("the hand-over is refused: {why}");
        return refusal;
    }
    *lock(&shared.promotion_kind) = control::PromotionKind::HandOver;
    promote_unattended(
        shared,
        &format!("promoting: the primary hands over ({why})"),
        &[],
    );
    None
}

/// Why this box cannot take a hand-over now, if it cannot (pure).
pub(crate) fn hand_over_refusal(
    state: RoleState,
    sets: &[SetStatus],
    primary_heard_ms: Option<u64>,
    now: u64,
) -> Option<String> {
    if state != RoleState::Backup {
        return Some(format!("this box is {state}, not the backup"));
    }
    let behind: Vec<String> = sets
        .iter()
        .filter(|s| s.state != SetState::InSync)
        .map(|s| format!("{} {}", s.name, s.state))
        .collect();
    if !behind.is_empty() {
        return Some(format!(
            "this backup is not in sync ({}): it does not take over a live primary's role",
            behind.join(", ")
        ));
    }
    match primary_heard_ms {
        Some(at) if now.saturating_sub(at) <= 3 * HEARTBEAT.as_millis() as u64 => None,
        _ => Some(
            "this backup does not hear the primary now, so its copy may be behind: not taking a hand-over"
                .to_owned(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hand_over_is_taken_only_by_a_backup_in_sync_that_hears_the_primary() {
        let set = |name: &str, state: SetState| SetStatus {
            name: name.into(),
            state,
            ..SetStatus::default()
        };
        let now = 100_000;
        let in_sync = [
            set("voicemail", SetState::InSync),
            set("config", SetState::InSync),
        ];
        assert_eq!(
            hand_over_refusal(RoleState::Backup, &in_sync, Some(now - 500), now),
            None
        );
        let behind = [
            set("voicemail", SetState::Changed),
            set("config", SetState::InSync),
        ];
        let why = hand_over_refusal(RoleState::Backup, &behind, Some(now - 500), now).unwrap();
        assert!(why.contains("not in sync (voicemail changed)"), "{why}");
        let why = hand_over_refusal(RoleState::Backup, &in_sync, Some(now - 10_000), now).unwrap();
        assert!(why.contains("does not hear the primary"), "{why}");
        assert!(hand_over_refusal(RoleState::Backup, &in_sync, None, now).is_some());
        assert!(hand_over_refusal(RoleState::Fenced, &in_sync, Some(now), now).is_some());
    }
}
