//! `lbs-sync`: keeps the backup's copy of the primary's sync sets identical, verified and
//! crash-safe, moving as few bytes and doing as little I/O as the data allows.
//!
//! - [`session`]: [`serve`] and [`pull`] over an lbs connection: manifest, plan, and fetches
//!   streamed in bounded chunks between the network and a blocking writer.
//! - [`tree`]: per-block BLAKE3 tree hashes ([`TreeHash`], [`BlockSize`]); the whole-file hash
//!   is rebuilt from block values, so changed blocks are found and verified without re-reading
//!   unchanged ones.
//! - [`apply`]: [`Root`], the receiving side's only way to change files: no symlink on the
//!   way is followed, and a new version is verified, fsynced and renamed into place.
//! - [`execute`]: carries a plan out through [`Root`] with content from a [`Fetcher`];
//!   deletions go to the [`Trash`]; [`manifest`] is the sender's side.
//! - [`delta`]: the rolling delta (`fast_rsync`) for small files whose content shifted.
//! - [`journal`]: [`Patch`], a few changed blocks written into a large file in place behind
//!   a sealed redo journal, and [`recover`] after a crash.
//! - [`index`]: the persistent per-root [`Index`] (SQLite): metadata, content hash and block
//!   values of every entry.
//! - [`plan`]: from the sender's manifest and the receiver's index, the ordered [`Action`]s
//!   that make the trees equal: trash, directories, local copies, fetches, metadata.
//! - [`scan`]: one pass over a root that brings its index up to date, reading only files whose
//!   size, mtime, ctime or inode changed.
//!
//! The `lbs sync` commands build on these (see `../shared/DESIGN.md` §6).

pub mod apply;
pub mod delta;
pub mod execute;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod index;
pub mod journal;
pub mod links;
pub mod plan;
pub mod scan;
pub mod session;
pub mod trash;
pub mod tree;

pub use apply::{
    ApplyError, Durability, HashingWriter, PARTIAL_PREFIX, Root, Staged, TEMP_PREFIX, Target,
    TempFile, open_dir_nofollow, partial_name, partial_of_temp,
};
pub use execute::{
    ExecuteReport, Fetcher, LocalFetcher, OldBlocks, Progress, Record, Sink, execute, manifest,
};
pub use index::{
    BlockList, ContentHash, Entry, EntryKind, Index, IndexError, Known, Meta, StoredParts,
};
pub use journal::{JOURNAL_NAME, Patch, PatchError, Recovery, Sealed, recover};
pub use plan::{Action, Basis, Plan, PlanError, PlanSummary, Source, plan, plan_with_links};
pub use scan::{ScanError, ScanOptions, ScanReport, record_installed, scan, scan_from};
pub use session::{PackedData, PullOptions, PullReport, SenderSkipped, SessionError, pull, serve};
pub use trash::Trash;
pub use tree::{BlockSize, Cv, TreeError, TreeHash, block_cv, hash_file, root_from_blocks};
