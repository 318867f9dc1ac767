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

use crate::config::{EndpointSettings, RateLimit, ServeConfig};
use crate::store::{self, DnsFailure, DnsState, Millis, PairView, SqliteStore, Store, StoreError};
use crate::time::now_ms;

/// How long a peer may take for the TLS handshake or to send its request.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a control connection may stay silent (boxes report every few seconds).
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Control connections served at once (boxes and the other sites); more are closed. Every
/// box keeps one open: the design load is 10,000 boxes per data center, with room for the
/// sites and reconnects (the unit's LimitNOFILE is sized for it).
const MAX_CONNECTIONS: usize = 12_000;
/// Of those, connections still in their TLS handshake and hello at once, and from one
/// address: a stranger on the internet can hold no more, so boxes always find room.
const CONTROL_UNPROVEN: usize = 128;
const CONTROL_UNPROVEN_PER_SOURCE: usize = 32;
/// Activation connections at once (the internet-facing port: a pool of its own, so a flood
/// there never takes a box's place on the control port), and from one address.
const ACTIVATION_CONNECTIONS: usize = 256;
const ACTIVATION_PER_SOURCE: usize = 8;
/// The longest wait between two tries of a failing DNS update.
const DNS_MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How often endpoint peers and due DNS updates are looked at without a wake-up.
const TICK: Duration = Duration::from_secs(1);

/// The data center's identity files, next to the CA (made by `serve` if missing).
pub const IDENTITY_CERT: &str = "datacenter.pem";
/// The identity's private key.
pub const IDENTITY_KEY: &str = "datacenter.key";

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
    store: Mutex<SqliteStore>,
    ca: CertificateAuthority,
    activation_tls: Arc<ServerConfig>,
    control_tls: Arc<ServerConfig>,
    config: ServeConfig,
    limiter: Mutex<RateLimiter>,
    dns_wake: Notify,
    peers_wake: Notify,
    endpoints: Vec<(EndpointSettings, Endpoint)>,
    /// The bounds of each kind of port, shared by its listeners.
    activation_serving: Serving,
    control_serving: Serving,
}

/// Runs `f` on the store on a blocking thread (SQLite waits for the disk).
async fn with_store<T: Send + 'static>(
    inner: &Arc<Inner>,
    f: impl FnOnce(&mut SqliteStore) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let inner = inner.clone();
    tokio::task::spawn_blocking(move || {
        let mut store = inner.store.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut store)
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

/// Starts this site's tunnel endpoints (those of other sites are only told to boxes).
pub(crate) async fn start_endpoints(
    config: &ServeConfig,
) -> anyhow::Result<Vec<(EndpointSettings, Endpoint)>> {
    let mut endpoints: Vec<(EndpointSettings, Endpoint)> = Vec::new();
    for settings in &config.endpoints {
        let Some(run) = &settings.run else { continue };
        let endpoint = match Endpoint::start(run.clone()).await {
            Ok(endpoint) => endpoint,
            Err(err) => {
                for (_, started) in endpoints {
                    let _ = started.shutdown().await;
                }
                return Err(err)
                    .with_context(|| format!("starting tunnel endpoint {}", settings.name));
            }
        };
        tracing::info!(
            endpoint = settings.name,
            interface = endpoint.interface(),
            backend = ?endpoint.backend(),
            "tunnel endpoint up"
        );
        endpoints.push((settings.clone(), endpoint));
    }
    if !endpoints.is_empty()
        && std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|v| v.trim() == "0")
    {
        tracing::warn!(
            "net.ipv4.ip_forward is 0: boxes reach the data center through the tunnels, but not each other (a remote backup cannot sync); set it to 1"
        );
    }
    Ok(endpoints)
}

/// Gives every endpoint `peers` (boxes' keys as the store has them, overlay addresses);
/// whether all of them took it.
pub(crate) fn apply_peers(
    endpoints: &[(EndpointSettings, Endpoint)],
    peers: &[(String, Ipv4Addr)],
) -> bool {
    let wanted: Vec<_> = peers
        .iter()
        .filter_map(|(key, address)| crate::config::box_key(key).map(|key| (key, *address)))
        .collect();
    let mut all_applied = true;
    for (settings, endpoint) in endpoints {
        match endpoint.set_peers(&wanted) {
            Ok(changes) => tracing::info!(
                endpoint = settings.name,
                added = changes.added,
                removed = changes.removed,
                "tunnel peers updated"
            ),
            Err(err) => {
                all_applied = false;
                tracing::error!(endpoint = settings.name, "updating peers: {err}");
            }
        }
    }
    all_applied
}

