//! The role-change steps (ask the data center, take or give up the address, start or stop
//! the PBX, register as backup), carried out one at a time; their outcome goes to the machine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use lbs_protocol::Message;
use lbs_protocol::control::{self};
use tokio_util::sync::CancellationToken;

use crate::activate::StatePaths;
use crate::role::{Action, Event, RoleState};

use crate::daemon::dc::{
    DC_DEADLINE, PROMOTION_DEADLINE, connect_at, connect_dc, dc_failed, dc_order,
};
use crate::daemon::state::{RETRY, Shared, lock, network};

/// Carries out role-change steps one at a time and feeds their outcome to the machine.
pub(crate) async fn execute_steps(
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
        if let Some(step) = action.step_name() {
            let error = outcome.as_ref().err().map(|err| format!("{err:#}"));
            remember_step(&shared, step, took as u64, error);
        }
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

/// Keeps a step's outcome among the latest, and writes them to their file off the step's
/// path (a restarted agent still reports what it did before; the next step does not wait
/// for the disk).
fn remember_step(shared: &Arc<Shared>, step: &str, took_ms: u64, error: Option<String>) {
    {
        let mut steps = lock(&shared.recent_steps);
        if steps.len() == crate::daemon::state::RECENT_STEPS {
            steps.pop_front();
        }
        steps.push_back(control::StepReport {
            at_ms: crate::daemon::state::now_ms(),
            step: step.to_owned(),
            took_ms,
            error: error.map(|e| control::detail_text(&e)),
        });
    }
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || {
        // One writer at a time, each writing the list as it is when its turn comes: the
        // file ends with the newest.
        static WRITING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _turn = lock(&WRITING);
        let json = serde_json::to_vec(&*lock(&shared.recent_steps));
        let path = shared.paths.recent_steps();
        match json {
            Ok(json) => {
                if let Err(err) = lbs_host::write_file_atomic(&path, &json, 0o644) {
                    tracing::warn!("keeping the role steps in {}: {err}", path.display());
                }
            }
            Err(err) => tracing::warn!("the role steps as JSON: {err}"),
        }
    });
}

#[derive(Debug)]
pub(crate) enum StepOutcome {
    Done(String),
    Promoted(lbs_protocol::Generation),
}

