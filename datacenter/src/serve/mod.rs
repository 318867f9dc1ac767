//! `lbs-datacenter serve`: the activation endpoint (TLS, server-authenticated), the control
//! API (mutual TLS, only certificates this CA issued), the DNS worker and the WireGuard
//! endpoints, all owned by one [`run`] that stops them together.
//!
//! Every decision is the store's (one transaction each); this module only checks what comes
//! off the wire, bounds it (frame sizes, time, attempts per source), and says no clearly.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use lbs_protocol::control::{
    ActivationGrant, ActivationRequest, BoxReport, Denial, MAX_ACTIVATION_LEN, MAX_CONTROL_LEN,
    PairState, PartnerInfo, Promotion, TunnelEndpoint, TunnelPeer,
};
use lbs_protocol::handshake::HELLO_TIMEOUT;
use lbs_protocol::listen::{Admission, Serving, Unproven, serve_until};
use lbs_protocol::tls::{self, AcceptPeers, ServerConfig};
use lbs_protocol::{
    CertificateAuthority, Envelope, FrameCodec, Generation, Hello, Identity, Message,
    PROTOCOL_VERSION, PeerName, Refusal, Role, Sender, ServerId, SoftwareVersion, exchange_hello,
};
use lbs_vpn::Endpoint;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use crate::authority::{AnyStore, Authority};
use crate::config::{EndpointSettings, RateLimit, ServeConfig};
use crate::store::{self, DnsFailure, DnsState, Millis, PairView, Store, StoreError};
use crate::time::now_ms;

mod activation;
mod control;
mod dns_worker;
mod liveness;
mod portal;
mod trust;
mod tunnels;

use activation::{activation, refuse};
use control::control;
use dns_worker::dns_worker;
use liveness::{Liveness, liveness_writer};
pub use trust::TRUST_RELOAD;
use trust::{Trust, trust_reloader};
use tunnels::peers_worker;
pub(crate) use tunnels::{apply_peers, start_endpoints};

/// How long a peer may take for the TLS handshake or to send its request.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a control connection may stay silent (boxes report every few seconds).
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Control connections served at once (boxes and the other sites); more are closed. Every
/// box keeps one open: the design load is 10,000 boxes per data center, with room to spare
/// for growth, the sites and reconnects (the unit's LimitNOFILE, 65,536, is sized for it;
/// a lower limit lowers it, see [`control_capacity`]).
const MAX_CONNECTIONS: usize = 30_000;
/// Descriptors kept for everything but control connections: the activation pool, the
/// database, DNS, the tunnel endpoints, logs.
const RESERVED_FILES: usize = ACTIVATION_CONNECTIONS + 256;
/// Of those, connections still in their TLS handshake and hello at once, and from one
/// address: a stranger on the internet can hold no more, so boxes always find room.
const CONTROL_UNPROVEN: usize = 128;
const CONTROL_UNPROVEN_PER_SOURCE: usize = 32;
/// Activation connections at once (the internet-facing port: a pool of its own, so a flood
/// there never takes a box's place on the control port), and from one address.
const ACTIVATION_CONNECTIONS: usize = 256;
const ACTIVATION_PER_SOURCE: usize = 8;
/// How often endpoint peers and due DNS updates are looked at without a wake-up.
const TICK: Duration = Duration::from_secs(1);

/// The data center's identity files, next to the CA (made by `serve` if missing).
pub const IDENTITY_CERT: &str = "datacenter.pem";
/// The identity's private key.
pub const IDENTITY_KEY: &str = "datacenter.key";
/// In the data directory while `serve` runs: its modification time is renewed every second
/// (`status` tells a serve that stopped or hangs from one that runs); removed at a clean stop.
pub const ALIVE_FILE: &str = "serve.alive";

/// Attempts per source address: a token bucket.
#[derive(Debug)]
struct RateLimiter {
    limit: RateLimit,
    buckets: HashMap<IpAddr, (f64, Instant)>,
}

impl RateLimiter {
    fn new(limit: RateLimit) -> Self {
        RateLimiter {
            limit,
            buckets: HashMap::new(),
        }
    }

