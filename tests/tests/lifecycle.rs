//! The lifecycle of DESIGN §2 in the lab's office (see `lbs_tests::office`), with the real
//! programs: both boxes activate, the backup syncs Debian's real Asterisk prompts and music
//! on hold plus generated voicemail and a growing recording; the primary dies; P on the
//! backup; the phone — the same `sipp`, still asking 192.168.1.2 — is answered again, by the
//! new primary, and DNS points the pair's name at it; the old primary reboots, steps back,
//! and B makes it the backup until in sync; then the new primary dies too and P fails over
//! again (the seed's "another failure"). RTO (P pressed → the phone's first answer) and RPO
//! (a voicemail written on the primary → verified on the backup) are measured and printed,
//! never asserted on. Root only; skipped and counted otherwise.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::time::Duration;

use lbs_tests::office::{FQDN, Office, SHARED, STEP, generated_audio};
use lbs_tests::require_root;

/// The primary `dead` dies; P on `survivor`: the RTO in ms, and what P printed.
fn fail_over(office: &mut Office, dead: &str, survivor: &str) -> (u64, String) {
    let (rto, said) = office.fail_over(dead, survivor).unwrap();
    eprintln!("[{survivor}] lbs promote:\n{said}");
    assert!(office.pbx_running(survivor), "the new primary's PBX runs");
    (rto, said)
}

#[test]
fn lifecycle_activate_sync_fail_over_fail_back_and_fail_over_again() {
    if !require_root(
        "lifecycle_activate_sync_fail_over_fail_back_and_fail_over_again",
        "network namespaces, kamailio, sipp, BIND",
    ) {
        return;
    }
    let mut office = Office::start().unwrap();
    let media = office.load_media("primary").unwrap();
    assert!(media > 30_000_000, "only {media} bytes of media");
    assert!(office.activate("primary", 0).unwrap().contains("PRIMARY"));
    assert!(office.activate("backup", 1).unwrap().contains("BACKUP"));
    office.start_agent("primary").unwrap();
    office.start_agent("backup").unwrap();
    let started = std::time::Instant::now();
    office.wait_in_sync("backup", "primary").unwrap();
    eprintln!(
        "first full sync of {:.1} MB: {:.2} s",
        media as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );

    // The phone asks the PBX at the shared address; the primary's answers.
    office.start_phone().unwrap();
    office.first_answer_after(0, STEP).unwrap();
    assert!(office.pbx_running("primary"));
    assert!(
        !office.pbx_running("backup"),
        "the backup's PBX stays stopped"
    );
    office
        .wait("DNS to point the pair's name at the primary", STEP, |o| {
            Ok(o.dig(FQDN)? == [SHARED])
        })
        .unwrap();
    let rpo_ms = office.measure_rpo("primary", "backup", 0).unwrap();

    // A recording grows on the primary (appends only) while the backup follows it.
    let recording = office
        .set_dir("primary", "recordings")
        .join("2026-11-28-call.wav");
    let mut file = std::fs::File::create(&recording).unwrap();
    for chunk in 0..8u8 {
        file.write_all(&generated_audio(chunk, 64 * 1024)).unwrap();
        file.sync_data().unwrap();
        std::thread::sleep(Duration::from_millis(150));
    }
    drop(file);
    office.wait_in_sync("backup", "primary").unwrap();

    // The primary dies; P on the backup; the same phone is answered again at .2.
    let (rto_ms, said) = fail_over(&mut office, "primary", "backup");
    assert!(
        said.contains("done: this box is the PRIMARY (gen 2)"),
        "{said}"
    );
    let status = office.status("backup").unwrap();
    assert_eq!(status["role"]["state"], "primary");
    assert_eq!(office.dig(FQDN).unwrap(), [SHARED]);
    // A voicemail arrives during the outage, on the new primary.
    let missed = office
        .set_dir("backup", "voicemail")
        .join("default/1234/INBOX/msg0050.wav");
    std::fs::write(&missed, generated_audio(50, 90_000)).unwrap();

    // The old primary reboots: it boots with its own address and steps back; B; in sync.
    let said = office.boot("primary").unwrap();
    assert!(said.contains("CHANGED"), "{said}");
    office
        .wait("the old primary to step back", STEP, |o| {
            Ok(o.status("primary")?["role"]["state"] == "fenced")
        })
        .unwrap();
    // Fenced is recorded first, then acted on: the PBX stops a moment later.
    office
        .wait(
            "the old primary's PBX to stop",
            Duration::from_secs(10),
            |o| Ok(!o.pbx_running("primary")),
        )
        .unwrap();
    let said = office.demote("primary").unwrap();
    assert!(said.contains("done: in sync with the primary"), "{said}");
    office.wait_in_sync("primary", "backup").unwrap();
    let rpo_back_ms = office.measure_rpo("backup", "primary", 1).unwrap();

    // Another failure: the new primary dies; P on the old one, now the backup.
    let (rto2_ms, said) = fail_over(&mut office, "backup", "primary");
    assert!(
        said.contains("done: this box is the PRIMARY (gen 3)"),
        "{said}"
    );
    assert_eq!(office.dig(FQDN).unwrap(), [SHARED]);
    assert!(
        office
            .set_dir("primary", "voicemail")
            .join("default/1234/INBOX/msg0050.wav")
            .exists(),
        "the voicemail left during the first outage survived the second"
    );
    println!(
        "measured: rto_ms={rto_ms} rto2_ms={rto2_ms} rpo_ms={rpo_ms} rpo_back_ms={rpo_back_ms}"
    );
}
