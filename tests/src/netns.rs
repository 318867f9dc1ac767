//! Hosts in network namespaces: [`Lab`] builds them and tears them down.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The bridge inside the LAN namespace that plays the office switch.
const BRIDGE: &str = "br0";

static LABS: AtomicU32 = AtomicU32::new(0);

/// Where the lab's processes' output goes when not to standard error (see [`echo_to`]).
static ECHO: std::sync::OnceLock<std::sync::Mutex<std::fs::File>> = std::sync::OnceLock::new();

/// Sends every lab process's output, labelled with its host, to `path` instead of standard
/// error (where a test shows it on failure): for a long command whose own lines would drown in
/// it. Once per process; later calls change nothing.
pub fn echo_to(path: &std::path::Path) -> anyhow::Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let _ = ECHO.set(std::sync::Mutex::new(file));
    Ok(())
}

/// One line of a lab process's output, where [`echo_to`] said (standard error by default).
fn echo(label: &str, line: &str) {
    match ECHO.get() {
        Some(file) => {
            use std::io::Write;
            let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(file, "{label} {line}");
        }
        None => eprintln!("{label} {line}"),
    }
}

/// A set of network namespaces and the processes running in them, removed on drop.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    /// The switches: segment name → its namespace.
    segments: Vec<(String, String)>,
    /// Every cable: host, its interface, the segment's namespace, the switch-side port.
    ports: Vec<Port>,
    children: Vec<Child>,
}

#[derive(Debug)]
struct Port {
    host: String,
    interface: String,
    switch: String,
    name: String,
}

impl Lab {
    /// Starts an empty lab. The prefix `lbs<pid>x<n>-` is unique to this process and lab, so
    /// concurrent tests (and concurrent test runs) never touch each other's namespaces.
    pub fn new() -> Lab {
        let n = LABS.fetch_add(1, Ordering::Relaxed);
        Lab {
            prefix: format!("{}{n}-", process_prefix()),
            namespaces: Vec::new(),
            segments: Vec::new(),
            ports: Vec::new(),
            children: Vec::new(),
        }
    }

    /// The prefix every namespace of this lab starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The full namespace name of a host.
    pub fn ns(&self, host: &str) -> String {
        format!("{}{host}", self.prefix)
    }

    /// Whether `host` was added to this lab.
    pub fn has_host(&self, host: &str) -> bool {
        self.namespaces.contains(&self.ns(host))
    }

    fn add_namespace(&mut self, host: &str) -> anyhow::Result<String> {
        let ns = self.ns(host);
        ip(&["netns", "add", &ns])?;
        // Record it before anything else can fail, so Drop removes it.
        self.namespaces.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Adds the office LAN (segment `lan`): a namespace holding a bridge every host plugs into.
    pub fn add_lan(&mut self) -> anyhow::Result<()> {
        self.add_segment("lan")
    }

    /// Adds a network segment: a namespace `segment` holding a bridge (the switch).
    pub fn add_segment(&mut self, segment: &str) -> anyhow::Result<()> {
        let ns = self.add_namespace(segment)?;
        ip(&["-n", &ns, "link", "add", BRIDGE, "type", "bridge"])?;
        ip(&["-n", &ns, "link", "set", BRIDGE, "up"])?;
        self.segments.push((segment.to_owned(), ns));
        Ok(())
    }

    /// Adds a host plugged into the LAN with `eth0` at `cidr` (`192.168.1.2/24`).
    pub fn add_host(&mut self, host: &str, cidr: &str) -> anyhow::Result<()> {
        self.connect(host, "eth0", "lan", cidr)
    }

    /// Plugs `host` (created if new: a router connects twice) into `segment` with
    /// `interface` at `cidr`.
    pub fn connect(
        &mut self,
        host: &str,
        interface: &str,
        segment: &str,
        cidr: &str,
    ) -> anyhow::Result<()> {
        let switch = self
            .segments
            .iter()
            .find(|(name, _)| name == segment)
            .map(|(_, ns)| ns.clone())
            .with_context(|| format!("no segment {segment}: add_segment first"))?;
        let ns = self.ns(host);
        if !self.namespaces.contains(&ns) {
            self.add_namespace(host)?;
        }
        // The switch-side end is named by port number: interface names are limited to 15
        // bytes, host names are not.
        let port = format!("port{}", self.ports.len());
        ip(&[
            "link", "add", interface, "netns", &ns, "type", "veth", "peer", "name", &port, "netns",
            &switch,
        ])?;
        self.ports.push(Port {
            host: host.to_owned(),
            interface: interface.to_owned(),
            switch: switch.clone(),
            name: port.clone(),
        });
        ip(&["-n", &switch, "link", "set", &port, "master", BRIDGE])?;
        ip(&["-n", &switch, "link", "set", &port, "up"])?;
        ip(&["-n", &ns, "addr", "add", cidr, "dev", interface])?;
        ip(&["-n", &ns, "link", "set", interface, "up"])?;
        Ok(())
    }

    /// Pulls (`false`) or plugs back (`true`) `host`'s `eth0` cable: its switch port goes
    /// dark or comes back, so the host sees its carrier go and return while its own `eth0`
    /// stays up.
    pub fn plug(&mut self, host: &str, plugged: bool) -> anyhow::Result<()> {
        let port = self
            .ports
            .iter()
            .find(|p| p.host == host && p.interface == "eth0")
            .with_context(|| format!("{host} has no eth0 cable"))?;
        let state = if plugged { "up" } else { "down" };
        ip(&["-n", &port.switch, "link", "set", &port.name, state])
    }

    /// Kills (SIGKILL) every process running in `host`'s namespace — this lab's, since the
    /// namespace is — also those its programs started themselves (a PBX hook's daemon).
    pub fn kill_all_in(&mut self, host: &str) -> anyhow::Result<()> {
        let ns = self.ns(host);
        let pids = pids_in(&ns)?;
        for pid in &pids {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        // Reap the ones that are our children.
        self.children.retain_mut(|child| {
            if pids.contains(&child.id()) {
                let _ = child.wait();
                false
            } else {
                true
            }
        });
        Ok(())
    }

    /// A command that runs `program` inside `host`'s namespace.
    pub fn command(&self, host: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(host)]).arg(program);
        cmd
    }

