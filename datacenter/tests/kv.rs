//! The key-value contract a shared store is built on, against the in-memory fake and a real
//! etcd (Debian's package, on loopback): the same assertions for both, then what only a
//! cluster shows — members lost, frozen, and a race through two members.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use lbs_datacenter::kv::{
    Candidate, EtcdKv, EtcdSettings, EtcdTls, Expect, Holder, Kv, KvError, MAX_TXN_OPS, MemKv, Op,
};
use lbs_tests::etcd::Etcd;

fn put(key: &str, value: &str) -> Op {
    Op::Put {
        key: key.into(),
        value: value.as_bytes().to_vec(),
    }
}

fn etcd_kv(endpoints: Vec<String>) -> EtcdKv {
    EtcdKv::open(EtcdSettings {
        endpoints,
        timeout: Duration::from_secs(2),
        tls: None,
    })
    .unwrap()
}

/// What every [`Kv`] must do; `a` and `b` are two sites on the same data.
fn contract(a: &dyn Kv, b: &dyn Kv) {
    let key = "/lbs/test/pair/acme".to_string();
    // Absent, then created only if still absent.
    let read = a.get(std::slice::from_ref(&key)).unwrap();
    assert_eq!(read.items, vec![None]);
    let created = a
        .commit(&[Expect::as_read(&key, None)], &[put(&key, "g1")])
        .unwrap()
        .expect("creating an absent key");
    assert!(created > read.revision, "a write makes a new revision");
    let again = b
        .commit(&[Expect::as_read(&key, None)], &[put(&key, "other")])
        .unwrap();
    assert_eq!(again, None, "the key exists now: a second create fails");
    let seen = b.get(std::slice::from_ref(&key)).unwrap();
    let held = seen.items[0]
        .clone()
        .expect("the key, seen from the other site");
    assert_eq!(
        (held.value.as_slice(), held.mod_revision),
        (&b"g1"[..], created)
    );

    // Both sites read the same version and both try to move it on: exactly one wins.
    let expect = [Expect::as_read(&key, Some(&held))];
    let first = a.commit(&expect, &[put(&key, "g2 by a")]).unwrap();
    let second = b.commit(&expect, &[put(&key, "g2 by b")]).unwrap();
    assert!(first.is_some() && second.is_none(), "{first:?} {second:?}");
    let now = b.get(std::slice::from_ref(&key)).unwrap().items[0].clone();
    assert_eq!(now.map(|v| v.value), Some(b"g2 by a".to_vec()));

    // Several keys at once, at one revision; a delete that relies on a stale read fails.
    let keys: Vec<String> = (0..5).map(|i| format!("/lbs/test/event/{i:04}")).collect();
    let ops: Vec<Op> = keys.iter().map(|k| put(k, "e")).collect();
    let expects: Vec<Expect> = keys.iter().map(|k| Expect::as_read(k, None)).collect();
    let written = a.commit(&expects, &ops).unwrap().expect("five new keys");
    let read = b.get(&keys).unwrap();
    assert!(
        read.items
            .iter()
            .all(|v| v.as_ref().map(|v| v.mod_revision) == Some(written))
    );
    let stale = Expect {
        key: key.clone(),
        mod_revision: Some(created),
    };
    let deleted = b
        .commit(&[stale], &[Op::Delete { key: key.clone() }])
        .unwrap();
    assert_eq!(
        deleted, None,
        "a delete relying on an old version changes nothing"
    );

    // Ranges: a prefix in key order, resumed after a key, limited.
    let all = a.range("/lbs/test/event/", None, 100).unwrap().items;
    let names: Vec<&str> = all.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, keys.iter().map(String::as_str).collect::<Vec<_>>());
    let page = a
        .range("/lbs/test/event/", Some(&keys[1]), 2)
        .unwrap()
        .items;
    let page: Vec<&str> = page.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(page, vec![keys[2].as_str(), keys[3].as_str()]);
    assert!(
        a.range("/lbs/test/none/", None, 10)
            .unwrap()
            .items
            .is_empty()
    );

    // What etcd refuses is refused by both, before anything is written.
    let many: Vec<Op> = (0..=MAX_TXN_OPS)
        .map(|i| put(&format!("/lbs/test/m/{i}"), "x"))
        .collect();
    assert!(matches!(a.commit(&[], &many), Err(KvError::Refused { .. })));
    let twice = [put("/lbs/test/twice", "1"), put("/lbs/test/twice", "2")];
    assert!(matches!(
        a.commit(&[], &twice),
        Err(KvError::Refused { .. })
    ));
    assert!(a.range("/lbs/test/m/", None, 10).unwrap().items.is_empty());
}

