//! `lbs-lab`: the lab's office (see `lbs_tests::office`) as a program, as root.
//!
//! - `lbs-lab demo [--sites 3] [--portal]`: the lifecycle narrated step by step — activation, the first full sync
//!   with a progress bar, the phone answered, a fresh voicemail's RPO, the primary's death,
//!   P with every step timed, the phone answered again (RTO), the old primary's reboot and
//!   B until in sync — then the timeline, and as its last line exactly
//!   `demo: RTO <s> s, RPO <s> s, <final sync verdict>`. What `cargo xtask demo` runs. With
//!   three sites the data center is etcd at dc1, dc2 and dc3 and a full site at dc1 and dc2,
//!   and dc1 goes dark before the primary dies: P goes through dc2.
//! - `lbs-lab bench --runs N`: the failover N times in a fresh office each, and the median
//!   RTO and RPO. What `cargo xtask bench failover` runs; the README quotes it.
//!
//! Ctrl-C removes everything the lab started (processes and namespaces) before it exits.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use lbs_tests::netns::{namespaces_with_prefix, process_prefix, remove_namespaces_with_prefix};
use lbs_tests::office::{BOXES, FQDN, Office, SETS, SHARED, STEP, generated_audio};

#[derive(Parser)]
#[command(about = "The lbs lab: an office and its data centers in network namespaces (root)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The lifecycle, narrated, with a timeline and the measured RTO and RPO.
    Demo {
        /// Data-center sites: 1 (one site on SQLite) or 3 (etcd at dc1, dc2 and dc3,
        /// `lbs-datacenter serve` at dc1 and dc2; dc1 goes dark before the primary dies).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=3))]
        sites: u8,
        /// Make an operator account for the portal, and at the end keep the lab (and the
        /// portal) up until Ctrl-C so a person can look.
        #[arg(long)]
        portal: bool,
    },
    /// Randomized fault runs with an independent checker (see `lbs_tests::chaos`); the
    /// last line counts what it found. A failed run prints how to replay it.
    Chaos {
        /// How many runs (each in a fresh office; automatic failover on in every other).
        #[arg(long, default_value_t = 10)]
        runs: u64,
        /// The seed every run's faults are drawn from (with its number).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Only this run of the seed (replays a failed one exactly).
        #[arg(long)]
        run: Option<u64>,
        /// How long the nemesis acts in each run, in seconds.
        #[arg(long, default_value_t = 90)]
        secs: u64,
        /// How many offices at once (each run's faults stay its own; more share the cores).
        #[arg(long, default_value_t = 1)]
        jobs: usize,
    },
    /// Fail over `runs` times, each in a fresh office; the median RTO and RPO.
    Bench {
        /// How many failovers.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !lbs_tests::is_root() {
        eprintln!(
            "lbs-lab needs root: it builds the office and the data centers in Linux network \
             namespaces (ip netns), moves IP addresses and runs a SIP server and phone in them"
        );
        return ExitCode::from(2);
    }
    watch_ctrl_c();
    let result = match cli.command {
        Command::Demo { sites: 2, .. } => Err(anyhow::anyhow!(
            "--sites 2 cannot survive the loss of a site (two members are no majority without both): use 1 or 3"
        )),
        Command::Demo { sites, portal } => demo(sites == 3, portal),
        Command::Bench { runs } => bench(runs),
        Command::Chaos {
            runs,
            seed,
            run,
            secs,
            jobs,
        } => chaos(runs, seed, run, secs, jobs),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("lbs-lab: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The demo's last line once it is done and the lab only waits for Ctrl-C (`--portal`).
static DONE: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// On Ctrl-C: every namespace of this process's labs goes, with everything in it.
fn watch_ctrl_c() {
    std::thread::spawn(|| {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        if runtime.block_on(tokio::signal::ctrl_c()).is_ok() {
            let removed = remove_namespaces_with_prefix(&process_prefix()).unwrap_or_default();
            lbs_tests::office::unmount_disks();
            lbs_tests::office::remove_office_dirs();
            let done = DONE.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(last_line) = done {
                // `demo --portal` waiting for a person to be done looking: a good end.
                println!(
                    "\nremoved {} namespaces and everything running in them\n{last_line}",
                    removed.len()
                );
                std::process::exit(0);
            }
            eprintln!(
                "\nlbs-lab: interrupted; removed {} namespaces and everything running in them",
                removed.len()
            );
            std::process::exit(130);
        }
    });
}

/// The steps and how long each took.
struct Timeline {
    started: Instant,
    steps: Vec<(String, Duration)>,
}

impl Timeline {
    fn new() -> Timeline {
        Timeline {
            started: Instant::now(),
            steps: Vec::new(),
        }
    }

    fn step<T>(&mut self, name: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
        println!("\n--- {name}");
        let started = Instant::now();
        let result = f().with_context(|| format!("step {name:?}"))?;
        self.steps.push((name.to_owned(), started.elapsed()));
        Ok(result)
    }

    fn print(&self) {
        println!("\n=== timeline");
        let mut at = Duration::ZERO;
        for (name, took) in &self.steps {
            println!(
                "  +{:>7.2} s  {:>6.2} s  {name}",
                at.as_secs_f64(),
                took.as_secs_f64()
            );
            at += *took;
        }
        println!("  total {:.2} s", self.started.elapsed().as_secs_f64());
    }
}

fn indent(text: &str) {
    for line in text.lines() {
        println!("    {line}");
    }
}

/// The bytes under `host`'s sync sets now.
fn bytes_on(office: &Office, host: &str) -> u64 {
    fn walk(dir: &std::path::Path) -> u64 {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        entries
            .flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => walk(&e.path()),
                Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
                _ => 0,
            })
            .sum()
    }
    SETS.iter()
        .map(|(name, _)| walk(&office.set_dir(host, name)))
        .sum()
}

