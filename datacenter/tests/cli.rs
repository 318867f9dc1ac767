//! `lbs-datacenter` as an operator runs it: init, provisioning, status and the audit log.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

const DC: &str = env!("CARGO_BIN_EXE_lbs-datacenter");

fn dc(dir: &Path, args: &[&str]) -> Output {
    Command::new(DC)
        .arg("--dir")
        .arg(dir)
        .args(args)
        .output()
        .unwrap()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn init_provision_status_and_events() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dc");

    let (_, err) = text(&dc(&dir, &["status"]));
    assert!(err.contains("init` first"), "{err}");

    let out = dc(&dir, &["init"]);
    assert!(out.status.success(), "{:?}", text(&out));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    let again = dc(&dir, &["init"]);
    assert!(!again.status.success());
    assert!(text(&again).1.contains("never replaced"));

    let out = dc(
        &dir,
        &[
            "provision-pair",
            "--name",
            "acme",
            "--fqdn",
            "pbx.acme.example",
        ],
    );
    let (stdout, _) = text(&out);
    assert!(out.status.success(), "{stdout}");
    let sids: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("SID "))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(sids.len(), 2, "{stdout}");

    for (args, expected) in [
        (
            &["provision-pair", "--name", "acme", "--fqdn", "x.example"][..],
            "exists already",
        ),
        (
            &[
                "provision-pair",
                "--name",
                "Bad_Name",
                "--fqdn",
                "x.example",
            ][..],
            "invalid pair name",
        ),
        (
            &["provision-pair", "--name", "ok", "--fqdn", "nodot"][..],
            "not a DNS name",
        ),
        (
            &["provision-backup", "--for", sids[0]][..],
            "has its two servers already",
        ),
        (
            &["provision-backup", "--for", "00-00-00-00-00-01"][..],
            "unknown server",
        ),
    ] {
        let out = dc(&dir, args);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            text(&out).1.contains(expected),
            "{args:?}: {:?}",
            text(&out)
        );
    }

    let single = dc(
        &dir,
        &[
            "provision-pair",
            "--name",
            "solo",
            "--fqdn",
            "pbx.solo.example",
            "--single",
        ],
    );
    let solo_sid = text(&single)
        .0
        .lines()
        .find_map(|l| l.trim().strip_prefix("SID "))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let backup = dc(&dir, &["provision-backup", "--for", &solo_sid]);
    assert!(backup.status.success(), "{:?}", text(&backup));

    let status = dc(&dir, &["status", "--json"]);
    let pairs: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let pairs = pairs.as_array().unwrap();
    assert_eq!(pairs.len(), 2);
    assert_eq!(pairs[0]["name"], "acme");
    assert_eq!(pairs[0]["generation"], 0);
    assert_eq!(pairs[1]["servers"].as_array().unwrap().len(), 2);
    assert!(pairs.iter().all(|p| {
        p["servers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["role"] == "unactivated")
    }));

    let events = dc(&dir, &["events"]);
    let (log, _) = text(&events);
    assert_eq!(
        log.lines().filter(|l| l.contains("provisioned")).count(),
        4,
        "{log}"
    );
    assert!(log.contains(" UTC"), "{log}");
    // The keys themselves never reach the log.
    let key = stdout
        .lines()
        .find_map(|l| l.split("activation key ").nth(1))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    assert!(!log.contains(key));
    let db = std::fs::read(dir.join("datacenter.db")).unwrap();
    assert!(
        !db.windows(key.len()).any(|w| w == key.as_bytes()),
        "a key is stored in clear"
    );
}

/// Activates box `sid` with `key` straight in the database at `dir` (as `serve` would).
fn activate(dir: &Path, sid: lbs_protocol::ServerId, key: String) {
    use lbs_datacenter::store::{ActivationRequest, SqliteStore, Store};
    SqliteStore::open(&dir.join("datacenter.db"))
        .unwrap()
        .activate(
            &ActivationRequest {
                sid,
                key,
                wireguard_key: "wg".into(),
                tls_key: "tls".into(),
                lan_address: "192.168.1.2".parse().unwrap(),
                software: "0.1.0".into(),
                inventory: "{}".into(),
                source: "198.51.100.7".into(),
            },
            "10.77.0.0/16".parse().unwrap(),
            lbs_datacenter::time::now_ms(),
        )
        .unwrap();
}

