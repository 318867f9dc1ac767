//! `lbs-datacenter site`: another site of the data center, running only tunnel endpoints
//! (DESIGN §7: every box keeps a tunnel to each site; when one site goes dark the overlay
//! moves to the other and nothing else notices).
//!
//! The site has no database and no CA key: it follows the main site's control API over
//! mutual TLS with a data-center certificate the main site issued (`lbs-datacenter
//! site-identity`), asks every [`ASK_EVERY`] which boxes may use the tunnels, and keeps the
//! answer in [`PEERS_CACHE`] so that it starts with the same peers — and goes on serving them
//! — while the main site is unreachable. That is the moment it exists for.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use lbs_protocol::control::{self, TunnelPeer};
use lbs_protocol::handshake::HELLO_TIMEOUT;
use lbs_protocol::tls::{self, ClientConfig};
use lbs_protocol::{
    Generation, Hello, Identity, Message, PROTOCOL_VERSION, PeerName, Sender, SoftwareVersion,
    TrustRoot,
};
use lbs_vpn::Endpoint;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::config::{EndpointSettings, ServeConfig};
use crate::serve::{IDENTITY_CERT, IDENTITY_KEY, apply_peers, start_endpoints};
use crate::time::{now_ms, utc};

/// The CA certificate a site trusts (copied from the main site with its identity).
pub const SITE_CA: &str = "ca.pem";
/// The peers last heard from the main site, in the site's directory.
pub const PEERS_CACHE: &str = "tunnel-peers.json";
/// How often the site asks the main site for the peers.
pub const ASK_EVERY: Duration = Duration::from_secs(2);
/// How long one question or connection attempt may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// What [`PEERS_CACHE`] holds.
#[derive(Serialize, Deserialize, PartialEq, Eq, Debug)]
struct Cache {
    /// When the main site said this (ms since the Unix epoch).
    at_ms: i64,
    /// Which main-site address said it.
    from: SocketAddr,
    peers: Vec<TunnelPeer>,
    /// The same boxes pair by pair (a main site of protocol 1.5 or later; empty from an
    /// older one, or in an older cache: then forwarding is not restricted here).
    #[serde(default)]
    pairs: Vec<Vec<TunnelPeer>>,
}

/// The nftables rules for `pairs` on `endpoints`' interfaces (each pair only to itself); with
/// no pairs known (an older main site), nothing is put in place.
async fn isolate(
    endpoints: &[(EndpointSettings, Endpoint)],
    pairs: &[Vec<TunnelPeer>],
) -> Result<(), crate::isolation::IsolationError> {
    if pairs.is_empty() {
        return Ok(());
    }
    let interfaces: Vec<String> = endpoints
        .iter()
        .map(|(_, endpoint)| endpoint.interface().to_owned())
        .collect();
    let overlays: Vec<Vec<Ipv4Addr>> = pairs
        .iter()
        .map(|pair| pair.iter().map(|p| p.overlay).collect())
        .collect();
    crate::isolation::apply(&crate::isolation::ruleset(&interfaces, &overlays)).await
}

/// What `run` tells its caller once the endpoints are up.
#[derive(Debug)]
pub struct SiteReady {
    /// The endpoints running here.
    pub endpoints: Vec<String>,
    /// Peers the endpoints got from the cache at start (0: none cached).
    pub cached_peers: usize,
}

