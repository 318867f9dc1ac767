//! The inventory from fixture `/proc` and `/sys` trees, and the comparison of two boxes.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::Path;

use lbs_netconfig::inventory::{Collect, Inventory};

fn put(root: &Path, path: &str, text: &str) {
    let path = root.join(path);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

fn mkdir(root: &Path, path: &str) {
    fs::create_dir_all(root.join(path)).unwrap();
}

/// A PBX box: 4 CPUs, 8 GiB, one SSD, two NICs (plus lo and a bridge), a Digium card.
fn pbx(root: &Path, memory_kib: u64, card: Option<(&str, &str)>) {
    let cpu = "processor\t: {n}\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) E-2224 CPU @ 3.40GHz\nflags\t\t: fpu vme\n\n";
    let cpuinfo: String = (0..4).map(|n| cpu.replace("{n}", &n.to_string())).collect();
    put(root, "proc/cpuinfo", &cpuinfo);
    put(
        root,
        "proc/meminfo",
        &format!("MemTotal:       {memory_kib} kB\nMemFree:         1000 kB\n"),
    );
    put(root, "sys/block/sda/size", "500118192\n");
    put(root, "sys/block/sda/queue/rotational", "0\n");
    mkdir(root, "sys/block/sda/device");
    put(root, "sys/block/loop0/size", "100\n");
    mkdir(root, "sys/block/loop0/device");
    put(root, "sys/block/dm-0/size", "100\n");
    for (n, nic) in ["eth0", "eth1"].iter().enumerate() {
        put(
            root,
            &format!("sys/class/net/{nic}/address"),
            &format!("52:54:00:12:34:5{n}\n"),
        );
        put(root, &format!("sys/class/net/{nic}/speed"), "1000\n");
        mkdir(root, &format!("sys/class/net/{nic}/device"));
    }
    put(root, "sys/class/net/lo/address", "00:00:00:00:00:00\n");
    put(root, "sys/class/net/br0/address", "52:54:00:00:00:99\n");
    put(root, "sys/bus/pci/devices/0000:00:1f.0/vendor", "0x8086\n");
    put(root, "sys/bus/pci/devices/0000:00:1f.0/device", "0xa30a\n");
    if let Some((vendor, device)) = card {
        put(
            root,
            "sys/bus/pci/devices/0000:03:00.0/vendor",
            &format!("{vendor}\n"),
        );
        put(
            root,
            "sys/bus/pci/devices/0000:03:00.0/device",
            &format!("{device}\n"),
        );
    }
}

#[test]
fn a_box_is_read_from_proc_and_sys() {
    let dir = tempfile::tempdir().unwrap();
    pbx(dir.path(), 8_000_000, Some(("0xd161", "0x8005")));
    let inv = Inventory::collect_under(dir.path()).unwrap();
    assert_eq!(inv.cpu_model, "Intel(R) Xeon(R) E-2224 CPU @ 3.40GHz");
    assert_eq!(inv.cpus, 4);
    assert_eq!(inv.memory_bytes, 8_000_000 * 1024);
    assert_eq!(
        inv.disks.len(),
        1,
        "loop and dm devices are not disks: {:?}",
        inv.disks
    );
    assert_eq!(inv.disks[0].bytes, 500_118_192 * 512);
    assert!(!inv.disks[0].rotational);
    let nics: Vec<&str> = inv.nics.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(nics, ["eth0", "eth1"], "lo and bridges are not NICs");
    assert_eq!(inv.nics[0].speed_mbps, Some(1000));
    assert_eq!(inv.telephony.len(), 1);
    assert_eq!(inv.telephony[0].vendor, "Digium");
    assert_eq!(
        inv.telephony[0].to_string(),
        "Digium card d161:8005 (slot 0000:03:00.0)"
    );
    assert!(inv.compare(&inv).is_empty());
}

#[test]
fn every_difference_is_named_and_small_memory_differences_are_not() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    pbx(a.path(), 8_000_000, Some(("0xd161", "0x8005")));
    // The same machine with a few MiB less reported: not a difference.
    pbx(b.path(), 7_990_000, Some(("0xd161", "0x8005")));
    // Half the memory and a Sangoma card instead of the Digium one.
    pbx(c.path(), 4_000_000, Some(("0x1923", "0x0100")));
    let (a, b, c) = (
        Inventory::collect_under(a.path()).unwrap(),
        Inventory::collect_under(b.path()).unwrap(),
        Inventory::collect_under(c.path()).unwrap(),
    );
    assert!(a.compare(&b).is_empty(), "{:?}", a.compare(&b));
    let diff = a.compare(&c);
    assert_eq!(diff.len(), 3, "{diff:#?}");
    assert!(
        diff[0].starts_with("memory: this box has 7.6 GiB, the partner 3.8 GiB"),
        "{diff:#?}"
    );
    assert!(
        diff.contains(&"telephony: this box's Digium card d161:8005 (slot 0000:03:00.0) is missing on the partner".to_owned()),
        "{diff:#?}"
    );
    assert!(
        diff.contains(&"telephony: the partner's Sangoma card 1923:0100 (slot 0000:03:00.0) is missing on this box".to_owned()),
        "{diff:#?}"
    );
}

#[test]
fn this_machine_can_be_read() {
    // Whatever it has, reading it works and it matches itself.
    let inv = Inventory::collect().unwrap();
    assert!(inv.cpus >= 1);
    assert!(inv.memory_bytes > 0);
    assert!(inv.compare(&inv).is_empty());
}
