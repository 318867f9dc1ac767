//! `/metrics`: the fleet in Prometheus's text format (version 0.0.4), names after its
//! conventions (`lbs_` prefix, base units, `_total` for counters), and this process's own
//! (`process_…`, as Prometheus's client libraries name them). Reached with the bearer token
//! of `[portal] metrics_token_file`, or by a logged-in account.

use lbs_host::metrics::{Exposition, Process, label};

use super::*;
use crate::fleet::{self, SILENT_AFTER};
use crate::store::PairView;

pub(super) async fn metrics(State(inner): State<Arc<Inner>>, headers: HeaderMap) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let token = inner
        .portal
        .as_ref()
        .and_then(|p| p.settings.metrics_token.as_deref());
    let allowed = match (bearer, token) {
        (Some(given), Some(token)) => same(given, token),
        _ => who(&inner, &headers).await.is_some(),
    };
    if !allowed {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a bearer token (metrics_token_file) or a logged-in account is needed\n",
        )
            .into_response();
    }
    match with_store(&inner, |s| s.pairs()).await {
        Ok(pairs) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            exposition(&pairs, now_ms(), &Process::now()),
        )
            .into_response(),
        Err(err) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the authority cannot be read: {err}\n"),
        )
            .into_response(),
    }
}

/// The exposition text for `pairs` at `now`.
pub(super) fn exposition(pairs: &[PairView], now: Millis, process: &Process) -> String {
    let mut out = Exposition::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        out.family(name, kind, help, samples);
    };
    let summary = fleet::summary(pairs, now, SILENT_AFTER);
    family(
        "lbs_pairs",
        "gauge",
        "Pairs the data center serves.",
        vec![(String::new(), summary.pairs as f64)],
    );
    family(
        "lbs_pairs_needing_a_person",
        "gauge",
        "Pairs with at least one problem (silent or fenced box, no primary, backup behind, DNS failing, hardware differing).",
        vec![(String::new(), summary.pairs_with_problems as f64)],
    );
    family(
        "lbs_pair_generation",
        "gauge",
        "The pair's generation: it grows by one at every promotion.",
        pairs
            .iter()
            .map(|p| (format!("pair=\"{}\"", label(&p.name)), p.generation as f64))
            .collect(),
    );
    let boxes = || {
        pairs
            .iter()
            .flat_map(|p| p.servers.iter().map(move |s| (p, s)))
    };
    let box_labels = |p: &PairView, s: &crate::store::ServerView| {
        format!("pair=\"{}\",sid=\"{}\"", label(&p.name), label(&s.sid))
    };
    family(
        "lbs_box_info",
        "gauge",
        "Each box with its role as the data center decided it and its software (always 1).",
        boxes()
            .map(|(p, s)| {
                (
                    format!(
                        "{},role=\"{}\",software=\"{}\"",
                        box_labels(p, s),
                        label(&s.role),
                        label(s.software.as_deref().unwrap_or(""))
                    ),
                    1.0,
                )
            })
            .collect(),
    );
    family(
        "lbs_box_report_age_seconds",
        "gauge",
        "Seconds since a site last heard the box's report (boxes never heard are left out).",
        boxes()
            .filter_map(|(p, s)| {
                s.last_heartbeat_at
                    .map(|at| (box_labels(p, s), (now - at).max(0) as f64 / 1000.0))
            })
            .collect(),
    );
    family(
        "lbs_box_sync_pending_bytes",
        "gauge",
        "Bytes the backup has not copied yet, as it last reported.",
        boxes()
            .filter_map(|(p, s)| {
                let r = s.report.as_ref()?;
                Some((box_labels(p, s), r.sync_pending_bytes? as f64))
            })
            .collect(),
    );
    family(
        "lbs_box_sync_pending_files",
        "gauge",
        "Files the backup has not copied yet, as it last reported.",
        boxes()
            .filter_map(|(p, s)| {
                let r = s.report.as_ref()?;
                Some((box_labels(p, s), r.sync_pending_files? as f64))
            })
            .collect(),
    );
    family(
        "lbs_box_sync_last_complete_timestamp_seconds",
        "gauge",
        "When the backup's copy was last complete (seconds since the epoch).",
        boxes()
            .filter_map(|(p, s)| {
                let r = s.report.as_ref()?;
                Some((box_labels(p, s), r.sync_last_complete_ms? as f64 / 1000.0))
            })
            .collect(),
    );
    family(
        "lbs_box_tunnel_up",
        "gauge",
        "Whether the box's tunnel to a data-center endpoint is healthy (1) or not (0).",
        boxes()
            .flat_map(|(p, s)| {
                let labels = box_labels(p, s);
                s.report
                    .iter()
                    .flat_map(|r| r.tunnels.iter())
                    .map(move |(name, healthy, _)| {
                        (
                            format!("{labels},tunnel=\"{}\"", label(name)),
                            if *healthy { 1.0 } else { 0.0 },
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect(),
    );
    let sets = || {
        boxes().flat_map(|(p, s)| {
            let labels = box_labels(p, s);
            s.report
                .iter()
                .filter_map(|r| r.details.as_ref())
                .flat_map(|d| d.sets.iter())
                .map(move |set| (format!("{labels},set=\"{}\"", label(&set.name)), set))
                .collect::<Vec<_>>()
        })
    };
    family(
        "lbs_box_set_lag_seconds",
        "gauge",
        "How long the oldest change of a set not yet copied to the backup has waited, as the box last reported (0 in sync; boxes of protocol 1.9, sets whose lag is known).",
        sets()
            .filter_map(|(labels, set)| Some((labels, set.lag_ms? as f64 / 1000.0)))
            .collect(),
    );
    family(
        "lbs_box_set_pending_bytes",
        "gauge",
        "Bytes of a set not copied yet, as the box last reported (boxes of protocol 1.9).",
        sets()
            .map(|(labels, set)| (labels, set.pending_bytes as f64))
            .collect(),
    );
    family(
        "lbs_box_pbx_healthy",
        "gauge",
        "Whether the PBX health check passed at its last run (1) or not (0), on boxes that run the PBX and have a check.",
        boxes()
            .filter_map(|(p, s)| {
                let pbx = s.report.as_ref()?.details.as_ref()?.pbx.as_ref()?;
                Some((box_labels(p, s), if pbx.ok { 1.0 } else { 0.0 }))
            })
            .collect(),
    );
    family(
        "lbs_pair_promotion_pending",
        "gauge",
        "Whether a promotion or hand-over was asked for and not carried out yet (1) or not (0).",
        pairs
            .iter()
            .map(|p| {
                let pending = p.pending.as_ref().is_some_and(|r| r.expires_at > now);
                (
                    format!("pair=\"{}\"", label(&p.name)),
                    if pending { 1.0 } else { 0.0 },
                )
            })
            .collect(),
    );
    family(
        "lbs_dns_record_state",
        "gauge",
        "Each DNS record the data center keeps, 1 for its state now (pending, done, retrying, failed).",
        pairs
            .iter()
            .flat_map(|p| {
                p.dns.iter().map(|r| {
                    (
                        format!(
                            "pair=\"{}\",name=\"{}\",state=\"{}\"",
                            label(&p.name),
                            label(&r.name),
                            r.state
                        ),
                        1.0,
                    )
                })
            })
            .collect(),
    );
    out.process("lbs-datacenter serve", process);
    out.finish()
}
