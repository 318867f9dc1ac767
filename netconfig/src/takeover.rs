//! Taking over an office address, and giving it back, as one idempotent operation.
//!
//! [`take_over`] moves a box from its own address (`from`, say 192.168.1.3/24) to the shared
//! one (`to`, 192.168.1.2/24) that phones and trunks know; [`give_up`] moves it back. Both run
//! the same sequence — preflight, probe, `promote_secondaries`, add the new address, announce,
//! drop the old one, default route, verify by reading back, announce again — and time each step.
//! Any failure up to and including verification restores the previous addresses, route and
//! setting, and says so. Running either twice, or again after a crash half way, ends in the
//! same state: every step looks before it acts.

use std::fmt;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::backend::{Arp, NetBackend, NetError, ProbeResult};
use crate::types::{DefaultRoute, Ipv4Cidr, LinkInfo, MacAddr};

/// Gratuitous ARPs sent right after the address changes, and again after verification.
pub const ANNOUNCE_BURST: u32 = 3;

/// What to move where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TakeoverPlan {
    /// The office interface (`eth0`).
    pub interface: String,
    /// This box's own address, given up while it holds the shared one.
    pub from: Ipv4Cidr,
    /// The shared address the phones use.
    pub to: Ipv4Cidr,
    /// The office gateway, in the shared address's subnet.
    pub gateway: Ipv4Addr,
    /// Take the address even if another machine answers for it (the operator checked that
    /// the old primary is dead and its answers are stale, say from a switch's proxy ARP).
    pub force: bool,
    /// Where to make the change survive a reboot; `None` leaves the boot configuration alone
    /// (tests, or a box whose configuration lbs must not touch).
    pub persist: Option<PersistTo>,
}

/// The boot configuration to edit (see [`crate::persist`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PersistTo {
    /// The root the configuration lives under: `/` on a box.
    pub root: std::path::PathBuf,
    /// Where previous versions are kept, outside every directory the tools read
    /// (`/var/lib/lbs/netconfig-backups`).
    pub backups: std::path::PathBuf,
}

/// The steps, in order.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Step {
    /// Interface, carrier, gateway; the state before.
    Preflight,
    /// RFC 5227 probe of the new address.
    Probe,
    /// `promote_secondaries` on, so dropping the old address keeps the new one.
    PromoteSecondaries,
    /// The new address added.
    AddAddress,
    /// Gratuitous ARP right after the change.
    Announce,
    /// The old address dropped.
    DropOld,
    /// The default route via the gateway.
    Route,
    /// Everything read back and compared.
    Verify,
    /// Gratuitous ARP again, for caches that missed the first burst.
    AnnounceAgain,
    /// The boot configuration changed to match.
    Persist,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Preflight => "preflight",
            Step::Probe => "probe",
            Step::PromoteSecondaries => "promote_secondaries",
            Step::AddAddress => "add address",
            Step::Announce => "announce",
            Step::DropOld => "drop old address",
            Step::Route => "default route",
            Step::Verify => "verify",
            Step::AnnounceAgain => "announce again",
            Step::Persist => "persist",
        })
    }
}

/// How a step ended.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum StepOutcome {
    /// It changed something, or checked something; what.
    Done(String),
    /// Nothing to do (already so); why.
    Skipped(String),
    /// It failed but the operation went on (only after verification); why.
    Warning(String),
    /// It failed and the operation stopped here.
    Failed(String),
}

/// One step's outcome and duration.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct StepReport {
    pub step: Step,
    /// How it ended.
    pub outcome: StepOutcome,
    /// How long it took.
    pub elapsed: Duration,
}

/// Every step of one run.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct TakeoverReport {
    /// The steps run, in order.
    pub steps: Vec<StepReport>,
    /// What the failure handling restored, if it ran.
    pub rollback: Vec<String>,
}

impl TakeoverReport {
    /// The total time of all steps.
    pub fn total(&self) -> Duration {
        self.steps.iter().map(|s| s.elapsed).sum()
    }

