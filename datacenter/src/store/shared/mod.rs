//! [`KvStore`]: the [`Store`] on a key-value engine several sites share ([`crate::kv`]: etcd in
//! the field, [`crate::kv::MemKv`] in tests), so the authority survives the loss of any one
//! site.
//!
//! Each pair is one document (`<prefix>/pair/<name>`: servers, DNS records, promotion
//! requests); a decision reads it and commits only if it is still at the version read, so of
//! two sites promoting the same pair exactly one wins, as SQLite's transaction does on one
//! site. Unique things are keys created only if absent (`sid/<sid>`, `overlay/<address>`,
//! `request/<id>`). The audit log is kept per pair (`event/<pair>/<n>`, `n` in the pair's
//! document), each event committed with the change it tells of, the pair's oldest deleted as
//! new ones come ([`EVENTS_KEPT`]); the whole log is read in the order of the revisions that
//! committed it. Reports are soft state (`report/<sid>`), written in batches without a
//! compare. A pair with a DNS record not yet written has a marker (`dns-owed/<name>`), so the
//! DNS worker's look every second reads only those pairs.
//!
//! A decision whose transaction was sent and not answered fails with
//! [`crate::kv::KvError::Unconfirmed`]: it may still take effect; asked again it is found done (the same
//! box promoted at the next generation gets the same answer, `repeat`).

use std::collections::HashMap;

use crate::kv::{Expect, Kv, MAX_TXN_OPS, Op, Revision, Versioned};

use super::*;

mod decide;
mod docs;
mod import;
mod reading;
mod requests;

pub(super) use docs::{Counters, DnsDoc, PairDoc, REQUESTS_KEPT, ReportDoc, RequestDoc, ServerDoc};
pub use import::Migrated;

/// The audit log keeps this many latest events.
pub const EVENTS_KEPT: u64 = 10_000;

/// A decision that keeps meeting a changed record gives up after this many reads.
const ATTEMPTS: usize = 32;

/// A range reads at most this many keys at once.
const PAGE: usize = 1000;

/// Reads and writes go in pieces of this many keys (etcd's transaction limit).
const BATCH: usize = MAX_TXN_OPS;

/// The store on a shared key-value engine; keys under `prefix`.
pub struct KvStore {
    kv: Box<dyn Kv>,
    prefix: String,
    events_kept: u64,
    /// Which pair each server is in, as read (it never changes): one round trip less on
    /// every report.
    pair_names: std::sync::Mutex<HashMap<ServerId, String>>,
}

