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
        // Each pair's events, numbered from 1 in their order; the latest kept.
        let mut events: HashMap<String, Vec<&Event>> = HashMap::new();
        for event in &export.events {
            let pair = event.pair.clone().unwrap_or_else(|| "-".to_owned());
            events.entry(pair).or_default().push(event);
        }
        let mut written = 0;
        for (doc, reports) in &export.pairs {
            let theirs = events.remove(&doc.name).unwrap_or_default();
            let mut doc = doc.clone();
            doc.event_seq = theirs.len() as u64;
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
            written += self.import_events(&doc.name, &theirs, &mut ops, &flush)?;
        }
        for (pair, theirs) in &events {
            written += self.import_events(pair, theirs, &mut ops, &flush)?;
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

    /// Queues pair `pair`'s events (oldest first) as its numbered keys, the latest
    /// [`EVENTS_KEPT`] (or as set); how many.
    fn import_events(
        &self,
        pair: &str,
        events: &[&Event],
        ops: &mut Vec<Op>,
        flush: &impl Fn(&mut Vec<Op>, usize) -> Result<(), StoreError>,
    ) -> Result<usize, StoreError> {
        let skip = events
            .len()
            .saturating_sub(usize::try_from(self.events_kept).unwrap_or(usize::MAX));
        for (seq, event) in events.iter().enumerate().skip(skip) {
            flush(ops, 1)?;
            ops.push(Op::Put {
                key: event_key(&self.prefix, pair, seq as u64 + 1),
                value: encode(event),
            });
        }
        Ok(events.len() - skip)
    }
}
