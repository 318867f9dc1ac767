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

mod networkd {
    use super::*;

    /// Whether a `[Match]` section names the interface (`Name=` takes a space-separated
    /// list of names and globs).
    pub(super) fn matches(text: &str, interface: &str) -> bool {
        let (lines, _) = lines(text);
        let sections = sections(&lines);
        lines.iter().zip(&sections).any(|(line, section)| {
            section == "Match"
                && !is_comment(line)
                && key_value(line).is_some_and(|(k, v)| {
                    k == "Name" && v.split_whitespace().any(|p| glob(p, interface))
                })
        })
    }

    /// `*` and `?` globs, as networkd's `Name=` allows.
    fn glob(pattern: &str, name: &str) -> bool {
        fn go(p: &[u8], n: &[u8]) -> bool {
            match (p.first(), n.first()) {
                (None, None) => true,
                (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
                (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
                (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
                _ => false,
            }
        }
        go(pattern.as_bytes(), name.as_bytes())
    }

    /// A value and the line it is on.
    type At<T> = Option<(usize, T)>;

    /// The IPv4 `Address=` and `Gateway=` lines.
    fn find(lines: &[String]) -> (At<Ipv4Cidr>, At<Ipv4Addr>) {
        let sections = sections(lines);
        let mut address = None;
        let mut gateway = None;
        for (i, (line, section)) in lines.iter().zip(&sections).enumerate() {
            if is_comment(line) {
                continue;
            }
            let Some((key, value)) = key_value(line) else {
                continue;
            };
            match (section.as_str(), key) {
                ("Network" | "Address", "Address") if address.is_none() => {
                    if let Ok(cidr) = value.parse::<Ipv4Cidr>() {
                        address = Some((i, cidr));
                    }
                }
                ("Network" | "Route", "Gateway") if gateway.is_none() => {
                    if let Ok(ip) = value.parse::<Ipv4Addr>() {
                        gateway = Some((i, ip));
                    }
                }
                _ => {}
            }
        }
        (address, gateway)
    }

    pub(super) fn read(text: &str) -> Result<StaticConfig, Problem> {
        let (lines, _) = lines(text);
        let sections = sections(&lines);
        let dhcp = lines.iter().zip(&sections).any(|(line, section)| {
            section == "Network"
                && !is_comment(line)
                && key_value(line).is_some_and(|(k, v)| {
                    k == "DHCP" && matches!(v, "yes" | "true" | "ipv4" | "1" | "on")
                })
        });
        let (address, gateway) = find(&lines);
        match address {
            Some((_, address)) => Ok(StaticConfig {
                address,
                gateway: gateway.map(|(_, g)| g),
            }),
            None if dhcp => Err(Problem::Dhcp),
            None => Err(other("no IPv4 Address= in [Network] or [Address]")),
        }
    }

    pub(super) fn rewrite(text: &str, new: &StaticConfig) -> Result<String, String> {
        let (mut lines, newline) = lines(text);
        let (address, gateway) = find(&lines);
        let Some((at, _)) = address else {
            return Err("no IPv4 Address= to change".into());
        };
        lines[at] = set_value(&lines[at], &new.address.to_string());
        match (gateway, new.gateway) {
            (Some((g, _)), Some(ip)) => lines[g] = set_value(&lines[g], &ip.to_string()),
            (Some((g, _)), None) => {
                lines.remove(g);
            }
            (None, Some(ip)) => {
                let sections = sections(&lines);
                let end = last_line_of(&lines, &sections, "Network")
                    .ok_or("no [Network] section to add Gateway= to")?;
                lines.insert(end + 1, format!("Gateway={ip}"));
            }
            (None, None) => {}
        }
        // Duplicate detection lives in [Address] sections only.
        let sections = sections(&lines);
        let (address, _) = find(&lines);
        if let Some((at, _)) = address
            && sections[at] == "Address"
        {
            let dad = lines.iter().zip(&sections).position(|(line, section)| {
                section == "Address"
                    && key_value(line).is_some_and(|(k, _)| k == "DuplicateAddressDetection")
            });
            match dad {
                Some(d) => {
                    let value = key_value(&lines[d]).map(|(_, v)| v.to_owned());
                    if matches!(value.as_deref(), Some("none" | "ipv6")) {
                        let both = if value.as_deref() == Some("ipv6") {
                            "both"
                        } else {
                            "ipv4"
                        };
                        lines[d] = set_value(&lines[d], both);
                    }
                }
                None => lines.insert(at + 1, "DuplicateAddressDetection=ipv4".into()),
            }
        }
        Ok(join(&lines, newline))
    }

    /// The last non-blank line of the first section called `name`.
    pub(super) fn last_line_of(lines: &[String], sections: &[String], name: &str) -> Option<usize> {
        let first = sections.iter().position(|s| s == name)?;
        let mut last = first;
        for (i, section) in sections.iter().enumerate().skip(first) {
            if section != name {
                break;
            }
            if !lines[i].trim().is_empty() {
                last = i;
            }
        }
        Some(last)
    }
}

mod ifupdown {
    use super::*;

    const STANZAS: &[&str] = &[
        "iface",
        "auto",
        "mapping",
        "source",
        "source-directory",
        "allow-auto",
        "allow-hotplug",
    ];

    fn starts_stanza(line: &str) -> bool {
        let word = line.split_whitespace().next().unwrap_or("");
        STANZAS.contains(&word) || word.starts_with("allow-")
    }

    /// The `iface <interface> inet …` line and the lines of its options: (first, end, method).
    pub(super) fn stanza(text: &str, interface: &str) -> Option<(usize, usize, String)> {
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.iter().position(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words.len() >= 4 && words[0] == "iface" && words[1] == interface && words[2] == "inet"
        })?;
        let method = lines[start].split_whitespace().nth(3)?.to_owned();
        let end = lines[start + 1..]
            .iter()
            .position(|l| starts_stanza(l.trim_start()))
            .map_or(lines.len(), |n| start + 1 + n);
        Some((start, end, method))
    }

    /// (line, value) of the first option `name` within the stanza.
    fn option(lines: &[String], start: usize, end: usize, name: &str) -> Option<(usize, String)> {
        (start + 1..end).find_map(|i| {
            let mut words = lines[i].split_whitespace();
            (words.next() == Some(name)).then(|| (i, words.next().unwrap_or("").to_owned()))
        })
    }

    fn address_of(lines: &[String], start: usize, end: usize) -> Result<Ipv4Cidr, Problem> {
        let (_, address) =
            option(lines, start, end, "address").ok_or_else(|| other("no address line"))?;
        if let Ok(cidr) = address.parse::<Ipv4Cidr>() {
            return Ok(cidr);
        }
        let ip: Ipv4Addr = address
            .parse()
            .map_err(|_| other(format!("address {address:?} is not an IPv4 address")))?;
        let (_, mask) = option(lines, start, end, "netmask")
            .ok_or_else(|| other("address without a prefix length or netmask"))?;
        let prefix = match mask.parse::<u8>() {
            Ok(prefix) => prefix,
            Err(_) => {
                let mask: Ipv4Addr = mask
                    .parse()
                    .map_err(|_| other(format!("netmask {mask:?} is not valid")))?;
                let bits = u32::from(mask);
                if bits.leading_ones() + bits.trailing_zeros() != 32 {
                    return Err(other(format!("netmask {mask} is not contiguous")));
                }
                bits.leading_ones() as u8
            }
        };
        Ipv4Cidr::new(ip, prefix).ok_or_else(|| other("prefix length over 32"))
    }

    pub(super) fn read(text: &str, interface: &str) -> Result<StaticConfig, Problem> {
        let (start, end, method) =
            stanza(text, interface).ok_or_else(|| other("no iface stanza for it"))?;
        match method.as_str() {
            "dhcp" => return Err(Problem::Dhcp),
            "static" => {}
            other_method => {
                return Err(other(format!(
                    "method {other_method:?}: lbs handles static addresses only"
                )));
            }
        }
        let (lines, _) = lines(text);
        let address = address_of(&lines, start, end)?;
        let gateway = option(&lines, start, end, "gateway").and_then(|(_, g)| g.parse().ok());
        Ok(StaticConfig { address, gateway })
    }

    /// Replaces the value (second word) of an option line, keeping its indentation.
    fn set_word(line: &str, value: &str) -> String {
        let indent = &line[..line.len() - line.trim_start().len()];
        let mut words = line.split_whitespace();
        let name = words.next().unwrap_or("");
        let _old = words.next();
        let rest: Vec<&str> = words.collect();
        let mut out = format!("{indent}{name} {value}");
        for word in rest {
            out.push(' ');
            out.push_str(word);
        }
        out
    }

    pub(super) fn rewrite(
        text: &str,
        interface: &str,
        new: &StaticConfig,
    ) -> Result<String, String> {
        let (start, end, _) = stanza(text, interface).ok_or("no iface stanza")?;
        let (mut lines, newline) = lines(text);
        let (at, old) = option(&lines, start, end, "address").ok_or("no address line")?;
        let indent = lines[at][..lines[at].len() - lines[at].trim_start().len()].to_owned();
        if old.contains('/') {
            lines[at] = set_word(&lines[at], &new.address.to_string());
        } else {
            lines[at] = set_word(&lines[at], &new.address.addr.to_string());
            if let Some((m, _)) = option(&lines, start, end, "netmask") {
                lines[m] = set_word(&lines[m], &new.address.netmask().to_string());
            }
        }
        if let Some((b, _)) = option(&lines, start, end, "broadcast") {
            let broadcast = u32::from(new.address.network()) | !u32::from(new.address.netmask());
            lines[b] = set_word(&lines[b], &Ipv4Addr::from(broadcast).to_string());
        }
        if let Some((n, _)) = option(&lines, start, end, "network") {
            lines[n] = set_word(&lines[n], &new.address.network().to_string());
        }
        match (option(&lines, start, end, "gateway"), new.gateway) {
            (Some((g, _)), Some(ip)) => lines[g] = set_word(&lines[g], &ip.to_string()),
            (Some((g, _)), None) => {
                lines.remove(g);
            }
            (None, Some(ip)) => lines.insert(at + 1, format!("{indent}gateway {ip}")),
            (None, None) => {}
        }
        Ok(join(&lines, newline))
    }
}

mod keyfile {
    use super::*;

    pub(super) fn matches(text: &str, interface: &str) -> bool {
        let (lines, _) = lines(text);
        let sections = sections(&lines);
        lines.iter().zip(&sections).any(|(line, section)| {
            (section == "connection" || section == "match")
                && !is_comment(line)
                && key_value(line).is_some_and(|(k, v)| {
                    k == "interface-name" && v.split(';').any(|n| n.trim() == interface)
                })
        })
    }

    /// The first `key=value` line of `[ipv4]` for which `pick` says yes, with its index.
    fn find_ipv4<T>(
        lines: &[String],
        sections: &[String],
        pick: impl Fn(&str, &str) -> Option<T>,
    ) -> Option<(usize, T)> {
        lines
            .iter()
            .zip(sections)
            .enumerate()
            .find_map(|(i, (line, section))| {
                if section != "ipv4" || is_comment(line) {
                    return None;
                }
                let (key, value) = key_value(line)?;
                Some((i, pick(key, value)?))
            })
    }

    /// (line, address, inline gateway) of the first `address1=`/`addresses=` entry.
    fn find_address(
        lines: &[String],
        sections: &[String],
    ) -> Option<(usize, Ipv4Cidr, Option<Ipv4Addr>)> {
        let (i, (address, gateway)) = find_ipv4(lines, sections, |key, value| {
            if !key.starts_with("address") || key == "address-data" {
                return None;
            }
            let first = value.split(';').next()?.trim();
            let mut parts = first.split(',');
            let address: Ipv4Cidr = parts.next()?.trim().parse().ok()?;
            let gateway = parts.next().and_then(|g| g.trim().parse().ok());
            Some((address, gateway))
        })?;
        Some((i, address, gateway))
    }

    fn find_key(lines: &[String], sections: &[String], name: &str) -> Option<(usize, String)> {
        find_ipv4(lines, sections, |key, value| {
            (key == name).then(|| value.to_owned())
        })
    }

    pub(super) fn read(text: &str) -> Result<StaticConfig, Problem> {
        let (lines, _) = lines(text);
        let sections = sections(&lines);
        match find_key(&lines, &sections, "method").map(|(_, m)| m) {
            Some(m) if m == "auto" => return Err(Problem::Dhcp),
            Some(m) if m == "manual" => {}
            Some(m) => return Err(other(format!("ipv4 method {m:?}: lbs needs manual"))),
            None => return Err(other("no [ipv4] method")),
        }
        let (_, address, inline) =
            find_address(&lines, &sections).ok_or_else(|| other("no [ipv4] address1="))?;
        let gateway = inline
            .or_else(|| find_key(&lines, &sections, "gateway").and_then(|(_, g)| g.parse().ok()));
        Ok(StaticConfig { address, gateway })
    }

    pub(super) fn rewrite(text: &str, new: &StaticConfig) -> Result<String, String> {
        let (mut lines, newline) = lines(text);
        let sections = sections(&lines);
        let (at, _, inline) = find_address(&lines, &sections).ok_or("no [ipv4] address1=")?;
        let gateway_line = find_key(&lines, &sections, "gateway");
        let value = key_value(&lines[at])
            .map(|(_, v)| v.to_owned())
            .unwrap_or_default();
        let mut entries: Vec<String> = value.split(';').map(str::to_owned).collect();
        entries[0] = match (inline, new.gateway) {
            (Some(_), Some(ip)) => format!("{},{ip}", new.address),
            _ => new.address.to_string(),
        };
        lines[at] = set_value(&lines[at], &entries.join(";"));
        match (inline, gateway_line, new.gateway) {
            (Some(_), _, _) | (None, None, None) => {}
            (None, Some((g, _)), Some(ip)) => lines[g] = set_value(&lines[g], &ip.to_string()),
            (None, Some((g, _)), None) => {
                lines.remove(g);
            }
            (None, None, Some(ip)) => lines.insert(at + 1, format!("gateway={ip}")),
        }
        // NetworkManager's ipv4.dad-timeout: -1 (default) and 0 mean no probe at boot.
        let sections = super::sections(&lines);
        match find_key(&lines, &sections, "dad-timeout") {
            Some((d, value)) if value.parse::<i64>().is_ok_and(|v| v <= 0) => {
                lines[d] = set_value(&lines[d], "3000");
            }
            Some(_) => {}
            None => {
                let (at, _, _) = find_address(&lines, &sections).ok_or("address vanished")?;
                lines.insert(at + 1, "dad-timeout=3000".into());
            }
        }
        Ok(join(&lines, newline))
    }
}

mod ifcfg {
    use super::*;

    fn unquote(value: &str) -> &str {
        value.trim_matches(|c| c == '"' || c == '\'')
    }

    fn get<'a>(lines: &'a [String], names: &[&str]) -> Option<(usize, &'a str)> {
        lines.iter().enumerate().find_map(|(i, line)| {
            if is_comment(line) {
                return None;
            }
            let (key, value) = key_value(line)?;
            names.contains(&key).then(|| (i, unquote(value)))
        })
    }

    pub(super) fn matches(text: &str, interface: &str) -> bool {
        let (lines, _) = lines(text);
        get(&lines, &["DEVICE"]).is_some_and(|(_, d)| d == interface)
    }

    /// Keeps the quoting style of the line.
    fn set(line: &str, value: &str) -> String {
        let quote = key_value(line)
            .and_then(|(_, v)| v.chars().next())
            .filter(|c| *c == '"' || *c == '\'');
        match quote {
            Some(q) => set_value(line, &format!("{q}{value}{q}")),
            None => set_value(line, value),
        }
    }

    pub(super) fn read(text: &str) -> Result<StaticConfig, Problem> {
        let (lines, _) = lines(text);
        if let Some((_, proto)) = get(&lines, &["BOOTPROTO"])
            && matches!(proto.to_ascii_lowercase().as_str(), "dhcp" | "bootp")
        {
            return Err(Problem::Dhcp);
        }
        let (_, ip) = get(&lines, &["IPADDR", "IPADDR0"]).ok_or_else(|| other("no IPADDR"))?;
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|_| other(format!("IPADDR {ip:?} is not an IPv4 address")))?;
        let prefix = if let Some((_, p)) = get(&lines, &["PREFIX", "PREFIX0"]) {
            p.parse::<u8>()
                .map_err(|_| other(format!("PREFIX {p:?}")))?
        } else if let Some((_, m)) = get(&lines, &["NETMASK", "NETMASK0"]) {
            let mask: Ipv4Addr = m.parse().map_err(|_| other(format!("NETMASK {m:?}")))?;
            u32::from(mask).leading_ones() as u8
        } else {
            return Err(other("neither PREFIX nor NETMASK"));
        };
        let address = Ipv4Cidr::new(ip, prefix).ok_or_else(|| other("prefix over 32"))?;
        let gateway = get(&lines, &["GATEWAY", "GATEWAY0"]).and_then(|(_, g)| g.parse().ok());
        Ok(StaticConfig { address, gateway })
    }

