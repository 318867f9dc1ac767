//! The checks before a promotion (P, automatic, requested by the data center).

use crate::config::with_choice;
use crate::role::{RoleState, SharedAddress};
use crate::text::human_bytes;

use crate::daemon::state::{Shared, lock, network, now_ms, partner_silent_ms};

/// An ARP probe (RFC 5227: it claims nothing) of the shared address on the office LAN.
pub(crate) async fn probe_shared(
    network: &crate::config::Network,
) -> anyhow::Result<lbs_netconfig::ProbeResult> {
    use lbs_netconfig::{Arp, NetBackend};
    let net = lbs_netconfig::Netlink::open()?;
    let link = net.link(&network.interface).await?;
    let arp = lbs_netconfig::PacketArp::new(lbs_netconfig::ProbeProfile::FAST);
    Ok(arp.probe(&link, network.shared.addr).await?)
}

/// Who else answers ARP for the shared address, if anyone (`None` without `[network]`, or
/// when the probe cannot run: then the data center's word at the next report decides).
pub(crate) async fn address_taken(shared: &Shared) -> Option<String> {
    let network = network(shared)?;
    match probe_shared(&network).await {
        Ok(lbs_netconfig::ProbeResult::InUse(mac)) => {
            tracing::warn!("{mac} answers ARP for {}", network.shared.addr);
            Some(mac.to_string())
        }
        Ok(lbs_netconfig::ProbeResult::Free) => {
            tracing::info!(
                "nobody else answers ARP for {}: this box keeps serving on it",
                network.shared.addr
            );
            None
        }
        Err(err) => {
            tracing::warn!("probing {} at start: {err:#}", network.shared.addr);
            None
        }
    }
}

/// The checks before **P**: what the operator must know, and whether to go ahead.
pub(crate) async fn promote_checks(
    shared: &Shared,
    force: bool,
    chosen: Option<SharedAddress>,
    offline: bool,
) -> Result<Vec<String>, String> {
    let mut lines = Vec::new();
    let state = lock(&shared.machine).record.state;
    if state != RoleState::Backup {
        return Err(format!(
            "only the backup can be promoted; this box is {state}"
        ));
    }
    let now = now_ms();
    for set in lock(&shared.sets).iter() {
        lines.push(format!(
            "copy of {:<11} {} — last in sync {}{}",
            set.name,
            set.state,
            set.last_in_sync_ms.map_or("never".to_owned(), |at| format!(
                "{:.1} s ago",
                now.saturating_sub(at) as f64 / 1000.0
            )),
            match (set.pending_files, set.pending_bytes) {
                (0, 0) => String::new(),
                (files, 0) => format!(", {files} file(s) not copied yet"),
                (0, bytes) => format!(", {} not copied yet", human_bytes(bytes as f64)),
                (files, bytes) => format!(
                    ", {files} file(s) and {} not copied yet",
                    human_bytes(bytes as f64)
                ),
            }
        ));
    }
    let (partner, hardware) = {
        let info = lock(&shared.info);
        (info.partner.clone(), info.hardware_differences.clone())
    };
    if let Some(differences) = hardware.filter(|d| !d.is_empty()) {
        lines.push(format!(
            "WARNING: this box's hardware differs from the primary's: {}",
            differences.join("; ")
        ));
    }
    // The data center must be reachable: it is the one that fences the old primary.
    let answered = lock(&shared.datacenter).last_answer_ms;
    let fresh = answered.is_some_and(|at| {
        now.saturating_sub(at)
            < 3 * u64::try_from(shared.config().report_interval.as_millis()).unwrap_or(u64::MAX)
    });
    let gone_after =
        u64::try_from(shared.config().primary_gone_after.as_millis()).unwrap_or(u64::MAX);
    if offline {
        // Without the data center: it must really be gone, and this box must have lost the
        // primary itself.
        if fresh {
            return Err(
                "the data center answers: promote normally (without --offline), it fences the old primary"
                    .to_owned(),
            );
        }
        match *lock(&shared.partner_heard_ms) {
            Some(at) if now.saturating_sub(at) < gone_after && !force => {
                return Err(format!(
                    "this box heard the primary {:.1} s ago: it is alive (wait {} s of silence)",
                    now.saturating_sub(at) as f64 / 1000.0,
                    gone_after / 1000
                ));
            }
            Some(at) => lines.push(format!(
                "this box last heard the primary {:.1} s ago",
                now.saturating_sub(at) as f64 / 1000.0
            )),
            None => lines.push("this box has not heard the primary since it started".to_owned()),
        }
        lines.push(
            "OFFLINE: the data center is unreachable; it is told when it answers again (if the pair moved on meanwhile, this box steps back)"
                .to_owned(),
        );
    } else {
        if !fresh {
            return Err(
                "the data center has not answered lately; a promotion needs it (it fences the old primary). If it is down and the primary surely dead: --offline"
                    .to_owned(),
            );
        }
        match partner.as_ref().and(partner_silent_ms(shared)) {
            Some(silent) if silent < gone_after && !force => {
                return Err(format!(
                    "the data center heard the primary {:.1} s ago: it is alive (after {} s of silence it counts as gone: wait {} s more, or use --force)",
                    silent as f64 / 1000.0,
                    gone_after / 1000,
                    (gone_after - silent).div_ceil(1000)
                ));
            }
            Some(silent) => lines.push(format!(
                "the data center last heard the primary {:.1} s ago",
                silent as f64 / 1000.0
            )),
            None => lines.push("the data center never heard the primary".to_owned()),
        }
    }
    if let Some(network) = &with_choice(shared.config().network.clone(), chosen) {
        match probe_shared(network).await {
            Ok(lbs_netconfig::ProbeResult::Free) => {
                lines.push(format!(
                    "nobody answers ARP for {} on {}",
                    network.shared.addr, network.interface
                ));
                lines.push(format!(
                    "this box will take {} via {} on {} (it has {} now)",
                    network.shared, network.gateway, network.interface, network.own
                ));
            }
            Ok(lbs_netconfig::ProbeResult::InUse(mac)) if !force => {
                return Err(format!(
                    "cannot take {}: {mac} still answers ARP; unplug the old primary or use --force",
                    network.shared.addr
                ));
            }
            Ok(lbs_netconfig::ProbeResult::InUse(mac)) => lines.push(format!(
                "WARNING: {mac} still answers ARP for {} (--force)",
                network.shared.addr
            )),
            Err(err) => return Err(format!("probing {}: {err:#}", network.shared.addr)),
        }
    } else {
        lines.push(
            "no [network] section: this box keeps its own address; phones follow the DNS update"
                .to_owned(),
        );
    }
    if let Some(note) = &shared.config().promote_note {
        lines.push(format!("NOTE: {note}"));
    }
    Ok(lines)
}
