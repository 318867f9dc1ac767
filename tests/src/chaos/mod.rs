//! Randomized fault runs on the lab's office with an independent checker (issue 28): a
//! nemesis ([`nemesis`]) does a seeded schedule of faults while a workload writes voicemails,
//! config edits and a growing recording on whichever box is primary and the phone asks the
//! shared address ten times a second; a sniffer on the office LAN records every ARP claim of
//! the shared address. Then everything is healed, an operator's runbook (B on a fenced box,
//! P when nobody serves) brings the pair back, and the [`checker`] judges the records:
//! split-brain moments, generation regressions, false promotions, torn or lost files, and
//! whether the run converged.

pub mod checker;
pub mod nemesis;
mod workload;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::fleet::Dice;
use crate::office::{Office, SHARED, STEP, now_ms};
use checker::{Beliefs, Claim};
use nemesis::{Fault, Planned};

/// One run: which, how long, and how.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub seed: u64,
    pub run: u64,
    /// How long the nemesis acts.
    pub length: Duration,
}

impl RunSpec {
    fn dice(&self) -> Dice {
        Dice::new(self.seed ^ self.run.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    /// Automatic failover on in every other run.
    pub fn auto_failover(&self) -> bool {
        self.run % 2 == 1
    }
}

/// The size of each box's disk for the PBX's data.
const DISK_MB: u64 = 256;

/// How long healing may take before a run counts as not converged.
pub const CONVERGE_WITHIN: Duration = Duration::from_secs(120);

/// Healing that took longer than this is worth a look even though it converged.
const SLOW_CONVERGE: Duration = Duration::from_secs(20);

/// What a run found.
#[derive(Debug, Default)]
pub struct RunReport {
    pub schedule: Vec<Planned>,
    pub split_brain: Vec<(u64, u64)>,
    pub regressions: Vec<(u64, u64, u64)>,
    pub same_generation: Vec<(u64, u64)>,
    pub false_promotions: Vec<u64>,
    pub torn_or_lost: Vec<String>,
    /// Healing's start to convergence; `None`: not within [`CONVERGE_WITHIN`].
    pub converged: Option<Duration>,
    /// With automatic failover: each primary's death (power off) to the phone's next answer.
    pub death_to_answer: Vec<Duration>,
    /// Those of them with no other fault in the 10 s before the death nor until the answer
    /// (the backup up and settled, the data center whole, nobody pressing keys).
    pub death_to_answer_quiet: Vec<Duration>,
    /// Faults, role changes and findings, in time order (ms since the epoch, text).
    pub timeline: Vec<(u64, String)>,
    /// For a failed run: each box's `lbs status` and the end of its agent's log.
    pub attachments: Vec<(String, String)>,
}

impl RunReport {
    /// Split-brain moments and same-generation primaries count together: both are two
    /// primaries at once.
    pub fn split_brain_count(&self) -> usize {
        self.split_brain.len() + self.same_generation.len()
    }

    pub fn failed(&self) -> bool {
        self.split_brain_count() > 0
            || !self.regressions.is_empty()
            || !self.false_promotions.is_empty()
            || !self.torn_or_lost.is_empty()
            || self.converged.is_none()
    }
}

/// The office under chaos: the sniffer, the prober and the sampler of both agents' and the
/// data center's words, all stopped on drop.
struct Watch {
    stop: Arc<AtomicBool>,
    claims: Arc<Mutex<Vec<String>>>,
    looks: Arc<Mutex<Vec<Beliefs>>>,
    generations: Arc<Mutex<Vec<(u64, u64)>>>,
    /// The data center's primary (a SID) as last read.
    primary: Arc<Mutex<Option<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Runs `cmd` with a deadline: what it wrote on standard output, whatever its exit status,
/// or why there is nothing (it failed silently, or took longer and was killed; its output
/// is read all along, so a long one cannot stall it).
fn output_within(mut cmd: Command, within: Duration) -> Result<String, String> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).map_err(|e| e.to_string())?);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(within) {
        // `lbs status` says a box that is not well with exit 1, its report on standard
        // output all the same.
        Ok(Ok(out)) if !out.stdout.is_empty() => {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        }
        Ok(Ok(out)) => Err(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => {
            // Ours, and not reaped yet (the thread waits for it): killing it ends the wait.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            Err(format!("no answer within {within:?}"))
        }
    }
}

fn start_watch(office: &mut Office) -> anyhow::Result<Watch> {
    // A third host on the office LAN: tcpdump of every ARP packet, and a request for the
    // shared address every 200 ms so that every holder answers.
    office.add_office_host("checker", "192.168.1.50")?;
    let mut dump = office.lab.command("checker", "sh");
    dump.args([
        "-c",
        "exec tcpdump -i eth0 -l -n -e -tt --immediate-mode arp 2>&1",
    ]);
    let (_, _, lines) = office.lab.spawn_reading(dump, "listening on", STEP)?;
    let mut ask = office.lab.command("checker", "sh");
    ask.args([
        "-c",
        &format!(
            "echo asking; while true; do arping -q -c 1 -w 1 -I eth0 {SHARED}; sleep 0.2; done"
        ),
    ]);
    office.lab.spawn_until(ask, "asking", STEP)?;
    let stop = Arc::new(AtomicBool::new(false));
    let claims = Arc::new(Mutex::new(Vec::new()));
    let mut threads = Vec::new();
    {
        let (stop, claims) = (stop.clone(), claims.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) {
                    claims.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                }
            }
        }));
    }
    // Both agents' and the data center's words every 500 ms, each within 1.5 s (a frozen
    // agent does not answer).
    let looks = Arc::new(Mutex::new(Vec::new()));
    let generations = Arc::new(Mutex::new(Vec::new()));
    let primary = Arc::new(Mutex::new(None));
    let lbs = crate::workspace_binary("lbs");
    let datacenter = crate::workspace_binary("lbs-datacenter");
    let agents: Vec<(String, String, PathBuf)> = crate::office::BOXES
        .iter()
        .map(|h| (h.to_string(), office.lab.ns(h), office.socket(h)))
        .collect();
    // The data center as each serving site reads the shared store (the first that answers).
    let sites: Vec<(String, PathBuf)> = crate::office::SERVING
        .iter()
        .map(|(site, _)| (office.lab.ns(site), office.site_dir(site)))
        .collect();
    {
        let (stop, looks, generations, primary) = (
            stop.clone(),
            looks.clone(),
            generations.clone(),
            primary.clone(),
        );
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let at_ms = now_ms();
                let mut look = Beliefs {
                    at_ms,
                    agents: Vec::new(),
                    silent: Vec::new(),
                };
                for (host, ns, socket) in &agents {
                    let mut cmd = Command::new("ip");
                    cmd.args(["netns", "exec", ns])
                        .arg(&lbs)
                        .args(["status", "--json", "--socket"])
                        .arg(socket);
                    let said = output_within(cmd, Duration::from_millis(1500)).and_then(|text| {
                        serde_json::from_str::<serde_json::Value>(&text)
                            .map_err(|e| format!("not JSON: {e}"))
                    });
                    match said {
                        Ok(status) => look.agents.push((
                            host.clone(),
                            status["role"]["state"].as_str().unwrap_or("").to_owned(),
                            status["role"]["generation"].as_u64().unwrap_or(0),
                        )),
                        // For the timeline only: the checker counts those that answered.
                        Err(why) => look.silent.push((host.clone(), why)),
                    }
                }
                looks.lock().unwrap_or_else(|p| p.into_inner()).push(look);
                let pairs = sites.iter().find_map(|(ns, dir)| {
                    let mut cmd = Command::new("ip");
                    cmd.args(["netns", "exec", ns])
                        .arg(&datacenter)
                        .arg("--dir")
                        .arg(dir)
                        .args(["status", "--json"]);
                    output_within(cmd, Duration::from_millis(1500))
                        .ok()
                        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
                });
                if let Some(pairs) = pairs {
                    if let Some(generation) = pairs[0]["generation"].as_u64() {
                        generations
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((at_ms, generation));
                    }
                    *primary.lock().unwrap_or_else(|p| p.into_inner()) =
                        pairs[0]["primary"].as_str().map(str::to_owned);
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }));
    }
    Ok(Watch {
        stop,
        claims,
        looks,
        generations,
        primary,
        threads,
    })
}

