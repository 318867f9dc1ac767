//! Issue 27's portal over real HTTPS (curl, trusting only the root boxes pin): accounts from
//! `lbs-datacenter user`, login with a wrong and a right password, the fleet page with a
//! fenced primary first, a viewer refused the promote action, a form without its CSRF token
//! refused, an operator's promotion carried out by the backup and shown on the pair page,
//! `/metrics` read by a Prometheus parser, `/healthz`; and the pages' time with 5,000 pairs.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use lbs_protocol::{Generation, Message, Role};
use lbs_tests::fleet::server::{Server, free_port};
use lbs_tests::fleet::{self, ReportSession};
use lbs_tests::workspace_binary;

const TOKEN: &str = "metrics-token-for-the-test-0123456789";

struct Portal {
    base: String,
    ca: PathBuf,
    jar: tempfile::TempDir,
}

/// An answer: status, body, and the `Location` it redirects to.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: String,
    location: String,
}

impl Portal {
    fn new(server: &Server, port: u16) -> Portal {
        Portal {
            base: format!("https://127.0.0.1:{port}"),
            ca: server.dir().join("ca.pem"),
            jar: tempfile::tempdir().unwrap(),
        }
    }

    /// curl as `who` (a cookie jar of its own); `form`: POSTed fields.
    fn call(&self, who: &str, path: &str, form: &[(&str, &str)], extra: &[&str]) -> Answer {
        let jar = self.jar.path().join(who);
        let body = self.jar.path().join(format!("{who}.body"));
        let mut curl = Command::new("curl");
        curl.args(["--silent", "--show-error", "--max-time", "20"])
            .arg("--cacert")
            .arg(&self.ca)
            .arg("-c")
            .arg(&jar)
            .arg("-b")
            .arg(&jar)
            .arg("-o")
            .arg(&body)
            .args(["-w", "%{http_code} %{redirect_url}"])
            .args(extra);
        for (name, value) in form {
            curl.arg("--data-urlencode").arg(format!("{name}={value}"));
        }
        let out = curl.arg(format!("{}{path}", self.base)).output().unwrap();
        assert!(
            out.status.success(),
            "curl {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let written = String::from_utf8_lossy(&out.stdout).to_string();
        let (status, location) = written.split_once(' ').unwrap_or((&written, ""));
        Answer {
            status: status.parse().unwrap(),
            body: std::fs::read_to_string(&body).unwrap_or_default(),
            location: location.to_owned(),
        }
    }

    fn login(&self, who: &str, password: &str) -> Answer {
        self.call(who, "/login", &[("name", who), ("password", password)], &[])
    }
}

/// What a backup's agent tells beside its report: one set in sync, one 75 s behind, a PBX
/// check failing, two role steps.
fn details() -> lbs_protocol::control::ReportDetails {
    use lbs_protocol::control::{PbxReport, ReportDetails, SetPhase, SetReport, StepReport};
    let now = lbs_tests::office::now_ms();
    let set = |name: &str, phase, lag_ms| SetReport {
        name: name.into(),
        phase,
        lag_ms: Some(lag_ms),
        pending_files: 2,
        pending_bytes: 4096,
        error: None,
    };
    ReportDetails {
        sets: vec![
            set("voicemail", SetPhase::InSync, 0),
            set("recordings", SetPhase::Syncing, 75_400),
        ],
        pbx: Some(PbxReport {
            checked_ms: now,
            ok: false,
            failures: 2,
            restarts: 1,
            down: false,
            last_failure: Some("SIP OPTIONS <timeout>".into()),
        }),
        steps: vec![
            StepReport {
                at_ms: now - 60_000,
                step: "give-up-address".into(),
                took_ms: 40,
                error: Some("arping: 5a:ec:b4:27:71:cf answers".into()),
            },
            StepReport {
                at_ms: now - 50_000,
                step: "take-address".into(),
                took_ms: 212,
                error: None,
            },
        ],
    }
}

/// The CSRF token in a page's forms.
fn csrf(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").unwrap() + "name=\"csrf\" value=\"".len();
    page[at..at + 64].to_owned()
}

/// The metrics token in a private file, as `metrics_token_file` wants it.
fn token_file() -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), TOKEN).unwrap();
    std::fs::set_permissions(
        file.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    file
}

fn portal_config(port: u16, token_file: &Path) -> String {
    format!(
        "[portal]\nlisten = [\"127.0.0.1:{port}\"]\nnames = [\"127.0.0.1\", \"localhost\"]\nmetrics_token_file = \"{}\"\n",
        token_file.display()
    )
}

