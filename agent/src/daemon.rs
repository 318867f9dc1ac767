//! `lbs agent`: the daemon on every activated box. One owner ([`run`]) for its tasks, all
//! stopped together on SIGTERM:
//!
//! - **reports** to the data center over mutual TLS every few seconds; the answer (the pair's
//!   state) goes through the role machine, so a primary told of a newer generation fences
//!   itself, and the partner's addresses are kept current in `box.json`;
//! - **replication**: on the primary, a sync server for every set (partner only), an inotify
//!   watch that tells the connected backup which sets changed, and the astdb snapshot taken
//!   with SQLite's online backup; on the backup, one pull at a time, highest-priority set
//!   first, after every change notice, on every (re)connect and at the reconcile interval;
//! - the **tunnels** of `vpn.toml`, when it names endpoints;
//! - the **resource history** of this machine (CPU, memory, disk, network);
//! - the **control socket** (`/run/lbs/agent.sock`, root only) that `lbs status` asks.

mod guard;
mod pbx;
mod role_notify;

use pbx::{pbx_health, take_hand_over};
use role_notify::{RoleNotice, event_reason, notify_hook};

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use lbs_protocol::control::{self, BoxReport, RemotePromotion, SyncSummary, TunnelSummary};
use lbs_protocol::handshake::HELLO_TIMEOUT;
use lbs_protocol::tls;
use lbs_protocol::{
    Envelope, Hello, Message, PROTOCOL_VERSION, PeerName, Role, Sender, SoftwareVersion,
};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::{Notify, broadcast, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::activate::{BoxInfo, StatePaths};
use crate::config::{ASTDB_SET, AgentConfig, SyncOver, SyncSet};
use crate::peer::Peer;
use crate::resources::{ResourceHistory, Sample};
use crate::role::{Action, Event, PromoteStep, RoleMachine, RoleRecord, RoleState, SharedAddress};
use crate::status_cmd::human_bytes;

/// Where the control socket lives unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/lbs/agent.sock";

/// How long to wait between attempts to reach the data center or the partner.
const RETRY: Duration = Duration::from_secs(2);
/// How long a connection to the data center may take, handshakes included, and how long it
/// may take to answer a request.
const DC_DEADLINE: Duration = Duration::from_secs(5);
/// How long P waits for the data center's grant, all addresses tried, before it gives up.
const PROMOTION_DEADLINE: Duration = Duration::from_secs(12);
/// How often the backup checks on the primary over the watch connection.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Options of `lbs agent`.
#[derive(clap::Args, Debug)]
pub struct AgentCmd {
    /// The configuration (TOML; every field has a default).
    #[arg(long, default_value = "/etc/lbs/agent.toml")]
    pub config: PathBuf,
    /// Where lbs keeps its state (what `lbs activate` wrote).
    #[arg(long, default_value = "/var/lib/lbs")]
    pub state: PathBuf,
    /// The control socket `lbs status` talks to.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// For crash tests: die (SIGKILL) right after this role-change step ends, before its
    /// outcome is recorded ("ask-promotion", "take-address", "start-pbx", "stop-pbx",
    /// "give-up-address", "register-backup").
    #[arg(long, hide = true)]
    pub crash_after: Option<String>,
}

/// Replication of one set, as `lbs status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetStatus {
    /// The set.
    pub name: String,
    /// Its root.
    pub path: PathBuf,
    /// `in sync`, `syncing`, `waiting` (for the partner), `changed` (a change is due) or
    /// `error`.
    pub state: String,
    /// When the last pass that left nothing behind ended (ms since the epoch).
    pub last_in_sync_ms: Option<u64>,
    /// When the oldest change not yet pulled was announced.
    pub changed_since_ms: Option<u64>,
    /// Files and bytes fetched by the last pass.
    pub last_fetched_files: u64,
    /// Bytes fetched by the last pass.
    pub last_fetched_bytes: u64,
    /// How long the last pass took (ms).
    pub last_pass_ms: Option<u64>,
    /// Files the last pass left for the next one (still changing on the primary, or
    /// deferred).
    pub pending_files: u64,
    /// Bytes of the pass under way not copied yet (as the pass stood when it broke off, if
    /// it did); 0 once a pass completes.
    #[serde(default)]
    pub pending_bytes: u64,
    /// What went wrong last, until a pass succeeds.
    pub last_error: Option<String>,
    /// When the pass under way began (ms since the epoch).
    #[serde(default)]
    pub pass_started_ms: Option<u64>,
    /// Bytes the pass under way copies, and how many of them it has copied (for percent,
    /// rate and time left).
    #[serde(default)]
    pub pass_bytes: Option<(u64, u64)>,
    /// The first change announced while the pass under way ran (it may have missed it).
    #[serde(default)]
    pub changed_during_pass_ms: Option<u64>,
}

/// The office network as `[network]` configures it (with the operator's choice at **P**).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkView {
    /// The office interface.
    pub interface: String,
    /// The primary's address, the one phones use (`192.168.1.2/24`).
    pub shared: String,
    /// This box's own address.
    pub own: String,
    /// The office gateway.
    pub gateway: Ipv4Addr,
}

/// The operator's notes (`promote_note`, `demote_note`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notes {
    /// Shown at P.
    pub promote: Option<String>,
    /// Shown at B.
    pub demote: Option<String>,
}

/// The data center link.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataCenterStatus {
    /// The address answering.
    pub connected_to: Option<SocketAddr>,
    /// When the last report was answered.
    pub last_answer_ms: Option<u64>,
    /// The last failure.
    pub last_error: Option<String>,
    /// The pair's DNS names as the data center last told (data centers of protocol 1.2).
    #[serde(default)]
    pub dns: Option<Vec<lbs_protocol::control::DnsRecordState>>,
}

/// Everything `lbs status` shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentStatus {
    /// This box and its pair.
    pub info: BoxInfo,
    /// Its role record.
    pub role: RoleRecord,
    /// What replication does now: `serving`, `pulling` or `stopped`.
    pub replication: String,
    /// Per set.
    pub sets: Vec<SetStatus>,
    /// The data center link.
    pub datacenter: DataCenterStatus,
    /// The tunnels, when this box runs them.
    pub tunnels: Option<lbs_vpn::VpnStatus>,
    /// Why the tunnels are not running, if they should be.
    pub tunnels_error: Option<String>,
    /// This machine's recent resource samples (oldest first).
    pub resources: Vec<Sample>,
    /// The address this box serves on now.
    pub serving_at: Ipv4Addr,
    /// The office network (`None`: a remote box that keeps its own address; phones follow
    /// the DNS name).
    pub network: Option<NetworkView>,
    /// The operator's notes at P and B.
    pub notes: Notes,
    /// Automatic failover: `None` when off, else what it last decided.
    pub auto_failover: Option<String>,
    /// When this box (as backup) last heard the primary itself.
    pub primary_heard_ms: Option<u64>,
    /// Why this primary does not hold the shared address now (its cable is out), if so.
    #[serde(default)]
    pub address_withdrawn: Option<Withdrawn>,
    /// The software.
    pub software: String,
    /// The protocol.
    pub protocol: String,
    /// When the status was made (ms since the epoch).
    pub at_ms: u64,
    /// What is not well (empty: all is).
    #[serde(default)]
    pub health: Vec<crate::health::Problem>,
    /// The PBX health check on this primary, when one is configured.
    #[serde(default)]
    pub pbx: Option<PbxHealth>,
}

/// What the PBX health check found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PbxHealth {
    /// When it last ran (ms since the epoch).
    pub checked_ms: u64,
    /// Whether that check passed.
    pub ok: bool,
    /// Failures in a row.
    pub failures: u32,
    /// Restarts since it was last healthy.
    pub restarts: u32,
    /// Declared down: unhealthy after every restart tried.
    pub down: bool,
    /// What the last failed check said (its output's last line, or why it did not run).
    pub last_failure: Option<String>,
}

/// The primary's shared address, off the interface until the cable is back and checked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Withdrawn {
    /// Why, for the operator.
    pub reason: String,
    /// Since when (ms since the epoch).
    pub since_ms: u64,
}

fn now_ms() -> u64 {
    lbs_vpn::tunnels::unix_ms()
}

/// What replication should be doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Serve,
    Pull,
    Stopped,
}

/// What every task shares.
struct Shared {
    /// The configuration in force; SIGHUP swaps in what can change without a restart.
    config: std::sync::RwLock<Arc<AgentConfig>>,
    /// Where it is read from.
    config_path: PathBuf,
    paths: StatePaths,
    machine: Mutex<RoleMachine>,
    info: Mutex<BoxInfo>,
    sets: Mutex<Vec<SetStatus>>,
    datacenter: Mutex<DataCenterStatus>,
    tunnels: Mutex<(Option<lbs_vpn::VpnStatus>, Option<String>)>,
    resources: Mutex<ResourceHistory>,
    mode: watch::Sender<Mode>,
    /// Role-change steps, carried out one at a time by the executor.
    steps: tokio::sync::mpsc::UnboundedSender<Action>,
    /// What the role change is doing, line by line, for `lbs promote` to show.
    progress: broadcast::Sender<String>,
    /// Crash tests: the step after which the agent kills itself.
    crash_after: Option<String>,
    /// When this backup last heard the primary itself (a heartbeat on the watch connection).
    partner_heard_ms: Mutex<Option<u64>>,
    /// What automatic failover last decided, for `lbs status`.
    auto_failover: Mutex<Option<String>>,
    /// The last promotion request from the data center this box acted on.
    remote_handled: Mutex<Option<u64>>,
    /// The slow re-announcement of the address this box last moved to (stops when replaced
    /// or dropped).
    refresh: Mutex<Option<lbs_netconfig::Refresh>>,
    /// Set while the primary keeps the shared address off a link without carrier.
    withdrawn: Mutex<Option<Withdrawn>>,
    /// The primary's PBX as its health check last found it.
    pbx: Mutex<Option<PbxHealth>>,
    /// How the promotion under way came about, for the data center's audit log (after a
    /// restart in the middle of one: `Operator`).
    promotion_kind: Mutex<control::PromotionKind>,
    /// Role changes for the `notify` hook, run one at a time by their own task.
    notices: tokio::sync::mpsc::UnboundedSender<RoleNotice>,
    /// Counts this box's moves between addresses: connections made from the old one are
    /// dead (their replies go to the other box), so they are made again at once.
    moved: watch::Sender<u64>,
}

