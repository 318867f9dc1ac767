//! The data center's records: pairs, their servers, and the append-only audit log — behind
//! [`Store`]: SQLite for one site ([`SqliteStore`], the default), or a key-value engine the
//! sites share, etcd ([`KvStore`]).
//!
//! Every decision about roles is one transaction that checks what it relies on: activation
//! assigns primary to the first box of a pair and backup to the second; a promotion is a
//! compare-and-set on the pair's generation, so of two racing promotions exactly one wins.
//! Each change appends its event in the same transaction: the log is complete or the change
//! did not happen.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use lbs_protocol::net::Ipv4Cidr;
use lbs_protocol::{Generation, Role, ServerId};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::accounts::Account;
use crate::keys::{ActivationKey, KeyHash};

pub use crate::time::Millis;
pub use crate::view::{DnsState, RequestState, StoredReport};

mod accounts;
mod activation;
pub use accounts::check_note;
mod dns;
mod export;
mod liveness;
mod reading;
mod requests;
mod roles;
mod schema;
mod sql;
use sql::*;
mod shared;
mod types;

use dns::{dns_names, want_dns};
pub use export::Export;
pub use liveness::ReportKind;
pub use shared::{EVENTS_KEPT, KvStore, Migrated};
pub use types::*;

/// What can go wrong, said so that the operator (or the box) can act on it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No server by that SID.
    #[error("unknown server {0}: check the SID on the provisioning sheet")]
    UnknownServer(ServerId),
    /// The server's pair was retired (`lbs-datacenter retire`).
    #[error("{sid} belongs to pair {pair}, retired {}: the data center serves it no more", crate::time::utc(*.at))]
    Retired {
        sid: ServerId,
        pair: String,
        at: Millis,
    },
    /// A pair by that name exists.
    #[error("a pair called {0:?} exists already")]
    PairExists(String),
    /// The activation key is wrong, used, or expired (the reason is logged, not told).
    #[error("activation of {sid} refused: {why}")]
    ActivationRefused {
        sid: ServerId,
        /// Why.
        why: Refusal,
    },
    /// The pair has two servers already.
    #[error("pair {0:?} has its two servers already")]
    PairFull(String),
    /// A role change the pair's state does not allow.
    #[error("{0}")]
    NotAllowed(String),
    /// A promotion lost a race or was based on an old generation.
    #[error(
        "promotion refused: the pair is at {current}, the request was for {believed} (another box was promoted first)"
    )]
    StaleGeneration {
        /// What the requester believed.
        believed: Generation,
        /// What the pair has.
        current: Generation,
    },
    /// The overlay address pool is exhausted.
    #[error("no free overlay address left in {0}")]
    PoolExhausted(Ipv4Cidr),
    /// The shared store's authority (etcd) could not be reached or did not confirm.
    #[error(transparent)]
    Authority(#[from] crate::kv::KvError),
    /// A record in the shared store cannot be read (written by a newer lbs-datacenter, or
    /// by hand).
    #[error(
        "the record {key} in the shared store is unreadable ({detail}): was it written by a newer lbs-datacenter or by hand?"
    )]
    Corrupt { key: String, detail: String },
    /// A promotion that needs the pair's primary silent for `quiet_ms` while it reported
    /// `silent_ms` ago.
    #[error(
        "the primary {primary} reported {:.1} s ago: it is alive; a promotion that needs it silent for {:.1} s is refused",
        *.silent_ms as f64 / 1000.0,
        *.quiet_ms as f64 / 1000.0
    )]
    PrimaryAlive {
        primary: String,
        silent_ms: u64,
        quiet_ms: u64,
    },
    /// Other sites kept changing the records a decision relied on.
    #[error("{0}")]
    Busy(String),
    /// The database failed.
    #[error("database {what}: {error}")]
    Db {
        /// What was being done.
        what: String,
        /// What SQLite said.
        error: rusqlite::Error,
    },
}

/// Why an activation key was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The key does not match.
    WrongKey,
    /// The key was used (the box is activated; re-activation needs a fresh key).
    Used,
    /// The key is past its expiry.
    Expired,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::WrongKey => "wrong activation key",
            Refusal::Used => {
                "this box is activated already; re-activation needs a fresh key (lbs-datacenter rekey --sid SID)"
            }
            Refusal::Expired => "the activation key has expired; ask for a fresh one",
        })
    }
}

