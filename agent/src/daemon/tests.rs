//! The daemon's rooms in-process, on a [`FakeNet`] office LAN: promotion's checks and steps,
//! the carrier guard, fencing and B — DESIGN §9's split-brain rules with no root, no
//! namespaces and no data center (its word is given to the role machine as events).
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use lbs_netconfig::{AnyArp, AnyNet, DefaultRoute, FakeNet, Ipv4Cidr, MacAddr};
use lbs_protocol::Generation;
use lbs_protocol::control::PartnerInfo;

use crate::activate::{BoxInfo, StatePaths};
use crate::config::AgentConfig;
use crate::control::{Check, Refusal};
use crate::daemon::checks::{Asked, promote_checks};
use crate::daemon::guard::{self, Claim, Hold};
use crate::daemon::state::{Lan, Queues, Shared, lock, now_ms};
use crate::daemon::steps::{StepOutcome, run_step};
use crate::resources::ResourceHistory;
use crate::role::{Action, DemoteStep, Event, PromoteStep, RoleRecord, RoleState};

const THIS_BOX: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x03]);
const OLD_PRIMARY: MacAddr = MacAddr([0x5a, 0xec, 0xb4, 0x27, 0x71, 0xcf]);
const SHARED: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 2);

fn cidr(text: &str) -> Ipv4Cidr {
    text.parse().unwrap()
}

/// One box of an office pair, its LAN a [`FakeNet`] with `addresses` on eth0 and the default
/// route via the office gateway.
struct Office {
    shared: Arc<Shared>,
    lan: Arc<FakeNet>,
    _queues: Queues,
    _dir: tempfile::TempDir,
}

impl Office {
    fn new(state: RoleState, addresses: &[&str]) -> Office {
        Office::configured(state, addresses, "")
    }

    /// With `top` (configuration lines before the `[network]` section) added.
    fn configured(state: RoleState, addresses: &[&str], top: &str) -> Office {
        let dir = tempfile::tempdir().unwrap();
        let paths = StatePaths::new(dir.path());
        std::fs::create_dir_all(&paths.dir).unwrap();
        let lan = Arc::new(FakeNet::new());
        let link = lan.add_link(
            "eth0",
            THIS_BOX,
            &addresses.iter().map(|a| cidr(a)).collect::<Vec<_>>(),
        );
        lan.set_route(Some(DefaultRoute {
            gateway: Ipv4Addr::new(192, 168, 1, 1),
            link: link.index,
        }));
        let config = AgentConfig::parse(&format!(
            "{top}\n[network]\ninterface = \"eth0\"\nshared = \"192.168.1.2/24\"\nown = \"192.168.1.3/24\"\ngateway = \"192.168.1.1\"\n"
        ))
        .unwrap();
        let record = RoleRecord {
            state,
            generation: Generation(1),
            ..RoleRecord::new()
        };
        let info = BoxInfo {
            sid: "00-1A-2B-3C-4D-5E".parse().unwrap(),
            pair: "acme".into(),
            fqdn: "pbx.acme.example".into(),
            lan: Ipv4Addr::new(192, 168, 1, 3),
            overlay: Ipv4Addr::new(10, 77, 0, 11),
            overlay_prefix: 24,
            partner: Some(PartnerInfo {
                sid: "00-1A-2B-3C-4D-5F".parse().unwrap(),
                role: lbs_protocol::Role::Primary,
                overlay: Some(Ipv4Addr::new(10, 77, 0, 10)),
                lan: Some(Ipv4Addr::new(192, 168, 1, 4)),
                silent_ms: Some(60_000),
            }),
            control: vec![SocketAddr::from(([127, 0, 0, 1], 1))],
            activated_at: SocketAddr::from(([127, 0, 0, 1], 1)),
            hardware_differences: None,
            partner_mac: None,
            partner_key: None,
        };
        let resources = ResourceHistory::open(&dir.path().join("resources.sqlite")).unwrap();
        let net = Lan {
            net: AnyNet::shared(lan.clone()),
            arp: AnyArp::shared(lan.clone()),
        };
        let (shared, queues) = Shared::new(
            config,
            dir.path().join("agent.toml"),
            paths,
            record,
            info,
            resources,
            net,
        );
        // The data center answered a moment ago (as far as the checks are concerned).
        lock(&shared.datacenter).last_answer_ms = Some(now_ms());
        Office {
            shared: Arc::new(shared),
            lan,
            _queues: queues,
            _dir: dir,
        }
    }

