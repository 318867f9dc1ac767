//! Issue 26: each site signs with its own CA under the root boxes pin, and a site's CA can
//! be revoked alone. Two sites on one etcd: a box activated at either is trusted at both;
//! after `site-revoke --site dc2` at dc1, within the reload interval, a box dc2 signed is
//! refused on a new connection and cut on an open one (with the reason), a box dc1 signed
//! goes on and is given the list, and dc2's serve stops saying its CA is revoked. Then the
//! root key moved away:
//! `site-init` says where to give it.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use lbs_protocol::control::Denial;
use lbs_protocol::{Generation, Message, Role};
use lbs_tests::etcd::Etcd;
use lbs_tests::fleet::server::Server;
use lbs_tests::fleet::{self, ReportSession};
use lbs_tests::workspace_binary;

/// The reload interval and some slack.
const WITHIN: Duration = Duration::from_secs(25);

fn is_state(answer: &Message) -> bool {
    matches!(
        answer,
        Message::PairState(_) | Message::PairStateWithDns { .. }
    )
}

#[test]
fn a_revoked_sites_boxes_are_refused_everywhere_and_the_other_sites_go_on() {
    let etcd = Etcd::start(1);
    let store = format!(
        "[store]\nbackend = \"etcd\"\nendpoints = [\"{}\"]\ndns_lease_s = 2\n",
        etcd.endpoint(0)
    );
    let binary = workspace_binary("lbs-datacenter");
    let (mut dc1, pairs) = Server::prepare(
        &binary,
        2,
        "revoke.example",
        &format!("site = \"dc1\"\n{store}"),
    )
    .unwrap();
    let mut dc2 = dc1.another_site("dc2", &store).unwrap();
    assert!(dc2.dir().join("site-ca.pem").exists());
    assert!(
        !dc2.dir().join("ca.key").exists(),
        "a site gets its own CA, never the root key"
    );
    dc1.start().unwrap();
    dc2.start().unwrap();
    let root = dc1.root().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        // Pair 0 activated at dc1, pair 1 at dc2; each box reports to the other site.
        let by_dc1 = fleet::activate(dc1.activation, &root, 0, 0, &pairs[0][0])
            .await
            .unwrap();
        let by_dc2 = fleet::activate(dc2.activation, &root, 1, 0, &pairs[1][0])
            .await
            .unwrap();
        assert_eq!((by_dc1.role, by_dc2.role), (Role::Primary, Role::Primary));
        let open = |b, site| ReportSession::open(b, site, &root, Generation(1), Role::Primary);
        let mut dc1_box_at_dc2 = open(&by_dc1, dc2.control).await.unwrap();
        let mut dc2_box_at_dc1 = open(&by_dc2, dc1.control).await.unwrap();
        assert!(is_state(&dc1_box_at_dc2.report().await.unwrap()));
        assert!(is_state(&dc2_box_at_dc1.report().await.unwrap()));

        let said = dc1.cli(&["site-revoke", "--site", "dc2"]).unwrap();
        assert!(said.contains("site dc2's CA is revoked"), "{said}");
        let revoked_at = Instant::now();

        // The open connection of dc2's box is cut at a report, with the reason.
        let cut = loop {
            match dc2_box_at_dc1.report().await {
                Ok(answer) if is_state(&answer) => {}
                other => break other,
            }
            assert!(
                revoked_at.elapsed() < WITHIN,
                "dc2's box still served at dc1"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        println!(
            "open connection cut {:?} after site-revoke",
            revoked_at.elapsed()
        );
        match cut {
            Ok(Message::Denied(Denial::NotAllowed(why))) => {
                assert!(why.contains("revoked"), "{why}")
            }
            other => panic!("expected a refusal naming the revocation, got {other:?}"),
        }
        // A new connection is refused in the handshake.
        let again =
            ReportSession::open(&by_dc2, dc1.control, &root, Generation(1), Role::Primary).await;
        let refused = match again {
            Err(err) => format!("{err:#}"),
            Ok(mut session) => format!("{:?}", session.report().await),
        };
        assert!(
            refused.to_lowercase().contains("revoked"),
            "a box of the revoked site got in again: {refused}"
        );
        // The box dc1 signed goes on, at dc1, and is given the list to check sites itself.
        let mut at_dc1 = open(&by_dc1, dc1.control).await.unwrap();
        assert!(is_state(&at_dc1.report().await.unwrap()));
        let dc2_ca = lbs_protocol::TrustRoot::load(&dc2.dir().join("site-ca.pem")).unwrap();
        let dc2_serial = lbs_protocol::ca::serial_of(dc2_ca.der()).unwrap();
        match at_dc1.call(Message::RevocationListRequest).await.unwrap() {
            Message::RevocationList { crl: Some(crl) } => {
                root.clone().revoking(&crl).unwrap();
                assert_eq!(
                    lbs_protocol::ca::revoked_serials(&crl).unwrap(),
                    vec![dc2_serial]
                );
            }
            other => panic!("expected the revocation list, got {other:?}"),
        }
    });
    // dc2 itself stops: its own certificate is no longer trusted.
    let deadline = Instant::now() + WITHIN;
    while dc2.running() {
        assert!(
            Instant::now() < deadline,
            "dc2 serves on with its CA revoked"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = dc2.log_tail(20);
    assert!(log.contains("revoked"), "{log}");
    // And does not start again.
    assert!(dc2.start().is_err(), "a revoked site started again");
    let again = dc1.cli(&["site-revoke", "--site", "dc2"]).unwrap_err();
    assert!(
        format!("{again:#}").contains("revoked already"),
        "{again:#}"
    );

    // The root key moved offline: site-init says so, and works given it.
    let kept = dc1.dir().join("root-offline.key");
    std::fs::rename(dc1.dir().join("ca.key"), &kept).unwrap();
    let out = tempfile::tempdir().unwrap();
    let out_dir = out.path().to_string_lossy().into_owned();
    let err = dc1
        .cli(&["site-init", "--site", "dc4", "--out", &out_dir])
        .unwrap_err()
        .to_string();
    assert!(err.contains("--root-key"), "{err}");
    let kept = kept.to_string_lossy().into_owned();
    dc1.cli(&[
        "site-init",
        "--site",
        "dc4",
        "--out",
        &out_dir,
        "--root-key",
        &kept,
    ])
    .unwrap();
    assert!(out.path().join("site-ca.key").exists());
    dc1.stop().unwrap();
    drop(etcd);
}
