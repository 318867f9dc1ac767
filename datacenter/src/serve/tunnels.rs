//! This site's WireGuard endpoints: started with `serve`, their peers following the store's
//! activated boxes, and each pair kept to itself on the overlay (`crate::isolation`) before a
//! new box's peer is added.

use super::*;

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

pub(super) async fn peers_worker(inner: Arc<Inner>, shutdown: CancellationToken) {
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
