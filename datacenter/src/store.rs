//! The data center's records: pairs, their servers, and the append-only audit log — behind
//! [`Store`], so a PostgreSQL backend can follow the SQLite one ([`SqliteStore`]).
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

use crate::keys::{ActivationKey, KeyHash};

pub use crate::time::Millis;
pub use crate::view::{DnsState, RequestState, StoredReport};

/// What can go wrong, said so that the operator (or the box) can act on it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No server by that SID.
    #[error("unknown server {0}: check the SID on the provisioning sheet")]
    UnknownServer(ServerId),
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

/// A server as provisioned: its SID and one-time activation key (shown once, stored hashed).
#[derive(Clone, Debug)]
pub struct Provisioned {
    pub sid: ServerId,
    /// Its activation key.
    pub key: ActivationKey,
    /// Until when the key works.
    pub expires_at: Millis,
}

/// What a box sends to activate.
#[derive(Clone, Debug)]
pub struct ActivationRequest {
    pub sid: ServerId,
    /// The key from its sheet.
    pub key: String,
    /// Its WireGuard public key (base64).
    pub wireguard_key: String,
    /// The fingerprint of the TLS key its certificate is issued for.
    pub tls_key: String,
    /// Its office LAN address.
    pub lan_address: Ipv4Addr,
    /// Its software version.
    pub software: String,
    /// Its hardware inventory (JSON, as `lbs net inventory --json` prints it).
    pub inventory: String,
    /// Where the request came from, for the log.
    pub source: String,
}

/// What activation decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Activated {
    /// The role: primary for the pair's first box, backup for the second.
    pub role: Role,
    /// The pair's generation.
    pub generation: Generation,
    /// The box's overlay address.
    pub overlay: Ipv4Addr,
    /// The partner, if provisioned.
    pub partner: Option<ServerId>,
}

/// One server as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ServerView {
    /// The SID.
    pub sid: String,
    pub role: String,
    /// Its overlay address once activated.
    pub overlay: Option<String>,
    /// Its LAN address once activated.
    pub lan: Option<String>,
    /// Its software version.
    pub software: Option<String>,
    /// Last heartbeat, ms since the epoch.
    pub last_heartbeat_at: Option<Millis>,
    /// The generation it last reported.
    pub reported_generation: Option<u64>,
    /// The address it serves phones on, as it last said.
    pub advertised: Option<String>,
    /// Its last report (role, sync, tunnels).
    pub report: Option<StoredReport>,
}

/// One DNS record the data center keeps pointed at the pair.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DnsView {
    pub name: String,
    /// Where it must point.
    pub want: String,
    /// Where the data center last made it point.
    pub have: Option<String>,
    pub state: DnsState,
    /// Failed attempts since the last change.
    pub attempts: i64,
    /// The last failure, in words.
    pub last_error: Option<String>,
    /// When the current value was decided.
    pub changed_at: Millis,
    /// When it was last written.
    pub done_at: Option<Millis>,
}

/// A DNS record that must be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsWork {
    pub pair_id: i64,
    pub name: String,
    /// Where it must point.
    pub want: Ipv4Addr,
    /// Where the data center last made it point (`None`: never, so it must not exist yet).
    pub have: Option<Ipv4Addr>,
    /// Failed attempts so far.
    pub attempts: i64,
}

/// Why a DNS update failed, and whether waiting can help.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsFailure {
    /// What went wrong, for status and the log.
    pub why: String,
    /// The server refused it for a reason that stays until someone changes a configuration
    /// (a rejected key, a zone it does not serve, a refusal): not a server that is down.
    pub needs_operator: bool,
}

/// What a box said in its report, as the store keeps it.
#[derive(Clone, Debug)]
pub struct Report {
    /// The generation it believes in.
    pub believed: Generation,
    /// Its software version.
    pub software: String,
    /// The address it serves phones on.
    pub advertised: Ipv4Addr,
    /// The whole report, JSON.
    pub json: String,
}

/// What a promotion did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Promoted {
    /// The pair's new generation.
    pub generation: Generation,
    /// The primary before, now fenced.
    pub previous: Option<ServerId>,
    /// The same box asked again for the promotion it had been granted: nothing changed.
    pub repeat: bool,
}

/// A promotion the provider asked for (`lbs-datacenter promote`), carried out by the
/// backup's agent with the same checks as **P** at its console.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PromotionRequest {
    pub id: i64,
    pub pair: String,
    /// Who asked.
    pub requested_by: String,
    /// When.
    pub requested_at: Millis,
    /// Until when the backup may act on it.
    pub expires_at: Millis,
    pub state: RequestState,
    /// The backup's answer: the generation it was promoted at, or why it refused.
    pub answer: Option<String>,
    /// Set when the primary asked (a hand-over): why.
    pub hand_over: Option<String>,
}

/// The bounds of a hand-over.
#[derive(Clone, Copy, Debug)]
pub struct HandOverLimits {
    /// How long the backup may act on it.
    pub ttl: Duration,
    /// The backup must have reported within this.
    pub alive: Duration,
    /// No second hand-over of a pair within this.
    pub holdoff: Duration,
}

/// One pair as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PairView {
    pub name: String,
    /// The FQDN the phones use.
    pub fqdn: String,
    /// Its generation (0 before the first activation).
    pub generation: u64,
    /// The primary's SID, once there is one.
    pub primary: Option<String>,
    /// Its servers, in provisioning order.
    pub servers: Vec<ServerView>,
    /// Hardware differences between the two boxes (`None` until both reported an
    /// inventory; empty: they match).
    pub hardware_differences: Option<Vec<String>>,
    /// Its DNS records.
    pub dns: Vec<DnsView>,
}

/// One audit-log entry.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Event {
    /// Its sequence number.
    pub id: i64,
    /// When, ms since the epoch.
    pub at: Millis,
    /// The pair's name.
    pub pair: Option<String>,
    /// The server concerned.
    pub sid: Option<String>,
    /// What happened (`provisioned`, `activated`, `promoted`, …).
    pub kind: String,
    /// The generation before.
    pub from_generation: Option<u64>,
    /// The generation after.
    pub to_generation: Option<u64>,
    /// Who asked (an address, `cli`).
    pub actor: String,
    /// The rest, in words.
    pub detail: String,
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
    ) -> Result<Vec<Provisioned>, StoreError>;

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

    /// Every pair.
    fn pairs(&self) -> Result<Vec<PairView>, StoreError>;

    /// The pair `sid` belongs to.
    fn pair_of(&self, sid: ServerId) -> Result<PairView, StoreError>;

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

    /// Records the backup's refusal of request `id`.
    fn refuse_promotion(
        &mut self,
        id: i64,
        sid: ServerId,
        reason: &str,
        now: Millis,
    ) -> Result<(), StoreError>;
}

