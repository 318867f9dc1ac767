//! Child processes for xtask: run with a deadline, and never leave one behind.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Reads a child's pipe to its end on a thread of its own.
pub fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut out);
        }
        out
    })
}

/// Runs a command to completion within `timeout`, killing it if it hangs.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    run_watched(cmd, timeout, Duration::from_millis(5), |_| {})
}

/// [`run_with_timeout`], calling `watch` with the child's process ID every `every` while it
/// runs (to sample its memory, say).
pub fn run_watched(
    cmd: &mut Command,
    timeout: Duration,
    every: Duration,
    mut watch: impl FnMut(u32),
) -> anyhow::Result<Output> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let mut guard = Guard(Some(child));
    let pid = guard.child()?.id();
    // Collect the output while waiting, so a chatty command cannot block on a full pipe.
    let stdout = drain(guard.child()?.stdout.take());
    let stderr = drain(guard.child()?.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        watch(pid);
        if let Some(status) = guard.child()?.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            bail!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(every);
    };
    guard.0 = None;
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Like [`run_with_timeout`], but a failure is an error carrying the command's stderr.
pub fn checked(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    let out = run_with_timeout(cmd, timeout)?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Kills the child it holds when dropped, so no demo process outlives a failed step.
pub struct Guard(pub Option<Child>);

impl Guard {
    pub fn child(&mut self) -> anyhow::Result<&mut Child> {
        self.0.as_mut().context("child already collected")
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A long-running `serve` process (killed on drop).
pub struct Server {
    guard: Guard,
    /// What the server's first line said its address is.
    pub addr: String,
}

impl Server {
    /// Starts a server whose first line of output names its address; `addr_of` finds it.
    pub fn start(
        cmd: &mut Command,
        addr_of: fn(&str) -> Option<&str>,
        timeout: Duration,
    ) -> anyhow::Result<Server> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let guard = Guard(Some(child));
        let (tx, lines) = mpsc::channel();
        // Drains the server's output for its whole life (a full pipe would block it); ends
        // when its stdout closes: at its exit, or when the guard kills it.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let first = lines
            .recv_timeout(timeout)
            .context("the server printed nothing")?;
        let addr = addr_of(&first)
            .with_context(|| format!("unexpected first line from the server: {first:?}"))?
            .to_owned();
        Ok(Server { guard, addr })
    }

    /// The server's process ID.
    pub fn pid(&self) -> Option<u32> {
        self.guard.0.as_ref().map(Child::id)
    }
}