fn demo(three_sites: bool, look: bool) -> anyhow::Result<()> {
    let mut timeline = Timeline::new();
    let mut office = timeline.step(
        "the office and the data centers come up in network namespaces",
        || {
            let office = Office::start()?;
            indent(
                "office LAN 192.168.1.0/24: primary .2 (the phones' PBX address), backup .3, \
                 phone .10, router .1\nWAN 10.20.0.0/24: dc1 .11 (lbs-datacenter, BIND 9 for \
                 acme.example), dc2 .12\neach box: lbs agent, its PBX (kamailio) started and \
                 stopped by the agent's hooks",
            );
            Ok(office)
        },
    )?;
    // The portal on dc1 (one site; with three, dc1 goes dark), reachable from this machine.
    let portal = if three_sites {
        None
    } else {
        Some(timeline.step(
            "the provider's portal on dc1, forwarded to this machine",
            || portal(&office, look),
        )?)
    };
    if three_sites {
        timeline.step(
            "three sites, one authority: etcd at dc1, dc2 and dc3; dc1's records move into it",
            || {
                office.three_sites()?;
                indent(
                    "etcd members at dc1 .11, dc2 .12 and the witness dc3 .13 (any two are a \
                     majority)\nlbs-datacenter migrate --to etcd at dc1; lbs-datacenter serve \
                     at dc1 and dc2 on the shared store\nBIND moved to dc3; the DNS updates are \
                     sent by one site at a time",
                );
                Ok(())
            },
        )?;
    }
    let media = timeline.step(
        "the primary holds a PBX's data: real Asterisk prompts, music on hold, voicemail",
        || {
            let bytes = office.load_media("primary")?;
            println!("    {:.1} MB in 5 sync sets", bytes as f64 / 1e6);
            Ok(bytes)
        },
    )?;
    for (n, host) in BOXES.into_iter().enumerate() {
        let title = if n == 0 {
            "the primary activates first with its SID and key: it becomes the PRIMARY"
        } else {
            "the backup activates second: it becomes the BACKUP of the same pair"
        };
        timeline.step(title, || {
            indent(&office.activate(host, n)?);
            Ok(())
        })?;
    }
    timeline.step("both agents start; the backup's first full sync", || {
        office.start_agent("primary")?;
        office.start_agent("backup")?;
        let bar = indicatif::ProgressBar::new(media);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "    {bar:40} {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        let started = Instant::now();
        while started.elapsed() < STEP {
            let copied = bytes_on(&office, "backup");
            bar.set_position(copied.min(media));
            if copied >= media {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bar.finish();
        office.wait_in_sync("backup", "primary")?;
        println!(
            "    in sync after {:.2} s, every set checked by BLAKE3 (lbs sync verify)",
            started.elapsed().as_secs_f64()
        );
        Ok(())
    })?;
    timeline.step(
        "the phone asks the PBX at 192.168.1.2 (SIP OPTIONS, 10 a second): the primary answers",
        || {
            office.start_phone()?;
            office.first_answer_after(0, STEP)?;
            println!("    answered by the primary's kamailio; the backup's PBX is stopped");
            Ok(())
        },
    )?;
    timeline.step(
        "DNS: the data center points pbx.acme.example at the primary",
        || {
            office.wait("BIND to answer with the primary", STEP, |o| {
                Ok(o.dig(FQDN)? == [SHARED])
            })?;
            println!("    dig @{} {FQDN} -> {SHARED}", office.dns_server());
            Ok(())
        },
    )?;
    let rpo = timeline.step(
        "a fresh voicemail on the primary reaches the backup, verified (RPO)",
        || {
            let rpo = office.measure_rpo("primary", "backup", 0)?;
            println!("    RPO {:.2} s", rpo as f64 / 1000.0);
            Ok(rpo)
        },
    )?;
    timeline.step("lbs status on the backup", || {
        let out = office.lbs("backup", &["status"])?;
        indent(&String::from_utf8_lossy(&out.stdout));
        Ok(())
    })?;
    timeline.step(
        "the backup's own /metrics (metrics_listen, its loopback): each set's lag",
        || {
            let metrics = office.box_metrics("backup")?;
            let lags: Vec<&str> = metrics
                .lines()
                .filter(|l| l.starts_with("lbs_box_set_lag_seconds{"))
                .collect();
            if lags.is_empty() {
                bail!("no lbs_box_set_lag_seconds in the backup's /metrics:\n{metrics}");
            }
            indent(&lags.join("\n"));
            Ok(())
        },
    )?;
    if three_sites {
        timeline.step(
            "dc1 goes dark: its lbs-datacenter and etcd killed, its cable out",
            || {
                office.site_dark("dc1")?;
                office.wait_reporting_to("dc2", &BOXES)?;
                println!("    both boxes report to dc2 now; dc2 and dc3 are the majority");
                Ok(())
            },
        )?;
    }
    let died = timeline.step(
        "the primary dies: power off, its switch port goes dark; the data center loses it",
        || {
            let died = lbs_tests::office::now_ms();
            office.power_off("primary")?;
            office.wait_primary_gone("backup")?;
            Ok(died)
        },
    )?;
    let pressed = timeline.step(
        "P on the backup: data center, address 192.168.1.2, PBX — each step timed",
        || {
            let (pressed, said) = office.promote("backup")?;
            indent(&said);
            Ok(pressed)
        },
    )?;
    let rto = timeline.step(
        "the same phone is answered again at 192.168.1.2, now by the backup (RTO)",
        || {
            let answered = office.first_answer_after(pressed, STEP)?;
            let rto = answered.saturating_sub(pressed);
            // Nobody answered in between: the dead primary is dead, the backup not yet up.
            let between = office
                .phone_answers()?
                .into_iter()
                .filter(|at| *at > died + 500 && *at < pressed)
                .count();
            if between > 0 {
                bail!("{between} answers while neither box should have answered");
            }
            println!(
                "    the phone went unanswered for {:.2} s, from the primary's death to P's end",
                answered.saturating_sub(died) as f64 / 1000.0
            );
            println!(
                "    RTO {:.2} s from pressing P to the phone's first answered request",
                rto as f64 / 1000.0
            );
            if office.dig(FQDN)? != [SHARED] {
                bail!("DNS does not point {FQDN} at {SHARED}");
            }
            println!("    DNS: {FQDN} -> {SHARED}, the new primary");
            Ok(rto)
        },
    )?;
    timeline.step(
        "a voicemail arrives during the outage, on the new primary",
        || {
            let inbox = office
                .set_dir("backup", "voicemail")
                .join("default/1234/INBOX");
            std::fs::write(inbox.join("msg0050.wav"), generated_audio(50, 90_000))?;
            Ok(())
        },
    )?;
    timeline.step(
        "the repaired primary reboots: it finds 192.168.1.2 taken before its network starts",
        || {
            indent(&office.boot("primary")?);
            office.wait("the old primary to step back", STEP, |o| {
                Ok(o.status("primary")?["role"]["state"] == "fenced")
            })?;
            println!("    FENCED: its PBX stopped, at its own address 192.168.1.3");
            Ok(())
        },
    )?;
    let verdict = timeline.step(
        "B on the old primary: it becomes the backup and re-syncs until in sync",
        || {
            indent(&office.demote("primary")?);
            Ok(match office.wait_in_sync("primary", "backup") {
                Ok(()) => "in sync".to_owned(),
                Err(err) => format!("NOT in sync ({err:#})"),
            })
        },
    )?;
    let last_line = format!(
        "demo: RTO {:.2} s, RPO {:.2} s, {verdict}",
        rto as f64 / 1000.0,
        rpo as f64 / 1000.0
    );
    if let (Some(portal), true) = (&portal, look) {
        timeline.print();
        println!("{last_line}");
        *DONE.lock().unwrap_or_else(|p| p.into_inner()) = Some(last_line);
        println!(
            "\nThe lab stays up: the portal is at {} (log in as `demo`, password above; the \
             certificate is signed by {}). Ctrl-C ends the lab.",
            portal.url,
            office.dc_dir().join("ca.pem").display()
        );
        // Ctrl-C's handler removes every namespace and exits.
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    timeline.step("everything stops; the namespaces are removed", || {
        let prefix = office.lab.prefix().to_owned();
        drop(office);
        let left = namespaces_with_prefix(&prefix)?;
        if !left.is_empty() {
            bail!("namespaces left behind: {left:?}");
        }
        Ok(())
    })?;
    timeline.print();
    println!("{last_line}");
    Ok(())
}

/// The portal as the demo shows it: forwarded from dc1 to this machine's loopback.
struct Portal {
    url: String,
    _forward: lbs_tests::netns::Forward,
}

/// Forwards the portal to this machine and checks it answers (`/healthz`); with `account`,
/// makes the operator account `demo` with a fresh password, both printed.
fn portal(office: &Office, account: bool) -> anyhow::Result<Portal> {
    let forward = office.portal_forward()?;
    let url = format!("https://127.0.0.1:{}", forward.port);
    let ca = office.dc_dir().join("ca.pem");
    let health = std::process::Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "10", "--cacert"])
        .arg(&ca)
        .arg(format!("{url}/healthz"))
        .output()
        .context("running curl (cargo xtask demo installs it)")?;
    if !health.status.success() {
        bail!(
            "the portal does not answer at {url}: {}",
            String::from_utf8_lossy(&health.stderr).trim()
        );
    }
    println!("    {url} (forwarded to dc1:7443) answers /healthz");
    if account {
        let password = format!("demo-{:016x}", rand_u64());
        office.datacenter_with_input(
            &[
                "user",
                "add",
                "demo",
                "--role",
                "operator",
                "--password-stdin",
            ],
            &format!("{password}\n"),
        )?;
        println!("    log in as demo, password {password} (an operator: may promote)");
    } else {
        println!(
            "    cargo xtask demo --portal makes an account and keeps the lab up at the end to look"
        );
    }
    Ok(Portal {
        url,
        _forward: forward,
    })
}

/// A number nobody guesses, for the demo's one-off password.
fn rand_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if let Ok(mut urandom) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut urandom, &mut bytes);
    }
    u64::from_le_bytes(bytes)
}

