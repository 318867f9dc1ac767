//! The role authority's records: the lifecycle, refusals, racing promotions and restarts,
//! against every backend: SQLite files, the shared store in memory and on a real etcd (each
//! step opens the store again: a restart, or another site, between any two steps).
#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::time::Duration;

use lbs_datacenter::kv::{EtcdKv, EtcdSettings, MemKv};
use lbs_datacenter::store::{
    ActivationRequest, DnsFailure, DnsWork, KvStore, Refusal, Report, ReportKind, SqliteStore,
    Store, StoreError,
};
use lbs_protocol::net::Ipv4Cidr;
use lbs_protocol::{Generation, Role, ServerId};
use lbs_tests::etcd::Etcd;

const DAY: Duration = Duration::from_secs(86_400);
const T0: i64 = 1_800_000_000_000;

fn pool() -> Ipv4Cidr {
    "10.77.0.0/16".parse().unwrap()
}

fn request(sid: ServerId, key: &str, lan: u8) -> ActivationRequest {
    ActivationRequest {
        sid,
        key: key.to_owned(),
        wireguard_key: format!("wg-key-of-{sid}"),
        tls_key: format!("tls-key-of-{sid}"),
        lan_address: Ipv4Addr::new(192, 168, 1, lan),
        software: "0.1.0".into(),
        inventory: "{}".into(),
        source: "198.51.100.7".into(),
    }
}

fn report(believed: u64, advertised: Ipv4Addr) -> Report {
    Report {
        believed: Generation(believed),
        software: "0.1.0".into(),
        advertised,
        json: "{}".into(),
    }
}

const REMOTE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);

/// A store the suite runs against; every `open` is a fresh handle on the same records, as
/// after a restart of the data center (or another site).
trait Backend: Sync {
    fn open(&self) -> Box<dyn Store + Send>;
}

/// A SQLite file, reopened every time.
struct Sqlite(tempfile::TempDir);

impl Backend for Sqlite {
    fn open(&self) -> Box<dyn Store + Send> {
        Box::new(SqliteStore::open(&self.0.path().join("dc.db")).unwrap())
    }
}

/// The shared store on the in-memory key-value engine, every handle another site.
struct Memory(MemKv);

impl Backend for Memory {
    fn open(&self) -> Box<dyn Store + Send> {
        Box::new(KvStore::new(Box::new(self.0.site()), "/lbs"))
    }
}

/// The shared store on a real etcd (Debian's, on loopback), every handle its own client.
struct OnEtcd {
    _etcd: Etcd,
    endpoints: Vec<String>,
}

impl Backend for OnEtcd {
    fn open(&self) -> Box<dyn Store + Send> {
        let kv = EtcdKv::open(EtcdSettings {
            endpoints: self.endpoints.clone(),
            timeout: Duration::from_secs(5),
            tls: None,
        })
        .unwrap();
        Box::new(KvStore::new(Box::new(kv), "/lbs"))
    }
}

/// Each test of the suite, once per backend.
macro_rules! on_every_store {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[test]
            fn $name() {
                super::$name(&super::Sqlite(tempfile::tempdir().unwrap()));
            })*
        }
        mod memory {
            $(#[test]
            fn $name() {
                super::$name(&super::Memory(lbs_datacenter::kv::MemKv::default()));
            })*
        }
        mod etcd {
            $(#[test]
            fn $name() {
                let etcd = lbs_tests::etcd::Etcd::start(1);
                let endpoints = etcd.endpoints();
                super::$name(&super::OnEtcd { _etcd: etcd, endpoints });
            })*
        }
    };
}

on_every_store!(
    a_look_at_a_report_answers_as_the_separate_questions_do,
    first_activation_is_primary_a_promotion_fences_it_and_it_comes_back_as_backup,
    wrong_used_and_expired_keys_are_refused_and_change_nothing_but_the_log,
    of_racing_promotions_exactly_one_wins_every_time,
    a_box_alone_gets_its_backup_later_and_pairs_stay_at_two,
    a_reinstalled_box_reactivates_with_a_fresh_key_keeping_its_role_and_address,
    a_requested_promotion_is_pending_once_expires_unanswered_and_is_answered_by_the_promotion,
    a_hand_over_needs_the_primary_a_backup_heard_and_in_sync_and_not_one_lately,
    liveness_is_recorded_in_batches_and_a_primary_that_moved_is_a_decision,
    a_retired_pair_is_refused_everywhere_and_kept_in_the_audit_log,
    when_the_dns_server_answers_again_the_names_waiting_out_their_backoff_are_due_at_once,
    the_revocation_list_and_the_sites_cas_are_one_every_handle_reads,
    an_operators_note_is_an_audit_event_of_its_pair,
);

