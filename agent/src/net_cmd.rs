//! `lbs net probe | take-over | give-up`: the network takeover by hand, as the agent will run
//! it on P and B (for testing, and for an operator at 2 a.m. who wants to see each step).

use std::net::Ipv4Addr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use lbs_netconfig::{
    Arp, ConflictWatch, Ipv4Cidr, NetBackend, Netlink, PacketArp, ProbeProfile, ProbeResult,
    Refresh, StepReport, TakeoverError, TakeoverPlan, give_up_observed, take_over_observed,
};

/// Probe timing.
#[derive(Args, Debug, Clone, Copy)]
pub struct ProbeArgs {
    /// Probe with RFC 5227's full timing (about 4 s) instead of the fast LAN profile (140 ms).
    #[arg(long)]
    rfc5227: bool,
}

impl ProbeArgs {
    fn arp(self) -> PacketArp {
        PacketArp::new(if self.rfc5227 {
            ProbeProfile::RFC5227
        } else {
            ProbeProfile::FAST
        })
    }
}

/// `lbs net probe`.
#[derive(Args, Debug)]
pub struct ProbeCmd {
    /// The interface to probe on.
    #[arg(long, short)]
    interface: String,
    /// The address to ask about.
    ip: Ipv4Addr,
    #[command(flatten)]
    timing: ProbeArgs,
}

/// `lbs net take-over` and `lbs net give-up`.
#[derive(Args, Debug)]
pub struct MoveCmd {
    /// The office interface.
    #[arg(long, short)]
    interface: String,
    /// This box's own address (given up while it holds the shared one), e.g. 192.168.1.3/24.
    #[arg(long)]
    from: Ipv4Cidr,
    /// The shared address the phones use, e.g. 192.168.1.2/24.
    #[arg(long)]
    to: Ipv4Cidr,
    /// The office gateway.
    #[arg(long)]
    gateway: Ipv4Addr,
    /// Take the address even if another machine answers ARP for it.
    #[arg(long)]
    force: bool,
    /// Also change the boot configuration (systemd-networkd, ifupdown, NetworkManager or
    /// ifcfg, whichever owns the interface), keeping the old file in --backups.
    #[arg(long)]
    persist: bool,
    /// The root under which the boot configuration lives.
    #[arg(long, value_name = "DIR", default_value = "/")]
    config_root: std::path::PathBuf,
    /// Where previous versions of the configuration are kept.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/lbs/netconfig-backups"
    )]
    backups: std::path::PathBuf,
    /// After the change, keep re-announcing the address for this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    refresh_for: u64,
    /// Seconds between those announcements.
    #[arg(long, value_name = "SECS", default_value_t = 2)]
    refresh_every: u64,
    /// For crash tests: end the process right after the step of this name ends ("add
    /// address", "drop old address", …), with no rollback, as a power cut would; exit 134.
    #[arg(long, value_name = "STEP", hide = true)]
    crash_after: Option<String>,
    #[command(flatten)]
    timing: ProbeArgs,
}

/// `lbs net preflight`.
#[derive(Args, Debug)]
pub struct PreflightCmd {
    /// The office interface.
    #[arg(long, short)]
    interface: String,
    /// The partner box's own address.
    #[arg(long)]
    partner: Ipv4Addr,
    /// The root under which the boot configuration lives.
    #[arg(long, value_name = "DIR", default_value = "/")]
    config_root: std::path::PathBuf,
    #[command(flatten)]
    timing: ProbeArgs,
}

/// `lbs net inventory`.
#[derive(Args, Debug)]
pub struct InventoryCmd {
    /// Print it as JSON (to hand to the partner's `--compare`).
    #[arg(long)]
    json: bool,
    /// Compare with the partner's inventory (JSON from its `lbs net inventory --json`) and
    /// name every difference; exit 3 if there is one.
    #[arg(long, value_name = "FILE")]
    compare: Option<std::path::PathBuf>,
}

