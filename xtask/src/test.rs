//! `cargo xtask test`: everything CI checks, in the order that fails fastest.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};

use crate::util::{cargo, ensure_packages, is_root, project_root, run_step, seconds, target_dir};

/// The Debian packages the tests need, and what for. The one place they are listed.
pub const SYSTEM_PACKAGES: &[(&str, &str)] = &[
    (
        "iproute2",
        "ip netns, veth and bridges for the namespace tests",
    ),
    (
        "procps",
        "ps and kill, which the namespace tests use to stop what they started",
    ),
    (
        "iputils-ping",
        "ping, the phone reaching the shared address in the takeover test",
    ),
];

/// What the lab's office (the scenarios and the demo) runs: a real BIND, SIP server and SIP
/// phone, and real PBX media to sync.
pub const LAB_PACKAGES: &[(&str, &str)] = &[
    (
        "bind9",
        "named, the authoritative server the data center's DNS updates go to",
    ),
    (
        "bind9-dnsutils",
        "dig, which checks the record after each DNS update",
    ),
    (
        "kamailio",
        "the lab's PBX: a real SIP server each box's PBX hook starts on the shared address",
    ),
    (
        "sip-tester",
        "sipp, the lab's phone, asking the PBX at the shared address ten times a second",
    ),
    (
        "asterisk-core-sounds-en-wav",
        "real Asterisk prompts for the lab's boxes to sync",
    ),
    (
        "asterisk-moh-opsound-wav",
        "real music on hold for the lab's boxes to sync",
    ),
    (
        "curl",
        "reads each box's /metrics inside the lab and the portal over HTTPS in its tests",
    ),
    (
        "nftables",
        "nft, with which the data center's endpoints keep each pair to itself on the overlay",
    ),
];

/// What only the tests need besides the lab's packages.
pub const TEST_ONLY_PACKAGES: &[(&str, &str)] = &[
    (
        "tmux",
        "a terminal of 80x25 on which the console test types P and B",
    ),
    (
        "iputils-arping",
        "arping, the third host asking for the shared address while an old primary returns",
    ),
    (
        "tcpdump",
        "records every ARP packet on the office LAN while an old primary returns",
    ),
    (
        "libfaketime",
        "steps one box's wall clock under chaos (namespaces share the machine's clock)",
    ),
    (
        "chromium",
        "a real browser (headless) for the data center's portal tests",
    ),
    (
        "chromium-driver",
        "chromedriver, through which the portal's browser test drives chromium",
    ),
];

/// What the lab's three data-center sites add (the tests and `demo --sites 3`).
pub const SITES_PACKAGES: &[(&str, &str)] = &[(
    "etcd-server",
    "a real etcd (one member on loopback, or one per site in the lab) for the data center's shared store",
)];

/// The environment variable through which root-only tests report that they skipped.
/// Keep in step with `lbs_tests::SKIP_LOG_ENV`.
const SKIP_LOG_ENV: &str = "LBS_SKIP_LOG";

#[derive(clap::Args)]
pub struct TestArgs {
    /// Do not install missing system packages, only say which are missing.
    #[arg(long)]
    no_install: bool,
}