    /// The total time of all steps but the probe (whose length is its listening time).
    pub fn total_without_probe(&self) -> Duration {
        self.steps
            .iter()
            .filter(|s| s.step != Step::Probe)
            .map(|s| s.elapsed)
            .sum()
    }

    /// Warnings of steps after verification.
    pub fn warnings(&self) -> impl Iterator<Item = &StepReport> {
        self.steps
            .iter()
            .filter(|s| matches!(s.outcome, StepOutcome::Warning(_)))
    }
}

impl fmt::Display for StepReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (mark, text) = match &self.outcome {
            StepOutcome::Done(text) => ("ok  ", text),
            StepOutcome::Skipped(text) => ("skip", text),
            StepOutcome::Warning(text) => ("WARN", text),
            StepOutcome::Failed(text) => ("FAIL", text),
        };
        write!(
            f,
            "  {mark} {:<20} {:>9.3} ms  {text}",
            self.step.to_string(),
            self.elapsed.as_secs_f64() * 1e3
        )
    }
}

impl TakeoverReport {
    /// The closing lines: what the rollback did, and the totals.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for line in &self.rollback {
            out.push_str(&format!("  undo {line}\n"));
        }
        out.push_str(&format!(
            "  total {:.3} ms ({:.3} ms without the probe)",
            self.total().as_secs_f64() * 1e3,
            self.total_without_probe().as_secs_f64() * 1e3
        ));
        out
    }
}

impl fmt::Display for TakeoverReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for step in &self.steps {
            writeln!(f, "{step}")?;
        }
        write!(f, "{}", self.summary())
    }
}

/// Why a takeover (or give-up) did not complete. Every variant carries the report of the
/// steps run, and says whether the previous state was restored.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    /// The plan cannot work on this box; nothing was changed.
    #[error("{reason}; nothing was changed")]
    Preflight {
        /// What is wrong.
        reason: String,
        /// The steps run.
        report: TakeoverReport,
    },
    /// Another machine answers for the address; nothing was changed.
    #[error(
        "cannot take {ip}: {mac} still answers ARP for it; unplug the old primary or use --force; \
         nothing was changed"
    )]
    InUse {
        ip: Ipv4Addr,
        /// Who answers.
        mac: MacAddr,
        /// The steps run.
        report: TakeoverReport,
    },
    /// A step failed; the previous state was restored as far as `report.rollback` says.
    #[error("{step} failed: {source}; {}", rollback_summary(.report, *.restored))]
    Step {
        /// The failing step.
        step: Step,
        /// What the system said.
        source: NetError,
        /// Whether everything was restored.
        restored: bool,
        /// The steps run and the rollback.
        report: TakeoverReport,
    },
}

fn rollback_summary(report: &TakeoverReport, restored: bool) -> String {
    match (restored, report.rollback.is_empty()) {
        (true, true) => "nothing had been changed".to_owned(),
        (true, false) => format!("restored: {}", report.rollback.join(", ")),
        (false, _) => format!(
            "could NOT restore everything ({}); check `ip addr` and `ip route` and run the \
             operation again",
            report.rollback.join(", ")
        ),
    }
}

impl TakeoverError {
    /// The steps run before the failure.
    pub fn report(&self) -> &TakeoverReport {
        match self {
            TakeoverError::Preflight { report, .. }
            | TakeoverError::InUse { report, .. }
            | TakeoverError::Step { report, .. } => report,
        }
    }
}

/// Takes the shared address `plan.to` in place of this box's own `plan.from`.
pub async fn take_over<N: NetBackend, A: Arp>(
    net: &N,
    arp: &A,
    plan: &TakeoverPlan,
) -> Result<TakeoverReport, TakeoverError> {
    take_over_observed(net, arp, plan, &mut |_| {}).await
}

/// [`take_over`], calling `on_step` as each step ends (for a console that shows progress as
/// it happens).
pub async fn take_over_observed<N: NetBackend, A: Arp>(
    net: &N,
    arp: &A,
    plan: &TakeoverPlan,
    on_step: &mut (dyn FnMut(&StepReport) + Send),
) -> Result<TakeoverReport, TakeoverError> {
    Move::of(plan, plan.from, plan.to)
        .run(net, arp, on_step)
        .await
}

