//! What a store shared by several sites needs from its key-value engine, and nothing more:
//! reads at one revision and transactions that apply only if every key read is still at the
//! version read (optimistic concurrency: of two sites deciding on the same record, exactly one
//! commits; the other reads again). [`EtcdKv`] speaks it to etcd, the engine the field uses
//! for this (Patroni's leader key, Kubernetes' objects); [`MemKv`] is the same contract in
//! memory for in-process tests, with sites that share it and can be cut off from it.
//!
//! The contract's test suite (`datacenter/tests/kv.rs`) runs against both.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod etcd;
mod leader;

pub use etcd::{EtcdKv, EtcdSettings, EtcdTls};
pub use leader::{Candidate, Holder, holder_name};

/// A point in the store's history: every committed change makes a new one.
pub type Revision = i64;

/// At most this many writes go in one transaction (etcd's default `--max-txn-ops`).
pub const MAX_TXN_OPS: usize = 128;

/// The largest value a key may hold (etcd refuses requests above 1.5 MiB).
pub const MAX_VALUE_BYTES: usize = 1 << 20;

/// A lease: keys put with it vanish when it is neither renewed nor revoked within its time.
pub type LeaseId = i64;

/// A key's value and the revision that last changed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    pub mod_revision: Revision,
}

/// What a transaction relies on: `key` is still as it was read (`None`: still absent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expect {
    pub key: String,
    pub mod_revision: Option<Revision>,
}

impl Expect {
    /// `key` as a read found it.
    pub fn as_read(key: &str, read: Option<&Versioned>) -> Expect {
        Expect {
            key: key.to_owned(),
            mod_revision: read.map(|v| v.mod_revision),
        }
    }
}

/// A write in a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
    },
    /// A put whose key goes with `lease` (see [`Kv::grant`]).
    PutLeased {
        key: String,
        value: Vec<u8>,
        lease: LeaseId,
    },
    Delete {
        key: String,
    },
}

/// What was read, and at which revision (all of it at that one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Read<T> {
    pub revision: Revision,
    pub items: T,
}

/// What can go wrong, said so that an operator can act on it.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// No member of the store's majority answered in time: nothing may be granted, and
    /// nothing this call asked for was done.
    #[error("authority unreachable from this site ({endpoints}): {detail}")]
    Unreachable { endpoints: String, detail: String },
    /// A transaction was sent but its outcome not confirmed in time (the majority was lost
    /// meanwhile): it may still be applied once the majority answers again. Whoever sent it
    /// reads the keys back before deciding anything on them.
    #[error(
        "authority unreachable from this site ({endpoints}): {detail}; the change was sent and may still take effect when the majority answers again"
    )]
    Unconfirmed { endpoints: String, detail: String },
    /// The request was refused as such (too large, too many writes).
    #[error("the authority refused {what}: {detail}")]
    Refused { what: &'static str, detail: String },
    /// A transaction put a key on a lease that has ended (it ran out or was revoked, perhaps
    /// while the cluster changed leader): nothing was written.
    #[error("the lease of this site has ended: {detail}")]
    LeaseEnded { detail: String },
}

/// The operations a shared store is built on. Every call has a deadline.
pub trait Kv: Send {
    /// The values of `keys` (absent: `None`), in the order asked, read at one revision.
    fn get(&self, keys: &[String]) -> Result<Read<Vec<Option<Versioned>>>, KvError>;

    /// Up to `limit` keys under `prefix` that sort after `after` (all of them: `None`), in
    /// key order, with their values, read at one revision.
    fn range(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Read<Vec<(String, Versioned)>>, KvError>;

    /// Up to `limit` keys under `prefix` last changed at revision `since` or later, with their
    /// values, oldest change first (keys of one revision in key order), read at one revision.
    fn range_since(
        &self,
        prefix: &str,
        since: Revision,
        limit: usize,
    ) -> Result<Read<Vec<(String, Versioned)>>, KvError>;

    /// Applies `ops` at once if every expectation holds: the new revision, or `None` when one
    /// did not (someone changed a key meanwhile; nothing was written). A transaction that
    /// was sent and not answered is [`KvError::Unconfirmed`], never a refusal.
    fn commit(&self, expect: &[Expect], ops: &[Op]) -> Result<Option<Revision>, KvError>;

    /// A new lease of at least `ttl` (etcd counts whole seconds: rounded up).
    fn grant(&self, ttl: Duration) -> Result<LeaseId, KvError>;

    /// Renews `lease` for its whole time again: whether it was still alive (a lease that
    /// expired took its keys with it and cannot be renewed).
    fn renew(&self, lease: LeaseId) -> Result<bool, KvError>;

    /// Ends `lease` now, and its keys with it.
    fn revoke(&self, lease: LeaseId) -> Result<(), KvError>;
}

/// One engine shared by several users in a process (a site's store and its DNS role).
impl<K: Kv + Sync + ?Sized> Kv for Arc<K> {
    fn get(&self, keys: &[String]) -> Result<Read<Vec<Option<Versioned>>>, KvError> {
        (**self).get(keys)
    }

