//! The state every task of the agent shares: the role cell (machine, record on disk, the
//! actions it asks for) and what the tasks last found, each behind its own lock.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lbs_protocol::control::{self};
use lbs_protocol::{PROTOCOL_VERSION, SoftwareVersion};
use tokio::sync::{broadcast, watch};

use crate::activate::{BoxInfo, StatePaths};
use crate::config::{ASTDB_SET, AgentConfig, SyncSet, with_choice};
use crate::resources::ResourceHistory;
use crate::role::{Action, Event, PromoteStep, RoleMachine, RoleRecord, RoleState};
use crate::status::{Replication, SetState};

use crate::status::{
    AgentStatus, DataCenterStatus, NetworkView, Notes, PbxHealth, SetStatus, Withdrawn,
};

/// How long to wait between attempts to reach the data center or the partner.
pub(crate) const RETRY: Duration = Duration::from_secs(2);
/// How often the backup checks on the primary over the watch connection.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(1);

pub(crate) fn now_ms() -> u64 {
    lbs_vpn::tunnels::unix_ms()
}

/// What replication should be doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Serve,
    Pull,
    Stopped,
}

/// What every task shares.
pub(crate) struct Shared {
    /// The configuration in force; SIGHUP swaps in what can change without a restart.
    pub(crate) config: std::sync::RwLock<Arc<AgentConfig>>,
    /// Where it is read from.
    pub(crate) config_path: PathBuf,
    pub(crate) paths: StatePaths,
    pub(crate) machine: Mutex<RoleMachine>,
    pub(crate) info: Mutex<BoxInfo>,
    pub(crate) sets: Mutex<Vec<SetStatus>>,
    pub(crate) datacenter: Mutex<DataCenterStatus>,
    pub(crate) tunnels: Mutex<(Option<lbs_vpn::VpnStatus>, Option<String>)>,
    pub(crate) resources: Mutex<ResourceHistory>,
    pub(crate) mode: watch::Sender<Mode>,
    /// Role-change steps, carried out one at a time by the executor.
    pub(crate) steps: tokio::sync::mpsc::UnboundedSender<Action>,
    /// What the role change is doing, line by line, for `lbs promote` to show.
    pub(crate) progress: broadcast::Sender<String>,
    /// Crash tests: the step after which the agent kills itself.
    pub(crate) crash_after: Option<String>,
    /// When this backup last heard the primary itself (a heartbeat on the watch connection).
    pub(crate) partner_heard_ms: Mutex<Option<u64>>,
    /// What automatic failover last decided, for `lbs status`.
    pub(crate) auto_failover: Mutex<Option<String>>,
    /// The last promotion request from the data center this box acted on.
    pub(crate) remote_handled: Mutex<Option<u64>>,
    /// The data-center site that failed this box last (down, or cut off from the sites'
    /// shared authority): tried last until another fails.
    pub(crate) dc_failed: Mutex<Option<std::net::SocketAddr>>,
    /// The slow re-announcement of the address this box last moved to (stops when replaced
    /// or dropped).
    pub(crate) refresh: Mutex<Option<lbs_netconfig::Refresh>>,
    /// Set while the primary keeps the shared address off a link without carrier.
    pub(crate) withdrawn: Mutex<Option<Withdrawn>>,
    /// A device that is not the partner answering for the shared address, and when it was
    /// last seen doing so (the primary keeps the address and raises the alarm).
    pub(crate) stranger: Mutex<Option<(lbs_netconfig::MacAddr, u64)>>,
    /// The primary's PBX as its health check last found it.
    pub(crate) pbx: Mutex<Option<PbxHealth>>,
    /// How the promotion under way came about, for the data center's audit log (after a
    /// restart in the middle of one: `Operator`).
    pub(crate) promotion_kind: Mutex<control::PromotionKind>,
    /// The data center's last refusal of a promotion because it heard the primary lately, as
    /// the console tells it (with how long to wait); cleared as P asks again.
    pub(crate) primary_alive: Mutex<Option<crate::control::Refusal>>,
    /// Role changes for the `notify` hook, run one at a time by their own task.
    pub(crate) notices: tokio::sync::mpsc::UnboundedSender<RoleNotice>,
    /// Counts this box's moves between addresses: connections made from the old one are
    /// dead (their replies go to the other box), so they are made again at once.
    pub(crate) moved: watch::Sender<u64>,
    /// The office LAN: the kernel's, or a fake in tests.
    pub(crate) lan: Lan,
    /// The latest role steps carried out, oldest first (kept in `steps.json` across
    /// restarts; reported to the data center's portal).
    pub(crate) recent_steps: Mutex<std::collections::VecDeque<control::StepReport>>,
}

/// What the executor and the notify hook take from [`Shared`]'s senders.
#[derive(Debug)]
pub(crate) struct Queues {
    pub(crate) steps: tokio::sync::mpsc::UnboundedReceiver<Action>,
    pub(crate) notices: tokio::sync::mpsc::UnboundedReceiver<RoleNotice>,
}

