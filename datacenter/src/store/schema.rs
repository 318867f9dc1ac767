//! The schema, migration by migration, and opening a database (which brings it up to date).

use super::*;

/// The schema, one migration per step; `PRAGMA user_version` says how many ran.
pub(super) const MIGRATIONS: &[&str] = &[
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
    r#"
ALTER TABLE pairs ADD COLUMN retired_at INTEGER;
"#,
    r#"
CREATE TABLE revocations (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    crl BLOB NOT NULL,
    changed_at INTEGER NOT NULL
);
CREATE TABLE site_cas (
    site TEXT PRIMARY KEY,
    cert BLOB NOT NULL,
    issued_at INTEGER NOT NULL
);
CREATE TABLE accounts (
    name TEXT PRIMARY KEY,
    account TEXT NOT NULL
);
"#,
    r#"
CREATE INDEX promotion_requests_pending ON promotion_requests(pair_id) WHERE state = 'pending';
"#,
];

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

    /// The schema version of the database.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(db("reading the schema version"))
    }
}
