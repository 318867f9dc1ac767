//! Reports, DNS records and what the shared store shows: a pair, the tunnel peers, the
//! records due.

use super::*;

/// An activated box as the tunnels need it: SID, WireGuard key, overlay address.
pub(super) type TunnelBox = (String, String, Ipv4Addr);

impl KvStore {
    pub(super) fn pair_of_kv(&self, sid: ServerId) -> Result<PairView, StoreError> {
        let name = self.pair_name(sid)?;
        let doc = self
            .begin_pair(&name)?
            .1
            .ok_or(StoreError::UnknownServer(sid))?;
        Ok(doc.view(&self.reports_of(&doc)?))
    }

    /// The last reports of `doc`'s boxes, by SID, in one read.
    fn reports_of(&self, doc: &PairDoc) -> Result<HashMap<String, ReportDoc>, StoreError> {
        let keys: Vec<String> = doc
            .servers
            .iter()
            .map(|s| self.key("report", &s.sid))
            .collect();
        let mut reports = HashMap::new();
        for ((server, key), read) in doc.servers.iter().zip(&keys).zip(self.get_many(&keys)?) {
            if let Some(read) = read {
                reports.insert(server.sid.clone(), decode(key, &read)?);
            }
        }
        Ok(reports)
    }

    /// The activated boxes of served pairs, pair by pair in the order they were made, each
    /// pair's by WireGuard key: (SID, WireGuard key, overlay address).
    pub(super) fn tunnel_pairs_kv(&self) -> Result<Vec<Vec<TunnelBox>>, StoreError> {
        let mut docs = self.all_pairs()?;
        docs.retain(|doc| doc.retired_at.is_none());
        docs.sort_by_key(|doc| doc.id);
        Ok(docs
            .iter()
            .map(|doc| {
                let mut boxes: Vec<TunnelBox> = doc
                    .servers
                    .iter()
                    .filter_map(|s| Some((s.sid.clone(), s.wireguard_key.clone()?, s.overlay?)))
                    .collect();
                boxes.sort_by(|a, b| a.1.cmp(&b.1));
                boxes
            })
            .filter(|boxes| !boxes.is_empty())
            .collect())
    }

    pub(super) fn dns_due_kv(&self, now: Millis) -> Result<Vec<DnsWork>, StoreError> {
        let marker = format!("{}/dns-owed/", self.prefix);
        let names: Vec<String> = self
            .scan("dns-owed")?
            .into_iter()
            .map(|(key, _)| key.strip_prefix(&marker).unwrap_or(&key).to_owned())
            .collect();
        let recovered_key = self.key("dns", "recovered");
        let recovered: Option<Millis> = match self
            .kv
            .get(std::slice::from_ref(&recovered_key))?
            .items
            .pop()
            .flatten()
        {
            Some(value) => Some(decode(&recovered_key, &value)?),
            None => None,
        };
        let keys: Vec<String> = names.iter().map(|name| self.key("pair", name)).collect();
        let mut due = Vec::new();
        for (key, read) in keys.iter().zip(self.get_many(&keys)?) {
            let Some(read) = read else { continue };
            let doc: PairDoc = decode(key, &read)?;
            if doc.retired_at.is_some() {
                continue;
            }
            for record in &doc.dns {
                // Waiting out a backoff when the server answered again: due now.
                let woken = !record.needs_operator
                    && record
                        .failed_at
                        .zip(recovered)
                        .is_some_and(|(failed, back)| failed <= back);
                if record.have != Some(record.want) && (record.next_try_at <= now || woken) {
                    due.push((
                        record.changed_at,
                        DnsWork {
                            pair_id: doc.id,
                            pair: doc.name.clone(),
                            name: record.name.clone(),
                            want: record.want,
                            have: record.have,
                            attempts: record.attempts,
                        },
                    ));
                }
            }
        }
        due.sort_by_key(|(changed, _)| *changed);
        Ok(due.into_iter().map(|(_, work)| work).collect())
    }

