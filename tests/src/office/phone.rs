//! The office's phone (Debian's `sipp` asking the PBX with SIP OPTIONS ten times a second)
//! and what it heard; BIND's answers as a phone gets them.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{Office, SHARED, STEP};

impl Office {
    /// The DNS server the pair's names are in.
    pub fn dns_server(&self) -> &'static str {
        self.dns_at
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
                &format!("@{}", self.dns_at),
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

    /// The phone's ARP entry for the shared address (`ip neigh show`): whose MAC it sends to.
    pub fn phone_neighbour(&mut self) -> anyhow::Result<String> {
        let out = self.lab.sh("phone", &["ip", "neigh", "show", SHARED])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Whether the phone's sipp still runs.
    pub fn phone_alive(&self) -> bool {
        self.phone
            .as_ref()
            .is_some_and(|(pid, _)| Path::new(&format!("/proc/{pid}")).exists())
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
