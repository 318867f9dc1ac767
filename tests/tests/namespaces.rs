//! End-to-end tests across network namespaces (root only; skipped and counted otherwise).

// In tests a panic is the failure report; helpers outside #[test] fns unwrap too.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use lbs_tests::netns::{Lab, namespaces_with_prefix};
use lbs_tests::require_root;

const HELLO: &str = env!("CARGO_BIN_EXE_lbs-hello");
const PRIMARY: &str = "00-1A-2B-3C-4D-5E";
const BACKUP: &str = "00-1A-2B-3C-4D-5F";
const STRANGER: &str = "66-77-88-99-AA-BB";
const STEP: Duration = Duration::from_secs(20);

fn issue(dir: &Path) {
    let out = Command::new(HELLO)
        .args(["issue", "--dir"])
        .arg(dir)
        .args(["--box", &format!("primary={PRIMARY}")])
        .args(["--box", &format!("backup={BACKUP}")])
        .args(["--box", &format!("stranger={STRANGER}")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn peer(lab: &Lab, host: &str, verb: &str, dir: &Path, label: &str, partner: &str) -> Command {
    let mut cmd = lab.command(host, HELLO);
    cmd.arg(verb)
        .arg("--identity")
        .arg(dir.join(label))
        .arg("--ca")
        .arg(dir.join("ca.pem"))
        .args(["--partner", partner]);
    cmd
}

#[test]
fn partners_talk_across_the_office_lan_and_a_stranger_is_refused() {
    if !require_root(
        "partners_talk_across_the_office_lan_and_a_stranger_is_refused",
        "network namespaces",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    issue(dir.path());
    let prefix;
    {
        let mut lab = Lab::new();
        prefix = lab.prefix().to_owned();
        lab.add_lan().unwrap();
        lab.add_host("primary", "192.168.1.2/24").unwrap();
        lab.add_host("backup", "192.168.1.3/24").unwrap();
        lab.add_host("stranger", "192.168.1.9/24").unwrap();

        let mut serve = peer(&lab, "primary", "serve", dir.path(), "primary", BACKUP);
        serve.args(["--listen", "192.168.1.2:7401"]);
        let (server, addr) = lab.spawn_until(serve, "listening on ", STEP).unwrap();
        assert_eq!(addr, "192.168.1.2:7401");

        let mut dial = peer(&lab, "backup", "dial", dir.path(), "backup", PRIMARY);
        dial.args(["--role", "backup", "--connect", "192.168.1.2:7401"]);
        let out = lab.run(dial, STEP).unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("this side: box {BACKUP} (backup)")),
            "{stdout}"
        );
        assert!(
            stdout.contains(&format!("peer:      box {PRIMARY} (primary)")),
            "{stdout}"
        );
        assert!(stdout.contains("heartbeat 3:"), "{stdout}");

        // Same CA, valid certificate, but not the partner: refused, and told so.
        let mut dial = peer(&lab, "stranger", "dial", dir.path(), "stranger", PRIMARY);
        dial.args(["--connect", "192.168.1.2:7401"]);
        let out = lab.run(dial, STEP).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "the stranger got in");
        assert!(
            stderr.contains("refused this box's certificate"),
            "{stderr}"
        );

        // The backup cannot be fooled into talking to the stranger either: it expects the
        // primary's SID wherever it dials.
        let mut serve = peer(&lab, "stranger", "serve", dir.path(), "stranger", BACKUP);
        serve.args(["--listen", "192.168.1.9:7401"]);
        let (impostor, _) = lab.spawn_until(serve, "listening on ", STEP).unwrap();
        let mut dial = peer(&lab, "backup", "dial", dir.path(), "backup", PRIMARY);
        dial.args(["--role", "backup", "--connect", "192.168.1.9:7401"]);
        let out = lab.run(dial, STEP).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "the backup accepted an impostor");
        assert!(
            stderr.contains(&format!("box {PRIMARY} was expected")) && stderr.contains(STRANGER),
            "{stderr}"
        );

        // Both servers stop cleanly on SIGTERM.
        for pid in [server, impostor] {
            let status = lab.stop(pid, Duration::from_secs(5)).unwrap();
            assert!(status.success(), "serve exited with {status}");
        }
    }
    assert_eq!(
        namespaces_with_prefix(&prefix).unwrap(),
        Vec::<String>::new(),
        "the lab left namespaces behind"
    );
}

#[test]
fn a_failed_test_still_removes_its_namespaces() {
    if !require_root(
        "a_failed_test_still_removes_its_namespaces",
        "network namespaces",
    ) {
        return;
    }
    let prefix = std::sync::Mutex::new(String::new());
    let result = std::panic::catch_unwind(|| {
        let mut lab = Lab::new();
        *prefix.lock().unwrap() = lab.prefix().to_owned();
        lab.add_lan().unwrap();
        lab.add_host("primary", "192.168.1.2/24").unwrap();
        let (_pid, _) = lab
            .spawn_until(
                {
                    let mut cmd = lab.command("primary", "sh");
                    cmd.args(["-c", "echo up; exec sleep 600"]);
                    cmd
                },
                "up",
                STEP,
            )
            .unwrap();
        assert_eq!(namespaces_with_prefix(lab.prefix()).unwrap().len(), 2);
        panic!("simulated test failure");
    });
    assert!(result.is_err());
    let prefix = prefix.into_inner().unwrap();
    assert!(!prefix.is_empty());
    assert_eq!(
        namespaces_with_prefix(&prefix).unwrap(),
        Vec::<String>::new()
    );
}
