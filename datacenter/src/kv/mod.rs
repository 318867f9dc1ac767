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

mod etcd;

pub use etcd::{EtcdKv, EtcdSettings};

/// A point in the store's history: every committed change makes a new one.
pub type Revision = i64;

/// At most this many writes go in one transaction (etcd's default `--max-txn-ops`).
pub const MAX_TXN_OPS: usize = 128;

/// The largest value a key may hold (etcd refuses requests above 1.5 MiB).
pub const MAX_VALUE_BYTES: usize = 1 << 20;

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
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
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

    /// Applies `ops` at once if every expectation holds: the new revision, or `None` when one
    /// did not (someone changed a key meanwhile; nothing was written). A transaction that
    /// was sent and not answered is [`KvError::Unconfirmed`], never a refusal.
    fn commit(&self, expect: &[Expect], ops: &[Op]) -> Result<Option<Revision>, KvError>;
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
        let (Op::Put { key, .. } | Op::Delete { key }) = op;
        if !keys.insert(key) {
            return Err(KvError::Refused {
                what: "a transaction",
                detail: format!("{key} is written twice"),
            });
        }
        if let Op::Put { key, value } = op
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
    keys: BTreeMap<String, Versioned>,
}

impl Default for MemKv {
    fn default() -> Self {
        MemKv {
            // etcd starts at revision 1.
            shared: Arc::new(Mutex::new(MemState {
                revision: 1,
                keys: BTreeMap::new(),
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
        self.shared.lock().map_err(|_| KvError::Unreachable {
            endpoints: "memory".into(),
            detail: "a writer panicked".into(),
        })
    }
}

impl Kv for MemKv {
    fn get(&self, keys: &[String]) -> Result<Read<Vec<Option<Versioned>>>, KvError> {
        let state = self.state()?;
        Ok(Read {
            revision: state.revision,
            items: keys.iter().map(|k| state.keys.get(k).cloned()).collect(),
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
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
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
            .all(|e| state.keys.get(&e.key).map(|v| v.mod_revision) == e.mod_revision);
        if !holds {
            return Ok(None);
        }
        if ops.is_empty() {
            return Ok(Some(state.revision));
        }
        state.revision += 1;
        let revision = state.revision;
        for op in ops {
            match op {
                Op::Put { key, value } => {
                    state.keys.insert(
                        key.clone(),
                        Versioned {
                            value: value.clone(),
                            mod_revision: revision,
                        },
                    );
                }
                Op::Delete { key } => {
                    state.keys.remove(key);
                }
            }
        }
        Ok(Some(revision))
    }
}
