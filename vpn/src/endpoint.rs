//! The data center's side: one WireGuard interface that boxes connect to, with box peers
//! added and removed while it runs (always remove + add, never a change in place), and the
//! heartbeat responder boxes probe.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use lbs_netconfig::{Ipv4Cidr, NetBackend, Netlink};

use crate::backend::open_backend;
use crate::error::VpnError;
use crate::heartbeat::Responder;
use crate::wg::{BackendChoice, BackendKind, Key, PeerConfig, PeerState, WireGuard, host};

/// An endpoint's configuration.
#[derive(Clone)]
pub struct EndpointConfig {
    pub interface: String,
    /// The endpoint's private key.
    pub private_key: Key,
    /// The UDP port boxes connect to.
    pub listen_port: u16,
    /// The endpoint's overlay address with the overlay's prefix length (`10.77.255.1/16`):
    /// boxes probe it, and the prefix is routed into the tunnel.
    pub address: Ipv4Cidr,
    /// More addresses served here (`10.77.0.1/32`, the data-center service both endpoints
    /// answer for).
    pub service_addresses: Vec<Ipv4Cidr>,
    /// Which WireGuard.
    pub backend: BackendChoice,
    /// The port heartbeats are answered on.
    pub heartbeat_port: u16,
}

impl std::fmt::Debug for EndpointConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointConfig")
            .field("interface", &self.interface)
            .field("private_key", &crate::wg::PrivateKeyOf(&self.private_key))
            .field("listen_port", &self.listen_port)
            .field("address", &self.address)
            .field("service_addresses", &self.service_addresses)
            .field("backend", &self.backend)
            .field("heartbeat_port", &self.heartbeat_port)
            .finish()
    }
}

/// What a [`Endpoint::set_peers`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerChanges {
    /// Peers added (or whose address changed).
    pub added: usize,
    /// Peers removed.
    pub removed: usize,
    /// Peers left as they were.
    pub kept: usize,
}

/// A running endpoint. [`Endpoint::shutdown`] removes it; dropping does too.
#[derive(Debug)]
pub struct Endpoint {
    config: EndpointConfig,
    backend: Arc<dyn WireGuard>,
    /// Box peers: public key (base64) → overlay address.
    peers: Mutex<BTreeMap<String, Ipv4Addr>>,
    responder: Option<Responder>,
    live: bool,
}

impl Endpoint {
    /// Creates the interface, listens, and answers heartbeats; no peers yet.
    pub async fn start(config: EndpointConfig) -> Result<Endpoint, VpnError> {
        crate::wg::check_interface_name(&config.interface)?;
        let backend = open_backend(config.backend)?;
        let mut endpoint = Endpoint {
            backend,
            peers: Mutex::new(BTreeMap::new()),
            responder: None,
            live: false,
            config,
        };
        let name = endpoint.config.interface.clone();
        endpoint.backend.create(&name)?;
        endpoint.live = true;
        // From here a failure drops `endpoint`, which removes the interface again.
        endpoint.backend.set_identity(
            &name,
            &endpoint.config.private_key,
            Some(endpoint.config.listen_port),
        )?;
        let netlink = Netlink::open()?;
        let link = netlink.link(&name).await?;
        netlink.add_address(&link, endpoint.config.address).await?;
        for extra in &endpoint.config.service_addresses {
            netlink.add_address(&link, *extra).await?;
        }
        netlink.set_link_up(&link).await?;
        endpoint.responder = Some(
            Responder::bind(
                endpoint.config.address.addr,
                endpoint.config.heartbeat_port,
                endpoint.config.address,
            )
            .await?,
        );
        Ok(endpoint)
    }

    /// Which WireGuard runs it.
    pub fn backend(&self) -> BackendKind {
        self.backend.kind()
    }

    pub fn interface(&self) -> &str {
        &self.config.interface
    }

    fn table(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Ipv4Addr>> {
        self.peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a box (or sets it again: removed and added, a fresh session).
    pub fn add_peer(&self, public_key: &Key, address: Ipv4Addr) -> Result<(), VpnError> {
        let id = public_key.to_base64();
        if !self.config.address.contains(address) {
            return Err(VpnError::Config(format!(
                "box {id} at {address}: outside this endpoint's overlay {}",
                self.config.address
            )));
        }
        if address == self.config.address.addr
            || self
                .config
                .service_addresses
                .iter()
                .any(|s| s.contains(address))
        {
            return Err(VpnError::Config(format!(
                "box {id} at {address}: that address is this endpoint's own"
            )));
        }
        let mut peers = self.table();
        if let Some((other, _)) = peers.iter().find(|(k, a)| **a == address && **k != id) {
            return Err(VpnError::Config(format!(
                "box {id} at {address}: box {other} has that address already; remove it first"
            )));
        }
        self.backend.put_peer(
            &self.config.interface,
            &PeerConfig {
                public_key: public_key.clone(),
                endpoint: None,
                allowed: vec![host(address)],
                keepalive: None,
            },
        )?;
        peers.insert(id, address);
        Ok(())
    }

    /// Removes a box (no error if it is not there).
    pub fn remove_peer(&self, public_key: &Key) -> Result<(), VpnError> {
        let mut peers = self.table();
        self.backend
            .remove_peer(&self.config.interface, public_key)?;
        peers.remove(&public_key.to_base64());
        Ok(())
    }

    /// Makes the peers exactly `wanted`: removes the others, adds the new ones, leaves the
    /// unchanged ones alone (their sessions keep running).
    pub fn set_peers(&self, wanted: &[(Key, Ipv4Addr)]) -> Result<PeerChanges, VpnError> {
        let current = self.table().clone();
        let wanted_ids: BTreeMap<String, (&Key, Ipv4Addr)> = wanted
            .iter()
            .map(|(k, a)| (k.to_base64(), (k, *a)))
            .collect();
        let mut changes = PeerChanges::default();
        for id in current.keys().filter(|id| !wanted_ids.contains_key(*id)) {
            let key = crate::wg::parse_key("peer", id)?;
            self.remove_peer(&key)?;
            changes.removed += 1;
        }
        for (id, (key, address)) in &wanted_ids {
            if current.get(id) == Some(address) {
                changes.kept += 1;
            } else {
                self.add_peer(key, *address)?;
                changes.added += 1;
            }
        }
        Ok(changes)
    }

    /// The box peers as the device reports them.
    pub fn peers(&self) -> Result<Vec<PeerState>, VpnError> {
        Ok(self.backend.device(&self.config.interface)?.peers)
    }

    /// Stops answering and removes the interface (its addresses and routes with it).
    pub async fn shutdown(mut self) -> Result<(), VpnError> {
        self.responder = None;
        self.live = false;
        let backend = Arc::clone(&self.backend);
        let name = self.config.interface.clone();
        tokio::task::spawn_blocking(move || backend.destroy(&name))
            .await
            .map_err(|e| VpnError::Config(format!("removing {}: {e}", self.config.interface)))?
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.responder = None;
        if self.live {
            let _ = self.backend.destroy(&self.config.interface);
        }
    }
}
