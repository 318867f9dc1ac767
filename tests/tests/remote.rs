//! A remote backup (see `lbs_tests::office::Office::start_remote`): the backup at a second
//! site replicates through the data center's WireGuard endpoint; the primary dies; P on the
//! remote backup keeps its own address, the data center moves the pair's name to it, and a
//! phone that follows the name is answered by the backup's PBX there. RTO: P pressed → the
//! first answer at the new address. Root only; skipped and counted otherwise.
#![allow(clippy::unwrap_used)]

use lbs_tests::office::{FQDN, Office, REMOTE_BACKUP, SHARED, STEP};
use lbs_tests::require_root;

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
