//! The records a site decides on, as its configuration's `[store]` says: this site's SQLite
//! file, or etcd shared by every site — then sending DNS updates is a role one site holds at
//! a time ([`crate::kv::Candidate`]), so two sites never write a pair's name at once and a
//! site gone hands it on within the role's lease.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};

use crate::config::StoreSettings;
use crate::kv::{Candidate, EtcdKv};
use crate::store::{KvStore, SqliteStore, Store};

/// The SQLite file in the data directory.
pub const DATABASE: &str = "datacenter.db";

/// A store of either backend.
pub type AnyStore = Box<dyn Store + Send>;

/// Handles on a shared store a site uses at once: decisions and reports of different boxes
/// wait for the authority's round trips side by side, not one behind the other.
const SHARED_HANDLES: usize = 8;

/// What a site decides with.
pub struct Authority {
    /// Handles on the same records: one for SQLite (one writer), several for a shared store.
    pub stores: Vec<AnyStore>,
    /// With a shared store: the site's bid for sending the DNS updates.
    pub dns_role: Option<DnsRole>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("dns_role", &self.dns_role)
            .finish_non_exhaustive()
    }
}

/// A site's bid for the DNS role, on the engine its store uses.
#[derive(Debug)]
pub struct DnsRole {
    pub kv: Arc<EtcdKv>,
    pub candidate: Candidate,
}

/// Opens the store `settings` name for site `site`; SQLite's file must exist (`init` makes
/// it).
pub fn open(dir: &Path, settings: &StoreSettings, site: &str) -> anyhow::Result<Authority> {
    match settings {
        StoreSettings::Sqlite => {
            let path = dir.join(DATABASE);
            if !path.exists() {
                bail!(
                    "no database at {}: run `lbs-datacenter --dir {} init` first",
                    path.display(),
                    dir.display()
                );
            }
            Ok(Authority {
                stores: vec![Box::new(SqliteStore::open(&path)?)],
                dns_role: None,
            })
        }
        StoreSettings::Etcd {
            etcd,
            prefix,
            dns_lease,
        } => {
            let kv = Arc::new(EtcdKv::open(etcd.clone()).with_context(|| {
                format!("opening the store on etcd ({})", etcd.endpoints.join(", "))
            })?);
            let stores: Vec<KvStore> = (0..SHARED_HANDLES)
                .map(|_| KvStore::new(Box::new(kv.clone()), prefix))
                .collect();
            let role_key = stores[0].dns_role_key();
            Ok(Authority {
                stores: stores
                    .into_iter()
                    .map(|s| Box::new(s) as AnyStore)
                    .collect(),
                dns_role: Some(DnsRole {
                    kv,
                    candidate: Candidate::new(&role_key, site, *dns_lease),
                }),
            })
        }
    }
}

/// The store of the data directory `dir`, as `<dir>/datacenter.toml` says (the commands that
/// only read or decide once: provisioning, promote, status, events).
pub fn open_store(dir: &Path) -> anyhow::Result<AnyStore> {
    let settings = StoreSettings::load(&dir.join(crate::config::CONFIG_FILE))?;
    open(dir, &settings, "cli")?
        .stores
        .into_iter()
        .next()
        .context("no store opened")
}
