//! A pair of boxes and a data center in network namespaces, each running the real binaries:
//! `lbs-datacenter serve` in `dc`, `lbs activate` then `lbs agent` in `a` and `b`. The boxes
//! activate in the order the test picks (the first is primary), then the backup follows the
//! primary's files: a new file, a growing recording (appends only), and an astdb being
//! written (copied consistently). An impostor cannot pull; `lbs status` shows it all.
//! Root only; skipped and counted otherwise.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use lbs_protocol::{CertificateAuthority, PeerName, ServerId};
use lbs_tests::{ok, require_root, workspace_binary};

#[test]
fn the_second_box_activates_first_with_its_agent_already_waiting() {
    if require_root(
        "the_second_box_activates_first_with_its_agent_already_waiting",
        "network namespaces",
    ) {
        scenario("b", true);
    }
}

#[test]
fn the_first_box_activates_first_and_the_agents_start_after() {
    if require_root(
        "the_first_box_activates_first_and_the_agents_start_after",
        "network namespaces",
    ) {
        scenario("a", false);
    }
}

/// `p` activates first (so it is the primary); `agents_first`: the agents are running, as on
/// a preinstalled box, before anyone activates.
fn scenario(p: &str, agents_first: bool) {
    let q = if p == "a" { "b" } else { "a" };
    let index = |host: &str| usize::from(host == "b");
    let mut pair = Pair::start(false);
    if agents_first {
        pair.start_waiting_agent("b");
        pair.start_waiting_agent("a");
    }
    // Something on the future primary before anything starts: the first full sync brings it.
    std::fs::write(pair.media(p).join("greeting.wav"), vec![7u8; 300_000]).unwrap();
    let started = Instant::now();
    let said = pair.activate(p, index(p));
    assert!(said.contains("is the PRIMARY of pair acme"), "{said}");
    assert!(said.contains("not activated yet"), "{said}");
    let said = pair.activate(q, index(q));
    assert!(said.contains("is the BACKUP of pair acme"), "{said}");
    assert!(
        said.contains("first full sync from the primary starts"),
        "{said}"
    );
    // Activating again without --again is refused, and changes nothing.
    let mut again = pair.lab.command(q, LBS);
    again
        .args([
            "activate",
            "--sid",
            &pair.sids[index(q)].0.to_string(),
            "--key",
            "x",
        ])
        .args(["--datacenter", &format!("{DC_IP}:7440")])
        .arg("--ca")
        .arg(pair.dc_dir().join("ca.pem"))
        .arg("--state")
        .arg(pair.state(q));
    let out = pair.lab.run(again, STEP).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("activated already"));

    if !agents_first {
        pair.start_agent("b");
        pair.start_agent("a");
    }
    pair.wait("the first full sync", STEP, |pair| {
        std::fs::read(pair.media(q).join("greeting.wav")).is_ok_and(|c| c == vec![7u8; 300_000])
    });
    eprintln!(
        "first full sync done {:?} after the first activation",
        started.elapsed()
    );

    // A new file on the primary: on the backup, verified, within seconds (the RPO).
    std::fs::write(pair.media(p).join("voicemail-1.txt"), b"call me back").unwrap();
    let rpo = pair.wait("a new file", Duration::from_secs(10), |pair| {
        std::fs::read(pair.media(q).join("voicemail-1.txt")).is_ok_and(|c| c == b"call me back")
    });
    eprintln!(
        "RPO: a new file on the primary was on the backup {:?} after it was written",
        rpo
    );

    // A recording that grows: only the new bytes cross.
    let recording = pair.media(p).join("monitor-1.wav");
    std::fs::write(&recording, vec![1u8; 4 << 20]).unwrap();
    pair.wait("the recording", STEP, |pair| {
        std::fs::metadata(pair.media(q).join("monitor-1.wav")).is_ok_and(|m| m.len() == 4 << 20)
    });
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&recording)
            .unwrap();
        file.write_all(&vec![2u8; 64 << 10]).unwrap();
    }
    pair.wait("the recording's growth", STEP, |pair| {
        std::fs::metadata(pair.media(q).join("monitor-1.wav"))
            .is_ok_and(|m| m.len() == (4 << 20) + (64 << 10))
    });
    let status = pair.status(q);
    let fetched = set(&status, "media")["last_fetched_bytes"]
        .as_u64()
        .unwrap();
    assert!(
        fetched < 1 << 20,
        "the growth of a 4 MiB recording moved {fetched} bytes"
    );
    assert_eq!(
        std::fs::read(pair.media(q).join("monitor-1.wav")).unwrap(),
        std::fs::read(&recording).unwrap()
    );

    // The astdb, written to while it is replicated: every copy the backup gets is whole.
    let db = rusqlite::Connection::open(pair.astdb(p)).unwrap();
    db.execute_batch(
        "PRAGMA journal_mode = wal; CREATE TABLE astdb (key TEXT PRIMARY KEY, value TEXT);",
    )
    .unwrap();
    for i in 0..200 {
        db.execute(
            "INSERT INTO astdb VALUES (?1, ?2)",
            (format!("/SIP/Registry/{i}"), "x".repeat(500)),
        )
        .unwrap();
        if i % 20 == 0 {
            std::thread::sleep(Duration::from_millis(30));
            if pair.astdb(q).exists() {
                let copy = rusqlite::Connection::open(pair.astdb(q)).unwrap();
                let check: String = copy
                    .query_row("PRAGMA integrity_check", [], |r| r.get(0))
                    .unwrap();
                assert_eq!(check, "ok", "a torn astdb copy");
            }
        }
    }
    pair.wait("the astdb copy", STEP, |pair| {
        rusqlite::Connection::open(pair.astdb(q))
            .and_then(|c| c.query_row("SELECT COUNT(*) FROM astdb", [], |r| r.get::<_, i64>(0)))
            .is_ok_and(|n| n == 200)
    });

    // An impostor (a certificate from another CA naming the backup) cannot pull.
    let other = CertificateAuthority::generate("not this installation").unwrap();
    let impostor = other
        .issue_identity(&PeerName::Box(pair.sids[0].0))
        .unwrap();
    let imp = pair.dir().join("impostor");
    impostor
        .save(&imp.with_extension("pem"), &imp.with_extension("key"))
        .unwrap();
    std::fs::create_dir_all(pair.dir().join("stolen")).unwrap();
    let mut pull = pair.lab.command(q, LBS);
    pull.args(["sync", "pull", "--root"])
        .arg(pair.dir().join("stolen"))
        .args([
            "--from",
            &format!("{}:7450", pair.ip(p)),
            "--partner",
            &pair.sids[index(p)].0.to_string(),
        ])
        .arg("--identity")
        .arg(&imp)
        // It trusts the real CA (so it does reach the primary); its own certificate is not
        // from it.
        .arg("--ca")
        .arg(pair.dc_dir().join("ca.pem"))
        .arg("--state")
        .arg(pair.dir().join("impostor-state"));
    let out = pair.lab.run(pull, STEP).unwrap();
    assert!(!out.status.success(), "the impostor pulled");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("refused this box's certificate"), "{said}");
    assert_eq!(
        std::fs::read_dir(pair.dir().join("stolen"))
            .unwrap()
            .count(),
        0
    );

    // Status on both sides.
    let primary = pair.status(p);
    assert_eq!(primary["role"]["state"], "primary");
    assert_eq!(primary["replication"], "serving");
    assert_eq!(
        primary["info"]["partner"]["sid"],
        pair.sids[index(q)].0.to_string()
    );
    assert!(primary["datacenter"]["last_answer_ms"].as_u64().is_some());
    // A reconcile may be running at any moment: wait for every set to be in sync.
    pair.wait("every set in sync", STEP, |pair| {
        let status = pair.status(q);
        status["sets"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["state"] == "in sync")
    });
    let backup = pair.status(q);
    assert_eq!(backup["role"]["state"], "backup");
    assert_eq!(backup["role"]["generation"], 1);
    assert_eq!(backup["replication"], "pulling");
    assert_eq!(set(&backup, "media")["state"], "in sync");
    assert!(!backup["resources"].as_array().unwrap().is_empty());
    let table = pair.status_text(q);
    assert!(
        table.contains("BACKUP") && table.contains("media") && table.contains("in sync"),
        "{table}"
    );
    assert!(table.contains("resources  CPU"), "{table}");

    // SIGTERM stops both agents cleanly and removes their sockets.
    for pid in pair.agents.clone() {
        let status = pair.lab.stop(pid, STEP).unwrap();
        assert!(status.success(), "agent exited with {status}");
    }
    assert!(!pair.socket("a").exists() && !pair.socket("b").exists());
}