/// Leases: a leased key lives while its lease is renewed and goes with it.
fn leases(a: &dyn Kv, b: &dyn Kv) {
    let ttl = Duration::from_secs(1);
    let (kept, lapsed, ended) = (
        a.grant(ttl).unwrap(),
        a.grant(ttl).unwrap(),
        a.grant(ttl).unwrap(),
    );
    let leased = |key: &str, lease| Op::PutLeased {
        key: key.into(),
        value: b"x".to_vec(),
        lease,
    };
    let keys: Vec<String> = ["kept", "lapsed", "ended"]
        .iter()
        .map(|k| format!("/lbs/test/lease/{k}"))
        .collect();
    let ops = [
        leased(&keys[0], kept),
        leased(&keys[1], lapsed),
        leased(&keys[2], ended),
    ];
    assert!(a.commit(&[], &ops).unwrap().is_some());
    b.revoke(ended).unwrap();
    assert_eq!(
        b.get(&keys)
            .unwrap()
            .items
            .iter()
            .filter(|v| v.is_some())
            .count(),
        2
    );
    // `kept` renewed from the other site, `lapsed` left to run out.
    let started = Instant::now();
    let gone = loop {
        assert!(b.renew(kept).unwrap(), "a renewed lease is alive");
        let read = b.get(&keys).unwrap().items;
        if read[1].is_none() {
            break read;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the lapsed lease never ended"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(gone[0].is_some() && gone[2].is_none(), "{gone:?}");
    assert!(
        !a.renew(lapsed).unwrap(),
        "an ended lease cannot be renewed"
    );
    // A put with an ended lease is refused whole, saying so.
    let err = a
        .commit(
            &[],
            &[
                put("/lbs/test/lease/plain", "y"),
                leased("/lbs/test/lease/late", lapsed),
            ],
        )
        .unwrap_err();
    assert!(matches!(err, KvError::LeaseEnded { .. }), "{err}");
    assert_eq!(
        a.get(&["/lbs/test/lease/plain".into()]).unwrap().items,
        vec![None]
    );
    a.revoke(kept).unwrap();
    a.revoke(kept).unwrap();
}

/// The role one site holds at a time: taken, kept while stepped, taken over when its holder
/// stops, handed over at once on resignation.
fn leadership(a: &dyn Kv, b: &dyn Kv) {
    let key = "/lbs/test/leader/dns";
    let ttl = Duration::from_secs(1);
    let (mut one, mut two) = (
        Candidate::new(key, "dc1", ttl),
        Candidate::new(key, "dc2", ttl),
    );
    assert_eq!(one.step(a).unwrap(), Holder::Me);
    assert_eq!(two.step(b).unwrap(), Holder::Other("dc1".into()));
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(one.step(a).unwrap(), Holder::Me, "kept while it steps");
        assert_eq!(two.step(b).unwrap(), Holder::Other("dc1".into()));
    }
    // dc1 stops stepping (frozen, dead): dc2 takes the role once dc1's lease runs out.
    let stopped = Instant::now();
    while two.step(b).unwrap() != Holder::Me {
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "no take-over within 10 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("take-over {:?} after the holder stopped", stopped.elapsed());
    assert_eq!(
        one.step(a).unwrap(),
        Holder::Other("dc2".into()),
        "the old holder yields"
    );
    // A resignation hands over at once.
    two.resign(b).unwrap();
    assert_eq!(one.step(a).unwrap(), Holder::Me);
    one.resign(a).unwrap();
}

#[test]
fn the_in_memory_fake_keeps_the_contract() {
    let a = MemKv::default();
    let b = a.site();
    contract(&a, &b);
    leases(&a, &b);
    leadership(&a, &b);
    b.cut_off(true);
    let err = b.get(&["/lbs/test/pair/acme".into()]).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("authority unreachable from this site"),
        "{err}"
    );
    assert!(
        a.get(&["/lbs/test/pair/acme".into()]).is_ok(),
        "the other site still reads"
    );
}

#[test]
fn etcd_keeps_the_contract() {
    let etcd = Etcd::start(1);
    let (a, b) = (etcd_kv(etcd.endpoints()), etcd_kv(etcd.endpoints()));
    contract(&a, &b);
    leases(&a, &b);
    leadership(&a, &b);
}

#[test]
fn a_cluster_of_three_answers_without_one_member_and_refuses_without_a_majority() {
    let mut etcd = Etcd::start(3);
    // Two sites, each on its own member: a race through two members has one winner.
    let (a, b) = (
        etcd_kv(vec![etcd.endpoint(0)]),
        etcd_kv(vec![etcd.endpoint(1)]),
    );
    contract(&a, &b);
    let key = "/lbs/test/pair/acme".to_string();
    for round in 0..20 {
        let read = a.get(std::slice::from_ref(&key)).unwrap().items[0].clone();
        let expect = [Expect::as_read(&key, read.as_ref())];
        let value = |site: &str| put(&key, &format!("round {round} by {site}"));
        let (won_a, won_b) = std::thread::scope(|s| {
            let by_b = s.spawn(|| b.commit(&expect, &[value("b")]).unwrap());
            let by_a = a.commit(&expect, &[value("a")]).unwrap();
            (by_a.is_some(), by_b.join().unwrap().is_some())
        });
        assert!(won_a ^ won_b, "round {round}: a won {won_a}, b won {won_b}");
    }

    // One member lost (perhaps the leader: then the others elect one, and a request in
    // between is refused as unreachable): the other two go on deciding.
    etcd.kill(2);
    let c = etcd_kv(vec![etcd.endpoint(1)]);
    let started = Instant::now();
    let mut refused = 0;
    while c.commit(&[], &[put("/lbs/test/without-2", "ok")]).is_err() {
        refused += 1;
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "two members of three did not decide within 10 s"
        );
    }
    println!(
        "without one member: written after {refused} refusal(s), {:?}",
        started.elapsed()
    );

    // A second one frozen: no majority. The site on the last member hears so within its
    // deadline. Its write was sent: it is unconfirmed, not refused (the member may hold it in
    // its log and commit it once the majority is back), and reads are refused outright.
    etcd.freeze(0);
    let started = Instant::now();
    let late = "/lbs/test/without-majority".to_string();
    let err = c.commit(&[], &[put(&late, "maybe")]).unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, KvError::Unconfirmed { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with("authority unreachable from this site"),
        "{err}"
    );
    assert!(took < Duration::from_secs(5), "answered after {took:?}");
    let started = Instant::now();
    let err = c.get(std::slice::from_ref(&key)).unwrap_err();
    assert!(matches!(err, KvError::Unreachable { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // The majority back: the unconfirmed write landed whole or not at all, and new ones go
    // through.
    etcd.thaw(0);
    etcd.restart(2);
    let deadline = Instant::now() + Duration::from_secs(20);
    let read = loop {
        match c.get(std::slice::from_ref(&late)) {
            Ok(read) => break read,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(err) => panic!("the cluster did not come back within 20 s: {err}"),
        }
    };
    let landed = read.items[0].as_ref().map(|v| v.value.clone());
    assert!(
        matches!(landed.as_deref(), None | Some(b"maybe")),
        "{landed:?}"
    );
    println!(
        "the unconfirmed write {}",
        if landed.is_some() {
            "landed"
        } else {
            "did not land"
        }
    );
    assert!(
        c.commit(&[], &[put("/lbs/test/after", "ok")])
            .unwrap()
            .is_some()
    );
}

#[test]
fn a_site_whose_etcd_is_gone_says_so_in_time() {
    let mut etcd = Etcd::start(1);
    let kv = etcd_kv(etcd.endpoints());
    assert!(kv.get(&["/lbs/x".into()]).is_ok());
    etcd.kill(0);
    let started = Instant::now();
    let err = kv.get(&["/lbs/x".into()]).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(
        err.to_string().contains(&etcd.endpoint(0)),
        "names the endpoint: {err}"
    );
    // Nothing listening at all from the start: the same, also in time.
    let nowhere = etcd_kv(vec![format!(
        "http://127.0.0.1:{}",
        lbs_tests::bind::free_port()
    )]);
    let started = Instant::now();
    assert!(matches!(
        nowhere.get(&["/lbs/x".into()]),
        Err(KvError::Unreachable { .. })
    ));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn the_role_moves_to_another_site_when_its_holder_is_cut_off_from_the_majority() {
    let etcd = Etcd::start(3);
    let (a, b) = (
        etcd_kv(vec![etcd.endpoint(0)]),
        etcd_kv(vec![etcd.endpoint(1)]),
    );
    let key = "/lbs/test/leader/dns";
    let ttl = Duration::from_secs(2);
    let (mut one, mut two) = (
        Candidate::new(key, "dc1", ttl),
        Candidate::new(key, "dc2", ttl),
    );
    assert_eq!(one.step(&a).unwrap(), Holder::Me);
    assert_eq!(two.step(&b).unwrap(), Holder::Other("dc1".into()));
    // dc1's member frozen: dc1 cannot step (it stops acting within its deadline), dc2 takes
    // the role when dc1's lease runs out.
    etcd.freeze(0);
    let cut = Instant::now();
    assert!(one.step(&a).is_err(), "a holder cut off cannot renew");
    assert!(
        cut.elapsed() < Duration::from_secs(5),
        "{:?}",
        cut.elapsed()
    );
    while two.step(&b).unwrap_or(Holder::Nobody) != Holder::Me {
        assert!(
            cut.elapsed() < Duration::from_secs(15),
            "no take-over within 15 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "dc2 holds the role {:?} after dc1's member froze",
        cut.elapsed()
    );
    // dc1 back. Both step on; the cluster may change leader meanwhile, and a lease can end
    // under it, so who holds the role may change: but never are both acting at once, and once
    // the cluster is settled exactly one holds it and the other sees which.
    etcd.thaw(0);
    let back = Instant::now();
    let mut dc1_answered = false;
    while back.elapsed() < Duration::from_secs(6) || !dc1_answered {
        let b_step = two.step(&b);
        let a_step = one.step(&a);
        dc1_answered |= a_step.is_ok();
        let now = Instant::now();
        assert!(
            !(one.holds(now) && two.holds(now)),
            "both sites acting at once: {a_step:?} {b_step:?}"
        );
        assert!(
            back.elapsed() < Duration::from_secs(20),
            "dc1 never reached the store again"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (a_step, b_step) = (one.step(&a).unwrap(), two.step(&b).unwrap());
    match (&a_step, &b_step) {
        (Holder::Me, Holder::Other(name)) => assert_eq!(name, "dc1"),
        (Holder::Other(name), Holder::Me) => assert_eq!(name, "dc2"),
        other => panic!("not settled on one holder: {other:?}"),
    }
    println!("settled after dc1 came back: dc1 {a_step:?}, dc2 {b_step:?}");
}

#[test]
fn over_mutual_tls_the_contract_holds_and_a_stranger_is_refused() {
    let etcd = Etcd::start_tls(1);
    let files = etcd.tls().unwrap().clone();
    let with = |cert: &std::path::Path, key: &std::path::Path| {
        EtcdKv::open(EtcdSettings {
            endpoints: etcd.endpoints(),
            timeout: Duration::from_secs(2),
            tls: Some(EtcdTls {
                ca: files.ca.clone(),
                cert: cert.to_owned(),
                key: key.to_owned(),
            }),
        })
    };
    let (a, b) = (
        with(&files.client_cert, &files.client_key).unwrap(),
        with(&files.client_cert, &files.client_key).unwrap(),
    );
    contract(&a, &b);
    // A client certificate from another CA: refused by the members, within the deadline.
    let stranger = with(&files.stranger_cert, &files.stranger_key).unwrap();
    let started = Instant::now();
    let err = stranger.get(&["/lbs/test/pair/acme".into()]).unwrap_err();
    assert!(matches!(err, KvError::Unreachable { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // No TLS at all against members that require it: the same.
    let plain = etcd_kv(etcd.endpoints());
    assert!(plain.get(&["/lbs/test/pair/acme".into()]).is_err());
    // A file that is not there is said when the store opens, with its path.
    let missing = files.ca.with_file_name("missing.key");
    let err = with(&files.client_cert, &missing).unwrap_err();
    assert!(err.to_string().contains("missing.key"), "{err}");
}