#[test]
fn the_portal_logs_in_shows_the_fleet_promotes_for_operators_only_and_exports_metrics() {
    let token_file = token_file();
    let port = free_port().unwrap();
    let binary = workspace_binary("lbs-datacenter");
    let (mut dc, pairs) = Server::prepare(
        &binary,
        2,
        "portal.example",
        &portal_config(port, token_file.path()),
    )
    .unwrap();
    dc.cli_with_input(
        &[
            "user",
            "add",
            "olga",
            "--role",
            "operator",
            "--password-stdin",
        ],
        "olga's long password\n",
    )
    .unwrap();
    dc.cli_with_input(
        &["user", "add", "victor", "--password-stdin"],
        "victor's long password\n",
    )
    .unwrap();
    let short = dc
        .cli_with_input(&["user", "add", "eve", "--password-stdin"], "short\n")
        .unwrap_err();
    assert!(format!("{short:#}").contains("10 to 256"), "{short:#}");
    dc.start().unwrap();
    let root = dc.root().unwrap();
    let portal = Portal::new(&dc, port);

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let activated_at = lbs_tests::office::now_ms();
    // Pair 0: both boxes activated, its primary then fenced by a promotion. Pair 1: fresh.
    let (primary, backup) = runtime.block_on(async {
        let a = fleet::activate(dc.activation, &root, 0, 0, &pairs[0][0])
            .await
            .unwrap();
        let b = fleet::activate(dc.activation, &root, 0, 1, &pairs[0][1])
            .await
            .unwrap();
        (a, b)
    });

    // Not logged in: the fleet sends to the login page; health needs no account.
    let answer = portal.call("nobody", "/", &[], &[]);
    assert_eq!(answer.status, 303, "{answer:?}");
    assert!(answer.location.ends_with("/login"), "{answer:?}");
    assert_eq!(portal.call("nobody", "/healthz", &[], &[]).status, 200);
    // A wrong password, then the right one.
    let wrong = portal.login("olga", "not her password at all");
    assert_eq!(wrong.status, 401);
    assert!(wrong.body.contains("wrong name or password"));
    let unknown = portal.login("mallory", "whatever password");
    assert_eq!(unknown.status, 401);
    assert_eq!(portal.login("olga", "olga's long password").status, 303);
    assert_eq!(portal.login("victor", "victor's long password").status, 303);

    // The primary is fenced (the backup promoted by P): the fleet shows that pair first.
    runtime.block_on(async {
        let answer = fleet::promote_once(&backup, dc.control, &root, Generation(1))
            .await
            .unwrap();
        assert!(matches!(answer, Message::Promoted(_)), "{answer:?}");
        let mut old =
            ReportSession::open(&primary, dc.control, &root, Generation(1), Role::Primary)
                .await
                .unwrap();
        let _ = old.report().await;
    });
    let fleet_page = portal.call("olga", "/", &[], &[]);
    assert_eq!(fleet_page.status, 200);
    let needs = fleet_page.body.find("Needs a person").unwrap();
    let fenced = fleet_page.body.find("is fenced").unwrap();
    assert!(needs < fenced, "problems come first");
    assert!(fleet_page.body.contains("bench-00001"));
    assert!(!fleet_page.body.contains("<script"), "no scripts");

    // The pair page: a viewer sees no promote form and is refused if it posts anyway.
    let as_viewer = portal.call("victor", "/pair/bench-00000", &[], &[]);
    assert_eq!(as_viewer.status, 200);
    assert!(!as_viewer.body.contains("/promote\""));
    let token = csrf(&as_viewer.body);
    let refused = portal.call(
        "victor",
        "/pair/bench-00000/promote",
        &[("csrf", &token)],
        &[],
    );
    assert_eq!(refused.status, 403, "{refused:?}");
    assert!(refused.body.contains("only operators may promote"));
    // An operator's form without (or with another's) CSRF token is refused.
    let as_operator = portal.call("olga", "/pair/bench-00000", &[], &[]);
    assert!(as_operator.body.contains("/promote\""));
    let token = csrf(&as_operator.body);
    let no_token = portal.call("olga", "/pair/bench-00000/promote", &[("x", "1")], &[]);
    assert_eq!(no_token.status, 403, "{no_token:?}");
    let csrf_victor = csrf(&as_viewer.body);
    let foreign = portal.call(
        "olga",
        "/pair/bench-00000/promote",
        &[("csrf", &csrf_victor)],
        &[],
    );
    assert_eq!(foreign.status, 403, "{foreign:?}");

    // B on the fenced old primary makes it the backup; then the operator's remote P.
    runtime.block_on(async {
        let mut session =
            ReportSession::open(&primary, dc.control, &root, Generation(2), Role::Fenced)
                .await
                .unwrap();
        let answer = session.call(Message::RegisterBackup).await.unwrap();
        assert!(matches!(answer, Message::PairState(_)), "{answer:?}");
    });
    let asked = portal.call(
        "olga",
        "/pair/bench-00000/promote",
        &[("csrf", &token)],
        &[],
    );
    assert_eq!(asked.status, 303, "{asked:?}");
    assert!(asked.location.contains("?request="), "{asked:?}");
    let path = asked.location.split_once("127.0.0.1").unwrap().1;
    let path = &path[path.find('/').unwrap()..];
    let pending = portal.call("olga", path, &[], &[]);
    assert!(
        pending.body.contains("waiting for the backup"),
        "{}",
        pending.body
    );
    assert!(pending.body.contains("http-equiv=\"refresh\""));
    // Until the backup carries it out, the request is among the fleet's problems.
    let fleet_page = portal.call("victor", "/?problems=1", &[], &[]);
    assert!(
        fleet_page.body.contains("by olga (portal) pending for"),
        "{}",
        fleet_page.body
    );
    // The backup (the old primary, registered) reports with its sets, PBX check and role
    // steps (protocol 1.9), is asked, and promotes itself.
    runtime.block_on(async {
        let mut session =
            ReportSession::open(&primary, dc.control, &root, Generation(2), Role::Backup)
                .await
                .unwrap();
        let answer = session.report_detailed(details()).await.unwrap();
        assert!(
            matches!(answer, Message::PromotionRequested { .. }),
            "{answer:?}"
        );
        let promoted = fleet::promote_once(&primary, dc.control, &root, Generation(2))
            .await
            .unwrap();
        assert!(matches!(promoted, Message::Promoted(_)), "{promoted:?}");
    });
    let done = portal.call("olga", path, &[], &[]);
    assert!(done.body.contains("done"), "{}", done.body);
    // The box's sets, PBX check and steps as it reported them (escaped).
    for shown in [
        "<td>recordings</td><td>syncing</td><td>75 s</td>",
        "<td>voicemail</td><td>in sync</td><td>0.0 s</td>",
        "failing (2 in a row, 1 restart(s))",
        "last failure: SIP OPTIONS &lt;timeout&gt;",
        "<td>take-address</td><td>212 ms</td><td>done</td>",
        "failed: arping: 5a:ec:b4:27:71:cf answers",
    ] {
        assert!(done.body.contains(shown), "{shown} in {}", done.body);
    }
    assert!(done.body.contains("generation 3"), "{}", done.body);
    assert!(
        done.body.contains("olga (portal)"),
        "the audit log names the account"
    );
    let events = portal.call("victor", "/events?pair=bench-00000&kind=promoted", &[], &[]);
    assert_eq!(events.body.matches("<td>promoted</td>").count(), 2);

    // Both boxes send their resource samples since they were activated, 10 ms apart or more
    // (the agent's are a minute apart; here the two failovers took a second).
    let now = lbs_tests::office::now_ms();
    // At most 301 samples per box (a message carries 360 at most), whatever the test took.
    let step = ((now - activated_at) / 300).max(10);
    let count = (now - activated_at) / step + 1;
    runtime.block_on(async {
        for (b, role, generation) in [(&primary, Role::Primary, 3), (&backup, Role::Backup, 3)] {
            let samples: Vec<lbs_protocol::control::ResourceSample> = (0..count)
                .map(|i| lbs_protocol::control::ResourceSample {
                    at_ms: activated_at + i * step,
                    cpu_permille: Some(100 + (i % 500) as u16),
                    memory_used: 1 << 30,
                    memory_total: 4 << 30,
                    disk_used: 20,
                    disk_total: 100,
                    rx_per_s: Some(2000),
                    tx_per_s: Some(1000),
                })
                .collect();
            let mut session =
                ReportSession::open(b, dc.control, &root, Generation(generation), role)
                    .await
                    .unwrap();
            let kept = session
                .call(Message::ResourceSamples { samples })
                .await
                .unwrap();
            assert_eq!(
                kept,
                Message::ResourceSamplesKept {
                    upto_ms: activated_at + (count - 1) * step
                }
            );
        }
    });
    // A box's page: every sample drawn, its time as primary shaded.
    let page = portal.call("victor", &format!("/box/{}", primary.sid), &[], &[]);
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body.contains(&format!("data-points=\"{count}\"")),
        "{}",
        page.body
    );
    assert!(page.body.contains("class=\"band\""), "shaded while primary");
    // The pair's view: both boxes, each while it was primary, together covering the time.
    let combined = portal.call("victor", "/pair/bench-00000/resources", &[], &[]);
    assert_eq!(combined.status, 200);
    let cpu = &combined.body[..combined.body.find("Memory in use").unwrap()];
    let drawn: Vec<usize> = cpu
        .match_indices("data-points=\"")
        .map(|(at, _)| {
            let rest = &cpu[at + 13..];
            rest[..rest.find('"').unwrap()].parse().unwrap()
        })
        .collect();
    assert_eq!(drawn.len(), 2, "both boxes' stretches as primary: {cpu}");
    // Every sample time has the primary of the moment's point: no gap at the failovers (the
    // first samples may precede the first box's activation event by a few ms).
    let total = drawn.iter().sum::<usize>() as u64;
    assert!(
        total + 20 >= count && total <= count,
        "{total} of {count} sample times drawn: {drawn:?}"
    );

    // /metrics: the token (or a session), and text a Prometheus parser reads.
    let anonymous = portal.call("nobody", "/metrics", &[], &[]);
    assert_eq!(anonymous.status, 401);
    let bearer = format!("Authorization: Bearer {TOKEN}");
    let metrics = portal.call("prometheus", "/metrics", &[], &["-H", &bearer]);
    assert_eq!(metrics.status, 200);
    let lines = metrics.body.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
    let value = |name: &str, pair: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && s.labels.get("pair") == Some(pair))
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    };
    assert_eq!(value("lbs_pair_generation", "bench-00000"), Some(3.0));
    let set_lag = |set: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == "lbs_box_set_lag_seconds" && s.labels.get("set") == Some(set))
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v) => v,
                _ => f64::NAN,
            })
    };
    assert_eq!(set_lag("voicemail"), Some(0.0));
    assert_eq!(set_lag("recordings"), Some(75.4));
    assert_eq!(value("lbs_box_pbx_healthy", "bench-00000"), Some(0.0));
    assert_eq!(
        value("lbs_pair_promotion_pending", "bench-00000"),
        Some(0.0)
    );
    assert_eq!(value("lbs_pair_generation", "bench-00001"), Some(0.0));
    assert!(value("lbs_box_report_age_seconds", "bench-00000").is_some());
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric == "process_resident_memory_bytes")
    );
    // Notes: an operator's goes into the pair's audit log with the account; a viewer's is
    // refused.
    let as_operator = portal.call("olga", "/pair/bench-00000", &[], &[]);
    let written = portal.call(
        "olga",
        "/pair/bench-00000/note",
        &[
            ("csrf", &csrf(&as_operator.body)),
            ("text", "router replaced <b>today</b>"),
        ],
        &[],
    );
    assert_eq!(written.status, 303, "{written:?}");
    let page = portal.call("victor", "/pair/bench-00000", &[], &[]);
    assert!(
        page.body
            .contains("router replaced &lt;b&gt;today&lt;/b&gt;"),
        "the note, escaped: {}",
        page.body
    );
    let refused = portal.call(
        "victor",
        "/pair/bench-00000/note",
        &[("csrf", &csrf(&page.body)), ("text", "mine")],
        &[],
    );
    assert_eq!(refused.status, 403);
    // Logging out ends the session.
    let fleet_page = portal.call("olga", "/", &[], &[]);
    let out = portal.call("olga", "/logout", &[("csrf", &csrf(&fleet_page.body))], &[]);
    assert_eq!(out.status, 303);
    assert_eq!(portal.call("olga", "/", &[], &[]).status, 303);
    // Removing an account ends its sessions.
    dc.cli(&["user", "remove", "victor"]).unwrap();
    assert_eq!(portal.call("victor", "/", &[], &[]).status, 303);
    dc.stop().unwrap();
}