fn an_operators_note_is_an_audit_event_of_its_pair(backend: &dyn Backend) {
    let mut store = backend.open();
    store
        .provision_pair("acme", "pbx.acme.example", 2, DAY, T0)
        .unwrap();
    store
        .note(
            "acme",
            "olga (portal)",
            "new router on Tuesday\nsee ticket 42",
            T0 + 1,
        )
        .unwrap();
    let events = backend.open().events(0).unwrap();
    let note = events.iter().find(|e| e.kind == "note").unwrap();
    assert_eq!(note.pair.as_deref(), Some("acme"));
    assert_eq!(note.actor, "olga (portal)");
    assert_eq!(note.detail, "new router on Tuesday\nsee ticket 42");
    assert!(store.note("nobody", "olga", "text", T0).is_err());
    assert!(store.note("acme", "olga", "", T0).is_err());
    assert!(store.note("acme", "olga", "bell\u{7}", T0).is_err());
    assert_eq!(
        backend.open().events(0).unwrap().len(),
        events.len(),
        "refused notes are not logged"
    );
}

fn the_revocation_list_and_the_sites_cas_are_one_every_handle_reads(backend: &dyn Backend) {
    assert_eq!(backend.open().revocation_list().unwrap(), None);
    backend
        .open()
        .set_revocation_list(b"first list", T0)
        .unwrap();
    assert_eq!(
        backend.open().revocation_list().unwrap().as_deref(),
        Some(&b"first list"[..])
    );
    let mut store = backend.open();
    store.set_revocation_list(b"second", T0 + 1).unwrap();
    assert_eq!(
        backend.open().revocation_list().unwrap().as_deref(),
        Some(&b"second"[..]),
        "another handle (another site) reads the newer list"
    );
    assert_eq!(backend.open().site_ca("dc2").unwrap(), None);
    store.record_site_ca("dc2", b"dc2 ca", T0).unwrap();
    store.record_site_ca("dc2", b"dc2 anew", T0 + 1).unwrap();
    assert_eq!(
        backend.open().site_ca("dc2").unwrap().as_deref(),
        Some(&b"dc2 anew"[..])
    );
}