#[test]
fn a_remote_backup_replicates_through_the_tunnels() {
    if !require_root(
        "a_remote_backup_replicates_through_the_tunnels",
        "network namespaces and tun devices",
    ) {
        return;
    }
    let mut pair = Pair::start(true);
    // The boxes cannot reach each other directly.
    let direct = pair
        .lab
        .sh("a", &["ping", "-c1", "-W1", "192.168.71.3"])
        .unwrap();
    assert!(!direct.status.success(), "a reaches b without the tunnels");
    std::fs::write(pair.media("a").join("greeting.wav"), vec![7u8; 300_000]).unwrap();
    pair.activate("a", 0);
    pair.activate("b", 1);
    let started = Instant::now();
    pair.start_agent("a");
    pair.start_agent("b");
    pair.wait("the first full sync through the tunnels", STEP, |pair| {
        std::fs::read(pair.media("b").join("greeting.wav")).is_ok_and(|c| c == vec![7u8; 300_000])
    });
    eprintln!(
        "first full sync over the overlay {:?} after the agents started",
        started.elapsed()
    );
    // Each box pins the key the data center certified for its partner; replication goes on.
    for host in ["a", "b"] {
        pair.wait("the partner's key pinned", STEP, |pair| {
            pair.status(host)["info"]["partner_key"]["fingerprint"]
                .as_str()
                .is_some_and(|f| f.len() == 32)
        });
    }
    std::fs::write(pair.media("a").join("voicemail-1.txt"), b"call me back").unwrap();
    let rpo = pair.wait("a new file", Duration::from_secs(10), |pair| {
        std::fs::read(pair.media("b").join("voicemail-1.txt")).is_ok_and(|c| c == b"call me back")
    });
    eprintln!("RPO over the overlay: {rpo:?}");
    let backup = pair.status("b");
    let tunnel = &backup["tunnels"]["tunnels"][0];
    assert_eq!(tunnel["health"], "up", "{tunnel}");
    assert_eq!(tunnel["active"], true);
    let partner = &backup["info"]["partner"];
    assert!(
        partner["overlay"].as_str().unwrap().starts_with("10.77."),
        "{partner}"
    );
    let table = pair.status_text("b");
    assert!(table.contains("tunnel     dc1 Up (active)"), "{table}");
    for pid in pair.agents.clone() {
        let status = pair.lab.stop(pid, STEP).unwrap();
        assert!(status.success(), "agent exited with {status}");
    }
}