    fn state(&self) -> RoleState {
        lock(&self.shared.machine).record.state
    }

    fn addresses(&self) -> Vec<Ipv4Cidr> {
        self.lan.addresses_of("eth0")
    }
}

/// A backup whose primary is dead: the data center lost it a minute ago.
fn backup() -> Office {
    Office::new(RoleState::Backup, &["192.168.1.3/24"])
}

fn primary() -> Office {
    Office::new(RoleState::Primary, &["192.168.1.3/24", "192.168.1.2/24"])
}

/// A primary whose cable was out (the address withdrawn) and is back in, the partner (known by
/// its MAC) answering for the shared address; the carrier guard has not looked yet.
async fn partner_on_the_address_as_the_cable_returns() -> Office {
    let office = primary();
    office.lan.set_carrier("eth0", false);
    guard::check(&office.shared, false).await.unwrap();
    lock(&office.shared.info).partner_mac = Some(OLD_PRIMARY);
    office.lan.set_neighbour(SHARED, Some(OLD_PRIMARY));
    office.lan.set_carrier("eth0", true);
    office
}

#[tokio::test]
async fn p_is_refused_while_another_machine_answers_for_the_address_and_goes_when_it_is_unplugged()
{
    let office = backup();
    office.lan.set_neighbour(SHARED, Some(OLD_PRIMARY));
    let refused = promote_checks(&office.shared, Asked::default(), None)
        .await
        .unwrap_err();
    assert_eq!(
        refused,
        Refusal::AddressAnswered {
            address: SHARED,
            mac: OLD_PRIMARY.to_string()
        }
    );
    // Nothing moved: the address is not taken, the role is the same.
    assert_eq!(office.addresses(), vec![cidr("192.168.1.3/24")]);
    assert_eq!(office.state(), RoleState::Backup);
    office.lan.set_neighbour(SHARED, None);
    let checks = promote_checks(&office.shared, Asked::default(), None)
        .await
        .unwrap();
    assert!(checks.contains(&Check::AddressFree {
        address: SHARED,
        interface: "eth0".into()
    }));
}

/// Chaos seed 2800 run 3: a backup whose cable was out promoted itself over a live primary —
/// its probe of the shared address heard nobody (nobody could answer), and it carried the data
/// center's last word on the primary's silence forward through its own isolation.
#[tokio::test]
async fn chaos_seed_2800_run_3_no_promotion_on_a_probe_without_carrier() {
    let office = backup();
    office.lan.set_carrier("eth0", false);
    let refused = promote_checks(&office.shared, Asked::default(), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, Refusal::ProbeFailed { error, .. } if error.contains("no carrier on eth0")),
        "{refused:?}"
    );
    // Even forced: nothing on the LAN can be checked, nor reached once taken.
    let forced = Asked {
        force: true,
        ..Asked::default()
    };
    assert!(promote_checks(&office.shared, forced, None).await.is_err());
    assert_eq!(office.addresses(), vec![cidr("192.168.1.3/24")]);
    office.lan.set_carrier("eth0", true);
    assert!(
        promote_checks(&office.shared, Asked::default(), None)
            .await
            .is_ok()
    );
}

#[test]
fn chaos_seed_2800_run_3_the_data_centers_word_is_carried_forward_one_report_interval_at_most() {
    use crate::daemon::state::partner_silent_as_of;
    // Reports answered on time: the silence grows with the clock.
    assert_eq!(partner_silent_as_of(500, 10_000, 10_800, 1_000), 1_300);
    // The answer overdue (this box cut off 2.4 s ago): no more than one interval added.
    assert_eq!(partner_silent_as_of(500, 10_000, 12_400, 1_000), 1_500);
    assert_eq!(partner_silent_as_of(500, 10_000, 9_000, 1_000), 500);
}

