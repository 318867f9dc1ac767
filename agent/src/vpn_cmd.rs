//! `lbs vpn`: the tunnels to the data centers (a box), an endpoint (a data center), keys and
//! status.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use lbs_vpn::config::{endpoint_from_file, endpoint_peers_from_file, tunnels_from_file};
use lbs_vpn::{Endpoint, Key, Tunnels, VpnStatus};
use tokio::signal::unix::{SignalKind, signal};

/// Where `lbs vpn run` keeps its status for `lbs vpn status` and `lbs status`.
pub const DEFAULT_STATUS_FILE: &str = "/run/lbs/vpn.json";

/// A status older than this means `lbs vpn run` is not running.
const STALE_AFTER: Duration = Duration::from_secs(5);

#[derive(Args, Debug)]
pub struct KeygenCmd {
    /// Where to write the private key (mode 0600). If it exists it is kept.
    pub path: PathBuf,
}

#[derive(Args, Debug)]
pub struct RunCmd {
    /// The box's VPN configuration (TOML; see `lbs_vpn::config`).
    #[arg(long, default_value = "/etc/lbs/vpn.toml")]
    pub config: PathBuf,
    /// Where to keep the tunnels' status (JSON, rewritten every second).
    #[arg(long, default_value = DEFAULT_STATUS_FILE)]
    pub status_file: PathBuf,
}

#[derive(Args, Debug)]
pub struct EndpointCmd {
    /// The endpoint's configuration (TOML); SIGHUP re-reads its peers.
    #[arg(long)]
    pub config: PathBuf,
}

#[derive(Args, Debug)]
pub struct StatusCmd {
    /// The status file `lbs vpn run` writes.
    #[arg(long, default_value = DEFAULT_STATUS_FILE)]
    pub status_file: PathBuf,
    /// Print the JSON as it is.
    #[arg(long)]
    pub json: bool,
}

/// Writes a new private key, or keeps the one there; prints the public key either way.
pub fn keygen(cmd: &KeygenCmd) -> anyhow::Result<ExitCode> {
    let key = if cmd.path.exists() {
        let key = lbs_vpn::config::read_private_key(Path::new("."), &cmd.path)?;
        eprintln!("{} exists: keeping it", cmd.path.display());
        key
    } else {
        let key = Key::generate_private();
        lbs_host::write_file_atomic(
            &cmd.path,
            format!("{}\n", key.to_base64()).as_bytes(),
            0o600,
        )
        .with_context(|| format!("writing {}", cmd.path.display()))?;
        key
    };
    println!("{}", key.get_public().to_base64());
    Ok(ExitCode::SUCCESS)
}

/// Logs of the VPN (route moves, stale state removed) on standard error.
/// Writes the status file; says so on standard error when that starts or stops failing
/// (a full disk), not every second.
fn write_status(path: &Path, status: &VpnStatus, failing: &mut bool) {
    let result = (|| {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let json = serde_json::to_vec_pretty(status).map_err(std::io::Error::other)?;
        lbs_host::write_file_atomic(path, &json, 0o644)
    })();
    match result {
        Err(err) if !*failing => {
            eprintln!("cannot write the status file {}: {err}", path.display());
            *failing = true;
        }
        Ok(()) if *failing => {
            eprintln!("the status file {} is written again", path.display());
            *failing = false;
        }
        _ => {}
    }
}

/// Brings the tunnels up and keeps them until SIGTERM or Ctrl-C; then removes them.
pub async fn run(cmd: RunCmd) -> anyhow::Result<ExitCode> {
    lbs_host::logging::init("lbs", "warn,lbs_vpn=info");
    let config = tunnels_from_file(&cmd.config)?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let tunnels = Tunnels::start(config.clone())
        .await
        .context("bringing the tunnels up")?;
    let status = tunnels.status();
    let names: Vec<String> = status
        .tunnels
        .iter()
        .map(|t| format!("{} via {} to {}", t.name, t.interface, t.endpoint))
        .collect();
    println!(
        "ready: {} tunnels ({} WireGuard) from {}: {}",
        names.len(),
        status.backend,
        status.address,
        names.join(", ")
    );
    let mut failing = false;
    write_status(&cmd.status_file, &status, &mut failing);
    let mut watch = tunnels.watch();
    let mut last_change = status.last_change.clone();
    let mut written = std::time::Instant::now();
    loop {
        tokio::select! {
                _ = sigterm.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
                changed = watch.changed() => {
                    if changed.is_err() {
                        eprintln!("the tunnel supervisor stopped");
                        break;
                    }
                    let status = watch.borrow_and_update().clone();
                    let moved = status.last_change != last_change;
                    if moved && let Some(change) = &status.last_change {
                        println!("route: overlay via {} ({}) at {}", change.to, change.reason, change.at_unix_ms);
                    }
                    if moved || written.elapsed() >= Duration::from_secs(1) {
                        let mut failing = false;
        write_status(&cmd.status_file, &status, &mut failing);
                        written = std::time::Instant::now();
                    }
                    last_change = status.last_change;
                }
            }
    }
    println!("stopping: removing the tunnels");
    let result = tunnels.shutdown().await;
    let _ = std::fs::remove_file(&cmd.status_file);
    result.context("removing the tunnels")?;
    println!("stopped: tunnels, routes and control sockets removed");
    Ok(ExitCode::SUCCESS)
}

