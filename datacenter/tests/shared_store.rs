//! What only the shared store (`KvStore`) shows, in memory and on a real etcd: long lists
//! provisioned in pieces yet whole or not at all, the audit log's bounded retention, a site
//! cut off from the authority deciding nothing and saying so, and two sites racing.
#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::time::Duration;

use lbs_datacenter::kv::{Candidate, EtcdKv, EtcdSettings, Holder, MemKv};
use lbs_datacenter::store::{
    ActivationRequest, DnsSender, KvStore, SqliteStore, Store, StoreError,
};
use lbs_protocol::{Generation, ServerId};
use lbs_tests::etcd::Etcd;

const DAY: Duration = Duration::from_secs(86_400);
const T0: i64 = 1_800_000_000_000;
const REMOTE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);

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

fn list(prefix: &str, n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            (
                format!("{prefix}{i:03}"),
                format!("pbx.{prefix}{i:03}.example"),
            )
        })
        .collect()
}

/// More pairs than one transaction may carry, made whole; a list with one taken name makes
/// none; the audit log keeps only each pair's latest events, read in one order page by page.
fn long_lists_and_retention(store: &mut KvStore) {
    let made = store
        .provision_pairs(&list("office", 100), 2, DAY, T0)
        .unwrap();
    assert_eq!(made.len(), 100);
    assert!(made.iter().all(|servers| servers.len() == 2));
    assert_eq!(store.pairs().unwrap().len(), 100);
    let mut refused = list("late", 60);
    refused[45].0 = "office050".into();
    assert!(matches!(
        store.provision_pairs(&refused, 2, DAY, T0),
        Err(StoreError::PairExists(name)) if name == "office050"
    ));
    let mut twice = list("twice", 3);
    twice[2].0 = twice[0].0.clone();
    assert!(store.provision_pairs(&twice, 2, DAY, T0).is_err());
    assert_eq!(
        store.pairs().unwrap().len(),
        100,
        "nothing of a refused list"
    );
    // A busy pair: its latest 1,050 events are kept; the others' are untouched. The log is
    // then longer than one page of reading (1,000).
    let busy = &made[7][0];
    for n in 0..1100 {
        store.rekey(busy.sid, DAY, T0 + n).unwrap();
    }
    let events = store.events(0).unwrap();
    let theirs: Vec<&lbs_datacenter::store::Event> = events
        .iter()
        .filter(|e| e.pair.as_deref() == Some("office007"))
        .collect();
    assert_eq!(theirs.len(), 1050);
    assert!(theirs.iter().all(|e| e.kind == "rekeyed"));
    assert_eq!(theirs[1049].at, T0 + 1099, "the latest kept");
    assert_eq!(events.len(), 99 * 2 + 1050);
    // One order for the whole log, and reading on from an event gives what came after.
    assert!(events.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(store.events(theirs[1039].id).unwrap().len(), 10);
    assert!(store.events(events[1247].id).unwrap().is_empty());
}

#[test]
fn in_memory_long_lists_are_made_whole_and_the_log_is_bounded() {
    let mut store = KvStore::new(Box::new(MemKv::default()), "/lbs").keeping_events(1050);
    long_lists_and_retention(&mut store);
}

#[test]
fn on_etcd_long_lists_are_made_whole_and_the_log_is_bounded() {
    let etcd = Etcd::start(1);
    let kv = EtcdKv::open(EtcdSettings {
        endpoints: etcd.endpoints(),
        timeout: Duration::from_secs(5),
        tls: None,
    })
    .unwrap();
    let mut store = KvStore::new(Box::new(kv), "/lbs").keeping_events(1050);
    long_lists_and_retention(&mut store);
}

#[test]
fn a_site_cut_off_from_the_authority_decides_nothing_and_says_so() {
    let shared = MemKv::default();
    let (dc1, dc2) = (shared.site(), shared.site());
    let mut at_dc1 = KvStore::new(Box::new(dc1.clone()), "/lbs");
    let mut at_dc2 = KvStore::new(Box::new(dc2), "/lbs");
    let servers = at_dc1
        .provision_pair("acme", "pbx.acme.example", 2, DAY, T0)
        .unwrap();
    for (i, s) in servers.iter().enumerate() {
        at_dc1
            .activate(
                &request(s.sid, &s.key.to_string(), 2 + i as u8),
                "10.77.0.0/16".parse().unwrap(),
                T0,
            )
            .unwrap();
    }
    let backup = servers[1].sid;
    dc1.cut_off(true);
    let refused = at_dc1
        .promote(backup, Generation(1), REMOTE, "test", T0 + 1)
        .unwrap_err();
    assert!(
        matches!(refused, StoreError::Authority(_))
            && refused
                .to_string()
                .contains("authority unreachable from this site"),
        "{refused}"
    );
    assert!(
        at_dc1.pairs().is_err(),
        "nothing is shown from a stale copy"
    );
    // The other site decides; the cut-off one, back, sees it and cannot undo it.
    let promoted = at_dc2
        .promote(backup, Generation(1), REMOTE, "test", T0 + 2)
        .unwrap();
    assert_eq!(promoted.generation, Generation(2));
    dc1.cut_off(false);
    assert!(matches!(
        at_dc1.promote(servers[0].sid, Generation(1), REMOTE, "test", T0 + 3),
        Err(StoreError::NotAllowed(_))
    ));
    assert_eq!(at_dc1.pairs().unwrap()[0].generation, 2);
    // Who sends the DNS updates, as every site's status says it.
    assert_eq!(at_dc1.dns_sender().unwrap(), DnsSender::Nobody);
    let mut role = Candidate::new(&at_dc2.dns_role_key(), "dc2", Duration::from_secs(5));
    assert_eq!(role.step(&shared.site()).unwrap(), Holder::Me);
    assert_eq!(at_dc1.dns_sender().unwrap(), DnsSender::Site("dc2".into()));
    role.resign(&shared.site()).unwrap();
    assert_eq!(at_dc1.dns_sender().unwrap(), DnsSender::Nobody);
    let own = SqliteStore::open(&tempfile::tempdir().unwrap().path().join("dc.db")).unwrap();
    assert_eq!(own.dns_sender().unwrap(), DnsSender::OwnSite);
}

#[test]
fn a_sqlite_site_migrates_with_its_generations_and_history_and_goes_on_deciding() {
    let dir = tempfile::tempdir().unwrap();
    let mut sqlite = SqliteStore::open(&dir.path().join("dc.db")).unwrap();
    let pool = "10.77.0.0/16".parse().unwrap();
    let servers = sqlite
        .provision_pair("acme", "pbx.acme.example", 2, DAY, T0)
        .unwrap();
    let (a, b) = (servers[0].sid, servers[1].sid);
    // Interleaved with acme's: the log's order is not the pairs' order.
    let spare = sqlite
        .provision_pair("spare", "pbx.spare.example", 1, DAY, T0 + 1)
        .unwrap();
    sqlite
        .activate(&request(a, &servers[0].key.to_string(), 2), pool, T0 + 1)
        .unwrap();
    sqlite
        .activate(&request(b, &servers[1].key.to_string(), 3), pool, T0 + 2)
        .unwrap();
    let asked = sqlite
        .request_promotion("acme", "ops", DAY, T0 + 3)
        .unwrap();
    sqlite
        .promote(b, Generation(1), REMOTE, "test", T0 + 4)
        .unwrap();
    sqlite.record_site_ca("dc1", b"dc1's CA", T0 + 4).unwrap();
    sqlite
        .set_revocation_list(b"the root's list", T0 + 4)
        .unwrap();
    let before = (sqlite.pairs().unwrap(), sqlite.events(0).unwrap());

    let shared = MemKv::default();
    let mut store = KvStore::new(Box::new(shared.site()), "/lbs");
    let export = sqlite.export().unwrap();
    assert_eq!(export.counts(), (2, 3, before.1.len()));
    store.import(&export).unwrap();
    assert_eq!(store.pairs().unwrap(), before.0);
    // The sites' CAs and the revocation list go along (site-revoke works at any site).
    assert_eq!(
        store.site_ca("dc1").unwrap().as_deref(),
        Some(&b"dc1's CA"[..])
    );
    assert_eq!(
        store.revocation_list().unwrap().as_deref(),
        Some(&b"the root's list"[..])
    );
    // The same events in the same order (numbered anew: by the store's revisions).
    let told =
        |events: &[lbs_datacenter::store::Event]| -> Vec<(i64, Option<String>, String, String)> {
            events
                .iter()
                .map(|e| (e.at, e.pair.clone(), e.kind.clone(), e.detail.clone()))
                .collect()
        };
    let moved = store.events(0).unwrap();
    assert_eq!(told(&moved), told(&before.1));
    assert_eq!(
        store.promotion_request(asked.id, T0 + 6).unwrap(),
        sqlite.promotion_request(asked.id, T0 + 6).unwrap()
    );
    // Several pairs in one transaction: their events in the order they were logged.
    let last = moved.last().unwrap().id;
    store
        .provision_pairs(
            &[
                ("zulu".into(), "pbx.zulu.example".into()),
                ("alpha".into(), "pbx.alpha.example".into()),
            ],
            1,
            DAY,
            T0 + 5,
        )
        .unwrap();
    let order: Vec<Option<String>> = store
        .events(last)
        .unwrap()
        .into_iter()
        .map(|e| e.pair)
        .collect();
    assert_eq!(order, [Some("zulu".to_owned()), Some("alpha".to_owned())]);
    let moved = store.events(0).unwrap();
    let err = store.import(&export).unwrap_err().to_string();
    assert!(err.contains("holds records under /lbs already"), "{err}");

    // It goes on where SQLite stopped: the fenced box back as backup, promoted at 3; the
    // spare's unused key still works; a taken overlay address is not given twice.
    store.register_backup(a, "test", T0 + 7).unwrap();
    let promoted = store
        .promote(a, Generation(2), REMOTE, "test", T0 + 8)
        .unwrap();
    assert_eq!(promoted.generation, Generation(3));
    let third = store
        .activate(
            &request(spare[0].sid, &spare[0].key.to_string(), 4),
            pool,
            T0 + 9,
        )
        .unwrap();
    let taken: Vec<Option<String>> = before.0[0]
        .servers
        .iter()
        .map(|s| s.overlay.clone())
        .collect();
    assert!(!taken.contains(&Some(third.overlay.to_string())));
    let events = store.events(0).unwrap();
    assert_eq!(events.len(), before.1.len() + 2 + 3);
    assert!(events.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(store.events(moved.last().unwrap().id).unwrap().len(), 3);
    store.register_backup(b, "test", T0 + 10).unwrap();
    let next = store
        .request_promotion("acme", "ops", DAY, T0 + 10)
        .unwrap();
    assert_eq!(next.id, asked.id + 1);
}