#[tokio::test]
async fn p_is_refused_while_the_data_center_hears_the_primary_or_is_silent() {
    let office = backup();
    lock(&office.shared.info)
        .partner
        .as_mut()
        .unwrap()
        .silent_ms = Some(2_000);
    let refused = promote_checks(&office.shared, Asked::default(), None)
        .await
        .unwrap_err();
    assert!(matches!(refused, Refusal::PrimaryAlive { .. }), "{refused}");
    lock(&office.shared.datacenter).last_answer_ms = Some(now_ms() - 60_000);
    let refused = promote_checks(&office.shared, Asked::default(), None)
        .await
        .unwrap_err();
    assert_eq!(refused, Refusal::DataCenterSilent);
    // Neither refusal sent anything on the LAN: the probe runs only when all else passed.
    assert!(!office.lan.calls().contains(&lbs_netconfig::fake::Op::Probe));
}

#[tokio::test]
async fn the_take_address_step_moves_the_address_and_the_route_and_announces_it() {
    let office = Office::new(
        RoleState::Promoting(PromoteStep::TakeAddress),
        &["192.168.1.3/24"],
    );
    let moved = *office.shared.moved.borrow();
    let outcome = run_step(&office.shared, &Action::TakeAddress)
        .await
        .unwrap();
    assert!(
        matches!(&outcome, StepOutcome::Done(what) if what.starts_with("took 192.168.1.2/24 on eth0")),
        "{outcome:?}"
    );
    assert_eq!(office.addresses(), vec![cidr("192.168.1.2/24")]);
    assert_eq!(
        office.lan.route().map(|r| r.gateway),
        Some(Ipv4Addr::new(192, 168, 1, 1))
    );
    assert!(
        office
            .lan
            .announced()
            .iter()
            .any(|(ip, mac, _)| *ip == SHARED && *mac == THIS_BOX)
    );
    // Connections made from the old address are made again.
    assert_eq!(*office.shared.moved.borrow(), moved + 1);
}

#[tokio::test]
async fn a_grant_that_arrives_after_p_gave_up_takes_only_a_free_address() {
    let office = Office::new(
        RoleState::Promoting(PromoteStep::TakeAddress),
        &["192.168.1.3/24"],
    );
    lock(&office.shared.machine).record.abandoned = Some(Generation(2));
    office.lan.set_neighbour(SHARED, Some(OLD_PRIMARY));
    let err = run_step(&office.shared, &Action::TakeAddress)
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains(&OLD_PRIMARY.to_string()),
        "{err:#}"
    );
    assert_eq!(office.addresses(), vec![cidr("192.168.1.3/24")]);
    // The operator's own P (not given up on) was confirmed at the checks: it takes it.
    lock(&office.shared.machine).record.abandoned = None;
    run_step(&office.shared, &Action::TakeAddress)
        .await
        .unwrap();
    assert!(office.addresses().contains(&cidr("192.168.1.2/24")));
}

#[tokio::test]
async fn a_crash_at_any_point_of_the_take_over_is_finished_by_the_step_run_again() {
    for changes in 0..6 {
        let office = Office::new(
            RoleState::Promoting(PromoteStep::TakeAddress),
            &["192.168.1.3/24"],
        );
        office.lan.crash_after(changes);
        let first = run_step(&office.shared, &Action::TakeAddress).await;
        office.lan.restart();
        // The executor runs a failed step again (the role machine stays in it).
        run_step(&office.shared, &Action::TakeAddress)
            .await
            .unwrap_or_else(|err| panic!("after {changes} change(s), {first:?}: {err:#}"));
        // The backup's own address gives way to the primary's, as without a crash.
        assert_eq!(
            office.addresses(),
            vec![cidr("192.168.1.2/24")],
            "crash after {changes} change(s)"
        );
        assert_eq!(
            office.lan.route().map(|r| r.gateway),
            Some(Ipv4Addr::new(192, 168, 1, 1))
        );
    }
}

#[tokio::test]
async fn b_gives_the_address_up_and_keeps_the_box_reachable() {
    let office = Office::new(
        RoleState::Demoting(DemoteStep::GiveUpAddress),
        &["192.168.1.3/24", "192.168.1.2/24"],
    );
    run_step(&office.shared, &Action::GiveUpAddress)
        .await
        .unwrap();
    assert_eq!(office.addresses(), vec![cidr("192.168.1.3/24")]);
    assert_eq!(
        office.lan.route().map(|r| r.gateway),
        Some(Ipv4Addr::new(192, 168, 1, 1))
    );
}

