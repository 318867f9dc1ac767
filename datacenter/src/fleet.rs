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
    /// The backup's copy is not complete as of its last report.
    BackupBehind {
        sid: String,
        pending_files: Option<u64>,
        pending_bytes: Option<u64>,
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
                pending_files,
                pending_bytes,
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
            && !report.in_sync()
        {
            found.push(Problem::BackupBehind {
                sid: server.sid.clone(),
                pending_files: report.sync_pending_files,
                pending_bytes: report.sync_pending_bytes,
            });
        }
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
