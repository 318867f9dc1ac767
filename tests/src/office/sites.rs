//! The data center's three sites on the lab's WAN, each with an etcd member: `dc1` and `dc2`
//! (the two full sites) and `dc3` (a witness that only votes), so any one site can be lost and
//! two still form a majority. Partitions cut a site off from the others while the offices
//! still reach it. [`Office::three_sites`] turns the office's data center into that: dc1's
//! records moved into etcd, `lbs-datacenter serve` at dc1 and dc2 on it, the DNS server at dc3.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{DC1, DC2, FQDN, Layout, Office, STEP, TSIG_BASE64, ZONE, checked};
use crate::netns::in_netns;
use crate::workspace_binary;

/// The sites that serve (the witness only votes).
pub const SERVING: [(&str, &str); 2] = [("dc1", DC1), ("dc2", DC2)];

/// What runs at each site once there are three.
#[derive(Debug, Default)]
pub(super) struct Sites {
    /// `lbs-datacenter serve`, per serving site.
    serve: Vec<(String, u32)>,
    /// etcd, per site.
    etcd: Vec<(String, u32)>,
}

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
        for (site, _) in SITES {
            self.spawn_etcd(site)?;
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

    /// Starts `site`'s etcd member (again: its data directory kept, it rejoins).
    fn spawn_etcd(&mut self, site: &str) -> anyhow::Result<u32> {
        let Some((_, ip)) = SITES.iter().find(|(s, _)| *s == site) else {
            bail!("no site {site}");
        };
        let cluster: Vec<String> = SITES
            .iter()
            .map(|(site, ip)| format!("{site}=http://{ip}:{PEER_PORT}"))
            .collect();
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
        let (pid, _) = self
            .lab
            .spawn_until(etcd, "starting", START_DEADLINE)
            .with_context(|| format!("starting etcd on {site}"))?;
        self.sites.etcd.retain(|(s, _)| s != site);
        self.sites.etcd.push((site.to_owned(), pid));
        Ok(pid)
    }

    /// Kills `site`'s etcd member (`up`: false) or starts it again.
    pub fn etcd_at(&mut self, site: &str, up: bool) -> anyhow::Result<()> {
        if up {
            self.spawn_etcd(site)?;
        } else {
            let pid = self.etcd_pid(site)?;
            self.lab.kill(pid)?;
            self.sites.etcd.retain(|(s, _)| s != site);
        }
        Ok(())
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

    /// The data center as three sites on one authority, before the boxes activate: etcd at
    /// dc1, dc2 and dc3, dc1's records moved into it (`lbs-datacenter migrate --to etcd`),
    /// `lbs-datacenter serve` at dc1 and dc2 on the shared store, each telling boxes both
    /// sites' control addresses, and the DNS server on dc3, so a site gone dark does not take
    /// it along.
    pub fn three_sites(&mut self) -> anyhow::Result<()> {
        if self.layout != (Layout::Office { remote: false }) {
            bail!("three sites are built on the office with its backup on the LAN");
        }
        self.start_etcd()?;
        self.start_bind_on("dc3", DC3)?;
        self.lab.stop(self.dc_pid, STEP)?;
        let control: Vec<String> = SERVING
            .iter()
            .map(|(_, ip)| format!("\"{ip}:7441\""))
            .collect();
        for (site, ip) in SERVING {
            let dir = self.site_dir(site);
            if site != "dc1" {
                // As an operator makes a site: from dc1's directory (its CA), then this
                // site's own configuration below.
                let out = dir.display().to_string();
                self.datacenter_at("dc1", &["site-init", "--site", site, "--out", &out])?;
            }
            std::fs::create_dir_all(&dir)?;
            // Every member, this site's own first: the client talks to one at a time and
            // moves on when it fails.
            let mut order = vec![site];
            order.extend(SITES.iter().map(|(s, _)| *s).filter(|s| *s != site));
            let members: Vec<String> = order
                .iter()
                .flat_map(|s| Office::etcd_endpoints(&[s]))
                .map(|e| format!("\"{e}\""))
                .collect();
            let config = dir.join("datacenter.toml");
            std::fs::write(
                &config,
                format!(
                    "site = \"{site}\"\nactivation = [\"{ip}:7440\"]\ncontrol = [\"0.0.0.0:7441\"]\nadvertise_control = [{}]\n\n\
                     [dns]\nserver = \"{DC3}:53\"\nzone = \"{ZONE}\"\nkey_name = \"lbs-dc\"\nsecret = \"{TSIG_BASE64}\"\nttl = 60\n\n\
                     [store]\nbackend = \"etcd\"\nendpoints = [{}]\ndns_lease_s = 3\n",
                    control.join(", "),
                    members.join(", ")
                ),
            )?;
            std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        }
        let said = self.datacenter_at("dc1", &["migrate", "--to", "etcd"])?;
        if !said.contains("migrated 1 pairs") {
            bail!("migrate said: {said}");
        }
        for (site, _) in SERVING {
            self.start_serve(site)?;
        }
        Ok(())
    }

    /// Waits until each of `hosts` reports to the serving site `site`.
    pub fn wait_reporting_to(&mut self, site: &str, hosts: &[&str]) -> anyhow::Result<()> {
        let Some((_, ip)) = SERVING.iter().find(|(s, _)| *s == site) else {
            bail!("no serving site {site}");
        };
        let control = format!("{ip}:7441");
        for host in hosts {
            self.wait(&format!("{host} to report to {site}"), STEP, |o| {
                Ok(o.status(host)?["datacenter"]["connected_to"] == control.as_str())
            })?;
        }
        Ok(())
    }

    /// The data directory of serving site `site`.
    pub fn site_dir(&self, site: &str) -> PathBuf {
        match site {
            "dc1" => self.dc_dir(),
            other => self.dir().join(other),
        }
    }

    /// Starts `lbs-datacenter serve` at `site` (three sites); its pid.
    pub fn start_serve(&mut self, site: &str) -> anyhow::Result<u32> {
        let mut serve = self.lab.command(site, workspace_binary("lbs-datacenter"));
        serve.arg("--dir").arg(self.site_dir(site)).arg("serve");
        let (pid, _) = self
            .lab
            .spawn_until(serve, "ready:", STEP)
            .with_context(|| format!("starting serve at {site}"))?;
        self.sites.serve.retain(|(s, _)| s != site);
        self.sites.serve.push((site.to_owned(), pid));
        if site == "dc1" {
            self.dc_pid = pid;
        }
        Ok(pid)
    }

    /// kill -9 of `site`'s `lbs-datacenter serve` (three sites; [`Office::start_serve`] starts
    /// it again).
    pub fn kill_serve(&mut self, site: &str) -> anyhow::Result<()> {
        let pid = self.serve_pid(site)?;
        self.lab.kill(pid)?;
        self.sites.serve.retain(|(s, _)| s != site);
        Ok(())
    }

    /// The pid of `site`'s `lbs-datacenter serve`.
    pub fn serve_pid(&self, site: &str) -> anyhow::Result<u32> {
        self.sites
            .serve
            .iter()
            .find(|(s, _)| s == site)
            .map(|(_, pid)| *pid)
            .with_context(|| format!("no serve runs at {site}"))
    }

    /// The pids of etcd at `site`.
    pub fn etcd_pid(&self, site: &str) -> anyhow::Result<u32> {
        self.sites
            .etcd
            .iter()
            .find(|(s, _)| s == site)
            .map(|(_, pid)| *pid)
            .with_context(|| format!("no etcd runs at {site}"))
    }

    /// `site` goes dark: every process there killed (serve, etcd, BIND) and its cable out.
    pub fn site_dark(&mut self, site: &str) -> anyhow::Result<()> {
        self.lab.kill_all_in(site)?;
        self.sites.serve.retain(|(s, _)| s != site);
        self.sites.etcd.retain(|(s, _)| s != site);
        self.lab.plug(site, false)
    }

    /// `lbs-datacenter --dir <site's> <args>` run at `site` (where the etcd members are
    /// reachable); its standard output, or an error with what it said.
    pub fn datacenter_at(&self, site: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut cli = self.lab.command(site, workspace_binary("lbs-datacenter"));
        cli.arg("--dir").arg(self.site_dir(site)).args(args);
        checked(cli.output()?)
            .with_context(|| format!("lbs-datacenter {} at {site}", args.join(" ")))
    }

    /// The pair's DNS records as `site`'s `status --json` shows them: (name, want, state).
    pub fn dns_records_at(&self, site: &str) -> anyhow::Result<Vec<(String, String, String)>> {
        let json: serde_json::Value =
            serde_json::from_str(&self.datacenter_at(site, &["status", "--json"])?)?;
        let pair = json
            .as_array()
            .and_then(|pairs| pairs.iter().find(|p| p["fqdn"] == FQDN))
            .with_context(|| format!("no pair {FQDN} in {json}"))?;
        Ok(pair["dns"]
            .as_array()
            .map(|records| {
                records
                    .iter()
                    .map(|r| {
                        let text =
                            |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
                        (text(&r["name"]), text(&r["want"]), text(&r["state"]))
                    })
                    .collect()
            })
            .unwrap_or_default())
    }
}
