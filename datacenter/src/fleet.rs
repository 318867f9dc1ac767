//! The fleet at a glance: what needs a person, pair by pair, judged from the store's views.
//! Pure, so `status`, `status --problems` and monitoring read the same judgement.

use std::time::Duration;

use crate::store::{Millis, PairView, ServerView};
use crate::view::DnsState;

/// A box that has not reported for this long is silent (boxes report every 5 s).
pub const SILENT_AFTER: Duration = Duration::from_secs(30);

/// Something about a pair that needs a person.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum Problem {
    /// An activated box has not reported for `silent_s` seconds (`None`: never since it was
    /// activated).
    Silent {
        sid: String,
        role: String,
        silent_s: Option<u64>,
    },
    /// A former primary, fenced: once repaired, press **B** on it to make it the backup.
    Fenced { sid: String },
    /// A pair whose boxes are both activated has no primary.
    NoPrimary,
    /// The backup's copy is not complete as of its last report. From boxes that report
    /// their sets (protocol 1.9): a set that failed, waits for the primary, or whose oldest
    /// change not copied is older than [`BEHIND_AFTER`] (`set`, `lag_s` say which and how
    /// long); a copy moving along within that is not a problem.
    BackupBehind {
        sid: String,
        pending_files: Option<u64>,
        pending_bytes: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        set: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        lag_s: Option<u64>,
    },
    /// A promotion was asked for (the portal, `lbs-datacenter promote`, or a primary handing
    /// over) and the backup has not carried it out yet.
    PromotionPending {
        id: i64,
        requested_by: String,
        age_s: u64,
        hand_over: bool,
    },
    /// A DNS record does not point where it must, and the server refuses or does not answer.
    Dns {
        name: String,
        state: DnsState,
        attempts: i64,
        why: Option<String>,
    },
    /// The two boxes' hardware differs.
    HardwareDiffers { differences: Vec<String> },
    /// None of a box's tunnels to the data center is healthy as of its last report (it still
    /// reports over the internet, but its partner and the endpoints cannot reach it over the
    /// overlay).
    TunnelsDown { sid: String, tunnels: Vec<String> },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Silent {
                sid,
                role,
                silent_s: Some(s),
            } => write!(f, "{role} {sid} silent for {s} s"),
            Problem::Silent { sid, role, .. } => {
                write!(f, "{role} {sid} has not reported since it was activated")
            }
            Problem::Fenced { sid } => {
                write!(f, "{sid} is fenced: once it is repaired, press B on it")
            }
            Problem::NoPrimary => f.write_str("no primary"),
            Problem::BackupBehind {
                sid,
                set: Some(set),
                lag_s,
                ..
            } => match lag_s {
                Some(lag) => write!(f, "backup {sid} behind: set {set} {lag} s behind"),
                None => write!(f, "backup {sid} behind: set {set} not copying"),
            },
            Problem::BackupBehind {
                sid,
                pending_files,
                pending_bytes,
                ..
            } => match (pending_files, pending_bytes) {
                (Some(files), Some(bytes)) => {
                    write!(
                        f,
                        "backup {sid} behind: {files} file(s), {bytes} bytes to copy"
                    )
                }
                _ => write!(f, "backup {sid} has not said its copy is complete"),
            },
            Problem::Dns {
                name,
                state,
                attempts,
                why,
            } => write!(
                f,
                "DNS {name} {state} after {attempts} tries: {}",
                why.as_deref().unwrap_or("-")
            ),
            Problem::HardwareDiffers { differences } => {
                write!(f, "hardware differs: {}", differences.join("; "))
            }
            Problem::TunnelsDown { sid, tunnels } => {
                write!(f, "{sid}: every tunnel down ({})", tunnels.join(", "))
            }
            Problem::PromotionPending {
                id,
                requested_by,
                age_s,
                hand_over,
            } => write!(
                f,
                "{} {id} by {requested_by} pending for {age_s} s",
                if *hand_over {
                    "hand-over"
                } else {
                    "promotion request"
                }
            ),
        }
    }
}

