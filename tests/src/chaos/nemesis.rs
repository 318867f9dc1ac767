//! The nemesis: a random schedule of faults drawn from a seed (the same seed, the same
//! schedule), and how each is done to the lab's office and undone.

use std::time::Duration;

use anyhow::Context;

use crate::fleet::Dice;
use crate::office::{DC1, DC2, Office};
use crate::workspace_binary;

/// A box of the office, by its lab name (its role changes; the name does not).
pub type Host = &'static str;

/// A data-center site, by its lab name: `dc1` and `dc2` serve, `dc3` only votes.
pub type Site = &'static str;

/// One fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// kill -9 of the agent (its PBX and addresses stay); undone: started again.
    KillAgent(Host),
    /// SIGSTOP of the agent; undone: SIGCONT.
    FreezeAgent(Host),
    /// The box's LAN cable out; undone: in.
    Cable(Host),
    /// The router's office cable out (both boxes lose the data center); undone: in.
    RouterCable,
    /// The box cut off from the data center only (blackhole routes); undone: removed.
    PartitionDc(Host),
    /// Packet loss and delay on the box's link (`tc netem`); undone: removed.
    Netem {
        host: Host,
        loss_pct: u8,
        delay_ms: u16,
    },
    /// Every process of the box killed and its port dark; undone: it boots.
    PowerOff(Host),
    /// kill -9 of the site's `lbs-datacenter serve`; undone: started again.
    DcRestart(Site),
    /// SIGSTOP of the site's `lbs-datacenter serve`; undone: SIGCONT.
    DcFreeze(Site),
    /// kill -9 of the site's etcd member; undone: started again on its data.
    EtcdRestart(Site),
    /// The site cut off from the other sites (the offices still reach it); undone: joined.
    SiteCut(Site),
    /// The box's disk (a tmpfs of its own for the PBX's data) filled to the last byte;
    /// undone: the filler removed.
    DiskFull(Host),
    /// The box's wall clock stepped by this many seconds (its agent's, see
    /// [`Office::step_clock`]); undone: stepped back.
    ClockStep { host: Host, secs: i16 },
    /// P pressed on the box (refused or not).
    PressP(Host),
    /// B pressed on the box (refused or not).
    PressB(Host),
}

impl Fault {
    /// What the fault holds while it lasts: a box's name, `dc`, `router`, or nothing (a key
    /// press is over at once).
    fn holds(&self) -> Option<&'static str> {
        match self {
            Fault::KillAgent(h)
            | Fault::FreezeAgent(h)
            | Fault::Cable(h)
            | Fault::PartitionDc(h)
            | Fault::Netem { host: h, .. }
            | Fault::PowerOff(h)
            | Fault::DiskFull(h)
            | Fault::ClockStep { host: h, .. } => Some(*h),
            Fault::RouterCable => Some("router"),
            // One site at a time: the data center is built to lose any one of its three.
            Fault::DcRestart(_)
            | Fault::DcFreeze(_)
            | Fault::EtcdRestart(_)
            | Fault::SiteCut(_) => Some("sites"),
            Fault::PressP(_) | Fault::PressB(_) => None,
        }
    }

    /// Whether the box `host` cannot serve the phone while this lasts (its PBX dead or off
    /// the LAN): an automatic promotion then is a real failover.
    pub fn disables(&self, host: &str) -> bool {
        match self {
            Fault::PowerOff(h) | Fault::Cable(h) => *h == host,
            _ => false,
        }
    }
}

/// A fault at `at` (from the run's start), lasting `hold`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    pub at: Duration,
    pub hold: Duration,
    pub fault: Fault,
}

impl std::fmt::Display for Planned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "+{:6.2} s  {:?} for {:.1} s",
            self.at.as_secs_f64(),
            self.fault,
            self.hold.as_secs_f64()
        )
    }
}

