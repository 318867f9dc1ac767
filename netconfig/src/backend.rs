//! What the takeover needs from the machine: a [`NetBackend`] for links, addresses and
//! routes, and an [`Arp`] for probing and announcing on the LAN.

use std::future::Future;
use std::net::Ipv4Addr;

use crate::types::{DefaultRoute, Ipv4Cidr, LinkInfo, MacAddr};

/// Why a network operation failed, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    /// No interface by that name.
    #[error("no network interface {0:?} (see `ip link`)")]
    NoSuchLink(String),
    /// The gateway is outside every subnet of the interface (ENETUNREACH).
    #[error(
        "gateway {gateway} is not reachable from {link}: no address of that interface is in its subnet"
    )]
    Unreachable {
        /// The gateway asked for.
        gateway: Ipv4Addr,
        link: String,
    },
    /// Not allowed (not root).
    #[error("not permitted to change {what}: lbs must run as root")]
    Permission {
        /// What was being changed.
        what: String,
    },
    /// The kernel cannot do this at all (a missing module).
    #[error("{what}: {reason}")]
    Unsupported {
        /// What was being done.
        what: String,
        /// Why it cannot be.
        reason: String,
    },
    /// Anything else the kernel said.
    #[error("{what}: {reason}")]
    Os {
        /// What was being done.
        what: String,
        /// What the system said.
        reason: String,
    },
}

/// Links, carrier, IPv4 addresses, the default route and `promote_secondaries`.
///
/// Every method is one kernel operation; the sequence and its safety live in
/// [`crate::takeover`].
pub trait NetBackend: Sync {
    /// The interface called `name`.
    fn link(&self, name: &str) -> impl Future<Output = Result<LinkInfo, NetError>> + Send;

    /// Sets `link` administratively up (no error if it is up already).
    fn set_link_up(&self, link: &LinkInfo) -> impl Future<Output = Result<(), NetError>> + Send;

    /// The IPv4 addresses on `link`, primary ones first, in the kernel's order.
    fn addresses(
        &self,
        link: &LinkInfo,
    ) -> impl Future<Output = Result<Vec<Ipv4Cidr>, NetError>> + Send;

    /// Adds `addr` to `link` (no error if it is there already).
    fn add_address(
        &self,
        link: &LinkInfo,
        addr: Ipv4Cidr,
    ) -> impl Future<Output = Result<(), NetError>> + Send;

    /// Removes `addr` from `link` (no error if it is not there).
    fn delete_address(
        &self,
        link: &LinkInfo,
        addr: Ipv4Cidr,
    ) -> impl Future<Output = Result<(), NetError>> + Send;

    /// The main table's IPv4 default route, if any.
    fn default_route(&self) -> impl Future<Output = Result<Option<DefaultRoute>, NetError>> + Send;

    /// Makes the default route go via `gateway` on `link`, replacing any other.
    fn replace_default_route(
        &self,
        link: &LinkInfo,
        gateway: Ipv4Addr,
    ) -> impl Future<Output = Result<(), NetError>> + Send;

    /// `/proc/sys/net/ipv4/conf/<link>/promote_secondaries`.
    fn promote_secondaries(
        &self,
        link: &LinkInfo,
    ) -> impl Future<Output = Result<bool, NetError>> + Send;

    /// Follows `link`'s carrier: the receiver gets `true`/`false` on every change (a cable
    /// pulled or plugged, a switch port going dark).
    fn carrier_events(
        &self,
        link: &LinkInfo,
    ) -> impl Future<Output = Result<CarrierEvents, NetError>> + Send;

    /// Sets `promote_secondaries`: with it, deleting a primary address promotes a secondary in
    /// the same subnet instead of deleting it too (and the default route with it).
    fn set_promote_secondaries(
        &self,
        link: &LinkInfo,
        on: bool,
    ) -> impl Future<Output = Result<(), NetError>> + Send;
}

/// Carrier changes of one interface, from [`NetBackend::carrier_events`]. Whatever feeds
/// them stops when this is dropped.
#[derive(Debug)]
pub struct CarrierEvents {
    changes: tokio::sync::mpsc::Receiver<bool>,
    feeders: Vec<tokio::task::JoinHandle<()>>,
}

impl CarrierEvents {
    /// Events from `changes`, fed by `feeders` (aborted on drop).
    pub fn new(
        changes: tokio::sync::mpsc::Receiver<bool>,
        feeders: Vec<tokio::task::JoinHandle<()>>,
    ) -> CarrierEvents {
        CarrierEvents { changes, feeders }
    }

    /// The next change: `true` when the carrier came back. `None` if the source ended.
    pub async fn next(&mut self) -> Option<bool> {
        self.changes.recv().await
    }
}

impl Drop for CarrierEvents {
    fn drop(&mut self) {
        for feeder in &self.feeders {
            feeder.abort();
        }
    }
}

/// What an RFC 5227 probe found.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ProbeResult {
    /// Nobody answered within the probe's time.
    Free,
    /// This hardware address answers for the IP.
    InUse(MacAddr),
}

/// ARP on one LAN: probing an address before taking it, and announcing it after.
pub trait Arp: Sync {
    /// Asks whether anyone holds `ip` (RFC 5227 probes from 0.0.0.0, so no cache anywhere
    /// learns from them).
    fn probe(
        &self,
        link: &LinkInfo,
        ip: Ipv4Addr,
    ) -> impl Future<Output = Result<ProbeResult, NetError>> + Send;

    /// Sends `count` gratuitous ARPs for `ip` from `link`'s MAC, so switches and phones with
    /// a stale entry move to this box at once.
    fn announce(
        &self,
        link: &LinkInfo,
        ip: Ipv4Addr,
        count: u32,
    ) -> impl Future<Output = Result<(), NetError>> + Send;
}

impl<T: Arp + Send + Sync> Arp for std::sync::Arc<T> {
    fn probe(
        &self,
        link: &LinkInfo,
        ip: Ipv4Addr,
    ) -> impl Future<Output = Result<ProbeResult, NetError>> + Send {
        (**self).probe(link, ip)
    }

    fn announce(
        &self,
        link: &LinkInfo,
        ip: Ipv4Addr,
        count: u32,
    ) -> impl Future<Output = Result<(), NetError>> + Send {
        (**self).announce(link, ip, count)
    }
}