/// The addresses `run` listens on, once it does.
#[derive(Clone, Debug)]
pub struct Listening {
    /// Activation.
    pub activation: Vec<SocketAddr>,
    /// Control.
    pub control: Vec<SocketAddr>,
}

/// Serves until `shutdown` is cancelled; `ready` is called once every listener is bound and
/// every endpoint is up. Everything started here is stopped before it returns.
pub async fn run(
    dir: &Path,
    store: SqliteStore,
    ca: CertificateAuthority,
    config: ServeConfig,
    shutdown: CancellationToken,
    ready: impl FnOnce(&Listening),
) -> anyhow::Result<()> {
    let identity = identity(dir, &ca)?;
    let activation_tls = tls::activation_server_config(&identity)?;
    let control_tls = tls::server_config(&identity, &ca.trust_root(), AcceptPeers::BoxesAndSites)?;
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
    let endpoints = start_endpoints(&config).await?;
    let listening = Listening {
        activation: activation
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect(),
        control: control.iter().filter_map(|l| l.local_addr().ok()).collect(),
    };
    let inner = Arc::new(Inner {
        store: Mutex::new(store),
        ca,
        activation_tls,
        control_tls,
        limiter: Mutex::new(RateLimiter::new(config.rate_limit)),
        config,
        dns_wake: Notify::new(),
        peers_wake: Notify::new(),
        endpoints,
        // An activation is never proven (the key in its request is the proof): it stays
        // unproven, bounded per source, for its whole life (the handshake and the request).
        activation_serving: Serving::new(
            "the activation port",
            ACTIVATION_CONNECTIONS,
            Duration::ZERO,
        )
        .with_unproven(Unproven::new(
            ACTIVATION_CONNECTIONS,
            ACTIVATION_PER_SOURCE,
            2 * IO_TIMEOUT,
        )),
        control_serving: Serving::new("the control port", MAX_CONNECTIONS, Duration::ZERO)
            .with_unproven(Unproven::new(
                CONTROL_UNPROVEN,
                CONTROL_UNPROVEN_PER_SOURCE,
                IO_TIMEOUT + HELLO_TIMEOUT,
            )),
    });
    if inner.config.dns.is_none() {
        tracing::warn!(
            "no [dns] section: DNS decisions are recorded (see status) but not sent anywhere"
        );
    }

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
    tasks.spawn(peers_worker(inner.clone(), shutdown.clone()));
    ready(&listening);
    shutdown.cancelled().await;
    // Every task watches the token; connections are aborted with their listener's set.
    while tasks.join_next().await.is_some() {}
    let inner = Arc::into_inner(inner).context("a task outlived the service")?;
    let had_endpoints = !inner.endpoints.is_empty();
    for (settings, endpoint) in inner.endpoints {
        if let Err(err) = endpoint.shutdown().await {
            tracing::warn!(endpoint = settings.name, "removing the endpoint: {err}");
        }
    }
    if had_endpoints && let Err(err) = crate::isolation::remove().await {
        tracing::warn!("removing the overlay rules: {err}");
    }
    Ok(())
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

fn refuse(detail: impl Into<String>) -> Message {
    Message::Refused(Refusal::ProtocolViolation {
        detail: detail.into(),
    })
}

async fn activation(
    inner: &Arc<Inner>,
    tcp: TcpStream,
    source: SocketAddr,
    local: Option<SocketAddr>,
) -> anyhow::Result<()> {
    let tls = tokio::time::timeout(
        IO_TIMEOUT,
        tls::accept_any(inner.activation_tls.clone(), tcp),
    )
    .await
    .context("TLS handshake timed out")??;
    let mut conn = Framed::new(
        tls,
        FrameCodec::<Envelope>::with_max_len(MAX_ACTIVATION_LEN),
    );
    let first = tokio::time::timeout(IO_TIMEOUT, conn.next())
        .await
        .context("no request within the time limit")?;
    let reply = match first {
        None => return Ok(()),
        Some(Err(err)) => refuse(format!("activation request unreadable: {err}")),
        Some(Ok(Envelope {
            message: Message::Activate(request),
            ..
        })) => {
            let limited = inner
                .limiter
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(source.ip(), Instant::now());
            match limited {
                Err(wait) => {
                    tracing::warn!(%source, sid = %request.sid, "activation attempt rate-limited");
                    Message::Denied(Denial::RateLimited {
                        retry_after_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                    })
                }
                Ok(()) if request.protocol.major != PROTOCOL_VERSION.major => {
                    Message::Refused(Refusal::IncompatibleProtocol {
                        ours: PROTOCOL_VERSION,
                        yours: request.protocol,
                    })
                }
                Ok(()) => match activate(inner, request, source, local).await {
                    Ok(grant) => Message::Activated(grant),
                    Err(denial) => Message::Denied(denial),
                },
            }
        }
        Some(Ok(other)) => refuse(format!(
            "expected an activation request, got {}",
            other.message.kind()
        )),
    };
    let denied = !matches!(reply, Message::Activated(_));
    tokio::time::timeout(
        IO_TIMEOUT,
        conn.send(Envelope {
            generation: Generation::default(),
            message: reply,
        }),
    )
    .await
    .context("sending the answer timed out")??;
    if denied {
        linger(&mut conn).await;
    }
    Ok(())
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
        Ok(Some(Err(lbs_protocol::FrameError::Io(err))))
            if err.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            Ok(None)
        }
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

async fn activate(
    inner: &Arc<Inner>,
    request: ActivationRequest,
    source: SocketAddr,
    local: Option<SocketAddr>,
) -> Result<ActivationGrant, Denial> {
    let sid = request.sid;
    let refuse = |why: String| {
        tracing::warn!(%source, %sid, "activation refused: {why}");
        Denial::Activation(why)
    };
    if crate::config::box_key(&request.wireguard_key).is_none() {
        return Err(refuse(
            "the WireGuard public key is not a WireGuard key (44 base64 characters)".into(),
        ));
    }
    if serde_json::from_str::<lbs_protocol::inventory::Inventory>(&request.inventory).is_err() {
        return Err(refuse(
            "the hardware inventory is not one `lbs net inventory --json` wrote".into(),
        ));
    }
    let (certificate, tls_key) = inner
        .ca
        .sign_request(&PeerName::Box(sid), &request.csr)
        .map_err(|e| refuse(format!("{e}")))?;
    let record = store::ActivationRequest {
        sid,
        key: request.key,
        wireguard_key: request.wireguard_key,
        tls_key,
        lan_address: request.lan_address,
        software: request.software.to_string(),
        inventory: request.inventory,
        source: source.ip().to_string(),
    };
    let pool = inner.config.overlay_pool;
    let activated = with_store(inner, move |s| {
        let activated = s.activate(&record, pool, now_ms())?;
        let pair = s.pair_of(sid)?;
        Ok((activated, pair))
    })
    .await;
    let (activated, pair) = match activated {
        Ok(done) => done,
        Err(err @ (StoreError::ActivationRefused { .. } | StoreError::UnknownServer(_))) => {
            return Err(refuse(err.to_string()));
        }
        Err(err @ (StoreError::PoolExhausted(_) | StoreError::Db { .. })) => {
            tracing::error!(%sid, "activation failed: {err}");
            return Err(Denial::Unavailable(err.to_string()));
        }
        Err(err) => return Err(refuse(err.to_string())),
    };
    tracing::info!(%source, %sid, role = %activated.role, overlay = %activated.overlay, "activated");
    inner.dns_wake.notify_one();
    inner.peers_wake.notify_one();
    let now = now_ms();
    let control = if inner.config.advertise_control.is_empty() {
        inner
            .config
            .control
            .iter()
            .map(|c| match (c.ip().is_unspecified(), local) {
                (true, Some(local)) => SocketAddr::new(local.ip(), c.port()),
                _ => *c,
            })
            .collect()
    } else {
        inner.config.advertise_control.clone()
    };
    Ok(ActivationGrant {
        role: activated.role,
        generation: activated.generation,
        pair: pair.name.clone(),
        fqdn: pair.fqdn.clone(),
        certificate: certificate.to_vec(),
        ca_pem: inner.ca.trust_root().to_pem(),
        overlay: activated.overlay,
        overlay_prefix: inner.config.overlay_pool.prefix,
        partner: partner_of(&pair, sid, now),
        endpoints: inner
            .config
            .endpoints
            .iter()
            .map(|settings| TunnelEndpoint {
                name: settings.name.clone(),
                endpoint: settings.public,
                public_key: settings.public_key.clone(),
                overlay: settings.overlay,
            })
            .collect(),
        control,
    })
}

fn role_named(text: &str) -> Role {
    match text {
        "primary" => Role::Primary,
        "backup" => Role::Backup,
        "fenced" => Role::Fenced,
        _ => Role::Unactivated,
    }
}

fn silent_ms(last: Option<Millis>, now: Millis) -> Option<u64> {
    last.map(|at| u64::try_from(now.saturating_sub(at)).unwrap_or(0))
}

fn partner_of(pair: &PairView, sid: ServerId, now: Millis) -> Option<PartnerInfo> {
    let me = sid.to_string();
    let partner = pair.servers.iter().find(|s| s.sid != me)?;
    Some(PartnerInfo {
        sid: partner.sid.parse().ok()?,
        role: role_named(&partner.role),
        overlay: partner.overlay.as_deref().and_then(|a| a.parse().ok()),
        // Where it says it is now (a promoted box took the shared address), else where it
        // activated.
        lan: partner
            .advertised
            .as_deref()
            .or(partner.lan.as_deref())
            .and_then(|a| a.parse().ok()),
        silent_ms: silent_ms(partner.last_heartbeat_at, now),
    })
}

fn pair_state(pair: &PairView, sid: ServerId, believes: Option<Role>, now: Millis) -> PairState {
    let me = sid.to_string();
    let recorded = pair
        .servers
        .iter()
        .find(|s| s.sid == me)
        .map_or(Role::Unactivated, |s| role_named(&s.role));
    // A box that believes it is primary when the records say otherwise must stand down.
    let role = if believes == Some(Role::Primary) && recorded != Role::Primary {
        Role::Fenced
    } else {
        recorded
    };
    PairState {
        role,
        generation: Generation(pair.generation),
        primary: pair.primary.as_deref().and_then(|p| p.parse().ok()),
        partner: partner_of(pair, sid, now),
        hardware_differences: pair.hardware_differences.clone(),
    }
}

fn denial(err: StoreError) -> Denial {
    match err {
        StoreError::StaleGeneration { current, .. } => Denial::StaleGeneration { current },
        StoreError::Db { .. } => Denial::Unavailable(err.to_string()),
        other => Denial::NotAllowed(other.to_string()),
    }
}

async fn control(
    inner: &Arc<Inner>,
    tcp: TcpStream,
    source: SocketAddr,
    admission: Admission,
) -> anyhow::Result<()> {
    lbs_host::tcp::watch_peer(&tcp).context("setting up the connection")?;
    let (tls, peer) = tls::accept(inner.control_tls.clone(), tcp).await?;
    let sid = match peer {
        PeerName::Box(sid) => sid,
        PeerName::DataCenter => {
            admission.proven();
            return site_session(inner, tls, source).await;
        }
    };
    let presented = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(tls::key_fingerprint)
        .transpose()?;
    let (current, pair) = with_store(inner, move |s| {
        Ok((s.certificate_key(sid)?, s.pair_of(sid)?))
    })
    .await?;
    let (mut conn, negotiated) = exchange_hello(
        tls,
        &peer,
        our_hello(inner),
        Generation(pair.generation),
        HELLO_TIMEOUT,
    )
    .await?;
    *conn.codec_mut() = FrameCodec::with_max_len(MAX_CONTROL_LEN);
    if current.is_none() || current != presented {
        let why = format!(
            "the certificate of {sid} was replaced when the box was activated again; this one no longer gets in"
        );
        tracing::warn!(%source, "{why}");
        conn.send(Envelope {
            generation: Generation(pair.generation),
            message: Message::Denied(Denial::NotAllowed(why.clone())),
        })
        .await?;
        linger(&mut conn).await;
        anyhow::bail!(why);
    }
    admission.proven();
    let actor = format!("{sid} from {}", source.ip());
    loop {
        let Some(next) = next_request(&mut conn).await? else {
            return Ok(());
        };
        let believed = next.generation;
        let reply = match next.message {
            Message::Report(report) => {
                // Promotion requests only go to boxes that understand them (1.2 and later).
                let remote =
                    negotiated.version >= (lbs_protocol::ProtocolVersion { major: 1, minor: 2 });
                // Hand-overs likewise (1.4 and later); an older backup is not asked.
                let hand_over =
                    negotiated.version >= (lbs_protocol::ProtocolVersion { major: 1, minor: 4 });
                on_report(inner, sid, believed, report, remote, hand_over).await
            }
            Message::PromotionRefused { id, reason } => on_refused(inner, sid, id, reason).await,
            Message::Promote { advertised } => {
                on_promote(inner, sid, believed, advertised, actor.clone()).await
            }
            Message::PromoteAs { advertised, how } => {
                // The audit log says how it came about (forced, offline, a hand-over, …).
                let actor = format!("{actor} ({how})");
                on_promote(inner, sid, believed, advertised, actor).await
            }
            Message::HandOver { reason } => on_hand_over(inner, sid, reason).await,
            Message::PartnerKeyRequest => {
                match with_store(inner, move |s| {
                    let pair = s.pair_of(sid)?;
                    let partner = pair
                        .servers
                        .iter()
                        .find(|other| other.sid != sid.to_string())
                        .and_then(|other| other.sid.parse::<ServerId>().ok());
                    let key = match partner {
                        Some(partner) => s.certificate_key(partner)?,
                        None => None,
                    };
                    Ok((partner, key))
                })
                .await
                {
                    Ok((partner, key)) => Message::PartnerKey { partner, key },
                    Err(err) => Message::Denied(denial(err)),
                }
            }
            Message::RegisterBackup => on_register(inner, sid, actor.clone()).await,
            Message::Goodbye { .. } => return Ok(()),
            other => {
                let why = format!("{} is not a control request", other.kind());
                return Err(refuse_and_close(&mut conn, why).await);
            }
        };
        // The envelope carries the pair's generation as the answer knows it.
        let generation = match &reply {
            Message::PairState(state) => state.generation,
            Message::PromotionRequested { state, .. }
            | Message::HandOverRequested { state, .. }
            | Message::PairStateWithDns { state, .. } => state.generation,
            Message::Promoted(promotion) => promotion.generation,
            Message::Denied(Denial::StaleGeneration { current }) => *current,
            _ => believed,
        };
        answer(&mut conn, generation, reply).await?;
    }
}

/// Another site of the data center (`lbs-datacenter site`, running tunnel endpoints) asks
/// which boxes its endpoints must accept, every few seconds, for as long as it runs.
async fn site_session(
    inner: &Arc<Inner>,
    tls: tls::ServerStream<TcpStream>,
    source: SocketAddr,
) -> anyhow::Result<()> {
    let (mut conn, negotiated) = exchange_hello(
        tls,
        &PeerName::DataCenter,
        our_hello(inner),
        Generation::default(),
        HELLO_TIMEOUT,
    )
    .await?;
    *conn.codec_mut() = FrameCodec::with_max_len(MAX_CONTROL_LEN);
    tracing::info!(%source, version = %negotiated.version, "a data-center site follows the tunnel peers");
    loop {
        let Some(next) = next_request(&mut conn)
            .await
            .with_context(|| format!("site at {source}"))?
        else {
            return Ok(());
        };
        let reply = match next.message {
            Message::TunnelPairsRequest => match with_store(inner, |s| s.tunnel_pairs()).await {
                Ok(pairs) => Message::TunnelPairs {
                    pairs: pairs
                        .into_iter()
                        .map(|pair| {
                            pair.into_iter()
                                .map(|(public_key, overlay)| TunnelPeer {
                                    public_key,
                                    overlay,
                                })
                                .collect()
                        })
                        .collect(),
                },
                Err(err) => Message::Denied(denial(err)),
            },
            Message::TunnelPeersRequest => match with_store(inner, |s| s.tunnel_peers()).await {
                Ok(peers) => Message::TunnelPeers {
                    peers: peers
                        .into_iter()
                        .map(|(public_key, overlay)| TunnelPeer {
                            public_key,
                            overlay,
                        })
                        .collect(),
                },
                Err(err) => Message::Denied(denial(err)),
            },
            Message::Goodbye { .. } => return Ok(()),
            other => {
                let why = format!("{} is not a request a site makes", other.kind());
                let err = refuse_and_close(&mut conn, why).await;
                return Err(err.context(format!("site at {source}")));
            }
        };
        answer(&mut conn, Generation::default(), reply).await?;
    }
}

async fn on_report(
    inner: &Arc<Inner>,
    sid: ServerId,
    believed: Generation,
    report: BoxReport,
    remote: bool,
    hand_over: bool,
) -> Message {
    let record = store::Report {
        believed,
        software: report.software.to_string(),
        advertised: report.advertised,
        json: serde_json::to_string(&stored_report(&report)).unwrap_or_default(),
    };
    let believes = report.role;
    let result = with_store(inner, move |s| {
        let now = now_ms();
        s.heartbeat(sid, &record, now)?;
        let request = if remote {
            s.pending_promotion(sid, now)?
                .filter(|r| hand_over || r.hand_over.is_none())
        } else {
            None
        };
        Ok((s.pair_of(sid)?, request, now))
    })
    .await;
    match result {
        Ok((pair, request, now)) => {
            let state = pair_state(&pair, sid, Some(believes), now);
            if state.role == Role::Fenced && believes == Role::Primary {
                tracing::warn!(%sid, %believed, pair = pair.generation, "a stale primary reported: told it is fenced");
            }
            match request {
                Some(request) => {
                    tracing::info!(%sid, id = request.id, by = %request.requested_by, "promotion requested from the backup");
                    let remote = lbs_protocol::control::RemotePromotion {
                        id: u64::try_from(request.id).unwrap_or(0),
                        by: request.requested_by,
                    };
                    match request.hand_over {
                        Some(reason) => Message::HandOverRequested {
                            state,
                            request: remote,
                            reason,
                        },
                        None => Message::PromotionRequested {
                            state,
                            request: remote,
                        },
                    }
                }
                None if remote => Message::PairStateWithDns {
                    state,
                    dns: pair
                        .dns
                        .iter()
                        // Without [dns] nothing updates the names: say so, not "pending".
                        .map(|record| {
                            let mut record = record.clone();
                            if inner.config.dns.is_none() {
                                record.state = DnsState::NotConfigured;
                                record.last_error = None;
                            }
                            record
                        })
                        .map(|record| lbs_protocol::control::DnsRecordState {
                            name: record.name.clone(),
                            want: record.want.clone(),
                            state: match (&record.last_error, record.state) {
                                (Some(why), DnsState::Retrying) => {
                                    format!("retrying ({} failed: {why})", record.attempts)
                                }
                                (_, state) => state.to_string(),
                            },
                        })
                        .collect(),
                },
                None => Message::PairState(state),
            }
        }
        Err(err) => Message::Denied(denial(err)),
    }
}

/// The backup refused a requested promotion: recorded and logged; it gets the pair's state.
/// How long the backup may take to act on a hand-over, and how recently it must have
/// reported.
const HAND_OVER_TTL: Duration = Duration::from_secs(60);
const HAND_OVER_ALIVE: Duration = Duration::from_secs(20);

async fn on_hand_over(inner: &Arc<Inner>, sid: ServerId, reason: String) -> Message {
    let limits = crate::store::HandOverLimits {
        ttl: HAND_OVER_TTL,
        alive: HAND_OVER_ALIVE,
        holdoff: inner.config.handover_holdoff,
    };
    let result = with_store(inner, move |s| {
        let now = now_ms();
        let request = s.hand_over(sid, &reason, limits, now)?;
        Ok((request, s.pair_of(sid)?, now))
    })
    .await;
    match result {
        Ok((request, pair, now)) => {
            tracing::warn!(%sid, id = request.id, "the primary hands over to the backup");
            Message::PairState(pair_state(&pair, sid, None, now))
        }
        Err(err) => {
            tracing::warn!(%sid, "hand-over refused: {err}");
            Message::Denied(denial(err))
        }
    }
}

async fn on_refused(inner: &Arc<Inner>, sid: ServerId, id: u64, reason: String) -> Message {
    let result = with_store(inner, move |s| {
        let now = now_ms();
        let id = i64::try_from(id).unwrap_or(i64::MAX);
        s.refuse_promotion(id, sid, &reason, now)?;
        Ok((s.pair_of(sid)?, now))
    })
    .await;
    match result {
        Ok((pair, now)) => {
            tracing::warn!(%sid, id, "the backup refused the requested promotion");
            Message::PairState(pair_state(&pair, sid, None, now))
        }
        Err(err) => Message::Denied(denial(err)),
    }
}

async fn on_promote(
    inner: &Arc<Inner>,
    sid: ServerId,
    believed: Generation,
    advertised: Ipv4Addr,
    actor: String,
) -> Message {
    let result = with_store(inner, move |s| {
        let now = now_ms();
        let before = s.pair_of(sid)?;
        let promoted = s.promote(sid, believed, advertised, &actor, now)?;
        let previous_silent_ms = promoted.previous.and_then(|previous| {
            let previous = previous.to_string();
            before
                .servers
                .iter()
                .find(|s| s.sid == previous)
                .and_then(|s| silent_ms(s.last_heartbeat_at, now))
        });
        Ok(Promotion {
            generation: promoted.generation,
            previous: promoted.previous,
            previous_silent_ms,
        })
    })
    .await;
    match result {
        Ok(promotion) => {
            tracing::info!(%sid, generation = %promotion.generation, "promoted");
            inner.dns_wake.notify_one();
            Message::Promoted(promotion)
        }
        Err(err) => {
            tracing::warn!(%sid, "promotion refused: {err}");
            Message::Denied(denial(err))
        }
    }
}

async fn on_register(inner: &Arc<Inner>, sid: ServerId, actor: String) -> Message {
    let result = with_store(inner, move |s| {
        let now = now_ms();
        s.register_backup(sid, &actor, now)?;
        Ok((s.pair_of(sid)?, now))
    })
    .await;
    match result {
        Ok((pair, now)) => {
            tracing::info!(%sid, "registered as backup");
            Message::PairState(pair_state(&pair, sid, None, now))
        }
        Err(err) => Message::Denied(denial(err)),
    }
}

/// A report as the data center keeps it (and `status --json` shows it).
fn stored_report(r: &BoxReport) -> store::StoredReport {
    store::StoredReport {
        role: r.role.to_string(),
        software: r.software.to_string(),
        advertised: Some(r.advertised),
        sync_last_complete_ms: r.sync.last_complete_ms,
        sync_pending_files: Some(r.sync.pending_files),
        sync_pending_bytes: Some(r.sync.pending_bytes),
        tunnels: r
            .tunnels
            .iter()
            .map(|t| (t.name.clone(), t.healthy, t.active))
            .collect(),
    }
}

/// The wait before the next try of a DNS update that failed `attempts` times.
fn dns_backoff(attempts: i64) -> Duration {
    let exponent = u32::try_from(attempts.clamp(0, 16)).unwrap_or(16);
    Duration::from_millis(500u64.saturating_mul(1 << exponent)).min(DNS_MAX_BACKOFF)
}

async fn dns_worker(inner: Arc<Inner>, shutdown: CancellationToken) {
    let Some((server, ttl)) = inner.config.dns.clone() else {
        return;
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = inner.dns_wake.notified() => {}
            () = tokio::time::sleep(TICK) => {}
        }
        let due = match with_store(&inner, |s| s.dns_due(now_ms())).await {
            Ok(due) => due,
            Err(err) => {
                tracing::error!("reading DNS work: {err}");
                continue;
            }
        };
        for work in due {
            let outcome = tokio::select! {
                () = shutdown.cancelled() => return,
                outcome = server.replace_a(&work.name, work.have, work.want, ttl) => outcome,
            };
            let result = match outcome {
                Ok(()) => {
                    tracing::info!(name = work.name, address = %work.want, "DNS updated");
                    Ok(())
                }
                Err(crate::dns::DnsError::Changed { .. }) => {
                    // Someone else changed the record: read what is there, so the next try
                    // replaces exactly that (our decision is the newest: it was just taken).
                    let found = server.lookup_a(&work.name).await;
                    match found {
                        Ok(values) if values.contains(&work.want) => Ok(()),
                        Ok(values) => {
                            let value = values.first().copied();
                            let w = work.clone();
                            let _ = with_store(&inner, move |s| s.dns_found(&w, value)).await;
                            Err(DnsFailure {
                                why: format!(
                                    "{} held {} (changed outside lbs); replacing it",
                                    work.name,
                                    value.map_or("nothing".to_owned(), |v| v.to_string())
                                ),
                                needs_operator: false,
                            })
                        }
                        Err(err) => Err(DnsFailure {
                            needs_operator: !err.is_transient(),
                            why: err.to_string(),
                        }),
                    }
                }
                Err(err) => {
                    if work.attempts == 0 && err.is_transient() {
                        tracing::warn!(name = work.name, "DNS update failed, will retry: {err}");
                    }
                    Err(DnsFailure {
                        needs_operator: !err.is_transient(),
                        why: err.to_string(),
                    })
                }
            };
            let retry_at = now_ms().saturating_add(
                i64::try_from(dns_backoff(work.attempts).as_millis()).unwrap_or(i64::MAX),
            );
            let w = work.clone();
            let failure = result.as_ref().err().map(|f| f.why.clone());
            match with_store(&inner, move |s| {
                s.dns_result(&w, result, retry_at, now_ms())
            })
            .await
            {
                Ok(true) => tracing::error!(
                    name = work.name,
                    "DNS update refused, and retrying cannot help until the DNS server's \
                     configuration or the [dns] section is fixed (tried again every {} s): {}",
                    DNS_MAX_BACKOFF.as_secs(),
                    failure.unwrap_or_default()
                ),
                Ok(false) => {}
                Err(err) => tracing::error!(name = work.name, "recording a DNS result: {err}"),
            }
        }
    }
}