#[tokio::test]
async fn a_primary_without_carrier_withdraws_the_address_and_takes_it_back_only_when_free() {
    let office = primary();
    office.lan.set_carrier("eth0", false);
    guard::check(&office.shared, false).await.unwrap();
    assert_eq!(office.addresses(), vec![cidr("192.168.1.3/24")]);
    assert!(lock(&office.shared.withdrawn).is_some());
    // Back, and nobody else answers: taken back, still primary.
    office.lan.set_carrier("eth0", true);
    guard::check(&office.shared, true).await.unwrap();
    assert!(office.addresses().contains(&cidr("192.168.1.2/24")));
    assert!(lock(&office.shared.withdrawn).is_none());
    assert_eq!(office.state(), RoleState::Primary);
    // No pbx_start to run again (unless this machine has asterisk.service): no step recorded.
    if office.shared.config().pbx_start.is_none() {
        assert!(lock(&office.shared.recent_steps).is_empty());
    }
}

/// Chaos seed 2809 runs 31, 41 and 61: a primary booted on its own address by the boot check
/// started its PBX before it took the shared address back; the PBX could not listen there and
/// nothing started it again. Taking the address back runs `pbx_start` again.
#[tokio::test]
async fn a_primary_that_takes_the_address_back_starts_its_pbx_again() {
    let marks = tempfile::tempdir().unwrap();
    let started = marks.path().join("started");
    let office = Office::configured(
        RoleState::Primary,
        &["192.168.1.3/24"],
        &format!("pbx_start = \"echo started >> '{}'\"", started.display()),
    );
    // The start at boot failed (the address was not there to listen on).
    crate::daemon::steps::start_pbx_again(&office.shared, "test").await;
    std::fs::remove_file(&started).unwrap();
    lock(&office.shared.recent_steps).back_mut().unwrap().error =
        Some("`pbx-start` failed: exit status: 255".into());
    assert!(
        crate::health::pbx_start_failed(
            &lock(&office.shared.recent_steps)
                .iter()
                .cloned()
                .collect::<Vec<_>>()
        )
        .is_some()
    );
    guard::withdraw(
        &office.shared,
        "the boot check booted this box on its own".into(),
    );
    guard::check(&office.shared, true).await.unwrap();
    assert!(office.addresses().contains(&cidr("192.168.1.2/24")));
    assert_eq!(std::fs::read_to_string(&started).unwrap(), "started\n");
    let steps: Vec<_> = lock(&office.shared.recent_steps).iter().cloned().collect();
    assert_eq!(crate::health::pbx_start_failed(&steps), None, "{steps:?}");
}

#[tokio::test(start_paused = true)]
async fn a_primary_whose_address_was_taken_while_its_cable_was_out_steps_back() {
    // Meanwhile the backup (whose MAC this box saw before) was promoted and took the address.
    let office = partner_on_the_address_as_the_cable_returns().await;
    guard::check(&office.shared, true).await.unwrap();
    assert_eq!(office.addresses(), vec![cidr("192.168.1.3/24")]);
    assert_eq!(office.state(), RoleState::Fenced);
}

/// Chaos seed 42 run 3: the old primary, back from a power cut while this box's cable was
/// out, holds the address for a moment after its boot; this box probes again and takes it
/// back once the old one lets go, instead of stepping back on its first answer.
#[tokio::test(start_paused = true)]
async fn chaos_seed_42_run_3_a_partner_that_lets_go_within_the_grace_does_not_fence_the_primary() {
    let office = partner_on_the_address_as_the_cable_returns().await;
    let lan = office.lan.clone();
    let lets_go = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        lan.set_neighbour(SHARED, None);
    });
    guard::check(&office.shared, true).await.unwrap();
    lets_go.await.unwrap();
    assert_eq!(office.state(), RoleState::Primary);
    assert!(office.addresses().contains(&cidr("192.168.1.2/24")));
    assert!(lock(&office.shared.withdrawn).is_none());
}

/// Chaos seed 2806 run 35: fenced while it waited for the partner to let go, a box must not
/// take the address when it comes free.
#[tokio::test(start_paused = true)]
async fn chaos_seed_2806_run_35_a_box_fenced_during_the_grace_does_not_take_the_address() {
    let office = partner_on_the_address_as_the_cable_returns().await;
    let (lan, shared) = (office.lan.clone(), office.shared.clone());
    let meanwhile = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        lock(&shared.machine).record.state = RoleState::Fenced;
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        lan.set_neighbour(SHARED, None);
    });
    guard::check(&office.shared, true).await.unwrap();
    meanwhile.await.unwrap();
    assert!(!office.addresses().contains(&cidr("192.168.1.2/24")));
    assert!(lock(&office.shared.withdrawn).is_none());
}

