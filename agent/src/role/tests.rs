//! The role machine against DESIGN §9, event by event and state by state.

#![allow(clippy::unwrap_used)]
use super::*;

fn at(state: RoleState, generation: u64) -> RoleMachine {
    RoleMachine::new(RoleRecord {
        state,
        generation: Generation(generation),
        since_unix_ms: 0,
        last_error: None,
        shared: None,
        offline: false,
        abandoned: None,
    })
}

#[test]
fn a_promotion_given_up_on_is_finished_only_when_its_grant_arrives() {
    let mut m = at(RoleState::Backup, 1);
    m.handle(Event::PromoteRequested(None), 10).unwrap();
    // The data center did not answer in time: back to backup, the attempt remembered.
    let actions = m
        .handle(Event::StepFailed("no answer within 12 s".into()), 20)
        .unwrap();
    assert_eq!(m.record.state, RoleState::Backup);
    assert!(actions.contains(&Action::PullSync));
    assert_eq!(m.record.abandoned, Some(Generation(1)));
    // A report that says nothing new changes nothing.
    let actions = m
        .handle(
            Event::Authority {
                role: Role::Backup,
                generation: Generation(1),
            },
            30,
        )
        .unwrap();
    assert!(actions.is_empty());
    assert_eq!(m.record.state, RoleState::Backup);
    // The grant arrives after all: the data center fences the other box, so this one
    // finishes, and says so; the mark stays until it is primary (it makes the take-over
    // of the address a checked one).
    let actions = m
        .handle(
            Event::Authority {
                role: Role::Primary,
                generation: Generation(2),
            },
            40,
        )
        .unwrap();
    assert_eq!(
        m.record.state,
        RoleState::Promoting(PromoteStep::TakeAddress)
    );
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Say(t) if t.contains("given up on earlier")))
    );
    assert_eq!(m.record.abandoned, Some(Generation(1)));
    m.handle(Event::StepDone, 50).unwrap();
    m.handle(Event::StepDone, 60).unwrap();
    assert_eq!(m.record.state, RoleState::Primary);
    assert_eq!(m.record.abandoned, None);
    // A new P starts without the mark.
    let mut m = at(RoleState::Backup, 1);
    m.record.abandoned = Some(Generation(1));
    m.handle(Event::PromoteRequested(None), 10).unwrap();
    assert_eq!(m.record.abandoned, None);
}

#[test]
fn activation_gives_the_role_the_data_center_decided() {
    let mut m = at(RoleState::Unactivated, 0);
    let actions = m
        .handle(
            Event::Activated {
                role: Role::Backup,
                generation: Generation(1),
            },
            5,
        )
        .unwrap();
    assert_eq!(m.record.state, RoleState::Backup);
    assert_eq!(m.record.since_unix_ms, 5);
    assert!(actions.contains(&Action::PullSync));
    assert!(
        m.handle(
            Event::Activated {
                role: Role::Primary,
                generation: Generation(1)
            },
            6
        )
        .is_err()
    );
}

#[test]
fn a_promotion_walks_its_steps_and_resumes_where_it_stopped() {
    let mut m = at(RoleState::Backup, 1);
    assert_eq!(
        m.handle(Event::PromoteRequested(None), 1).unwrap(),
        [
            Action::StopSync,
            Action::AskPromotion {
                believed: Generation(1)
            }
        ]
    );
    // A crash here: the restart asks again (the data center answers a repeat).
    assert_eq!(
        m.resume(),
        [Action::AskPromotion {
            believed: Generation(1)
        }]
    );
    assert_eq!(
        m.handle(Event::Promoted(Generation(2)), 2).unwrap(),
        [Action::TakeAddress]
    );
    assert_eq!(m.record.generation, Generation(2));
    assert_eq!(m.resume(), [Action::TakeAddress]);
    // A failed step after the grant is retried, never rolled back.
    let retry = m
        .handle(Event::StepFailed("eth0 is down".into()), 3)
        .unwrap();
    assert_eq!(retry.last(), Some(&Action::TakeAddress));
    assert_eq!(m.record.last_error.as_deref(), Some("eth0 is down"));
    assert_eq!(m.handle(Event::StepDone, 4).unwrap(), [Action::StartPbx]);
    assert_eq!(m.record.state.wire_role(), Role::Primary);
    let done = m.handle(Event::StepDone, 5).unwrap();
    assert_eq!(m.record.state, RoleState::Primary);
    assert_eq!(m.record.last_error, None);
    assert!(done.contains(&Action::ServeSync));
}

