//! `cargo xtask bench datacenter`: `lbs-dc-bench` (tests/src/bin) against a real
//! `lbs-datacenter serve` on loopback, both built optimised; its table and its last line
//! `dc-bench: <boxes> boxes, reports p99 …, promotion p99 …, server RSS …, errors <n>`.

use std::process::Command;

use anyhow::{Context, bail};

use crate::util::{cargo, run_step, target_dir};

#[derive(clap::Args)]
pub struct DatacenterArgs {
    /// Passed to lbs-dc-bench (`--boxes 1000,5000,10000`, `--seconds 60`, `--interval-s 5`,
    /// `--promotions-per-s 2`, `--ramp 64`; `--help` lists them).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

pub fn run(args: &DatacenterArgs) -> anyhow::Result<()> {
    run_step(
        "cargo build --release",
        cargo().args([
            "build",
            "--locked",
            "--release",
            "-p",
            "lbs-datacenter",
            "-p",
            "lbs-tests",
            "--bin",
            "lbs-datacenter",
            "--bin",
            "lbs-dc-bench",
        ]),
    )?;
    let release = target_dir().join("release");
    let bench = release.join("lbs-dc-bench");
    let status = Command::new(&bench)
        .arg("--datacenter")
        .arg(release.join("lbs-datacenter"))
        .args(&args.args)
        .status()
        .with_context(|| format!("starting {}", bench.display()))?;
    if !status.success() {
        bail!("the data-center benchmark failed ({status})");
    }
    Ok(())
}
