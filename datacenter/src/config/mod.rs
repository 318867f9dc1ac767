//! `serve`'s configuration: a TOML file (`<dir>/datacenter.toml` by default) where every field
//! has a default, so an empty file (or none) gives a working activation and control service.
//!
//! ```toml
//! activation = ["0.0.0.0:7440"]   # boxes activate here (TLS, server-authenticated)
//! control = ["0.0.0.0:7441"]      # and report here (mutual TLS)
//! advertise_control = []          # what boxes are told; default: the address they activated at
//! overlay_pool = "10.77.0.0/16"   # boxes' overlay addresses (the first ten are the data center's)
//! site = "dc"                     # this site's name: shown to boxes, picks its endpoints
//! follow = []                     # `lbs-datacenter site` only: the main site's control API
//! handover_holdoff_s = 900        # after a primary handed over (its PBX down), the next
//!                                 # hand-over of that pair waits this long (no flapping)
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
//! site = "dc"                     # where it runs; default: this site
//! interface = "lbs-dc1"
//! listen_port = 51820
//! public = "198.51.100.1:51820"   # where boxes send their packets
//! address = "10.77.255.1/16"      # the endpoint's overlay address, the overlay's prefix
//! service_addresses = ["10.77.0.1/32"]
//! private_key_file = "dc1.key"    # relative to the configuration file
//! backend = "auto"                # or "kernel" / "userspace"
//!
//! [[endpoint]]                    # one at another site (`lbs-datacenter site` runs it there):
//! name = "dc2"                    # boxes are told about it; its private key stays there
//! site = "dc2"
//! public = "203.0.113.7:51820"
//! address = "10.77.255.2/16"
//! public_key = "…44 base64 characters…"
//!
//! [store]                         # where the records are: "sqlite" (this site's file, the
//! backend = "sqlite"              # default) or "etcd", shared by every site
//! endpoints = ["https://10.20.0.11:2379", "https://10.20.0.12:2379", "https://10.20.0.13:2379"]
//! prefix = "/lbs"
//! timeout_ms = 2000               # every request to etcd, connecting included
//! ca_file = "etcd-ca.pem"         # client TLS: the members' CA, this site's certificate
//! cert_file = "etcd-client.pem"   # and key (required for https:// endpoints)
//! key_file = "etcd-client.key"
//! dns_lease_s = 6                 # the DNS role's lease: a site gone, another takes over
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use lbs_protocol::net::Ipv4Cidr;
use lbs_vpn::{BackendChoice, EndpointConfig, Key};
use serde::Deserialize;

use crate::dns::DnsServer;

mod portal;
pub use portal::PortalSettings;

/// The configuration's name in the data directory (when `--config` does not say).
pub const CONFIG_FILE: &str = "datacenter.toml";

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
    follow: Vec<SocketAddr>,
    #[serde(default = "default_holdoff")]
    handover_holdoff_s: u64,
    #[serde(default)]
    rate_limit: RateLimitFile,
    dns: Option<DnsFile>,
    #[serde(default)]
    endpoint: Vec<EndpointFile>,
    store: Option<StoreFile>,
    portal: Option<portal::PortalFile>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    #[serde(default)]
    backend: BackendName,
    #[serde(default)]
    endpoints: Vec<String>,
    prefix: Option<String>,
    #[serde(default = "default_dns_timeout")]
    timeout_ms: u64,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    #[serde(default = "default_dns_lease")]
    dns_lease_s: u64,
}

#[derive(Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum BackendName {
    #[default]
    Sqlite,
    Etcd,
}

