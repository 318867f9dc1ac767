//! `lbs sync serve | pull | verify`: one tree, replicated over mutual TLS to the partner only.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use lbs_protocol::Role;
use lbs_protocol::listen::serve_until;
use lbs_sync::{Index, ScanOptions, Trash, manifest, scan};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::peer::{Peer, PeerArgs, partner_port};
use crate::pull::{Pull, purge_trash};

/// How long `serve` lets running transfers finish when asked to stop.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Exit code of `lbs sync pull` when some files were left for the next pass.
pub const EXIT_INCOMPLETE: u8 = 2;

/// Options of `lbs sync serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// The tree to serve.
    #[arg(long)]
    root: PathBuf,
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    #[command(flatten)]
    peer: PeerArgs,
    /// Where lbs keeps its state (the tree's index lives below it).
    #[arg(long, default_value = "/var/lib/lbs")]
    state: PathBuf,
}

/// Options of `lbs sync pull`.
#[derive(clap::Args, Debug)]
pub struct PullArgs {
    /// The local tree to make identical to the partner's.
    #[arg(long)]
    root: PathBuf,
    /// The partner's address.
    #[arg(long)]
    from: SocketAddr,
    #[command(flatten)]
    peer: PeerArgs,
    /// Where lbs keeps its state (the tree's index lives below it).
    #[arg(long, default_value = "/var/lib/lbs")]
    state: PathBuf,
    /// Where deleted files go (default: `.<root name>.lbs-trash` beside the root).
    #[arg(long)]
    trash: Option<PathBuf>,
    /// How many days deleted files stay in the trash before a pull removes them.
    #[arg(long, default_value_t = 30)]
    trash_retention_days: u64,
    /// Do not sync anything to disk: for measurements only, a crash (or power cut) can then
    /// leave files empty. By default new files reach the disk before they replace old ones.
    #[arg(long)]
    no_fsync: bool,
}

/// Held while an lbs process works on a root.
pub(crate) type RootLock = nix::fcntl::Flock<std::fs::File>;

/// The persistent index of `root` under `state`, and an exclusive lock that lasts as long as
/// the returned guard lives: one lbs process per root at a time.
pub(crate) fn open_index(
    state: &Path,
    root: &Path,
) -> anyhow::Result<(Arc<Mutex<Index>>, RootLock)> {
    let root =
        std::fs::canonicalize(root).with_context(|| format!("sync root {}", root.display()))?;
    let dir = state.join("index");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = blake3::hash(root.as_os_str().as_encoded_bytes()).to_hex();
    let base = dir.join(&key[..16]);
    let lock_path = base.with_extension("lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, errno)| {
            anyhow::anyhow!(
                "{} is in use by another lbs process ({errno}); wait for it to finish",
                root.display()
            )
        })?;
    let index = Index::open(&base.with_extension("sqlite"))?;
    Ok((Arc::new(Mutex::new(index)), lock))
}

/// `lbs sync serve`.
pub async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let peer = Arc::new(Peer::load(&args.peer)?);
    let (index, _lock) = open_index(&args.state, &args.root)?;
    let config = peer.server_config()?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    lbs_host::say!(
        "serving {} on {} to {} only",
        args.root.display(),
        listener.local_addr()?,
        peer.partner
    );
    let shutdown = CancellationToken::new();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let serving = partner_port("lbs sync serve", DRAIN_TIMEOUT);
    let stop = shutdown.clone();
    let sessions = serve_until(
        listener,
        shutdown.clone(),
        serving,
        move |tcp, remote, admission| {
            let (peer, config, index, root) = (
                peer.clone(),
                config.clone(),
                index.clone(),
                args.root.clone(),
            );
            let stop = stop.clone();
            async move {
                let session = async {
                    let (mut conn, negotiated) = peer.accept(config, tcp, Role::Primary).await?;
                    admission.proven();
                    lbs_host::say!("{} connected from {remote}", negotiated.peer.sender);
                    lbs_sync::serve(&mut conn, root, index, peer.generation, negotiated.version)
                        .await?;
                    lbs_host::say!("{} done", negotiated.peer.sender);
                    anyhow::Ok(())
                };
                tokio::select! {
                    result = session => if let Err(err) = result {
                        lbs_host::say!("session with {remote} ended: {err:#}");
                    },
                    () = stop.cancelled() => {}
                }
            }
        },
    );
    tokio::pin!(sessions);
    tokio::select! {
        _ = &mut sessions => {}
        _ = sigterm.recv() => {
            shutdown.cancel();
            sessions.await;
        }
        _ = tokio::signal::ctrl_c() => {
            shutdown.cancel();
            sessions.await;
        }
    }
    lbs_host::say!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// `lbs sync pull`.
