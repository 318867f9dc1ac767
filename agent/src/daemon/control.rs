//! The control socket: `lbs status`, `lbs promote`, `lbs demote`, `lbs reload` and the console
//! ask here, one request per connection.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use lbs_protocol::control::{self};
use lbs_protocol::listen::{Serving, serve_until};
use tokio::net::UnixListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::role::{Event, RoleRecord, RoleState, SharedAddress};

use crate::control::{Change, ControlReply, ControlRequest, MAX_REQUEST, PromoteRequest, Refusal};
use crate::daemon::checks::{Asked, promote_checks};
use crate::daemon::state::{Shared, lock, network};
use crate::status::{SetState, SetStatus};

/// SIGHUP or `lbs reload`: reads the configuration again; what can change at once does, the rest is named
/// (it waits for a restart); a file that does not parse changes nothing.
pub(crate) fn reload(shared: &Shared) -> Result<String, String> {
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

/// Binds the control socket (owner only), refusing when another agent answers on it.
pub(crate) async fn bind_socket(path: &Path, group: Option<&str>) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        // Only an agent that answers counts: a socket nobody listens on is stale, and one
        // whose holder does not answer as an agent within 2 s (a process that inherited it
        // from an agent killed a moment ago, say) must not keep this agent from starting.
        match crate::control::ask_status(path, Duration::from_secs(2)).await {
            Ok(other) => bail!(
                "another lbs agent answers on {} ({} {}); stop it first",
                path.display(),
                other.info.sid,
                other.role.state
            ),
            Err(err) => {
                // Refused: nobody listens (the usual stale file after a crash), said nowhere.
                let refused = err.chain().any(|cause| {
                    cause
                        .downcast_ref::<std::io::Error>()
                        .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
                });
                if !refused {
                    tracing::warn!(
                        "{} is held but not answered by an agent ({err:#}); taking it over",
                        path.display()
                    );
                }
            }
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

pub(crate) async fn serve_socket(
    shared: Arc<Shared>,
    listener: UnixListener,
    shutdown: CancellationToken,
) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
    // Root and the console group only, but a stuck script must not exhaust the agent.
    let serving = Serving::new("the control socket", MAX_CLIENTS, Duration::ZERO);
    serve_until(listener, shutdown, serving, |stream, _, _local| {
        let shared = shared.clone();
        async move {
            let (read, write) = stream.into_split();
            let mut out = Replies(write);
            let mut line = String::new();
            let read = tokio::time::timeout(
                Duration::from_secs(5),
                BufReader::new(read.take(MAX_REQUEST)).read_line(&mut line),
            )
            .await;
            if !matches!(read, Ok(Ok(n)) if n > 0) {
                return;
            }
            let request: ControlRequest = match serde_json::from_str(line.trim()) {
                Ok(request) => request,
                Err(err) => {
                    let why = format!("not a control request ({err}); lbs and its agent may be of different versions");
                    out.send(&ControlReply::Refused(Refusal::BadRequest { why })).await;
                    return;
                }
            };
            match request {
                ControlRequest::Status => {
                    out.send(&ControlReply::Status(Box::new(shared.status()))).await;
                }
                ControlRequest::Promote(asked) => {
                    match PromoteOptions::resolve(&asked, shared.config().network.as_ref()) {
                        Ok(options) => {
                            promote_request(&shared, &mut out, options, asked.check_only).await;
                        }
                        Err(why) => {
                            out.send(&ControlReply::Refused(Refusal::BadRequest { why })).await;
                        }
                    }
                }
                ControlRequest::Demote { check_only } => {
                    demote_request(&shared, &mut out, check_only).await;
                }
                ControlRequest::Reload => {
                    let reply = match reload(&shared) {
                        Ok(text) => ControlReply::Done { text, after_s: None },
                        Err(why) => ControlReply::Refused(Refusal::Config { why }),
                    };
                    out.send(&reply).await;
                }
            }
        }
    })
    .await;
}

/// How many clients the control socket serves at once.
const MAX_CLIENTS: usize = 32;

/// The answer to one client, a JSON line per reply (it may have gone: then nobody reads).
pub(crate) struct Replies(tokio::net::unix::OwnedWriteHalf);

impl Replies {
    /// Sends `reply`; false when the client has gone.
    pub(crate) async fn send(&mut self, reply: &ControlReply) -> bool {
        use tokio::io::AsyncWriteExt;
        let Ok(mut line) = serde_json::to_string(reply) else {
            return false;
        };
        line.push('\n');
        // A client that stops reading is given up on rather than waited for.
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.0.write_all(line.as_bytes())).await,
            Ok(Ok(()))
        )
    }

    /// A step of the role change, `started` ago.
    async fn step(&mut self, started: Instant, text: String) -> bool {
        self.send(&ControlReply::Step {
            at_s: started.elapsed().as_secs_f64(),
            text,
        })
        .await
    }
}

