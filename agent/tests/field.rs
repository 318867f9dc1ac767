//! What a technician meets outside the lab's usual settings (issue 21): the agent on the
//! README's defaults against a bare `lbs-datacenter serve`, replication while a call is being
//! recorded without pause, P while the data center is frozen (SIGSTOP), P --force with the
//! primary alive, and connections that follow the address after P and B. Root only; skipped
//! and counted otherwise.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::*;
use lbs_tests::{ok, require_root};

/// Milliseconds since the Unix epoch, as the agent's status gives times.
fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

#[test]
fn the_agent_on_the_readme_defaults_keeps_running_against_a_bare_serve() {
    if !require_root(
        "the_agent_on_the_readme_defaults_keeps_running_against_a_bare_serve",
        "network namespaces",
    ) {
        return;
    }
    let mut pair = Pair::start(false);
    // The README's agent.toml: nothing but the sets (tunnels on by default), and a data
    // center whose datacenter.toml names no WireGuard endpoint.
    let config = pair.dir().join("a").join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[[set]]\nname = \"media\"\npath = \"{}\"\n",
            pair.media("a").display()
        ),
    )
    .unwrap();
    // A mistyped key: refused, and nothing left behind that a second try would trip on.
    let mut cmd = pair.lab.command("a", LBS);
    cmd.args([
        "activate",
        "--sid",
        &pair.sids[0].0.to_string(),
        "--key",
        "WRONG-KEY",
    ])
    .args(["--datacenter", &format!("{DC_IP}:7440")])
    .arg("--ca")
    .arg(pair.dc_dir().join("ca.pem"))
    .arg("--state")
    .arg(pair.state("a"));
    let out = pair.lab.run(cmd, STEP).unwrap();
    assert!(!out.status.success());
    assert!(!pair.state("a").join("vpn.key").exists());
    pair.activate("a", 0);
    // Under systemd with WatchdogSec=2.
    let notify_path = pair.dir().join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut cmd = pair.agent_command("a");
    cmd.env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "2000000");
    let (pid, _) = pair.lab.spawn_until(cmd, "ready:", STEP).unwrap();
    let started = Instant::now();
    pair.wait("a report answered", STEP, |pair| {
        pair.status("a")["datacenter"]["last_answer_ms"].is_u64()
    });
    // Still there a while later, and still reporting.
    std::thread::sleep(Duration::from_secs(3).saturating_sub(started.elapsed()));
    let before = pair.status("a")["datacenter"]["last_answer_ms"]
        .as_u64()
        .unwrap();
    pair.wait("another report answered", STEP, |pair| {
        pair.status("a")["datacenter"]["last_answer_ms"]
            .as_u64()
            .is_some_and(|at| at > before)
    });
    let mut buf = [0u8; 256];
    let mut pings = 0;
    while let Ok(n) = notify.recv(&mut buf) {
        pings += usize::from(&buf[..n] == b"WATCHDOG=1");
        if pings == 3 {
            break;
        }
    }
    assert_eq!(pings, 3, "the running agent pings systemd's watchdog");
    // systemctl reload: a new note is in force at once.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("promote_note = \"move the PRI cable\"\n{text}"),
    )
    .unwrap();
    pair.lab.signal(pid, "HUP").unwrap();
    pair.wait("the note in force after SIGHUP", STEP, |pair| {
        pair.status("a")["notes"]["promote"] == "move the PRI cable"
    });
    // `lbs reload` (ExecReload) says what it did; a file that does not parse changes nothing.
    let reload = |pair: &mut Pair| {
        let mut cmd = pair.lab.command("a", LBS);
        cmd.args(["reload", "--socket"]).arg(pair.socket("a"));
        let out = pair.lab.run(cmd, STEP).unwrap();
        // As one line: the message is wrapped to the terminal's width, where the path of the
        // configuration file decides the breaks.
        let said = String::from_utf8_lossy(&out.stdout);
        (
            out.status.success(),
            said.split_whitespace().collect::<Vec<_>>().join(" "),
        )
    };
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("sync_port = 7999\n{text}")).unwrap();
    let (done, said) = reload(&mut pair);
    assert!(done, "{said}");
    assert!(said.contains("sync_port changed and take"), "{said}");
    std::fs::write(&config, "debounce_ms = \"soon\"\n").unwrap();
    let (done, said) = reload(&mut pair);
    assert!(
        !done && said.contains("the configuration in force is kept"),
        "{said}"
    );
    assert_eq!(pair.status("a")["notes"]["promote"], "move the PRI cable");
    // For monitoring: 1 while degraded (the backup was never heard), with the reason; 2
    // when the agent does not answer.
    let (code, said) = pair.status_run("a");
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains("health     DEGRADED: partner never heard"),
        "{said}"
    );
    let stopped = pair.lab.stop(pid, STEP).unwrap();
    assert!(stopped.success(), "{stopped}");
    assert_eq!(pair.status_run("a").0, Some(2));
}

