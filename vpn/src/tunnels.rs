//! The box's side: one tunnel per data-center endpoint, all up and probed, the overlay
//! routed through the healthy one with the box's overlay address as source.
//!
//! Per tunnel `i` (interface `<prefix><i>`): the WireGuard device with its endpoint as the
//! only peer, the box's overlay address as a /32, a host route to the endpoint's overlay
//! address (the heartbeat target) through it; the overlay prefix is routed through exactly
//! one of them, chosen by [`Failover`]. Routes go away with their interfaces, so stopping is
//! removing the interfaces.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lbs_netconfig::{Ipv4Cidr, LinkInfo, NetBackend, Netlink};
use tokio::sync::{oneshot, watch};

use crate::backend::open_backend;
use crate::error::VpnError;
use crate::failover::{Action, Failover, FailoverConfig, Health, ProbeOutcome, Why};
use crate::heartbeat::{Echo, Probers};
use crate::wg::{BackendChoice, BackendKind, Key, PeerConfig, WireGuard, host};

/// One data-center endpoint as the box sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    /// Its name, for people (`dc1`).
    pub name: String,
    /// Its WireGuard public key.
    pub public_key: Key,
    /// Where it listens on the internet.
    pub endpoint: SocketAddr,
    /// Its own overlay address: heartbeats go there.
    pub address: Ipv4Addr,
    /// What is reached through it (the data center and, through it, partner boxes).
    pub prefix: Ipv4Cidr,
}

/// Everything the box's tunnels need.
#[derive(Clone)]
pub struct TunnelsConfig {
    /// The box's WireGuard private key.
    pub private_key: Key,
    /// The box's overlay address (from the data center), the same on every tunnel.
    pub address: Ipv4Addr,
    /// Interfaces are called this plus the endpoint's index.
    pub interface_prefix: String,
    /// Which WireGuard.
    pub backend: BackendChoice,
    /// Probing and failover rules; `preferred` is the endpoint traffic goes to when healthy.
    pub failover: FailoverConfig,
    /// WireGuard keepalive towards the endpoints, seconds (keeps NAT mappings open).
    pub keepalive: Option<u16>,
    /// The port endpoints answer heartbeats on.
    pub heartbeat_port: u16,
    /// The endpoints, in order of preference after `failover.preferred`.
    pub endpoints: Vec<EndpointSpec>,
}

impl std::fmt::Debug for TunnelsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelsConfig")
            .field("private_key", &crate::wg::PrivateKeyOf(&self.private_key))
            .field("address", &self.address)
            .field("interface_prefix", &self.interface_prefix)
            .field("backend", &self.backend)
            .field("failover", &self.failover)
            .field("keepalive", &self.keepalive)
            .field("heartbeat_port", &self.heartbeat_port)
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

impl TunnelsConfig {
    /// The interface of endpoint `i`.
    pub fn interface(&self, i: usize) -> String {
        format!("{}{i}", self.interface_prefix)
    }

    /// Checks what can be checked before touching the system.
    pub fn validate(&self) -> Result<(), VpnError> {
        let bad = |text: String| Err(VpnError::Config(text));
        if self.endpoints.is_empty() {
            return bad("no data-center endpoint configured".into());
        }
        crate::wg::check_interface_name(&self.interface(self.endpoints.len().saturating_sub(1)))?;
        if self.failover.preferred >= self.endpoints.len() {
            return bad(format!(
                "preferred endpoint {} does not exist ({} configured)",
                self.failover.preferred,
                self.endpoints.len()
            ));
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            if self.endpoints[..i].iter().any(|o| o.name == e.name) {
                return bad(format!("two endpoints are called {:?}", e.name));
            }
            if self.endpoints[..i]
                .iter()
                .any(|o| o.public_key == e.public_key)
            {
                return bad(format!(
                    "endpoint {} has the same public key as another",
                    e.name
                ));
            }
            if e.prefix != self.endpoints[0].prefix {
                return bad(format!(
                    "endpoint {} serves {} but {} serves {}: every endpoint must serve the same overlay prefix, since failover moves its one route",
                    e.name, e.prefix, self.endpoints[0].name, self.endpoints[0].prefix
                ));
            }
            if !e.prefix.contains(self.address) {
                return bad(format!(
                    "this box's address {} is outside endpoint {}'s prefix {}: the data center could not answer it",
                    self.address, e.name, e.prefix
                ));
            }
            if e.address == self.address {
                return bad(format!(
                    "endpoint {} has this box's own address {}",
                    e.name, e.address
                ));
            }
            if let SocketAddr::V4(at) = e.endpoint
                && self.endpoints.iter().any(|o| o.prefix.contains(*at.ip()))
            {
                return bad(format!(
                    "endpoint {}'s internet address {} is inside the overlay: the tunnel would route into itself",
                    e.name,
                    at.ip()
                ));
            }
        }
        if self.failover.probe_interval.is_zero() || self.failover.dead_after == 0 {
            return bad("probe interval and dead-after must be above zero".into());
        }
        Ok(())
    }

