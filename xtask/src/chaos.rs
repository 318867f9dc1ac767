//! `cargo xtask chaos --runs N --seed S [--run K] [--secs T] [--jobs J]`: randomized fault runs in the
//! lab's office with an independent checker (`lbs-lab chaos`, `lbs_tests::chaos`); as root.
//! Its last line: `chaos: <runs> runs, <n> split-brain moments, <n> generation regressions,
//! <n> false promotions, <n> torn or lost files, <n> not converged`.

use anyhow::bail;

use crate::util::is_root;

#[derive(clap::Args)]
pub struct ChaosArgs {
    /// How many runs, each in a fresh office (automatic failover on in every other).
    #[arg(long, default_value_t = 10)]
    runs: u64,
    /// The seed the runs' faults are drawn from.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Only this run of the seed: replays a failed run's faults exactly.
    #[arg(long)]
    run: Option<u64>,
    /// Seconds of faults per run.
    #[arg(long, default_value_t = 90)]
    secs: u64,
    /// Offices at once (4 took about 40 % of a 2-core machine; the runs' faults stay their own).
    #[arg(long, default_value_t = 1)]
    jobs: usize,
}

pub fn run(args: &ChaosArgs) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "cargo xtask chaos needs root: it builds the lab's office in network namespaces, pulls its cables and kills its processes"
        );
    }
    let (runs, seed, secs, jobs) = (
        args.runs.to_string(),
        args.seed.to_string(),
        args.secs.to_string(),
        args.jobs.to_string(),
    );
    let mut lab = vec![
        "chaos", "--runs", &runs, "--seed", &seed, "--secs", &secs, "--jobs", &jobs,
    ];
    let only = args.run.map(|k| k.to_string());
    if let Some(k) = &only {
        lab.extend(["--run", k]);
    }
    // The checker's sniffer and prober and the boxes' steppable clocks, as the tests install
    // them.
    let packages: Vec<(&str, &str)> = crate::test::TEST_ONLY_PACKAGES
        .iter()
        .filter(|(name, _)| matches!(*name, "iputils-arping" | "tcpdump" | "libfaketime"))
        .copied()
        .collect();
    crate::demo::run_lab("chaos", &lab, &packages)
}
