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
use std::time::Duration;
use tokio::time::Instant;

use anyhow::Context;
use lbs_netconfig::{Arp, NetBackend, ProbeResult};

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
    lbs_host::logging::init("lbs", "warn");
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
    let net = lbs_netconfig::Netlink::open()?;
    // RFC 5227's pace, not a takeover's: nothing waits on a boot's first seconds, and a link
    // just up may be slow to carry the answer (a switch port still learning; in the lab's
    // chaos, a link delaying 154 ms outlasted the fast probe's 140 ms). An answer ends the
    // probe at once; only a free address costs the 4 s.
    let arp = lbs_netconfig::PacketArp::new(lbs_netconfig::ProbeProfile::RFC5227);
    check_with(
        &net,
        &arp,
        network,
        paths.dir.join("netconfig-backups"),
        Duration::from_secs(cmd.wait_carrier_s),
    )
    .await
    .inspect(|found| {
        if let Finding::Changed(why) = found {
            // For the agent: the address may be free again by the time it starts (an old
            // primary that answered here steps back at its first report).
            if let Err(err) = std::fs::write(paths.boot_changed(), why) {
                eprintln!(
                    "boot-check: cannot leave a note for the agent in {}: {err}",
                    paths.boot_changed().display()
                );
            }
        }
    })
}

/// The check on the network `net` and `arp` give (the kernel's, or a fake in tests); a changed
/// boot configuration's previous version goes to `backups`.
async fn check_with(
    net: &impl NetBackend,
    arp: &impl Arp,
    network: crate::config::Network,
    backups: PathBuf,
    wait_carrier: Duration,
) -> anyhow::Result<Finding> {
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
    let deadline = started + wait_carrier;
    let link = loop {
        let link = net.link(&interface).await?;
        if link.carrier {
            break link;
        }
        if Instant::now() >= deadline {
            return Ok(Finding::Keep(format!(
                "no carrier on {interface} within {} s: cannot check {}; the agent keeps it off \
                 the link until the cable is in and nobody else answers for it",
                wait_carrier.as_secs(),
                network.shared.addr
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use lbs_netconfig::fake::Op;
    use lbs_netconfig::{FakeNet, Ipv4Cidr, MacAddr};

    const PARTNER: MacAddr = MacAddr([0x5a, 0xec, 0xb4, 0x27, 0x71, 0xcf]);

    fn cidr(text: &str) -> Ipv4Cidr {
        text.parse().unwrap()
    }

    /// A box that went down as the primary: its boot configuration has the shared address,
    /// its interface is bare (the network is not configured yet).
    struct Boot {
        tmp: tempfile::TempDir,
        net: FakeNet,
        network: crate::config::Network,
    }

    impl Boot {
        fn new(boots_with: &str) -> Boot {
            let tmp = tempfile::tempdir().unwrap();
            let interfaces = tmp.path().join("etc/network/interfaces");
            std::fs::create_dir_all(interfaces.parent().unwrap()).unwrap();
            std::fs::write(
                &interfaces,
                format!(
                    "auto eth0\niface eth0 inet static\n\taddress {boots_with}\n\tgateway 192.168.1.1\n"
                ),
            )
            .unwrap();
            let net = FakeNet::new();
            net.add_link("eth0", MacAddr([2, 0, 0, 0, 0, 2]), &[]);
            let network = crate::config::Network {
                interface: "eth0".into(),
                shared: cidr("192.168.1.2/24"),
                own: cidr("192.168.1.3/24"),
                gateway: "192.168.1.1".parse().unwrap(),
                boot_config: Some(tmp.path().to_owned()),
            };
            Boot { tmp, net, network }
        }

        async fn check(&self) -> Finding {
            check_with(
                &self.net,
                &self.net,
                self.network.clone(),
                self.tmp.path().join("backups"),
                Duration::from_secs(5),
            )
            .await
            .unwrap()
        }

        fn boot_address(&self) -> String {
            let root = self.tmp.path();
            let (_, config) = lbs_netconfig::persist::check_static(root, "eth0").unwrap();
            config.address.to_string()
        }
    }

    #[tokio::test]
    async fn nobody_answering_keeps_the_shared_address_for_the_boot() {
        let boot = Boot::new("192.168.1.2/24");
        let finding = boot.check().await;
        assert!(
            matches!(&finding, Finding::Keep(why) if why.contains("nobody else answers")),
            "{finding:?}"
        );
        assert_eq!(boot.boot_address(), "192.168.1.2/24");
        // The link was brought up bare to probe, and nothing was claimed on it.
        let calls = boot.net.calls();
        assert!(calls.contains(&Op::SetLinkUp), "{calls:?}");
        assert!(!calls.contains(&Op::AddAddress), "{calls:?}");
        assert!(!calls.contains(&Op::Announce), "{calls:?}");
    }

    #[tokio::test]
    async fn the_partner_holding_the_shared_address_makes_the_box_boot_with_its_own() {
        let boot = Boot::new("192.168.1.2/24");
        boot.net
            .set_neighbour("192.168.1.2".parse().unwrap(), Some(PARTNER));
        let finding = boot.check().await;
        assert!(
            matches!(&finding, Finding::Changed(why) if why.contains(&PARTNER.to_string())),
            "{finding:?}"
        );
        assert_eq!(boot.boot_address(), "192.168.1.3/24");
        // The previous version is kept where the operator can find it.
        assert!(
            std::fs::read_dir(boot.tmp.path().join("backups"))
                .unwrap()
                .next()
                .is_some()
        );
        assert!(!boot.net.calls().contains(&Op::Announce));
    }

    #[tokio::test(start_paused = true)]
    async fn no_carrier_keeps_the_configuration_after_the_wait_and_says_so() {
        let boot = Boot::new("192.168.1.2/24");
        boot.net.set_carrier("eth0", false);
        let started = Instant::now();
        let finding = boot.check().await;
        assert!(
            matches!(&finding, Finding::Keep(why) if why.contains("no carrier on eth0 within 5 s")),
            "{finding:?}"
        );
        assert!(started.elapsed() >= Duration::from_secs(5));
        assert!(!boot.net.calls().contains(&Op::Probe));
    }

    #[tokio::test]
    async fn a_box_that_boots_with_its_own_address_or_is_already_up_is_left_alone() {
        let boot = Boot::new("192.168.1.3/24");
        assert!(matches!(boot.check().await, Finding::Nothing(_)));
        let boot = Boot::new("192.168.1.2/24");
        boot.net
            .add_address(
                &boot.net.link_named("eth0").unwrap(),
                cidr("192.168.1.2/24"),
            )
            .await
            .unwrap();
        let finding = boot.check().await;
        assert!(
            matches!(&finding, Finding::Nothing(why) if why.contains("already has addresses")),
            "{finding:?}"
        );
        assert!(!boot.net.calls().contains(&Op::Probe));
    }
}