/// Whether a box is activated (it has a role the data center gave it).
fn activated(server: &ServerView) -> bool {
    matches!(server.role.as_str(), "primary" | "backup" | "fenced")
}

/// How long `server` has been silent at `now`, in whole seconds (`None`: never heard).
fn silent_s(server: &ServerView, now: Millis) -> Option<u64> {
    server
        .last_heartbeat_at
        .map(|at| u64::try_from(now.saturating_sub(at)).unwrap_or(0) / 1000)
}

/// A backup set whose oldest change not copied is older than this needs a person (a copy
/// that keeps up stays within seconds; a first copy of a large set takes longer, and says
/// so).
pub const BEHIND_AFTER: Duration = Duration::from_secs(60);

/// The first set of a backup's report that is behind, and by how long (whole seconds;
/// `None`: not copying at all — failed, waiting for the primary, stopped).
fn set_behind(details: &lbs_protocol::control::ReportDetails) -> Option<(String, Option<u64>)> {
    use lbs_protocol::control::SetPhase;
    details.sets.iter().find_map(|set| {
        let lag_s = set.lag_ms.map(|ms| ms / 1000);
        let behind = match set.phase {
            SetPhase::InSync | SetPhase::Serving => false,
            SetPhase::Error | SetPhase::Waiting | SetPhase::Stopped => true,
            SetPhase::Syncing | SetPhase::Changed => set
                .lag_ms
                .is_none_or(|ms| ms > BEHIND_AFTER.as_millis() as u64),
        };
        behind.then(|| (set.name.clone(), lag_s))
    })
}

/// What needs a person about `pair` at `now`; empty when all is well.
pub fn problems(pair: &PairView, now: Millis, silent_after: Duration) -> Vec<Problem> {
    let mut found = Vec::new();
    for server in pair.servers.iter().filter(|s| activated(s)) {
        let silent = silent_s(server, now);
        if silent.is_none_or(|s| s >= silent_after.as_secs()) {
            found.push(Problem::Silent {
                sid: server.sid.clone(),
                role: server.role.clone(),
                silent_s: silent,
            });
        }
        if server.role == "fenced" {
            found.push(Problem::Fenced {
                sid: server.sid.clone(),
            });
        }
        if let Some(report) = &server.report
            && !report.tunnels.is_empty()
            && report.tunnels.iter().all(|(_, healthy, _)| !healthy)
        {
            found.push(Problem::TunnelsDown {
                sid: server.sid.clone(),
                tunnels: report
                    .tunnels
                    .iter()
                    .map(|(name, ..)| name.clone())
                    .collect(),
            });
        }
        if server.role == "backup"
            && let Some(report) = &server.report
        {
            let behind = match &report.details {
                Some(details) => set_behind(details).map(|(set, lag_s)| (Some(set), lag_s)),
                None => (!report.in_sync()).then_some((None, None)),
            };
            if let Some((set, lag_s)) = behind {
                found.push(Problem::BackupBehind {
                    sid: server.sid.clone(),
                    pending_files: report.sync_pending_files,
                    pending_bytes: report.sync_pending_bytes,
                    set,
                    lag_s,
                });
            }
        }
    }
    if let Some(request) = pair.pending.as_ref().filter(|r| r.expires_at > now) {
        found.push(Problem::PromotionPending {
            id: request.id,
            requested_by: request.requested_by.clone(),
            age_s: u64::try_from(now.saturating_sub(request.requested_at)).unwrap_or(0) / 1000,
            hand_over: request.hand_over.is_some(),
        });
    }
    let all_activated = pair.servers.len() >= 2 && pair.servers.iter().all(activated);
    if all_activated && !pair.servers.iter().any(|s| s.role == "primary") {
        found.push(Problem::NoPrimary);
    }
    for record in &pair.dns {
        if matches!(record.state, DnsState::Retrying | DnsState::Failed) {
            found.push(Problem::Dns {
                name: record.name.clone(),
                state: record.state,
                attempts: record.attempts,
                why: record.last_error.clone(),
            });
        }
    }
    if let Some(differences) = pair.hardware_differences.as_ref().filter(|d| !d.is_empty()) {
        found.push(Problem::HardwareDiffers {
            differences: differences.clone(),
        });
    }
    found
}

