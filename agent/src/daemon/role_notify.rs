//! The `notify` hook: every role change (and a PBX declared down) told to the operator's
//! command, in order, each within its deadline.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::daemon::state::{RoleNotice, Shared};

/// How long the `notify` hook may run.
const NOTIFY_DEADLINE: Duration = Duration::from_secs(30);

/// Runs `notify` for each role change, in order, each within its deadline (killed after it);
/// its failure is logged, never in the way of the change itself.
pub(crate) async fn notify_hook(
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
        let script = format!("{command} \"$@\"");
        let args = ["lbs-notify", &role, &generation, &notice.reason];
        let env = [
            ("LBS_ROLE", role.as_str()),
            ("LBS_GENERATION", generation.as_str()),
            ("LBS_REASON", notice.reason.as_str()),
        ];
        let run = crate::hook::run(&script, &args, &env, false, NOTIFY_DEADLINE);
        let outcome = tokio::select! {
            () = shutdown.cancelled() => return,
            outcome = run => outcome,
        };
        match outcome {
            Ok(crate::hook::Ended::Exited(status, _)) if status.success() => {
                tracing::info!("notify `{command}` {role} {generation}: done");
            }
            Ok(crate::hook::Ended::Exited(status, _)) => {
                tracing::warn!("notify `{command}` {role} {generation}: {status}")
            }
            Err(err) => tracing::warn!("notify `{command}`: cannot run it: {err}"),
            Ok(crate::hook::Ended::TimedOut) => tracing::warn!(
                "notify `{command}` {role} {generation}: still running after {} s; stopped with all it started",
                NOTIFY_DEADLINE.as_secs()
            ),
        }
    }
}
