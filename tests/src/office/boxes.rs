//! A box of the office: its configuration (the default sets under its root, the office
//! network, PBX hooks running kamailio on the shared address, its boot configuration), its
//! PBX data, and the faults of its disk and link.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use super::{BOX_METRICS, GATEWAY, OWN, Office, REMOTE_BACKUP, SETS, SHARED, checked, run_ok};

impl Office {
    /// A box's configuration: the default sets under its root, the office network, the PBX
    /// hooks starting and stopping kamailio on the shared address, and its boot configuration.
    pub(super) fn write_box(&self, host: &str) -> anyhow::Result<()> {
        let dir = self.dir().join(host);
        for (_, rel) in SETS {
            std::fs::create_dir_all(self.root(host).join(rel))?;
        }
        let run = dir.join("run");
        std::fs::create_dir_all(&run)?;
        let boot = dir.join("boot");
        std::fs::create_dir_all(boot.join("etc/network"))?;
        let own = if host == "primary" { SHARED } else { OWN };
        std::fs::write(
            boot.join("etc/network/interfaces"),
            format!("auto eth0\niface eth0 inet static\n\taddress {own}/24\n\tgateway {GATEWAY}\n"),
        )?;
        // The PBX listens where the box serves as primary: the shared address, or a remote
        // backup's own.
        let serve_at = if self.remote && host == "backup" {
            REMOTE_BACKUP
        } else {
            SHARED
        };
        std::fs::write(
            run.join("kamailio.cfg"),
            format!(
                "#!KAMAILIO\n\
                 debug=1\nlog_stderror=yes\nchildren=1\nauto_aliases=no\n\
                 listen=udp:{serve_at}:5060\n\
                 mpath=\"/usr/lib/x86_64-linux-gnu/kamailio/modules/\"\n\
                 loadmodule \"sl.so\"\nloadmodule \"usrloc.so\"\nloadmodule \"registrar.so\"\n\
                 request_route {{\n\
                 \tif (method==\"OPTIONS\") {{ sl_send_reply(\"200\", \"OK\"); exit; }}\n\
                 \tif (method==\"REGISTER\") {{ if (!save(\"location\")) {{ sl_reply_error(); }} exit; }}\n\
                 \tsl_send_reply(\"404\", \"Not here\");\n\
                 }}\n"
            ),
        )?;
        let pid = run.join("kamailio.pid");
        std::fs::write(
            run.join("pbx-start"),
            format!(
                "#!/bin/sh\n\
                 # The PBX's SIP service on the shared address (what `systemctl start asterisk` does on a box).\n\
                 pid=$(cat '{pid}' 2>/dev/null) && kill -0 \"$pid\" 2>/dev/null && exit 0\n\
                 exec kamailio -f '{cfg}' -P '{pid}' -Y '{run}' >>'{run}/kamailio.log' 2>&1\n",
                pid = pid.display(),
                cfg = run.join("kamailio.cfg").display(),
                run = run.display()
            ),
        )?;
        std::fs::write(
            run.join("pbx-stop"),
            format!(
                "#!/bin/sh\n\
                 pid=$(cat '{pid}' 2>/dev/null) || exit 0\n\
                 kill \"$pid\" 2>/dev/null || {{ rm -f '{pid}'; exit 0; }}\n\
                 for i in $(seq 50); do kill -0 \"$pid\" 2>/dev/null || {{ rm -f '{pid}'; exit 0; }}; sleep 0.1; done\n\
                 kill -9 \"$pid\"; rm -f '{pid}'\n",
                pid = pid.display()
            ),
        )?;
        let sets: String = SETS
            .iter()
            .map(|(name, rel)| {
                format!(
                    "[[set]]\nname = \"{name}\"\npath = \"{}\"\n",
                    self.root(host).join(rel).display()
                )
            })
            .collect();
        std::fs::write(
            dir.join("agent.toml"),
            format!(
                "report_interval_s = 1\ndebounce_ms = 100\ntunnels = {remote}\n\
                 metrics_listen = \"{BOX_METRICS}\"\n\
                 sync_over = \"{over}\"\nastdb = \"\"\n\
                 primary_gone_after_s = 2\n\
                 pbx_start = \"sh {run}/pbx-start\"\npbx_stop = \"sh {run}/pbx-stop\"\n\
                 promote_note = \"move the PRI cable to this box\"\n\n{sets}\n{network}",
                remote = self.remote,
                over = if self.remote { "overlay" } else { "lan" },
                run = run.display(),
                network = if self.remote && host == "backup" {
                    String::new()
                } else {
                    format!(
                        "[network]\ninterface = \"eth0\"\nshared = \"{SHARED}/24\"\nown = \"{OWN}/24\"\n\
                         gateway = \"{GATEWAY}\"\nboot_config = \"{}\"\n",
                        boot.display()
                    )
                }
            ),
        )?;
        Ok(())
    }

