//! [`NetBackend`] and [`Arp`] chosen at run time: a daemon holds an [`AnyNet`] and an
//! [`AnyArp`] — the kernel's ([`crate::Netlink`], [`crate::PacketArp`]) in production,
//! [`crate::FakeNet`] in tests — and passes them wherever the generic functions of this
//! crate want a backend.

use std::future::Future;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::sync::Arc;

use crate::backend::{Arp, CarrierEvents, NetBackend, NetError, ProbeResult};
use crate::types::{DefaultRoute, Ipv4Cidr, LinkInfo};

type Boxed<'a, T> = Pin<Box<dyn Future<Output = Result<T, NetError>> + Send + 'a>>;

/// [`NetBackend`] as a trait object (its futures boxed).
trait DynNet: Send + Sync {
    fn link<'a>(&'a self, name: &'a str) -> Boxed<'a, LinkInfo>;
    fn set_link_up<'a>(&'a self, link: &'a LinkInfo) -> Boxed<'a, ()>;
    fn addresses<'a>(&'a self, link: &'a LinkInfo) -> Boxed<'a, Vec<Ipv4Cidr>>;
    fn add_address<'a>(&'a self, link: &'a LinkInfo, addr: Ipv4Cidr) -> Boxed<'a, ()>;
    fn delete_address<'a>(&'a self, link: &'a LinkInfo, addr: Ipv4Cidr) -> Boxed<'a, ()>;
    fn default_route(&self) -> Boxed<'_, Option<DefaultRoute>>;
    fn replace_default_route<'a>(&'a self, link: &'a LinkInfo, gateway: Ipv4Addr) -> Boxed<'a, ()>;
    fn promote_secondaries<'a>(&'a self, link: &'a LinkInfo) -> Boxed<'a, bool>;
    fn carrier_events<'a>(&'a self, link: &'a LinkInfo) -> Boxed<'a, CarrierEvents>;
    fn set_promote_secondaries<'a>(&'a self, link: &'a LinkInfo, on: bool) -> Boxed<'a, ()>;
}

impl<T: NetBackend + Send + Sync> DynNet for T {
    fn link<'a>(&'a self, name: &'a str) -> Boxed<'a, LinkInfo> {
        Box::pin(NetBackend::link(self, name))
    }
    fn set_link_up<'a>(&'a self, link: &'a LinkInfo) -> Boxed<'a, ()> {
        Box::pin(NetBackend::set_link_up(self, link))
    }
    fn addresses<'a>(&'a self, link: &'a LinkInfo) -> Boxed<'a, Vec<Ipv4Cidr>> {
        Box::pin(NetBackend::addresses(self, link))
    }
    fn add_address<'a>(&'a self, link: &'a LinkInfo, addr: Ipv4Cidr) -> Boxed<'a, ()> {
        Box::pin(NetBackend::add_address(self, link, addr))
    }
    fn delete_address<'a>(&'a self, link: &'a LinkInfo, addr: Ipv4Cidr) -> Boxed<'a, ()> {
        Box::pin(NetBackend::delete_address(self, link, addr))
    }
    fn default_route(&self) -> Boxed<'_, Option<DefaultRoute>> {
        Box::pin(NetBackend::default_route(self))
    }
    fn replace_default_route<'a>(&'a self, link: &'a LinkInfo, gateway: Ipv4Addr) -> Boxed<'a, ()> {
        Box::pin(NetBackend::replace_default_route(self, link, gateway))
    }
    fn promote_secondaries<'a>(&'a self, link: &'a LinkInfo) -> Boxed<'a, bool> {
        Box::pin(NetBackend::promote_secondaries(self, link))
    }
    fn carrier_events<'a>(&'a self, link: &'a LinkInfo) -> Boxed<'a, CarrierEvents> {
        Box::pin(NetBackend::carrier_events(self, link))
    }
    fn set_promote_secondaries<'a>(&'a self, link: &'a LinkInfo, on: bool) -> Boxed<'a, ()> {
        Box::pin(NetBackend::set_promote_secondaries(self, link, on))
    }
}

/// Any [`NetBackend`], shared.
#[derive(Clone)]
pub struct AnyNet(Arc<dyn DynNet>);

impl std::fmt::Debug for AnyNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AnyNet")
    }
}

impl AnyNet {
    pub fn new<T: NetBackend + Send + Sync + 'static>(backend: T) -> AnyNet {
        AnyNet(Arc::new(backend))
    }

    /// A backend already shared (a test keeps its `FakeNet` to look at).
    pub fn shared<T: NetBackend + Send + Sync + 'static>(backend: Arc<T>) -> AnyNet {
        AnyNet(backend)
    }
}

