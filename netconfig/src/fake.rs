//! An in-memory network that behaves like Linux where a takeover can go wrong, for tests.
//!
//! - The first address of a subnet on a link is its primary; later ones are secondaries.
//!   Deleting a primary while `promote_secondaries` is off deletes its secondaries too — the
//!   trap that leaves a box with no address.
//! - A default route whose gateway is in no subnet of its link is flushed when the last such
//!   address goes, and cannot be added (ENETUNREACH).
//! - Other hosts on the LAN answer ARP probes for their addresses unless unplugged.
//! - Failures are injected per operation ([`FakeNet::fail_next`]) or as a crash
//!   ([`FakeNet::crash_after`]: after some more changes, every call fails until
//!   [`FakeNet::restart`], as if the process had died half way).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Mutex, MutexGuard};

use crate::backend::{Arp, CarrierEvents, NetBackend, NetError, ProbeResult};
use crate::types::{DefaultRoute, Ipv4Cidr, LinkInfo, MacAddr};

/// The operations of [`NetBackend`] and [`Arp`], to aim injected failures at.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Op {
    /// [`NetBackend::link`].
    Link,
    /// [`NetBackend::set_link_up`].
    SetLinkUp,
    /// [`NetBackend::addresses`].
    Addresses,
    /// [`NetBackend::add_address`].
    AddAddress,
    /// [`NetBackend::delete_address`].
    DeleteAddress,
    /// [`NetBackend::default_route`].
    DefaultRoute,
    /// [`NetBackend::replace_default_route`].
    ReplaceDefaultRoute,
    /// [`NetBackend::carrier_events`].
    CarrierEvents,
    /// [`NetBackend::promote_secondaries`].
    PromoteSecondaries,
    /// [`NetBackend::set_promote_secondaries`].
    SetPromoteSecondaries,
    /// [`Arp::probe`].
    Probe,
    /// [`Arp::announce`].
    Announce,
}

impl Op {
    fn changes(self) -> bool {
        matches!(
            self,
            Op::SetLinkUp
                | Op::AddAddress
                | Op::DeleteAddress
                | Op::ReplaceDefaultRoute
                | Op::SetPromoteSecondaries
                | Op::Announce
        )
    }
}

#[derive(Clone, Debug)]
struct FakeLink {
    info: LinkInfo,
    addresses: Vec<Ipv4Cidr>,
    promote_secondaries: bool,
}

#[derive(Debug, Default)]
struct State {
    links: Vec<FakeLink>,
    route: Option<DefaultRoute>,
    /// Other hosts on the LAN: who answers ARP for which address.
    neighbours: HashMap<Ipv4Addr, MacAddr>,
    /// Every gratuitous ARP sent: address, MAC, count.
    announced: Vec<(Ipv4Addr, MacAddr, u32)>,
    /// Per operation: calls still to let through, then the error for the one after.
    failures: HashMap<Op, (u32, NetError)>,
    /// Changes that may still succeed before the crash.
    crash_in: Option<u64>,
    crashed: bool,
    /// Every call, in order.
    calls: Vec<Op>,
    /// Who follows which link's carrier.
    carrier_watchers: Vec<(u32, tokio::sync::mpsc::Sender<bool>)>,
}

/// The fake network; cheap to share by reference between the code under test and the test.
#[derive(Debug, Default)]
pub struct FakeNet {
    state: Mutex<State>,
}