#[test]
fn a_box_of_another_pair_reaches_nothing_of_this_pair_over_the_overlay() {
    if !require_root(
        "a_box_of_another_pair_reaches_nothing_of_this_pair_over_the_overlay",
        "network namespaces, tun devices and nftables",
    ) {
        return;
    }
    let mut pair = Pair::start(true);
    // Another customer's box, of another pair of the same data center, on a's LAN.
    pair.lab.add_host("c", "192.168.70.4/24").unwrap();
    let sheet = pair.datacenter(&[
        "provision-pair",
        "--name",
        "other",
        "--fqdn",
        "pbx.other.example",
        "--single",
        "--json",
    ]);
    pair.sids.extend(lbs_tests::provisioned(&sheet));
    pair.prepare("c");
    std::fs::write(pair.media("a").join("greeting.wav"), vec![7u8; 1000]).unwrap();
    for (n, host) in ["a", "b", "c"].into_iter().enumerate() {
        pair.activate(host, n);
        pair.start_agent(host);
    }
    pair.wait("a and b in sync through the tunnels", STEP, |pair| {
        std::fs::read(pair.media("b").join("greeting.wav")).is_ok_and(|c| c == vec![7u8; 1000])
    });
    pair.wait("c's tunnel up", STEP, |pair| {
        pair.status("c")["tunnels"]["tunnels"][0]["health"] == "up"
    });
    let overlay = |pair: &mut Pair, of: &str| {
        pair.status(of)["info"]["overlay"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (a, b) = (overlay(&mut pair, "a"), overlay(&mut pair, "b"));
    let connects = |pair: &mut Pair, from: &str, ip: &str, port: u16| {
        let script = format!("exec 3<>/dev/tcp/{ip}/{port}");
        let out = pair
            .lab
            .sh(from, &["timeout", "3", "bash", "-c", &script])
            .unwrap();
        out.status.success()
    };
    let pings = |pair: &mut Pair, from: &str, ip: &str| {
        let out = pair.lab.sh(from, &["ping", "-c1", "-W1", ip]).unwrap();
        out.status.success()
    };
    // The pair's own boxes reach each other through the endpoint.
    assert!(
        connects(&mut pair, "b", &a, 7450),
        "b cannot reach a's sync port"
    );
    assert!(
        pings(&mut pair, "a", &b),
        "a cannot ping b over the overlay"
    );
    // The other customer's box reaches neither, on any port.
    assert!(
        !connects(&mut pair, "c", &a, 7450),
        "c reaches a's sync port"
    );
    assert!(!pings(&mut pair, "c", &a), "c pings a over the overlay");
    assert!(!pings(&mut pair, "c", &b), "c pings b over the overlay");
    // Its own tunnel still works: the endpoint answers its heartbeats.
    assert_eq!(pair.status("c")["tunnels"]["tunnels"][0]["health"], "up");
    for pid in pair.agents.clone() {
        let status = pair.lab.stop(pid, STEP).unwrap();
        assert!(status.success(), "agent exited with {status}");
    }
}

#[test]
fn p_with_the_primary_unplugged_moves_its_address_to_the_backup() {
    if !require_root(
        "p_with_the_primary_unplugged_moves_its_address_to_the_backup",
        "network namespaces",
    ) {
        return;
    }
    let (mut pair, a, b) = Pair::office_pair("promote_note = \"move the PRI cable to this box\"\n");
    pair.agents.extend([a, b]);
    let promote = |pair: &mut Pair| {
        let mut cmd = pair.lab.command("b", LBS);
        cmd.args(["promote", "--yes", "--socket"])
            .arg(pair.socket("b"));
        pair.lab.run(cmd, STEP).unwrap()
    };

    // While the primary lives: refused, with the reason and how long to wait (exit code 4: P
    // again after the wait may succeed), and nothing changes.
    // (office_pair waited for the data center to hear the primary.)
    let out = promote(&mut pair);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(4), "{said}");
    assert!(
        said.contains("refused: the data center heard the primary"),
        "{said}"
    );
    assert_eq!(pair.status("b")["role"]["state"], "backup");

    // The primary's agent dies, but the box still answers on the LAN: refused, naming its MAC.
    let primary_agent = pair.agents[0];
    pair.lab.kill(primary_agent).unwrap();
    pair.agents.remove(0);
    pair.wait_primary_silent("b");
    let a_mac = pair.mac("a");
    let out = promote(&mut pair);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(3), "{said}");
    assert!(
        said.contains(&format!(
            "refused: cannot take 192.168.70.2: {a_mac} still answers ARP"
        )),
        "{said}"
    );
    assert_eq!(pair.status("b")["role"]["state"], "backup");
    // Its switch port goes dark. Two consoles press P at once: exactly one promotes.
    ok(pair
        .lab
        .sh("a", &["ip", "link", "set", "eth0", "down"])
        .unwrap());
    let racers: Vec<std::process::Output> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let mut cmd = pair.lab.command("b", LBS);
                cmd.args(["promote", "--yes", "--socket"])
                    .arg(pair.socket("b"));
                scope.spawn(move || cmd.output().unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (won, lost): (Vec<_>, Vec<_>) = racers.into_iter().partition(|o| o.status.success());
    assert_eq!((won.len(), lost.len()), (1, 1), "exactly one P wins");
    let lost = String::from_utf8_lossy(&lost[0].stdout).into_owned();
    assert!(lost.contains("refused:"), "{lost}");
    let out = &won[0];
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{said}");
    assert!(
        said.contains("NOTE: move the PRI cable to this box"),
        "{said}"
    );
    assert!(
        said.contains("nobody answers ARP for 192.168.70.2"),
        "{said}"
    );
    assert!(
        said.contains("the data center made this box primary at gen 2"),
        "{said}"
    );
    assert!(said.contains("took 192.168.70.2/24 on eth0"), "{said}");
    assert!(
        said.contains("done: this box is the PRIMARY (gen 2)"),
        "{said}"
    );
    // A third host reaches the backup at the old primary's address.
    let addresses = ok(pair
        .lab
        .sh("b", &["ip", "-4", "-o", "addr", "show", "eth0"])
        .unwrap());
    assert!(addresses.contains("192.168.70.2/24"), "{addresses}");
    assert!(!addresses.contains("192.168.70.3/24"), "{addresses}");
    assert_eq!(
        pair.boot_address("b"),
        "192.168.70.2/24",
        "a reboot keeps it"
    );
    let ping = pair
        .lab
        .sh("dc", &["ping", "-c1", "-W2", "192.168.70.2"])
        .unwrap();
    assert!(
        ping.status.success(),
        "the data center cannot reach 192.168.70.2"
    );
    let status = pair.status("b");
    assert_eq!(status["role"]["state"], "primary");
    assert_eq!(status["role"]["generation"], 2);
    assert_eq!(status["replication"], "serving");
    let dc = workspace_binary("lbs-datacenter");
    let table = ok(Command::new(&dc)
        .arg("--dir")
        .arg(pair.dc_dir())
        .args(["status", "--json"])
        .output()
        .unwrap());
    let table: serde_json::Value = serde_json::from_str(&table).unwrap();
    assert_eq!(table[0]["generation"], 2);
    assert_eq!(table[0]["primary"], pair.sids[1].0.to_string());
    // A second P on the new primary is refused.
    let out = promote(&mut pair);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).contains("only the backup can be promoted"));

    // The old primary is repaired and reboots believing it is primary, its boot configuration
    // still holding the shared address, its way to the data center cut. A third host asks
    // for the shared address all along. Before the network comes up, the boot check probes
    // it, finds the new primary answering and gives the box its own address instead; the
    // agent then steps back at once (the data center confirms later). The old primary never
    // answers for the shared address.
    std::fs::write(
        pair.media("b").join("after.txt"),
        b"written on the new primary",
    )
    .unwrap();
    let arp = pair.watch_arp("192.168.70.2");
    ok(pair
        .lab
        .sh("a", &["ip", "addr", "flush", "dev", "eth0"])
        .unwrap());
    let mut check = pair.lab.command("a", LBS);
    check
        .args(["net", "boot-check", "--config"])
        .arg(pair.dir().join("a").join("agent.toml"))
        .arg("--state")
        .arg(pair.state("a"));
    let said = ok(pair.lab.run(check, STEP).unwrap());
    let b_mac = pair.mac("b");
    assert!(
        said.contains(&format!(
            "CHANGED: {b_mac} answers for 192.168.70.2: the partner took over"
        )),
        "{said}"
    );
    assert_eq!(pair.boot_address("a"), "192.168.70.3/24", "{said}");
    // What the network service then does with the boot configuration.
    let boot = pair.boot_address("a");
    for step in [
        vec!["ip", "addr", "add", &boot, "dev", "eth0"],
        vec!["ip", "link", "set", "eth0", "up"],
        vec!["ip", "route", "add", "default", "via", DC_IP],
    ] {
        ok(pair.lab.sh("a", &step).unwrap());
    }
    let blackhole = ["ip", "route", "add", "blackhole", &format!("{DC_IP}/32")].map(str::to_owned);
    let blackhole: Vec<&str> = blackhole.iter().map(String::as_str).collect();
    ok(pair.lab.sh("a", &blackhole).unwrap());
    pair.start_agent("a");
    let status = pair.status("a");
    assert_eq!(
        status["role"]["state"], "fenced",
        "fenced before it is ready: {status}"
    );
    assert!(status["datacenter"]["last_answer_ms"].is_null(), "{status}");
    pair.wait("the old primary's PBX stopped", STEP, |pair| {
        pair.pbx("a") == "down"
    });
    assert!(!pair.addresses("a").contains("192.168.70.2/"));
    pair.stop_arp_watch(arp, "192.168.70.2", &a_mac, &b_mac);
    let mut unblock = blackhole.clone();
    unblock[2] = "del";
    ok(pair.lab.sh("a", &unblock).unwrap());
    pair.wait(
        "the data center's word reaching the old primary",
        STEP,
        |pair| pair.status("a")["role"]["generation"] == 2,
    );
    // B: it becomes the backup and syncs from the new primary until in sync.
    let mut demote = pair.lab.command("a", LBS);
    demote
        .args(["demote", "--yes", "--socket"])
        .arg(pair.socket("a"));
    let out = pair.lab.run(demote, STEP).unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{said}");
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("registered with the data center as backup"),
        "{said}"
    );
    assert!(said.contains("this box is the BACKUP"), "{said}");
    assert!(said.contains("done: in sync with the primary"), "{said}");
    pair.wait("the re-sync from the new primary", STEP, |pair| {
        std::fs::read(pair.media("a").join("after.txt"))
            .is_ok_and(|c| c == b"written on the new primary")
            && pair.status("a")["sets"]
                .as_array()
                .unwrap()
                .iter()
                .all(|s| s["state"] == "in sync")
    });
    let addresses = ok(pair
        .lab
        .sh("a", &["ip", "-4", "-o", "addr", "show", "eth0"])
        .unwrap());
    assert!(addresses.contains("192.168.70.3/24"), "{addresses}");
    assert_eq!(
        pair.boot_address("a"),
        "192.168.70.3/24",
        "a reboot keeps it"
    );
    // The re-announcements reach the data center's neighbour table: .3 is a's MAC now
    // (it was b's before the swap).
    let mac = pair.mac("a");
    pair.wait(
        "the data center's neighbour entry for .3 to follow",
        STEP,
        |pair| {
            let neigh = ok(pair
                .lab
                .sh("dc", &["ip", "neigh", "show", "192.168.70.3"])
                .unwrap());
            neigh.is_empty() || neigh.contains(&mac)
        },
    );
    let table: serde_json::Value = serde_json::from_str(&ok(Command::new(&dc)
        .arg("--dir")
        .arg(pair.dc_dir())
        .args(["status", "--json"])
        .output()
        .unwrap()))
    .unwrap();
    let role = |sid: ServerId| {
        table[0]["servers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["sid"] == sid.to_string())
            .unwrap()["role"]
            .clone()
    };
    assert_eq!(role(pair.sids[0].0), "backup");
    assert_eq!(role(pair.sids[1].0), "primary");
    for pid in pair.agents.clone() {
        let status = pair.lab.stop(pid, STEP).unwrap();
        assert!(status.success(), "agent exited with {status}");
    }
}