#[test]
fn the_fleet_page_with_5000_pairs() {
    let token_file = token_file();
    let port = free_port().unwrap();
    let binary = workspace_binary("lbs-datacenter");
    let (mut dc, _) = Server::prepare(
        &binary,
        5000,
        "many.example",
        &portal_config(port, token_file.path()),
    )
    .unwrap();
    dc.cli_with_input(
        &["user", "add", "olga", "--password-stdin"],
        "olga's long password\n",
    )
    .unwrap();
    dc.start().unwrap();
    let portal = Portal::new(&dc, port);
    assert_eq!(portal.login("olga", "olga's long password").status, 303);
    let bearer = format!("Authorization: Bearer {TOKEN}");
    for (what, path, extra) in [
        ("fleet", "/", vec![]),
        ("fleet, searched", "/?q=bench-04999", vec![]),
        ("pair", "/pair/bench-02500", vec![]),
        ("events", "/events?kind=provisioned&hours=1", vec![]),
        ("metrics", "/metrics", vec!["-H", bearer.as_str()]),
    ] {
        let mut times = Vec::new();
        for _ in 0..5 {
            let started = Instant::now();
            let answer = portal.call("olga", path, &[], &extra);
            times.push(started.elapsed());
            assert_eq!(answer.status, 200, "{what}");
        }
        times.sort();
        println!(
            "measured: portal {what} with 5000 pairs: median {:?} (curl included)",
            times[2]
        );
    }
    dc.stop().unwrap();
}