fn first_activation_is_primary_a_promotion_fences_it_and_it_comes_back_as_backup(
    backend: &dyn Backend,
) {
    let servers = backend
        .open()
        .provision_pair("acme", "pbx.acme.example", 2, DAY, T0)
        .unwrap();
    let (a, b) = (servers[0].sid, servers[1].sid);
    assert_ne!(a, b);

    // B activates first here: order decides, not provisioning.
    let first = backend
        .open()
        .activate(&request(b, &servers[1].key.to_string(), 3), pool(), T0 + 1)
        .unwrap();
    assert_eq!(
        (first.role, first.generation),
        (Role::Primary, Generation(1))
    );
    assert_eq!(first.partner, Some(a));
    let second = backend
        .open()
        .activate(&request(a, &servers[0].key.to_string(), 2), pool(), T0 + 2)
        .unwrap();
    assert_eq!(
        (second.role, second.generation),
        (Role::Backup, Generation(1))
    );
    assert_ne!(first.overlay, second.overlay);
    assert!(pool().contains(first.overlay) && pool().contains(second.overlay));

    assert_eq!(
        backend
            .open()
            .heartbeat(b, &report(1, Ipv4Addr::new(192, 168, 1, 3)), T0 + 3)
            .unwrap(),
        (Role::Primary, Generation(1))
    );
    // The primary cannot be promoted; the backup can, once.
    assert!(matches!(
        backend
            .open()
            .promote(b, Generation(1), REMOTE, "test", T0 + 4),
        Err(StoreError::NotAllowed(_))
    ));
    assert_eq!(
        backend
            .open()
            .promote(a, Generation(1), REMOTE, "10.77.0.11", T0 + 5)
            .unwrap()
            .generation,
        Generation(2)
    );
    // The same box asking again (its answer lost, or it crashed before recording it) gets
    // the same answer; nothing moves, nothing is logged twice. Anybody else is refused.
    let logged = backend.open().events(0).unwrap().len();
    let repeat = backend
        .open()
        .promote(a, Generation(1), REMOTE, "10.77.0.11", T0 + 6)
        .unwrap();
    assert_eq!(
        (repeat.generation, repeat.previous, repeat.repeat),
        (Generation(2), Some(b), true)
    );
    assert_eq!(backend.open().events(0).unwrap().len(), logged);
    assert!(matches!(
        backend
            .open()
            .promote(a, Generation(2), REMOTE, "10.77.0.11", T0 + 6),
        Err(StoreError::NotAllowed(_))
    ));
    // DNS: the pair's name now must point at A's advertised address, primary./backup. at
    // the overlay addresses of A and B; nothing written yet, so all three are due.
    let due = || -> Vec<(String, Ipv4Addr, Option<Ipv4Addr>)> {
        backend
            .open()
            .dns_due(T0 + 5)
            .unwrap()
            .into_iter()
            .map(|w| (w.name, w.want, w.have))
            .collect()
    };
    let mut wanted = due();
    wanted.sort();
    assert_eq!(
        wanted,
        [
            ("backup.pbx.acme.example".to_owned(), first.overlay, None),
            ("pbx.acme.example".to_owned(), REMOTE, None),
            ("primary.pbx.acme.example".to_owned(), second.overlay, None),
        ]
    );
    // A failure keeps it due later (not now); a success clears it and is logged.
    let work: Vec<DnsWork> = backend.open().dns_due(T0 + 5).unwrap();
    let fqdn = work.iter().find(|w| w.name == "pbx.acme.example").unwrap();
    let failed = |why: &str, needs_operator| {
        Err(DnsFailure {
            why: why.into(),
            needs_operator,
        })
    };
    let dns_events = || {
        backend
            .open()
            .events(0)
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == "dns-failed")
            .count()
    };
    let record = || {
        let view = &backend.open().pairs().unwrap()[0];
        let r = view
            .dns
            .iter()
            .find(|r| r.name == "pbx.acme.example")
            .unwrap()
            .clone();
        (r.state.as_str(), r.attempts, r.last_error)
    };
    assert!(
        !backend
            .open()
            .dns_result(fqdn, failed("server down", false), T0 + 60_000, T0 + 5)
            .unwrap()
    );
    assert_eq!(due().len(), 2);
    assert_eq!(record(), ("retrying", 1, Some("server down".to_owned())));
    assert_eq!(dns_events(), 0, "a server that is down is no event");
    // The server refuses the key: status says failed, and the audit log says it once, not
    // at every retry; a different refusal is a new event.
    for (n, expect_event) in [(2, true), (3, false), (4, false)] {
        let escalated = backend
            .open()
            .dns_result(fqdn, failed("TSIG key rejected", true), T0 + 60_000, T0 + 5)
            .unwrap();
        assert_eq!(escalated, expect_event, "try {n}");
    }
    assert_eq!(
        record(),
        ("failed", 4, Some("TSIG key rejected".to_owned()))
    );
    assert_eq!(dns_events(), 1);
    assert!(
        backend
            .open()
            .dns_result(fqdn, failed("NOTZONE", true), T0 + 60_000, T0 + 5)
            .unwrap()
    );
    assert_eq!(dns_events(), 2);
    for w in &work {
        backend.open().dns_result(w, Ok(()), 0, T0 + 5).unwrap();
    }
    assert!(due().is_empty());
    // The old primary's next heartbeat says it is fenced.
    assert_eq!(
        backend
            .open()
            .heartbeat(b, &report(1, Ipv4Addr::new(192, 168, 1, 3)), T0 + 6)
            .unwrap(),
        (Role::Fenced, Generation(2))
    );
    // It cannot promote itself back with its old generation, and registers as backup.
    assert!(matches!(
        backend
            .open()
            .promote(b, Generation(1), REMOTE, "test", T0 + 7),
        Err(StoreError::NotAllowed(_))
    ));
    assert_eq!(
        backend
            .open()
            .register_backup(b, "10.77.0.10", T0 + 8)
            .unwrap(),
        Generation(2)
    );

    let pairs = backend.open().pairs().unwrap();
    assert_eq!(pairs.len(), 1);
    let pair = &pairs[0];
    assert_eq!(pair.generation, 2);
    assert_eq!(pair.primary.as_deref(), Some(a.to_string().as_str()));
    let role_of = |sid: ServerId| {
        pair.servers
            .iter()
            .find(|s| s.sid == sid.to_string())
            .unwrap()
            .role
            .clone()
    };
    assert_eq!(
        (role_of(a).as_str(), role_of(b).as_str()),
        ("primary", "backup")
    );

    let kinds: Vec<(String, Option<u64>, Option<u64>)> = backend
        .open()
        .events(0)
        .unwrap()
        .into_iter()
        .map(|e| (e.kind, e.from_generation, e.to_generation))
        .collect();
    assert_eq!(
        kinds,
        [
            ("provisioned".into(), None, None),
            ("provisioned".into(), None, None),
            ("activated".into(), None, Some(1)),
            ("activated".into(), Some(1), Some(1)),
            ("promoted".into(), Some(1), Some(2)),
            ("dns-failed".into(), None, None),
            ("dns-failed".into(), None, None),
            ("dns-updated".into(), None, None),
            ("dns-updated".into(), None, None),
            ("dns-updated".into(), None, None),
            ("registered-backup".into(), Some(2), Some(2)),
        ]
    );
}

