//! Running an operator's command (the PBX hooks and check, the notify command): in a process
//! group of its own, with a deadline, and on the deadline — or when the agent stops waiting —
//! the whole group is killed, not only the shell: a hook's `sleep`, its `systemctl`, whatever
//! it started, ends with it.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;

/// How a hook ended.
#[derive(Debug)]
pub(crate) enum Ended {
    /// It exited; what it wrote (standard error, then standard output, when captured).
    Exited(ExitStatus, String),
    /// It was still running at the deadline: its whole group was killed.
    TimedOut,
}

/// Kills the group on drop unless the hook was reaped (a reaped leader's id may be reused).
struct Group {
    pid: Option<Pid>,
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pid) = self.pid {
            let _ = killpg(pid, Signal::SIGKILL);
        }
    }
}

/// Runs `command` as `sh -c` (with `args` as `$0 $1 …`, `env` added) for at most `deadline`.
pub(crate) async fn run(
    command: &str,
    args: &[&str],
    env: &[(&str, &str)],
    capture: bool,
    deadline: Duration,
) -> std::io::Result<Ended> {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    if capture {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    let mut child = cmd.spawn()?;
    let mut group = Group {
        pid: child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw),
    };
    let (mut out, mut err) = (child.stdout.take(), child.stderr.take());
    let finished = async {
        let (mut said_out, mut said_err) = (Vec::new(), Vec::new());
        let read_out = async {
            if let Some(out) = out.as_mut() {
                let _ = out.read_to_end(&mut said_out).await;
            }
        };
        let read_err = async {
            if let Some(err) = err.as_mut() {
                let _ = err.read_to_end(&mut said_err).await;
            }
        };
        let ((), (), status) = tokio::join!(read_out, read_err, child.wait());
        status.map(|status| {
            (
                status,
                String::from_utf8_lossy(&said_err).into_owned()
                    + &String::from_utf8_lossy(&said_out),
            )
        })
    };
    match tokio::time::timeout(deadline, finished).await {
        Ok(Ok((status, said))) => {
            // Reaped: whatever it left behind in its group is killed all the same.
            if let Some(pid) = group.pid.take() {
                let _ = killpg(pid, Signal::SIGKILL);
            }
            Ok(Ended::Exited(status, said))
        }
        Ok(Err(err)) => Err(err),
        // `group` kills everything on the way out.
        Err(_) => Ok(Ended::TimedOut),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn alive(pid: i32) -> bool {
        nix::sys::signal::kill(Pid::from_raw(pid), None).is_ok()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| stat.split_whitespace().nth(2) == Some("Z"))
    }

    #[tokio::test]
    async fn a_hook_past_its_deadline_is_killed_with_everything_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("child.pid");
        let command = format!("sleep 300 & echo $! > '{}'; wait", pid_file.display());
        let ended = run(&command, &[], &[], false, Duration::from_millis(500))
            .await
            .unwrap();
        assert!(matches!(ended, Ended::TimedOut), "{ended:?}");
        let child: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let gone = (0..50).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            !alive(child)
        });
        assert!(gone, "the hook's child {child} outlived the deadline");
    }

    #[tokio::test]
    async fn a_hook_that_ends_gives_its_status_and_what_it_said() {
        let ended = run(
            "echo out; echo err >&2; exit 3",
            &[],
            &[],
            true,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        let Ended::Exited(status, said) = ended else {
            panic!("{ended:?}")
        };
        assert_eq!(status.code(), Some(3));
        assert_eq!(said, "err\nout\n");
        let ended = run(
            "echo \"$0 $1 $LBS_ROLE\"",
            &["lbs-notify", "primary"],
            &[("LBS_ROLE", "primary")],
            true,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert!(matches!(ended, Ended::Exited(_, said) if said == "lbs-notify primary primary\n"));
    }
}