/// A primary whose cable is pulled takes the shared address off its interface at once (a box
/// that cannot see the LAN cannot know whether the backup took over); cable back and nobody
/// else on the address, it takes it back. Pulled again, and the backup promoted meanwhile:
/// when the cable returns the old primary never answers for the shared address (a third host
/// asking all along sees only the new primary) and steps back, fenced, at its own address.
#[test]
fn a_primary_whose_cable_is_pulled_answers_for_the_shared_address_only_after_checking() {
    if !require_root(
        "a_primary_whose_cable_is_pulled_answers_for_the_shared_address_only_after_checking",
        "network namespaces",
    ) {
        return;
    }
    let (mut pair, a, b) = Pair::office_pair("");
    pair.agents.extend([a, b]);
    let (a_mac, b_mac) = (pair.mac("a"), pair.mac("b"));
    let pull = |pair: &mut Pair| {
        pair.lab.plug("a", false).unwrap();
        pair.wait("the primary to withdraw the shared address", STEP, |pair| {
            !pair.addresses("a").contains("192.168.70.2/")
                && pair.status("a")["address_withdrawn"]["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("no carrier on eth0"))
        });
    };

    // A switch reboot, say: the address comes back once the primary has checked — also
    // when the agent restarted meanwhile (it finds the interface bare).
    pull(&mut pair);
    assert_eq!(pair.status("a")["role"]["state"], "primary");
    pair.lab.kill(a).unwrap();
    pair.agents.retain(|pid| *pid != a);
    pair.start_agent("a");
    assert!(!pair.addresses("a").contains("192.168.70.2/"));
    pair.lab.plug("a", true).unwrap();
    pair.wait("the primary to take its address back", STEP, |pair| {
        pair.addresses("a").contains("192.168.70.2/24")
            && pair.status("a")["address_withdrawn"].is_null()
    });
    let ping = pair
        .lab
        .sh("dc", &["ping", "-c1", "-W2", "192.168.70.2"])
        .unwrap();
    assert!(ping.status.success(), "the primary is not reachable again");
    let status = pair.status("a");
    assert_eq!(status["role"]["state"], "primary");
    assert_eq!(status["role"]["generation"], 1);

    // Pulled for good: the backup is promoted; then the cable goes back in.
    pull(&mut pair);
    pair.wait_primary_silent("b");
    let (promoted, said) = pair.role_change("b", "promote");
    assert!(promoted, "{said}");
    let arp = pair.watch_arp("192.168.70.2");
    pair.lab.plug("a", true).unwrap();
    pair.wait("the old primary to step back", STEP, |pair| {
        pair.status("a")["role"]["state"] == "fenced"
            && pair.pbx("a") == "down"
            && pair.addresses("a").contains("192.168.70.3/24")
    });
    pair.stop_arp_watch(arp, "192.168.70.2", &a_mac, &b_mac);
    assert!(pair.addresses("b").contains("192.168.70.2/24"));
    for pid in pair.agents.clone() {
        let status = pair.lab.stop(pid, STEP).unwrap();
        assert!(status.success(), "agent exited with {status}");
    }
}

/// kill -9 (here: the agent kills itself with SIGKILL right after the step, before it records
/// the step's outcome — the worst moment) at every step of P and of B, three failovers and
/// three failbacks in a row; each time the restarted agent finishes what was started, and
/// the boxes end whole: one holds the shared address with its PBX up, the other its own
/// address with its PBX down, the data center agrees, and the backup is in sync.
#[test]
fn kill_9_at_every_step_of_p_and_b_then_the_restart_finishes_it() {
    if !require_root(
        "kill_9_at_every_step_of_p_and_b_then_the_restart_finishes_it",
        "network namespaces",
    ) {
        return;
    }
    let (mut pair, a, b) = Pair::office_pair("");
    let mut agent = std::collections::HashMap::from([("a", a), ("b", b)]);
    let sid = |host: &str| pair.sids[usize::from(host == "b")].0.to_string();
    let (sid_a, sid_b) = (sid("a"), sid("b"));
    let sid_of = |host: &str| {
        if host == "a" {
            sid_a.clone()
        } else {
            sid_b.clone()
        }
    };
    let rounds = [
        ("ask-promotion", "stop-pbx"),
        ("take-address", "give-up-address"),
        ("start-pbx", "register-backup"),
    ];
    let (mut primary, mut backup) = ("a", "b");
    for (round, (p_crash, b_crash)) in rounds.into_iter().enumerate() {
        let generation = 2 + round as u64;
        eprintln!(
            "round {round}: P on {backup} dies after {p_crash}, B on {primary} after {b_crash}"
        );
        pair.lab.stop(agent[backup], STEP).unwrap();
        agent.insert(backup, pair.agent_with(backup, &["--crash-after", p_crash]));
        // The primary dies.
        pair.unplug(primary, agent[primary]);
        pair.wait_primary_silent(backup);
        let (done, said) = pair.role_change(backup, "promote");
        assert!(!done, "{said}");
        let died = pair.lab.wait_exit(agent[backup], STEP).unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&died),
            Some(9),
            "{died}"
        );
        assert_eq!(
            pair.recorded_state(backup)["state"],
            "promoting",
            "round {round}"
        );
        // Started again, it finishes the promotion.
        agent.insert(backup, pair.agent_with(backup, &[]));
        pair.wait("the promotion finished after the restart", STEP, |pair| {
            let role = &pair.status(backup)["role"];
            role["state"] == "primary" && role["generation"] == generation
        });
        let held = pair.addresses(backup);
        assert!(held.contains("192.168.70.2/24"), "{held}");
        assert!(!held.contains("192.168.70.3/24"), "{held}");
        assert_eq!(pair.boot_address(backup), "192.168.70.2/24");
        assert_eq!(pair.pbx(backup), "up");
        let table = pair.datacenter_status();
        assert_eq!(table[0]["generation"], generation);
        assert_eq!(table[0]["primary"], sid_of(backup));
        assert!(
            pair.lab
                .sh("dc", &["ping", "-c1", "-W2", "192.168.70.2"])
                .unwrap()
                .status
                .success(),
            "round {round}: the data center cannot reach 192.168.70.2"
        );

        // The old primary comes back, is fenced, and B dies after `b_crash`.
        let written = format!("after-{round}.txt");
        std::fs::write(pair.media(backup).join(&written), round.to_string()).unwrap();
        ok(pair
            .lab
            .sh(primary, &["ip", "link", "set", "eth0", "up"])
            .unwrap());
        agent.insert(
            primary,
            pair.agent_with(primary, &["--crash-after", b_crash]),
        );
        pair.wait(
            "the old primary fenced, off the shared address",
            STEP,
            |pair| {
                pair.status(primary)["role"]["state"] == "fenced"
                    && !pair.addresses(primary).contains("192.168.70.2/")
            },
        );
        assert_eq!(pair.pbx(primary), "down", "a fenced box stops its PBX");
        let (done, said) = pair.role_change(primary, "demote");
        assert!(!done, "{said}");
        let died = pair.lab.wait_exit(agent[primary], STEP).unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&died),
            Some(9),
            "{died}"
        );
        assert_eq!(
            pair.recorded_state(primary)["state"],
            "demoting",
            "round {round}"
        );
        agent.insert(primary, pair.agent_with(primary, &[]));
        pair.wait("the demotion finished and the copy in sync", STEP, |pair| {
            let status = pair.status(primary);
            status["role"]["state"] == "backup"
                && std::fs::read(pair.media(primary).join(&written))
                    .is_ok_and(|c| c == round.to_string().as_bytes())
                && status["sets"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|s| s["state"] == "in sync")
        });
        let held = pair.addresses(primary);
        assert!(held.contains("192.168.70.3/24"), "{held}");
        assert!(!held.contains("192.168.70.2/"), "{held}");
        assert_eq!(pair.boot_address(primary), "192.168.70.3/24");
        assert_eq!(pair.pbx(primary), "down");
        let table = pair.datacenter_status();
        let role = |sid: &str| {
            table[0]["servers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["sid"] == sid)
                .unwrap()["role"]
                .clone()
        };
        assert_eq!(role(&sid_of(primary)), "backup");
        assert_eq!(role(&sid_of(backup)), "primary");
        (primary, backup) = (backup, primary);
    }
    for host in ["a", "b"] {
        let status = pair.lab.stop(agent[host], STEP).unwrap();
        assert!(status.success(), "agent on {host} exited with {status}");
    }
}