    /// Runs a command to completion inside the lab, killing it if it outlives `timeout`.
    pub fn run(&mut self, mut cmd: Command, timeout: Duration) -> anyhow::Result<Output> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let pid = child.id();
        // Track it so Drop kills it if the wait below panics or times out.
        self.children.push(child);
        let deadline = Instant::now() + timeout;
        loop {
            let idx = self.child_index(pid)?;
            if self.children[idx].try_wait()?.is_some() {
                let child = self.children.remove(idx);
                return child.wait_with_output().context("collecting output");
            }
            if Instant::now() >= deadline {
                bail!("{cmd:?} did not finish within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `argv` in `host` to completion (20 s at most).
    pub fn sh(&mut self, host: &str, argv: &[&str]) -> anyhow::Result<Output> {
        let (program, args) = argv.split_first().context("an empty command")?;
        let mut cmd = self.command(host, program);
        cmd.args(args);
        self.run(cmd, Duration::from_secs(20))
    }

    /// Starts a long-running process inside the lab and waits for a line of its standard
    /// output that starts with `ready_prefix`, returning the rest of that line.
    pub fn spawn_until(
        &mut self,
        cmd: Command,
        ready_prefix: &str,
        timeout: Duration,
    ) -> anyhow::Result<(u32, String)> {
        let (pid, rest, _) = self.spawn_reading(cmd, ready_prefix, timeout)?;
        Ok((pid, rest))
    }

    /// Like [`Lab::spawn_until`], and also hands over the process's later lines of standard
    /// output (a disconnected receiver once it exits).
    pub fn spawn_reading(
        &mut self,
        mut cmd: Command,
        ready_prefix: &str,
        timeout: Duration,
    ) -> anyhow::Result<(u32, String, mpsc::Receiver<String>)> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let pid = child.id();
        let stdout = child.stdout.take().context("child stdout")?;
        self.children.push(child);
        let (tx, rx) = mpsc::channel();
        let label = format!("[{}]", host_of(&cmd));
        // Drains the child's output for its whole life (a full pipe would block it, a closed
        // one would kill it), echoing it to the test's stderr, which cargo shows on failure.
        // It ends when the child's stdout closes, which Drop guarantees by killing the child.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                echo(&label, &line);
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(ready_prefix) {
                        return Ok((pid, rest.to_owned(), rx));
                    }
                }
                Err(_) => bail!("{cmd:?} did not print {ready_prefix:?} within {timeout:?}"),
            }
        }
    }

    /// Asks a process this lab started to stop (SIGTERM) and waits up to `timeout` for it.
    pub fn stop(&mut self, pid: u32, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let idx = self.child_index(pid)?;
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -TERM {pid} failed: {status}");
        }
        self.reap_within(idx, timeout)
            .with_context(|| format!("process {pid} did not stop within {timeout:?} of SIGTERM"))
    }

    /// Waits up to `timeout` for child `idx` to end, and reaps it.
    fn reap_within(&mut self, idx: usize, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.children[idx].try_wait()? {
                // Already reaped by try_wait; wait() just returns the cached status.
                let _ = self.children.remove(idx).wait();
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("still running after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (`HUP`, `KILL`, …) to a process this lab started.
    pub fn signal(&mut self, pid: u32, signal: &str) -> anyhow::Result<()> {
        self.child_index(pid)?;
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -{signal} {pid} failed: {status}");
        }
        Ok(())
    }

    /// Waits up to `timeout` for a process this lab started to end by itself, and reaps it.
    pub fn wait_exit(&mut self, pid: u32, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let idx = self.child_index(pid)?;
        self.reap_within(idx, timeout)
            .with_context(|| format!("process {pid} did not end within {timeout:?}"))
    }

    /// Kills a process this lab started (SIGKILL: a crash) and reaps it.
    pub fn kill(&mut self, pid: u32) -> anyhow::Result<()> {
        let idx = self.child_index(pid)?;
        let mut child = self.children.remove(idx);
        let killed = child.kill();
        let reaped = child.wait();
        killed.context("killing")?;
        reaped.context("reaping")?;
        Ok(())
    }

    fn child_index(&self, pid: u32) -> anyhow::Result<usize> {
        self.children
            .iter()
            .position(|child| child.id() == pid)
            .with_context(|| format!("process {pid} was not started by this lab"))
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Only what this lab started: its own children, then its own namespaces.
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Then whatever still runs inside its namespaces (daemons its programs started).
        for ns in &self.namespaces {
            for pid in pids_in(ns).unwrap_or_default() {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
        for ns in self.namespaces.iter().rev() {
            if let Err(err) = ip(&["netns", "del", ns]) {
                eprintln!("lab cleanup: {err:#}");
            }
        }
    }
}

/// The host a lab command runs in (the namespace after `ip netns exec`), for labelling output.
fn host_of(cmd: &Command) -> &str {
    cmd.get_args()
        .nth(2)
        .and_then(|ns| ns.to_str())
        .unwrap_or("?")
}

/// The processes running in namespace `ns` (`ip netns pids`).
fn pids_in(ns: &str) -> anyhow::Result<Vec<u32>> {
    let out = Command::new("ip")
        .args(["netns", "pids", ns])
        .stdin(Stdio::null())
        .output()
        .context("cannot run `ip netns pids`")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .collect())
}

/// Runs `ip ARGS`, failing with its stderr.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The prefix of every namespace this process's labs create (`lbs<pid>x`).
/// Runs `f` on a thread inside network namespace `ns` (threads it starts stay there: a client
/// that runs its own thread keeps using the namespace after `f` returns); what `f` returned.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering {path}"))?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread in {ns} panicked"))?
}

pub fn process_prefix() -> String {
    format!("lbs{}x", std::process::id())
}

/// Kills every process inside the namespaces whose names start with `prefix` and removes
/// those namespaces: the cleanup of a lab whose owner cannot run its `Drop` (Ctrl-C). The
/// namespaces removed.
pub fn remove_namespaces_with_prefix(prefix: &str) -> anyhow::Result<Vec<String>> {
    let namespaces = namespaces_with_prefix(prefix)?;
    for ns in &namespaces {
        for pid in pids_in(ns).unwrap_or_default() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
    for ns in namespaces.iter().rev() {
        if let Err(err) = ip(&["netns", "del", ns]) {
            eprintln!("cleanup: {err:#}");
        }
    }
    Ok(namespaces)
}

/// The namespaces that currently exist whose names start with `prefix`.
pub fn namespaces_with_prefix(prefix: &str) -> anyhow::Result<Vec<String>> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .context("cannot run `ip netns list`")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(prefix))
        .map(str::to_owned)
        .collect())
}