    fn peer(&self, i: usize) -> PeerConfig {
        let e = &self.endpoints[i];
        let mut allowed = vec![e.prefix];
        if !e.prefix.contains(e.address) {
            allowed.push(host(e.address));
        }
        PeerConfig {
            public_key: e.public_key.clone(),
            endpoint: Some(e.endpoint),
            allowed,
            keepalive: self.keepalive,
        }
    }
}

/// One tunnel as `lbs status` and the data center see it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TunnelReport {
    /// The endpoint's name.
    pub name: String,
    pub interface: String,
    /// The endpoint's internet address.
    pub endpoint: SocketAddr,
    /// up, degraded, down or unknown.
    pub health: Health,
    /// Whether the overlay goes through it now.
    pub active: bool,
    /// The last answered heartbeat's round trip, milliseconds.
    pub last_rtt_ms: Option<f64>,
    /// Time since the last answered heartbeat, milliseconds (`None`: never).
    pub since_last_good_ms: Option<u64>,
    /// Heartbeats lost in a row now.
    pub lost_in_a_row: u32,
    /// Time since the last WireGuard handshake, seconds (`None`: never).
    pub handshake_age_s: Option<u64>,
    /// Payload bytes received and sent.
    pub rx_bytes: u64,
    /// Payload bytes sent.
    pub tx_bytes: u64,
    /// How often its peer was reset while it was down.
    pub resets: u64,
}

/// A move of the overlay route.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RouteChange {
    /// When, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// The endpoint now used.
    pub to: String,
    /// Why, in words.
    pub reason: String,
}

/// The tunnels' state.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VpnStatus {
    /// Which WireGuard.
    pub backend: BackendKind,
    /// The box's overlay address.
    pub address: Ipv4Addr,
    /// The endpoint the kernel routes the overlay through (the preferred one from the
    /// start, so nothing leaks to the default route before the first answer).
    pub active: Option<String>,
    /// How often traffic moved away from a failed tunnel.
    pub failovers: u64,
    /// Every tunnel.
    pub tunnels: Vec<TunnelReport>,
    /// The last route move.
    pub last_change: Option<RouteChange>,
    /// When this was taken, milliseconds since the Unix epoch.
    pub updated_unix_ms: u64,
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The running tunnels. [`Tunnels::shutdown`] removes them; dropping does too, without
/// waiting for the supervisor.
#[derive(Debug)]
pub struct Tunnels {
    status: watch::Receiver<VpnStatus>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), VpnError>>>,
    backend: Arc<dyn WireGuard>,
    interfaces: Vec<String>,
}

/// Removes interfaces (and with them their addresses and routes).
fn destroy_all(backend: &dyn WireGuard, interfaces: &[String]) -> Result<(), VpnError> {
    let mut first = Ok(());
    for name in interfaces {
        if let Err(err) = backend.destroy(name) {
            tracing::warn!(%err, "removing a tunnel");
            if first.is_ok() {
                first = Err(err);
            }
        }
    }
    first
}