    /// Takes one attempt for `source`, or says how long until the next one is allowed.
    fn take(&mut self, source: IpAddr, now: Instant) -> Result<(), Duration> {
        let per_second = f64::from(self.limit.per_minute) / 60.0;
        let burst = f64::from(self.limit.burst);
        // Forget sources that are full again, so the map stays small.
        if self.buckets.len() > 10_000 {
            self.buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * per_second < burst
            });
        }
        let (tokens, at) = self.buckets.entry(source).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * per_second).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / per_second))
        }
    }
}

struct Inner {
    /// Handles on the records (one for SQLite); each task takes a free one.
    stores: Vec<Mutex<AnyStore>>,
    next_store: std::sync::atomic::AtomicUsize,
    /// With a shared store, until when this site may send DNS updates (it holds the role);
    /// `None` inside: it may not now. Without one (SQLite, one site), always.
    dns_until: Option<Mutex<Option<std::time::Instant>>>,
    ca: CertificateAuthority,
    activation_tls: Arc<ServerConfig>,
    trust: Trust,
    config: ServeConfig,
    limiter: Mutex<RateLimiter>,
    dns_wake: Notify,
    peers_wake: Notify,
    /// Reports that only say a box is alive, written to the store in batches.
    liveness: Liveness,
    /// [`ALIVE_FILE`] in the data directory.
    alive: std::path::PathBuf,
    endpoints: Vec<(EndpointSettings, Endpoint)>,
    /// The bounds of each kind of port, shared by its listeners.
    activation_serving: Serving,
    control_serving: Serving,
    /// The web portal's sessions and limits, when `[portal]` is on.
    portal: Option<portal::Portal>,
    /// Boxes' resource samples ([`HISTORY_FILE`]).
    history: Mutex<crate::history::History>,
}

/// The resource history's file in the data directory.
pub const HISTORY_FILE: &str = "history.db";

