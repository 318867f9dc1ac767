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

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use lbs_protocol::ServerId;

use crate::netns::Lab;
use crate::{provisioned, workspace_binary};

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

/// The office, running.
#[derive(Debug)]
pub struct Office {
    /// The namespaces and the processes in them.
    pub lab: Lab,
    tmp: tempfile::TempDir,
    /// The pair's SIDs and activation keys, in provisioning order.
    pub sids: Vec<(ServerId, String)>,
    agents: Vec<(String, u32)>,
    phone: Option<(u32, PathBuf)>,
    /// The small disks mounted (see [`Office::limit_disk`]), unmounted on drop.
    mounts: Vec<PathBuf>,
    /// The backup is at another site (see [`Office::start_remote`]).
    remote: bool,
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
        Office::build(false)
    }

    /// Like [`Office::start`], but the backup is at another site: a second office LAN
    /// (`192.168.2.0/24`, the backup at .3) behind the same router. The boxes reach each other
    /// and replicate through the data center's WireGuard endpoint on `dc1` (the overlay);
    /// the backup has no `[network]` section: on P it keeps its own address and the data
    /// center moves the pair's name to it.
    pub fn start_remote() -> anyhow::Result<Office> {
        Office::build(true)
    }

    fn build(remote: bool) -> anyhow::Result<Office> {
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
        let tmp = tempfile::tempdir()?;
        let mut office = Office {
            lab,
            tmp,
            sids: Vec::new(),
            agents: Vec::new(),
            phone: None,
            mounts: Vec::new(),
            remote,
        };
        office.start_bind()?;
        office.start_datacenter()?;
        for host in BOXES {
            office.write_box(host)?;
        }
        Ok(office)
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

    fn socket(&self, host: &str) -> PathBuf {
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

    fn dc_dir(&self) -> PathBuf {
        self.dir().join("dc1")
    }

    fn start_bind(&mut self) -> anyhow::Result<()> {
        let dir = self.dir().join("bind");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("zone"),
            format!(
                "$TTL 60\n@ IN SOA ns.{ZONE}. hostmaster.{ZONE}. 1 60 60 600 60\n@ IN NS ns.{ZONE}.\nns IN A {DC1}\n"
            ),
        )?;
        std::fs::write(
            dir.join("named.conf"),
            format!(
                "options {{ directory \"{d}\"; pid-file \"{d}/named.pid\"; listen-on port 53 {{ {DC1}; }}; listen-on-v6 {{ none; }}; recursion no; dnssec-validation no; }};\n\
                 controls {{ }};\n\
                 key \"lbs-dc\" {{ algorithm hmac-sha256; secret \"{TSIG_BASE64}\"; }};\n\
                 zone \"{ZONE}\" {{ type primary; file \"{d}/zone\"; allow-update {{ key \"lbs-dc\"; }}; }};\n",
                d = dir.display()
            ),
        )?;
        // `named -g` logs to stderr; the first line on stdout would never come, so a shell
        // says "named" and then becomes it.
        let mut named = self.lab.command("dc1", "sh");
        named.args([
            "-c",
            &format!(
                "echo named; exec named -g -c '{}' 2>'{}'",
                dir.join("named.conf").display(),
                dir.join("named.log").display()
            ),
        ]);
        self.lab.spawn_until(named, "named", STEP)?;
        self.wait("BIND to answer for the zone", STEP, |office| {
            Ok(office.dig(&format!("ns.{ZONE}"))? == [DC1])
        })
    }

    fn start_datacenter(&mut self) -> anyhow::Result<()> {
        let dc = workspace_binary("lbs-datacenter");
        let dir = self.dc_dir();
        self.datacenter(&["init"])?;
        self.sids = self.provision("acme", FQDN)?;
        let mut config = format!(
            "activation = [\"{DC1}:7440\"]\ncontrol = [\"0.0.0.0:7441\"]\n\n[dns]\nserver = \"{DC1}:53\"\nzone = \"{ZONE}\"\nkey_name = \"lbs-dc\"\nsecret = \"{TSIG_BASE64}\"\nttl = 60\n"
        );
        if self.remote {
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
        let mut serve = self.lab.command("dc1", &dc);
        serve.arg("--dir").arg(&dir).arg("serve");
        self.lab.spawn_until(serve, "ready:", STEP)?;
        if self.remote {
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

    /// Provisions a pair at the data center: its two SIDs and activation keys.
    pub fn provision(&self, name: &str, fqdn: &str) -> anyhow::Result<Vec<(ServerId, String)>> {
        let sheet = self.datacenter(&["provision-pair", "--name", name, "--fqdn", fqdn])?;
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

    /// A box's configuration: the default sets under its root, the office network, the PBX
    /// hooks starting and stopping kamailio on the shared address, and its boot configuration.
    fn write_box(&self, host: &str) -> anyhow::Result<()> {
        let dir = self.dir().join(host);
        for (_, rel) in SETS {
            std::fs::create_dir_all(self.root(host).join(rel))?;
        }
        let run = dir.join("run");
        std::fs::create_dir_all(&run)?;
        let boot = dir.join("boot");
        std::fs::create_dir_all(boot.join("etc/network"))?;
        let own = if host == "primary" { SHARED } else { OWN };
        std::fs::write(
            boot.join("etc/network/interfaces"),
            format!("auto eth0\niface eth0 inet static\n\taddress {own}/24\n\tgateway {GATEWAY}\n"),
        )?;
        // The PBX listens where the box serves as primary: the shared address, or a remote
        // backup's own.
        let serve_at = if self.remote && host == "backup" {
            REMOTE_BACKUP
        } else {
            SHARED
        };
        std::fs::write(
            run.join("kamailio.cfg"),
            format!(
                "#!KAMAILIO\n\
                 debug=1\nlog_stderror=yes\nchildren=1\nauto_aliases=no\n\
                 listen=udp:{serve_at}:5060\n\
                 mpath=\"/usr/lib/x86_64-linux-gnu/kamailio/modules/\"\n\
                 loadmodule \"sl.so\"\nloadmodule \"usrloc.so\"\nloadmodule \"registrar.so\"\n\
                 request_route {{\n\
                 \tif (method==\"OPTIONS\") {{ sl_send_reply(\"200\", \"OK\"); exit; }}\n\
                 \tif (method==\"REGISTER\") {{ if (!save(\"location\")) {{ sl_reply_error(); }} exit; }}\n\
                 \tsl_send_reply(\"404\", \"Not here\");\n\
                 }}\n"
            ),
        )?;
        let pid = run.join("kamailio.pid");
        std::fs::write(
            run.join("pbx-start"),
            format!(
                "#!/bin/sh\n\
                 # The PBX's SIP service on the shared address (what `systemctl start asterisk` does on a box).\n\
                 pid=$(cat '{pid}' 2>/dev/null) && kill -0 \"$pid\" 2>/dev/null && exit 0\n\
                 exec kamailio -f '{cfg}' -P '{pid}' -Y '{run}' >>'{run}/kamailio.log' 2>&1\n",
                pid = pid.display(),
                cfg = run.join("kamailio.cfg").display(),
                run = run.display()
            ),
        )?;
        std::fs::write(
            run.join("pbx-stop"),
            format!(
                "#!/bin/sh\n\
                 pid=$(cat '{pid}' 2>/dev/null) || exit 0\n\
                 kill \"$pid\" 2>/dev/null || {{ rm -f '{pid}'; exit 0; }}\n\
                 for i in $(seq 50); do kill -0 \"$pid\" 2>/dev/null || {{ rm -f '{pid}'; exit 0; }}; sleep 0.1; done\n\
                 kill -9 \"$pid\"; rm -f '{pid}'\n",
                pid = pid.display()
            ),
        )?;
        let sets: String = SETS
            .iter()
            .map(|(name, rel)| {
                format!(
                    "[[set]]\nname = \"{name}\"\npath = \"{}\"\n",
                    self.root(host).join(rel).display()
                )
            })
            .collect();
        std::fs::write(
            dir.join("agent.toml"),
            format!(
                "report_interval_s = 1\ndebounce_ms = 100\ntunnels = {remote}\n\
                 sync_over = \"{over}\"\nastdb = \"\"\n\
                 primary_gone_after_s = 2\n\
                 pbx_start = \"sh {run}/pbx-start\"\npbx_stop = \"sh {run}/pbx-stop\"\n\
                 promote_note = \"move the PRI cable to this box\"\n\n{sets}\n{network}",
                remote = self.remote,
                over = if self.remote { "overlay" } else { "lan" },
                run = run.display(),
                network = if self.remote && host == "backup" {
                    String::new()
                } else {
                    format!(
                        "[network]\ninterface = \"eth0\"\nshared = \"{SHARED}/24\"\nown = \"{OWN}/24\"\n\
                         gateway = \"{GATEWAY}\"\nboot_config = \"{}\"\n",
                        boot.display()
                    )
                }
            ),
        )?;
        Ok(())
    }

    /// Gives `host` a PBX's data: Debian's real Asterisk prompts (`asterisk-core-sounds-en-wav`)
    /// as custom prompts, its real music on hold (`asterisk-moh-opsound-wav`), a small
    /// configuration and a few generated voicemails. The bytes written.
    pub fn load_media(&self, host: &str) -> anyhow::Result<u64> {
        let mut bytes = copy_tree(
            Path::new("/usr/share/asterisk/sounds"),
            &self.set_dir(host, "prompts"),
        )
        .context("the Asterisk prompts (apt-get install asterisk-core-sounds-en-wav)")?;
        bytes += copy_tree(
            Path::new("/usr/share/asterisk/moh"),
            &self.set_dir(host, "moh"),
        )
        .context("the music on hold (apt-get install asterisk-moh-opsound-wav)")?;
        let config = self.set_dir(host, "config");
        for (name, text) in [
            (
                "pjsip.conf",
                "[transport-udp]\ntype=transport\nprotocol=udp\nbind=192.168.1.2\n",
            ),
            (
                "extensions.conf",
                "[office]\nexten => 1234,1,VoiceMail(1234@default)\n",
            ),
            ("voicemail.conf", "[default]\n1234 => 4242,Reception\n"),
        ] {
            std::fs::write(config.join(name), text)?;
            bytes += text.len() as u64;
        }
        let inbox = self.set_dir(host, "voicemail").join("default/1234/INBOX");
        std::fs::create_dir_all(&inbox)?;
        for n in 0..3u8 {
            let message = generated_audio(n, 80_000);
            std::fs::write(inbox.join(format!("msg000{n}.wav")), &message)?;
            bytes += message.len() as u64;
        }
        Ok(bytes)
    }

    /// Gives `host`'s PBX data a disk of its own of `mb` MB (a tmpfs on its root, the sets'
    /// folders made again inside): the fault "the backup's disk is full". Call before the
    /// data arrives; [`Office::resize_disk`] gives space back.
    pub fn limit_disk(&mut self, host: &str, mb: u64) -> anyhow::Result<()> {
        let root = self.root(host);
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "lbs-lab-disk"])
                .arg(&root),
        )?;
        self.mounts.push(root.clone());
        for (_, rel) in SETS {
            std::fs::create_dir_all(root.join(rel))?;
        }
        Ok(())
    }

    /// The disk of [`Office::limit_disk`] grows (or shrinks) to `mb` MB, its data kept.
    pub fn resize_disk(&mut self, host: &str, mb: u64) -> anyhow::Result<()> {
        run_ok(
            Command::new("mount")
                .args(["-o", &format!("remount,size={mb}m")])
                .arg(self.root(host)),
        )
    }

    /// Limits what `host` sends on its office link to `mbit` Mb/s (a token bucket), so a
    /// large transfer takes as long as on a real office LAN.
    pub fn limit_rate(&mut self, host: &str, mbit: u32) -> anyhow::Result<()> {
        checked(self.lab.sh(
            host,
            &[
                "tc",
                "qdisc",
                "replace",
                "dev",
                "eth0",
                "root",
                "tbf",
                "rate",
                &format!("{mbit}mbit"),
                "burst",
                "64kb",
                "latency",
                "50ms",
            ],
        )?)
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
        let lbs = workspace_binary("lbs");
        let mut cmd = self.lab.command(host, &lbs);
        cmd.args(["activate", "--sid", &sid.to_string(), "--key", key])
            .args(["--datacenter", &format!("{DC1}:7440")])
            .arg("--ca")
            .arg(self.dc_dir().join("ca.pem"))
            .arg("--state")
            .arg(self.state(host));
        checked(self.lab.run(cmd, STEP)?)
    }

    /// Starts `host`'s agent; waits for its `ready:` line.
    pub fn start_agent(&mut self, host: &str) -> anyhow::Result<()> {
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
        let (pid, _) = self.lab.spawn_until(cmd, "ready:", STEP)?;
        self.agents.push((host.to_owned(), pid));
        Ok(())
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

    /// What BIND answers for `name` (asked from the phone, as a phone would).
    pub fn dig(&mut self, name: &str) -> anyhow::Result<Vec<String>> {
        let out = self.lab.sh(
            "phone",
            &[
                "dig",
                "+short",
                "+time=1",
                "+tries=1",
                &format!("@{DC1}"),
                name,
                "A",
            ],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with(';'))
            .map(str::to_owned)
            .collect())
    }

    /// Whether the PBX of `host` runs (its kamailio answers to its pid).
    pub fn pbx_running(&mut self, host: &str) -> bool {
        let pid = self.dir().join(host).join("run/kamailio.pid");
        std::fs::read_to_string(pid)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
    }

    /// The phone starts asking the PBX at the shared address (SIP OPTIONS, ten a second, each
    /// answered or given up after 400 ms), logging every answer with its time.
    pub fn start_phone(&mut self) -> anyhow::Result<()> {
        self.start_phone_at(SHARED)
    }

    /// The phone asks the PBX at `address` instead (a phone that followed the DNS name);
    /// the answers logged so far are kept.
    pub fn start_phone_at(&mut self, address: &str) -> anyhow::Result<()> {
        if let Some((pid, _)) = self.phone.take() {
            self.lab.kill(pid)?;
        }
        let dir = self.dir().join("phone");
        std::fs::create_dir_all(&dir)?;
        let scenario = dir.join("options.xml");
        std::fs::write(&scenario, OPTIONS_SCENARIO)?;
        let log = dir.join(format!("answers-{address}.log"));
        let mut phone = self.lab.command("phone", "sh");
        phone.args([
            "-c",
            &format!(
                "echo phone; exec sipp {address}:5060 -sf '{}' -i 192.168.1.10 -p 5070 -r 10 -m 100000 -trace_logs -log_file '{}' >/dev/null 2>'{}'",
                scenario.display(),
                log.display(),
                dir.join("sipp.err").display()
            ),
        ]);
        let (pid, _) = self.lab.spawn_until(phone, "phone", STEP)?;
        self.phone = Some((pid, log));
        Ok(())
    }

    /// The times (ms since the epoch) of every answer the phone got so far.
    pub fn phone_answers(&self) -> anyhow::Result<Vec<u64>> {
        self.phone.as_ref().context("the phone is not running")?;
        // Every address the phone asked, in one list.
        let mut text = String::new();
        for entry in std::fs::read_dir(self.dir().join("phone"))?.flatten() {
            if entry.file_name().to_string_lossy().starts_with("answers-") {
                text += &std::fs::read_to_string(entry.path()).unwrap_or_default();
            }
        }
        Ok(text
            .lines()
            .filter_map(|line| {
                // "answered <call> <seconds>.000000 <microseconds>.000000"
                let words: Vec<&str> = line.split_whitespace().collect();
                let [_, _, s, us] = words.as_slice() else {
                    return None;
                };
                let s: f64 = s.parse().ok()?;
                let us: f64 = us.parse().ok()?;
                Some((s * 1000.0 + us / 1000.0) as u64)
            })
            .collect())
    }

    /// The first answer the phone got after `since_ms`, waiting up to `timeout`.
    pub fn first_answer_after(&mut self, since_ms: u64, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(at) = self
                .phone_answers()?
                .into_iter()
                .filter(|at| *at > since_ms)
                .min()
            {
                return Ok(at);
            }
            if Instant::now() >= deadline {
                bail!("the phone got no answer within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
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
        let (pressed, said) = self.promote(survivor)?;
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

/// Audio-like bytes (a voicemail, a recording): `len` bytes that differ with `seed`.
pub fn generated_audio(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .rotate_left(u32::from(seed % 31)) as u8
        })
        .collect()
}

/// Copies the regular files under `from` to `to` (created), streamed; the bytes copied.
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<u64> {
    let mut bytes = 0;
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            bytes += copy_tree(&entry.path(), &target)?;
        } else if kind.is_file() {
            bytes += std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(bytes)
}

impl Drop for Office {
    fn drop(&mut self) {
        // A failing test shows what the agents said.
        if std::thread::panicking() {
            for host in BOXES {
                let said = self.agent_said(host);
                let tail: Vec<&str> = said.lines().rev().take(60).collect();
                eprintln!("--- {host}'s agent, last lines:");
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        // Lazily: the programs still running (stopped right after, by the lab) hold files.
        for mount in &self.mounts {
            let _ = Command::new("umount").arg("-l").arg(mount).status();
        }
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

/// One SIP OPTIONS per call; an answer is logged with the time it came.
const OPTIONS_SCENARIO: &str = r#"<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="options">
  <send>
    <![CDATA[
OPTIONS sip:[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:phone@[local_ip]>;tag=[pid]SIPpTag[call_number]
To: <sip:pbx@[remote_ip]:[remote_port]>
Call-ID: [call_id]
CSeq: 1 OPTIONS
Contact: <sip:phone@[local_ip]:[local_port]>
Max-Forwards: 70
Content-Length: 0

    ]]>
  </send>
  <recv response="200" timeout="400" ontimeout="lost">
    <action>
      <gettimeofday assign_to="s,us"/>
      <log message="answered [call_number] [$s] [$us]"/>
    </action>
  </recv>
  <label id="lost"/>
</scenario>
"#;
