//! The takeover sequence against the in-memory network: every failure path, without root.
#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;

use lbs_netconfig::fake::Op;
use lbs_netconfig::{
    DefaultRoute, FakeNet, Ipv4Cidr, LinkInfo, MacAddr, NetError, Step, StepOutcome, TakeoverError,
    TakeoverPlan, give_up, take_back, take_over,
};

const GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);

fn cidr(text: &str) -> Ipv4Cidr {
    text.parse().unwrap()
}

fn mac(text: &str) -> MacAddr {
    text.parse().unwrap()
}

/// The backup box: eth0 with its own 192.168.1.3/24, default route via .1, kernel defaults.
fn backup() -> (FakeNet, LinkInfo) {
    let net = FakeNet::new();
    let link = net.add_link("eth0", mac("02:00:00:00:00:03"), &[cidr("192.168.1.3/24")]);
    net.set_route(Some(DefaultRoute {
        gateway: GATEWAY,
        link: link.index,
    }));
    (net, link)
}

fn plan() -> TakeoverPlan {
    TakeoverPlan {
        interface: "eth0".into(),
        from: cidr("192.168.1.3/24"),
        to: cidr("192.168.1.2/24"),
        gateway: GATEWAY,
        force: false,
        persist: None,
    }
}

fn run<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(future)
}

/// The state a takeover must leave.
fn assert_taken(net: &FakeNet, link: &LinkInfo) {
    assert_eq!(net.addresses_of("eth0"), [cidr("192.168.1.2/24")]);
    assert_eq!(
        net.route(),
        Some(DefaultRoute {
            gateway: GATEWAY,
            link: link.index
        })
    );
}

/// The state before (or after giving up).
fn assert_own(net: &FakeNet, link: &LinkInfo) {
    assert_eq!(net.addresses_of("eth0"), [cidr("192.168.1.3/24")]);
    assert_eq!(
        net.route(),
        Some(DefaultRoute {
            gateway: GATEWAY,
            link: link.index
        })
    );
}

#[test]
fn a_free_address_is_taken_announced_and_verified_and_a_second_run_changes_nothing() {
    let (net, link) = backup();
    let report = run(take_over(&net, &net, &plan())).unwrap();
    assert_taken(&net, &link);
    assert!(net.promote_of("eth0"), "left on: the trap stays closed");
    let steps: Vec<Step> = report.steps.iter().map(|s| s.step).collect();
    assert_eq!(
        steps,
        [
            Step::Preflight,
            Step::Probe,
            Step::PromoteSecondaries,
            Step::AddAddress,
            Step::Announce,
            Step::DropOld,
            Step::Route,
            Step::Verify,
            Step::AnnounceAgain,
            Step::Persist
        ]
    );
    assert!(
        report
            .steps
            .iter()
            .all(|s| matches!(s.outcome, StepOutcome::Done(_) | StepOutcome::Skipped(_))),
        "{report}"
    );
    let announced = net.announced();
    assert_eq!(
        announced.len(),
        2,
        "a burst after the change and one after verifying"
    );
    assert!(
        announced
            .iter()
            .all(|(ip, from, _)| *ip == Ipv4Addr::new(192, 168, 1, 2) && *from == link.mac)
    );
    let printed = report.to_string();
    assert!(printed.contains("without the probe"), "{printed}");

    // Again: it looks before it acts, so it converges on the same state.
    let again = run(take_over(&net, &net, &plan())).unwrap();
    assert_taken(&net, &link);
    let skipped: Vec<Step> = again
        .steps
        .iter()
        .filter(|s| matches!(s.outcome, StepOutcome::Skipped(_)))
        .map(|s| s.step)
        .collect();
    assert_eq!(
        skipped,
        [
            Step::Probe,
            Step::PromoteSecondaries,
            Step::AddAddress,
            Step::DropOld,
            Step::Route,
            Step::Persist
        ]
    );
}

