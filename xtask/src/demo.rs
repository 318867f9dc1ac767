//! `cargo xtask demo`: builds lbs and shows what exists working, with a timeline.
//!
//! Today: a primary and a backup (two processes on loopback) complete a mutual-TLS `Hello`
//! exchange with certificates from a data-center CA, time heartbeats, and refuse a stranger
//! whose certificate is valid but names another box; the backup pulls the primary's PBX tree
//! and its changes; and, as root, in an office LAN of network namespaces, the backup takes
//! the dead primary's address while a phone keeps reaching it, then gives it back.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::process::{Server, checked, run_with_timeout};
use crate::util::{cargo, ensure_packages, is_root, run_step, seconds, target_dir};

const PRIMARY: &str = "00-1A-2B-3C-4D-5E";
const BACKUP: &str = "00-1A-2B-3C-4D-5F";
const STRANGER: &str = "66-77-88-99-AA-BB";
/// The longest any single demo step may take before the demo gives up on it.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(clap::Args)]
pub struct DemoArgs {}

/// The steps and how long each took, printed at the end.
struct Timeline {
    started: Instant,
    steps: Vec<(String, Duration)>,
}

impl Timeline {
    fn step<T>(&mut self, name: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
        println!("\n--- {name}");
        let started = Instant::now();
        let result = f().with_context(|| format!("demo step {name:?}"))?;
        self.steps.push((name.to_owned(), started.elapsed()));
        Ok(result)
    }

    fn print(&self) {
        println!("\n=== timeline");
        let mut at = Duration::ZERO;
        for (name, took) in &self.steps {
            println!("  +{:>8}  {:>8}  {name}", seconds(at), seconds(*took));
            at += *took;
        }
        println!("  total {}", seconds(self.started.elapsed()));
    }
}

pub fn run(_args: &DemoArgs) -> anyhow::Result<()> {
    let mut timeline = Timeline {
        started: Instant::now(),
        steps: Vec::new(),
    };
    timeline.step("build lbs", || {
        run_step(
            "cargo build",
            cargo().args(["build", "--locked", "--workspace", "--bins"]),
        )
    })?;
    let hello = target_dir().join("debug").join("lbs-hello");
    let dir = target_dir().join("demo");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }

    timeline.step(
        "data-center CA issues identities for the pair (and a stranger)",
        || {
            let out = checked_step(
                Command::new(&hello)
                    .args(["issue", "--dir"])
                    .arg(&dir)
                    .args(["--box", &format!("primary={PRIMARY}")])
                    .args(["--box", &format!("backup={BACKUP}")])
                    .args(["--box", &format!("stranger={STRANGER}")]),
            )?;
            indent(&out.stdout);
            Ok(())
        },
    )?;

    let mut server = timeline.step("primary starts serving its partner only", || {
        Server::start(
            peer(&hello, &dir, "serve", "primary", BACKUP).args([
                "--role",
                "primary",
                "--listen",
                "127.0.0.1:0",
            ]),
            |line| line.strip_prefix("listening on "),
            STEP_TIMEOUT,
        )
    })?;
    let addr = server.addr.clone();
    println!("    primary listening on {addr}, accepting only box {BACKUP}");

    timeline.step("backup connects: mutual TLS, hello, heartbeats", || {
        let out = checked_step(peer(&hello, &dir, "dial", "backup", PRIMARY).args([
            "--role",
            "backup",
            "--connect",
            &addr,
        ]))?;
        indent(&out.stdout);
        Ok(())
    })?;

    timeline.step(
        "a stranger with a valid certificate for another box is refused",
        || {
            let out = run_with_timeout(
                peer(&hello, &dir, "dial", "stranger", PRIMARY).args([
                    "--role",
                    "backup",
                    "--connect",
                    &addr,
                ]),
                STEP_TIMEOUT,
            )?;
            if out.status.success() {
                bail!("the stranger was accepted: the partner check is broken");
            }
            indent(&out.stderr);
            Ok(())
        },
    )?;

    timeline.step("primary stops on SIGTERM and reports what it saw", || {
        let lines = server.stop()?;
        for line in lines {
            println!("    {line}");
        }
        Ok(())
    })?;

    sync_steps(&mut timeline, &dir)?;
    if is_root() {
        // ip and ping, installed with apt-get when missing (the same list as the tests').
        let missing = ensure_packages(crate::test::SYSTEM_PACKAGES, true)?;
        if !missing.is_empty() {
            bail!("the network takeover steps need {}", missing.join(" "));
        }
        network_steps(&mut timeline, &dir)?;
    } else {
        println!("\n--- the network takeover needs root (network namespaces): skipped");
    }

    timeline.print();
    println!(
        "\nWhat exists today: the protocol (mutual TLS, hello, heartbeats), the sync engine \
         (lbs sync), the network takeover (lbs net), the tunnels to two data-center endpoints \
         (lbs vpn), the data center (lbs-datacenter: activation, roles, DNS) and the agent \
         (lbs activate, lbs agent, lbs status, lbs promote, lbs demote, lbs console, \
         lbs net boot-check; automatic failover with auto_failover = true; promotion \
         requested from the data center with lbs-datacenter promote). The SIP phone and PBX, \
         and the RTO/RPO figures join with issue 9."
    );
    Ok(())
}