fn db(what: &str) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
    move |error| StoreError::Db {
        what: what.to_owned(),
        error,
    }
}

/// The data center's records. Every method is one transaction.
pub trait Store {
    /// A new pair with two servers (or one, for a box that runs alone until a backup is
    /// added), each with an activation key valid for `key_ttl`.
    fn provision_pair(
        &mut self,
        name: &str,
        fqdn: &str,
        servers: usize,
        key_ttl: Duration,
        now: Millis,
    ) -> Result<Vec<Provisioned>, StoreError> {
        let pair = [(name.to_owned(), fqdn.to_owned())];
        let mut made = self.provision_pairs(&pair, servers, key_ttl, now)?;
        Ok(made.pop().unwrap_or_default())
    }

    /// [`Store::provision_pair`] for many pairs (name, FQDN) in one transaction: all of them
    /// or, on the first error, none.
    fn provision_pairs(
        &mut self,
        pairs: &[(String, String)],
        servers: usize,
        key_ttl: Duration,
        now: Millis,
    ) -> Result<Vec<Vec<Provisioned>>, StoreError>;

    /// Adds the second server to the pair of `partner`.
    fn provision_backup(
        &mut self,
        partner: ServerId,
        key_ttl: Duration,
        now: Millis,
    ) -> Result<Provisioned, StoreError>;

    /// A fresh activation key for a provisioned server (a lost sheet, an expired key, or a
    /// reinstalled box: re-activation keeps its role and overlay address).
    fn rekey(
        &mut self,
        sid: ServerId,
        key_ttl: Duration,
        now: Millis,
    ) -> Result<Provisioned, StoreError>;

    /// Activates a box: checks its key (used once), records its keys and addresses, gives it
    /// an overlay address from `pool` and its role.
    fn activate(
        &mut self,
        request: &ActivationRequest,
        pool: Ipv4Cidr,
        now: Millis,
    ) -> Result<Activated, StoreError>;

    /// Makes `sid` (the pair's backup) primary, if the pair is still at `believed`; the
    /// pair's name is to point at `advertised` from now on.
    fn promote(
        &mut self,
        sid: ServerId,
        believed: Generation,
        advertised: Ipv4Addr,
        actor: &str,
        now: Millis,
    ) -> Result<Promoted, StoreError>;

    /// Records that `sid` (fenced, or the old primary) is the pair's backup now.
    fn register_backup(
        &mut self,
        sid: ServerId,
        actor: &str,
        now: Millis,
    ) -> Result<Generation, StoreError>;

    /// Records a heartbeat; returns the role the box must have now (a box that believes it
    /// is primary at a lower generation is `Fenced`).
    fn heartbeat(
        &mut self,
        sid: ServerId,
        report: &Report,
        now: Millis,
    ) -> Result<(Role, Generation), StoreError>;

    /// Whether `report` only says `sid` is alive ([`ReportKind::Liveness`], recorded later in
    /// a batch by [`Store::heartbeats`]) or changes a decision (recorded now by
    /// [`Store::heartbeat`]). An error for a box that may not report.
    fn report_kind(&self, sid: ServerId, report: &Report) -> Result<ReportKind, StoreError>;

    /// Who sends the DNS updates: this site, or with a store the sites share, the site that
    /// holds the role now.
    fn dns_sender(&self) -> Result<DnsSender, StoreError> {
        Ok(DnsSender::OwnSite)
    }

    /// What answering `sid`'s report needs, read together: whether it changes a decision
    /// ([`Store::report_kind`]), the pending promotion it is to act on (asked only when
    /// `requests`: [`Store::pending_promotion`]) and its pair ([`Store::pair_of`]).
    fn look(
        &mut self,
        sid: ServerId,
        report: &Report,
        requests: bool,
        now: Millis,
    ) -> Result<Look, StoreError> {
        let kind = self.report_kind(sid, report)?;
        let request = if requests {
            self.pending_promotion(sid, now)?
        } else {
            None
        };
        Ok(Look {
            kind,
            request,
            pair: self.pair_of(sid)?,
        })
    }

    /// Records many reports in one transaction: each box's last heartbeat, generation,
    /// software, address and report.
    fn heartbeats(&mut self, batch: &[(ServerId, Report, Millis)]) -> Result<(), StoreError>;