/// The lab host of a SID of the pair.
fn host_of(office: &Office, sid: &str) -> Option<&'static str> {
    office
        .sids
        .iter()
        .position(|(s, _)| s.to_string() == sid)
        .map(|i| crate::office::BOXES[i])
}

/// One run: the office comes up in sync with the phone answered, the nemesis acts for
/// `spec.length` while the workload writes, everything is healed, the runbook brings the pair
/// back, and the checker judges.
pub fn run(spec: &RunSpec) -> anyhow::Result<RunReport> {
    let mut report = RunReport::default();
    let mut dice = spec.dice();
    report.schedule = nemesis::schedule(&mut dice, spec.length, spec.auto_failover());
    let mut office = Office::start()?;
    // Each box's PBX data on a disk of its own (the nemesis fills it).
    for host in crate::office::BOXES {
        office.limit_disk(host, DISK_MB)?;
    }
    // The data center as a provider runs it: etcd at three sites, two of them serving.
    office.three_sites()?;
    // Each box's clock its own (the nemesis steps it).
    for host in crate::office::BOXES {
        office.own_clock(host)?;
    }
    if spec.auto_failover() {
        for host in crate::office::BOXES {
            let path = office.dir().join(host).join("agent.toml");
            let text = std::fs::read_to_string(&path)?;
            std::fs::write(&path, format!("auto_failover = true\n{text}"))?;
        }
    }
    office.activate("primary", 0)?;
    office.activate("backup", 1)?;
    office.start_agent("primary")?;
    office.start_agent("backup")?;
    office.wait_in_sync("backup", "primary")?;
    office.start_phone()?;
    office.first_answer_after(0, STEP)?;
    let watch = start_watch(&mut office)?;
    let mut work = workload::Workload::new(spec.seed ^ spec.run);
    let mut presses = Vec::new();
    let started = Instant::now();
    let start_ms = now_ms();
    let mut pending: Vec<&Planned> = report.schedule.iter().collect();
    let mut active: Vec<(Duration, Fault, u64)> = Vec::new();
    // Faults as they were in force: (fault, from, to) in ms.
    let mut history: Vec<(Fault, u64, u64)> = Vec::new();
    let mut deaths: Vec<u64> = Vec::new();
    while started.elapsed() < spec.length {
        let now = started.elapsed();
        while pending.first().is_some_and(|p| p.at <= now) {
            let next = pending.remove(0);
            let at = now_ms();
            let primary_host = watch
                .primary
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .and_then(|sid| host_of(&office, &sid));
            if let Fault::PowerOff(h) = next.fault
                && Some(h) == primary_host
            {
                deaths.push(at);
            }
            match nemesis::apply(&mut office, &next.fault, &mut presses) {
                Ok(()) => report.timeline.push((at, format!("fault: {next}"))),
                Err(err) => report
                    .timeline
                    .push((at, format!("fault {next} not done: {err:#}"))),
            }
            if next.hold > Duration::ZERO {
                active.push((next.at + next.hold, next.fault.clone(), at));
            } else {
                history.push((next.fault.clone(), at, at));
            }
        }
        let (due, still): (Vec<_>, Vec<_>) = active.into_iter().partition(|(end, ..)| *end <= now);
        active = still;
        for (_, fault, from) in due {
            let at = now_ms();
            heal(&mut office, &fault, &mut report.timeline);
            report.timeline.push((at, format!("healed: {fault:?}")));
            history.push((fault, from, at));
        }
        let primary = watch
            .primary
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .and_then(|sid| host_of(&office, &sid));
        let dead = |h: &str| {
            active
                .iter()
                .any(|(_, f, _)| matches!(f, Fault::PowerOff(x) if *x == h))
        };
        if let Some(host) = primary.filter(|h| !dead(h))
            && let Err(err) = work.tick(&office, host)
        {
            // A full disk, say: the office's PBX would fail to record too.
            let said = format!("workload on {host}: {err:#}");
            if report.timeline.last().map(|(_, t)| t) != Some(&said) {
                report.timeline.push((now_ms(), said));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // Heal everything, then the operator's runbook until the pair is whole again.
    let healing = now_ms();
    for (_, fault, from) in std::mem::take(&mut active) {
        heal(&mut office, &fault, &mut report.timeline);
        history.push((fault, from, now_ms()));
    }
    for mut press in presses {
        let _ = press.kill();
        let _ = press.wait();
    }
    report.timeline.push((healing, "healed everything".into()));
    report.converged = converge(&mut office, &watch, healing, &mut report.timeline);

    // The checker.
    let lines = watch
        .claims
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let claims: Vec<Claim> = checker::arp_claims(lines.iter().map(String::as_str), SHARED);
    report.split_brain = checker::split_brain_moments(&claims, 1_000);
    report.regressions =
        checker::regressions(&watch.generations.lock().unwrap_or_else(|p| p.into_inner()));
    {
        let looks = watch.looks.lock().unwrap_or_else(|p| p.into_inner());
        report.same_generation = checker::same_generation_primaries(&looks);
        // Each agent's role as it changed, for the timeline.
        let mut last: std::collections::HashMap<String, (String, u64)> = Default::default();
        for look in looks.iter() {
            let said = look.agents.iter().map(|(h, s, g)| (h, s.clone(), *g));
            let silent = look
                .silent
                .iter()
                .map(|(h, why)| (h, format!("lbs status failed: {why}"), 0));
            for (host, state, generation) in said.chain(silent) {
                let now = (state.clone(), generation);
                if last.get(host) != Some(&now) {
                    let what = if generation == 0 {
                        format!("{host}: {state}")
                    } else {
                        format!("{host}: {state} at generation {generation}")
                    };
                    report.timeline.push((look.at_ms, what));
                    last.insert(host.clone(), now);
                }
            }
        }
    }
    let answers = office.phone_answers().unwrap_or_default();
    let events = data_center_events(&office)?;
    let events: serde_json::Value = serde_json::from_str(&events)?;
    for event in events.as_array().into_iter().flatten() {
        let (Some(at), Some(actor)) = (event["at"].as_u64(), event["actor"].as_str()) else {
            continue;
        };
        if event["kind"] == "promoted" {
            report
                .timeline
                .push((at, format!("promoted by {actor}: {}", event["detail"])));
            if actor.contains("automatic") {
                // The primary it replaced: the other box.
                let new = event["sid"].as_str().and_then(|sid| host_of(&office, sid));
                let old = crate::office::BOXES.into_iter().find(|h| Some(*h) != new);
                let disabled = |from: u64, to: u64| {
                    history.iter().any(|(f, a, b)| {
                        old.is_some_and(|h| f.disables(h)) && *a <= to && *b >= from
                    })
                };
                if checker::false_promotion(at, 2_000, disabled, &answers) {
                    report.false_promotions.push(at);
                }
            }
        }
    }
    if spec.auto_failover() {
        // The phone's next answer after the silence the death began (an answer already on
        // its way when the box died does not end it).
        let mut sorted = answers.clone();
        sorted.sort_unstable();
        for death in deaths {
            let after: Vec<u64> = sorted.iter().copied().filter(|t| *t > death).collect();
            let back = std::iter::once(death)
                .chain(after.iter().copied())
                .zip(after.iter().copied())
                .find(|(before, at)| at - before > 500)
                .map(|(_, at)| at);
            if let Some(at) = back {
                let took = Duration::from_millis(at - death);
                report.death_to_answer.push(took);
                let quiet = !history.iter().any(|(fault, from, to)| {
                    let the_death = *from == death && matches!(fault, Fault::PowerOff(_));
                    !the_death && *from <= at && to + 10_000 >= death
                });
                if quiet {
                    report.death_to_answer_quiet.push(took);
                }
            }
        }
    }
    let final_primary = watch
        .primary
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .and_then(|sid| host_of(&office, &sid));
    report.torn_or_lost = work.check(&office, final_primary);
    report.timeline.push((now_ms(), work.summary()));
    // A run that converged only slowly gets the same attachments: its logs say why.
    let slow = report.converged.is_some_and(|took| took > SLOW_CONVERGE);
    if report.failed() || slow {
        let neigh = office
            .phone_neighbour()
            .unwrap_or_else(|e| format!("{e:#}"));
        let mut lan = format!(
            "the phone's sipp {}; its last answer {}; it sends to {neigh}",
            if office.phone_alive() {
                "runs"
            } else {
                "has ENDED"
            },
            answers
                .iter()
                .max()
                .map_or("never".to_owned(), |at| format!("at {at} ms"))
        );
        for host in crate::office::BOXES {
            let held = office.addresses(host).unwrap_or_else(|e| format!("{e:#}"));
            let (mac, pbx) = (
                office.mac(host).unwrap_or_default(),
                office.pbx_running(host),
            );
            lan.push_str(&format!(
                "\n{host} ({mac}): PBX {}; {held}",
                if pbx { "running" } else { "not running" }
            ));
        }
        report.attachments.push(("the LAN".into(), lan));
        for host in crate::office::BOXES {
            let status = office
                .lbs(host, &["status"])
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_else(|e| format!("{e:#}"));
            report
                .attachments
                .push((format!("{host}: lbs status"), status));
            let log = office.agent_said(host);
            let tail: Vec<&str> = log.lines().rev().take(300).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            report.attachments.push((
                format!("{host}: the agent's log, last 300 lines"),
                tail.join("\n"),
            ));
        }
    }
    for (at, what) in claims
        .iter()
        .map(|c| (c.at_ms, &c.mac))
        .filter(|(at, _)| report.split_brain.iter().any(|(a, b)| at >= a && at <= b))
    {
        report
            .timeline
            .push((at, format!("split brain: {what} claims {SHARED}")));
    }
    report
        .timeline
        .retain(|(at, _)| *at >= start_ms.saturating_sub(1_000));
    report.timeline.sort_by_key(|(at, _)| *at);
    drop(watch);
    Ok(report)
}

/// The data center's audit log as either serving site reads it, asked for up to 10 s (a site
/// just healed may need a moment); what each said if neither could.
fn data_center_events(office: &Office) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut said = Vec::new();
        for (site, _) in crate::office::SERVING {
            match office.datacenter_at(site, &["events", "--json"]) {
                Ok(events) => return Ok(events),
                Err(err) => said.push(format!("{site}: {err:#}")),
            }
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "neither serving site tells the data center's events: {}",
                said.join("; ")
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The runbook after healing: every box's agent running, B on a fenced box, P on the
/// backup when nobody serves for 10 s; converged when one box is primary (the data center's
/// primary), the other a backup in sync (verified), and the phone answered since. How long
/// it took from `healing`.
fn converge(
    office: &mut Office,
    watch: &Watch,
    healing: u64,
    timeline: &mut Vec<(u64, String)>,
) -> Option<Duration> {
    let deadline = Instant::now() + CONVERGE_WITHIN;
    let mut last_p = Instant::now();
    // What kept it from converging, as last seen (for the timeline of a run that does not).
    let mut why = String::from("nothing looked at yet");
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        let mut roles = Vec::new();
        for host in crate::office::BOXES {
            if office.agent_pid(host).is_err() {
                let _ = office.start_agent(host);
            }
            let state = office
                .status(host)
                .ok()
                .and_then(|s| s["role"]["state"].as_str().map(str::to_owned))
                .unwrap_or_default();
            if state == "fenced" {
                timeline.push((now_ms(), format!("runbook: B on {host} (fenced)")));
                let _ = office.demote(host);
            }
            roles.push((host, state));
        }
        let dc_primary = watch
            .primary
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .and_then(|sid| host_of(office, &sid));
        let primaries: Vec<&str> = roles
            .iter()
            .filter(|(_, s)| s == "primary")
            .map(|(h, _)| *h)
            .collect();
        if primaries.is_empty() && last_p.elapsed() > Duration::from_secs(10) {
            if let Some((host, _)) = roles.iter().find(|(_, s)| s == "backup") {
                timeline.push((now_ms(), format!("runbook: P on {host} (nobody serves)")));
                let _ = office.promote(host);
            }
            last_p = Instant::now();
        }
        let [primary] = primaries.as_slice() else {
            why = format!("roles {roles:?}");
            continue;
        };
        if dc_primary != Some(*primary) {
            why = format!("the data center's primary is {dc_primary:?}, the boxes' {primary}");
            continue;
        }
        let Some(backup) = crate::office::BOXES.into_iter().find(|h| h != primary) else {
            continue;
        };
        if !roles.iter().any(|(h, s)| *h == backup && s == "backup") {
            why = format!("roles {roles:?}");
            continue;
        }
        let answered = office
            .phone_answers()
            .map(|a| a.iter().any(|t| *t > healing))
            .unwrap_or(false);
        if !answered {
            why = "the phone not answered since healing".into();
            continue;
        }
        let synced = office.wait_in_sync(backup, primary);
        if let Err(err) = &synced {
            why = format!("{backup} not in sync: {err:#}");
        }
        if synced.is_ok() {
            let took = Duration::from_millis(now_ms().saturating_sub(healing));
            timeline.push((
                now_ms(),
                format!("converged: {primary} primary, {backup} in sync"),
            ));
            return Some(took);
        }
    }
    timeline.push((now_ms(), format!("NOT converged: {why}")));
    None
}

/// The line that ends a chaos command.
pub fn summary_line(reports: &[RunReport]) -> String {
    format!(
        "chaos: {} runs, {} split-brain moments, {} generation regressions, {} false promotions, {} torn or lost files, {} not converged",
        reports.len(),
        reports
            .iter()
            .map(RunReport::split_brain_count)
            .sum::<usize>(),
        reports.iter().map(|r| r.regressions.len()).sum::<usize>(),
        reports
            .iter()
            .map(|r| r.false_promotions.len())
            .sum::<usize>(),
        reports.iter().map(|r| r.torn_or_lost.len()).sum::<usize>(),
        reports.iter().filter(|r| r.converged.is_none()).count()
    )
}

/// Writes a run's schedule and timeline to `dir/run-<seed>-<run>.txt`; its path.
pub fn write_timeline(
    dir: &std::path::Path,
    spec: &RunSpec,
    report: &RunReport,
) -> anyhow::Result<PathBuf> {
    use std::fmt::Write;
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("run-{}-{}.txt", spec.seed, spec.run));
    let mut text = format!(
        "chaos run: --seed {} --run {} ({} s, automatic failover {})\n\nschedule:\n",
        spec.seed,
        spec.run,
        spec.length.as_secs(),
        if spec.auto_failover() { "on" } else { "off" }
    );
    for planned in &report.schedule {
        let _ = writeln!(text, "  {planned}");
    }
    let start = report.timeline.first().map_or(0, |(at, _)| *at);
    text.push_str("\ntimeline:\n");
    for (at, what) in &report.timeline {
        let _ = writeln!(
            text,
            "  +{:7.2} s  {what}",
            at.saturating_sub(start) as f64 / 1000.0
        );
    }
    let _ = writeln!(
        text,
        "\nsplit brain {:?} / same generation {:?}; regressions {:?}; false promotions {:?}; torn or lost {:?}; converged {:?}",
        report.split_brain,
        report.same_generation,
        report.regressions,
        report.false_promotions,
        report.torn_or_lost,
        report.converged
    );
    for (name, body) in &report.attachments {
        let _ = write!(text, "\n== {name}\n{body}\n");
    }
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Undoes `fault`, with what the box said on its way back (a boot's check) or the failure in
/// the timeline.
fn heal(office: &mut Office, fault: &Fault, timeline: &mut Vec<(u64, String)>) {
    match nemesis::heal(office, fault) {
        Ok(Some(said)) => timeline.push((now_ms(), format!("{fault:?}: {said}"))),
        Ok(None) => {}
        Err(err) => timeline.push((now_ms(), format!("healing {fault:?} failed: {err:#}"))),
    }
}
