//! `cargo xtask fuzz`: every fuzz target of the project for a bounded time each, then one line
//! per target (executions, crashes). Installs cargo-fuzz when it is missing. CI only builds
//! the targets (`cargo xtask test`); this is the long run whose figures go in the notes.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::process::run_with_timeout;
use crate::util::{cargo, project_root, run_step, target_dir};

/// The fuzz crates (each its own workspace) and their targets.
pub const CRATES: [(&str, &[&str]); 2] = [
    ("protocol", &["frame_decode"]),
    ("sync-engine", &["receive", "delta", "journal"]),
];

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Only this target (`receive`, `frame_decode`, …).
    #[arg(long)]
    target: Option<String>,
}

pub fn run(args: &FuzzArgs) -> anyhow::Result<()> {
    let has_cargo_fuzz = cargo()
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !has_cargo_fuzz {
        run_step(
            "install cargo-fuzz",
            cargo().args(["install", "cargo-fuzz", "--locked"]),
        )?;
    }
    let mut lines = Vec::new();
    let mut crashed = false;
    for (dir, targets) in CRATES {
        for target in targets {
            if args.target.as_deref().is_some_and(|only| only != *target) {
                continue;
            }
            let (runs, crash) = fuzz_one(dir, target, args.seconds)?;
            crashed |= crash.is_some();
            lines.push(format!(
                "fuzz {dir}/{target}: {runs} executions in {} s, {}",
                args.seconds,
                crash.map_or("crashes: 0".to_owned(), |c| format!(
                    "CRASHED: {}",
                    c.display()
                ))
            ));
        }
    }
    if lines.is_empty() {
        bail!(
            "no fuzz target named {:?}",
            args.target.as_deref().unwrap_or("")
        );
    }
    println!();
    for line in &lines {
        println!("{line}");
    }
    if crashed {
        bail!("a fuzz target crashed; see the artifacts above");
    }
    Ok(())
}

/// Runs `target` of the fuzz crate under `dir` for `seconds`: its executions, and the crash
/// artifact if it found one.
fn fuzz_one(dir: &str, target: &str, seconds: u64) -> anyhow::Result<(u64, Option<PathBuf>)> {
    let crate_dir = project_root().join(dir);
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(&crate_dir)
        .args(["fuzz", "run", target, "--"])
        .arg(format!("-max_total_time={seconds}"))
        // cargo-fuzz needs nightly-only flags; the stable toolchain unlocks them this way.
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_DIR", target_dir().join("fuzz-run"));
    println!("\n==> fuzz {dir}/{target} for {seconds} s (building first)");
    // Building takes minutes; the run itself stops at its own limit.
    let out = run_with_timeout(&mut cmd, Duration::from_secs(seconds + 1800))
        .with_context(|| format!("fuzzing {dir}/{target}"))?;
    let said = String::from_utf8_lossy(&out.stderr);
    let runs = said
        .lines()
        .rev()
        .find_map(|line| {
            let rest = line.strip_prefix("Done ")?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0);
    let crash = said.lines().find_map(|line| {
        let at = line.find("Test unit written to ")?;
        Some(crate_dir.join("fuzz").join(line[at + 21..].trim()))
    });
    if !out.status.success() && crash.is_none() {
        let tail: Vec<&str> = said.lines().rev().take(20).collect();
        for line in tail.into_iter().rev() {
            println!("    {line}");
        }
        bail!("fuzzing {dir}/{target} failed ({})", out.status);
    }
    Ok((runs, crash))
}