fn wrong_used_and_expired_keys_are_refused_and_change_nothing_but_the_log(backend: &dyn Backend) {
    let servers = backend
        .open()
        .provision_pair("acme", "pbx.acme.example", 2, DAY, T0)
        .unwrap();
    let (a, b) = (servers[0].sid, servers[1].sid);
    let refused = |result: Result<_, StoreError>| match result {
        Err(StoreError::ActivationRefused { why, .. }) => why,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let before = backend.open().pairs().unwrap();
    assert_eq!(
        refused(
            backend
                .open()
                .activate(&request(a, "WRONG-KEY", 2), pool(), T0)
        ),
        Refusal::WrongKey
    );
    // B's key used for A: wrong too (keys belong to their SID).
    assert_eq!(
        refused(
            backend
                .open()
                .activate(&request(a, &servers[1].key.to_string(), 2), pool(), T0)
        ),
        Refusal::WrongKey
    );
    assert_eq!(
        refused(backend.open().activate(
            &request(b, &servers[1].key.to_string(), 3),
            pool(),
            T0 + 15 * DAY.as_millis() as i64
        )),
        Refusal::Expired
    );
    assert_eq!(
        backend.open().pairs().unwrap(),
        before,
        "a refusal changed the records"
    );

    let granted = backend
        .open()
        .activate(&request(a, &servers[0].key.to_string(), 2), pool(), T0)
        .unwrap();
    // Replaying the key from another machine (other public keys): the key is spent.
    let mut replay = request(a, &servers[0].key.to_string(), 2);
    replay.wireguard_key = "an impostor's key".into();
    assert_eq!(
        refused(backend.open().activate(&replay, pool(), T0)),
        Refusal::Used
    );
    let mut replay = request(a, &servers[0].key.to_string(), 2);
    replay.tls_key = "an impostor's key".into();
    assert_eq!(
        refused(backend.open().activate(&replay, pool(), T0)),
        Refusal::Used
    );
    // The same box asking again (its answer was lost): the same answer, nothing changes.
    let before_repeat = backend.open().pairs().unwrap();
    assert_eq!(
        backend
            .open()
            .activate(&request(a, &servers[0].key.to_string(), 2), pool(), T0 + 9)
            .unwrap(),
        granted
    );
    assert_eq!(backend.open().pairs().unwrap(), before_repeat);
    let unknown = ServerId::from_bytes([9; 6]);
    assert!(matches!(
        backend.open().activate(&request(unknown, "x", 2), pool(), T0),
        Err(StoreError::UnknownServer(sid)) if sid == unknown
    ));
    let refusals = backend
        .open()
        .events(0)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "activation-refused")
        .count();
    assert_eq!(refusals, 5);
}

fn of_racing_promotions_exactly_one_wins_every_time(backend: &dyn Backend) {
    for round in 0..40 {
        let name = format!("race{round}");
        let servers = backend
            .open()
            .provision_pair(&name, "pbx.race.example", 2, DAY, T0)
            .unwrap();
        for (i, s) in servers.iter().enumerate() {
            backend
                .open()
                .activate(&request(s.sid, &s.key.to_string(), 2 + i as u8), pool(), T0)
                .unwrap();
        }
        let backup = servers[1].sid;
        // The same box racing itself: one promotion, the others are told it is granted
        // already (a repeat changes nothing).
        let wins: Vec<bool> = std::thread::scope(|scope| {
            let racers: Vec<_> = (0..4)
                .map(|i| {
                    scope.spawn(move || {
                        backend
                            .open()
                            .promote(backup, Generation(1), REMOTE, &format!("racer {i}"), T0)
                            .is_ok_and(|p| !p.repeat && p.generation == Generation(2))
                    })
                })
                .collect();
            racers.into_iter().map(|r| r.join().unwrap()).collect()
        });
        assert_eq!(
            wins.iter().filter(|w| **w).count(),
            1,
            "round {round}: {wins:?}"
        );
    }
    let promotions = backend
        .open()
        .events(0)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "promoted")
        .count();
    assert_eq!(promotions, 40, "one promotion logged per round");
}

fn a_box_alone_gets_its_backup_later_and_pairs_stay_at_two(backend: &dyn Backend) {
    let alone = backend
        .open()
        .provision_pair("solo", "pbx.solo.example", 1, DAY, T0)
        .unwrap();
    let a = alone[0].sid;
    backend
        .open()
        .activate(&request(a, &alone[0].key.to_string(), 2), pool(), T0)
        .unwrap();
    let b = backend.open().provision_backup(a, DAY, T0 + 1).unwrap();
    let activated = backend
        .open()
        .activate(&request(b.sid, &b.key.to_string(), 3), pool(), T0 + 2)
        .unwrap();
    assert_eq!(activated.role, Role::Backup);
    assert_eq!(activated.partner, Some(a));
    assert!(matches!(
        backend.open().provision_backup(a, DAY, T0),
        Err(StoreError::PairFull(name)) if name == "solo"
    ));
    assert!(matches!(
        backend
            .open()
            .provision_pair("solo", "x.example", 2, DAY, T0),
        Err(StoreError::PairExists(_))
    ));
}