/// The console on an 80×25 terminal, driven as an operator would through tmux: P refused
/// while the primary lives (the reason on screen), an impossible address refused, then P
/// with the configured address after the primary died, the note acknowledged and the steps
/// shown; on the returning old primary, B with its note, until in sync. No line is wider
/// than the screen.
#[test]
fn the_console_performs_p_and_b_on_80x25() {
    if !require_root(
        "the_console_performs_p_and_b_on_80x25",
        "network namespaces",
    ) {
        return;
    }
    let (mut pair, a, b) = Pair::office_pair(
        "promote_note = \"move the PRI cable to this box\"\ndemote_note = \"plug this box's LAN cable back in\"\n",
    );
    let tmux = lbs_tests::tmux::Tmux::new(pair.dir());
    let console: std::collections::HashMap<&str, String> = ["a", "b"]
        .into_iter()
        .map(|host| {
            let command = format!("{LBS} console --socket {}", pair.socket(host).display());
            (host, command)
        })
        .collect();
    tmux.open("b", 80, 25, &console["b"]).unwrap();
    let wait = |session: &str, needle: &str| {
        let screen = tmux.wait_for(session, needle, STEP).unwrap();
        for line in tmux.screen(session).unwrap() {
            assert!(
                line.chars().count() <= 80,
                "wider than the console: {line:?}"
            );
        }
        screen
    };
    let menu = wait("b", "Type a key and Enter");
    assert!(menu.contains("BACKUP"), "{menu}");
    assert!(
        menu.contains("P takes 192.168.70.2/24 via 192.168.70.1"),
        "{menu}"
    );
    for key in [
        "  P  Promote",
        "  B  Back to backup",
        "  S  Status",
        "  Q  Quit",
    ] {
        assert!(menu.contains(key), "{menu}");
    }
    assert!(tmux.screen("b").unwrap().len() <= 25);

    // B on the backup: explained, nothing changes.
    tmux.type_line("b", "B").unwrap();
    wait("b", "NOT CHANGED: this box is the BACKUP already");
    tmux.type_line("b", "").unwrap();
    wait("b", "Type a key and Enter");
    // P while the primary lives: refused with the reason, F offered, Enter goes back.
    // (office_pair waited for the data center to hear the primary.)
    tmux.type_line("b", "P").unwrap();
    let screen = wait("b", "F and Enter to force");
    assert!(
        screen.contains("the data center heard the primary"),
        "{screen}"
    );
    tmux.type_line("b", "").unwrap();
    wait("b", "Type a key and Enter");
    assert_eq!(pair.status("b")["role"]["state"], "backup");

    // The primary dies.
    pair.unplug("a", a);
    pair.wait_primary_silent("b");
    // An address whose network does not hold the gateway is refused, nothing changes.
    tmux.type_line("b", "P").unwrap();
    wait("b", "Address [192.168.70.2/24]");
    tmux.type_line("b", "10.9.9.2/24").unwrap();
    wait("b", "Gateway [192.168.70.1]");
    tmux.type_line("b", "").unwrap();
    let screen = wait("b", "Press Enter for the menu");
    assert!(
        screen.contains("NOT PROMOTED: the gateway 192.168.70.1 is not on 10.9.9.2/24's network"),
        "{screen}"
    );
    tmux.type_line("b", "").unwrap();
    wait("b", "Type a key and Enter");
    // Now with the configured address: the note, the confirmation, the steps.
    tmux.type_line("b", "P").unwrap();
    let screen = wait("b", "Address [192.168.70.2/24]");
    assert!(
        screen.contains("nobody answers ARP for 192.168.70.2"),
        "{screen}"
    );
    tmux.type_line("b", "").unwrap();
    wait("b", "Gateway [192.168.70.1]");
    tmux.type_line("b", "").unwrap();
    wait("b", "NOTE: move the PRI cable to this box");
    tmux.type_line("b", "y").unwrap();
    wait("b", "Type P and Enter to confirm");
    tmux.type_line("b", "P").unwrap();
    let screen = wait("b", "Press Enter for the menu");
    eprintln!("the console after P:\n{screen}");
    assert!(
        screen.contains("This box is the PRIMARY: the phones reach it"),
        "{screen}"
    );
    assert!(screen.contains("took 192.168.70.2/24 on eth0"), "{screen}");
    tmux.type_line("b", "").unwrap();
    let menu = wait("b", "Type a key and Enter");
    assert!(menu.contains("PRIMARY  gen 2"), "{menu}");
    // The name phones use, as the data center keeps it (this test's has no [dns]: nothing
    // updates it, and it says so); Enter refreshes until the next report brought it.
    let dns = "DNS        pbx.acme.example -> 192.168.70.2 (not configured)";
    let started = Instant::now();
    while !tmux.screen("b").unwrap().join("\n").contains(dns) {
        assert!(started.elapsed() < STEP, "{dns:?} not shown:\n{menu}");
        std::thread::sleep(Duration::from_millis(300));
        tmux.type_line("b", "").unwrap();
    }
    let held = pair.addresses("b");
    assert!(held.contains("192.168.70.2/24"), "{held}");
    assert_eq!(pair.pbx("b"), "up");

    // The old primary comes back and is fenced; B at its console.
    std::fs::write(pair.media("b").join("after.txt"), b"left during the outage").unwrap();
    ok(pair
        .lab
        .sh("a", &["ip", "link", "set", "eth0", "up"])
        .unwrap());
    let a = pair.agent_with("a", &[]);
    pair.wait("the old primary fenced", STEP, |pair| {
        pair.status("a")["role"]["state"] == "fenced"
    });
    tmux.open("a", 80, 25, &console["a"]).unwrap();
    let menu = wait("a", "Type a key and Enter");
    assert!(menu.contains("FENCED"), "{menu}");
    tmux.type_line("a", "B").unwrap();
    let screen = wait("a", "Type Y and Enter when done");
    assert!(
        screen.contains("gives up 192.168.70.2/24 for 192.168.70.3/24 on eth0"),
        "{screen}"
    );
    assert!(
        screen.contains("NOTE: plug this box's LAN cable back in"),
        "{screen}"
    );
    tmux.type_line("a", "y").unwrap();
    wait("a", "Type B and Enter to confirm");
    tmux.type_line("a", "b").unwrap();
    let screen = wait("a", "Press Enter for the menu");
    eprintln!("the console after B:\n{screen}");
    assert!(
        screen.contains("This box is the BACKUP and in sync with the primary"),
        "{screen}"
    );
    assert_eq!(
        std::fs::read(pair.media("a").join("after.txt")).unwrap(),
        b"left during the outage"
    );
    tmux.type_line("a", "").unwrap();
    let menu = wait("a", "Type a key and Enter");
    assert!(menu.contains("BACKUP  gen 2"), "{menu}");
    // S pages the full status; Q ends the console.
    tmux.type_line("a", "S").unwrap();
    wait("a", "replication pulling");
    tmux.type_line("a", "").unwrap();
    wait("a", "Type a key and Enter");
    tmux.type_line("a", "Q").unwrap();
    drop(tmux);
    for pid in [a, b] {
        let status = pair.lab.stop(pid, STEP).unwrap();
        assert!(status.success(), "agent exited with {status}");
    }
}