#[test]
fn a_refused_promotion_goes_back_to_backup_and_says_why() {
    let mut m = at(RoleState::Backup, 1);
    m.handle(Event::PromoteRequested(None), 1).unwrap();
    let actions = m
        .handle(Event::StepFailed("the primary answers ARP".into()), 2)
        .unwrap();
    assert_eq!(m.record.state, RoleState::Backup);
    assert!(actions.contains(&Action::PullSync));
    assert!(
        m.handle(Event::PromoteRequested(None), 3).is_ok(),
        "P can be pressed again"
    );
}

#[test]
fn only_the_backup_is_promoted_and_only_a_fenced_box_is_demoted() {
    for state in [
        RoleState::Primary,
        RoleState::Fenced,
        RoleState::Unactivated,
    ] {
        assert!(
            at(state, 1)
                .handle(Event::PromoteRequested(None), 0)
                .is_err(),
            "{state}"
        );
    }
    for state in [RoleState::Primary, RoleState::Backup] {
        assert!(
            at(state, 1).handle(Event::DemoteRequested, 0).is_err(),
            "{state}"
        );
    }
}

#[test]
fn a_primary_told_of_a_higher_generation_fences_itself_then_b_makes_it_backup() {
    let mut m = at(RoleState::Primary, 1);
    // The same generation, or a report that still calls it primary, changes nothing.
    assert!(
        m.handle(
            Event::Authority {
                role: Role::Primary,
                generation: Generation(1)
            },
            1
        )
        .unwrap()
        .is_empty()
    );
    let actions = m
        .handle(
            Event::Authority {
                role: Role::Fenced,
                generation: Generation(2),
            },
            2,
        )
        .unwrap();
    assert_eq!(m.record.state, RoleState::Fenced);
    assert!(actions.contains(&Action::StopPbx) && actions.contains(&Action::GiveUpAddress));
    assert_eq!(
        m.resume(),
        [Action::StopSync, Action::StopPbx, Action::GiveUpAddress]
    );
    assert_eq!(
        m.handle(Event::DemoteRequested, 3).unwrap(),
        [Action::StopPbx]
    );
    assert_eq!(
        m.handle(Event::StepDone, 4).unwrap(),
        [Action::GiveUpAddress]
    );
    assert_eq!(m.resume(), [Action::GiveUpAddress]);
    assert_eq!(
        m.handle(Event::StepDone, 5).unwrap(),
        [Action::RegisterBackup]
    );
    let actions = m.handle(Event::StepDone, 6).unwrap();
    assert_eq!(m.record.state, RoleState::Backup);
    assert!(actions.contains(&Action::PullSync));
}

const ALL_STATES: [RoleState; 10] = [
    RoleState::Unactivated,
    RoleState::Primary,
    RoleState::Backup,
    RoleState::Fenced,
    RoleState::Promoting(PromoteStep::AskAuthority),
    RoleState::Promoting(PromoteStep::TakeAddress),
    RoleState::Promoting(PromoteStep::StartPbx),
    RoleState::Demoting(DemoteStep::StopPbx),
    RoleState::Demoting(DemoteStep::GiveUpAddress),
    RoleState::Demoting(DemoteStep::Register),
];

fn all_events(generation: u64) -> Vec<Event> {
    let mut events = vec![
        Event::AddressTaken {
            by: "5a:ec:b4:27:71:cf".into(),
        },
        Event::PromoteRequested(None),
        Event::PromoteOffline(None),
        Event::DemoteRequested,
        Event::StepDone,
        Event::StepFailed("cable pulled".into()),
    ];
    for g in [generation.saturating_sub(1), generation, generation + 1] {
        events.push(Event::Promoted(Generation(g)));
        for role in [Role::Unactivated, Role::Primary, Role::Backup, Role::Fenced] {
            events.push(Event::Activated {
                role,
                generation: Generation(g),
            });
            events.push(Event::Authority {
                role,
                generation: Generation(g),
            });
        }
    }
    events
}

