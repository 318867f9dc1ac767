//! Simulated boxes against a real `lbs-datacenter serve`: each one activates with its own
//! key pair and CSR (a real certificate from the data center's CA), holds one mutual-TLS
//! control connection and reports at the agent's interval, as the agent does; a promotion
//! is the backup's real `Promote`, and a fenced old primary registers as backup (the
//! operator's B). What `lbs-dc-bench` loads the data center with, and what the load tests
//! use.
//!
//! Every box of pair `p` connects from its own office address, `127.10.(p / 250).(p % 250 + 1)`
//! (the whole of 127/8 is loopback), so the data center's per-source limits see offices,
//! not one client.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use lbs_protocol::control::{
    self, ActivationRequest, BoxReport, CallError, PairState, SyncSummary, TunnelSummary,
};
use lbs_protocol::handshake::HELLO_TIMEOUT;
use lbs_protocol::inventory::Inventory;
use lbs_protocol::tls::{self, PendingIdentity};
use lbs_protocol::{
    Connection, Generation, Hello, Identity, Message, PROTOCOL_VERSION, PeerName, Role, Sender,
    ServerId, SoftwareVersion, TrustRoot, exchange_hello,
};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

pub mod load;
pub mod server;

/// The deadline of every connect and every answer, as the agent has.
pub const WAIT: Duration = Duration::from_secs(10);
/// The most pairs the office addresses can tell apart.
pub const MAX_PAIRS: usize = 250 * 250;

/// The office address pair `pair` connects from.
pub fn office_address(pair: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 10, (pair / 250) as u8, (pair % 250) as u8 + 1)
}

/// One box of `lbs-datacenter provision-pair --json`'s answer.
#[derive(Clone, Debug)]
pub struct Provisioned {
    pub pair: String,
    pub sid: ServerId,
    pub key: String,
}

/// Reads `provision-pair --json`: every box, in order.
pub fn provisioned_boxes(json: &str) -> anyhow::Result<Vec<Provisioned>> {
    let keys: Vec<serde_json::Value> =
        serde_json::from_str(json).context("provision-pair --json printed no JSON array")?;
    let mut boxes = Vec::with_capacity(keys.len());
    for key in keys {
        let field = |name: &str| {
            key[name]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("provision-pair --json: no {name} in {key}"))
        };
        boxes.push(Provisioned {
            pair: field("pair")?,
            sid: field("sid")?
                .parse()
                .context("provision-pair --json: the SID")?,
            key: field("key")?,
        });
    }
    Ok(boxes)
}

/// Reads `provision-pair --json`: pairs in order, each with its two boxes.
pub fn provisioned_pairs(json: &str) -> anyhow::Result<Vec<[Provisioned; 2]>> {
    let boxes = provisioned_boxes(json)?;
    let mut pairs = Vec::with_capacity(boxes.len() / 2);
    let mut boxes = boxes.into_iter();
    while let (Some(a), Some(b)) = (boxes.next(), boxes.next()) {
        if a.pair != b.pair {
            bail!(
                "provision-pair --json: {} and {} are not one pair",
                a.pair,
                b.pair
            );
        }
        pairs.push([a, b]);
    }
    Ok(pairs)
}

/// An activated box: who it is and where it connects from.
#[derive(Debug)]
pub struct SimBox {
    pub sid: ServerId,
    pub pair: usize,
    /// 0 or 1 within its pair.
    pub position: usize,
    pub identity: Identity,
    pub source: Ipv4Addr,
    /// The role its activation gave it.
    pub role: Role,
}

fn inventory() -> Inventory {
    Inventory {
        cpu_model: "bench CPU".into(),
        cpus: 4,
        memory_bytes: 8 << 30,
        disks: Vec::new(),
        nics: Vec::new(),
        telephony: Vec::new(),
    }
}

/// A WireGuard public key unique to the box (the data center only keeps it).
fn wireguard_key(pair: usize, position: usize) -> String {
    let mut key = [0x42u8; 32];
    key[..8].copy_from_slice(&(pair as u64).to_be_bytes());
    key[8] = position as u8;
    base64::engine::general_purpose::STANDARD.encode(key)
}

async fn tcp_from(source: Ipv4Addr, to: SocketAddr) -> anyhow::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    tokio::time::timeout(WAIT, socket.connect(to))
        .await
        .with_context(|| format!("no connection to {to} within {WAIT:?}"))?
        .with_context(|| format!("connecting to {to} from {source}"))
}

/// Activates box `position` of pair `pair` through the activation port: a fresh key pair and
/// CSR, the real request, the certificate the data center signs.
pub async fn activate(
    activation: SocketAddr,
    root: &TrustRoot,
    pair: usize,
    position: usize,
    provisioned: &Provisioned,
) -> anyhow::Result<SimBox> {
    let key = PendingIdentity::generate(PeerName::Box(provisioned.sid))?.key_pem();
    activate_keeping(activation, root, pair, position, provisioned, &key).await
}

