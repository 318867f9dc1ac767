//! Issue 27's portal in a real browser: Debian's headless Chromium driven through
//! chromedriver (WebDriver, `fantoccini`). An operator logs in, finds the fenced primary first
//! on the fleet page, opens the pair, presses promote (the backup carries it out) and sees the
//! new generation; the Status / Resources charts draw the samples across the failover.
//! Screenshots of each page go to `target/portal-screenshots/`. chromium and chromium-driver
//! are installed by `cargo xtask test`.
#![allow(clippy::unwrap_used)]

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{ClientBuilder, Locator};
use lbs_protocol::control::ResourceSample;
use lbs_protocol::{Generation, Message, Role};
use lbs_tests::fleet::server::{Server, free_port};
use lbs_tests::fleet::{self, ReportSession};
use lbs_tests::workspace_binary;

/// chromedriver on a loopback port in a process group of its own, which is killed (chromium
/// with it, whatever state the test left it in) and reaped on drop.
struct Driver(Child, u16);

impl Driver {
    fn start() -> Driver {
        let port = free_port().unwrap();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; cargo xtask test installs it)");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "chromedriver did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Driver(child, port)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

fn screenshots() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> → target/portal-screenshots
    let target = exe.ancestors().nth(3).unwrap().to_owned();
    let dir = target.join("portal-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

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
    let shots = screenshots();
    let driver = Driver::start();
    let base = format!("https://127.0.0.1:{port}");
    runtime.block_on(async {
        // fantoccini's client (to chromedriver) uses rustls: ring, as everywhere in lbs.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut capabilities = serde_json::Map::new();
        // The portal's certificate comes from the test's own CA, which this throwaway
        // profile does not hold.
        capabilities.insert("acceptInsecureCerts".into(), serde_json::json!(true));
        capabilities.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--window-size=1280,1000"]
            }),
        );
        let browser = ClientBuilder::rustls()
            .unwrap()
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{}", driver.1))
            .await
            .unwrap();
        let shot = |name: &'static str| {
            let browser = browser.clone();
            let path = shots.join(name);
            async move {
                std::fs::write(&path, browser.screenshot().await.unwrap()).unwrap();
                println!("screenshot: {}", path.display());
            }
        };
        // Log in.
        browser.goto(&format!("{base}/")).await.unwrap();
        assert!(
            browser
                .current_url()
                .await
                .unwrap()
                .path()
                .ends_with("/login")
        );
        shot("login.png").await;
        browser
            .find(Locator::Css("input[name=name]"))
            .await
            .unwrap()
            .send_keys("olga")
            .await
            .unwrap();
        browser
            .find(Locator::Css("input[name=password]"))
            .await
            .unwrap()
            .send_keys("olga's long password")
            .await
            .unwrap();
        browser
            .find(Locator::Css("form button"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        // The fleet: the fenced primary's pair first among the problems.
        let problems = browser
            .wait()
            .at_most(Duration::from_secs(15))
            .for_element(Locator::Css("tr.problem"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
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
            .goto(&format!("{base}/pair/bench-00000"))
            .await
            .unwrap();
        shot("pair.png").await;
        browser
            .find(Locator::Css(
                "form[action$='/promote'] input[type=checkbox]",
            ))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        browser
            .find(Locator::Css("form[action$='/promote'] button"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        let said = browser
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
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let text = browser
                .find(Locator::Css("main"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            if text.contains("done") && text.contains("generation 3") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the page never showed the promotion: {text}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        shot("promoted.png").await;

        // Status / Resources of a box, and the pair's continuous view.
        browser
            .goto(&format!("{base}/box/{}", primary.sid))
            .await
            .unwrap();
        let paths = browser
            .find_all(Locator::Css("svg path.series"))
            .await
            .unwrap();
        assert_eq!(paths.len(), 5, "five charts with data");
        assert!(
            !browser
                .find_all(Locator::Css("svg rect.band"))
                .await
                .unwrap()
                .is_empty()
        );
        shot("box-resources.png").await;
        browser
            .goto(&format!("{base}/pair/bench-00000/resources"))
            .await
            .unwrap();
        let drawn = browser
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
            .goto(&format!("{base}/events?pair=bench-00000"))
            .await
            .unwrap();
        let log = browser
            .find(Locator::Css("main"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(log.contains("olga (portal)"), "{log}");
        shot("events.png").await;
        browser.close().await.unwrap();
    });
    drop(driver);
    dc.stop().unwrap();
}