/// Whether an endpoint URL names this machine (`http://127.0.0.1:2379`, `http://localhost:…`,
/// `http://[::1]:…`).
fn is_loopback_url(url: &str) -> bool {
    let host = url
        .split("://")
        .nth(1)
        .unwrap_or(url)
        .split('/')
        .next()
        .unwrap_or_default();
    let host = match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Control connections the open-files limit leaves room for (at most [`MAX_CONNECTIONS`]):
/// past it the listener turns boxes away instead of failing to accept with EMFILE.
fn control_capacity(open_files: u64) -> usize {
    let open_files = usize::try_from(open_files).unwrap_or(usize::MAX);
    open_files
        .saturating_sub(RESERVED_FILES)
        .clamp(1, MAX_CONNECTIONS)
}

/// Runs `f` on the store on a blocking thread (SQLite waits for the disk).
async fn with_store<T: Send + 'static>(
    inner: &Arc<Inner>,
    f: impl FnOnce(&mut dyn Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let inner = inner.clone();
    tokio::task::spawn_blocking(move || {
        let count = inner.stores.len().max(1);
        let first = inner
            .next_store
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // A free handle if there is one, else wait for the next in turn.
        let free = (0..count).find_map(|i| inner.stores[(first + i) % count].try_lock().ok());
        let mut store = match free {
            Some(store) => store,
            None => inner.stores[first % count]
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        };
        f(&mut **store)
    })
    .await
    .unwrap_or_else(|err| {
        Err(StoreError::NotAllowed(format!(
            "the database task failed: {err}"
        )))
    })
}

/// Loads the data center's TLS identity, issuing one from the CA the first time.
fn identity(dir: &Path, ca: &CertificateAuthority) -> anyhow::Result<Identity> {
    let (cert, key) = (dir.join(IDENTITY_CERT), dir.join(IDENTITY_KEY));
    if cert.exists() && key.exists() {
        return Ok(Identity::load(&cert, &key)?);
    }
    let identity = ca.issue_identity(&PeerName::DataCenter)?;
    identity.save(&cert, &key)?;
    Ok(identity)
}

/// The addresses `run` listens on, once it does.
#[derive(Clone, Debug)]
pub struct Listening {
    /// Activation.
    pub activation: Vec<SocketAddr>,
    /// Control.
    pub control: Vec<SocketAddr>,
    /// The web portal (empty when it is off).
    pub portal: Vec<SocketAddr>,
}

/// Serves until `shutdown` is cancelled; `ready` is called once every listener is bound and
/// every endpoint is up. Everything started here is stopped before it returns.
pub async fn run(
    dir: &Path,
    authority: Authority,
    ca: CertificateAuthority,
    config: ServeConfig,
    shutdown: CancellationToken,
    ready: impl FnOnce(&Listening),
) -> anyhow::Result<()> {
    let identity = identity(dir, &ca)?;
    let activation_tls = tls::activation_server_config(&identity)?;
    let trust = Trust::new(identity.clone(), ca.trust_root(), None)?;
    let mut activation = Vec::new();
    for address in &config.activation {
        activation.push(
            TcpListener::bind(address)
                .await
                .with_context(|| format!("listening for activations on {address}"))?,
        );
    }
    let mut control = Vec::new();
    for address in &config.control {
        control.push(
            TcpListener::bind(address)
                .await
                .with_context(|| format!("listening for the control API on {address}"))?,
        );
    }
    let mut portal_listeners = Vec::new();
    let portal_tls = match &config.portal {
        Some(settings) => {
            let web = portal::identity(settings, &ca).context("the portal's certificate")?;
            for address in &settings.listen {
                portal_listeners.push(
                    TcpListener::bind(address)
                        .await
                        .with_context(|| format!("listening for the portal on {address}"))?,
                );
            }
            Some(tls::web_server_config(&web)?)
        }
        None => None,
    };
    let endpoints = start_endpoints(&config).await?;
    let listening = Listening {
        portal: portal_listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect(),
        activation: activation
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect(),
        control: control.iter().filter_map(|l| l.local_addr().ok()).collect(),
    };
    let capacity = match lbs_host::limits::open_files() {
        Ok(limit) => control_capacity(limit),
        Err(_) => MAX_CONNECTIONS,
    };
    if capacity < MAX_CONNECTIONS {
        tracing::warn!(
            "the open-files limit leaves room for {capacity} boxes on the control port (of {MAX_CONNECTIONS}); raise it (LimitNOFILE= in the unit, ulimit -n by hand)"
        );
    }
    let portal = config.portal.clone().map(portal::Portal::new);
    let history = crate::history::History::open(&dir.join(HISTORY_FILE))?;
    let Authority { stores, dns_role } = authority;
    if stores.is_empty() {
        anyhow::bail!("no store to serve from");
    }
    let inner = Arc::new(Inner {
        stores: stores.into_iter().map(Mutex::new).collect(),
        next_store: std::sync::atomic::AtomicUsize::new(0),
        dns_until: dns_role.as_ref().map(|_| Mutex::new(None)),
        ca,
        activation_tls,
        trust,
        limiter: Mutex::new(RateLimiter::new(config.rate_limit)),
        portal,
        history: Mutex::new(history),
        config,
        dns_wake: Notify::new(),
        peers_wake: Notify::new(),
        liveness: Liveness::default(),
        alive: dir.join(ALIVE_FILE),
        endpoints,
        // An activation is never proven (the key in its request is the proof): it stays
        // unproven, bounded per source, for its whole life (the handshake and the request).
        // At shutdown an activation under way may finish (its answer is what the box needs
        // to go on); control sessions are cut, their boxes report again elsewhere.
        activation_serving: Serving::new("the activation port", ACTIVATION_CONNECTIONS, IO_TIMEOUT)
            .with_unproven(Unproven::new(
                ACTIVATION_CONNECTIONS,
                ACTIVATION_PER_SOURCE,
                2 * IO_TIMEOUT,
            )),
        control_serving: Serving::new("the control port", capacity, Duration::ZERO).with_unproven(
            Unproven::new(
                CONTROL_UNPROVEN,
                CONTROL_UNPROVEN_PER_SOURCE,
                IO_TIMEOUT + HELLO_TIMEOUT,
            ),
        ),
    });
    if let crate::config::StoreSettings::Etcd { etcd, .. } = &inner.config.store {
        let plain: Vec<&String> = etcd
            .endpoints
            .iter()
            .filter(|e| e.starts_with("http://") && !is_loopback_url(e))
            .collect();
        if !plain.is_empty() {
            tracing::warn!(
                "the store's etcd endpoints {plain:?} are plain http: the authority's records cross the network unencrypted and anyone who reaches them can change roles; use https with ca_file, cert_file and key_file"
            );
        }
    }
    if inner.config.dns.is_none() {
        tracing::warn!(
            "no [dns] section: DNS decisions are recorded (see status) but not sent anywhere"
        );
    }

    // The revocation list in force before the first box gets in (this site's own CA
    // revoked: serve does not start).
    let crl = with_store(&inner, |s| s.revocation_list()).await?;
    inner.trust.update(crl)?;

    let mut tasks = JoinSet::new();
    for listener in activation {
        tasks.spawn(accept_loop(
            inner.clone(),
            listener,
            Kind::Activation,
            shutdown.clone(),
        ));
    }
    for listener in control {
        tasks.spawn(accept_loop(
            inner.clone(),
            listener,
            Kind::Control,
            shutdown.clone(),
        ));
    }
    tasks.spawn(dns_worker(inner.clone(), shutdown.clone()));
    if let Some(role) = dns_role {
        tasks.spawn(dns_worker::dns_role(inner.clone(), role, shutdown.clone()));
    }
    tasks.spawn(peers_worker(inner.clone(), shutdown.clone()));
    tasks.spawn(liveness_writer(inner.clone(), shutdown.clone()));
    tasks.spawn(trust_reloader(inner.clone(), shutdown.clone()));
    if let Some(tls) = portal_tls {
        for listener in portal_listeners {
            tasks.spawn(portal::serve_portal(
                inner.clone(),
                listener,
                tls.clone(),
                shutdown.clone(),
            ));
        }
    }
    ready(&listening);
    shutdown.cancelled().await;
    // Every task watches the token; connections are aborted with their listener's set.
    while tasks.join_next().await.is_some() {}
    let inner = Arc::into_inner(inner).context("a task outlived the service")?;
    let revoked = inner.trust.revoked();
    let had_endpoints = !inner.endpoints.is_empty();
    for (settings, endpoint) in inner.endpoints {
        if let Err(err) = endpoint.shutdown().await {
            tracing::warn!(endpoint = settings.name, "removing the endpoint: {err}");
        }
    }
    if had_endpoints && let Err(err) = crate::isolation::remove().await {
        tracing::warn!("removing the overlay rules: {err}");
    }
    match revoked {
        Some(why) => anyhow::bail!(why),
        None => Ok(()),
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Activation,
    Control,
}

async fn accept_loop(
    inner: Arc<Inner>,
    listener: TcpListener,
    kind: Kind,
    shutdown: CancellationToken,
) {
    // Each kind of port has its own bounds; at shutdown what is under way is cut.
    let serving = match kind {
        Kind::Activation => inner.activation_serving.clone(),
        Kind::Control => inner.control_serving.clone(),
    };
    serve_until(listener, shutdown, serving, |tcp, source, admission| {
        let inner = inner.clone();
        async move {
            let local = tcp.local_addr().ok();
            let result = match kind {
                Kind::Activation => {
                    // Held to the end: the whole activation counts against its source.
                    let _unproven = admission;
                    activation(&inner, tcp, source, local).await
                }
                Kind::Control => control(&inner, tcp, source, admission).await,
            };
            if let Err(err) = result {
                tracing::info!(%source, "{kind:?} connection ended: {err:#}");
            }
        }
    })
    .await;
}

/// Closes our side and reads until the peer hangs up (at most a second): closing with the
/// peer's data unread makes the kernel send a reset, which can destroy our last answer
/// before the peer reads it.
async fn linger<S>(conn: &mut Framed<S, FrameCodec<Envelope>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = conn.close().await;
        while let Some(Ok(_)) = conn.next().await {}
    })
    .await;
}