/// The office LAN as the daemon reaches it: links, addresses and routes, and ARP.
#[derive(Clone, Debug)]
pub(crate) struct Lan {
    pub(crate) net: lbs_netconfig::AnyNet,
    pub(crate) arp: lbs_netconfig::AnyArp,
}

impl Lan {
    /// The kernel's (netlink, packet sockets: root).
    pub(crate) fn kernel() -> anyhow::Result<Lan> {
        Ok(Lan {
            net: lbs_netconfig::AnyNet::new(lbs_netconfig::Netlink::open()?),
            arp: lbs_netconfig::AnyArp::new(lbs_netconfig::PacketArp::new(
                lbs_netconfig::ProbeProfile::FAST,
            )),
        })
    }
}

/// How long the data center has not heard the partner, as of now: what it said at its last
/// answer plus the time since — at most one report interval of it. Past that its next answer
/// is overdue: the partner may have reported meanwhile, and a box cut off from the data center
/// must not count its own isolation as the partner's silence (chaos seed 2800 run 3: a backup
/// with its cable out counted 2.4 s of it and promoted itself over a live primary).
pub(crate) fn partner_silent_ms(shared: &Shared) -> Option<u64> {
    let silent = lock(&shared.info).partner.as_ref()?.silent_ms?;
    let answered = lock(&shared.datacenter).last_answer_ms?;
    let interval = u64::try_from(shared.config().report_interval.as_millis()).unwrap_or(u64::MAX);
    Some(partner_silent_as_of(silent, answered, now_ms(), interval))
}

/// [`partner_silent_ms`]'s rule: `silent` as the data center said it at `answered`, carried
/// forward to `now` by at most `interval`.
pub(crate) fn partner_silent_as_of(silent: u64, answered: u64, now: u64, interval: u64) -> u64 {
    silent.saturating_add(now.saturating_sub(answered).min(interval))
}

/// How many role steps a box keeps for its reports.
pub(crate) const RECENT_STEPS: usize = control::MAX_DETAIL_STEPS;