fn a_reinstalled_box_reactivates_with_a_fresh_key_keeping_its_role_and_address(
    backend: &dyn Backend,
) {
    let servers = backend
        .open()
        .provision_pair("acme", "pbx.acme.example", 2, DAY, T0)
        .unwrap();
    let (a, b) = (servers[0].sid, servers[1].sid);
    let first = backend
        .open()
        .activate(&request(a, &servers[0].key.to_string(), 2), pool(), T0)
        .unwrap();
    backend
        .open()
        .activate(&request(b, &servers[1].key.to_string(), 3), pool(), T0)
        .unwrap();
    let fresh = backend.open().rekey(a, DAY, T0 + 10).unwrap();
    // The old key stays spent; the fresh one works once.
    assert!(
        backend
            .open()
            .activate(&request(a, &servers[0].key.to_string(), 2), pool(), T0 + 11)
            .is_err()
    );
    let again = backend
        .open()
        .activate(&request(a, &fresh.key.to_string(), 2), pool(), T0 + 12)
        .unwrap();
    assert_eq!(again, first, "same role, generation, address and partner");
    let kinds: Vec<String> = backend
        .open()
        .events(0)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds[kinds.len() - 3..],
        ["rekeyed", "activation-refused", "reactivated"]
    );
}

fn a_requested_promotion_is_pending_once_expires_unanswered_and_is_answered_by_the_promotion(
    backend: &dyn Backend,
) {
    let servers = backend
        .open()
        .provision_pair("acme", "pbx.acme.example", 2, DAY, T0)
        .unwrap();
    let (a, b) = (servers[0].sid, servers[1].sid);
    // No backup activated yet: nothing to promote.
    backend
        .open()
        .activate(&request(a, &servers[0].key.to_string(), 2), pool(), T0)
        .unwrap();
    let refused = backend
        .open()
        .request_promotion("acme", "noc", Duration::from_secs(60), T0)
        .unwrap_err();
    assert!(
        refused.to_string().contains("no activated backup"),
        "{refused}"
    );
    assert!(
        backend
            .open()
            .request_promotion("nope", "noc", Duration::from_secs(60), T0)
            .is_err()
    );
    backend
        .open()
        .activate(&request(b, &servers[1].key.to_string(), 3), pool(), T0)
        .unwrap();
    // Pending: the backup sees it, the primary does not; a second one waits its turn.
    let first = backend
        .open()
        .request_promotion("acme", "noc", Duration::from_secs(60), T0)
        .unwrap();
    assert_eq!(first.state, "pending");
    assert_eq!(
        backend.open().pending_promotion(b, T0 + 1).unwrap(),
        Some(first.clone())
    );
    assert_eq!(backend.open().pending_promotion(a, T0 + 1).unwrap(), None);
    assert!(
        backend
            .open()
            .request_promotion("acme", "noc", Duration::from_secs(60), T0 + 1)
            .is_err()
    );
    // Unanswered past its time: expired, logged, and a new one may be made.
    assert_eq!(
        backend.open().pending_promotion(b, T0 + 60_000).unwrap(),
        None
    );
    let expired = backend
        .open()
        .promotion_request(first.id, T0 + 60_000)
        .unwrap();
    assert_eq!(expired.state, "expired");
    // The backup's refusal is recorded; a late refusal of an answered request changes nothing.
    let second = backend
        .open()
        .request_promotion("acme", "noc", Duration::from_secs(60), T0 + 61_000)
        .unwrap();
    // The primary has no say in it: its refusal changes nothing.
    backend
        .open()
        .refuse_promotion(second.id, a, "no, thanks", T0 + 61_200)
        .unwrap();
    assert_eq!(
        backend
            .open()
            .promotion_request(second.id, T0 + 61_300)
            .unwrap()
            .state,
        "pending"
    );
    backend
        .open()
        .refuse_promotion(second.id, b, "the primary answers ARP", T0 + 61_500)
        .unwrap();
    let refused = backend
        .open()
        .promotion_request(second.id, T0 + 62_000)
        .unwrap();
    assert_eq!(
        (refused.state.as_str(), refused.answer.as_deref()),
        ("refused", Some("the primary answers ARP"))
    );
    // The promotion itself answers a pending request.
    let third = backend
        .open()
        .request_promotion("acme", "noc", Duration::from_secs(60), T0 + 63_000)
        .unwrap();
    backend
        .open()
        .promote(b, Generation(1), REMOTE, "test", T0 + 63_500)
        .unwrap();
    let promoted = backend
        .open()
        .promotion_request(third.id, T0 + 64_000)
        .unwrap();
    assert_eq!(
        (promoted.state.as_str(), promoted.answer.as_deref()),
        ("promoted", Some("promoted at gen 2"))
    );
    backend
        .open()
        .refuse_promotion(third.id, b, "too late", T0 + 64_500)
        .unwrap();
    assert_eq!(
        backend
            .open()
            .promotion_request(third.id, T0 + 65_000)
            .unwrap()
            .state,
        "promoted"
    );
    let kinds: Vec<String> = backend
        .open()
        .events(0)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .filter(|k| k.starts_with("promot"))
        .collect();
    assert_eq!(
        kinds,
        [
            "promotion requested",
            "promotion request expired",
            "promotion requested",
            "promotion refused",
            "promotion requested",
            "promoted"
        ]
    );
}