impl FakeNet {
    /// An empty network.
    pub fn new() -> FakeNet {
        FakeNet::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock has failed already; its state is
        // still the best description of what happened.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds an interface, up and with carrier, with these addresses (primaries first).
    pub fn add_link(&self, name: &str, mac: MacAddr, addresses: &[Ipv4Cidr]) -> LinkInfo {
        let mut state = self.state();
        let info = LinkInfo {
            index: state.links.len() as u32 + 2,
            name: name.to_owned(),
            mac,
            up: true,
            carrier: true,
        };
        state.links.push(FakeLink {
            info: info.clone(),
            addresses: addresses.to_vec(),
            promote_secondaries: false,
        });
        info
    }

    /// Sets the default route directly (the box's configuration before the test).
    pub fn set_route(&self, route: Option<DefaultRoute>) {
        self.state().route = route;
    }

    /// Plugs or unplugs the cable of `name`.
    pub fn set_carrier(&self, name: &str, carrier: bool) {
        let mut state = self.state();
        let Some(link) = state.links.iter_mut().find(|l| l.info.name == name) else {
            return;
        };
        if link.info.carrier == carrier {
            return;
        }
        link.info.carrier = carrier;
        let index = link.info.index;
        state
            .carrier_watchers
            .retain(|(watched, tx)| *watched != index || tx.try_send(carrier).is_ok());
    }

    /// Another host on the LAN that answers ARP for `ip` (`None`: it is unplugged).
    pub fn set_neighbour(&self, ip: Ipv4Addr, mac: Option<MacAddr>) {
        let mut state = self.state();
        match mac {
            Some(mac) => state.neighbours.insert(ip, mac),
            None => state.neighbours.remove(&ip),
        };
    }

    /// The next call of `op` fails with `error`.
    pub fn fail_next(&self, op: Op, error: NetError) {
        self.fail_call(op, 0, error);
    }

    /// The call of `op` after the next `skip` ones fails with `error`.
    pub fn fail_call(&self, op: Op, skip: u32, error: NetError) {
        self.state().failures.insert(op, (skip, error));
    }

    /// After `changes` more successful changes, every call fails until [`FakeNet::restart`].
    pub fn crash_after(&self, changes: u64) {
        self.state().crash_in = Some(changes);
    }

    /// The process "starts again" after a crash: the network keeps whatever state it had.
    pub fn restart(&self) {
        let mut state = self.state();
        state.crashed = false;
        state.crash_in = None;
    }

    /// The interface called `name`, as [`NetBackend::link`] would give it.
    pub fn link_named(&self, name: &str) -> Option<LinkInfo> {
        self.state()
            .links
            .iter()
            .find(|l| l.info.name == name)
            .map(|l| l.info.clone())
    }

    /// The addresses on `name` now.
    pub fn addresses_of(&self, name: &str) -> Vec<Ipv4Cidr> {
        self.state()
            .links
            .iter()
            .find(|l| l.info.name == name)
            .map(|l| l.addresses.clone())
            .unwrap_or_default()
    }

    /// The default route now.
    pub fn route(&self) -> Option<DefaultRoute> {
        self.state().route
    }

    /// `promote_secondaries` of `name` now.
    pub fn promote_of(&self, name: &str) -> bool {
        self.state()
            .links
            .iter()
            .find(|l| l.info.name == name)
            .is_some_and(|l| l.promote_secondaries)
    }

    /// The gratuitous ARPs sent so far: address, MAC, count.
    pub fn announced(&self) -> Vec<(Ipv4Addr, MacAddr, u32)> {
        self.state().announced.clone()
    }

    /// Every call made so far, in order.
    pub fn calls(&self) -> Vec<Op> {
        self.state().calls.clone()
    }

    /// Runs one call: records it, applies injected failures, then `body` on the state.
    fn call<T>(
        &self,
        op: Op,
        body: impl FnOnce(&mut State) -> Result<T, NetError>,
    ) -> Result<T, NetError> {
        let mut state = self.state();
        state.calls.push(op);
        if state.crashed {
            return Err(crashed());
        }
        if let Some((skip, _)) = state.failures.get_mut(&op) {
            if *skip == 0 {
                if let Some((_, error)) = state.failures.remove(&op) {
                    return Err(error);
                }
            } else {
                *skip -= 1;
            }
        }
        if op.changes()
            && let Some(left) = state.crash_in
        {
            if left == 0 {
                state.crashed = true;
                return Err(crashed());
            }
            state.crash_in = Some(left - 1);
        }
        body(&mut state)
    }
}

fn crashed() -> NetError {
    NetError::Os {
        what: "fake network".into(),
        reason: "the process crashed here".into(),
    }
}

impl State {
    fn link_mut(&mut self, link: &LinkInfo) -> Result<&mut FakeLink, NetError> {
        self.links
            .iter_mut()
            .find(|l| l.info.index == link.index)
            .ok_or_else(|| NetError::NoSuchLink(link.name.clone()))
    }