/// The role steps kept in `path`; none when there is no file or it cannot be read (said).
pub(crate) fn load_recent(
    path: &std::path::Path,
) -> std::collections::VecDeque<control::StepReport> {
    match std::fs::read(path) {
        Ok(bytes) => {
            match serde_json::from_slice::<std::collections::VecDeque<control::StepReport>>(&bytes)
            {
                Ok(mut steps) => {
                    while steps.len() > RECENT_STEPS {
                        steps.pop_front();
                    }
                    steps
                }
                Err(err) => {
                    tracing::warn!(
                        "{} is not a list of steps ({err}); starting a new one",
                        path.display()
                    );
                    std::collections::VecDeque::new()
                }
            }
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => std::collections::VecDeque::new(),
        Err(err) => {
            tracing::warn!(
                "reading {}: {err}; starting a new list of steps",
                path.display()
            );
            std::collections::VecDeque::new()
        }
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// The shared state of an agent starting with `record`, every set waiting for the partner.
    pub(crate) fn new(
        config: AgentConfig,
        config_path: PathBuf,
        paths: StatePaths,
        record: RoleRecord,
        info: BoxInfo,
        resources: ResourceHistory,
        lan: Lan,
    ) -> (Shared, Queues) {
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
                state: SetState::Waiting,
                ..SetStatus::default()
            })
            .collect();
        let recent = load_recent(&paths.recent_steps());
        let (steps, step_queue) = tokio::sync::mpsc::unbounded_channel();
        let (notices, notice_queue) = tokio::sync::mpsc::unbounded_channel();
        let shared = Shared {
            config: std::sync::RwLock::new(Arc::new(config)),
            config_path,
            paths,
            machine: Mutex::new(RoleMachine::new(record)),
            info: Mutex::new(info),
            sets: Mutex::new(sets),
            datacenter: Mutex::new(DataCenterStatus::default()),
            tunnels: Mutex::new((None, None)),
            resources: Mutex::new(resources),
            mode: watch::channel(Mode::Stopped).0,
            steps,
            progress: broadcast::channel(256).0,
            crash_after: None,
            partner_heard_ms: Mutex::new(None),
            auto_failover: Mutex::new(None),
            remote_handled: Mutex::new(None),
            dc_failed: Mutex::new(None),
            refresh: Mutex::new(None),
            withdrawn: Mutex::new(None),
            stranger: Mutex::new(None),
            moved: watch::channel(0).0,
            notices,
            pbx: Mutex::new(None),
            promotion_kind: Mutex::new(control::PromotionKind::Operator),
            primary_alive: Mutex::new(None),
            lan,
            recent_steps: Mutex::new(recent),
        };
        (
            shared,
            Queues {
                steps: step_queue,
                notices: notice_queue,
            },
        )
    }

    pub(crate) fn config(&self) -> Arc<AgentConfig> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn status(&self) -> AgentStatus {
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
        let stranger = *lock(&self.stranger);
        let pbx = lock(&self.pbx).clone();
        let recent_steps: Vec<control::StepReport> =
            lock(&self.recent_steps).iter().cloned().collect();
        let now = now_ms();
        let health = crate::health::judge(&crate::health::Facts {
            now_ms: now,
            state: role.state,
            sets: sets
                .iter()
                .map(|s| (s.name.as_str(), s.state, s.changed_since_ms))
                .collect(),
            datacenter_answered_ms: datacenter.last_answer_ms,
            partner_silent_ms: info.partner.as_ref().and_then(|p| p.silent_ms),
            has_partner: info.partner.is_some(),
            primary_heard_ms,
            withdrawn: address_withdrawn.is_some(),
            stranger: stranger.map(|(mac, at)| (mac.to_string(), at)),
            pbx_down: pbx
                .as_ref()
                .filter(|p| !p.ok)
                .map(|p| (p.failures, p.restarts, p.down)),
            pbx_start_failed: crate::health::pbx_start_failed(&recent_steps),
            silent_after_ms: 3 * u64::try_from(self.config().report_interval.as_millis())
                .unwrap_or(u64::MAX),
        });
        AgentStatus {
            health,
            pbx,
            recent_steps,
            info,
            role,
            replication: match *self.mode.borrow() {
                Mode::Serve => Replication::Serving,
                Mode::Pull => Replication::Pulling,
                Mode::Stopped => Replication::Stopped,
            },
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

    pub(crate) fn set_status(&self, name: &str, update: impl FnOnce(&mut SetStatus)) {
        if let Some(set) = lock(&self.sets).iter_mut().find(|s| s.name == name) {
            update(set);
        }
    }

    /// All sets, the astdb copy last.
    pub(crate) fn all_sets(&self, astdb_root: &Path) -> Vec<SyncSet> {
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
    pub(crate) fn act(&self, actions: Vec<Action>) {
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
                        set.state = SetState::Stopped;
                        set.pass_started_ms = None;
                    }
                }
                step => {
                    let _ = self.steps.send(step);
                }
            }
        }
    }

    pub(crate) fn handle(&self, event: Event) {
        let _ = self.apply(event);
    }

    /// Applies `event`; `Err` with the reason when the machine refused it (or the change
    /// could not be recorded), nothing changed then.
    pub(crate) fn apply(&self, event: Event) -> Result<(), String> {
        let reason = event_reason(&event);
        let (actions, record, before) = {
            let mut machine = lock(&self.machine);
            let before = machine.record.clone();
            match machine.handle(event, now_ms()) {
                Ok(actions) => {
                    if machine.record != before
                        && let Err(err) =
                            off_the_runtime(|| machine.record.save(&self.paths.role()))
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

/// Runs `blocking` (a write and fsync) without stalling the other tasks of this runtime
/// thread: on the agent's multi-thread runtime they move to another worker meanwhile. The role
/// record is saved this way, still under the machine's lock, because a transition must be on
/// disk before anyone sees or acts on it.
fn off_the_runtime<T>(blocking: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(blocking)
        }
        _ => blocking(),
    }
}

/// The office network of `[network]`, with the address the operator chose at **P** instead
/// of the configured one.
pub(crate) fn network(shared: &Shared) -> Option<crate::config::Network> {
    let chosen = lock(&shared.machine).record.shared;
    with_choice(shared.config().network.clone(), chosen)
}

/// Where this box serves now: the shared address while it is primary (with a `[network]`
/// section), its own otherwise.
pub(crate) fn current_address(shared: &Shared) -> Ipv4Addr {
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

/// A promotion nobody at the console confirms (automatic, or asked by the data center): the
/// reason and what the checks found go to the log, then the same steps as **P**.
pub(crate) fn promote_unattended(shared: &Shared, why: &str, checks: &[crate::control::Check]) {
    tracing::warn!("{why}");
    for line in checks {
        tracing::warn!("  {line}");
    }
    shared.handle(Event::PromoteRequested(None));
}

/// A role change for the `notify` hook.
#[derive(Clone, Debug)]
pub(crate) struct RoleNotice {
    /// `primary`, `backup`, `fenced`, `promoting`, `demoting`, or `pbx-down`.
    pub(super) role: String,
    /// The generation this box knows of.
    pub(super) generation: lbs_protocol::Generation,
    /// Why, for a person.
    pub(super) reason: String,
}

/// What made the role change, for the `notify` hook when the machine said nothing itself.
pub(crate) fn event_reason(event: &Event) -> String {
    match event {
        Event::Activated { .. } => "activated by the data center".into(),
        Event::PromoteRequested(_) => "P".into(),
        Event::PromoteOffline(_) => "P --offline".into(),
        Event::DemoteRequested => "B".into(),
        Event::Promoted(generation) => format!("the data center granted {generation}"),
        Event::Authority { role, generation } => {
            format!("the data center says {role} at {generation}")
        }
        Event::AddressTaken { by } => format!("{by} answers for the shared address"),
        Event::StepDone => "the step before it was done".into(),
        Event::StepFailed(why) => why.clone(),
    }
}