fn a_hand_over_needs_the_primary_a_backup_heard_and_in_sync_and_not_one_lately(
    backend: &dyn Backend,
) {
    use lbs_datacenter::store::HandOverLimits;
    let servers = backend
        .open()
        .provision_pair("acme", "pbx.acme.example", 2, DAY, T0)
        .unwrap();
    let (a, b) = (servers[0].sid, servers[1].sid);
    for (sid, key, lan) in [(a, &servers[0].key, 2), (b, &servers[1].key, 3)] {
        backend
            .open()
            .activate(&request(sid, &key.to_string(), lan), pool(), T0)
            .unwrap();
    }
    let limits = HandOverLimits {
        ttl: Duration::from_secs(60),
        alive: Duration::from_secs(20),
        holdoff: Duration::from_secs(900),
    };
    let ask = |sid, now| {
        backend
            .open()
            .hand_over(sid, "PBX check failed", limits, now)
    };
    let refused = |sid, now, says: &str| {
        let err = ask(sid, now).unwrap_err().to_string();
        assert!(err.contains(says), "{err}");
    };
    refused(b, T0, "only the primary hands over");
    refused(a, T0, "has not reported");
    // The backup reports, but is behind: no.
    let behind = Report {
        json: r#"{"sync_pending_files":3,"sync_pending_bytes":10,"sync_last_complete_ms":1}"#
            .into(),
        ..report(1, Ipv4Addr::new(192, 168, 1, 3))
    };
    backend.open().heartbeat(b, &behind, T0 + 1_000).unwrap();
    refused(a, T0 + 2_000, "not in sync");
    // In sync and heard: a request for the backup, once; then not again for the hold-off.
    let in_sync = Report {
        json: r#"{"sync_pending_files":0,"sync_pending_bytes":0,"sync_last_complete_ms":1}"#.into(),
        ..report(1, Ipv4Addr::new(192, 168, 1, 3))
    };
    backend.open().heartbeat(b, &in_sync, T0 + 3_000).unwrap();
    refused(a, T0 + 30_000, "has not reported for 27 s");
    backend.open().heartbeat(b, &in_sync, T0 + 30_000).unwrap();
    let request = ask(a, T0 + 31_000).unwrap();
    assert_eq!(request.hand_over.as_deref(), Some("PBX check failed"));
    assert_eq!(
        backend.open().pending_promotion(b, T0 + 32_000).unwrap(),
        Some(request.clone())
    );
    refused(a, T0 + 32_000, "handed over 1 s ago");
    backend.open().heartbeat(b, &in_sync, T0 + 900_000).unwrap();
    refused(a, T0 + 900_000, "handed over 869 s ago");
    backend.open().heartbeat(b, &in_sync, T0 + 932_000).unwrap();
    assert!(ask(a, T0 + 932_000).is_ok());
    assert!(
        backend
            .open()
            .events(0)
            .unwrap()
            .iter()
            .any(|e| e.kind == "hand-over requested" && e.detail.contains("PBX check failed"))
    );
}

fn liveness_is_recorded_in_batches_and_a_primary_that_moved_is_a_decision(backend: &dyn Backend) {
    let servers = backend
        .open()
        .provision_pair("acme", "pbx.acme.example", 2, DAY, T0)
        .unwrap();
    let (a, b) = (servers[0].sid, servers[1].sid);
    // Not activated yet: a report is refused, whatever it says.
    assert!(matches!(
        backend.open().report_kind(a, &report(1, REMOTE)),
        Err(StoreError::NotAllowed(_))
    ));
    backend
        .open()
        .activate(&request(a, &servers[0].key.to_string(), 2), pool(), T0 + 1)
        .unwrap();
    backend
        .open()
        .activate(&request(b, &servers[1].key.to_string(), 3), pool(), T0 + 2)
        .unwrap();
    let at_home = Ipv4Addr::new(192, 168, 1, 2);
    // The primary reports from where it is recorded: liveness.
    backend
        .open()
        .heartbeat(a, &report(1, at_home), T0 + 3)
        .unwrap();
    assert_eq!(
        backend.open().report_kind(a, &report(1, at_home)).unwrap(),
        ReportKind::Liveness
    );
    // From a new address: its name must follow, a decision recorded now.
    assert_eq!(
        backend.open().report_kind(a, &report(1, REMOTE)).unwrap(),
        ReportKind::Decision
    );
    // The backup moving is liveness (no name follows it); so is a stale primary's report.
    assert_eq!(
        backend.open().report_kind(b, &report(1, REMOTE)).unwrap(),
        ReportKind::Liveness
    );
    assert_eq!(
        backend.open().report_kind(a, &report(0, REMOTE)).unwrap(),
        ReportKind::Liveness
    );

    // Both boxes' reports in one batch.
    let batch = [
        (a, report(1, at_home), T0 + 10),
        (b, report(1, Ipv4Addr::new(192, 168, 1, 3)), T0 + 11),
    ];
    backend.open().heartbeats(&batch).unwrap();
    let pair = backend.open().pair_of(a).unwrap();
    let heard: Vec<_> = pair
        .servers
        .iter()
        .map(|s| (s.last_heartbeat_at, s.advertised.clone()))
        .collect();
    assert_eq!(
        heard,
        [
            (Some(T0 + 10), Some("192.168.1.2".to_owned())),
            (Some(T0 + 11), Some("192.168.1.3".to_owned())),
        ]
    );
}

