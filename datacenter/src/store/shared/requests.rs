//! Promotion and hand-over requests on the shared store: kept in their pair's document (the
//! latest [`REQUESTS_KEPT`]), found by number through `request/<id>`, expired when the pair is
//! next looked at after their time.

use super::*;

/// What a request that expired says.
const EXPIRED: &str = "the backup did not act on it in time (is its agent running and reporting?)";

/// Expires the pair's pending request if its time is up (logged once): whether it did.
pub(super) fn expire(tx: &mut Tx, doc: &mut PairDoc, now: Millis) -> bool {
    let Some(pending) = doc.pending().filter(|r| r.expires_at <= now) else {
        return false;
    };
    pending.state = RequestState::Expired;
    pending.answer = Some(EXPIRED.into());
    pending.answered_at = Some(now);
    let id = pending.id;
    tx.log(
        now,
        None,
        "promotion request expired",
        (None, None),
        "data center",
        &format!("request {id}: the backup did not act on it in time"),
        doc,
    );
    true
}

impl KvStore {
    /// Adds a pending request to the pair (its number found through `request/<id>`), dropping
    /// the oldest answered ones past [`REQUESTS_KEPT`].
    fn add_request(
        &self,
        tx: &mut Tx,
        doc: &mut PairDoc,
        requested_by: &str,
        expires_at: Millis,
        hand_over: Option<&str>,
        now: Millis,
    ) -> RequestDoc {
        let request = RequestDoc {
            id: tx.next_request_id(),
            requested_by: requested_by.to_owned(),
            requested_at: now,
            expires_at,
            state: RequestState::Pending,
            answer: None,
            answered_at: None,
            hand_over: hand_over.map(str::to_owned),
        };
        tx.put(
            self.key("request", &format!("{:016}", request.id)),
            &doc.name,
        );
        doc.requests.push(request.clone());
        let excess = doc.requests.len().saturating_sub(REQUESTS_KEPT);
        for old in doc.requests.drain(..excess) {
            tx.delete(self.key("request", &format!("{:016}", old.id)));
        }
        request
    }

    pub(super) fn request_promotion_kv(
        &self,
        pair: &str,
        actor: &str,
        ttl: Duration,
        now: Millis,
    ) -> Result<PromotionRequest, StoreError> {
        self.transact("recording the promotion request", |store| {
            let (mut tx, doc) = store.begin_pair(pair)?;
            let mut doc = match doc {
                Some(doc) if doc.retired_at.is_none() => doc,
                Some(doc) => {
                    return Err(StoreError::NotAllowed(format!(
                        "pair {pair} was retired {}",
                        crate::time::utc(doc.retired_at.unwrap_or_default())
                    )));
                }
                None => {
                    return Err(StoreError::NotAllowed(format!(
                        "there is no pair called {pair:?}"
                    )));
                }
            };
            expire(&mut tx, &mut doc, now);
            let Some(backup) = doc.with_role(Role::Backup).map(|s| s.sid.clone()) else {
                return Err(StoreError::NotAllowed(format!(
                    "pair {pair:?} has no activated backup to promote"
                )));
            };
            if let Some(pending) = doc.pending() {
                return Err(StoreError::NotAllowed(format!(
                    "request {} by {} for pair {pair:?} is still pending",
                    pending.id, pending.requested_by
                )));
            }
            let expires_at = now.saturating_add(ms(ttl));
            let request = store.add_request(&mut tx, &mut doc, actor, expires_at, None, now);
            tx.log(
                now,
                backup.parse().ok(),
                "promotion requested",
                (None, None),
                actor,
                &format!(
                    "request {}: promote {backup}, the backup of pair {pair}, within {} s",
                    request.id,
                    ttl.as_secs()
                ),
                &mut doc,
            );
            tx.put_pair(&doc);
            Ok((tx, Ok(doc.request_view(&request))))
        })
    }

