//! Issue 26's scenario (e): two sites serving from one etcd (three members on loopback),
//! simulated boxes activating and then promoting through both while each site in turn is
//! restarted: no activation and no role change is lost or made twice. A box whose site went
//! away asks the other, as the agent does; the same request twice is answered the same.
//! And `serve` on etcd over mutual TLS from `[store]`'s files, a site with a certificate the
//! members do not trust refused.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use lbs_protocol::control::Denial;
use lbs_protocol::tls::PendingIdentity;
use lbs_protocol::{Generation, Message, PeerName, Role};
use lbs_tests::etcd::Etcd;
use lbs_tests::fleet::server::Server;
use lbs_tests::fleet::{self, SimBox};
use lbs_tests::workspace_binary;

const PAIRS: usize = 40;
/// How long a box keeps trying the sites before the test gives up on it.
const PATIENCE: Duration = Duration::from_secs(30);

/// The sites' activation or control addresses, the one to try first for `pair` first.
fn order(sites: &[std::net::SocketAddr; 2], pair: usize) -> [std::net::SocketAddr; 2] {
    if pair.is_multiple_of(2) {
        *sites
    } else {
        [sites[1], sites[0]]
    }
}

#[test]
fn a_site_restarted_under_load_loses_no_activation_and_no_role_change() {
    let etcd = Etcd::start(3);
    let endpoints: Vec<String> = etcd
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect();
    let store = format!(
        "[store]\nbackend = \"etcd\"\nendpoints = [{}]\ndns_lease_s = 2\n",
        endpoints.join(", ")
    );
    let binary = workspace_binary("lbs-datacenter");
    let (mut dc1, pairs) = Server::prepare(
        &binary,
        PAIRS,
        "restart.example",
        &format!("site = \"dc1\"\n{store}"),
    )
    .unwrap();
    let mut dc2 = dc1.another_site("dc2", &store).unwrap();
    dc1.start().unwrap();
    dc2.start().unwrap();
    let root = dc1.root().unwrap();
    let activation = [dc1.activation, dc2.activation];
    let control = [dc1.control, dc2.control];
    let runtime = tokio::runtime::Runtime::new().unwrap();

    // Every box activates, 8 at a time, while dc1 restarts.
    let pairs = Arc::new(pairs);
    let activated: Vec<SimBox> = std::thread::scope(|s| {
        let restart = s.spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            dc1.stop().unwrap();
            dc1.start().unwrap();
        });
        let boxes = runtime.block_on(async {
            use futures_util::StreamExt;
            futures_util::stream::iter((0..PAIRS).flat_map(|p| [(p, 0), (p, 1)]))
                .map(|(p, position)| {
                    let (root, pairs) = (root.clone(), pairs.clone());
                    let sid = pairs[p][position].sid;
                    // Kept across attempts, as the agent keeps it.
                    let key = PendingIdentity::generate(PeerName::Box(sid))
                        .unwrap()
                        .key_pem();
                    async move {
                        let started = Instant::now();
                        let mut tries = 0;
                        loop {
                            let site = order(&activation, p + tries)[0];
                            let provisioned = &pairs[p][position];
                            match fleet::activate_keeping(
                                site,
                                &root,
                                p,
                                position,
                                provisioned,
                                &key,
                            )
                            .await
                            {
                                Ok(b) => return (b, tries),
                                Err(err) if started.elapsed() < PATIENCE => {
                                    eprintln!("activation of {p}/{position} at {site}: {err:#}");
                                    tries += 1;
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                }
                                Err(err) => panic!("{p}/{position}: {err:#}"),
                            }
                        }
                    }
                })
                .buffer_unordered(8)
                .collect::<Vec<_>>()
                .await
        });
        restart.join().unwrap();
        let retried = boxes.iter().filter(|(_, tries)| *tries > 0).count();
        println!("activations retried at the other site: {retried}");
        boxes.into_iter().map(|(b, _)| b).collect()
    });
    assert_eq!(activated.len(), 2 * PAIRS);
    let status = |site: &Server| -> serde_json::Value {
        serde_json::from_str(&site.cli(&["status", "--json"]).unwrap()).unwrap()
    };
    let pairs_seen = status(&dc2);
    for b in &activated {
        let pair = &pairs_seen.as_array().unwrap()[b.pair];
        let server = pair["servers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["sid"] == b.sid.to_string())
            .unwrap();
        assert_eq!(
            server["role"],
            b.role.to_string(),
            "{}: told {}",
            b.sid,
            b.role
        );
    }
    for (p, pair) in pairs_seen.as_array().unwrap().iter().enumerate() {
        let roles: Vec<&str> = pair["servers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["role"].as_str().unwrap())
            .collect();
        assert!(
            roles.contains(&"primary") && roles.contains(&"backup"),
            "pair {p}: {roles:?}"
        );
        assert_eq!(pair["generation"], 1, "pair {p}");
    }

    // Every pair's backup asks for its promotion while dc2 restarts.
    let backups: Vec<&SimBox> = activated
        .iter()
        .filter(|b| b.role == Role::Backup)
        .collect();
    assert_eq!(backups.len(), PAIRS);
    let answers: Vec<(usize, Generation)> = std::thread::scope(|s| {
        let restart = s.spawn(|| {
            std::thread::sleep(Duration::from_millis(200));
            dc2.stop().unwrap();
            dc2.start().unwrap();
        });
        let answers = runtime.block_on(async {
            use futures_util::StreamExt;
            futures_util::stream::iter(backups.iter().copied())
                .map(|b| {
                    let root = root.clone();
                    async move {
                        let started = Instant::now();
                        let mut tries = 0;
                        loop {
                            let site = order(&control, b.pair + 1 + tries)[0];
                            let answer = fleet::promote_once(b, site, &root, Generation(1)).await;
                            match answer {
                                Ok(Message::Promoted(promoted)) => return (b.pair, promoted.generation),
                                Ok(Message::Denied(Denial::StaleGeneration { current })) => {
                                    panic!("pair {}: told stale at {current}: a promotion was lost or made twice", b.pair)
                                }
                                other if started.elapsed() < PATIENCE => {
                                    eprintln!("promotion of pair {} at {site}: {other:?}", b.pair);
                                    tries += 1;
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                }
                                other => panic!("pair {}: {other:?}", b.pair),
                            }
                        }
                    }
                })
                .buffer_unordered(8)
                .collect::<Vec<_>>()
                .await
        });
        restart.join().unwrap();
        answers
    });
    assert!(
        answers.iter().all(|(_, g)| *g == Generation(2)),
        "{answers:?}"
    );
    let pairs_seen = status(&dc1);
    for (p, pair) in pairs_seen.as_array().unwrap().iter().enumerate() {
        assert_eq!(pair["generation"], 2, "pair {p}");
    }
    let events: Vec<serde_json::Value> =
        serde_json::from_str(&dc1.cli(&["events", "--json"]).unwrap()).unwrap();
    let count = |kind: &str| events.iter().filter(|e| e["kind"] == kind).count();
    assert_eq!(count("activated"), 2 * PAIRS, "each box activated once");
    println!(
        "answers lost and given again: {} activations",
        count("activation-repeated")
    );
    assert_eq!(count("promoted"), PAIRS, "each pair promoted once");
    drop(etcd);
}

#[test]
fn serve_on_etcd_over_mutual_tls_activates_and_promotes_and_a_stranger_is_refused() {
    let etcd = Etcd::start_tls(1);
    let files = etcd.tls().unwrap().clone();
    let store = |cert: &std::path::Path, key: &std::path::Path| {
        format!(
            "[store]\nbackend = \"etcd\"\nendpoints = [\"{}\"]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            etcd.endpoint(0),
            files.ca.display(),
            cert.display(),
            key.display()
        )
    };
    let binary = workspace_binary("lbs-datacenter");
    let (mut dc1, pairs) = Server::prepare(
        &binary,
        1,
        "tls.example",
        &format!(
            "site = \"dc1\"\n{}",
            store(&files.client_cert, &files.client_key)
        ),
    )
    .unwrap();
    dc1.start().unwrap();
    let root = dc1.root().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (primary, backup) = runtime.block_on(async {
        let a = fleet::activate(dc1.activation, &root, 0, 0, &pairs[0][0])
            .await
            .unwrap();
        let b = fleet::activate(dc1.activation, &root, 0, 1, &pairs[0][1])
            .await
            .unwrap();
        (a, b)
    });
    assert_eq!((primary.role, backup.role), (Role::Primary, Role::Backup));
    let answer = runtime
        .block_on(fleet::promote_once(
            &backup,
            dc1.control,
            &root,
            Generation(1),
        ))
        .unwrap();
    assert!(
        matches!(&answer, Message::Promoted(p) if p.generation == Generation(2)),
        "{answer:?}"
    );
    // A site whose client certificate the members do not trust reads nothing, and says why.
    let stranger = dc1
        .another_site("dc3", &store(&files.stranger_cert, &files.stranger_key))
        .unwrap();
    // Several times: a member closing the connection while the client writes once ended the
    // command by SIGPIPE, silently (the commands that print take SIGPIPE's default).
    let started = Instant::now();
    for _ in 0..5 {
        let err = stranger.cli(&["status"]).unwrap_err().to_string();
        assert!(
            err.contains("authority unreachable from this site"),
            "{err}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}