/// `auto_failover = true`: the backup promotes itself only when it *and* the data center have
/// both lost the primary for `primary_gone_after_s` (2 s here): not when only the data center
/// lost it (the primary's route to it cut), not when only the backup did (its route to the
/// primary cut); when the primary dies, it does, with the same steps as P.
#[test]
fn automatic_failover_only_when_the_backup_and_the_data_center_both_lost_the_primary() {
    if !require_root(
        "automatic_failover_only_when_the_backup_and_the_data_center_both_lost_the_primary",
        "network namespaces",
    ) {
        return;
    }
    let (mut pair, a, b) = Pair::office_pair("auto_failover = true\n");
    let heard_ago = |status: &serde_json::Value| {
        status["at_ms"].as_u64().unwrap() - status["primary_heard_ms"].as_u64().unwrap_or(0)
    };
    pair.wait(
        "the backup hearing the primary's heartbeats",
        STEP,
        |pair| heard_ago(&pair.status("b")) < 1_500,
    );

    // Only the data center loses the primary.
    ok(pair
        .lab
        .sh(
            "a",
            &["ip", "route", "add", "blackhole", &format!("{DC_IP}/32")],
        )
        .unwrap());
    pair.wait(
        "the data center to lose the primary for 4 s",
        STEP,
        |pair| {
            pair.status("b")["info"]["partner"]["silent_ms"]
                .as_u64()
                .is_some_and(|ms| ms >= 4_000)
        },
    );
    let status = pair.status("b");
    assert_eq!(status["role"]["state"], "backup", "{status}");
    let auto = status["auto_failover"].as_str().unwrap().to_owned();
    assert!(auto.contains("this box heard the primary"), "{auto}");
    ok(pair
        .lab
        .sh(
            "a",
            &["ip", "route", "del", "blackhole", &format!("{DC_IP}/32")],
        )
        .unwrap());
    pair.wait("the data center to hear the primary again", STEP, |pair| {
        pair.status("b")["info"]["partner"]["silent_ms"]
            .as_u64()
            .is_some_and(|ms| ms < 1_500)
    });

    // Only the backup loses the primary.
    ok(pair
        .lab
        .sh("b", &["ip", "route", "add", "blackhole", "192.168.70.2/32"])
        .unwrap());
    pair.wait("the backup to lose the primary for 4 s", STEP, |pair| {
        heard_ago(&pair.status("b")) >= 4_000
    });
    let status = pair.status("b");
    assert_eq!(status["role"]["state"], "backup", "{status}");
    let auto = status["auto_failover"].as_str().unwrap().to_owned();
    assert!(auto.contains("the data center heard the primary"), "{auto}");
    ok(pair
        .lab
        .sh("b", &["ip", "route", "del", "blackhole", "192.168.70.2/32"])
        .unwrap());
    pair.wait("the backup to hear the primary again", STEP, |pair| {
        heard_ago(&pair.status("b")) < 1_500
    });

    // The primary dies: both lose it, the backup promotes itself.
    pair.unplug("a", a);
    let took = pair.wait("the automatic promotion", STEP, |pair| {
        pair.status("b")["role"]["state"] == "primary"
    });
    eprintln!("the backup promoted itself {took:?} after the primary died (2 s threshold)");
    let status = pair.status("b");
    assert_eq!(status["role"]["generation"], 2);
    let auto = status["auto_failover"].as_str().unwrap().to_owned();
    assert!(auto.contains("promoted itself"), "{auto}");
    let held = pair.addresses("b");
    assert!(held.contains("192.168.70.2/24"), "{held}");
    assert_eq!(pair.pbx("b"), "up");
    let table = pair.datacenter_status();
    assert_eq!(table[0]["generation"], 2);
    assert_eq!(table[0]["primary"], pair.sids[1].0.to_string());
    let status = pair.lab.stop(b, STEP).unwrap();
    assert!(status.success(), "agent exited with {status}");
}

