//! Promotion and hand-over requests: asked by the provider or a primary, answered by the
//! backup at its next report, expired when nobody acts in time.

use super::*;

impl SqliteStore {
    pub(super) fn request_promotion_in(
        &mut self,
        pair: &str,
        actor: &str,
        ttl: Duration,
        now: Millis,
    ) -> Result<PromotionRequest, StoreError> {
        let tx = begin(&mut self.conn)?;
        expire_requests(&tx, now)?;
        let pair_id: i64 = tx
            .query_row(
                "SELECT id FROM pairs WHERE name = ?1 AND retired_at IS NULL",
                [pair],
                |r| r.get(0),
            )
            .optional()
            .map_err(db("reading the pair"))?
            .ok_or_else(|| {
                StoreError::NotAllowed(match retired_at(&tx, pair).ok().flatten() {
                    Some(at) => format!("pair {pair} was retired {}", crate::time::utc(at)),
                    None => format!("there is no pair called {pair:?}"),
                })
            })?;
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

    pub(super) fn hand_over_in(
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

    pub(super) fn promotion_request_in(
        &mut self,
        id: i64,
        now: Millis,
    ) -> Result<PromotionRequest, StoreError> {
        let tx = begin(&mut self.conn)?;
        expire_requests(&tx, now)?;
        let request = request_where(&tx, "r.id = ?1", id)?
            .ok_or_else(|| StoreError::NotAllowed(format!("there is no promotion request {id}")))?;
        tx.commit().map_err(db("committing"))?;
        Ok(request)
    }

    pub(super) fn pending_promotion_in(
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

    pub(super) fn refuse_promotion_in(
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
pub(super) fn expire_requests(
    tx: &rusqlite::Transaction<'_>,
    now: Millis,
) -> Result<(), StoreError> {
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

/// A request's columns (`r`: `promotion_requests`, `p`: its pair), as [`request_from_row`]
/// reads them.
pub(super) const REQUEST_COLUMNS: &str =
    "r.id, p.name, r.requested_by, r.requested_at, r.expires_at, r.state, r.answer, r.hand_over";

/// A request from [`REQUEST_COLUMNS`], starting at column `first` of `r`.
pub(super) fn request_from_row(
    r: &rusqlite::Row<'_>,
    first: usize,
) -> rusqlite::Result<PromotionRequest> {
    Ok(PromotionRequest {
        id: r.get(first)?,
        pair: r.get(first + 1)?,
        requested_by: r.get(first + 2)?,
        requested_at: r.get(first + 3)?,
        expires_at: r.get(first + 4)?,
        state: r.get(first + 5)?,
        answer: r.get(first + 6)?,
        hand_over: r.get(first + 7)?,
    })
}

/// The one request matching `condition` (on `r`, with `?1` = `value`).
pub(super) fn request_where(
    tx: &rusqlite::Transaction<'_>,
    condition: &str,
    value: i64,
) -> Result<Option<PromotionRequest>, StoreError> {
    tx.query_row(
        &format!(
            "SELECT {REQUEST_COLUMNS}
             FROM promotion_requests r JOIN pairs p ON p.id = r.pair_id
             WHERE {condition} ORDER BY r.id DESC LIMIT 1"
        ),
        [value],
        |r| request_from_row(r, 0),
    )
    .optional()
    .map_err(db("reading a promotion request"))
}