/// The faults of a run of `length` drawn from `dice`: one every 1–6 s, each lasting 2–12 s
/// (a power-off or a pulled cable 3–20 s),
/// a box (or the router, or the data center's sites) in at most one fault at a time, all over
/// `length` before its end so the healing starts from a known point. With automatic failover
/// (`auto`) power-offs are drawn three times as often: each box's death is what it is for.
pub fn schedule(dice: &mut Dice, length: Duration, auto: bool) -> Vec<Planned> {
    const HOSTS: [Host; 2] = ["primary", "backup"];
    const SERVING: [Site; 2] = ["dc1", "dc2"];
    const SITES: [Site; 3] = ["dc1", "dc2", "dc3"];
    let mut planned: Vec<Planned> = Vec::new();
    let mut at = Duration::from_secs(2);
    let kinds = if auto { 18 } else { 16 };
    while at < length {
        let host = HOSTS[dice.below(2)];
        let fault = match dice.below(kinds) {
            0 => Fault::KillAgent(host),
            1 => Fault::FreezeAgent(host),
            2 => Fault::Cable(host),
            3 => Fault::RouterCable,
            4 => Fault::PartitionDc(host),
            5 | 6 => Fault::Netem {
                host,
                loss_pct: 5 + dice.below(16) as u8,
                delay_ms: 20 + dice.below(180) as u16,
            },
            7 | 16 | 17 => Fault::PowerOff(host),
            8 => Fault::DcRestart(SERVING[dice.below(2)]),
            9 => Fault::DcFreeze(SERVING[dice.below(2)]),
            10 => Fault::DiskFull(host),
            11 => Fault::PressP(host),
            12 => Fault::PressB(host),
            13 => Fault::EtcdRestart(SITES[dice.below(3)]),
            14 => Fault::SiteCut(SITES[dice.below(3)]),
            _ => Fault::ClockStep {
                host,
                secs: if dice.below(2) == 0 { 300 } else { -300 },
            },
        };
        let hold = match (&fault, fault.holds()) {
            (_, None) => Duration::ZERO,
            // Long enough, often, for the data center and the partner to lose the box.
            (Fault::PowerOff(_) | Fault::Cable(_), _) => {
                Duration::from_millis(3_000 + dice.below(17_000) as u64)
            }
            _ => Duration::from_millis(2_000 + dice.below(10_000) as u64),
        };
        let end = (at + hold).min(length);
        let busy = fault.holds().is_some_and(|what| {
            planned
                .iter()
                .any(|p| p.fault.holds() == Some(what) && p.at + p.hold > at)
        });
        if !busy {
            let press = matches!(fault, Fault::PressP(_) | Fault::PressB(_));
            planned.push(Planned {
                at,
                hold: end - at,
                fault,
            });
            // Half the key presses: the agent dies or freezes in the middle of the steps.
            let free = !planned
                .iter()
                .any(|p| p.fault.holds() == Some(host) && p.at + p.hold > at);
            if press && free && dice.below(2) == 0 {
                let inside = at + Duration::from_millis(50 + dice.below(400) as u64);
                let fault = if dice.below(2) == 0 {
                    Fault::KillAgent(host)
                } else {
                    Fault::FreezeAgent(host)
                };
                let hold = Duration::from_millis(2_000 + dice.below(6_000) as u64);
                if inside < length {
                    planned.push(Planned {
                        at: inside,
                        hold: hold.min(length - inside),
                        fault,
                    });
                }
            }
        }
        at += Duration::from_millis(1_000 + dice.below(5_000) as u64);
    }
    planned.sort_by_key(|p| p.at);
    planned
}

/// Does `fault` to `office`; key presses run in the background (their processes in
/// `presses`).
pub fn apply(
    office: &mut Office,
    fault: &Fault,
    presses: &mut Vec<std::process::Child>,
) -> anyhow::Result<()> {
    match fault {
        Fault::KillAgent(h) => {
            if office.agent_pid(h).is_ok() {
                office.kill_agent(h)?;
            }
        }
        Fault::FreezeAgent(h) => {
            let pid = office.agent_pid(h)?;
            office.lab.signal(pid, "STOP")?;
        }
        Fault::Cable(h) => office.lab.plug(h, false)?,
        Fault::RouterCable => office.lab.plug("gw", false)?,
        Fault::PartitionDc(h) => {
            for dc in [DC1, DC2] {
                office
                    .lab
                    .sh(h, &["ip", "route", "add", "blackhole", &format!("{dc}/32")])?;
            }
        }
        Fault::Netem {
            host,
            loss_pct,
            delay_ms,
        } => {
            office.lab.sh(
                host,
                &[
                    "tc",
                    "qdisc",
                    "replace",
                    "dev",
                    "eth0",
                    "root",
                    "netem",
                    "loss",
                    &format!("{loss_pct}%"),
                    "delay",
                    &format!("{delay_ms}ms"),
                ],
            )?;
        }
        Fault::PowerOff(h) => office.power_off(h)?,
        Fault::DcRestart(site) => office.kill_serve(site)?,
        Fault::DcFreeze(site) => {
            let pid = office.serve_pid(site)?;
            office.lab.signal(pid, "STOP")?;
        }
        Fault::EtcdRestart(site) => office.etcd_at(site, false)?,
        Fault::SiteCut(site) => office.partition_site(site, true)?,
        Fault::DiskFull(h) => fill_disk(office, h)?,
        Fault::ClockStep { host, secs } => office.step_clock(host, i64::from(*secs))?,
        Fault::PressP(h) | Fault::PressB(h) => {
            let verb = if matches!(fault, Fault::PressP(_)) {
                "promote"
            } else {
                "demote"
            };
            let mut press = office.lab.command(h, workspace_binary("lbs"));
            press
                .args([verb, "--yes", "--socket"])
                .arg(office.socket(h))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            presses.push(press.spawn().context("pressing a key")?);
        }
    }
    Ok(())
}