/// How long the data center has not heard the partner, as of now: what it said at its last
/// answer plus the time since (it may have heard it since; this says no more than it knows).
fn partner_silent_ms(shared: &Shared) -> Option<u64> {
    let silent = lock(&shared.info).partner.as_ref()?.silent_ms?;
    let answered = lock(&shared.datacenter).last_answer_ms?;
    Some(silent.saturating_add(now_ms().saturating_sub(answered)))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn config(&self) -> Arc<AgentConfig> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn status(&self) -> AgentStatus {
        // Each lock taken and released on its own line: a guard in the struct expression
        // below would live to its end, and `current_address` takes the machine's again.
        let (tunnels, tunnels_error) = lock(&self.tunnels).clone();
        let role = lock(&self.machine).record.clone();
        let mut info = lock(&self.info).clone();
        if let Some(partner) = info.partner.as_mut() {
            partner.silent_ms = partner_silent_ms(self);
        }
        let serving_at = current_address(self);
        let network = network(self);
        let sets = lock(&self.sets).clone();
        let datacenter = lock(&self.datacenter).clone();
        let primary_heard_ms = *lock(&self.partner_heard_ms);
        let address_withdrawn = lock(&self.withdrawn).clone();
        let pbx = lock(&self.pbx).clone();
        let now = now_ms();
        let health = crate::health::judge(&crate::health::Facts {
            now_ms: now,
            state: role.state,
            sets: sets
                .iter()
                .map(|s| (s.name.as_str(), s.state.as_str(), s.changed_since_ms))
                .collect(),
            datacenter_answered_ms: datacenter.last_answer_ms,
            partner_silent_ms: info.partner.as_ref().and_then(|p| p.silent_ms),
            has_partner: info.partner.is_some(),
            primary_heard_ms,
            withdrawn: address_withdrawn.is_some(),
            pbx_down: pbx
                .as_ref()
                .filter(|p| !p.ok)
                .map(|p| (p.failures, p.restarts, p.down)),
            silent_after_ms: 3 * u64::try_from(self.config().report_interval.as_millis())
                .unwrap_or(u64::MAX),
        });
        AgentStatus {
            health,
            pbx,
            info,
            role,
            replication: match *self.mode.borrow() {
                Mode::Serve => "serving",
                Mode::Pull => "pulling",
                Mode::Stopped => "stopped",
            }
            .to_owned(),
            sets,
            datacenter,
            tunnels,
            tunnels_error,
            resources: lock(&self.resources).recent(),
            serving_at,
            auto_failover: self.config().auto_failover.then(|| {
                lock(&self.auto_failover)
                    .clone()
                    .unwrap_or_else(|| "on".to_owned())
            }),
            primary_heard_ms,
            address_withdrawn,
            notes: Notes {
                promote: self.config().promote_note.clone(),
                demote: self.config().demote_note.clone(),
            },
            network: network.map(|n| NetworkView {
                interface: n.interface,
                shared: n.shared.to_string(),
                own: n.own.to_string(),
                gateway: n.gateway,
            }),
            software: SoftwareVersion::current().to_string(),
            protocol: PROTOCOL_VERSION.to_string(),
            at_ms: now,
        }
    }

    fn set_status(&self, name: &str, update: impl FnOnce(&mut SetStatus)) {
        if let Some(set) = lock(&self.sets).iter_mut().find(|s| s.name == name) {
            update(set);
        }
    }

    /// All sets, the astdb copy last.
    fn all_sets(&self, astdb_root: &Path) -> Vec<SyncSet> {
        let mut sets = self.config().sets.clone();
        if self.config().astdb.is_some() {
            sets.push(SyncSet {
                name: ASTDB_SET.to_owned(),
                path: astdb_root.to_owned(),
            });
        }
        sets
    }

    /// Applies the role machine's actions; the record was saved before.
    fn act(&self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Say(text) => {
                    tracing::warn!("{text}");
                    let _ = self.progress.send(text);
                }
                Action::ServeSync => {
                    self.mode.send_replace(Mode::Serve);
                }
                Action::PullSync => {
                    self.mode.send_replace(Mode::Pull);
                }
                Action::StopSync => {
                    self.mode.send_replace(Mode::Stopped);
                    for set in lock(&self.sets).iter_mut() {
                        set.state = "stopped".into();
                        set.pass_started_ms = None;
                    }
                }
                step => {
                    let _ = self.steps.send(step);
                }
            }
        }
    }

    fn handle(&self, event: Event) {
        let _ = self.apply(event);
    }

    /// Applies `event`; `Err` with the reason when the machine refused it (or the change
    /// could not be recorded), nothing changed then.
    fn apply(&self, event: Event) -> Result<(), String> {
        let reason = event_reason(&event);
        let (actions, record, before) = {
            let mut machine = lock(&self.machine);
            let before = machine.record.clone();
            match machine.handle(event, now_ms()) {
                Ok(actions) => {
                    if machine.record != before
                        && let Err(err) = machine.record.save(&self.paths.role())
                    {
                        // Not acting on a change that is not on disk: undo it.
                        let why = format!("cannot record the role change: {err:#}");
                        tracing::error!("{why}");
                        machine.record = before;
                        return Err(why);
                    }
                    (actions, machine.record.clone(), before)
                }
                Err(refused) => {
                    tracing::warn!("{refused}");
                    return Err(refused.0);
                }
            }
        };
        if !actions.is_empty() {
            tracing::info!(state = %record.state, generation = %record.generation, "role");
        }
        if std::mem::discriminant(&record.state) != std::mem::discriminant(&before.state) {
            let reason = actions
                .iter()
                .find_map(|a| match a {
                    Action::Say(text) => Some(text.clone()),
                    _ => None,
                })
                .unwrap_or(reason);
            let role = match record.state {
                RoleState::Promoting(_) => "promoting".to_owned(),
                RoleState::Demoting(_) => "demoting".to_owned(),
                other => other.to_string().to_lowercase(),
            };
            let _ = self.notices.send(RoleNotice {
                role,
                generation: record.generation,
                reason,
            });
        }
        self.act(actions);
        Ok(())
    }
}

/// `lbs agent`.
pub async fn run(cmd: AgentCmd) -> anyhow::Result<ExitCode> {
    crate::cli::init_logging("info");
    let config = AgentConfig::load(&cmd.config, false)?;
    for note in &config.notes {
        match note {
            crate::config::Note::Warning(text) => tracing::warn!("{text}"),
            crate::config::Note::Info(text) => tracing::info!("{text}"),
        }
    }
    let paths = StatePaths::new(&cmd.state);
    // While it waits, a note beside the control socket tells the console (which may not
    // read the state) why nobody answers yet.
    let waiting = unactivated_note(&cmd.socket);
    let activated = wait_for_activation(&paths, &waiting).await;
    let _ = std::fs::remove_file(&waiting);
    let Some(record) = activated? else {
        println!("stopped");
        return Ok(ExitCode::SUCCESS);
    };
    let info = BoxInfo::load(&paths)?;
    let resources = ResourceHistory::open(&paths.dir.join("resources.sqlite"))?;
    let sets = config
        .sets
        .iter()
        .map(|s| (s.name.clone(), s.path.clone()))
        .chain(
            config
                .astdb
                .iter()
                .map(|p| (ASTDB_SET.to_owned(), p.clone())),
        )
        .map(|(name, path)| SetStatus {
            name,
            path,
            state: "waiting".into(),
            ..SetStatus::default()
        })
        .collect();
    let socket = bind_socket(&cmd.socket, config.console_group.as_deref()).await?;
    let (mode, _) = watch::channel(Mode::Stopped);
    let (steps, step_queue) = tokio::sync::mpsc::unbounded_channel();
    let (notices, notice_queue) = tokio::sync::mpsc::unbounded_channel();
    let (progress, _) = broadcast::channel(256);
    let shared = Arc::new(Shared {
        config: std::sync::RwLock::new(Arc::new(config)),
        config_path: cmd.config.clone(),
        paths,
        machine: Mutex::new(RoleMachine::new(record)),
        info: Mutex::new(info),
        sets: Mutex::new(sets),
        datacenter: Mutex::new(DataCenterStatus::default()),
        tunnels: Mutex::new((None, None)),
        resources: Mutex::new(resources),
        mode,
        steps,
        progress,
        crash_after: cmd.crash_after.clone(),
        partner_heard_ms: Mutex::new(None),
        auto_failover: Mutex::new(None),
        remote_handled: Mutex::new(None),
        refresh: Mutex::new(None),
        withdrawn: Mutex::new(None),
        moved: watch::channel(0).0,
        notices,
        pbx: Mutex::new(None),
        promotion_kind: Mutex::new(control::PromotionKind::Operator),
    });
    // A primary coming back (power, cable, repair) first checks that nobody else answers for
    // the shared address, before it reports, replicates or serves on it: the partner may have
    // taken over meanwhile.
    let taken = if lock(&shared.machine).record.state == RoleState::Primary {
        address_taken(&shared).await
    } else {
        None
    };
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let mut names = std::collections::HashMap::new();
    let mut spawn = |name: &'static str,
                     task: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>| {
        names.insert(tasks.spawn(task).id(), name);
    };
    spawn(
        "the control socket",
        Box::pin(serve_socket(shared.clone(), socket, shutdown.clone())),
    );
    spawn(
        "reporting to the data center",
        Box::pin(report(shared.clone(), shutdown.clone())),
    );
    spawn(
        "replication",
        Box::pin(replication(shared.clone(), shutdown.clone())),
    );
    spawn(
        "the resource sampler",
        Box::pin(sample_resources(shared.clone(), shutdown.clone())),
    );
    spawn(
        "the role-change executor",
        Box::pin(execute_steps(shared.clone(), step_queue, shutdown.clone())),
    );
    if shared.config().tunnels {
        spawn(
            "the tunnels",
            Box::pin(tunnels(shared.clone(), shutdown.clone())),
        );
    }
    spawn(
        "the PBX health check",
        Box::pin(pbx_health(shared.clone(), shutdown.clone())),
    );
    spawn(
        "the notify hook",
        Box::pin(notify_hook(shared.clone(), notice_queue, shutdown.clone())),
    );
    // Always running: it follows `auto_failover`, which SIGHUP may change.
    spawn(
        "automatic failover",
        Box::pin(auto_failover(shared.clone(), shutdown.clone())),
    );
    if shared.config().network.is_some() {
        spawn(
            "the address guard",
            Box::pin(guard::guard_address(shared.clone(), shutdown.clone())),
        );
        spawn(
            "the watch for the partner's claim",
            Box::pin(guard::watch_partner_claims(
                shared.clone(),
                shutdown.clone(),
            )),
        );
    }
    match taken {
        Some(by) => shared.handle(Event::AddressTaken { by }),
        None => {
            let resume = lock(&shared.machine).resume();
            shared.act(resume);
        }
    }
    let (role, sid) = (lock(&shared.machine).record.clone(), lock(&shared.info).sid);
    println!("ready: {sid} {} at {}", role.state, role.generation);
    lbs_protocol::systemd::notify(&format!(
        "READY=1\nSTATUS={} at {}",
        role.state, role.generation
    ));

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("watching SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("watching SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("watching SIGHUP")?;
    // Every task runs until shutdown: one that ends first is a fault, and the agent exits
    // non-zero naming it, so that systemd restarts it and the journal says why.
    let mut code = ExitCode::SUCCESS;
    // systemd's watchdog (WatchdogSec= in the unit): a ping at half its period, only while
    // this loop runs and the role machine's lock can be had — a wedged agent is restarted.
    let watchdog = lbs_protocol::systemd::watchdog_period().map(|period| period / 2);
    let mut ping = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    loop {
        tokio::select! {
            _ = ping.tick(), if watchdog.is_some() => {
                drop(lock(&shared.machine));
                lbs_protocol::systemd::notify("WATCHDOG=1");
                continue;
            }
            _ = hup.recv() => {
                let _ = reload(&shared);
                continue;
            }
            _ = term.recv() => {}
            _ = int.recv() => {}
            Some(ended) = tasks.join_next_with_id() => {
            let name = ended
                .as_ref()
                .map_or_else(|err| err.id(), |(id, ())| *id);
            let name = names.get(&name).copied().unwrap_or("a task");
            match ended {
                Ok(_) => tracing::error!("{name} ended unexpectedly; stopping the agent"),
                Err(err) => tracing::error!("{name} failed: {err}; stopping the agent"),
            }
            code = ExitCode::FAILURE;
            }
        }
        break;
    }
    lbs_protocol::systemd::notify("STOPPING=1");
    shutdown.cancel();
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    drop(lock(&shared.refresh).take());
    let _ = std::fs::remove_file(&cmd.socket);
    println!("stopped");
    Ok(code)
}

/// SIGHUP or `lbs reload`: reads the configuration again; what can change at once does, the rest is named
/// (it waits for a restart); a file that does not parse changes nothing.
fn reload(shared: &Shared) -> Result<String, String> {
    let path = &shared.config_path;
    let new = AgentConfig::load(path, false).map_err(|err| {
        let why = format!("{err:#}; the configuration in force is kept");
        tracing::error!("reload: {why}");
        why
    })?;
    let (merged, later) = shared.config().reloaded(new);
    for note in &merged.notes {
        if let crate::config::Note::Warning(text) = note {
            tracing::warn!("{text}");
        }
    }
    *shared.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(merged);
    let said = if later.is_empty() {
        format!("{} read again; all of it in force", path.display())
    } else {
        format!(
            "{} read again; {} changed and take effect at the next restart (systemctl restart lbs-agent)",
            path.display(),
            later.join(", ")
        )
    };
    tracing::warn!("reload: {said}");
    Ok(said)
}

/// The file beside the control `socket` that says the agent waits for activation.
pub fn unactivated_note(socket: &Path) -> PathBuf {
    socket.with_file_name("unactivated")
}

/// An agent started on a box that is not activated yet (preinstalled, as shipped) waits for
/// `lbs activate`, then carries on; `None` if it was stopped first.
async fn wait_for_activation(
    paths: &StatePaths,
    note: &Path,
) -> anyhow::Result<Option<RoleRecord>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("watching SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("watching SIGINT")?;
    let mut said = false;
    let watchdog = lbs_protocol::systemd::watchdog_period().is_some();
    loop {
        if watchdog {
            // Waiting is this agent's work until activation: systemd must not restart it.
            lbs_protocol::systemd::notify("WATCHDOG=1");
        }
        let record = RoleRecord::load(&paths.role())?;
        if record.state != RoleState::Unactivated && paths.info().exists() {
            return Ok(Some(record));
        }
        if !said {
            println!("waiting: this box is not activated yet (run `lbs activate`)");
            if let Err(err) =
                lbs_protocol::write_file_atomic(note, b"waiting for lbs activate\n", 0o644)
            {
                tracing::warn!("writing {}: {err}", note.display());
            }
            // Ready as shipped: the unit is up and waits for activation; `systemctl start`
            // must not hang until its timeout on a preinstalled box.
            lbs_protocol::systemd::notify("READY=1\nSTATUS=waiting for lbs activate");
            said = true;
        }
        tokio::select! {
            _ = term.recv() => return Ok(None),
            _ = int.recv() => return Ok(None),
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Binds the control socket (owner only), refusing when another agent answers on it.
async fn bind_socket(path: &Path, group: Option<&str>) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            bail!(
                "another lbs agent answers on {}; stop it first",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?;
    let mode = match group {
        None => 0o600,
        Some(name) => {
            let gid = nix::unistd::Group::from_name(name)
                .with_context(|| format!("looking up console_group {name:?}"))?
                .with_context(|| {
                    format!(
                        "console_group {name:?} does not exist: create it (the lbs package does: groupadd {name}) or set console_group = \"\" in the configuration"
                    )
                })?
                .gid;
            nix::unistd::chown(path, None, Some(gid))
                .with_context(|| format!("giving {} to group {name}", path.display()))?;
            0o660
        }
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(listener)
}

async fn serve_socket(shared: Arc<Shared>, listener: UnixListener, shutdown: CancellationToken) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut clients = JoinSet::new();
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = clients.join_next(), if !clients.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!("control socket: {err}");
                    continue;
                }
            },
        };
        let shared = shared.clone();
        clients.spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let read = tokio::time::timeout(
                Duration::from_secs(5),
                BufReader::new(read).read_line(&mut line),
            )
            .await;
            if !matches!(read, Ok(Ok(n)) if n > 0) {
                return;
            }
            let request = line.trim();
            if request == "demote" || request == "demote-check" {
                demote_request(&shared, &mut write, request == "demote-check").await;
                return;
            }
            if let Some(rest) = request.strip_prefix("promote") {
                let check_only = rest.starts_with("-check");
                let words = rest.trim_start_matches("-check");
                match PromoteOptions::parse(words, shared.config().network.as_ref()) {
                    Ok(options) => {
                        promote_request(&shared, &mut write, options, check_only).await;
                    }
                    Err(why) => {
                        say(&mut write, &format!("refused: {why}")).await;
                    }
                }
                return;
            }
            if request == "reload" {
                let line = match reload(&shared) {
                    Ok(said) => format!("done: {said}"),
                    Err(why) => format!("refused: {why}"),
                };
                say(&mut write, &line).await;
                return;
            }
            let answer = match request {
                "status" => serde_json::to_string(&shared.status())
                    .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")),
                other => {
                    serde_json::json!({ "error": format!("unknown request {other:?}") }).to_string()
                }
            };
            let _ = write.write_all(format!("{answer}\n").as_bytes()).await;
        });
    }
    clients.shutdown().await;
}

