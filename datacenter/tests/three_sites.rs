//! The data center's three sites in the lab's WAN (issue 26): an etcd member at `dc1`, `dc2`
//! and the witness `dc3`, each site's client on its own member, tried the way a provider
//! meets them: racing decisions through two sites, a site cut off from the others while the
//! offices still reach it, a site gone dark.
#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use lbs_datacenter::kv::{EtcdKv, EtcdSettings, Expect, Kv, KvError, Op};
use lbs_datacenter::store::{ActivationRequest, KvStore, Promoted, Store, StoreError};
use lbs_protocol::Generation;
use lbs_tests::netns::in_netns;
use lbs_tests::office::Office;
use lbs_tests::require_root;

/// A site's client: in its namespace, on its own member.
fn site(office: &Office, name: &'static str) -> EtcdKv {
    let endpoints = Office::etcd_endpoints(&[name]);
    in_netns(&office.lab.ns(name), move || {
        EtcdKv::open(EtcdSettings {
            endpoints,
            timeout: Duration::from_secs(2),
            tls: None,
        })
    })
    .unwrap()
    .unwrap()
}

/// One round: both sites read the pair's record and try to move it on at once; who won.
fn race(one: &EtcdKv, two: &EtcdKv, key: &str, round: u32) -> (bool, bool) {
    let read = |kv: &EtcdKv| kv.get(&[key.to_owned()]).ok().map(|r| r.items[0].clone());
    let (a, b) = (read(one), read(two));
    let attempt = |kv: &EtcdKv, seen: Option<Option<_>>, by: &str| -> bool {
        let Some(seen) = seen else { return false };
        let expect = [Expect::as_read(key, seen.as_ref())];
        let value = format!("generation {round} by {by}").into_bytes();
        let put = Op::Put {
            key: key.to_owned(),
            value,
        };
        matches!(kv.commit(&expect, &[put]), Ok(Some(_)))
    };
    std::thread::scope(|s| {
        let by_two = s.spawn(|| attempt(two, b, "dc2"));
        (attempt(one, a, "dc1"), by_two.join().unwrap())
    })
}

/// Retries `step` for up to `limit` (a leader election after a loss); how long it took.
fn within(limit: Duration, what: &str, mut step: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !step() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    started.elapsed()
}