pub async fn pull(args: PullArgs) -> anyhow::Result<ExitCode> {
    let peer = Peer::load(&args.peer)?;
    let (index, _lock) = open_index(&args.state, &args.root)?;
    let trash_dir = args
        .trash
        .clone()
        .unwrap_or_else(|| Trash::default_for(&args.root));
    let cancel = CancellationToken::new();
    let connected = Pull {
        peer: &peer,
        from: args.from,
        set: None,
        root: &args.root,
        index,
        trash: &trash_dir,
        durability: if args.no_fsync {
            lbs_sync::Durability::Off
        } else {
            lbs_sync::Durability::Grouped
        },
        cancel: cancel.clone(),
    }
    .connect()
    .await?;
    let negotiated = &connected.negotiated;
    lbs_host::say!(
        "pulling {} from {} (lbs {}, protocol {})",
        args.root.display(),
        negotiated.peer.sender,
        negotiated.peer.software,
        negotiated.version
    );
    let meter = connected.meter.clone();
    let bar = progress_bar();
    let pulled = {
        let pulling = connected.pull(|now| {
            bar.set_length(now.bytes_total);
            bar.set_position((now.bytes_done + now.current_bytes).min(now.bytes_total));
            bar.set_message(format!("{}/{} steps", now.actions_done, now.actions_total));
        });
        tokio::pin!(pulling);
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        // Ctrl-C or SIGTERM: stop at the next chunk, keep what is complete, and say so.
        tokio::select! {
            pulled = &mut pulling => pulled,
            _ = tokio::signal::ctrl_c() => {
                cancel.cancel();
                pulling.await
            }
            _ = sigterm.recv() => {
                cancel.cancel();
                pulling.await
            }
        }
    };
    bar.finish_and_clear();
    let report = match pulled {
        Ok(report) => report,
        Err(err) => {
            match err.downcast_ref::<lbs_sync::SessionError>() {
                Some(cancelled @ lbs_sync::SessionError::Cancelled) => {
                    lbs_host::say!("{cancelled}")
                }
                Some(lbs_sync::SessionError::Apply(
                    interrupted @ lbs_sync::ApplyError::Interrupted { .. },
                )) => lbs_host::say!("{interrupted}; the next pull resumes it"),
                _ => return Err(err),
            }
            return Ok(ExitCode::from(EXIT_INCOMPLETE));
        }
    };
    let plan = report.plan;
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    match &report.recovery {
        Some(lbs_sync::Recovery::Finished(path)) => {
            lbs_host::say!("finished the change to {path} that an interrupted run had journalled")
        }
        Some(lbs_sync::Recovery::Discarded(why)) => {
            lbs_host::say!(
                "discarded an interrupted run's unfinished journal ({why}); old version kept"
            )
        }
        Some(lbs_sync::Recovery::Clean) | None => {}
    }
    lbs_host::say!(
        "manifest in {:.2} s (this side's scan {:.2} s, {} file(s) read); {} unchanged, {} metadata only",
        report.manifest_time.as_secs_f64(),
        report.scan.elapsed.as_secs_f64(),
        report.scan.hashed_files,
        plan.unchanged,
        plan.metadata_only
    );
    lbs_host::say!(
        "fetched {} file(s), {:.1} MiB; copied {} locally ({:.1} MiB); {} new dir(s), {} symlink(s), {} moved to the trash ({})",
        plan.fetch_files,
        mib(report.executed.fetched_bytes),
        plan.local_copies,
        mib(report.executed.copied_bytes),
        plan.new_dirs,
        plan.symlinks,
        plan.trashed,
        trash_dir.display()
    );
    let packed = report.packed;
    if packed.data > 0 {
        lbs_host::say!(
            "packed with zstd: {:.1} MiB of file data crossed as {:.1} MiB ({:.1}% smaller)",
            mib(packed.data),
            mib(packed.packed),
            100.0 * (1.0 - packed.packed as f64 / packed.data as f64)
        );
    }
    if report.executed.patched > 0 {
        lbs_host::say!(
            "{} large file(s) patched in place (changed blocks only, journalled)",
            report.executed.patched
        );
    }
    if plan.links > 0 {
        lbs_host::say!(
            "{} name(s) made hard links of another, as on the partner",
            plan.links
        );
    }
    if report.executed.resumed > 0 {
        lbs_host::say!(
            "{} interrupted transfer(s) resumed from what was kept",
            report.executed.resumed
        );
    }
    for (path, why) in &report.executed.refetched {
        lbs_host::say!("fetched {path} whole: its changed blocks could not be used ({why})");
    }
    for name in &report.executed.unknown_owners {
        lbs_host::say!("warning: owner {name:?} does not exist on this box; left as root");
    }
    for skipped in &report.scan.skipped {
        lbs_host::say!("skipped here {}: {}", skipped.path, skipped.reason);
    }
    for skipped in &report.sender_skipped.entries {
        lbs_host::say!(
            "skipped on the partner {}: {}",
            skipped.path,
            skipped.reason
        );
    }
    if report.sender_skipped.more > 0 {
        lbs_host::say!(
            "skipped on the partner: {} more entries",
            report.sender_skipped.more
        );
    }
    if plan.pending > 0 {
        lbs_host::say!(
            "{} file(s) still changing on the partner: next pass",
            plan.pending
        );
    }
    for (path, reason) in &report.executed.deferred {
        lbs_host::say!("deferred {path}: {reason}");
    }
    let retention = Duration::from_secs(args.trash_retention_days * 24 * 3600);
    match purge_trash(trash_dir.clone(), retention).await {
        Ok(0) => {}
        Ok(n) => lbs_host::say!(
            "removed {n} trash batch(es) older than {} days",
            args.trash_retention_days
        ),
        Err(err) => lbs_host::say!("warning: {err:#}"),
    }
    lbs_host::say!(
        "on the wire: {} bytes ({} sent, {} received, TLS included)",
        meter.sent() + meter.received(),
        meter.sent(),
        meter.received()
    );
    let incomplete = !report.executed.deferred.is_empty() || plan.pending > 0;
    lbs_host::say!(
        "{} in {:.2} s",
        if incomplete { "incomplete" } else { "in sync" },
        report.elapsed.as_secs_f64()
    );
    Ok(if incomplete {
        ExitCode::from(EXIT_INCOMPLETE)
    } else {
        ExitCode::SUCCESS
    })
}

