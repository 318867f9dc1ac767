//! The TOML files `lbs vpn run` (a box) and `lbs vpn endpoint` (a data center) read.
//!
//! ```toml
//! # /etc/lbs/vpn.toml on a box
//! private_key_file = "/etc/lbs/vpn.key"
//! address = "10.77.0.5"          # this box's overlay address, from the data center
//! interface_prefix = "lbs-dc"    # interfaces lbs-dc0, lbs-dc1
//! # backend = "auto"             # auto | kernel | userspace
//! # probe_interval_ms = 200 (a heartbeat unanswered by the next one is lost: keep it above
//! #   the worst round trip), dead_after = 3, failback_after_s = 10, reset_every_s = 2
//! # keepalive_s = 15, heartbeat_port = 51821, preferred = 0
//!
//! [[endpoint]]
//! name = "dc1"
//! public_key = "…44 base64 characters…"
//! endpoint = "203.0.113.10:51820"
//! address = "10.77.255.1"        # the endpoint's overlay address (heartbeats go there)
//! prefix = "10.77.0.0/16"        # routed through it
//! ```
//!
//! ```toml
//! # on a data-center endpoint
//! private_key_file = "/etc/lbs/dc1.key"
//! interface = "lbs-ep"
//! listen_port = 51820
//! address = "10.77.255.1/16"
//! service_addresses = ["10.77.0.1/32"]
//!
//! [[peer]]
//! public_key = "…"
//! address = "10.77.0.5"
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use lbs_netconfig::Ipv4Cidr;
use serde::Deserialize;