/// `lbs net watch`.
#[derive(Args, Debug)]
pub struct WatchCmd {
    /// The interface to watch on.
    #[arg(long, short)]
    interface: String,
    /// This box's address.
    ip: Ipv4Addr,
    /// How long to watch, seconds.
    #[arg(long = "for", value_name = "SECS", default_value_t = 60)]
    seconds: u64,
}

impl MoveCmd {
    fn plan(&self) -> TakeoverPlan {
        TakeoverPlan {
            interface: self.interface.clone(),
            from: self.from,
            to: self.to,
            gateway: self.gateway,
            force: self.force,
            persist: self.persist.then(|| lbs_netconfig::PersistTo {
                root: self.config_root.clone(),
                backups: self.backups.clone(),
            }),
        }
    }
}

/// `lbs net probe`: exit 0 if the address is free, 3 if someone answers (and who).
pub async fn probe(cmd: ProbeCmd) -> anyhow::Result<ExitCode> {
    let net = Netlink::open()?;
    let link = net.link(&cmd.interface).await?;
    match cmd.timing.arp().probe(&link, cmd.ip).await? {
        ProbeResult::Free => {
            println!("{}: nobody answers ARP for it on {}", cmd.ip, link.name);
            Ok(ExitCode::SUCCESS)
        }
        ProbeResult::InUse(mac) => {
            println!("{}: in use by {mac} on {}", cmd.ip, link.name);
            Ok(ExitCode::from(3))
        }
    }
}

/// The exit status of a `--crash-after` stop.
pub const CRASH_EXIT: i32 = 134;

/// Which way to move.
#[derive(Debug, Clone, Copy)]
pub enum Direction {
    /// Take the shared address.
    TakeOver,
    /// Give it back.
    GiveUp,
}

