//! The primary's hold on the shared address follows its cable.
//!
//! A primary whose cable is pulled cannot see the LAN: meanwhile the backup may be promoted
//! and take the shared address. If the kernel still held it when the cable comes back, it
//! would answer ARP for it (and claim it in its own ARP requests) before anyone could check —
//! two boxes on one address, the phones' calls going to either. So the shared address leaves
//! the interface the moment the carrier goes, and comes back only after an ARP probe says
//! nobody else answers for it; if somebody does, this box steps back (fenced), exactly as at
//! a restart. The same rule covers a box that starts without carrier.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use lbs_netconfig::NetBackend;
use tokio_util::sync::CancellationToken;

use crate::daemon::report::{DC_WORD_DEADLINE, DcWord, dc_word};
use crate::daemon::state::{Shared, lock, network, now_ms};
use crate::daemon::steps::takeover_plan;
use crate::role::{Event, RoleState};
use crate::status::Withdrawn;

/// How often the hold is checked besides the carrier's changes (a failed probe is retried).
const RECHECK: Duration = Duration::from_secs(2);

/// Follows the office interface's carrier for as long as the agent runs (only spawned with a
/// `[network]` section).
pub(crate) async fn guard_address(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut delay = RECHECK;
    loop {
        match follow_carrier(&shared, &shutdown).await {
            Ok(()) => return,
            Err(err) => tracing::warn!(
                "following the office interface's carrier: {err:#}; again in {} s",
                delay.as_secs()
            ),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

async fn follow_carrier(shared: &Arc<Shared>, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let interface = network(shared).context("no [network] section")?.interface;
    let net = &shared.lan.net;
    let link = net.link(&interface).await?;
    let mut events = net.carrier_events(&link).await?;
    // Read again after subscribing, so a change in between is not missed.
    let mut carrier = net.link(&interface).await?.carrier;
    loop {
        check(shared, carrier).await?;
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            change = events.next() => {
                carrier = change.context("the carrier watch ended")?;
                tracing::info!(
                    "{interface}: carrier {}",
                    if carrier { "back" } else { "lost" }
                );
            }
            () = tokio::time::sleep(RECHECK) => {}
        }
    }
}

/// What the primary's hold on the shared address should do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Hold {
    /// Nothing to do.
    Keep,
    /// All is as it should be: forget an earlier withdrawal.
    Settled,
    /// No carrier and the address is on the interface: take it off now.
    Withdraw,
    /// The carrier is back after a withdrawal: probe, then take the address back (or step
    /// back if somebody else answers for it).
    TakeBack,
}

/// The carrier guard's rule, a pure function of what the primary sees: only a primary holds
/// the shared address; without carrier it leaves the interface (nobody could tell this box
/// that another took over meanwhile); it comes back only where it was withdrawn — or where the
/// interface is bare (an earlier run withdrew it and stopped) — never onto a primary that
/// serves at another address by design.
pub(crate) fn hold(primary: bool, carrier: bool, held: bool, withdrawn: bool, bare: bool) -> Hold {
    match (primary, carrier, held) {
        (false, _, _) => Hold::Settled,
        (true, false, true) => Hold::Withdraw,
        // Not held and no carrier: nothing to withdraw; the mark of an earlier withdrawal
        // stays until the cable is back.
        (true, false, false) => Hold::Keep,
        (true, true, false) if withdrawn || bare => Hold::TakeBack,
        (true, true, false) => Hold::Keep,
        (true, true, true) => Hold::Settled,
    }
}

/// Makes the hold match the carrier: withdrawn without it, taken back (after the probe) with
/// it — only while this box is the primary; every other state's steps own the address.
pub(crate) async fn check(shared: &Arc<Shared>, carrier: bool) -> anyhow::Result<()> {
    let Some(network) = network(shared) else {
        return Ok(());
    };
    let primary = lock(&shared.machine).record.state == RoleState::Primary;
    if !primary {
        *lock(&shared.withdrawn) = None;
        return Ok(());
    }
    let (net, arp) = (&shared.lan.net, &shared.lan.arp);
    let link = net.link(&network.interface).await?;
    let addresses = net.addresses(&link).await?;
    let held = addresses.contains(&network.shared);
    let withdrawn = lock(&shared.withdrawn).is_some();
    match hold(primary, carrier, held, withdrawn, addresses.is_empty()) {
        Hold::Keep => {}
        Hold::Settled => *lock(&shared.withdrawn) = None,
        Hold::Withdraw => {
            if let Some(refresh) = lock(&shared.refresh).take() {
                refresh.stop();
            }
            net.delete_address(&link, network.shared).await?;
            let why = format!(
                "no carrier on {}: {} withdrawn until the cable is back and nobody else answers for it",
                network.interface, network.shared.addr
            );
            tracing::warn!("{why}");
            let _ = shared.progress.send(why.clone());
            withdraw(shared, why);
        }
        Hold::TakeBack => {
            let plan = takeover_plan(&network, false, &shared.paths);
            match take_back_outlasting_a_stale_partner(shared, &plan).await {
                // Fenced meanwhile (by the data center's word, say): the fencing's own steps
                // own the address now.
                Ok(None) => *lock(&shared.withdrawn) = None,
                Ok(Some(report)) => {
                    let said = format!(
                        "nobody else answers for {}: taken back on {} ({})",
                        network.shared.addr,
                        network.interface,
                        report.summary()
                    );
                    tracing::info!("{said}");
                    let _ = shared.progress.send(said);
                    *lock(&shared.withdrawn) = None;
                    // A PBX started while the address was away could not listen on it (chaos
                    // seed 2809 runs 31, 41, 61: a primary booted on its own address by the
                    // boot check took the shared one back, its PBX had failed to start, and
                    // nothing started it again). `pbx_start` runs again; on a running PBX it
                    // does nothing.
                    crate::daemon::steps::start_pbx_again(shared, "the shared address is back")
                        .await;
                }
                Err(lbs_netconfig::TakeoverError::InUse { mac, .. }) => {
                    match on_answer(shared, mac, None).await {
                        Answered::StepBack => {
                            tracing::warn!(
                                "{mac} answers ARP for {}: another box took over while this one was away",
                                network.shared.addr
                            );
                            *lock(&shared.withdrawn) = None;
                            shared.handle(Event::AddressTaken {
                                by: mac.to_string(),
                            });
                        }
                        Answered::Wait => wait_for_stale_partner(shared, mac, network.shared.addr),
                        Answered::KeepAndAlarm => {
                            let mut plan = takeover_plan(&network, false, &shared.paths);
                            plan.force = true;
                            lbs_netconfig::take_back(net, arp, &plan).await?;
                            let why = format!(
                                "{mac} answers ARP for {} but is not the partner, and the data \
                                 center does not say another box is primary: this box keeps \
                                 the address; find the device with the duplicate address",
                                network.shared.addr
                            );
                            tracing::error!("{why}");
                            let _ = shared.progress.send(why.clone());
                            *lock(&shared.withdrawn) = None;
                            *lock(&shared.stranger) = Some((mac, now_ms()));
                        }
                    }
                }
                Err(err) => return Err(err.into()),
            }
        }
    }
    Ok(())
}

/// How long a primary whose cable came back keeps probing while its partner answers for the
/// shared address, before it asks the data center and decides. An old primary back from a
/// power cut while this box's cable was out boots onto the address (nobody answered its boot
/// check) and gives it up once its agent hears of the new generation — within a second of
/// starting, where the data center answers. Stepping back on its first answer left both
/// boxes fenced and the office without a PBX (chaos seed 42 run 3); a box that really took
/// over keeps answering. This box holds no address meanwhile: nothing answers twice.
pub(crate) const STALE_PARTNER_GRACE: Duration = Duration::from_secs(5);

/// How often the address is probed again during [`STALE_PARTNER_GRACE`].
const GRACE_PROBE_EVERY: Duration = Duration::from_millis(500);

/// [`lbs_netconfig::take_back`], probed again for [`STALE_PARTNER_GRACE`] while the partner
/// (and only the partner) answers; the last answer if it never stops. `None` once this box is
/// no longer the primary: a box fenced meanwhile must not take the address (chaos seed 2806
/// run 35: a fenced box kept probing, found the address free when the new primary lost power,
/// and held it with no PBX behind it) — and an address taken in the moment it was fenced is
/// given up again.
async fn take_back_outlasting_a_stale_partner(
    shared: &Shared,
    plan: &lbs_netconfig::TakeoverPlan,
) -> Result<Option<lbs_netconfig::TakeoverReport>, lbs_netconfig::TakeoverError> {
    let (net, arp) = (&shared.lan.net, &shared.lan.arp);
    let primary = || lock(&shared.machine).record.state == RoleState::Primary;
    let until = tokio::time::Instant::now() + STALE_PARTNER_GRACE;
    let mut said = false;
    loop {
        if !primary() {
            return Ok(None);
        }
        match lbs_netconfig::take_back(net, arp, plan).await {
            Ok(report) if !primary() => {
                tracing::warn!(
                    "fenced while taking {} back: giving it up again ({})",
                    plan.to.addr,
                    report.summary()
                );
                lbs_netconfig::give_up(net, arp, plan).await?;
                return Ok(None);
            }
            Err(lbs_netconfig::TakeoverError::InUse { mac, .. })
                if Some(mac) == lock(&shared.info).partner_mac
                    && tokio::time::Instant::now() < until =>
            {
                if !said {
                    let why = format!(
                        "the partner ({mac}) answers for {}: probing again for up to {} s \
                         (an old primary back from a power cut gives it up once it hears of \
                         the new generation)",
                        plan.to.addr,
                        STALE_PARTNER_GRACE.as_secs()
                    );
                    tracing::warn!("{why}");
                    let _ = shared.progress.send(why);
                    said = true;
                }
                tokio::time::sleep(GRACE_PROBE_EVERY).await;
            }
            outcome => return outcome.map(Some),
        }
    }
}

/// What a primary does when somebody answers ARP for the shared address it is about to hold
/// (at start, or when its cable comes back).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Answered {
    /// The partner took over, or the data center says another is primary now: step back.
    StepBack,
    /// Neither: a spoofed reply or a device with a duplicate address. This box keeps the
    /// address (it is the primary) and raises the alarm; fencing itself for a stranger would
    /// be a lasting outage of the phones.
    KeepAndAlarm,
    /// The partner answers, but the data center says this box is still the primary: the
    /// partner is stale and steps back at its next report. This box stays off the address
    /// and probes again.
    Wait,
}