#[test]
fn a_live_primary_is_named_and_nothing_changes_unless_forced() {
    let (net, link) = backup();
    let primary = mac("5a:ec:b4:27:71:cf");
    net.set_neighbour(Ipv4Addr::new(192, 168, 1, 2), Some(primary));
    let err = run(take_over(&net, &net, &plan())).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, TakeoverError::InUse { mac, .. } if mac == primary));
    assert!(
        text.contains("cannot take 192.168.1.2: 5a:ec:b4:27:71:cf still answers ARP")
            && text.contains("--force"),
        "{text}"
    );
    assert_own(&net, &link);
    assert!(!net.promote_of("eth0"));
    assert!(net.announced().is_empty());

    let forced = TakeoverPlan {
        force: true,
        ..plan()
    };
    let report = run(take_over(&net, &net, &forced)).unwrap();
    assert_taken(&net, &link);
    assert!(report.to_string().contains("--force"), "{report}");
}

#[test]
fn the_fake_has_the_kernel_trap_and_the_sequence_avoids_it() {
    // What a naive script does: add .2, delete .3 — and both are gone, with the route.
    let (net, link) = backup();
    run(async {
        use lbs_netconfig::NetBackend;
        net.add_address(&link, cidr("192.168.1.2/24"))
            .await
            .unwrap();
        net.delete_address(&link, cidr("192.168.1.3/24"))
            .await
            .unwrap();
    });
    assert!(net.addresses_of("eth0").is_empty());
    assert_eq!(net.route(), None);

    // The takeover turns promote_secondaries on before it deletes anything.
    let (net, link) = backup();
    run(take_over(&net, &net, &plan())).unwrap();
    assert_taken(&net, &link);
    let calls = net.calls();
    let promote = calls
        .iter()
        .position(|op| *op == Op::SetPromoteSecondaries)
        .unwrap();
    let delete = calls
        .iter()
        .position(|op| *op == Op::DeleteAddress)
        .unwrap();
    assert!(promote < delete, "{calls:?}");
}

fn os(reason: &str) -> NetError {
    NetError::Os {
        what: "test".into(),
        reason: reason.into(),
    }
}

#[test]
fn a_failure_at_any_step_restores_the_address_route_and_setting() {
    // (operation, calls of it to let through first, the step it fails)
    let cases = [
        (Op::SetPromoteSecondaries, 0, Step::PromoteSecondaries),
        (Op::AddAddress, 0, Step::AddAddress),
        (Op::Announce, 0, Step::Announce),
        (Op::DeleteAddress, 0, Step::DropOld),
        (Op::DefaultRoute, 1, Step::Route),
        (Op::ReplaceDefaultRoute, 0, Step::Route),
        (Op::Addresses, 1, Step::Verify),
        (Op::DefaultRoute, 2, Step::Verify),
    ];
    for (op, skip, step) in cases {
        let (net, link) = backup();
        // The route must be replaced for the route step to run: start with none.
        if op == Op::ReplaceDefaultRoute {
            net.set_route(None);
        }
        net.fail_call(op, skip, os("injected"));
        let err = run(take_over(&net, &net, &plan())).unwrap_err();
        match &err {
            TakeoverError::Step {
                step: failed,
                restored,
                ..
            } => {
                assert_eq!(*failed, step, "{op:?}: {err}");
                assert!(restored, "{op:?}: {err}");
            }
            other => panic!("{op:?}: {other}"),
        }
        assert!(err.to_string().contains("injected"), "{err}");
        assert_eq!(
            net.addresses_of("eth0"),
            [cidr("192.168.1.3/24")],
            "{op:?}: {err}\n{}",
            err.report()
        );
        if op == Op::ReplaceDefaultRoute {
            assert_eq!(net.route(), None);
        } else {
            assert_own(&net, &link);
        }
        assert!(!net.promote_of("eth0"), "{op:?}: setting restored");
    }
}

