//! Role decisions: the promotion's compare-and-set, a fenced box back as backup, a pair
//! retired.

use super::*;

impl SqliteStore {
    pub(super) fn promote_in(
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
            &promoted_detail(
                sid,
                &row.pair_name,
                advertised,
                old.as_deref(),
                old_heard,
                now,
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

    pub(super) fn register_backup_in(
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

    pub(super) fn retire_pair_in(
        &mut self,
        pair: &str,
        actor: &str,
        now: Millis,
    ) -> Result<Vec<ServerId>, StoreError> {
        let tx = begin(&mut self.conn)?;
        let (pair_id, retired): (i64, Option<Millis>) = tx
            .query_row(
                "SELECT id, retired_at FROM pairs WHERE name = ?1",
                [pair],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(db("reading the pair"))?
            .ok_or_else(|| StoreError::NotAllowed(format!("there is no pair called {pair:?}")))?;
        if let Some(at) = retired {
            return Err(StoreError::NotAllowed(format!(
                "pair {pair} was retired {} already",
                crate::time::utc(at)
            )));
        }
        let sids: Vec<ServerId> = tx
            .prepare("SELECT sid FROM servers WHERE pair_id = ?1 ORDER BY position")
            .map_err(db("reading the pair's servers"))?
            .query_map([pair_id], |r| r.get::<_, String>(0))
            .map_err(db("reading the pair's servers"))?
            .filter_map(|sid| sid.ok()?.parse().ok())
            .collect();
        tx.execute(
            "UPDATE pairs SET retired_at = ?2 WHERE id = ?1",
            params![pair_id, now],
        )
        .map_err(db("retiring the pair"))?;
        tx.execute(
            "UPDATE promotion_requests SET state = 'refused', answer = 'the pair was retired',
             answered_at = ?2 WHERE pair_id = ?1 AND state = 'pending'",
            params![pair_id, now],
        )
        .map_err(db("closing the pair's promotion requests"))?;
        log(
            &tx,
            now,
            Some(pair_id),
            None,
            "retired",
            (None, None),
            actor,
            &retired_detail(pair, &sids),
        )?;
        tx.commit().map_err(db("committing"))?;
        Ok(sids)
    }
}