#[test]
fn a_site_cut_off_from_the_others_decides_nothing_and_the_other_two_go_on() {
    if !require_root(
        "a_site_cut_off_from_the_others_decides_nothing_and_the_other_two_go_on",
        "network namespaces for the three sites",
    ) {
        return;
    }
    let mut office = Office::start().unwrap();
    office.start_etcd().unwrap();
    let (dc1, dc2) = (site(&office, "dc1"), site(&office, "dc2"));
    let key = "/lbs/test/pair/acme";
    let mut double = 0;
    for round in 0..20 {
        let (one, two) = race(&dc1, &dc2, key, round);
        double += u32::from(one && two);
        assert!(one || two, "round {round}: nobody won with every site up");
    }

    // dc1 cut off from dc2 and dc3, the offices still reaching it: it grants nothing.
    office.partition_site("dc1", true).unwrap();
    let started = Instant::now();
    let put = |value: &str| Op::Put {
        key: "/lbs/test/through-dc1".into(),
        value: value.as_bytes().to_vec(),
    };
    let err = dc1.commit(&[], &[put("cut off")]).unwrap_err();
    assert!(
        matches!(
            err,
            KvError::Unconfirmed { .. } | KvError::Unreachable { .. }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .starts_with("authority unreachable from this site"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let took = within(Duration::from_secs(10), "dc2 deciding without dc1", || {
        matches!(dc2.commit(&[], &[]), Ok(Some(_))) && dc2.get(&[key.into()]).is_ok()
    });
    println!("dc2 decides again {took:?} after dc1 was cut off");
    let mut dc1_wins = 0;
    for round in 20..40 {
        let (one, two) = race(&dc1, &dc2, key, round);
        dc1_wins += u32::from(one);
        double += u32::from(one && two);
        assert!(two, "round {round}: dc2 (with the majority) did not win");
    }
    assert_eq!(dc1_wins, 0, "a site without the majority granted something");

    // Joined again: dc1 sees what dc2 decided, and its own unconfirmed write is whole or
    // absent.
    office.partition_site("dc1", false).unwrap();
    let mut seen = None;
    within(Duration::from_secs(20), "dc1 back", || {
        seen = dc1.get(&[key.into(), "/lbs/test/through-dc1".into()]).ok();
        seen.is_some()
    });
    let seen = seen.unwrap().items;
    let last = seen[0]
        .as_ref()
        .map(|v| String::from_utf8_lossy(&v.value).into_owned());
    assert_eq!(last.as_deref(), Some("generation 39 by dc2"));
    let late = seen[1].as_ref().map(|v| v.value.clone());
    assert!(
        matches!(late.as_deref(), None | Some(b"cut off")),
        "{late:?}"
    );

    // dc1 dark (its cable out): dc2 and dc3 go on.
    office.lab.plug("dc1", false).unwrap();
    let took = within(
        Duration::from_secs(10),
        "dc2 deciding with dc1 dark",
        || {
            let read = dc2.get(&[key.into()]);
            let Ok(read) = read else { return false };
            let expect = [Expect::as_read(key, read.items[0].as_ref())];
            let put = Op::Put {
                key: key.into(),
                value: b"after dc1 went dark".to_vec(),
            };
            matches!(dc2.commit(&expect, &[put]), Ok(Some(_)))
        },
    );
    println!("dc2 decides {took:?} after dc1 went dark; double grants: {double}");
    assert_eq!(double, 0, "two sites won the same round");
}

/// The store at `name`: `KvStore` on the site's own member.
fn store_at(office: &Office, name: &'static str) -> KvStore {
    KvStore::new(Box::new(site(office, name)), "/lbs")
}

#[test]
fn promotions_of_one_pair_racing_through_two_sites_have_one_winner_every_round() {
    if !require_root(
        "promotions_of_one_pair_racing_through_two_sites_have_one_winner_every_round",
        "network namespaces for the three sites",
    ) {
        return;
    }
    let mut office = Office::start().unwrap();
    office.start_etcd().unwrap();
    let (mut dc1, mut dc2) = (store_at(&office, "dc1"), store_at(&office, "dc2"));
    let servers = dc1
        .provision_pair("race", "pbx.race.example", 2, Duration::from_secs(3600), 1)
        .unwrap();
    let pool = "10.77.0.0/16".parse().unwrap();
    for (i, s) in servers.iter().enumerate() {
        let request = ActivationRequest {
            sid: s.sid,
            key: s.key.to_string(),
            wireguard_key: format!("wg-{i}"),
            tls_key: format!("tls-{i}"),
            lan_address: Ipv4Addr::new(192, 168, 1, 2 + i as u8),
            software: "test".into(),
            inventory: "{}".into(),
            source: "test".into(),
        };
        // Activations through either site.
        let at = if i == 0 { &mut dc1 } else { &mut dc2 };
        at.activate(&request, pool, 2).unwrap();
    }
    let advertised = Ipv4Addr::new(192, 168, 1, 2);
    let (mut backup, mut fenced) = (servers[1].sid, servers[0].sid);
    let mut winners = Vec::new();
    for round in 0..20u64 {
        let believed = Generation(round + 1);
        // The same backup asks through both sites at once (its first site slow to answer).
        let (one, two) = std::thread::scope(|s| {
            let by_dc2 = s.spawn(|| dc2.promote(backup, believed, advertised, "via dc2", 10));
            let by_dc1 = dc1.promote(backup, believed, advertised, "via dc1", 10);
            (by_dc1, by_dc2.join().unwrap())
        });
        let won = |r: &Result<Promoted, StoreError>| {
            r.as_ref()
                .is_ok_and(|p| !p.repeat && p.generation == Generation(round + 2))
        };
        assert_eq!(
            u32::from(won(&one)) + u32::from(won(&two)),
            1,
            "round {round}: {one:?} {two:?}"
        );
        winners.push(if won(&one) { "dc1" } else { "dc2" });
        // The loser was told the same promotion (a repeat) or that it came too late.
        for r in [&one, &two] {
            assert!(
                matches!(r, Ok(_) | Err(StoreError::StaleGeneration { .. })),
                "round {round}: {r:?}"
            );
        }
        dc1.register_backup(fenced, "test", 11).unwrap();
        std::mem::swap(&mut backup, &mut fenced);
    }
    let events = dc2.events(0).unwrap();
    let promoted: Vec<u64> = events
        .iter()
        .filter(|e| e.kind == "promoted")
        .filter_map(|e| e.to_generation)
        .collect();
    assert_eq!(
        promoted,
        (2..=21).collect::<Vec<u64>>(),
        "one promotion per generation"
    );
    println!("winners by round: {winners:?}");
}
