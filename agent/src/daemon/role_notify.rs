//! The `notify` hook: every role change (and a PBX declared down) told to the operator's
//! command, in order, each within its deadline.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::role::Event;

/// A role change for the `notify` hook.
#[derive(Clone, Debug)]
pub(super) struct RoleNotice {
    /// `primary`, `backup`, `fenced`, `promoting`, `demoting`, or `pbx-down`.
    pub(super) role: String,
    /// The generation this box knows of.
    pub(super) generation: lbs_protocol::Generation,
    /// Why, for a person.
    pub(super) reason: String,
}

/// What made the role change, for the `notify` hook when the machine said nothing itself.
pub(super) fn event_reason(event: &Event) -> String {
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

/// How long the `notify` hook may run.
const NOTIFY_DEADLINE: Duration = Duration::from_secs(30);

/// Runs `notify` for each role change, in order, each within its deadline (killed after it);
/// its failure is logged, never in the way of the change itself.
pub(super) async fn notify_hook(
    shared: Arc<Shared>,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<RoleNotice>,
    shutdown: CancellationToken,
) {
    loop {
        let notice = tokio::select! {
            () = shutdown.cancelled() => return,
            next = queue.recv() => match next {
                Some(notice) => notice,
                None => return shutdown.cancelled().await,
            },
        };
        let Some(command) = shared.config().notify.clone() else {
            continue;
        };
        let role = notice.role;
        let generation = notice.generation.0.to_string();
        let run = tokio::process::Command::new("sh")
            .args(["-c", &format!("{command} \"$@\""), "lbs-notify"])
            .args([&role, &generation, &notice.reason])
            .env("LBS_ROLE", &role)
            .env("LBS_GENERATION", &generation)
            .env("LBS_REASON", &notice.reason)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .status();
        let outcome = tokio::select! {
            () = shutdown.cancelled() => return,
            outcome = tokio::time::timeout(NOTIFY_DEADLINE, run) => outcome,
        };
        match outcome {
            Ok(Ok(status)) if status.success() => {
                tracing::info!("notify `{command}` {role} {generation}: done");
            }
            Ok(Ok(status)) => tracing::warn!("notify `{command}` {role} {generation}: {status}"),
            Ok(Err(err)) => tracing::warn!("notify `{command}`: cannot run it: {err}"),
            Err(_) => tracing::warn!(
                "notify `{command}` {role} {generation}: still running after {} s; stopped",
                NOTIFY_DEADLINE.as_secs()
            ),
        }
    }
}
