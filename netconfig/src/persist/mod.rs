//! Making an address change survive a reboot: the box's own network configuration is edited
//! in place, whichever of systemd-networkd, ifupdown, NetworkManager (keyfiles) or RHEL ifcfg
//! owns the interface.
//!
//! Only the address, prefix and gateway change; comments, order and everything else stay.
//! Boot-time duplicate address detection is switched on where the format has it. The old file
//! is kept outside the directories those tools read, the new one replaces it by temp file,
//! fsync, rename and directory fsync, and is read back and compared.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::types::Ipv4Cidr;

/// Who configures an interface at boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Manager {
    /// `/etc/systemd/network/*.network`.
    Networkd,
    /// `/etc/network/interfaces` (and `interfaces.d/`).
    Ifupdown,
    /// `/etc/NetworkManager/system-connections/*.nmconnection`.
    NetworkManager,
    /// `/etc/sysconfig/network-scripts/ifcfg-*`.
    Ifcfg,
}

impl fmt::Display for Manager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Manager::Networkd => "systemd-networkd",
            Manager::Ifupdown => "ifupdown",
            Manager::NetworkManager => "NetworkManager",
            Manager::Ifcfg => "ifcfg (network-scripts)",
        })
    }
}

/// The static IPv4 configuration of an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaticConfig {
    /// Address and prefix.
    pub address: Ipv4Cidr,
    /// The default gateway, if the file sets one.
    pub gateway: Option<Ipv4Addr>,
}

/// The file that configures an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub manager: Manager,
    pub file: PathBuf,
}

/// What [`persist`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Persisted {
    /// The file changed.
    pub owner: Owner,
    /// Where the previous version was kept.
    pub backup: PathBuf,
    /// The configuration before.
    pub before: StaticConfig,
}

/// Why the configuration could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// No tool configures the interface.
    #[error(
        "no boot configuration for {interface} found (looked in {looked}); configure a static \
         address for it first"
    )]
    NotFound {
        interface: String,
        /// The places searched.
        looked: String,
    },
    /// More than one does.
    #[error("{interface} is configured in several places ({}); lbs cannot tell which one this box uses: remove the others", .owners.join(", "))]
    Several {
        interface: String,
        /// Each tool and file.
        owners: Vec<String>,
    },
    /// The interface gets its address by DHCP.
    #[error("{interface} gets its address by DHCP in {}; lbs needs a static address on both boxes", .file.display())]
    Dhcp {
        interface: String,
        /// The file saying so.
        file: PathBuf,
    },
    /// The file does not say what lbs needs, or says it in a way it cannot change safely.
    #[error("{}: {reason}", .file.display())]
    Unsupported {
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing failed.
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PersistError + '_ {
    move |source| PersistError::Io {
        path: path.to_owned(),
        source,
    }
}

const NETWORKD_DIR: &str = "etc/systemd/network";
const IFUPDOWN_FILE: &str = "etc/network/interfaces";
const IFUPDOWN_DIR: &str = "etc/network/interfaces.d";
const NM_DIR: &str = "etc/NetworkManager/system-connections";
const IFCFG_DIR: &str = "etc/sysconfig/network-scripts";

