//! `lbs-datacenter migrate --to etcd`: a SQLite site's records written into an empty shared
//! store, numbers and generations kept. The counters go last: a store with them is migrated
//! (or in use) and is refused; one without them but with records is a migration that was
//! interrupted, and running it again writes the same keys over.

use super::super::Export;
use super::*;

/// What a migration wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Migrated {
    pub pairs: usize,
    pub servers: usize,
    pub events: usize,
}

impl KvStore {
    /// Writes `export` into this store, which must hold no counters (nothing decided yet).
    pub fn import(&mut self, export: &Export) -> Result<Migrated, StoreError> {
        let counters_key = format!("{}/counters", self.prefix);
        if self
            .kv
            .get(std::slice::from_ref(&counters_key))?
            .items
            .pop()
            .flatten()
            .is_some()
        {
            return Err(StoreError::NotAllowed(format!(
                "the shared store holds records under {} already (migrated, or in use): nothing was written",
                self.prefix
            )));
        }
        let mut ops: Vec<Op> = Vec::new();
        let flush = |ops: &mut Vec<Op>, room: usize| -> Result<(), StoreError> {
            if ops.len() + room > BATCH {
                self.kv.commit(&[], ops)?;
                ops.clear();
            }
            Ok(())
        };
        let put = |key: String, value: Vec<u8>| Op::Put { key, value };
        // Each pair's events are numbered from 1 in their order, the latest kept; they are
        // written in the order of the whole log, so the revisions keep it (and within one
        // revision, the number each brings).
        let mut counts: HashMap<String, u64> = HashMap::new();
        for event in &export.events {
            *counts.entry(pair_of(event)).or_default() += 1;
        }
        for (doc, reports) in &export.pairs {
            let mut doc = doc.clone();
            doc.event_seq = counts.get(&doc.name).copied().unwrap_or(0);
            let mut mine = vec![put(self.key("pair", &doc.name), encode(&doc))];
            if doc.dns_owed() {
                mine.push(put(self.key("dns-owed", &doc.name), Vec::new()));
            }
            for server in &doc.servers {
                mine.push(put(self.key("sid", &server.sid), encode(&doc.name)));
                if let Some(overlay) = server.overlay {
                    mine.push(put(
                        self.key("overlay", &overlay.to_string()),
                        encode(&server.sid),
                    ));
                }
            }
            for (sid, report) in reports {
                mine.push(put(self.key("report", sid), encode(report)));
            }
            for request in &doc.requests {
                mine.push(put(
                    self.key("request", &format!("{:016}", request.id)),
                    encode(&doc.name),
                ));
            }
            flush(&mut ops, mine.len())?;
            ops.extend(mine);
        }
        let mut seqs: HashMap<String, u64> = HashMap::new();
        let mut written = 0;
        for event in &export.events {
            let pair = pair_of(event);
            let seq = seqs.entry(pair.clone()).or_default();
            *seq += 1;
            let total = counts.get(&pair).copied().unwrap_or(0);
            if total.saturating_sub(*seq) >= self.events_kept {
                continue;
            }
            flush(&mut ops, 1)?;
            ops.push(put(event_key(&self.prefix, &pair, *seq), encode(event)));
            written += 1;
        }
        if let Some(crl) = &export.revocations {
            flush(&mut ops, 1)?;
            ops.push(put(self.key("ca", "revocations"), crl.clone()));
        }
        for (site, cert) in &export.site_cas {
            flush(&mut ops, 1)?;
            ops.push(put(self.key("ca/site", site), cert.clone()));
        }
        for account in &export.accounts {
            flush(&mut ops, 1)?;
            ops.push(put(self.key("account", &account.name), encode(account)));
        }
        flush(&mut ops, BATCH)?;
        self.kv.commit(
            &[Expect {
                key: counters_key.clone(),
                mod_revision: None,
            }],
            &[put(counters_key, encode(&export.counters))],
        )?;
        let (pairs, servers, _) = export.counts();
        Ok(Migrated {
            pairs,
            servers,
            events: written,
        })
    }
}

/// The pair an event is kept under (`-` for one of none).
fn pair_of(event: &Event) -> String {
    event.pair.clone().unwrap_or_else(|| "-".to_owned())
}
