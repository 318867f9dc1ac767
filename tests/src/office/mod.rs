//! The office and its data centers (DESIGN §11), in network namespaces, running the real
//! programs: an office LAN (`192.168.1.0/24`, a bridge) with the `primary` (.2, the seed's
//! address), the `backup` (.3), a `phone` (.10) and the gateway router `gw` (.1), which routes
//! to a WAN (`10.20.0.0/24`) where the data-center hosts `dc1` (.11) and `dc2` (.12) live.
//!
//! `dc1` runs `lbs-datacenter serve` and a real BIND 9 holding the pair's zone (the data
//! center updates it with TSIG-signed RFC 2136 updates). Each box runs `lbs agent` with the
//! default Asterisk sync sets rooted in a directory of its own, and a PBX hook that starts a
//! real SIP server (Debian's `kamailio`, a minimal registrar) on the shared address. The phone
//! is Debian's `sipp`, asking the PBX at 192.168.1.2 ten times a second and logging every
//! answer with its time. Everything — processes (also those the hooks started) and namespaces —
//! goes when the [`Office`] is dropped, also on a panic.
//!
//! It is the one office builder of the namespace tests: the agent's tests build theirs on
//! [`Layout::Lan`] (one LAN, no DNS or phone, box configurations of their own) through the
//! same network, data-center, activation, agent and teardown code.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use lbs_protocol::ServerId;

use crate::netns::Lab;
use crate::{provisioned, workspace_binary};

mod boxes;
mod phone;
mod sites;

pub use boxes::{generated_audio, remove_office_dirs, unmount_disks};
pub use sites::{DC3, SERVING, SITES};

/// The shared address: the primary's, the one the phones use.
pub const SHARED: &str = "192.168.1.2";
/// The backup's own address.
pub const OWN: &str = "192.168.1.3";
/// The remote backup's address, at the second site (see [`Office::start_remote`]).
pub const REMOTE_BACKUP: &str = "192.168.2.3";
/// The office gateway.
pub const GATEWAY: &str = "192.168.1.1";
/// The data center (activation, control, DNS).
pub const DC1: &str = "10.20.0.11";
/// The second data-center host.
pub const DC2: &str = "10.20.0.12";
/// The pair's name, which the data center points at its primary.
pub const FQDN: &str = "pbx.acme.example";
const ZONE: &str = "acme.example";
/// TSIG secret for the data center's DNS updates (32 bytes) and its base64.
const TSIG_BASE64: &str = "YSBzaGFyZWQgc2VjcmV0IG9mIHRoaXJ0eS10d28gYi4=";

/// How long any single wait of the office may take.
pub const STEP: Duration = Duration::from_secs(60);

/// The sync sets of a box, as DESIGN §6 lists them, under the box's root.
pub const SETS: [(&str, &str); 5] = [
    ("config", "etc/asterisk"),
    ("voicemail", "var/spool/asterisk/voicemail"),
    ("prompts", "var/lib/asterisk/sounds/custom"),
    ("moh", "var/lib/asterisk/moh"),
    ("recordings", "var/spool/asterisk/monitor"),
];

pub const BOXES: [&str; 2] = ["primary", "backup"];

/// The portal's port on dc1 ([`Layout::Office`]).
pub const PORTAL_PORT: u16 = 7443;
/// Where each box of [`Layout::Office`] serves its `/metrics` (on its own loopback).
pub const BOX_METRICS: &str = "127.0.0.1:9464";

/// The data center of [`Layout::Lan`], on the boxes' LAN.
pub const LAN_DC: &str = "192.168.70.1";

/// The network an [`Office`] is built on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// DESIGN §11's office (see the module's opening): `primary` and `backup` with the
    /// Asterisk sets and a real PBX, a phone, a router, BIND and two data-center hosts.
    /// `remote`: the backup at another site (see [`Office::start_remote`]).
    Office { remote: bool },
    /// The agent tests' lab: one LAN (`192.168.70.0/24`) with the data center `dc` (.1,
    /// no DNS) and the boxes `a` (.2) and `b` (.3), whose configurations the tests write.
    /// `remote`: b is on `192.168.71.0/24` with a route to the data center only, which runs
    /// a WireGuard endpoint and forwards between its peers.
    Lan { remote: bool },
}

