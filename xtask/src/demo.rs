//! `cargo xtask demo`: the newcomer's proof that the whole product works.
//!
//! As root on a fresh Debian machine: installs the packages the lab needs, builds every
//! binary, and runs `lbs-lab demo` — the office and its data centers in network namespaces
//! (`lbs_tests::office`), the lifecycle narrated step by step with the sync's progress, a
//! timeline, and as the last line `demo: RTO <s> s, RPO <s> s, <final sync verdict>`, all
//! measured in that run. `lbs-lab` removes everything it started, also on Ctrl-C.

use std::process::Command;

use anyhow::{Context, bail};

use crate::util::{cargo, ensure_packages, is_root, run_step, target_dir};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Data-center sites: 1 (the embedded default: one site, SQLite) or 3 (etcd at each,
    /// `lbs-datacenter serve` at two; the first site goes dark before the failover).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=3))]
    sites: u8,
    /// Make an operator account for the data center's portal (its URL and password are
    /// printed) and keep the lab up at the end until Ctrl-C, so a person can look at it.
    #[arg(long)]
    portal: bool,
}

/// Why the demo needs root, said before anything else happens.
const NEEDS_ROOT: &str = "cargo xtask demo needs root: it builds an office (primary, backup, \
    phone, router) and two data-center hosts in Linux network namespaces (ip netns), moves IP \
    addresses between them, and installs and runs BIND, a SIP server (kamailio) and a SIP phone \
    (sipp) inside them. Run it as root, e.g. `sudo -E cargo xtask demo`.";

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    if !is_root() {
        bail!("{NEEDS_ROOT}");
    }
    match (args.sites, args.portal) {
        (1, false) => run_lab("the demo", &["demo"], &[]),
        (1, true) => run_lab("the demo", &["demo", "--portal"], &[]),
        (3, false) => run_lab(
            "the three-site demo",
            &["demo", "--sites", "3"],
            crate::test::SITES_PACKAGES,
        ),
        (3, true) => bail!(
            "--portal runs on the one-site demo (with three sites dc1, which serves the portal, goes dark)"
        ),
        _ => bail!(
            "--sites 2 cannot survive the loss of a site (two etcd members are no majority without both): use 1 or 3"
        ),
    }
}

/// Installs the lab's packages, builds every binary and runs `lbs-lab <args>` (root), its
/// programs logging warnings only unless `RUST_LOG` says otherwise.
pub fn run_lab(what: &str, args: &[&str], extra: &[(&str, &str)]) -> anyhow::Result<()> {
    let packages: Vec<(&str, &str)> = crate::test::SYSTEM_PACKAGES
        .iter()
        .chain(crate::test::LAB_PACKAGES)
        .chain(extra)
        .copied()
        .collect();
    let missing = ensure_packages(&packages, true)?;
    if !missing.is_empty() {
        bail!("{what} needs {}", missing.join(" "));
    }
    run_step(
        "cargo build",
        cargo().args(["build", "--locked", "--workspace", "--bins"]),
    )?;
    let lab = target_dir().join("debug").join("lbs-lab");
    println!("\n==> {} {}", lab.display(), args.join(" "));
    let mut cmd = Command::new(&lab);
    cmd.args(args);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "warn");
    }
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", lab.display()))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}
