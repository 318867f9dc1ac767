//! The daemon's configuration, `/etc/lbs/agent.toml`. Every field has a default; with no file
//! at all the agent replicates an Asterisk box's data (DESIGN §6):
//!
//! ```toml
//! sync_port = 7450                 # the primary serves its sync sets here (mutual TLS, partner only)
//! sync_over = "lan"                # reach the partner at its "lan" or "overlay" address
//! report_interval_s = 5            # reports to the data center
//! reconcile_interval_s = 1800      # full reconcile of every set (and on every reconnect)
//! debounce_ms = 300                # a change notice goes out at most this long after the first
//!                                  # change it carries (a file written without pause included)
//! resource_interval_s = 60         # CPU, memory, disk, network sample (kept 7 days)
//! trash_retention_days = 30        # the backup keeps what the primary deleted this long
//! tunnels = true                   # bring up the tunnels of vpn.toml when it names endpoints
//! astdb = "/var/lib/asterisk/astdb.sqlite3"   # copied with SQLite's online backup; "" for none
//! pbx_stop = "systemctl stop asterisk"    # command that stops the PBX (fenced, or B); this
//! pbx_start = "systemctl start asterisk"  # and P's start are the defaults where
//!                                  # asterisk.service is installed, else none; "" for none
//! primary_gone_after_s = 15        # P needs the data center to have lost the primary this
//!                                  # long. Shorter is a faster P, but a primary that misses
//!                                  # reports (reports every report_interval_s, 5 s) for
//!                                  # that long counts as gone: with 15 s, P is possible
//!                                  # 15–20 s after the primary died; keep it at least three
//!                                  # report intervals
//! promote_note = ""                # shown at P, e.g. "move the PRI cable to this box"
//! demote_note = ""                 # shown at B, e.g. "plug this box's LAN cable back in"
//! pbx_check = ""                   # the primary's PBX health check (exit 0: healthy), e.g.
//!                                  # "asterisk -rx 'core show uptime'" or a SIP OPTIONS
//! pbx_check_interval_s = 10        # between checks
//! pbx_check_timeout_s = 5          # a check that takes longer failed (it is killed)
//! pbx_check_fails = 3              # failures in a row that make the PBX unhealthy
//! pbx_restart_tries = 2            # then pbx_stop + pbx_start this often before it is
//!                                  # declared down (status degraded, notify "pbx-down")
//! notify = ""                      # run on every role change as `sh -c "<notify> ROLE GEN
//!                                  # REASON"` (also LBS_ROLE, LBS_GENERATION, LBS_REASON),
//!                                  # e.g. a mail or an SNMP trap; 30 s at most
//! auto_failover = false            # the backup promotes itself when it and the data center
//!                                  # have both lost the primary for primary_gone_after_s;
//!                                  # a primary whose PBX is declared down (pbx_check) hands
//!                                  # over to an in-sync backup through the data center
//! console_group = ""               # a group whose members may use the control socket (the
//!                                  # console login `ip`); "": root only
//! metrics_listen = ""              # e.g. "127.0.0.1:9464": this box's /metrics in
//!                                  # Prometheus's text format, on a loopback address only
//!                                  # (no password); "": off
//!
//! [network]                        # the office address P takes; omit for a remote backup
//! interface = "eth0"
//! shared = "192.168.1.2/24"        # the primary's address, the one phones use
//! own = "192.168.1.3/24"           # this box's own
//! gateway = "192.168.1.1"
//! boot_config = "/"                # keep the boot configuration (ifupdown, NetworkManager,
//!                                  # systemd-networkd, ifcfg) in step; omit to leave it alone
//!
//! # Sync sets, highest priority first (these are the defaults):
//! [[set]]
//! name = "config"
//! path = "/etc/asterisk"
//! [[set]]
//! name = "voicemail"
//! path = "/var/spool/asterisk/voicemail"
//! [[set]]
//! name = "prompts"
//! path = "/var/lib/asterisk/sounds/custom"
//! [[set]]
//! name = "moh"
//! path = "/var/lib/asterisk/moh"
//! [[set]]
//! name = "recordings"
//! path = "/var/spool/asterisk/monitor"
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

