//! Hostile machines on the office LAN (see `lbs_tests::office`): one with a certificate from
//! another CA naming the backup, and one with a valid certificate of this data center but for
//! another pair's box. Each tries to pull the primary's media and to present itself to the
//! primary as the pair's primary at a higher generation. Each is refused with the reason,
//! nothing of the media leaves, and the pair's roles, generation and sync are untouched.
//! Root only; skipped and counted otherwise.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use lbs_protocol::{CertificateAuthority, PeerName};
use lbs_tests::office::{Office, SHARED, STEP};
use lbs_tests::{require_root, workspace_binary};

/// `lbs sync pull` of the primary's voicemail into `into`, as `identity`: what it said, and
/// whether it succeeded.
fn pull(office: &mut Office, identity: &Path, partner: &str, into: &Path) -> (bool, String) {
    std::fs::create_dir_all(into).unwrap();
    let mut cmd = office.lab.command("intruder", workspace_binary("lbs"));
    cmd.args(["sync", "pull", "--root"])
        .arg(into)
        .args(["--from", &format!("{SHARED}:7450"), "--partner", partner])
        .arg("--identity")
        .arg(identity)
        .arg("--ca")
        .arg(office.dir().join("dc1/ca.pem"))
        .arg("--state")
        .arg(into.with_extension("state"));
    let out = office.lab.run(cmd, STEP).unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A hello to the primary's port claiming to be the pair's primary at generation 99.
fn claim_primary(office: &mut Office, identity: &Path, partner: &str) -> (bool, String) {
    let mut cmd = office
        .lab
        .command("intruder", workspace_binary("lbs-hello"));
    cmd.args(["dial", "--role", "primary", "--generation", "99"])
        .args(["--partner", partner, "--connect", &format!("{SHARED}:7450")])
        .arg("--identity")
        .arg(identity)
        .arg("--ca")
        .arg(office.dir().join("dc1/ca.pem"));
    let out = office.lab.run(cmd, STEP).unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn impostors_can_neither_pull_media_nor_claim_the_primary_role() {
    if !require_root(
        "impostors_can_neither_pull_media_nor_claim_the_primary_role",
        "network namespaces",
    ) {
        return;
    }
    let mut office = Office::start().unwrap();
    office.bring_up_pair().unwrap();
    office.add_office_host("intruder", "192.168.1.66").unwrap();
    // The pair settles first: at start-up the backup's replication restarts once it learns
    // the partner's key, which can abort a handshake of its own in flight. Only what the
    // primary says from here on is about the intruder.
    office.wait_in_sync("backup", "primary").unwrap();
    let settled = office.agent_said("primary").len();
    let primary_sid = office.sids[0].0.to_string();
    let backup_sid = office.sids[1].0;

    // 1. A certificate from another CA, naming the backup.
    let other = CertificateAuthority::generate("not this installation").unwrap();
    let forged = other.issue_identity(&PeerName::Box(backup_sid)).unwrap();
    let forged_path = office.dir().join("forged");
    forged
        .save(
            &forged_path.with_extension("pem"),
            &forged_path.with_extension("key"),
        )
        .unwrap();
    let stolen = office.dir().join("stolen-1");
    let (ok, said) = pull(&mut office, &forged_path, &primary_sid, &stolen);
    assert!(!ok, "the forged certificate pulled: {said}");
    assert!(said.contains("refused this box's certificate"), "{said}");
    assert_eq!(std::fs::read_dir(&stolen).unwrap().count(), 0);
    let (ok, said) = claim_primary(&mut office, &forged_path, &primary_sid);
    assert!(!ok, "the forged certificate was heard: {said}");

    // 2. A real box of this data center, but of another pair.
    let other_pair = office.provision("globex", "pbx.globex.example").unwrap();
    let (sid, key) = other_pair[0].clone();
    let said = office.activate_as("intruder", sid, &key).unwrap();
    assert!(said.contains("PRIMARY of pair globex"), "{said}");
    let identity = office.state("intruder").join("identity");
    let stolen = office.dir().join("stolen-2");
    let (ok, said) = pull(&mut office, &identity, &primary_sid, &stolen);
    assert!(!ok, "another pair's box pulled: {said}");
    assert!(said.contains("refused"), "{said}");
    assert_eq!(std::fs::read_dir(&stolen).unwrap().count(), 0);
    let (ok, said) = claim_primary(&mut office, &identity, &primary_sid);
    assert!(!ok, "another pair's box was heard as primary: {said}");
    eprintln!("another pair's box, claiming the primary role: {said}");

    // The primary said so, each time, naming where it came from.
    let log = office.agent_said("primary");
    let refusals: Vec<&str> = log
        .get(settled..)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("refused a connection to the sync port"))
        .collect();
    assert!(
        refusals.len() >= 4 && refusals.iter().all(|l| l.contains("192.168.1.66")),
        "{refusals:#?}"
    );
    assert!(
        refusals
            .iter()
            .any(|l| l.contains(&format!("only box {} may", backup_sid))),
        "{refusals:#?}"
    );

    // Nothing changed: roles, generation, the data center's view, the copy.
    for (host, role) in [("primary", "primary"), ("backup", "backup")] {
        let status = office.status(host).unwrap();
        assert_eq!(status["role"]["state"], role, "{host}: {status}");
        assert_eq!(status["role"]["generation"], 1, "{host}: {status}");
    }
    let table: serde_json::Value =
        serde_json::from_str(&office.datacenter(&["status", "--json"]).unwrap()).unwrap();
    let acme = table
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "acme")
        .unwrap();
    assert_eq!(acme["generation"], 1, "{acme}");
    assert_eq!(acme["primary"], primary_sid, "{acme}");
    office.wait_in_sync("backup", "primary").unwrap();
}