#[tokio::test]
async fn a_stranger_answering_for_the_address_when_the_cable_returns_does_not_fence_the_primary() {
    let office = primary();
    lock(&office.shared.info).partner_mac = Some(OLD_PRIMARY);
    office.lan.set_carrier("eth0", false);
    guard::check(&office.shared, false).await.unwrap();
    // A spoofed reply, or a phone configured with the PBX's address; the data center (at a
    // port nobody listens on) does not answer.
    let stranger = MacAddr([0x02, 0xba, 0xd0, 0, 0, 0x66]);
    office.lan.set_neighbour(SHARED, Some(stranger));
    office.lan.set_carrier("eth0", true);
    guard::check(&office.shared, true).await.unwrap();
    assert_eq!(office.state(), RoleState::Primary);
    assert!(office.addresses().contains(&cidr("192.168.1.2/24")));
    assert!(lock(&office.shared.withdrawn).is_none());
    // The alarm is raised, naming the device.
    let status = office.shared.status();
    assert!(
        status.health.iter().any(|p| matches!(
            p,
            crate::status::Problem::DuplicateAddress { by, .. } if *by == stranger.to_string()
        )),
        "{:?}",
        status.health
    );
}

#[test]
fn a_primary_steps_back_for_the_partner_unless_the_data_center_says_it_is_still_primary() {
    use crate::daemon::report::DcWord;
    use guard::Answered;
    let stranger = MacAddr([0x02, 0xba, 0xd0, 0, 0, 0x66]);
    let partner = Some(OLD_PRIMARY);
    let moved = DcWord::Moved {
        role: lbs_protocol::Role::Fenced,
        generation: lbs_protocol::Generation(3),
    };
    assert_eq!(
        guard::answered(OLD_PRIMARY, partner, moved),
        Answered::StepBack
    );
    assert_eq!(
        guard::answered(stranger, partner, moved),
        Answered::StepBack
    );
    assert_eq!(guard::answered(stranger, None, moved), Answered::StepBack);
    // Chaos seed 42 run 3: the partner answers, but the data center says this box is still
    // the primary — the partner is the old primary back from a power cut, its boot
    // configuration holding the address until its agent hears of the new generation. This
    // box waits for it; stepping back too left both fenced and the phones unanswered.
    assert_eq!(
        guard::answered(OLD_PRIMARY, partner, DcWord::Primary),
        Answered::Wait
    );
    // The data center out of reach: the partner took over (the guard has probed for
    // `STALE_PARTNER_GRACE` before it asks).
    assert_eq!(
        guard::answered(OLD_PRIMARY, partner, DcWord::Silent),
        Answered::StepBack
    );
    assert_eq!(
        guard::answered(stranger, partner, DcWord::Silent),
        Answered::KeepAndAlarm
    );
    assert_eq!(
        guard::answered(stranger, partner, DcWord::Primary),
        Answered::KeepAndAlarm
    );
    // The partner not known by its MAC, the data center silent: keep serving, alarm.
    assert_eq!(
        guard::answered(OLD_PRIMARY, None, DcWord::Silent),
        Answered::KeepAndAlarm
    );
}

#[tokio::test]
async fn two_presses_of_p_at_once_promote_once() {
    let office = backup();
    office.shared.apply(Event::PromoteRequested(None)).unwrap();
    let second = office
        .shared
        .apply(Event::PromoteRequested(None))
        .unwrap_err();
    assert!(
        second.contains("BACKUP") || second.contains("promot"),
        "{second}"
    );
    assert_eq!(
        office.state(),
        RoleState::Promoting(PromoteStep::AskAuthority)
    );
    // And it is on disk before anything acts on it.
    let saved = RoleRecord::load(&office.shared.paths.role()).unwrap();
    assert_eq!(saved.state, office.state());
}

#[tokio::test]
async fn the_old_primary_steps_back_with_the_data_center_and_without_it() {
    // With the data center: its answer names a newer generation.
    let office = primary();
    office.shared.handle(Event::Authority {
        role: lbs_protocol::Role::Backup,
        generation: Generation(2),
    });
    assert_eq!(office.state(), RoleState::Fenced);
    // Without it: at start, somebody else answers for the address.
    let office = primary();
    office.shared.handle(Event::AddressTaken {
        by: OLD_PRIMARY.to_string(),
    });
    assert_eq!(office.state(), RoleState::Fenced);
}

