//! The lab of the agent's namespace tests: the one office builder of `lbs-tests`
//! ([`Layout::Lan`]: a data center and two boxes `a`, `b` on one LAN, each running the real
//! binaries) with these tests' box configuration and helpers. Root only.
#![allow(clippy::unwrap_used, dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use lbs_tests::office::{Layout, Office};
use lbs_tests::ok;

pub const LBS: &str = env!("CARGO_BIN_EXE_lbs");
pub const STEP: Duration = Duration::from_secs(30);
pub const DC_IP: &str = lbs_tests::office::LAN_DC;

/// The office of the agent's tests: [`Office`] on [`Layout::Lan`] (its network, data center,
/// activation, agents, logs and teardown), with the boxes' configurations and the helpers
/// these tests share.
pub struct Pair {
    pub office: Office,
    /// The boxes are on different subnets and reach each other only through the tunnels.
    pub remote: bool,
    /// The agents a test started and may stop itself.
    pub agents: Vec<u32>,
}

impl std::ops::Deref for Pair {
    type Target = Office;

    fn deref(&self) -> &Office {
        &self.office
    }
}

impl std::ops::DerefMut for Pair {
    fn deref_mut(&mut self) -> &mut Office {
        &mut self.office
    }
}

impl Pair {
    pub fn media(&self, host: &str) -> PathBuf {
        self.dir().join(host).join("media")
    }

    pub fn astdb(&self, host: &str) -> PathBuf {
        self.dir().join(host).join("astdb.sqlite3")
    }

    /// `remote`: see [`Layout::Lan`]; the agents then run their tunnels and replicate over
    /// the overlay.
    pub fn start(remote: bool) -> Pair {
        let pair = Pair {
            office: Office::build(Layout::Lan { remote }).unwrap(),
            remote,
            agents: Vec::new(),
        };
        for host in ["a", "b"] {
            pair.prepare(host);
        }
        pair
    }

    /// The media directory and `agent.toml` of `host`.
    pub fn prepare(&self, host: &str) {
        let remote = self.remote;
        std::fs::create_dir_all(self.media(host)).unwrap();
        std::fs::write(
            self.dir().join(host).join("agent.toml"),
            format!(
                "report_interval_s = 1\ndebounce_ms = 100\nresource_interval_s = 1\ntunnels = {remote}\nsync_over = \"{}\"\nastdb = \"{}\"\n\n[[set]]\nname = \"media\"\npath = \"{}\"\n",
                if remote { "overlay" } else { "lan" },
                self.astdb(host).display(),
                self.media(host).display()
            ),
        )
        .unwrap();
    }

    /// `lbs-datacenter --dir … ARGS` (the provider's CLI beside the running `serve`).
    pub fn datacenter(&self, args: &[&str]) -> String {
        self.office.datacenter(args).unwrap()
    }

    /// `lbs activate` for `host` with the `n`th provisioned SID; returns what it printed.
    pub fn activate(&mut self, host: &str, n: usize) -> String {
        self.office.activate(host, n).unwrap()
    }

    pub fn start_agent(&mut self, host: &str) {
        let pid = self.office.start_agent(host).unwrap();
        self.agents.push(pid);
    }

