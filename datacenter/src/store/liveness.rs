//! Reports as liveness. Almost every report only says "still here, still the same": the
//! service keeps those in memory and writes them here in batches, one transaction for many
//! (`serve/liveness.rs`), so heartbeats never queue for an fsync each and decisions never wait
//! behind them. A report that changes what the store decides from (a primary at a new address,
//! which its DNS name follows) is recorded at once by [`Store::heartbeat`].

use super::*;

/// What a report means for the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportKind {
    /// Liveness only: may be recorded later, with others.
    Liveness,
    /// It changes a decision: recorded now, through [`Store::heartbeat`].
    Decision,
}

impl SqliteStore {
    pub(super) fn report_kind_in(
        &self,
        sid: ServerId,
        report: &Report,
    ) -> Result<ReportKind, StoreError> {
        let (role, pair_generation, advertised, pair, retired): (
            String,
            i64,
            Option<String>,
            String,
            Option<Millis>,
        ) = self
            .conn
            .query_row(
                "SELECT s.role, p.generation, s.advertised_address, p.name, p.retired_at
                 FROM servers s JOIN pairs p ON p.id = s.pair_id WHERE s.sid = ?1",
                [sid.to_string()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()
            .map_err(db("reading a server"))?
            .ok_or(StoreError::UnknownServer(sid))?;
        not_retired(sid, &pair, retired)?;
        let role = role_of(&role);
        if role == Role::Unactivated {
            return Err(StoreError::NotAllowed(format!(
                "{sid} is not activated yet"
            )));
        }
        let moved = role == Role::Primary
            && report.believed == generation(pair_generation)
            && advertised.as_deref() != Some(report.advertised.to_string().as_str());
        Ok(if moved {
            ReportKind::Decision
        } else {
            ReportKind::Liveness
        })
    }

    pub(super) fn heartbeats_in(
        &mut self,
        batch: &[(ServerId, Report, Millis)],
    ) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let tx = begin(&mut self.conn)?;
        for (sid, report, at) in batch {
            write_report(&tx, *sid, report, *at)?;
        }
        tx.commit().map_err(db("committing heartbeats"))
    }
}

/// Records `sid`'s report made at `at`: its last heartbeat, generation, software, address and
/// the report itself.
pub(super) fn write_report(
    tx: &rusqlite::Transaction<'_>,
    sid: ServerId,
    report: &Report,
    at: Millis,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "UPDATE servers SET last_heartbeat_at = ?2, reported_generation = ?3, software = ?4,
           advertised_address = ?5, report = ?6
         WHERE sid = ?1",
    )
    .and_then(|mut update| {
        update.execute(params![
            sid.to_string(),
            at,
            gen_sql(report.believed),
            report.software,
            report.advertised.to_string(),
            report.json
        ])
    })
    .map_err(db("recording a heartbeat"))?;
    Ok(())
}
