//! Child processes for xtask: run with a deadline, and never leave one behind.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Reads a child's pipe to its end on a thread of its own, then says so on `closed`.
fn drain<R: Read + Send + 'static>(
    pipe: Option<R>,
    closed: mpsc::Sender<()>,
) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut out);
        }
        let _ = closed.send(());
        out
    })
}

/// Runs a command to completion within `timeout`, killing it if it hangs.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    run_watched(cmd, timeout, Duration::from_millis(5), |_| {})
}

/// [`run_with_timeout`], calling `watch` with the child's process ID every `every` while it
/// runs (to sample its memory, say). The end is noticed when the child's output pipes close
/// (at its exit), not by waking to look: a timed command shares the machine with this loop,
/// which wakes only every `every` until then.
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
    let (closed_tx, closed) = mpsc::channel();
    let stdout = drain(guard.child()?.stdout.take(), closed_tx.clone());
    let stderr = drain(guard.child()?.stderr.take(), closed_tx);
    let deadline = Instant::now() + timeout;
    let mut watched = Instant::now();
    let mut pipes_closed: Option<Instant> = None;
    watch(pid);
    let status = loop {
        if let Some(status) = guard.child()?.try_wait()? {
            break status;
        }
        let now = Instant::now();
        if now >= deadline {
            bail!("{cmd:?} did not finish within {timeout:?}");
        }
        if now.duration_since(watched) >= every {
            watch(pid);
            watched = now;
        }
        let wake = (watched + every)
            .min(deadline)
            .saturating_duration_since(now);
        match closed.recv_timeout(wake) {
            // A pipe closed: the child is exiting (looked at again at once).
            Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Both closed: it is about to be reaped (microseconds), unless it closed them
            // itself and runs on, which is then looked at every millisecond.
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let since = *pipes_closed.get_or_insert(now);
                std::thread::sleep(if now.duration_since(since) < Duration::from_millis(10) {
                    Duration::from_micros(50)
                } else {
                    Duration::from_millis(1)
                });
            }
        }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_end_is_noticed_when_the_output_closes_not_at_the_next_watch() {
        let mut watched = 0;
        let started = Instant::now();
        let out = run_watched(
            Command::new("sh").args(["-c", "echo out; echo err >&2"]),
            Duration::from_secs(60),
            Duration::from_secs(60),
            |_| watched += 1,
        )
        .unwrap();
        // Watched once at the start; the minute-long interval never came round.
        assert_eq!(watched, 1);
        assert!(started.elapsed() < Duration::from_secs(30));
        assert!(out.status.success());
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
    }

    #[test]
    fn a_command_past_its_deadline_is_stopped_and_is_an_error() {
        let started = Instant::now();
        let err = run_watched(
            Command::new("sleep").arg("30"),
            Duration::from_millis(200),
            Duration::from_millis(50),
            |_| {},
        )
        .unwrap_err();
        assert!(err.to_string().contains("did not finish"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(20));
    }
}
