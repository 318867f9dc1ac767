//! `lbs check-config` (like `keepalived -t`): reads `agent.toml` as the agent would, says
//! whether it is valid and what the agent would do with it on this box — before a restart
//! finds out.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::config::{AgentConfig, Note};

/// Options of `lbs check-config`.
#[derive(clap::Args, Debug)]
pub struct CheckConfigCmd {
    /// The configuration to check.
    #[arg(long, default_value = "/etc/lbs/agent.toml")]
    pub config: PathBuf,
}

/// Exit code of a configuration the agent would refuse.
pub const EXIT_INVALID: u8 = 1;

/// `lbs check-config`: 0 valid (warnings are printed), 1 invalid.
pub fn check_config(cmd: &CheckConfigCmd) -> anyhow::Result<ExitCode> {
    let config = match AgentConfig::load(&cmd.config, false) {
        Ok(config) => config,
        Err(err) => {
            println!("INVALID: {err:#}");
            println!("the agent would not start with it; nothing was changed");
            return Ok(ExitCode::from(EXIT_INVALID));
        }
    };
    println!("{}: valid", cmd.config.display());
    print!("{}", describe(&config, &|p| p.exists()));
    Ok(ExitCode::SUCCESS)
}

/// What the agent would do with `config`, warnings first; `exists` tells which paths are there.
pub fn describe(config: &AgentConfig, exists: &dyn Fn(&Path) -> bool) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    macro_rules! line {
        ($($arg:tt)*) => {{
            let _ = writeln!(out, $($arg)*);
        }};
    }
    for note in &config.notes {
        if let Note::Warning(text) = note {
            line!("WARNING: {text}");
        }
    }
    for note in &config.notes {
        if let Note::Info(text) = note {
            line!("note: {text}");
        }
    }
    line!(
        "reports to the data center every {} s; P needs it to have lost the primary for {} s",
        config.report_interval.as_secs(),
        config.primary_gone_after.as_secs()
    );
    match &config.network {
        Some(n) => line!(
            "P takes {} via {} on {} (this box's own address: {}); B gives it back{}",
            n.shared,
            n.gateway,
            n.interface,
            n.own,
            match &n.boot_config {
                Some(root) => format!(
                    ", keeping the boot configuration under {} in step",
                    root.display()
                ),
                None => ", leaving the boot configuration alone".to_owned(),
            }
        ),
        None => line!("no [network]: P keeps this box's address; phones follow the DNS name"),
    }
    line!(
        "PBX: start `{}`, stop `{}`",
        config.pbx_start.as_deref().unwrap_or("(none)"),
        config.pbx_stop.as_deref().unwrap_or("(none)")
    );
    line!(
        "automatic failover {}",
        if config.auto_failover {
            "ON"
        } else {
            "off (P at the console)"
        }
    );
    line!(
        "replication: port {}, over the partner's {} address, change notices within {} ms, full reconcile every {} min",
        config.sync_port,
        match config.sync_over {
            crate::config::SyncOver::Lan => "LAN",
            crate::config::SyncOver::Overlay => "overlay",
        },
        config.debounce.as_millis(),
        config.reconcile_interval.as_secs() / 60
    );
    for (n, set) in config.sets.iter().enumerate() {
        line!(
            "  set {} {:<11} {}{}",
            n + 1,
            set.name,
            set.path.display(),
            if exists(&set.path) {
                ""
            } else {
                "  (missing here: made empty at start)"
            }
        );
    }
    if let Some(astdb) = &config.astdb {
        line!(
            "  astdb copied with SQLite's online backup: {}{}",
            astdb.display(),
            if exists(astdb) {
                ""
            } else {
                "  (missing here)"
            }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_description_names_warnings_first_then_what_p_and_replication_do() {
        let config = AgentConfig::parse(
            "pbx_start = \"systemctl start asterisk\"\n[network]\ninterface = \"eth0\"\nshared = \"192.168.1.2/24\"\nown = \"192.168.1.3/24\"\ngateway = \"192.168.1.1\"\n",
        )
        .expect("valid");
        let text = describe(&config, &|p| p == Path::new("/etc/asterisk"));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "WARNING: no pbx_stop command: a fenced box and B leave the PBX running"
        );
        assert!(text.contains("P takes 192.168.1.2/24 via 192.168.1.1 on eth0 (this box's own address: 192.168.1.3/24)"), "{text}");
        assert!(
            text.contains("  set 1 config      /etc/asterisk\n"),
            "{text}"
        );
        assert!(
            text.contains("/var/spool/asterisk/voicemail  (missing here"),
            "{text}"
        );
    }
}