pub(crate) fn takeover_plan(
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
pub(crate) async fn hook(
    command: &Option<String>,
    key: &str,
    what: &str,
) -> anyhow::Result<StepOutcome> {
    let Some(command) = command.clone() else {
        return Ok(StepOutcome::Done(format!(
            "{what}: no {key} command configured, nothing run"
        )));
    };
    match crate::hook::run(&command, &[], &[], false, Duration::from_secs(60))
        .await
        .with_context(|| format!("cannot run `{command}`"))?
    {
        crate::hook::Ended::TimedOut => {
            bail!("`{command}` did not finish within 60 s; it was stopped with all it started")
        }
        crate::hook::Ended::Exited(status, _) if !status.success() => {
            bail!("`{command}` failed: {status}")
        }
        crate::hook::Ended::Exited(..) => {}
    }
    Ok(StepOutcome::Done(format!("{what}: `{command}`")))
}

/// Runs `pbx_start` outside a role change (`why`: what calls for it), recorded as a
/// `start-pbx` step like the role change's own, so that status and the portal see whether the
/// PBX started. Without a `pbx_start` there is nothing to run and nothing is recorded.
pub(crate) async fn start_pbx_again(shared: &Arc<Shared>, why: &str) {
    if shared.config().pbx_start.is_none() {
        return;
    }
    let started = std::time::Instant::now();
    let outcome = hook(&shared.config().pbx_start, "pbx_start", "start the PBX").await;
    let took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    match outcome {
        Ok(StepOutcome::Done(said)) => {
            tracing::info!("{why}: {said}");
            remember_step(shared, "start-pbx", took_ms, None);
        }
        Ok(_) => remember_step(shared, "start-pbx", took_ms, None),
        Err(err) => {
            tracing::error!("{why}, but the PBX did not start: {err:#}");
            remember_step(shared, "start-pbx", took_ms, Some(format!("{err:#}")));
        }
    }
}

/// Takes the shared address (`take`) or gives it back for this box's own, each step of
/// `lbs-netconfig`'s move passed on as progress.
pub(crate) async fn move_address(
    shared: &Shared,
    network: &crate::config::Network,
    take: bool,
) -> anyhow::Result<lbs_netconfig::TakeoverReport> {
    let (net, arp) = (&shared.lan.net, shared.lan.arp.clone());
    // P's checks probed already (and the operator may have forced it); a promotion granted
    // after it was given up on was confirmed by nobody: it takes only a free address.
    let force = !(take && lock(&shared.machine).record.abandoned.is_some());
    let plan = takeover_plan(network, force, &shared.paths);
    let progress = shared.progress.clone();
    let mut on_step = |step: &lbs_netconfig::StepReport| {
        let _ = progress.send(format!("  {step}"));
    };
    let report = if take {
        lbs_netconfig::take_over_observed(net, &arp, &plan, &mut on_step).await?
    } else {
        lbs_netconfig::give_up_observed(net, &arp, &plan, &mut on_step).await?
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

/// Asks the data center for the promotion, site after site: one that cannot be reached,
/// does not answer, or cannot reach the sites' shared authority (`Unavailable`) hands the
/// request to the next. The same request twice is safe: the data center answers a repeat
/// with the promotion it granted.
async fn ask_promotion(
    shared: &Shared,
    believed: lbs_protocol::Generation,
    advertised: std::net::Ipv4Addr,
    how: control::PromotionKind,
) -> anyhow::Result<(lbs_protocol::Generation, Message)> {
    let mut last = anyhow::anyhow!("the data center gave no control address");
    for (n, address) in dc_order(shared).into_iter().enumerate() {
        // An automatic promotion decided on facts that may have changed while a data center
        // did not answer (chaos seed 2806 run 43: the router's cable out, the primary booted
        // meanwhile, and the request went through 9 s later and fenced it): before asking
        // another, the shared address is probed again.
        if n > 0
            && how == control::PromotionKind::Automatic
            && let Some(network) = network(shared)
            && let Ok(lbs_netconfig::ProbeResult::InUse(mac)) =
                crate::daemon::checks::probe_shared(&shared.lan, &network).await
        {
            bail!(
                "{mac} answers for {} again: the primary is back; the automatic promotion is \
                 abandoned ({last:#})",
                network.shared.addr
            );
        }
        let (mut conn, version) = match connect_at(shared, address).await {
            Ok(connected) => connected,
            Err(err) => {
                dc_failed(shared, address);
                last = err.context(format!("data center at {address}"));
                continue;
            }
        };
        // A data center of 1.4 records how the promotion came about; one of 1.10 also checks,
        // as it decides, that the primary is still silent when the promotion rests on that.
        let quiet = matches!(
            how,
            control::PromotionKind::Automatic | control::PromotionKind::Operator
        );
        let request = if quiet && version >= control::QUIET_PROMOTION {
            let gone_after = shared.config().primary_gone_after;
            Message::PromoteIfQuiet {
                advertised,
                how,
                quiet_ms: u64::try_from(gone_after.as_millis()).unwrap_or(u64::MAX),
            }
        } else if version >= control::HAND_OVERS {
            Message::PromoteAs { advertised, how }
        } else {
            Message::Promote { advertised }
        };
        match control::call(&mut conn, believed, request, DC_DEADLINE).await {
            Err(control::CallError::Timeout { .. } | control::CallError::Closed(_)) => {
                dc_failed(shared, address);
                last = anyhow::anyhow!(
                    "the data center at {address} took the request but did not answer within {} s",
                    DC_DEADLINE.as_secs()
                );
            }
            Err(control::CallError::Denied(control::Denial::Unavailable(why))) => {
                dc_failed(shared, address);
                last = anyhow::anyhow!("the data center at {address} cannot decide now: {why}");
            }
            other => return Ok(other?),
        }
    }
    Err(last)
}

pub(crate) async fn run_step(shared: &Shared, action: &Action) -> anyhow::Result<StepOutcome> {
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
            let asked = tokio::time::timeout(
                PROMOTION_DEADLINE,
                ask_promotion(shared, *believed, advertised, how),
            )
            .await
            .unwrap_or_else(|_| {
                Err(anyhow::anyhow!(
                    "no answer from the data center within {} s",
                    PROMOTION_DEADLINE.as_secs()
                ))
            });
            let (_, answer) = match asked {
                Ok(answer) => answer,
                Err(err) if err.downcast_ref::<control::CallError>().is_some() => {
                    if let Some(control::CallError::Denied(control::Denial::PrimaryAlive {
                        silent_ms,
                        quiet_ms,
                    })) = err.downcast_ref()
                    {
                        *lock(&shared.primary_alive) =
                            Some(crate::control::Refusal::PrimaryAlive {
                                silent_ms: *silent_ms,
                                gone_after_ms: *quiet_ms,
                            });
                    }
                    return Err(err);
                }
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
