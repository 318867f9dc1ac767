use std::sync::Arc;
use std::time::{Duration, Instant};

use lbs_protocol::control::{self};
use tokio_util::sync::CancellationToken;

use crate::role::RoleState;

use crate::daemon::checks::promote_checks;
use crate::daemon::state::{Shared, lock, now_ms, promote_unattended};

/// Automatic failover (`auto_failover = true`): the backup promotes itself when it has not
/// heard the primary itself for `primary_gone_after_s` *and* the data center (reachable) has
/// not either — then the same checks as **P** (nobody answers ARP for the shared address
/// included) and the same steps. The data center's compare-and-set keeps it to one primary.
pub(crate) async fn auto_failover(shared: Arc<Shared>, shutdown: CancellationToken) {
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
