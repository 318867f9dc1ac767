//! The data center under load, as `cargo xtask bench datacenter` loads it but small enough
//! for every CI run: a real `lbs-datacenter serve` and simulated boxes with real certificates
//! (`lbs_tests::fleet`). No root needed: everything is on loopback.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use lbs_tests::fleet::SimBox;
use lbs_tests::fleet::load::{Load, Phase, activate_all, run_phase};
use lbs_tests::fleet::server::Server;
use lbs_tests::workspace_binary;
use tokio::net::{TcpSocket, TcpStream};

/// Each test's whole run.
const LIMIT: Duration = Duration::from_secs(240);

async fn started(pairs: usize) -> (Server, Vec<Arc<SimBox>>) {
    let (mut server, provisioned) = Server::prepare(
        &workspace_binary("lbs-datacenter"),
        pairs,
        "bench.example",
        "",
    )
    .unwrap();
    server.start().unwrap();
    let root = server.root().unwrap();
    let boxes = activate_all(server.activation, &root, &provisioned, 16)
        .await
        .unwrap_or_else(|err| panic!("{err:#}\nserve.log:\n{}", server.log_tail(20)));
    (server, boxes)
}

/// One measured phase, which must have had no error (shown with serve's log otherwise).
async fn without_errors(server: &Server, boxes: &[Arc<SimBox>], load: &Load) -> Phase {
    let root = server.root().unwrap();
    let phase = run_phase(server, &root, boxes, load).await.unwrap();
    let log = server.log_tail(20);
    assert_eq!(
        phase.errors, 0,
        "{:?}\nserve.log:\n{log}",
        phase.error_kinds
    );
    phase
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotions_during_a_heartbeat_storm_complete() {
    tokio::time::timeout(LIMIT, async {
        // 200 boxes reporting every 200 ms: 1,000 reports a second, what 5,000 boxes send at
        // the agent's 5 s.
        let (server, boxes) = started(100).await;
        let load = Load {
            interval: Duration::from_millis(200),
            window: Duration::from_secs(6),
            promotions_per_s: 3.0,
            ramp: 32,
        };
        let phase = without_errors(&server, &boxes, &load).await;
        // Most of the 18 fired find their pair free (a pair is busy until its old primary
        // registered as backup); each one answered is a compare-and-set that went through.
        assert!(phase.promotions >= 10, "{phase:?}");
        assert!(phase.reports_per_s > 500.0, "{phase:?}");
        assert!(phase.registrations >= 5, "{phase:?}");
    })
    .await
    .expect("the test ran past its limit");
}

/// Opens a TCP connection from `source` and holds it without a word (no TLS).
async fn silent(source: Ipv4Addr, to: SocketAddr) -> Option<TcpStream> {
    let socket = TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::from((source, 0))).ok()?;
    tokio::time::timeout(Duration::from_secs(5), socket.connect(to))
        .await
        .ok()?
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activation_flood_does_not_take_a_control_slot() {
    tokio::time::timeout(LIMIT, async {
        let (server, boxes) = started(20).await;
        // 600 silent connections on the activation port, from 60 sources (10 each: over the
        // per-source limit) and 600 in all (over the port's limit), held open.
        let mut flood = Vec::new();
        for i in 0..600u32 {
            let source = Ipv4Addr::new(127, 20, 0, 1 + (i / 10) as u8);
            if let Some(conn) = silent(source, server.activation).await {
                flood.push(conn);
            }
        }
        assert!(
            flood.len() >= 256,
            "only {} connections were accepted",
            flood.len()
        );
        // Every box still gets its control connection and reports.
        let load = Load {
            interval: Duration::from_millis(500),
            window: Duration::from_secs(2),
            promotions_per_s: 1.0,
            ramp: 8,
        };
        let phase = without_errors(&server, &boxes, &load).await;
        assert_eq!(phase.boxes, 40);
        assert!(phase.reports_per_s > 40.0, "{phase:?}");
        drop(flood);
    })
    .await
    .expect("the test ran past its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_a_thousand_boxes_come_back_spread_out_within_the_backoff_cap() {
    use lbs_protocol::control::RECONNECT_CAP;
    use lbs_tests::fleet::load::Running;
    tokio::time::timeout(LIMIT, async {
        let (mut server, boxes) = started(500).await;
        let root = server.root().unwrap();
        let load = Load {
            interval: Duration::from_secs(1),
            window: Duration::ZERO,
            promotions_per_s: 0.0,
            // Attempts are not queued here: each box connects when its wait says.
            ramp: 1000,
        };
        let running = Running::start(server.control, &root, &boxes, &load)
            .await
            .unwrap();
        // The data center stops (SIGTERM) and is back 3 s later.
        server.stop().unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        server.start().unwrap();
        let restarted = std::time::Instant::now();
        // Every box is back within the cap (plus the handshakes of a debug build).
        let back = running
            .connected(RECONNECT_CAP + Duration::from_secs(15))
            .await
            .unwrap_or_else(|err| panic!("{err:#}\nserve.log:\n{}", server.log_tail(20)));
        assert!(back <= RECONNECT_CAP + Duration::from_secs(15), "{back:?}");
        assert_eq!(
            running
                .stats
                .reconnects
                .load(std::sync::atomic::Ordering::Relaxed),
            1000,
            "every box lost its connection once and came back once"
        );
        // Each box's first attempt after the restart: spread over seconds, not one instant.
        let attempts = running.stats.attempts.lock().unwrap().clone();
        let mut first = std::collections::BTreeMap::new();
        for (index, at) in attempts {
            if at >= restarted {
                first.entry(index).or_insert(at);
            }
        }
        let mut offsets: Vec<f64> = first
            .values()
            .map(|at| (*at - restarted).as_secs_f64())
            .collect();
        offsets.sort_by(f64::total_cmp);
        assert!(
            offsets.len() >= 900,
            "{} boxes tried after the restart",
            offsets.len()
        );
        let (p10, p90) = (offsets[offsets.len() / 10], offsets[offsets.len() * 9 / 10]);
        assert!(
            p90 - p10 >= 1.5,
            "reconnects in lockstep: 80 % of the boxes tried within {:.2} s",
            p90 - p10
        );
        println!(
            "first attempts after the restart: p10 {p10:.2} s, p90 {p90:.2} s; all back in {:.1} s",
            back.as_secs_f64()
        );
        running.finish().await;
    })
    .await
    .expect("the test ran past its limit");
}