    /// Every pair.
    fn pairs(&self) -> Result<Vec<PairView>, StoreError>;

    /// The pair `sid` belongs to.
    fn pair_of(&self, sid: ServerId) -> Result<PairView, StoreError>;

    /// The pair called `name`, unless there is none or it is retired.
    fn pair_named(&self, name: &str) -> Result<Option<PairView>, StoreError> {
        Ok(self.pairs()?.into_iter().find(|p| p.name == name))
    }

    /// The fingerprint of the TLS key `sid`'s current certificate was issued for (`None`
    /// before activation).
    fn certificate_key(&self, sid: ServerId) -> Result<Option<String>, StoreError>;

    /// Every activated box's WireGuard key and overlay address: the peers of the data
    /// center's tunnel endpoints.
    fn tunnel_peers(&self) -> Result<Vec<(String, Ipv4Addr)>, StoreError>;

    /// [`Store::tunnel_peers`] pair by pair: who may reach whom through the endpoints.
    fn tunnel_pairs(&self) -> Result<Vec<Vec<(String, Ipv4Addr)>>, StoreError>;

    /// The DNS records that differ from what was decided and are due for a try at `now`.
    fn dns_due(&self, now: Millis) -> Result<Vec<DnsWork>, StoreError>;

    /// Records that `work` was written (`Ok`) or failed (`Err`, to be tried again at
    /// `retry_at`). A decision taken meanwhile stays pending. A failure that needs the
    /// operator goes into the audit log when it is new (not for every retry); the answer says
    /// whether it was.
    fn dns_result(
        &mut self,
        work: &DnsWork,
        result: Result<(), DnsFailure>,
        retry_at: Millis,
        now: Millis,
    ) -> Result<bool, StoreError>;

    /// Records that the name holds `value` now (found by a query after a refused
    /// compare-and-swap: someone else changed it), so the next try replaces that.
    fn dns_found(&mut self, work: &DnsWork, value: Option<Ipv4Addr>) -> Result<(), StoreError>;

    /// The audit log after event `after` (0: all), oldest first.
    fn events(&self, after: i64) -> Result<Vec<Event>, StoreError>;

    /// Asks for the promotion of pair `pair`'s backup, valid until `now + ttl`; one pending
    /// request per pair.
    fn request_promotion(
        &mut self,
        pair: &str,
        actor: &str,
        ttl: Duration,
        now: Millis,
    ) -> Result<PromotionRequest, StoreError>;

    /// The primary `from` asks to hand its role to the backup (its PBX is down): a request
    /// like the provider's, refused when the backup is not heard within `alive`, not in sync
    /// by its last report, or the pair handed over less than `holdoff` ago.
    fn hand_over(
        &mut self,
        from: ServerId,
        reason: &str,
        limits: HandOverLimits,
        now: Millis,
    ) -> Result<PromotionRequest, StoreError>;

    /// The request `id` as it stands (pending ones past their time are `expired`).
    fn promotion_request(&mut self, id: i64, now: Millis) -> Result<PromotionRequest, StoreError>;

    /// The pending request for `sid`, if it is its pair's backup and one is pending.
    fn pending_promotion(
        &mut self,
        sid: ServerId,
        now: Millis,
    ) -> Result<Option<PromotionRequest>, StoreError>;

    /// Retires pair `pair`: from now on its servers are refused everywhere (activation, the
    /// control API, the tunnel endpoints, promotion requests), its DNS names are no longer
    /// updated, and `status` leaves it out; its records stay, and the audit log says when and
    /// by whom. Its SIDs.
    fn retire_pair(
        &mut self,
        pair: &str,
        actor: &str,
        now: Millis,
    ) -> Result<Vec<ServerId>, StoreError>;

    /// When pair `pair` was retired (`None`: it was not, or there is no such pair).
    fn retired(&self, pair: &str) -> Result<Option<Millis>, StoreError>;

    /// Records the backup's refusal of request `id`.
    fn refuse_promotion(
        &mut self,
        id: i64,
        sid: ServerId,
        reason: &str,
        now: Millis,
    ) -> Result<(), StoreError>;

    /// The root's revocation list of sites' CAs (DER) every site enforces, if one was issued.
    fn revocation_list(&self) -> Result<Option<Vec<u8>>, StoreError>;