/// The office LAN in network namespaces, removed (with anything still running in them) when
/// dropped: only namespaces with this demo's own prefix.
struct Office {
    prefix: String,
    made: Vec<String>,
}

impl Office {
    fn ns(&self, host: &str) -> String {
        format!("{}{host}", self.prefix)
    }

    fn ip(args: &[&str]) -> anyhow::Result<()> {
        checked(Command::new("ip").args(args), STEP_TIMEOUT)?;
        Ok(())
    }

    fn add(&mut self, host: &str) -> anyhow::Result<String> {
        let ns = self.ns(host);
        Office::ip(&["netns", "add", &ns])?;
        self.made.push(ns.clone());
        Office::ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A LAN (a bridge) and the gateway .1, the primary .2, the backup .3, a phone .10.
    fn build() -> anyhow::Result<Office> {
        let mut office = Office {
            prefix: format!("lbsdemo{}-", std::process::id()),
            made: Vec::new(),
        };
        let lan = office.add("lan")?;
        Office::ip(&["-n", &lan, "link", "add", "br0", "type", "bridge"])?;
        Office::ip(&["-n", &lan, "link", "set", "br0", "up"])?;
        for (port, (host, cidr)) in [
            ("gw", "192.168.1.1/24"),
            ("primary", "192.168.1.2/24"),
            ("backup", "192.168.1.3/24"),
            ("phone", "192.168.1.10/24"),
            // The two data-center endpoints, on the same segment for the demo.
            ("dc1", "192.168.1.201/24"),
            ("dc2", "192.168.1.202/24"),
        ]
        .into_iter()
        .enumerate()
        {
            let ns = office.add(host)?;
            let port = format!("port{port}");
            Office::ip(&[
                "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port,
                "netns", &lan,
            ])?;
            Office::ip(&["-n", &lan, "link", "set", &port, "master", "br0", "up"])?;
            Office::ip(&["-n", &ns, "addr", "add", cidr, "dev", "eth0"])?;
            Office::ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            if host != "gw" {
                Office::ip(&["-n", &ns, "route", "add", "default", "via", "192.168.1.1"])?;
            }
        }
        Ok(office)
    }

    /// Whether `host` gets an answer from `address` (one ping, 2 s).
    fn reaches(&self, host: &str, address: &str) -> anyhow::Result<bool> {
        let out = self.run(host, Path::new("ping"), &["-c", "1", "-W", "2", address])?;
        Ok(out.status.success())
    }

    fn run(&self, host: &str, program: &Path, args: &[&str]) -> anyhow::Result<Output> {
        run_with_timeout(
            Command::new("ip")
                .args(["netns", "exec", &self.ns(host)])
                .arg(program)
                .args(args),
            STEP_TIMEOUT,
        )
    }
}

impl Drop for Office {
    fn drop(&mut self) {
        for ns in self.made.iter().rev() {
            // Processes still inside: only ours run there (every one was waited for).
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// The backup takes the dead primary's address, the phone follows, and the address goes back.
fn network_steps(timeline: &mut Timeline, dir: &Path) -> anyhow::Result<()> {
    let lbs = target_dir().join("debug").join("lbs");
    let office = timeline.step(
        "office LAN in namespaces: gateway .1, primary .2, backup .3, phone .10",
        Office::build,
    )?;
    timeline.step("the phone calls the primary (ping 192.168.1.2)", || {
        if !office.reaches("phone", "192.168.1.2")? {
            bail!("the phone cannot reach the primary");
        }
        Ok(())
    })?;
    vpn_steps(timeline, &office, dir, &lbs)?;
    pair_steps(timeline, &office, dir, &lbs)?;
    drop(office);
    Ok(())
}

/// The text after `ready: ` in a server's first line.
fn ready(line: &str) -> Option<&str> {
    line.strip_prefix("ready: ")
}

/// The primary's tunnels to both data centers, and a failover when dc1's line is cut.
fn vpn_steps(
    timeline: &mut Timeline,
    office: &Office,
    dir: &Path,
    lbs: &Path,
) -> anyhow::Result<()> {
    let vpn = dir.join("vpn");
    std::fs::create_dir_all(&vpn)?;
    let keygen = |name: &str| -> anyhow::Result<String> {
        let path = vpn.join(format!("{name}.key"));
        let _ = std::fs::remove_file(&path);
        let out = checked(
            Command::new(lbs).args(["vpn", "keygen"]).arg(&path),
            STEP_TIMEOUT,
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let in_ns = |host: &str, args: &[&str]| {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &office.ns(host)])
            .arg(lbs)
            .args(args);
        cmd
    };
    let (mut endpoints, publics) = timeline.step(
        "data centers dc1 and dc2 start their WireGuard endpoints",
        || {
            let primary = keygen("primary")?;
            let mut servers = Vec::new();
            let mut publics = Vec::new();
            for n in [1, 2] {
                publics.push(keygen(&format!("dc{n}"))?);
                let config = vpn.join(format!("dc{n}.toml"));
                std::fs::write(
                    &config,
                    format!(
                        "private_key_file = \"dc{n}.key\"\ninterface = \"lbs-ep\"\nlisten_port = 51820\naddress = \"10.77.255.{n}/16\"\nservice_addresses = [\"10.77.0.1/32\"]\n\n[[peer]]\npublic_key = \"{primary}\"\naddress = \"10.77.0.5\"\n"
                    ),
                )?;
                let config = config.to_string_lossy().into_owned();
                let server = Server::start(
                    &mut in_ns(&format!("dc{n}"), &["vpn", "endpoint", "--config", &config]),
                    ready,
                    STEP_TIMEOUT,
                )?;
                println!("    dc{n}: {}", server.addr);
                servers.push(server);
            }
            Ok((servers, publics))
        },
    )?;
    let status_file = vpn.join("primary-vpn.json");
    let mut tunnels = timeline.step(
        "the primary brings up a tunnel to each, heartbeats every 200 ms",
        || {
            let mut config = String::from(
                "private_key_file = \"primary.key\"\naddress = \"10.77.0.5\"\ninterface_prefix = \"lbs-dc\"\n",
            );
            for (public, n) in publics.iter().zip(1..) {
                config += &format!(
                    "\n[[endpoint]]\nname = \"dc{n}\"\npublic_key = \"{}\"\nendpoint = \"192.168.1.20{n}:51820\"\naddress = \"10.77.255.{n}\"\nprefix = \"10.77.0.0/16\"\n",
                    public
                );
            }
            let path = vpn.join("primary.toml");
            std::fs::write(&path, config)?;
            let path = path.to_string_lossy().into_owned();
            let status = status_file.to_string_lossy().into_owned();
            let mut server = Server::start(
                &mut in_ns("primary", &["vpn", "run", "--config", &path, "--status-file", &status]),
                ready,
                STEP_TIMEOUT,
            )?;
            println!("    {}", server.addr);
            println!("    {}", server.wait_line("route: overlay via dc1", STEP_TIMEOUT)?);
            Ok(server)
        },
    )?;
    timeline.step(
        "the primary reaches the data center (ping 10.77.0.1)",
        || {
            if !office.reaches("primary", "10.77.0.1")? {
                bail!("no answer from the data center through the tunnel");
            }
            Ok(())
        },
    )?;
    timeline.step(
        "dc1's line is cut: the primary's traffic moves to dc2",
        || {
            let cut = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis();
            // dc1 is the LAN's fifth port (gw, primary, backup, phone, dc1, dc2).
            Office::ip(&["-n", &office.ns("lan"), "link", "set", "port4", "down"])?;
            let line = tunnels.wait_line("route: overlay via dc2", Duration::from_secs(5))?;
            let at: u128 = line
                .rsplit_once(" at ")
                .and_then(|(_, at)| at.parse().ok())
                .context("no time in the route line")?;
            println!("    {line}");
            println!("    moved {} ms after the cut", at.saturating_sub(cut));
            if !office.reaches("primary", "10.77.0.1")? {
                bail!("no answer from the data center through dc2");
            }
            Ok(())
        },
    )?;
    timeline.step(
        "tunnels and endpoints stop on SIGTERM, leaving nothing behind",
        || {
            tunnels.stop()?;
            for endpoint in &mut endpoints {
                endpoint.stop()?;
            }
            let links = checked(
                Command::new("ip").args(["-n", &office.ns("primary"), "-o", "link"]),
                STEP_TIMEOUT,
            )?;
            if String::from_utf8_lossy(&links.stdout).contains("lbs-dc") {
                bail!("a tunnel interface is left on the primary");
            }
            Office::ip(&["-n", &office.ns("lan"), "link", "set", "port4", "up"])
        },
    )?;
    Ok(())
}

/// The data center activates the pair; the agents replicate the primary's PBX data.
fn pair_steps(
    timeline: &mut Timeline,
    office: &Office,
    dir: &Path,
    lbs: &Path,
) -> anyhow::Result<()> {
    let datacenter = target_dir().join("debug").join("lbs-datacenter");
    let dc_dir = dir.join("datacenter");
    let boxes = dir.join("boxes");
    let in_ns = |host: &str, program: &Path| {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &office.ns(host)]).arg(program);
        cmd
    };
    let dc_cli = |args: &[&str]| -> anyhow::Result<String> {
        let out = checked(
            Command::new(&datacenter)
                .arg("--dir")
                .arg(&dc_dir)
                .args(args),
            STEP_TIMEOUT,
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (mut dc, sheet) = timeline.step(
        "the data center (dc1) provisions the pair and serves activations",
        || {
            dc_cli(&["init"])?;
            let sheet = dc_cli(&[
                "provision-pair",
                "--name",
                "acme",
                "--fqdn",
                "pbx.acme.example",
            ])?;
            indent(sheet.as_bytes());
            std::fs::write(
                dc_dir.join("datacenter.toml"),
                "activation = [\"192.168.1.201:7440\"]\ncontrol = [\"192.168.1.201:7441\"]\n",
            )?;
            let mut serve = in_ns("dc1", &datacenter);
            serve.arg("--dir").arg(&dc_dir).arg("serve");
            let server = Server::start(&mut serve, ready, STEP_TIMEOUT)?;
            println!("    {}", server.addr);
            let sids: Vec<(String, String)> = sheet
                .lines()
                .filter_map(|line| {
                    let words: Vec<&str> = line.split_whitespace().collect();
                    match words.as_slice() {
                        ["SID", sid, "activation", "key", key, ..] => {
                            Some(((*sid).to_owned(), (*key).to_owned()))
                        }
                        _ => None,
                    }
                })
                .collect();
            if sids.len() != 2 {
                bail!("provision-pair printed {} SIDs", sids.len());
            }
            Ok((server, sids))
        },
    )?;
    let pbx = |host: &str| boxes.join(host).join("pbx");
    // Each box's boot configuration (ifupdown), under a root of its own: P and B keep it in
    // step with the address, and the returning primary's boot check reads it.
    let boot_file = |host: &str| boxes.join(host).join("boot/etc/network/interfaces");
    for (n, host) in ["primary", "backup"].into_iter().enumerate() {
        std::fs::create_dir_all(pbx(host))?;
        std::fs::create_dir_all(boxes.join(host).join("boot/etc/network"))?;
        std::fs::write(
            boot_file(host),
            format!(
                "auto eth0\niface eth0 inet static\n\taddress 192.168.1.{}/24\n\tgateway 192.168.1.1\n",
                n + 2
            ),
        )?;
        std::fs::write(
            boxes.join(host).join("agent.toml"),
            format!(
                "report_interval_s = 1\ntunnels = false\nastdb = \"\"\nprimary_gone_after_s = 2\npromote_note = \"move the PRI cable from the old primary to this box\"\n\n[[set]]\nname = \"pbx\"\npath = \"{}\"\n\n[network]\ninterface = \"eth0\"\nshared = \"192.168.1.2/24\"\nown = \"192.168.1.3/24\"\ngateway = \"192.168.1.1\"\nboot_config = \"{}\"\n",
                pbx(host).display(),
                boxes.join(host).join("boot").display()
            ),
        )?;
        let (sid, key) = &sheet[n];
        let title = if n == 0 {
            "the primary activates first: it becomes the PRIMARY"
        } else {
            "the backup activates second: it becomes the BACKUP"
        };
        timeline.step(title, || {
            if n == 0 {
                demo_tree(&pbx(host))?;
            }
            let mut activate = in_ns(host, lbs);
            activate
                .args(["activate", "--sid", sid, "--key", key])
                .args(["--datacenter", "192.168.1.201:7440", "--lan"])
                .arg(if n == 0 { "192.168.1.2" } else { "192.168.1.3" })
                .arg("--ca")
                .arg(dc_dir.join("ca.pem"))
                .arg("--state")
                .arg(boxes.join(host).join("state"));
            let out = checked(&mut activate, STEP_TIMEOUT)?;
            indent(&out.stdout);
            Ok(())
        })?;
    }
    let socket = |host: &str| boxes.join(host).join("agent.sock");
    let mut agents = timeline.step(
        "both agents start; the backup's first full sync over mutual TLS",
        || {
            let mut agents = Vec::new();
            for host in ["primary", "backup"] {
                let mut agent = in_ns(host, lbs);
                agent
                    .arg("agent")
                    .arg("--config")
                    .arg(boxes.join(host).join("agent.toml"))
                    .arg("--state")
                    .arg(boxes.join(host).join("state"))
                    .arg("--socket")
                    .arg(socket(host))
                    .env("RUST_LOG", "warn");
                let server = Server::start(&mut agent, ready, STEP_TIMEOUT)?;
                println!("    {host}: {}", server.addr);
                agents.push(server);
            }
            wait_until(STEP_TIMEOUT, || {
                identical(lbs, &pbx("primary"), &pbx("backup"))
            })?;
            Ok(agents)
        },
    )?;
    timeline.step(
        "a caller leaves a voicemail on the primary: on the backup, verified",
        || {
            let inbox = pbx("primary").join("voicemail/default/1234/INBOX");
            let written = Instant::now();
            std::fs::write(inbox.join("msg0003.wav"), vec![42u8; 200_000])?;
            wait_until(STEP_TIMEOUT, || {
                Ok(
                    std::fs::read(pbx("backup").join("voicemail/default/1234/INBOX/msg0003.wav"))
                        .is_ok_and(|c| c == vec![42u8; 200_000]),
                )
            })?;
            println!(
                "    on the backup {} ms after it was written (the RPO)",
                written.elapsed().as_millis()
            );
            Ok(())
        },
    )?;
    timeline.step("lbs status on the backup, lbs-datacenter status", || {
        let out = checked(
            in_ns("backup", lbs)
                .args(["status", "--socket"])
                .arg(socket("backup")),
            STEP_TIMEOUT,
        )?;
        indent(&out.stdout);
        indent(dc_cli(&["status"])?.as_bytes());
        Ok(())
    })?;
    let promote = |force_check: bool| -> anyhow::Result<Output> {
        let mut cmd = in_ns("backup", lbs);
        cmd.args(["promote", "--yes", "--socket"])
            .arg(socket("backup"));
        let out = run_with_timeout(&mut cmd, STEP_TIMEOUT)?;
        indent(&out.stdout);
        if force_check && !out.status.success() {
            bail!("the promotion failed");
        }
        Ok(out)
    };
    timeline.step(
        "while the primary lives, P on the backup is refused",
        || {
            let out = promote(false)?;
            if out.status.success() {
                bail!("the backup promoted itself while the primary lives");
            }
            Ok(())
        },
    )?;
    timeline.step(
        "the primary dies: its agent stops, its switch port goes dark",
        || {
            agents[0].stop()?;
            Office::ip(&["-n", &office.ns("lan"), "link", "set", "port1", "down"])?;
            // The data center must have lost it for primary_gone_after_s (2 s here).
            wait_until(STEP_TIMEOUT, || {
                let out = run_with_timeout(
                    in_ns("backup", lbs)
                        .args(["status", "--json", "--socket"])
                        .arg(socket("backup")),
                    STEP_TIMEOUT,
                )?;
                // `lbs status --json` says how long ago the data center heard the partner.
                let text = String::from_utf8_lossy(&out.stdout);
                let silent: Option<u64> = text
                    .split("\"silent_ms\":")
                    .nth(1)
                    .and_then(|rest| rest.trim_start().split([',', '}', '\n']).next())
                    .and_then(|n| n.trim().parse().ok());
                Ok(silent.is_some_and(|ms| ms >= 2_000))
            })
        },
    )?;
    timeline.step(
        "P on the backup: data center, address 192.168.1.2, PBX — each step timed",
        || promote(true).map(drop),
    )?;
    timeline.step(
        "the phone reaches 192.168.1.2 again, now the backup",
        || {
            if !office.reaches("phone", "192.168.1.2")? {
                bail!("the phone cannot reach the backup on the shared address");
            }
            let neigh = run_with_timeout(
                Command::new("ip").args([
                    "-n",
                    &office.ns("phone"),
                    "neigh",
                    "show",
                    "192.168.1.2",
                ]),
                STEP_TIMEOUT,
            )?;
            indent(&neigh.stdout);
            Ok(())
        },
    )?;
    let new_voicemail = pbx("backup").join("voicemail/default/1234/INBOX/msg0004.wav");
    timeline.step(
        "the repaired primary reboots: its boot check finds 192.168.1.2 answered by the new primary, so it boots with .3 and steps back (fenced)",
        || {
            std::fs::write(&new_voicemail, vec![4u8; 50_000])?;
            // A reboot forgets the addresses; the boot check runs before the network starts.
            let primary = office.ns("primary");
            Office::ip(&["-n", &primary, "addr", "flush", "dev", "eth0"])?;
            Office::ip(&["-n", &office.ns("lan"), "link", "set", "port1", "up"])?;
            let mut check = in_ns("primary", lbs);
            check
                .args(["net", "boot-check", "--config"])
                .arg(boxes.join("primary").join("agent.toml"))
                .arg("--state")
                .arg(boxes.join("primary").join("state"));
            indent(&checked(&mut check, STEP_TIMEOUT)?.stdout);
            // Then the network service brings up what the boot configuration says.
            let boot = std::fs::read_to_string(boot_file("primary"))?;
            let address = boot
                .lines()
                .find_map(|l| l.trim().strip_prefix("address "))
                .context("no address in the primary's boot configuration")?
                .trim()
                .to_owned();
            println!("    the network comes up with {address}");
            Office::ip(&["-n", &primary, "addr", "add", &address, "dev", "eth0"])?;
            Office::ip(&["-n", &primary, "link", "set", "eth0", "up"])?;
            Office::ip(&["-n", &primary, "route", "replace", "default", "via", "192.168.1.1"])?;
            let mut agent = in_ns("primary", lbs);
            agent
                .arg("agent")
                .arg("--config")
                .arg(boxes.join("primary").join("agent.toml"))
                .arg("--state")
                .arg(boxes.join("primary").join("state"))
                .arg("--socket")
                .arg(socket("primary"))
                .env("RUST_LOG", "warn");
            agents[0] = Server::start(&mut agent, ready, STEP_TIMEOUT)?;
            println!("    primary: {}", agents[0].addr);
            wait_until(STEP_TIMEOUT, || {
                let out = run_with_timeout(
                    in_ns("primary", lbs)
                        .args(["status", "--socket"])
                        .arg(socket("primary")),
                    STEP_TIMEOUT,
                )?;
                // The first line: "<SID>  <state>  gen <n> of pair …".
                Ok(String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .next()
                    .is_some_and(|l| l.contains("  FENCED  ")))
            })
        },
    )?;
    timeline.step(
        "B on the old primary: it becomes the backup and syncs what it missed",
        || {
            let mut cmd = in_ns("primary", lbs);
            cmd.args(["demote", "--yes", "--socket"]).arg(socket("primary"));
            let out = checked(&mut cmd, STEP_TIMEOUT)?;
            indent(&out.stdout);
            wait_until(STEP_TIMEOUT, || {
                Ok(pbx("primary")
                    .join("voicemail/default/1234/INBOX/msg0004.wav")
                    .exists()
                    && identical(lbs, &pbx("backup"), &pbx("primary"))?)
            })?;
            println!("    the voicemail left during the outage is on the old primary; both copies identical");
            indent(dc_cli(&["status"])?.as_bytes());
            Ok(())
        },
    )?;
    timeline.step("agents and data center stop on SIGTERM", || {
        for agent in &mut agents {
            agent.stop()?;
        }
        dc.stop().map(drop)
    })?;
    Ok(())
}

/// Polls `done` every 50 ms until it says yes, or fails after `timeout`.
fn wait_until(
    timeout: Duration,
    mut done: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !done()? {
        if Instant::now() > deadline {
            bail!("not within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Whether two trees are identical by `lbs sync verify`.
fn identical(lbs: &Path, a: &Path, b: &Path) -> anyhow::Result<bool> {
    let out = run_with_timeout(
        Command::new(lbs).args(["sync", "verify"]).arg(a).arg(b),
        STEP_TIMEOUT,
    )?;
    Ok(out.status.success())
}

fn peer(hello: &Path, dir: &Path, verb: &str, label: &str, partner: &str) -> Command {
    let mut cmd = Command::new(hello);
    cmd.arg(verb)
        .arg("--identity")
        .arg(dir.join(label))
        .arg("--ca")
        .arg(dir.join("ca.pem"))
        .args(["--partner", partner]);
    cmd
}

/// Runs one demo command within [`STEP_TIMEOUT`]; a failure carries its stderr.
fn checked_step(cmd: &mut Command) -> anyhow::Result<Output> {
    checked(cmd, STEP_TIMEOUT)
}

fn indent(text: &[u8]) {
    for line in String::from_utf8_lossy(text).lines() {
        println!("    {line}");
    }
}

/// The sync engine: the backup pulls the primary's tree over mutual TLS, twice, and checks.
fn sync_steps(timeline: &mut Timeline, dir: &Path) -> anyhow::Result<()> {
    let lbs = target_dir().join("debug").join("lbs");
    let (primary, backup) = (dir.join("primary-tree"), dir.join("backup-tree"));
    let lbs_peer = |args: &[&str], me: &str, partner: &str| {
        let mut cmd = Command::new(&lbs);
        cmd.args(args)
            .arg("--identity")
            .arg(dir.join(me))
            .arg("--ca")
            .arg(dir.join("ca.pem"))
            .args(["--partner", partner])
            .arg("--state")
            .arg(dir.join(format!("state-{me}")));
        cmd
    };
    timeline.step(
        "the primary's PBX data: config, voicemail, music on hold",
        || {
            demo_tree(&primary)?;
            std::fs::create_dir_all(&backup)?;
            println!("    {}", primary.display());
            Ok(())
        },
    )?;
    let mut server = timeline.step("primary serves its tree to the backup only", || {
        Server::start(
            lbs_peer(&["sync", "serve"], "primary", BACKUP)
                .arg("--root")
                .arg(&primary)
                .args(["--listen", "127.0.0.1:0"]),
            |line| line.split(" on ").nth(1)?.split(' ').next(),
            STEP_TIMEOUT,
        )
    })?;
    let addr = server.addr.clone();
    let pull = |timeline: &mut Timeline, name: &str| {
        timeline.step(name, || {
            let out = checked_step(
                lbs_peer(&["sync", "pull"], "backup", PRIMARY)
                    .arg("--root")
                    .arg(&backup)
                    .args(["--from", &addr]),
            )?;
            indent(&out.stdout);
            Ok(())
        })
    };
    pull(timeline, "backup pulls everything (first sync)")?;
    timeline.step(
        "on the primary: a caller deletes message 0, Asterisk renumbers, config edited",
        || {
            let inbox = primary.join("voicemail/default/1234/INBOX");
            std::fs::remove_file(inbox.join("msg0000.wav"))?;
            std::fs::rename(inbox.join("msg0001.wav"), inbox.join("msg0000.wav"))?;
            std::fs::rename(inbox.join("msg0002.wav"), inbox.join("msg0001.wav"))?;
            std::fs::write(
                primary.join("asterisk/extensions.conf"),
                "[default]\nexten => 100,1,Dial(PJSIP/100)\nexten => 101,1,Dial(PJSIP/101)\n",
            )?;
            Ok(())
        },
    )?;
    pull(
        timeline,
        "backup pulls the changes (renumbered messages copied locally)",
    )?;
    timeline.step(
        "lbs sync verify: both trees identical by BLAKE3 and metadata",
        || {
            let out = checked_step(
                Command::new(&lbs)
                    .args(["sync", "verify"])
                    .arg(&primary)
                    .arg(&backup),
            )?;
            indent(&out.stdout);
            Ok(())
        },
    )?;
    timeline.step("primary's sync server stops on SIGTERM", || {
        for line in server.stop()? {
            println!("    {line}");
        }
        Ok(())
    })
}

/// A small PBX tree made from fixed seeds: config, three voicemail messages, music on hold.
fn demo_tree(root: &Path) -> anyhow::Result<()> {
    let inbox = root.join("voicemail/default/1234/INBOX");
    std::fs::create_dir_all(&inbox)?;
    std::fs::create_dir_all(root.join("asterisk"))?;
    std::fs::create_dir_all(root.join("moh"))?;
    std::fs::write(
        root.join("asterisk/extensions.conf"),
        "[default]\nexten => 100,1,Dial(PJSIP/100)\n",
    )?;
    let noise = |seed: u32, len: usize| -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    };
    for (i, len) in [(0u32, 160_000), (1, 240_000), (2, 96_000)] {
        std::fs::write(inbox.join(format!("msg{i:04}.wav")), noise(i + 1, len))?;
    }
    std::fs::write(root.join("moh/default.wav"), noise(99, 4 << 20))?;
    Ok(())
}