/// The name of the set that carries the astdb snapshot.
pub const ASTDB_SET: &str = "astdb";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default = "default_sync_port")]
    sync_port: u16,
    #[serde(default)]
    sync_over: SyncOver,
    #[serde(default = "default_report")]
    report_interval_s: u64,
    #[serde(default = "default_reconcile")]
    reconcile_interval_s: u64,
    #[serde(default = "default_debounce")]
    debounce_ms: u64,
    #[serde(default = "default_resources")]
    resource_interval_s: u64,
    #[serde(default = "default_trash_retention")]
    trash_retention_days: u64,
    #[serde(default = "default_true")]
    tunnels: bool,
    #[serde(default = "default_astdb")]
    astdb: String,
    pbx_stop: Option<String>,
    pbx_start: Option<String>,
    #[serde(default = "default_gone")]
    primary_gone_after_s: u64,
    #[serde(default)]
    promote_note: String,
    #[serde(default)]
    demote_note: String,
    #[serde(default)]
    notify: String,
    #[serde(default)]
    pbx_check: String,
    #[serde(default = "default_check_interval")]
    pbx_check_interval_s: u64,
    #[serde(default = "default_check_timeout")]
    pbx_check_timeout_s: u64,
    #[serde(default = "default_check_fails")]
    pbx_check_fails: u32,
    #[serde(default = "default_restart_tries")]
    pbx_restart_tries: u32,
    #[serde(default)]
    auto_failover: bool,
    #[serde(default)]
    console_group: String,
    #[serde(default)]
    metrics_listen: String,
    network: Option<NetworkFile>,
    #[serde(default = "default_sets")]
    set: Vec<SetFile>,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkFile {
    interface: String,
    shared: String,
    own: String,
    gateway: std::net::Ipv4Addr,
    #[serde(default)]
    boot_config: Option<PathBuf>,
}

/// The office address a promotion takes (and a demotion gives back).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Network {
    /// The office interface.
    pub interface: String,
    /// The primary's address, the one phones use.
    pub shared: lbs_netconfig::Ipv4Cidr,
    /// This box's own address.
    pub own: lbs_netconfig::Ipv4Cidr,
    /// The office gateway.
    pub gateway: std::net::Ipv4Addr,
    /// The root of the boot configuration to keep in step with the address (`/` on a box,
    /// so a reboot comes up with the address it had); `None`: left alone.
    pub boot_config: Option<PathBuf>,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetFile {
    name: String,
    path: PathBuf,
}

/// Which of the partner's addresses replication uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncOver {
    /// The office LAN (both boxes on site).
    #[default]
    Lan,
    /// The tunnel overlay (a remote backup).
    Overlay,
}

fn default_check_interval() -> u64 {
    10
}
fn default_check_timeout() -> u64 {
    5
}
fn default_check_fails() -> u32 {
    3
}
fn default_restart_tries() -> u32 {
    2
}
fn default_gone() -> u64 {
    15
}
fn default_sync_port() -> u16 {
    7450
}
fn default_report() -> u64 {
    5
}
fn default_reconcile() -> u64 {
    1800
}
fn default_debounce() -> u64 {
    300
}
fn default_resources() -> u64 {
    60
}
fn default_trash_retention() -> u64 {
    30
}
fn default_true() -> bool {
    true
}
fn default_astdb() -> String {
    "/var/lib/asterisk/astdb.sqlite3".into()
}
fn default_sets() -> Vec<SetFile> {
    [
        ("config", "/etc/asterisk"),
        ("voicemail", "/var/spool/asterisk/voicemail"),
        ("prompts", "/var/lib/asterisk/sounds/custom"),
        ("moh", "/var/lib/asterisk/moh"),
        ("recordings", "/var/spool/asterisk/monitor"),
    ]
    .into_iter()
    .map(|(name, path)| SetFile {
        name: name.into(),
        path: path.into(),
    })
    .collect()
}

/// One sync set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncSet {
    pub name: String,
    /// Its root on both boxes.
    pub path: PathBuf,
}

