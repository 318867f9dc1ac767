//! A SQLite site's records as the shared store keeps them, for `lbs-datacenter migrate --to
//! etcd`: every pair with its servers (keys, addresses, roles), generation, DNS records and
//! latest requests, every box's last report, the audit log, the counters, the sites' CAs, the revocation list and the portal's accounts — numbers kept,
//! so events, requests and generations go on where they were.

use super::shared::{Counters, DnsDoc, PairDoc, REQUESTS_KEPT, ReportDoc, RequestDoc, ServerDoc};
use super::*;

/// What a SQLite site holds, in the shared store's form.
#[derive(Debug)]
pub struct Export {
    pub(super) pairs: Vec<(PairDoc, Vec<(String, ReportDoc)>)>,
    pub(super) events: Vec<Event>,
    pub(super) counters: Counters,
    pub(super) revocations: Option<Vec<u8>>,
    pub(super) site_cas: Vec<(String, Vec<u8>)>,
    pub(super) accounts: Vec<crate::accounts::Account>,
}

impl Export {
    /// Pairs, servers and events in it.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.pairs.len(),
            self.pairs.iter().map(|(doc, _)| doc.servers.len()).sum(),
            self.events.len(),
        )
    }
}

fn text_hash(bytes: Option<Vec<u8>>) -> Option<String> {
    bytes
        .as_deref()
        .and_then(KeyHash::from_slice)
        .map(|hash| hash.to_hex())
}

impl SqliteStore {
    fn site_cas(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut statement = self
            .conn
            .prepare("SELECT site, cert FROM site_cas ORDER BY site")
            .map_err(db("reading the sites' CAs"))?;
        let rows = statement
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(db("reading the sites' CAs"))?;
        rows.collect::<Result<_, _>>()
            .map_err(db("reading the sites' CAs"))
    }

    /// Everything, read in one transaction.
    pub fn export(&mut self) -> Result<Export, StoreError> {
        let tx = begin(&mut self.conn)?;
        let mut pairs = Vec::new();
        {
            let mut statement = tx
                .prepare(
                    "SELECT id, name, fqdn, generation, primary_sid, created_at, retired_at
                     FROM pairs ORDER BY id",
                )
                .map_err(db("reading pairs"))?;
            let rows = statement
                .query_map([], |r| {
                    Ok(PairDoc {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        fqdn: r.get(2)?,
                        generation: u64::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
                        primary: r.get(4)?,
                        created_at: r.get(5)?,
                        retired_at: r.get(6)?,
                        servers: Vec::new(),
                        dns: Vec::new(),
                        requests: Vec::new(),
                        last_hand_over_at: None,
                        event_seq: 0,
                    })
                })
                .map_err(db("reading pairs"))?;
            for row in rows {
                pairs.push((row.map_err(db("reading pairs"))?, Vec::new()));
            }
        }
        for (doc, reports) in &mut pairs {
            let mut statement = tx
                .prepare_cached(
                    "SELECT sid, role, key_hash, key_expires_at, used_key_hash, activated_at,
                            wireguard_key, tls_key, overlay_address, lan_address, inventory,
                            last_heartbeat_at, reported_generation, software,
                            advertised_address, report
                     FROM servers WHERE pair_id = ?1 ORDER BY position",
                )
                .map_err(db("reading servers"))?;
            let rows = statement
                .query_map([doc.id], |r| {
                    let server = ServerDoc {
                        sid: r.get(0)?,
                        role: role_of(&r.get::<_, String>(1)?),
                        key_hash: text_hash(r.get(2)?),
                        key_expires_at: r.get(3)?,
                        used_key_hash: text_hash(r.get(4)?),
                        activated_at: r.get(5)?,
                        wireguard_key: r.get(6)?,
                        tls_key: r.get(7)?,
                        overlay: r.get::<_, Option<String>>(8)?.and_then(|t| t.parse().ok()),
                        lan: r.get::<_, Option<String>>(9)?.and_then(|t| t.parse().ok()),
                        inventory: r.get(10)?,
                    };
                    let report = ReportDoc {
                        at: r.get(11)?,
                        generation: r
                            .get::<_, Option<i64>>(12)?
                            .and_then(|g| u64::try_from(g).ok()),
                        software: r.get(13)?,
                        advertised: r.get::<_, Option<String>>(14)?.and_then(|t| t.parse().ok()),
                        report: r.get(15)?,
                    };
                    Ok((server, report))
                })
                .map_err(db("reading servers"))?;
            for row in rows {
                let (server, report) = row.map_err(db("reading servers"))?;
                reports.push((server.sid.clone(), report));
                doc.servers.push(server);
            }
            let mut statement = tx
                .prepare_cached(
                    "SELECT name, want, have, attempts, last_error, next_try_at, needs_operator,
                            changed_at, done_at
                     FROM dns_records WHERE pair_id = ?1 ORDER BY name",
                )
                .map_err(db("reading DNS records"))?;
            let rows = statement
                .query_map([doc.id], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Option<String>>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, Option<String>>(4)?,
                        r.get::<_, Millis>(5)?,
                        r.get::<_, bool>(6)?,
                        r.get::<_, Millis>(7)?,
                        r.get::<_, Option<Millis>>(8)?,
                    ))
                })
                .map_err(db("reading DNS records"))?;
            for row in rows {
                let (
                    name,
                    want,
                    have,
                    attempts,
                    last_error,
                    next_try_at,
                    needs_operator,
                    changed_at,
                    done_at,
                ) = row.map_err(db("reading DNS records"))?;
                // Only the store writes these, always from an address.
                let Ok(want) = want.parse() else { continue };
                doc.dns.push(DnsDoc {
                    name,
                    want,
                    have: have.and_then(|h| h.parse().ok()),
                    attempts,
                    last_error,
                    next_try_at,
                    failed_at: None,
                    needs_operator,
                    changed_at,
                    done_at,
                });
            }
            let mut statement = tx
                .prepare_cached(
                    "SELECT id, requested_by, requested_at, expires_at, state, answer,
                            answered_at, hand_over
                     FROM promotion_requests WHERE pair_id = ?1 ORDER BY id",
                )
                .map_err(db("reading promotion requests"))?;
            let rows = statement
                .query_map([doc.id], |r| {
                    Ok(RequestDoc {
                        id: r.get(0)?,
                        requested_by: r.get(1)?,
                        requested_at: r.get(2)?,
                        expires_at: r.get(3)?,
                        state: r.get(4)?,
                        answer: r.get(5)?,
                        answered_at: r.get(6)?,
                        hand_over: r.get(7)?,
                    })
                })
                .map_err(db("reading promotion requests"))?;
            for row in rows {
                let request = row.map_err(db("reading promotion requests"))?;
                if request.hand_over.is_some() {
                    doc.last_hand_over_at = Some(request.requested_at);
                }
                doc.requests.push(request);
            }
            let excess = doc.requests.len().saturating_sub(REQUESTS_KEPT);
            doc.requests.drain(..excess);
        }
        let counters = Counters {
            pair: tx
                .query_row("SELECT COALESCE(MAX(id), 0) FROM pairs", [], |r| r.get(0))
                .map_err(db("counting pairs"))?,
            request: tx
                .query_row(
                    "SELECT COALESCE(MAX(id), 0) FROM promotion_requests",
                    [],
                    |r| r.get(0),
                )
                .map_err(db("counting requests"))?,
        };
        drop(tx);
        let events = self.events_in(0)?;
        Ok(Export {
            pairs,
            events,
            counters,
            revocations: self.revocation_list()?,
            site_cas: self.site_cas()?,
            accounts: self.accounts_in()?,
        })
    }
}