/// A TCP port on this machine's loopback that leads into a lab namespace: each connection
/// accepted on `127.0.0.1:<port>` is joined to `target` as a host inside `ns` reaches it (so
/// a browser on the machine can look at a page served in the lab). At most
/// [`Forward::CONNECTIONS`] at once; the connect inside has 5 s. Stops accepting on drop;
/// connections under way end when either side closes (the lab's teardown closes them all).
#[derive(Debug)]
pub struct Forward {
    /// The loopback port.
    pub port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Forward {
    pub const CONNECTIONS: usize = 32;

    /// Forwards `127.0.0.1:<port>` (the first of `ports` that is free, else any) to `target`
    /// inside namespace `ns`.
    pub fn start(ns: &str, target: std::net::SocketAddr, ports: &[u16]) -> anyhow::Result<Forward> {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let listener = ports
            .iter()
            .chain(&[0])
            .find_map(|port| std::net::TcpListener::bind(("127.0.0.1", *port)).ok())
            .context("cannot listen on 127.0.0.1")?;
        let port = listener.local_addr()?.port();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let open = std::sync::Arc::new(AtomicUsize::new(0));
        let ns = ns.to_owned();
        let stopping = stop.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                if open.load(Ordering::SeqCst) >= Forward::CONNECTIONS {
                    continue;
                }
                open.fetch_add(1, Ordering::SeqCst);
                let (ns, open) = (ns.clone(), open.clone());
                std::thread::spawn(move || {
                    let inside = in_netns(&ns, move || {
                        std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5))
                    });
                    if let Ok(Ok(inside)) = inside {
                        splice(client, inside);
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Ok(Forward { port, stop })
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // The accept loop sees the flag at its next connection: this one.
        let _ = std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], self.port)),
            Duration::from_secs(1),
        );
    }
}

/// Copies both ways between `a` and `b` until both directions end.
fn splice(a: std::net::TcpStream, b: std::net::TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let one_way = |mut from: std::net::TcpStream, mut to: std::net::TcpStream| {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(std::net::Shutdown::Write);
    };
    let back = std::thread::spawn(move || one_way(b2, a2));
    one_way(a, b);
    let _ = back.join();
}
