//! `status`: serve's state, the fleet's line, each pair; `--problems` for monitoring.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::{CONFIG, PACKAGED_CONFIG, open, when};
use crate::store::{DnsState, StoredReport};
use crate::time::now_ms;

/// `status [PAIR] [--problems] [--silent-after S] [--json]`.
pub(super) fn status(
    dir: &Path,
    pair: Option<String>,
    problems: bool,
    silent_after: u64,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let silent_after = std::time::Duration::from_secs(silent_after);
    // Monitoring tells "cannot read" (2) from "something needs a person" (1).
    let read = open(dir).and_then(|store| {
        let retired = match &pair {
            Some(name) => store.retired(name)?,
            None => None,
        };
        Ok((store.pairs()?, retired, store.dns_sender()?))
    });
    let (pairs, retired, sender) = match read {
        Ok(read) => read,
        Err(err) => {
            eprintln!("lbs-datacenter: cannot read the records: {err:#}");
            return Ok(ExitCode::from(2));
        }
    };
    let pairs: Vec<_> = match &pair {
        Some(name) => {
            let one: Vec<_> = pairs.into_iter().filter(|p| &p.name == name).collect();
            if let Some(at) = retired {
                // Not a problem for monitoring: nobody is to serve it.
                lbs_host::say!(
                    "pair {name} was retired {}; its history: lbs-datacenter events --pair {name}",
                    when(at)
                );
                return Ok(ExitCode::SUCCESS);
            }
            if one.is_empty() {
                eprintln!("lbs-datacenter: no pair named {name} (see lbs-datacenter status)");
                return Ok(ExitCode::from(2));
            }
            one
        }
        None => pairs,
    };
    let now = now_ms();
    if problems {
        return status_problems(&pairs, now, silent_after, service(dir), json);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&pairs)?);
        return Ok(ExitCode::SUCCESS);
    }
    if pairs.is_empty() {
        lbs_host::say!("no pairs yet: lbs-datacenter provision-pair --name NAME --fqdn FQDN");
    } else {
        let service = service(dir);
        if service.needs_a_person() {
            lbs_host::say!("{service}");
        }
        lbs_host::say!("{}", crate::fleet::summary(&pairs, now, silent_after));
        if sender != crate::store::DnsSender::OwnSite {
            lbs_host::say!("{sender}");
        }
    }
    // The names are updated only where `serve` has a [dns] section: in the data
    // directory's datacenter.toml, or the packaged one the unit passes to serve.
    let dns_configured = [dir.join(CONFIG), PathBuf::from(PACKAGED_CONFIG)]
        .into_iter()
        .find(|path| path.exists())
        .map_or(Some(false), |path| {
            crate::config::ServeConfig::load(&path, true)
                .ok()
                .map(|c| c.dns.is_some())
        })
        .unwrap_or(true);
    for pair in &pairs {
        let hardware = match &pair.hardware_differences {
            None => "hardware not compared yet".to_owned(),
            Some(d) if d.is_empty() => "hardware matches".to_owned(),
            Some(d) => format!("HARDWARE DIFFERS: {}", d.join("; ")),
        };
        lbs_host::say!(
            "{} ({}), generation {}, {hardware}",
            pair.name,
            pair.fqdn,
            pair.generation
        );
        for s in &pair.servers {
            let heard = s.last_heartbeat_at.map_or("never".to_owned(), |at| {
                format!("{:.0} s ago", (now - at) as f64 / 1000.0)
            });
            lbs_host::say!(
                "  {}  {:<11} overlay {:<13} LAN {:<15} heartbeat {:<10} gen {:<4} {}",
                s.sid,
                s.role,
                s.overlay.as_deref().unwrap_or("-"),
                // Where it serves now (its report), else the address it activated with.
                s.advertised.as_deref().or(s.lan.as_deref()).unwrap_or("-"),
                heard,
                s.reported_generation
                    .map_or("-".to_owned(), |g| g.to_string()),
                s.software.as_deref().unwrap_or("")
            );
            if let Some(report) = &s.report {
                lbs_host::say!("      {}", report_line(report));
            }
        }
        for r in &pair.dns {
            let state = match r.state {
                _ if !dns_configured => "not configured (no [dns] in datacenter.toml)".to_owned(),
                DnsState::Done => {
                    format!("ok since {}", r.done_at.map_or("-".into(), when))
                }
                DnsState::Pending => "PENDING".to_owned(),
                DnsState::Failed => format!(
                    "FAILED, the server refuses it ({} tries: {}); fix the DNS server's configuration or [dns]",
                    r.attempts,
                    r.last_error.as_deref().unwrap_or("")
                ),
                _ => format!(
                    "RETRYING ({} failed: {})",
                    r.attempts,
                    r.last_error.as_deref().unwrap_or("")
                ),
            };
            lbs_host::say!("  DNS {} → {}  {state}", r.name, r.want);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether `serve` runs on this data directory, from the age of its alive file.
fn service(dir: &Path) -> crate::fleet::Service {
    let age = std::fs::metadata(dir.join(crate::serve::ALIVE_FILE))
        .and_then(|meta| meta.modified())
        .ok()
        .map(|at| at.elapsed().unwrap_or_default());
    crate::fleet::Service::judge(age)
}

/// `status --problems`: serve's line when it is not running, the fleet's line, then each pair
/// that needs a person with what.
fn status_problems(
    pairs: &[crate::store::PairView],
    now: crate::store::Millis,
    silent_after: std::time::Duration,
    service: crate::fleet::Service,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let summary = crate::fleet::summary(pairs, now, silent_after);
    let troubled: Vec<_> = pairs
        .iter()
        .map(|p| (p, crate::fleet::problems(p, now, silent_after)))
        .filter(|(_, found)| !found.is_empty())
        .collect();
    if json {
        let pairs: Vec<_> = troubled
            .iter()
            .map(|(p, found)| serde_json::json!({ "pair": p.name, "fqdn": p.fqdn, "problems": found }))
            .collect();
        let out = serde_json::json!({ "serve": service, "summary": summary, "pairs": pairs });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        if service.needs_a_person() {
            lbs_host::say!("{service}");
        }
        lbs_host::say!("{summary}");
        for (pair, found) in &troubled {
            lbs_host::say!("{} ({}):", pair.name, pair.fqdn);
            for problem in found {
                lbs_host::say!("  {problem}");
            }
        }
    }
    Ok(if troubled.is_empty() && !service.needs_a_person() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// A box's last report in a line: what it believes, its sync backlog and its tunnels.
fn report_line(report: &StoredReport) -> String {
    let files = report.sync_pending_files.unwrap_or(0);
    let bytes = report.sync_pending_bytes.unwrap_or(0);
    let synced = match report.sync_last_complete_ms {
        Some(at) => format!(
            "last complete sync {}",
            when(i64::try_from(at).unwrap_or(i64::MAX))
        ),
        None => "no complete sync yet".to_owned(),
    };
    let tunnels: Vec<String> = report
        .tunnels
        .iter()
        .map(|(name, healthy, active)| {
            format!(
                "{name} {}{}",
                if *healthy { "up" } else { "DOWN" },
                if *active { " (active)" } else { "" }
            )
        })
        .collect();
    format!(
        "says {}, serving at {}; sync: {files} files / {bytes} bytes pending, {synced}; tunnels: {}",
        if report.role.is_empty() {
            "?"
        } else {
            &report.role
        },
        report.advertised.map_or("?".to_owned(), |a| a.to_string()),
        if tunnels.is_empty() {
            "none reported".to_owned()
        } else {
            tunnels.join(", ")
        }
    )
}