/// The partner's replication address, if it is known.
fn partner_address(shared: &Shared) -> Option<(lbs_protocol::ServerId, SocketAddr)> {
    let (sid, ip) = {
        let info = lock(&shared.info);
        let partner = info.partner.as_ref()?;
        let ip = match shared.config().sync_over {
            SyncOver::Lan => partner.lan?,
            SyncOver::Overlay => partner.overlay?,
        };
        (partner.sid, ip)
    };
    // Right after B the data center may still give the partner's address from before P —
    // the one this box has just taken: the primary is at the shared address then.
    let ip = match network(shared) {
        Some(network) if ip == current_address(shared) && ip != network.shared.addr => {
            network.shared.addr
        }
        _ => ip,
    };
    Some((sid, SocketAddr::from((ip, shared.config().sync_port))))
}

fn peer(shared: &Shared) -> anyhow::Result<Option<(Peer, SocketAddr)>> {
    let Some((partner, address)) = partner_address(shared) else {
        return Ok(None);
    };
    let generation = lock(&shared.machine).record.generation;
    Ok(Some((
        Peer::from_state(&shared.paths, partner, generation)?,
        address,
    )))
}

async fn report(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut moved = shared.moved.subscribe();
    loop {
        moved.borrow_and_update();
        let result = tokio::select! {
            () = shutdown.cancelled() => return,
            result = report_session(&shared) => result,
            // The connection left from an address this box no longer has: report again
            // from the new one now, not after the old one times out.
            Ok(()) = moved.changed() => {
                tracing::info!("this box moved to another address: reporting from it");
                continue;
            }
        };
        if let Err(err) = result {
            let text = format!("{err:#}");
            let mut dc = lock(&shared.datacenter);
            if dc.last_error.as_deref() != Some(text.as_str()) {
                tracing::warn!("data center: {text}");
            }
            dc.last_error = Some(text);
            dc.connected_to = None;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(RETRY) => {}
        }
    }
}

/// A control connection to the first data-center address that answers.
async fn connect_dc(shared: &Shared) -> anyhow::Result<(DcConnection, SocketAddr)> {
    let (conn, address, _) = connect_dc_negotiated(shared).await?;
    Ok((conn, address))
}

/// [`connect_dc`], with the protocol version both sides speak.
async fn connect_dc_negotiated(
    shared: &Shared,
) -> anyhow::Result<(DcConnection, SocketAddr, lbs_protocol::ProtocolVersion)> {
    let (sid, addresses) = {
        let info = lock(&shared.info);
        (info.sid, info.control.clone())
    };
    let identity = lbs_protocol::Identity::load(&shared.paths.cert(), &shared.paths.key())?;
    let root = lbs_protocol::TrustRoot::load(&shared.paths.ca())?;
    let config = tls::client_config(&identity, &root)?;
    let mut last_error = anyhow::anyhow!("the data center gave no control address");
    for address in addresses {
        // One deadline for the whole: TCP, the TLS handshake and the hello. A data center
        // that accepts connections but does not answer (stopped, overloaded) is given up on
        // like one that is down.
        let connected = tokio::time::timeout(DC_DEADLINE, async {
            let tcp = TcpStream::connect(address).await?;
            let stream = tls::connect(config.clone(), &PeerName::DataCenter, tcp).await?;
            let record = lock(&shared.machine).record.clone();
            let hello = Hello {
                protocol: PROTOCOL_VERSION,
                software: SoftwareVersion::current(),
                sender: Sender::Box {
                    sid,
                    role: record.state.wire_role(),
                },
            };
            let (conn, negotiated) = lbs_protocol::exchange_hello(
                stream,
                &PeerName::DataCenter,
                hello,
                record.generation,
                HELLO_TIMEOUT,
            )
            .await?;
            anyhow::Ok((conn, negotiated.version))
        })
        .await
        .unwrap_or_else(|_| {
            Err(anyhow::anyhow!(
                "connected, but no TLS handshake and hello within {} s",
                DC_DEADLINE.as_secs()
            ))
        });
        match connected {
            Ok((conn, version)) => return Ok((conn, address, version)),
            Err(err) => last_error = err.context(format!("data center at {address}")),
        }
    }
    Err(last_error)
}

/// A control connection to the data center.
type DcConnection = lbs_protocol::Connection<tls::ClientStream<TcpStream>>;

async fn report_session(shared: &Shared) -> anyhow::Result<()> {
    let (mut conn, address) = connect_dc(shared).await?;
    {
        lock(&shared.datacenter).connected_to = Some(address);
        loop {
            let record = lock(&shared.machine).record.clone();
            let report = BoxReport {
                role: record.state.wire_role(),
                software: SoftwareVersion::current(),
                advertised: current_address(shared),
                sync: sync_summary(shared),
                tunnels: tunnel_summary(shared),
            };
            let (_, answer) = control::call(
                &mut conn,
                record.generation,
                Message::Report(report),
                Duration::from_secs(10),
            )
            .await
            .with_context(|| format!("data center at {address}"))?;
            let (state, request) = match answer {
                Message::PairState(state) => (state, None),
                Message::PairStateWithDns { state, dns } => {
                    lock(&shared.datacenter).dns = Some(dns);
                    (state, None)
                }
                Message::PromotionRequested { state, request } => (state, Some((request, None))),
                Message::HandOverRequested {
                    state,
                    request,
                    reason,
                } => (state, Some((request, Some(reason)))),
                other => bail!("the data center answered a report with {}", other.kind()),
            };
            {
                let mut dc = lock(&shared.datacenter);
                dc.last_answer_ms = Some(now_ms());
                dc.last_error = None;
            }
            apply_pair_state(shared, state);
            if let Some((request, hand_over)) = request
                && lock(&shared.remote_handled).is_none_or(|done| done < request.id)
            {
                *lock(&shared.remote_handled) = Some(request.id);
                let refused = match hand_over {
                    Some(why) => take_hand_over(shared, &request, &why),
                    None => remote_promotion(shared, &request).await,
                };
                if let Some(reason) = refused {
                    let generation = lock(&shared.machine).record.generation;
                    let (_, answer) = control::call(
                        &mut conn,
                        generation,
                        Message::PromotionRefused {
                            id: request.id,
                            reason,
                        },
                        Duration::from_secs(10),
                    )
                    .await
                    .with_context(|| format!("data center at {address}"))?;
                    if let Message::PairState(state) = answer {
                        apply_pair_state(shared, state);
                    }
                }
            }
            tokio::time::sleep(shared.config().report_interval).await;
        }
    }
}

/// A promotion the provider asked for: the same checks as **P**, then the same steps; the
/// reason when the checks refuse it.
async fn remote_promotion(shared: &Shared, request: &RemotePromotion) -> Option<String> {
    tracing::warn!(
        "the data center asks this box to become the primary (request {}, by {})",
        request.id,
        request.by
    );
    match promote_checks(shared, false, None, false).await {
        Ok(lines) => {
            *lock(&shared.promotion_kind) = control::PromotionKind::Requested;
            promote_unattended(
                shared,
                &format!("promoting, as requested by {}", request.by),
                &lines,
            );
            None
        }
        Err(why) => {
            tracing::warn!("the requested promotion is refused: {why}");
            Some(why)
        }
    }
}