use crate::endpoint::EndpointConfig;
use crate::error::VpnError;
use crate::failover::FailoverConfig;
use crate::heartbeat::HEARTBEAT_PORT;
use crate::tunnels::{EndpointSpec, TunnelsConfig};
use crate::wg::{BackendChoice, Key, parse_key};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BoxFile {
    private_key_file: PathBuf,
    address: String,
    #[serde(default = "default_prefix")]
    interface_prefix: String,
    #[serde(default)]
    backend: BackendChoice,
    probe_interval_ms: Option<u64>,
    dead_after: Option<u32>,
    failback_after_s: Option<u64>,
    reset_every_s: Option<u64>,
    #[serde(default)]
    preferred: usize,
    #[serde(default = "default_keepalive")]
    keepalive_s: u16,
    #[serde(default = "default_heartbeat")]
    heartbeat_port: u16,
    #[serde(default)]
    endpoint: Vec<EndpointEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointEntry {
    name: String,
    public_key: String,
    endpoint: String,
    address: String,
    prefix: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointFile {
    private_key_file: PathBuf,
    interface: String,
    listen_port: u16,
    address: String,
    #[serde(default)]
    service_addresses: Vec<String>,
    #[serde(default)]
    backend: BackendChoice,
    #[serde(default = "default_heartbeat")]
    heartbeat_port: u16,
    #[serde(default)]
    peer: Vec<PeerEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerEntry {
    public_key: String,
    address: String,
}

fn default_prefix() -> String {
    "lbs-dc".into()
}

fn default_keepalive() -> u16 {
    15
}

fn default_heartbeat() -> u16 {
    HEARTBEAT_PORT
}

fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, VpnError> {
    let text = std::fs::read_to_string(path).map_err(|error| VpnError::Io {
        what: format!("reading {}", path.display()),
        error,
    })?;
    toml::from_str(&text).map_err(|e| VpnError::Config(format!("{}: {e}", path.display())))
}

fn parse<T: std::str::FromStr>(what: &str, text: &str, expected: &str) -> Result<T, VpnError> {
    text.trim()
        .parse()
        .map_err(|_| VpnError::Config(format!("{what} {text:?}: expected {expected}")))
}

/// Reads a private key file (base64, as `lbs vpn keygen` writes it), relative to `base`.
pub fn read_private_key(base: &Path, file: &Path) -> Result<Key, VpnError> {
    let path = base.join(file);
    let text = lbs_host::fs::read_secret(&path).map_err(|error| VpnError::Io {
        what: format!("reading the private key {}", path.display()),
        error,
    })?;
    parse_key(&format!("private key {}", path.display()), &text)
}

/// The box's tunnels from its configuration file.
pub fn tunnels_from_file(path: &Path) -> Result<TunnelsConfig, VpnError> {
    let file: BoxFile = read_toml(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let defaults = FailoverConfig::default();
    let endpoints = file
        .endpoint
        .iter()
        .map(|e| {
            let what = |field: &str| format!("endpoint {}: {field}", e.name);
            Ok(EndpointSpec {
                name: e.name.clone(),
                public_key: parse_key(&what("public_key"), &e.public_key)?,
                endpoint: parse::<SocketAddr>(&what("endpoint"), &e.endpoint, "address:port")?,
                address: parse::<Ipv4Addr>(&what("address"), &e.address, "an IPv4 address")?,
                prefix: parse::<Ipv4Cidr>(
                    &what("prefix"),
                    &e.prefix,
                    "an IPv4 prefix like 10.77.0.0/16",
                )?,
            })
        })
        .collect::<Result<Vec<_>, VpnError>>()?;
    let config = TunnelsConfig {
        private_key: read_private_key(base, &file.private_key_file)?,
        address: parse("address", &file.address, "an IPv4 address")?,
        interface_prefix: file.interface_prefix,
        backend: file.backend,
        failover: FailoverConfig {
            probe_interval: file
                .probe_interval_ms
                .map_or(defaults.probe_interval, Duration::from_millis),
            dead_after: file.dead_after.unwrap_or(defaults.dead_after),
            failback_after: file
                .failback_after_s
                .map_or(defaults.failback_after, Duration::from_secs),
            reset_every: file
                .reset_every_s
                .map_or(defaults.reset_every, Duration::from_secs),
            preferred: file.preferred,
        },
        keepalive: (file.keepalive_s > 0).then_some(file.keepalive_s),
        heartbeat_port: file.heartbeat_port,
        endpoints,
    };
    config.validate()?;
    Ok(config)
}

/// A data-center endpoint and its box peers from its configuration file.
pub fn endpoint_from_file(path: &Path) -> Result<(EndpointConfig, Vec<(Key, Ipv4Addr)>), VpnError> {
    let file: EndpointFile = read_toml(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let config = EndpointConfig {
        interface: file.interface,
        private_key: read_private_key(base, &file.private_key_file)?,
        listen_port: file.listen_port,
        address: parse(
            "address",
            &file.address,
            "an address with the overlay's prefix length, like 10.77.255.1/16",
        )?,
        service_addresses: file
            .service_addresses
            .iter()
            .map(|s| parse("service_addresses", s, "an address with a prefix length"))
            .collect::<Result<_, _>>()?,
        backend: file.backend,
        heartbeat_port: file.heartbeat_port,
    };
    let peers = peers_of(&file.peer)?;
    Ok((config, peers))
}

/// Only the peers of an endpoint's file (what a reload applies).
pub fn endpoint_peers_from_file(path: &Path) -> Result<Vec<(Key, Ipv4Addr)>, VpnError> {
    let file: EndpointFile = read_toml(path)?;
    peers_of(&file.peer)
}

fn peers_of(entries: &[PeerEntry]) -> Result<Vec<(Key, Ipv4Addr)>, VpnError> {
    let mut peers: Vec<(Key, Ipv4Addr)> = Vec::new();
    for p in entries {
        let key = parse_key(&format!("peer at {}: public_key", p.address), &p.public_key)?;
        let address = parse(
            &format!("peer {}: address", p.public_key),
            &p.address,
            "an IPv4 address",
        )?;
        if peers.iter().any(|(k, a)| *k == key || *a == address) {
            return Err(VpnError::Config(format!(
                "peer {} at {address}: its key or address appears twice",
                p.public_key
            )));
        }
        peers.push((key, address));
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        lbs_host::fs::write_file_atomic(&path, text.as_bytes(), 0o600).unwrap();
        path
    }

    fn setup() -> (tempfile::TempDir, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let key = Key::generate_private();
        write(dir.path(), "box.key", &format!("{}\n", key.to_base64()));
        let peer = Key::generate_private().get_public().to_base64();
        (dir, key.to_base64(), peer)
    }

    #[test]
    fn a_box_file_reads_with_defaults_and_a_relative_key_file() {
        let (dir, key, dc) = setup();
        let path = write(
            dir.path(),
            "vpn.toml",
            &format!(
                "private_key_file = \"box.key\"\naddress = \"10.77.0.5\"\nfailback_after_s = 3\n\n[[endpoint]]\nname = \"dc1\"\npublic_key = \"{dc}\"\nendpoint = \"192.0.2.1:51820\"\naddress = \"10.77.255.1\"\nprefix = \"10.77.0.0/16\"\n"
            ),
        );
        let config = tunnels_from_file(&path).unwrap();
        assert_eq!(config.private_key.to_base64(), key);
        assert_eq!(config.address, Ipv4Addr::new(10, 77, 0, 5));
        assert_eq!(config.interface(1), "lbs-dc1");
        assert_eq!(config.failover.failback_after, Duration::from_secs(3));
        assert_eq!(config.failover.dead_after, 3);
        assert_eq!(config.keepalive, Some(15));
        assert_eq!(config.endpoints[0].prefix, "10.77.0.0/16".parse().unwrap());
        let shown = format!("{config:?}");
        assert!(!shown.contains(&key), "the private key in Debug: {shown}");
        assert!(shown.contains(&config.private_key.get_public().to_base64()));
    }

    #[test]
    fn a_private_key_others_may_read_is_refused() {
        let (dir, _, _) = setup();
        let key = dir.path().join("box.key");
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        let err = read_private_key(dir.path(), Path::new("box.key"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn mistakes_are_named_with_the_field_and_what_was_expected() {
        let (dir, _, dc) = setup();
        let cases = [
            (
                (
                    "[[endpoint]]\nname = \"dc1\"\npublic_key = \"nope\"\nendpoint = \"192.0.2.1:51820\"\naddress = \"10.77.255.1\"\nprefix = \"10.77.0.0/16\""
                    .to_owned()),
                "endpoint dc1: public_key: not a WireGuard key",
            ),
            (
                format!(
                    "[[endpoint]]\nname = \"dc1\"\npublic_key = \"{dc}\"\nendpoint = \"192.0.2.1\"\naddress = \"10.77.255.1\"\nprefix = \"10.77.0.0/16\""
                ),
                "endpoint dc1: endpoint \"192.0.2.1\": expected address:port",
            ),
            (
                format!(
                    "[[endpoint]]\nname = \"dc1\"\npublic_key = \"{dc}\"\nendpoint = \"192.0.2.1:51820\"\naddress = \"10.77.255.1\"\nprefix = \"10.78.0.0/16\""
                ),
                "outside endpoint dc1's prefix 10.78.0.0/16",
            ),
            (
                format!(
                    "[[endpoint]]\nname = \"dc1\"\npublic_key = \"{dc}\"\nendpoint = \"10.77.9.9:51820\"\naddress = \"10.77.255.1\"\nprefix = \"10.77.0.0/16\""
                ),
                "inside the overlay",
            ),
            (
                format!("[[endpoint]]\nname = \"dc1\"\npublic_key = \"{dc}\"\nendpoint = \"192.0.2.1:51820\"\naddress = \"10.77.255.1\"\nprefix = \"10.77.0.0/16\"\n[[endpoint]]\nname = \"dc2\"\npublic_key = \"{}\"\nendpoint = \"192.0.2.2:51820\"\naddress = \"10.77.255.2\"\nprefix = \"10.77.0.0/24\"", Key::generate_private().get_public().to_base64()),
                "every endpoint must serve the same overlay prefix",
            ),
            (String::new(), "no data-center endpoint"),
            ("colour = \"blue\"".to_owned(), "unknown field `colour`"),
        ];
        for (tail, expected) in cases {
            let path = write(
                dir.path(),
                "bad.toml",
                &format!("private_key_file = \"box.key\"\naddress = \"10.77.0.5\"\n{tail}\n"),
            );
            let err = tunnels_from_file(&path).unwrap_err().to_string();
            assert!(err.contains(expected), "{expected:?} not in {err:?}");
        }
        let missing = write(
            dir.path(),
            "nokey.toml",
            "private_key_file = \"absent.key\"\naddress = \"10.77.0.5\"\n",
        );
        let err = tunnels_from_file(&missing).unwrap_err().to_string();
        assert!(err.contains("absent.key"), "{err}");
    }

    #[test]
    fn an_endpoint_file_reads_its_peers_and_refuses_duplicates() {
        let (dir, _, boxkey) = setup();
        let path = write(
            dir.path(),
            "ep.toml",
            &format!(
                "private_key_file = \"box.key\"\ninterface = \"lbs-ep\"\nlisten_port = 51820\naddress = \"10.77.255.1/16\"\nservice_addresses = [\"10.77.0.1/32\"]\n\n[[peer]]\npublic_key = \"{boxkey}\"\naddress = \"10.77.0.5\"\n"
            ),
        );
        let (config, peers) = endpoint_from_file(&path).unwrap();
        assert_eq!(config.address, "10.77.255.1/16".parse().unwrap());
        assert_eq!(config.heartbeat_port, HEARTBEAT_PORT);
        assert_eq!(
            peers,
            [(
                Key::from_base64(&boxkey).unwrap(),
                Ipv4Addr::new(10, 77, 0, 5)
            )]
        );

        let doubled = std::fs::read_to_string(&path).unwrap()
            + &format!(
                "\n[[peer]]\npublic_key = \"{}\"\naddress = \"10.77.0.5\"\n",
                Key::generate_private().get_public().to_base64()
            );
        let path = write(dir.path(), "ep2.toml", &doubled);
        let err = endpoint_peers_from_file(&path).unwrap_err().to_string();
        assert!(err.contains("appears twice"), "{err}");
    }
}
