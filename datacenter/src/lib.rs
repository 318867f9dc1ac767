//! `lbs-datacenter`: the service provider's side every box talks to (DESIGN §2, §3, §10) —
//! the one place that decides which box of a pair is primary.
//!
//! - [`store`]: pairs, servers and the append-only audit log behind the [`store::Store`]
//!   trait; [`store::SqliteStore`] (one file, WAL, migrations in code). Activation assigns
//!   primary to a pair's first box and backup to its second; promotion is a compare-and-set
//!   on the pair's generation.
//! - [`keys`]: one-time activation keys (stored hashed, compared in constant time) and SIDs.
//! - [`dns`]: RFC 2136 updates signed with TSIG, each with a prerequisite on the value it
//!   replaces, so a stale decision never overwrites a newer one.
//! - [`time`]: timestamps and how they are shown.
//! - [`cli`]: `lbs-datacenter init | provision-pair | provision-backup | rekey | status | events`.
//!
//! The activation endpoint, the control API, DNS retries and the tunnel endpoints follow
//! with the rest of issue 6.

pub mod cli;
pub mod dns;
pub mod keys;
pub mod store;
pub mod time;