impl std::fmt::Debug for KvStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KvStore({})", self.prefix)
    }
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, value: &Versioned) -> Result<T, StoreError> {
    serde_json::from_slice(&value.value).map_err(|err| StoreError::Corrupt {
        key: key.to_owned(),
        detail: err.to_string(),
    })
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Our own plain structs: serialising them cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// A decision being made: what it read (to be unchanged when it commits) and what it writes.
pub(super) struct Tx {
    prefix: String,
    events_kept: u64,
    /// Events logged so far.
    logged: i64,
    expect: Vec<Expect>,
    ops: Vec<Op>,
    counters: Counters,
    counters_read: Option<Revision>,
    counters_used: bool,
}

impl Tx {
    /// Relies on `key` being as `read` found it when this commits.
    fn rely(&mut self, key: &str, read: Option<&Versioned>) {
        if !self.expect.iter().any(|e| e.key == key) {
            self.expect.push(Expect::as_read(key, read));
        }
    }

    fn put<T: serde::Serialize>(&mut self, key: String, value: &T) {
        self.ops.push(Op::Put {
            key,
            value: encode(value),
        });
    }

    fn delete(&mut self, key: String) {
        self.ops.push(Op::Delete { key });
    }

    /// Writes the pair's document and its DNS marker.
    fn put_pair(&mut self, doc: &PairDoc) {
        let marker = format!("{}/dns-owed/{}", self.prefix, doc.name);
        if doc.dns_owed() {
            self.ops.push(Op::Put {
                key: marker,
                value: Vec::new(),
            });
        } else if !doc.dns.is_empty() {
            self.delete(marker);
        }
        self.put(format!("{}/pair/{}", self.prefix, doc.name), doc);
    }

    fn next_pair_id(&mut self) -> i64 {
        self.counters_used = true;
        self.counters.pair += 1;
        self.counters.pair
    }

    fn next_request_id(&mut self) -> i64 {
        self.counters_used = true;
        self.counters.request += 1;
        self.counters.request
    }

    /// Appends an event to `doc`'s pair's log, dropping the one [`EVENTS_KEPT`] (or as set)
    /// before it; `doc` is to be written with it.
    #[allow(clippy::too_many_arguments)]
    fn log(
        &mut self,
        at: Millis,
        sid: Option<ServerId>,
        kind: &str,
        generations: (Option<Generation>, Option<Generation>),
        actor: &str,
        detail: &str,
        doc: &mut PairDoc,
    ) {
        doc.event_seq += 1;
        let seq = doc.event_seq;
        self.logged += 1;
        let event = Event {
            // Its place in this transaction; in the whole log it is numbered from the
            // revision that commits it (see `events`).
            id: self.logged,
            at,
            pair: Some(doc.name.clone()),
            sid: sid.map(|s| s.to_string()),
            kind: kind.to_owned(),
            from_generation: generations.0.map(|g| g.0),
            to_generation: generations.1.map(|g| g.0),
            actor: actor.to_owned(),
            detail: detail.to_owned(),
        };
        self.put(event_key(&self.prefix, &doc.name, seq), &event);
        if seq > self.events_kept {
            self.delete(event_key(&self.prefix, &doc.name, seq - self.events_kept));
        }
    }

    fn is_empty(&self) -> bool {
        self.ops.is_empty() && !self.counters_used
    }

    /// Commits: whether everything read was unchanged (`false`: nothing was written; read
    /// again).
    fn commit(mut self, kv: &dyn Kv) -> Result<bool, StoreError> {
        if self.counters_used {
            let key = format!("{}/counters", self.prefix);
            self.expect.push(Expect {
                key: key.clone(),
                mod_revision: self.counters_read,
            });
            let counters = self.counters;
            self.put(key, &counters);
        }
        Ok(kv.commit(&self.expect, &self.ops)?.is_some())
    }
}

/// Pair `pair`'s event number `seq`.
fn event_key(prefix: &str, pair: &str, seq: u64) -> String {
    format!("{prefix}/event/{pair}/{seq:012}")
}

/// Event numbers in the whole log: the revision that committed an event, times this, plus
/// its place among the events of that revision (a transaction writes at most
/// [`MAX_TXN_OPS`] keys).
const EVENTS_PER_REVISION: i64 = 1024;

impl KvStore {
    /// The store on `kv`, its keys under `prefix` (`/lbs`: several data centers may share one
    /// etcd under different prefixes).
    pub fn new(kv: Box<dyn Kv>, prefix: &str) -> KvStore {
        KvStore {
            kv,
            prefix: prefix.trim_end_matches('/').to_owned(),
            events_kept: EVENTS_KEPT,
            pair_names: std::sync::Mutex::default(),
        }
    }

    /// Keeps the latest `events` events of the audit log instead of [`EVENTS_KEPT`].
    pub fn keeping_events(mut self, events: u64) -> KvStore {
        self.events_kept = events.max(1);
        self
    }

    /// The key of the role of sending the DNS updates (`Candidate`'s).
    pub fn dns_role_key(&self) -> String {
        self.key("role", "dns")
    }

    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}/{kind}/{name}", self.prefix)
    }

    /// Starts a decision: reads the counters and `keys` at one revision, relying on `keys`.
    fn begin(&self, keys: &[String]) -> Result<(Tx, Vec<Option<Versioned>>), StoreError> {
        let mut all = vec![format!("{}/counters", self.prefix)];
        all.extend_from_slice(keys);
        let mut read = self.kv.get(&all)?.items.into_iter();
        let counters_read = read.next().flatten();
        let counters = match &counters_read {
            Some(value) => decode(&all[0], value)?,
            None => Counters::default(),
        };
        let items: Vec<Option<Versioned>> = read.collect();
        let mut tx = Tx {
            prefix: self.prefix.clone(),
            events_kept: self.events_kept,
            logged: 0,
            expect: Vec::new(),
            ops: Vec::new(),
            counters,
            counters_read: counters_read.map(|v| v.mod_revision),
            counters_used: false,
        };
        for (key, item) in keys.iter().zip(&items) {
            tx.rely(key, item.as_ref());
        }
        Ok((tx, items))
    }

    /// Starts a decision on pair `name`: its document, if there is one.
    fn begin_pair(&self, name: &str) -> Result<(Tx, Option<PairDoc>), StoreError> {
        let key = self.key("pair", name);
        let (tx, read) = self.begin(std::slice::from_ref(&key))?;
        let doc = match read.into_iter().next().flatten() {
            Some(value) => Some(decode(&key, &value)?),
            None => None,
        };
        Ok((tx, doc))
    }

    /// The name of `sid`'s pair.
    fn pair_name(&self, sid: ServerId) -> Result<String, StoreError> {
        let cached = |names: &std::sync::Mutex<HashMap<ServerId, String>>| {
            names
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&sid)
                .cloned()
        };
        if let Some(name) = cached(&self.pair_names) {
            return Ok(name);
        }
        let key = self.key("sid", &sid.to_string());
        let read = self
            .kv
            .get(std::slice::from_ref(&key))?
            .items
            .pop()
            .flatten();
        let name: String = match read {
            Some(value) => decode(&key, &value)?,
            None => return Err(StoreError::UnknownServer(sid)),
        };
        let mut names = self.pair_names.lock().unwrap_or_else(|p| p.into_inner());
        if names.len() >= 100_000 {
            names.clear();
        }
        names.insert(sid, name.clone());
        Ok(name)
    }

    /// Starts a decision on `sid`'s pair, refusing an unknown server or a retired pair.
    fn begin_server(&self, sid: ServerId) -> Result<(Tx, PairDoc), StoreError> {
        let name = self.pair_name(sid)?;
        let (tx, doc) = self.begin_pair(&name)?;
        let doc = doc
            .filter(|doc| doc.server(sid).is_some())
            .ok_or(StoreError::UnknownServer(sid))?;
        doc.not_retired(sid)?;
        Ok((tx, doc))
    }

    /// `sid`'s report, relied on by `tx`.
    fn report_in(&self, tx: &mut Tx, sid: &str) -> Result<ReportDoc, StoreError> {
        let key = self.key("report", sid);
        let read = self
            .kv
            .get(std::slice::from_ref(&key))?
            .items
            .pop()
            .flatten();
        tx.rely(&key, read.as_ref());
        match read {
            Some(value) => decode(&key, &value),
            None => Ok(ReportDoc::default()),
        }
    }

    /// Runs a decision until it commits on what it read: `attempt` reads, decides and says
    /// what to write and what to answer (an answer that is an error may still write, as a
    /// refusal is logged).
    fn transact<T>(
        &self,
        what: &str,
        mut attempt: impl FnMut(&KvStore) -> Result<(Tx, Result<T, StoreError>), StoreError>,
    ) -> Result<T, StoreError> {
        for _ in 0..ATTEMPTS {
            let (tx, answer) = attempt(self)?;
            if tx.is_empty() || tx.commit(&*self.kv)? {
                return answer;
            }
        }
        Err(StoreError::Busy(format!(
            "{what}: the records changed under it {ATTEMPTS} times in a row (other sites deciding on the same pair); try again"
        )))
    }

    /// Every key under `kind/`, with its value, a page at a time.
    fn scan(&self, kind: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        let prefix = format!("{}/{kind}/", self.prefix);
        let mut all: Vec<(String, Versioned)> = Vec::new();
        loop {
            let after = all.last().map(|(k, _)| k.clone());
            let page = self.kv.range(&prefix, after.as_deref(), 1000)?.items;
            let full = page.len() == 1000;
            all.extend(page);
            if !full {
                return Ok(all);
            }
        }
    }

    /// Every pair's document, in name order.
    fn all_pairs(&self) -> Result<Vec<PairDoc>, StoreError> {
        self.scan("pair")?
            .iter()
            .map(|(key, value)| decode(key, value))
            .collect()
    }

    /// Every box's last report, by SID.
    fn all_reports(&self) -> Result<HashMap<String, ReportDoc>, StoreError> {
        let prefix = format!("{}/report/", self.prefix);
        self.scan("report")?
            .iter()
            .map(|(key, value)| {
                let sid = key.strip_prefix(&prefix).unwrap_or(key).to_owned();
                Ok((sid, decode(key, value)?))
            })
            .collect()
    }

    /// The values of `keys`, in pieces the engine accepts.
    fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Versioned>>, StoreError> {
        let mut all = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(BATCH) {
            all.extend(self.kv.get(chunk)?.items);
        }
        Ok(all)
    }
}

