//! Split-brain attempts in the lab's office (see `lbs_tests::office`): two consoles press P on
//! the backup at once while the primary's cable is out — exactly one promotion happens; then
//! the old primary's cable goes back in without anyone pressing B — it steps back (fenced,
//! PBX stopped, never the shared address), and the phone keeps being answered by the new
//! primary, whose MAC the phone keeps for 192.168.1.2. Root only; skipped and counted
//! otherwise.
#![allow(clippy::unwrap_used)]

use lbs_tests::office::{Office, SHARED, STEP, now_ms};
use lbs_tests::require_root;

#[test]
fn two_ps_at_once_promote_once_and_the_old_primary_plugged_back_steps_back() {
    if !require_root(
        "two_ps_at_once_promote_once_and_the_old_primary_plugged_back_steps_back",
        "network namespaces, kamailio, sipp",
    ) {
        return;
    }
    let mut office = Office::start().unwrap();
    office.bring_up_pair().unwrap();
    office.start_phone().unwrap();
    office.first_answer_after(0, STEP).unwrap();

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
    let neigh = office
        .lab
        .sh("phone", &["ip", "neigh", "show", SHARED])
        .unwrap();
    let neigh = String::from_utf8_lossy(&neigh.stdout).into_owned();
    assert!(neigh.contains(&new_primary), "{neigh}");
    // It says why: its own probe found the new primary, or the data center's word came first.
    let said = office.agent_said("primary");
    assert!(
        said.lines().any(|l| l.contains("FENCED: ")
            && (l.contains(&new_primary) || l.contains("another box is primary"))),
        "the old primary does not say why it stepped back:\n{said}"
    );
}