    /// Gives `host` a PBX's data: Debian's real Asterisk prompts (`asterisk-core-sounds-en-wav`)
    /// as custom prompts, its real music on hold (`asterisk-moh-opsound-wav`), a small
    /// configuration and a few generated voicemails. The bytes written.
    pub fn load_media(&self, host: &str) -> anyhow::Result<u64> {
        let mut bytes = copy_tree(
            Path::new("/usr/share/asterisk/sounds"),
            &self.set_dir(host, "prompts"),
        )
        .context("the Asterisk prompts (apt-get install asterisk-core-sounds-en-wav)")?;
        bytes += copy_tree(
            Path::new("/usr/share/asterisk/moh"),
            &self.set_dir(host, "moh"),
        )
        .context("the music on hold (apt-get install asterisk-moh-opsound-wav)")?;
        let config = self.set_dir(host, "config");
        for (name, text) in [
            (
                "pjsip.conf",
                "[transport-udp]\ntype=transport\nprotocol=udp\nbind=192.168.1.2\n",
            ),
            (
                "extensions.conf",
                "[office]\nexten => 1234,1,VoiceMail(1234@default)\n",
            ),
            ("voicemail.conf", "[default]\n1234 => 4242,Reception\n"),
        ] {
            std::fs::write(config.join(name), text)?;
            bytes += text.len() as u64;
        }
        let inbox = self.set_dir(host, "voicemail").join("default/1234/INBOX");
        std::fs::create_dir_all(&inbox)?;
        for n in 0..3u8 {
            let message = generated_audio(n, 80_000);
            std::fs::write(inbox.join(format!("msg000{n}.wav")), &message)?;
            bytes += message.len() as u64;
        }
        Ok(bytes)
    }

    /// Gives `host`'s PBX data a disk of its own of `mb` MB (a tmpfs on its root, the sets'
    /// folders made again inside): the fault "the backup's disk is full". Call before the
    /// data arrives; [`Office::resize_disk`] gives space back.
    pub fn limit_disk(&mut self, host: &str, mb: u64) -> anyhow::Result<()> {
        let root = self.root(host);
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "lbs-lab-disk"])
                .arg(&root),
        )?;
        self.mounts.push(root.clone());
        MOUNTED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(root.clone());
        for (_, rel) in SETS {
            std::fs::create_dir_all(root.join(rel))?;
        }
        Ok(())
    }

    /// The disk of [`Office::limit_disk`] grows (or shrinks) to `mb` MB, its data kept.
    pub fn resize_disk(&mut self, host: &str, mb: u64) -> anyhow::Result<()> {
        run_ok(
            Command::new("mount")
                .args(["-o", &format!("remount,size={mb}m")])
                .arg(self.root(host)),
        )
    }

    /// Limits what `host` sends on its office link to `mbit` Mb/s (a token bucket), so a
    /// large transfer takes as long as on a real office LAN.
    pub fn limit_rate(&mut self, host: &str, mbit: u32) -> anyhow::Result<()> {
        checked(self.lab.sh(
            host,
            &[
                "tc",
                "qdisc",
                "replace",
                "dev",
                "eth0",
                "root",
                "tbf",
                "rate",
                &format!("{mbit}mbit"),
                "burst",
                "64kb",
                "latency",
                "50ms",
            ],
        )?)
        .map(drop)
    }
}