/// The schema, one migration per step; `PRAGMA user_version` says how many ran.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE pairs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    fqdn TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,
    primary_sid TEXT,
    created_at INTEGER NOT NULL
);
CREATE TABLE servers (
    sid TEXT PRIMARY KEY,
    pair_id INTEGER NOT NULL REFERENCES pairs(id),
    position INTEGER NOT NULL,
    role TEXT NOT NULL,
    key_hash BLOB,
    key_expires_at INTEGER,
    activated_at INTEGER,
    wireguard_key TEXT,
    overlay_address TEXT UNIQUE,
    lan_address TEXT,
    software TEXT,
    inventory TEXT,
    last_heartbeat_at INTEGER,
    reported_generation INTEGER,
    UNIQUE (pair_id, position)
);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    pair_id INTEGER,
    sid TEXT,
    kind TEXT NOT NULL,
    from_generation INTEGER,
    to_generation INTEGER,
    actor TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TRIGGER events_are_not_changed BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER events_are_not_deleted BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"#,
    r#"
ALTER TABLE servers ADD COLUMN advertised_address TEXT;
ALTER TABLE servers ADD COLUMN report TEXT;
ALTER TABLE servers ADD COLUMN tls_key TEXT;
ALTER TABLE servers ADD COLUMN used_key_hash BLOB;
CREATE TABLE dns_records (
    pair_id INTEGER NOT NULL REFERENCES pairs(id),
    name TEXT NOT NULL,
    want TEXT NOT NULL,
    have TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    next_try_at INTEGER NOT NULL DEFAULT 0,
    changed_at INTEGER NOT NULL,
    done_at INTEGER,
    PRIMARY KEY (pair_id, name)
);
"#,
    r#"
CREATE TABLE promotion_requests (
    id INTEGER PRIMARY KEY,
    pair_id INTEGER NOT NULL REFERENCES pairs(id),
    requested_by TEXT NOT NULL,
    requested_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    answer TEXT,
    answered_at INTEGER
);
"#,
    r#"
ALTER TABLE promotion_requests ADD COLUMN hand_over TEXT;
"#,
    r#"
ALTER TABLE dns_records ADD COLUMN needs_operator INTEGER NOT NULL DEFAULT 0;
"#,
];

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

