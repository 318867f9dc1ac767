//! The hardware inventory of a box (DESIGN §8) and the comparison that names every
//! difference between the two boxes of a pair: identical hardware is a pre-flight check; a
//! mismatch is a warning in status and at promotion. `lbs-netconfig` reads it from `/proc`
//! and `/sys`; the data center compares what the boxes sent.
//!
//! Telephony cards matter most: a backup without the primary's E1/T1 or analogue card cannot
//! carry its lines.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::net::MacAddr;

/// PCI vendors of telephony cards, by id (`/sys/bus/pci/devices/*/vendor`).
pub const TELEPHONY_VENDORS: &[(u16, &str)] =
    &[(0xd161, "Digium"), (0x1923, "Sangoma"), (0x1b74, "OpenVox")];

/// One box's hardware.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    /// `model name` of the first processor in `/proc/cpuinfo`.
    pub cpu_model: String,
    /// Logical processors.
    pub cpus: u32,
    /// `MemTotal`, bytes.
    pub memory_bytes: u64,
    /// Physical disks (loop, RAM and device-mapper devices left out), by name.
    pub disks: Vec<Disk>,
    /// Physical network interfaces (those with a device behind them), by name.
    pub nics: Vec<Nic>,
    /// PCI cards of known telephony vendors.
    pub telephony: Vec<PciCard>,
}

/// A block device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// `sda`, `nvme0n1`.
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
    /// A spinning disk.
    pub rotational: bool,
}

/// A network interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// `eth0`.
    pub name: String,
    /// Its MAC.
    pub mac: MacAddr,
    /// Link speed in Mb/s when known (not without carrier).
    pub speed_mbps: Option<u32>,
}

/// A PCI card.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PciCard {
    /// The vendor's name.
    pub vendor: String,
    /// PCI vendor id.
    pub vendor_id: u16,
    /// PCI device id.
    pub device_id: u16,
    /// The slot (`0000:03:00.0`).
    pub slot: String,
}

impl fmt::Display for PciCard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} card {:04x}:{:04x} (slot {})",
            self.vendor, self.vendor_id, self.device_id, self.slot
        )
    }
}

impl Inventory {
    /// Every difference that matters between this box (`self`) and its partner, one sentence
    /// each; empty when they match. Memory and disk sizes may differ by 2% (firmware and
    /// kernel reservations vary between identical machines); names of disks and interfaces
    /// are not compared, their number, sizes and speeds are; telephony cards must match
    /// exactly by vendor and device.
    pub fn compare(&self, partner: &Inventory) -> Vec<String> {
        let mut out = Vec::new();
        if self.cpu_model != partner.cpu_model {
            out.push(format!(
                "CPU: this box has {:?}, the partner {:?}",
                self.cpu_model, partner.cpu_model
            ));
        }
        if self.cpus != partner.cpus {
            out.push(format!(
                "CPU count: this box has {}, the partner {}",
                self.cpus, partner.cpus
            ));
        }
        if !close(self.memory_bytes, partner.memory_bytes) {
            out.push(format!(
                "memory: this box has {}, the partner {}",
                gib(self.memory_bytes),
                gib(partner.memory_bytes)
            ));
        }
        let sizes = |inv: &Inventory| {
            let mut sizes: Vec<u64> = inv.disks.iter().map(|d| d.bytes).collect();
            sizes.sort_unstable();
            sizes
        };
        let (ours, theirs) = (sizes(self), sizes(partner));
        if ours.len() != theirs.len() || ours.iter().zip(&theirs).any(|(a, b)| !close(*a, *b)) {
            let list = |s: &[u64]| s.iter().map(|b| gib(*b)).collect::<Vec<_>>().join(", ");
            out.push(format!(
                "disks: this box has {} ({}), the partner {} ({})",
                ours.len(),
                list(&ours),
                theirs.len(),
                list(&theirs)
            ));
        }
        if self.nics.len() != partner.nics.len() {
            out.push(format!(
                "network interfaces: this box has {}, the partner {}",
                self.nics.len(),
                partner.nics.len()
            ));
        }
        let mut ours: Vec<(u16, u16, &PciCard)> = self
            .telephony
            .iter()
            .map(|c| (c.vendor_id, c.device_id, c))
            .collect();
        let mut theirs: Vec<(u16, u16, &PciCard)> = partner
            .telephony
            .iter()
            .map(|c| (c.vendor_id, c.device_id, c))
            .collect();
        ours.sort();
        theirs.sort();
        // A multiset difference: each card of one box pairs with one identical card of the
        // other.
        let mut unmatched_theirs: Vec<bool> = vec![true; theirs.len()];
        for (vendor, device, card) in &ours {
            match theirs
                .iter()
                .enumerate()
                .position(|(i, (v, d, _))| unmatched_theirs[i] && v == vendor && d == device)
            {
                Some(i) => unmatched_theirs[i] = false,
                None => out.push(format!(
                    "telephony: this box's {card} is missing on the partner"
                )),
            }
        }
        for (i, (_, _, card)) in theirs.iter().enumerate() {
            if unmatched_theirs[i] {
                out.push(format!(
                    "telephony: the partner's {card} is missing on this box"
                ));
            }
        }
        out
    }
}

/// Within 2% of each other.
fn close(a: u64, b: u64) -> bool {
    let (small, large) = (a.min(b), a.max(b));
    large - small <= large / 50
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}
