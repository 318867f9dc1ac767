//! `serve`'s configuration: a TOML file (`<dir>/datacenter.toml` by default) where every field
//! has a default, so an empty file (or none) gives a working activation and control service.
//!
//! ```toml
//! activation = ["0.0.0.0:7440"]   # boxes activate here (TLS, server-authenticated)
//! control = ["0.0.0.0:7441"]      # and report here (mutual TLS)
//! advertise_control = []          # what boxes are told; default: the address they activated at
//! overlay_pool = "10.77.0.0/16"   # boxes' overlay addresses (the first ten are the data center's)
//! site = "dc"                     # shown to boxes in the hello
//!
//! [rate_limit]                    # activation attempts per source address
//! burst = 10
//! per_minute = 10
//!
//! [dns]                           # RFC 2136 updates with TSIG (HMAC-SHA256); omit: no DNS
//! server = "192.0.2.53:53"
//! zone = "example.com"
//! key_name = "lbs-dc"
//! secret = "base64…"              # or secret_file = "tsig.key" (base64 inside)
//! ttl = 60
//! timeout_ms = 2000
//!
//! [[endpoint]]                    # WireGuard endpoints boxes connect to (root only)
//! name = "dc1"
//! interface = "lbs-dc1"
//! listen_port = 51820
//! public = "198.51.100.1:51820"   # where boxes send their packets
//! address = "10.77.255.1/16"      # the endpoint's overlay address, the overlay's prefix
//! service_addresses = ["10.77.0.1/32"]
//! private_key_file = "dc1.key"    # relative to the configuration file
//! backend = "auto"                # or "kernel" / "userspace"
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use lbs_netconfig::Ipv4Cidr;
use lbs_vpn::{BackendChoice, EndpointConfig, Key};
use serde::Deserialize;

use crate::dns::DnsServer;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default = "default_activation")]
    activation: Vec<SocketAddr>,
    #[serde(default = "default_control")]
    control: Vec<SocketAddr>,
    #[serde(default)]
    advertise_control: Vec<SocketAddr>,
    #[serde(default = "default_pool")]
    overlay_pool: String,
    #[serde(default = "default_site")]
    site: String,
    #[serde(default)]
    rate_limit: RateLimitFile,
    dns: Option<DnsFile>,
    #[serde(default)]
    endpoint: Vec<EndpointFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitFile {
    #[serde(default = "default_burst")]
    burst: u32,
    #[serde(default = "default_per_minute")]
    per_minute: u32,
}

impl Default for RateLimitFile {
    fn default() -> Self {
        RateLimitFile {
            burst: default_burst(),
            per_minute: default_per_minute(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DnsFile {
    server: SocketAddr,
    zone: String,
    key_name: String,
    secret: Option<String>,
    secret_file: Option<PathBuf>,
    #[serde(default = "default_ttl")]
    ttl: u32,
    #[serde(default = "default_dns_timeout")]
    timeout_ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointFile {
    name: String,
    interface: String,
    #[serde(default = "default_wg_port")]
    listen_port: u16,
    public: SocketAddr,
    address: String,
    #[serde(default)]
    service_addresses: Vec<String>,
    private_key_file: PathBuf,
    #[serde(default)]
    backend: BackendChoice,
    #[serde(default = "default_heartbeat_port")]
    heartbeat_port: u16,
}

fn default_activation() -> Vec<SocketAddr> {
    vec![SocketAddr::from(([0, 0, 0, 0], 7440))]
}
fn default_control() -> Vec<SocketAddr> {
    vec![SocketAddr::from(([0, 0, 0, 0], 7441))]
}
fn default_pool() -> String {
    "10.77.0.0/16".to_owned()
}
fn default_site() -> String {
    "dc".to_owned()
}
fn default_burst() -> u32 {
    10
}
fn default_per_minute() -> u32 {
    10
}
fn default_ttl() -> u32 {
    60
}
fn default_dns_timeout() -> u64 {
    2000
}
fn default_wg_port() -> u16 {
    51820
}
fn default_heartbeat_port() -> u16 {
    lbs_vpn::heartbeat::HEARTBEAT_PORT
}

/// How many activation attempts a source address gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Attempts allowed at once.
    pub burst: u32,
    /// Attempts regained per minute.
    pub per_minute: u32,
}

/// One WireGuard endpoint: how to run it and what boxes are told about it.
#[derive(Clone, Debug)]
pub struct EndpointSettings {
    /// Its name ("dc1").
    pub name: String,
    /// Where boxes send their packets.
    pub public: SocketAddr,
    /// The interface, key and addresses.
    pub config: EndpointConfig,
}

/// `serve`'s settings, checked.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Activation listeners.
    pub activation: Vec<SocketAddr>,
    /// Control-API listeners.
    pub control: Vec<SocketAddr>,
    /// The control addresses boxes are told (empty: derived from the activation address).
    pub advertise_control: Vec<SocketAddr>,
    /// Where overlay addresses come from.
    pub overlay_pool: Ipv4Cidr,
    /// The site name in the hello.
    pub site: String,
    /// Activation attempts per source.
    pub rate_limit: RateLimit,
    /// DNS updates, if configured.
    pub dns: Option<(DnsServer, u32)>,
    /// The tunnel endpoints.
    pub endpoints: Vec<EndpointSettings>,
}

impl ServeConfig {
    /// Reads `path`; a missing file is all defaults only when `required` is false.
    pub fn load(path: &Path, required: bool) -> anyhow::Result<ServeConfig> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound && !required => String::new(),
            Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
        };
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).with_context(|| format!("in {}", path.display()))
    }

