//! The tunnels of `vpn.toml`, when the data center named endpoints.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::daemon::state::{Shared, lock};

pub(crate) async fn tunnels(shared: Arc<Shared>, shutdown: CancellationToken) {
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