fn a_retired_pair_is_refused_everywhere_and_kept_in_the_audit_log(backend: &dyn Backend) {
    let servers = backend
        .open()
        .provision_pair("acme", "pbx.acme.example", 2, DAY, T0)
        .unwrap();
    backend
        .open()
        .provision_pair("beta", "pbx.beta.example", 2, DAY, T0)
        .unwrap();
    let (a, b) = (servers[0].sid, servers[1].sid);
    backend
        .open()
        .activate(&request(a, &servers[0].key.to_string(), 2), pool(), T0 + 1)
        .unwrap();
    backend
        .open()
        .activate(&request(b, &servers[1].key.to_string(), 3), pool(), T0 + 2)
        .unwrap();
    // A promotion leaves DNS work behind; a request is pending.
    backend
        .open()
        .promote(b, Generation(1), REMOTE, "test", T0 + 3)
        .unwrap();
    assert!(!backend.open().dns_due(T0 + 4).unwrap().is_empty());
    assert_eq!(backend.open().tunnel_peers().unwrap().len(), 2);

    let retired = backend.open().retire_pair("acme", "noc", T0 + 5).unwrap();
    assert_eq!(retired, [a, b]);

    // After a restart (each call reopens the store), still refused, with the reason.
    let refused = |err: StoreError| {
        assert!(matches!(err, StoreError::Retired { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("pair acme, retired"), "{text}");
    };
    refused(
        backend
            .open()
            .heartbeat(a, &report(2, REMOTE), T0 + 6)
            .unwrap_err(),
    );
    refused(
        backend
            .open()
            .report_kind(b, &report(2, REMOTE))
            .unwrap_err(),
    );
    refused(backend.open().certificate_key(a).unwrap_err());
    refused(
        backend
            .open()
            .register_backup(a, "test", T0 + 6)
            .unwrap_err(),
    );
    refused(backend.open().rekey(a, DAY, T0 + 6).unwrap_err());
    refused(
        backend
            .open()
            .activate(&request(a, &servers[0].key.to_string(), 2), pool(), T0 + 6)
            .unwrap_err(),
    );
    let no_request = backend
        .open()
        .request_promotion("acme", "noc", Duration::from_secs(60), T0 + 6)
        .unwrap_err();
    assert!(
        no_request.to_string().contains("pair acme was retired"),
        "{no_request}"
    );
    assert_eq!(backend.open().retired("acme").unwrap(), Some(T0 + 5));
    assert_eq!(backend.open().retired("beta").unwrap(), None);
    let again = backend
        .open()
        .retire_pair("acme", "noc", T0 + 7)
        .unwrap_err();
    assert!(again.to_string().contains("retired"), "{again}");

    // Left out of what serves and shows the fleet; the other pair is untouched.
    let names: Vec<String> = backend
        .open()
        .pairs()
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, ["beta"]);
    assert!(backend.open().tunnel_peers().unwrap().is_empty());
    assert!(backend.open().tunnel_pairs().unwrap().is_empty());
    assert!(backend.open().dns_due(T0 + 10_000_000).unwrap().is_empty());

    // The audit log keeps the pair's history and says who retired it.
    let events = backend.open().events(0).unwrap();
    let last = events.last().unwrap();
    assert_eq!(
        (last.kind.as_str(), last.actor.as_str()),
        ("retired", "noc")
    );
    assert!(last.detail.contains(&a.to_string()) && last.detail.contains(&b.to_string()));
    assert!(events.iter().any(|e| e.kind == "promoted"));
}

fn when_the_dns_server_answers_again_the_names_waiting_out_their_backoff_are_due_at_once(
    backend: &dyn Backend,
) {
    let servers = backend
        .open()
        .provision_pair("acme", "pbx.acme.example", 2, DAY, T0)
        .unwrap();
    for (n, server) in servers.iter().enumerate() {
        backend
            .open()
            .activate(
                &request(server.sid, &server.key.to_string(), 2 + n as u8),
                pool(),
                T0,
            )
            .unwrap();
    }
    // Every name fails (the server is down) and waits a minute; one of them was refused
    // for a reason waiting cannot mend.
    let work = backend.open().dns_due(T0 + 1).unwrap();
    assert_eq!(work.len(), 3);
    for (n, w) in work.iter().enumerate() {
        let failure = DnsFailure {
            why: if n == 0 { "NOTAUTH" } else { "timed out" }.into(),
            needs_operator: n == 0,
        };
        backend
            .open()
            .dns_result(w, Err(failure), T0 + 60_000, T0 + 2)
            .unwrap();
    }
    assert!(backend.open().dns_due(T0 + 3).unwrap().is_empty());
    // A name written at its next try: the server is back, the others are due now.
    let retried = backend.open().dns_due(T0 + 60_000).unwrap();
    let back = retried.iter().find(|w| w.name == work[1].name).unwrap();
    assert_eq!(back.attempts, 1);
    backend.open().dns_result(back, Ok(()), 0, T0 + 4).unwrap();
    let due: Vec<String> = backend
        .open()
        .dns_due(T0 + 5)
        .unwrap()
        .into_iter()
        .map(|w| w.name)
        .collect();
    assert_eq!(
        due,
        [work[2].name.clone()],
        "the refused one keeps its wait"
    );
    // A success at a name's first try says nothing new about the server: the others keep
    // their wait.
    let transient = DnsFailure {
        why: "timed out".into(),
        needs_operator: false,
    };
    backend
        .open()
        .dns_result(&work[2], Err(transient), T0 + 90_000, T0 + 6)
        .unwrap();
    let mut first_try = work[0].clone();
    first_try.attempts = 0;
    backend
        .open()
        .dns_result(&first_try, Ok(()), 0, T0 + 7)
        .unwrap();
    assert!(backend.open().dns_due(T0 + 8).unwrap().is_empty());
}

#[test]
fn the_audit_log_cannot_be_rewritten_and_a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("dc.db");
    SqliteStore::open(&db)
        .unwrap()
        .provision_pair("acme", "pbx.acme.example", 2, DAY, T0)
        .unwrap();
    let raw = rusqlite::Connection::open(&db).unwrap();
    let err = raw
        .execute("UPDATE events SET actor = 'nobody'", [])
        .unwrap_err();
    assert!(err.to_string().contains("append-only"), "{err}");
    let err = raw.execute("DELETE FROM events", []).unwrap_err();
    assert!(err.to_string().contains("append-only"), "{err}");
    raw.pragma_update(None, "user_version", 99).unwrap();
    drop(raw);
    let err = SqliteStore::open(&db).unwrap_err().to_string();
    assert!(
        err.contains("newer than this lbs-datacenter knows"),
        "{err}"
    );
}