    pub(super) fn hand_over_kv(
        &self,
        from: ServerId,
        reason: &str,
        limits: HandOverLimits,
        now: Millis,
    ) -> Result<PromotionRequest, StoreError> {
        self.transact("recording the hand-over", |store| {
            let (mut tx, mut doc) = store.begin_server(from)?;
            expire(&mut tx, &mut doc, now);
            let role = doc.server(from).map_or(Role::Unactivated, |s| s.role);
            if role != Role::Primary {
                return Err(StoreError::NotAllowed(format!(
                    "{from} is {role} of pair {}: only the primary hands over",
                    doc.name
                )));
            }
            let Some(backup) = doc.with_role(Role::Backup).map(|s| s.sid.clone()) else {
                return Err(StoreError::NotAllowed(format!(
                    "pair {} has no backup to hand over to",
                    doc.name
                )));
            };
            let report = store.report_in(&mut tx, &backup)?;
            let heard = report.at;
            if heard.is_none_or(|at| now.saturating_sub(at) > ms(limits.alive)) {
                return Err(StoreError::NotAllowed(format!(
                    "the backup {backup} has not reported for {}: not handing over to it",
                    heard.map_or("ever".to_owned(), |at| format!(
                        "{:.0} s",
                        now.saturating_sub(at) as f64 / 1000.0
                    ))
                )));
            }
            let stored: StoredReport = report
                .report
                .as_deref()
                .and_then(|r| serde_json::from_str(r).ok())
                .unwrap_or_default();
            if !stored.in_sync() {
                return Err(StoreError::NotAllowed(format!(
                    "the backup {backup} is not in sync by its last report: not handing over to it"
                )));
            }
            if let Some(at) = doc
                .last_hand_over_at
                .filter(|at| now.saturating_sub(*at) < ms(limits.holdoff))
            {
                return Err(StoreError::NotAllowed(format!(
                    "pair {} handed over {:.0} s ago; the next hand-over may be asked {:.0} s after it",
                    doc.name,
                    now.saturating_sub(at) as f64 / 1000.0,
                    limits.holdoff.as_secs_f64()
                )));
            }
            if let Some(pending) = doc.pending() {
                return Err(StoreError::NotAllowed(format!(
                    "request {} by {} is still pending",
                    pending.id, pending.requested_by
                )));
            }
            let actor = format!("{from} (the primary)");
            let expires_at = now.saturating_add(ms(limits.ttl));
            let request =
                store.add_request(&mut tx, &mut doc, &actor, expires_at, Some(reason), now);
            doc.last_hand_over_at = Some(now);
            tx.log(
                now,
                Some(from),
                "hand-over requested",
                (None, None),
                &actor,
                &format!("request {}: hand the role to {backup}: {reason}", request.id),
                &mut doc,
            );
            tx.put_pair(&doc);
            Ok((tx, Ok(doc.request_view(&request))))
        })
    }

    pub(super) fn promotion_request_kv(
        &self,
        id: i64,
        now: Millis,
    ) -> Result<PromotionRequest, StoreError> {
        let none = || StoreError::NotAllowed(format!("there is no promotion request {id}"));
        let key = self.key("request", &format!("{id:016}"));
        let name: String = match self
            .kv
            .get(std::slice::from_ref(&key))?
            .items
            .pop()
            .flatten()
        {
            Some(value) => decode(&key, &value)?,
            None => return Err(none()),
        };
        self.transact("reading a promotion request", |store| {
            let (mut tx, doc) = store.begin_pair(&name)?;
            let mut doc = doc.ok_or_else(none)?;
            if expire(&mut tx, &mut doc, now) {
                tx.put_pair(&doc);
            }
            let request = doc.requests.iter().find(|r| r.id == id).ok_or_else(none)?;
            Ok((tx, Ok(doc.request_view(request))))
        })
    }

    pub(super) fn pending_promotion_kv(
        &self,
        sid: ServerId,
        now: Millis,
    ) -> Result<Option<PromotionRequest>, StoreError> {
        self.transact("reading the pending promotion", |store| {
            let (mut tx, mut doc) = store.begin_server(sid)?;
            if expire(&mut tx, &mut doc, now) {
                tx.put_pair(&doc);
            }
            let backup = doc.server(sid).is_some_and(|s| s.role == Role::Backup);
            let pending = doc
                .requests
                .last()
                .filter(|r| backup && r.state == RequestState::Pending)
                .map(|r| doc.request_view(r));
            Ok((tx, Ok(pending)))
        })
    }

    pub(super) fn refuse_promotion_kv(
        &self,
        id: i64,
        sid: ServerId,
        reason: &str,
        now: Millis,
    ) -> Result<(), StoreError> {
        self.transact("answering the promotion request", |store| {
            let (mut tx, mut doc) = store.begin_server(sid)?;
            let role = doc.server(sid).map_or(Role::Unactivated, |s| s.role);
            // The request went to the backup; the primary (or a fenced box) has no say in
            // it, and its refusal changes nothing (as a late one does).
            if role != Role::Backup {
                tracing::warn!(
                    %sid,
                    id,
                    "a refusal of a promotion request from the pair's {role}, not its backup: ignored"
                );
                return Ok((tx, Ok(())));
            }
            let generation = Generation(doc.generation);
            let Some(pending) = doc.pending().filter(|r| r.id == id) else {
                return Ok((tx, Ok(())));
            };
            pending.state = RequestState::Refused;
            pending.answer = Some(reason.to_owned());
            pending.answered_at = Some(now);
            tx.log(
                now,
                Some(sid),
                "promotion refused",
                (Some(generation), None),
                &sid.to_string(),
                &format!("request {id}: {reason}"),
                &mut doc,
            );
            tx.put_pair(&doc);
            Ok((tx, Ok(())))
        })
    }
}
