//! `cargo xtask demo`: builds lbs and shows what exists working, with a timeline.
//!
//! Today that is the protocol layer: a primary and a backup (two processes on loopback)
//! complete a mutual-TLS `Hello` exchange with certificates from a data-center CA, time
//! heartbeats, and refuse a stranger whose certificate is valid but names another box.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::process::{Server, checked, run_with_timeout};
use crate::util::{cargo, run_step, seconds, target_dir};

const PRIMARY: &str = "00-1A-2B-3C-4D-5E";
const BACKUP: &str = "00-1A-2B-3C-4D-5F";
const STRANGER: &str = "66-77-88-99-AA-BB";
/// The longest any single demo step may take before the demo gives up on it.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(clap::Args)]
pub struct DemoArgs {}

/// The steps and how long each took, printed at the end.
struct Timeline {
    started: Instant,
    steps: Vec<(String, Duration)>,
}

impl Timeline {
    fn step<T>(&mut self, name: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
        println!("\n--- {name}");
        let started = Instant::now();
        let result = f().with_context(|| format!("demo step {name:?}"))?;
        self.steps.push((name.to_owned(), started.elapsed()));
        Ok(result)
    }

    fn print(&self) {
        println!("\n=== timeline");
        let mut at = Duration::ZERO;
        for (name, took) in &self.steps {
            println!("  +{:>8}  {:>8}  {name}", seconds(at), seconds(*took));
            at += *took;
        }
        println!("  total {}", seconds(self.started.elapsed()));
    }
}

pub fn run(_args: &DemoArgs) -> anyhow::Result<()> {
    let mut timeline = Timeline {
        started: Instant::now(),
        steps: Vec::new(),
    };
    timeline.step("build lbs", || {
        run_step(
            "cargo build",
            cargo().args(["build", "--locked", "--workspace", "--bins"]),
        )
    })?;
    let hello = target_dir().join("debug").join("lbs-hello");
    let dir = target_dir().join("demo");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }

    timeline.step(
        "data-center CA issues identities for the pair (and a stranger)",
        || {
            let out = checked_step(
                Command::new(&hello)
                    .args(["issue", "--dir"])
                    .arg(&dir)
                    .args(["--box", &format!("primary={PRIMARY}")])
                    .args(["--box", &format!("backup={BACKUP}")])
                    .args(["--box", &format!("stranger={STRANGER}")]),
            )?;
            indent(&out.stdout);
            Ok(())
        },
    )?;

    let mut server = timeline.step("primary starts serving its partner only", || {
        Server::start(
            peer(&hello, &dir, "serve", "primary", BACKUP).args([
                "--role",
                "primary",
                "--listen",
                "127.0.0.1:0",
            ]),
            |line| line.strip_prefix("listening on "),
            STEP_TIMEOUT,
        )
    })?;
    let addr = server.addr.clone();
    println!("    primary listening on {addr}, accepting only box {BACKUP}");

    timeline.step("backup connects: mutual TLS, hello, heartbeats", || {
        let out = checked_step(peer(&hello, &dir, "dial", "backup", PRIMARY).args([
            "--role",
            "backup",
            "--connect",
            &addr,
        ]))?;
        indent(&out.stdout);
        Ok(())
    })?;

    timeline.step(
        "a stranger with a valid certificate for another box is refused",
        || {
            let out = run_with_timeout(
                peer(&hello, &dir, "dial", "stranger", PRIMARY).args([
                    "--role",
                    "backup",
                    "--connect",
                    &addr,
                ]),
                STEP_TIMEOUT,
            )?;
            if out.status.success() {
                bail!("the stranger was accepted: the partner check is broken");
            }
            indent(&out.stderr);
            Ok(())
        },
    )?;

    timeline.step("primary stops on SIGTERM and reports what it saw", || {
        let lines = server.stop()?;
        for line in lines {
            println!("    {line}");
        }
        Ok(())
    })?;

    sync_steps(&mut timeline, &dir)?;

    timeline.print();
    println!(
        "\nWhat exists today: the protocol (mutual TLS, hello, heartbeats) and the sync engine \
         (lbs sync). The data center, tunnels, network takeover and failover join this demo as \
         they land."
    );
    Ok(())
}

fn peer(hello: &Path, dir: &Path, verb: &str, label: &str, partner: &str) -> Command {
    let mut cmd = Command::new(hello);
    cmd.arg(verb)
        .arg("--identity")
        .arg(dir.join(label))
        .arg("--ca")
        .arg(dir.join("ca.pem"))
        .args(["--partner", partner]);
    cmd
}