fn chaos(runs: u64, seed: u64, only: Option<u64>, secs: u64, jobs: usize) -> anyhow::Result<()> {
    use lbs_tests::chaos::{self, RunReport, RunSpec};
    let target = std::env::current_exe()?
        .ancestors()
        .nth(2)
        .map(|t| t.join("chaos"))
        .context("the target directory")?;
    let which: Vec<u64> = match only {
        Some(k) => vec![k],
        None => (0..runs).collect(),
    };
    if jobs == 0 {
        bail!("--jobs must be at least 1");
    }
    std::fs::create_dir_all(&target)?;
    let output = target.join("lab-output.log");
    lbs_tests::netns::echo_to(&output)?;
    println!(
        "(the lab's processes' output: {}; each run's timeline next to it)",
        output.display()
    );
    // Each worker takes the next run; a run's lines are printed together when it ends.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let (done, finished) = std::sync::mpsc::channel::<(String, RunReport)>();
    let mut reports = Vec::new();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        for _ in 0..jobs.min(which.len()) {
            let (done, next, which, target) = (done.clone(), &next, &which, &target);
            scope.spawn(move || {
                while let Some(&k) =
                    which.get(next.fetch_add(1, std::sync::atomic::Ordering::SeqCst))
                {
                    let spec = RunSpec {
                        seed,
                        run: k,
                        length: Duration::from_secs(secs),
                    };
                    let (text, report) = chaos_run(&spec, target);
                    if done.send((text, report)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(done);
        for (text, report) in finished {
            print!("{text}");
            reports.push(report);
        }
        Ok(())
    })?;
    let mut converge: Vec<f64> = reports
        .iter()
        .filter_map(|r| r.converged.map(|d| d.as_secs_f64()))
        .collect();
    converge.sort_by(f64::total_cmp);
    let mut answer: Vec<f64> = reports
        .iter()
        .flat_map(|r| r.death_to_answer.iter().map(Duration::as_secs_f64))
        .collect();
    answer.sort_by(f64::total_cmp);
    let at = |v: &[f64], q: f64| {
        v.get(((v.len() as f64 - 1.0) * q).round() as usize)
            .copied()
    };
    let show = |v: &[f64]| match (at(v, 0.0), at(v, 0.5), at(v, 0.95), at(v, 1.0)) {
        (Some(min), Some(median), Some(p95), Some(max)) => {
            format!(
                "min {min:.1} s, median {median:.1} s, p95 {p95:.1} s, max {max:.1} s ({} values)",
                v.len()
            )
        }
        _ => "none".to_owned(),
    };
    println!("time to converge after healing: {}", show(&converge));
    println!(
        "automatic failover, the primary's death to the phone's next answer: {}",
        show(&answer)
    );
    let mut quiet: Vec<f64> = reports
        .iter()
        .flat_map(|r| r.death_to_answer_quiet.iter().map(Duration::as_secs_f64))
        .collect();
    quiet.sort_by(f64::total_cmp);
    println!(
        "  of them with nothing else wrong from 10 s before the death: {}",
        show(&quiet)
    );
    println!("{}", chaos::summary_line(&reports));
    if reports.iter().any(RunReport::failed) {
        bail!("some runs failed (their seeds and timelines above)");
    }
    Ok(())
}

/// One chaos run and what to print about it.
fn chaos_run(
    spec: &lbs_tests::chaos::RunSpec,
    target: &std::path::Path,
) -> (String, lbs_tests::chaos::RunReport) {
    use lbs_tests::chaos::{self, RunReport};
    use std::fmt::Write;
    let (seed, k, secs) = (spec.seed, spec.run, spec.length.as_secs());
    let mut text = format!(
        "==> run {k} of seed {seed}: {secs} s of faults, automatic failover {}\n",
        if spec.auto_failover() { "on" } else { "off" }
    );
    let report = chaos::run(spec).unwrap_or_else(|err| {
        let _ = writeln!(text, "    the run could not be carried out: {err:#}");
        RunReport::default()
    });
    let path = match chaos::write_timeline(target, spec, &report) {
        Ok(path) => path.display().to_string(),
        Err(err) => format!("(not written: {err:#})"),
    };
    let _ = writeln!(
        text,
        "    {} faults; split brain {}, regressions {}, false promotions {}, torn or lost {}, {}",
        report.schedule.len(),
        report.split_brain_count(),
        report.regressions.len(),
        report.false_promotions.len(),
        report.torn_or_lost.len(),
        match report.converged {
            Some(took) => format!("converged {:.1} s after healing", took.as_secs_f64()),
            None => "NOT converged".into(),
        }
    );
    for took in &report.death_to_answer {
        let quiet = report.death_to_answer_quiet.contains(took);
        let _ = writeln!(
            text,
            "    the primary's death to the phone's next answer: {:.1} s{}",
            took.as_secs_f64(),
            if quiet { " (nothing else wrong)" } else { "" }
        );
    }
    if report.failed() {
        let _ = writeln!(
            text,
            "    FAILED: replay with `cargo xtask chaos --seed {seed} --run {k} --secs {secs}`; schedule and timeline in {path}"
        );
        for planned in &report.schedule {
            let _ = writeln!(text, "      {planned}");
        }
        for finding in &report.torn_or_lost {
            let _ = writeln!(text, "      {finding}");
        }
    }
    (text, report)
}

fn bench(runs: usize) -> anyhow::Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let (mut rtos, mut rpos) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        let mut office = Office::start()?;
        office.bring_up_pair()?;
        office.start_phone()?;
        office.first_answer_after(0, STEP)?;
        let rpo = office.measure_rpo("primary", "backup", 0)?;
        let (rto, _) = office.fail_over("primary", "backup")?;
        println!(
            "run {run}/{runs}: RTO {:.2} s, RPO {:.2} s",
            rto as f64 / 1000.0,
            rpo as f64 / 1000.0
        );
        rtos.push(rto);
        rpos.push(rpo);
    }
    let median = |values: &mut Vec<u64>| {
        values.sort_unstable();
        values[values.len() / 2] as f64 / 1000.0
    };
    let range = |values: &[u64]| {
        format!(
            "{:.2}–{:.2} s",
            values[0] as f64 / 1000.0,
            values[values.len() - 1] as f64 / 1000.0
        )
    };
    let (rto, rpo) = (median(&mut rtos), median(&mut rpos));
    println!(
        "failover over {runs} runs: RTO median {rto:.2} s ({}), RPO median {rpo:.2} s ({})",
        range(&rtos),
        range(&rpos)
    );
    Ok(())
}
