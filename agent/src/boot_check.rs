//! `lbs net boot-check`: run at boot *before* the network is configured (the `lbs-boot-check`
//! unit orders itself before `network-pre.target`).
//!
//! A box that was the primary when it died has the shared address in its boot configuration.
//! Meanwhile its partner may have been promoted and taken that address. Were the network
//! brought up as configured, the kernel would answer ARP for the shared address (and claim it
//! in its own ARP requests) from the first second, long before the agent could check — phones
//! and the gateway would send part of the traffic to the dead PBX. So before the network
//! starts, the link is brought up bare (no address) and the shared address is probed
//! (RFC 5227, claiming nothing). If another machine answers, the boot configuration gets this
//! box's own address instead; the agent then finds the address taken and steps back (fenced)
//! until the operator presses **B**. Nothing here ever stops the boot: every outcome exits 0
//! and says what it found.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use lbs_netconfig::{NetBackend, ProbeResult};

use crate::config::AgentConfig;
use crate::role::RoleRecord;

/// Options of `lbs net boot-check`.
#[derive(clap::Args, Debug)]
pub struct BootCheckCmd {
    /// The agent's configuration (its `[network]` section says what to check).
    #[arg(long, default_value = "/etc/lbs/agent.toml")]
    config: PathBuf,
    /// The agent's state (the role this box had when it went down).
    #[arg(long, default_value = "/var/lib/lbs")]
    state: PathBuf,
    /// How long to wait for the carrier before giving up the check (the agent still keeps
    /// the shared address off a link without carrier).
    #[arg(long, default_value_t = 5)]
    wait_carrier_s: u64,
}

/// What the check found.
#[derive(Debug, PartialEq, Eq)]
enum Finding {
    /// Nothing to check, and why.
    Nothing(String),
    /// The check ran and the boot configuration stays.
    Keep(String),
    /// Another machine holds the shared address: the boot configuration was changed.
    Changed(String),
}

pub async fn run(cmd: BootCheckCmd) -> anyhow::Result<ExitCode> {
    lbs_protocol::logging::init("lbs", "warn");
    let said = match check(&cmd).await {
        Ok(Finding::Nothing(why)) => format!("boot-check: nothing to check: {why}"),
        Ok(Finding::Keep(why)) => format!("boot-check: {why}"),
        Ok(Finding::Changed(why)) => format!("boot-check: CHANGED: {why}"),
        // Never in the way of the boot: the agent checks again when it starts.
        Err(err) => {
            format!("boot-check: could not check ({err:#}); the agent checks when it starts")
        }
    };
    println!("{said}");
    Ok(ExitCode::SUCCESS)
}

async fn check(cmd: &BootCheckCmd) -> anyhow::Result<Finding> {
    let config = AgentConfig::load(&cmd.config, false)?;
    let paths = crate::activate::StatePaths::new(&cmd.state);
    let record = RoleRecord::load(&paths.role())?;
    let Some(network) = crate::config::with_choice(config.network, record.shared) else {
        return Ok(Finding::Nothing(
            "no [network] section (this box keeps its own address)".into(),
        ));
    };
    let Some(root) = network.boot_config.clone() else {
        return Ok(Finding::Nothing(
            "boot_config is not set: lbs leaves the boot configuration alone".into(),
        ));
    };
    let interface = network.interface.clone();
    let (owner, boot) = {
        let (root, interface) = (root.clone(), interface.clone());
        tokio::task::spawn_blocking(move || lbs_netconfig::persist::check_static(&root, &interface))
            .await??
    };
    if boot.address.addr != network.shared.addr {
        return Ok(Finding::Nothing(format!(
            "{} boots with {} (not the shared {})",
            owner.file.display(),
            boot.address,
            network.shared.addr
        )));
    }
    let net = lbs_netconfig::Netlink::open()?;
    let link = net.link(&interface).await?;
    if !net.addresses(&link).await?.is_empty() {
        // Already configured: this is not a boot (someone ran it by hand); the running
        // agent's checks apply.
        return Ok(Finding::Nothing(format!(
            "{interface} already has addresses: run before the network is configured"
        )));
    }
    net.set_link_up(&link).await?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(cmd.wait_carrier_s);
    let link = loop {
        let link = net.link(&interface).await?;
        if link.carrier {
            break link;
        }
        if Instant::now() >= deadline {
            return Ok(Finding::Keep(format!(
                "no carrier on {interface} within {} s: cannot check {}; the agent keeps it off \
                 the link until the cable is in and nobody else answers for it",
                cmd.wait_carrier_s, network.shared.addr
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let arp = lbs_netconfig::PacketArp::new(lbs_netconfig::ProbeProfile::FAST);
    use lbs_netconfig::Arp;
    match arp.probe(&link, network.shared.addr).await? {
        ProbeResult::Free => Ok(Finding::Keep(format!(
            "nobody else answers for {} on {interface} (checked in {:.2} s): booting with it",
            network.shared.addr,
            started.elapsed().as_secs_f64()
        ))),
        ProbeResult::InUse(mac) => {
            let own = lbs_netconfig::persist::StaticConfig {
                address: network.own,
                gateway: Some(network.gateway),
            };
            let backups = paths.dir.join("netconfig-backups");
            let done = tokio::task::spawn_blocking(move || {
                lbs_netconfig::persist::persist(&root, &interface, &own, &backups)
            })
            .await?
            .context("writing this box's own address into the boot configuration")?;
            Ok(Finding::Changed(format!(
                "{mac} answers for {}: the partner took over while this box was down. It boots \
                 with its own {} ({}; previous version in {}); the agent will stop the PBX and \
                 wait for B",
                network.shared.addr,
                network.own,
                done.owner.file.display(),
                done.backup.display()
            )))
        }
    }
}