#[test]
fn an_unreachable_gateway_is_refused_before_anything_changes() {
    let (net, _) = backup();
    let elsewhere = TakeoverPlan {
        gateway: Ipv4Addr::new(10, 0, 0, 1),
        ..plan()
    };
    let err = run(take_over(&net, &net, &elsewhere)).unwrap_err();
    assert!(matches!(err, TakeoverError::Preflight { .. }), "{err}");
    assert!(err.to_string().contains("not in the subnet"), "{err}");
    assert!(!net.calls().contains(&Op::AddAddress));

    // And the kernel's own ENETUNREACH from the route step is rolled back like any failure.
    let (net, link) = backup();
    net.set_route(None);
    net.fail_next(
        Op::ReplaceDefaultRoute,
        NetError::Unreachable {
            gateway: GATEWAY,
            link: "eth0".into(),
        },
    );
    let err = run(take_over(&net, &net, &plan())).unwrap_err();
    assert!(
        err.to_string().contains("is not reachable from eth0"),
        "{err}"
    );
    assert_eq!(net.addresses_of("eth0"), [cidr("192.168.1.3/24")]);
    let _ = link;
}

#[test]
fn no_carrier_or_a_wrong_interface_stops_at_preflight() {
    let (net, _) = backup();
    net.set_carrier("eth0", false);
    let err = run(take_over(&net, &net, &plan())).unwrap_err();
    assert!(err.to_string().contains("no carrier"), "{err}");
    assert!(err.to_string().contains("nothing was changed"), "{err}");

    let (net, _) = backup();
    let wrong = TakeoverPlan {
        interface: "eth1".into(),
        ..plan()
    };
    let err = run(take_over(&net, &net, &wrong)).unwrap_err();
    assert!(
        err.to_string().contains("no network interface \"eth1\""),
        "{err}"
    );

    let (net, _) = backup();
    let neither = TakeoverPlan {
        from: cidr("192.168.1.9/24"),
        ..plan()
    };
    let err = run(take_over(&net, &net, &neither)).unwrap_err();
    assert!(err.to_string().contains("holds neither"), "{err}");
}

/// A primary that withdrew the shared address when its carrier went takes it back onto the
/// bare interface, after the probe; someone else on it → refused, nothing added. A bare
/// interface is still refused to `take_over`, and `take_back` refuses one holding another
/// address.
#[test]
fn take_back_restores_a_withdrawn_address_only_after_the_probe() {
    let (net, link) = backup();
    net.set_route(None);
    run(lbs_netconfig::NetBackend::delete_address(
        &net,
        &link,
        cidr("192.168.1.3/24"),
    ))
    .unwrap();
    let err = run(take_over(&net, &net, &plan())).unwrap_err();
    assert!(err.to_string().contains("holds neither"), "{err}");

    net.set_neighbour(
        Ipv4Addr::new(192, 168, 1, 2),
        Some(mac("02:00:00:00:00:09")),
    );
    let err = run(take_back(&net, &net, &plan())).unwrap_err();
    assert!(err.to_string().contains("02:00:00:00:00:09"), "{err}");
    assert_eq!(net.addresses_of("eth0"), []);

    net.set_neighbour(Ipv4Addr::new(192, 168, 1, 2), None);
    let report = run(take_back(&net, &net, &plan())).unwrap();
    assert!(report.steps.iter().any(|s| s.step == Step::Probe
        && matches!(&s.outcome, StepOutcome::Done(t) if t.contains("nobody answers"))));
    assert_taken(&net, &link);

    // Withdrawn again, and told to step back: its own address onto the bare interface.
    run(lbs_netconfig::NetBackend::delete_address(
        &net,
        &link,
        cidr("192.168.1.2/24"),
    ))
    .unwrap();
    run(give_up(&net, &net, &plan())).unwrap();
    assert_own(&net, &link);

    let (net, _) = backup();
    let elsewhere = TakeoverPlan {
        from: cidr("192.168.1.9/24"),
        ..plan()
    };
    let err = run(take_back(&net, &net, &elsewhere)).unwrap_err();
    assert!(err.to_string().contains("holds neither"), "{err}");
}

#[test]
fn a_crash_at_any_point_then_a_rerun_converges_and_give_up_reverses_it() {
    for changes in 0..6 {
        let (net, link) = backup();
        net.crash_after(changes);
        // The crash may hit after the last change: then the run completes.
        let first = run(take_over(&net, &net, &plan()));
        net.restart();
        let again = run(take_over(&net, &net, &plan()));
        assert!(
            again.is_ok(),
            "crash after {changes} change(s) (first run: {first:?}): {again:?}"
        );
        assert_taken(&net, &link);

        // Giving the address back, with a crash of its own.
        net.crash_after(changes);
        let _ = run(give_up(&net, &net, &plan()));
        net.restart();
        let back = run(give_up(&net, &net, &plan()));
        assert!(back.is_ok(), "give_up after a crash at {changes}: {back:?}");
        assert_own(&net, &link);
    }
}

