//! The one trait both WireGuard backends implement, so tunnels and endpoints share their
//! logic: a userspace device (boringtun, [`crate::userspace`]) or the kernel module
//! ([`crate::kernel`], through wireguard-control).

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lbs_netconfig::Ipv4Cidr;
pub use wireguard_control::Key;

/// A private key in `Debug` output: named by its public half, never shown (configurations end
/// up in logs and bug reports).
pub(crate) struct PrivateKeyOf<'a>(pub &'a Key);

impl std::fmt::Debug for PrivateKeyOf<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<private key of {}>", self.0.get_public().to_base64())
    }
}

use crate::error::VpnError;

/// Which WireGuard implementation carries the tunnels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The kernel module (most modern kernels have it).
    Kernel,
    /// boringtun in this process, on a tun device.
    Userspace,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Kernel => "kernel",
            BackendKind::Userspace => "userspace",
        })
    }
}

/// What the operator asked for: a backend, or the kernel's when it has one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// The kernel module if the kernel has it, else userspace.
    #[default]
    Auto,
    /// Only the kernel module.
    Kernel,
    /// Only userspace.
    Userspace,
}

impl std::str::FromStr for BackendChoice {
    type Err = VpnError;
    fn from_str(s: &str) -> Result<Self, VpnError> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "kernel" => Ok(BackendChoice::Kernel),
            "userspace" => Ok(BackendChoice::Userspace),
            other => Err(VpnError::Config(format!(
                "backend {other:?}: expected auto, kernel or userspace"
            ))),
        }
    }
}

/// A peer as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    /// Its public key.
    pub public_key: Key,
    /// Where to send to (a box knows its data centers; a data center learns its boxes').
    pub endpoint: Option<SocketAddr>,
    /// What may come from it and is sent to it.
    pub allowed: Vec<Ipv4Cidr>,
    /// Keepalive interval in seconds (keeps NAT mappings open), if any.
    pub keepalive: Option<u16>,
}

/// A peer as the device reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerState {
    /// Its public key.
    pub public_key: Key,
    /// Where its packets come from now.
    pub endpoint: Option<SocketAddr>,
    /// Time since the last handshake (`None`: never).
    pub handshake_age: Option<Duration>,
    /// Payload bytes received (keepalives are not counted).
    pub rx_bytes: u64,
    /// Payload bytes sent.
    pub tx_bytes: u64,
    /// Its allowed addresses.
    pub allowed: Vec<Ipv4Cidr>,
}

/// A device as it reports itself.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DeviceState {
    /// The UDP port it listens on.
    pub listen_port: Option<u16>,
    pub peers: Vec<PeerState>,
}

/// Creating, configuring, reading and removing WireGuard interfaces. Each call is one short
/// operation on the interface called `name` in this process's network namespace.
pub trait WireGuard: Send + Sync + fmt::Debug {
    /// Which implementation this is.
    fn kind(&self) -> BackendKind;

    /// Creates the interface (down, no address), removing what a killed earlier run of this
    /// program left under the same name.
    fn create(&self, name: &str) -> Result<(), VpnError>;

    /// Sets the device's private key and, if given, its listen port (else a random one).
    fn set_identity(
        &self,
        name: &str,
        private_key: &Key,
        listen_port: Option<u16>,
    ) -> Result<(), VpnError>;

    /// Adds a peer that is not there: both backends treat a second add of the same key
    /// differently (boringtun panics), so callers use [`WireGuard::put_peer`].
    fn insert_peer(&self, name: &str, peer: &PeerConfig) -> Result<(), VpnError>;

    /// Removes a peer (no error if it is not there).
    fn remove_peer(&self, name: &str, public_key: &Key) -> Result<(), VpnError>;

    /// The device's state.
    fn device(&self, name: &str) -> Result<DeviceState, VpnError>;

    /// Removes the interface (no error if it is gone) and anything of it on disk.
    fn destroy(&self, name: &str) -> Result<(), VpnError>;

    /// Sets a peer: removes it, then adds it again — never a change in place. Also what
    /// resets a peer's session after its data center restarted.
    fn put_peer(&self, name: &str, peer: &PeerConfig) -> Result<(), VpnError> {
        self.remove_peer(name, &peer.public_key)?;
        self.insert_peer(name, peer)
    }
}

impl<T: WireGuard + ?Sized> WireGuard for Arc<T> {
    fn kind(&self) -> BackendKind {
        (**self).kind()
    }
    fn create(&self, name: &str) -> Result<(), VpnError> {
        (**self).create(name)
    }
    fn set_identity(&self, name: &str, key: &Key, port: Option<u16>) -> Result<(), VpnError> {
        (**self).set_identity(name, key, port)
    }
    fn insert_peer(&self, name: &str, peer: &PeerConfig) -> Result<(), VpnError> {
        (**self).insert_peer(name, peer)
    }
    fn remove_peer(&self, name: &str, public_key: &Key) -> Result<(), VpnError> {
        (**self).remove_peer(name, public_key)
    }
    fn device(&self, name: &str) -> Result<DeviceState, VpnError> {
        (**self).device(name)
    }
    fn destroy(&self, name: &str) -> Result<(), VpnError> {
        (**self).destroy(name)
    }
}

/// Checks an interface name: 1–15 bytes of letters, digits, `-`, `_`, `.`.
pub fn check_interface_name(name: &str) -> Result<(), VpnError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(VpnError::Config(format!(
            "interface name {name:?}: use 1-15 letters, digits, '-', '_' or '.'"
        )))
    }
}

/// A key from its base64 text (what `wg genkey` and `lbs vpn keygen` print).
pub fn parse_key(what: &str, text: &str) -> Result<Key, VpnError> {
    Key::from_base64(text.trim()).map_err(|_| {
        VpnError::Config(format!(
            "{what}: not a WireGuard key (44 base64 characters, as `lbs vpn keygen` prints)"
        ))
    })
}

/// An IPv4 address and prefix as WireGuard's allowed-IP text.
pub(crate) fn allowed_text(cidr: &Ipv4Cidr) -> String {
    format!("{}/{}", cidr.network(), cidr.prefix)
}

/// The address a peer's allowed IP names, if it is IPv4.
pub(crate) fn allowed_v4(address: std::net::IpAddr, prefix: u8) -> Option<Ipv4Cidr> {
    match address {
        std::net::IpAddr::V4(v4) => Ipv4Cidr::new(v4, prefix),
        std::net::IpAddr::V6(_) => None,
    }
}

/// A host's own /32.
pub(crate) fn host(address: Ipv4Addr) -> Ipv4Cidr {
    Ipv4Cidr {
        addr: address,
        prefix: 32,
    }
}

/// How long a destroyed device may take to remove its interface.
const GONE_TIMEOUT: Duration = Duration::from_secs(3);

/// Whether an interface called `name` exists in this network namespace.
pub(crate) fn link_exists(name: &str) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok()
}

/// Waits until interface `name` is gone.
pub(crate) fn wait_gone(name: &str) -> Result<(), VpnError> {
    let deadline = Instant::now() + GONE_TIMEOUT;
    while link_exists(name) {
        if Instant::now() >= deadline {
            return Err(VpnError::device(
                name,
                "removing the interface",
                format!("still there after {GONE_TIMEOUT:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}