impl Store for KvStore {
    fn provision_pairs(
        &mut self,
        pairs: &[(String, String)],
        servers: usize,
        key_ttl: Duration,
        now: Millis,
    ) -> Result<Vec<Vec<Provisioned>>, StoreError> {
        self.provision_pairs_kv(pairs, servers, key_ttl, now)
    }

    fn provision_backup(
        &mut self,
        partner: ServerId,
        key_ttl: Duration,
        now: Millis,
    ) -> Result<Provisioned, StoreError> {
        self.provision_backup_kv(partner, key_ttl, now)
    }

    fn rekey(
        &mut self,
        sid: ServerId,
        key_ttl: Duration,
        now: Millis,
    ) -> Result<Provisioned, StoreError> {
        self.rekey_kv(sid, key_ttl, now)
    }

    fn activate(
        &mut self,
        request: &ActivationRequest,
        pool: Ipv4Cidr,
        now: Millis,
    ) -> Result<Activated, StoreError> {
        self.activate_kv(request, pool, now)
    }

    fn promote(
        &mut self,
        sid: ServerId,
        believed: Generation,
        advertised: Ipv4Addr,
        actor: &str,
        now: Millis,
    ) -> Result<Promoted, StoreError> {
        self.promote_kv(sid, believed, advertised, actor, now)
    }

