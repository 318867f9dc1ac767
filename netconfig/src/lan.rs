//! What keeps running on the LAN after a takeover: the slow refresh of the announcement
//! ([`Refresh`]) and the watch for another machine claiming the address ([`ConflictWatch`]).
//! Both are owned handles: dropping one stops its work.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::arp::PacketSocket;
use crate::backend::{Arp, NetError};
use crate::types::{LinkInfo, MacAddr};

/// Re-announces an address every `every` for `duration`: switches and phones that missed
/// the burst (a port coming up late, a cache refreshed from a stale reply) converge within one
/// interval. Stops when dropped or when [`Refresh::stop`] is awaited.
#[derive(Debug)]
pub struct Refresh {
    task: tokio::task::JoinHandle<u32>,
}

impl Refresh {
    /// Starts the refresh on the current tokio runtime.
    pub fn start<A: Arp + Clone + Send + 'static>(
        arp: A,
        link: LinkInfo,
        ip: Ipv4Addr,
        every: Duration,
        duration: Duration,
    ) -> Refresh {
        let task = tokio::spawn(async move {
            let until = tokio::time::Instant::now() + duration;
            let mut sent = 0;
            let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
            tick.tick().await;
            while tokio::time::Instant::now() < until {
                tick.tick().await;
                match arp.announce(&link, ip, 1).await {
                    Ok(()) => sent += 1,
                    Err(err) => tracing::warn!("refreshing the announcement of {ip}: {err}"),
                }
            }
            sent
        });
        Refresh { task }
    }

    /// Waits for the refresh to end (its duration over) and returns how many announcements
    /// it sent.
    pub async fn finish(mut self) -> u32 {
        (&mut self.task).await.unwrap_or(0)
    }

    /// Stops it now.
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for Refresh {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Another machine claiming our address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub ip: Ipv4Addr,
    /// Who claims it.
    pub mac: MacAddr,
    /// When we saw it.
    pub at: Instant,
    /// Only probing for it (RFC 5227: sender 0.0.0.0), not using it yet.
    pub probing: bool,
}

/// Watches the LAN for ARP from another MAC using (or probing for) our address: the old
/// primary coming back with it, or a misconfigured device. Reports arrive on
/// [`ConflictWatch::next`]; dropping the watch stops it within [`ConflictWatch::POLL`].
#[derive(Debug)]
pub struct ConflictWatch {
    conflicts: mpsc::Receiver<Conflict>,
    stop: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<Result<(), String>>>,
}

impl ConflictWatch {
    /// How often the blocking reader looks at its stop flag.
    pub const POLL: Duration = Duration::from_millis(100);

    /// Starts watching `ip` on `link` (needs root). The socket is open when this returns, so
    /// nothing sent afterwards is missed.
    pub fn start(link: &LinkInfo, ip: Ipv4Addr) -> Result<ConflictWatch, NetError> {
        let mut socket = PacketSocket::open(link.index).map_err(|e| NetError::Os {
            what: format!("watching {ip} on {}", link.name),
            reason: e.to_string(),
        })?;
        let (tx, conflicts) = mpsc::channel(16);
        let stop = Arc::new(AtomicBool::new(false));
        let ours = link.mac;
        let stopping = stop.clone();
        let task = tokio::task::spawn_blocking(move || -> Result<(), String> {
            let mut buf = [0u8; 1500];
            while !stopping.load(Ordering::Relaxed) {
                let Some(len) = socket
                    .recv(&mut buf, ConflictWatch::POLL)
                    .map_err(|e| e.to_string())?
                else {
                    continue;
                };
                if let Some((mac, probing)) = crate::arp::conflict(&buf[..len], ours, ip) {
                    let conflict = Conflict {
                        ip,
                        mac,
                        at: Instant::now(),
                        probing,
                    };
                    if tx.blocking_send(conflict).is_err() {
                        return Ok(());
                    }
                }
            }
            Ok(())
        });
        Ok(ConflictWatch {
            conflicts,
            stop,
            task: Some(task),
        })
    }

    /// The next conflict, or `None` once the watch has ended (its socket failed).
    pub async fn next(&mut self) -> Option<Conflict> {
        self.conflicts.recv().await
    }

    /// Stops the watch and waits for its reader; returns its error, if it failed.
    pub async fn stop(mut self) -> Result<(), String> {
        self.stop.store(true, Ordering::Relaxed);
        self.conflicts.close();
        match self.task.take() {
            Some(task) => task.await.map_err(|e| e.to_string())?,
            None => Ok(()),
        }
    }
}

impl Drop for ConflictWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.conflicts.close();
    }
}

/// The MAC the kernel has resolved for `ip` on `interface` (from `/proc/net/arp` of this
/// network namespace), if it has a complete entry: a primary learns its partner's this way,
/// from the traffic the backup sends it all the time.
pub fn neighbour_mac(interface: &str, ip: Ipv4Addr) -> Option<MacAddr> {
    let table = std::fs::read_to_string("/proc/net/arp").ok()?;
    neighbour_in(&table, interface, ip)
}

/// [`neighbour_mac`] on the text of `/proc/net/arp`.
fn neighbour_in(table: &str, interface: &str, ip: Ipv4Addr) -> Option<MacAddr> {
    // IP address, HW type, Flags, HW address, Mask, Device; ATF_COM (0x2): complete.
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [address, _, flags, mac, _, device] = fields.as_slice() else {
            return None;
        };
        let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).ok()?;
        (address.parse::<Ipv4Addr>().ok()? == ip && *device == interface && flags & 0x2 != 0)
            .then(|| mac.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FakeNet;

    #[test]
    fn a_neighbour_is_found_by_address_and_interface_when_complete() {
        let table = "IP address       HW type     Flags       HW address            Mask     Device
192.168.1.3      0x1         0x2         5a:ec:b4:27:71:cf     *        eth0
192.168.1.4      0x1         0x0         00:00:00:00:00:00     *        eth0
192.168.1.3      0x1         0x2         66:66:66:66:66:66     *        eth1
";
        let ip = |last| Ipv4Addr::new(192, 168, 1, last);
        assert_eq!(
            neighbour_in(table, "eth0", ip(3)),
            Some("5a:ec:b4:27:71:cf".parse().unwrap())
        );
        assert_eq!(neighbour_in(table, "eth0", ip(4)), None, "incomplete");
        assert_eq!(neighbour_in(table, "eth0", ip(5)), None);
        assert_eq!(neighbour_in("garbage\n1 2 3\n", "eth0", ip(3)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_announces_on_its_interval_until_its_time_is_up() {
        let net = Arc::new(FakeNet::new());
        let link = net.add_link("eth0", MacAddr([2, 0, 0, 0, 0, 3]), &[]);
        let ip = Ipv4Addr::new(192, 168, 1, 2);
        let refresh = Refresh::start(
            net.clone(),
            link,
            ip,
            Duration::from_secs(2),
            Duration::from_secs(10),
        );
        // Paused time runs ahead whenever every task waits.
        let sent = refresh.finish().await;
        assert!((4..=6).contains(&sent), "{sent}");
        assert_eq!(net.announced().len() as u32, sent);

        let refresh = Refresh::start(
            net.clone(),
            net.link_named("eth0").expect("added"),
            ip,
            Duration::from_secs(2),
            Duration::from_secs(3600),
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
        refresh.stop();
        let before = net.announced().len();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(net.announced().len(), before, "nothing after stop");
    }
}
