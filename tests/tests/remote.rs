//! A remote backup (see `lbs_tests::office::Office::start_remote`): the backup at a second
//! site replicates through the data center's WireGuard endpoints.
//! - The primary dies; P on the remote backup keeps its own address, the data center moves
//!   the pair's name to it, and a phone that follows the name is answered by the backup's PBX
//!   there. RTO: P pressed → the first answer at the new address.
//! - The data center's main site (dc1) goes dark: both boxes' tunnels move to dc2's endpoint
//!   (`lbs-datacenter site`), replication goes on through it, the phone keeps being answered;
//!   dc2 restarted meanwhile serves the peers it kept; dc1 back → the tunnels return.
//!
//! Root only; skipped and counted otherwise.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lbs_tests::office::{FQDN, Office, REMOTE_BACKUP, SHARED, STEP, now_ms};
use lbs_tests::require_root;

/// The tunnel `host` routes the overlay through, and whether every tunnel is up.
fn tunnels(office: &mut Office, host: &str) -> (Option<String>, bool) {
    let status = office.status(host).unwrap();
    let list = status["tunnels"]["tunnels"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let active = list
        .iter()
        .find(|t| t["active"] == true)
        .and_then(|t| t["name"].as_str().map(str::to_owned));
    let all_up = !list.is_empty() && list.iter().all(|t| t["health"] == "up");
    (active, all_up)
}

fn wait_active(office: &mut Office, site: &str) {
    office
        .wait(&format!("both boxes' tunnels through {site}"), STEP, |o| {
            Ok(["primary", "backup"]
                .iter()
                .all(|host| tunnels(o, host).0.as_deref() == Some(site)))
        })
        .unwrap();
}

#[test]
fn a_dark_data_center_site_moves_the_tunnels_and_the_pair_carries_on() {
    if !require_root(
        "a_dark_data_center_site_moves_the_tunnels_and_the_pair_carries_on",
        "network namespaces, tun devices, kamailio, sipp, BIND",
    ) {
        return;
    }
    let mut office = Office::start_remote().unwrap();
    office.bring_up_pair().unwrap();
    // dc2 learned both boxes from dc1: every tunnel answers, the overlay goes through dc1.
    office
        .wait("both tunnels of both boxes up", STEP, |o| {
            Ok(tunnels(o, "primary").1 && tunnels(o, "backup").1)
        })
        .unwrap();
    wait_active(&mut office, "dc1");
    office.start_phone().unwrap();
    office.first_answer_after(0, STEP).unwrap();

    // dc1's cable is pulled: the database, activation, control, DNS and its endpoint go dark.
    let cut = now_ms();
    office.lab.plug("dc1", false).unwrap();
    wait_active(&mut office, "dc2");
    let moved_ms = now_ms() - cut;
    // Replication goes on through dc2, and the phone never depended on the data center.
    let rpo = office.measure_rpo("primary", "backup", 1).unwrap();
    let after = now_ms();
    office
        .first_answer_after(after, Duration::from_secs(5))
        .unwrap();
    assert!(office.pbx_running("primary") && !office.pbx_running("backup"));

    // dc2 restarts while dc1 is still dark: it serves the peers it kept.
    office.lab.kill_all_in("dc2").unwrap();
    let said = office.start_site().unwrap();
    assert!(said.contains("2 peers from the cache"), "{said}");
    let rpo_restarted = office.measure_rpo("primary", "backup", 2).unwrap();

    // dc1 returns: the tunnels go back to the preferred site.
    office.lab.plug("dc1", true).unwrap();
    wait_active(&mut office, "dc1");
    office.measure_rpo("primary", "backup", 3).unwrap();
    assert_eq!(office.status("backup").unwrap()["role"]["state"], "backup");
    println!(
        "measured: tunnels moved to dc2 in {moved_ms} ms; rpo_ms={rpo} through dc2, {rpo_restarted} after dc2 restarted"
    );
}

#[test]
fn a_remote_backup_keeps_its_address_and_the_name_follows_it() {
    if !require_root(
        "a_remote_backup_keeps_its_address_and_the_name_follows_it",
        "network namespaces, tun devices, kamailio, sipp, BIND",
    ) {
        return;
    }
    let mut office = Office::start_remote().unwrap();
    office.bring_up_pair().unwrap();
    let status = office.status("backup").unwrap();
    assert_eq!(status["tunnels"]["tunnels"][0]["health"], "up", "{status}");
    let rpo = office.measure_rpo("primary", "backup", 0).unwrap();
    office.start_phone().unwrap();
    office.first_answer_after(0, STEP).unwrap();
    office
        .wait("the name at the primary", STEP, |o| {
            Ok(o.dig(FQDN)? == [SHARED])
        })
        .unwrap();

    office.power_off("primary").unwrap();
    office.wait_primary_gone("backup").unwrap();
    let (pressed, said) = office.promote("backup").unwrap();
    eprintln!("{said}");
    assert!(said.contains("keeps its own address"), "{said}");
    assert!(
        said.contains("done: this box is the PRIMARY (gen 2)"),
        "{said}"
    );
    office
        .wait("the name to follow the new primary", STEP, |o| {
            Ok(o.dig(FQDN)? == [REMOTE_BACKUP])
        })
        .unwrap();
    // The phone follows the name.
    office.start_phone_at(REMOTE_BACKUP).unwrap();
    let answered = office.first_answer_after(pressed, STEP).unwrap();
    assert!(office.pbx_running("backup"));
    println!(
        "measured: remote rto_ms={} rpo_ms={rpo}",
        answered.saturating_sub(pressed)
    );
}
