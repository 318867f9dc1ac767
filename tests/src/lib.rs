//! `lbs-tests`: the lab in which lbs is tested as an operator would meet it: real binaries in
//! Linux network namespaces joined by veth pairs and a bridge (the office LAN).
//!
//! - [`netns::Lab`]: creates namespaces under a per-test unique prefix, wires them to a LAN
//!   bridge, runs processes inside, and removes every namespace and process it made when it
//!   is dropped, even when the test panics.
//! - [`require_root`]: root-only tests call it first; without root they report themselves
//!   skipped (to stderr and to `cargo xtask test`, which counts them and fails a root run
//!   that skipped any).
//! - [`office::Office`]: DESIGN §11's office (primary, backup, phone, gateway) and data
//!   centers (`dc1` with `lbs-datacenter` and BIND, `dc2`) running the real programs, a real
//!   SIP server as each box's PBX and a real SIP phone; the end-to-end scenarios use it.
//! - [`tmux::Tmux`]: a private terminal of a fixed size for the console's tests.

pub mod bind;
pub mod browser;
pub mod chaos;
pub mod etcd;
pub mod fleet;
pub mod netns;
pub mod office;
pub mod tmux;

use std::io::Write;

/// The standard output of a command that must have succeeded; panics with both outputs
/// otherwise (a test helper).
pub fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The environment variable naming the file where skipped root-only tests are recorded.
/// `cargo xtask test` sets it, reads the file and counts the lines.
pub const SKIP_LOG_ENV: &str = "LBS_SKIP_LOG";

/// Whether this process runs as root (uid 0), read from the owner of `/proc/self`.
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|meta| meta.uid() == 0)
}

/// Returns `true` when the test may go on (we are root); otherwise records the skip with
/// its reason (`needs`: what root is needed for) and returns `false`, and the test should
/// return at once.
pub fn require_root(test: &str, needs: &str) -> bool {
    if is_root() {
        return true;
    }
    let reason = format!("needs root for {needs}; run `sudo cargo xtask test`");
    eprintln!("SKIPPED {test}: {reason}");
    if let Some(path) = std::env::var_os(SKIP_LOG_ENV) {
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut file| writeln!(file, "{test}: {reason}"));
        if let Err(err) = appended {
            // Losing the record would let a skip pass unseen: make it a failure instead.
            panic!("cannot record the skip of {test} in {path:?}: {err}");
        }
    }
    false
}

/// Sends SIGTERM to a child this test started (as `systemctl stop` does) and waits up to
/// `limit` for it to end; its exit status. Panics, naming `what`, if it ignores the signal.
pub fn terminate(
    child: &mut std::process::Child,
    what: &str,
    limit: std::time::Duration,
) -> std::process::ExitStatus {
    let pid = child.id().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("running kill");
    assert!(sent.success(), "kill -TERM {pid} ({what}) failed");
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("waiting for the child") {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not stop within {limit:?} of SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Another package's binary of this workspace, from the target directory the running test
/// was built into (`cargo test --workspace` and `cargo xtask test` build every binary first).
pub fn workspace_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/<test> → target/<profile>/<name>; a binary of this crate
    // (lbs-lab) runs from target/<profile> itself.
    let mut dir = exe
        .parent()
        .expect("the program runs from target/<profile>");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().expect("target/<profile>/deps has a parent");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run the tests with `cargo xtask test` (or `cargo build --workspace` first)",
        path.display()
    );
    path
}

/// The SIDs and activation keys `lbs-datacenter provision-pair --json` printed, in order.
pub fn provisioned(json: &str) -> Vec<(lbs_protocol::ServerId, String)> {
    fleet::provisioned_boxes(json)
        .unwrap_or_else(|err| panic!("{err:#}:\n{json}"))
        .into_iter()
        .map(|b| (b.sid, b.key))
        .collect()
}
