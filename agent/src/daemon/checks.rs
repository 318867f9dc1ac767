//! The checks before a promotion (P, automatic, requested by the data center): the facts
//! gathered from the shared state and one ARP probe, then [`promote_verdict`], a pure function
//! of them — every split-brain rule of DESIGN §9 that P enforces is tested there, in-process.

use crate::config::{Network, with_choice};
use crate::control::{Check, Refusal};
use crate::role::{RoleState, SharedAddress};
use crate::status::SetStatus;

use crate::daemon::state::{Lan, Shared, lock, network, now_ms, partner_silent_ms};

/// An ARP probe (RFC 5227: it claims nothing) of the shared address on the office LAN.
pub(crate) async fn probe_shared(
    lan: &Lan,
    network: &Network,
) -> anyhow::Result<lbs_netconfig::ProbeResult> {
    use lbs_netconfig::{Arp, NetBackend};
    let link = lan.net.link(&network.interface).await?;
    // Without carrier nobody can answer: "free" would be a guess (chaos seed 2800 run 3: a
    // backup with its cable out promoted itself over a live primary on such a probe).
    if !link.carrier {
        anyhow::bail!(
            "no carrier on {}: nobody could answer a probe for {}; check the cable",
            network.interface,
            network.shared.addr
        );
    }
    Ok(lan.arp.probe(&link, network.shared.addr).await?)
}