/// Files of `dir` (sorted), or none if it does not exist.
fn files_in(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>, PersistError> {
    let listing = match fs::read_dir(dir) {
        Ok(listing) => listing,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut files: Vec<PathBuf> = listing
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter(|e| keep(&e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect();
    files.sort();
    Ok(files)
}

fn read(path: &Path) -> Result<String, PersistError> {
    fs::read_to_string(path).map_err(io_err(path))
}

/// Finds the one file that configures `interface` under `root` (`/` on a box).
pub fn find_owner(root: &Path, interface: &str) -> Result<Owner, PersistError> {
    let mut owners = Vec::new();
    for file in files_in(&root.join(NETWORKD_DIR), |n| n.ends_with(".network"))? {
        if networkd::matches(&read(&file)?, interface) {
            owners.push(Owner {
                manager: Manager::Networkd,
                file,
            });
        }
    }
    let mut ifupdown = vec![root.join(IFUPDOWN_FILE)];
    ifupdown.extend(files_in(&root.join(IFUPDOWN_DIR), |_| true)?);
    for file in ifupdown.into_iter().filter(|f| f.is_file()) {
        if ifupdown::stanza(&read(&file)?, interface).is_some() {
            owners.push(Owner {
                manager: Manager::Ifupdown,
                file,
            });
        }
    }
    for file in files_in(&root.join(NM_DIR), |n| n.ends_with(".nmconnection"))? {
        if keyfile::matches(&read(&file)?, interface) {
            owners.push(Owner {
                manager: Manager::NetworkManager,
                file,
            });
        }
    }
    for file in files_in(&root.join(IFCFG_DIR), |n| n.starts_with("ifcfg-"))? {
        if ifcfg::matches(&read(&file)?, interface) {
            owners.push(Owner {
                manager: Manager::Ifcfg,
                file,
            });
        }
    }
    match owners.len() {
        1 => Ok(owners.remove(0)),
        0 => Err(PersistError::NotFound {
            interface: interface.to_owned(),
            looked: [NETWORKD_DIR, IFUPDOWN_FILE, IFUPDOWN_DIR, NM_DIR, IFCFG_DIR]
                .iter()
                .map(|p| root.join(p).display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }),
        _ => Err(PersistError::Several {
            interface: interface.to_owned(),
            owners: owners
                .iter()
                .map(|o| format!("{} in {}", o.manager, o.file.display()))
                .collect(),
        }),
    }
}

/// The interface's static configuration in `text` (a file of `manager`).
pub fn read_config(
    manager: Manager,
    text: &str,
    interface: &str,
    file: &Path,
) -> Result<StaticConfig, PersistError> {
    let result = match manager {
        Manager::Networkd => networkd::read(text),
        Manager::Ifupdown => ifupdown::read(text, interface),
        Manager::NetworkManager => keyfile::read(text),
        Manager::Ifcfg => ifcfg::read(text),
    };
    result.map_err(|problem| match problem {
        Problem::Dhcp => PersistError::Dhcp {
            interface: interface.to_owned(),
            file: file.to_owned(),
        },
        Problem::Other(reason) => PersistError::Unsupported {
            file: file.to_owned(),
            reason,
        },
    })
}

/// `text` with the interface's address, prefix and gateway set to `new`, boot-time duplicate
/// detection on where the format has it, and nothing else changed.
pub fn rewrite(
    manager: Manager,
    text: &str,
    interface: &str,
    new: &StaticConfig,
    file: &Path,
) -> Result<String, PersistError> {
    read_config(manager, text, interface, file)?;
    let result = match manager {
        Manager::Networkd => networkd::rewrite(text, new),
        Manager::Ifupdown => ifupdown::rewrite(text, interface, new),
        Manager::NetworkManager => keyfile::rewrite(text, new),
        Manager::Ifcfg => ifcfg::rewrite(text, new),
    };
    result.map_err(|reason| PersistError::Unsupported {
        file: file.to_owned(),
        reason,
    })
}

/// Whether the interface's address is static in its boot configuration (the pre-flight
/// check), and what it is.
pub fn check_static(root: &Path, interface: &str) -> Result<(Owner, StaticConfig), PersistError> {
    let owner = find_owner(root, interface)?;
    let config = read_config(owner.manager, &read(&owner.file)?, interface, &owner.file)?;
    Ok((owner, config))
}

/// Writes `new` into the interface's boot configuration under `root`, keeping the old file
/// in `backups` (outside every directory the tools read).
pub fn persist(
    root: &Path,
    interface: &str,
    new: &StaticConfig,
    backups: &Path,
) -> Result<Persisted, PersistError> {
    let owner = find_owner(root, interface)?;
    let text = read(&owner.file)?;
    let before = read_config(owner.manager, &text, interface, &owner.file)?;
    let updated = rewrite(owner.manager, &text, interface, new, &owner.file)?;

    fs::create_dir_all(backups).map_err(io_err(backups))?;
    let name = owner
        .file
        .file_name()
        .map_or_else(|| "config".into(), |n| n.to_string_lossy().into_owned());
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let backup = backups.join(format!("{name}.{stamp}.lbs-backup"));
    write_durably(&backup, text.as_bytes(), None)?;

    let mode = fs::metadata(&owner.file)
        .map_err(io_err(&owner.file))?
        .permissions();
    write_durably(&owner.file, updated.as_bytes(), Some(mode))?;
    let back = read(&owner.file)?;
    let now = read_config(owner.manager, &back, interface, &owner.file)?;
    if back != updated || now.address != new.address || now.gateway != new.gateway {
        return Err(PersistError::Unsupported {
            file: owner.file.clone(),
            reason: format!(
                "read back differently from what was written; the previous version is in {}",
                backup.display()
            ),
        });
    }
    Ok(Persisted {
        owner,
        backup,
        before,
    })
}

/// Temp file beside `path`, write, fsync, rename over `path`, fsync the directory.
fn write_durably(
    path: &Path,
    bytes: &[u8],
    mode: Option<fs::Permissions>,
) -> Result<(), PersistError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let temp = dir.join(format!(".{name}.lbs-tmp"));
    let written = (|| -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(bytes)?;
        if let Some(mode) = mode {
            file.set_permissions(mode)?;
        }
        file.sync_all()?;
        fs::rename(&temp, path)?;
        File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written.map_err(io_err(path))
}

/// Why a file's configuration cannot be used.
enum Problem {
    Dhcp,
    Other(String),
}

fn other(reason: impl Into<String>) -> Problem {
    Problem::Other(reason.into())
}

/// Splits a line into its key and value for `key=value` and `key = value` forms.
fn key_value(line: &str) -> Option<(&str, &str)> {
    let (key, value) = line.split_once('=')?;
    Some((key.trim(), value.trim()))
}

/// Replaces the value of a `key=value` line, keeping its spacing around `=` and any
/// indentation.
fn set_value(line: &str, value: &str) -> String {
    match line.split_once('=') {
        Some((key, rest)) => {
            let spaces = rest.len() - rest.trim_start().len();
            format!("{key}={}{value}", &rest[..spaces])
        }
        None => line.to_owned(),
    }
}

/// The lines of `text`, and whether it ended with a newline (to keep it so).
fn lines(text: &str) -> (Vec<String>, bool) {
    (
        text.lines().map(str::to_owned).collect(),
        text.ends_with('\n') || text.is_empty(),
    )
}

fn join(lines: &[String], newline: bool) -> String {
    let mut out = lines.join("\n");
    if newline {
        out.push('\n');
    }
    out
}

/// INI files (networkd, NetworkManager): the section each line is in.
fn sections(lines: &[String]) -> Vec<String> {
    let mut current = String::new();
    lines
        .iter()
        .map(|line| {
            let t = line.trim();
            if t.starts_with('[') && t.ends_with(']') {
                current = t[1..t.len() - 1].trim().to_owned();
            }
            current.clone()
        })
        .collect()
}

fn is_comment(line: &str) -> bool {
    let t = line.trim_start();
    t.starts_with('#') || t.starts_with(';')
}

// One editor per format, each reading and rewriting its own files.
mod ifcfg;
mod ifupdown;
mod keyfile;
mod networkd;