/// Passes on the progress lines already sent (the steps report before the state changes).
async fn drain(progress: &mut broadcast::Receiver<String>, out: &mut Replies, started: Instant) {
    while let Ok(line) = progress.try_recv() {
        out.step(started, line).await;
    }
}

/// P as the agent carries it out: the request's options, the operator's address resolved
/// against `[network]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PromoteOptions {
    pub(crate) asked: Asked,
    /// The operator saw the checks (promote-check): they run again but are not repeated.
    pub(crate) checked: bool,
    pub(crate) chosen: Option<SharedAddress>,
}

impl PromoteOptions {
    /// Checks the operator's address and gateway against the configured network (either may
    /// be left to it): on that network, room for a gateway, and not the gateway itself.
    pub(crate) fn resolve(
        request: &PromoteRequest,
        network: Option<&crate::config::Network>,
    ) -> Result<PromoteOptions, String> {
        let mut options = PromoteOptions {
            asked: Asked {
                force: request.force,
                offline: request.offline,
            },
            checked: request.checked,
            chosen: None,
        };
        if request.address.is_none() && request.gateway.is_none() {
            return Ok(options);
        }
        let Some(network) = network else {
            return Err(
                "this box has no [network] section: it keeps its own address on promotion".into(),
            );
        };
        let (address, prefix) = request
            .address
            .unwrap_or((network.shared.addr, network.shared.prefix));
        let gateway = request.gateway.unwrap_or(network.gateway);
        if prefix == 0 || prefix > 30 {
            return Err(format!(
                "/{prefix} leaves no room for a gateway; an office LAN is /8 to /30"
            ));
        }
        let mask = u32::MAX << (32 - u32::from(prefix));
        if u32::from(address) & mask != u32::from(gateway) & mask {
            return Err(format!(
                "the gateway {gateway} is not on {address}/{prefix}'s network"
            ));
        }
        if gateway == address {
            return Err(format!(
                "{gateway} cannot be both the address and the gateway"
            ));
        }
        options.chosen = Some(SharedAddress {
            address,
            prefix,
            gateway,
        });
        Ok(options)
    }
}

/// `promote` (`check_only`: its checks alone), with its steps as they happen.
async fn promote_request(
    shared: &Arc<Shared>,
    out: &mut Replies,
    options: PromoteOptions,
    check_only: bool,
) {
    let checks = match promote_checks(shared, options.asked, options.chosen).await {
        Ok(checks) => checks,
        Err(refusal) => {
            out.send(&ControlReply::Refused(refusal)).await;
            return;
        }
    };
    if !options.checked || check_only {
        for check in checks {
            out.send(&ControlReply::Check(check)).await;
        }
    }
    if check_only {
        out.send(&ControlReply::Ready(Change::Promotion)).await;
        return;
    }
    *lock(&shared.primary_alive) = None;
    *lock(&shared.promotion_kind) = if options.asked.force {
        control::PromotionKind::Forced
    } else {
        control::PromotionKind::Operator
    };
    follow(
        shared,
        out,
        if options.asked.offline {
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
            // Refused: told as the data center said it, when it did so in a way the console
            // knows (the primary alive: how long to wait), else in its words.
            RoleState::Backup => Some(Err(lock(&shared.primary_alive).clone().unwrap_or_else(
                || Refusal::RoleChange {
                    why: record
                        .last_error
                        .clone()
                        .unwrap_or_else(|| "refused".to_owned()),
                },
            ))),
            _ => None,
        },
    )
    .await;
}

