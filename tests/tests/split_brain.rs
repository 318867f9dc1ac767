//! Split-brain attempts in the lab's office (see `lbs_tests::office`): two consoles press P on
//! the backup at once while the primary's cable is out — exactly one promotion happens; then
//! the old primary's cable goes back in without anyone pressing B — it steps back (fenced,
//! PBX stopped, never the shared address), and the phone keeps being answered by the new
//! primary, whose MAC the phone keeps for 192.168.1.2. Root only; skipped and counted
//! otherwise.
#![allow(clippy::unwrap_used)]

use lbs_tests::office::{Office, SHARED, STEP, now_ms};
use lbs_tests::require_root;

/// The office with both boxes in sync and the phone answered.
fn office_answering() -> Office {
    let mut office = Office::start().unwrap();
    office.bring_up_pair().unwrap();
    office.start_phone().unwrap();
    office.first_answer_after(0, STEP).unwrap();
    office
}

#[test]
fn two_ps_at_once_promote_once_and_the_old_primary_plugged_back_steps_back() {
    if !require_root(
        "two_ps_at_once_promote_once_and_the_old_primary_plugged_back_steps_back",
        "network namespaces, kamailio, sipp",
    ) {
        return;
    }
    let mut office = office_answering();

    // The primary's cable is pulled; its agent and PBX keep running.
    office.lab.plug("primary", false).unwrap();
    office.wait_primary_gone("backup").unwrap();
    // Two consoles press P at the same moment.
    let lbs = lbs_tests::workspace_binary("lbs");
    let socket = office.dir().join("backup/agent.sock");
    let racers: Vec<std::process::Output> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let mut cmd = office.lab.command("backup", &lbs);
                cmd.args(["promote", "--yes", "--socket"]).arg(&socket);
                scope.spawn(move || cmd.output().unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let said: Vec<String> = racers
        .iter()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .collect();
    let won = racers.iter().filter(|o| o.status.success()).count();
    assert_eq!(won, 1, "exactly one P wins: {said:#?}");
    assert!(said.iter().any(|s| s.contains("refused:")), "{said:#?}");
    let status = office.status("backup").unwrap();
    assert_eq!(
        status["role"]["generation"], 2,
        "one promotion, one generation"
    );
    let new_primary = office.mac("backup").unwrap();

    // The old primary's cable goes back in; nobody pressed B.
    let plugged = now_ms();
    office.lab.plug("primary", true).unwrap();
    office
        .wait("the old primary to step back", STEP, |o| {
            Ok(o.status("primary")?["role"]["state"] == "fenced" && !o.pbx_running("primary"))
        })
        .unwrap();
    let addresses = office.addresses("primary").unwrap();
    assert!(!addresses.contains(&format!("{SHARED}/")), "{addresses}");
    // The phone is answered after the return, and still knows .2 at the new primary's MAC.
    let answered = office.first_answer_after(plugged + 1000, STEP).unwrap();
    assert!(answered > plugged);
    let neigh = office.phone_neighbour().unwrap();
    assert!(neigh.contains(&new_primary), "{neigh}");
    // It says why: its own probe found the new primary, or the data center's word came first.
    let said = office.agent_said("primary");
    assert!(
        said.lines().any(|l| l.contains("FENCED: ")
            && (l.contains(&new_primary) || l.contains("another box is primary"))),
        "the old primary does not say why it stepped back:\n{said}"
    );
}

/// Found by chaos (`lbs-lab chaos --seed 42 --run 3`): the old primary boots from a power
/// cut while the new primary's cable is out, so nobody answers its boot check and it comes up
/// on the shared address. The new primary's cable comes back while the old one still holds
/// it: its probe found the partner answering and it stepped back at once — and the old
/// primary, fenced by the data center a moment later, left the office with no PBX at all.
/// Now the new primary probes again for a few seconds, off the address, and takes it back
/// when the old one (fenced as its agent starts, before its PBX) lets go.
#[test]
fn chaos_seed_42_run_3_an_old_primary_booting_onto_the_address_does_not_fence_the_new_one() {
    use std::time::{Duration, Instant};
    if !require_root(
        "chaos_seed_42_run_3_an_old_primary_booting_onto_the_address_does_not_fence_the_new_one",
        "network namespaces, kamailio, sipp",
    ) {
        return;
    }
    let mut office = office_answering();

    office.power_off("primary").unwrap();
    office.wait_primary_gone("backup").unwrap();
    office.promote("backup").unwrap();
    assert_eq!(office.status("backup").unwrap()["role"]["generation"], 2);
    let new_primary = office.mac("backup").unwrap();
    // The new primary's cable out: the address leaves its interface.
    office.lab.plug("backup", false).unwrap();
    let shared = format!("{SHARED}/");
    office
        .wait("the new primary to withdraw the address", STEP, |o| {
            Ok(!o.addresses("backup")?.contains(&shared))
        })
        .unwrap();
    // The old primary boots as `Office::boot` does, up to its agent: nobody answers its boot
    // check, so its network comes up on the shared address.
    let sh = |office: &mut Office, args: &[&str]| {
        let out = office.lab.sh("primary", args).unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    };
    sh(&mut office, &["ip", "addr", "flush", "dev", "eth0"]);
    office.lab.plug("primary", true).unwrap();
    let mut check = office
        .lab
        .command("primary", lbs_tests::workspace_binary("lbs"));
    check
        .args(["net", "boot-check", "--config"])
        .arg(office.dir().join("primary/agent.toml"))
        .arg("--state")
        .arg(office.state("primary"));
    let said = check.output().unwrap();
    let said = String::from_utf8_lossy(&said.stdout).into_owned();
    assert!(!said.contains("CHANGED"), "{said}");
    sh(
        &mut office,
        &["ip", "addr", "add", &format!("{SHARED}/24"), "dev", "eth0"],
    );
    sh(&mut office, &["ip", "link", "set", "eth0", "up"]);
    sh(
        &mut office,
        &["ip", "route", "replace", "default", "via", "192.168.1.1"],
    );

    // The new primary's cable back in while the old one answers for the address; a second
    // later the old primary's agent starts.
    office.lab.plug("backup", true).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    office.start_agent("primary").unwrap();
    office
        .wait("the old primary to step back", STEP, |o| {
            Ok(o.status("primary")?["role"]["state"] == "fenced")
        })
        .unwrap();
    let back = now_ms();
    let until = Instant::now() + Duration::from_secs(15);
    while !office.addresses("backup").unwrap().contains(&shared) {
        let state = office.status("backup").unwrap()["role"]["state"].clone();
        assert_eq!(
            state, "primary",
            "the new primary stepped back for a stale one"
        );
        assert!(
            Instant::now() < until,
            "the new primary never took the address back"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(office.status("backup").unwrap()["role"]["state"], "primary");
    assert!(!office.addresses("primary").unwrap().contains(&shared));
    office.first_answer_after(back, STEP).unwrap();
    let neigh = office.phone_neighbour().unwrap();
    assert!(neigh.contains(&new_primary), "{neigh}");
    // Each says what it did: the new primary waited, the old one stepped back at its start
    // before its PBX.
    let said = office.agent_said("backup");
    assert!(said.contains("probing again for up to"), "{said}");
    let said = office.agent_said("primary");
    assert!(
        said.contains("it steps back instead of serving as the primary it was"),
        "{said}"
    );
}

/// Found by chaos (`lbs-lab chaos --seed 2800 --run 3`): with automatic failover, the
/// backup's cable out for a few seconds — it hears neither the primary nor the data center,
/// its probe of the shared address hears nobody (nobody could answer), and it carried the data
/// center's last word on the primary's silence through its own isolation: it promoted itself,
/// the request went through when the cable came back, and a live primary was fenced. Now a
/// probe without carrier is no probe, and the data center's word is not carried past one
/// report interval: the backup stays the backup.
#[test]
fn chaos_seed_2800_run_3_a_backup_with_its_cable_out_does_not_promote_itself() {
    use std::time::Duration;
    if !require_root(
        "chaos_seed_2800_run_3_a_backup_with_its_cable_out_does_not_promote_itself",
        "network namespaces, kamailio, sipp",
    ) {
        return;
    }
    let mut office = Office::start().unwrap();
    for host in lbs_tests::office::BOXES {
        let path = office.dir().join(host).join("agent.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("auto_failover = true\n{text}")).unwrap();
    }
    office.bring_up_pair().unwrap();
    office.start_phone().unwrap();
    office.first_answer_after(0, STEP).unwrap();

    office.lab.plug("backup", false).unwrap();
    // Twice `primary_gone_after_s` (2 s in the lab) and more: it never starts a promotion.
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < until {
        let state = office.status("backup").unwrap()["role"]["state"].clone();
        assert_eq!(state, "backup", "a backup cut off promotes itself");
        std::thread::sleep(Duration::from_millis(200));
    }
    office.lab.plug("backup", true).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let backup = office.status("backup").unwrap();
    assert_eq!(backup["role"]["state"], "backup", "{backup}");
    assert_eq!(backup["role"]["generation"], 1, "{backup}");
    let primary = office.status("primary").unwrap();
    assert_eq!(primary["role"]["state"], "primary", "{primary}");
    let events = office.datacenter(&["events", "--json"]).unwrap();
    assert!(!events.contains("\"promoted\""), "{events}");
    // It said why not, while it was cut off.
    let said = office.agent_said("backup");
    assert!(
        said.contains("automatic failover on: not promoting"),
        "{said}"
    );
}
