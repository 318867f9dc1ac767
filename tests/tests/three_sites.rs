//! Issue 26's scenarios in the lab's office with three data-center sites on one authority
//! (etcd at dc1, dc2 and the witness dc3; `lbs-datacenter serve` at dc1 and dc2; BIND at dc3),
//! with the real agents, PBX and phone: a site gone dark, a site cut off from the others but
//! still reached by the office, and the authority gone. Root only; skipped and counted
//! otherwise.
#![allow(clippy::unwrap_used)]

use lbs_tests::office::{DC1, DC2, FQDN, Office, SHARED, STEP, now_ms};
use lbs_tests::require_root;

/// The office with three sites, both boxes activated through dc1 and in sync, the phone
/// answered, the pair's names in DNS; the primary's and the backup's overlay addresses.
fn office_on_three_sites() -> (Office, String, String) {
    let mut office = Office::start().unwrap();
    office.three_sites().unwrap();
    assert!(office.activate("primary", 0).unwrap().contains("PRIMARY"));
    assert!(office.activate("backup", 1).unwrap().contains("BACKUP"));
    office.start_agent("primary").unwrap();
    office.start_agent("backup").unwrap();
    office.wait_in_sync("backup", "primary").unwrap();
    office.start_phone().unwrap();
    office.first_answer_after(0, STEP).unwrap();
    let overlay = |office: &mut Office, host: &str| {
        office.status(host).unwrap()["info"]["overlay"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (primary, backup) = (
        overlay(&mut office, "primary"),
        overlay(&mut office, "backup"),
    );
    let control = office.status("primary").unwrap()["info"]["control"].clone();
    assert_eq!(
        control,
        serde_json::json!([format!("{DC1}:7441"), format!("{DC2}:7441")]),
        "activation tells the boxes every site"
    );
    let names = [
        (FQDN.to_owned(), SHARED.to_owned()),
        (format!("primary.{FQDN}"), primary.clone()),
        (format!("backup.{FQDN}"), backup.clone()),
    ];
    office
        .wait("DNS to hold the pair's three names", STEP, |o| {
            Ok(names
                .iter()
                .all(|(name, want)| o.dig(name).is_ok_and(|got| got == [want.clone()])))
        })
        .unwrap();
    (office, primary, backup)
}

#[test]
fn three_sites_a_site_gone_dark_the_boxes_move_p_works_and_dns_follows() {
    if !require_root(
        "three_sites_a_site_gone_dark_the_boxes_move_p_works_and_dns_follows",
        "network namespaces, etcd, kamailio, sipp, BIND",
    ) {
        return;
    }
    let (mut office, _, backup_overlay) = office_on_three_sites();
    // dc1 goes dark: its serve and etcd killed, its cable out.
    office.site_dark("dc1").unwrap();
    office
        .wait_reporting_to("dc2", &["primary", "backup"])
        .unwrap();
    // The primary dies; P on the backup goes through dc2.
    let (rto_ms, said) = office.fail_over("primary", "backup").unwrap();
    assert!(
        said.contains("done: this box is the PRIMARY (gen 2)"),
        "{said}"
    );
    // The surviving site holds the DNS role now and moves primary.<fqdn>.
    office
        .wait(
            "dc2 to point primary.<fqdn> at the new primary",
            STEP,
            |o| Ok(o.dig(&format!("primary.{FQDN}"))? == [backup_overlay.clone()]),
        )
        .unwrap();
    let status = office.datacenter_at("dc2", &["status"]).unwrap();
    assert!(status.contains("DNS updates: sent by site dc2"), "{status}");
    let records = office.dns_records_at("dc2").unwrap();
    assert!(
        records.iter().all(|(_, _, state)| state == "done"),
        "{records:?}"
    );
    // The old primary comes back and is fenced by the shared authority through dc2.
    office.boot("primary").unwrap();
    office
        .wait("the returning old primary to be fenced", STEP, |o| {
            Ok(o.status("primary")?["role"]["state"] == "fenced")
        })
        .unwrap();
    office.wait_reporting_to("dc2", &["primary"]).unwrap();
    println!("measured: rto_through_dc2_with_dc1_dark_ms={rto_ms}");

    // With dc1 dark, dc2 makes and revokes a site with the root key (kept at dc1's directory
    // here, an offline copy in the field): the boxes are given the list and keep it, and the
    // pair goes on.
    let root_key = office.site_dir("dc1").join("ca.key");
    let root_key = root_key.to_string_lossy();
    let made = office.dir().join("dc9");
    let made = made.to_string_lossy();
    office
        .datacenter_at(
            "dc2",
            &[
                "site-init",
                "--site",
                "dc9",
                "--out",
                &made,
                "--root-key",
                &root_key,
            ],
        )
        .unwrap();
    office
        .datacenter_at(
            "dc2",
            &["site-revoke", "--site", "dc9", "--root-key", &root_key],
        )
        .unwrap();
    office
        .wait("both boxes to keep the revocation list", STEP, |o| {
            Ok(["primary", "backup"]
                .iter()
                .all(|host| o.state(host).join("ca.crl").exists()))
        })
        .unwrap();
    office
        .wait_reporting_to("dc2", &["primary", "backup"])
        .unwrap();
    office.first_answer_after(now_ms(), STEP).unwrap();
}

#[test]
fn three_sites_a_site_cut_off_from_the_others_refuses_and_the_other_grants() {
    if !require_root(
        "three_sites_a_site_cut_off_from_the_others_refuses_and_the_other_grants",
        "network namespaces, etcd, kamailio, sipp, BIND",
    ) {
        return;
    }
    let (mut office, _, _) = office_on_three_sites();
    // dc1 is cut off from dc2 and dc3; the office still reaches it.
    office.partition_site("dc1", true).unwrap();
    let refused = office
        .datacenter_at("dc1", &["promote", "acme", "--wait-s", "5"])
        .unwrap_err();
    assert!(
        format!("{refused:#}").contains("authority unreachable from this site"),
        "{refused:#}"
    );
    // The boxes' reports to dc1 are answered "cannot decide": they move to dc2 at once.
    office
        .wait_reporting_to("dc2", &["primary", "backup"])
        .unwrap();
    // P on the backup goes through dc2.
    office.power_off("primary").unwrap();
    office.wait_primary_gone("backup").unwrap();
    let (pressed, said) = office.promote("backup").unwrap();
    assert!(
        said.contains("done: this box is the PRIMARY (gen 2)"),
        "{said}"
    );
    let answered = office.first_answer_after(pressed, STEP).unwrap();
    // One promotion to generation 2, by dc2; none at dc1. Joined again, dc1 sees it.
    // (etcd 3.4 has no pre-vote: the member coming back calls an election, and the cluster
    // may answer "no leader" for a moment after it first answered again.)
    office.partition_site("dc1", false).unwrap();
    let mut read = None;
    office
        .wait("dc1 to answer from the majority again", STEP, |o| {
            read = o.datacenter_at("dc1", &["events", "--json"]).ok();
            Ok(read.is_some())
        })
        .unwrap();
    let events: serde_json::Value = serde_json::from_str(&read.unwrap()).unwrap();
    let promoted: Vec<&serde_json::Value> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "promoted")
        .collect();
    assert_eq!(promoted.len(), 1, "{promoted:?}");
    assert_eq!(promoted[0]["to_generation"], 2);
    println!(
        "measured: rto_with_dc1_cut_off_ms={}",
        answered.saturating_sub(pressed)
    );
}

#[test]
fn three_sites_the_authority_gone_p_is_refused_with_the_reason_and_offline_is_reconciled() {
    if !require_root(
        "three_sites_the_authority_gone_p_is_refused_with_the_reason_and_offline_is_reconciled",
        "network namespaces, etcd, kamailio, sipp, BIND",
    ) {
        return;
    }
    let (mut office, _, _) = office_on_three_sites();
    for site in ["dc1", "dc2", "dc3"] {
        office.etcd_at(site, false).unwrap();
    }
    // The sites still answer the boxes, but decide nothing and say why.
    office
        .wait(
            "the backup to hear why the data center cannot answer",
            STEP,
            |o| {
                Ok(o.status("backup")?["datacenter"]["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("authority unreachable from this site")))
            },
        )
        .unwrap();
    // Silent for three reports (1 s apart in the lab): the data center counts as gone.
    office
        .wait("the data center to be silent for the backup", STEP, |o| {
            Ok(o.status("backup")?["datacenter"]["last_answer_ms"]
                .as_u64()
                .is_none_or(|at| now_ms().saturating_sub(at) > 3_500))
        })
        .unwrap();
    office.power_off("primary").unwrap();
    let refused = office.lbs("backup", &["promote", "--yes"]).unwrap();
    let said = String::from_utf8_lossy(&refused.stdout).to_string()
        + &String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{said}");
    assert!(said.contains("--offline"), "{said}");
    office
        .wait(
            "the backup to have lost the primary itself for 2 s",
            STEP,
            |o| {
                Ok(o.status("backup")?["primary_heard_ms"]
                    .as_u64()
                    .is_none_or(|at| now_ms().saturating_sub(at) > 2_500))
            },
        )
        .unwrap();
    let offline = office
        .lbs("backup", &["promote", "--offline", "--yes"])
        .unwrap();
    let said = String::from_utf8_lossy(&offline.stdout).to_string();
    assert!(offline.status.success(), "{said}");
    assert!(said.contains("PRIMARY (gen 1), offline"), "{said}");
    // The authority returns: the offline promotion is confirmed as generation 2.
    for site in ["dc1", "dc2", "dc3"] {
        office.etcd_at(site, true).unwrap();
    }
    office
        .wait("the offline promotion to be confirmed", STEP, |o| {
            let role = o.status("backup")?["role"].clone();
            Ok(role["state"] == "primary" && role["generation"] == 2 && role["offline"] == false)
        })
        .unwrap();
    let events: serde_json::Value =
        serde_json::from_str(&office.datacenter_at("dc2", &["events", "--json"]).unwrap()).unwrap();
    let promoted = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "promoted")
        .count();
    assert_eq!(promoted, 1);
}
