//! `lbs net inventory` as an operator runs it (no root needed).
#![allow(clippy::unwrap_used)]

use std::process::Command;

const LBS: &str = env!("CARGO_BIN_EXE_lbs");

/// `lbs net inventory --compare FILE`.
fn compare(partner: &std::path::Path) -> std::process::Output {
    Command::new(LBS)
        .args(["net", "inventory", "--compare"])
        .arg(partner)
        .output()
        .unwrap()
}

#[test]
fn the_inventory_round_trips_and_names_what_differs_from_the_partner() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(LBS)
        .args(["net", "inventory", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let ours = dir.path().join("ours.json");
    std::fs::write(&ours, &out.stdout).unwrap();

    let same = compare(&ours);
    assert_eq!(same.status.code(), Some(0), "{same:?}");
    assert!(String::from_utf8_lossy(&same.stdout).contains("matches"));

    // The partner has twice the CPUs and a Digium card this box lacks.
    let mut partner: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cpus = partner["cpus"].as_u64().unwrap();
    partner["cpus"] = (cpus * 2).into();
    partner["telephony"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "vendor": "Digium", "vendor_id": 0xd161, "device_id": 0x8005, "slot": "0000:03:00.0"
        }));
    let theirs = dir.path().join("theirs.json");
    std::fs::write(&theirs, serde_json::to_vec(&partner).unwrap()).unwrap();
    let differ = compare(&theirs);
    assert_eq!(differ.status.code(), Some(3), "{differ:?}");
    let text = String::from_utf8_lossy(&differ.stdout);
    assert!(
        text.contains(&format!(
            "CPU count: this box has {cpus}, the partner {}",
            cpus * 2
        )),
        "{text}"
    );
    assert!(
        text.contains("telephony: the partner's Digium card d161:8005 (slot 0000:03:00.0) is missing on this box"),
        "{text}"
    );

    // Not an inventory: a clear error, not a crash.
    std::fs::write(&theirs, "not json").unwrap();
    let bad = compare(&theirs);
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    assert!(
        String::from_utf8_lossy(&bad.stderr)
            .contains("is not an inventory from `lbs net inventory --json`"),
        "{bad:?}"
    );
}