/// [`activate`] with the TLS key `key` (PEM), as an agent keeps it until its activation is
/// answered: asked again after a lost answer, the data center answers the same.
pub async fn activate_keeping(
    activation: SocketAddr,
    root: &TrustRoot,
    pair: usize,
    position: usize,
    provisioned: &Provisioned,
    key: &str,
) -> anyhow::Result<SimBox> {
    let source = office_address(pair);
    let pending = PendingIdentity::from_key_pem(PeerName::Box(provisioned.sid), key)?;
    let request = ActivationRequest {
        protocol: PROTOCOL_VERSION,
        software: SoftwareVersion::current(),
        sid: provisioned.sid,
        key: provisioned.key.clone(),
        csr: pending.request().to_vec(),
        wireguard_key: wireguard_key(pair, position),
        lan_address: Ipv4Addr::new(192, 168, 1, 2 + position as u8),
        inventory: inventory(),
    };
    let config = tls::activation_client_config(root)?;
    let tcp = tcp_from(source, activation).await?;
    let stream = tls::connect(config, &PeerName::DataCenter, tcp).await?;
    let grant = control::activate_with(stream, Message::Activate(request), WAIT)
        .await
        .with_context(|| format!("activating {}", provisioned.sid))?;
    let identity = pending.complete(grant.certificate, grant.chain, root)?;
    Ok(SimBox {
        sid: provisioned.sid,
        pair,
        position,
        identity,
        source,
        role: grant.role,
    })
}

/// What the running boxes measured, shared by their tasks.
#[derive(Debug, Default)]
pub struct Stats {
    /// Boxes whose control connection is up.
    pub connected: AtomicUsize,
    /// Whether round trips are recorded now (the measurement window).
    pub measuring: AtomicBool,
    /// Report round trips in the window, µs.
    pub reports: Mutex<Vec<u32>>,
    /// Promotion round trips (`Promote` → `Promoted`), µs.
    pub promotions: Mutex<Vec<u32>>,
    /// Fenced old primaries that registered as backup.
    pub registrations: AtomicU64,
    /// Reconnections after a lost connection.
    pub reconnects: AtomicU64,
    /// When a box that lost its connection tried again: (box index, when).
    pub attempts: Mutex<Vec<(usize, Instant)>>,
    /// Errors by kind, with the first one's text.
    pub errors: Mutex<BTreeMap<&'static str, (u64, String)>>,
}

impl Stats {
    pub fn error(&self, kind: &'static str, detail: impl std::fmt::Display) {
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        let entry = errors.entry(kind).or_insert((0, detail.to_string()));
        entry.0 += 1;
    }

    pub fn error_count(&self) -> u64 {
        let errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        errors.values().map(|(n, _)| n).sum()
    }

    fn record(&self, into: &Mutex<Vec<u32>>, took: Duration) {
        if self.measuring.load(Ordering::Relaxed) {
            let micros = u32::try_from(took.as_micros()).unwrap_or(u32::MAX);
            into.lock().unwrap_or_else(|p| p.into_inner()).push(micros);
        }
    }
}

/// A pair as the promotion driver sees it: which box is backup now, and whether a
/// promotion is under way (from `Promote` until the old primary registered as backup).
#[derive(Debug, Default)]
pub struct PairSlot {
    pub backup: AtomicUsize,
    pub busy: AtomicBool,
}

/// Where the boxes connect, and how they behave.
#[derive(Clone, Debug)]
pub struct Target {
    pub control: SocketAddr,
    pub root: TrustRoot,
    pub interval: Duration,
}

/// What the driver asks of one box.
#[derive(Debug)]
pub enum Order {
    /// Send `Promote` (it is its pair's backup).
    Promote,
}

/// The control connection of one box and what it believes.
struct Session {
    conn: Connection<tls::ClientStream<TcpStream>>,
    generation: Generation,
    role: Role,
}

async fn connect(
    b: &SimBox,
    target: &Target,
    generation: Generation,
    role: Role,
) -> anyhow::Result<Session> {
    let config = tls::client_config(&b.identity, &target.root)?;
    let tcp = tcp_from(b.source, target.control).await?;
    let stream = tls::connect(config, &PeerName::DataCenter, tcp).await?;
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        software: SoftwareVersion::current(),
        sender: Sender::Box { sid: b.sid, role },
    };
    let (conn, _) = exchange_hello(
        stream,
        &PeerName::DataCenter,
        hello,
        generation,
        HELLO_TIMEOUT,
    )
    .await?;
    Ok(Session {
        conn,
        generation,
        role,
    })
}