/// A progress bar on a terminal (drawn nowhere otherwise).
fn progress_bar() -> indicatif::ProgressBar {
    let style = indicatif::ProgressStyle::with_template(
        "{bar:30} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    indicatif::ProgressBar::new(0).with_style(style)
}

/// `lbs sync verify`.
pub fn verify(expected: &Path, actual: &Path) -> anyhow::Result<ExitCode> {
    type Tree = (BTreeMap<String, String>, Vec<Vec<lbs_protocol::RelPath>>);
    let tree = |root: &Path| -> anyhow::Result<Tree> {
        let mut index = Index::in_memory()?;
        let report = scan(root, &mut index, &ScanOptions::default())?;
        let changing = report.unstable.len() + report.growing.len();
        if changing > 0 {
            anyhow::bail!(
                "{}: {changing} file(s) changed while being read; verify again when it is quiet",
                root.display(),
            );
        }
        // Not compared (lbs syncs none of them), but never left out silently.
        for skipped in &report.skipped {
            lbs_host::say!(
                "not synced {} in {}: {}",
                skipped.path,
                root.display(),
                skipped.reason
            );
        }
        let links = lbs_sync::links::groups(root, &index.entries()?);
        let entries = manifest(&index)?
            .into_iter()
            .map(|e| (e.path.to_string(), format!("{:?} {:?}", e.kind, e.meta)))
            .collect();
        Ok((entries, links))
    };
    let ((want, want_links), (have, have_links)) = (tree(expected)?, tree(actual)?);
    let mut differences = 0u64;
    for (path, entry) in &want {
        match have.get(path) {
            None => {
                differences += 1;
                lbs_host::say!("missing   {path}");
            }
            Some(other) if other != entry => {
                differences += 1;
                lbs_host::say!("differs   {path}\n  expected {entry}\n  actual   {other}");
            }
            Some(_) => {}
        }
    }
    for path in have.keys().filter(|p| !want.contains_key(*p)) {
        differences += 1;
        lbs_host::say!("extra     {path}");
    }
    // Hard links: the same names one file on both sides.
    let names = |group: &Vec<lbs_protocol::RelPath>| {
        group
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    for group in want_links.iter().filter(|g| !have_links.contains(g)) {
        differences += 1;
        lbs_host::say!("not linked {}", names(group));
    }
    for group in have_links.iter().filter(|g| !want_links.contains(g)) {
        differences += 1;
        lbs_host::say!("linked    {}", names(group));
    }
    if differences == 0 {
        lbs_host::say!("identical: {} entries", want.len());
        Ok(ExitCode::SUCCESS)
    } else {
        lbs_host::say!("{differences} difference(s)");
        Ok(ExitCode::FAILURE)
    }
}