#[test]
fn status_problems_exits_for_monitoring_and_names_what_needs_a_person() {
    use lbs_datacenter::store::{SqliteStore, Store};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dc");
    // Nothing to read: 2.
    assert_eq!(dc(&dir, &["status", "--problems"]).status.code(), Some(2));
    assert!(dc(&dir, &["init"]).status.success());
    // A pair being installed (nothing activated) needs nobody: 0.
    let servers = SqliteStore::open(&dir.join("datacenter.db"))
        .unwrap()
        .provision_pair(
            "acme",
            "pbx.acme.example",
            2,
            std::time::Duration::from_secs(86_400),
            lbs_datacenter::time::now_ms(),
        )
        .unwrap();
    // serve is not running: that needs a person, whatever the boxes say.
    let out = dc(&dir, &["status", "--problems"]);
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    assert!(
        text(&out).0.starts_with("serve: NOT RUNNING"),
        "{:?}",
        text(&out)
    );
    // Its alive file renewed (as a running serve does every second): 0.
    let alive = std::fs::File::create(dir.join("serve.alive")).unwrap();
    let out = dc(&dir, &["status", "--problems"]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    assert!(
        text(&out)
            .0
            .starts_with("fleet: 1 pair(s), 0 of 0 box(es) heard")
    );
    // Not renewed for a minute (serve frozen or killed): 1, and said how long.
    let minute_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
    alive.set_modified(minute_ago).unwrap();
    let out = dc(&dir, &["status", "--problems", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(value["serve"]["state"], "silent", "{value}");
    assert!(value["serve"]["for_s"].as_u64().unwrap() >= 60, "{value}");
    alive.set_modified(std::time::SystemTime::now()).unwrap();
    // A box activated and never heard of since: 1, and it is named.
    let sid = servers[0].sid;
    activate(&dir, sid, servers[0].key.to_string());
    let out = dc(&dir, &["status", "--problems"]);
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    let (stdout, _) = text(&out);
    assert!(stdout.contains("1 silent"), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "primary {sid} has not reported since it was activated"
        )),
        "{stdout}"
    );
    let json = dc(&dir, &["status", "--problems", "--json"]);
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(value["summary"]["silent"], 1, "{value}");
    assert_eq!(
        value["pairs"][0]["problems"][0]["problem"], "silent",
        "{value}"
    );
    // One pair by name; an unknown one cannot be read: 2.
    assert!(dc(&dir, &["status", "acme"]).status.success());
    let out = dc(&dir, &["status", "globex"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("no pair named globex"));
}

/// A child process killed when dropped, whatever the test did.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn events_of_one_pair_and_followed_as_they_are_recorded() {
    use lbs_datacenter::store::{SqliteStore, Store};
    use std::io::BufRead;
    use std::time::Duration;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dc");
    assert!(dc(&dir, &["init"]).status.success());
    let db = dir.join("datacenter.db");
    let provision = |name: &str| {
        SqliteStore::open(&db)
            .unwrap()
            .provision_pair(
                name,
                &format!("pbx.{name}.example"),
                2,
                Duration::from_secs(86_400),
                lbs_datacenter::time::now_ms(),
            )
            .unwrap()
    };
    provision("acme");
    let initech = provision("initech");
    let out = dc(&dir, &["events", "--pair", "acme"]);
    let (stdout, _) = text(&out);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains(" acme ") && !stdout.contains("initech"),
        "{stdout}"
    );
    let out = dc(&dir, &["events", "--pair", "globex", "--follow"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "an unknown pair is refused, not followed"
    );
    assert!(text(&out).1.contains("no pair named globex"));

    // Followed, one JSON event per line.
    let mut child = Killed(
        Command::new(DC)
            .arg("--dir")
            .arg(&dir)
            .args(["events", "--follow", "--json", "--pair", "initech"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (lines, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let pair_of = |line: &str| -> String {
        let event: serde_json::Value = serde_json::from_str(line).unwrap();
        event["pair"].as_str().unwrap_or("-").to_owned()
    };
    // What was recorded before: initech's provisioning only.
    let first = seen.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(pair_of(&first), "initech", "{first}");
    while let Ok(line) = seen.recv_timeout(Duration::from_millis(1500)) {
        assert_eq!(pair_of(&line), "initech", "{line}");
    }
    // Recorded now: another pair's provisioning (not shown), initech's activation (shown).
    provision("globex");
    activate(&dir, initech[0].sid, initech[0].key.to_string());
    let next = seen.recv_timeout(Duration::from_secs(10)).unwrap();
    let event: serde_json::Value = serde_json::from_str(&next).unwrap();
    assert_eq!(event["pair"], "initech", "{event}");
    assert_eq!(event["sid"], initech[0].sid.to_string(), "{event}");
}

#[test]
fn provisioning_from_a_file_is_all_or_nothing_and_speaks_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dc");
    assert!(dc(&dir, &["init"]).status.success());
    let file = tmp.path().join("pairs.txt");
    let from = |lines: &str, json: bool| {
        std::fs::write(&file, lines).unwrap();
        let mut args = vec!["provision-pair", "--from", file.to_str().unwrap()];
        if json {
            args.push("--json");
        }
        dc(&dir, &args)
    };
    let pairs_now = || {
        let out = dc(&dir, &["status", "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        status.as_array().unwrap().len()
    };

    // A wrong line anywhere: nothing is provisioned, and the line is named.
    let out = from("acme pbx.acme.example\nBeta pbx.beta.example\n", false);
    assert!(!out.status.success());
    assert!(text(&out).1.contains("line 2"), "{:?}", text(&out));
    let out = from("acme pbx.acme.example\nacme pbx.other.example\n", false);
    assert!(text(&out).1.contains("listed twice"), "{:?}", text(&out));
    assert_eq!(pairs_now(), 0);

    let out = from(
        "# office, fqdn\nacme pbx.acme.example\n\nbeta pbx.beta.example # new\n",
        true,
    );
    assert!(out.status.success(), "{:?}", text(&out));
    let keys: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let named: Vec<(&str, &str)> = keys
        .iter()
        .map(|k| (k["pair"].as_str().unwrap(), k["fqdn"].as_str().unwrap()))
        .collect();
    assert_eq!(
        named,
        [
            ("acme", "pbx.acme.example"),
            ("acme", "pbx.acme.example"),
            ("beta", "pbx.beta.example"),
            ("beta", "pbx.beta.example")
        ]
    );
    for key in &keys {
        key["sid"]
            .as_str()
            .unwrap()
            .parse::<lbs_protocol::ServerId>()
            .unwrap();
        assert_eq!(key["key"].as_str().unwrap().len(), 29, "{key}");
    }
    assert_eq!(pairs_now(), 2);

    // One pair that exists already: the new ones are not provisioned either.
    let out = from("gamma pbx.gamma.example\nbeta pbx.beta.example\n", false);
    let (_, err) = text(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("beta") && err.contains("none of the 2 pairs"),
        "{err}"
    );
    assert_eq!(pairs_now(), 2);
}