/// Runs this site's endpoints and follows the main site until `shutdown`; the endpoints are
/// removed before it returns.
pub async fn run(
    dir: &Path,
    config: ServeConfig,
    shutdown: CancellationToken,
    ready: impl FnOnce(&SiteReady),
) -> anyhow::Result<()> {
    if config.follow.is_empty() {
        bail!(
            "no follow addresses in the configuration: a site asks the main site's control API which boxes may use its tunnels (add like follow = [\"203.0.113.10:7441\"])"
        );
    }
    if !config.endpoints.iter().any(|e| e.run.is_some()) {
        bail!(
            "no [[endpoint]] of site {:?} in the configuration: nothing to run here (an endpoint runs where its site = matches this file's site =)",
            config.site
        );
    }
    let client = client_config(dir)?;
    let endpoints = start_endpoints(&config).await?;
    let cache_path = dir.join(PEERS_CACHE);
    let mut known = match read_cache(&cache_path) {
        Ok(cache) => cache,
        Err(err) => {
            tracing::warn!("{err:#}; starting without peers until the main site answers");
            None
        }
    };
    if let Some(cache) = &known {
        if let Err(err) = isolate(&endpoints, &cache.pairs).await {
            tracing::error!("{err}");
        }
        apply_peers(&endpoints, &as_pairs(&cache.peers));
        tracing::info!(
            peers = cache.peers.len(),
            "serving the peers {} said at {}",
            cache.from,
            utc(cache.at_ms)
        );
    }
    ready(&SiteReady {
        endpoints: endpoints.iter().map(|(s, _)| s.name.clone()).collect(),
        cached_peers: known.as_ref().map_or(0, |c| c.peers.len()),
    });
    let mut follower = Follower {
        site: config.site.clone(),
        addresses: config.follow.clone(),
        client,
        endpoints: &endpoints,
        cache_path,
        reachable: true,
        isolation_said: None,
    };
    tokio::select! {
        () = follower.follow(&mut known) => {}
        () = shutdown.cancelled() => {}
    }
    for (settings, endpoint) in endpoints {
        if let Err(err) = endpoint.shutdown().await {
            tracing::warn!(endpoint = settings.name, "removing the endpoint: {err}");
        }
    }
    if let Err(err) = crate::isolation::remove().await {
        tracing::warn!("removing the overlay rules: {err}");
    }
    Ok(())
}

fn client_config(dir: &Path) -> anyhow::Result<Arc<ClientConfig>> {
    let (cert, key, ca) = (
        dir.join(IDENTITY_CERT),
        dir.join(IDENTITY_KEY),
        dir.join(SITE_CA),
    );
    let hint = || {
        format!(
            "this site's identity in {}: make it at the main site with `lbs-datacenter site-identity --out DIR` and copy DIR's files here",
            dir.display()
        )
    };
    let identity = Identity::load(&cert, &key).with_context(hint)?;
    if identity.name() != &PeerName::DataCenter {
        bail!(
            "{} names {}, not the data center: {}",
            cert.display(),
            identity.name(),
            hint()
        );
    }
    let root = TrustRoot::load(&ca).with_context(hint)?;
    Ok(tls::client_config(&identity, &root)?)
}

fn as_pairs(peers: &[TunnelPeer]) -> Vec<(String, Ipv4Addr)> {
    peers
        .iter()
        .map(|p| (p.public_key.clone(), p.overlay))
        .collect()
}

fn read_cache(path: &Path) -> anyhow::Result<Option<Cache>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
    };
    let cache = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a peers cache lbs wrote", path.display()))?;
    Ok(Some(cache))
}

struct Follower<'a> {
    site: String,
    addresses: Vec<SocketAddr>,
    client: Arc<ClientConfig>,
    endpoints: &'a [(EndpointSettings, Endpoint)],
    cache_path: PathBuf,
    /// Whether the last attempt reached the main site (so "unreachable" is said once).
    reachable: bool,
    /// The last error putting the overlay rules in place (said once).
    isolation_said: Option<String>,
}