/// Undoes `fault`; what the box said on its way back, if anything (a boot's `lbs net
/// boot-check`).
pub fn heal(office: &mut Office, fault: &Fault) -> anyhow::Result<Option<String>> {
    match fault {
        Fault::KillAgent(h) => {
            if office.agent_pid(h).is_err() {
                office.start_agent(h)?;
            }
        }
        Fault::FreezeAgent(h) => {
            if let Ok(pid) = office.agent_pid(h) {
                office.lab.signal(pid, "CONT")?;
            }
        }
        Fault::Cable(h) => office.lab.plug(h, true)?,
        Fault::RouterCable => office.lab.plug("gw", true)?,
        Fault::PartitionDc(h) => {
            for dc in [DC1, DC2] {
                office
                    .lab
                    .sh(h, &["ip", "route", "del", "blackhole", &format!("{dc}/32")])?;
            }
        }
        Fault::Netem { host, .. } => {
            office
                .lab
                .sh(host, &["tc", "qdisc", "del", "dev", "eth0", "root"])?;
        }
        // `boot` plugs the cable back once the old addresses are gone: plugged first, the dead
        // box's kernel answered for the shared address it still held before its reboot wiped
        // it (chaos seed 2808 runs 25 and 75: a split-brain moment the lab made).
        Fault::PowerOff(h) => return office.boot(h).map(|said| Some(said.trim().to_owned())),
        Fault::DcRestart(site) => {
            if office.serve_pid(site).is_err() {
                office.start_serve(site)?;
            }
        }
        Fault::DcFreeze(site) => {
            let pid = office.serve_pid(site)?;
            office.lab.signal(pid, "CONT")?;
        }
        Fault::EtcdRestart(site) => {
            if office.etcd_pid(site).is_err() {
                office.etcd_at(site, true)?;
            }
        }
        Fault::SiteCut(site) => office.partition_site(site, false)?,
        Fault::DiskFull(h) => {
            let filler = office.root(h).join(FILLER);
            if filler.exists() {
                std::fs::remove_file(&filler)?;
            }
        }
        Fault::ClockStep { host, .. } => office.step_clock(host, 0)?,
        Fault::PressP(_) | Fault::PressB(_) => {}
    }
    Ok(None)
}

/// The file that fills a box's disk.
const FILLER: &str = ".chaos-filler";

/// Fills `host`'s disk (see [`Office::limit_disk`]) to the last byte with one file.
fn fill_disk(office: &mut Office, host: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let path = office.root(host).join(FILLER);
    let mut filler =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let chunk = vec![0x5a_u8; 1 << 20];
    loop {
        match filler.write(&chunk) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(err) if err.raw_os_error() == Some(28) => return Ok(()),
            Err(err) => return Err(err).context("filling the disk"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_one_schedule_and_no_box_has_two_faults_at_once() {
        let length = Duration::from_secs(90);
        let one = schedule(&mut Dice::new(7), length, true);
        assert_eq!(one, schedule(&mut Dice::new(7), length, true));
        assert_ne!(one, schedule(&mut Dice::new(8), length, true));
        assert_ne!(one, schedule(&mut Dice::new(7), length, false));
        // With automatic failover the boxes die more often; every kind of site fault occurs.
        let power_offs = |auto: bool| -> usize {
            (0..40)
                .flat_map(|seed| schedule(&mut Dice::new(seed), length, auto))
                .filter(|p| matches!(p.fault, Fault::PowerOff(_)))
                .count()
        };
        assert!(power_offs(true) > power_offs(false) * 3 / 2);
        let all: Vec<Planned> = (0..40)
            .flat_map(|seed| schedule(&mut Dice::new(seed), length, false))
            .collect();
        for site in ["dc1", "dc2", "dc3"] {
            assert!(
                all.iter().any(|p| p.fault == Fault::EtcdRestart(site)),
                "{site}"
            );
            assert!(
                all.iter().any(|p| p.fault == Fault::SiteCut(site)),
                "{site}"
            );
        }
        for host in ["primary", "backup"] {
            for secs in [300, -300] {
                let step = Fault::ClockStep { host, secs };
                assert!(all.iter().any(|p| p.fault == step), "{step:?}");
            }
        }
        for site in ["dc1", "dc2"] {
            assert!(
                all.iter().any(|p| p.fault == Fault::DcRestart(site)),
                "{site}"
            );
            assert!(
                all.iter().any(|p| p.fault == Fault::DcFreeze(site)),
                "{site}"
            );
        }
        assert!(one.len() >= 10, "{}", one.len());
        for (i, a) in one.iter().enumerate() {
            assert!(a.at + a.hold <= length, "{a}");
            for b in &one[i + 1..] {
                let overlap = b.at < a.at + a.hold;
                assert!(
                    !(overlap && a.fault.holds().is_some() && a.fault.holds() == b.fault.holds()),
                    "{a} and {b}"
                );
            }
        }
    }
}
