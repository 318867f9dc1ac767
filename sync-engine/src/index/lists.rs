//! Block lists as the steps of a pass hold them: whole when small, read a part at a time
//! when stored, and a patched file's new list as its old one with the received values.

use super::PART_CVS;
use crate::tree::{BlockSize, Cv, SharedBlocks};

/// A stored file's block list: held, or read from where it is stored a part at a time (a
/// large file's: its list is not held whole).
#[derive(Clone)]
pub enum BlockList {
    /// In memory.
    Held(SharedBlocks),
    /// `count` values, read by part.
    Stored {
        /// Where the parts are read from.
        parts: std::sync::Arc<dyn StoredParts>,
        /// How many values the list has (what its file's length says).
        count: u64,
    },
}

/// Reads parts of one stored list (see [`PART_CVS`]).
pub trait StoredParts: Send + Sync {
    /// Part `n`, or `None` when it is missing or cannot be read.
    fn part(&self, n: u64) -> Option<Vec<Cv>>;
}

impl BlockList {
    /// How many values it has.
    pub fn len(&self) -> u64 {
        match self {
            BlockList::Held(cvs) => cvs.len() as u64,
            BlockList::Stored { count, .. } => *count,
        }
    }

    /// Whether it has none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values in order. A stored list whose part is missing, or not as long as the count
    /// says, ends there: the caller finds fewer values than [`BlockList::len`].
    pub fn iter(&self) -> impl Iterator<Item = Cv> + '_ {
        let mut part: Vec<Cv> = Vec::new();
        let mut next_part = 0u64;
        let mut at = 0usize;
        let mut given = 0u64;
        std::iter::from_fn(move || match self {
            BlockList::Held(cvs) => {
                let cv = cvs.get(at).copied();
                at += 1;
                cv
            }
            BlockList::Stored { parts, count } => {
                if given >= *count {
                    return None;
                }
                if at == part.len() {
                    let want = (*count - next_part * PART_CVS as u64).min(PART_CVS as u64);
                    part = parts.part(next_part).filter(|p| p.len() as u64 == want)?;
                    next_part += 1;
                    at = 0;
                }
                let cv = part.get(at).copied();
                at += 1;
                given += 1;
                cv
            }
        })
    }
}

impl From<Vec<Cv>> for BlockList {
    fn from(cvs: Vec<Cv>) -> BlockList {
        BlockList::Held(cvs.into())
    }
}

impl std::fmt::Debug for BlockList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlockList::Held(cvs) => write!(f, "{} values held", cvs.len()),
            BlockList::Stored { count, .. } => write!(f, "{count} values stored"),
        }
    }
}

impl PartialEq for BlockList {
    fn eq(&self, other: &BlockList) -> bool {
        match (self, other) {
            (BlockList::Held(a), BlockList::Held(b)) => a == b,
            (
                BlockList::Stored { parts: a, count: m },
                BlockList::Stored { parts: b, count: n },
            ) => std::sync::Arc::ptr_eq(a, b) && m == n,
            _ => false,
        }
    }
}

impl Eq for BlockList {}

/// A file's new version after a patch, as its list is to be recorded: the old list with the
/// received values in their places (not a new list held whole).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatchedList {
    /// The new length.
    pub len: u64,
    /// Block size of both lists.
    pub block_size: BlockSize,
    /// The new version's BLAKE3 hash.
    pub root: blake3::Hash,
    /// The old version's list.
    pub old: BlockList,
    /// The values received, by block number.
    pub changed: std::collections::BTreeMap<u64, Cv>,
}

impl PatchedList {
    /// How many values the new list has.
    pub fn count(&self) -> u64 {
        self.block_size.blocks_for(self.len)
    }
}