    /// Replaces the revocation list (`lbs-datacenter site-revoke`).
    fn set_revocation_list(&mut self, crl: &[u8], now: Millis) -> Result<(), StoreError>;

    /// The CA certificate (DER) the root last issued for `site`, kept where every site can
    /// find it to revoke it.
    fn site_ca(&self, site: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Records the CA the root issued for `site` (replacing an earlier one).
    fn record_site_ca(&mut self, site: &str, cert: &[u8], now: Millis) -> Result<(), StoreError>;

    /// Writes an operator's note about pair `pair` into its audit log (kind `note`, the
    /// text as the detail, `actor` who wrote it).
    fn note(&mut self, pair: &str, actor: &str, text: &str, now: Millis) -> Result<(), StoreError>;

    /// The portal's accounts, by name.
    fn accounts(&self) -> Result<Vec<Account>, StoreError>;

    /// Adds an account or replaces the one of its name.
    fn put_account(&mut self, account: &Account) -> Result<(), StoreError>;

    /// Removes an account; whether there was one.
    fn remove_account(&mut self, name: &str) -> Result<bool, StoreError>;
}

/// The SQLite store: one file, WAL, migrations applied on open.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Connection,
}

fn role_text(role: Role) -> &'static str {
    match role {
        Role::Unactivated => "unactivated",
        Role::Primary => "primary",
        Role::Backup => "backup",
        Role::Fenced => "fenced",
    }
}

fn role_of(text: &str) -> Role {
    match text {
        "primary" => Role::Primary,
        "backup" => Role::Backup,
        "fenced" => Role::Fenced,
        _ => Role::Unactivated,
    }
}

fn generation(value: i64) -> Generation {
    Generation(u64::try_from(value).unwrap_or(0))
}

fn gen_sql(generation: Generation) -> i64 {
    i64::try_from(generation.0).unwrap_or(i64::MAX)
}

fn ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

impl Store for SqliteStore {
    fn provision_pairs(
        &mut self,
        pairs: &[(String, String)],
        servers: usize,
        key_ttl: Duration,
        now: Millis,
    ) -> Result<Vec<Vec<Provisioned>>, StoreError> {
        self.provision_pairs_in(pairs, servers, key_ttl, now)
    }

    fn provision_backup(
        &mut self,
        partner: ServerId,
        key_ttl: Duration,
        now: Millis,
    ) -> Result<Provisioned, StoreError> {
        self.provision_backup_in(partner, key_ttl, now)
    }

    fn rekey(
        &mut self,
        sid: ServerId,
        key_ttl: Duration,
        now: Millis,
    ) -> Result<Provisioned, StoreError> {
        self.rekey_in(sid, key_ttl, now)
    }

    fn activate(
        &mut self,
        request: &ActivationRequest,
        pool: Ipv4Cidr,
        now: Millis,
    ) -> Result<Activated, StoreError> {
        self.activate_in(request, pool, now)
    }

    fn promote(
        &mut self,
        sid: ServerId,
        believed: Generation,
        advertised: Ipv4Addr,
        actor: &str,
        now: Millis,
    ) -> Result<Promoted, StoreError> {
        self.promote_in(sid, believed, advertised, actor, now)
    }

    fn register_backup(
        &mut self,
        sid: ServerId,
        actor: &str,
        now: Millis,
    ) -> Result<Generation, StoreError> {
        self.register_backup_in(sid, actor, now)
    }

    fn heartbeat(
        &mut self,
        sid: ServerId,
        report: &Report,
        now: Millis,
    ) -> Result<(Role, Generation), StoreError> {
        let tx = begin(&mut self.conn)?;
        let row = row(&tx, sid)?;
        if row.role == Role::Unactivated {
            return Err(StoreError::NotAllowed(format!(
                "{sid} is not activated yet"
            )));
        }
        liveness::write_report(&tx, sid, report, now)?;
        // The primary's address may change (a new uplink): the pair's name follows it.
        if row.role == Role::Primary && report.believed == row.generation {
            let [fqdn, ..] = dns_names(&row.fqdn);
            want_dns(&tx, row.pair_id, &fqdn, report.advertised, now)?;
        }
        tx.commit().map_err(db("committing"))?;
        // A box behind the pair's generation that is not the backup is fenced, whatever it
        // believes (the store already records it so).
        Ok((row.role, row.generation))
    }