/// Audio-like bytes (a voicemail, a recording): `len` bytes that differ with `seed`, as
/// little compressible as recorded speech is to the sync's packing (a pattern that repeated
/// every 256 bytes crossed a 200 Mb/s link 400 times faster than its size, and a test
/// meant to break a transfer in the middle found it done).
pub fn generated_audio(seed: u8, len: usize) -> Vec<u8> {
    // xorshift64*, seeded per `seed`: deterministic, fast, no repeats within any file.
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ (u64::from(seed) << 32 | u64::from(seed));
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Copies the regular files under `from` to `to` (created), streamed; the bytes copied.
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<u64> {
    let mut bytes = 0;
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            bytes += copy_tree(&entry.path(), &target)?;
        } else if kind.is_file() {
            bytes += std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(bytes)
}

/// libfaketime where Debian installs it (package `libfaketime`).
const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

impl Office {
    /// Gives `host` a wall clock of its own, for agents started from now on: network
    /// namespaces share the machine's clock, so the agent runs under libfaketime, which reads
    /// its offset from a file (again each second); only `CLOCK_REALTIME` moves, as when a
    /// box's clock is stepped — its monotonic clock does not. See [`Office::step_clock`].
    pub fn own_clock(&mut self, host: &str) -> anyhow::Result<()> {
        if !Path::new(FAKETIME).exists() {
            anyhow::bail!("{FAKETIME} is missing: apt-get install libfaketime");
        }
        self.step_clock(host, 0)
    }

    /// Sets `host`'s wall clock `offset_s` seconds off the machine's (it follows within a
    /// second); `host` has [`Office::own_clock`].
    pub fn step_clock(&mut self, host: &str, offset_s: i64) -> anyhow::Result<()> {
        let path = self.clock_file(host);
        std::fs::write(&path, format!("{offset_s:+}\n"))
            .with_context(|| format!("writing {}", path.display()))
    }

    /// **P** on `host` once the primary is gone, as an operator does: pressed again a second
    /// later (at most twice) when refused because the primary was heard more lately than the
    /// backup's status said — with three sites, a report another site held is written only
    /// as the promotion is decided (CI at 1dde90b: "reported 1.2 s ago", the backup's status
    /// having said 2.1 s). When P was last pressed, and what it printed.
    pub fn promote_primary_gone(&mut self, host: &str) -> anyhow::Result<(u64, String)> {
        let mut tries = 0;
        loop {
            let pressed = super::now_ms();
            let out = self.lbs(host, &["promote", "--yes"])?;
            tries += 1;
            // Refused by the data center (it heard the primary within its silence) or by the
            // box's own look first (CI at 7e591d6): `lbs promote` says so by its exit code.
            if out.status.code() != Some(PROMOTE_PRIMARY_ALIVE) || tries == 3 {
                return Ok((pressed, checked(out)?));
            }
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }

    fn clock_file(&self, host: &str) -> PathBuf {
        self.dir().join(host).join("clock-offset")
    }

    /// The agent `cmd` of `host` under its own clock, if it has one.
    pub(super) fn with_clock(&self, host: &str, cmd: &mut Command) {
        let file = self.clock_file(host);
        if file.exists() {
            cmd.env("LD_PRELOAD", FAKETIME)
                .env("FAKETIME_TIMESTAMP_FILE", file)
                .env("FAKETIME_CACHE_DURATION", "1")
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
    }
}

/// `lbs promote`'s exit code when refused because the primary was heard lately (README,
/// "Failover"; `lbs_agent::promote_cmd::EXIT_PRIMARY_ALIVE`).
const PROMOTE_PRIMARY_ALIVE: i32 = 4;

/// Every disk of [`Office::limit_disk`] this process mounted and has not unmounted yet, so
/// that an interrupted lab (Ctrl-C ends the process without running its drops) unmounts them
/// too: see [`unmount_disks`].
static MOUNTED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Unmounts `mounts` (lazily: the programs still running, stopped right after by the lab,
/// hold files) and forgets them.
pub(super) fn unmount(mounts: &[PathBuf]) {
    for mount in mounts {
        let _ = Command::new("umount").arg("-l").arg(mount).status();
    }
    MOUNTED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|m| !mounts.contains(m));
}

/// Unmounts every disk this process's offices still have mounted; how many.
pub fn unmount_disks() -> usize {
    let mounts = std::mem::take(&mut *MOUNTED.lock().unwrap_or_else(|p| p.into_inner()));
    unmount(&mounts);
    mounts.len()
}

/// Every office directory this process made and has not removed yet, so that an interrupted
/// lab removes them too: see [`remove_office_dirs`].
static DIRS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// An office's scratch directory (its boxes' roots, the sites' stores, the phone): removed
/// when the office is dropped, or by [`remove_office_dirs`] when the lab is interrupted.
#[derive(Debug)]
pub(super) struct OfficeDir(tempfile::TempDir);

impl OfficeDir {
    pub(super) fn new() -> anyhow::Result<OfficeDir> {
        let dir = tempfile::Builder::new()
            .prefix("lbs-office-")
            .tempdir()
            .context("making the office's scratch directory")?;
        DIRS.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(dir.path().to_path_buf());
        Ok(OfficeDir(dir))
    }

    pub(super) fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for OfficeDir {
    fn drop(&mut self) {
        DIRS.lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|d| d != self.0.path());
    }
}

/// Removes every office directory of this process still on disk (after its namespaces and
/// disks are gone: Ctrl-C ends the process without running its drops); how many.
pub fn remove_office_dirs() -> usize {
    let dirs = std::mem::take(&mut *DIRS.lock().unwrap_or_else(|p| p.into_inner()));
    // The processes just killed may still be writing for a moment.
    let remove = |dir: &PathBuf| {
        std::fs::remove_dir_all(dir).is_ok() || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            std::fs::remove_dir_all(dir).is_ok()
        }
    };
    dirs.iter().filter(|dir| remove(dir)).count()
}