/// The rule (DESIGN §9): fence when the data center confirms the generation moved, or when
/// the partner answers and the data center cannot be asked (the partner took over). The
/// partner answering while the data center says this box is still the primary is a stale
/// primary (the old one back from a power cut, its boot configuration holding the address
/// until its agent hears of the new generation): this box waits for it, off the address.
/// Anybody else answering is a stranger: keep the address, raise the alarm.
pub(crate) fn answered(
    by: lbs_netconfig::MacAddr,
    partner_mac: Option<lbs_netconfig::MacAddr>,
    dc: DcWord,
) -> Answered {
    let partner = Some(by) == partner_mac;
    match dc {
        DcWord::Moved { .. } => Answered::StepBack,
        DcWord::Primary if partner => Answered::Wait,
        DcWord::Silent if partner => Answered::StepBack,
        DcWord::Primary | DcWord::Silent => Answered::KeepAndAlarm,
    }
}

/// Gathers the facts for [`answered`] (the partner's remembered MAC, the data center's word —
/// `known` if already asked, else asked now) and decides.
pub(crate) async fn on_answer(
    shared: &Shared,
    by: lbs_netconfig::MacAddr,
    known: Option<DcWord>,
) -> Answered {
    let partner_mac = lock(&shared.info).partner_mac;
    let dc = match known {
        Some(word) => word,
        None => dc_word(shared, DC_WORD_DEADLINE).await,
    };
    let verdict = answered(by, partner_mac, dc);
    tracing::warn!(
        "{by} answers for the shared address; the partner is {}, the data center says {dc:?}: {verdict:?}",
        partner_mac.map_or_else(|| "not known by its MAC yet".to_owned(), |m| m.to_string())
    );
    verdict
}

