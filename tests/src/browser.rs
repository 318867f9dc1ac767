//! Debian's headless Chromium driven through chromedriver (WebDriver, `fantoccini`), for the
//! portal's browser tests. chromium and chromium-driver are installed by `cargo xtask test`.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fantoccini::{Client, ClientBuilder, Locator};

/// chromedriver on a loopback port in a process group of its own, which is killed (chromium
/// with it, whatever state the test left it in) and reaped on drop.
#[derive(Debug)]
struct Driver(Child, u16);

impl Driver {
    fn start() -> anyhow::Result<Driver> {
        let port = crate::fleet::server::free_port()?;
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("chromedriver (Debian's chromium-driver; cargo xtask test installs it)")?;
        let driver = Driver(child, port);
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if started.elapsed() > Duration::from_secs(20) {
                bail!("chromedriver did not listen within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(driver)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

/// A headless Chromium (1280×1000, accepting the test CA's certificates) and where its
/// screenshots go.
#[derive(Debug)]
pub struct Browser {
    pub client: Client,
    shots: PathBuf,
    _driver: Driver,
}

impl Browser {
    /// Starts chromedriver and a browser session; screenshots go to
    /// `target/portal-screenshots/`.
    pub async fn open() -> anyhow::Result<Browser> {
        let driver = Driver::start()?;
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
        let client = ClientBuilder::rustls()?
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{}", driver.1))
            .await
            .context("a session of chromedriver")?;
        let exe = std::env::current_exe()?;
        // target/<profile>/deps/<test> → target/portal-screenshots
        let shots = exe
            .ancestors()
            .nth(3)
            .context("the test's target directory")?
            .join("portal-screenshots");
        std::fs::create_dir_all(&shots)?;
        Ok(Browser {
            client,
            shots,
            _driver: driver,
        })
    }

    /// Writes a screenshot of the page as `name` and says where.
    pub async fn shot(&self, name: &str) -> anyhow::Result<PathBuf> {
        let path = self.shots.join(name);
        std::fs::write(&path, self.client.screenshot().await?)?;
        println!("screenshot: {}", path.display());
        Ok(path)
    }

    /// Logs in at `base` as `name`; the page it lands on.
    pub async fn log_in(&self, base: &str, name: &str, password: &str) -> anyhow::Result<()> {
        self.client.goto(&format!("{base}/login")).await?;
        self.client
            .find(Locator::Css("input[name=name]"))
            .await?
            .send_keys(name)
            .await?;
        self.client
            .find(Locator::Css("input[name=password]"))
            .await?
            .send_keys(password)
            .await?;
        self.client
            .find(Locator::Css("form button"))
            .await?
            .click()
            .await?;
        Ok(())
    }

    /// The text of `main` once it holds every one of `wanted`, reloading the page until it
    /// does or `within` has passed.
    pub async fn wait_for_text(&self, wanted: &[&str], within: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + within;
        loop {
            // A page reloading (ours, or its own meta refresh) between finding `main` and
            // reading it leaves a stale element: read again.
            let text = match self.client.find(Locator::Css("main")).await {
                Ok(main) => main.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            if wanted.iter().all(|w| text.contains(w)) {
                return Ok(text);
            }
            if Instant::now() > deadline {
                bail!("the page did not show {wanted:?} within {within:?}: {text}");
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            // A reload that fails (the page navigating by itself) is tried again next time.
            let _ = self.client.refresh().await;
        }
    }

    /// The fleet page's first row among the pairs that need a person (waits up to 15 s for
    /// it to show).
    pub async fn first_problem(&self) -> anyhow::Result<String> {
        Ok(self
            .client
            .wait()
            .at_most(Duration::from_secs(15))
            .for_element(Locator::Css("tr.problem"))
            .await?
            .text()
            .await?)
    }

    /// Ticks the confirmation and presses the pair page's promote button.
    pub async fn press_promote(&self) -> anyhow::Result<()> {
        self.client
            .find(Locator::Css(
                "form[action$='/promote'] input[type=checkbox]",
            ))
            .await?
            .click()
            .await?;
        self.client
            .find(Locator::Css("form[action$='/promote'] button"))
            .await?
            .click()
            .await?;
        Ok(())
    }
}