/// Runs one demo command within [`STEP_TIMEOUT`]; a failure carries its stderr.
fn checked_step(cmd: &mut Command) -> anyhow::Result<Output> {
    checked(cmd, STEP_TIMEOUT)
}

fn indent(text: &[u8]) {
    for line in String::from_utf8_lossy(text).lines() {
        println!("    {line}");
    }
}

/// The sync engine: the backup pulls the primary's tree over mutual TLS, twice, and checks.
fn sync_steps(timeline: &mut Timeline, dir: &Path) -> anyhow::Result<()> {
    let lbs = target_dir().join("debug").join("lbs");
    let (primary, backup) = (dir.join("primary-tree"), dir.join("backup-tree"));
    let lbs_peer = |args: &[&str], me: &str, partner: &str| {
        let mut cmd = Command::new(&lbs);
        cmd.args(args)
            .arg("--identity")
            .arg(dir.join(me))
            .arg("--ca")
            .arg(dir.join("ca.pem"))
            .args(["--partner", partner])
            .arg("--state")
            .arg(dir.join(format!("state-{me}")));
        cmd
    };
    timeline.step(
        "the primary's PBX data: config, voicemail, music on hold",
        || {
            demo_tree(&primary)?;
            std::fs::create_dir_all(&backup)?;
            println!("    {}", primary.display());
            Ok(())
        },
    )?;
    let mut server = timeline.step("primary serves its tree to the backup only", || {
        Server::start(
            lbs_peer(&["sync", "serve"], "primary", BACKUP)
                .arg("--root")
                .arg(&primary)
                .args(["--listen", "127.0.0.1:0"]),
            |line| line.split(" on ").nth(1)?.split(' ').next(),
            STEP_TIMEOUT,
        )
    })?;
    let addr = server.addr.clone();
    let pull = |timeline: &mut Timeline, name: &str| {
        timeline.step(name, || {
            let out = checked_step(
                lbs_peer(&["sync", "pull"], "backup", PRIMARY)
                    .arg("--root")
                    .arg(&backup)
                    .args(["--from", &addr]),
            )?;
            indent(&out.stdout);
            Ok(())
        })
    };
    pull(timeline, "backup pulls everything (first sync)")?;
    timeline.step(
        "on the primary: a caller deletes message 0, Asterisk renumbers, config edited",
        || {
            let inbox = primary.join("voicemail/default/1234/INBOX");
            std::fs::remove_file(inbox.join("msg0000.wav"))?;
            std::fs::rename(inbox.join("msg0001.wav"), inbox.join("msg0000.wav"))?;
            std::fs::rename(inbox.join("msg0002.wav"), inbox.join("msg0001.wav"))?;
            std::fs::write(
                primary.join("asterisk/extensions.conf"),
                "[default]\nexten => 100,1,Dial(PJSIP/100)\nexten => 101,1,Dial(PJSIP/101)\n",
            )?;
            Ok(())
        },
    )?;
    pull(
        timeline,
        "backup pulls the changes (renumbered messages copied locally)",
    )?;
    timeline.step(
        "lbs sync verify: both trees identical by BLAKE3 and metadata",
        || {
            let out = checked_step(
                Command::new(&lbs)
                    .args(["sync", "verify"])
                    .arg(&primary)
                    .arg(&backup),
            )?;
            indent(&out.stdout);
            Ok(())
        },
    )?;
    timeline.step("primary's sync server stops on SIGTERM", || {
        for line in server.stop()? {
            println!("    {line}");
        }
        Ok(())
    })
}

/// A small PBX tree made from fixed seeds: config, three voicemail messages, music on hold.
fn demo_tree(root: &Path) -> anyhow::Result<()> {
    let inbox = root.join("voicemail/default/1234/INBOX");
    std::fs::create_dir_all(&inbox)?;
    std::fs::create_dir_all(root.join("asterisk"))?;
    std::fs::create_dir_all(root.join("moh"))?;
    std::fs::write(
        root.join("asterisk/extensions.conf"),
        "[default]\nexten => 100,1,Dial(PJSIP/100)\n",
    )?;
    let noise = |seed: u32, len: usize| -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    };
    for (i, len) in [(0u32, 160_000), (1, 240_000), (2, 96_000)] {
        std::fs::write(inbox.join(format!("msg{i:04}.wav")), noise(i + 1, len))?;
    }
    std::fs::write(root.join("moh/default.wav"), noise(99, 4 << 20))?;
    Ok(())
}
