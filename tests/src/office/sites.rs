//! The data center's three sites on the lab's WAN, each with an etcd member: `dc1` and `dc2`
//! (the two full sites) and `dc3` (a witness that only votes), so any one site can be lost and
//! two still form a majority. Partitions cut a site off from the others while the offices
//! still reach it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{DC1, DC2, Office};
use crate::netns::in_netns;

/// The witness site's WAN address.
pub const DC3: &str = "10.20.0.13";
/// The sites with an etcd member, and their WAN addresses.
pub const SITES: [(&str, &str); 3] = [("dc1", DC1), ("dc2", DC2), ("dc3", DC3)];
/// etcd's client and peer ports.
const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;
/// How long the cluster may take to answer healthy on every member.
const START_DEADLINE: Duration = Duration::from_secs(30);

impl Office {
    /// Adds `dc3` to the WAN and starts an etcd member at each site, waiting until every
    /// member answers healthy from its own site; the members' client URLs.
    pub fn start_etcd(&mut self) -> anyhow::Result<Vec<String>> {
        if !self.lab.has_host("dc3") {
            self.lab
                .connect("dc3", "eth0", "wan", &format!("{DC3}/24"))?;
            self.lab.sh(
                "dc3",
                &["ip", "route", "add", "default", "via", "10.20.0.1"],
            )?;
        }
        let cluster: Vec<String> = SITES
            .iter()
            .map(|(site, ip)| format!("{site}=http://{ip}:{PEER_PORT}"))
            .collect();
        for (site, ip) in SITES {
            let data = self.dir().join(format!("etcd-{site}"));
            let args = crate::etcd::member_args(
                site,
                &format!("http://{ip}:{CLIENT_PORT}"),
                &format!("{ip}:{PEER_PORT}"),
                &cluster.join(","),
                "new",
            );
            let mut etcd = self.lab.command(site, "sh");
            etcd.arg("-c").arg(format!(
                "echo starting; exec etcd --data-dir '{}' {} 2>&1",
                data.display(),
                args.join(" ")
            ));
            self.lab
                .spawn_until(etcd, "starting", START_DEADLINE)
                .with_context(|| format!("starting etcd on {site}"))?;
        }
        let deadline = Instant::now() + START_DEADLINE;
        for (site, ip) in SITES {
            let addr: SocketAddr = format!("{ip}:{CLIENT_PORT}").parse()?;
            loop {
                if in_netns(&self.lab.ns(site), move || crate::etcd::healthy(addr))? {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("etcd on {site} not healthy within {START_DEADLINE:?}");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(Self::etcd_endpoints(&SITES.map(|(site, _)| site)))
    }

    /// The client URLs of the etcd members at `sites`.
    pub fn etcd_endpoints(sites: &[&str]) -> Vec<String> {
        SITES
            .iter()
            .filter(|(site, _)| sites.contains(site))
            .map(|(_, ip)| format!("http://{ip}:{CLIENT_PORT}"))
            .collect()
    }

    /// Cuts `site` off from the other sites (`true`: its packets to them and theirs to it
    /// are dropped) or joins it again; the offices and the router still reach it.
    pub fn partition_site(&mut self, site: &str, cut: bool) -> anyhow::Result<()> {
        let Some((_, cut_ip)) = SITES.iter().find(|(s, _)| *s == site) else {
            bail!("no site {site}");
        };
        let verb = if cut { "add" } else { "del" };
        for (other, ip) in SITES.iter().filter(|(s, _)| *s != site) {
            if !self.lab.has_host(other) {
                continue;
            }
            self.lab.sh(
                site,
                &["ip", "route", verb, "blackhole", &format!("{ip}/32")],
            )?;
            self.lab.sh(
                other,
                &["ip", "route", verb, "blackhole", &format!("{cut_ip}/32")],
            )?;
        }
        Ok(())
    }
}