    fn register_backup(
        &mut self,
        sid: ServerId,
        actor: &str,
        now: Millis,
    ) -> Result<Generation, StoreError> {
        self.register_backup_kv(sid, actor, now)
    }

    fn heartbeat(
        &mut self,
        sid: ServerId,
        report: &Report,
        now: Millis,
    ) -> Result<(Role, Generation), StoreError> {
        self.heartbeat_kv(sid, report, now)
    }

    fn report_kind(&self, sid: ServerId, report: &Report) -> Result<ReportKind, StoreError> {
        self.report_kind_kv(sid, report)
    }

    fn dns_sender(&self) -> Result<DnsSender, StoreError> {
        let key = self.dns_role_key();
        Ok(
            match self
                .kv
                .get(std::slice::from_ref(&key))?
                .items
                .pop()
                .flatten()
            {
                Some(held) => DnsSender::Site(crate::kv::holder_name(&held.value)),
                None => DnsSender::Nobody,
            },
        )
    }

    fn look(
        &mut self,
        sid: ServerId,
        report: &Report,
        requests: bool,
        now: Millis,
    ) -> Result<Look, StoreError> {
        self.look_kv(sid, report, requests, now)
    }

    fn heartbeats(&mut self, batch: &[(ServerId, Report, Millis)]) -> Result<(), StoreError> {
        self.heartbeats_kv(batch)
    }

    fn pairs(&self) -> Result<Vec<PairView>, StoreError> {
        let reports = self.all_reports()?;
        Ok(self
            .all_pairs()?
            .iter()
            .filter(|doc| doc.retired_at.is_none())
            .map(|doc| doc.view(&reports))
            .collect())
    }

    fn pair_of(&self, sid: ServerId) -> Result<PairView, StoreError> {
        self.pair_of_kv(sid)
    }

    fn certificate_key(&self, sid: ServerId) -> Result<Option<String>, StoreError> {
        let (_, doc) = self.begin_server(sid)?;
        Ok(doc.server(sid).and_then(|s| s.tls_key.clone()))
    }

    fn tunnel_peers(&self) -> Result<Vec<(String, Ipv4Addr)>, StoreError> {
        let mut peers: Vec<(String, String, Ipv4Addr)> =
            self.tunnel_pairs_kv()?.into_iter().flatten().collect();
        peers.sort();
        Ok(peers.into_iter().map(|(_, key, ip)| (key, ip)).collect())
    }

    fn tunnel_pairs(&self) -> Result<Vec<Vec<(String, Ipv4Addr)>>, StoreError> {
        Ok(self
            .tunnel_pairs_kv()?
            .into_iter()
            .map(|boxes| boxes.into_iter().map(|(_, key, ip)| (key, ip)).collect())
            .collect())
    }

    fn dns_due(&self, now: Millis) -> Result<Vec<DnsWork>, StoreError> {
        self.dns_due_kv(now)
    }

    fn dns_result(
        &mut self,
        work: &DnsWork,
        result: Result<(), DnsFailure>,
        retry_at: Millis,
        now: Millis,
    ) -> Result<bool, StoreError> {
        self.dns_result_kv(work, result, retry_at, now)
    }

    fn dns_found(&mut self, work: &DnsWork, value: Option<Ipv4Addr>) -> Result<(), StoreError> {
        self.dns_found_kv(work, value)
    }

    fn events(&self, after: i64) -> Result<Vec<Event>, StoreError> {
        let prefix = format!("{}/event/", self.prefix);
        let mut since = after.max(0) / EVENTS_PER_REVISION;
        let mut events: Vec<Event> = Vec::new();
        loop {
            let page = self.kv.range_since(&prefix, since, PAGE)?.items;
            let full = page.len() == PAGE;
            // A full page may end inside a revision: that revision is read whole next time.
            let last = page.last().map(|(_, v)| v.mod_revision);
            let mut whole = Vec::with_capacity(page.len());
            for (key, value) in &page {
                if full && Some(value.mod_revision) == last && value.mod_revision > since {
                    break;
                }
                whole.push((value.mod_revision, decode::<Event>(key, value)?));
            }
            // Within one revision, in the order they were logged (the id stored is that
            // order: the place in its transaction, or the number a migration brought).
            whole.sort_by_key(|(revision, event)| (*revision, event.id));
            let mut numbered: Option<(i64, i64)> = None;
            for (revision, mut event) in whole {
                let place = match numbered {
                    Some((at, place)) if at == revision => place + 1,
                    _ => 0,
                };
                numbered = Some((revision, place));
                event.id = revision * EVENTS_PER_REVISION + place;
                if event.id > after {
                    events.push(event);
                }
            }
            match last {
                Some(last) if full && last > since => since = last,
                _ => return Ok(events),
            }
        }
    }