fn default_dns_lease() -> u64 {
    6
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
    site: Option<String>,
    interface: Option<String>,
    #[serde(default = "default_wg_port")]
    listen_port: u16,
    public: SocketAddr,
    address: String,
    #[serde(default)]
    service_addresses: Vec<String>,
    private_key_file: Option<PathBuf>,
    public_key: Option<String>,
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

/// One WireGuard endpoint: what boxes are told about it and, at its own site, how to run it.
#[derive(Clone, Debug)]
pub struct EndpointSettings {
    /// Its name ("dc1").
    pub name: String,
    /// The site that runs it.
    pub site: String,
    /// Where boxes send their packets.
    pub public: SocketAddr,
    /// Its WireGuard public key (base64).
    pub public_key: String,
    /// Its overlay address (the heartbeat responder).
    pub overlay: Ipv4Addr,
    /// The interface, key and addresses: `Some` for this site's endpoints only.
    pub run: Option<EndpointConfig>,
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
    /// This site's name: in the hello, and which endpoints run here.
    pub site: String,
    /// `lbs-datacenter site`: the main site's control API, where the peers come from.
    pub follow: Vec<SocketAddr>,
    /// Activation attempts per source.
    pub rate_limit: RateLimit,
    /// DNS updates, if configured.
    pub dns: Option<(DnsServer, u32)>,
    /// The tunnel endpoints.
    pub endpoints: Vec<EndpointSettings>,
    /// How long after a hand-over the pair's next one is refused.
    pub handover_holdoff: std::time::Duration,
    /// Where the records are.
    pub store: StoreSettings,
    /// The web portal, when it is on.
    pub portal: Option<PortalSettings>,
}

/// Where the data center's records are.
#[derive(Clone, Debug, Default)]
pub enum StoreSettings {
    /// This site's SQLite file in the data directory (one site).
    #[default]
    Sqlite,
    /// etcd, shared by every site.
    Etcd {
        etcd: crate::kv::EtcdSettings,
        /// The keys' prefix.
        prefix: String,
        /// The lease of the role of sending DNS updates (one site at a time).
        dns_lease: Duration,
    },
}

impl StoreSettings {
    /// Reads only the `[store]` section of `path` (the commands other than `serve` need no
    /// more); a missing file is the default.
    pub fn load(path: &Path) -> anyhow::Result<StoreSettings> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
        };
        #[derive(Deserialize)]
        struct OnlyStore {
            store: Option<StoreFile>,
        }
        let base = path.parent().unwrap_or(Path::new("."));
        (|| {
            let file: OnlyStore = toml::from_str(&text)?;
            store_settings(file.store.unwrap_or_default(), base)
        })()
        .with_context(|| format!("in {}", path.display()))
    }
}

fn store_settings(file: StoreFile, base: &Path) -> anyhow::Result<StoreSettings> {
    if file.backend == BackendName::Sqlite {
        if !file.endpoints.is_empty() || file.ca_file.is_some() {
            bail!("store: endpoints and TLS files are for backend = \"etcd\"");
        }
        return Ok(StoreSettings::Sqlite);
    }
    if file.endpoints.is_empty() {
        bail!(
            "store: backend = \"etcd\" needs its members' endpoints, every site's (https://10.20.0.11:2379, …)"
        );
    }
    let tls = match (file.ca_file, file.cert_file, file.key_file) {
        (Some(ca), Some(cert), Some(key)) => Some(crate::kv::EtcdTls {
            ca: base.join(ca),
            cert: base.join(cert),
            key: base.join(key),
        }),
        (None, None, None) => None,
        _ => bail!(
            "store: give all of ca_file, cert_file and key_file (mutual TLS with etcd), or none"
        ),
    };
    for endpoint in &file.endpoints {
        let secure = endpoint.starts_with("https://");
        if !secure && !endpoint.starts_with("http://") {
            bail!("store: endpoint {endpoint:?}: expected https://address:port");
        }
        if secure && tls.is_none() {
            bail!("store: endpoint {endpoint}: https needs ca_file, cert_file and key_file");
        }
        if !secure && tls.is_some() {
            bail!("store: endpoint {endpoint}: with TLS files every endpoint is https://");
        }
    }
    let prefix = file.prefix.unwrap_or_else(|| "/lbs".to_owned());
    if !prefix.starts_with('/') || prefix.len() < 2 {
        bail!("store: prefix {prefix:?}: expected a key prefix like /lbs");
    }
    if file.dns_lease_s < 2 {
        bail!("store: dns_lease_s must be at least 2");
    }
    Ok(StoreSettings::Etcd {
        etcd: crate::kv::EtcdSettings {
            endpoints: file.endpoints,
            timeout: Duration::from_millis(file.timeout_ms.max(100)),
            tls,
        },
        prefix,
        dns_lease: Duration::from_secs(file.dns_lease_s),
    })
}

