//! `lbs status`: what the agent knows, asked over its control socket; a human table or JSON.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use crate::control::DEFAULT_SOCKET;
use crate::status::{AgentStatus, SetState};
use crate::text::{ago, human_bytes};

/// Entries not synced shown per side under a set; `--json` has them all (up to 100).
const SKIPPED_SHOWN: usize = 5;

/// Options of `lbs status`.
#[derive(clap::Args, Debug)]
pub struct StatusCmd {
    /// The agent's control socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Show it again every SECONDS (2 by default) until Ctrl-C, like `watch`.
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
    pub watch: Option<u64>,
}

/// Exit code when something is not well (the status says what).
pub const EXIT_DEGRADED: u8 = 1;
/// Exit code when the agent does not answer.
pub const EXIT_NOT_RUNNING: u8 = 2;

/// The agent's status, asked over its control socket within 5 s.
pub(crate) async fn ask(socket: &Path) -> anyhow::Result<AgentStatus> {
    crate::control::ask_status(socket, Duration::from_secs(5)).await
}

/// `lbs status`: exit 0 when all is well, 1 when something is degraded (not in sync, partner
/// or data center silent, fenced, a role change under way), 2 when the agent cannot be asked.
pub async fn status(cmd: StatusCmd) -> anyhow::Result<ExitCode> {
    let Some(every) = cmd.watch else {
        return Ok(ExitCode::from(show(&cmd, false).await?));
    };
    let every = Duration::from_secs(every.max(1));
    loop {
        show(&cmd, true).await?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// Asks once and prints (after clearing the terminal, when `clear`); the exit code it means.
async fn show(cmd: &StatusCmd, clear: bool) -> anyhow::Result<u8> {
    let status = ask(&cmd.socket).await;
    if clear {
        // Home and clear, as `watch` does; nothing else of the terminal is assumed.
        print!("\x1b[H\x1b[2J");
    }
    let status = match status {
        Ok(status) => status,
        Err(err) => {
            eprintln!(
                "the agent is not running or not answering on {} ({err:#}); start it with `lbs agent` (systemctl start lbs-agent)",
                cmd.socket.display()
            );
            return Ok(EXIT_NOT_RUNNING);
        }
    };
    if cmd.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", lbs_host::term::printable(&render(&status)));
    }
    Ok(if status.health.is_empty() {
        0
    } else {
        EXIT_DEGRADED
    })
}

/// What `lbs status` prints, as text (the console shows it too).
pub(crate) fn render(status: &AgentStatus) -> String {
    use std::fmt::Write;
    let mut text = String::new();
    macro_rules! out {
        ($($arg:tt)*) => {{
            let _ = writeln!(text, $($arg)*);
        }};
    }
    let now = status.at_ms;
    let info = &status.info;
    out!(
        "{}  {}  {} of pair {} ({}), since {}",
        info.sid,
        status.role.state,
        status.role.generation,
        info.pair,
        info.fqdn,
        ago(now, Some(status.role.since_unix_ms))
    );
    if let Some(error) = &status.role.last_error {
        out!("  last role error: {error}");
    }
    // The last role change's steps (and any that failed), as the data center's portal
    // shows them.
    if let Some(last) = status.recent_steps.last() {
        let steps: Vec<String> = status
            .recent_steps
            .iter()
            .rev()
            .take(4)
            .rev()
            .map(|step| match &step.error {
                None => format!("{} {} ms", step.step, step.took_ms),
                Some(why) => format!("{} FAILED after {} ms ({why})", step.step, step.took_ms),
            })
            .collect();
        out!(
            "  last steps: {} — the last ended {}",
            steps.join(", "),
            ago(now, Some(last.at_ms))
        );
    }
    if status.health.is_empty() {
        out!("health     OK");
    } else {
        let problems: Vec<String> = status.health.iter().map(ToString::to_string).collect();
        out!("health     DEGRADED: {}", problems.join("; "));
    }
    out!(
        "  LAN {} (serving there now), overlay {}; lbs {}, protocol {}",
        status.serving_at,
        info.overlay,
        status.software,
        status.protocol
    );
    match &info.partner {
        None => out!("partner    none provisioned"),
        Some(p) => out!(
            "partner    {} {} LAN {} overlay {}, data center heard it {}",
            p.sid,
            p.role,
            p.lan.map_or("-".into(), |a| a.to_string()),
            p.overlay.map_or("-".into(), |a| a.to_string()),
            match p.silent_ms {
                Some(ms) => ago(now, Some(now.saturating_sub(ms))),
                None => "never".into(),
            }
        ),
    }
    match &info.hardware_differences {
        None => out!("hardware   not compared yet"),
        Some(d) if d.is_empty() => out!("hardware   identical to the partner's"),
        Some(d) => out!("hardware   DIFFERS from the partner's: {}", d.join("; ")),
    }
    let dc = &status.datacenter;
    out!(
        "datacenter {} last answer {}{}",
        dc.connected_to
            .map_or("not connected".into(), |a| a.to_string()),
        ago(now, dc.last_answer_ms),
        dc.last_error
            .as_ref()
            .map(|e| format!(" — {e}"))
            .unwrap_or_default()
    );
    for record in dc.dns.iter().flatten() {
        out!(
            "dns        {} -> {} ({})",
            record.name,
            record.want,
            record.state
        );
    }
    match (&status.tunnels, &status.tunnels_error) {
        (Some(t), _) => {
            for tunnel in &t.tunnels {
                out!(
                    "tunnel     {} {:?}{} rtt {} last answer {}",
                    tunnel.name,
                    tunnel.health,
                    if tunnel.active { " (active)" } else { "" },
                    tunnel
                        .last_rtt_ms
                        .map_or("-".into(), |r| format!("{r:.1} ms")),
                    tunnel
                        .since_last_good_ms
                        .map_or("never".into(), |ms| format!(
                            "{:.1} s ago",
                            ms as f64 / 1000.0
                        ))
                );
            }
        }
        (None, Some(error)) => out!("tunnels    not running: {error}"),
        (None, None) => out!("tunnels    none configured"),
    }
    if let Some(withdrawn) = &status.address_withdrawn {
        out!(
            "address    WITHDRAWN {}: {}",
            ago(now, Some(withdrawn.since_ms)),
            withdrawn.reason
        );
    }
    if let Some(pbx) = &status.pbx {
        out!(
            "pbx        {}, checked {}{}",
            if pbx.down {
                "DOWN"
            } else if pbx.ok {
                "healthy"
            } else {
                "FAILING its check"
            },
            ago(now, Some(pbx.checked_ms)),
            match (&pbx.last_failure, pbx.ok) {
                (Some(why), false) => format!(" — {why} ({} restart(s))", pbx.restarts),
                _ => String::new(),
            }
        );
    }
    match &status.auto_failover {
        Some(auto) => out!("automatic failover {auto}"),
        None => out!("automatic failover off (P at the console, lbs promote)"),
    }
    out!("replication {}", status.replication);
    for set in &status.sets {
        let mut lag = set
            .changed_since_ms
            .map(|at| format!(", change waiting {}", ago(now, Some(at))))
            .unwrap_or_default();
        match set.pass_bytes {
            Some((total, done)) if total > 0 => {
                lag += &format!(
                    ", {}% of {} copied",
                    done.saturating_mul(100) / total,
                    human_bytes(total as f64)
                );
            }
            _ if set.pending_bytes > 0 => {
                lag += &format!(", {} not copied yet", human_bytes(set.pending_bytes as f64));
            }
            _ => {}
        }
        // The primary is the source: "last in sync" says nothing there.
        let copy = match set.state {
            SetState::Serving => "(the copy's source)".to_owned(),
            SetState::Stopped => "(replication stopped)".to_owned(),
            _ => format!("last in sync {}", ago(now, set.last_in_sync_ms)),
        };
        out!(
            "  {:<11} {:<9} {copy}{lag}  {}{}",
            set.name,
            set.state,
            set.path.display(),
            set.last_error
                .as_ref()
                .map(|e| format!(" — {e}"))
                .unwrap_or_default()
        );
        let skipped = &set.skipped;
        for (side, entries) in [
            ("on the primary", &skipped.on_primary),
            ("here", &skipped.here),
        ] {
            for entry in entries.iter().take(SKIPPED_SHOWN) {
                out!("    not synced {side}: {} — {}", entry.path, entry.reason);
            }
        }
        let listed =
            skipped.on_primary.len().min(SKIPPED_SHOWN) + skipped.here.len().min(SKIPPED_SHOWN);
        let all = (skipped.on_primary.len() + skipped.here.len()) as u64 + skipped.more;
        if all > listed as u64 {
            out!(
                "    not synced: {} more (`lbs status --json` lists up to 100 per side)",
                all - listed as u64
            );
        }
    }
    if let Some(last) = status.resources.last() {
        out!(
            "resources  CPU {}  memory {} of {}  disk {} of {}  network in {}/s out {}/s ({} samples kept here)",
            last.cpu_percent.map_or("-".into(), |c| format!("{c:.0}%")),
            human_bytes(last.memory_used as f64),
            human_bytes(last.memory_total as f64),
            human_bytes(last.disk_used as f64),
            human_bytes(last.disk_total as f64),
            human_bytes(last.rx_per_s.unwrap_or(0.0)),
            human_bytes(last.tx_per_s.unwrap_or(0.0)),
            status.resources.len()
        );
    }
    text
}