/// The backup `b` asks for its promotion from `believed` once, over a connection of its own to
/// `control`: the data center's answer (`Promoted`, or a `Denied`), or why there was none.
pub async fn promote_once(
    b: &SimBox,
    control: SocketAddr,
    root: &TrustRoot,
    believed: Generation,
) -> anyhow::Result<Message> {
    let target = Target {
        control,
        root: root.clone(),
        interval: WAIT,
    };
    let mut session = connect(b, &target, believed, Role::Backup).await?;
    let request = Message::Promote {
        advertised: Ipv4Addr::new(192, 168, 1, 2 + b.position as u8),
    };
    match control::call(&mut session.conn, believed, request, WAIT).await {
        Ok((_, answer)) => Ok(answer),
        Err(control::CallError::Denied(denial)) => Ok(Message::Denied(denial)),
        Err(err) => Err(err.into()),
    }
}

/// A box's control connection held open: [`ReportSession::report`] sends one report on it.
pub struct ReportSession {
    session: Session,
    position: usize,
}

impl ReportSession {
    /// Box `b` connects to `control` as a box in `role` at generation `believed`.
    pub async fn open(
        b: &SimBox,
        control: SocketAddr,
        root: &TrustRoot,
        believed: Generation,
        role: Role,
    ) -> anyhow::Result<ReportSession> {
        let target = Target {
            control,
            root: root.clone(),
            interval: WAIT,
        };
        Ok(ReportSession {
            session: connect(b, &target, believed, role).await?,
            position: b.position,
        })
    }

    /// One report on the open connection: the answer (a `Denied` included), or why there was
    /// none.
    pub async fn report(&mut self) -> anyhow::Result<Message> {
        let message = report(self.session.role, self.position);
        self.call(message).await
    }

    /// A report with `details` (protocol 1.9), as an agent sends it.
    pub async fn report_detailed(
        &mut self,
        details: lbs_protocol::control::ReportDetails,
    ) -> anyhow::Result<Message> {
        let Message::Report(report) = report(self.session.role, self.position) else {
            anyhow::bail!("a report is a report");
        };
        self.call(Message::DetailedReport { report, details }).await
    }

    /// One request on the open connection: the answer (a `Denied` included).
    pub async fn call(&mut self, message: Message) -> anyhow::Result<Message> {
        let Session {
            conn, generation, ..
        } = &mut self.session;
        match control::call(conn, *generation, message, WAIT).await {
            Ok((_, answer)) => Ok(answer),
            Err(control::CallError::Denied(denial)) => Ok(Message::Denied(denial)),
            Err(err) => Err(err.into()),
        }
    }
}

impl std::fmt::Debug for ReportSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReportSession")
            .field("generation", &self.session.generation)
            .field("role", &self.session.role)
            .finish_non_exhaustive()
    }
}

fn report(role: Role, position: usize) -> Message {
    Message::Report(BoxReport {
        role,
        software: SoftwareVersion::current(),
        advertised: Ipv4Addr::new(192, 168, 1, 2 + position as u8),
        sync: SyncSummary {
            last_complete_ms: None,
            pending_files: 0,
            pending_bytes: 0,
        },
        tunnels: vec![TunnelSummary {
            name: "dc1".into(),
            healthy: true,
            active: true,
        }],
    })
}

fn state_of(answer: &Message) -> Option<&PairState> {
    match answer {
        Message::PairState(state) => Some(state),
        Message::PairStateWithDns { state, .. }
        | Message::PromotionRequested { state, .. }
        | Message::HandOverRequested { state, .. } => Some(state),
        _ => None,
    }
}

