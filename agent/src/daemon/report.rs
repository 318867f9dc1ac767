//! Reports to the data center every few seconds; its answer (the pair's state, a promotion or
//! hand-over it asks for) goes through the role machine.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use lbs_host::backoff::Backoff;
use lbs_protocol::control::{self, BoxReport, RemotePromotion, SyncSummary, TunnelSummary};
use lbs_protocol::{Message, SoftwareVersion};
use tokio_util::sync::CancellationToken;

use crate::daemon::checks::{Asked, promote_checks};
use crate::daemon::dc::{
    apply_pair_state, apply_partner_key, connect_dc, connect_dc_negotiated, restart_replication,
};
use crate::daemon::pbx::take_hand_over;
use crate::daemon::state::{Shared, current_address, lock, now_ms, promote_unattended};

pub(crate) async fn report(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut moved = shared.moved.subscribe();
    let mut backoff = Backoff::new(control::RECONNECT_FIRST, control::RECONNECT_CAP);
    // Whether the last failure already moved to another site without waiting.
    let mut hopped = false;
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
        // A site that answered but cannot reach the sites' shared authority: another site is
        // asked at once, not after a backoff (the box would look silent meanwhile).
        let mut elsewhere_now = false;
        if let Err(err) = &result {
            let unavailable = err.chain().any(|cause| {
                matches!(
                    cause.downcast_ref::<control::CallError>(),
                    Some(control::CallError::Denied(control::Denial::Unavailable(_)))
                )
            });
            elsewhere_now = unavailable && lock(&shared.info).control.len() > 1;
        }
        if let Err(err) = result {
            let text = format!("{err:#}");
            // A site that failed the session (its link dropped, or it cannot reach the
            // authority): the next session starts at another.
            let failed = lock(&shared.datacenter).connected_to;
            if let Some(address) = failed {
                crate::daemon::dc::dc_failed(&shared, address);
            }
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
            hopped = false;
        }
        // Once: if every site says so (the authority lost), the waits apply as usual.
        if elsewhere_now && !hopped {
            hopped = true;
            continue;
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

pub(crate) async fn report_session(shared: &Shared) -> anyhow::Result<()> {
    let (mut conn, address, version) = connect_dc_negotiated(shared).await?;
    // A data center of 1.5 or later says the partner's current key.
    let keys = version >= lbs_protocol::control::PAIRS;
    // One of 1.8 or later gives the root's revocation list of sites' CAs.
    let revocations = version >= lbs_protocol::control::CHAIN_IN_GRANT;
    // One of 1.9 or later takes each set's state, the PBX check and the role steps with it.
    let detailed = version >= lbs_protocol::control::DETAILED_REPORTS;
    let mut reports: u64 = 0;
    // Resource samples the data center keeps: sent after what it said it has (the last hour
    // at first; it ignores what it has already).
    let mut samples_upto = now_ms().saturating_sub(3_600_000);
    {
        lock(&shared.datacenter).connected_to = Some(address);
        loop {
            let record = lock(&shared.machine).record.clone();
            let report = box_report(shared, &record);
            let message = if detailed {
                Message::DetailedReport {
                    report,
                    details: report_details(shared, now_ms()),
                }
            } else {
                Message::Report(report)
            };
            let (_, answer) = control::call(
                &mut conn,
                record.generation,
                message,
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
            // A new partner and its key learned from one answer restart replication once.
            let mut restart = apply_pair_state(shared, state);
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
                    restart |= apply_partner_key(shared, partner, key);
                }
            }
            reports += 1;
            if revocations && reports % CRL_EVERY_REPORTS == 1 {
                let (_, answer) = control::call(
                    &mut conn,
                    record.generation,
                    Message::RevocationListRequest,
                    Duration::from_secs(10),
                )
                .await
                .with_context(|| format!("data center at {address}"))?;
                if let Message::RevocationList { crl: Some(crl) } = answer {
                    restart |= keep_revocation_list(shared, &crl);
                }
            }
            if revocations && reports % SAMPLES_EVERY_REPORTS == 1 {
                samples_upto =
                    send_samples(shared, &mut conn, record.generation, samples_upto, address)
                        .await?;
            }
            if restart {
                restart_replication(shared);
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
                    if let Message::PairState(state) = answer
                        && apply_pair_state(shared, state)
                    {
                        restart_replication(shared);
                    }
                }
            }
            tokio::time::sleep(shared.config().report_interval).await;
        }
    }
}

/// A box asks for the revocation list at its first report on a connection and every this
/// many reports after (a minute at the default 5 s interval).
const CRL_EVERY_REPORTS: u64 = 12;

/// A box sends its resource samples at its first report on a connection and every this many
/// reports after (30 s at the default interval).
const SAMPLES_EVERY_REPORTS: u64 = 6;