    fn range(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Read<Vec<(String, Versioned)>>, KvError> {
        (**self).range(prefix, after, limit)
    }

    fn range_since(
        &self,
        prefix: &str,
        since: Revision,
        limit: usize,
    ) -> Result<Read<Vec<(String, Versioned)>>, KvError> {
        (**self).range_since(prefix, since, limit)
    }

    fn commit(&self, expect: &[Expect], ops: &[Op]) -> Result<Option<Revision>, KvError> {
        (**self).commit(expect, ops)
    }

    fn grant(&self, ttl: Duration) -> Result<LeaseId, KvError> {
        (**self).grant(ttl)
    }

    fn renew(&self, lease: LeaseId) -> Result<bool, KvError> {
        (**self).renew(lease)
    }

    fn revoke(&self, lease: LeaseId) -> Result<(), KvError> {
        (**self).revoke(lease)
    }
}

/// A lease's time as etcd counts it: whole seconds, at least one.
fn lease_seconds(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis().div_ceil(1000).max(1)).unwrap_or(i64::MAX)
}

/// Refuses a read of more keys than etcd reads in one transaction.
fn check_get(keys: &[String]) -> Result<(), KvError> {
    if keys.len() > MAX_TXN_OPS {
        return Err(KvError::Refused {
            what: "a read",
            detail: format!("{} keys, more than the {MAX_TXN_OPS} allowed", keys.len()),
        });
    }
    Ok(())
}

/// Refuses what etcd would refuse, before anything is sent (so [`MemKv`] tests catch it).
fn check_commit(expect: &[Expect], ops: &[Op]) -> Result<(), KvError> {
    if ops.len() > MAX_TXN_OPS || expect.len() > MAX_TXN_OPS {
        return Err(KvError::Refused {
            what: "a transaction",
            detail: format!(
                "{} writes and {} expectations, more than the {MAX_TXN_OPS} allowed",
                ops.len(),
                expect.len()
            ),
        });
    }
    let mut keys = std::collections::BTreeSet::new();
    for op in ops {
        let (Op::Put { key, .. } | Op::PutLeased { key, .. } | Op::Delete { key }) = op;
        if !keys.insert(key) {
            return Err(KvError::Refused {
                what: "a transaction",
                detail: format!("{key} is written twice"),
            });
        }
        if let Op::Put { key, value } | Op::PutLeased { key, value, .. } = op
            && value.len() > MAX_VALUE_BYTES
        {
            return Err(KvError::Refused {
                what: "a value",
                detail: format!(
                    "{key} would hold {} bytes, more than {MAX_VALUE_BYTES}",
                    value.len()
                ),
            });
        }
    }
    Ok(())
}

/// The [`Kv`] contract in memory. Clones share the same data, like sites sharing one etcd;
/// each clone can be cut off from it ([`MemKv::cut_off`]) like a site cut off from the
/// majority.
#[derive(Clone, Debug)]
pub struct MemKv {
    shared: Arc<Mutex<MemState>>,
    cut_off: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Debug)]
struct MemState {
    revision: Revision,
    keys: BTreeMap<String, (Versioned, Option<LeaseId>)>,
    /// Live leases: their time and when they end.
    leases: BTreeMap<LeaseId, (Duration, Instant)>,
    next_lease: LeaseId,
}

impl MemState {
    /// Ends the leases whose time is up, and their keys (one revision, as etcd does).
    fn expire(&mut self, now: Instant) {
        let ended: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, (_, until))| *until <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in ended {
            self.end(id);
        }
    }

    fn end(&mut self, lease: LeaseId) {
        if self.leases.remove(&lease).is_none() {
            return;
        }
        let before = self.keys.len();
        self.keys.retain(|_, (_, held)| *held != Some(lease));
        if self.keys.len() != before {
            self.revision += 1;
        }
    }
}