/// Every event in every state: a refusal changes nothing; the generation never goes
/// down; a box only starts serving phones (wire role primary) from a promotion's address
/// step (granted by the data center, or consented offline), never straight from backup,
/// fenced or a demotion (split brain); a higher generation where another box is primary always
/// fences a primary; and whatever the state, `resume` has something sensible to do.
#[test]
fn every_event_in_every_state_keeps_the_rules() {
    for state in ALL_STATES {
        for event in all_events(5) {
            let mut m = at(state, 5);
            let before = m.record.clone();
            let result = m.handle(event.clone(), 100);
            let after = m.record.clone();
            let case = format!("{state} + {event:?} -> {}", after.state);
            match &result {
                Err(_) => assert_eq!(after, before, "{case}: refused but changed"),
                // An unactivated box takes the data center's generation, whatever it is.
                Ok(_) if state == RoleState::Unactivated => {}
                Ok(_) => assert!(after.generation >= before.generation, "{case}"),
            }
            let serving_before = before.state.wire_role() == Role::Primary;
            let serving_after = after.state.wire_role() == Role::Primary;
            if serving_after && !serving_before && state != RoleState::Unactivated {
                assert!(
                    matches!(
                        (state, &event),
                        (
                            RoleState::Promoting(PromoteStep::TakeAddress),
                            Event::StepDone
                        )
                    ),
                    "{case}: became primary without the address step"
                );
                assert!(after.generation >= Generation(5), "{case}");
            }
            if matches!(state, RoleState::Backup | RoleState::Fenced)
                || matches!(state, RoleState::Demoting(_))
            {
                assert!(
                    !matches!(after.state, RoleState::Primary),
                    "{case}: primary without a promotion"
                );
            }
            if let Event::Authority { role, generation } = &event
                && *generation > Generation(5)
                && *role != Role::Primary
                && matches!(state, RoleState::Primary | RoleState::Promoting(_))
            {
                assert_eq!(after.state, RoleState::Fenced, "{case}");
                let actions = result.as_ref().unwrap();
                assert!(actions.contains(&Action::GiveUpAddress), "{case}");
                assert!(actions.contains(&Action::StopPbx), "{case}");
            }
            // After a crash in any state, the restart knows what to do.
            let resumed = m.resume();
            match after.state {
                RoleState::Unactivated => assert!(resumed.is_empty(), "{case}"),
                RoleState::Promoting(_) | RoleState::Demoting(_) => {
                    assert_eq!(resumed, vec![m.current_step().unwrap()], "{case}")
                }
                RoleState::Fenced => {
                    assert!(resumed.contains(&Action::GiveUpAddress), "{case}")
                }
                RoleState::Primary => {
                    assert_eq!(resumed, [Action::ServeSync, Action::StartPbx], "{case}")
                }
                RoleState::Backup => {
                    assert_eq!(resumed, [Action::PullSync, Action::StopPbx], "{case}")
                }
            }
        }
    }
}

#[test]
fn a_promotion_granted_but_not_recorded_is_finished_at_the_next_report() {
    // The box crashed between the data center's grant and recording it; after the
    // restart the data center was unreachable, so the step failed and it went back to
    // backup. The next report says it is primary at gen 2: it finishes the promotion.
    for state in [
        RoleState::Backup,
        RoleState::Promoting(PromoteStep::AskAuthority),
    ] {
        let mut m = at(state, 1);
        let actions = m
            .handle(
                Event::Authority {
                    role: Role::Primary,
                    generation: Generation(2),
                },
                1,
            )
            .unwrap();
        assert_eq!(
            m.record.state,
            RoleState::Promoting(PromoteStep::TakeAddress)
        );
        assert_eq!(actions.last(), Some(&Action::TakeAddress));
        assert_eq!(m.record.generation, Generation(2));
    }
    // The same generation (a primary that knows it is) changes nothing for a backup.
    let mut m = at(RoleState::Backup, 2);
    let actions = m
        .handle(
            Event::Authority {
                role: Role::Primary,
                generation: Generation(2),
            },
            1,
        )
        .unwrap();
    assert!(actions.is_empty());
    assert_eq!(m.record.state, RoleState::Backup);
}