impl Tunnels {
    /// Brings every tunnel up and starts probing. On failure, whatever was created is
    /// removed again before the error returns.
    pub async fn start(config: TunnelsConfig) -> Result<Tunnels, VpnError> {
        config.validate()?;
        let backend = open_backend(config.backend)?;
        let netlink = Netlink::open()?;
        let mut created = Vec::new();
        let links = match Self::bring_up(&config, backend.as_ref(), &netlink, &mut created).await {
            Ok(links) => links,
            Err(err) => {
                let _ = destroy_all(backend.as_ref(), &created);
                return Err(err);
            }
        };
        let targets: Vec<(String, SocketAddrV4)> = config
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| {
                (
                    config.interface(i),
                    SocketAddrV4::new(e.address, config.heartbeat_port),
                )
            })
            .collect();
        let (probers, echoes) = match Probers::open(config.address, &targets).await {
            Ok(opened) => opened,
            Err(err) => {
                let _ = destroy_all(backend.as_ref(), &created);
                return Err(err);
            }
        };
        let supervisor = Supervisor::new(config, Arc::clone(&backend), netlink, links, probers);
        let (status_tx, status) = watch::channel(supervisor.report());
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(supervisor.run(echoes, status_tx, stopped));
        Ok(Tunnels {
            status,
            stop: Some(stop),
            task: Some(task),
            backend,
            interfaces: created,
        })
    }

    async fn bring_up(
        config: &TunnelsConfig,
        backend: &dyn WireGuard,
        netlink: &Netlink,
        created: &mut Vec<String>,
    ) -> Result<Vec<LinkInfo>, VpnError> {
        let mut links = Vec::new();
        for (i, e) in config.endpoints.iter().enumerate() {
            let name = config.interface(i);
            backend.create(&name)?;
            created.push(name.clone());
            backend.set_identity(&name, &config.private_key, None)?;
            backend.put_peer(&name, &config.peer(i))?;
            let link = netlink.link(&name).await?;
            netlink.add_address(&link, host(config.address)).await?;
            netlink.set_link_up(&link).await?;
            netlink
                .replace_link_route(host(e.address), &link, Some(config.address))
                .await?;
            links.push(link);
        }
        // The overlay goes through the preferred tunnel from the start, so nothing meant for
        // it leaks to the default route while the first heartbeats are on their way.
        let preferred = config.failover.preferred;
        netlink
            .replace_link_route(
                config.endpoints[preferred].prefix,
                &links[preferred],
                Some(config.address),
            )
            .await?;
        Ok(links)
    }

    /// The state now.
    pub fn status(&self) -> VpnStatus {
        self.status.borrow().clone()
    }

    /// The state as it changes (at least every second).
    pub fn watch(&self) -> watch::Receiver<VpnStatus> {
        self.status.clone()
    }

    /// Stops probing and removes every tunnel, its addresses, routes and control socket.
    pub async fn shutdown(mut self) -> Result<(), VpnError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::warn!(%err, "the tunnel supervisor failed"),
                Err(err) => tracing::warn!(%err, "the tunnel supervisor panicked"),
            }
        }
        let backend = Arc::clone(&self.backend);
        let interfaces = std::mem::take(&mut self.interfaces);
        tokio::task::spawn_blocking(move || destroy_all(backend.as_ref(), &interfaces))
            .await
            .map_err(|e| VpnError::Config(format!("removing the tunnels: {e}")))?
    }
}

impl Drop for Tunnels {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        let _ = destroy_all(self.backend.as_ref(), &self.interfaces);
    }
}

/// The task that probes, decides and routes.
struct Supervisor {
    config: TunnelsConfig,
    backend: Arc<dyn WireGuard>,
    netlink: Netlink,
    links: Vec<LinkInfo>,
    probers: Probers,
    failover: Failover,
    started: Instant,
    /// Per tunnel: the heartbeat in flight and when it left.
    outstanding: Vec<Option<(u64, Instant)>>,
    next_seq: u64,
    resets: Vec<u64>,
    wg: Vec<crate::wg::PeerState>,
    last_change: Option<RouteChange>,
    /// The tunnel the kernel routes the overlay through, as far as we set it.
    routed: Option<usize>,
    /// A route move that failed, retried every round until it works: (tunnel, reason).
    pending: Option<(usize, String)>,
}

impl Supervisor {
    fn new(
        config: TunnelsConfig,
        backend: Arc<dyn WireGuard>,
        netlink: Netlink,
        links: Vec<LinkInfo>,
        probers: Probers,
    ) -> Supervisor {
        let count = config.endpoints.len();
        // `bring_up` routed the overlay through the preferred tunnel.
        let preferred = config.failover.preferred;
        Supervisor {
            failover: Failover::new(config.failover, count),
            config,
            backend,
            netlink,
            links,
            probers,
            started: Instant::now(),
            outstanding: vec![None; count],
            next_seq: 0,
            resets: vec![0; count],
            wg: Vec::new(),
            last_change: None,
            routed: Some(preferred),
            pending: None,
        }
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    async fn run(
        mut self,
        mut echoes: tokio::sync::mpsc::Receiver<Echo>,
        status: watch::Sender<VpnStatus>,
        mut stop: oneshot::Receiver<()>,
    ) -> Result<(), VpnError> {
        let mut tick = tokio::time::interval(self.config.failover.probe_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut refresh = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = &mut stop => return Ok(()),
                _ = tick.tick() => self.probe_round().await,
                Some(echo) = echoes.recv() => self.answered(echo).await,
                _ = refresh.tick() => self.read_devices(),
            }
            status.send_if_modified(|old| {
                let new = self.report();
                // The timestamp alone is no change; everything else is.
                let changed = VpnStatus {
                    updated_unix_ms: old.updated_unix_ms,
                    ..new.clone()
                } != *old;
                if changed || new.updated_unix_ms.saturating_sub(old.updated_unix_ms) >= 1000 {
                    *old = new;
                    true
                } else {
                    false
                }
            });
        }
    }

    /// Counts the heartbeats that went unanswered for a whole interval as lost, and sends
    /// the next ones.
    async fn probe_round(&mut self) {
        if let Some((tunnel, reason)) = self.pending.clone() {
            self.route(tunnel, reason).await;
        }
        let now = self.now();
        for tunnel in 0..self.outstanding.len() {
            if self.outstanding[tunnel].take().is_some() {
                let actions = self.failover.probe(now, tunnel, ProbeOutcome::Lost);
                self.act(actions).await;
            }
            self.next_seq += 1;
            self.probers.send(tunnel, self.next_seq);
            self.outstanding[tunnel] = Some((self.next_seq, Instant::now()));
        }
    }

