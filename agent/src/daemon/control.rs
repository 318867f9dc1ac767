//! The control socket: `lbs status`, `lbs promote`, `lbs demote`, `lbs reload` and the console
//! ask here, one request per connection.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use lbs_protocol::control::{self};
use tokio::net::UnixListener;
use tokio::sync::broadcast;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::role::{Event, RoleRecord, RoleState, SharedAddress};

use crate::daemon::checks::promote_checks;
use crate::daemon::state::{Shared, lock, network};
use crate::status::SetStatus;

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
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            bail!(
                "another lbs agent answers on {}; stop it first",
                path.display()
            );
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
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut clients = JoinSet::new();
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = clients.join_next(), if !clients.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!("control socket: {err}");
                    continue;
                }
            },
        };
        let shared = shared.clone();
        clients.spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let read = tokio::time::timeout(
                Duration::from_secs(5),
                BufReader::new(read).read_line(&mut line),
            )
            .await;
            if !matches!(read, Ok(Ok(n)) if n > 0) {
                return;
            }
            let request = line.trim();
            if request == "demote" || request == "demote-check" {
                demote_request(&shared, &mut write, request == "demote-check").await;
                return;
            }
            if let Some(rest) = request.strip_prefix("promote") {
                let check_only = rest.starts_with("-check");
                let words = rest.trim_start_matches("-check");
                match PromoteOptions::parse(words, shared.config().network.as_ref()) {
                    Ok(options) => {
                        promote_request(&shared, &mut write, options, check_only).await;
                    }
                    Err(why) => {
                        say(&mut write, &format!("refused: {why}")).await;
                    }
                }
                return;
            }
            if request == "reload" {
                let line = match reload(&shared) {
                    Ok(said) => format!("done: {said}"),
                    Err(why) => format!("refused: {why}"),
                };
                say(&mut write, &line).await;
                return;
            }
            let answer = match request {
                "status" => serde_json::to_string(&shared.status())
                    .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")),
                other => {
                    serde_json::json!({ "error": format!("unknown request {other:?}") }).to_string()
                }
            };
            let _ = write.write_all(format!("{answer}\n").as_bytes()).await;
        });
    }
    clients.shutdown().await;
}

/// Writes one line to an `lbs promote` client (it may have gone: then nobody reads).
pub(crate) async fn say(write: &mut tokio::net::unix::OwnedWriteHalf, line: &str) -> bool {
    use tokio::io::AsyncWriteExt;
    write
        .write_all(format!("{line}\n").as_bytes())
        .await
        .is_ok()
}

/// Passes on the progress lines already sent (the steps report before the state changes).
pub(crate) async fn drain(
    progress: &mut broadcast::Receiver<String>,
    write: &mut tokio::net::unix::OwnedWriteHalf,
    started: Instant,
) {
    while let Ok(line) = progress.try_recv() {
        say(
            write,
            &format!("{:>6.2} s  {line}", started.elapsed().as_secs_f64()),
        )
        .await;
    }
}

/// What `promote` / `promote-check` asked for: `force`, and `address=A/P` `gateway=G` when
/// the operator changed the configured address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PromoteOptions {
    pub(crate) force: bool,
    pub(crate) offline: bool,
    /// The operator saw the checks (promote-check): they run again but are not repeated.
    pub(crate) checked: bool,
    pub(crate) chosen: Option<SharedAddress>,
}