/// Runs a data-center endpoint until SIGTERM or Ctrl-C; SIGHUP re-reads the peers.
pub async fn endpoint(cmd: EndpointCmd) -> anyhow::Result<ExitCode> {
    lbs_host::logging::init("lbs", "warn,lbs_vpn=info");
    let (config, peers) = endpoint_from_file(&cmd.config)?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let port = config.listen_port;
    let endpoint = Endpoint::start(config)
        .await
        .context("starting the endpoint")?;
    let changes = endpoint.set_peers(&peers).context("adding the peers")?;
    println!(
        "ready: endpoint {} ({} WireGuard) on port {port}, {} peers",
        endpoint.interface(),
        endpoint.backend(),
        changes.added
    );
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = sighup.recv() => {
                let applied = endpoint_peers_from_file(&cmd.config)
                    .map_err(anyhow::Error::from)
                    .and_then(|peers| Ok(endpoint.set_peers(&peers)?));
                match applied {
                    Ok(c) => println!("reloaded: {} added, {} removed, {} kept", c.added, c.removed, c.kept),
                    Err(err) => eprintln!("reload failed, peers as before where not applied: {err:#}"),
                }
            }
        }
    }
    endpoint.shutdown().await.context("removing the endpoint")?;
    println!("stopped: endpoint removed");
    Ok(ExitCode::SUCCESS)
}

fn ms(value: Option<u64>) -> String {
    value.map_or("never".into(), |ms| {
        format!("{:.1} s ago", ms as f64 / 1000.0)
    })
}

/// Prints the tunnels' state; exit 3 when no tunnel is healthy or the status is stale.
pub fn status(cmd: &StatusCmd) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&cmd.status_file).with_context(|| {
        format!(
            "reading {} (is `lbs vpn run` running?)",
            cmd.status_file.display()
        )
    })?;
    let status: VpnStatus = serde_json::from_str(&text)
        .with_context(|| format!("reading {}", cmd.status_file.display()))?;
    if cmd.json {
        println!("{text}");
    } else {
        println!(
            "overlay address {} ({} WireGuard), traffic via {}, {} failovers",
            status.address,
            status.backend,
            status.active.as_deref().unwrap_or("nothing yet"),
            status.failovers
        );
        for t in &status.tunnels {
            println!(
                "  {:<8} {:<10} {:<9} {}  rtt {}  last answer {}  handshake {}  resets {}",
                t.name,
                t.interface,
                format!("{:?}", t.health).to_lowercase(),
                if t.active { "active" } else { "      " },
                t.last_rtt_ms.map_or("-".into(), |r| format!("{r:.1} ms")),
                ms(t.since_last_good_ms),
                t.handshake_age_s
                    .map_or("never".into(), |s| format!("{s} s ago")),
                t.resets
            );
        }
        if let Some(change) = &status.last_change {
            println!("  last route change: to {} ({})", change.to, change.reason);
        }
    }
    let age = lbs_vpn::tunnels::unix_ms().saturating_sub(status.updated_unix_ms);
    if Duration::from_millis(age) > STALE_AFTER {
        eprintln!(
            "this status is {:.0} s old: `lbs vpn run` is not running",
            age as f64 / 1000.0
        );
        return Ok(ExitCode::from(3));
    }
    let healthy = status
        .tunnels
        .iter()
        .any(|t| t.health == lbs_vpn::Health::Up);
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}