/// The provider's P: `lbs-datacenter promote <pair>` asks the backup's agent, which runs the
/// same checks as P at its console — refused (and the refusal recorded and logged on both
/// sides) while the primary lives, carried out once it is dead.
#[test]
fn a_promotion_requested_from_the_data_center_runs_the_same_checks() {
    if !require_root(
        "a_promotion_requested_from_the_data_center_runs_the_same_checks",
        "network namespaces",
    ) {
        return;
    }
    let (mut pair, a, b) = Pair::office_pair("");
    let dc = workspace_binary("lbs-datacenter");
    let request = |pair: &Pair| {
        let out = Command::new(&dc)
            .arg("--dir")
            .arg(pair.dc_dir())
            .args(["promote", "acme", "--wait-s", "15", "--by", "noc-alice"])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        eprintln!("lbs-datacenter promote acme:\n{said}");
        (out.status.code(), said)
    };

    // While the primary lives: refused by the backup's checks, nothing changes.
    let (code, said) = request(&pair);
    assert_eq!(code, Some(3), "{said}");
    assert!(
        said.contains("refused: the data center heard the primary"),
        "{said}"
    );
    assert_eq!(pair.status("b")["role"]["state"], "backup");
    assert_eq!(pair.datacenter_status()[0]["generation"], 1);

    // The primary dies; the same request goes through.
    pair.unplug("a", a);
    pair.wait_primary_silent("b");
    let (code, said) = request(&pair);
    assert_eq!(code, Some(0), "{said}");
    assert!(
        said.contains("done: the backup was promoted at gen 2"),
        "{said}"
    );
    pair.wait("the backup serving as primary", STEP, |pair| {
        pair.status("b")["role"]["state"] == "primary"
            && pair.addresses("b").contains("192.168.70.2/24")
    });
    assert_eq!(pair.pbx("b"), "up");
    // Nobody is left to promote now.
    let (code, said) = request(&pair);
    assert_ne!(code, Some(0), "{said}");
    assert!(said.contains("has no activated backup"), "{said}");
    // The audit log tells the whole story.
    let events = ok(Command::new(&dc)
        .arg("--dir")
        .arg(pair.dc_dir())
        .args(["events", "--json"])
        .output()
        .unwrap());
    let events: serde_json::Value = serde_json::from_str(&events).unwrap();
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .filter(|k| k.contains("promot"))
        .collect();
    assert_eq!(
        kinds,
        [
            "promotion requested",
            "promotion refused",
            "promotion requested",
            "promoted"
        ]
    );
    let status = pair.lab.stop(b, STEP).unwrap();
    assert!(status.success(), "agent exited with {status}");
}