impl Layout {
    fn remote(self) -> bool {
        match self {
            Layout::Office { remote } | Layout::Lan { remote } => remote,
        }
    }
}

/// The office, running.
#[derive(Debug)]
pub struct Office {
    /// The namespaces and the processes in them.
    pub lab: Lab,
    tmp: boxes::OfficeDir,
    /// The pair's SIDs and activation keys, in provisioning order.
    pub sids: Vec<(ServerId, String)>,
    agents: Vec<(String, u32)>,
    phone: Option<(u32, PathBuf)>,
    /// The small disks mounted (see [`Office::limit_disk`]), unmounted on drop.
    mounts: Vec<PathBuf>,
    layout: Layout,
    /// The backup is at another site (see [`Layout`]).
    remote: bool,
    /// `lbs-datacenter serve`.
    pub dc_pid: u32,
    /// The DNS server the pair's names are asked of (BIND on dc1; dc3 with three sites).
    dns_at: &'static str,
    /// With three sites: `lbs-datacenter serve` and etcd, per site.
    sites: sites::Sites,
}

/// `lbs vpn keygen <path>`: a WireGuard key written there; its public key.
fn keygen(path: &Path) -> anyhow::Result<String> {
    let out = checked(
        Command::new(workspace_binary("lbs"))
            .args(["vpn", "keygen"])
            .arg(path)
            .output()?,
    )?;
    Ok(out.trim().to_owned())
}