/// Applies `event`, passes on the role change's progress as it comes, and ends with a refusal,
/// or done (`more_follows`: a step, the caller goes on) once `finished` says the record
/// reached an end.
async fn follow(
    shared: &Arc<Shared>,
    out: &mut Replies,
    event: Event,
    more_follows: bool,
    finished: impl Fn(&RoleRecord) -> Option<Result<String, Refusal>>,
) {
    let started = Instant::now();
    let mut progress = shared.progress.subscribe();
    if let Err(why) = shared.apply(event) {
        // Another console's P (or B) got there first, or the state moved since the checks.
        out.send(&ControlReply::Refused(Refusal::RoleChange { why }))
            .await;
        return;
    }
    loop {
        let record = lock(&shared.machine).record.clone();
        if let Some(outcome) = finished(&record) {
            drain(&mut progress, out, started).await;
            let took = started.elapsed().as_secs_f64();
            let reply = match outcome {
                Ok(text) if more_follows => ControlReply::Step { at_s: took, text },
                Ok(text) => ControlReply::Done {
                    text,
                    after_s: Some(took),
                },
                Err(refusal) => ControlReply::Refused(refusal),
            };
            out.send(&reply).await;
            return;
        }
        tokio::select! {
            line = progress.recv() => match line {
                Ok(line) => {
                    out.step(started, line).await;
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// **B** on a fenced box — what it will do (and the operator's note), then (unless only
/// checking) stop the PBX, give the shared address up (take this box's own), register as
/// backup, and follow the re-sync until every set is in sync.
async fn demote_request(shared: &Arc<Shared>, out: &mut Replies, check_only: bool) {
    let state = lock(&shared.machine).record.state;
    if state != RoleState::Fenced {
        out.send(&ControlReply::Refused(Refusal::NotFenced { state }))
            .await;
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
        out.send(&ControlReply::Say { text: what }).await;
        out.send(&ControlReply::Say {
            text: "then the full sync from the primary starts; this follows it until in sync"
                .to_owned(),
        })
        .await;
        if let Some(note) = &shared.config().demote_note {
            out.send(&ControlReply::Say {
                text: format!("NOTE: {note}"),
            })
            .await;
        }
        out.send(&ControlReply::Ready(Change::Demotion)).await;
        return;
    }
    let started = Instant::now();
    follow(shared, out, Event::DemoteRequested, true, |record| {
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
            let why = "the role changed during the re-sync".to_owned();
            out.send(&ControlReply::Refused(Refusal::RoleChange { why }))
                .await;
            return;
        }
        let fresh = |s: &SetStatus| {
            s.state == SetState::InSync && s.last_in_sync_ms.is_some_and(|at| at >= since)
        };
        if sets.iter().all(fresh) {
            out.send(&ControlReply::Done {
                text: "in sync with the primary".to_owned(),
                after_s: Some(started.elapsed().as_secs_f64()),
            })
            .await;
            return;
        }
        let line = sets
            .iter()
            .map(|s| {
                let state = if fresh(s) {
                    "in sync".to_owned()
                } else if matches!(
                    s.state,
                    SetState::InSync | SetState::Serving | SetState::Stopped
                ) {
                    "starting".to_owned()
                } else {
                    s.state.to_string()
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
            if !out.step(started, format!("re-sync: {line}")).await {
                return; // The operator left (Ctrl-C); the sync goes on without an audience.
            }
            said = line;
            last_said = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::net::Ipv4Addr;

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
    fn the_operators_address_is_checked_before_anything_moves() {
        let network = office();
        let resolve = |address: Option<&str>, gateway: Option<&str>| {
            let request = PromoteRequest {
                address: address.map(|a| crate::control::parse_address(a).unwrap()),
                gateway: gateway.map(|g| crate::control::parse_gateway(g).unwrap()),
                ..PromoteRequest::default()
            };
            PromoteOptions::resolve(&request, Some(&network))
        };
        assert_eq!(resolve(None, None).unwrap(), PromoteOptions::default());
        let forced = PromoteRequest {
            force: true,
            offline: true,
            ..PromoteRequest::default()
        };
        let options = PromoteOptions::resolve(&forced, Some(&network)).unwrap();
        assert!(options.asked.force && options.asked.offline && options.chosen.is_none());
        // A new address keeps the configured gateway when it is on its network.
        let chosen = resolve(Some("192.168.1.20/24"), None)
            .unwrap()
            .chosen
            .unwrap();
        assert_eq!(
            (chosen.address, chosen.prefix, chosen.gateway),
            (
                Ipv4Addr::new(192, 168, 1, 20),
                24,
                Ipv4Addr::new(192, 168, 1, 1)
            )
        );
        let chosen = resolve(Some("10.0.0.2/8"), Some("10.0.0.1"))
            .unwrap()
            .chosen
            .unwrap();
        assert_eq!(chosen.gateway, Ipv4Addr::new(10, 0, 0, 1));
        for (address, gateway, says) in [
            (Some("10.9.9.2/24"), None, "is not on 10.9.9.2/24's network"),
            (Some("192.168.1.2/31"), None, "leaves no room"),
            (
                None,
                Some("192.168.1.2"),
                "both the address and the gateway",
            ),
        ] {
            let why = resolve(address, gateway).unwrap_err();
            assert!(why.contains(says), "{address:?} {gateway:?}: {why}");
        }
        for (text, says) in [("192.168.1.2", "like 192.168.1.2/24"), ("nope/24", "like")] {
            let why = crate::control::parse_address(text).unwrap_err();
            assert!(why.contains(says), "{text}: {why}");
        }
        let why = crate::control::parse_gateway("nope").unwrap_err();
        assert!(why.contains("like 192.168.1.1"), "{why}");
        let request = PromoteRequest {
            address: Some((Ipv4Addr::new(192, 168, 1, 2), 24)),
            ..PromoteRequest::default()
        };
        let remote = PromoteOptions::resolve(&request, None).unwrap_err();
        assert!(remote.contains("keeps its own address"), "{remote}");
    }

    #[tokio::test]
    async fn a_socket_held_by_something_that_is_not_an_agent_does_not_stop_the_agent() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("agent.sock");
        // A listener that never answers (an inherited descriptor, a wedged process).
        let _silent = tokio::net::UnixListener::bind(&path).unwrap();
        let started = std::time::Instant::now();
        let _ours = bind_socket(&path, None).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(10));
        // A stale file nobody listens on is replaced at once.
        let stale = tmp.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let _ours = bind_socket(&stale, None).await.unwrap();
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