/// `lbs net take-over` / `lbs net give-up`: the timed steps, then the outcome.
pub async fn run(cmd: MoveCmd, direction: Direction) -> anyhow::Result<ExitCode> {
    let net = Netlink::open()?;
    let arp = cmd.timing.arp();
    let plan = cmd.plan();
    let verb = match direction {
        Direction::TakeOver => "taking over",
        Direction::GiveUp => "giving up",
    };
    println!("{verb} on {}:", plan.interface);
    // Each step is printed as it ends, so a slow one shows where it is.
    let crash_after = cmd.crash_after.clone();
    let mut on_step = move |step: &StepReport| {
        println!("{step}");
        if crash_after.as_deref() == Some(step.step.to_string().as_str()) {
            use std::io::Write;
            let _ = std::io::stdout().flush();
            eprintln!("lbs: --crash-after {}: stopping dead", step.step);
            // No destructor, no rollback, no core file: as if the power went.
            std::process::exit(CRASH_EXIT);
        }
    };
    let outcome = match direction {
        Direction::TakeOver => take_over_observed(&net, &arp, &plan, &mut on_step).await,
        Direction::GiveUp => give_up_observed(&net, &arp, &plan, &mut on_step).await,
    };
    match outcome {
        Ok(report) => {
            println!("{}", report.summary());
            for warning in report.warnings() {
                eprintln!("warning: {}: {:?}", warning.step, warning.outcome);
            }
            if cmd.refresh_for > 0 {
                let held = match direction {
                    Direction::TakeOver => plan.to.addr,
                    Direction::GiveUp => plan.from.addr,
                };
                let link = net.link(&plan.interface).await?;
                println!(
                    "re-announcing {held} every {} s for {} s",
                    cmd.refresh_every, cmd.refresh_for
                );
                let refresh = Refresh::start(
                    arp.clone(),
                    link,
                    held,
                    Duration::from_secs(cmd.refresh_every),
                    Duration::from_secs(cmd.refresh_for),
                );
                println!("sent {} announcement(s)", refresh.finish().await);
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(err) => {
            println!("{}", err.report().summary());
            let code = match err {
                TakeoverError::InUse { .. } => 3,
                _ => 1,
            };
            eprintln!("lbs: {err}");
            Ok(ExitCode::from(code))
        }
    }
}

/// `lbs net watch`: reports every other MAC claiming the address, and carrier changes; exit
/// 3 if another MAC claimed it.
pub async fn watch(cmd: WatchCmd) -> anyhow::Result<ExitCode> {
    let net = Netlink::open()?;
    let link = net.link(&cmd.interface).await?;
    let mut watch = ConflictWatch::start(&link, cmd.ip)?;
    let mut carrier = net.carrier_events(&link).await?;
    println!(
        "watching {} on {} ({}) for {} s",
        cmd.ip, link.name, link.mac, cmd.seconds
    );
    let deadline = tokio::time::sleep(Duration::from_secs(cmd.seconds));
    tokio::pin!(deadline);
    let mut seen = 0u32;
    loop {
        tokio::select! {
            () = &mut deadline => break,
            conflict = watch.next() => match conflict {
                Some(conflict) => {
                    seen += 1;
                    println!("conflict: {} claimed by {}", conflict.ip, conflict.mac);
                }
                None => break,
            },
            change = carrier.next() => match change {
                Some(true) => println!("carrier: back on {}", link.name),
                Some(false) => println!("carrier: lost on {}", link.name),
                None => break,
            },
        }
    }
    watch
        .stop()
        .await
        .map_err(|e| anyhow::anyhow!("watching {} failed: {e}", cmd.ip))?;
    Ok(if seen == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

/// `lbs net inventory`: this box's hardware, or how it differs from the partner's.
pub fn inventory(cmd: &InventoryCmd) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    let ours =
        <lbs_netconfig::inventory::Inventory as lbs_netconfig::inventory::Collect>::collect()?;
    if let Some(path) = &cmd.compare {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the partner's inventory {}", path.display()))?;
        let theirs: lbs_netconfig::inventory::Inventory = serde_json::from_str(&text)
            .with_context(|| {
                format!(
                    "{} is not an inventory from `lbs net inventory --json`",
                    path.display()
                )
            })?;
        let differences = ours.compare(&theirs);
        if differences.is_empty() {
            println!("the hardware matches the partner's");
            return Ok(ExitCode::SUCCESS);
        }
        for difference in &differences {
            println!("{difference}");
        }
        return Ok(ExitCode::from(3));
    }
    if cmd.json {
        println!("{}", serde_json::to_string_pretty(&ours)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("CPU        {} × {}", ours.cpus, ours.cpu_model);
    println!(
        "memory     {:.1} GiB",
        ours.memory_bytes as f64 / f64::from(1u32 << 30)
    );
    for disk in &ours.disks {
        let kind = if disk.rotational { "disk" } else { "SSD" };
        println!(
            "{kind:<10} {} {:.1} GiB",
            disk.name,
            disk.bytes as f64 / f64::from(1u32 << 30)
        );
    }
    for nic in &ours.nics {
        let speed = nic
            .speed_mbps
            .map_or("no link".to_owned(), |s| format!("{s} Mb/s"));
        println!("NIC        {} {} {speed}", nic.name, nic.mac);
    }
    if ours.telephony.is_empty() {
        println!("telephony  no card of a known vendor");
    }
    for card in &ours.telephony {
        println!("telephony  {card}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `lbs net preflight`: every check with its outcome; exit 3 if any is a problem.
pub async fn preflight(cmd: PreflightCmd) -> anyhow::Result<ExitCode> {
    use lbs_netconfig::preflight::Severity;
    let net = Netlink::open()?;
    let findings = lbs_netconfig::preflight::preflight(
        &net,
        &cmd.timing.arp(),
        &cmd.interface,
        cmd.partner,
        Some(&cmd.config_root),
    )
    .await;
    for finding in &findings {
        println!("{finding}");
    }
    Ok(
        if findings.iter().any(|f| f.severity == Severity::Problem) {
            ExitCode::from(3)
        } else {
            ExitCode::SUCCESS
        },
    )
}
