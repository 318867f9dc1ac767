//! ARP on the wire: RFC 5227 probes and gratuitous announcements on an `AF_PACKET` socket.
//!
//! A probe asks "who has 192.168.1.2?" from 0.0.0.0, so no host's cache learns anything from
//! it, and listens for anyone else using the address. An announcement is an ARP request (and
//! the same as a reply, for devices that only honour one form) with sender and target both the
//! address: every host holding an entry for it moves it to our MAC at once.

// Raw packet sockets have no safe wrapper in our dependencies: `socket` and `bind` with a
// `sockaddr_ll` are the only unsafe calls, each checked, and the descriptor is owned at once.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::backend::{Arp, NetError, ProbeResult};
use crate::types::{LinkInfo, MacAddr};

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;
/// Ethernet header (14) + ARP for IPv4 (28), padded to Ethernet's minimum of 60.
const FRAME_LEN: usize = 60;

/// How long and how often to probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeProfile {
    /// Probes sent.
    pub probes: u32,
    /// Time between probes.
    pub interval: Duration,
    /// Time listened after the last probe.
    pub wait: Duration,
}

impl ProbeProfile {
    /// RFC 5227's timing (PROBE_NUM 3, one a second, ANNOUNCE_WAIT 2 s): about 4 s, for an
    /// address taken at boot or by an operator without hurry.
    pub const RFC5227: ProbeProfile = ProbeProfile {
        probes: 3,
        interval: Duration::from_secs(1),
        wait: Duration::from_secs(2),
    };

    /// For a takeover on a LAN (a live holder answers within microseconds; measured in
    /// namespaces): three probes 20 ms apart, then 100 ms of listening — 140 ms.
    pub const FAST: ProbeProfile = ProbeProfile {
        probes: 3,
        interval: Duration::from_millis(20),
        wait: Duration::from_millis(100),
    };
}

/// [`Arp`] on raw packet sockets (needs root, or `CAP_NET_RAW`).
///
/// One socket per interface is opened on first use and kept until this is dropped: closing a
/// packet socket waits for an RCU grace period (20–30 ms measured), which would otherwise
/// land inside the takeover's timed steps.
#[derive(Clone, Debug)]
pub struct PacketArp {
    /// The probe's timing.
    pub profile: ProbeProfile,
    sockets: Arc<Mutex<HashMap<u32, PacketSocket>>>,
}

impl PacketArp {
    /// With this probe timing.
    pub fn new(profile: ProbeProfile) -> PacketArp {
        PacketArp {
            profile,
            sockets: Arc::default(),
        }
    }

    /// Runs `body` (blocking, off the async threads) with the socket of interface `index`,
    /// opening it if needed.
    async fn with_socket<T: Send + 'static>(
        &self,
        index: u32,
        what: String,
        body: impl FnOnce(&mut PacketSocket) -> io::Result<T> + Send + 'static,
    ) -> Result<T, NetError> {
        let sockets = self.sockets.clone();
        tokio::task::spawn_blocking(move || -> io::Result<T> {
            let mut sockets = sockets
                .lock()
                .map_err(|_| io::Error::other("ARP socket lock poisoned"))?;
            let socket = match sockets.entry(index) {
                Entry::Occupied(open) => open.into_mut(),
                Entry::Vacant(slot) => slot.insert(PacketSocket::open(index)?),
            };
            body(socket)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
        .map_err(|reason| os_error(what, reason))
    }
}

impl Arp for PacketArp {
    async fn probe(&self, link: &LinkInfo, ip: Ipv4Addr) -> Result<ProbeResult, NetError> {
        let (mac, profile) = (link.mac, self.profile);
        let what = format!("probing {ip} on {}", link.name);
        self.with_socket(link.index, what, move |socket| {
            probe_on(socket, mac, ip, profile)
        })
        .await
    }

    async fn announce(&self, link: &LinkInfo, ip: Ipv4Addr, count: u32) -> Result<(), NetError> {
        let mac = link.mac;
        let what = format!("announcing {ip} on {}", link.name);
        self.with_socket(link.index, what, move |socket| {
            for n in 0..count {
                // Alternate the request and reply forms; both say "ip is at mac".
                let op = if n % 2 == 0 {
                    ArpOp::Request
                } else {
                    ArpOp::Reply
                };
                socket.send(&frame(
                    op,
                    mac,
                    ip,
                    MacAddr::default(),
                    ip,
                    MacAddr::BROADCAST,
                ))?;
            }
            Ok(())
        })
        .await
    }
}

fn os_error(what: String, reason: String) -> NetError {
    if reason.contains("Operation not permitted") {
        NetError::Permission { what }
    } else {
        NetError::Os { what, reason }
    }
}

fn probe_on(
    socket: &mut PacketSocket,
    mac: MacAddr,
    ip: Ipv4Addr,
    profile: ProbeProfile,
) -> io::Result<ProbeResult> {
    let mut buf = [0u8; 1500];
    // Frames queued since the socket's last use are old news.
    while socket.recv(&mut buf, Duration::ZERO)?.is_some() {}
    let probe = frame(
        ArpOp::Request,
        mac,
        Ipv4Addr::UNSPECIFIED,
        MacAddr::default(),
        ip,
        MacAddr::BROADCAST,
    );
    for n in 0..profile.probes.max(1) {
        socket.send(&probe)?;
        let listen = if n + 1 == profile.probes.max(1) {
            profile.wait
        } else {
            profile.interval
        };
        let until = Instant::now() + listen;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            let Some(len) = socket.recv(&mut buf, left)? else {
                break;
            };
            if let Some((holder, _)) = conflict(&buf[..len], mac, ip) {
                return Ok(ProbeResult::InUse(holder));
            }
        }
    }
    Ok(ProbeResult::Free)
}

