//! The provider's portal in the lab's office with the real agents, looked at in Debian's
//! headless Chromium through the lab's forward to this machine (as `cargo xtask demo` shows
//! it): after the lab's failover the fleet lists the fenced old primary first; after B, the
//! pair page shows each box's sets, role steps and tunnels as their agents reported them;
//! with the primary dead, the pair page's promote is carried out by the real backup (the
//! same checks as P), the page shows generation 3 and the phone is answered again. The new
//! primary's own `/metrics` and the data center's record agree. Screenshots `lab-*.png` in
//! `target/portal-screenshots/`. Root only; skipped and counted otherwise.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lbs_tests::browser::Browser;
use lbs_tests::office::{Office, STEP, now_ms};
use lbs_tests::require_root;

const PASSWORD: &str = "olga's long password";

#[test]
fn the_portal_shows_the_lab_failover_and_its_promote_is_carried_out_by_the_real_backup() {
    if !require_root(
        "the_portal_shows_the_lab_failover_and_its_promote_is_carried_out_by_the_real_backup",
        "network namespaces, kamailio, sipp, BIND, chromium",
    ) {
        return;
    }
    let mut office = Office::start().unwrap();
    office.activate("primary", 0).unwrap();
    office.activate("backup", 1).unwrap();
    office.start_agent("primary").unwrap();
    office.start_agent("backup").unwrap();
    office.wait_in_sync("backup", "primary").unwrap();
    office.start_phone().unwrap();
    office.first_answer_after(0, STEP).unwrap();
    office
        .datacenter_with_input(
            &[
                "user",
                "add",
                "olga",
                "--role",
                "operator",
                "--password-stdin",
            ],
            &format!("{PASSWORD}\n"),
        )
        .unwrap();
    let forward = office.portal_forward().unwrap();
    let base = format!("https://127.0.0.1:{}", forward.port);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let browser = runtime.block_on(Browser::open()).unwrap();

    // The lab's failover: the primary dies, P on the backup; the old primary boots fenced.
    office.fail_over("primary", "backup").unwrap();
    office.boot("primary").unwrap();
    office
        .wait("the old primary to step back", STEP, |o| {
            Ok(o.status("primary")?["role"]["state"] == "fenced")
        })
        .unwrap();
    runtime.block_on(async {
        browser.log_in(&base, "olga", PASSWORD).await.unwrap();
        let first = browser.first_problem().await.unwrap();
        assert!(
            first.contains("acme") && first.contains("fenced"),
            "the fenced primary first: {first}"
        );
        browser.shot("lab-fleet.png").await.unwrap();
    });

    // B on the old primary; in sync. Its agent's report says so, set by set, with the
    // steps B took.
    office.demote("primary").unwrap();
    office.wait_in_sync("primary", "backup").unwrap();
    runtime.block_on(async {
        browser
            .client
            .goto(&format!("{base}/pair/acme"))
            .await
            .unwrap();
        let text = browser
            .wait_for_text(
                &["register-backup", "recordings", "in sync"],
                Duration::from_secs(15),
            )
            .await
            .unwrap();
        assert!(text.contains("take-address"), "P's steps: {text}");
        browser.shot("lab-pair.png").await.unwrap();
    });

    // The primary of the moment dies; the provider's P in the portal: the old primary, now
    // the backup, checks as P does and takes over.
    office.power_off("backup").unwrap();
    office.wait_primary_gone("primary").unwrap();
    let pressed = now_ms();
    runtime.block_on(async {
        browser
            .client
            .goto(&format!("{base}/pair/acme"))
            .await
            .unwrap();
        browser.press_promote().await.unwrap();
        browser
            .wait_for_text(&["done", "generation 3"], Duration::from_secs(30))
            .await
            .unwrap();
        browser.shot("lab-promoted.png").await.unwrap();
    });
    let answered = office.first_answer_after(pressed, STEP).unwrap();
    eprintln!(
        "portal promote pressed → the phone answered by the new primary: {:.2} s",
        answered.saturating_sub(pressed) as f64 / 1000.0
    );
    assert_eq!(
        office.status("primary").unwrap()["role"]["state"],
        "primary"
    );
    // The box's own status says the steps it took, as the portal does.
    let said = office.lbs("primary", &["status"]).unwrap();
    let said = String::from_utf8_lossy(&said.stdout);
    assert!(
        said.contains("last steps: ")
            && said.contains("take-address")
            && said.contains("start-pbx"),
        "{said}"
    );

    // The new primary's own /metrics, and the data center's record of its report.
    let metrics = office.box_metrics("primary").unwrap();
    assert!(metrics.contains("role=\"primary\""), "{metrics}");
    assert!(
        metrics.contains("lbs_pair_generation{pair=\"acme\"} 3"),
        "{metrics}"
    );
    let sid = office.sids[0].0.to_string();
    office
        .wait(
            "the data center to hold the new primary's steps",
            STEP,
            |o| {
                let pairs: serde_json::Value =
                    serde_json::from_str(&o.datacenter(&["status", "--json"])?)?;
                let steps = pairs[0]["servers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|s| s["sid"] == sid.as_str())
                    .map(|s| s["report"]["details"]["steps"].clone())
                    .unwrap_or_default();
                Ok(steps.as_array().is_some_and(|steps| {
                    steps.iter().any(|s| s["step"] == "start-pbx")
                        && steps.last().is_some_and(|s| s["step"] == "start-pbx")
                }))
            },
        )
        .unwrap();
    runtime.block_on(async { browser.client.clone().close().await.unwrap() });
    drop(browser);
    drop(forward);
}