#[test]
fn carrier_changes_are_reported_once_each() {
    use lbs_netconfig::NetBackend;
    let (net, link) = backup();
    run(async {
        let mut events = net.carrier_events(&link).await.unwrap();
        net.set_carrier("eth0", false);
        net.set_carrier("eth0", false);
        net.set_carrier("eth0", true);
        assert_eq!(events.next().await, Some(false));
        assert_eq!(events.next().await, Some(true));
        drop(events);
        // Nobody listens any more: changes go nowhere, and nothing fails.
        net.set_carrier("eth0", false);
    });
    let err = run(take_over(&net, &net, &plan())).unwrap_err();
    assert!(err.to_string().contains("no carrier"), "{err}");
}

#[test]
fn the_boot_configuration_follows_and_a_broken_one_is_a_loud_warning() {
    use lbs_netconfig::PersistTo;
    let root = tempfile::tempdir().unwrap();
    let backups = tempfile::tempdir().unwrap();
    let interfaces = root.path().join("etc/network/interfaces");
    std::fs::create_dir_all(interfaces.parent().unwrap()).unwrap();
    std::fs::write(
        &interfaces,
        "auto eth0\niface eth0 inet static\n    address 192.168.1.3/24\n    gateway 192.168.1.1\n",
    )
    .unwrap();
    let persisting = TakeoverPlan {
        persist: Some(PersistTo {
            root: root.path().to_owned(),
            backups: backups.path().to_owned(),
        }),
        ..plan()
    };
    let (net, link) = backup();
    let report = run(take_over(&net, &net, &persisting)).unwrap();
    assert_taken(&net, &link);
    let text = std::fs::read_to_string(&interfaces).unwrap();
    assert!(text.contains("address 192.168.1.2/24"), "{text}");
    let last = report.steps.last().unwrap();
    assert_eq!(last.step, Step::Persist);
    assert!(
        matches!(&last.outcome, StepOutcome::Done(t) if t.contains("was 192.168.1.3/24")),
        "{report}"
    );

    run(give_up(&net, &net, &persisting)).unwrap();
    assert_own(&net, &link);
    assert!(
        std::fs::read_to_string(&interfaces)
            .unwrap()
            .contains("address 192.168.1.3/24")
    );

    // A box configured by DHCP: the takeover still happens, and the report says what is wrong.
    std::fs::write(&interfaces, "auto eth0\niface eth0 inet dhcp\n").unwrap();
    let report = run(take_over(&net, &net, &persisting)).unwrap();
    assert_taken(&net, &link);
    let warnings: Vec<_> = report.warnings().collect();
    assert_eq!(warnings.len(), 1, "{report}");
    assert!(
        matches!(&warnings[0].outcome, StepOutcome::Warning(t) if t.contains("DHCP") && t.contains("a reboot would bring back")),
        "{report}"
    );
}

#[test]
fn a_probe_that_cannot_run_changes_nothing_and_a_late_announce_failure_is_a_warning() {
    let (net, link) = backup();
    net.fail_next(Op::Probe, os("no packet socket"));
    let err = run(take_over(&net, &net, &plan())).unwrap_err();
    assert!(
        matches!(
            err,
            TakeoverError::Step {
                step: Step::Probe,
                restored: true,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("nothing had been changed"),
        "{err}"
    );
    assert_own(&net, &link);

    // The second announce comes after verification: the address stays taken.
    let (net, link) = backup();
    net.fail_call(Op::Announce, 1, os("send failed"));
    let report = run(take_over(&net, &net, &plan())).unwrap();
    assert_taken(&net, &link);
    let warnings: Vec<Step> = report.warnings().map(|w| w.step).collect();
    assert_eq!(warnings, [Step::AnnounceAgain], "{report}");
}