fn default_holdoff() -> u64 {
    900
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
        (|| {
            let file: File = toml::from_str(&text)?;
            if file.dns.as_ref().is_some_and(|dns| dns.secret.is_some()) {
                let meta = std::fs::metadata(path)?;
                lbs_host::fs::check_private(path, &meta).context(
                    "the TSIG secret is written inline: make the file private, or move the secret to a secret_file of mode 600",
                )?;
            }
            Self::from_file(file, base)
        })()
        .with_context(|| format!("in {}", path.display()))
    }

    /// Parses configuration text; relative file names are under `base`.
    pub fn parse(text: &str, base: &Path) -> anyhow::Result<ServeConfig> {
        Self::from_file(toml::from_str(text)?, base)
    }

    fn from_file(file: File, base: &Path) -> anyhow::Result<ServeConfig> {
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
            let site = e.site.clone().unwrap_or_else(|| file.site.clone());
            let (public_key, run) = if site == file.site {
                let (Some(key_file), Some(interface)) = (&e.private_key_file, &e.interface) else {
                    bail!(
                        "endpoint {} runs at this site ({site}): give its interface and private_key_file",
                        e.name
                    );
                };
                if e.public_key.is_some() {
                    bail!(
                        "endpoint {}: public_key is for endpoints of other sites; this site's comes from private_key_file",
                        e.name
                    );
                }
                let private_key = lbs_vpn::config::read_private_key(base, key_file)?;
                let config = EndpointConfig {
                    interface: interface.clone(),
                    private_key,
                    listen_port: e.listen_port,
                    address,
                    service_addresses,
                    backend: e.backend,
                    heartbeat_port: e.heartbeat_port,
                };
                (config.private_key.get_public().to_base64(), Some(config))
            } else {
                let Some(text) = &e.public_key else {
                    bail!(
                        "endpoint {} runs at site {site}: give its public_key here (its private key stays there)",
                        e.name
                    );
                };
                if e.private_key_file.is_some() {
                    bail!(
                        "endpoint {} runs at site {site}, not here ({}): its private key stays there; give public_key",
                        e.name,
                        file.site
                    );
                }
                let key = lbs_vpn::wg::parse_key(&what("public_key"), text)?;
                (key.to_base64(), None)
            };
            let clash = endpoints.iter().any(|x: &EndpointSettings| {
                x.name == e.name
                    || matches!((&x.run, &run), (Some(a), Some(b)) if a.interface == b.interface)
            });
            if clash {
                bail!("endpoint {}: name or interface used twice", e.name);
            }
            endpoints.push(EndpointSettings {
                name: e.name,
                site,
                public: e.public,
                public_key,
                overlay: address.addr,
                run,
            });
        }
        Ok(ServeConfig {
            activation: file.activation,
            control: file.control,
            advertise_control: file.advertise_control,
            overlay_pool,
            site: file.site,
            follow: file.follow,
            rate_limit: RateLimit {
                burst: file.rate_limit.burst,
                per_minute: file.rate_limit.per_minute,
            },
            dns,
            endpoints,
            handover_holdoff: std::time::Duration::from_secs(file.handover_holdoff_s),
            store: store_settings(file.store.unwrap_or_default(), base)?,
            portal: portal::portal_settings(file.portal.unwrap_or_default(), base)?,
        })
    }
}

