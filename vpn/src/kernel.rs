//! The kernel's WireGuard, configured through wireguard-control's netlink backend.

use std::time::SystemTime;

use wireguard_control::{Backend, Device, DeviceUpdate, InterfaceName, PeerConfigBuilder};

use crate::error::VpnError;

use crate::wg::{
    BackendKind, DeviceState, Key, PeerConfig, PeerState, WireGuard, allowed_v4,
    check_interface_name, link_exists, wait_gone,
};

/// Linux's "operation not supported": what creating a link of an unknown kind answers.
const EOPNOTSUPP: i32 = 95;

/// Kernel WireGuard interfaces in this process's network namespace.
#[derive(Debug, Default)]
pub struct Kernel;

impl Kernel {
    /// The kernel backend (whether the module exists shows on the first `create`).
    pub fn new() -> Kernel {
        Kernel
    }
}

fn iface(name: &str) -> Result<InterfaceName, VpnError> {
    check_interface_name(name)?;
    name.parse()
        .map_err(|e| VpnError::Config(format!("interface name {name:?}: {e}")))
}

fn apply(name: &str, what: &str, update: DeviceUpdate) -> Result<(), VpnError> {
    update
        .apply(&iface(name)?, Backend::Kernel)
        .map_err(|e| match e.raw_os_error() {
            Some(EOPNOTSUPP) => VpnError::NoKernelModule,
            _ => VpnError::device(name, what, e),
        })
}

impl WireGuard for Kernel {
    fn kind(&self) -> BackendKind {
        BackendKind::Kernel
    }

    fn create(&self, name: &str) -> Result<(), VpnError> {
        let name_ = iface(name)?;
        if link_exists(name) {
            // Applying to an existing interface would quietly reuse it: only a WireGuard
            // interface under our configured name, in our namespace, is ours to replace.
            let wireguard = wireguard_control::backends::kernel::enumerate()
                .map_err(|e| VpnError::device(name, "listing WireGuard interfaces", e))?;
            if !wireguard.contains(&name_) {
                return Err(VpnError::device(
                    name,
                    "creating it",
                    format!(
                        "an interface by that name exists and is not WireGuard; remove it (`ip link del {name}`) or choose another interface name"
                    ),
                ));
            }
            self.destroy(name)?;
            tracing::warn!(
                interface = name,
                "removed the WireGuard interface a killed earlier run left behind"
            );
        }
        // Applying to a missing interface creates it.
        apply(name, "creating it", DeviceUpdate::new())
    }

    fn set_identity(
        &self,
        name: &str,
        private_key: &Key,
        listen_port: Option<u16>,
    ) -> Result<(), VpnError> {
        let mut update = DeviceUpdate::new().set_private_key(private_key.clone());
        if let Some(port) = listen_port {
            update = update.set_listen_port(port);
        }
        apply(name, "setting its key and port", update)
    }

    fn insert_peer(&self, name: &str, peer: &PeerConfig) -> Result<(), VpnError> {
        let mut builder = PeerConfigBuilder::new(&peer.public_key).replace_allowed_ips();
        if let Some(endpoint) = peer.endpoint {
            builder = builder.set_endpoint(endpoint);
        }
        if let Some(keepalive) = peer.keepalive {
            builder = builder.set_persistent_keepalive_interval(keepalive);
        }
        for allowed in &peer.allowed {
            builder = builder.add_allowed_ip(allowed.network().into(), allowed.prefix);
        }
        apply(name, "adding a peer", DeviceUpdate::new().add_peer(builder))
    }

    fn remove_peer(&self, name: &str, public_key: &Key) -> Result<(), VpnError> {
        apply(
            name,
            "removing a peer",
            DeviceUpdate::new().remove_peer_by_key(public_key),
        )
    }

    fn device(&self, name: &str) -> Result<DeviceState, VpnError> {
        let device = Device::get(&iface(name)?, Backend::Kernel)
            .map_err(|e| VpnError::device(name, "reading its state", e))?;
        let now = SystemTime::now();
        Ok(DeviceState {
            listen_port: device.listen_port,
            peers: device
                .peers
                .into_iter()
                .map(|peer| PeerState {
                    public_key: peer.config.public_key,
                    endpoint: peer.config.endpoint,
                    handshake_age: peer
                        .stats
                        .last_handshake_time
                        .and_then(|at| now.duration_since(at).ok()),
                    rx_bytes: peer.stats.rx_bytes,
                    tx_bytes: peer.stats.tx_bytes,
                    allowed: peer
                        .config
                        .allowed_ips
                        .iter()
                        .filter_map(|ip| allowed_v4(ip.address, ip.cidr))
                        .collect(),
                })
                .collect(),
        })
    }

    fn destroy(&self, name: &str) -> Result<(), VpnError> {
        if !link_exists(name) {
            return Ok(());
        }
        wireguard_control::backends::kernel::delete_interface(&iface(name)?)
            .map_err(|e| VpnError::device(name, "deleting it", e))?;
        wait_gone(name)
    }
}
