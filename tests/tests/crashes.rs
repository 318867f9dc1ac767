//! kill -9 of an agent in the middle of P and of B, in the lab's office (see
//! `lbs_tests::office`), with the real PBX and the phone. Round 1 kills the agent the moment
//! it has recorded that the change began (`promoting`, `demoting` in role.json): the restart
//! must finish it. Round 2 kills on a clock, as a power cut would — P's agent 250 ms in, and
//! during B the *serving* primary's agent while the demoted box pulls from it — and the
//! operator presses the key again if the change had not begun. Whatever moment the kill hit,
//! the pair ends whole: the new primary holds the shared address with its PBX answering the
//! phone, the old one its own address with its PBX stopped and an in-sync copy, and the data
//! center agrees. (`agent/tests/pair.rs` kills at every named step through `--crash-after`.)
//! Root only; skipped and counted otherwise.
#![allow(clippy::unwrap_used)]

use std::process::Child;
use std::time::{Duration, Instant};

use lbs_tests::office::{OWN, Office, SHARED, STEP, now_ms};
use lbs_tests::{require_root, workspace_binary};

/// Starts `lbs <role change> --yes` on `host` without waiting for it.
fn press(office: &Office, host: &str, change: &str) -> Child {
    let mut cmd = office.lab.command(host, workspace_binary("lbs"));
    cmd.args([change, "--yes", "--socket"])
        .arg(office.dir().join(host).join("agent.sock"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    cmd.spawn().unwrap()
}

/// What the interrupted command printed; it must end (the agent's death closes its socket).
fn finish(child: Child) -> String {
    let deadline = Instant::now() + STEP;
    let mut child = child;
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the CLI hung after its agent died"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// When to kill the agent.
#[derive(Clone, Copy, Debug)]
enum Kill {
    /// As soon as its role.json records this state.
    Recorded(&'static str),
    /// This many milliseconds after the key was pressed.
    After(u64),
}

/// Waits for the moment `kill` names on `host`.
fn wait_for(office: &Office, host: &str, kill: Kill) {
    match kill {
        Kill::After(ms) => std::thread::sleep(Duration::from_millis(ms)),
        Kill::Recorded(state) => {
            let path = office.state(host).join("role.json");
            let deadline = Instant::now() + STEP;
            loop {
                let recorded = std::fs::read(&path)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
                if recorded.is_some_and(|r| r["state"] == state) {
                    return;
                }
                assert!(Instant::now() < deadline, "{host} never recorded {state}");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// `host`'s recorded role once its agent answers.
fn role(office: &mut Office, host: &str) -> Option<String> {
    let status = office.status(host).ok()?;
    status["role"]["state"].as_str().map(str::to_owned)
}

/// Waits until `host`'s restarted agent reports `done` (the change finished) or `before`
/// (it had not begun); which one.
fn settle(office: &mut Office, host: &str, [done, before]: [&str; 2]) -> String {
    let mut settled = String::new();
    office
        .wait("the restarted agent to settle", STEP, |o| {
            settled = role(o, host).unwrap_or_default();
            Ok(settled == done || settled == before)
        })
        .unwrap();
    settled
}

#[test]
fn kill_9_in_the_middle_of_p_and_b_and_the_pair_ends_whole() {
    if !require_root(
        "kill_9_in_the_middle_of_p_and_b_and_the_pair_ends_whole",
        "network namespaces, kamailio, sipp, BIND",
    ) {
        return;
    }
    let mut office = Office::start().unwrap();
    office.bring_up_pair().unwrap();
    office.start_phone().unwrap();
    office.first_answer_after(0, STEP).unwrap();
    let (mut primary, mut backup) = ("primary", "backup");
    let rounds = [
        (Kill::Recorded("promoting"), Kill::Recorded("demoting")),
        (Kill::After(250), Kill::After(300)),
    ];
    for (round, (p_kill, b_kill)) in rounds.into_iter().enumerate() {
        let generation = 2 + round as u64;
        office.power_off(primary).unwrap();
        office.wait_primary_gone(backup).unwrap();

        // P, and its agent killed in the middle.
        let pressed = now_ms();
        let p = press(&office, backup, "promote");
        wait_for(&office, backup, p_kill);
        office.kill_agent(backup).unwrap();
        let said = finish(p);
        office.start_agent(backup).unwrap();
        let finished_by_restart = settle(&mut office, backup, ["primary", "backup"]) == "primary";
        if let Kill::Recorded(_) = p_kill {
            assert!(
                finished_by_restart,
                "a begun promotion is finished by the restart"
            );
        }
        if !finished_by_restart {
            // Killed before the change began: the operator presses P again.
            office.promote(backup).unwrap();
        }
        let answered = office.first_answer_after(pressed, STEP).unwrap();
        let status = office.status(backup).unwrap();
        assert_eq!(status["role"]["generation"], generation, "{status}");
        let held = office.addresses(backup).unwrap();
        assert!(held.contains(&format!("{SHARED}/24")), "{held}");
        assert!(office.pbx_running(backup));
        eprintln!(
            "round {round}: P's agent killed at {p_kill:?} ({}); phone answered {} ms after P; the interrupted CLI said: {said}",
            if finished_by_restart {
                "the restart finished it"
            } else {
                "pressed again"
            },
            answered - pressed
        );

        // The old primary boots (fenced), then B with an agent killed in the middle: round 0
        // the demoting box's own, round 1 the serving primary's.
        office.boot(primary).unwrap();
        office
            .wait("the old primary fenced", STEP, |o| {
                Ok(role(o, primary).as_deref() == Some("fenced"))
            })
            .unwrap();
        let victim = if round == 0 { primary } else { backup };
        let b = press(&office, primary, "demote");
        wait_for(&office, primary, b_kill);
        office.kill_agent(victim).unwrap();
        office.start_agent(victim).unwrap();
        let said = finish(b);
        let pressed_again = settle(&mut office, primary, ["backup", "fenced"]) == "fenced";
        if pressed_again {
            assert!(
                matches!(b_kill, Kill::After(_)),
                "a begun demotion is finished by the restart"
            );
            office.demote(primary).unwrap();
        }
        let killed = if victim == primary {
            "the demoted box's"
        } else {
            "the serving primary's"
        };
        eprintln!(
            "round {round}: B, {killed} agent killed at {b_kill:?}{}; B said: {said}",
            if pressed_again { ", pressed again" } else { "" }
        );
        office.wait_in_sync(primary, backup).unwrap();
        assert_eq!(role(&mut office, primary).as_deref(), Some("backup"));
        let held = office.addresses(primary).unwrap();
        assert!(held.contains(&format!("{OWN}/24")), "{held}");
        assert!(!held.contains(&format!("{SHARED}/")), "{held}");
        assert!(!office.pbx_running(primary));
        assert!(office.pbx_running(backup));
        // The data center agrees, and a fresh voicemail still crosses.
        let table: serde_json::Value =
            serde_json::from_str(&office.datacenter(&["status", "--json"]).unwrap()).unwrap();
        assert_eq!(table[0]["generation"], generation, "{table}");
        office
            .measure_rpo(backup, primary, 10 + round as u8)
            .unwrap();
        (primary, backup) = (backup, primary);
    }
}