    async fn answered(&mut self, echo: Echo) {
        let Some(Some((seq, sent))) = self.outstanding.get(echo.tunnel).copied() else {
            return;
        };
        if seq != echo.seq {
            return; // A late answer to a heartbeat already counted as lost.
        }
        self.outstanding[echo.tunnel] = None;
        let rtt = echo.at.saturating_duration_since(sent);
        let actions = self
            .failover
            .probe(self.now(), echo.tunnel, ProbeOutcome::Answered(rtt));
        self.act(actions).await;
    }

    fn describe(&self, why: Why) -> String {
        let name = |i: usize| {
            self.config
                .endpoints
                .get(i)
                .map_or("?", |e| e.name.as_str())
                .to_owned()
        };
        match why {
            Why::FirstAnswer => "first heartbeat answered".into(),
            Why::FailedOver { from, lost } => {
                format!(
                    "{} down ({lost} heartbeats lost in a row): failing over",
                    name(from)
                )
            }
            Why::FailedBack { from, after } => format!(
                "preferred endpoint healthy for {} s: failing back from {}",
                after.as_secs(),
                name(from)
            ),
        }
    }

    /// Routes the overlay through `tunnel`; a failure is logged once and retried every
    /// round (the decision stands, the kernel must follow it).
    async fn route(&mut self, tunnel: usize, reason: String) {
        let e = &self.config.endpoints[tunnel];
        let result = self
            .netlink
            .replace_link_route(e.prefix, &self.links[tunnel], Some(self.config.address))
            .await;
        match result {
            Ok(()) => {
                tracing::info!(to = %e.name, %reason, "overlay route moved");
                self.routed = Some(tunnel);
                self.pending = None;
                self.last_change = Some(RouteChange {
                    at_unix_ms: unix_ms(),
                    to: e.name.clone(),
                    reason,
                });
            }
            Err(err) => {
                if self.pending.is_none() {
                    tracing::error!(%err, to = %e.name, "moving the overlay route; retrying every probe round");
                }
                self.pending = Some((tunnel, reason));
            }
        }
    }

    async fn act(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Route { tunnel, why } => {
                    let reason = self.describe(why);
                    self.route(tunnel, reason).await;
                }
                Action::ResetPeer { tunnel } => {
                    let name = self.config.interface(tunnel);
                    let peer = self.config.peer(tunnel);
                    match self.backend.put_peer(&name, &peer) {
                        Ok(()) => self.resets[tunnel] += 1,
                        Err(err) => tracing::warn!(%err, "resetting a peer"),
                    }
                }
            }
        }
    }

    fn read_devices(&mut self) {
        let mut peers = Vec::new();
        for (i, e) in self.config.endpoints.iter().enumerate() {
            let state = self
                .backend
                .device(&self.config.interface(i))
                .ok()
                .and_then(|d| d.peers.into_iter().find(|p| p.public_key == e.public_key));
            peers.push(state.unwrap_or(crate::wg::PeerState {
                public_key: e.public_key.clone(),
                endpoint: None,
                handshake_age: None,
                rx_bytes: 0,
                tx_bytes: 0,
                allowed: Vec::new(),
            }));
        }
        self.wg = peers;
    }

    fn report(&self) -> VpnStatus {
        let now = self.now();
        let tunnels = self
            .failover
            .status(now)
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let wg = self.wg.get(i);
                TunnelReport {
                    name: self.config.endpoints[i].name.clone(),
                    interface: self.config.interface(i),
                    endpoint: self.config.endpoints[i].endpoint,
                    health: s.health,
                    // What the kernel does, which a failed route move leaves behind the
                    // decision until a retry works.
                    active: self.routed == Some(i),
                    last_rtt_ms: s.last_rtt.map(|d| d.as_secs_f64() * 1000.0),
                    since_last_good_ms: s
                        .since_last_good
                        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                    lost_in_a_row: s.misses,
                    handshake_age_s: wg.and_then(|p| p.handshake_age).map(|d| d.as_secs()),
                    rx_bytes: wg.map_or(0, |p| p.rx_bytes),
                    tx_bytes: wg.map_or(0, |p| p.tx_bytes),
                    resets: self.resets[i],
                }
            })
            .collect();
        VpnStatus {
            backend: self.backend.kind(),
            address: self.config.address,
            active: self.routed.map(|i| self.config.endpoints[i].name.clone()),
            failovers: self.failover.failovers(),
            tunnels,
            last_change: self.last_change.clone(),
            updated_unix_ms: unix_ms(),
        }
    }
}