pub fn run(args: &TestArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let packages: Vec<(&str, &str)> = SYSTEM_PACKAGES
        .iter()
        .chain(LAB_PACKAGES)
        .chain(SITES_PACKAGES)
        .chain(TEST_ONLY_PACKAGES)
        .chain(crate::dist::DIST_PACKAGES)
        .chain(crate::image::IMAGE_PACKAGES)
        .copied()
        .collect();
    if !ensure_packages(&packages, !args.no_install)?.is_empty() {
        println!("    continuing; tests that need them will fail or report themselves skipped");
    }

    run_step(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--check"]),
    )?;
    run_step(
        "cargo clippy -D warnings",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--locked",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    println!("\n==> import circles");
    let checked = Instant::now();
    crate::structure::run(&crate::structure::StructureArgs { picture: false })?;
    println!(
        "==> import circles: ok in {}",
        crate::util::seconds(checked.elapsed())
    );
    // The fuzz targets live outside the workspace (they need sanitizer flags to run);
    // building them here keeps them from rotting. `cargo xtask fuzz` runs them.
    for (dir, _) in crate::fuzz::CRATES {
        let fuzz_manifest = project_root().join(dir).join("fuzz/Cargo.toml");
        run_step(
            &format!("{dir} fuzz targets build"),
            cargo()
                .args(["check", "--locked", "--manifest-path"])
                .arg(&fuzz_manifest)
                .env("CARGO_TARGET_DIR", target_dir().join("fuzz")),
        )?;
    }

    let skip_log = target_dir().join("xtask").join("skipped-tests.log");
    fs::create_dir_all(skip_log.parent().unwrap_or(Path::new(".")))
        .with_context(|| format!("creating {}", skip_log.display()))?;
    fs::write(&skip_log, "").with_context(|| format!("clearing {}", skip_log.display()))?;
    let counts = run_tests(
        cargo()
            .args(["test", "--workspace", "--locked", "--no-fail-fast"])
            .env(SKIP_LOG_ENV, &skip_log),
    )?;

    // The packages and the image: built, lintian-checked, installed into a Debian 12 tree
    // made by debootstrap (cached), run there, purged; the disk made and checked. Root only.
    let mut counts = counts;
    if is_root() {
        let exe = std::env::current_exe().context("finding the xtask binary")?;
        match run_step(
            "cargo xtask image --check (packages, lintian, the image)",
            Command::new(exe).args(["image", "--check"]),
        ) {
            Ok(_) => counts.passed += 1,
            Err(err) => {
                println!("{err:#}");
                counts.failed += 1;
            }
        }
    } else {
        fs::write(
            &skip_log,
            fs::read_to_string(&skip_log).unwrap_or_default()
                + "xtask image --check: needs root (debootstrap, chroot, loop mount)\n",
        )?;
    }

    let skipped =
        fs::read_to_string(&skip_log).with_context(|| format!("reading {}", skip_log.display()))?;
    let skipped: Vec<&str> = skipped.lines().filter(|l| !l.trim().is_empty()).collect();
    for line in &skipped {
        println!("  skipped: {line}");
    }
    // One closing line over every test binary, in the form CI reads.
    println!(
        "\ntests: {} passed, {} failed, {} skipped",
        counts.passed,
        counts.failed,
        skipped.len()
    );
    if counts.passed == 0 {
        bail!("no test ran");
    }
    if counts.failed > 0 {
        bail!("{} test(s) failed", counts.failed);
    }
    if !skipped.is_empty() && is_root() {
        bail!(
            "{} test(s) skipped although this run is root: a green run must not hide them",
            skipped.len()
        );
    }
    println!("\nall checks passed in {}", seconds(started.elapsed()));
    Ok(())
}

#[derive(Default)]
struct Counts {
    passed: u64,
    failed: u64,
}

/// Runs `cargo test`, echoing its output and adding up the `test result:` lines of every
/// test binary.
fn run_tests(cmd: &mut Command) -> anyhow::Result<Counts> {
    use std::io::{BufRead, BufReader};
    println!("\n==> cargo test --workspace");
    let started = Instant::now();
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot start cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let mut counts = Counts::default();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            counts.passed += count_before(rest, " passed");
            counts.failed += count_before(rest, " failed");
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    if !status.success() {
        bail!(
            "cargo test failed ({status}) after {}: {} passed, {} failed",
            seconds(started.elapsed()),
            counts.passed,
            counts.failed
        );
    }
    println!("==> cargo test: ok in {}", seconds(started.elapsed()));
    Ok(counts)
}

/// The number just before `label` in a `test result:` line ("ok. 14 passed; 0 failed; …").
fn count_before(line: &str, label: &str) -> u64 {
    line.split(';')
        .find_map(|part| part.trim().strip_suffix(label.trim_start()))
        .and_then(|before| before.trim_end().rsplit([' ', '.']).next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::count_before;

    #[test]
    fn reads_cargo_test_result_lines() {
        let line =
            "ok. 14 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.04s";
        assert_eq!(count_before(line, " passed"), 14);
        assert_eq!(count_before(line, " failed"), 2);
        assert_eq!(count_before("FAILED. 0 passed; 1 failed;", " failed"), 1);
        assert_eq!(count_before("garbage", " passed"), 0);
    }
}
