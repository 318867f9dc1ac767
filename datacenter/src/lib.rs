//! `lbs-datacenter`: the service provider's side every box talks to (DESIGN §2, §3, §10) —
//! the one place that decides which box of a pair is primary.
//!
//! - [`store`]: pairs, servers and the append-only audit log behind the [`store::Store`]
//!   trait; [`store::SqliteStore`] (one file, WAL, migrations in code). Activation assigns
//!   primary to a pair's first box and backup to its second; promotion is a compare-and-set
//!   on the pair's generation.
//! - [`authority`]: the store a site's `[store]` names (SQLite, or etcd shared by the sites
//!   with the DNS role held by one site at a time).
//! - [`accounts`]: the portal's accounts (argon2id password hashes, viewer or operator).
//! - [`ca_files`]: the root boxes pin (its key offline-capable), each site's own CA under it,
//!   and the revoked sites' list.
//! - [`kv`]: the key-value contract the shared store is built on, on etcd and in memory.
//! - [`keys`]: one-time activation keys (stored hashed, compared in constant time) and SIDs.
//! - [`dns`]: RFC 2136 updates signed with TSIG, each with a prerequisite on the value it
//!   replaces, so a stale decision never overwrites a newer one.
//! - [`serve`]: the activation endpoint (TLS, server-authenticated; a box sends its SID, key,
//!   CSR, WireGuard key, LAN address and inventory and gets its certificate, role and pair),
//!   the control API (mutual TLS: reports answered with the pair's state — `Fenced` for a
//!   stale primary —, promotion, registration as backup), the DNS worker (retries with
//!   backoff, state in `status`) and the WireGuard endpoints (every activated box a peer).
//! - [`site`]: another site running only tunnel endpoints, their peers following the main
//!   site's control API (mutual TLS with a data-center certificate) and cached on disk.
//! - [`history`]: boxes' resource samples for the portal, a day of every sample and 90 days of
//!   5-minute averages, in each site's own file.
//! - [`fleet`]: what needs a person, pair by pair, and the fleet in numbers (`status`).
//! - [`config`]: `serve`'s (and `site`'s) TOML, every field defaulted.
//! - [`time`]: timestamps and how they are shown.
//! - [`view`]: the states the store keeps and shows (DNS record, promotion request, a box's
//!   last report), as types.
//! - [`cli`]: `lbs-datacenter init | provision-pair | provision-backup | rekey | serve | promote |
//!   status | events | site-identity | site`.

pub mod accounts;
pub mod authority;
pub mod ca_files;
pub mod cli;
pub mod config;
pub mod dns;
pub mod fleet;
pub mod history;
pub mod isolation;
pub mod keys;
pub mod kv;
pub mod serve;
pub mod site;
pub mod store;
pub mod time;
pub mod view;