/// The daemon's settings, checked.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The sync port.
    pub sync_port: u16,
    /// Which partner address replication uses.
    pub sync_over: SyncOver,
    /// Between reports to the data center.
    pub report_interval: Duration,
    /// Between full reconciles.
    pub reconcile_interval: Duration,
    /// Quiet time before a change is pulled.
    pub debounce: Duration,
    /// Between resource samples.
    pub resource_interval: Duration,
    /// How long the backup keeps what the primary deleted (in each set's trash).
    pub trash_retention: Duration,
    /// Whether to run the tunnels.
    pub tunnels: bool,
    /// The astdb to copy consistently, if any.
    pub astdb: Option<PathBuf>,
    /// The command that stops the PBX.
    pub pbx_stop: Option<String>,
    /// The command that starts the PBX.
    pub pbx_start: Option<String>,
    /// How long the data center must have lost the primary before P goes ahead.
    pub primary_gone_after: Duration,
    /// The operator's note at P.
    pub promote_note: Option<String>,
    /// The operator's note at B.
    pub demote_note: Option<String>,
    /// Run on every role change with the new role, generation and reason (like keepalived's
    /// notify scripts).
    pub notify: Option<String>,
    /// The PBX health check, run on the primary (like keepalived's `track_script`).
    pub pbx_check: Option<PbxCheck>,
    /// Whether the backup promotes itself (off by default).
    pub auto_failover: bool,
    /// The group that may use the control socket besides root (the console login's).
    pub console_group: Option<String>,
    /// Where `/metrics` is served (a loopback address), if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The office address P takes, if this backup is on the primary's LAN.
    pub network: Option<Network>,
    /// The sets, highest priority first.
    pub sets: Vec<SyncSet>,
    /// What the agent should say at start about how it read the file (a missing file, a
    /// default it chose for this box, a hook a PBX box lacks): shown by `lbs check-config`
    /// and logged by `lbs agent`, warnings first.
    pub notes: Vec<Note>,
}

/// How the primary checks its PBX and what it does when the check keeps failing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PbxCheck {
    /// The command (`sh -c`); exit 0 is healthy.
    pub command: String,
    /// Between checks.
    pub interval: Duration,
    /// How long one check may take (it is killed then, and counts as failed).
    pub timeout: Duration,
    /// Failures in a row that make the PBX unhealthy.
    pub fails: u32,
    /// Restarts (`pbx_stop`, then `pbx_start`) tried before it is declared down.
    pub restart_tries: u32,
}

/// Something about the configuration worth telling the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Note {
    /// Worth knowing.
    Info(String),
    /// Probably not what the operator wants.
    Warning(String),
}

/// What the box has that changes defaults: systemd's unit for Asterisk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BoxFacts {
    /// `asterisk.service` is installed.
    pub asterisk_unit: bool,
}

impl BoxFacts {
    /// Looks at this machine.
    pub fn here() -> BoxFacts {
        BoxFacts {
            asterisk_unit: [
                "/etc/systemd/system/asterisk.service",
                "/lib/systemd/system/asterisk.service",
                "/usr/lib/systemd/system/asterisk.service",
            ]
            .iter()
            .any(|p| Path::new(p).exists()),
        }
    }
}

impl AgentConfig {
    /// What SIGHUP makes of `new` while `self` is in force: the settings that can change at
    /// once from `new` (hooks, notes, intervals, P's threshold, automatic failover), the rest
    /// kept, with the names of those that changed and wait for a restart.
    pub fn reloaded(&self, new: AgentConfig) -> (AgentConfig, Vec<&'static str>) {
        let mut later = Vec::new();
        let mut merged = new;
        macro_rules! keep {
            ($($field:ident),*) => {$(
                if merged.$field != self.$field {
                    later.push(stringify!($field));
                    merged.$field = self.$field.clone();
                }
            )*};
        }
        keep!(
            sync_port,
            sync_over,
            debounce,
            tunnels,
            astdb,
            console_group,
            metrics_listen,
            network,
            sets
        );
        (merged, later)
    }