#[test]
fn a_recording_written_without_pause_holds_back_no_change() {
    if !require_root(
        "a_recording_written_without_pause_holds_back_no_change",
        "network namespaces",
    ) {
        return;
    }
    let mut pair = Pair::start(false);
    with_recordings_set(&pair);
    std::fs::write(pair.media("a").join("greeting.wav"), vec![7u8; 1000]).unwrap();
    pair.activate("a", 0);
    pair.activate("b", 1);
    pair.start_agent("a");
    pair.start_agent("b");
    pair.wait("the first full sync", STEP, |pair| {
        let status = pair.status("b");
        ["media", "recordings"]
            .iter()
            .all(|s| set(&status, s)["state"] == "in sync")
    });

    // A call recorded on the primary: 16 KiB every 100 ms for 20 s.
    let recording = pair.dir().join("a/recordings/call.wav");
    let copy = pair.dir().join("b/recordings/call.wav");
    let written: std::sync::Arc<std::sync::Mutex<Vec<(Instant, u64)>>> = Default::default();
    let writer = {
        let written = written.clone();
        let recording = recording.clone();
        std::thread::spawn(move || {
            let mut file = std::fs::File::create(&recording).unwrap();
            let block = vec![0x55u8; 16 * 1024];
            let mut len = 0u64;
            for _ in 0..200 {
                file.write_all(&block).unwrap();
                len += block.len() as u64;
                written.lock().unwrap().push((Instant::now(), len));
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    // What the primary had `behind` ago (0 before the recording began).
    let had = |behind: Duration| {
        let cut = Instant::now().checked_sub(behind).unwrap();
        written
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(at, _)| *at <= cut)
            .map_or(0, |(_, len)| *len)
    };
    let started = Instant::now();
    let mut voicemail_at: Option<Instant> = None;
    let mut voicemail_took = None;
    let mut worst_lag = Duration::ZERO;
    let mut in_sync_seen = 0;
    while started.elapsed() < Duration::from_secs(19) {
        if voicemail_at.is_none() && started.elapsed() > Duration::from_secs(5) {
            std::fs::write(pair.media("a").join("msg0001.txt"), vec![3u8; 300_000]).unwrap();
            voicemail_at = Some(Instant::now());
        }
        if let Some(at) = voicemail_at
            && voicemail_took.is_none()
            && std::fs::metadata(pair.media("b").join("msg0001.txt"))
                .is_ok_and(|m| m.len() == 300_000)
        {
            voicemail_took = Some(at.elapsed());
        }
        // The copy is never more than 3 s behind the primary.
        let status = pair.status("b");
        let copied = std::fs::metadata(&copy).map_or(0, |m| m.len());
        if started.elapsed() > Duration::from_secs(4) {
            assert!(
                copied >= had(Duration::from_secs(3)),
                "the copy of the recording has {copied} bytes; the primary had {} 3 s ago",
                had(Duration::from_secs(3))
            );
        }
        // "in sync" means: as of a moment at most 2 s ago, and the copy has what the
        // primary had then.
        let recordings = set(&status, "recordings");
        if recordings["state"] == "in sync" {
            in_sync_seen += 1;
            let as_of = recordings["last_in_sync_ms"].as_u64().unwrap();
            let age = Duration::from_millis(now_ms().saturating_sub(as_of));
            worst_lag = worst_lag.max(age);
            assert!(
                age < Duration::from_secs(2),
                "status says in sync, as of {age:?} ago, while the recording grows"
            );
            assert!(copied >= had(age + Duration::from_millis(200)));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    writer.join().unwrap();
    let took = voicemail_took.expect("the voicemail did not reach the backup while recording");
    eprintln!(
        "voicemail on the backup after {took:?} during the recording; in sync said {in_sync_seen} times, at most {worst_lag:?} old"
    );
    assert!(took < Duration::from_secs(2), "voicemail took {took:?}");
    pair.wait("the recording complete on the backup", STEP, |_| {
        std::fs::metadata(&copy).is_ok_and(|m| m.len() == 200 * 16 * 1024)
    });
    // All well now: `lbs status` exits 0.
    pair.wait("the backup healthy", STEP, |pair| {
        pair.status_run("b").0 == Some(0)
    });
}

#[test]
fn reports_piped_into_a_reader_that_stops_early_end_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    let dc = lbs_tests::workspace_binary("lbs-datacenter");
    let dir = tmp.path().join("dc");
    let run = |args: &[&str]| {
        lbs_tests::ok(
            std::process::Command::new(&dc)
                .arg("--dir")
                .arg(&dir)
                .args(args)
                .output()
                .unwrap(),
        )
    };
    run(&["init"]);
    for n in 0..20 {
        run(&[
            "provision-pair",
            "--name",
            &format!("office{n}"),
            "--fqdn",
            &format!("pbx.office{n}.example"),
        ]);
    }
    let mut dc_status = std::process::Command::new(&dc);
    dc_status.arg("--dir").arg(&dir).arg("status");
    let mut inventory = std::process::Command::new(LBS);
    inventory.args(["net", "inventory"]);
    for mut cmd in [dc_status, inventory] {
        // The reader has gone before the first line is written (`| head -0`).
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            !said.contains("panicked") && !said.contains("Broken pipe"),
            "{cmd:?}: {said}"
        );
        use std::os::unix::process::ExitStatusExt;
        assert!(
            out.status.success() || out.status.signal() == Some(13),
            "{cmd:?}: {:?}",
            out.status
        );
    }
}

/// Runs `lbs promote --yes` (with `args`) on `host`: whether it succeeded, what it said, and
/// how long it took.
fn promote(pair: &mut Pair, host: &str, args: &[&str]) -> (bool, String, Duration) {
    let mut cmd = pair.lab.command(host, LBS);
    cmd.args(["promote", "--yes"])
        .args(args)
        .arg("--socket")
        .arg(pair.socket(host));
    let started = Instant::now();
    let out = pair.lab.run(cmd, Duration::from_secs(60)).unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("[{host}] lbs promote {args:?}:\n{said}");
    (out.status.success(), said, started.elapsed())
}

#[test]
fn p_with_the_data_center_frozen_gives_up_in_time_and_nothing_happens_later() {
    if !require_root(
        "p_with_the_data_center_frozen_gives_up_in_time_and_nothing_happens_later",
        "network namespaces",
    ) {
        return;
    }
    let (mut pair, a, b) = Pair::office_pair("");
    pair.agents.push(b);
    pair.unplug("a", a);
    pair.wait_primary_silent("b");
    // The data center's process stops (SIGSTOP): it accepts TCP, answers nothing.
    let dc = pair.dc_pid;
    pair.lab.signal(dc, "STOP").unwrap();
    let (promoted, said, took) = promote(&mut pair, "b", &[]);
    assert!(!promoted, "{said}");
    assert!(took < Duration::from_secs(20), "P took {took:?}");
    assert!(said.contains("nothing was changed"), "{said}");
    assert!(said.contains("--offline"), "{said}");
    assert_eq!(pair.status("b")["role"]["state"], "backup");
    // The data center resumes: the box stays the backup — nobody pressed P again.
    pair.lab.signal(dc, "CONT").unwrap();
    pair.wait("a report answered again", STEP, |pair| {
        pair.status("b")["datacenter"]["last_error"].is_null()
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(pair.status("b")["role"]["state"], "backup");
    assert_eq!(pair.pbx("b"), "down");
    assert!(!pair.addresses("b").contains("192.168.70.2/"));
    // P again works.
    pair.wait_primary_silent("b");
    let (promoted, said, _) = promote(&mut pair, "b", &[]);
    assert!(promoted, "{said}");
    assert_eq!(pair.pbx("b"), "up");
}

/// What the data center last heard from `sid`: the role it reported and where it serves.
fn reported(pair: &Pair, sid: &str) -> (String, String) {
    let table = pair.datacenter_status();
    let server = table[0]["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["sid"] == sid)
        .unwrap()
        .clone();
    (
        server["report"]["role"].as_str().unwrap_or("").to_owned(),
        server["advertised"].as_str().unwrap_or("").to_owned(),
    )
}

#[test]
fn after_p_and_b_the_connections_follow_the_address() {
    if !require_root(
        "after_p_and_b_the_connections_follow_the_address",
        "network namespaces",
    ) {
        return;
    }
    let (mut pair, a, b) = Pair::office_pair("");
    pair.agents.push(b);
    let b_sid = pair.sids[1].0.to_string();
    // The data center's word on the primary ages while it is unreachable — by one report
    // interval at most (1 s here): past that its answer is overdue, and this box's own
    // isolation is not the primary's silence (chaos seed 2800 run 3).
    let silent = |pair: &mut Pair| {
        pair.status("b")["info"]["partner"]["silent_ms"]
            .as_u64()
            .unwrap()
    };
    pair.unplug("a", a);
    let dc = pair.dc_pid;
    pair.lab.signal(dc, "STOP").unwrap();
    let before = silent(&mut pair);
    std::thread::sleep(Duration::from_millis(1500));
    let after = silent(&mut pair);
    assert!(
        after >= 1000 && after >= before && after <= before + 1000,
        "{before} ms, then {after} ms"
    );
    pair.lab.signal(dc, "CONT").unwrap();
    pair.wait_primary_silent("b");

    let (promoted, said, _) = promote(&mut pair, "b", &[]);
    assert!(promoted, "{said}");
    // The new primary's next report comes from the address it took, at once.
    let took = pair.wait(
        "the data center to hear the new primary at the shared address",
        STEP,
        |pair| reported(pair, &b_sid) == ("primary".into(), "192.168.70.2".into()),
    );
    assert!(took < Duration::from_secs(3), "{took:?}");

    // The old primary returns, steps back, and B makes it the backup: the re-sync pulls
    // from the primary's address at once.
    ok(pair
        .lab
        .sh("a", &["ip", "link", "set", "eth0", "up"])
        .unwrap());
    // Its kernel still holds the address and announces it before the agent starts.
    ok(pair
        .lab
        .sh(
            "a",
            &[
                "arping",
                "-q",
                "-U",
                "-c",
                "2",
                "-I",
                "eth0",
                "192.168.70.2",
            ],
        )
        .unwrap());
    let a = pair.agent_with("a", &[]);
    pair.agents.push(a);
    pair.wait("a fenced", STEP, |pair| {
        pair.status("a")["role"]["state"] == "fenced"
    });
    // Its kernel used the stale address before its agent stepped back: the new primary,
    // which the data center made primary and whose partner it fenced, keeps the address.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(pair.status("b")["role"]["state"], "primary");
    assert!(pair.addresses("b").contains("192.168.70.2/"));
    let (demoted, said) = pair.role_change("a", "demote");
    assert!(demoted, "{said}");
    let resync: f64 = said
        .lines()
        .find_map(|l| l.strip_prefix("done: in sync with the primary after "))
        .and_then(|rest| rest.trim_end_matches(" s").parse().ok())
        .unwrap_or_else(|| panic!("{said}"));
    assert!(resync < 2.0, "re-sync took {resync} s:\n{said}");
    assert!(!said.contains("error"), "{said}");
}

#[test]
fn p_forced_with_the_primary_alive_leaves_one_box_answering_for_the_address() {
    if !require_root(
        "p_forced_with_the_primary_alive_leaves_one_box_answering_for_the_address",
        "network namespaces",
    ) {
        return;
    }
    // Every role change is told to a notify script, with the namespace it ran in.
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("notify.sh");
    let told = tmp.path().join("told");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$(ip netns identify $$) $1 $2 $3|$LBS_ROLE\" >> {}\n",
            told.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (mut pair, a, b) = Pair::office_pair(&format!("notify = \"{}\"\n", script.display()));
    pair.agents.extend([a, b]);
    let (a_mac, b_mac) = (pair.mac("a"), pair.mac("b"));
    // A sniffer on the LAN (the data center's host) with epoch times, and a phone-like host
    // asking for the shared address ten times a second.
    let mut dump = pair.lab.command("dc", "sh");
    dump.args([
        "-c",
        "exec tcpdump -i eth0 -l -n -e -tt --immediate-mode arp 2>&1",
    ]);
    let (dump, _, lines) = pair.lab.spawn_reading(dump, "listening on", STEP).unwrap();
    let mut ask = pair.lab.command("dc", "sh");
    ask.args([
        "-c",
        "echo asking; for i in $(seq 80); do arping -q -c 1 -w 1 -I eth0 192.168.70.2; sleep 0.1; done",
    ]);
    let (ask, _) = pair.lab.spawn_until(ask, "asking", STEP).unwrap();
    std::thread::sleep(Duration::from_secs(1));

    // P --force on the backup while the primary lives and answers.
    let (promoted, said, _) = promote(&mut pair, "b", &["--force"]);
    assert!(promoted, "{said}");
    // The old primary steps back by itself, then learns the generation from the data
    // center through its own address.
    pair.wait("the old primary fenced", STEP, |pair| {
        pair.status("a")["role"]["state"] == "fenced"
    });
    pair.wait("the old primary at generation 2", STEP, |pair| {
        pair.status("a")["role"]["generation"] == 2
    });
    assert!(!pair.addresses("a").contains("192.168.70.2/"));
    assert_eq!(pair.pbx("a"), "down");
    pair.lab.wait_exit(ask, STEP).unwrap();
    pair.lab.kill(dump).unwrap();

    // Who claimed .2 (replies, announcements) and when.
    let claims: Vec<(f64, String)> =
        std::iter::from_fn(|| lines.recv_timeout(Duration::from_secs(5)).ok())
            .filter(|line| {
                line.contains("Reply 192.168.70.2 is-at") || line.contains("tell 192.168.70.2,")
            })
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                let at = words.next()?.parse().ok()?;
                Some((at, words.next()?.to_owned()))
            })
            .collect();
    let first_b = claims
        .iter()
        .find(|(_, mac)| *mac == b_mac)
        .map(|(at, _)| *at)
        .expect("the new primary never announced the address");
    let late_a: Vec<f64> = claims
        .iter()
        .filter(|(at, mac)| *mac == a_mac && *at > first_b + 0.1)
        .map(|(at, _)| at - first_b)
        .collect();
    assert!(
        late_a.is_empty(),
        "the old primary still answered {} time(s) later than 100 ms after the new one's announcement: {late_a:?}",
        late_a.len()
    );
    assert!(
        claims.iter().any(|(_, mac)| *mac == a_mac),
        "the sniffer saw the old primary before"
    );

    // The notify hook heard every change on both boxes, in order.
    let (ns_a, ns_b) = (pair.lab.ns("a"), pair.lab.ns("b"));
    pair.wait("the notify hook told of the fencing", STEP, |_| {
        std::fs::read_to_string(&told).is_ok_and(|t| t.contains(&format!("{ns_a} fenced")))
    });
    let told = std::fs::read_to_string(&told).unwrap();
    let of = |ns: &str| -> Vec<String> {
        told.lines()
            .filter_map(|l| l.strip_prefix(&format!("{ns} ")))
            .map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" "))
            .collect()
    };
    assert_eq!(of(&ns_b), ["promoting 1", "primary 2"], "{told}");
    assert_eq!(of(&ns_a)[0], "fenced 1", "{told}");
    assert!(
        told.contains("the partner (") && told.contains("|fenced"),
        "{told}"
    );
}

/// An office pair whose primary checks its PBX every second: healthy while the file `sick`
/// (a path the shell expands) does not exist, unhealthy after two failures, restarted
/// `restarts` times; `extra` at the top of both configurations.
fn pbx_checked_pair(sick: &std::path::Path, extra: &str, restarts: u32) -> Pair {
    let (mut pair, a, b) = Pair::office_pair(&format!(
        "{extra}pbx_check = \"! test -e {}\"\npbx_check_interval_s = 1\npbx_check_fails = 2\npbx_restart_tries = {restarts}\n",
        sick.display()
    ));
    pair.agents.extend([a, b]);
    pair
}

#[test]
fn a_pbx_that_fails_its_check_is_restarted_then_declared_down() {
    if !require_root(
        "a_pbx_that_fails_its_check_is_restarted_then_declared_down",
        "network namespaces",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let sick = tmp.path().join("sick");
    let mut pair = pbx_checked_pair(&sick, "", 2);
    pair.wait("the primary's PBX checked healthy", STEP, |pair| {
        pair.status("a")["pbx"]["ok"] == true
    });
    assert!(pair.status("b")["pbx"].is_null(), "only the primary checks");

    // It hangs: two failures, a restart (pbx_stop, pbx_start); it recovers.
    std::fs::write(&sick, b"").unwrap();
    pair.wait("a restart", STEP, |pair| {
        pair.status("a")["pbx"]["restarts"] == 1
    });
    assert_eq!(pair.pbx("a"), "up", "restarted with pbx_start");
    std::fs::remove_file(&sick).unwrap();
    pair.wait("healthy again", STEP, |pair| {
        let pbx = pair.status("a")["pbx"].clone();
        pbx["ok"] == true && pbx["restarts"] == 0
    });

    // It stays hung: both restarts, then it is declared down and the status degraded.
    std::fs::write(&sick, b"").unwrap();
    pair.wait("the PBX declared down", STEP, |pair| {
        pair.status("a")["pbx"]["down"] == true
    });
    assert_eq!(pair.status("a")["pbx"]["restarts"], 2);
    let (code, text) = pair.status_run("a");
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("PBX DOWN: unhealthy after 2 restart(s)"),
        "{text}"
    );
}

#[test]
fn with_automatic_failover_a_primary_whose_pbx_stays_down_hands_over_to_the_backup() {
    if !require_root(
        "with_automatic_failover_a_primary_whose_pbx_stays_down_hands_over_to_the_backup",
        "network namespaces",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // Only the first box's PBX falls sick: the check names it by its namespace.
    let check = tmp.path().join("sick-$(ip netns identify $$)");
    let mut pair = pbx_checked_pair(&check, "auto_failover = true\n", 1);
    let ns_a = pair.lab.ns("a");
    pair.wait("the primary's PBX checked healthy", STEP, |pair| {
        pair.status("a")["pbx"]["ok"] == true
    });
    // The backup's copy is current: the hand-over may go to it.
    pair.wait("the backup in sync", STEP, |pair| {
        pair.status("b")["health"]
            .as_array()
            .is_some_and(Vec::is_empty)
    });

    // The primary's PBX hangs for good: a restart, then down, then the hand-over.
    let started = Instant::now();
    std::fs::write(tmp.path().join(format!("sick-{ns_a}")), b"").unwrap();
    pair.wait("the backup primary at generation 2", STEP, |pair| {
        let role = pair.status("b")["role"].clone();
        role["state"] == "primary" && role["generation"] == 2
    });
    let took = started.elapsed();
    pair.wait("the old primary fenced", STEP, |pair| {
        pair.status("a")["role"]["state"] == "fenced"
    });
    assert_eq!(pair.pbx("b"), "up");
    assert_eq!(pair.pbx("a"), "down");
    assert!(pair.addresses("b").contains("192.168.70.2/"));
    pair.wait("the old primary off the shared address", STEP, |pair| {
        !pair.addresses("a").contains("192.168.70.2/")
    });
    eprintln!("hand-over {took:?} after the PBX hung");
    // The audit log says why and how.
    let dc = lbs_tests::workspace_binary("lbs-datacenter");
    let events = lbs_tests::ok(
        std::process::Command::new(&dc)
            .arg("--dir")
            .arg(pair.dc_dir())
            .arg("events")
            .output()
            .unwrap(),
    );
    assert!(events.contains("hand-over requested"), "{events}");
    assert!(events.contains("(hand-over by the primary)"), "{events}");
}

/// Both boxes on the README's debounce, with the recordings in a set of their own.
fn with_recordings_set(pair: &Pair) {
    for host in ["a", "b"] {
        let config = pair.dir().join(host).join("agent.toml");
        let recordings = pair.dir().join(host).join("recordings");
        std::fs::create_dir_all(&recordings).unwrap();
        let text = std::fs::read_to_string(&config)
            .unwrap()
            .replace("debounce_ms = 100\n", "");
        std::fs::write(
            &config,
            format!(
                "{text}\n[[set]]\nname = \"recordings\"\npath = \"{}\"\n",
                recordings.display()
            ),
        )
        .unwrap();
    }
}

/// CPU time (user + system) a process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name (which may hold spaces) start after its ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let per_s = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap() as u64;
    Duration::from_millis(ticks * 1000 / per_s)
}

/// The p-th percentile (0–100) of `values`.
fn percentile(values: &[Duration], p: usize) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    sorted
        .get((sorted.len() * p / 100).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

#[test]
fn a_busy_office_keeps_every_copy_within_seconds_and_an_idle_agent_costs_nothing() {
    if !require_root(
        "a_busy_office_keeps_every_copy_within_seconds_and_an_idle_agent_costs_nothing",
        "network namespaces",
    ) {
        return;
    }
    const CALLS: usize = 8;
    const BUSY: Duration = Duration::from_secs(60);
    let mut pair = Pair::start(false);
    with_recordings_set(&pair);
    // The prompt tree's shape: 5,696 files of a few KiB in 40 directories.
    for i in 0..5696u32 {
        let dir = pair.media("a").join(format!("sounds/dir{:02}", i % 40));
        std::fs::create_dir_all(&dir).unwrap();
        let len = 2000 + (i as usize * 7919) % 14000;
        std::fs::write(
            dir.join(format!("prompt{i}.gsm")),
            vec![(i % 251) as u8; len],
        )
        .unwrap();
    }
    // The calls have been going on for a quarter of an hour: 14.4 MB recorded each.
    const EARLIER: usize = 14_400_000;
    for call in 0..CALLS {
        let earlier: Vec<u8> = (0..EARLIER).map(|i| (i * 31 + call) as u8).collect();
        std::fs::write(
            pair.dir().join(format!("a/recordings/call{call}.wav")),
            earlier,
        )
        .unwrap();
    }
    pair.activate("a", 0);
    pair.activate("b", 1);
    pair.start_agent("a");
    pair.start_agent("b");
    pair.wait("the first full sync", Duration::from_secs(120), |pair| {
        let status = pair.status("b");
        ["media", "recordings"]
            .iter()
            .all(|s| set(&status, s)["state"] == "in sync")
    });
    let (primary_pid, backup_pid) = (pair.agents[0], pair.agents[1]);

    // The 8 calls go on, 16 KB/s each (1,600 bytes every 100 ms); a voicemail every 5 s; a
    // config edit every 7 s.
    type Log = std::sync::Arc<std::sync::Mutex<Vec<(Instant, u64)>>>;
    let logs: Vec<Log> = (0..CALLS).map(|_| Log::default()).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..CALLS)
        .map(|call| {
            let (log, stop) = (logs[call].clone(), stop.clone());
            let path = pair.dir().join(format!("a/recordings/call{call}.wav"));
            std::thread::spawn(move || {
                let mut file = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .unwrap();
                let mut len = EARLIER as u64;
                let frame: Vec<u8> = (0..1600u32).map(|i| (i * 31 + call as u32) as u8).collect();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    file.write_all(&frame).unwrap();
                    len += frame.len() as u64;
                    log.lock().unwrap().push((Instant::now(), len));
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        })
        .collect();
    let cpu_before = cpu_time(primary_pid);
    let started = Instant::now();
    // The lag of a copy holding `copied` bytes: how long ago the primary first had more.
    let lag = |log: &Log, copied: u64, now: Instant| {
        let log = log.lock().unwrap();
        match log.iter().find(|(_, len)| *len > copied) {
            Some((at, _)) => now.saturating_duration_since(*at),
            // Even the first write of this phase has not arrived: behind since it began.
            None if copied < EARLIER as u64 => now.saturating_duration_since(started),
            None => Duration::ZERO,
        }
    };
    let mut lags: Vec<Duration> = Vec::new();
    let mut worst: Vec<Duration> = vec![Duration::ZERO; CALLS];
    let mut voicemails: Vec<(std::path::PathBuf, Instant, Option<Duration>)> = Vec::new();
    let mut edits = 0u32;
    while started.elapsed() < BUSY {
        let elapsed = started.elapsed();
        if elapsed >= Duration::from_secs(5) * (voicemails.len() as u32 + 1) {
            let name = format!("msg{:04}.wav", voicemails.len());
            std::fs::write(pair.media("a").join(&name), vec![9u8; 80_000]).unwrap();
            voicemails.push((pair.media("b").join(&name), Instant::now(), None));
        }
        if elapsed >= Duration::from_secs(7) * (edits + 1) {
            edits += 1;
            std::fs::write(
                pair.media("a").join("extensions.conf"),
                format!("[default]\n; edit {edits}\n"),
            )
            .unwrap();
        }
        let now = Instant::now();
        for (call, log) in logs.iter().enumerate() {
            let copy = pair.dir().join(format!("b/recordings/call{call}.wav"));
            let copied = std::fs::metadata(&copy).map_or(0, |m| m.len());
            let behind = lag(log, copied, now);
            // The first seconds: the file may not exist on the primary's list yet.
            if elapsed > Duration::from_secs(3) {
                lags.push(behind);
                worst[call] = worst[call].max(behind);
                assert!(
                    behind < Duration::from_secs(5),
                    "call {call}'s copy is {behind:?} behind after {elapsed:?}"
                );
            }
        }
        for (copy, at, took) in &mut voicemails {
            if took.is_none() && std::fs::metadata(&*copy).is_ok_and(|m| m.len() == 80_000) {
                *took = Some(at.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let busy_cpu = cpu_time(primary_pid).saturating_sub(cpu_before);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for writer in writers {
        writer.join().unwrap();
    }
    let voicemail_worst = voicemails
        .iter()
        .map(|(copy, at, took)| {
            took.unwrap_or_else(|| {
                let deadline = Instant::now() + Duration::from_secs(10);
                while !std::fs::metadata(copy).is_ok_and(|m| m.len() == 80_000) {
                    assert!(
                        Instant::now() < deadline,
                        "{} never arrived",
                        copy.display()
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
                at.elapsed()
            })
        })
        .max()
        .unwrap();
    eprintln!(
        "busy office, {CALLS} calls for {BUSY:?} ({} samples): copy lag p50 {:?}, p99 {:?}, max {:?}; worst per call {:?}; voicemails ({}) at most {voicemail_worst:?}; primary agent CPU {:.1}% of a core",
        lags.len(),
        percentile(&lags, 50),
        percentile(&lags, 99),
        percentile(&lags, 100),
        worst,
        voicemails.len(),
        busy_cpu.as_secs_f64() * 100.0 / BUSY.as_secs_f64()
    );
    assert!(
        voicemail_worst < Duration::from_secs(5),
        "{voicemail_worst:?}"
    );

    // Quiet: everything settles, then neither agent spends more than a little of a core.
    pair.wait("in sync after the calls", STEP, |pair| {
        let status = pair.status("b");
        ["media", "recordings"]
            .iter()
            .all(|s| set(&status, s)["state"] == "in sync")
    });
    std::thread::sleep(Duration::from_secs(2));
    let (p0, b0) = (cpu_time(primary_pid), cpu_time(backup_pid));
    let quiet = Duration::from_secs(20);
    std::thread::sleep(quiet);
    let share = |used: Duration| used.as_secs_f64() * 100.0 / quiet.as_secs_f64();
    let (primary_idle, backup_idle) = (
        share(cpu_time(primary_pid) - p0),
        share(cpu_time(backup_pid) - b0),
    );
    eprintln!(
        "idle with 5,696 prompt files: primary agent {primary_idle:.2}% of a core, backup {backup_idle:.2}%"
    );
    assert!(
        primary_idle < 2.0 && backup_idle < 2.0,
        "{primary_idle}% / {backup_idle}%"
    );
}
