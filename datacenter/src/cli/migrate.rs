//! `lbs-datacenter migrate --to etcd`: a single site's SQLite records moved into the shared
//! store, so the site can become one of several.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::DATABASE;
use crate::config::StoreSettings;
use crate::kv::EtcdKv;
use crate::store::{KvStore, SqliteStore};

/// A `serve.alive` younger than this means serve is running here.
const RUNNING: Duration = Duration::from_secs(10);

pub(super) fn migrate(dir: &Path, config: &Path) -> anyhow::Result<ExitCode> {
    let StoreSettings::Etcd { etcd, prefix, .. } = StoreSettings::load(config)? else {
        bail!(
            "{} names no shared store: set [store] backend = \"etcd\" with its endpoints (and TLS files) there first",
            config.display()
        );
    };
    let alive = dir.join(crate::serve::ALIVE_FILE);
    if let Ok(age) = std::fs::metadata(&alive)
        .and_then(|m| m.modified())
        .map(|at| at.elapsed().unwrap_or_default())
        && age < RUNNING
    {
        bail!(
            "serve is running at this site ({} renewed {:.0} s ago): stop it first (systemctl stop lbs-datacenter), so no decision is taken during the move",
            alive.display(),
            age.as_secs_f64()
        );
    }
    let database = dir.join(DATABASE);
    if !database.exists() {
        bail!("no database at {}: nothing to migrate", database.display());
    }
    let started = Instant::now();
    let export = SqliteStore::open(&database)?.export()?;
    let endpoints = etcd.endpoints.join(", ");
    let kv = EtcdKv::open(etcd).with_context(|| format!("opening etcd ({endpoints})"))?;
    let mut store = KvStore::new(Box::new(kv), &prefix);
    let moved = store
        .import(&export)
        .with_context(|| format!("writing into etcd ({endpoints}) under {prefix}"))?;
    lbs_host::say!(
        "migrated {} pairs ({} servers, generations kept) and {} events from {} to etcd ({endpoints}) under {prefix} in {:.1} s; serve now at every site with this [store] section",
        moved.pairs,
        moved.servers,
        moved.events,
        database.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