impl PromoteOptions {
    /// Parses the request's words against the configured network.
    pub(crate) fn parse(
        words: &str,
        network: Option<&crate::config::Network>,
    ) -> Result<PromoteOptions, String> {
        let mut options = PromoteOptions::default();
        let (mut address, mut gateway) = (None, None);
        for word in words.split_whitespace() {
            if word == "force" {
                options.force = true;
            } else if word == "offline" {
                options.offline = true;
            } else if word == "checked" {
                options.checked = true;
            } else if let Some(text) = word.strip_prefix("address=") {
                let cidr = text.parse::<lbs_netconfig::Ipv4Cidr>().map_err(|_| {
                    format!("{text:?} is not an address with its prefix, like 192.168.1.2/24")
                })?;
                address = Some(cidr);
            } else if let Some(text) = word.strip_prefix("gateway=") {
                gateway = Some(
                    text.parse::<Ipv4Addr>()
                        .map_err(|_| format!("{text:?} is not an address, like 192.168.1.1"))?,
                );
            } else {
                return Err(format!("unknown word {word:?} in the promotion request"));
            }
        }
        if address.is_none() && gateway.is_none() {
            return Ok(options);
        }
        let Some(network) = network else {
            return Err(
                "this box has no [network] section: it keeps its own address on promotion".into(),
            );
        };
        let address = address.unwrap_or(network.shared);
        let gateway = gateway.unwrap_or(network.gateway);
        if address.prefix == 0 || address.prefix > 30 {
            return Err(format!(
                "/{} leaves no room for a gateway; an office LAN is /8 to /30",
                address.prefix
            ));
        }
        let mask = u32::MAX << (32 - u32::from(address.prefix));
        if u32::from(address.addr) & mask != u32::from(gateway) & mask {
            return Err(format!(
                "the gateway {gateway} is not on {}/{}'s network",
                address.addr, address.prefix
            ));
        }
        if gateway == address.addr {
            return Err(format!(
                "{gateway} cannot be both the address and the gateway"
            ));
        }
        options.chosen = Some(SharedAddress {
            address: address.addr,
            prefix: address.prefix,
            gateway,
        });
        Ok(options)
    }
}

/// `promote-check` / `promote`: the checks, then (unless only checking) the promotion with
/// its steps as they happen.
pub(crate) async fn promote_request(
    shared: &Arc<Shared>,
    write: &mut tokio::net::unix::OwnedWriteHalf,
    options: PromoteOptions,
    check_only: bool,
) {
    let lines = match promote_checks(shared, options.force, options.chosen, options.offline).await {
        Ok(lines) => lines,
        Err(why) => {
            say(write, &format!("refused: {why}")).await;
            return;
        }
    };
    if !options.checked || check_only {
        for line in &lines {
            say(write, line).await;
        }
    }
    if check_only {
        say(write, "ready: promotion possible").await;
        return;
    }
    *lock(&shared.promotion_kind) = if options.force {
        control::PromotionKind::Forced
    } else {
        control::PromotionKind::Operator
    };
    follow(
        shared,
        write,
        if options.offline {
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
            RoleState::Backup => Some(Err(record
                .last_error
                .clone()
                .unwrap_or_else(|| "refused".to_owned()))),
            _ => None,
        },
    )
    .await;
}