    pub fn ip(&self, host: &str) -> &'static str {
        match (host, self.remote) {
            ("a", _) => "192.168.70.2",
            (_, false) => "192.168.70.3",
            (_, true) => "192.168.71.3",
        }
    }

    /// The office network for P and B: the shared address is .2 (a's at first), the other
    /// box's is .3; on P the backup moves from .3 to .2, on B the old primary from .2 to .3
    /// (the seed's swap). The data center must have lost the primary for 2 s. The PBX hooks
    /// write the PBX's state ("up"/"down") to `pbx` next to the configuration; `extra` goes
    /// at the top of the configuration.
    pub fn office(&self, extra: &str) {
        for host in ["a", "b"] {
            let config = self.dir().join(host).join("agent.toml");
            let text = std::fs::read_to_string(&config).unwrap();
            let pbx = self.dir().join(host).join("pbx");
            // The box's boot configuration (ifupdown), in a directory of the test's own.
            let boot = self.dir().join(host).join("boot");
            let interfaces = boot.join("etc/network/interfaces");
            std::fs::create_dir_all(interfaces.parent().unwrap()).unwrap();
            std::fs::write(
                &interfaces,
                format!(
                    "auto eth0\niface eth0 inet static\n\taddress {}/24\n\tgateway {DC_IP}\n",
                    self.ip(host)
                ),
            )
            .unwrap();
            std::fs::write(
                &config,
                format!(
                    "primary_gone_after_s = 2\npbx_start = \"echo up > {pbx}\"\npbx_stop = \"echo down > {pbx}\"\n{extra}{text}\n[network]\ninterface = \"eth0\"\nshared = \"192.168.70.2/24\"\nown = \"192.168.70.3/24\"\ngateway = \"{DC_IP}\"\nboot_config = \"{boot}\"\n",
                    pbx = pbx.display(),
                    boot = boot.display()
                ),
            )
            .unwrap();
        }
    }

    /// A pair on one office LAN (see [`Pair::office`], `extra` at the top of both
    /// configurations), a first file on a, both activated (a primary) with their agents
    /// running, the first full sync done and the data center hearing the primary; the pids
    /// of a's and b's agents.
    pub fn office_pair(extra: &str) -> (Pair, u32, u32) {
        let mut pair = Pair::start(false);
        pair.office(extra);
        std::fs::write(pair.media("a").join("greeting.wav"), vec![7u8; 1000]).unwrap();
        pair.activate("a", 0);
        pair.activate("b", 1);
        let a = pair.agent_with("a", &[]);
        let b = pair.agent_with("b", &[]);
        pair.wait(
            "the first full sync and the data center hearing the primary",
            STEP,
            |pair| {
                pair.media("b").join("greeting.wav").exists()
                    && pair.status("b")["info"]["partner"]["silent_ms"].is_u64()
            },
        );
        (pair, a, b)
    }

    /// `host` dies: its agent (`pid`) stops dead and its switch port goes dark.
    pub fn unplug(&mut self, host: &str, pid: u32) {
        self.lab.kill(pid).unwrap();
        ok(self
            .lab
            .sh(host, &["ip", "link", "set", "eth0", "down"])
            .unwrap());
    }

    /// Waits until the data center has not heard `backup`'s partner for 2 s.
    pub fn wait_primary_silent(&mut self, backup: &str) {
        self.office.wait_primary_gone(backup).unwrap();
    }

    /// The agent of `host` with `args` added; its pid.
    pub fn agent_with(&mut self, host: &str, args: &[&str]) -> u32 {
        let mut cmd = self.agent_command(host);
        cmd.args(args);
        self.lab.spawn_until(cmd, "ready:", STEP).unwrap().0
    }

    pub fn addresses(&mut self, host: &str) -> String {
        self.office.addresses(host).unwrap()
    }

    /// `host`'s MAC address on the office LAN.
    pub fn mac(&mut self, host: &str) -> String {
        self.office.mac(host).unwrap()
    }

    /// A third host (the data center's, on the office LAN) records every ARP packet it sees
    /// and asks who has `ip` every 100 ms, so that any box answering for it shows.
    pub fn watch_arp(&mut self, ip: &str) -> ArpWatch {
        let mut dump = self.lab.command("dc", "sh");
        dump.args([
            "-c",
            "exec tcpdump -i eth0 -l -n -e --immediate-mode arp 2>&1",
        ]);
        let (dump, _, lines) = self.lab.spawn_reading(dump, "listening on", STEP).unwrap();
        // arping's own interval is whole seconds; one request at a time, 10 a second, ending
        // by itself (within a second) once the stop file exists.
        let stop = self.dir().join("arp-watch.stop");
        let _ = std::fs::remove_file(&stop);
        let mut ask = self.lab.command("dc", "sh");
        ask.args([
            "-c",
            &format!(
                "echo asking; for i in $(seq 1200); do [ -e '{}' ] && exit 0; arping -q -c 1 -w 1 -I eth0 {ip}; sleep 0.1; done",
                stop.display()
            ),
        ]);
        let (ask, _) = self.lab.spawn_until(ask, "asking", STEP).unwrap();
        ArpWatch {
            dump,
            ask,
            stop,
            lines,
        }
    }

    /// Stops the watch and checks who claimed `ip` (answered for it, or asked from it): the
    /// old primary (`never`) not once, the new one (`seen`) — so the watch worked — at least
    /// once.
    pub fn stop_arp_watch(&mut self, watch: ArpWatch, ip: &str, never: &str, seen: &str) {
        std::fs::write(&watch.stop, b"").unwrap();
        self.lab.wait_exit(watch.ask, STEP).unwrap();
        self.lab.kill(watch.dump).unwrap();
        let mut claims = std::collections::BTreeMap::new();
        // The capture's last lines, up to its end of output (the reader then hangs up).
        let lines = std::iter::from_fn(|| watch.lines.recv_timeout(Duration::from_secs(5)).ok());
        for line in lines {
            // `<time> <source MAC> > <destination>, ethertype ARP …: Reply <ip> is-at …` or
            // `…: Request who-has <x> tell <ip>, …` (a probe says `tell 0.0.0.0`).
            let claimed = line.contains(&format!("Reply {ip} is-at"))
                || line.contains(&format!("tell {ip},"));
            if let (true, Some(mac)) = (claimed, line.split_whitespace().nth(1)) {
                *claims.entry(mac.to_owned()).or_insert(0usize) += 1;
            }
        }
        assert_eq!(
            claims.get(never),
            None,
            "the old primary answered: {claims:?}"
        );
        assert!(
            claims.contains_key(seen),
            "the watch saw nobody: {claims:?}"
        );
    }

    /// The address in `host`'s boot configuration.
    pub fn boot_address(&self, host: &str) -> String {
        let text =
            std::fs::read_to_string(self.dir().join(host).join("boot/etc/network/interfaces"))
                .unwrap();
        text.lines()
            .find_map(|l| l.trim().strip_prefix("address "))
            .unwrap_or_default()
            .to_owned()
    }

    pub fn pbx(&self, host: &str) -> String {
        std::fs::read_to_string(self.dir().join(host).join("pbx"))
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    pub fn datacenter_status(&self) -> serde_json::Value {
        serde_json::from_str(&self.datacenter(&["status", "--json"])).unwrap()
    }

    /// Runs `lbs <verb> --yes` on `host`.
    pub fn role_change(&mut self, host: &str, verb: &str) -> (bool, String) {
        let mut cmd = self.lab.command(host, LBS);
        cmd.args([verb, "--yes", "--socket"]).arg(self.socket(host));
        let out = self.lab.run(cmd, STEP).unwrap();
        let said = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        eprintln!("[{host}] lbs {verb}:\n{said}");
        (out.status.success(), said)
    }

    /// The state in `host`'s role record on disk.
    pub fn recorded_state(&self, host: &str) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.state(host).join("role.json")).unwrap()).unwrap()
    }

    /// An agent on a box not activated yet: it waits for `lbs activate`.
    pub fn start_waiting_agent(&mut self, host: &str) {
        let cmd = self.agent_command(host);
        let (pid, _) = self.lab.spawn_until(cmd, "waiting:", STEP).unwrap();
        self.agents.push(pid);
    }

    pub fn status(&mut self, host: &str) -> serde_json::Value {
        serde_json::from_str(&self.status_output(host, &["--json"])).unwrap()
    }

    /// `lbs status` of `host` as text.
    pub fn status_text(&mut self, host: &str) -> String {
        self.status_output(host, &[])
    }

    /// `lbs status` of `host`: its exit code and what it printed, whatever the code.
    pub fn status_run(&mut self, host: &str) -> (Option<i32>, String) {
        let mut cmd = self.lab.command(host, LBS);
        cmd.arg("status").arg("--socket").arg(self.socket(host));
        let out = self.lab.run(cmd, STEP).unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// What `lbs status <args>` printed; exit 0 (well) or 1 (degraded) both answer.
    fn status_output(&mut self, host: &str, args: &[&str]) -> String {
        let mut cmd = self.lab.command(host, LBS);
        cmd.arg("status")
            .args(args)
            .arg("--socket")
            .arg(self.socket(host));
        let out = self.lab.run(cmd, STEP).unwrap();
        assert!(
            matches!(out.status.code(), Some(0 | 1)),
            "lbs status: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn wait(
        &mut self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&mut Pair) -> bool,
    ) -> Duration {
        let started = Instant::now();
        loop {
            if done(self) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < timeout,
                "{what}: not within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A running ARP capture and asker (see [`Pair::watch_arp`]).
pub struct ArpWatch {
    pub dump: u32,
    pub ask: u32,
    pub stop: PathBuf,
    pub lines: std::sync::mpsc::Receiver<String>,
}

pub fn set<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["sets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap()
}
