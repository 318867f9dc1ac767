//! `/metrics`: the fleet in Prometheus's text format (version 0.0.4), names after its
//! conventions (`lbs_` prefix, base units, `_total` for counters), and this process's own
//! (`process_…`, as Prometheus's client libraries name them). Reached with the bearer token
//! of `[portal] metrics_token_file`, or by a logged-in account.

use std::fmt::Write;

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
            exposition(&pairs, now_ms(), &process()),
        )
            .into_response(),
        Err(err) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the authority cannot be read: {err}\n"),
        )
            .into_response(),
    }
}

/// A label value, escaped as the format wants.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// This process's figures from /proc: (resident bytes, CPU seconds, open descriptors, start
/// time in seconds since the epoch).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Process {
    resident_bytes: u64,
    cpu_seconds: f64,
    open_fds: u64,
    start_time_seconds: f64,
}

fn process() -> Process {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let resident_bytes = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024;
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) are counted from its ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15, starttime 22 (1-based): 11, 12, 19 here.
    let hz = 100.0;
    let cpu_seconds = (ticks(11) + ticks(12)) / hz;
    let boot = std::fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    Process {
        resident_bytes,
        cpu_seconds,
        open_fds,
        start_time_seconds: boot + ticks(19) / hz,
    }
}

/// The exposition text for `pairs` at `now`.
pub(super) fn exposition(pairs: &[PairView], now: Millis, process: &Process) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            if labels.is_empty() {
                let _ = writeln!(out, "{name} {value}");
            } else {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        }
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
    family(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory of lbs-datacenter serve.",
        vec![(String::new(), process.resident_bytes as f64)],
    );
    family(
        "process_cpu_seconds_total",
        "counter",
        "CPU time of lbs-datacenter serve (user and system).",
        vec![(String::new(), process.cpu_seconds)],
    );
    family(
        "process_open_fds",
        "gauge",
        "Open file descriptors.",
        vec![(String::new(), process.open_fds as f64)],
    );
    family(
        "process_start_time_seconds",
        "gauge",
        "When the process started, seconds since the epoch.",
        vec![(String::new(), process.start_time_seconds)],
    );
    out
}
