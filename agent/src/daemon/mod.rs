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

mod auto_failover;
mod checks;
mod control;
mod dc;
mod guard;
mod metrics;
mod pbx;
mod replication;
mod report;
mod resources;
mod role_notify;
mod state;
mod steps;
mod tunnels;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::activate::{BoxInfo, StatePaths};
use crate::config::AgentConfig;
use crate::resources::ResourceHistory;
use crate::role::{Event, RoleRecord, RoleState};

use crate::daemon::auto_failover::auto_failover;
use crate::daemon::checks::address_taken;
use crate::daemon::control::{bind_socket, reload, serve_socket};
use crate::daemon::pbx::pbx_health;
use crate::daemon::replication::replication;
use crate::daemon::report::report;
use crate::daemon::resources::sample_resources;
use crate::daemon::role_notify::notify_hook;
use crate::daemon::state::{Lan, Shared, lock, network, now_ms};
use crate::daemon::steps::execute_steps;
use crate::daemon::tunnels::tunnels;

pub use crate::control::DEFAULT_SOCKET;

/// A primary whose boot check found the shared address answered booted with its own; if
/// nobody answers for it now (the one that did was a stale old primary, gone at its first
/// report — chaos seed 2806 run 5), the carrier guard takes it back, after its probe, instead
/// of this box serving as a primary nobody reaches.
fn boot_changed_and_free(shared: &Shared) {
    let note = shared.paths.boot_changed();
    if lock(&shared.machine).record.state != RoleState::Primary || !note.exists() {
        return;
    }
    guard::withdraw(
        shared,
        "the boot check found the shared address answered and booted this box with its own; \
         nobody answers for it now: taken back after a probe"
            .into(),
    );
}

/// How long a primary coming back waits for the data center's word before it serves (the
/// ARP probe of the shared address runs meanwhile).
const START_ASK_DEADLINE: Duration = Duration::from_secs(1);

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

/// `lbs agent`.
pub async fn run(cmd: AgentCmd) -> anyhow::Result<ExitCode> {
    lbs_host::logging::init("lbs", "info");
    if let Err(err) = lbs_host::limits::raise_open_files() {
        tracing::warn!("cannot raise the open-files limit: {err}");
    }
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
    let socket = bind_socket(&cmd.socket, config.console_group.as_deref()).await?;
    let metrics_listener = match config.metrics_listen {
        Some(address) => Some(metrics::bind(address).await?),
        None => None,
    };
    let lan = Lan::kernel()?;
    let (shared, queues) = Shared::new(
        config,
        cmd.config.clone(),
        paths,
        record,
        info,
        resources,
        lan,
    );
    let shared = Arc::new(Shared {
        crash_after: cmd.crash_after.clone(),
        ..shared
    });
    // A primary coming back (power, cable, repair) first checks that nobody else answers for
    // the shared address, before it reports, replicates or serves on it: the partner may have
    // taken over meanwhile. It asks the data center at the same time (briefly: an unreachable
    // one must not keep the phones waiting), so that a box promoted over while it was away
    // steps back before its PBX starts, even where the new primary cannot answer ARP now.
    let (taken, word) = if lock(&shared.machine).record.state == RoleState::Primary {
        tokio::join!(
            address_taken(&shared),
            report::dc_word(&shared, START_ASK_DEADLINE)
        )
    } else {
        (None, report::DcWord::Silent)
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
    if let Some(listener) = metrics_listener {
        spawn(
            "the metrics endpoint",
            Box::pin(metrics::serve_metrics(
                shared.clone(),
                listener,
                shutdown.clone(),
            )),
        );
    }
    spawn(
        "the resource sampler",
        Box::pin(sample_resources(shared.clone(), shutdown.clone())),
    );
    spawn(
        "the role-change executor",
        Box::pin(execute_steps(
            shared.clone(),
            queues.steps,
            shutdown.clone(),
        )),
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
        Box::pin(notify_hook(
            shared.clone(),
            queues.notices,
            shutdown.clone(),
        )),
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
    // The data center's word asked alongside the probe serves again, unless it did not come
    // within that short deadline.
    let known = (word != report::DcWord::Silent).then_some(word);
    let taken = match taken {
        Some(by) => match guard::on_answer(&shared, by, known).await {
            guard::Answered::StepBack => Some(by),
            // Serving without the address until the stale partner steps back; the guard
            // takes it back then.
            guard::Answered::Wait => {
                if let Some(network) = network(&shared) {
                    guard::wait_for_stale_partner(&shared, by, network.shared.addr);
                }
                None
            }
            guard::Answered::KeepAndAlarm => {
                tracing::error!(
                    "{by} answers ARP for the shared address but is not the partner, and the \
                     data center does not say another box is primary: this box keeps serving; \
                     find the device with the duplicate address"
                );
                *lock(&shared.stranger) = Some((by, now_ms()));
                None
            }
        },
        None => None,
    };
    match (taken, word) {
        (Some(by), _) => shared.handle(Event::AddressTaken { by: by.to_string() }),
        (None, report::DcWord::Moved { role, generation }) => {
            tracing::warn!(
                "the data center records this box as {role} at generation {}: it steps back \
                 instead of serving as the primary it was",
                generation.0
            );
            shared.handle(Event::Authority { role, generation });
        }
        (None, _) => {
            boot_changed_and_free(&shared);
            let resume = lock(&shared.machine).resume();
            shared.act(resume);
        }
    }
    let _ = std::fs::remove_file(shared.paths.boot_changed());
    let (role, sid) = (lock(&shared.machine).record.clone(), lock(&shared.info).sid);
    println!("ready: {sid} {} at {}", role.state, role.generation);
    lbs_host::systemd::notify(&format!(
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
    let watchdog = lbs_host::systemd::watchdog_period().map(|period| period / 2);
    let mut ping = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    loop {
        tokio::select! {
            _ = ping.tick(), if watchdog.is_some() => {
                drop(lock(&shared.machine));
                lbs_host::systemd::notify("WATCHDOG=1");
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
    lbs_host::systemd::notify("STOPPING=1");
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

/// The file beside the control `socket` that says the agent waits for activation.
pub fn unactivated_note(socket: &Path) -> PathBuf {
    socket.with_file_name("unactivated")
}

/// An agent started on a box that is not activated yet (preinstalled, as shipped) waits for
/// `lbs activate`, then carries on; `None` if it was stopped first.
pub(crate) async fn wait_for_activation(
    paths: &StatePaths,
    note: &Path,
) -> anyhow::Result<Option<RoleRecord>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("watching SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("watching SIGINT")?;
    let mut said = false;
    let watchdog = lbs_host::systemd::watchdog_period().is_some();
    loop {
        if watchdog {
            // Waiting is this agent's work until activation: systemd must not restart it.
            lbs_host::systemd::notify("WATCHDOG=1");
        }
        let record = RoleRecord::load(&paths.role())?;
        if record.state != RoleState::Unactivated && paths.info().exists() {
            return Ok(Some(record));
        }
        if !said {
            println!("waiting: this box is not activated yet (run `lbs activate`)");
            if let Err(err) =
                lbs_host::write_file_atomic(note, b"waiting for lbs activate\n", 0o644)
            {
                tracing::warn!("writing {}: {err}", note.display());
            }
            // Ready as shipped: the unit is up and waits for activation; `systemctl start`
            // must not hang until its timeout on a preinstalled box.
            lbs_host::systemd::notify("READY=1\nSTATUS=waiting for lbs activate");
            said = true;
        }
        tokio::select! {
            _ = term.recv() => return Ok(None),
            _ = int.recv() => return Ok(None),
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}
