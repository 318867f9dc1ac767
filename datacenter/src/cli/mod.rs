//! The command line: `lbs-datacenter init | provision-pair | provision-backup | rekey | serve |
//! promote | status | events | site-identity | site`.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{CommandFactory, Parser, Subcommand};
use lbs_protocol::{CertificateAuthority, ServerId};
use tokio_util::sync::CancellationToken;

use crate::store::{RequestState, SqliteStore};
use crate::time::{now_ms, utc as when};

mod migrate;
mod provision;
mod site_init;
mod status;
mod user;

use crate::authority::DATABASE;
/// The CA certificate, its key and the database, in the data directory.
use crate::ca_files::{self, CA_CERT, CA_KEY, SITE_CA_CERT, SITE_CA_KEY};
use crate::config::CONFIG_FILE as CONFIG;
/// Where the package keeps the configuration (`lbs-datacenter.service` passes it to serve).
const PACKAGED_CONFIG: &str = "/etc/lbs-datacenter/datacenter.toml";

fn init_logging() {
    lbs_host::logging::init("lbs-datacenter", "info");
}

/// Runs `service` (given its shutdown token) until it ends, or until SIGTERM or SIGINT ask
/// it to stop, and waits for it to stop.
async fn until_signal<F>(service: impl FnOnce(CancellationToken) -> F) -> anyhow::Result<()>
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    use tokio::signal::unix::{SignalKind, signal};
    // Each connected box holds a descriptor: take all the hard limit allows.
    match lbs_host::limits::raise_open_files() {
        Ok(limit) => tracing::debug!("open files: up to {limit}"),
        Err(err) => tracing::warn!("cannot raise the open-files limit: {err}"),
    }
    let shutdown = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("watching SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("watching SIGINT")?;
    let service = service(shutdown.clone());
    tokio::pin!(service);
    tokio::select! {
        result = &mut service => return result,
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping");
    lbs_host::systemd::notify("STOPPING=1");
    shutdown.cancel();
    service.await
}

/// Runs the service; prints `ready:` with the bound addresses.
async fn serve(
    dir: &Path,
    authority: crate::authority::Authority,
    ca: CertificateAuthority,
    config: crate::config::ServeConfig,
) -> anyhow::Result<()> {
    until_signal(|shutdown| {
        crate::serve::run(dir, authority, ca, config, shutdown, |listening| {
            let list = |addresses: &[std::net::SocketAddr]| {
                addresses
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let ready = format!(
                "activation {} control {}",
                list(&listening.activation),
                list(&listening.control)
            );
            lbs_host::say!("ready: {ready}");
            lbs_host::systemd::notify(&format!("READY=1\nSTATUS=serving: {ready}"));
        })
    })
    .await
}

/// Runs another site's endpoints; prints `ready:` once they are up.
async fn site(dir: &Path, config: crate::config::ServeConfig) -> anyhow::Result<()> {
    let name = config.site.clone();
    until_signal(|shutdown| {
        crate::site::run(dir, config, shutdown, move |ready| {
            let ready = format!(
                "site {name}, endpoints {}, {} peers from the cache",
                ready.endpoints.join(","),
                ready.cached_peers
            );
            lbs_host::say!("ready: {ready}");
            lbs_host::systemd::notify(&format!("READY=1\nSTATUS={ready}"));
        })
    })
    .await
}

#[derive(Parser)]
#[command(
    name = "lbs-datacenter",
    version,
    about = "lbs data center: activation, pairing and the role authority"
)]
struct Cli {
    /// Where the CA, its key and the database live.
    #[arg(long, global = true, default_value = "/var/lib/lbs-datacenter")]
    dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the certificate authority and the database (once per installation).
    Init {
        /// The CA's name, as boxes will see it.
        #[arg(long, default_value = "lbs data center CA")]
        name: String,
    },
    /// Provision a pair: two server IDs with one-time activation keys (shown once). The
    /// first box to activate becomes primary, the second backup.
    ProvisionPair {
        /// The pair's name (lower-case letters, digits, '-').
        #[arg(long, required_unless_present = "from", conflicts_with = "from")]
        name: Option<String>,
        /// The name phones and trunks use for the PBX.
        #[arg(long, required_unless_present = "from", conflicts_with = "from")]
        fqdn: Option<String>,
        /// Many pairs at once: a file with one `NAME FQDN` per line ('#' starts a comment).
        /// All are provisioned in one transaction, or none when one line is wrong.
        #[arg(long, value_name = "FILE")]
        from: Option<PathBuf>,
        /// The keys as JSON (an array of {pair, fqdn, sid, key, expires_at}) for scripts.
        #[arg(long)]
        json: bool,
        /// Only one box for now; add its backup later with provision-backup.
        #[arg(long)]
        single: bool,
        /// Days the activation keys stay valid.
        #[arg(long, default_value_t = 14)]
        key_days: u64,
    },
    /// Add a backup to a box that runs alone.
    ProvisionBackup {
        /// The SID of the box already running.
        #[arg(long = "for")]
        partner: ServerId,
        /// Days the activation key stays valid.
        #[arg(long, default_value_t = 14)]
        key_days: u64,
    },
    /// A fresh activation key for a server (lost or expired key, reinstalled box).
    Rekey {
        /// The server.
        #[arg(long)]
        sid: ServerId,
        /// Days the activation key stays valid.
        #[arg(long, default_value_t = 14)]
        key_days: u64,
    },
    /// Serve activations, the control API, DNS updates and the tunnel endpoints until
    /// SIGTERM or Ctrl-C.
    Serve {
        /// The configuration (TOML; every field has a default). Default: datacenter.toml in
        /// the data directory, if it exists.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Ask the backup of a pair to promote itself (the provider's P): its agent runs the same
    /// checks as P at its console (the data center and the backup must both have lost the
    /// primary, nobody may answer ARP for the shared address) and promotes, or refuses with
    /// the reason. Waits for the answer; exit 0 promoted, 3 refused or no answer in time.
    Promote {
        /// The pair.
        pair: String,
        /// How long the request stays valid and this command waits for the answer.
        #[arg(long, default_value_t = 60)]
        wait_s: u64,
        /// Who asks, for the audit log (default: the user running this).
        #[arg(long)]
        by: Option<String>,
    },
    /// Move this site's SQLite records into the shared store the configuration's [store]
    /// section names (backend = "etcd"): pairs, keys, roles, generations, DNS records,
    /// requests and the audit log, numbers kept. Stop serve first; the SQLite file stays as
    /// it was. An interrupted migration can be run again.
    Migrate {
        /// The shared store's kind (etcd, the only one).
        #[arg(long, value_parser = ["etcd"])]
        to: String,
        /// The configuration with the [store] section (default: datacenter.toml in --dir).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// The portal's accounts (kept in the store: every site's portal knows them).
    User {
        #[command(subcommand)]
        action: user::UserAction,
    },
    /// Retire a pair (the office left): from now on its boxes are refused at activation, on
    /// the control API and by the tunnel endpoints, its DNS names are no longer updated and
    /// status leaves it out; its records and its audit log stay. Cannot be undone.
    Retire {
        /// The pair.
        pair: String,
        /// Who retires it, for the audit log (default: the user running this).
        #[arg(long)]
        by: Option<String>,
    },
    /// Prepare another full site's data directory (a shared [store] is needed): its own CA
    /// signed by the root, the root certificate, this site's configuration with the new
    /// name, the DNS secret it names; says what to set there before serving. Needs the root
    /// key.
    SiteInit {
        /// The new site's name.
        #[arg(long)]
        site: String,
        /// The directory to write (created, 0700; must be empty).
        #[arg(long)]
        out: PathBuf,
        /// This site's configuration (default: datacenter.toml in --dir).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The root key, when it is kept offline (default: ca.key in --dir).
        #[arg(long, value_name = "FILE")]
        root_key: Option<PathBuf>,
    },
    /// Revoke a site's CA (its key was lost or the site is gone): the root signs a new
    /// revocation list and the shared store carries it to every site, which from then on
    /// refuses boxes and sites whose certificate that CA signed. Boxes it activated are
    /// activated again at another site (rekey, then `lbs activate`). Needs the root key.
    SiteRevoke {
        /// The site whose CA is revoked.
        #[arg(long)]
        site: String,
        /// The root key, when it is kept offline (default: ca.key in --dir).
        #[arg(long, value_name = "FILE")]
        root_key: Option<PathBuf>,
    },
    /// At the main site: the files another site needs to follow it (a data-center
    /// certificate and key issued by this CA, and the CA certificate). Copy them into the other
    /// site's directory; the key gives access to every box's tunnel key, so move it like one.
    SiteIdentity {
        /// Where to write datacenter.pem, datacenter.key and ca.pem (created; must not hold
        /// an identity yet).
        #[arg(long)]
        out: PathBuf,
    },
    /// At another site: run only this site's tunnel endpoints (`[[endpoint]]`s whose `site`
    /// is this file's `site`), their peers following the main site's control API (`follow`)
    /// and kept for when it is unreachable. Until SIGTERM or Ctrl-C.
    Site {
        /// The configuration (same format as serve's). Default: datacenter.toml in the data
        /// directory.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Write the man pages and shell completions (for packaging).
    #[command(hide = true)]
    GenerateDocs {
        /// Where (`man/`, `completions/` are made in it).
        #[arg(long)]
        out: PathBuf,
    },
    /// Every pair: servers, roles, generation, last heartbeat, software, hardware match, DNS;
    /// first a line for the whole fleet.
    Status {
        /// Only this pair.
        pair: Option<String>,
        /// Only what needs a person (serve not running or not answering, silent boxes,
        /// fenced boxes, a backup behind, DNS refused or unanswered, hardware that differs).
        /// Exits 0 when nothing does, 1 when something does, 2 when the data center's
        /// records cannot be read: for monitoring.
        #[arg(long)]
        problems: bool,
        /// A box that has not reported for this many seconds is silent.
        #[arg(long, value_name = "SECS", default_value_t = crate::fleet::SILENT_AFTER.as_secs())]
        silent_after: u64,
        /// As JSON (with --problems: the summary and each pair's problems).
        #[arg(long)]
        json: bool,
    },
    /// The audit log: every provisioning, activation and role change.
    Events {
        /// As JSON (with --follow: one event per line).
        #[arg(long)]
        json: bool,
        /// Only events after this number.
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// Only this pair's events.
        #[arg(long, value_name = "PAIR")]
        pair: Option<String>,
        /// Then keep printing new events as they are recorded (looked for every second)
        /// until interrupted.
        #[arg(long)]
        follow: bool,
    },
}

fn open(dir: &Path) -> anyhow::Result<crate::authority::AnyStore> {
    crate::authority::open_store(dir)
}

fn days(n: u64) -> Duration {
    Duration::from_secs(n.saturating_mul(86_400))
}

/// Who runs this command, for the audit log.
fn operator(command: &str) -> String {
    format!(
        "{} (lbs-datacenter {command})",
        std::env::var("SUDO_USER")
            .or_else(|_| std::env::var("USER"))
            .unwrap_or_else(|_| "operator".into())
    )
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let dir = &cli.dir;
    match cli.command {
        Command::Init { name } => {
            let (cert, key) = (dir.join(CA_CERT), dir.join(CA_KEY));
            if cert.exists() || key.exists() {
                bail!(
                    "{} is initialised already (a CA is there); boxes trust it, so it is never replaced",
                    dir.display()
                );
            }
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            // The CA key and the database: for this installation's operators only.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("restricting {}", dir.display()))?;
            let site = crate::config::ServeConfig::load(&dir.join(CONFIG), false)?.site;
            // The records first: reachable now (etcd), or said now rather than after the CA
            // was made and init cannot run again.
            let records = match crate::config::StoreSettings::load(&dir.join(CONFIG))? {
                crate::config::StoreSettings::Sqlite => {
                    let schema = SqliteStore::open(&dir.join(DATABASE))?.schema_version()?;
                    format!("database schema {schema}")
                }
                crate::config::StoreSettings::Etcd { etcd, prefix, .. } => format!(
                    "records on etcd ({}) under {prefix}",
                    etcd.endpoints.join(", ")
                ),
            };
            let mut store = open(dir)?;
            store.events(i64::MAX)?;
            let root = CertificateAuthority::generate(&name)?;
            root.save(&cert, &key)?;
            let own = ca_files::issue_site(&mut *store, &root, &site, now_ms())?;
            own.save(&dir.join(SITE_CA_CERT), &dir.join(SITE_CA_KEY))?;
            lbs_host::say!(
                "initialised {}: root CA {:?} ({}; boxes pin it), site {site}'s CA ({SITE_CA_CERT}) that signs this site's boxes, {records}\n\
                 The root key {} signs only sites' CAs (site-init) and revocations (site-revoke): once the sites are made, keep it offline and give it with --root-key.",
                dir.display(),
                name,
                cert.display(),
                key.display(),
            );
        }
        Command::ProvisionPair {
            name,
            fqdn,
            from,
            json,
            single,
            key_days,
        } => {
            let pairs = match (from, name, fqdn) {
                (Some(file), _, _) => provision::pairs_from(&file)?,
                (None, Some(name), Some(fqdn)) => vec![provision::checked_pair(&name, &fqdn)?],
                _ => bail!("give --name and --fqdn, or --from FILE"),
            };
            return provision::provision_pairs(dir, &pairs, single, key_days, json);
        }
        Command::ProvisionBackup { partner, key_days } => {
            let mut store = open(dir)?;
            let server = store.provision_backup(partner, days(key_days), now_ms())?;
            lbs_host::say!(
                "backup for {partner}:\n  SID {}  activation key {}  (valid until {})",
                server.sid,
                server.key,
                when(server.expires_at)
            );
        }
        Command::Rekey { sid, key_days } => {
            let mut store = open(dir)?;
            let server = store.rekey(sid, days(key_days), now_ms())?;
            lbs_host::say!(
                "{sid}: activation key {}  (valid until {}); the old key no longer works",
                server.key,
                when(server.expires_at)
            );
        }
        Command::Serve { config } => {
            let (path, required) = match config {
                Some(path) => (path, true),
                None => (dir.join(CONFIG), false),
            };
            let config = crate::config::ServeConfig::load(&path, required)?;
            let authority = crate::authority::open(dir, &config.store, &config.site)?;
            let ca = ca_files::signer(dir)?;
            init_logging();
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            runtime.block_on(serve(dir, authority, ca, config))?;
        }
        Command::GenerateDocs { out } => {
            lbs_host::cli_docs::write(Cli::command(), &out)?;
        }
        Command::SiteInit {
            site,
            out,
            config,
            root_key,
        } => {
            let path = config.unwrap_or_else(|| dir.join(CONFIG));
            return site_init::site_init(dir, &path, &site, &out, root_key.as_deref());
        }
        Command::User { action } => return user::user(dir, action),
        Command::SiteRevoke { site, root_key } => {
            return site_init::site_revoke(dir, &site, root_key.as_deref());
        }
        Command::SiteIdentity { out } => {
            let ca = ca_files::signer(dir).context(
                "site-identity runs at the main site, where `lbs-datacenter init` made the CA",
            )?;
            let (cert, key) = (
                out.join(crate::serve::IDENTITY_CERT),
                out.join(crate::serve::IDENTITY_KEY),
            );
            if cert.exists() || key.exists() {
                bail!(
                    "{} holds an identity already; remove it first if it is to be replaced",
                    out.display()
                );
            }
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("restricting {}", out.display()))?;
            let identity = ca.issue_identity(&lbs_protocol::PeerName::DataCenter)?;
            identity.save(&cert, &key)?;
            ca.trust_root().save(&out.join(crate::site::SITE_CA))?;
            lbs_host::say!(
                "{}: datacenter.pem, datacenter.key, ca.pem for another site; copy them into its data directory and run `lbs-datacenter site` there",
                out.display()
            );
        }
        Command::Site { config } => {
            let path = config.unwrap_or_else(|| dir.join(CONFIG));
            let config = crate::config::ServeConfig::load(&path, true)?;
            init_logging();
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            runtime.block_on(site(dir, config))?;
        }
        Command::Migrate { to: _, config } => {
            let path = config.unwrap_or_else(|| dir.join(CONFIG));
            return migrate::migrate(dir, &path);
        }
        Command::Retire { pair, by } => {
            let mut store = open(dir)?;
            let by = by.unwrap_or_else(|| operator("retire"));
            let sids = store.retire_pair(&pair, &by, now_ms())?;
            let list: Vec<String> = sids.iter().map(ServerId::to_string).collect();
            lbs_host::say!(
                "pair {pair} retired: {} refused from now on (a running serve refuses them at their next report); its events stay in the audit log",
                if list.is_empty() {
                    "no server".to_owned()
                } else {
                    list.join(" and ")
                }
            );
        }
        Command::Promote { pair, wait_s, by } => {
            let mut store = open(dir)?;
            let by = by.unwrap_or_else(|| operator("promote"));
            let wait = Duration::from_secs(wait_s.max(1));
            let request = store.request_promotion(&pair, &by, wait, now_ms())?;
            lbs_host::say!(
                "request {}: the backup of {pair} will act on it at its next report (valid {} s)",
                request.id,
                wait_s
            );
            // The serving data center hands it over and records the answer in the database.
            let started = std::time::Instant::now();
            loop {
                std::thread::sleep(Duration::from_millis(200));
                let now = store.promotion_request(request.id, now_ms())?;
                match now.state {
                    RequestState::Pending => continue,
                    RequestState::Promoted => {
                        lbs_host::say!(
                            "done: the backup was {} after {:.1} s; it takes the shared address and starts the PBX now (lbs-datacenter status shows it)",
                            now.answer.unwrap_or_default(),
                            started.elapsed().as_secs_f64()
                        );
                        return Ok(ExitCode::SUCCESS);
                    }
                    state => {
                        lbs_host::say!(
                            "{state}: {}",
                            now.answer.unwrap_or_else(|| "no reason given".into())
                        );
                        return Ok(ExitCode::from(3));
                    }
                }
            }
        }
        Command::Status {
            pair,
            problems,
            silent_after,
            json,
        } => return status::status(dir, pair, problems, silent_after, json),
        Command::Events {
            json,
            after,
            pair,
            follow,
        } => {
            let store = open(dir)?;
            if let Some(name) = &pair
                && !store.pairs()?.iter().any(|p| &p.name == name)
                && store.retired(name)?.is_none()
            {
                bail!("no pair named {name} (see lbs-datacenter status)");
            }
            let wanted = |e: &crate::store::Event| pair.is_none() || e.pair == pair;
            let events = store.events(after)?;
            if json && !follow {
                let events: Vec<_> = events.into_iter().filter(|e| wanted(e)).collect();
                println!("{}", serde_json::to_string_pretty(&events)?);
                return Ok(ExitCode::SUCCESS);
            }
            let mut last = after;
            let mut batch = events;
            loop {
                for e in &batch {
                    last = last.max(e.id);
                    if !wanted(e) {
                        continue;
                    }
                    let line = if json {
                        serde_json::to_string(e)?
                    } else {
                        event_line(e)
                    };
                    // A reader that went away (`| head`) ends a follow quietly.
                    if writeln!(std::io::stdout(), "{line}").is_err() {
                        return Ok(ExitCode::SUCCESS);
                    }
                }
                if !follow {
                    break;
                }
                std::thread::sleep(Duration::from_secs(1));
                batch = store.events(last)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One audit-log entry as a line for people.
fn event_line(e: &crate::store::Event) -> String {
    let generations = match (e.from_generation, e.to_generation) {
        (Some(a), Some(b)) if a != b => format!(" gen {a}→{b}"),
        (None, Some(b)) => format!(" gen {b}"),
        _ => String::new(),
    };
    lbs_host::term::printable(&format!(
        "{:>5}  {}  {:<18} {:<10} {:<17}{generations}  by {}: {}",
        e.id,
        when(e.at),
        e.kind,
        e.pair.as_deref().unwrap_or("-"),
        e.sid.as_deref().unwrap_or("-"),
        e.actor,
        e.detail
    ))
    .into_owned()
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // A report piped into `head` ends quietly when `head` has read enough; the servers keep
    // the default (their sockets report a closed peer as an error).
    if !matches!(cli.command, Command::Serve { .. } | Command::Site { .. }) {
        sigpipe::reset();
    }
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!(
                "lbs-datacenter: {}",
                lbs_host::term::printable(&format!("{err:#}"))
            );
            ExitCode::FAILURE
        }
    }
}