impl NetBackend for AnyNet {
    async fn link(&self, name: &str) -> Result<LinkInfo, NetError> {
        self.0.link(name).await
    }
    async fn set_link_up(&self, link: &LinkInfo) -> Result<(), NetError> {
        self.0.set_link_up(link).await
    }
    async fn addresses(&self, link: &LinkInfo) -> Result<Vec<Ipv4Cidr>, NetError> {
        self.0.addresses(link).await
    }
    async fn add_address(&self, link: &LinkInfo, addr: Ipv4Cidr) -> Result<(), NetError> {
        self.0.add_address(link, addr).await
    }
    async fn delete_address(&self, link: &LinkInfo, addr: Ipv4Cidr) -> Result<(), NetError> {
        self.0.delete_address(link, addr).await
    }
    async fn default_route(&self) -> Result<Option<DefaultRoute>, NetError> {
        self.0.default_route().await
    }
    async fn replace_default_route(
        &self,
        link: &LinkInfo,
        gateway: Ipv4Addr,
    ) -> Result<(), NetError> {
        self.0.replace_default_route(link, gateway).await
    }
    async fn promote_secondaries(&self, link: &LinkInfo) -> Result<bool, NetError> {
        self.0.promote_secondaries(link).await
    }
    async fn carrier_events(&self, link: &LinkInfo) -> Result<CarrierEvents, NetError> {
        self.0.carrier_events(link).await
    }
    async fn set_promote_secondaries(&self, link: &LinkInfo, on: bool) -> Result<(), NetError> {
        self.0.set_promote_secondaries(link, on).await
    }
}

/// [`Arp`] as a trait object.
trait DynArp: Send + Sync {
    fn probe<'a>(&'a self, link: &'a LinkInfo, ip: Ipv4Addr) -> Boxed<'a, ProbeResult>;
    fn announce<'a>(&'a self, link: &'a LinkInfo, ip: Ipv4Addr, count: u32) -> Boxed<'a, ()>;
}

impl<T: Arp + Send + Sync> DynArp for T {
    fn probe<'a>(&'a self, link: &'a LinkInfo, ip: Ipv4Addr) -> Boxed<'a, ProbeResult> {
        Box::pin(Arp::probe(self, link, ip))
    }
    fn announce<'a>(&'a self, link: &'a LinkInfo, ip: Ipv4Addr, count: u32) -> Boxed<'a, ()> {
        Box::pin(Arp::announce(self, link, ip, count))
    }
}

/// Any [`Arp`], shared (cheap to clone: a refresh task keeps one).
#[derive(Clone)]
pub struct AnyArp(Arc<dyn DynArp>);

impl std::fmt::Debug for AnyArp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AnyArp")
    }
}

impl AnyArp {
    pub fn new<T: Arp + Send + Sync + 'static>(arp: T) -> AnyArp {
        AnyArp(Arc::new(arp))
    }

    /// An ARP already shared.
    pub fn shared<T: Arp + Send + Sync + 'static>(arp: Arc<T>) -> AnyArp {
        AnyArp(arp)
    }
}

impl Arp for AnyArp {
    async fn probe(&self, link: &LinkInfo, ip: Ipv4Addr) -> Result<ProbeResult, NetError> {
        self.0.probe(link, ip).await
    }
    async fn announce(&self, link: &LinkInfo, ip: Ipv4Addr, count: u32) -> Result<(), NetError> {
        self.0.announce(link, ip, count).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{FakeNet, MacAddr};

    #[tokio::test]
    async fn a_shared_fake_is_seen_through_both_handles() {
        let fake = Arc::new(FakeNet::new());
        let own: Ipv4Cidr = "192.168.1.3/24".parse().unwrap();
        fake.add_link("eth0", MacAddr([2, 0, 0, 0, 0, 1]), &[own]);
        let net = AnyNet::shared(fake.clone());
        let arp = AnyArp::shared(fake.clone());
        let link = NetBackend::link(&net, "eth0").await.unwrap();
        let shared: Ipv4Cidr = "192.168.1.2/24".parse().unwrap();
        NetBackend::add_address(&net, &link, shared).await.unwrap();
        assert_eq!(fake.addresses_of("eth0"), vec![own, shared]);
        assert_eq!(
            Arp::probe(&arp, &link, Ipv4Addr::new(192, 168, 1, 9))
                .await
                .unwrap(),
            ProbeResult::Free
        );
    }
}