    fn request_promotion(
        &mut self,
        pair: &str,
        actor: &str,
        ttl: Duration,
        now: Millis,
    ) -> Result<PromotionRequest, StoreError> {
        self.request_promotion_kv(pair, actor, ttl, now)
    }

    fn hand_over(
        &mut self,
        from: ServerId,
        reason: &str,
        limits: HandOverLimits,
        now: Millis,
    ) -> Result<PromotionRequest, StoreError> {
        self.hand_over_kv(from, reason, limits, now)
    }

    fn promotion_request(&mut self, id: i64, now: Millis) -> Result<PromotionRequest, StoreError> {
        self.promotion_request_kv(id, now)
    }

    fn pending_promotion(
        &mut self,
        sid: ServerId,
        now: Millis,
    ) -> Result<Option<PromotionRequest>, StoreError> {
        self.pending_promotion_kv(sid, now)
    }

    fn retire_pair(
        &mut self,
        pair: &str,
        actor: &str,
        now: Millis,
    ) -> Result<Vec<ServerId>, StoreError> {
        self.retire_pair_kv(pair, actor, now)
    }

    fn retired(&self, pair: &str) -> Result<Option<Millis>, StoreError> {
        Ok(self.begin_pair(pair)?.1.and_then(|doc| doc.retired_at))
    }

    fn refuse_promotion(
        &mut self,
        id: i64,
        sid: ServerId,
        reason: &str,
        now: Millis,
    ) -> Result<(), StoreError> {
        self.refuse_promotion_kv(id, sid, reason, now)
    }

    fn revocation_list(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.key("ca", "revocations");
        Ok(self.get_many(&[key])?.pop().flatten().map(|v| v.value))
    }

    fn set_revocation_list(&mut self, crl: &[u8], _now: Millis) -> Result<(), StoreError> {
        let key = self.key("ca", "revocations");
        let put = Op::Put {
            key,
            value: crl.to_vec(),
        };
        self.kv.commit(&[], &[put])?;
        Ok(())
    }

    fn site_ca(&self, site: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.key("ca/site", site);
        Ok(self.get_many(&[key])?.pop().flatten().map(|v| v.value))
    }

    fn record_site_ca(&mut self, site: &str, cert: &[u8], _now: Millis) -> Result<(), StoreError> {
        let put = Op::Put {
            key: self.key("ca/site", site),
            value: cert.to_vec(),
        };
        self.kv.commit(&[], &[put])?;
        Ok(())
    }

    fn note(&mut self, pair: &str, actor: &str, text: &str, now: Millis) -> Result<(), StoreError> {
        check_note(text)?;
        self.transact("writing a note", |store| {
            let (mut tx, doc) = store.begin_pair(pair)?;
            let Some(mut doc) = doc.filter(|d| d.retired_at.is_none()) else {
                return Err(StoreError::NotAllowed(format!(
                    "there is no pair called {pair:?}"
                )));
            };
            tx.log(now, None, "note", (None, None), actor, text, &mut doc);
            tx.put_pair(&doc);
            Ok((tx, Ok(())))
        })
    }

    fn accounts(&self) -> Result<Vec<crate::accounts::Account>, StoreError> {
        self.scan("account")?
            .iter()
            .map(|(key, value)| decode(key, value))
            .collect()
    }

    fn put_account(&mut self, account: &crate::accounts::Account) -> Result<(), StoreError> {
        let put = Op::Put {
            key: self.key("account", &account.name),
            value: encode(account),
        };
        self.kv.commit(&[], &[put])?;
        Ok(())
    }

    fn remove_account(&mut self, name: &str) -> Result<bool, StoreError> {
        let key = self.key("account", name);
        let existed = self
            .get_many(std::slice::from_ref(&key))?
            .pop()
            .flatten()
            .is_some();
        if existed {
            self.kv.commit(&[], &[Op::Delete { key }])?;
        }
        Ok(existed)
    }
}
