//! `lbs net` in network namespaces: an office LAN (a bridge) with the gateway .1, the primary
//! .2, the backup .3 and a phone .10, each a namespace running the real binary (root only;
//! skipped and counted otherwise).
#![allow(clippy::unwrap_used)]

use std::process::Output;
use std::time::Duration;

use lbs_tests::netns::Lab;
use lbs_tests::{ok, require_root};

const LBS: &str = env!("CARGO_BIN_EXE_lbs");
const STEP: Duration = Duration::from_secs(20);

/// The office: ports in order gw (port0), primary (port1), backup (port2), phone (port3).
fn office() -> Lab {
    let mut lab = Lab::new();
    lab.add_lan().unwrap();
    for (host, cidr) in [
        ("gw", "192.168.1.1/24"),
        ("primary", "192.168.1.2/24"),
        ("backup", "192.168.1.3/24"),
        ("phone", "192.168.1.10/24"),
    ] {
        lab.add_host(host, cidr).unwrap();
    }
    for host in ["primary", "backup", "phone"] {
        ok(lab
            .sh(
                host,
                &["ip", "route", "add", "default", "via", "192.168.1.1"],
            )
            .unwrap());
    }
    lab
}

fn mac_of(lab: &mut Lab, host: &str) -> String {
    ok(lab
        .sh(host, &["cat", "/sys/class/net/eth0/address"])
        .unwrap())
    .trim()
    .to_owned()
}

fn lbs_net(lab: &mut Lab, host: &str, verb: &str) -> Output {
    lbs_net_with(lab, host, verb, &[])
}

fn lbs_net_with(lab: &mut Lab, host: &str, verb: &str, extra: &[&str]) -> Output {
    let mut argv = vec![
        LBS,
        "net",
        verb,
        "--interface",
        "eth0",
        "--from",
        "192.168.1.3/24",
        "--to",
        "192.168.1.2/24",
        "--gateway",
        "192.168.1.1",
    ];
    argv.extend_from_slice(extra);
    lab.sh(host, &argv).unwrap()
}

/// `lbs net probe` for the shared address, from `host`.
fn probe_shared(lab: &mut Lab, host: &str) -> Output {
    lab.sh(host, &[LBS, "net", "probe", "-i", "eth0", "192.168.1.2"])
        .unwrap()
}