/// The office lost its data center and the primary died: P is refused (the data center must
/// fence the old primary) and says `--offline` exists; with it the backup promotes itself at
/// the same generation, and when the data center answers again it asks it for the promotion
/// and the pair is at the next generation with this box primary.
#[test]
fn an_offline_promotion_needs_consent_and_is_reconciled_when_the_data_center_returns() {
    if !require_root(
        "an_offline_promotion_needs_consent_and_is_reconciled_when_the_data_center_returns",
        "network namespaces",
    ) {
        return;
    }
    let (mut pair, a, b) = Pair::office_pair("");
    let blackhole = format!("{DC_IP}/32");
    ok(pair
        .lab
        .sh("b", &["ip", "route", "add", "blackhole", &blackhole])
        .unwrap());
    pair.unplug("a", a);
    pair.wait(
        "the backup to lose the data center and the primary",
        STEP,
        |pair| {
            let status = pair.status("b");
            let now = status["at_ms"].as_u64().unwrap();
            let ago = |field: &serde_json::Value| now - field.as_u64().unwrap_or(0);
            ago(&status["datacenter"]["last_answer_ms"]) > 4_000
                && ago(&status["primary_heard_ms"]) > 2_000
        },
    );
    let (done, said) = pair.role_change("b", "promote");
    assert!(!done, "{said}");
    assert!(
        said.contains("the data center has not answered lately"),
        "{said}"
    );
    assert!(said.contains("--offline"), "{said}");
    let mut cmd = pair.lab.command("b", LBS);
    cmd.args(["promote", "--offline", "--yes", "--socket"])
        .arg(pair.socket("b"));
    let out = pair.lab.run(cmd, STEP).unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("lbs promote --offline:\n{said}");
    assert!(out.status.success(), "{said}");
    assert!(said.contains("OFFLINE promotion at gen 1"), "{said}");
    assert!(
        said.contains("done: this box is the PRIMARY (gen 1), offline"),
        "{said}"
    );
    let status = pair.status("b");
    assert_eq!(status["role"]["state"], "primary");
    assert_eq!(status["role"]["offline"], true);
    assert!(pair.addresses("b").contains("192.168.70.2/24"));
    assert_eq!(pair.pbx("b"), "up");
    assert_eq!(pair.datacenter_status()[0]["generation"], 1);

    // The data center is back: the promotion is reconciled.
    ok(pair
        .lab
        .sh("b", &["ip", "route", "del", "blackhole", &blackhole])
        .unwrap());
    pair.wait("the data center confirming the promotion", STEP, |pair| {
        let role = &pair.status("b")["role"];
        role["state"] == "primary" && role["generation"] == 2 && role["offline"] == false
    });
    let table = pair.datacenter_status();
    assert_eq!(table[0]["generation"], 2);
    assert_eq!(table[0]["primary"], pair.sids[1].0.to_string());
    let status = pair.lab.stop(b, STEP).unwrap();
    assert!(status.success(), "agent exited with {status}");
}