    pub(super) fn dns_result_kv(
        &self,
        work: &DnsWork,
        result: Result<(), DnsFailure>,
        retry_at: Millis,
        now: Millis,
    ) -> Result<bool, StoreError> {
        self.transact("recording a DNS update", |store| {
            let (mut tx, doc) = store.begin_pair(&work.pair)?;
            let Some(mut doc) = doc else {
                return Ok((tx, Ok(false)));
            };
            let mut escalated = false;
            match &result {
                Ok(()) => {
                    if let Some(record) = doc.dns.iter_mut().find(|r| r.name == work.name) {
                        record.have = Some(work.want);
                        record.attempts = 0;
                        record.last_error = None;
                        record.failed_at = None;
                        record.done_at = Some(now);
                        record.needs_operator = false;
                    }
                    if work.attempts > 0 {
                        // The server answers again after failing: the names waiting out
                        // their backoff are due now, not up to a minute later.
                        tx.put(store.key("dns", "recovered"), &now);
                    }
                    tx.log(
                        now,
                        None,
                        "dns-updated",
                        (None, None),
                        "dns",
                        &work.updated(),
                        &mut doc,
                    );
                }
                Err(failure) => {
                    // Only if the decision is still the one that was tried: a newer one
                    // starts with a clean slate.
                    let Some(record) = doc
                        .dns
                        .iter_mut()
                        .find(|r| r.name == work.name && r.want == work.want)
                    else {
                        return Ok((tx, Ok(false)));
                    };
                    escalated = failure.needs_operator
                        && (!record.needs_operator
                            || record.last_error.as_deref() != Some(failure.why.as_str()));
                    record.attempts += 1;
                    record.last_error = Some(failure.why.clone());
                    record.next_try_at = retry_at;
                    record.failed_at = Some(now);
                    record.needs_operator = failure.needs_operator;
                    if escalated {
                        tx.log(
                            now,
                            None,
                            "dns-failed",
                            (None, None),
                            "dns",
                            &format!("{} → {}: {}", work.name, work.want, failure.why),
                            &mut doc,
                        );
                    }
                }
            }
            tx.put_pair(&doc);
            Ok((tx, Ok(escalated)))
        })
    }

    pub(super) fn dns_found_kv(
        &self,
        work: &DnsWork,
        value: Option<Ipv4Addr>,
    ) -> Result<(), StoreError> {
        self.transact("recording a DNS record's value", |store| {
            let (mut tx, doc) = store.begin_pair(&work.pair)?;
            let Some(mut doc) = doc else {
                return Ok((tx, Ok(())));
            };
            if let Some(record) = doc.dns.iter_mut().find(|r| r.name == work.name) {
                record.have = value;
                tx.put_pair(&doc);
            }
            Ok((tx, Ok(())))
        })
    }

    pub(super) fn report_kind_kv(
        &self,
        sid: ServerId,
        report: &Report,
    ) -> Result<ReportKind, StoreError> {
        let (mut tx, doc) = self.begin_server(sid)?;
        let role = doc.server(sid).map_or(Role::Unactivated, |s| s.role);
        if role == Role::Unactivated {
            return Err(StoreError::NotAllowed(format!(
                "{sid} is not activated yet"
            )));
        }
        let stored = self.report_in(&mut tx, &sid.to_string())?;
        let moved = role == Role::Primary
            && report.believed == Generation(doc.generation)
            && stored.advertised != Some(report.advertised);
        Ok(if moved {
            ReportKind::Decision
        } else {
            ReportKind::Liveness
        })
    }

    /// [`Store::look`] in two reads (the pair, then its boxes' reports) instead of five; a
    /// request past its time is expired as [`Store::pending_promotion`] does.
    pub(super) fn look_kv(
        &self,
        sid: ServerId,
        report: &Report,
        requests: bool,
        now: Millis,
    ) -> Result<Look, StoreError> {
        self.transact("answering a report", |store| {
            let (mut tx, mut doc) = store.begin_server(sid)?;
            let role = doc.server(sid).map_or(Role::Unactivated, |s| s.role);
            if role == Role::Unactivated {
                return Err(StoreError::NotAllowed(format!(
                    "{sid} is not activated yet"
                )));
            }
            if requests && super::requests::expire(&mut tx, &mut doc, now) {
                tx.put_pair(&doc);
            }
            let reports = store.reports_of(&doc)?;
            let stored = reports.get(&sid.to_string()).and_then(|r| r.advertised);
            let moved = role == Role::Primary
                && report.believed == Generation(doc.generation)
                && stored != Some(report.advertised);
            let request = doc
                .requests
                .last()
                .filter(|r| requests && role == Role::Backup && r.state == RequestState::Pending)
                .map(|r| doc.request_view(r));
            let look = Look {
                kind: if moved {
                    ReportKind::Decision
                } else {
                    ReportKind::Liveness
                },
                request,
                pair: doc.view(&reports),
            };
            Ok((tx, Ok(look)))
        })
    }

    pub(super) fn heartbeats_kv(
        &self,
        batch: &[(ServerId, Report, Millis)],
    ) -> Result<(), StoreError> {
        // The latest per box: a transaction may write a key once.
        let mut latest: HashMap<ServerId, (&Report, Millis)> = HashMap::new();
        for (sid, report, at) in batch {
            latest.insert(*sid, (report, *at));
        }
        let ops: Vec<Op> = latest
            .into_iter()
            .map(|(sid, (report, at))| Op::Put {
                key: self.key("report", &sid.to_string()),
                value: encode(&decide::report_doc(report, at)),
            })
            .collect();
        for chunk in ops.chunks(BATCH) {
            self.kv.commit(&[], chunk)?;
        }
        Ok(())
    }
}