fn addresses(lab: &mut Lab, host: &str) -> String {
    ok(lab
        .sh(host, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
        .unwrap())
}

fn default_route(lab: &mut Lab, host: &str) -> String {
    ok(lab.sh(host, &["ip", "route", "show", "default"]).unwrap())
}

/// The takeover's own figure: "total … ms (X ms without the probe)".
fn without_probe_ms(stdout: &str) -> f64 {
    let line = stdout
        .lines()
        .find(|l| l.contains("without the probe"))
        .unwrap();
    let inner = line.split('(').nth(1).unwrap();
    inner.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn the_backup_takes_the_address_of_a_dead_primary_and_the_phone_follows() {
    if !require_root(
        "the_backup_takes_the_address_of_a_dead_primary_and_the_phone_follows",
        "network namespaces",
    ) {
        return;
    }
    let mut lab = office();
    let primary_mac = mac_of(&mut lab, "primary");
    let backup_mac = mac_of(&mut lab, "backup");

    // The phone talks to the primary: its neighbour entry for .2 is the primary's MAC.
    ok(lab
        .sh("phone", &["ping", "-c", "1", "-W", "2", "192.168.1.2"])
        .unwrap());

    // The pre-flight checks from the backup: the primary answers, with its MAC; the boot
    // configuration is not the test's to check here (an empty root has none: a problem).
    let empty = tempfile::tempdir().unwrap();
    let root = empty.path().to_str().unwrap().to_owned();
    let flight = lab
        .sh(
            "backup",
            &[
                LBS,
                "net",
                "preflight",
                "-i",
                "eth0",
                "--partner",
                "192.168.1.2",
                "--config-root",
                &root,
            ],
        )
        .unwrap();
    let text = String::from_utf8_lossy(&flight.stdout).into_owned();
    assert!(
        text.contains(&format!("192.168.1.2 answers from {primary_mac}")),
        "{text}"
    );
    assert!(text.contains("no boot configuration for eth0"), "{text}");
    assert_eq!(flight.status.code(), Some(3), "{flight:?}");

    // While the primary is alive, the probe names it and the takeover refuses.
    let probe = probe_shared(&mut lab, "backup");
    assert_eq!(probe.status.code(), Some(3), "{probe:?}");
    assert!(
        String::from_utf8_lossy(&probe.stdout).contains(&primary_mac),
        "{probe:?}"
    );
    let refused = lbs_net(&mut lab, "backup", "take-over");
    assert_eq!(refused.status.code(), Some(3), "{refused:?}");
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains(&format!(
            "cannot take 192.168.1.2: {primary_mac} still answers ARP"
        )),
        "{why}"
    );
    assert!(addresses(&mut lab, "backup").contains("192.168.1.3/24"));

    // The primary dies: its switch port goes dark.
    ok(lab
        .sh("lan", &["ip", "link", "set", "port1", "down"])
        .unwrap());
    let probe = probe_shared(&mut lab, "backup");
    assert_eq!(probe.status.code(), Some(0), "{probe:?}");

    // New namespaces have promote_secondaries=0: without care, dropping .3 takes .2 along.
    let promote = "/proc/sys/net/ipv4/conf/eth0/promote_secondaries";
    assert_eq!(ok(lab.sh("backup", &["cat", promote]).unwrap()).trim(), "0");
    // The box's boot configuration (ifupdown here), in a directory of the test's own.
    let config = tempfile::tempdir().unwrap();
    let interfaces = config.path().join("etc/network/interfaces");
    std::fs::create_dir_all(interfaces.parent().unwrap()).unwrap();
    std::fs::write(
        &interfaces,
        "auto eth0\niface eth0 inet static\n\taddress 192.168.1.3/24\n\tgateway 192.168.1.1\n",
    )
    .unwrap();
    let (root, backups) = (
        config.path().to_str().unwrap().to_owned(),
        config.path().join("backups").to_str().unwrap().to_owned(),
    );
    let persist = ["--persist", "--config-root", &root, "--backups", &backups];
    let taken = lbs_net_with(&mut lab, "backup", "take-over", &persist);
    let report = ok(taken);
    let saved = std::fs::read_to_string(&interfaces).unwrap();
    assert!(saved.contains("address 192.168.1.2/24"), "{saved}");
    println!("take-over in the namespace test:\n{report}");
    let steps_ms = without_probe_ms(&report);
    println!("take-over steps without the probe: {steps_ms:.3} ms");

    let now = addresses(&mut lab, "backup");
    assert!(now.contains("192.168.1.2/24"), "{now}");
    assert!(!now.contains("192.168.1.3/24"), "{now}");
    assert!(default_route(&mut lab, "backup").contains("via 192.168.1.1"));
    assert_eq!(ok(lab.sh("backup", &["cat", promote]).unwrap()).trim(), "1");

    // The gratuitous ARP moved the phone's entry before it sent anything itself.
    let neighbour = ok(lab
        .sh("phone", &["ip", "neigh", "show", "192.168.1.2"])
        .unwrap());
    assert!(neighbour.contains(&backup_mac), "{neighbour}");
    ok(lab
        .sh("phone", &["ping", "-c", "1", "-W", "2", "192.168.1.2"])
        .unwrap());

    // The old primary comes back with the address still configured. The backup's watch
    // sees it ask for the address; the primary's own probe names the backup.
    let mut watch = lab.command("backup", LBS);
    watch.args(["net", "watch", "-i", "eth0", "192.168.1.2", "--for", "10"]);
    let (_, _, lines) = lab.spawn_reading(watch, "watching", STEP).unwrap();
    ok(lab
        .sh("lan", &["ip", "link", "set", "port1", "up"])
        .unwrap());
    let back = probe_shared(&mut lab, "primary");
    assert_eq!(back.status.code(), Some(3), "{back:?}");
    assert!(
        String::from_utf8_lossy(&back.stdout).contains(&backup_mac),
        "{back:?}"
    );
    let conflict = lines.recv_timeout(STEP).unwrap();
    assert_eq!(
        conflict,
        format!("conflict: 192.168.1.2 claimed by {primary_mac}")
    );
    // The primary is fenced in real life; here it goes away again.
    ok(lab
        .sh("lan", &["ip", "link", "set", "port1", "down"])
        .unwrap());
    // The backup's own cable: the watch follows its carrier.
    ok(lab
        .sh("lan", &["ip", "link", "set", "port2", "down"])
        .unwrap());
    assert_eq!(lines.recv_timeout(STEP).unwrap(), "carrier: lost on eth0");
    ok(lab
        .sh("lan", &["ip", "link", "set", "port2", "up"])
        .unwrap());
    assert_eq!(lines.recv_timeout(STEP).unwrap(), "carrier: back on eth0");

    // A second run changes nothing and succeeds.
    let again = ok(lbs_net(&mut lab, "backup", "take-over"));
    assert!(again.contains("skip"), "{again}");
    assert!(addresses(&mut lab, "backup").contains("192.168.1.2/24"));

    // Giving up reverses it, boot configuration included.
    ok(lbs_net_with(&mut lab, "backup", "give-up", &persist));
    let saved = std::fs::read_to_string(&interfaces).unwrap();
    assert!(saved.contains("address 192.168.1.3/24"), "{saved}");
    let back = addresses(&mut lab, "backup");
    assert!(
        back.contains("192.168.1.3/24") && !back.contains("192.168.1.2/24"),
        "{back}"
    );
    assert!(default_route(&mut lab, "backup").contains("via 192.168.1.1"));
}

#[test]
fn a_takeover_cut_short_half_way_converges_when_run_again() {
    if !require_root(
        "a_takeover_cut_short_half_way_converges_when_run_again",
        "network namespaces",
    ) {
        return;
    }
    let mut lab = office();
    ok(lab
        .sh("lan", &["ip", "link", "set", "port1", "down"])
        .unwrap());
    // The process dies right after each step in turn (as in a power cut); whatever it
    // left, a second run ends in the taken state, and give-up in the original one.
    for step in [
        "promote_secondaries",
        "add address",
        "announce",
        "drop old address",
        "verify",
    ] {
        let crashed = lbs_net_with(&mut lab, "backup", "take-over", &["--crash-after", step]);
        assert_eq!(crashed.status.code(), Some(134), "{step}: {crashed:?}");
        let report = ok(lbs_net(&mut lab, "backup", "take-over"));
        let now = addresses(&mut lab, "backup");
        assert!(
            now.contains("192.168.1.2/24") && !now.contains("192.168.1.3/24"),
            "after a crash after {step}: {now}\n{report}"
        );
        assert!(default_route(&mut lab, "backup").contains("via 192.168.1.1"));
        ok(lbs_net(&mut lab, "backup", "give-up"));
        let back = addresses(&mut lab, "backup");
        assert!(
            back.contains("192.168.1.3/24") && !back.contains("192.168.1.2/24"),
            "{back}"
        );
    }

    // The state a crash after "add address" leaves, made by hand: both addresses.
    ok(lab
        .sh(
            "backup",
            &["ip", "addr", "add", "192.168.1.2/24", "dev", "eth0"],
        )
        .unwrap());
    let report = ok(lbs_net(&mut lab, "backup", "take-over"));
    assert!(report.contains("already on eth0"), "{report}");
    let now = addresses(&mut lab, "backup");
    assert!(
        now.contains("192.168.1.2/24") && !now.contains("192.168.1.3/24"),
        "{now}"
    );
    assert!(default_route(&mut lab, "backup").contains("via 192.168.1.1"));

    // A crash after "drop old" but before the route: the route is gone too.
    ok(lbs_net(&mut lab, "backup", "give-up"));
    ok(lab
        .sh("backup", &["ip", "route", "del", "default"])
        .unwrap());
    let report = ok(lbs_net(&mut lab, "backup", "take-over"));
    assert!(report.contains("via 192.168.1.1 on eth0"), "{report}");
    assert!(default_route(&mut lab, "backup").contains("via 192.168.1.1"));
}
