//! A terminal for tests of the console: a private tmux server (its own socket in the test's
//! directory, so no other tmux is touched) with sessions of a fixed size, keys sent as an
//! operator types them, and the screen read back. Dropping it kills its server and
//! everything running in it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A private tmux server.
#[derive(Debug)]
pub struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    /// A server whose socket lives in `dir`; nothing runs until [`Tmux::open`].
    pub fn new(dir: &Path) -> Tmux {
        Tmux {
            socket: dir.join("tmux.sock"),
        }
    }

    fn tmux(&self, args: &[&str]) -> anyhow::Result<Output> {
        let out = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .context("running tmux (apt-get install tmux)")?;
        if !out.status.success() {
            bail!(
                "tmux {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }

    /// A session `name` of `width`×`height` running `command` (a shell command line).
    pub fn open(&self, name: &str, width: u16, height: u16, command: &str) -> anyhow::Result<()> {
        self.tmux(&[
            "new-session",
            "-d",
            "-s",
            name,
            "-x",
            &width.to_string(),
            "-y",
            &height.to_string(),
            command,
        ])?;
        Ok(())
    }

    /// Types `text` and Enter in session `name`.
    pub fn type_line(&self, name: &str, text: &str) -> anyhow::Result<()> {
        if !text.is_empty() {
            self.tmux(&["send-keys", "-t", name, "-l", text])?;
        }
        self.tmux(&["send-keys", "-t", name, "Enter"])?;
        Ok(())
    }

    /// The screen of session `name`, one string per row, wrapped rows joined (so a line
    /// longer than the screen shows as longer).
    pub fn screen(&self, name: &str) -> anyhow::Result<Vec<String>> {
        let out = self.tmux(&["capture-pane", "-p", "-J", "-t", name])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect())
    }

    /// Waits up to `timeout` until the screen of `name` shows `needle`; the screen then.
    pub fn wait_for(&self, name: &str, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let started = Instant::now();
        loop {
            let screen = self.screen(name)?.join("\n");
            if screen.contains(needle) {
                return Ok(screen);
            }
            if started.elapsed() > timeout {
                bail!("{needle:?} not on the screen within {timeout:?}; it shows:\n{screen}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        if self.socket.exists() {
            let _ = self.tmux(&["kill-server"]);
        }
    }
}