/// A server's row, as role decisions need it.
struct Row {
    pair_id: i64,
    pair_name: String,
    fqdn: String,
    role: Role,
    generation: Generation,
    primary: Option<String>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open(path).map_err(db(&format!("opening {}", path.display())))?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(db("setting the busy timeout"))?;
        conn.pragma_update(None, "journal_mode", "wal")
            .map_err(db("switching to WAL"))?;
        conn.pragma_update(None, "synchronous", "full")
            .map_err(db("setting synchronous"))?;
        conn.pragma_update(None, "foreign_keys", "on")
            .map_err(db("enabling foreign keys"))?;
        let mut store = SqliteStore { conn };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db("starting the migration"))?;
        let done: i64 = tx
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(db("reading the schema version"))?;
        let known = MIGRATIONS.len() as i64;
        let done = usize::try_from(done).unwrap_or(usize::MAX);
        if done > MIGRATIONS.len() {
            return Err(StoreError::NotAllowed(format!(
                "the database has schema version {done}, newer than this lbs-datacenter knows ({}); upgrade lbs-datacenter",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(done) {
            tx.execute_batch(sql)
                .map_err(db(&format!("applying migration {}", i + 1)))?;
        }
        tx.pragma_update(None, "user_version", known)
            .map_err(db("recording the schema version"))?;
        tx.commit().map_err(db("committing the migration"))
    }

    /// One pair, with its servers, hardware comparison and DNS records.
    fn pair_view(&self, id: i64) -> Result<PairView, StoreError> {
        let (name, fqdn, generation, primary) = self
            .conn
            .query_row(
                "SELECT name, fqdn, generation, primary_sid FROM pairs WHERE id = ?1",
                [id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, Option<String>>(3)?,
                    ))
                },
            )
            .map_err(db("reading a pair"))?;
        let mut statement = self
            .conn
            .prepare(
                "SELECT sid, role, overlay_address, lan_address, software, last_heartbeat_at,
                        reported_generation, advertised_address, report, inventory
                 FROM servers WHERE pair_id = ?1 ORDER BY position",
            )
            .map_err(db("reading servers"))?;
        let mut inventories = Vec::new();
        let servers = statement
            .query_map([id], |r| {
                Ok((
                    ServerView {
                        sid: r.get(0)?,
                        role: r.get(1)?,
                        overlay: r.get(2)?,
                        lan: r.get(3)?,
                        software: r.get(4)?,
                        last_heartbeat_at: r.get(5)?,
                        reported_generation: r
                            .get::<_, Option<i64>>(6)?
                            .and_then(|g| u64::try_from(g).ok()),
                        advertised: r.get(7)?,
                        report: r
                            .get::<_, Option<String>>(8)?
                            .and_then(|j| serde_json::from_str::<StoredReport>(&j).ok()),
                    },
                    r.get::<_, Option<String>>(9)?,
                ))
            })
            .map_err(db("reading servers"))?
            .map(|row| {
                row.map(|(view, inventory)| {
                    inventories.push(inventory);
                    view
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(db("reading servers"))?;
        let parsed: Vec<Option<lbs_protocol::inventory::Inventory>> = inventories
            .iter()
            .map(|text| text.as_deref().and_then(|t| serde_json::from_str(t).ok()))
            .collect();
        let hardware_differences = match parsed.as_slice() {
            [Some(a), Some(b)] => Some(a.compare(b)),
            _ => None,
        };
        let mut statement = self
            .conn
            .prepare(
                "SELECT name, want, have, attempts, last_error, changed_at, done_at, needs_operator
                 FROM dns_records WHERE pair_id = ?1 ORDER BY name",
            )
            .map_err(db("reading DNS records"))?;
        let dns = statement
            .query_map([id], |r| {
                let want: String = r.get(1)?;
                let have: Option<String> = r.get(2)?;
                let attempts: i64 = r.get(3)?;
                let needs_operator: bool = r.get(7)?;
                let state = if have.as_deref() == Some(want.as_str()) {
                    DnsState::Done
                } else if attempts == 0 {
                    DnsState::Pending
                } else if needs_operator {
                    DnsState::Failed
                } else {
                    DnsState::Retrying
                };
                Ok(DnsView {
                    name: r.get(0)?,
                    want,
                    have,
                    state,
                    attempts,
                    last_error: r.get(4)?,
                    changed_at: r.get(5)?,
                    done_at: r.get(6)?,
                })
            })
            .map_err(db("reading DNS records"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db("reading DNS records"))?;
        Ok(PairView {
            name,
            fqdn,
            generation: u64::try_from(generation).unwrap_or(0),
            primary,
            servers,
            hardware_differences,
            dns,
        })
    }

    /// The schema version of the database.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(db("reading the schema version"))
    }
}

/// Starts a write transaction that holds the write lock from its first statement, so what
/// it reads cannot change before it writes.
fn begin(conn: &mut Connection) -> Result<rusqlite::Transaction<'_>, StoreError> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db("starting a transaction"))
}

#[allow(clippy::too_many_arguments)]
fn log(
    tx: &rusqlite::Transaction<'_>,
    now: Millis,
    pair_id: Option<i64>,
    sid: Option<ServerId>,
    kind: &str,
    generations: (Option<Generation>, Option<Generation>),
    actor: &str,
    detail: &str,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO events (at, pair_id, sid, kind, from_generation, to_generation, actor, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            now,
            pair_id,
            sid.map(|s| s.to_string()),
            kind,
            generations.0.map(gen_sql),
            generations.1.map(gen_sql),
            actor,
            detail
        ],
    )
    .map_err(db("appending to the audit log"))?;
    Ok(())
}

/// The SID of `sid`'s partner in pair `pair_id`, if it has one.
fn partner_of(
    tx: &rusqlite::Transaction<'_>,
    pair_id: i64,
    sid: ServerId,
) -> Result<Option<String>, StoreError> {
    tx.query_row(
        "SELECT sid FROM servers WHERE pair_id = ?1 AND sid != ?2",
        params![pair_id, sid.to_string()],
        |r| r.get(0),
    )
    .optional()
    .map_err(db("reading the partner"))
}

fn row(tx: &rusqlite::Transaction<'_>, sid: ServerId) -> Result<Row, StoreError> {
    tx.query_row(
        "SELECT s.pair_id, p.name, s.role, p.generation, p.primary_sid, p.fqdn
         FROM servers s JOIN pairs p ON p.id = s.pair_id WHERE s.sid = ?1",
        [sid.to_string()],
        |r| {
            Ok(Row {
                pair_id: r.get(0)?,
                pair_name: r.get(1)?,
                role: role_of(&r.get::<_, String>(2)?),
                generation: generation(r.get(3)?),
                primary: r.get(4)?,
                fqdn: r.get(5)?,
            })
        },
    )
    .optional()
    .map_err(db("reading a server"))?
    .ok_or(StoreError::UnknownServer(sid))
}

/// The names the data center keeps for a pair: its FQDN (the primary's advertised address),
/// and `primary.`/`backup.` in front of it (the overlay addresses).
fn dns_names(fqdn: &str) -> [String; 3] {
    let fqdn = fqdn.trim_end_matches('.');
    [
        fqdn.to_owned(),
        format!("primary.{fqdn}"),
        format!("backup.{fqdn}"),
    ]
}

/// Decides that `name` must point at `value`: a new decision starts with a clean slate of
/// attempts (the DNS worker picks it up at once).
fn want_dns(
    tx: &rusqlite::Transaction<'_>,
    pair_id: i64,
    name: &str,
    value: Ipv4Addr,
    now: Millis,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO dns_records (pair_id, name, want, changed_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (pair_id, name) DO UPDATE
           SET want = excluded.want, attempts = 0, last_error = NULL, next_try_at = 0,
               needs_operator = 0, changed_at = excluded.changed_at
           WHERE want != excluded.want",
        params![pair_id, name, value.to_string(), now],
    )
    .map_err(db("recording a DNS decision"))?;
    Ok(())
}

fn overlay_of(tx: &rusqlite::Transaction<'_>, sid: &str) -> Result<Option<Ipv4Addr>, StoreError> {
    let text: Option<String> = tx
        .query_row(
            "SELECT overlay_address FROM servers WHERE sid = ?1",
            [sid],
            |r| r.get(0),
        )
        .optional()
        .map_err(db("reading an overlay address"))?
        .flatten();
    Ok(text.and_then(|t| t.parse().ok()))
}

/// Inserts a server with a fresh SID and key at `position` of the pair.
fn new_server(
    tx: &rusqlite::Transaction<'_>,
    pair_id: i64,
    position: i64,
    key_ttl: Duration,
    now: Millis,
) -> Result<Provisioned, StoreError> {
    let key = ActivationKey::generate();
    let expires_at = now.saturating_add(ms(key_ttl));
    // A fresh random SID; a collision (one in 2^48 per pair of boxes) just tries again.
    loop {
        let sid = crate::keys::random_sid();
        let inserted = tx
            .execute(
                "INSERT OR IGNORE INTO servers (sid, pair_id, position, role, key_hash, key_expires_at)
                 VALUES (?1, ?2, ?3, 'unactivated', ?4, ?5)",
                params![
                    sid.to_string(),
                    pair_id,
                    position,
                    key.hash().as_bytes().as_slice(),
                    expires_at
                ],
            )
            .map_err(db("adding a server"))?;
        if inserted == 1 {
            return Ok(Provisioned {
                sid,
                key,
                expires_at,
            });
        }
    }
}

/// The lowest free host address of `pool` from its 10th (the first few are the data
/// center's own).
fn free_address(tx: &rusqlite::Transaction<'_>, pool: Ipv4Cidr) -> Result<Ipv4Addr, StoreError> {
    let used: std::collections::BTreeSet<Ipv4Addr> = {
        let mut statement = tx
            .prepare("SELECT overlay_address FROM servers WHERE overlay_address IS NOT NULL")
            .map_err(db("reading overlay addresses"))?;
        let rows = statement
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(db("reading overlay addresses"))?;
        let mut used = std::collections::BTreeSet::new();
        for text in rows {
            if let Ok(ip) = text.map_err(db("reading overlay addresses"))?.parse() {
                used.insert(ip);
            }
        }
        used
    };
    let network = u32::from(pool.network());
    let size = 1u64 << (32 - u32::from(pool.prefix.min(32)));
    (10..size.saturating_sub(256).max(10))
        .filter_map(|offset| u32::try_from(offset).ok())
        .map(|offset| Ipv4Addr::from(network.wrapping_add(offset)))
        .find(|ip| !used.contains(ip))
        .ok_or(StoreError::PoolExhausted(pool))
}

impl Store for SqliteStore {
    fn provision_pair(
        &mut self,
        name: &str,
        fqdn: &str,
        servers: usize,
        key_ttl: Duration,
        now: Millis,
    ) -> Result<Vec<Provisioned>, StoreError> {
        if !(1..=2).contains(&servers) {
            return Err(StoreError::NotAllowed(format!(
                "a pair has one or two servers, not {servers}"
            )));
        }
        let tx = begin(&mut self.conn)?;
        let inserted = tx
            .execute(
                "INSERT OR IGNORE INTO pairs (name, fqdn, created_at) VALUES (?1, ?2, ?3)",
                params![name, fqdn, now],
            )
            .map_err(db("adding a pair"))?;
        if inserted == 0 {
            return Err(StoreError::PairExists(name.to_owned()));
        }
        let pair_id = tx.last_insert_rowid();
        let mut made = Vec::new();
        for position in 0..servers {
            let server = new_server(&tx, pair_id, position as i64, key_ttl, now)?;
            log(
                &tx,
                now,
                Some(pair_id),
                Some(server.sid),
                "provisioned",
                (None, None),
                "cli",
                &format!(
                    "pair {name} ({fqdn}), key valid until {}",
                    crate::time::utc(server.expires_at)
                ),
            )?;
            made.push(server);
        }
        tx.commit().map_err(db("committing"))?;
        Ok(made)
    }

    fn provision_backup(
        &mut self,
        partner: ServerId,
        key_ttl: Duration,
        now: Millis,
    ) -> Result<Provisioned, StoreError> {
        let tx = begin(&mut self.conn)?;
        let row = row(&tx, partner)?;
        let count: i64 = tx
            .query_row(
                "SELECT COUNT(*) FROM servers WHERE pair_id = ?1",
                [row.pair_id],
                |r| r.get(0),
            )
            .map_err(db("counting servers"))?;
        if count >= 2 {
            return Err(StoreError::PairFull(row.pair_name));
        }
        let server = new_server(&tx, row.pair_id, 1, key_ttl, now)?;
        log(
            &tx,
            now,
            Some(row.pair_id),
            Some(server.sid),
            "provisioned",
            (None, None),
            "cli",
            &format!("backup for {partner} in pair {}", row.pair_name),
        )?;
        tx.commit().map_err(db("committing"))?;
        Ok(server)
    }

    fn rekey(
        &mut self,
        sid: ServerId,
        key_ttl: Duration,
        now: Millis,
    ) -> Result<Provisioned, StoreError> {
        let tx = begin(&mut self.conn)?;
        let row = row(&tx, sid)?;
        let key = ActivationKey::generate();
        let expires_at = now.saturating_add(ms(key_ttl));
        tx.execute(
            "UPDATE servers SET key_hash = ?2, key_expires_at = ?3 WHERE sid = ?1",
            params![
                sid.to_string(),
                key.hash().as_bytes().as_slice(),
                expires_at
            ],
        )
        .map_err(db("storing the new key"))?;
        log(
            &tx,
            now,
            Some(row.pair_id),
            Some(sid),
            "rekeyed",
            (None, None),
            "cli",
            &format!(
                "new activation key for the {} of pair {}, valid until {}",
                row.role,
                row.pair_name,
                crate::time::utc(expires_at)
            ),
        )?;
        tx.commit().map_err(db("committing"))?;
        Ok(Provisioned {
            sid,
            key,
            expires_at,
        })
    }

    fn activate(
        &mut self,
        request: &ActivationRequest,
        pool: Ipv4Cidr,
        now: Millis,
    ) -> Result<Activated, StoreError> {
        let sid = request.sid;
        let tx = begin(&mut self.conn)?;
        let row = row(&tx, sid)?;
        let (stored, expires, used, keys) = tx
            .query_row(
                "SELECT key_hash, key_expires_at, used_key_hash, wireguard_key, tls_key
                 FROM servers WHERE sid = ?1",
                [sid.to_string()],
                |r| {
                    Ok((
                        r.get::<_, Option<Vec<u8>>>(0)?,
                        r.get::<_, Option<Millis>>(1)?,
                        r.get::<_, Option<Vec<u8>>>(2)?,
                        (
                            r.get::<_, Option<String>>(3)?,
                            r.get::<_, Option<String>>(4)?,
                        ),
                    ))
                },
            )
            .map_err(db("reading the key"))?;
        // The same box asking again with the same key and the same public keys (the answer
        // to its first request was lost): it gets the same answer, nothing changes.
        let repeat = stored.is_none()
            && used
                .as_deref()
                .and_then(KeyHash::from_slice)
                .is_some_and(|hash| hash.matches(&request.key))
            && keys.0.as_deref() == Some(request.wireguard_key.as_str())
            && keys.1.as_deref() == Some(request.tls_key.as_str());
        if repeat {
            let overlay = overlay_of(&tx, &sid.to_string())?;
            let partner: Option<String> = partner_of(&tx, row.pair_id, sid)?;
            if let Some(overlay) = overlay {
                log(
                    &tx,
                    now,
                    Some(row.pair_id),
                    Some(sid),
                    "activation-repeated",
                    (None, None),
                    &request.source,
                    "the same box asked again (its first answer was lost); same answer",
                )?;
                tx.commit().map_err(db("committing"))?;
                return Ok(Activated {
                    role: row.role,
                    generation: row.generation,
                    overlay,
                    partner: partner.and_then(|p| p.parse().ok()),
                });
            }
        }
        let refusal = match stored.as_deref().and_then(KeyHash::from_slice) {
            None => Some(Refusal::Used),
            Some(hash) if !hash.matches(&request.key) => Some(Refusal::WrongKey),
            Some(_) if expires.is_none_or(|at| now > at) => Some(Refusal::Expired),
            Some(_) => None,
        };
        if let Some(why) = refusal {
            // The refusal is logged in its own transaction: the box learns nothing more.
            drop(tx);
            let tx = begin(&mut self.conn)?;
            log(
                &tx,
                now,
                Some(row.pair_id),
                Some(sid),
                "activation-refused",
                (None, None),
                &request.source,
                &why.to_string(),
            )?;
            tx.commit().map_err(db("committing"))?;
            return Err(StoreError::ActivationRefused { sid, why });
        }
        let kept: Option<String> = tx
            .query_row(
                "SELECT overlay_address FROM servers WHERE sid = ?1",
                [sid.to_string()],
                |r| r.get(0),
            )
            .map_err(db("reading the overlay address"))?;
        // A re-activation (a reinstalled box with a fresh key) keeps its address and role;
        // otherwise the first box of the pair to activate is primary at generation 1 and the
        // second its backup.
        let reactivation = row.role != Role::Unactivated;
        let overlay = match kept.and_then(|text| text.parse().ok()) {
            Some(address) => address,
            None => free_address(&tx, pool)?,
        };
        let (role, generation) = match (reactivation, &row.primary) {
            (true, _) => (row.role, row.generation),
            (false, None) => (Role::Primary, Generation::FIRST),
            (false, Some(_)) => (Role::Backup, row.generation),
        };
        tx.execute(
            "UPDATE servers SET role = ?2, used_key_hash = key_hash, key_hash = NULL,
               activated_at = ?3, wireguard_key = ?4, overlay_address = ?5, lan_address = ?6,
               software = ?7, inventory = ?8, reported_generation = ?9, tls_key = ?10
             WHERE sid = ?1",
            params![
                sid.to_string(),
                role_text(role),
                now,
                request.wireguard_key,
                overlay.to_string(),
                request.lan_address.to_string(),
                request.software,
                request.inventory,
                gen_sql(generation),
                request.tls_key
            ],
        )
        .map_err(db("activating"))?;
        tx.execute(
            "UPDATE servers SET advertised_address = COALESCE(advertised_address, ?2) WHERE sid = ?1",
            params![sid.to_string(), request.lan_address.to_string()],
        )
        .map_err(db("recording the advertised address"))?;
        let [fqdn, primary_name, backup_name] = dns_names(&row.fqdn);
        if role == Role::Primary {
            tx.execute(
                "UPDATE pairs SET primary_sid = ?2, generation = ?3 WHERE id = ?1",
                params![row.pair_id, sid.to_string(), gen_sql(generation)],
            )
            .map_err(db("recording the primary"))?;
            if !reactivation {
                want_dns(&tx, row.pair_id, &fqdn, request.lan_address, now)?;
            }
            want_dns(&tx, row.pair_id, &primary_name, overlay, now)?;
        } else {
            want_dns(&tx, row.pair_id, &backup_name, overlay, now)?;
        }
        let partner: Option<String> = tx
            .query_row(
                "SELECT sid FROM servers WHERE pair_id = ?1 AND sid != ?2",
                params![row.pair_id, sid.to_string()],
                |r| r.get(0),
            )
            .optional()
            .map_err(db("reading the partner"))?;
        log(
            &tx,
            now,
            Some(row.pair_id),
            Some(sid),
            if reactivation {
                "reactivated"
            } else {
                "activated"
            },
            (
                (row.generation.0 > 0).then_some(row.generation),
                Some(generation),
            ),
            &request.source,
            &format!(
                "{role} of pair {}, overlay {overlay}, LAN {}, software {}",
                row.pair_name, request.lan_address, request.software
            ),
        )?;
        tx.commit().map_err(db("committing"))?;
        Ok(Activated {
            role,
            generation,
            overlay,
            partner: partner.and_then(|p| p.parse().ok()),
        })
    }

    fn promote(
        &mut self,
        sid: ServerId,
        believed: Generation,
        advertised: Ipv4Addr,
        actor: &str,
        now: Millis,
    ) -> Result<Promoted, StoreError> {
        let tx = begin(&mut self.conn)?;
        let row = row(&tx, sid)?;
        if row.role == Role::Primary && believed.next() == Some(row.generation) {
            // The same box asking again for the promotion it was granted (the answer was
            // lost, or it crashed before recording it): the same answer, nothing changes.
            let previous: Option<String> = partner_of(&tx, row.pair_id, sid)?;
            return Ok(Promoted {
                generation: row.generation,
                previous: previous.and_then(|o| o.parse().ok()),
                repeat: true,
            });
        }
        if row.role != Role::Backup {
            return Err(StoreError::NotAllowed(format!(
                "{sid} is {} of pair {}, not its backup: only the backup can be promoted",
                row.role, row.pair_name
            )));
        }
        let next = believed
            .next()
            .ok_or_else(|| StoreError::NotAllowed("the generation counter is exhausted".into()))?;
        // The compare-and-set: only if nobody moved the generation since the box looked.
        let changed = tx
            .execute(
                "UPDATE pairs SET generation = ?3, primary_sid = ?2 WHERE id = ?1 AND generation = ?4",
                params![row.pair_id, sid.to_string(), gen_sql(next), gen_sql(believed)],
            )
            .map_err(db("promoting"))?;
        if changed == 0 {
            return Err(StoreError::StaleGeneration {
                believed,
                current: row.generation,
            });
        }
        let old = row.primary.clone();
        // For the audit: how long before this the old primary last reported (a short time
        // means it may have been alive: a forced P).
        let old_heard: Option<Millis> = match old.as_deref() {
            Some(old) => tx
                .query_row(
                    "SELECT last_heartbeat_at FROM servers WHERE sid = ?1",
                    [old],
                    |r| r.get(0),
                )
                .map_err(db("reading the old primary's last report"))?,
            None => None,
        };
        tx.execute(
            "UPDATE servers SET role = 'fenced' WHERE pair_id = ?1 AND role = 'primary'",
            [row.pair_id],
        )
        .map_err(db("fencing the old primary"))?;
        tx.execute(
            "UPDATE servers SET role = 'primary', reported_generation = ?2, advertised_address = ?3
             WHERE sid = ?1",
            params![sid.to_string(), gen_sql(next), advertised.to_string()],
        )
        .map_err(db("recording the new primary"))?;
        let [fqdn, primary_name, backup_name] = dns_names(&row.fqdn);
        want_dns(&tx, row.pair_id, &fqdn, advertised, now)?;
        if let Some(overlay) = overlay_of(&tx, &sid.to_string())? {
            want_dns(&tx, row.pair_id, &primary_name, overlay, now)?;
        }
        if let Some(overlay) = old
            .as_deref()
            .map(|o| overlay_of(&tx, o))
            .transpose()?
            .flatten()
        {
            want_dns(&tx, row.pair_id, &backup_name, overlay, now)?;
        }
        log(
            &tx,
            now,
            Some(row.pair_id),
            Some(sid),
            "promoted",
            (Some(believed), Some(next)),
            actor,
            &format!(
                "{sid} is primary of pair {}, advertising {advertised}; {} is fenced{}",
                row.pair_name,
                old.as_deref().unwrap_or("nobody"),
                match old_heard {
                    Some(at) => format!(
                        " (last heard {:.1} s before)",
                        now.saturating_sub(at) as f64 / 1000.0
                    ),
                    None if old.is_some() => " (never heard)".to_owned(),
                    None => String::new(),
                }
            ),
        )?;
        tx.execute(
            "UPDATE promotion_requests SET state = 'promoted', answer = ?2, answered_at = ?3
             WHERE pair_id = ?1 AND state = 'pending'",
            params![row.pair_id, format!("promoted at {next}"), now],
        )
        .map_err(db("answering the promotion request"))?;
        tx.commit().map_err(db("committing"))?;
        Ok(Promoted {
            generation: next,
            previous: old.and_then(|o| o.parse().ok()),
            repeat: false,
        })
    }

    fn register_backup(
        &mut self,
        sid: ServerId,
        actor: &str,
        now: Millis,
    ) -> Result<Generation, StoreError> {
        let tx = begin(&mut self.conn)?;
        let row = row(&tx, sid)?;
        match row.role {
            Role::Backup => return Ok(row.generation),
            Role::Fenced => {}
            Role::Primary => {
                return Err(StoreError::NotAllowed(format!(
                    "{sid} is the current primary of pair {}: promote its partner first",
                    row.pair_name
                )));
            }
            Role::Unactivated => {
                return Err(StoreError::NotAllowed(format!(
                    "{sid} is not activated yet"
                )));
            }
        }
        tx.execute(
            "UPDATE servers SET role = 'backup', reported_generation = ?2 WHERE sid = ?1",
            params![sid.to_string(), gen_sql(row.generation)],
        )
        .map_err(db("registering the backup"))?;
        log(
            &tx,
            now,
            Some(row.pair_id),
            Some(sid),
            "registered-backup",
            (Some(row.generation), Some(row.generation)),
            actor,
            &format!("{sid} is backup of pair {}", row.pair_name),
        )?;
        tx.commit().map_err(db("committing"))?;
        Ok(row.generation)
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
        tx.execute(
            "UPDATE servers SET last_heartbeat_at = ?2, reported_generation = ?3, software = ?4,
               advertised_address = ?5, report = ?6
             WHERE sid = ?1",
            params![
                sid.to_string(),
                now,
                gen_sql(report.believed),
                report.software,
                report.advertised.to_string(),
                report.json
            ],
        )
        .map_err(db("recording a heartbeat"))?;
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

    fn pairs(&self) -> Result<Vec<PairView>, StoreError> {
        let ids = self
            .conn
            .prepare("SELECT id FROM pairs ORDER BY name")
            .map_err(db("reading pairs"))?
            .query_map([], |r| r.get::<_, i64>(0))
            .map_err(db("reading pairs"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db("reading pairs"))?;
        ids.into_iter().map(|id| self.pair_view(id)).collect()
    }

    fn pair_of(&self, sid: ServerId) -> Result<PairView, StoreError> {
        let id: i64 = self
            .conn
            .query_row(
                "SELECT pair_id FROM servers WHERE sid = ?1",
                [sid.to_string()],
                |r| r.get(0),
            )
            .optional()
            .map_err(db("reading a server"))?
            .ok_or(StoreError::UnknownServer(sid))?;
        self.pair_view(id)
    }

    fn certificate_key(&self, sid: ServerId) -> Result<Option<String>, StoreError> {
        self.conn
            .query_row(
                "SELECT tls_key FROM servers WHERE sid = ?1",
                [sid.to_string()],
                |r| r.get(0),
            )
            .optional()
            .map_err(db("reading a certificate key"))?
            .ok_or(StoreError::UnknownServer(sid))
    }

    fn tunnel_peers(&self) -> Result<Vec<(String, Ipv4Addr)>, StoreError> {
        let mut statement = self
            .conn
            .prepare(
                "SELECT wireguard_key, overlay_address FROM servers
                 WHERE wireguard_key IS NOT NULL AND overlay_address IS NOT NULL ORDER BY sid",
            )
            .map_err(db("reading tunnel peers"))?;
        let rows = statement
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(db("reading tunnel peers"))?;
        let mut peers = Vec::new();
        for row in rows {
            let (key, overlay) = row.map_err(db("reading tunnel peers"))?;
            if let Ok(overlay) = overlay.parse() {
                peers.push((key, overlay));
            }
        }
        Ok(peers)
    }

    fn tunnel_pairs(&self) -> Result<Vec<Vec<(String, Ipv4Addr)>>, StoreError> {
        let mut statement = self
            .conn
            .prepare(
                "SELECT pair_id, wireguard_key, overlay_address FROM servers
                 WHERE wireguard_key IS NOT NULL AND overlay_address IS NOT NULL
                 ORDER BY pair_id, wireguard_key",
            )
            .map_err(db("reading tunnel peers"))?;
        let rows = statement
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(db("reading tunnel peers"))?;
        let mut pairs: Vec<(i64, Vec<(String, Ipv4Addr)>)> = Vec::new();
        for row in rows {
            let (pair, key, overlay) = row.map_err(db("reading tunnel peers"))?;
            let Ok(overlay) = overlay.parse() else {
                continue;
            };
            match pairs.last_mut() {
                Some((last, boxes)) if *last == pair => boxes.push((key, overlay)),
                _ => pairs.push((pair, vec![(key, overlay)])),
            }
        }
        Ok(pairs.into_iter().map(|(_, boxes)| boxes).collect())
    }

    fn dns_due(&self, now: Millis) -> Result<Vec<DnsWork>, StoreError> {
        let mut statement = self
            .conn
            .prepare(
                "SELECT pair_id, name, want, have, attempts FROM dns_records
                 WHERE have IS NOT want AND next_try_at <= ?1 ORDER BY changed_at",
            )
            .map_err(db("reading DNS records"))?;
        let rows = statement
            .query_map([now], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })
            .map_err(db("reading DNS records"))?;
        let mut due = Vec::new();
        for row in rows {
            let (pair_id, name, want, have, attempts) = row.map_err(db("reading DNS records"))?;
            // Only this module writes these columns, always from an Ipv4Addr.
            let Ok(want) = want.parse() else { continue };
            due.push(DnsWork {
                pair_id,
                name,
                want,
                have: have.and_then(|h| h.parse().ok()),
                attempts,
            });
        }
        Ok(due)
    }

    fn dns_result(
        &mut self,
        work: &DnsWork,
        result: Result<(), DnsFailure>,
        retry_at: Millis,
        now: Millis,
    ) -> Result<bool, StoreError> {
        let tx = begin(&mut self.conn)?;
        let mut escalated = false;
        match result {
            Ok(()) => {
                tx.execute(
                    "UPDATE dns_records SET have = ?3, attempts = 0, last_error = NULL, done_at = ?4,
                            needs_operator = 0
                     WHERE pair_id = ?1 AND name = ?2",
                    params![work.pair_id, work.name, work.want.to_string(), now],
                )
                .map_err(db("recording a DNS update"))?;
                log(
                    &tx,
                    now,
                    Some(work.pair_id),
                    None,
                    "dns-updated",
                    (None, None),
                    "dns",
                    &format!(
                        "{} → {} (was {})",
                        work.name,
                        work.want,
                        work.have.map_or("absent".to_owned(), |h| h.to_string())
                    ),
                )?;
            }
            Err(failure) => {
                let before: Option<(Option<String>, bool)> = tx
                    .query_row(
                        "SELECT last_error, needs_operator FROM dns_records
                         WHERE pair_id = ?1 AND name = ?2 AND want = ?3",
                        params![work.pair_id, work.name, work.want.to_string()],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()
                    .map_err(db("reading a DNS record"))?;
                // Only if the decision is still the one that was tried: a newer one starts
                // with a clean slate.
                tx.execute(
                    "UPDATE dns_records SET attempts = attempts + 1, last_error = ?4, next_try_at = ?5,
                            needs_operator = ?6
                     WHERE pair_id = ?1 AND name = ?2 AND want = ?3",
                    params![
                        work.pair_id,
                        work.name,
                        work.want.to_string(),
                        failure.why,
                        retry_at,
                        failure.needs_operator
                    ],
                )
                .map_err(db("recording a DNS failure"))?;
                escalated = failure.needs_operator
                    && before.is_some_and(|(last, needed)| {
                        !needed || last.as_deref() != Some(failure.why.as_str())
                    });
                if escalated {
                    log(
                        &tx,
                        now,
                        Some(work.pair_id),
                        None,
                        "dns-failed",
                        (None, None),
                        "dns",
                        &format!("{} → {}: {}", work.name, work.want, failure.why),
                    )?;
                }
            }
        }
        tx.commit().map_err(db("committing"))?;
        Ok(escalated)
    }

    fn dns_found(&mut self, work: &DnsWork, value: Option<Ipv4Addr>) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE dns_records SET have = ?3 WHERE pair_id = ?1 AND name = ?2",
                params![work.pair_id, work.name, value.map(|v| v.to_string())],
            )
            .map_err(db("recording a DNS record's value"))?;
        Ok(())
    }

    fn events(&self, after: i64) -> Result<Vec<Event>, StoreError> {
        let mut statement = self
            .conn
            .prepare(
                "SELECT e.id, e.at, p.name, e.sid, e.kind, e.from_generation, e.to_generation,
                        e.actor, e.detail
                 FROM events e LEFT JOIN pairs p ON p.id = e.pair_id
                 WHERE e.id > ?1 ORDER BY e.id",
            )
            .map_err(db("reading the audit log"))?;
        let events = statement
            .query_map([after], |r| {
                Ok(Event {
                    id: r.get(0)?,
                    at: r.get(1)?,
                    pair: r.get(2)?,
                    sid: r.get(3)?,
                    kind: r.get(4)?,
                    from_generation: r
                        .get::<_, Option<i64>>(5)?
                        .and_then(|g| u64::try_from(g).ok()),
                    to_generation: r
                        .get::<_, Option<i64>>(6)?
                        .and_then(|g| u64::try_from(g).ok()),
                    actor: r.get(7)?,
                    detail: r.get(8)?,
                })
            })
            .map_err(db("reading the audit log"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db("reading the audit log"))?;
        Ok(events)
    }

    fn request_promotion(
        &mut self,
        pair: &str,
        actor: &str,
        ttl: Duration,
        now: Millis,
    ) -> Result<PromotionRequest, StoreError> {
        let tx = begin(&mut self.conn)?;
        expire_requests(&tx, now)?;
        let pair_id: i64 = tx
            .query_row("SELECT id FROM pairs WHERE name = ?1", [pair], |r| r.get(0))
            .optional()
            .map_err(db("reading the pair"))?
            .ok_or_else(|| StoreError::NotAllowed(format!("there is no pair called {pair:?}")))?;
        let backup: Option<String> = tx
            .query_row(
                "SELECT sid FROM servers WHERE pair_id = ?1 AND role = 'backup'",
                [pair_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(db("reading the pair's backup"))?;
        let Some(backup) = backup else {
            return Err(StoreError::NotAllowed(format!(
                "pair {pair:?} has no activated backup to promote"
            )));
        };
        if let Some(pending) =
            request_where(&tx, "r.pair_id = ?1 AND r.state = 'pending'", pair_id)?
        {
            return Err(StoreError::NotAllowed(format!(
                "request {} by {} for pair {pair:?} is still pending",
                pending.id, pending.requested_by
            )));
        }
        tx.execute(
            "INSERT INTO promotion_requests (pair_id, requested_by, requested_at, expires_at)
             VALUES (?1, ?2, ?3, ?4)",
            params![pair_id, actor, now, now.saturating_add(ms(ttl))],
        )
        .map_err(db("recording the promotion request"))?;
        let id = tx.last_insert_rowid();
        log(
            &tx,
            now,
            Some(pair_id),
            backup.parse().ok(),
            "promotion requested",
            (None, None),
            actor,
            &format!(
                "request {id}: promote {backup}, the backup of pair {pair}, within {} s",
                ttl.as_secs()
            ),
        )?;
        let request = request_where(&tx, "r.id = ?1", id)?
            .ok_or_else(|| StoreError::NotAllowed(format!("request {id} vanished")))?;
        tx.commit().map_err(db("committing"))?;
        Ok(request)
    }

    fn hand_over(
        &mut self,
        from: ServerId,
        reason: &str,
        limits: HandOverLimits,
        now: Millis,
    ) -> Result<PromotionRequest, StoreError> {
        let tx = begin(&mut self.conn)?;
        expire_requests(&tx, now)?;
        let row = row(&tx, from)?;
        if row.role != Role::Primary {
            return Err(StoreError::NotAllowed(format!(
                "{from} is {} of pair {}: only the primary hands over",
                row.role, row.pair_name
            )));
        }
        let backup: Option<(String, Option<Millis>, Option<String>)> = tx
            .query_row(
                "SELECT sid, last_heartbeat_at, report FROM servers WHERE pair_id = ?1 AND role = 'backup'",
                [row.pair_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(db("reading the pair's backup"))?;
        let Some((backup, heard, report)) = backup else {
            return Err(StoreError::NotAllowed(format!(
                "pair {} has no backup to hand over to",
                row.pair_name
            )));
        };
        if heard.is_none_or(|at| now.saturating_sub(at) > ms(limits.alive)) {
            return Err(StoreError::NotAllowed(format!(
                "the backup {backup} has not reported for {}: not handing over to it",
                heard.map_or("ever".to_owned(), |at| format!(
                    "{:.0} s",
                    now.saturating_sub(at) as f64 / 1000.0
                ))
            )));
        }
        let report: StoredReport = report
            .as_deref()
            .and_then(|r| serde_json::from_str(r).ok())
            .unwrap_or_default();
        if !report.in_sync() {
            return Err(StoreError::NotAllowed(format!(
                "the backup {backup} is not in sync by its last report: not handing over to it"
            )));
        }
        let last: Option<Millis> = tx
            .query_row(
                "SELECT MAX(requested_at) FROM promotion_requests WHERE pair_id = ?1 AND hand_over IS NOT NULL",
                [row.pair_id],
                |r| r.get(0),
            )
            .map_err(db("reading the last hand-over"))?;
        if let Some(at) = last.filter(|at| now.saturating_sub(*at) < ms(limits.holdoff)) {
            return Err(StoreError::NotAllowed(format!(
                "pair {} handed over {:.0} s ago; the next hand-over may be asked {:.0} s after it",
                row.pair_name,
                now.saturating_sub(at) as f64 / 1000.0,
                limits.holdoff.as_secs_f64()
            )));
        }
        if let Some(pending) =
            request_where(&tx, "r.pair_id = ?1 AND r.state = 'pending'", row.pair_id)?
        {
            return Err(StoreError::NotAllowed(format!(
                "request {} by {} is still pending",
                pending.id, pending.requested_by
            )));
        }
        let actor = format!("{from} (the primary)");
        tx.execute(
            "INSERT INTO promotion_requests (pair_id, requested_by, requested_at, expires_at, hand_over)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![row.pair_id, actor, now, now.saturating_add(ms(limits.ttl)), reason],
        )
        .map_err(db("recording the hand-over"))?;
        let id = tx.last_insert_rowid();
        log(
            &tx,
            now,
            Some(row.pair_id),
            Some(from),
            "hand-over requested",
            (None, None),
            &actor,
            &format!("request {id}: hand the role to {backup}: {reason}"),
        )?;
        let request = request_where(&tx, "r.id = ?1", id)?
            .ok_or_else(|| StoreError::NotAllowed(format!("request {id} vanished")))?;
        tx.commit().map_err(db("committing"))?;
        Ok(request)
    }

    fn promotion_request(&mut self, id: i64, now: Millis) -> Result<PromotionRequest, StoreError> {
        let tx = begin(&mut self.conn)?;
        expire_requests(&tx, now)?;
        let request = request_where(&tx, "r.id = ?1", id)?
            .ok_or_else(|| StoreError::NotAllowed(format!("there is no promotion request {id}")))?;
        tx.commit().map_err(db("committing"))?;
        Ok(request)
    }

    fn pending_promotion(
        &mut self,
        sid: ServerId,
        now: Millis,
    ) -> Result<Option<PromotionRequest>, StoreError> {
        let tx = begin(&mut self.conn)?;
        expire_requests(&tx, now)?;
        let row = row(&tx, sid)?;
        let request = if row.role == Role::Backup {
            request_where(&tx, "r.pair_id = ?1 AND r.state = 'pending'", row.pair_id)?
        } else {
            None
        };
        tx.commit().map_err(db("committing"))?;
        Ok(request)
    }

    fn refuse_promotion(
        &mut self,
        id: i64,
        sid: ServerId,
        reason: &str,
        now: Millis,
    ) -> Result<(), StoreError> {
        let tx = begin(&mut self.conn)?;
        let row = row(&tx, sid)?;
        // The request went to the backup; the primary (or a fenced box) has no say in it,
        // and its refusal changes nothing (as a late one does).
        if row.role != Role::Backup {
            tracing::warn!(
                %sid,
                id,
                "a refusal of a promotion request from the pair's {}, not its backup: ignored",
                row.role
            );
            return Ok(());
        }
        let changed = tx
            .execute(
                "UPDATE promotion_requests SET state = 'refused', answer = ?3, answered_at = ?4
                 WHERE id = ?1 AND pair_id = ?2 AND state = 'pending'",
                params![id, row.pair_id, reason, now],
            )
            .map_err(db("answering the promotion request"))?;
        if changed == 1 {
            log(
                &tx,
                now,
                Some(row.pair_id),
                Some(sid),
                "promotion refused",
                (Some(row.generation), None),
                &sid.to_string(),
                &format!("request {id}: {reason}"),
            )?;
        }
        tx.commit().map_err(db("committing"))?;
        Ok(())
    }
}

/// Pending requests past their time become `expired` (logged once).
fn expire_requests(tx: &rusqlite::Transaction<'_>, now: Millis) -> Result<(), StoreError> {
    let expired: Vec<(i64, i64)> = {
        let mut statement = tx
            .prepare(
                "SELECT id, pair_id FROM promotion_requests WHERE state = 'pending' AND expires_at <= ?1",
            )
            .map_err(db("reading promotion requests"))?;
        statement
            .query_map([now], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(db("reading promotion requests"))?
            .collect::<Result<_, _>>()
            .map_err(db("reading promotion requests"))?
    };
    for (id, pair_id) in expired {
        tx.execute(
            "UPDATE promotion_requests SET state = 'expired', answer = 'the backup did not act on it in time (is its agent running and reporting?)', answered_at = ?2 WHERE id = ?1",
            params![id, now],
        )
        .map_err(db("expiring a promotion request"))?;
        log(
            tx,
            now,
            Some(pair_id),
            None,
            "promotion request expired",
            (None, None),
            "data center",
            &format!("request {id}: the backup did not act on it in time"),
        )?;
    }
    Ok(())
}

/// The one request matching `condition` (on `r`, with `?1` = `value`).
fn request_where(
    tx: &rusqlite::Transaction<'_>,
    condition: &str,
    value: i64,
) -> Result<Option<PromotionRequest>, StoreError> {
    tx.query_row(
        &format!(
            "SELECT r.id, p.name, r.requested_by, r.requested_at, r.expires_at, r.state, r.answer,
                    r.hand_over
             FROM promotion_requests r JOIN pairs p ON p.id = r.pair_id
             WHERE {condition} ORDER BY r.id DESC LIMIT 1"
        ),
        [value],
        |r| {
            Ok(PromotionRequest {
                id: r.get(0)?,
                pair: r.get(1)?,
                requested_by: r.get(2)?,
                requested_at: r.get(3)?,
                expires_at: r.get(4)?,
                state: r.get(5)?,
                answer: r.get(6)?,
                hand_over: r.get(7)?,
            })
        },
    )
    .optional()
    .map_err(db("reading a promotion request"))
}