    /// Reads `path`; a missing file is all defaults unless `required`.
    pub fn load(path: &Path, required: bool) -> anyhow::Result<AgentConfig> {
        let (text, missing) = match std::fs::read_to_string(path) {
            Ok(text) => (text, false),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound && !required => {
                (String::new(), true)
            }
            Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
        };
        let mut config = Self::parse_for(&text, BoxFacts::here())
            .with_context(|| format!("in {}", path.display()))?;
        if missing {
            config.notes.insert(
                0,
                Note::Warning(format!(
                    "{} does not exist: every setting is its default (an Asterisk box's sets, no [network], so P keeps this box's address)",
                    path.display()
                )),
            );
        }
        Ok(config)
    }

    /// Parses configuration text (on a box without Asterisk's unit).
    pub fn parse(text: &str) -> anyhow::Result<AgentConfig> {
        Self::parse_for(text, BoxFacts::default())
    }

    /// Parses configuration text for a box with `facts`.
    pub fn parse_for(text: &str, facts: BoxFacts) -> anyhow::Result<AgentConfig> {
        let file: File = toml::from_str(text)?;
        let mut notes = Vec::new();
        // An unset hook on a box with Asterisk's unit starts and stops it; "" means none.
        let mut hook = |key: &str, value: Option<String>, verb: &str| match value {
            Some(command) => Some(command.trim().to_owned()).filter(|c| !c.is_empty()),
            None if facts.asterisk_unit => {
                let command = format!("systemctl {verb} asterisk");
                notes.push(Note::Info(format!(
                    "{key} not set: `{command}` (asterisk.service is installed)"
                )));
                Some(command)
            }
            None => None,
        };
        let pbx_stop = hook("pbx_stop", file.pbx_stop, "stop");
        let pbx_start = hook("pbx_start", file.pbx_start, "start");
        for (key, value, what) in [
            (
                "pbx_start",
                &pbx_start,
                "P takes the address but starts no PBX",
            ),
            (
                "pbx_stop",
                &pbx_stop,
                "a fenced box and B leave the PBX running",
            ),
        ] {
            if value.is_none() {
                notes.push(Note::Warning(format!("no {key} command: {what}")));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for set in &file.set {
            if set.name.is_empty()
                || !set
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                bail!("set name {:?}: use letters, digits, '-' and '_'", set.name);
            }
            if set.name == ASTDB_SET {
                bail!("set name {ASTDB_SET:?} is the astdb copy's; choose another");
            }
            if !names.insert(set.name.clone()) {
                bail!("set {:?} is named twice", set.name);
            }
            if !set.path.is_absolute() {
                bail!(
                    "set {}: path {} must be absolute",
                    set.name,
                    set.path.display()
                );
            }
        }
        check_set_paths(file.set.iter().map(|s| (s.name.as_str(), s.path.as_path())))?;
        if file.report_interval_s == 0 || file.resource_interval_s == 0 {
            bail!("report_interval_s and resource_interval_s must be at least 1");
        }
        Ok(AgentConfig {
            sync_port: file.sync_port,
            sync_over: file.sync_over,
            report_interval: Duration::from_secs(file.report_interval_s),
            reconcile_interval: Duration::from_secs(file.reconcile_interval_s.max(10)),
            debounce: Duration::from_millis(file.debounce_ms),
            resource_interval: Duration::from_secs(file.resource_interval_s),
            trash_retention: Duration::from_secs(
                file.trash_retention_days.saturating_mul(24 * 3600),
            ),
            tunnels: file.tunnels,
            astdb: (!file.astdb.is_empty()).then(|| PathBuf::from(file.astdb)),
            pbx_stop,
            pbx_start,
            primary_gone_after: Duration::from_secs(file.primary_gone_after_s),
            promote_note: (!file.promote_note.trim().is_empty())
                .then(|| file.promote_note.trim().to_owned()),
            demote_note: (!file.demote_note.trim().is_empty())
                .then(|| file.demote_note.trim().to_owned()),
            notify: Some(file.notify.trim().to_owned()).filter(|n| !n.is_empty()),
            pbx_check: Some(file.pbx_check.trim().to_owned())
                .filter(|c| !c.is_empty())
                .map(|command| PbxCheck {
                    command,
                    interval: Duration::from_secs(file.pbx_check_interval_s.max(1)),
                    timeout: Duration::from_secs(file.pbx_check_timeout_s.max(1)),
                    fails: file.pbx_check_fails.max(1),
                    restart_tries: file.pbx_restart_tries,
                }),
            auto_failover: file.auto_failover,
            console_group: Some(file.console_group).filter(|g| !g.is_empty()),
            metrics_listen: metrics_listen(&file.metrics_listen)?,
            network: file
                .network
                .map(|n| -> anyhow::Result<Network> {
                    let cidr = |what: &str, text: &str| {
                        text.parse::<lbs_netconfig::Ipv4Cidr>().map_err(|_| {
                            anyhow::anyhow!("network.{what} {text:?}: expected like 192.168.1.2/24")
                        })
                    };
                    Ok(Network {
                        interface: n.interface,
                        shared: cidr("shared", &n.shared)?,
                        own: cidr("own", &n.own)?,
                        gateway: n.gateway,
                        boot_config: n.boot_config.filter(|p| !p.as_os_str().is_empty()),
                    })
                })
                .transpose()?,
            sets: file
                .set
                .into_iter()
                .map(|s| SyncSet {
                    name: s.name,
                    path: s.path,
                })
                .collect(),
            notes,
        })
    }
}

/// Directories a sync set may not be, contain or lie in: the partner's copy of them would
/// overwrite what belongs to this box alone (lbs's identity and role, the host's own
/// configuration) or the system itself.
const NOT_SYNCED: [&str; 3] = ["/var/lib/lbs", "/etc/lbs", "/run"];
/// Directories a sync set may lie in but not be (nor contain): a set of the whole of them
/// would carry the host's own files to the partner.
const TOO_WIDE: [&str; 17] = [
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/opt", "/proc", "/root",
    "/sbin", "/sys", "/tmp", "/usr", "/var", "/var/lib",
];

/// The sets' paths are normal (no `..`), stay off what belongs to this box alone, are not
/// whole system directories, and do not overlap each other (one pass would fight the other).
fn check_set_paths<'a>(sets: impl Iterator<Item = (&'a str, &'a Path)>) -> anyhow::Result<()> {
    let sets: Vec<(&str, &Path)> = sets.collect();
    for (name, path) in &sets {
        if path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            bail!("set {name}: path {} must not contain ..", path.display());
        }
        for own in NOT_SYNCED {
            let own = Path::new(own);
            if path.starts_with(own) || own.starts_with(path) {
                bail!(
                    "set {name}: {} overlaps {}, which belongs to this box alone",
                    path.display(),
                    own.display()
                );
            }
        }
        if TOO_WIDE.iter().any(|wide| *path == Path::new(wide)) {
            bail!(
                "set {name}: {} is a whole system directory; name the PBX's own directories in it",
                path.display()
            );
        }
    }
    for (i, (name, path)) in sets.iter().enumerate() {
        for (other, other_path) in &sets[i + 1..] {
            if path.starts_with(other_path) || other_path.starts_with(path) {
                bail!(
                    "sets {name} ({}) and {other} ({}) overlap: one directory, one set",
                    path.display(),
                    other_path.display()
                );
            }
        }
    }
    Ok(())
}

/// `metrics_listen`: off when empty, else a loopback address and port (the metrics answer
/// anyone who reaches them).
fn metrics_listen(text: &str) -> anyhow::Result<Option<std::net::SocketAddr>> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let address: std::net::SocketAddr = text
        .parse()
        .map_err(|_| anyhow::anyhow!("metrics_listen {text:?}: expected like 127.0.0.1:9464"))?;
    if !address.ip().is_loopback() {
        bail!(
            "metrics_listen {text:?}: the metrics need no password, so they are served on a loopback address only (127.0.0.1 or ::1); let a local Prometheus or node exporter pass them on"
        );
    }
    Ok(Some(address))
}

/// `network` with the address the operator chose at **P** (kept in the role record).
pub fn with_choice(
    network: Option<Network>,
    chosen: Option<crate::role::SharedAddress>,
) -> Option<Network> {
    let mut network = network?;
    if let Some(chosen) = chosen {
        network.shared = lbs_netconfig::Ipv4Cidr {
            addr: chosen.address,
            prefix: chosen.prefix,
        };
        network.gateway = chosen.gateway;
    }
    Some(network)
}

#[cfg(test)]
mod tests;
