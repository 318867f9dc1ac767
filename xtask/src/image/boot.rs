//! `cargo xtask image --check`'s last steps: the outputs checked, and the disk booted under
//! qemu to its login prompt with the units that must have started.

use super::*;

/// `--check`: the tarball holds lbs, the qcow2 is a sound disk with the partition.
pub(super) fn check_outputs(tarball: &Path, qcow2: &Path) -> anyhow::Result<()> {
    let listing = checked(Command::new("tar").arg("-tzf").arg(tarball), SHORT)?;
    let listing = String::from_utf8_lossy(&listing.stdout);
    for needed in [
        "./usr/bin/lbs",
        "./usr/lib/systemd/system/lbs-agent.service",
        "./etc/lbs/agent.toml",
    ] {
        if !listing.lines().any(|l| l == needed) {
            bail!("the tarball {} has no {needed}", tarball.display());
        }
    }
    checked(Command::new("qemu-img").arg("check").arg(qcow2), SHORT)
        .with_context(|| format!("qemu-img check {}", qcow2.display()))?;
    let info = capture(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(qcow2),
    )?;
    if !info.contains("\"format\": \"qcow2\"") {
        bail!("{} is not a qcow2 image: {info}", qcow2.display());
    }
    println!("    checked: the tarball holds lbs, qemu-img check of the disk is clean");
    Ok(())
}

/// `--check`: the disk boots under qemu (no network card: nothing leaves this machine) to
/// the login prompt on its serial console, and systemd started `units` on the way.
pub(super) fn boot(qcow2: &Path, log: &Path, hostname: &str, units: &[&str]) -> anyhow::Result<()> {
    const BOOT_LIMIT: Duration = Duration::from_secs(420);
    let started = Instant::now();
    println!("\n==> boot the disk under qemu (software emulation)");
    let _ = fs::remove_file(log);
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-m",
            "1024",
            "-smp",
            "2",
            "-snapshot",
            "-nic",
            "none",
            "-display",
            "none",
        ])
        .args(["-no-reboot", "-serial"])
        .arg(format!("file:{}", log.display()))
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=qcow2", qcow2.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let mut qemu = crate::process::Guard(Some(child));
    let prompt = format!("{hostname} login:");
    // Units start beside the getty, so the prompt may come first: wait for both.
    let missing = |console: &str| -> Vec<String> {
        units
            .iter()
            .filter(|u| !started_on(console, u))
            .map(|u| u.to_string())
            .collect()
    };
    let failure = loop {
        let text = fs::read(log).unwrap_or_default();
        let text = plain(&String::from_utf8_lossy(&text));
        if text.contains("Failed to start lbs") {
            break Some(format!(
                "systemd failed to start an lbs unit:\n{}",
                tail(&text, 40)
            ));
        }
        if text.contains(&prompt) && missing(&text).is_empty() {
            break None;
        }
        if let Some(status) = qemu.child()?.try_wait()? {
            break Some(format!(
                "qemu ended ({status}) before the login prompt:\n{}",
                tail(&text, 30)
            ));
        }
        if started.elapsed() > BOOT_LIMIT {
            break Some(format!(
                "within {}: login prompt {}, not started: {}; the console said:\n{}",
                seconds(BOOT_LIMIT),
                if text.contains(&prompt) {
                    "seen"
                } else {
                    "not seen"
                },
                missing(&text).join(", "),
                tail(&text, 30)
            ));
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    drop(qemu);
    if let Some(failure) = failure {
        bail!("{failure}\n(the whole console is in {})", log.display());
    }
    let _ = fs::remove_file(log);
    println!(
        "    checked: the disk boots (extlinux, systemd) to `{prompt}` in {}, started {}",
        seconds(started.elapsed()),
        units.join(", ")
    );
    Ok(())
}

/// Whether systemd's console says it started `unit`: "[  OK  ] Started lbs-agent.service - …",
/// where a narrow console cuts the name short ("Started lbs-datacenter.ser… DNS …").
fn started_on(console: &str, unit: &str) -> bool {
    console.lines().any(|line| {
        line.split_once("Started ").is_some_and(|(_, rest)| {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || "@._-".contains(c)))
                .unwrap_or(rest.len());
            let (name, after) = rest.split_at(end);
            name == unit || (name.len() >= 8 && unit.starts_with(name) && after.starts_with('…'))
        })
    })
}

/// `text` without the terminal's colour codes (CSI sequences: ESC [ … final byte).
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        // A lone ESC (a narrow console cuts sequences short) is dropped by itself.
        if chars.peek() != Some(&'[') {
            continue;
        }
        chars.next();
        // Parameter and intermediate bytes, then one final byte; anything else ends it.
        while let Some(&c) = chars.peek() {
            chars.next();
            if !('\u{20}'..='\u{3f}').contains(&c) {
                if !('@'..='~').contains(&c) {
                    out.push(c);
                }
                break;
            }
        }
    }
    out
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::{plain, tail};

    #[test]
    fn the_console_is_read_without_colour_codes() {
        let console =
            "[\u{1b}[0;32m  OK  \u{1b}[0m] Started \u{1b}[0;1;39mlbs-agent.service\u{1b}[0m - lbs";
        assert_eq!(plain(console), "[  OK  ] Started lbs-agent.service - lbs");
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        let boot = plain(
            "[  OK  ] Started \u{1b}[0;1;39mlbs-agent.service\u{1b}… - lbs agent\n\
                    [  OK  ] Started lbs-datacenter.ser… DNS updates\n",
        );
        let boot = boot.as_str();
        assert!(super::started_on(boot, "lbs-agent.service"));
        assert!(super::started_on(boot, "lbs-datacenter.service"));
        assert!(!super::started_on(boot, "lbs-datacenter-site.service"));
        assert!(!super::started_on(
            "Starting lbs-agent.service…",
            "lbs-agent.service"
        ));
        assert_eq!(tail("a", 5), "a");
    }
}
