//! Issue 27's portal in a real browser: Debian's headless Chromium driven through
//! chromedriver (WebDriver, `fantoccini`). An operator logs in, finds the fenced primary first
//! on the fleet page, opens the pair, presses promote (the backup carries it out) and sees the
//! new generation; the Status / Resources charts draw the samples across the failover.
//! Screenshots of each page go to `target/portal-screenshots/`. chromium and chromium-driver
//! are installed by `cargo xtask test`.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use fantoccini::Locator;
use lbs_protocol::control::ResourceSample;
use lbs_protocol::{Generation, Message, Role};
use lbs_tests::browser::Browser;
use lbs_tests::fleet::server::{Server, free_port};
use lbs_tests::fleet::{self, ReportSession};
use lbs_tests::workspace_binary;

#[test]
fn an_operator_logs_in_finds_the_fenced_primary_promotes_and_sees_the_charts() {
    let port = free_port().unwrap();
    let binary = workspace_binary("lbs-datacenter");
    let config = format!(
        "[portal]\nlisten = [\"127.0.0.1:{port}\"]\nnames = [\"127.0.0.1\", \"localhost\"]\n"
    );
    let (mut dc, pairs) = Server::prepare(&binary, 2, "browser.example", &config).unwrap();
    dc.cli_with_input(
        &[
            "user",
            "add",
            "olga",
            "--role",
            "operator",
            "--password-stdin",
        ],
        "olga's long password\n",
    )
    .unwrap();
    dc.start().unwrap();
    let root = dc.root().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let started = lbs_tests::office::now_ms();
    let (primary, backup) = runtime.block_on(async {
        let a = fleet::activate(dc.activation, &root, 0, 0, &pairs[0][0])
            .await
            .unwrap();
        let b = fleet::activate(dc.activation, &root, 0, 1, &pairs[0][1])
            .await
            .unwrap();
        // The first box is primary a while (samples fall in its time), then dies: P on the
        // backup; the old primary comes back fenced, then B.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let promoted = fleet::promote_once(&b, dc.control, &root, Generation(1))
            .await
            .unwrap();
        assert!(matches!(promoted, Message::Promoted(_)), "{promoted:?}");
        (a, b)
    });
    let base = format!("https://127.0.0.1:{port}");
    runtime.block_on(async {
        let browser = Browser::open().await.unwrap();
        let shot = |name: &'static str| {
            let browser = &browser;
            async move {
                browser.shot(name).await.unwrap();
            }
        };
        // Log in.
        browser.client.goto(&format!("{base}/")).await.unwrap();
        assert!(
            browser
                .client
                .current_url()
                .await
                .unwrap()
                .path()
                .ends_with("/login")
        );
        shot("login.png").await;
        browser
            .log_in(&base, "olga", "olga's long password")
            .await
            .unwrap();
        // The fleet: the fenced primary's pair first among the problems.
        let problems = browser.first_problem().await.unwrap();
        assert!(problems.contains("bench-00000"), "{problems}");
        assert!(
            problems.contains("fenced") || problems.contains("silent"),
            "{problems}"
        );
        shot("fleet.png").await;

        // Both boxes' samples since activation, 10 ms apart or more.
        let now = lbs_tests::office::now_ms();
        let step = ((now - started) / 300).max(10);
        for (b, role, generation) in [(&primary, Role::Fenced, 2), (&backup, Role::Primary, 2)] {
            let samples: Vec<ResourceSample> = (0..=(now - started) / step)
                .map(|i| ResourceSample {
                    at_ms: started + i * step,
                    cpu_permille: Some(200 + (i % 300) as u16),
                    memory_used: 3 << 30,
                    memory_total: 8 << 30,
                    disk_used: 40,
                    disk_total: 100,
                    rx_per_s: Some(5000 + i * 10),
                    tx_per_s: Some(2000),
                })
                .collect();
            let mut session =
                ReportSession::open(b, dc.control, &root, Generation(generation), role)
                    .await
                    .unwrap();
            let kept = session
                .call(Message::ResourceSamples { samples })
                .await
                .unwrap();
            assert!(
                matches!(kept, Message::ResourceSamplesKept { .. }),
                "{kept:?}"
            );
            if role == Role::Fenced {
                // B on the repaired old primary: the backup again.
                let answer = session.call(Message::RegisterBackup).await.unwrap();
                assert!(matches!(answer, Message::PairState(_)), "{answer:?}");
            }
        }

        // The pair page; promote (the old primary, now the backup, carries it out).
        browser
            .client
            .goto(&format!("{base}/pair/bench-00000"))
            .await
            .unwrap();
        shot("pair.png").await;
        browser.press_promote().await.unwrap();
        let said = browser
            .client
            .wait()
            .at_most(Duration::from_secs(15))
            .for_element(Locator::Css("main p.ok"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(said.contains("waiting for the backup"), "{said}");
        shot("promotion-pending.png").await;
        let mut session =
            ReportSession::open(&primary, dc.control, &root, Generation(2), Role::Backup)
                .await
                .unwrap();
        let asked = session.report().await.unwrap();
        assert!(
            matches!(asked, Message::PromotionRequested { .. }),
            "{asked:?}"
        );
        let promoted = fleet::promote_once(&primary, dc.control, &root, Generation(2))
            .await
            .unwrap();
        assert!(matches!(promoted, Message::Promoted(_)), "{promoted:?}");
        // The page refreshes itself (no script: a meta refresh) until the answer is there.
        browser
            .wait_for_text(&["done", "generation 3"], Duration::from_secs(15))
            .await
            .unwrap();
        shot("promoted.png").await;

        // Status / Resources of a box, and the pair's continuous view.
        browser
            .client
            .goto(&format!("{base}/box/{}", primary.sid))
            .await
            .unwrap();
        let paths = browser
            .client
            .find_all(Locator::Css("svg path.series"))
            .await
            .unwrap();
        assert_eq!(paths.len(), 5, "five charts with data");
        assert!(
            !browser
                .client
                .find_all(Locator::Css("svg rect.band"))
                .await
                .unwrap()
                .is_empty()
        );
        shot("box-resources.png").await;
        browser
            .client
            .goto(&format!("{base}/pair/bench-00000/resources"))
            .await
            .unwrap();
        let drawn = browser
            .client
            .find_all(Locator::Css("svg path.series"))
            .await
            .unwrap();
        assert_eq!(
            drawn.len(),
            10,
            "both boxes, each while primary, in five charts"
        );
        shot("pair-resources.png").await;
        browser
            .client
            .goto(&format!("{base}/events?pair=bench-00000"))
            .await
            .unwrap();
        let log = browser
            .client
            .find(Locator::Css("main"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(log.contains("olga (portal)"), "{log}");
        shot("events.png").await;
        browser.client.close().await.unwrap();
    });
    dc.stop().unwrap();
}