/// A promotion nobody at the console confirms (automatic, or asked by the data center): the
/// reason and what the checks found go to the log, then the same steps as **P**.
fn promote_unattended(shared: &Shared, why: &str, checks: &[String]) {
    tracing::warn!("{why}");
    for line in checks {
        tracing::warn!("  {line}");
    }
    shared.handle(Event::PromoteRequested(None));
}

/// What the data center said about the pair: partner, hardware, and the role (through the
/// machine: a stale primary fences itself).
fn apply_pair_state(shared: &Shared, state: lbs_protocol::control::PairState) {
    let partner_changed = {
        let mut info = lock(&shared.info);
        let partner_known = |i: &BoxInfo| i.partner.as_ref().map(|p| (p.sid, p.lan, p.overlay));
        let before = partner_known(&info);
        info.partner = state.partner.clone();
        let changed = partner_known(&info) != before;
        let hardware_changed = info.hardware_differences != state.hardware_differences;
        if hardware_changed {
            info.hardware_differences = state.hardware_differences.clone();
            if let Some(differences) = info.hardware_differences.as_ref().filter(|d| !d.is_empty())
            {
                tracing::warn!("the partner's hardware differs: {}", differences.join("; "));
            }
        }
        if (changed || hardware_changed)
            && let Err(err) = info.save(&shared.paths)
        {
            tracing::warn!("saving the partner's addresses: {err:#}");
        }
        // Addresses are read afresh by every pass; only another partner (a backup
        // provisioned later) changes whom the primary lets in.
        before.map(|b| b.0) != info.partner.as_ref().map(|p| p.sid)
    };
    if partner_changed {
        tracing::info!("the partner changed: replication restarts");
        shared.mode.send_modify(|_| {});
    }
    shared.handle(Event::Authority {
        role: state.role,
        generation: state.generation,
    });
}

/// The office network of `[network]`, with the address the operator chose at **P** instead
/// of the configured one.
fn network(shared: &Shared) -> Option<crate::config::Network> {
    let chosen = lock(&shared.machine).record.shared;
    with_choice(shared.config().network.clone(), chosen)
}

/// `network` with the address the operator chose at **P** (kept in the role record).
pub(crate) fn with_choice(
    network: Option<crate::config::Network>,
    chosen: Option<SharedAddress>,
) -> Option<crate::config::Network> {
    let mut network = network?;
    if let Some(chosen) = chosen {
        network.shared = lbs_netconfig::Ipv4Cidr {
            addr: chosen.address,
            prefix: chosen.prefix,
        };
        network.gateway = chosen.gateway;
    }
    Some(network)
}

/// Where this box serves now: the shared address while it is primary (with a `[network]`
/// section), its own otherwise.
fn current_address(shared: &Shared) -> Ipv4Addr {
    let state = lock(&shared.machine).record.state;
    match (&network(shared), state) {
        // From the data center's grant on, the shared address is where this box serves (a
        // report during the address step must not point the name back at the old one).
        (
            Some(network),
            RoleState::Primary
            | RoleState::Promoting(PromoteStep::TakeAddress | PromoteStep::StartPbx),
        ) => network.shared.addr,
        (Some(network), _) => network.own.addr,
        (None, _) => lock(&shared.info).lan,
    }
}

fn sync_summary(shared: &Shared) -> SyncSummary {
    let sets = lock(&shared.sets);
    SyncSummary {
        last_complete_ms: sets
            .iter()
            .map(|s| s.last_in_sync_ms)
            .collect::<Option<Vec<_>>>()
            .and_then(|all| all.into_iter().min()),
        pending_files: sets.iter().map(|s| s.pending_files).sum(),
        pending_bytes: sets.iter().map(|s| s.pending_bytes).sum(),
    }
}