impl Default for MemKv {
    fn default() -> Self {
        MemKv {
            // etcd starts at revision 1.
            shared: Arc::new(Mutex::new(MemState {
                revision: 1,
                keys: BTreeMap::new(),
                leases: BTreeMap::new(),
                next_lease: 1,
            })),
            cut_off: Arc::default(),
        }
    }
}

impl MemKv {
    /// Another site on the same data, not cut off.
    pub fn site(&self) -> MemKv {
        MemKv {
            shared: self.shared.clone(),
            cut_off: Arc::default(),
        }
    }

    /// Cuts this site off from the data (`true`) or brings it back.
    pub fn cut_off(&self, yes: bool) {
        self.cut_off.store(yes, std::sync::atomic::Ordering::SeqCst);
    }

    fn state(&self) -> Result<std::sync::MutexGuard<'_, MemState>, KvError> {
        if self.cut_off.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(KvError::Unreachable {
                endpoints: "memory".into(),
                detail: "this site is cut off".into(),
            });
        }
        let mut state = self.shared.lock().map_err(|_| KvError::Unreachable {
            endpoints: "memory".into(),
            detail: "a writer panicked".into(),
        })?;
        state.expire(Instant::now());
        Ok(state)
    }
}

impl Kv for MemKv {
    fn get(&self, keys: &[String]) -> Result<Read<Vec<Option<Versioned>>>, KvError> {
        check_get(keys)?;
        let state = self.state()?;
        Ok(Read {
            revision: state.revision,
            items: keys
                .iter()
                .map(|k| state.keys.get(k).map(|(v, _)| v.clone()))
                .collect(),
        })
    }

    fn range(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Read<Vec<(String, Versioned)>>, KvError> {
        let state = self.state()?;
        let items = state
            .keys
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(k, _)| after.is_none_or(|a| k.as_str() > a))
            .take(limit)
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect();
        Ok(Read {
            revision: state.revision,
            items,
        })
    }

    fn range_since(
        &self,
        prefix: &str,
        since: Revision,
        limit: usize,
    ) -> Result<Read<Vec<(String, Versioned)>>, KvError> {
        let state = self.state()?;
        let mut items: Vec<(String, Versioned)> = state
            .keys
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(_, (v, _))| v.mod_revision >= since)
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect();
        items.sort_by(|a, b| (a.1.mod_revision, &a.0).cmp(&(b.1.mod_revision, &b.0)));
        items.truncate(limit);
        Ok(Read {
            revision: state.revision,
            items,
        })
    }

    fn commit(&self, expect: &[Expect], ops: &[Op]) -> Result<Option<Revision>, KvError> {
        check_commit(expect, ops)?;
        let mut state = self.state()?;
        let holds = expect
            .iter()
            .all(|e| state.keys.get(&e.key).map(|(v, _)| v.mod_revision) == e.mod_revision);
        if !holds {
            return Ok(None);
        }
        for op in ops {
            if let Op::PutLeased { lease, .. } = op
                && !state.leases.contains_key(lease)
            {
                // etcd refuses the whole transaction.
                return Err(KvError::LeaseEnded {
                    detail: format!("lease {lease:x} not found"),
                });
            }
        }
        if ops.is_empty() {
            return Ok(Some(state.revision));
        }
        state.revision += 1;
        let revision = state.revision;
        for op in ops {
            let versioned = |value: &Vec<u8>| Versioned {
                value: value.clone(),
                mod_revision: revision,
            };
            match op {
                Op::Put { key, value } => {
                    state.keys.insert(key.clone(), (versioned(value), None));
                }
                Op::PutLeased { key, value, lease } => {
                    state
                        .keys
                        .insert(key.clone(), (versioned(value), Some(*lease)));
                }
                Op::Delete { key } => {
                    state.keys.remove(key);
                }
            }
        }
        Ok(Some(revision))
    }

    fn grant(&self, ttl: Duration) -> Result<LeaseId, KvError> {
        let mut state = self.state()?;
        let id = state.next_lease;
        state.next_lease += 1;
        let time = Duration::from_secs(lease_seconds(ttl).unsigned_abs());
        state.leases.insert(id, (time, Instant::now() + time));
        Ok(id)
    }

    fn renew(&self, lease: LeaseId) -> Result<bool, KvError> {
        let mut state = self.state()?;
        Ok(match state.leases.get_mut(&lease) {
            Some((time, until)) => {
                *until = Instant::now() + *time;
                true
            }
            None => false,
        })
    }

    fn revoke(&self, lease: LeaseId) -> Result<(), KvError> {
        self.state()?.end(lease);
        Ok(())
    }
}