/// How long `serve` may leave its alive file unrenewed (it renews it every second) before
/// `status` says it is not serving.
pub const SERVE_SILENT_AFTER: Duration = Duration::from_secs(10);

/// Whether `serve` runs, from its alive file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Service {
    /// It renewed the file `ago_s` seconds ago.
    Running { ago_s: u64 },
    /// The file is old: serve is frozen, hung, or was killed without its clean stop.
    Silent { for_s: u64 },
    /// No file: serve is stopped (or never ran).
    Stopped,
}

impl Service {
    /// From the age of the alive file (`None`: there is none).
    pub fn judge(age: Option<Duration>) -> Service {
        match age {
            None => Service::Stopped,
            Some(age) if age > SERVE_SILENT_AFTER => Service::Silent {
                for_s: age.as_secs(),
            },
            Some(age) => Service::Running {
                ago_s: age.as_secs(),
            },
        }
    }

    /// Whether a person must look (monitoring's exit 1).
    pub fn needs_a_person(&self) -> bool {
        !matches!(self, Service::Running { .. })
    }
}

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Service::Running { .. } => f.write_str("serve: running"),
            Service::Silent { for_s } => write!(
                f,
                "serve: NOT ANSWERING for {for_s} s (frozen, hung, or killed): boxes cannot report or be promoted; systemctl status lbs-datacenter"
            ),
            Service::Stopped => f.write_str(
                "serve: NOT RUNNING: boxes cannot report or be promoted; systemctl start lbs-datacenter",
            ),
        }
    }
}

/// The fleet in numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    pub pairs: usize,
    /// Activated boxes.
    pub boxes: usize,
    /// Of those, heard within the silence limit.
    pub heard: usize,
    pub silent: usize,
    pub fenced: usize,
    pub dns_retrying: usize,
    pub dns_failed: usize,
    /// Pairs with at least one problem.
    pub pairs_with_problems: usize,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fleet: {} pair(s), {} of {} box(es) heard, {} silent, {} fenced; DNS {} retrying, {} failed; {} pair(s) need a person",
            self.pairs,
            self.heard,
            self.boxes,
            self.silent,
            self.fenced,
            self.dns_retrying,
            self.dns_failed,
            self.pairs_with_problems
        )
    }
}