impl Follower<'_> {
    /// Follows the main site for ever: asks, applies what changed, and rides out its absence
    /// with the peers it has.
    async fn follow(&mut self, known: &mut Option<Cache>) {
        loop {
            if let Err(err) = self.session(known).await
                && self.reachable
            {
                let peers = known.as_ref().map_or(0, |c| c.peers.len());
                tracing::warn!(
                    "main site unreachable ({err:#}); the endpoints keep the {peers} peers they have and the site keeps asking every {ASK_EVERY:?}"
                );
                self.reachable = false;
            }
            tokio::time::sleep(ASK_EVERY).await;
        }
    }

    /// One connection to the first main-site address that answers, asking until it fails.
    async fn session(&mut self, known: &mut Option<Cache>) -> anyhow::Result<()> {
        let (mut conn, from, version) = self.connect().await?;
        let by_pair = version >= lbs_protocol::control::PAIRS;
        if !by_pair {
            tracing::error!(
                %from,
                "the main site speaks protocol {version}: it cannot say which boxes are pairs (1.5), so this site's endpoints forward between all boxes; update the main site"
            );
        }
        if !self.reachable {
            tracing::info!(%from, "the main site answers again");
            self.reachable = true;
        }
        loop {
            let request = if by_pair {
                Message::TunnelPairsRequest
            } else {
                Message::TunnelPeersRequest
            };
            let (_, answer) =
                control::call(&mut conn, Generation::default(), request, ANSWER_TIMEOUT)
                    .await
                    .with_context(|| format!("main site at {from}"))?;
            let (mut peers, pairs) = match answer {
                Message::TunnelPeers { peers } if !by_pair => (peers, Vec::new()),
                Message::TunnelPairs { pairs } if by_pair => (pairs.concat(), pairs),
                other => bail!(
                    "main site at {from} answered the peers request with {}",
                    other.kind()
                ),
            };
            peers.sort();
            let changed = known
                .as_ref()
                .is_none_or(|c| c.peers != peers || c.pairs != pairs);
            // The rules before the peers: a new box's packets go nowhere but to its partner.
            // Without them the boxes still get their tunnels (and the error is said once).
            let isolated = changed
                && match isolate(self.endpoints, &pairs).await {
                    Ok(()) => {
                        self.isolation_said = None;
                        if !pairs.is_empty() {
                            tracing::info!(
                                pairs = pairs.len(),
                                "overlay forwarding: each pair only to itself"
                            );
                        }
                        true
                    }
                    Err(err) => {
                        if self.isolation_said.as_deref() != Some(&err.to_string()) {
                            tracing::error!("{err}");
                            self.isolation_said = Some(err.to_string());
                        }
                        false
                    }
                };
            // Peers even when the rules failed: the boxes keep their tunnels.
            if changed && (apply_peers(self.endpoints, &as_pairs(&peers)) && isolated) {
                let cache = Cache {
                    at_ms: now_ms(),
                    from,
                    peers,
                    pairs,
                };
                self.save(&cache);
                *known = Some(cache);
            }
            tokio::time::sleep(ASK_EVERY).await;
        }
    }

    async fn connect(
        &self,
    ) -> anyhow::Result<(
        lbs_protocol::Connection<tls::ClientStream<TcpStream>>,
        SocketAddr,
        lbs_protocol::ProtocolVersion,
    )> {
        let mut last_error = anyhow::anyhow!("no main-site address");
        for &address in &self.addresses {
            let attempt = async {
                let tcp = tokio::time::timeout(ANSWER_TIMEOUT, TcpStream::connect(address))
                    .await
                    .with_context(|| format!("no answer within {ANSWER_TIMEOUT:?}"))??;
                lbs_host::tcp::watch_peer(&tcp)?;
                let stream = tls::connect(self.client.clone(), &PeerName::DataCenter, tcp).await?;
                let hello = Hello {
                    protocol: PROTOCOL_VERSION,
                    software: SoftwareVersion::current(),
                    sender: Sender::DataCenter {
                        site: self.site.clone(),
                    },
                };
                let (conn, negotiated) = lbs_protocol::exchange_hello(
                    stream,
                    &PeerName::DataCenter,
                    hello,
                    Generation::default(),
                    HELLO_TIMEOUT,
                )
                .await?;
                anyhow::Ok((conn, negotiated.version))
            };
            match attempt.await {
                Ok((conn, version)) => return Ok((conn, address, version)),
                Err(err) => last_error = err.context(format!("main site at {address}")),
            }
        }
        Err(last_error)
    }

    /// Keeps the peers for the next start; a full disk costs only that.
    fn save(&self, cache: &Cache) {
        let written = serde_json::to_vec_pretty(cache)
            .map_err(std::io::Error::other)
            .and_then(|json| lbs_host::write_file_atomic(&self.cache_path, &json, 0o644));
        if let Err(err) = written {
            tracing::warn!(
                "cannot keep the peers in {} ({err}); a restart while the main site is unreachable would start without them",
                self.cache_path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_reads_back_what_was_kept_and_names_a_foreign_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join(PEERS_CACHE);
        assert!(read_cache(&path).expect("missing is fine").is_none());
        let cache = Cache {
            at_ms: 1_700_000_000_000,
            from: "10.20.0.11:7441".parse().expect("address"),
            peers: vec![TunnelPeer {
                public_key: "k".into(),
                overlay: Ipv4Addr::new(10, 77, 0, 10),
            }],
            pairs: vec![vec![TunnelPeer {
                public_key: "k".into(),
                overlay: Ipv4Addr::new(10, 77, 0, 10),
            }]],
        };
        std::fs::write(&path, serde_json::to_vec(&cache).expect("json")).expect("write");
        assert_eq!(read_cache(&path).expect("read"), Some(cache));
        std::fs::write(&path, "[not ours").expect("write");
        let err = format!("{:#}", read_cache(&path).expect_err("foreign"));
        assert!(err.contains("not a peers cache lbs wrote"), "{err}");
    }
}