/// What the primary does when somebody announces the shared address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Claim {
    /// A probe claims nothing (P's checks probe before they refuse).
    Ignore,
    /// Not the partner (a misconfigured phone): logged; the PBX does not move for it.
    Stranger,
    /// The partner, which the data center knows as fenced (the old primary back with a stale
    /// address): keep the address and announce it again.
    Defend,
    /// The partner took over (a forced P while this box lived): stop answering, step back.
    StepBack,
}

/// The claim watch's rule, a pure function of the claim and what this box knows of its
/// partner.
pub(crate) fn claim(
    probing: bool,
    by: lbs_netconfig::MacAddr,
    partner_mac: Option<lbs_netconfig::MacAddr>,
    partner_role: Option<lbs_protocol::Role>,
) -> Claim {
    if probing {
        Claim::Ignore
    } else if Some(by) != partner_mac {
        Claim::Stranger
    } else if partner_role == Some(lbs_protocol::Role::Fenced) {
        Claim::Defend
    } else {
        Claim::StepBack
    }
}

/// [`Answered::Wait`]: off the address (withdrawn, so the carrier guard takes it back once
/// nobody answers), and said.
pub(crate) fn wait_for_stale_partner(
    shared: &Shared,
    mac: lbs_netconfig::MacAddr,
    address: std::net::Ipv4Addr,
) {
    let why = format!(
        "the partner ({mac}) answers for {address}, but the data center says this box is still \
         the primary: the partner is a stale primary that steps back at its next report; this \
         box stays off the address and probes again every {} s",
        RECHECK.as_secs()
    );
    tracing::warn!("{why}");
    let _ = shared.progress.send(why.clone());
    withdraw(shared, why);
}