fn tunnel_summary(shared: &Shared) -> Vec<TunnelSummary> {
    lock(&shared.tunnels)
        .0
        .as_ref()
        .map(|status| {
            status
                .tunnels
                .iter()
                .map(|t| TunnelSummary {
                    name: t.name.clone(),
                    healthy: t.health == lbs_vpn::Health::Up,
                    active: t.active,
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn tunnels(shared: Arc<Shared>, shutdown: CancellationToken) {
    let path = shared.paths.vpn_config();
    // Nothing to run, or nothing that can run: said once (status shows why), and the task
    // waits for the agent to stop like the others — the rest of the agent works without it.
    let config = match lbs_vpn::config::tunnels_from_file(&path) {
        Ok(config) if config.endpoints.is_empty() => {
            tracing::info!(
                "tunnels: the data center named no WireGuard endpoint; the data center and the partner are reached directly"
            );
            return shutdown.cancelled().await;
        }
        Ok(config) => config,
        Err(err) => {
            let why = format!("{}: {err}", path.display());
            tracing::error!("tunnels: {why}");
            lock(&shared.tunnels).1 = Some(why);
            return shutdown.cancelled().await;
        }
    };
    let running = tokio::select! {
        () = shutdown.cancelled() => return,
        started = lbs_vpn::Tunnels::start(config) => started,
    };
    let tunnels = match running {
        Ok(tunnels) => tunnels,
        Err(err) => {
            tracing::error!("tunnels: {err}");
            lock(&shared.tunnels).1 = Some(err.to_string());
            return shutdown.cancelled().await;
        }
    };
    let mut updates = tunnels.watch();
    loop {
        lock(&shared.tunnels).0 = Some(updates.borrow_and_update().clone());
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = updates.changed() => if changed.is_err() { break },
        }
    }
    if let Err(err) = tunnels.shutdown().await {
        tracing::warn!("removing the tunnels: {err}");
    }
}

async fn sample_resources(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut sampler = crate::resources::Sampler::new(shared.paths.dir.clone());
    loop {
        match sampler.sample() {
            Ok(Some(sample)) => {
                if let Err(err) = lock(&shared.resources).record(sample) {
                    tracing::warn!("recording resources: {err:#}");
                }
            }
            Ok(None) => {}
            Err(err) => tracing::warn!("sampling resources: {err:#}"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(shared.config().resource_interval) => {}
        }
    }
}

/// Starts and stops the serving or pulling side as the mode changes.
async fn replication(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut modes = shared.mode.subscribe();
    loop {
        let mode = *modes.borrow_and_update();
        let token = shutdown.child_token();
        let task = match mode {
            Mode::Serve => Some(tokio::spawn(serve_sets(shared.clone(), token.clone()))),
            Mode::Pull => Some(tokio::spawn(pull_sets(shared.clone(), token.clone()))),
            Mode::Stopped => None,
        };
        tokio::select! {
            () = shutdown.cancelled() => {}
            changed = modes.changed() => if changed.is_err() { shutdown.cancel() },
        }
        token.cancel();
        if let Some(task) = task {
            match task.await {
                Ok(Err(err)) => tracing::warn!("replication ({mode:?}) ended: {err:#}"),
                Err(err) => tracing::error!("replication ({mode:?}) failed: {err}"),
                Ok(Ok(())) => {}
            }
        }
        if shutdown.is_cancelled() {
            return;
        }
    }
}

/// The astdb snapshot directory (primary) and the copy's directory (backup).
fn astdb_dir(paths: &StatePaths) -> PathBuf {
    paths.dir.join("astdb")
}

/// A set the primary serves: name, root, index.
type ServedSet = (String, PathBuf, Arc<Mutex<lbs_sync::Index>>);

type Indexes = Vec<(
    SyncSet,
    Arc<Mutex<lbs_sync::Index>>,
    crate::sync_cmd::RootLock,
)>;

fn open_sets(shared: &Shared) -> anyhow::Result<Indexes> {
    let mut opened = Vec::new();
    for set in shared.all_sets(&astdb_dir(&shared.paths)) {
        std::fs::create_dir_all(&set.path)
            .with_context(|| format!("set {}: creating {}", set.name, set.path.display()))?;
        let (index, lock) = crate::sync_cmd::open_index(&shared.paths.dir, &set.path)
            .with_context(|| format!("set {}", set.name))?;
        opened.push((set, index, lock));
    }
    Ok(opened)
}

/// Copies the astdb consistently (SQLite's online backup) into the snapshot directory.
fn snapshot_astdb(source: &Path, dir: &Path) -> anyhow::Result<()> {
    let Some(name) = source.file_name() else {
        bail!("astdb {} has no file name", source.display());
    };
    if !source.exists() {
        return Ok(());
    }
    let tmp = dir.join(format!(".{}.lbs-snapshot", name.to_string_lossy()));
    let _ = std::fs::remove_file(&tmp);
    let db = rusqlite::Connection::open_with_flags(
        source,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening {}", source.display()))?;
    db.busy_timeout(Duration::from_secs(5))?;
    db.backup(
        rusqlite::MAIN_DB,
        &tmp,
        None::<fn(rusqlite::backup::Progress)>,
    )
    .with_context(|| format!("copying {} with SQLite's online backup", source.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

/// Puts the pulled astdb copy in place, atomically (the PBX is stopped on a backup).
fn install_astdb(copy_dir: &Path, target: &Path) -> anyhow::Result<()> {
    let Some(name) = target.file_name() else {
        bail!("astdb {} has no file name", target.display());
    };
    let copy = copy_dir.join(name);
    if !copy.exists() {
        return Ok(());
    }
    let dir = target.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.lbs-install", name.to_string_lossy()));
    std::fs::copy(&copy, &tmp).with_context(|| format!("copying to {}", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, target).with_context(|| format!("installing {}", target.display()))?;
    Ok(())
}

/// The primary: serves every set to the partner and tells it what changed.
async fn serve_sets(shared: Arc<Shared>, stop: CancellationToken) -> anyhow::Result<()> {
    // Serving needs the partner's SID (only its certificate gets in), not its address.
    let partner = lock(&shared.info).partner.as_ref().map(|p| p.sid);
    let Some(partner) = partner else {
        tracing::info!("no partner provisioned: nothing to serve");
        stop.cancelled().await;
        return Ok(());
    };
    let generation = lock(&shared.machine).record.generation;
    let peer = Peer::from_state(&shared.paths, partner, generation)?;
    let peer = Arc::new(peer);
    let sets = open_sets(&shared)?;
    let astdb = astdb_dir(&shared.paths);
    if let Some(source) = &shared.config().astdb
        && let Err(err) = snapshot_astdb(source, &astdb)
    {
        tracing::warn!("astdb snapshot: {err:#}");
    }
    for (set, _, _) in &sets {
        shared.set_status(&set.name, |s| s.state = "serving".into());
    }
    let (changes, _) = broadcast::channel::<Vec<String>>(64);
    let watcher = watch_sets(&shared, &sets, changes.clone())?;
    let listener = TcpListener::bind(SocketAddr::from((
        Ipv4Addr::UNSPECIFIED,
        shared.config().sync_port,
    )))
    .await
    .with_context(|| {
        format!(
            "listening for the partner on port {}",
            shared.config().sync_port
        )
    })?;
    let config = peer.server_config()?;
    let roots: Arc<Vec<ServedSet>> = Arc::new(
        sets.iter()
            .map(|(set, index, _)| (set.name.clone(), set.path.clone(), index.clone()))
            .collect(),
    );
    tracing::info!(port = shared.config().sync_port, partner = %peer.partner, "serving the sync sets");
    let mut sessions = JoinSet::new();
    let result = loop {
        let (tcp, remote) = tokio::select! {
            () = stop.cancelled() => break Ok(()),
            Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!("accepting: {err}");
                    continue;
                }
            },
        };
        let (peer, config, roots, changes) = (
            peer.clone(),
            config.clone(),
            roots.clone(),
            changes.subscribe(),
        );
        let stop = stop.clone();
        sessions.spawn(async move {
            let session = serve_one(peer, config, tcp, roots, changes);
            tokio::select! {
                () = stop.cancelled() => {}
                result = session => if let Err(err) = result {
                    if err.is::<NotLetIn>() {
                        // Only the partner may reach this port: anything else is worth a look.
                        tracing::warn!(%remote, "refused a connection to the sync port: {err:#}");
                    } else {
                        tracing::info!(%remote, "sync session ended: {err:#}");
                    }
                },
            }
        });
    };
    sessions.shutdown().await;
    watcher.stop().await;
    drop(sets);
    result
}

/// A connection to the sync port that did not get past TLS and the hello (not the partner's
/// certificate, not the partner, or not the protocol).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct NotLetIn(String);

async fn serve_one(
    peer: Arc<Peer>,
    config: Arc<tls::ServerConfig>,
    tcp: TcpStream,
    roots: Arc<Vec<ServedSet>>,
    mut changes: broadcast::Receiver<Vec<String>>,
) -> anyhow::Result<()> {
    let (mut conn, _) = peer
        .accept(config, tcp, Role::Primary)
        .await
        .map_err(|err| anyhow::Error::new(NotLetIn(format!("{err:#}"))))?;
    let first = tokio::time::timeout(Duration::from_secs(10), conn.next())
        .await
        .context("the partner said nothing")?
        .context("the partner hung up")??;
    match first.message {
        Message::SyncSet { name } => {
            let Some((_, root, index)) = roots.iter().find(|(n, _, _)| *n == name) else {
                let _ = conn
                    .send(Envelope {
                        generation: peer.generation,
                        message: Message::Refused(lbs_protocol::Refusal::ProtocolViolation {
                            detail: format!("this box has no sync set {name:?}"),
                        }),
                    })
                    .await;
                bail!("the partner asked for an unknown set {name:?}");
            };
            lbs_sync::serve(&mut conn, root.clone(), index.clone(), peer.generation).await?;
            Ok(())
        }
        Message::SyncWatch => loop {
            tokio::select! {
                incoming = conn.next() => match incoming {
                    None | Some(Err(_)) => return Ok(()),
                    Some(Ok(Envelope { message: Message::Heartbeat { seq, .. }, .. })) => {
                        conn.send(Envelope {
                            generation: peer.generation,
                            message: Message::HeartbeatAck { seq, role: Role::Primary },
                        })
                        .await?;
                    }
                    Some(Ok(_)) => {}
                },
                changed = changes.recv() => {
                    let (sets, overflow) = match changed {
                        Ok(sets) => (sets, false),
                        Err(broadcast::error::RecvError::Lagged(_)) => (Vec::new(), true),
                        Err(broadcast::error::RecvError::Closed) => return Ok(()),
                    };
                    conn.send(Envelope {
                        generation: peer.generation,
                        message: Message::SyncChanged { sets, overflow },
                    })
                    .await?;
                }
            }
        },
        other => bail!("the partner opened with {}", other.kind()),
    }
}

/// The inotify watch of the primary's sets, debounced into change notices.
struct SetWatcher {
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

impl SetWatcher {
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

fn watch_sets(
    shared: &Arc<Shared>,
    sets: &Indexes,
    changes: broadcast::Sender<Vec<String>>,
) -> anyhow::Result<SetWatcher> {
    use notify::Watcher;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<notify::Result<notify::Event>>();
    let mut watcher = notify::recommended_watcher(move |event| {
        let _ = tx.send(event);
    })
    .context("starting the inotify watch")?;
    let mut roots: Vec<(String, PathBuf)> = Vec::new();
    for (set, _, _) in sets {
        if set.name == ASTDB_SET {
            continue;
        }
        let root = std::fs::canonicalize(&set.path).unwrap_or_else(|_| set.path.clone());
        if let Err(err) = watcher.watch(&root, notify::RecursiveMode::Recursive) {
            // Out of watches (fs.inotify.max_user_watches): say so; the reconcile still runs.
            tracing::error!(
                set = set.name,
                "cannot watch {}: {err}; changes wait for the reconcile",
                root.display()
            );
            shared.set_status(&set.name, |s| {
                s.last_error = Some(format!("not watched ({err}); relying on the reconcile"));
            });
        }
        roots.push((set.name.clone(), root));
    }
    let astdb = shared.config().astdb.clone();
    if let Some(source) = &astdb
        && let Some(dir) = source.parent()
        && dir.exists()
        && let Err(err) = watcher.watch(dir, notify::RecursiveMode::NonRecursive)
    {
        tracing::error!("cannot watch {}: {err}", dir.display());
    }
    let stop = CancellationToken::new();
    let token = stop.clone();
    let debounce = shared.config().debounce;
    let snapshot_dir = astdb_dir(&shared.paths);
    let task = tokio::spawn(async move {
        let mut pending: BTreeSet<String> = BTreeSet::new();
        let mut overflow = false;
        // A notice goes out `debounce` after the first change it carries, however many follow:
        // a file written without pause (a call being recorded) must not hold back every
        // notice until it stops.
        let mut due: Option<tokio::time::Instant> = None;
        loop {
            let event = if pending.is_empty() && !overflow {
                due = None;
                tokio::select! {
                    () = token.cancelled() => return,
                    event = rx.recv() => event,
                }
            } else {
                let deadline = *due.get_or_insert_with(|| tokio::time::Instant::now() + debounce);
                tokio::select! {
                    () = token.cancelled() => return,
                    event = rx.recv() => event,
                    () = tokio::time::sleep_until(deadline) => {
                        due = None;
                        if pending.remove(ASTDB_SET)
                            && let Some(source) = astdb.clone()
                        {
                            let dir = snapshot_dir.clone();
                            match tokio::task::spawn_blocking(move || snapshot_astdb(&source, &dir)).await {
                                Ok(Ok(())) => { pending.insert(ASTDB_SET.to_owned()); }
                                Ok(Err(err)) => tracing::warn!("astdb snapshot: {err:#}"),
                                Err(err) => tracing::warn!("astdb snapshot: {err}"),
                            }
                        }
                        let sets: Vec<String> = std::mem::take(&mut pending).into_iter().collect();
                        let sets = if overflow { Vec::new() } else { sets };
                        overflow = false;
                        let _ = changes.send(sets);
                        continue;
                    }
                }
            };
            let Some(event) = event else { return };
            match event {
                // Reading (our own sync server reads every file it serves) is not a change;
                // counting it would make every pass trigger the next.
                Ok(event) if matches!(event.kind, notify::EventKind::Access(_)) => {}
                Ok(event) => {
                    if event.need_rescan() {
                        overflow = true;
                    }
                    for path in &event.paths {
                        if let Some(source) = &astdb
                            && path.parent() == source.parent()
                            && path
                                .file_name()
                                .zip(source.file_name())
                                .is_some_and(|(p, s)| {
                                    p.to_string_lossy().starts_with(&*s.to_string_lossy())
                                })
                        {
                            pending.insert(ASTDB_SET.to_owned());
                        }
                        for (name, root) in &roots {
                            if path.starts_with(root) {
                                pending.insert(name.clone());
                            }
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!("inotify: {err}");
                    overflow = true;
                }
            }
        }
    });
    Ok(SetWatcher {
        _watcher: watcher,
        task,
        stop,
    })
}

/// The backup: pulls sets from the partner, highest priority first.
async fn pull_sets(shared: Arc<Shared>, stop: CancellationToken) -> anyhow::Result<()> {
    let sets = open_sets(&shared)?;
    let wake = Arc::new(Notify::new());
    let pending: Arc<Mutex<BTreeSet<usize>>> = Arc::new(Mutex::new((0..sets.len()).collect()));
    let names: Vec<String> = sets.iter().map(|(s, _, _)| s.name.clone()).collect();
    let watch_task = tokio::spawn(watch_partner(
        shared.clone(),
        names.clone(),
        pending.clone(),
        wake.clone(),
        stop.clone(),
    ));
    let mut next_reconcile = Instant::now() + shared.config().reconcile_interval;
    // Sets take turns: after a pass of one, the next due set after it goes first, so a set
    // that changes without pause (a recording) cannot starve the others. A set whose files
    // were still changing waits a moment before its next pass, without holding up the rest.
    let mut cursor = 0usize;
    let mut not_before: Vec<Option<Instant>> = vec![None; sets.len()];
    loop {
        let now = Instant::now();
        let (next, waiting) = {
            let pending = lock(&pending);
            let ready = |i: &&usize| not_before[**i].is_none_or(|t| t <= now);
            let next = pending
                .range(cursor..)
                .find(ready)
                .or_else(|| pending.iter().find(ready))
                .copied();
            let waiting = pending.iter().filter_map(|&i| not_before[i]).min();
            (next, waiting)
        };
        let Some(i) = next else {
            if waiting.is_none() {
                cursor = 0;
            }
            let until = waiting.map_or(next_reconcile, |t| t.min(next_reconcile));
            tokio::select! {
                () = stop.cancelled() => break,
                () = wake.notified() => {}
                () = tokio::time::sleep_until(until.into()) => {
                    if Instant::now() >= next_reconcile {
                        lock(&pending).extend(0..sets.len());
                        next_reconcile = Instant::now() + shared.config().reconcile_interval;
                    }
                }
            }
            continue;
        };
        cursor = i + 1;
        not_before[i] = None;
        let (set, index, _) = &sets[i];
        let peer = match peer(&shared) {
            Ok(Some(peer)) => peer,
            Ok(None) => {
                for (set, _, _) in &sets {
                    shared.set_status(&set.name, |s| {
                        s.state = "waiting".into();
                        s.last_error = Some("the partner's address is not known yet".into());
                    });
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(RETRY) => continue,
                }
            }
            Err(err) => return Err(err),
        };
        let pass_started_ms = now_ms();
        shared.set_status(&set.name, |s| {
            s.state = "syncing".into();
            s.pass_started_ms = Some(pass_started_ms);
            s.changed_during_pass_ms = None;
        });
        let started = Instant::now();
        let outcome = tokio::select! {
            () = stop.cancelled() => break,
            outcome = pull_one(peer, set, index.clone(), stop.clone(), |total, done| {
                shared.set_status(&set.name, |s| {
                    s.pending_bytes = total.saturating_sub(done);
                    s.pass_bytes = Some((total, done.min(total)));
                });
            }) => outcome,
        };
        let took = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        match outcome {
            Ok(report) => {
                let complete = report.executed.deferred.is_empty() && report.plan.pending == 0;
                if complete {
                    lock(&pending).remove(&i);
                }
                if set.name == ASTDB_SET
                    && let Some(target) = &shared.config().astdb
                    && report.plan.fetch_files + report.plan.local_copies > 0
                    && let Err(err) = install_astdb(&set.path, target)
                {
                    tracing::error!("installing the astdb copy: {err:#}");
                }
                let fetched = report.plan.fetch_files;
                let left = report.plan.pending + report.executed.deferred.len() as u64;
                let mut caught_up = false;
                shared.set_status(&set.name, |s| {
                    s.pending_files = left;
                    s.pending_bytes = 0;
                    s.last_pass_ms = Some(took);
                    s.last_fetched_files = fetched;
                    s.last_fetched_bytes = report.executed.fetched_bytes;
                    s.last_error = None;
                    s.pass_started_ms = None;
                    s.pass_bytes = None;
                    if complete {
                        // The copy holds what the primary had when the pass began; a change
                        // announced since then is still to come.
                        s.last_in_sync_ms = Some(pass_started_ms);
                        s.changed_since_ms = s.changed_during_pass_ms.take();
                        caught_up = s.changed_since_ms.is_none();
                        s.state = if caught_up { "in sync" } else { "changed" }.into();
                    } else {
                        s.state = "changed".into();
                    }
                });
                if complete && !caught_up {
                    lock(&pending).insert(i);
                }
                if fetched > 0 {
                    tracing::info!(
                        set = set.name,
                        files = fetched,
                        bytes = report.executed.fetched_bytes,
                        ms = took,
                        "pulled"
                    );
                }
                if !complete {
                    // Files still being written on the primary: give them a moment rather
                    // than asking again at once (the other sets go meanwhile).
                    not_before[i] = Some(
                        Instant::now() + shared.config().debounce.max(Duration::from_millis(500)),
                    );
                }
            }
            Err(err) => {
                let text = format!("{err:#}");
                tracing::warn!(set = set.name, "pull failed: {text}");
                shared.set_status(&set.name, |s| {
                    s.state = "error".into();
                    s.last_error = Some(text);
                    s.pass_started_ms = None;
                    s.pass_bytes = None;
                    s.changed_during_pass_ms = None;
                });
                // Try again after a while, or as soon as the watch connection gets through.
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(RETRY) => {}
                    () = wake.notified() => {}
                }
            }
        }
    }
    let _ = watch_task.await;
    Ok(())
}

async fn pull_one(
    (peer, address): (Peer, SocketAddr),
    set: &SyncSet,
    index: Arc<Mutex<lbs_sync::Index>>,
    stop: CancellationToken,
    on_progress: impl Fn(u64, u64),
) -> anyhow::Result<lbs_sync::PullReport> {
    let (mut conn, _, _) = peer.connect(address, Role::Backup).await?;
    conn.send(Envelope {
        generation: peer.generation,
        message: Message::SyncSet {
            name: set.name.clone(),
        },
    })
    .await?;
    let trash = lbs_sync::Trash::open(&lbs_sync::Trash::default_for(&set.path))?;
    let (progress, mut follow) = watch::channel(lbs_sync::Progress::default());
    let report = {
        let pull = lbs_sync::pull(
            &mut conn,
            &set.path,
            index,
            &trash,
            peer.generation,
            lbs_sync::PullOptions {
                cancel: Some(stop),
                progress: Some(progress),
                ..lbs_sync::PullOptions::default()
            },
        );
        tokio::pin!(pull);
        // What is left of the pass, as it goes: if the primary dies half way, P says how much
        // of this set's last changes the copy lacks.
        loop {
            tokio::select! {
                report = &mut pull => break report?,
                Ok(()) = follow.changed() => {
                    let now = *follow.borrow_and_update();
                    on_progress(now.bytes_total, now.bytes_done + now.current_bytes);
                }
            }
        }
    };
    let _ = conn
        .send(Envelope {
            generation: peer.generation,
            message: Message::Goodbye {
                reason: "pass complete".into(),
            },
        })
        .await;
    Ok(report)
}

/// Keeps a watch connection to the primary; every notice marks its sets due.
async fn watch_partner(
    shared: Arc<Shared>,
    names: Vec<String>,
    pending: Arc<Mutex<BTreeSet<usize>>>,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    // Quick at first (the partner's agent may be starting too), slower while it stays away.
    let mut delay = Duration::from_millis(250);
    loop {
        let connected = std::sync::atomic::AtomicBool::new(false);
        let session = async {
            let Some((peer, address)) = peer(&shared)? else {
                bail!("the partner's address is not known yet");
            };
            let (mut conn, _, _) = peer.connect(address, Role::Backup).await?;
            conn.send(Envelope {
                generation: peer.generation,
                message: Message::SyncWatch,
            })
            .await?;
            // Connected: whatever happened while we were not, a reconcile finds it.
            connected.store(true, std::sync::atomic::Ordering::Relaxed);
            *lock(&shared.partner_heard_ms) = Some(now_ms());
            lock(&pending).extend(0..names.len());
            wake.notify_one();
            // A heartbeat a second: this backup's own view of whether the primary lives
            // (automatic failover needs it besides the data center's).
            let mut beat = tokio::time::interval(HEARTBEAT);
            let mut seq = 0u64;
            let mut heard = Instant::now();
            loop {
                let envelope = tokio::select! {
                    next = conn.next() => match next {
                        Some(envelope) => envelope?,
                        None => break,
                    },
                    _ = beat.tick() => {
                        if heard.elapsed() > 3 * HEARTBEAT {
                            bail!("the primary did not answer heartbeats for {:?}", heard.elapsed());
                        }
                        seq += 1;
                        conn.send(Envelope {
                            generation: peer.generation,
                            message: Message::Heartbeat { seq, role: Role::Backup },
                        })
                        .await?;
                        continue;
                    }
                };
                heard = Instant::now();
                *lock(&shared.partner_heard_ms) = Some(now_ms());
                if let Message::SyncChanged { sets, overflow } = envelope.message {
                    let now = now_ms();
                    let due: Vec<usize> = if overflow {
                        (0..names.len()).collect()
                    } else {
                        sets.iter()
                            .filter_map(|s| names.iter().position(|n| n == s))
                            .collect()
                    };
                    for &i in &due {
                        shared.set_status(&names[i], |s| {
                            s.changed_since_ms.get_or_insert(now);
                            if s.pass_started_ms.is_some() {
                                s.changed_during_pass_ms.get_or_insert(now);
                            }
                            if s.state == "in sync" {
                                s.state = "changed".into();
                            }
                        });
                    }
                    lock(&pending).extend(due);
                    wake.notify_one();
                }
            }
            anyhow::Result::<()>::Err(anyhow::anyhow!("the primary closed the watch connection"))
        };
        tokio::select! {
            () = stop.cancelled() => return,
            result = session => if let Err(err) = result {
                tracing::debug!("watch: {err:#}");
            },
        }
        if connected.load(std::sync::atomic::Ordering::Relaxed) {
            delay = Duration::from_millis(250);
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(4));
    }
}

/// An ARP probe (RFC 5227: it claims nothing) of the shared address on the office LAN.
async fn probe_shared(
    network: &crate::config::Network,
) -> anyhow::Result<lbs_netconfig::ProbeResult> {
    use lbs_netconfig::{Arp, NetBackend};
    let net = lbs_netconfig::Netlink::open()?;
    let link = net.link(&network.interface).await?;
    let arp = lbs_netconfig::PacketArp::new(lbs_netconfig::ProbeProfile::FAST);
    Ok(arp.probe(&link, network.shared.addr).await?)
}

/// Who else answers ARP for the shared address, if anyone (`None` without `[network]`, or
/// when the probe cannot run: then the data center's word at the next report decides).
async fn address_taken(shared: &Shared) -> Option<String> {
    let network = network(shared)?;
    match probe_shared(&network).await {
        Ok(lbs_netconfig::ProbeResult::InUse(mac)) => {
            tracing::warn!("{mac} answers ARP for {}", network.shared.addr);
            Some(mac.to_string())
        }
        Ok(lbs_netconfig::ProbeResult::Free) => {
            tracing::info!(
                "nobody else answers ARP for {}: this box keeps serving on it",
                network.shared.addr
            );
            None
        }
        Err(err) => {
            tracing::warn!("probing {} at start: {err:#}", network.shared.addr);
            None
        }
    }
}

/// Automatic failover (`auto_failover = true`): the backup promotes itself when it has not
/// heard the primary itself for `primary_gone_after_s` *and* the data center (reachable) has
/// not either — then the same checks as **P** (nobody answers ARP for the shared address
/// included) and the same steps. The data center's compare-and-set keeps it to one primary.
async fn auto_failover(shared: Arc<Shared>, shutdown: CancellationToken) {
    let started_ms = now_ms();
    let gone_ms = u64::try_from(shared.config().primary_gone_after.as_millis()).unwrap_or(u64::MAX);
    let mut said = String::new();
    // After an attempt the data center refused, the next waits a while.
    let mut not_before = Instant::now();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if !shared.config().auto_failover
            || lock(&shared.machine).record.state != RoleState::Backup
            || Instant::now() < not_before
        {
            continue;
        }
        let now = now_ms();
        let lost_since = lock(&shared.partner_heard_ms)
            .unwrap_or(started_ms)
            .max(started_ms);
        let decision = if now.saturating_sub(lost_since) < gone_ms {
            Err(format!(
                "on: this box heard the primary {:.1} s ago",
                now.saturating_sub(lost_since) as f64 / 1000.0
            ))
        } else {
            promote_checks(&shared, false, None, false)
                .await
                .map_err(|why| format!("on: not promoting: {why}"))
        };
        match decision {
            Ok(lines) => {
                let why = format!(
                    "AUTOMATIC FAILOVER: neither this box nor the data center heard the primary for {} s; promoting",
                    gone_ms / 1000
                );
                *lock(&shared.auto_failover) = Some(format!("on: promoted itself ({why})"));
                *lock(&shared.promotion_kind) = control::PromotionKind::Automatic;
                promote_unattended(&shared, &why, &lines);
                not_before = Instant::now() + Duration::from_secs(30);
            }
            Err(why) => {
                // Logged when the reason changes, not when only its seconds do.
                let kind: String = why.chars().filter(|c| !c.is_ascii_digit()).collect();
                if kind != said {
                    tracing::info!("automatic failover {why}");
                    said = kind;
                }
                *lock(&shared.auto_failover) = Some(why);
            }
        }
    }
}

/// Writes one line to an `lbs promote` client (it may have gone: then nobody reads).
async fn say(write: &mut tokio::net::unix::OwnedWriteHalf, line: &str) -> bool {
    use tokio::io::AsyncWriteExt;
    write
        .write_all(format!("{line}\n").as_bytes())
        .await
        .is_ok()
}

/// The checks before **P**: what the operator must know, and whether to go ahead.
async fn promote_checks(
    shared: &Shared,
    force: bool,
    chosen: Option<SharedAddress>,
    offline: bool,
) -> Result<Vec<String>, String> {
    let mut lines = Vec::new();
    let state = lock(&shared.machine).record.state;
    if state != RoleState::Backup {
        return Err(format!(
            "only the backup can be promoted; this box is {state}"
        ));
    }
    let now = now_ms();
    for set in lock(&shared.sets).iter() {
        lines.push(format!(
            "copy of {:<11} {} — last in sync {}{}",
            set.name,
            set.state,
            set.last_in_sync_ms.map_or("never".to_owned(), |at| format!(
                "{:.1} s ago",
                now.saturating_sub(at) as f64 / 1000.0
            )),
            match (set.pending_files, set.pending_bytes) {
                (0, 0) => String::new(),
                (files, 0) => format!(", {files} file(s) not copied yet"),
                (0, bytes) => format!(", {} not copied yet", human_bytes(bytes as f64)),
                (files, bytes) => format!(
                    ", {files} file(s) and {} not copied yet",
                    human_bytes(bytes as f64)
                ),
            }
        ));
    }
    let (partner, hardware) = {
        let info = lock(&shared.info);
        (info.partner.clone(), info.hardware_differences.clone())
    };
    if let Some(differences) = hardware.filter(|d| !d.is_empty()) {
        lines.push(format!(
            "WARNING: this box's hardware differs from the primary's: {}",
            differences.join("; ")
        ));
    }
    // The data center must be reachable: it is the one that fences the old primary.
    let answered = lock(&shared.datacenter).last_answer_ms;
    let fresh = answered.is_some_and(|at| {
        now.saturating_sub(at)
            < 3 * u64::try_from(shared.config().report_interval.as_millis()).unwrap_or(u64::MAX)
    });
    let gone_after =
        u64::try_from(shared.config().primary_gone_after.as_millis()).unwrap_or(u64::MAX);
    if offline {
        // Without the data center: it must really be gone, and this box must have lost the
        // primary itself.
        if fresh {
            return Err(
                "the data center answers: promote normally (without --offline), it fences the old primary"
                    .to_owned(),
            );
        }
        match *lock(&shared.partner_heard_ms) {
            Some(at) if now.saturating_sub(at) < gone_after && !force => {
                return Err(format!(
                    "this box heard the primary {:.1} s ago: it is alive (wait {} s of silence)",
                    now.saturating_sub(at) as f64 / 1000.0,
                    gone_after / 1000
                ));
            }
            Some(at) => lines.push(format!(
                "this box last heard the primary {:.1} s ago",
                now.saturating_sub(at) as f64 / 1000.0
            )),
            None => lines.push("this box has not heard the primary since it started".to_owned()),
        }
        lines.push(
            "OFFLINE: the data center is unreachable; it is told when it answers again (if the pair moved on meanwhile, this box steps back)"
                .to_owned(),
        );
    } else {
        if !fresh {
            return Err(
                "the data center has not answered lately; a promotion needs it (it fences the old primary). If it is down and the primary surely dead: --offline"
                    .to_owned(),
            );
        }
        match partner.as_ref().and(partner_silent_ms(shared)) {
            Some(silent) if silent < gone_after && !force => {
                return Err(format!(
                    "the data center heard the primary {:.1} s ago: it is alive (after {} s of silence it counts as gone: wait {} s more, or use --force)",
                    silent as f64 / 1000.0,
                    gone_after / 1000,
                    (gone_after - silent).div_ceil(1000)
                ));
            }
            Some(silent) => lines.push(format!(
                "the data center last heard the primary {:.1} s ago",
                silent as f64 / 1000.0
            )),
            None => lines.push("the data center never heard the primary".to_owned()),
        }
    }
    if let Some(network) = &with_choice(shared.config().network.clone(), chosen) {
        match probe_shared(network).await {
            Ok(lbs_netconfig::ProbeResult::Free) => {
                lines.push(format!(
                    "nobody answers ARP for {} on {}",
                    network.shared.addr, network.interface
                ));
                lines.push(format!(
                    "this box will take {} via {} on {} (it has {} now)",
                    network.shared, network.gateway, network.interface, network.own
                ));
            }
            Ok(lbs_netconfig::ProbeResult::InUse(mac)) if !force => {
                return Err(format!(
                    "cannot take {}: {mac} still answers ARP; unplug the old primary or use --force",
                    network.shared.addr
                ));
            }
            Ok(lbs_netconfig::ProbeResult::InUse(mac)) => lines.push(format!(
                "WARNING: {mac} still answers ARP for {} (--force)",
                network.shared.addr
            )),
            Err(err) => return Err(format!("probing {}: {err:#}", network.shared.addr)),
        }
    } else {
        lines.push(
            "no [network] section: this box keeps its own address; phones follow the DNS update"
                .to_owned(),
        );
    }
    if let Some(note) = &shared.config().promote_note {
        lines.push(format!("NOTE: {note}"));
    }
    Ok(lines)
}

/// Passes on the progress lines already sent (the steps report before the state changes).
async fn drain(
    progress: &mut broadcast::Receiver<String>,
    write: &mut tokio::net::unix::OwnedWriteHalf,
    started: Instant,
) {
    while let Ok(line) = progress.try_recv() {
        say(
            write,
            &format!("{:>6.2} s  {line}", started.elapsed().as_secs_f64()),
        )
        .await;
    }
}

/// What `promote` / `promote-check` asked for: `force`, and `address=A/P` `gateway=G` when
/// the operator changed the configured address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PromoteOptions {
    pub(crate) force: bool,
    pub(crate) offline: bool,
    /// The operator saw the checks (promote-check): they run again but are not repeated.
    pub(crate) checked: bool,
    pub(crate) chosen: Option<SharedAddress>,
}

impl PromoteOptions {
    /// Parses the request's words against the configured network.
    pub(crate) fn parse(
        words: &str,
        network: Option<&crate::config::Network>,
    ) -> Result<PromoteOptions, String> {
        let mut options = PromoteOptions::default();
        let (mut address, mut gateway) = (None, None);
        for word in words.split_whitespace() {
            if word == "force" {
                options.force = true;
            } else if word == "offline" {
                options.offline = true;
            } else if word == "checked" {
                options.checked = true;
            } else if let Some(text) = word.strip_prefix("address=") {
                let cidr = text.parse::<lbs_netconfig::Ipv4Cidr>().map_err(|_| {
                    format!("{text:?} is not an address with its prefix, like 192.168.1.2/24")
                })?;
                address = Some(cidr);
            } else if let Some(text) = word.strip_prefix("gateway=") {
                gateway = Some(
                    text.parse::<Ipv4Addr>()
                        .map_err(|_| format!("{text:?} is not an address, like 192.168.1.1"))?,
                );
            } else {
                return Err(format!("unknown word {word:?} in the promotion request"));
            }
        }
        if address.is_none() && gateway.is_none() {
            return Ok(options);
        }
        let Some(network) = network else {
            return Err(
                "this box has no [network] section: it keeps its own address on promotion".into(),
            );
        };
        let address = address.unwrap_or(network.shared);
        let gateway = gateway.unwrap_or(network.gateway);
        if address.prefix == 0 || address.prefix > 30 {
            return Err(format!(
                "/{} leaves no room for a gateway; an office LAN is /8 to /30",
                address.prefix
            ));
        }
        let mask = u32::MAX << (32 - u32::from(address.prefix));
        if u32::from(address.addr) & mask != u32::from(gateway) & mask {
            return Err(format!(
                "the gateway {gateway} is not on {}/{}'s network",
                address.addr, address.prefix
            ));
        }
        if gateway == address.addr {
            return Err(format!(
                "{gateway} cannot be both the address and the gateway"
            ));
        }
        options.chosen = Some(SharedAddress {
            address: address.addr,
            prefix: address.prefix,
            gateway,
        });
        Ok(options)
    }
}

/// `promote-check` / `promote`: the checks, then (unless only checking) the promotion with
/// its steps as they happen.
async fn promote_request(
    shared: &Arc<Shared>,
    write: &mut tokio::net::unix::OwnedWriteHalf,
    options: PromoteOptions,
    check_only: bool,
) {
    let lines = match promote_checks(shared, options.force, options.chosen, options.offline).await {
        Ok(lines) => lines,
        Err(why) => {
            say(write, &format!("refused: {why}")).await;
            return;
        }
    };
    if !options.checked || check_only {
        for line in &lines {
            say(write, line).await;
        }
    }
    if check_only {
        say(write, "ready: promotion possible").await;
        return;
    }
    *lock(&shared.promotion_kind) = if options.force {
        control::PromotionKind::Forced
    } else {
        control::PromotionKind::Operator
    };
    follow(
        shared,
        write,
        if options.offline {
            Event::PromoteOffline(options.chosen)
        } else {
            Event::PromoteRequested(options.chosen)
        },
        false,
        |record| match record.state {
            RoleState::Primary => Some(Ok(format!(
                "this box is the PRIMARY ({}){}",
                record.generation,
                if record.offline {
                    ", offline: the data center confirms it when it answers again"
                } else {
                    ""
                }
            ))),
            RoleState::Backup => Some(Err(record
                .last_error
                .clone()
                .unwrap_or_else(|| "refused".to_owned()))),
            _ => None,
        },
    )
    .await;
}

/// Applies `event`, passes on the role change's progress lines as they come, and ends with
/// `refused: …`, or `done: …` (`more_follows`: a progress line, the caller goes on) once
/// `finished` says the record reached an end.
async fn follow(
    shared: &Arc<Shared>,
    write: &mut tokio::net::unix::OwnedWriteHalf,
    event: Event,
    more_follows: bool,
    finished: impl Fn(&RoleRecord) -> Option<Result<String, String>>,
) {
    let started = Instant::now();
    let mut progress = shared.progress.subscribe();
    if let Err(why) = shared.apply(event) {
        // Another console's P (or B) got there first, or the state moved since the checks.
        say(write, &format!("refused: {why}")).await;
        return;
    }
    loop {
        let record = lock(&shared.machine).record.clone();
        if let Some(outcome) = finished(&record) {
            drain(&mut progress, write, started).await;
            let took = started.elapsed().as_secs_f64();
            let line = match outcome {
                Ok(done) if more_follows => format!("{took:>6.2} s  {done}"),
                Ok(done) => format!("done: {done} after {took:.2} s"),
                Err(why) => format!("refused: {why}"),
            };
            say(write, &line).await;
            return;
        }
        tokio::select! {
            line = progress.recv() => match line {
                Ok(line) => {
                    say(write, &format!("{:>6.2} s  {line}", started.elapsed().as_secs_f64())).await;
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// `demote-check` / `demote`: **B** on a fenced box — what it will do (and the operator's
/// note), then (unless only checking) stop the PBX, give the shared address up (take this
/// box's own), register as backup, and follow the re-sync until every set is in sync.
async fn demote_request(
    shared: &Arc<Shared>,
    write: &mut tokio::net::unix::OwnedWriteHalf,
    check_only: bool,
) {
    let state = lock(&shared.machine).record.state;
    if state != RoleState::Fenced {
        let why = match state {
            RoleState::Primary => "this box is the PRIMARY: B is for the old primary after the other box took over (P there first)".to_owned(),
            RoleState::Backup => "this box is the BACKUP already".to_owned(),
            other => format!("only a fenced box becomes the backup with B; this box is {other}"),
        };
        say(write, &format!("refused: {why}")).await;
        return;
    }
    if check_only {
        let what = match network(shared) {
            Some(n) => format!(
                "B stops the PBX here, gives up {} for {} on {}, and registers this box as the backup",
                n.shared, n.own, n.interface
            ),
            None => "B stops the PBX here and registers this box as the backup".to_owned(),
        };
        say(write, &what).await;
        say(
            write,
            "then the full sync from the primary starts; this follows it until in sync",
        )
        .await;
        if let Some(note) = &shared.config().demote_note {
            say(write, &format!("NOTE: {note}")).await;
        }
        say(write, "ready: demotion possible").await;
        return;
    }
    let started = Instant::now();
    follow(shared, write, Event::DemoteRequested, true, |record| {
        (record.state == RoleState::Backup).then(|| {
            Ok("this box is the BACKUP; the full sync from the primary has started".to_owned())
        })
    })
    .await;
    if lock(&shared.machine).record.state != RoleState::Backup {
        return;
    }
    // The re-sync, until every set has finished a pass that left nothing behind.
    let since = lock(&shared.machine).record.since_unix_ms;
    let mut said = String::new();
    let mut last_said = Instant::now();
    let mut rate = crate::text::Rate::default();
    loop {
        let sets = lock(&shared.sets).clone();
        if lock(&shared.machine).record.state != RoleState::Backup {
            say(write, "refused: the role changed during the re-sync").await;
            return;
        }
        let fresh =
            |s: &SetStatus| s.state == "in sync" && s.last_in_sync_ms.is_some_and(|at| at >= since);
        if sets.iter().all(fresh) {
            say(
                write,
                &format!(
                    "done: in sync with the primary after {:.2} s",
                    started.elapsed().as_secs_f64()
                ),
            )
            .await;
            return;
        }
        let line = sets
            .iter()
            .map(|s| {
                let state = if fresh(s) {
                    "in sync"
                } else if s.state == "in sync" || s.state == "serving" || s.state == "stopped" {
                    "starting"
                } else {
                    s.state.as_str()
                };
                format!("{} {state}", s.name)
            })
            .collect::<Vec<_>>()
            .join(", ");
        // The copying under way: percent, rate and time left, every 2 s while it goes on.
        let (total, done) = sets
            .iter()
            .filter_map(|s| s.pass_bytes)
            .fold((0, 0), |(t, d), (total, done)| (t + total, d + done));
        let progress = rate.line(total, done, Instant::now());
        let line = match progress {
            Some(progress) => format!("{line}; {progress}"),
            None => line,
        };
        let changed = line.split("; ").next() != said.split("; ").next();
        if changed || last_said.elapsed() >= Duration::from_secs(2) {
            let heard = say(
                write,
                &format!(
                    "{:>6.2} s  re-sync: {line}",
                    started.elapsed().as_secs_f64()
                ),
            )
            .await;
            if !heard {
                return; // The operator left (Ctrl-C); the sync goes on without an audience.
            }
            said = line;
            last_said = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Carries out role-change steps one at a time and feeds their outcome to the machine.
async fn execute_steps(
    shared: Arc<Shared>,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<Action>,
    shutdown: CancellationToken,
) {
    // A step that failed is retried (past the point of no return), but not in a tight loop.
    let mut failed: Option<Action> = None;
    loop {
        let action = tokio::select! {
            () = shutdown.cancelled() => return,
            next = queue.recv() => match next {
                Some(action) => action,
                None => return,
            },
        };
        if failed.take().as_ref() == Some(&action) {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(RETRY) => {}
            }
        }
        let started = Instant::now();
        let outcome = tokio::select! {
            () = shutdown.cancelled() => return,
            outcome = run_step(&shared, &action) => outcome,
        };
        let took = started.elapsed().as_secs_f64() * 1000.0;
        // An outcome only counts for the step the machine is waiting for (a step may have
        // been overtaken, e.g. by the data center's word at a report).
        let in_step = lock(&shared.machine).current_step().as_ref() == Some(&action);
        if in_step && outcome.is_ok() && shared.crash_after.as_deref() == action.step_name() {
            // Crash tests: the step is done, its outcome not recorded — as a power cut here.
            eprintln!("lbs: --crash-after {action:?}: stopping dead");
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
        match outcome {
            Ok(StepOutcome::Promoted(generation)) if in_step => {
                let _ = shared.progress.send(format!(
                    "the data center made this box primary at {generation} ({took:.0} ms)"
                ));
                shared.handle(Event::Promoted(generation));
            }
            Ok(StepOutcome::Promoted(_)) => {}
            Ok(StepOutcome::Done(what)) => {
                let _ = shared.progress.send(format!("{what} ({took:.0} ms)"));
                if in_step {
                    shared.handle(Event::StepDone);
                }
            }
            Err(err) => {
                let why = format!("{err:#}");
                tracing::error!("{action:?}: {why}");
                failed = Some(action.clone());
                let _ = shared.progress.send(format!("{action:?} failed: {why}"));
                if in_step {
                    shared.handle(Event::StepFailed(why));
                }
            }
        }
    }
}

enum StepOutcome {
    Done(String),
    Promoted(lbs_protocol::Generation),
}

fn takeover_plan(
    network: &crate::config::Network,
    force: bool,
    paths: &StatePaths,
) -> lbs_netconfig::TakeoverPlan {
    lbs_netconfig::TakeoverPlan {
        interface: network.interface.clone(),
        from: network.own,
        to: network.shared,
        gateway: network.gateway,
        force,
        persist: network
            .boot_config
            .as_ref()
            .map(|root| lbs_netconfig::PersistTo {
                root: root.clone(),
                backups: paths.dir.join("netconfig-backups"),
            }),
    }
}

/// Runs the PBX hook `key` of the configuration (`pbx_start`, `pbx_stop`).
async fn hook(command: &Option<String>, key: &str, what: &str) -> anyhow::Result<StepOutcome> {
    let Some(command) = command.clone() else {
        return Ok(StepOutcome::Done(format!(
            "{what}: no {key} command configured, nothing run"
        )));
    };
    let status = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("sh")
            .args(["-c", &command])
            .kill_on_drop(true)
            .status(),
    )
    .await
    .with_context(|| format!("`{command}` did not finish within 60 s"))??;
    if !status.success() {
        bail!("`{command}` failed: {status}");
    }
    Ok(StepOutcome::Done(format!("{what}: `{command}`")))
}

/// Takes the shared address (`take`) or gives it back for this box's own, each step of
/// `lbs-netconfig`'s move passed on as progress.
async fn move_address(
    shared: &Shared,
    network: &crate::config::Network,
    take: bool,
) -> anyhow::Result<lbs_netconfig::TakeoverReport> {
    let net = lbs_netconfig::Netlink::open()?;
    let arp = lbs_netconfig::PacketArp::new(lbs_netconfig::ProbeProfile::FAST);
    // P's checks probed already (and the operator may have forced it); a promotion granted
    // after it was given up on was confirmed by nobody: it takes only a free address.
    let force = !(take && lock(&shared.machine).record.abandoned.is_some());
    let plan = takeover_plan(network, force, &shared.paths);
    let progress = shared.progress.clone();
    let mut on_step = |step: &lbs_netconfig::StepReport| {
        let _ = progress.send(format!("  {step}"));
    };
    let report = if take {
        lbs_netconfig::take_over_observed(&net, &arp, &plan, &mut on_step).await?
    } else {
        lbs_netconfig::give_up_observed(&net, &arp, &plan, &mut on_step).await?
    };
    shared.moved.send_modify(|n| *n += 1);
    // The burst is done; re-announce every 2 s for a minute, so switches, phones and routers
    // that missed it (or refreshed their cache from a stale reply) follow within 2 s.
    use lbs_netconfig::NetBackend;
    let held = if take { network.shared } else { network.own };
    match net.link(&network.interface).await {
        Ok(link) => {
            *lock(&shared.refresh) = Some(lbs_netconfig::Refresh::start(
                arp,
                link,
                held.addr,
                Duration::from_secs(2),
                Duration::from_secs(60),
            ));
        }
        Err(err) => tracing::warn!("cannot refresh the announcement of {held}: {err}"),
    }
    Ok(report)
}

async fn run_step(shared: &Shared, action: &Action) -> anyhow::Result<StepOutcome> {
    match action {
        Action::AskPromotion { believed } => {
            let advertised = network(shared)
                .as_ref()
                .map_or(lock(&shared.info).lan, |n| n.shared.addr);
            // Connection and answer within one deadline: an operator at P is told, and the
            // box is back to backup, rather than left waiting on a data center that froze.
            let how = {
                let record = lock(&shared.machine).record.clone();
                if record.state == RoleState::Primary && record.offline {
                    control::PromotionKind::Offline
                } else {
                    *lock(&shared.promotion_kind)
                }
            };
            let asked = tokio::time::timeout(PROMOTION_DEADLINE, async {
                let (mut conn, address, version) = connect_dc_negotiated(shared).await?;
                // A data center of 1.4 records how the promotion came about.
                let request = if version >= (lbs_protocol::ProtocolVersion { major: 1, minor: 4 }) {
                    Message::PromoteAs { advertised, how }
                } else {
                    Message::Promote { advertised }
                };
                let answer = control::call(&mut conn, *believed, request, DC_DEADLINE).await;
                match answer {
                    Err(control::CallError::Timeout { .. } | control::CallError::Closed(_)) => {
                        bail!("the data center at {address} took the request but did not answer within {} s", DC_DEADLINE.as_secs())
                    }
                    other => anyhow::Ok(other?),
                }
            })
            .await
            .unwrap_or_else(|_| {
                Err(anyhow::anyhow!(
                    "no answer from the data center within {} s",
                    PROMOTION_DEADLINE.as_secs()
                ))
            });
            let (_, answer) = match asked {
                Ok(answer) => answer,
                Err(err) if err.downcast_ref::<control::CallError>().is_some() => return Err(err),
                Err(err) => {
                    return Err(anyhow::anyhow!(
                        "{err:#}; nothing was changed: press P again, or if the data center is down and the primary surely dead, promote --offline"
                    ));
                }
            };
            match answer {
                Message::Promoted(promotion) => Ok(StepOutcome::Promoted(promotion.generation)),
                other => bail!(
                    "the data center answered the promotion with {}",
                    other.kind()
                ),
            }
        }
        Action::TakeAddress => {
            let Some(network) = &network(shared) else {
                return Ok(StepOutcome::Done(
                    "this box keeps its own address (remote backup): the pair's name points here now".into(),
                ));
            };
            let report = move_address(shared, network, true).await?;
            Ok(StepOutcome::Done(format!(
                "took {} on {}: {}",
                network.shared,
                network.interface,
                report.summary()
            )))
        }
        Action::GiveUpAddress => {
            let Some(network) = &network(shared) else {
                return Ok(StepOutcome::Done("no shared address to give up".into()));
            };
            let report = move_address(shared, network, false).await?;
            Ok(StepOutcome::Done(format!(
                "gave up {}: {}",
                network.shared,
                report.summary()
            )))
        }
        Action::StartPbx => hook(&shared.config().pbx_start, "pbx_start", "PBX start").await,
        Action::StopPbx => hook(&shared.config().pbx_stop, "pbx_stop", "PBX stop").await,
        Action::RegisterBackup => {
            let (mut conn, _) = connect_dc(shared).await?;
            let generation = lock(&shared.machine).record.generation;
            control::call(
                &mut conn,
                generation,
                Message::RegisterBackup,
                Duration::from_secs(10),
            )
            .await?;
            Ok(StepOutcome::Done(
                "registered with the data center as backup".into(),
            ))
        }
        other => bail!("{other:?} is not a step"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn office() -> crate::config::Network {
        crate::config::Network {
            interface: "eth0".into(),
            shared: "192.168.1.2/24".parse().unwrap(),
            own: "192.168.1.3/24".parse().unwrap(),
            gateway: Ipv4Addr::new(192, 168, 1, 1),
            boot_config: None,
        }
    }

    #[test]
    fn promotion_words_are_checked_before_anything_moves() {
        let network = office();
        let parse = |words: &str| PromoteOptions::parse(words, Some(&network));
        assert_eq!(parse("").unwrap(), PromoteOptions::default());
        let options = parse(" force offline").unwrap();
        assert!(options.force && options.offline && options.chosen.is_none());
        // A new address keeps the configured gateway when it is on its network.
        let chosen = parse(" address=192.168.1.20/24").unwrap().chosen.unwrap();
        assert_eq!(
            (chosen.address, chosen.prefix, chosen.gateway),
            (
                Ipv4Addr::new(192, 168, 1, 20),
                24,
                Ipv4Addr::new(192, 168, 1, 1)
            )
        );
        let chosen = parse(" address=10.0.0.2/8 gateway=10.0.0.1")
            .unwrap()
            .chosen
            .unwrap();
        assert_eq!(chosen.gateway, Ipv4Addr::new(10, 0, 0, 1));
        for (words, says) in [
            (" address=10.9.9.2/24", "is not on 10.9.9.2/24's network"),
            (" address=192.168.1.2", "like 192.168.1.2/24"),
            (" address=192.168.1.2/31", "leaves no room"),
            (" gateway=192.168.1.2", "both the address and the gateway"),
            (" gateway=nope", "like 192.168.1.1"),
            (" please", "unknown word"),
        ] {
            let why = parse(words).unwrap_err();
            assert!(why.contains(says), "{words}: {why}");
        }
        let remote = PromoteOptions::parse(" address=192.168.1.2/24", None).unwrap_err();
        assert!(remote.contains("keeps its own address"), "{remote}");
    }

    #[tokio::test]
    async fn the_console_group_may_use_the_socket_and_a_missing_group_is_named() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let alone = tmp.path().join("root-only.sock");
        let _listener = bind_socket(&alone, None).await.unwrap();
        assert_eq!(std::fs::metadata(&alone).unwrap().mode() & 0o777, 0o600);
        // Our own group: allowed to any user, root or not.
        let gid = nix::unistd::getgid();
        let group = nix::unistd::Group::from_gid(gid).unwrap().unwrap().name;
        let shared = tmp.path().join("console.sock");
        let _listener = bind_socket(&shared, Some(&group)).await.unwrap();
        let meta = std::fs::metadata(&shared).unwrap();
        assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, gid.as_raw()));
        let err = bind_socket(&tmp.path().join("x.sock"), Some("no-such-lbs-group"))
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("does not exist"), "{err:#}");
    }
}
