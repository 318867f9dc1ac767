//! Under systemd (`Type=notify`): an agent preinstalled on a box that is not activated yet
//! still tells systemd it is ready, so `systemctl start lbs-agent` returns at once instead of
//! failing after the start timeout (and restarting for ever) on every shipped image.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const LBS: &str = env!("CARGO_BIN_EXE_lbs");

/// Stops the agent if the test fails first.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_agent_waiting_for_activation_is_ready_for_systemd_says_so_and_stops_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("lbs-notify-agent-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let notify = dir.join("notify");
    let socket = UnixDatagram::bind(&notify).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();

    let mut agent = Agent(
        Command::new(LBS)
            .arg("agent")
            .arg("--config")
            .arg(dir.join("agent.toml")) // absent: every default
            .arg("--state")
            .arg(dir.join("state"))
            .arg("--socket")
            .arg(dir.join("agent.sock"))
            .env("NOTIFY_SOCKET", &notify)
            // WatchdogSec=2 in a unit: a ping at least every second, also while waiting.
            .env("WATCHDOG_USEC", "2000000")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut buf = [0u8; 512];
    let n = socket
        .recv(&mut buf)
        .expect("no notification from the agent within 10 s");
    let mut said = String::from_utf8_lossy(&buf[..n]).into_owned();
    // The first watchdog ping may come before READY=1.
    if said == "WATCHDOG=1" {
        let n = socket.recv(&mut buf).unwrap();
        said = String::from_utf8_lossy(&buf[..n]).into_owned();
    }
    assert!(said.lines().any(|l| l == "READY=1"), "{said:?}");
    let started = std::time::Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let n = socket.recv(&mut buf).unwrap();
        if &buf[..n] == b"WATCHDOG=1" {
            pings += 1;
        }
    }
    assert!(pings >= 3, "{pings} watchdog pings in 3 s");
    assert!(said.contains("STATUS=waiting for lbs activate"), "{said:?}");
    // The console (not root: it cannot read the state) learns why nobody answers.
    let note = dir.join("unactivated");
    assert!(note.exists(), "no {} while waiting", note.display());

    // systemctl stop: SIGTERM, and the agent ends cleanly well within TimeoutStopSec.
    let status = lbs_tests::terminate(&mut agent.0, "the agent", Duration::from_secs(10));
    assert!(status.success(), "{status}");
    assert!(!note.exists(), "{} outlived the agent", note.display());
    std::fs::remove_dir_all(&dir).unwrap();
}