async fn peers_worker(inner: Arc<Inner>, shutdown: CancellationToken) {
    if inner.endpoints.is_empty() {
        return;
    }
    let mut last: Vec<(String, Ipv4Addr)> = Vec::new();
    let interfaces: Vec<String> = inner
        .endpoints
        .iter()
        .map(|(_, endpoint)| endpoint.interface().to_owned())
        .collect();
    let mut isolated: Option<Vec<Vec<Ipv4Addr>>> = None;
    let mut said: Option<String> = None;
    loop {
        // Before a new box's packets are forwarded anywhere, only its partner is allowed.
        match with_store(&inner, |s| s.tunnel_pairs()).await {
            Ok(pairs) if isolated.as_ref() != Some(&crate::isolation::overlays(&pairs)) => {
                let pairs = crate::isolation::overlays(&pairs);
                let script = crate::isolation::ruleset(&interfaces, &pairs);
                match crate::isolation::apply(&script).await {
                    Ok(()) => {
                        tracing::info!(
                            pairs = pairs.len(),
                            "overlay forwarding: each pair only to itself"
                        );
                        isolated = Some(pairs);
                        said = None;
                    }
                    // Tried again at every change and tick; said again only when it changes.
                    Err(err) if said.as_deref() != Some(&err.to_string()) => {
                        tracing::error!("{err}");
                        said = Some(err.to_string());
                    }
                    Err(_) => {}
                }
            }
            Ok(_) => {}
            Err(err) => tracing::error!("reading the pairs' overlay addresses: {err}"),
        }
        match with_store(&inner, |s| s.tunnel_peers()).await {
            Ok(peers) if peers != last => {
                if apply_peers(&inner.endpoints, &peers) {
                    last = peers;
                }
            }
            Ok(_) => {}
            Err(err) => tracing::error!("reading tunnel peers: {err}"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = inner.peers_wake.notified() => {}
            () = tokio::time::sleep(TICK * 10) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