fn dns_settings(d: DnsFile, base: &Path) -> anyhow::Result<(DnsServer, u32)> {
    let secret_text = match (d.secret, d.secret_file) {
        (Some(secret), None) => secret,
        (None, Some(file)) => {
            let path = base.join(file);
            lbs_host::fs::read_secret(&path)
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

/// Parses a WireGuard public key a box sent.
pub fn box_key(text: &str) -> Option<Key> {
    lbs_vpn::wg::parse_key("", text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_config_parses_and_documents_every_section() {
        let text = include_str!("../../../dist/lbs-datacenter/datacenter.toml");
        let shipped = ServeConfig::parse(text, Path::new("/etc/lbs-datacenter"))
            .expect("dist/lbs-datacenter/datacenter.toml parses");
        let defaults = ServeConfig::parse("", Path::new(".")).expect("defaults");
        assert_eq!(shipped.activation, defaults.activation);
        assert_eq!(shipped.site, defaults.site);
        for key in [
            "activation",
            "control",
            "advertise_control",
            "overlay_pool",
            "site",
            "follow",
            "[rate_limit]",
            "[dns]",
            "[[endpoint]]",
            "private_key_file",
            "public_key",
            "[store]",
            "endpoints",
            "dns_lease_s",
        ] {
            assert!(text.contains(&format!("#{key}")), "{key} is not documented");
        }
    }

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
        assert!(err("[store]\nbackend = \"etcd\"").contains("needs its members' endpoints"));
        assert!(
            err("[store]\nbackend = \"etcd\"\nendpoints = [\"https://10.0.0.1:2379\"]")
                .contains("https needs ca_file")
        );
        assert!(
            err("[store]\nbackend = \"etcd\"\nendpoints = [\"10.0.0.1:2379\"]")
                .contains("expected https://")
        );
        assert!(err("[store]\nbackend = \"postgres\"").contains("unknown variant"));
        let etcd = ServeConfig::parse(
            "[store]\nbackend = \"etcd\"\nendpoints = [\"https://10.0.0.1:2379\"]\nca_file = \"ca.pem\"\ncert_file = \"c.pem\"\nkey_file = \"c.key\"",
            Path::new("/etc/lbs-datacenter"),
        )
        .unwrap();
        let StoreSettings::Etcd {
            etcd,
            prefix,
            dns_lease,
        } = etcd.store
        else {
            panic!("etcd settings")
        };
        assert_eq!(
            (prefix.as_str(), dns_lease),
            ("/lbs", Duration::from_secs(6))
        );
        assert_eq!(
            etcd.tls.map(|t| t.ca),
            Some(PathBuf::from("/etc/lbs-datacenter/ca.pem"))
        );
    }

    #[test]
    fn a_tsig_secret_others_may_read_is_refused_and_never_shown() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let secret = "c2VjcmV0IHNlY3JldCBzZWNyZXQgc2VjcmV0Cg==";
        let dns = "[dns]\nserver = \"127.0.0.1:53\"\nzone = \"x\"\nkey_name = \"k\"\n";
        let inline = dir.path().join("inline.toml");
        std::fs::write(&inline, format!("{dns}secret = \"{secret}\"\n")).unwrap();
        let in_file = dir.path().join("in-file.toml");
        std::fs::write(&in_file, format!("{dns}secret_file = \"tsig.key\"\n")).unwrap();
        std::fs::write(dir.path().join("tsig.key"), secret).unwrap();
        let set_mode = |path: &Path, mode| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        for path in [&inline, &in_file] {
            set_mode(path, 0o644);
            set_mode(&dir.path().join("tsig.key"), 0o644);
            let err = format!("{:#}", ServeConfig::load(path, true).unwrap_err());
            assert!(err.contains("chmod 600"), "{err}");
        }
        set_mode(&inline, 0o600);
        set_mode(&dir.path().join("tsig.key"), 0o600);
        for path in [&inline, &in_file] {
            let config = ServeConfig::load(path, true).unwrap();
            let shown = format!("{config:?}");
            assert!(config.dns.is_some());
            assert!(
                !shown.contains("115, 101, 99, 114"),
                "the secret's bytes in Debug: {shown}"
            );
            assert!(shown.contains("<28 bytes>"), "{shown}");
        }
    }

    #[test]
    fn an_endpoint_of_another_site_is_told_to_boxes_but_not_run_here() {
        let key = Key::generate_private().get_public().to_base64();
        let remote = "site = \"dc1\"\n[[endpoint]]\nname = \"dc2\"\nsite = \"dc2\"\npublic = \"203.0.113.7:51820\"\naddress = \"10.77.255.2/16\"\n";
        let config =
            ServeConfig::parse(&format!("{remote}public_key = \"{key}\"\n"), Path::new("."))
                .expect("an endpoint of another site");
        let [endpoint] = config.endpoints.as_slice() else {
            panic!("one endpoint: {:?}", config.endpoints)
        };
        assert_eq!(
            (endpoint.site.as_str(), endpoint.public_key.as_str()),
            ("dc2", key.as_str())
        );
        assert_eq!(endpoint.overlay, Ipv4Addr::new(10, 77, 255, 2));
        assert!(endpoint.run.is_none());

        let err = |text: &str| {
            format!(
                "{:#}",
                ServeConfig::parse(text, Path::new(".")).expect_err(text)
            )
        };
        assert!(err(remote).contains("give its public_key here"));
        assert!(
            err(&format!(
                "{remote}public_key = \"{key}\"\nprivate_key_file = \"dc2.key\"\n"
            ))
            .contains("its private key stays there")
        );
        assert!(err(&format!("{remote}public_key = \"short\"\n")).contains("not a WireGuard key"));
        // This site's endpoint needs what it takes to run it.
        assert!(
            err("[[endpoint]]\nname = \"dc1\"\npublic = \"203.0.113.1:51820\"\naddress = \"10.77.255.1/16\"\n")
                .contains("give its interface and private_key_file")
        );
    }
}