fn a_look_at_a_report_answers_as_the_separate_questions_do(backend: &dyn Backend) {
    let servers = backend
        .open()
        .provision_pair("acme", "pbx.acme.example", 2, DAY, T0)
        .unwrap();
    let (a, b) = (servers[0].sid, servers[1].sid);
    for (i, s) in servers.iter().enumerate() {
        backend
            .open()
            .activate(&request(s.sid, &s.key.to_string(), 2 + i as u8), pool(), T0)
            .unwrap();
    }
    let at_home = report(1, Ipv4Addr::new(192, 168, 1, 2));
    let moved = report(1, Ipv4Addr::new(192, 168, 9, 2));
    let mut store = backend.open();
    for (sid, report) in [(a, &at_home), (a, &moved), (b, &at_home)] {
        let look = store.look(sid, report, true, T0 + 1).unwrap();
        assert_eq!(look.kind, store.report_kind(sid, report).unwrap(), "{sid}");
        assert_eq!(look.pair, store.pair_of(sid).unwrap());
        assert_eq!(look.request, None);
    }
    assert_eq!(
        store.look(a, &moved, true, T0 + 1).unwrap().kind,
        ReportKind::Decision,
        "the primary at a new address"
    );
    let asked = store
        .request_promotion("acme", "ops", Duration::from_secs(60), T0 + 2)
        .unwrap();
    assert_eq!(
        store.look(b, &at_home, true, T0 + 3).unwrap().request,
        Some(asked.clone())
    );
    assert_eq!(
        store.look(b, &at_home, false, T0 + 3).unwrap().request,
        None
    );
    assert_eq!(
        store.look(a, &at_home, true, T0 + 3).unwrap().request,
        None,
        "only the backup"
    );
    // Past its time, the look expires it, as pending_promotion does.
    assert_eq!(
        store.look(b, &at_home, true, T0 + 70_000).unwrap().request,
        None
    );
    let expired = store.promotion_request(asked.id, T0 + 70_001).unwrap();
    assert_eq!(expired.state, lbs_datacenter::store::RequestState::Expired);
    assert!(matches!(
        store.look(ServerId::from_bytes([9; 6]), &at_home, true, T0),
        Err(StoreError::UnknownServer(_))
    ));
}
