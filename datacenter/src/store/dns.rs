//! The DNS records the data center keeps pointed at each pair: what is wanted, what is due,
//! and what the last try did.

use super::*;

/// The names the data center keeps for a pair: its FQDN (the primary's advertised address),
/// and `primary.`/`backup.` in front of it (the overlay addresses).
pub(super) fn dns_names(fqdn: &str) -> [String; 3] {
    let fqdn = fqdn.trim_end_matches('.');
    [
        fqdn.to_owned(),
        format!("primary.{fqdn}"),
        format!("backup.{fqdn}"),
    ]
}

/// Decides that `name` must point at `value`: a new decision starts with a clean slate of
/// attempts (the DNS worker picks it up at once).
pub(super) fn want_dns(
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

impl SqliteStore {
    pub(super) fn dns_due_in(&self, now: Millis) -> Result<Vec<DnsWork>, StoreError> {
        let mut statement = self
            .conn
            .prepare(&format!(
                "SELECT d.pair_id, d.name, d.want, d.have, d.attempts, p.name
                     FROM dns_records d JOIN pairs p ON p.id = d.pair_id
                     WHERE d.have IS NOT d.want AND d.next_try_at <= ?1
                     AND d.pair_id IN ({SERVED_PAIRS}) ORDER BY d.changed_at"
            ))
            .map_err(db("reading DNS records"))?;
        let rows = statement
            .query_map([now], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, String>(5)?,
                ))
            })
            .map_err(db("reading DNS records"))?;
        let mut due = Vec::new();
        for row in rows {
            let (pair_id, name, want, have, attempts, pair) =
                row.map_err(db("reading DNS records"))?;
            // Only this module writes these columns, always from an Ipv4Addr.
            let Ok(want) = want.parse() else { continue };
            due.push(DnsWork {
                pair_id,
                pair,
                name,
                want,
                have: have.and_then(|h| h.parse().ok()),
                attempts,
            });
        }
        Ok(due)
    }

    pub(super) fn dns_result_in(
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
                if work.attempts > 0 {
                    // The server answers again after failing: the names waiting out their
                    // backoff are tried now, not up to a minute later. Not those it refused
                    // for a reason waiting cannot mend.
                    tx.execute(
                        "UPDATE dns_records SET next_try_at = ?1
                         WHERE have IS NOT want AND needs_operator = 0 AND next_try_at > ?1",
                        [now],
                    )
                    .map_err(db("making the waiting DNS names due"))?;
                }
                log(
                    &tx,
                    now,
                    Some(work.pair_id),
                    None,
                    "dns-updated",
                    (None, None),
                    "dns",
                    &work.updated(),
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

    pub(super) fn dns_found_in(
        &mut self,
        work: &DnsWork,
        value: Option<Ipv4Addr>,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE dns_records SET have = ?3 WHERE pair_id = ?1 AND name = ?2",
                params![work.pair_id, work.name, value.map(|v| v.to_string())],
            )
            .map_err(db("recording a DNS record's value"))?;
        Ok(())
    }
}
