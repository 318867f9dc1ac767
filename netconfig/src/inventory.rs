//! The hardware inventory: what a box is made of, read from `/proc` and `/sys`, and a
//! comparison that names every difference between two boxes of a pair (DESIGN §8: identical
//! hardware is a pre-flight check; a mismatch is a warning in status and at promotion).
//!
//! Telephony cards matter most: a backup without the primary's E1/T1 or analogue card cannot
//! carry its lines.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

pub use lbs_protocol::inventory::{Disk, Inventory, Nic, PciCard, TELEPHONY_VENDORS};

/// Why the inventory could not be read.
#[derive(Debug, thiserror::Error)]
#[error("reading {}: {source}", path.display())]
pub struct InventoryError {
    pub path: PathBuf,
    /// What the system said.
    pub source: io::Error,
}

fn read(path: PathBuf) -> Result<String, InventoryError> {
    fs::read_to_string(&path).map_err(|source| InventoryError { path, source })
}

/// Entries of a directory, sorted by name; a missing directory has none.
fn names(dir: &Path) -> Result<Vec<String>, InventoryError> {
    let listing = match fs::read_dir(dir) {
        Ok(listing) => listing,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(InventoryError {
                path: dir.to_owned(),
                source,
            });
        }
    };
    let mut names: Vec<String> = listing
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok(names)
}

fn hex_id(text: &str) -> Option<u16> {
    u16::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
}

/// Reading a box's [`Inventory`] from its `/proc` and `/sys`.
pub trait Collect: Sized {
    /// This machine's inventory.
    fn collect() -> Result<Self, InventoryError>;
    /// The inventory of the `proc` and `sys` trees under `root` (`/` on a box; a fixture in
    /// tests).
    fn collect_under(root: &Path) -> Result<Self, InventoryError>;
}

impl Collect for Inventory {
    fn collect() -> Result<Inventory, InventoryError> {
        Inventory::collect_under(Path::new("/"))
    }

    fn collect_under(root: &Path) -> Result<Inventory, InventoryError> {
        let cpuinfo = read(root.join("proc/cpuinfo"))?;
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                let (key, value) = l.split_once(':')?;
                (key.trim() == "model name").then(|| value.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let cpus = cpuinfo
            .lines()
            .filter(|l| l.split(':').next().is_some_and(|k| k.trim() == "processor"))
            .count() as u32;
        let meminfo = read(root.join("proc/meminfo"))?;
        let memory_bytes = meminfo
            .lines()
            .find_map(|l| {
                let rest = l.strip_prefix("MemTotal:")?;
                rest.split_whitespace().next()?.parse::<u64>().ok()
            })
            .unwrap_or(0)
            * 1024;

        let mut disks = Vec::new();
        let block = root.join("sys/block");
        for name in names(&block)? {
            let dir = block.join(&name);
            let virtual_device = ["loop", "ram", "zram", "dm-", "md", "sr"]
                .iter()
                .any(|prefix| name.starts_with(prefix));
            if virtual_device || !dir.join("device").exists() {
                continue;
            }
            let sectors: u64 = read(dir.join("size"))?.trim().parse().unwrap_or(0);
            let rotational =
                fs::read_to_string(dir.join("queue/rotational")).is_ok_and(|t| t.trim() == "1");
            disks.push(Disk {
                name,
                bytes: sectors * 512,
                rotational,
            });
        }

        let mut nics = Vec::new();
        let net = root.join("sys/class/net");
        for name in names(&net)? {
            let dir = net.join(&name);
            if !dir.join("device").exists() {
                continue;
            }
            let mac = read(dir.join("address"))?
                .trim()
                .parse()
                .unwrap_or_default();
            let speed_mbps = fs::read_to_string(dir.join("speed"))
                .ok()
                .and_then(|t| t.trim().parse::<i64>().ok())
                .and_then(|s| u32::try_from(s).ok());
            nics.push(Nic {
                name,
                mac,
                speed_mbps,
            });
        }

        let mut telephony = Vec::new();
        let pci = root.join("sys/bus/pci/devices");
        for slot in names(&pci)? {
            let dir = pci.join(&slot);
            let Some(vendor_id) = fs::read_to_string(dir.join("vendor"))
                .ok()
                .as_deref()
                .and_then(hex_id)
            else {
                continue;
            };
            let Some((_, vendor)) = TELEPHONY_VENDORS.iter().find(|(id, _)| *id == vendor_id)
            else {
                continue;
            };
            let device_id = fs::read_to_string(dir.join("device"))
                .ok()
                .as_deref()
                .and_then(hex_id)
                .unwrap_or(0);
            telephony.push(PciCard {
                vendor: (*vendor).to_owned(),
                vendor_id,
                device_id,
                slot,
            });
        }

        Ok(Inventory {
            cpu_model,
            cpus,
            memory_bytes,
            disks,
            nics,
            telephony,
        })
    }
}