/// The fleet's numbers at `now`.
pub fn summary(pairs: &[PairView], now: Millis, silent_after: Duration) -> Summary {
    let mut summary = Summary {
        pairs: pairs.len(),
        ..Summary::default()
    };
    for pair in pairs {
        for server in pair.servers.iter().filter(|s| activated(s)) {
            summary.boxes += 1;
            if silent_s(server, now).is_some_and(|s| s < silent_after.as_secs()) {
                summary.heard += 1;
            } else {
                summary.silent += 1;
            }
            if server.role == "fenced" {
                summary.fenced += 1;
            }
        }
        for record in &pair.dns {
            match record.state {
                DnsState::Retrying => summary.dns_retrying += 1,
                DnsState::Failed => summary.dns_failed += 1,
                _ => {}
            }
        }
        if !problems(pair, now, silent_after).is_empty() {
            summary.pairs_with_problems += 1;
        }
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DnsView;
    use crate::view::StoredReport;
    use lbs_protocol::control::SetReport;

    const NOW: Millis = 1_800_000_000_000;

    fn server(sid: &str, role: &str, heard_s_ago: Option<i64>) -> ServerView {
        ServerView {
            sid: sid.into(),
            role: role.into(),
            last_heartbeat_at: heard_s_ago.map(|s| NOW - s * 1000),
            ..ServerView::default()
        }
    }

    fn in_sync() -> StoredReport {
        StoredReport {
            role: "backup".into(),
            software: "0.1.0".into(),
            advertised: None,
            sync_last_complete_ms: Some(1),
            sync_pending_files: Some(0),
            sync_pending_bytes: Some(0),
            tunnels: Vec::new(),
            details: None,
        }
    }

    fn healthy() -> PairView {
        let mut backup = server("B", "backup", Some(3));
        backup.report = Some(in_sync());
        PairView {
            name: "acme".into(),
            servers: vec![server("A", "primary", Some(2)), backup],
            hardware_differences: Some(Vec::new()),
            ..PairView::default()
        }
    }

    #[test]
    fn serve_is_judged_by_the_age_of_its_alive_file() {
        assert_eq!(Service::judge(None), Service::Stopped);
        assert_eq!(
            Service::judge(Some(Duration::from_millis(900))),
            Service::Running { ago_s: 0 }
        );
        assert_eq!(
            Service::judge(Some(SERVE_SILENT_AFTER)),
            Service::Running { ago_s: 10 }
        );
        let frozen = Service::judge(Some(Duration::from_secs(73)));
        assert_eq!(frozen, Service::Silent { for_s: 73 });
        assert!(frozen.needs_a_person() && Service::Stopped.needs_a_person());
        assert!(!Service::Running { ago_s: 1 }.needs_a_person());
        assert!(frozen.to_string().contains("NOT ANSWERING for 73 s"));
    }

    #[test]
    fn a_healthy_pair_and_one_still_being_installed_need_nobody() {
        assert!(problems(&healthy(), NOW, SILENT_AFTER).is_empty());
        let installing = PairView {
            servers: vec![
                server("A", "primary", Some(1)),
                server("B", "unactivated", None),
            ],
            ..PairView::default()
        };
        assert!(problems(&installing, NOW, SILENT_AFTER).is_empty());
    }

    #[test]
    fn a_box_whose_every_tunnel_is_down_needs_a_person_and_one_down_of_two_does_not() {
        let mut pair = healthy();
        if let Some(report) = &mut pair.servers[1].report {
            report.tunnels = vec![("dc1".into(), false, false), ("dc2".into(), true, true)];
        }
        assert!(problems(&pair, NOW, SILENT_AFTER).is_empty());
        if let Some(report) = &mut pair.servers[1].report {
            report.tunnels[1].1 = false;
        }
        let found = problems(&pair, NOW, SILENT_AFTER);
        assert_eq!(
            found,
            [Problem::TunnelsDown {
                sid: "B".into(),
                tunnels: vec!["dc1".into(), "dc2".into()]
            }]
        );
        assert_eq!(found[0].to_string(), "B: every tunnel down (dc1, dc2)");
    }

    #[test]
    fn after_a_failover_the_dead_box_the_fence_and_the_copy_are_each_named() {
        let mut pair = healthy();
        pair.servers[0] = server("A", "fenced", Some(600));
        pair.servers[1].role = "primary".into();
        pair.servers[1].report = None;
        let found = problems(&pair, NOW, SILENT_AFTER);
        assert_eq!(
            found,
            [
                Problem::Silent {
                    sid: "A".into(),
                    role: "fenced".into(),
                    silent_s: Some(600)
                },
                Problem::Fenced { sid: "A".into() },
            ]
        );
        assert_eq!(found[0].to_string(), "fenced A silent for 600 s");
        // A backup that is behind, and DNS the server refuses.
        let mut pair = healthy();
        if let Some(report) = &mut pair.servers[1].report {
            report.sync_pending_files = Some(3);
        }
        pair.dns.push(DnsView {
            name: "pbx.acme.example".into(),
            want: "192.168.1.2".into(),
            have: None,
            state: DnsState::Failed,
            attempts: 4,
            last_error: Some("BADKEY".into()),
            changed_at: NOW,
            done_at: None,
        });
        let kinds: Vec<String> = problems(&pair, NOW, SILENT_AFTER)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            kinds,
            [
                "backup B behind: 3 file(s), 0 bytes to copy",
                "DNS pbx.acme.example failed after 4 tries: BADKEY"
            ]
        );
    }

    fn set(name: &str, phase: lbs_protocol::control::SetPhase, lag_s: Option<u64>) -> SetReport {
        SetReport {
            name: name.into(),
            phase,
            lag_ms: lag_s.map(|s| s * 1000),
            pending_files: 1,
            pending_bytes: 100,
            error: None,
        }
    }

    #[test]
    fn a_backup_that_reports_its_sets_is_behind_only_when_a_set_lags_a_minute_or_stands_still() {
        use lbs_protocol::control::{ReportDetails, SetPhase};
        let with_sets = |sets: Vec<SetReport>| {
            let mut pair = healthy();
            if let Some(report) = &mut pair.servers[1].report {
                // Pending files as in any busy office: the sets say whether that matters.
                report.sync_pending_files = Some(2);
                report.details = Some(ReportDetails {
                    sets,
                    ..ReportDetails::default()
                });
            }
            problems(&pair, NOW, SILENT_AFTER)
        };
        let keeping_up = with_sets(vec![
            set("voicemail", SetPhase::InSync, Some(0)),
            set("recordings", SetPhase::Syncing, Some(3)),
            set("config", SetPhase::Changed, Some(60)),
        ]);
        assert!(keeping_up.is_empty(), "{keeping_up:?}");
        let lagging = with_sets(vec![
            set("voicemail", SetPhase::InSync, Some(0)),
            set("recordings", SetPhase::Syncing, Some(61)),
        ]);
        assert_eq!(lagging.len(), 1);
        assert_eq!(
            lagging[0].to_string(),
            "backup B behind: set recordings 61 s behind"
        );
        let failed = with_sets(vec![set("voicemail", SetPhase::Error, Some(5))]);
        assert_eq!(
            failed[0].to_string(),
            "backup B behind: set voicemail 5 s behind"
        );
        let waiting = with_sets(vec![set("voicemail", SetPhase::Waiting, None)]);
        assert_eq!(
            waiting[0].to_string(),
            "backup B behind: set voicemail not copying"
        );
        // Never in sync yet, no change to date the lag by: not known to be current.
        let first = with_sets(vec![set("voicemail", SetPhase::Syncing, None)]);
        assert_eq!(first.len(), 1);
    }

    #[test]
    fn a_promotion_request_not_carried_out_is_a_problem_until_it_expires() {
        let mut pair = healthy();
        pair.pending = Some(crate::store::PromotionRequest {
            id: 7,
            pair: "acme".into(),
            requested_by: "portal:olga".into(),
            requested_at: NOW - 12_000,
            expires_at: NOW + 48_000,
            state: crate::view::RequestState::Pending,
            answer: None,
            hand_over: None,
        });
        let found = problems(&pair, NOW, SILENT_AFTER);
        assert_eq!(
            found.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["promotion request 7 by portal:olga pending for 12 s"]
        );
        let expired = problems(&pair, NOW + 48_000, SILENT_AFTER);
        assert!(
            !expired
                .iter()
                .any(|p| matches!(p, Problem::PromotionPending { .. })),
            "{expired:?}"
        );
    }

    #[test]
    fn the_summary_counts_boxes_heard_silent_fenced_and_pairs_in_trouble() {
        let mut quiet = healthy();
        quiet.servers[1].last_heartbeat_at = Some(NOW - 31_000);
        let mut failed_over = healthy();
        failed_over.servers[0].role = "fenced".into();
        let pairs = [healthy(), quiet, failed_over];
        let summary = summary(&pairs, NOW, SILENT_AFTER);
        assert_eq!(
            summary,
            Summary {
                pairs: 3,
                boxes: 6,
                heard: 5,
                silent: 1,
                fenced: 1,
                dns_retrying: 0,
                dns_failed: 0,
                pairs_with_problems: 2,
            }
        );
        assert!(
            summary
                .to_string()
                .starts_with("fleet: 3 pair(s), 5 of 6 box(es) heard")
        );
    }
}