#[test]
fn a_returning_primary_that_finds_its_address_taken_steps_back() {
    let mut m = at(RoleState::Primary, 1);
    let actions = m
        .handle(
            Event::AddressTaken {
                by: "5a:ec:b4:27:71:cf".into(),
            },
            1,
        )
        .unwrap();
    assert_eq!(m.record.state, RoleState::Fenced);
    assert!(actions.contains(&Action::GiveUpAddress) && actions.contains(&Action::StopPbx));
    // A backup (or anyone else) finding the address answered changes nothing.
    let mut m = at(RoleState::Backup, 1);
    let actions = m.handle(Event::AddressTaken { by: "x".into() }, 1).unwrap();
    assert!(actions.is_empty());
    assert_eq!(m.record.state, RoleState::Backup);
}

#[test]
fn an_offline_promotion_is_reconciled_when_the_data_center_answers() {
    let mut m = at(RoleState::Backup, 3);
    let actions = m.handle(Event::PromoteOffline(None), 1).unwrap();
    assert_eq!(actions.last(), Some(&Action::TakeAddress));
    assert!(m.record.offline);
    m.handle(Event::StepDone, 2).unwrap();
    m.handle(Event::StepDone, 3).unwrap();
    assert_eq!(m.record.state, RoleState::Primary);
    assert_eq!(
        m.record.generation,
        Generation(3),
        "no grant, no new generation"
    );
    // A restart reconciles too (the step the machine waits for).
    assert_eq!(
        m.current_step(),
        Some(Action::AskPromotion {
            believed: Generation(3)
        })
    );
    // The data center answers, not knowing of it (it calls this box fenced at gen 3):
    // it is asked for the promotion from gen 3.
    let fenced_here = Event::Authority {
        role: Role::Fenced,
        generation: Generation(3),
    };
    assert_eq!(
        m.handle(fenced_here.clone(), 4).unwrap(),
        [Action::AskPromotion {
            believed: Generation(3)
        }]
    );
    assert_eq!(m.record.state, RoleState::Primary);
    // A failure is kept and asked again at the next answer.
    assert!(
        m.handle(Event::StepFailed("timeout".into()), 5)
            .unwrap()
            .is_empty()
    );
    assert!(m.record.last_error.is_some());
    assert_eq!(m.handle(fenced_here, 6).unwrap().len(), 1);
    m.handle(Event::Promoted(Generation(4)), 7).unwrap();
    assert_eq!(
        (m.record.state, m.record.generation, m.record.offline),
        (RoleState::Primary, Generation(4), false)
    );
    assert_eq!(m.current_step(), None);
    // Meanwhile the pair moved on: the data center's word wins, this box steps back.
    let mut m = at(RoleState::Backup, 3);
    m.handle(Event::PromoteOffline(None), 1).unwrap();
    m.handle(Event::StepDone, 2).unwrap();
    m.handle(Event::StepDone, 3).unwrap();
    let actions = m
        .handle(
            Event::Authority {
                role: Role::Fenced,
                generation: Generation(4),
            },
            4,
        )
        .unwrap();
    assert_eq!(m.record.state, RoleState::Fenced);
    assert!(!m.record.offline);
    assert!(actions.contains(&Action::GiveUpAddress));
}

#[test]
fn two_presses_of_p_promote_once() {
    let mut m = at(RoleState::Backup, 1);
    m.handle(Event::PromoteRequested(None), 1).unwrap();
    let second = m.handle(Event::PromoteRequested(None), 1).unwrap_err();
    assert!(second.0.contains("under way"), "{second}");
    // The grant arrives once; a second grant in the next step does not apply.
    m.handle(Event::Promoted(Generation(2)), 2).unwrap();
    assert!(m.handle(Event::Promoted(Generation(2)), 2).is_err());
    assert_eq!(
        m.record.state,
        RoleState::Promoting(PromoteStep::TakeAddress)
    );
}

#[test]
fn the_record_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("role.json");
    assert_eq!(RoleRecord::load(&path).unwrap(), RoleRecord::new());
    let record = at(RoleState::Demoting(DemoteStep::GiveUpAddress), 7).record;
    record.save(&path).unwrap();
    assert_eq!(RoleRecord::load(&path).unwrap(), record);
    std::fs::write(&path, "{ torn").unwrap();
    assert!(RoleRecord::load(&path).is_err());
}