/// Marks the shared address withdrawn (the guard takes it back when it may), with why; a
/// withdrawal already under way keeps its start.
pub(crate) fn withdraw(shared: &Shared, reason: String) {
    let mut withdrawn = lock(&shared.withdrawn);
    let since_ms = withdrawn.as_ref().map_or_else(now_ms, |w| w.since_ms);
    *withdrawn = Some(Withdrawn { reason, since_ms });
}

/// How often the claim watch looks at the role and refreshes the partner's MAC.
const CLAIM_TICK: Duration = Duration::from_secs(1);

/// While this box is the primary: the moment its **partner** announces the shared address (a
/// P, forced while this box still lived), this box stops answering for it — the address
/// leaves the interface at once — and steps back (fenced); the data center confirms the
/// partner's generation at the next report, made from this box's own address. A partner the
/// data center has fenced (the old primary back with a stale address) does not move this box:
/// it announces the address again. Another machine claiming the address is only logged: a
/// misconfigured phone does not move the PBX.
pub(crate) async fn watch_partner_claims(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut partner_mac = lock(&shared.info).partner_mac;
    let mut said: Option<lbs_netconfig::MacAddr> = None;
    let mut defended = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(CLAIM_TICK) => {}
        }
        let Some(network) = network(&shared) else {
            return;
        };
        if lock(&shared.machine).record.state != RoleState::Primary {
            continue;
        }
        let watched = async {
            let link = shared.lan.net.link(&network.interface).await?;
            let mut watch = lbs_netconfig::ConflictWatch::start(&link, network.shared.addr)?;
            loop {
                // Its own statement: a guard in an `if let` chain lives through the body, and
                // `remember_partner_mac` takes the same lock.
                let partner_ip = lock(&shared.info).partner.as_ref().and_then(|p| p.lan);
                if let Some(ip) = partner_ip
                    && let Some(mac) = lbs_netconfig::neighbour_mac(&network.interface, ip)
                {
                    partner_mac = Some(mac);
                    remember_partner_mac(&shared, mac);
                }
                let conflict = tokio::select! {
                    () = shutdown.cancelled() => return anyhow::Ok(()),
                    () = tokio::time::sleep(CLAIM_TICK) => {
                        if lock(&shared.machine).record.state != RoleState::Primary {
                            return Ok(());
                        }
                        continue;
                    }
                    conflict = watch.next() => conflict.context("the ARP watch ended")?,
                };
                let partner_role = lock(&shared.info).partner.as_ref().map(|p| p.role);
                match claim(conflict.probing, conflict.mac, partner_mac, partner_role) {
                    Claim::Ignore => continue,
                    Claim::Stranger => {
                        if said != Some(conflict.mac) {
                            tracing::warn!(
                                "{} claims {} on {}; it is not the partner, so this box keeps the address",
                                conflict.mac,
                                network.shared.addr,
                                network.interface
                            );
                            said = Some(conflict.mac);
                        }
                        *lock(&shared.stranger) = Some((conflict.mac, now_ms()));
                        continue;
                    }
                    Claim::Defend => {
                        // Once a second at most, however often it claims; and never while
                        // the address is off this box's interface (the carrier guard takes it
                        // back when nobody else answers): announcing an address this box does
                        // not hold made two claimants (chaos seed 2806 runs 5, 13 and 35).
                        if defended.is_some_and(|at: std::time::Instant| at.elapsed() < CLAIM_TICK)
                        {
                            continue;
                        }
                        let held = shared
                            .lan
                            .net
                            .addresses(&link)
                            .await
                            .is_ok_and(|held| held.contains(&network.shared));
                        if !held {
                            continue;
                        }
                        defended = Some(std::time::Instant::now());
                        tracing::warn!(
                            "the fenced partner ({}) claims {}: this box keeps it and announces it again",
                            conflict.mac,
                            network.shared.addr
                        );
                        use lbs_netconfig::Arp;
                        if let Err(err) =
                            shared.lan.arp.announce(&link, network.shared.addr, 3).await
                        {
                            tracing::warn!("announcing {}: {err}", network.shared.addr);
                        }
                        continue;
                    }
                    Claim::StepBack => {}
                }
                step_back(&shared, &link, &network, conflict).await;
                return Ok(());
            }
        };
        if let Err(err) = watched.await {
            tracing::warn!(
                "watching {} for the partner's claim: {err:#}",
                network.shared.addr
            );
        }
    }
}