/// Who else answers ARP for the shared address, if anyone (`None` without `[network]`, or
/// when the probe cannot run: then the data center's word at the next report decides).
pub(crate) async fn address_taken(shared: &Shared) -> Option<lbs_netconfig::MacAddr> {
    let network = network(shared)?;
    match probe_shared(&shared.lan, &network).await {
        Ok(lbs_netconfig::ProbeResult::InUse(mac)) => {
            tracing::warn!("{mac} answers ARP for {}", network.shared.addr);
            Some(mac)
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

/// What P's checks look at, gathered at one moment.
#[derive(Clone, Debug)]
pub(crate) struct PromoteFacts {
    pub(crate) now_ms: u64,
    pub(crate) state: RoleState,
    pub(crate) sets: Vec<SetStatus>,
    pub(crate) hardware_differences: Option<Vec<String>>,
    /// When the data center last answered a report.
    pub(crate) datacenter_answered_ms: Option<u64>,
    /// How often this box reports (three missed answers: the data center is silent).
    pub(crate) report_interval_ms: u64,
    /// After how long without a word the primary counts as gone.
    pub(crate) gone_after_ms: u64,
    /// When this box last heard the primary itself.
    pub(crate) primary_heard_ms: Option<u64>,
    /// How long the data center has not heard the partner, if it knows of one.
    pub(crate) partner_silent_ms: Option<u64>,
    pub(crate) has_partner: bool,
    /// The office network with the operator's choice (`None`: a remote box).
    pub(crate) network: Option<Network>,
    /// What the ARP probe of the shared address found (`None`: not probed).
    pub(crate) arp: Option<Result<lbs_netconfig::ProbeResult, String>>,
    pub(crate) promote_note: Option<String>,
}

/// How P was asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Asked {
    pub(crate) force: bool,
    pub(crate) offline: bool,
}

/// Whether this box may become the primary now, and what the operator must know: the rules of
/// DESIGN §9 in order — only the backup; the data center must answer (it fences the old
/// primary) unless offline, where this box itself must have lost the primary; the primary
/// must have been silent for `primary_gone_after`; nobody may answer ARP for the shared
/// address. `force` overrides the primary's liveness and the address answered, nothing else.
pub(crate) fn promote_verdict(facts: &PromoteFacts, asked: Asked) -> Result<Vec<Check>, Refusal> {
    let mut checks = Vec::new();
    if facts.state != RoleState::Backup {
        return Err(Refusal::NotBackup { state: facts.state });
    }
    let now = facts.now_ms;
    for set in &facts.sets {
        checks.push(Check::Copy {
            set: set.name.clone(),
            state: set.state,
            last_in_sync_ago_ms: set.last_in_sync_ms.map(|at| now.saturating_sub(at)),
            pending_files: set.pending_files,
            pending_bytes: set.pending_bytes,
        });
    }
    if let Some(differences) = facts.hardware_differences.clone().filter(|d| !d.is_empty()) {
        checks.push(Check::HardwareDiffers { differences });
    }
    let fresh = facts
        .datacenter_answered_ms
        .is_some_and(|at| now.saturating_sub(at) < 3 * facts.report_interval_ms);
    let gone_after_ms = facts.gone_after_ms;
    if asked.offline {
        if fresh {
            return Err(Refusal::DataCenterAnswers);
        }
        match facts.primary_heard_ms.map(|at| now.saturating_sub(at)) {
            Some(ago_ms) if ago_ms < gone_after_ms && !asked.force => {
                return Err(Refusal::BoxHeardPrimary {
                    ago_ms,
                    gone_after_ms,
                });
            }
            Some(ago_ms) => checks.push(Check::BoxHeardPrimary { ago_ms }),
            None => checks.push(Check::BoxNeverHeardPrimary),
        }
        checks.push(Check::Offline);
    } else {
        if !fresh {
            return Err(Refusal::DataCenterSilent);
        }
        match facts.partner_silent_ms.filter(|_| facts.has_partner) {
            Some(silent_ms) if silent_ms < gone_after_ms && !asked.force => {
                return Err(Refusal::PrimaryAlive {
                    silent_ms,
                    gone_after_ms,
                });
            }
            Some(ago_ms) => checks.push(Check::DataCenterHeardPrimary { ago_ms }),
            None => checks.push(Check::DataCenterNeverHeardPrimary),
        }
    }
    match &facts.network {
        Some(network) => {
            let address = network.shared.addr;
            match &facts.arp {
                None => return Err(Refusal::NotProbed),
                Some(Ok(lbs_netconfig::ProbeResult::Free)) => {
                    checks.push(Check::AddressFree {
                        address,
                        interface: network.interface.clone(),
                    });
                    checks.push(Check::WillTake {
                        shared: network.shared.to_string(),
                        gateway: network.gateway,
                        interface: network.interface.clone(),
                        own: network.own.to_string(),
                    });
                }
                Some(Ok(lbs_netconfig::ProbeResult::InUse(mac))) if !asked.force => {
                    return Err(Refusal::AddressAnswered {
                        address,
                        mac: mac.to_string(),
                    });
                }
                Some(Ok(lbs_netconfig::ProbeResult::InUse(mac))) => {
                    checks.push(Check::AddressAnsweredForced {
                        address,
                        mac: mac.to_string(),
                    });
                }
                Some(Err(error)) => {
                    return Err(Refusal::ProbeFailed {
                        address,
                        error: error.clone(),
                    });
                }
            }
        }
        None => checks.push(Check::KeepsOwnAddress),
    }
    if let Some(text) = &facts.promote_note {
        checks.push(Check::Note { text: text.clone() });
    }
    Ok(checks)
}

/// The facts of P's checks as the shared state has them now (the shared address not probed).
fn gather(shared: &Shared, chosen: Option<SharedAddress>) -> PromoteFacts {
    let config = shared.config();
    let (partner, hardware_differences) = {
        let info = lock(&shared.info);
        (info.partner.is_some(), info.hardware_differences.clone())
    };
    let millis = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    // Each lock taken and released on its own line: a guard in the struct expression below
    // would live to its end, and `partner_silent_ms` takes two of them again.
    let state = lock(&shared.machine).record.state;
    let sets = lock(&shared.sets).clone();
    let datacenter_answered_ms = lock(&shared.datacenter).last_answer_ms;
    let primary_heard_ms = *lock(&shared.partner_heard_ms);
    let partner_silent_ms = partner_silent_ms(shared);
    PromoteFacts {
        now_ms: now_ms(),
        state,
        sets,
        hardware_differences,
        datacenter_answered_ms,
        report_interval_ms: millis(config.report_interval),
        gone_after_ms: millis(config.primary_gone_after),
        primary_heard_ms,
        partner_silent_ms,
        has_partner: partner,
        network: with_choice(config.network.clone(), chosen),
        arp: None,
        promote_note: config.promote_note.clone(),
    }
}

/// The checks before **P**: the facts, and the shared address probed only when every other
/// check passed (a refusal costs no ARP traffic).
pub(crate) async fn promote_checks(
    shared: &Shared,
    asked: Asked,
    chosen: Option<SharedAddress>,
) -> Result<Vec<Check>, Refusal> {
    let mut facts = gather(shared, chosen);
    match promote_verdict(&facts, asked) {
        Err(Refusal::NotProbed) => {}
        other => return other,
    }
    if let Some(network) = &facts.network {
        facts.arp = Some(
            probe_shared(&shared.lan, network)
                .await
                .map_err(|err| format!("{err:#}")),
        );
    }
    promote_verdict(&facts, asked)
}

#[cfg(test)]
mod tests {
    //! DESIGN §9's rules for P, each on the facts alone (no root, no network, no clock).
    #![allow(clippy::unwrap_used)]
    use super::*;
    use lbs_netconfig::{MacAddr, ProbeResult};

    const NOW: u64 = 10_000_000;
    const OLD_PRIMARY: MacAddr = MacAddr([0x5a, 0xec, 0xb4, 0x27, 0x71, 0xcf]);

    /// A backup whose primary died a minute ago, the data center answering, nobody on the
    /// shared address: P goes ahead.
    fn primary_dead() -> PromoteFacts {
        PromoteFacts {
            now_ms: NOW,
            state: RoleState::Backup,
            sets: vec![SetStatus {
                name: "voicemail".into(),
                state: crate::status::SetState::InSync,
                last_in_sync_ms: Some(NOW - 61_000),
                ..SetStatus::default()
            }],
            hardware_differences: None,
            datacenter_answered_ms: Some(NOW - 1_000),
            report_interval_ms: 2_000,
            gone_after_ms: 10_000,
            primary_heard_ms: Some(NOW - 60_000),
            partner_silent_ms: Some(60_000),
            has_partner: true,
            network: Some(Network {
                interface: "eth0".into(),
                shared: "192.168.1.2/24".parse().unwrap(),
                own: "192.168.1.3/24".parse().unwrap(),
                gateway: "192.168.1.1".parse().unwrap(),
                boot_config: None,
            }),
            arp: Some(Ok(ProbeResult::Free)),
            promote_note: None,
        }
    }

    const P: Asked = Asked {
        force: false,
        offline: false,
    };
    const FORCE: Asked = Asked {
        force: true,
        offline: false,
    };
    const OFFLINE: Asked = Asked {
        force: false,
        offline: true,
    };

    #[test]
    fn a_dead_primary_is_replaced_and_the_operator_is_told_what_happens() {
        let checks = promote_verdict(&primary_dead(), P).unwrap();
        let lines: Vec<String> = checks.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "copy of voicemail   in sync — last in sync 61.0 s ago",
                "the data center last heard the primary 60.0 s ago",
                "nobody answers ARP for 192.168.1.2 on eth0",
                "this box will take 192.168.1.2/24 via 192.168.1.1 on eth0 (it has 192.168.1.3/24 now)",
            ]
        );
    }

    #[test]
    fn only_the_backup_is_promoted() {
        for state in [
            RoleState::Primary,
            RoleState::Fenced,
            RoleState::Unactivated,
        ] {
            let facts = PromoteFacts {
                state,
                ..primary_dead()
            };
            for asked in [P, FORCE, OFFLINE] {
                assert_eq!(
                    promote_verdict(&facts, asked).unwrap_err(),
                    Refusal::NotBackup { state }
                );
            }
        }
    }

    #[test]
    fn a_primary_the_data_center_still_hears_is_alive_unless_forced() {
        let facts = PromoteFacts {
            partner_silent_ms: Some(3_000),
            ..primary_dead()
        };
        let refused = promote_verdict(&facts, P).unwrap_err();
        assert_eq!(
            refused,
            Refusal::PrimaryAlive {
                silent_ms: 3_000,
                gone_after_ms: 10_000
            }
        );
        assert!(refused.can_force() && !refused.can_go_offline());
        assert!(refused.to_string().contains("wait 7 s more"), "{refused}");
        let forced = promote_verdict(&facts, FORCE).unwrap();
        assert!(forced.contains(&Check::DataCenterHeardPrimary { ago_ms: 3_000 }));
    }

    #[test]
    fn a_silent_data_center_stops_p_and_offers_offline_which_needs_the_box_to_have_lost_the_primary()
     {
        let facts = PromoteFacts {
            datacenter_answered_ms: Some(NOW - 6_000),
            ..primary_dead()
        };
        let refused = promote_verdict(&facts, P).unwrap_err();
        assert_eq!(refused, Refusal::DataCenterSilent);
        assert!(refused.can_go_offline() && !refused.can_force());
        // Forcing does not replace the data center's fencing.
        assert_eq!(
            promote_verdict(&facts, FORCE).unwrap_err(),
            Refusal::DataCenterSilent
        );
        let checks = promote_verdict(&facts, OFFLINE).unwrap();
        assert!(checks.contains(&Check::Offline));
        assert!(checks.contains(&Check::BoxHeardPrimary { ago_ms: 60_000 }));
        // This box still hears the primary over the watch connection: it is alive.
        let heard = PromoteFacts {
            primary_heard_ms: Some(NOW - 1_500),
            ..facts.clone()
        };
        let refused = promote_verdict(&heard, OFFLINE).unwrap_err();
        assert_eq!(
            refused,
            Refusal::BoxHeardPrimary {
                ago_ms: 1_500,
                gone_after_ms: 10_000
            }
        );
        assert!(refused.can_force());
        // A data center that never answered is as silent.
        let never = PromoteFacts {
            datacenter_answered_ms: None,
            ..primary_dead()
        };
        assert_eq!(
            promote_verdict(&never, P).unwrap_err(),
            Refusal::DataCenterSilent
        );
    }

    #[test]
    fn offline_is_refused_while_the_data_center_answers() {
        let refused = promote_verdict(&primary_dead(), OFFLINE).unwrap_err();
        assert_eq!(refused, Refusal::DataCenterAnswers);
        assert!(!refused.can_force() && !refused.can_go_offline());
    }

    #[test]
    fn an_address_answered_by_another_machine_is_not_taken_unless_forced() {
        let facts = PromoteFacts {
            arp: Some(Ok(ProbeResult::InUse(OLD_PRIMARY))),
            ..primary_dead()
        };
        let refused = promote_verdict(&facts, P).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "cannot take 192.168.1.2: 5a:ec:b4:27:71:cf still answers ARP; unplug the old primary or use --force"
        );
        assert!(refused.can_force());
        let forced = promote_verdict(&facts, FORCE).unwrap();
        assert!(
            forced
                .iter()
                .any(|c| matches!(c, Check::AddressAnsweredForced { .. }))
        );
        // A probe that cannot run refuses, forced or not: nobody knows who holds the address.
        let blind = PromoteFacts {
            arp: Some(Err("eth0: no such interface".into())),
            ..primary_dead()
        };
        for asked in [P, FORCE] {
            let refused = promote_verdict(&blind, asked).unwrap_err();
            assert!(matches!(refused, Refusal::ProbeFailed { .. }), "{refused}");
        }
        // And the verdict is never yes without a probe.
        let unprobed = PromoteFacts {
            arp: None,
            ..primary_dead()
        };
        assert_eq!(
            promote_verdict(&unprobed, FORCE).unwrap_err(),
            Refusal::NotProbed
        );
    }

    #[test]
    fn a_remote_backup_keeps_its_address_and_needs_no_probe() {
        let facts = PromoteFacts {
            network: None,
            arp: None,
            promote_note: Some("move the PRI cable".into()),
            hardware_differences: Some(vec!["2 NICs, the primary has 3".into()]),
            ..primary_dead()
        };
        let checks = promote_verdict(&facts, P).unwrap();
        assert!(checks.contains(&Check::KeepsOwnAddress));
        assert!(checks.contains(&Check::HardwareDiffers {
            differences: vec!["2 NICs, the primary has 3".into()]
        }));
        assert_eq!(
            checks.last(),
            Some(&Check::Note {
                text: "move the PRI cable".into()
            })
        );
    }

    #[test]
    fn a_pair_without_a_heard_partner_promotes_on_the_data_centers_word() {
        let facts = PromoteFacts {
            partner_silent_ms: None,
            ..primary_dead()
        };
        assert!(
            promote_verdict(&facts, P)
                .unwrap()
                .contains(&Check::DataCenterNeverHeardPrimary)
        );
    }
}