    /// The kernel drops a default route whose gateway is no longer on a connected subnet.
    fn flush_unreachable_route(&mut self) {
        if let Some(route) = self.route {
            let reachable = self.links.iter().any(|l| {
                l.info.index == route.link && l.addresses.iter().any(|a| a.contains(route.gateway))
            });
            if !reachable {
                self.route = None;
            }
        }
    }
}

impl NetBackend for FakeNet {
    async fn link(&self, name: &str) -> Result<LinkInfo, NetError> {
        self.call(Op::Link, |state| {
            state
                .links
                .iter()
                .find(|l| l.info.name == name)
                .map(|l| l.info.clone())
                .ok_or_else(|| NetError::NoSuchLink(name.to_owned()))
        })
    }

    async fn set_link_up(&self, link: &LinkInfo) -> Result<(), NetError> {
        self.call(Op::SetLinkUp, |state| {
            state.link_mut(link)?.info.up = true;
            Ok(())
        })
    }

    async fn addresses(&self, link: &LinkInfo) -> Result<Vec<Ipv4Cidr>, NetError> {
        self.call(Op::Addresses, |state| {
            Ok(state.link_mut(link)?.addresses.clone())
        })
    }

    async fn add_address(&self, link: &LinkInfo, addr: Ipv4Cidr) -> Result<(), NetError> {
        self.call(Op::AddAddress, |state| {
            let fake = state.link_mut(link)?;
            if !fake.addresses.contains(&addr) {
                fake.addresses.push(addr);
            }
            Ok(())
        })
    }

    async fn delete_address(&self, link: &LinkInfo, addr: Ipv4Cidr) -> Result<(), NetError> {
        self.call(Op::DeleteAddress, |state| {
            let fake = state.link_mut(link)?;
            let Some(at) = fake.addresses.iter().position(|a| *a == addr) else {
                return Ok(());
            };
            let primary = !fake.addresses[..at].iter().any(|a| a.same_subnet(&addr));
            fake.addresses.remove(at);
            if primary && !fake.promote_secondaries {
                // Linux: the secondaries of a deleted primary go with it.
                fake.addresses.retain(|a| !a.same_subnet(&addr));
            }
            state.flush_unreachable_route();
            Ok(())
        })
    }

    async fn default_route(&self) -> Result<Option<DefaultRoute>, NetError> {
        self.call(Op::DefaultRoute, |state| Ok(state.route))
    }

    async fn replace_default_route(
        &self,
        link: &LinkInfo,
        gateway: Ipv4Addr,
    ) -> Result<(), NetError> {
        self.call(Op::ReplaceDefaultRoute, |state| {
            let fake = state.link_mut(link)?;
            if !fake.addresses.iter().any(|a| a.contains(gateway)) {
                return Err(NetError::Unreachable {
                    gateway,
                    link: link.name.clone(),
                });
            }
            state.route = Some(DefaultRoute {
                gateway,
                link: link.index,
            });
            Ok(())
        })
    }

    async fn carrier_events(&self, link: &LinkInfo) -> Result<CarrierEvents, NetError> {
        self.call(Op::CarrierEvents, |state| {
            state.link_mut(link)?;
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            state.carrier_watchers.push((link.index, tx));
            Ok(CarrierEvents::new(rx, Vec::new()))
        })
    }

    async fn promote_secondaries(&self, link: &LinkInfo) -> Result<bool, NetError> {
        self.call(Op::PromoteSecondaries, |state| {
            Ok(state.link_mut(link)?.promote_secondaries)
        })
    }

    async fn set_promote_secondaries(&self, link: &LinkInfo, on: bool) -> Result<(), NetError> {
        self.call(Op::SetPromoteSecondaries, |state| {
            state.link_mut(link)?.promote_secondaries = on;
            Ok(())
        })
    }
}

impl Arp for FakeNet {
    async fn probe(&self, link: &LinkInfo, ip: Ipv4Addr) -> Result<ProbeResult, NetError> {
        self.call(Op::Probe, |state| {
            if !state.link_mut(link)?.info.carrier {
                return Err(NetError::Os {
                    what: format!("probing {ip} on {}", link.name),
                    reason: "no carrier".into(),
                });
            }
            Ok(match state.neighbours.get(&ip) {
                Some(mac) => ProbeResult::InUse(*mac),
                None => ProbeResult::Free,
            })
        })
    }

    async fn announce(&self, link: &LinkInfo, ip: Ipv4Addr, count: u32) -> Result<(), NetError> {
        self.call(Op::Announce, |state| {
            let mac = state.link_mut(link)?.info.mac;
            state.announced.push((ip, mac, count));
            Ok(())
        })
    }
}
