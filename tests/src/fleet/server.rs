//! A real `lbs-datacenter` in a directory of its own, on loopback ports: its command line,
//! `serve` started and stopped as systemd does, and what /proc says about it.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use lbs_protocol::TrustRoot;

use super::Provisioned;

/// A child process killed and reaped when dropped (also on error and panic).
#[derive(Debug)]
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `lbs-datacenter` with its directory (removed on drop) and ports; `serve` killed on drop.
#[derive(Debug)]
pub struct Server {
    binary: PathBuf,
    dir: tempfile::TempDir,
    pub activation: SocketAddr,
    pub control: SocketAddr,
    child: Option<Reaped>,
}

/// A loopback port free now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Server {
    /// A configuration with loopback ports (and `extra`, e.g. a `[dns]` or `[store]` section),
    /// `init`, and
    /// `pairs` pairs provisioned with `provision-pair --from` (`bench-00000` named
    /// `pbx-00000.<zone>`, …); their keys.
    pub fn prepare(
        binary: &Path,
        pairs: usize,
        zone: &str,
        extra: &str,
    ) -> anyhow::Result<(Server, Vec<[Provisioned; 2]>)> {
        let server = Server {
            binary: binary.to_owned(),
            dir: tempfile::Builder::new().prefix("lbs-dc-load.").tempdir()?,
            activation: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)),
            control: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)),
            child: None,
        };
        let config = server.dir().join("datacenter.toml");
        std::fs::write(
            &config,
            format!(
                "activation = [\"{}\"]\ncontrol = [\"{}\"]\n{extra}",
                server.activation, server.control
            ),
        )?;
        // It may hold a TSIG secret: only its owner may read it.
        std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        // After the configuration: its [store] says where init puts the records.
        server.cli(&["init"])?;
        let names: String = (0..pairs)
            .map(|p| format!("bench-{p:05} pbx-{p:05}.{zone}\n"))
            .collect();
        let file = server.dir().join("pairs.txt");
        std::fs::write(&file, names)?;
        let file = file
            .to_str()
            .context("a temporary path that is not UTF-8")?;
        let json = server.cli(&["provision-pair", "--json", "--from", file])?;
        let provisioned = super::provisioned_pairs(&json)?;
        if provisioned.len() != pairs {
            bail!(
                "provision-pair --json listed {} pairs, not {pairs}",
                provisioned.len()
            );
        }
        Ok((server, provisioned))
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Another site of the same data center, `site`: a directory of its own with its own CA
    /// signed by this one's root (`site-init`), the configuration `extra` (the same `[store]`)
    /// and ports of its own. Not started.
    pub fn another_site(&self, site_name: &str, extra: &str) -> anyhow::Result<Server> {
        let site = Server {
            binary: self.binary.clone(),
            dir: tempfile::Builder::new().prefix("lbs-dc-site.").tempdir()?,
            activation: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)),
            control: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)),
            child: None,
        };
        let out = site.dir().to_string_lossy().into_owned();
        self.cli(&["site-init", "--site", site_name, "--out", &out])?;
        let config = site.dir().join("datacenter.toml");
        std::fs::write(
            &config,
            format!(
                "site = \"{site_name}\"\nactivation = [\"{}\"]\ncontrol = [\"{}\"]\n{extra}",
                site.activation, site.control
            ),
        )?;
        std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        Ok(site)
    }

    /// The data center's CA, as boxes trust it.
    pub fn root(&self) -> anyhow::Result<TrustRoot> {
        Ok(TrustRoot::load(&self.dir().join("ca.pem"))?)
    }

    /// Runs `lbs-datacenter --dir DIR args…`; its standard output.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.binary)
            .arg("--dir")
            .arg(self.dir())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", self.binary.display()))?;
        if !out.status.success() {
            bail!(
                "lbs-datacenter {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `lbs-datacenter --dir DIR args…` with `input` on its standard input; its
    /// standard output.
    pub fn cli_with_input(&self, args: &[&str], input: &str) -> anyhow::Result<String> {
        use std::io::Write;
        let mut child = Command::new(&self.binary)
            .arg("--dir")
            .arg(self.dir())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", self.binary.display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "lbs-datacenter {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts `serve` (its warnings appended to serve.log) and waits until both ports take
    /// connections, at most 30 s.
    pub fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new(&self.binary)
            .arg("--dir")
            .arg(self.dir())
            .arg("serve")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        let mut child = Reaped(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(self.control).is_err()
            || TcpStream::connect(self.activation).is_err()
        {
            if let Some(status) = child.0.try_wait()? {
                bail!(
                    "lbs-datacenter serve ended at start ({status}); see {}",
                    self.log_path().display()
                );
            }
            if Instant::now() > deadline {
                bail!("lbs-datacenter serve did not listen within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child = Some(child);
        Ok(())
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir().join("serve.log")
    }

    /// The last `lines` lines serve logged.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(lines).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// `serve`'s process ID (0 when it is not running).
    /// Whether the `serve` started last is still running (reaped once it ended).
    pub fn running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.0.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.0.id())
    }

    /// SIGTERM, as systemd stops it; an error if it has not ended in 30 s (it is killed).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        Command::new("kill")
            .args(["-TERM", &child.0.id().to_string()])
            .status()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.0.try_wait()?.is_none() {
            if Instant::now() > deadline {
                bail!("lbs-datacenter serve did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

/// A process's CPU time (user + system), from /proc (USER_HZ is 100 on Linux).
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (which may hold spaces) in parentheses.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// `VmRSS` and `VmHWM` (its peak) of a process, MiB.
pub fn memory(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Open descriptors of a process.
pub fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}