    fn report_kind(&self, sid: ServerId, report: &Report) -> Result<ReportKind, StoreError> {
        self.report_kind_in(sid, report)
    }

    fn heartbeats(&mut self, batch: &[(ServerId, Report, Millis)]) -> Result<(), StoreError> {
        self.heartbeats_in(batch)
    }

    fn pairs(&self) -> Result<Vec<PairView>, StoreError> {
        self.pairs_in()
    }

    fn pair_of(&self, sid: ServerId) -> Result<PairView, StoreError> {
        self.pair_of_in(sid)
    }

    fn pair_named(&self, name: &str) -> Result<Option<PairView>, StoreError> {
        self.pair_named_in(name)
    }

    fn certificate_key(&self, sid: ServerId) -> Result<Option<String>, StoreError> {
        self.certificate_key_in(sid)
    }

    fn tunnel_peers(&self) -> Result<Vec<(String, Ipv4Addr)>, StoreError> {
        self.tunnel_peers_in()
    }

    fn tunnel_pairs(&self) -> Result<Vec<Vec<(String, Ipv4Addr)>>, StoreError> {
        self.tunnel_pairs_in()
    }

    fn dns_due(&self, now: Millis) -> Result<Vec<DnsWork>, StoreError> {
        self.dns_due_in(now)
    }

    fn dns_result(
        &mut self,
        work: &DnsWork,
        result: Result<(), DnsFailure>,
        retry_at: Millis,
        now: Millis,
    ) -> Result<bool, StoreError> {
        self.dns_result_in(work, result, retry_at, now)
    }

    fn dns_found(&mut self, work: &DnsWork, value: Option<Ipv4Addr>) -> Result<(), StoreError> {
        self.dns_found_in(work, value)
    }

    fn events(&self, after: i64) -> Result<Vec<Event>, StoreError> {
        self.events_in(after)
    }

    fn request_promotion(
        &mut self,
        pair: &str,
        actor: &str,
        ttl: Duration,
        now: Millis,
    ) -> Result<PromotionRequest, StoreError> {
        self.request_promotion_in(pair, actor, ttl, now)
    }

    fn hand_over(
        &mut self,
        from: ServerId,
        reason: &str,
        limits: HandOverLimits,
        now: Millis,
    ) -> Result<PromotionRequest, StoreError> {
        self.hand_over_in(from, reason, limits, now)
    }

    fn promotion_request(&mut self, id: i64, now: Millis) -> Result<PromotionRequest, StoreError> {
        self.promotion_request_in(id, now)
    }

    fn pending_promotion(
        &mut self,
        sid: ServerId,
        now: Millis,
    ) -> Result<Option<PromotionRequest>, StoreError> {
        self.pending_promotion_in(sid, now)
    }

    fn refuse_promotion(
        &mut self,
        id: i64,
        sid: ServerId,
        reason: &str,
        now: Millis,
    ) -> Result<(), StoreError> {
        self.refuse_promotion_in(id, sid, reason, now)
    }

    fn retired(&self, pair: &str) -> Result<Option<Millis>, StoreError> {
        retired_at(&self.conn, pair)
    }

    fn retire_pair(
        &mut self,
        pair: &str,
        actor: &str,
        now: Millis,
    ) -> Result<Vec<ServerId>, StoreError> {
        self.retire_pair_in(pair, actor, now)
    }

    fn revocation_list(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.revocation_list_in()
    }

    fn set_revocation_list(&mut self, crl: &[u8], now: Millis) -> Result<(), StoreError> {
        self.set_revocation_list_in(crl, now)
    }

    fn site_ca(&self, site: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.site_ca_in(site)
    }

    fn record_site_ca(&mut self, site: &str, cert: &[u8], now: Millis) -> Result<(), StoreError> {
        self.record_site_ca_in(site, cert, now)
    }

    fn note(&mut self, pair: &str, actor: &str, text: &str, now: Millis) -> Result<(), StoreError> {
        self.note_in(pair, actor, text, now)
    }

    fn accounts(&self) -> Result<Vec<Account>, StoreError> {
        self.accounts_in()
    }

    fn put_account(&mut self, account: &Account) -> Result<(), StoreError> {
        self.put_account_in(account)
    }

    fn remove_account(&mut self, name: &str) -> Result<bool, StoreError> {
        self.remove_account_in(name)
    }
}