/// A control connection after the hello.
type ControlConn = Framed<tls::ServerStream<TcpStream>, FrameCodec<Envelope>>;

/// Our hello on the control API.
fn our_hello(inner: &Inner) -> Hello {
    Hello {
        protocol: PROTOCOL_VERSION,
        software: SoftwareVersion::current(),
        sender: Sender::DataCenter {
            site: inner.config.site.clone(),
        },
    }
}

/// The next request on a control connection: `None` when the peer hung up between
/// requests (a box that stops or loses power does); an unreadable one is refused and the
/// connection closed; silence beyond [`IDLE_TIMEOUT`] closes it.
async fn next_request(conn: &mut ControlConn) -> anyhow::Result<Option<Envelope>> {
    match tokio::time::timeout(IDLE_TIMEOUT, conn.next()).await {
        Err(_) => anyhow::bail!("silent for {IDLE_TIMEOUT:?}; closed"),
        Ok(None) => Ok(None),
        Ok(Some(Err(lbs_protocol::FrameError::Lost(_)))) => Ok(None),
        Ok(Some(Err(err))) => {
            Err(refuse_and_close(conn, format!("unreadable message: {err}")).await)
        }
        Ok(Some(Ok(envelope))) => Ok(Some(envelope)),
    }
}

/// Refuses what the peer said, closes the connection, and returns the reason as the error.
async fn refuse_and_close(conn: &mut ControlConn, why: String) -> anyhow::Error {
    let _ = conn
        .send(Envelope {
            generation: Generation::default(),
            message: refuse(why.clone()),
        })
        .await;
    linger(conn).await;
    anyhow::anyhow!(why)
}

