//! The application heartbeat through each tunnel: a box sends a numbered datagram to its
//! data center's overlay address every probe interval and the endpoint echoes it. Handshake
//! age and byte counters cannot show a dead tunnel quickly; an answered heartbeat shows the
//! whole path (underlay, both WireGuard devices, the data center's stack) working.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Instant;

use lbs_netconfig::Ipv4Cidr;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::error::VpnError;

/// The UDP port endpoints answer heartbeats on, unless configured otherwise.
pub const HEARTBEAT_PORT: u16 = 51_821;

const MAGIC: [u8; 8] = *b"lbs-hb-1";
const LEN: usize = 16;

/// A heartbeat datagram.
pub fn packet(seq: u64) -> [u8; LEN] {
    let mut out = [0u8; LEN];
    out[..8].copy_from_slice(&MAGIC);
    out[8..].copy_from_slice(&seq.to_be_bytes());
    out
}

/// The sequence number of a heartbeat datagram; `None` for anything else.
pub fn parse(datagram: &[u8]) -> Option<u64> {
    if datagram.len() != LEN || datagram[..8] != MAGIC {
        return None;
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&datagram[8..]);
    Some(u64::from_be_bytes(seq))
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> VpnError {
    move |error| VpnError::Io { what, error }
}

/// Echoes heartbeats arriving at an address from inside the overlay; stops when dropped.
#[derive(Debug)]
pub struct Responder {
    task: tokio::task::JoinHandle<()>,
    local: SocketAddr,
}

impl Responder {
    /// Answers on `address:port`, to senders inside `overlay` only.
    pub async fn bind(
        address: Ipv4Addr,
        port: u16,
        overlay: Ipv4Cidr,
    ) -> Result<Responder, VpnError> {
        let socket = UdpSocket::bind(SocketAddrV4::new(address, port))
            .await
            .map_err(io(format!("listening for heartbeats on {address}:{port}")))?;
        let local = socket
            .local_addr()
            .map_err(io("reading the heartbeat address".into()))?;
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                let (len, from) = match socket.recv_from(&mut buf).await {
                    Ok(got) => got,
                    Err(err) => {
                        tracing::debug!(%err, "heartbeat receive");
                        continue;
                    }
                };
                let inside = match from {
                    SocketAddr::V4(v4) => overlay.contains(*v4.ip()),
                    SocketAddr::V6(_) => false,
                };
                if inside && parse(&buf[..len]).is_some() {
                    let _ = socket.send_to(&buf[..len], from).await;
                }
            }
        });
        Ok(Responder { task, local })
    }

    /// Where it answers.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An answer: which prober, which heartbeat, when it came.
#[derive(Clone, Copy, Debug)]
pub struct Echo {
    /// The prober's index.
    pub tunnel: usize,
    /// The heartbeat's number.
    pub seq: u64,
    /// When it arrived.
    pub at: Instant,
}

/// Heartbeats through several interfaces, one socket each, with their answers on one
/// channel. The receiving tasks belong to this value and stop with it.
#[derive(Debug)]
pub struct Probers {
    sockets: Vec<Arc<UdpSocket>>,
    _readers: JoinSet<()>,
}

impl Probers {
    /// One socket per `(interface, target)`, bound to the interface and to `source`, so
    /// each heartbeat leaves through its own tunnel whatever the routes say.
    pub async fn open(
        source: Ipv4Addr,
        targets: &[(String, SocketAddrV4)],
    ) -> Result<(Probers, mpsc::Receiver<Echo>), VpnError> {
        let (tx, rx) = mpsc::channel(256);
        let mut readers = JoinSet::new();
        let mut sockets = Vec::new();
        for (tunnel, (interface, target)) in targets.iter().enumerate() {
            let what = format!("opening the heartbeat socket through {interface}");
            let socket = UdpSocket::bind(SocketAddrV4::new(source, 0))
                .await
                .map_err(io(what.clone()))?;
            socket
                .bind_device(Some(interface.as_bytes()))
                .map_err(io(what.clone()))?;
            socket.connect(target).await.map_err(io(what))?;
            let socket = Arc::new(socket);
            let reader = Arc::clone(&socket);
            let tx = tx.clone();
            readers.spawn(async move {
                let mut buf = [0u8; 64];
                loop {
                    match reader.recv(&mut buf).await {
                        Ok(len) => {
                            if let Some(seq) = parse(&buf[..len]) {
                                let echo = Echo {
                                    tunnel,
                                    seq,
                                    at: Instant::now(),
                                };
                                if tx.send(echo).await.is_err() {
                                    return;
                                }
                            }
                        }
                        // ICMP errors (port unreachable while an endpoint restarts) surface
                        // here; the heartbeat simply goes unanswered.
                        Err(err) => tracing::debug!(%err, tunnel, "heartbeat receive"),
                    }
                }
            });
            sockets.push(socket);
        }
        Ok((
            Probers {
                sockets,
                _readers: readers,
            },
            rx,
        ))
    }

    /// Sends heartbeat `seq` through tunnel `tunnel`; a failure to send is a lost heartbeat,
    /// not an error.
    pub fn send(&self, tunnel: usize, seq: u64) {
        if let Some(socket) = self.sockets.get(tunnel)
            && let Err(err) = socket.try_send(&packet(seq))
        {
            tracing::debug!(%err, tunnel, "heartbeat send");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn heartbeats_round_trip_and_strangers_are_not_heartbeats() {
        assert_eq!(parse(&packet(0)), Some(0));
        assert_eq!(parse(&packet(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse(b"lbs-hb-1"), None);
        let mut other = packet(5);
        other[0] = b'X';
        assert_eq!(parse(&other), None);
        assert_eq!(parse(&[packet(1).as_slice(), &[0]].concat()), None);
    }

    #[tokio::test]
    async fn the_responder_echoes_heartbeats_from_inside_the_overlay_only() {
        let loopback: Ipv4Cidr = "127.0.0.0/8".parse().unwrap();
        let responder = Responder::bind(Ipv4Addr::LOCALHOST, 0, loopback)
            .await
            .unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(responder.local_addr()).await.unwrap();
        client.send(&packet(42)).await.unwrap();
        let mut buf = [0u8; 64];
        let len = tokio::time::timeout(std::time::Duration::from_secs(5), client.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(parse(&buf[..len]), Some(42));

        // Not a heartbeat: no answer.
        client.send(b"hello").await.unwrap();
        let silent =
            tokio::time::timeout(std::time::Duration::from_millis(200), client.recv(&mut buf))
                .await;
        assert!(silent.is_err(), "answered a non-heartbeat");

        // A heartbeat from outside the overlay: no answer either.
        let elsewhere: Ipv4Cidr = "10.0.0.0/8".parse().unwrap();
        let strict = Responder::bind(Ipv4Addr::LOCALHOST, 0, elsewhere)
            .await
            .unwrap();
        client.connect(strict.local_addr()).await.unwrap();
        client.send(&packet(1)).await.unwrap();
        let silent =
            tokio::time::timeout(std::time::Duration::from_millis(200), client.recv(&mut buf))
                .await;
        assert!(silent.is_err(), "answered a stranger");
    }
}