/// Who else claims `ip` in this frame, if anyone, and whether it only probes: an ARP from `ip`
/// (a reply to our probe, or any use of it), or another host probing for it at the same time
/// (RFC 5227 §2.1.1).
pub(crate) fn conflict(frame: &[u8], ours: MacAddr, ip: Ipv4Addr) -> Option<(MacAddr, bool)> {
    let arp = parse(frame)?;
    if arp.sender_mac == ours {
        return None;
    }
    let probing_too = arp.op == 1 && arp.sender_ip == Ipv4Addr::UNSPECIFIED && arp.target_ip == ip;
    (arp.sender_ip == ip || probing_too).then_some((arp.sender_mac, probing_too))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ArpOp {
    Request = 1,
    Reply = 2,
}

/// An Ethernet frame carrying one ARP packet for IPv4.
fn frame(
    op: ArpOp,
    sender_mac: MacAddr,
    sender_ip: Ipv4Addr,
    target_mac: MacAddr,
    target_ip: Ipv4Addr,
    destination: MacAddr,
) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&destination.0);
    f[6..12].copy_from_slice(&sender_mac.0);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&ETH_P_IP.to_be_bytes());
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&(op as u16).to_be_bytes());
    f[22..28].copy_from_slice(&sender_mac.0);
    f[28..32].copy_from_slice(&sender_ip.octets());
    f[32..38].copy_from_slice(&target_mac.0);
    f[38..42].copy_from_slice(&target_ip.octets());
    f
}

/// The fields of an ARP-for-IPv4-over-Ethernet frame.
#[derive(Debug, PartialEq, Eq)]
struct Parsed {
    op: u16,
    sender_mac: MacAddr,
    sender_ip: Ipv4Addr,
    target_ip: Ipv4Addr,
}

fn parse(frame: &[u8]) -> Option<Parsed> {
    let f = frame.get(..42)?;
    if f[12..14] != ETH_P_ARP.to_be_bytes()
        || f[14..16] != 1u16.to_be_bytes()
        || f[16..18] != ETH_P_IP.to_be_bytes()
        || f[18] != 6
        || f[19] != 4
    {
        return None;
    }
    let mac = |at: usize| {
        let mut bytes = [0u8; 6];
        bytes.copy_from_slice(&f[at..at + 6]);
        MacAddr(bytes)
    };
    let ip = |at: usize| Ipv4Addr::new(f[at], f[at + 1], f[at + 2], f[at + 3]);
    Some(Parsed {
        op: u16::from_be_bytes([f[20], f[21]]),
        sender_mac: mac(22),
        sender_ip: ip(28),
        target_ip: ip(38),
    })
}

/// An `AF_PACKET` socket for ARP frames, bound to one interface.
#[derive(Debug)]
pub(crate) struct PacketSocket {
    file: File,
}

impl PacketSocket {
    pub(crate) fn open(index: u32) -> io::Result<PacketSocket> {
        let protocol = ETH_P_ARP.to_be();
        // SAFETY: plain socket(2) call; the result is checked and owned immediately.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(protocol),
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor we just opened and nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = i32::try_from(index).map_err(io::Error::other)?;
        // SAFETY: `addr` is a live sockaddr_ll and the length given is its size.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast::<libc::sockaddr>(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if bound < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(PacketSocket {
            file: File::from(fd),
        })
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.file.write_all(frame)
    }

    /// The next frame, or `None` if none came within `timeout`.
    pub(crate) fn recv(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let millis = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(millis)) {
            Ok(0) => Ok(None),
            Ok(_) => self.file.read(buf).map(Some),
            Err(nix::errno::Errno::EINTR) => Ok(Some(0)),
            Err(errno) => Err(io::Error::from(errno)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_parse_back_and_conflicts_are_recognised() {
        let ours: MacAddr = "02:00:00:00:00:03".parse().expect("valid");
        let theirs: MacAddr = "5a:ec:b4:27:71:cf".parse().expect("valid");
        let ip = Ipv4Addr::new(192, 168, 1, 2);
        let probe = frame(
            ArpOp::Request,
            ours,
            Ipv4Addr::UNSPECIFIED,
            MacAddr::default(),
            ip,
            MacAddr::BROADCAST,
        );
        let parsed = parse(&probe).expect("an ARP frame");
        assert_eq!(parsed.op, 1);
        assert_eq!(parsed.sender_ip, Ipv4Addr::UNSPECIFIED);
        assert_eq!(parsed.target_ip, ip);
        // Our own probe, looped back to us, is no conflict.
        assert_eq!(conflict(&probe, ours, ip), None);
        // The holder's reply is.
        let reply = frame(ArpOp::Reply, theirs, ip, ours, Ipv4Addr::UNSPECIFIED, ours);
        assert_eq!(conflict(&reply, ours, ip), Some((theirs, false)));
        // So is another host probing for the same address.
        let rival = frame(
            ArpOp::Request,
            theirs,
            Ipv4Addr::UNSPECIFIED,
            MacAddr::default(),
            ip,
            MacAddr::BROADCAST,
        );
        assert_eq!(conflict(&rival, ours, ip), Some((theirs, true)));
        // Someone else's business is not.
        let other = frame(
            ArpOp::Request,
            theirs,
            Ipv4Addr::new(192, 168, 1, 9),
            MacAddr::default(),
            Ipv4Addr::new(192, 168, 1, 1),
            MacAddr::BROADCAST,
        );
        assert_eq!(conflict(&other, ours, ip), None);
        // Garbage is ignored, whatever its length.
        assert_eq!(parse(&[0u8; 10]), None);
        assert_eq!(parse(&[0xffu8; 60]), None);
    }
}