    pub(super) fn rewrite(text: &str, new: &StaticConfig) -> Result<String, String> {
        let (mut lines, newline) = lines(text);
        let (at, _) = get(&lines, &["IPADDR", "IPADDR0"]).ok_or("no IPADDR")?;
        lines[at] = set(&lines[at], &new.address.addr.to_string());
        if let Some((p, _)) = get(&lines, &["PREFIX", "PREFIX0"]) {
            lines[p] = set(&lines[p], &new.address.prefix.to_string());
        }
        if let Some((m, _)) = get(&lines, &["NETMASK", "NETMASK0"]) {
            lines[m] = set(&lines[m], &new.address.netmask().to_string());
        }
        match (
            get(&lines, &["GATEWAY", "GATEWAY0"]).map(|(g, _)| g),
            new.gateway,
        ) {
            (Some(g), Some(ip)) => lines[g] = set(&lines[g], &ip.to_string()),
            (Some(g), None) => {
                lines.remove(g);
            }
            (None, Some(ip)) => lines.insert(at + 1, format!("GATEWAY={ip}")),
            (None, None) => {}
        }
        // ARPCHECK (default yes) probes the address before ifup takes it.
        if let Some((a, value)) = get(&lines, &["ARPCHECK"])
            && value.eq_ignore_ascii_case("no")
        {
            lines[a] = set(&lines[a], "yes");
        }
        Ok(join(&lines, newline))
    }
}