/// Takes the shared address `plan.to` back onto an interface that holds no address at all:
/// a primary withdrew it when its carrier went, and has just checked (the probe step) that
/// nobody took it meanwhile. [`take_over`] refuses a bare interface (the wrong one, likely).
pub async fn take_back<N: NetBackend, A: Arp>(
    net: &N,
    arp: &A,
    plan: &TakeoverPlan,
) -> Result<TakeoverReport, TakeoverError> {
    let mut back = Move::of(plan, plan.from, plan.to);
    back.bare = true;
    back.run(net, arp, &mut |_| {}).await
}

/// Gives the shared address `plan.to` back and returns to this box's own `plan.from` (also
/// onto an interface that holds no address: the shared one was withdrawn).
pub async fn give_up<N: NetBackend, A: Arp>(
    net: &N,
    arp: &A,
    plan: &TakeoverPlan,
) -> Result<TakeoverReport, TakeoverError> {
    give_up_observed(net, arp, plan, &mut |_| {}).await
}

/// [`give_up`], calling `on_step` as each step ends.
pub async fn give_up_observed<N: NetBackend, A: Arp>(
    net: &N,
    arp: &A,
    plan: &TakeoverPlan,
    on_step: &mut (dyn FnMut(&StepReport) + Send),
) -> Result<TakeoverReport, TakeoverError> {
    // A bare interface is expected too: a primary whose cable went withdrew the shared
    // address, and is told to step back when the cable returns.
    let mut back = Move::of(plan, plan.to, plan.from);
    back.bare = true;
    back.run(net, arp, on_step).await
}

/// From one address to another on one interface.
struct Move<'p> {
    interface: &'p str,
    old: Ipv4Cidr,
    new: Ipv4Cidr,
    gateway: Ipv4Addr,
    force: bool,
    persist: &'p Option<PersistTo>,
    /// An interface without any address is expected (see [`take_back`]).
    bare: bool,
}

/// What was there before, and what this run changed (for the rollback).
#[derive(Default)]
struct Undo {
    promote_before: Option<bool>,
    route_before: Option<DefaultRoute>,
    added_new: bool,
    dropped_old: bool,
    route_changed: bool,
    promote_changed: bool,
}

/// Times steps into a report.
struct Recorder<'o> {
    report: TakeoverReport,
    started: Instant,
    on_step: &'o mut (dyn FnMut(&StepReport) + Send),
}

impl Recorder<'_> {
    fn start(&mut self) {
        self.started = Instant::now();
    }

    fn end(&mut self, step: Step, outcome: StepOutcome) {
        let elapsed = self.started.elapsed();
        match &outcome {
            StepOutcome::Failed(text) | StepOutcome::Warning(text) => {
                tracing::warn!(%step, ?elapsed, "{text}");
            }
            StepOutcome::Done(text) | StepOutcome::Skipped(text) => {
                tracing::info!(%step, ?elapsed, "{text}");
            }
        }
        let report = StepReport {
            step,
            outcome,
            elapsed,
        };
        (self.on_step)(&report);
        self.report.steps.push(report);
        self.started = Instant::now();
    }
}