/// Runs one box until `stop`: connects (one of `ramp`'s permits at a time), reports every
/// `target.interval` from a random phase (`phase` in [0, 1)), obeys orders, reconnects
/// after a lost connection with the agent's waits. Every failure is counted in `stats`, none ends the box.
#[allow(clippy::too_many_arguments)]
pub async fn run_box(
    b: Arc<SimBox>,
    target: Arc<Target>,
    slot: Arc<PairSlot>,
    mut orders: mpsc::Receiver<Order>,
    stats: Arc<Stats>,
    ramp: Arc<Semaphore>,
    phase: f64,
    stop: CancellationToken,
) {
    let mut generation = Generation::default();
    let mut role = b.role;
    // As the agent does: jittered, doubling waits after a failure, short again once answered.
    let mut backoff =
        lbs_host::backoff::Backoff::new(control::RECONNECT_FIRST, control::RECONNECT_CAP);
    let mut first = true;
    let mut lost = false;
    'connection: while !stop.is_cancelled() {
        if !first {
            let wait = backoff.next_wait();
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            if lost {
                let mut attempts = stats.attempts.lock().unwrap_or_else(|p| p.into_inner());
                attempts.push((2 * b.pair + b.position, Instant::now()));
            }
        }
        first = false;
        let session = {
            let Ok(_permit) = ramp.acquire().await else {
                return;
            };
            tokio::select! {
                () = stop.cancelled() => return,
                session = connect(&b, &target, generation, role) => session,
            }
        };
        let mut s = match session {
            Ok(s) => s,
            Err(err) => {
                stats.error("connect", format!("{}: {err:#}", b.sid));
                continue;
            }
        };
        stats.connected.fetch_add(1, Ordering::Relaxed);
        backoff.reset();
        if lost {
            stats.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        let mut next = tokio::time::Instant::now() + target.interval.mul_f64(phase);
        let outcome: anyhow::Result<()> = loop {
            tokio::select! {
                () = stop.cancelled() => break Ok(()),
                () = tokio::time::sleep_until(next) => {
                    next += target.interval;
                    let message = report(s.role, b.position);
                    if let Err(err) = exchange(&b, &mut s, message, &slot, &stats, false).await {
                        break Err(err);
                    }
                }
                Some(order) = orders.recv() => match order {
                    Order::Promote => {
                        let message = Message::Promote {
                            advertised: Ipv4Addr::new(192, 168, 1, 2 + b.position as u8),
                        };
                        if let Err(err) = exchange(&b, &mut s, message, &slot, &stats, true).await {
                            break Err(err);
                        }
                    }
                },
            }
        };
        stats.connected.fetch_sub(1, Ordering::Relaxed);
        (generation, role) = (s.generation, s.role);
        match outcome {
            Ok(()) => break 'connection,
            Err(err) => {
                lost = true;
                stats.error("connection lost", format!("{}: {err:#}", b.sid));
            }
        }
    }
}

/// One request and its answer; a fenced box registers as backup at once. An error only for
/// a connection that is no use any more.
async fn exchange(
    b: &SimBox,
    s: &mut Session,
    message: Message,
    slot: &PairSlot,
    stats: &Stats,
    promotion: bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let answer = control::call(&mut s.conn, s.generation, message, WAIT).await;
    let took = started.elapsed();
    let answer = match answer {
        Ok((_, answer)) => answer,
        Err(CallError::Denied(why)) => {
            stats.error(
                if promotion {
                    "promotion denied"
                } else {
                    "report denied"
                },
                format!("{}: {why}", b.sid),
            );
            if promotion {
                slot.busy.store(false, Ordering::Release);
            }
            return Ok(());
        }
        Err(err) => {
            if promotion {
                slot.busy.store(false, Ordering::Release);
            }
            return Err(err).context(if promotion { "promoting" } else { "reporting" });
        }
    };
    if promotion {
        let Message::Promoted(promoted) = answer else {
            slot.busy.store(false, Ordering::Release);
            stats.error("promotion answer", format!("{}: {}", b.sid, answer.kind()));
            return Ok(());
        };
        stats.record(&stats.promotions, took);
        s.generation = promoted.generation;
        s.role = Role::Primary;
        return Ok(());
    }
    let Some(state) = state_of(&answer) else {
        stats.error("report answer", format!("{}: {}", b.sid, answer.kind()));
        return Ok(());
    };
    stats.record(&stats.reports, took);
    s.generation = state.generation;
    s.role = state.role;
    if state.role == Role::Backup {
        slot.backup.store(b.position, Ordering::Release);
    }
    if state.role == Role::Fenced {
        // The operator's B on the repaired box: it becomes the pair's backup.
        match control::call(&mut s.conn, s.generation, Message::RegisterBackup, WAIT).await {
            Ok((_, answer)) => match state_of(&answer) {
                Some(state) if state.role == Role::Backup => {
                    s.role = Role::Backup;
                    stats.registrations.fetch_add(1, Ordering::Relaxed);
                    slot.backup.store(b.position, Ordering::Release);
                    slot.busy.store(false, Ordering::Release);
                }
                _ => stats.error(
                    "registration answer",
                    format!("{}: {}", b.sid, answer.kind()),
                ),
            },
            Err(CallError::Denied(why)) => {
                stats.error("registration denied", format!("{}: {why}", b.sid))
            }
            Err(err) => return Err(err).context("registering as backup"),
        }
    }
    Ok(())
}

/// The value below which `share` of `sorted` lies (nearest rank); 0 for none.
pub fn percentile(sorted: &[u32], share: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((share * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// A deterministic pseudo-random sequence (SplitMix64): the same phases and the same pairs
/// promoted in every run with the same seed.
#[derive(Debug)]
pub struct Dice(u64);

impl Dice {
    pub fn new(seed: u64) -> Dice {
        Dice(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// In [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}
