//! `cargo xtask bench datacenter`: `lbs-dc-bench` (tests/src/bin) against a real
//! `lbs-datacenter serve` on loopback, both built optimised; its table and its last line
//! `dc-bench: <boxes> boxes, reports p99 …, promotion p99 …, server RSS …, errors <n>`.

use std::process::Command;

use anyhow::{Context, bail};

use crate::util::{cargo, run_step, target_dir};

#[derive(clap::Args)]
pub struct DatacenterArgs {
    /// Fleet sizes to measure, in boxes (two per pair), each on a freshly started server.
    #[arg(long, default_value = "1000,5000,10000")]
    boxes: String,
    /// The measured time per fleet size, after every box connected and reported once.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// How often each box reports (the agent's report_interval_s).
    #[arg(long, default_value_t = 5)]
    interval_s: u64,
    /// Promotions fired per second at random pairs while the reports run.
    #[arg(long, default_value_t = 2.0)]
    promotions_per_s: f64,
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
        .args(["--boxes", &args.boxes])
        .args(["--seconds", &args.seconds.to_string()])
        .args(["--interval-s", &args.interval_s.to_string()])
        .args(["--promotions-per-s", &args.promotions_per_s.to_string()])
        .status()
        .with_context(|| format!("starting {}", bench.display()))?;
    if !status.success() {
        bail!("the data-center benchmark failed ({status})");
    }
    Ok(())
}