    /// Parses configuration text; relative file names are under `base`.
    pub fn parse(text: &str, base: &Path) -> anyhow::Result<ServeConfig> {
        let file: File = toml::from_str(text)?;
        if file.activation.is_empty() || file.control.is_empty() {
            bail!("activation and control need at least one address each");
        }
        let overlay_pool: Ipv4Cidr = file.overlay_pool.parse().map_err(|_| {
            anyhow::anyhow!(
                "overlay_pool {:?}: expected a prefix like 10.77.0.0/16",
                file.overlay_pool
            )
        })?;
        if overlay_pool.prefix > 24 {
            bail!("overlay_pool {overlay_pool} is too small: use a /24 or larger");
        }
        if file.rate_limit.burst == 0 || file.rate_limit.per_minute == 0 {
            bail!("rate_limit: burst and per_minute must be at least 1");
        }
        let dns = file.dns.map(|d| dns_settings(d, base)).transpose()?;
        let mut endpoints = Vec::new();
        for e in file.endpoint {
            let what = |field: &str| format!("endpoint {}: {field}", e.name);
            let address: Ipv4Cidr = e.address.parse().map_err(|_| {
                anyhow::anyhow!(
                    "{} {:?}: expected the endpoint's overlay address with the overlay's prefix, like 10.77.255.1/16",
                    what("address"),
                    e.address
                )
            })?;
            if !overlay_pool.contains(address.addr) {
                bail!(
                    "{}: {address} is outside overlay_pool {overlay_pool}",
                    what("address")
                );
            }
            let service_addresses = e
                .service_addresses
                .iter()
                .map(|s| {
                    s.parse::<Ipv4Cidr>().map_err(|_| {
                        anyhow::anyhow!(
                            "{} {s:?}: expected like 10.77.0.1/32",
                            what("service_addresses")
                        )
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let private_key = lbs_vpn::config::read_private_key(base, &e.private_key_file)?;
            if endpoints
                .iter()
                .any(|x: &EndpointSettings| x.name == e.name || x.config.interface == e.interface)
            {
                bail!("endpoint {}: name or interface used twice", e.name);
            }
            endpoints.push(EndpointSettings {
                name: e.name,
                public: e.public,
                config: EndpointConfig {
                    interface: e.interface,
                    private_key,
                    listen_port: e.listen_port,
                    address,
                    service_addresses,
                    backend: e.backend,
                    heartbeat_port: e.heartbeat_port,
                },
            });
        }
        Ok(ServeConfig {
            activation: file.activation,
            control: file.control,
            advertise_control: file.advertise_control,
            overlay_pool,
            site: file.site,
            rate_limit: RateLimit {
                burst: file.rate_limit.burst,
                per_minute: file.rate_limit.per_minute,
            },
            dns,
            endpoints,
        })
    }
}

fn dns_settings(d: DnsFile, base: &Path) -> anyhow::Result<(DnsServer, u32)> {
    let secret_text = match (d.secret, d.secret_file) {
        (Some(secret), None) => secret,
        (None, Some(file)) => {
            let path = base.join(file);
            std::fs::read_to_string(&path)
                .with_context(|| format!("dns: reading secret_file {}", path.display()))?
        }
        _ => bail!("dns: give exactly one of secret and secret_file"),
    };
    let secret = base64::engine::general_purpose::STANDARD
        .decode(secret_text.trim())
        .context("dns: the TSIG secret is not base64 (copy it from the server's key statement)")?;
    if secret.len() < 16 {
        bail!(
            "dns: the TSIG secret is {} bytes; use at least 16 (tsig-keygen makes 32)",
            secret.len()
        );
    }
    Ok((
        DnsServer {
            server: d.server,
            zone: d.zone,
            key_name: d.key_name,
            secret,
            timeout: Duration::from_millis(d.timeout_ms.max(100)),
        },
        d.ttl,
    ))
}

/// The public key boxes are told for an endpoint.
pub fn public_key(settings: &EndpointSettings) -> String {
    settings.config.private_key.get_public().to_base64()
}

/// The overlay address of an endpoint.
pub fn endpoint_overlay(settings: &EndpointSettings) -> Ipv4Addr {
    settings.config.address.addr
}

/// Parses a WireGuard public key a box sent.
pub fn box_key(text: &str) -> Option<Key> {
    lbs_vpn::wg::parse_key("", text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_configured_is_a_working_default() {
        let config = ServeConfig::parse("", Path::new(".")).expect("defaults");
        assert_eq!(config.activation, default_activation());
        assert_eq!(config.overlay_pool.to_string(), "10.77.0.0/16");
        assert!(config.dns.is_none() && config.endpoints.is_empty());
    }

    #[test]
    fn mistakes_are_named() {
        let err = |text: &str| {
            format!(
                "{:#}",
                ServeConfig::parse(text, Path::new(".")).expect_err(text)
            )
        };
        assert!(err("overlay_pool = \"10.77.0.0/30\"").contains("too small"));
        assert!(err("activaton = []").contains("unknown field"));
        assert!(
            err(
                "[dns]\nserver = \"127.0.0.1:53\"\nzone = \"x\"\nkey_name = \"k\"\nsecret = \"!!\""
            )
            .contains("not base64")
        );
        assert!(
            err("[dns]\nserver = \"127.0.0.1:53\"\nzone = \"x\"\nkey_name = \"k\"")
                .contains("exactly one")
        );
    }
}