#[test]
fn the_carrier_guard_holds_the_address_only_as_a_primary_with_carrier() {
    // (primary, carrier, held, withdrawn, bare)
    assert_eq!(guard::hold(false, true, true, false, false), Hold::Settled);
    assert_eq!(guard::hold(true, false, true, false, false), Hold::Withdraw);
    assert_eq!(guard::hold(true, false, false, true, false), Hold::Keep);
    assert_eq!(guard::hold(true, true, false, true, false), Hold::TakeBack);
    // A bare interface on a primary is a withdrawal an earlier run made.
    assert_eq!(guard::hold(true, true, false, false, true), Hold::TakeBack);
    // A primary at another address by design is left alone.
    assert_eq!(guard::hold(true, true, false, false, false), Hold::Keep);
    assert_eq!(guard::hold(true, true, true, true, false), Hold::Settled);
}

#[test]
fn only_the_partner_taking_over_moves_the_primary() {
    use lbs_protocol::Role;
    let partner = Some(OLD_PRIMARY);
    assert_eq!(
        guard::claim(true, OLD_PRIMARY, partner, Some(Role::Backup)),
        Claim::Ignore
    );
    assert_eq!(
        guard::claim(false, THIS_BOX, partner, Some(Role::Backup)),
        Claim::Stranger
    );
    assert_eq!(
        guard::claim(false, OLD_PRIMARY, None, Some(Role::Backup)),
        Claim::Stranger
    );
    assert_eq!(
        guard::claim(false, OLD_PRIMARY, partner, Some(Role::Fenced)),
        Claim::Defend
    );
    assert_eq!(
        guard::claim(false, OLD_PRIMARY, partner, Some(Role::Backup)),
        Claim::StepBack
    );
}

#[test]
fn status_says_what_a_set_does_not_sync_on_either_side() {
    let office = backup();
    let entry = |path: &str, reason| lbs_protocol::sync::SkippedEntry {
        path: lbs_protocol::RelPath::try_from(path).unwrap(),
        reason,
    };
    office.shared.set_status("voicemail", |s| {
        s.skipped = crate::status::Skipped {
            on_primary: (0..7)
                .map(|i| {
                    entry(
                        &format!("1234/p{i}.pipe"),
                        lbs_protocol::sync::SkipReason::Fifo,
                    )
                })
                .collect(),
            here: vec![entry(
                "old.wav",
                lbs_protocol::sync::SkipReason::Unreadable {
                    error: "Permission denied (os error 13)".into(),
                },
            )],
            more: 3,
        }
    });
    let shown = crate::status_cmd::render(&office.shared.status());
    assert!(
        shown.contains(
            "    not synced on the primary: 1234/p0.pipe — FIFO: only files, directories and symlinks are synced"
        ),
        "{shown}"
    );
    assert!(
        shown.contains("    not synced here: old.wav — unreadable: Permission denied"),
        "{shown}"
    );
    // Five per side at most; the rest counted (2 not shown of the primary's 7, and 3 more).
    assert!(!shown.contains("p5.pipe"), "{shown}");
    assert!(shown.contains("    not synced: 5 more"), "{shown}");
}

#[test]
fn the_role_steps_kept_for_the_reports_survive_a_restart_and_a_damaged_file() {
    use lbs_protocol::control::StepReport;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("steps.json");
    assert!(crate::daemon::state::load_recent(&path).is_empty());
    let steps: Vec<StepReport> = (0..12)
        .map(|i| StepReport {
            at_ms: i,
            step: "take-address".into(),
            took_ms: 1,
            error: None,
        })
        .collect();
    std::fs::write(&path, serde_json::to_vec(&steps).unwrap()).unwrap();
    let kept = crate::daemon::state::load_recent(&path);
    assert_eq!(kept.len(), crate::daemon::state::RECENT_STEPS);
    assert_eq!(
        kept.front().map(|s| s.at_ms),
        Some(4),
        "the newest are kept"
    );
    std::fs::write(&path, b"{not json").unwrap();
    assert!(crate::daemon::state::load_recent(&path).is_empty());
}
