//! `cargo xtask`: the project's automation, in Rust so it runs wherever cargo does.
//!
//! - `cargo xtask test`: installs the system packages the tests need, then fmt, clippy, the
//!   fuzz target's build and every test; root-only tests that skipped are counted and, as
//!   root, fail the run.
//! - `cargo xtask demo`: as root, the lifecycle in the lab's office, narrated, with the RTO
//!   and RPO measured in that run.
//! - `cargo xtask bench sync`: lbs sync against rsync on fixed datasets, same run, medians.
//! - `cargo xtask bench vpn`: VPN failover detection time and largest gap, medians.
//! - `cargo xtask bench failover`: RTO and RPO of a failover in the lab's office, medians.
//! - `cargo xtask chaos --runs N --seed S`: randomized fault runs in the lab's office with an
//!   independent checker; split-brain moments, regressions, false promotions, lost files.
//! - `cargo xtask dist`: the Debian packages `lbs` and `lbs-datacenter`, lintian-checked.
//! - `cargo xtask fuzz [--seconds N]`: every fuzz target for N s each; executions, crashes.
//! - `cargo xtask structure`: which module uses which, and the import circles (none allowed).
//! - `cargo xtask image`: a Debian 12 PBX image with lbs preinstalled (tarball and qcow2).

mod bench;
mod chaos;
mod demo;
mod dist;
mod fuzz;
mod image;
mod process;
mod structure;
mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "lbs project automation", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install test prerequisites (Debian, as root) and run every check and test.
    Test(test::TestArgs),
    /// Build lbs and run the demonstration, printing a timeline.
    Demo(demo::DemoArgs),
    /// Benchmarks: sync against rsync in the same run, VPN failover, failover RTO/RPO
    /// (`cargo xtask bench sync|vpn|failover`).
    Bench(bench::BenchArgs),
    /// Randomized fault runs in the lab's office with an independent checker (root).
    Chaos(chaos::ChaosArgs),
    /// Build the Debian packages lbs and lbs-datacenter (release build, man pages,
    /// completions, units) and check them with lintian and systemd-analyze.
    Dist(dist::DistArgs),
    /// Build a Debian 12 PBX image with lbs preinstalled: a root filesystem tarball and a
    /// bootable qcow2 disk (root; --check: build, check and discard, as CI does).
    Image(Box<image::ImageArgs>),
    /// Every fuzz target for a bounded time each (`--seconds`, default 60): executions and
    /// crashes per target.
    Fuzz(fuzz::FuzzArgs),
    /// The module picture of every crate and its import circles (fails on one).
    Structure(structure::StructureArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Test(args) => test::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Chaos(args) => chaos::run(&args),
        Command::Dist(args) => dist::run(&args),
        Command::Image(args) => image::run(&args),
        Command::Fuzz(args) => fuzz::run(&args),
        Command::Structure(args) => structure::run(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("\nxtask: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