/// The partner just proved itself (its certificate) from `ip`: if that is on the LAN, the
/// kernel's neighbour entry names its MAC, learned the moment the pair first talks rather
/// than whenever this box next looks.
pub(crate) fn learn_partner_mac(shared: &Shared, ip: std::net::IpAddr) {
    let (Some(network), std::net::IpAddr::V4(ip)) = (network(shared), ip) else {
        return;
    };
    if let Some(mac) = lbs_netconfig::neighbour_mac(&network.interface, ip) {
        remember_partner_mac(shared, mac);
    }
}

/// Keeps the partner's MAC in `box.json`, so that after a restart or a pulled cable this box
/// still tells the partner's claim from a stranger's.
fn remember_partner_mac(shared: &Shared, mac: lbs_netconfig::MacAddr) {
    let mut info = lock(&shared.info);
    if info.partner_mac != Some(mac) {
        info.partner_mac = Some(mac);
        if let Err(err) = info.save(&shared.paths) {
            tracing::warn!("saving the partner's MAC: {err:#}");
        }
    }
}

/// The partner announced the shared address: off the interface now, then fenced.
async fn step_back(
    shared: &Shared,
    link: &lbs_netconfig::LinkInfo,
    network: &crate::config::Network,
    conflict: lbs_netconfig::Conflict,
) {
    if let Some(refresh) = lock(&shared.refresh).take() {
        refresh.stop();
    }
    let removed = shared.lan.net.delete_address(link, network.shared).await;
    let why = format!(
        "the partner ({}) announced {}: this box stopped answering for it after {} ms",
        conflict.mac,
        network.shared.addr,
        conflict.at.elapsed().as_millis()
    );
    match removed {
        Ok(()) => tracing::warn!("{why}"),
        Err(err) => tracing::error!("{why}, but removing it failed: {err}"),
    }
    withdraw(shared, why);
    shared.handle(Event::AddressTaken {
        by: format!("the partner ({})", conflict.mac),
    });
}