/// Milliseconds since the epoch, the unit every measurement of the office uses.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Office {
    /// Builds the networks, starts BIND and the data center on `dc1`, provisions the pair
    /// `acme` (`pbx.acme.example`) and writes both boxes' configurations.
    pub fn start() -> anyhow::Result<Office> {
        Office::build(Layout::Office { remote: false })
    }

    /// Like [`Office::start`], but the backup is at another site: a second office LAN
    /// (`192.168.2.0/24`, the backup at .3) behind the same router. The boxes reach each other
    /// and replicate through the data center's WireGuard endpoint on `dc1` (the overlay);
    /// the backup has no `[network]` section: on P it keeps its own address and the data
    /// center moves the pair's name to it.
    pub fn start_remote() -> anyhow::Result<Office> {
        Office::build(Layout::Office { remote: true })
    }

    /// The office on `layout`'s network with its data center running and the pair `acme`
    /// provisioned; the boxes of [`Layout::Office`] configured.
    pub fn build(layout: Layout) -> anyhow::Result<Office> {
        let remote = layout.remote();
        let lab = match layout {
            Layout::Office { .. } => Office::office_network(remote)?,
            Layout::Lan { .. } => Office::lan_network(remote)?,
        };
        let tmp = boxes::OfficeDir::new()?;
        let mut office = Office {
            lab,
            tmp,
            sids: Vec::new(),
            agents: Vec::new(),
            phone: None,
            mounts: Vec::new(),
            layout,
            remote,
            dc_pid: 0,
            dns_at: DC1,
            sites: sites::Sites::default(),
        };
        if let Layout::Office { .. } = layout {
            office.start_bind()?;
        }
        office.start_datacenter()?;
        if let Layout::Office { .. } = layout {
            for host in BOXES {
                office.write_box(host)?;
            }
        }
        Ok(office)
    }

    fn lan_network(remote: bool) -> anyhow::Result<Lab> {
        let mut lab = Lab::new();
        lab.add_lan()?;
        lab.add_host("dc", &format!("{LAN_DC}/24"))?;
        lab.add_host("a", "192.168.70.2/24")?;
        if remote {
            lab.add_host("b", "192.168.71.3/24")?;
            checked(lab.sh(
                "dc",
                &["ip", "addr", "add", "192.168.71.1/24", "dev", "eth0"],
            )?)?;
            checked(lab.sh(
                "b",
                &["ip", "route", "add", &format!("{LAN_DC}/32"), "dev", "eth0"],
            )?)?;
            checked(lab.sh("dc", &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?)?;
        } else {
            lab.add_host("b", "192.168.70.3/24")?;
        }
        Ok(lab)
    }

    fn office_network(remote: bool) -> anyhow::Result<Lab> {
        let mut lab = Lab::new();
        lab.add_segment("lan")?;
        lab.add_segment("wan")?;
        let mut office_hosts = vec![
            ("gw", "192.168.1.1/24"),
            ("primary", "192.168.1.2/24"),
            ("phone", "192.168.1.10/24"),
        ];
        if !remote {
            office_hosts.push(("backup", "192.168.1.3/24"));
        }
        for (host, cidr) in office_hosts {
            lab.connect(host, "eth0", "lan", cidr)?;
        }
        if remote {
            lab.add_segment("lan2")?;
            lab.connect("gw", "eth2", "lan2", "192.168.2.1/24")?;
            lab.connect("backup", "eth0", "lan2", &format!("{REMOTE_BACKUP}/24"))?;
        }
        lab.connect("gw", "eth1", "wan", "10.20.0.1/24")?;
        lab.connect("dc1", "eth0", "wan", &format!("{DC1}/24"))?;
        lab.connect("dc2", "eth0", "wan", &format!("{DC2}/24"))?;
        lab.sh("gw", &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        for host in ["primary", "backup", "phone"] {
            let gateway = if remote && host == "backup" {
                "192.168.2.1"
            } else {
                GATEWAY
            };
            lab.sh(host, &["ip", "route", "add", "default", "via", gateway])?;
        }
        for host in ["dc1", "dc2"] {
            lab.sh(host, &["ip", "route", "add", "default", "via", "10.20.0.1"])?;
        }
        Ok(lab)
    }

    /// The boxes: `primary` and `backup`, or `a` and `b` ([`Layout::Lan`]).
    pub fn boxes(&self) -> [&'static str; 2] {
        match self.layout {
            Layout::Office { .. } => BOXES,
            Layout::Lan { .. } => ["a", "b"],
        }
    }

    /// The host the data center runs on, and its address.
    fn dc_host(&self) -> (&'static str, &'static str) {
        match self.layout {
            Layout::Office { .. } => ("dc1", DC1),
            Layout::Lan { .. } => ("dc", LAN_DC),
        }
    }

    /// The office's own directory (state, configuration, data of every host).
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// Where `host`'s PBX data lives (the root the sync sets are under).
    pub fn root(&self, host: &str) -> PathBuf {
        self.dir().join(host).join("root")
    }

    /// The directory of set `name` on `host`.
    pub fn set_dir(&self, host: &str, name: &str) -> PathBuf {
        let rel = SETS
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(name, |(_, rel)| rel);
        self.root(host).join(rel)
    }

    /// `host`'s agent's control socket.
    pub fn socket(&self, host: &str) -> PathBuf {
        self.dir().join(host).join("agent.sock")
    }

    /// Where `host`'s agent state lives (identity, role).
    pub fn state(&self, host: &str) -> PathBuf {
        self.dir().join(host).join("state")
    }

    /// `host`'s MAC address on its office LAN.
    pub fn mac(&mut self, host: &str) -> anyhow::Result<String> {
        let link = checked(self.lab.sh(host, &["ip", "-o", "link", "show", "eth0"])?)?;
        link.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .map(str::to_owned)
            .with_context(|| format!("no MAC in {link:?}"))
    }

    /// `host`'s IPv4 addresses on eth0 (`ip -4 -o addr` lines).
    pub fn addresses(&mut self, host: &str) -> anyhow::Result<String> {
        checked(
            self.lab
                .sh(host, &["ip", "-4", "-o", "addr", "show", "eth0"])?,
        )
    }

    /// The data center's directory (its database, CA, configuration).
    pub fn dc_dir(&self) -> PathBuf {
        self.dir().join(self.dc_host().0)
    }

    fn start_bind(&mut self) -> anyhow::Result<()> {
        self.start_bind_on("dc1", DC1)
    }

    /// BIND on `host` at `address`, holding the pair's zone, updated with the lab's TSIG key.
    fn start_bind_on(&mut self, host: &str, address: &'static str) -> anyhow::Result<()> {
        let dir = self.dir().join(format!("bind-{host}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("zone"),
            format!(
                "$TTL 60\n@ IN SOA ns.{ZONE}. hostmaster.{ZONE}. 1 60 60 600 60\n@ IN NS ns.{ZONE}.\nns IN A {address}\n"
            ),
        )?;
        std::fs::write(
            dir.join("named.conf"),
            format!(
                "options {{ directory \"{d}\"; pid-file \"{d}/named.pid\"; listen-on port 53 {{ {address}; }}; listen-on-v6 {{ none; }}; recursion no; dnssec-validation no; }};\n\
                 controls {{ }};\n\
                 key \"lbs-dc\" {{ algorithm hmac-sha256; secret \"{TSIG_BASE64}\"; }};\n\
                 zone \"{ZONE}\" {{ type primary; file \"{d}/zone\"; allow-update {{ key \"lbs-dc\"; }}; }};\n",
                d = dir.display()
            ),
        )?;
        // `named -g` logs to stderr; the first line on stdout would never come, so a shell
        // says "named" and then becomes it.
        let mut named = self.lab.command(host, "sh");
        named.args([
            "-c",
            &format!(
                "echo named; exec named -g -c '{}' 2>'{}'",
                dir.join("named.conf").display(),
                dir.join("named.log").display()
            ),
        ]);
        self.lab.spawn_until(named, "named", STEP)?;
        self.dns_at = address;
        self.wait("BIND to answer for the zone", STEP, |office| {
            Ok(office.dig(&format!("ns.{ZONE}"))? == [address])
        })
    }

    fn start_datacenter(&mut self) -> anyhow::Result<()> {
        let dc = workspace_binary("lbs-datacenter");
        let dir = self.dc_dir();
        self.datacenter(&["init"])?;
        self.sids = self.provision("acme", FQDN)?;
        let (host, address) = self.dc_host();
        let mut config =
            format!("activation = [\"{address}:7440\"]\ncontrol = [\"0.0.0.0:7441\"]\n");
        if let Layout::Office { .. } = self.layout {
            config += &format!(
                "\n[dns]\nserver = \"{DC1}:53\"\nzone = \"{ZONE}\"\nkey_name = \"lbs-dc\"\nsecret = \"{TSIG_BASE64}\"\nttl = 60\n"
            );
            // The provider's portal, for a browser on this machine through a Forward.
            config += &format!(
                "\n[portal]\nlisten = [\"{DC1}:{PORTAL_PORT}\"]\nnames = [\"{DC1}\", \"127.0.0.1\", \"localhost\"]\n"
            );
        }
        if self.layout == (Layout::Lan { remote: true }) {
            // One site, one endpoint forwarding between the boxes' tunnels.
            keygen(&dir.join("dc1.key"))?;
            config += &format!(
                "[[endpoint]]\nname = \"dc1\"\ninterface = \"lbs-dc1\"\npublic = \"{address}:51820\"\naddress = \"10.77.255.1/16\"\nprivate_key_file = \"dc1.key\"\nbackend = \"userspace\"\n"
            );
        }
        if self.layout == (Layout::Office { remote: true }) {
            // Two sites: dc1 (the main one: the database, activation, control, DNS and an
            // endpoint) and dc2 (only an endpoint, its peers following dc1). Each forwards
            // between its tunnels' peers (the data center says so when it cannot).
            keygen(&dir.join("dc1.key"))?;
            let dc2 = self.dc2_dir();
            self.datacenter(&["site-identity", "--out", &dc2.display().to_string()])?;
            let dc2_public = keygen(&dc2.join("dc2.key"))?;
            config = format!("site = \"dc1\"\n{config}");
            config += &format!(
                "\n[[endpoint]]\nname = \"dc1\"\ninterface = \"lbs-dc1\"\npublic = \"{DC1}:51820\"\naddress = \"10.77.255.1/16\"\nprivate_key_file = \"dc1.key\"\nbackend = \"userspace\"\n\
                 \n[[endpoint]]\nname = \"dc2\"\nsite = \"dc2\"\npublic = \"{DC2}:51820\"\naddress = \"10.77.255.2/16\"\npublic_key = \"{dc2_public}\"\n"
            );
            std::fs::write(
                dc2.join("datacenter.toml"),
                format!(
                    "site = \"dc2\"\nfollow = [\"{DC1}:7441\"]\n\n\
                     [[endpoint]]\nname = \"dc2\"\ninterface = \"lbs-dc2\"\npublic = \"{DC2}:51820\"\naddress = \"10.77.255.2/16\"\nprivate_key_file = \"dc2.key\"\nbackend = \"userspace\"\n"
                ),
            )?;
            for host in ["dc1", "dc2"] {
                checked(
                    self.lab
                        .sh(host, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?,
                )?;
            }
        }
        // It holds the TSIG secret: the data center refuses it unless only its owner may read.
        std::fs::write(dir.join("datacenter.toml"), config)?;
        std::fs::set_permissions(
            dir.join("datacenter.toml"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )?;
        let mut serve = self.lab.command(host, &dc);
        serve.arg("--dir").arg(&dir).arg("serve");
        self.dc_pid = self.lab.spawn_until(serve, "ready:", STEP)?.0;
        if self.layout == (Layout::Office { remote: true }) {
            self.start_site()?;
        }
        Ok(())
    }

    fn dc2_dir(&self) -> PathBuf {
        self.dir().join("dc2")
    }

    /// Starts `lbs-datacenter site` on dc2 (the second site's endpoint); what its `ready:`
    /// line said after the prefix ("site dc2, endpoints dc2, 2 peers from the cache").
    pub fn start_site(&mut self) -> anyhow::Result<String> {
        let mut site = self.lab.command("dc2", workspace_binary("lbs-datacenter"));
        site.arg("--dir").arg(self.dc2_dir()).arg("site");
        let (_, said) = self.lab.spawn_until(site, "ready:", STEP)?;
        Ok(said)
    }

    /// `lbs-datacenter --dir <dc1's> <args>` (the provider's CLI); its standard output.
    pub fn datacenter(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(workspace_binary("lbs-datacenter"))
            .arg("--dir")
            .arg(self.dc_dir())
            .args(args)
            .output()?;
        checked(out).with_context(|| format!("lbs-datacenter {}", args.join(" ")))
    }

    /// `lbs-datacenter --dir <dc1's> <args>` with `input` on its standard input (a password
    /// for `user add --password-stdin`); its standard output.
    pub fn datacenter_with_input(&self, args: &[&str], input: &str) -> anyhow::Result<String> {
        use std::io::Write;
        let mut child = Command::new(workspace_binary("lbs-datacenter"))
            .arg("--dir")
            .arg(self.dc_dir())
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.as_bytes())?;
        }
        checked(child.wait_with_output()?)
            .with_context(|| format!("lbs-datacenter {}", args.join(" ")))
    }

    /// Provisions a pair at the data center: its two SIDs and activation keys.
    pub fn provision(&self, name: &str, fqdn: &str) -> anyhow::Result<Vec<(ServerId, String)>> {
        let sheet =
            self.datacenter(&["provision-pair", "--name", name, "--fqdn", fqdn, "--json"])?;
        let sids = provisioned(&sheet);
        if sids.len() != 2 {
            bail!("provision-pair printed {} SIDs:\n{sheet}", sids.len());
        }
        Ok(sids)
    }

    /// Another machine on the office LAN at `ip` (a stranger, an intruder).
    pub fn add_office_host(&mut self, host: &str, ip: &str) -> anyhow::Result<()> {
        self.lab.connect(host, "eth0", "lan", &format!("{ip}/24"))?;
        checked(
            self.lab
                .sh(host, &["ip", "route", "add", "default", "via", GATEWAY])?,
        )
        .map(drop)
    }

    /// The usual start of a scenario: the primary gets its PBX data, both boxes activate
    /// (primary first), both agents start, and the backup's first full sync completes.
    pub fn bring_up_pair(&mut self) -> anyhow::Result<()> {
        self.load_media("primary")?;
        self.activate("primary", 0)?;
        self.activate("backup", 1)?;
        self.start_agent("primary")?;
        self.start_agent("backup")?;
        self.wait_in_sync("backup", "primary")
    }

    /// `lbs activate` on `host` with the `n`th provisioned SID.
    pub fn activate(&mut self, host: &str, n: usize) -> anyhow::Result<String> {
        let (sid, key) = self.sids.get(n).context("no such SID")?.clone();
        self.activate_as(host, sid, &key)
    }

    /// `lbs activate` on `host` with this SID and key.
    pub fn activate_as(&mut self, host: &str, sid: ServerId, key: &str) -> anyhow::Result<String> {
        // From a file, as the README says (a key on the command line shows in `ps`).
        let key_file = self.dir().join(format!("{host}.activation-key"));
        std::fs::write(&key_file, format!("{key}\n"))?;
        let lbs = workspace_binary("lbs");
        let mut cmd = self.lab.command(host, &lbs);
        cmd.args(["activate", "--sid", &sid.to_string(), "--key-file"])
            .arg(&key_file)
            .args(["--datacenter", &format!("{}:7440", self.dc_host().1)])
            .arg("--ca")
            .arg(self.dc_dir().join("ca.pem"))
            .arg("--state")
            .arg(self.state(host));
        checked(self.lab.run(cmd, STEP)?)
    }

    /// Starts `host`'s agent; waits for its `ready:` line; its pid.
    pub fn start_agent(&mut self, host: &str) -> anyhow::Result<u32> {
        let cmd = self.agent_command(host);
        let (pid, _) = self.lab.spawn_until(cmd, "ready:", STEP)?;
        self.agents.push((host.to_owned(), pid));
        Ok(pid)
    }

    /// `lbs agent` for `host` with its configuration, state and socket (more arguments may
    /// follow); its log goes to [`Office::agent_log`].
    pub fn agent_command(&self, host: &str) -> Command {
        let lbs = workspace_binary("lbs");
        // Its log goes to a file of its own (shown if the test fails, see Drop), so that what
        // each agent said can be checked.
        let mut cmd = self.lab.command(host, "sh");
        cmd.args(["-c", "exec \"$0\" \"$@\" 2>>\"$LBS_AGENT_LOG\""])
            .arg(&lbs)
            .arg("agent")
            .arg("--config")
            .arg(self.dir().join(host).join("agent.toml"))
            .arg("--state")
            .arg(self.state(host))
            .arg("--socket")
            .arg(self.socket(host))
            .env("LBS_AGENT_LOG", self.agent_log(host));
        self.with_clock(host, &mut cmd);
        cmd
    }

    /// Where `host`'s agent logs (every start appends).
    pub fn agent_log(&self, host: &str) -> PathBuf {
        self.dir().join(host).join("agent.log")
    }

    /// What `host`'s agent logged so far.
    pub fn agent_said(&self, host: &str) -> String {
        std::fs::read_to_string(self.agent_log(host)).unwrap_or_default()
    }

    /// Stops `host`'s agent with SIGTERM (it must exit 0).
    pub fn stop_agent(&mut self, host: &str) -> anyhow::Result<()> {
        let pid = self.agent_pid(host)?;
        let status = self.lab.stop(pid, STEP)?;
        self.agents.retain(|(_, p)| *p != pid);
        if !status.success() {
            bail!("{host}'s agent exited with {status}");
        }
        Ok(())
    }

    /// kill -9 of `host`'s agent alone (its PBX, addresses and state stay as they are).
    pub fn kill_agent(&mut self, host: &str) -> anyhow::Result<()> {
        let pid = self.agent_pid(host)?;
        self.lab.kill(pid)?;
        self.agents.retain(|(_, p)| *p != pid);
        Ok(())
    }

    /// The pid of `host`'s agent.
    pub fn agent_pid(&self, host: &str) -> anyhow::Result<u32> {
        self.agents
            .iter()
            .rev()
            .find(|(h, _)| h == host)
            .map(|(_, pid)| *pid)
            .with_context(|| format!("{host}'s agent is not running"))
    }

    /// `host` dies: every process in it stops dead (its agent, its PBX) and its switch port
    /// goes dark. Its kernel keeps its addresses, as a hung box would.
    pub fn power_off(&mut self, host: &str) -> anyhow::Result<()> {
        if self.agent_pid(host).is_ok() {
            self.kill_agent(host)?;
        }
        self.lab.kill_all_in(host)?;
        // /run does not survive a power cut: a stale pid file (its killed PBX perhaps not
        // reaped yet) told the PBX hook at boot that the PBX still ran (chaos seed 2807 run 95).
        let _ = std::fs::remove_file(self.dir().join(host).join("run/kamailio.pid"));
        self.lab.plug(host, false)
    }

    /// `host` boots again: its addresses forgotten, `lbs net boot-check` before the network,
    /// then the address its boot configuration holds, then its agent. What the boot check said.
    pub fn boot(&mut self, host: &str) -> anyhow::Result<String> {
        self.lab.sh(host, &["ip", "addr", "flush", "dev", "eth0"])?;
        self.lab.plug(host, true)?;
        let lbs = workspace_binary("lbs");
        let mut check = self.lab.command(host, &lbs);
        check
            .args(["net", "boot-check", "--config"])
            .arg(self.dir().join(host).join("agent.toml"))
            .arg("--state")
            .arg(self.state(host));
        let said = checked(self.lab.run(check, STEP)?)?;
        let boot =
            std::fs::read_to_string(self.dir().join(host).join("boot/etc/network/interfaces"))?;
        let address = boot
            .lines()
            .find_map(|l| l.trim().strip_prefix("address "))
            .context("no address in the boot configuration")?
            .trim()
            .to_owned();
        self.lab
            .sh(host, &["ip", "addr", "add", &address, "dev", "eth0"])?;
        self.lab.sh(host, &["ip", "link", "set", "eth0", "up"])?;
        self.lab
            .sh(host, &["ip", "route", "replace", "default", "via", GATEWAY])?;
        self.start_agent(host)?;
        Ok(said)
    }

    /// `host`'s own `/metrics` (`metrics_listen`, on its loopback), read with curl inside it.
    pub fn box_metrics(&mut self, host: &str) -> anyhow::Result<String> {
        let url = format!("http://{BOX_METRICS}/metrics");
        checked(self.lab.sh(
            host,
            &["curl", "--silent", "--show-error", "--max-time", "5", &url],
        )?)
    }

    /// The portal on dc1 forwarded to this machine's loopback (7443 if free): its address
    /// stays reachable from the host while the forward lives.
    pub fn portal_forward(&self) -> anyhow::Result<crate::netns::Forward> {
        let target = std::net::SocketAddr::from((DC1.parse::<std::net::Ipv4Addr>()?, PORTAL_PORT));
        crate::netns::Forward::start(&self.lab.ns("dc1"), target, &[PORTAL_PORT])
    }

    /// `lbs status --json` of `host`.
    pub fn status(&mut self, host: &str) -> anyhow::Result<serde_json::Value> {
        let out = self.lbs(host, &["status", "--json"])?;
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// `lbs <args> --socket <host's>` in `host`; its output whatever the exit status.
    pub fn lbs(&mut self, host: &str, args: &[&str]) -> anyhow::Result<Output> {
        let lbs = workspace_binary("lbs");
        let mut cmd = self.lab.command(host, &lbs);
        cmd.args(args).arg("--socket").arg(self.socket(host));
        self.lab.run(cmd, STEP)
    }

    /// **P** (`lbs promote --yes`) on `host`: when it was pressed (ms since the epoch) and
    /// what it printed; an error if it was refused.
    pub fn promote(&mut self, host: &str) -> anyhow::Result<(u64, String)> {
        let pressed = now_ms();
        let out = self.lbs(host, &["promote", "--yes"])?;
        Ok((pressed, checked(out)?))
    }

    /// **B** (`lbs demote --yes`) on `host`, until in sync; what it printed.
    pub fn demote(&mut self, host: &str) -> anyhow::Result<String> {
        let out = self.lbs(host, &["demote", "--yes"])?;
        checked(out)
    }

    /// Waits until every set of the backup `backup` is in sync, then checks each against
    /// the primary's by BLAKE3 and metadata (`lbs sync verify`).
    pub fn wait_in_sync(&mut self, backup: &str, primary: &str) -> anyhow::Result<()> {
        self.wait("the backup to be in sync", STEP, |office| {
            let status = office.status(backup)?;
            let sets = status["sets"].as_array().cloned().unwrap_or_default();
            Ok(!sets.is_empty() && sets.iter().all(|s| s["state"] == "in sync"))
        })?;
        let lbs = workspace_binary("lbs");
        for (name, _) in SETS {
            let out = Command::new(&lbs)
                .args(["sync", "verify"])
                .arg(self.set_dir(primary, name))
                .arg(self.set_dir(backup, name))
                .output()?;
            checked(out).with_context(|| format!("set {name} differs"))?;
        }
        Ok(())
    }

    /// Waits until the data center has not heard `backup`'s partner for 2 s (the
    /// configuration's `primary_gone_after_s`), so that P may proceed.
    pub fn wait_primary_gone(&mut self, backup: &str) -> anyhow::Result<()> {
        self.wait(
            "the data center to lose the primary for 2 s",
            STEP,
            |office| {
                Ok(office.status(backup)?["info"]["partner"]["silent_ms"]
                    .as_u64()
                    .is_some_and(|ms| ms >= 2_000))
            },
        )
    }

    /// RPO: writes a fresh voicemail (number `n`) on `primary` and waits until it is on
    /// `backup`, whole (the sync engine only ever shows a verified version); the ms between.
    pub fn measure_rpo(&mut self, primary: &str, backup: &str, n: u8) -> anyhow::Result<u64> {
        let name = format!("default/1234/INBOX/msg01{n:02}.wav");
        let message = generated_audio(100u8.wrapping_add(n), 120_000);
        let written = now_ms();
        let path = self.set_dir(primary, "voicemail").join(&name);
        std::fs::create_dir_all(path.parent().context("a voicemail has a folder")?)?;
        std::fs::write(&path, &message)?;
        let target = self.set_dir(backup, "voicemail").join(&name);
        self.wait("the fresh voicemail on the backup", STEP, |_| {
            Ok(std::fs::read(&target).is_ok_and(|c| c == message))
        })?;
        Ok(now_ms().saturating_sub(written))
    }

    /// The primary `dead` dies (see [`Office::power_off`]); once the data center has lost it,
    /// **P** on `survivor`. The RTO (P pressed → the phone's first answer after it, in ms) and
    /// what P printed.
    pub fn fail_over(&mut self, dead: &str, survivor: &str) -> anyhow::Result<(u64, String)> {
        self.power_off(dead)?;
        self.wait_primary_gone(survivor)?;
        let (pressed, said) = self.promote_primary_gone(survivor)?;
        let answered = self.first_answer_after(pressed, STEP)?;
        Ok((answered.saturating_sub(pressed), said))
    }

    /// Polls `done` every 50 ms until it says yes; an error after `timeout`.
    pub fn wait(
        &mut self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&mut Office) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if done(self)? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{what}: not within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Office {
    fn drop(&mut self) {
        // A failing test shows what the agents said.
        if std::thread::panicking() {
            for host in self.boxes() {
                let said = self.agent_said(host);
                let tail: Vec<&str> = said.lines().rev().take(60).collect();
                eprintln!("--- {host}'s agent, last lines:");
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        boxes::unmount(&self.mounts);
    }
}

/// Runs a command that must succeed.
fn run_ok(cmd: &mut Command) -> anyhow::Result<()> {
    checked(cmd.output().with_context(|| format!("running {cmd:?}"))?).map(drop)
}

/// A command's standard output, or an error with everything it said.
fn checked(out: Output) -> anyhow::Result<String> {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "failed ({}):\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}
