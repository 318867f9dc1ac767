//! Persistence: golden files for each format (`tests/golden/*.in` → `*.out`; set
//! `LBS_BLESS=1` to write the outputs after reviewing a deliberate change), detection, the
//! static-address check, and the durable write with its backup.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;

use lbs_netconfig::persist::{
    Manager, PersistError, StaticConfig, check_static, find_owner, persist, read_config, rewrite,
};

fn shared() -> StaticConfig {
    StaticConfig {
        address: "192.168.1.2/24".parse().unwrap(),
        gateway: Some(Ipv4Addr::new(192, 168, 1, 1)),
    }
}

fn manager_of(name: &str) -> Manager {
    match name.split('-').next().unwrap() {
        "networkd" => Manager::Networkd,
        "ifupdown" => Manager::Ifupdown,
        "nm" => Manager::NetworkManager,
        "ifcfg" => Manager::Ifcfg,
        other => panic!("golden file of unknown format {other}"),
    }
}

#[test]
fn golden_files_change_only_address_prefix_gateway_and_duplicate_detection() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let bless = std::env::var_os("LBS_BLESS").is_some();
    let mut cases = 0;
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "in") {
            continue;
        }
        cases += 1;
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let manager = manager_of(&name);
        let input = fs::read_to_string(&path).unwrap();
        let output = rewrite(manager, &input, "eth0", &shared(), &path)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let golden = path.with_extension("out");
        if bless {
            fs::write(&golden, &output).unwrap();
        }
        let expected = fs::read_to_string(&golden)
            .unwrap_or_else(|e| panic!("{}: {e} (LBS_BLESS=1 writes it)", golden.display()));
        assert_eq!(output, expected, "{name}");
        // What was written reads back as what was asked for, and a second rewrite is a no-op.
        let back = read_config(manager, &output, "eth0", &path).unwrap();
        assert_eq!(back.address, shared().address, "{name}");
        assert_eq!(back.gateway, shared().gateway, "{name}");
        assert_eq!(
            rewrite(manager, &output, "eth0", &shared(), &path).unwrap(),
            output,
            "{name}: not idempotent"
        );
        // Every line that is not about the address is kept, in order.
        let kept = |text: &str| -> Vec<String> {
            text.lines()
                .filter(|l| {
                    !l.contains("192.168.1.")
                        && !l.contains("255.255.255")
                        && !l.contains("dad-timeout")
                        && !l.contains("DuplicateAddressDetection")
                        && !l.contains("ARPCHECK")
                })
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(kept(&input), kept(&output), "{name}: other lines changed");
    }
    assert_eq!(cases, 7, "golden cases found");
}

fn put(root: &Path, path: &str, text: &str) {
    let path = root.join(path);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

#[test]
fn the_owner_is_found_and_dhcp_none_or_several_owners_are_refused() {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let text = |name: &str| fs::read_to_string(golden.join(name)).unwrap();

    let root = tempfile::tempdir().unwrap();
    let err = find_owner(root.path(), "eth0").unwrap_err();
    assert!(matches!(err, PersistError::NotFound { .. }), "{err}");
    let looked = root.path().join("etc/network/interfaces");
    assert!(
        err.to_string().contains(&looked.display().to_string()),
        "{err}"
    );

    put(
        root.path(),
        "etc/network/interfaces",
        &text("ifupdown-debian.in"),
    );
    let owner = find_owner(root.path(), "eth0").unwrap();
    assert_eq!(owner.manager, Manager::Ifupdown);
    // eth1 is there too, and eth2 nowhere.
    assert!(find_owner(root.path(), "eth1").is_ok());
    assert!(find_owner(root.path(), "eth2").is_err());

    put(
        root.path(),
        "etc/NetworkManager/system-connections/office.nmconnection",
        &text("nm-inline-gateway.in"),
    );
    let err = find_owner(root.path(), "eth0").unwrap_err();
    assert!(matches!(err, PersistError::Several { .. }), "{err}");
    assert!(
        err.to_string().contains("ifupdown in") && err.to_string().contains("NetworkManager in"),
        "{err}"
    );

    let dhcp = tempfile::tempdir().unwrap();
    put(
        dhcp.path(),
        "etc/network/interfaces",
        "auto eth0\niface eth0 inet dhcp\n",
    );
    let err = check_static(dhcp.path(), "eth0").unwrap_err();
    assert!(matches!(err, PersistError::Dhcp { .. }), "{err}");
    assert!(
        err.to_string().contains("gets its address by DHCP"),
        "{err}"
    );
    put(
        dhcp.path(),
        "etc/network/interfaces",
        "auto eth0\niface eth0 inet static\n  address 192.168.1.3/24\n",
    );
    let (_, config) = check_static(dhcp.path(), "eth0").unwrap();
    assert_eq!(config.address, "192.168.1.3/24".parse().unwrap());
    assert_eq!(config.gateway, None);

    for (file, text) in [
        (
            "etc/systemd/network/10-eth0.network",
            "[Match]\nName=eth0\n[Network]\nDHCP=yes\n",
        ),
        (
            "etc/NetworkManager/system-connections/a.nmconnection",
            "[connection]\ninterface-name=eth0\n[ipv4]\nmethod=auto\n",
        ),
        (
            "etc/sysconfig/network-scripts/ifcfg-eth0",
            "DEVICE=eth0\nBOOTPROTO=dhcp\n",
        ),
    ] {
        let root = tempfile::tempdir().unwrap();
        put(root.path(), file, text);
        let err = check_static(root.path(), "eth0").unwrap_err();
        assert!(matches!(err, PersistError::Dhcp { .. }), "{file}: {err}");
    }
}

#[test]
fn persisting_keeps_a_backup_outside_and_replaces_the_file_whole() {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let root = tempfile::tempdir().unwrap();
    let backups = tempfile::tempdir().unwrap();
    let original = fs::read_to_string(golden.join("ifcfg-rhel.in")).unwrap();
    put(
        root.path(),
        "etc/sysconfig/network-scripts/ifcfg-eth0",
        &original,
    );
    let file = root.path().join("etc/sysconfig/network-scripts/ifcfg-eth0");
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();

    let done = persist(root.path(), "eth0", &shared(), backups.path()).unwrap();
    assert_eq!(done.owner.manager, Manager::Ifcfg);
    assert_eq!(done.before.address, "192.168.1.3/24".parse().unwrap());
    assert!(done.backup.starts_with(backups.path()));
    assert_eq!(fs::read_to_string(&done.backup).unwrap(), original);
    let now = fs::read_to_string(&file).unwrap();
    assert_eq!(
        now,
        fs::read_to_string(golden.join("ifcfg-rhel.out")).unwrap()
    );
    assert_eq!(
        fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o640
    );
    // No temporary file left where the tools look.
    let names: Vec<String> = fs::read_dir(file.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["ifcfg-eth0"]);

    // And back: the box's own address again.
    let own = StaticConfig {
        address: "192.168.1.3/24".parse().unwrap(),
        gateway: Some(Ipv4Addr::new(192, 168, 1, 1)),
    };
    persist(root.path(), "eth0", &own, backups.path()).unwrap();
    assert!(
        fs::read_to_string(&file)
            .unwrap()
            .contains("IPADDR=\"192.168.1.3\"")
    );
}