/// Applies `event`, passes on the role change's progress lines as they come, and ends with
/// `refused: …`, or `done: …` (`more_follows`: a progress line, the caller goes on) once
/// `finished` says the record reached an end.
pub(crate) async fn follow(
    shared: &Arc<Shared>,
    write: &mut tokio::net::unix::OwnedWriteHalf,
    event: Event,
    more_follows: bool,
    finished: impl Fn(&RoleRecord) -> Option<Result<String, String>>,
) {
    let started = Instant::now();
    let mut progress = shared.progress.subscribe();
    if let Err(why) = shared.apply(event) {
        // Another console's P (or B) got there first, or the state moved since the checks.
        say(write, &format!("refused: {why}")).await;
        return;
    }
    loop {
        let record = lock(&shared.machine).record.clone();
        if let Some(outcome) = finished(&record) {
            drain(&mut progress, write, started).await;
            let took = started.elapsed().as_secs_f64();
            let line = match outcome {
                Ok(done) if more_follows => format!("{took:>6.2} s  {done}"),
                Ok(done) => format!("done: {done} after {took:.2} s"),
                Err(why) => format!("refused: {why}"),
            };
            say(write, &line).await;
            return;
        }
        tokio::select! {
            line = progress.recv() => match line {
                Ok(line) => {
                    say(write, &format!("{:>6.2} s  {line}", started.elapsed().as_secs_f64())).await;
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// `demote-check` / `demote`: **B** on a fenced box — what it will do (and the operator's
/// note), then (unless only checking) stop the PBX, give the shared address up (take this
/// box's own), register as backup, and follow the re-sync until every set is in sync.
pub(crate) async fn demote_request(
    shared: &Arc<Shared>,
    write: &mut tokio::net::unix::OwnedWriteHalf,
    check_only: bool,
) {
    let state = lock(&shared.machine).record.state;
    if state != RoleState::Fenced {
        let why = match state {
            RoleState::Primary => "this box is the PRIMARY: B is for the old primary after the other box took over (P there first)".to_owned(),
            RoleState::Backup => "this box is the BACKUP already".to_owned(),
            other => format!("only a fenced box becomes the backup with B; this box is {other}"),
        };
        say(write, &format!("refused: {why}")).await;
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
        say(write, &what).await;
        say(
            write,
            "then the full sync from the primary starts; this follows it until in sync",
        )
        .await;
        if let Some(note) = &shared.config().demote_note {
            say(write, &format!("NOTE: {note}")).await;
        }
        say(write, "ready: demotion possible").await;
        return;
    }
    let started = Instant::now();
    follow(shared, write, Event::DemoteRequested, true, |record| {
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
            say(write, "refused: the role changed during the re-sync").await;
            return;
        }
        let fresh =
            |s: &SetStatus| s.state == "in sync" && s.last_in_sync_ms.is_some_and(|at| at >= since);
        if sets.iter().all(fresh) {
            say(
                write,
                &format!(
                    "done: in sync with the primary after {:.2} s",
                    started.elapsed().as_secs_f64()
                ),
            )
            .await;
            return;
        }
        let line = sets
            .iter()
            .map(|s| {
                let state = if fresh(s) {
                    "in sync"
                } else if s.state == "in sync" || s.state == "serving" || s.state == "stopped" {
                    "starting"
                } else {
                    s.state.as_str()
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
            let heard = say(
                write,
                &format!(
                    "{:>6.2} s  re-sync: {line}",
                    started.elapsed().as_secs_f64()
                ),
            )
            .await;
            if !heard {
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
    fn promotion_words_are_checked_before_anything_moves() {
        let network = office();
        let parse = |words: &str| PromoteOptions::parse(words, Some(&network));
        assert_eq!(parse("").unwrap(), PromoteOptions::default());
        let options = parse(" force offline").unwrap();
        assert!(options.force && options.offline && options.chosen.is_none());
        // A new address keeps the configured gateway when it is on its network.
        let chosen = parse(" address=192.168.1.20/24").unwrap().chosen.unwrap();
        assert_eq!(
            (chosen.address, chosen.prefix, chosen.gateway),
            (
                Ipv4Addr::new(192, 168, 1, 20),
                24,
                Ipv4Addr::new(192, 168, 1, 1)
            )
        );
        let chosen = parse(" address=10.0.0.2/8 gateway=10.0.0.1")
            .unwrap()
            .chosen
            .unwrap();
        assert_eq!(chosen.gateway, Ipv4Addr::new(10, 0, 0, 1));
        for (words, says) in [
            (" address=10.9.9.2/24", "is not on 10.9.9.2/24's network"),
            (" address=192.168.1.2", "like 192.168.1.2/24"),
            (" address=192.168.1.2/31", "leaves no room"),
            (" gateway=192.168.1.2", "both the address and the gateway"),
            (" gateway=nope", "like 192.168.1.1"),
            (" please", "unknown word"),
        ] {
            let why = parse(words).unwrap_err();
            assert!(why.contains(says), "{words}: {why}");
        }
        let remote = PromoteOptions::parse(" address=192.168.1.2/24", None).unwrap_err();
        assert!(remote.contains("keeps its own address"), "{remote}");
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