impl<'p> Move<'p> {
    /// The plan's interface, gateway and options, from `old` to `new`.
    fn of(plan: &'p TakeoverPlan, old: Ipv4Cidr, new: Ipv4Cidr) -> Move<'p> {
        Move {
            interface: &plan.interface,
            old,
            new,
            gateway: plan.gateway,
            force: plan.force,
            persist: &plan.persist,
            bare: false,
        }
    }

    async fn run<N: NetBackend, A: Arp>(
        &self,
        net: &N,
        arp: &A,
        on_step: &mut (dyn FnMut(&StepReport) + Send),
    ) -> Result<TakeoverReport, TakeoverError> {
        let mut rec = Recorder {
            report: TakeoverReport::default(),
            started: Instant::now(),
            on_step,
        };
        let (link, before, route_before, promote_before) = match self.preflight(net).await {
            Ok(found) => found,
            Err(reason) => {
                rec.end(Step::Preflight, StepOutcome::Failed(reason.clone()));
                return Err(TakeoverError::Preflight {
                    reason,
                    report: rec.report,
                });
            }
        };
        let has_new = before.contains(&self.new);
        let has_old = before.contains(&self.old);
        rec.end(
            Step::Preflight,
            StepOutcome::Done(format!(
                "{} ({}) up with carrier; holds {}; default route {}",
                link.name,
                link.mac,
                list(&before),
                route_before.map_or("none".to_owned(), |r| format!("via {}", r.gateway)),
            )),
        );

        // Probe: never take an address someone else still answers for.
        rec.start();
        if has_new {
            rec.end(
                Step::Probe,
                StepOutcome::Skipped(format!("{} is already on {}", self.new, link.name)),
            );
        } else {
            match arp.probe(&link, self.new.addr).await {
                Ok(ProbeResult::Free) => rec.end(
                    Step::Probe,
                    StepOutcome::Done(format!("nobody answers for {}", self.new.addr)),
                ),
                Ok(ProbeResult::InUse(mac)) if self.force => rec.end(
                    Step::Probe,
                    StepOutcome::Done(format!(
                        "{mac} answers for {}; taken anyway (--force)",
                        self.new.addr
                    )),
                ),
                Ok(ProbeResult::InUse(mac)) => {
                    rec.end(
                        Step::Probe,
                        StepOutcome::Failed(format!("{mac} answers for {}", self.new.addr)),
                    );
                    return Err(TakeoverError::InUse {
                        ip: self.new.addr,
                        mac,
                        report: rec.report,
                    });
                }
                Err(source) => {
                    rec.end(Step::Probe, StepOutcome::Failed(source.to_string()));
                    return Err(TakeoverError::Step {
                        step: Step::Probe,
                        source,
                        restored: true,
                        report: rec.report,
                    });
                }
            }
        }

        let mut undo = Undo {
            promote_before: Some(promote_before),
            route_before,
            ..Undo::default()
        };
        match self
            .change(net, arp, &link, &mut rec, &mut undo, has_new, has_old)
            .await
        {
            Ok(()) => {}
            Err((step, source)) => {
                rec.end(step, StepOutcome::Failed(source.to_string()));
                let restored = self.rollback(net, &link, &undo, &mut rec.report).await;
                return Err(TakeoverError::Step {
                    step,
                    source,
                    restored,
                    report: rec.report,
                });
            }
        }

        // Verified: the address is ours. A failed announce now is a warning, not a reason to
        // give it back (the slow refresh and the phones' own ARP will follow).
        rec.start();
        match arp.announce(&link, self.new.addr, ANNOUNCE_BURST).await {
            Ok(()) => rec.end(
                Step::AnnounceAgain,
                StepOutcome::Done(format!(
                    "{ANNOUNCE_BURST} gratuitous ARPs for {}",
                    self.new.addr
                )),
            ),
            Err(err) => rec.end(Step::AnnounceAgain, StepOutcome::Warning(err.to_string())),
        }

        // Also after verification: a configuration lbs cannot edit leaves the box working now
        // and is said loudly, for the operator to fix before the next reboot.
        rec.start();
        match &self.persist {
            None => rec.end(
                Step::Persist,
                StepOutcome::Skipped("boot configuration left alone".into()),
            ),
            Some(to) => {
                let (to, interface) = (to.clone(), self.interface.to_owned());
                let config = crate::persist::StaticConfig {
                    address: self.new,
                    gateway: Some(self.gateway),
                };
                let done = tokio::task::spawn_blocking(move || {
                    crate::persist::persist(&to.root, &interface, &config, &to.backups)
                })
                .await;
                match done {
                    Ok(Ok(done)) => rec.end(
                        Step::Persist,
                        StepOutcome::Done(format!(
                            "{} in {} (was {}; previous version in {})",
                            self.new,
                            done.owner.file.display(),
                            done.before.address,
                            done.backup.display()
                        )),
                    ),
                    Ok(Err(err)) => rec.end(
                        Step::Persist,
                        StepOutcome::Warning(format!(
                            "{err}; the address is taken now but a reboot would bring back the \
                             old one"
                        )),
                    ),
                    Err(err) => rec.end(Step::Persist, StepOutcome::Warning(err.to_string())),
                }
            }
        }
        Ok(rec.report)
    }

    /// Checks the plan against the box; returns the link and its state before.
    async fn preflight<N: NetBackend>(
        &self,
        net: &N,
    ) -> Result<(LinkInfo, Vec<Ipv4Cidr>, Option<DefaultRoute>, bool), String> {
        if self.old == self.new {
            return Err(format!("the old and new address are both {}", self.new));
        }
        if !self.new.contains(self.gateway) {
            return Err(format!(
                "gateway {} is not in the subnet of {} ({}/{})",
                self.gateway,
                self.new,
                self.new.network(),
                self.new.prefix
            ));
        }
        if self.gateway == self.new.addr || self.gateway == self.old.addr {
            return Err(format!(
                "the gateway {} is one of the box's addresses",
                self.gateway
            ));
        }
        let link = net.link(self.interface).await.map_err(|e| e.to_string())?;
        if !link.up {
            return Err(format!(
                "{} is down (ip link set {} up)",
                link.name, link.name
            ));
        }
        if !link.carrier {
            return Err(format!(
                "{} has no carrier: is its cable plugged in and the switch port alive?",
                link.name
            ));
        }
        let before = net.addresses(&link).await.map_err(|e| e.to_string())?;
        let bare = self.bare && before.is_empty();
        if !before.contains(&self.old) && !before.contains(&self.new) && !bare {
            return Err(format!(
                "{} holds neither {} nor {} (it has {}); is this the right interface?",
                link.name,
                self.old,
                self.new,
                list(&before)
            ));
        }
        let route = net.default_route().await.map_err(|e| e.to_string())?;
        let promote = net
            .promote_secondaries(&link)
            .await
            .map_err(|e| e.to_string())?;
        Ok((link, before, route, promote))
    }

    /// The changing steps, up to and including verification.
    #[allow(clippy::too_many_arguments)]
    async fn change<N: NetBackend, A: Arp>(
        &self,
        net: &N,
        arp: &A,
        link: &LinkInfo,
        rec: &mut Recorder<'_>,
        undo: &mut Undo,
        has_new: bool,
        has_old: bool,
    ) -> Result<(), (Step, NetError)> {
        rec.start();
        if undo.promote_before == Some(true) {
            rec.end(
                Step::PromoteSecondaries,
                StepOutcome::Skipped("already on".into()),
            );
        } else {
            net.set_promote_secondaries(link, true)
                .await
                .map_err(|e| (Step::PromoteSecondaries, e))?;
            undo.promote_changed = true;
            rec.end(
                Step::PromoteSecondaries,
                StepOutcome::Done(format!("on for {}", link.name)),
            );
        }

        if has_new {
            rec.end(
                Step::AddAddress,
                StepOutcome::Skipped(format!("{} already there", self.new)),
            );
        } else {
            net.add_address(link, self.new)
                .await
                .map_err(|e| (Step::AddAddress, e))?;
            undo.added_new = true;
            rec.end(
                Step::AddAddress,
                StepOutcome::Done(format!("added {}", self.new)),
            );
        }

        arp.announce(link, self.new.addr, ANNOUNCE_BURST)
            .await
            .map_err(|e| (Step::Announce, e))?;
        rec.end(
            Step::Announce,
            StepOutcome::Done(format!(
                "{ANNOUNCE_BURST} gratuitous ARPs for {}",
                self.new.addr
            )),
        );

        if has_old {
            net.delete_address(link, self.old)
                .await
                .map_err(|e| (Step::DropOld, e))?;
            undo.dropped_old = true;
            rec.end(
                Step::DropOld,
                StepOutcome::Done(format!("removed {}", self.old)),
            );
        } else {
            rec.end(
                Step::DropOld,
                StepOutcome::Skipped(format!("{} already gone", self.old)),
            );
        }

        let wanted = DefaultRoute {
            gateway: self.gateway,
            link: link.index,
        };
        let now = net.default_route().await.map_err(|e| (Step::Route, e))?;
        if now == Some(wanted) {
            rec.end(
                Step::Route,
                StepOutcome::Skipped(format!("already via {}", self.gateway)),
            );
        } else {
            net.replace_default_route(link, self.gateway)
                .await
                .map_err(|e| (Step::Route, e))?;
            undo.route_changed = true;
            rec.end(
                Step::Route,
                StepOutcome::Done(format!("via {} on {}", self.gateway, link.name)),
            );
        }

        let after = net.addresses(link).await.map_err(|e| (Step::Verify, e))?;
        let route = net.default_route().await.map_err(|e| (Step::Verify, e))?;
        let mut wrong = Vec::new();
        if !after.contains(&self.new) {
            wrong.push(format!("{} is missing", self.new));
        }
        if after.contains(&self.old) {
            wrong.push(format!("{} is still there", self.old));
        }
        if route != Some(wanted) {
            wrong.push(match route {
                Some(r) => format!("the default route is via {}", r.gateway),
                None => "there is no default route".to_owned(),
            });
        }
        if !wrong.is_empty() {
            return Err((
                Step::Verify,
                NetError::Os {
                    what: format!("reading back {}", link.name),
                    reason: wrong.join(", "),
                },
            ));
        }
        rec.end(
            Step::Verify,
            StepOutcome::Done(format!(
                "{} holds {}; default route via {}",
                link.name,
                list(&after),
                self.gateway
            )),
        );
        Ok(())
    }

    /// Puts back what this run changed: the old address first, so the box is never without
    /// one, then the route, then the new address goes, then the setting. Returns whether all
    /// of it worked; each action is noted in `report.rollback`.
    async fn rollback<N: NetBackend>(
        &self,
        net: &N,
        link: &LinkInfo,
        undo: &Undo,
        report: &mut TakeoverReport,
    ) -> bool {
        let mut all = true;
        let log = &mut report.rollback;
        let mut note =
            |what: String, result: Result<(), NetError>, log: &mut Vec<String>| match result {
                Ok(()) => log.push(what),
                Err(err) => {
                    all = false;
                    log.push(format!("{what} FAILED: {err}"));
                }
            };
        if undo.dropped_old {
            note(
                format!("re-added {}", self.old),
                net.add_address(link, self.old).await,
                log,
            );
        }
        // Deleting an address may have flushed the route: put it back whenever it differs.
        if let Some(before) = undo.route_before {
            let now = net.default_route().await;
            if undo.route_changed || now.as_ref().ok() != Some(&Some(before)) {
                if before.link == link.index {
                    note(
                        format!("default route via {}", before.gateway),
                        net.replace_default_route(link, before.gateway).await,
                        log,
                    );
                } else {
                    let what = format!(
                        "default route via {} (interface #{})",
                        before.gateway, before.link
                    );
                    let why = NetError::Os {
                        what: "restoring it".into(),
                        reason: "it was on another interface".into(),
                    };
                    note(what, Err(why), log);
                }
            }
        }
        if undo.added_new {
            note(
                format!("removed {}", self.new),
                net.delete_address(link, self.new).await,
                log,
            );
        }
        if undo.promote_changed
            && let Some(before) = undo.promote_before
        {
            note(
                format!("promote_secondaries back to {}", u8::from(before)),
                net.set_promote_secondaries(link, before).await,
                log,
            );
        }
        all
    }
}

fn list(addresses: &[Ipv4Cidr]) -> String {
    if addresses.is_empty() {
        return "no address".to_owned();
    }
    addresses
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