/// Starts `lbs-hello flood` on `host` against the primary's sync port; returns once the
/// connections are open.
fn flood(office: &mut Office, host: &str, count: usize, slow: bool) -> String {
    let mut cmd = office.lab.command(host, workspace_binary("lbs-hello"));
    cmd.args(["flood", "--connect", &format!("{SHARED}:7450")])
        .args(["--count", &count.to_string(), "--hold-s", "60"]);
    if slow {
        cmd.arg("--slow");
    }
    let (_, said) = office.lab.spawn_until(cmd, "flooding:", STEP).unwrap();
    said
}

#[test]
fn a_flood_of_silent_connections_to_the_sync_port_stops_neither_replication_nor_p() {
    if !require_root(
        "a_flood_of_silent_connections_to_the_sync_port_stops_neither_replication_nor_p",
        "network namespaces",
    ) {
        return;
    }
    let mut office = Office::start().unwrap();
    office.bring_up_pair().unwrap();
    office.start_phone().unwrap();
    office.add_office_host("intruder", "192.168.1.66").unwrap();
    // From the phone's place on the LAN: 1,000 connections that never start TLS and 50 that
    // start it and stall, held for a minute.
    let said = flood(&mut office, "intruder", 1000, false);
    eprintln!("intruder: {said}");
    let said = flood(&mut office, "intruder", 50, true);
    eprintln!("intruder, slow: {said}");
    // A new voicemail still reaches the backup, promptly, several times over.
    for n in 0..3 {
        let rpo = office.measure_rpo("primary", "backup", 40 + n).unwrap();
        eprintln!("RPO under the flood: {rpo} ms");
        assert!(rpo < 10_000, "a voicemail took {rpo} ms under the flood");
    }
    // The primary holds a handful of the intruder's connections, not a thousand.
    let pid = office.agent_pid("primary").unwrap();
    let descriptors = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    eprintln!("the primary's agent holds {descriptors} descriptors under the flood");
    assert!(descriptors < 200, "{descriptors} descriptors");
    // And P works.
    let (rto, said) = office.fail_over("primary", "backup").unwrap();
    eprintln!("RTO under the flood: {rto} ms");
    assert!(
        said.contains("done: this box is the PRIMARY (gen 2)"),
        "{said}"
    );
    assert!(office.pbx_running("backup"));
}