/// Sends the resource samples taken after `upto` (an hour's worth at most); what the data
/// center now has up to.
async fn send_samples(
    shared: &Shared,
    conn: &mut super::dc::DcConnection,
    generation: lbs_protocol::Generation,
    upto: u64,
    address: std::net::SocketAddr,
) -> anyhow::Result<u64> {
    // An indexed read of at most an hour's samples (60 at the default interval): short enough
    // to make here, as the report's own reads of the state are.
    let samples: Vec<lbs_protocol::control::ResourceSample> = lock(&shared.resources)
        .after(upto, lbs_protocol::control::MAX_SAMPLES)
        .iter()
        .map(crate::resources::Sample::to_wire)
        .collect();
    if samples.is_empty() {
        return Ok(upto);
    }
    let answer = control::call(
        conn,
        generation,
        Message::ResourceSamples { samples },
        Duration::from_secs(10),
    )
    .await;
    match answer {
        Ok((_, Message::ResourceSamplesKept { upto_ms })) => Ok(upto_ms.max(upto)),
        Ok(_) => Ok(upto),
        // The history is the portal's, not the pair's: a refusal costs the connection nothing.
        Err(control::CallError::Denied(denial)) => {
            tracing::debug!("the data center did not keep the resource samples: {denial}");
            Ok(upto)
        }
        Err(err) => Err(err).with_context(|| format!("data center at {address}")),
    }
}

/// Keeps `crl`, the revocation list the data center gave, if it is new and the root's: the
/// data center and the partner are checked against it from their next connection. True when
/// it changed (replication restarts to use it).
fn keep_revocation_list(shared: &Shared, crl: &[u8]) -> bool {
    let path = shared.paths.crl();
    if std::fs::read(&path).is_ok_and(|kept| kept == crl) {
        return false;
    }
    let checked =
        lbs_protocol::TrustRoot::load(&shared.paths.ca()).and_then(|root| root.revoking(crl));
    if let Err(err) = checked {
        tracing::warn!("the data center's revocation list is not usable: {err}; kept the last one");
        return false;
    }
    if let Err(err) = lbs_host::write_file_atomic(&path, crl, 0o644) {
        tracing::warn!("keeping the revocation list in {}: {err}", path.display());
        return false;
    }
    tracing::warn!(
        "a new revocation list of the data center's sites is in force: certificates a revoked site signed are refused"
    );
    true
}

/// What this box tells the data center at each report: its role as recorded, where it serves,
/// its copies and its tunnels.
pub(crate) fn box_report(shared: &Shared, record: &crate::role::RoleRecord) -> BoxReport {
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
    /// This box is no longer the primary (the generation moved on): the answer is the new
    /// one; this box's role and the pair's generation as the data center records them.
    Moved {
        role: lbs_protocol::Role,
        generation: lbs_protocol::Generation,
    },
    /// This box is still the primary at its generation.
    Primary,
    /// No answer in time.
    Silent,
}

/// The data center's word on this box's role, asked once within `within` (for the address
/// guard: somebody else answers for the shared address; at start: a primary coming back).
pub(crate) async fn dc_word(shared: &Shared, within: Duration) -> DcWord {
    let asked = tokio::time::timeout(within, async {
        let (mut conn, _) = connect_dc(shared).await?;
        let record = lock(&shared.machine).record.clone();
        let (_, answer) = control::call(
            &mut conn,
            record.generation,
            Message::Report(box_report(shared, &record)),
            within,
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
                DcWord::Moved {
                    role: state.role,
                    generation: state.generation,
                }
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
pub(crate) const DC_WORD_DEADLINE: Duration = Duration::from_secs(5);

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

/// What this box tells the portal beside its report, as of `now`.
pub(crate) fn report_details(shared: &Shared, now: u64) -> control::ReportDetails {
    // The source's sets lag nothing (they may wait for a partner to pull them).
    let source = *shared.mode.borrow() == crate::daemon::state::Mode::Serve;
    let sets = lock(&shared.sets)
        .iter()
        .take(control::MAX_DETAIL_SETS)
        .map(|set| set_report(set, source, now))
        .collect();
    let pbx = lock(&shared.pbx).clone().map(|mut health| {
        health.last_failure = health.last_failure.as_deref().map(control::detail_text);
        health
    });
    let steps = lock(&shared.recent_steps).iter().cloned().collect();
    control::ReportDetails { sets, pbx, steps }
}

/// One set for the report: its phase, and its lag — the age of the oldest change not copied
/// yet, else the time since it was last in sync; 0 in sync; unknown on the `source` (the
/// primary) or before the first pass.
fn set_report(set: &crate::status::SetStatus, source: bool, now: u64) -> control::SetReport {
    use crate::status::SetState;
    let phase = match set.state {
        SetState::InSync => control::SetPhase::InSync,
        SetState::Syncing => control::SetPhase::Syncing,
        SetState::Waiting => control::SetPhase::Waiting,
        SetState::Changed => control::SetPhase::Changed,
        SetState::Error => control::SetPhase::Error,
        SetState::Serving => control::SetPhase::Serving,
        SetState::Stopped => control::SetPhase::Stopped,
    };
    let lag_ms = match set.state {
        _ if source => None,
        SetState::InSync => Some(0),
        SetState::Serving => None,
        _ => set
            .changed_since_ms
            .or(set.last_in_sync_ms)
            .map(|since| now.saturating_sub(since)),
    };
    control::SetReport {
        name: control::detail_text(&set.name),
        phase,
        lag_ms,
        pending_files: set.pending_files,
        pending_bytes: set.pending_bytes,
        error: set.last_error.as_deref().map(control::detail_text),
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