/// Sends an answer, within [`IO_TIMEOUT`].
async fn answer(
    conn: &mut ControlConn,
    generation: Generation,
    reply: Message,
) -> anyhow::Result<()> {
    tokio::time::timeout(
        IO_TIMEOUT,
        conn.send(Envelope {
            generation,
            message: reply,
        }),
    )
    .await
    .context("sending an answer timed out")??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::dns_worker::{DNS_MAX_BACKOFF, dns_backoff};
    use super::*;

    #[test]
    fn only_endpoints_on_this_machine_count_as_loopback() {
        for url in [
            "http://127.0.0.1:2379",
            "http://localhost:2379",
            "http://[::1]:2379",
            "http://127.5.0.1",
        ] {
            assert!(is_loopback_url(url), "{url}");
        }
        for url in [
            "http://10.20.0.11:2379",
            "http://etcd.example:2379",
            "http://[2001:db8::1]:2379",
            "http://localhost.example:2379",
        ] {
            assert!(!is_loopback_url(url), "{url}");
        }
    }

    #[test]
    fn the_control_pool_fits_in_the_open_files_limit() {
        // The unit's LimitNOFILE: the whole pool.
        assert_eq!(control_capacity(65_536), MAX_CONNECTIONS);
        // By hand with a hard limit of 20,000: what remains after the reserve.
        assert_eq!(control_capacity(20_000), 20_000 - RESERVED_FILES);
        // A tiny limit still serves someone rather than nobody.
        assert_eq!(control_capacity(100), 1);
        assert_eq!(control_capacity(u64::MAX), MAX_CONNECTIONS);
    }

    #[test]
    fn a_source_gets_its_burst_then_waits() {
        let mut limiter = RateLimiter::new(RateLimit {
            burst: 3,
            per_minute: 6,
        });
        let t0 = Instant::now();
        let a: IpAddr = Ipv4Addr::new(192, 0, 2, 1).into();
        let b: IpAddr = Ipv4Addr::new(192, 0, 2, 2).into();
        for _ in 0..3 {
            assert!(limiter.take(a, t0).is_ok());
        }
        let wait = limiter.take(a, t0).expect_err("the fourth attempt at once");
        assert!((9..=10).contains(&wait.as_secs()), "{wait:?}");
        // Another source is not affected; ten seconds later one more attempt is allowed.
        assert!(limiter.take(b, t0).is_ok());
        assert!(limiter.take(a, t0 + Duration::from_secs(10)).is_ok());
        assert!(limiter.take(a, t0 + Duration::from_secs(10)).is_err());
    }

    #[test]
    fn dns_retries_back_off_to_a_minute() {
        assert_eq!(dns_backoff(0), Duration::from_millis(500));
        assert_eq!(dns_backoff(3), Duration::from_secs(4));
        assert_eq!(dns_backoff(40), DNS_MAX_BACKOFF);
    }
}
