//! Reports to the data center every few seconds; its answer (the pair's state, a promotion or
//! hand-over it asks for) goes through the role machine.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use lbs_protocol::control::{self, BoxReport, RemotePromotion, SyncSummary, TunnelSummary};
use lbs_protocol::{Message, SoftwareVersion};
use tokio_util::sync::CancellationToken;

use crate::daemon::checks::{Asked, promote_checks};
use crate::daemon::dc::{apply_pair_state, apply_partner_key, connect_dc, connect_dc_negotiated};
use crate::daemon::pbx::take_hand_over;
use crate::daemon::state::{RETRY, Shared, current_address, lock, now_ms, promote_unattended};

pub(crate) async fn report(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut moved = shared.moved.subscribe();
    let mut backoff = Backoff::new();
    loop {
        moved.borrow_and_update();
        let answered_before = lock(&shared.datacenter).last_answer_ms;
        let result = tokio::select! {
            () = shutdown.cancelled() => return,
            result = report_session(&shared) => result,
            // The connection left from an address this box no longer has: report again
            // from the new one now, not after the old one times out.
            Ok(()) = moved.changed() => {
                tracing::info!("this box moved to another address: reporting from it");
                continue;
            }
        };
        if let Err(err) = result {
            let text = format!("{err:#}");
            let mut dc = lock(&shared.datacenter);
            if dc.last_error.as_deref() != Some(text.as_str()) {
                tracing::warn!("data center: {text}");
            }
            dc.last_error = Some(text);
            dc.connected_to = None;
        }
        // A session that was answered ended (the data center restarted, the link dropped):
        // the waits start short again.
        if lock(&shared.datacenter).last_answer_ms != answered_before {
            backoff.reset();
        }
        let wait = backoff.next_wait();
        tracing::debug!(
            ms = wait.as_millis() as u64,
            "reaching the data center again"
        );
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// The longest wait between attempts to reach the data center.
const RECONNECT_CAP: Duration = Duration::from_secs(30);

/// Waits between attempts to reach the data center: doubling from [`RETRY`] up to
/// [`RECONNECT_CAP`], each drawn at random from the upper half of its range, so that the
/// thousands of boxes a data-center restart cuts off together come back spread out instead
/// of in lockstep.
pub(crate) struct Backoff {
    failures: u32,
    /// This process's random source (std's hasher keys come from the OS).
    random: std::collections::hash_map::RandomState,
}

impl Backoff {
    pub(crate) fn new() -> Backoff {
        Backoff {
            failures: 0,
            random: std::collections::hash_map::RandomState::new(),
        }
    }

    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }

    /// How long to wait before the next attempt.
    pub(crate) fn next_wait(&mut self) -> Duration {
        use std::hash::BuildHasher;
        let draw = self.random.hash_one(self.failures);
        let wait = backoff_wait(self.failures, draw as f64 / u64::MAX as f64);
        self.failures = self.failures.saturating_add(1);
        wait
    }
}

/// The wait after `failures` failed attempts, `draw` in [0, 1] placing it in the upper half
/// of `RETRY × 2^failures` (capped at [`RECONNECT_CAP`]).
fn backoff_wait(failures: u32, draw: f64) -> Duration {
    let ceiling = RETRY
        .saturating_mul(1u32 << failures.min(16))
        .min(RECONNECT_CAP);
    ceiling / 2 + ceiling.mul_f64(draw.clamp(0.0, 1.0) / 2.0)
}

pub(crate) async fn report_session(shared: &Shared) -> anyhow::Result<()> {
    let (mut conn, address, version) = connect_dc_negotiated(shared).await?;
    // A data center of 1.5 or later says the partner's current key.
    let keys = version >= (lbs_protocol::ProtocolVersion { major: 1, minor: 5 });
    {
        lock(&shared.datacenter).connected_to = Some(address);
        loop {
            let record = lock(&shared.machine).record.clone();
            let (_, answer) = control::call(
                &mut conn,
                record.generation,
                Message::Report(box_report(shared, &record)),
                Duration::from_secs(10),
            )
            .await
            .with_context(|| format!("data center at {address}"))?;
            let (state, request) = match answer {
                Message::PairState(state) => (state, None),
                Message::PairStateWithDns { state, dns } => {
                    lock(&shared.datacenter).dns = Some(dns);
                    (state, None)
                }
                Message::PromotionRequested { state, request } => (state, Some((request, None))),
                Message::HandOverRequested {
                    state,
                    request,
                    reason,
                } => (state, Some((request, Some(reason)))),
                other => bail!("the data center answered a report with {}", other.kind()),
            };
            {
                let mut dc = lock(&shared.datacenter);
                dc.last_answer_ms = Some(now_ms());
                dc.last_error = None;
            }
            apply_pair_state(shared, state);
            if keys {
                let (_, answer) = control::call(
                    &mut conn,
                    record.generation,
                    Message::PartnerKeyRequest,
                    Duration::from_secs(10),
                )
                .await
                .with_context(|| format!("data center at {address}"))?;
                if let Message::PartnerKey { partner, key } = answer {
                    apply_partner_key(shared, partner, key);
                }
            }
            if let Some((request, hand_over)) = request
                && lock(&shared.remote_handled).is_none_or(|done| done < request.id)
            {
                *lock(&shared.remote_handled) = Some(request.id);
                let refused = match hand_over {
                    Some(why) => take_hand_over(shared, &request, &why),
                    None => remote_promotion(shared, &request).await,
                };
                if let Some(reason) = refused {
                    let generation = lock(&shared.machine).record.generation;
                    let (_, answer) = control::call(
                        &mut conn,
                        generation,
                        Message::PromotionRefused {
                            id: request.id,
                            reason,
                        },
                        Duration::from_secs(10),
                    )
                    .await
                    .with_context(|| format!("data center at {address}"))?;
                    if let Message::PairState(state) = answer {
                        apply_pair_state(shared, state);
                    }
                }
            }
            tokio::time::sleep(shared.config().report_interval).await;
        }
    }
}

/// What this box tells the data center at each report: its role as recorded, where it serves,
/// its copies and its tunnels.
fn box_report(shared: &Shared, record: &crate::role::RoleRecord) -> BoxReport {
    BoxReport {
        role: record.state.wire_role(),
        software: SoftwareVersion::current(),
        advertised: current_address(shared),
        sync: sync_summary(shared),
        tunnels: tunnel_summary(shared),
    }
}

/// What the data center says of this box's role, asked when somebody else answers for the
/// shared address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DcWord {
    /// This box is no longer the primary (the generation moved on): the answer is the new one.
    Moved,
    /// This box is still the primary at its generation.
    Primary,
    /// No answer in time.
    Silent,
}

