//! The SQLite rooms' shared helpers: the write transaction, the audit log's append, a
//! server's row, and the refusals and audit words both stores use.

use super::*;

/// A server's row, as role decisions need it.
pub(super) struct Row {
    pub(super) pair_id: i64,
    pub(super) pair_name: String,
    pub(super) fqdn: String,
    pub(super) role: Role,
    pub(super) generation: Generation,
    pub(super) primary: Option<String>,
}

/// Starts a write transaction that holds the write lock from its first statement, so what
/// it reads cannot change before it writes.
pub(super) fn begin(conn: &mut Connection) -> Result<rusqlite::Transaction<'_>, StoreError> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db("starting a transaction"))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn log(
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
pub(super) fn partner_of(
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

pub(super) fn row(tx: &rusqlite::Transaction<'_>, sid: ServerId) -> Result<Row, StoreError> {
    let (row, retired) = tx
        .query_row(
            "SELECT s.pair_id, p.name, s.role, p.generation, p.primary_sid, p.fqdn, p.retired_at
             FROM servers s JOIN pairs p ON p.id = s.pair_id WHERE s.sid = ?1",
            [sid.to_string()],
            |r| {
                Ok((
                    Row {
                        pair_id: r.get(0)?,
                        pair_name: r.get(1)?,
                        role: role_of(&r.get::<_, String>(2)?),
                        generation: generation(r.get(3)?),
                        primary: r.get(4)?,
                        fqdn: r.get(5)?,
                    },
                    r.get::<_, Option<Millis>>(6)?,
                ))
            },
        )
        .optional()
        .map_err(db("reading a server"))?
        .ok_or(StoreError::UnknownServer(sid))?;
    not_retired(sid, &row.pair_name, retired)?;
    Ok(row)
}

/// The audit log's words for a promotion: who is primary, where, who is fenced and how long
/// before it was last heard (a short time: it may have been alive, a forced P).
pub(super) fn promoted_detail(
    sid: ServerId,
    pair: &str,
    advertised: Ipv4Addr,
    old: Option<&str>,
    old_heard: Option<Millis>,
    now: Millis,
) -> String {
    format!(
        "{sid} is primary of pair {pair}, advertising {advertised}; {} is fenced{}",
        old.unwrap_or("nobody"),
        match old_heard {
            Some(at) => format!(
                " (last heard {:.1} s before)",
                now.saturating_sub(at) as f64 / 1000.0
            ),
            None if old.is_some() => " (never heard)".to_owned(),
            None => String::new(),
        }
    )
}

/// Refuses a pair of other than one or two servers.
pub(super) fn check_servers(servers: usize) -> Result<(), StoreError> {
    if (1..=2).contains(&servers) {
        Ok(())
    } else {
        Err(StoreError::NotAllowed(format!(
            "a pair has one or two servers, not {servers}"
        )))
    }
}

/// The audit log's words for a pair retired with its servers `sids`.
pub(super) fn retired_detail(pair: &str, sids: &[ServerId]) -> String {
    let list: Vec<String> = sids.iter().map(ServerId::to_string).collect();
    format!(
        "pair {pair} retired: {} refused from now on",
        if list.is_empty() {
            "no server".to_owned()
        } else {
            list.join(", ")
        }
    )
}

/// The refusal of a pair name that is taken (by a pair retired `retired`, or in use).
pub(super) fn name_taken(name: &str, retired: Option<Millis>) -> StoreError {
    match retired {
        Some(at) => StoreError::NotAllowed(format!(
            "a pair called {name:?} was retired {}: its name stays with its audit log; choose another",
            crate::time::utc(at)
        )),
        None => StoreError::PairExists(name.to_owned()),
    }
}

/// Refuses a server of a retired pair.
pub(super) fn not_retired(
    sid: ServerId,
    pair: &str,
    retired: Option<Millis>,
) -> Result<(), StoreError> {
    match retired {
        Some(at) => Err(StoreError::Retired {
            sid,
            pair: pair.to_owned(),
            at,
        }),
        None => Ok(()),
    }
}

/// When pair `name` was retired (`None`: it was not, or there is no such pair).
pub(super) fn retired_at(conn: &Connection, name: &str) -> Result<Option<Millis>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT retired_at FROM pairs WHERE name = ?1",
            [name],
            |r| r.get::<_, Option<Millis>>(0),
        )
        .optional()
        .map_err(db("reading the pair"))?
        .flatten())
}

/// Pairs still served (not retired), for the queries over all of them.
pub(super) const SERVED_PAIRS: &str = "SELECT id FROM pairs WHERE retired_at IS NULL";

pub(super) fn overlay_of(
    tx: &rusqlite::Transaction<'_>,
    sid: &str,
) -> Result<Option<Ipv4Addr>, StoreError> {
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