/// The data center's word on this box's role, asked once within [`DC_WORD_DEADLINE`] (for
/// the address guard: somebody else answers for the shared address).
pub(crate) async fn dc_word(shared: &Shared) -> DcWord {
    let asked = tokio::time::timeout(DC_WORD_DEADLINE, async {
        let (mut conn, _) = connect_dc(shared).await?;
        let record = lock(&shared.machine).record.clone();
        let (_, answer) = control::call(
            &mut conn,
            record.generation,
            Message::Report(box_report(shared, &record)),
            DC_WORD_DEADLINE,
        )
        .await?;
        let state = match answer {
            Message::PairState(state)
            | Message::PairStateWithDns { state, .. }
            | Message::PromotionRequested { state, .. }
            | Message::HandOverRequested { state, .. } => state,
            other => bail!("the data center answered a report with {}", other.kind()),
        };
        anyhow::Ok((state, record.generation))
    })
    .await;
    match asked {
        Ok(Ok((state, ours))) => {
            if state.role == lbs_protocol::Role::Primary && state.generation <= ours {
                DcWord::Primary
            } else {
                DcWord::Moved
            }
        }
        Ok(Err(err)) => {
            tracing::warn!("asking the data center: {err:#}");
            DcWord::Silent
        }
        Err(_) => DcWord::Silent,
    }
}

/// How long the address guard waits for the data center's word.
const DC_WORD_DEADLINE: Duration = Duration::from_secs(5);

/// A promotion the provider asked for: the same checks as **P**, then the same steps; the
/// reason when the checks refuse it.
pub(crate) async fn remote_promotion(shared: &Shared, request: &RemotePromotion) -> Option<String> {
    tracing::warn!(
        "the data center asks this box to become the primary (request {}, by {})",
        request.id,
        request.by
    );
    match promote_checks(shared, Asked::default(), None).await {
        Ok(lines) => {
            *lock(&shared.promotion_kind) = control::PromotionKind::Requested;
            promote_unattended(
                shared,
                &format!("promoting, as requested by {}", request.by),
                &lines,
            );
            None
        }
        Err(why) => {
            tracing::warn!("the requested promotion is refused: {why}");
            Some(why.to_string())
        }
    }
}

pub(crate) fn sync_summary(shared: &Shared) -> SyncSummary {
    let sets = lock(&shared.sets);
    SyncSummary {
        last_complete_ms: sets
            .iter()
            .map(|s| s.last_in_sync_ms)
            .collect::<Option<Vec<_>>>()
            .and_then(|all| all.into_iter().min()),
        pending_files: sets.iter().map(|s| s.pending_files).sum(),
        pending_bytes: sets.iter().map(|s| s.pending_bytes).sum(),
    }
}

pub(crate) fn tunnel_summary(shared: &Shared) -> Vec<TunnelSummary> {
    lock(&shared.tunnels)
        .0
        .as_ref()
        .map(|status| {
            status
                .tunnels
                .iter()
                .map(|t| TunnelSummary {
                    name: t.name.clone(),
                    healthy: t.health == lbs_vpn::Health::Up,
                    active: t.active,
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_within_the_upper_half_of_each_range() {
        for (failures, low, high) in [(0, 1.0, 2.0), (1, 2.0, 4.0), (2, 4.0, 8.0), (3, 8.0, 16.0)] {
            assert_eq!(backoff_wait(failures, 0.0).as_secs_f64(), low);
            assert_eq!(backoff_wait(failures, 1.0).as_secs_f64(), high);
        }
        for failures in [4, 5, 30, u32::MAX] {
            assert_eq!(backoff_wait(failures, 0.0), RECONNECT_CAP / 2);
            assert_eq!(backoff_wait(failures, 1.0), RECONNECT_CAP);
        }
    }

    #[test]
    fn boxes_cut_off_together_come_back_spread_out() {
        // A thousand boxes (each its own random source) lose the data center at once: their
        // first attempts spread over the whole first range, not onto one instant.
        let mut first: Vec<Duration> = (0..1000).map(|_| Backoff::new().next_wait()).collect();
        first.sort();
        assert!(first[0] >= RETRY / 2 && first[999] <= RETRY, "{first:?}");
        let spread = first[999] - first[0];
        assert!(spread > RETRY / 3, "spread over {spread:?} only");
        let tenth = first[100] - first[0];
        assert!(tenth < spread / 3, "bunched: {tenth:?} of {spread:?}");
    }

    #[test]
    fn a_reset_starts_short_again() {
        let mut backoff = Backoff::new();
        for _ in 0..10 {
            backoff.next_wait();
        }
        assert!(backoff.next_wait() >= RECONNECT_CAP / 2);
        backoff.reset();
        assert!(backoff.next_wait() <= RETRY);
    }
}
