//! What the store shows: pairs with their servers, reports and DNS records, the tunnel
//! peers, and the audit log. Reading only.

use std::collections::HashMap;

use super::*;

impl SqliteStore {
    /// One pair, with its servers, hardware comparison and DNS records.
    pub(super) fn pair_view(&self, id: i64) -> Result<PairView, StoreError> {
        self.pair_views(Some(id))?
            .pop()
            .ok_or_else(|| StoreError::NotAllowed(format!("no pair with id {id}")))
    }

    /// Pair `only`, or every pair not retired, in name order: four statements in all, so the
    /// fleet's views (status, the portal, /metrics) cost the same few reads for 5,000 pairs.
    fn pair_views(&self, only: Option<i64>) -> Result<Vec<PairView>, StoreError> {
        let filter = match only {
            Some(_) => "WHERE pair_id = ?1",
            None => "",
        };
        let args: Vec<i64> = only.into_iter().collect();
        let pairs_sql = match only {
            Some(_) => "SELECT id, name, fqdn, generation, primary_sid FROM pairs WHERE id = ?1",
            None => {
                "SELECT id, name, fqdn, generation, primary_sid FROM pairs
                 WHERE retired_at IS NULL ORDER BY name"
            }
        };
        let pairs = self
            .conn
            .prepare_cached(pairs_sql)
            .map_err(db("reading pairs"))?
            .query_map(rusqlite::params_from_iter(&args), |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Option<String>>(4)?,
                ))
            })
            .map_err(db("reading pairs"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db("reading pairs"))?;
        let mut servers: HashMap<i64, Vec<(ServerView, Option<String>)>> = HashMap::new();
        {
            let sql = format!(
                "SELECT pair_id, sid, role, overlay_address, lan_address, software, last_heartbeat_at,
                        reported_generation, advertised_address, report, inventory
                 FROM servers {filter} ORDER BY pair_id, position"
            );
            let mut statement = self
                .conn
                .prepare_cached(&sql)
                .map_err(db("reading servers"))?;
            let rows = statement
                .query_map(rusqlite::params_from_iter(&args), |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        ServerView {
                            sid: r.get(1)?,
                            role: r.get(2)?,
                            overlay: r.get(3)?,
                            lan: r.get(4)?,
                            software: r.get(5)?,
                            last_heartbeat_at: r.get(6)?,
                            reported_generation: r
                                .get::<_, Option<i64>>(7)?
                                .and_then(|g| u64::try_from(g).ok()),
                            advertised: r.get(8)?,
                            report: r
                                .get::<_, Option<String>>(9)?
                                .and_then(|j| serde_json::from_str::<StoredReport>(&j).ok()),
                        },
                        r.get::<_, Option<String>>(10)?,
                    ))
                })
                .map_err(db("reading servers"))?;
            for row in rows {
                let (pair, view, inventory) = row.map_err(db("reading servers"))?;
                servers.entry(pair).or_default().push((view, inventory));
            }
        }
        let mut dns: HashMap<i64, Vec<DnsView>> = HashMap::new();
        {
            let sql = format!(
                "SELECT pair_id, name, want, have, attempts, last_error, changed_at, done_at, needs_operator
                 FROM dns_records {filter} ORDER BY pair_id, name"
            );
            let mut statement = self
                .conn
                .prepare_cached(&sql)
                .map_err(db("reading DNS records"))?;
            let rows = statement
                .query_map(rusqlite::params_from_iter(&args), |r| {
                    let want: String = r.get(2)?;
                    let have: Option<String> = r.get(3)?;
                    let attempts: i64 = r.get(4)?;
                    let needs_operator: bool = r.get(8)?;
                    let state = DnsState::of(
                        have.as_deref() == Some(want.as_str()),
                        attempts,
                        needs_operator,
                    );
                    Ok((
                        r.get::<_, i64>(0)?,
                        DnsView {
                            name: r.get(1)?,
                            want,
                            have,
                            state,
                            attempts,
                            last_error: r.get(5)?,
                            changed_at: r.get(6)?,
                            done_at: r.get(7)?,
                        },
                    ))
                })
                .map_err(db("reading DNS records"))?;
            for row in rows {
                let (pair, view) = row.map_err(db("reading DNS records"))?;
                dns.entry(pair).or_default().push(view);
            }
        }
        let mut pending: HashMap<i64, PromotionRequest> = HashMap::new();
        {
            let sql = format!(
                "SELECT r.pair_id, {}
                 FROM promotion_requests r JOIN pairs p ON p.id = r.pair_id
                 WHERE r.state = 'pending' {} ORDER BY r.id",
                super::requests::REQUEST_COLUMNS,
                if only.is_some() {
                    "AND r.pair_id = ?1"
                } else {
                    ""
                }
            );
            let mut statement = self
                .conn
                .prepare_cached(&sql)
                .map_err(db("reading promotion requests"))?;
            let rows = statement
                .query_map(rusqlite::params_from_iter(&args), |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        super::requests::request_from_row(r, 1)?,
                    ))
                })
                .map_err(db("reading promotion requests"))?;
            for row in rows {
                let (pair, request) = row.map_err(db("reading promotion requests"))?;
                // The newest, should there be more than one.
                pending.insert(pair, request);
            }
        }
        Ok(pairs
            .into_iter()
            .map(|(id, name, fqdn, generation, primary)| {
                let (servers, inventories): (Vec<ServerView>, Vec<Option<String>>) =
                    servers.remove(&id).unwrap_or_default().into_iter().unzip();
                let parsed: Vec<Option<lbs_protocol::inventory::Inventory>> = inventories
                    .iter()
                    .map(|text| text.as_deref().and_then(|t| serde_json::from_str(t).ok()))
                    .collect();
                let hardware_differences = match parsed.as_slice() {
                    [Some(a), Some(b)] => Some(a.compare(b)),
                    _ => None,
                };
                PairView {
                    name,
                    fqdn,
                    generation: u64::try_from(generation).unwrap_or(0),
                    primary,
                    servers,
                    hardware_differences,
                    dns: dns.remove(&id).unwrap_or_default(),
                    pending: pending.remove(&id),
                }
            })
            .collect())
    }

    pub(super) fn pairs_in(&self) -> Result<Vec<PairView>, StoreError> {
        self.pair_views(None)
    }

    pub(super) fn pair_named_in(&self, name: &str) -> Result<Option<PairView>, StoreError> {
        let id = self
            .conn
            .query_row(
                "SELECT id FROM pairs WHERE name = ?1 AND retired_at IS NULL",
                [name],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map_err(db("reading a pair"))?;
        id.map(|id| self.pair_view(id)).transpose()
    }

    pub(super) fn pair_of_in(&self, sid: ServerId) -> Result<PairView, StoreError> {
        let id: i64 = self
            .conn
            .query_row(
                "SELECT pair_id FROM servers WHERE sid = ?1",
                [sid.to_string()],
                |r| r.get(0),
            )
            .optional()
            .map_err(db("reading a server"))?
            .ok_or(StoreError::UnknownServer(sid))?;
        self.pair_view(id)
    }

    pub(super) fn certificate_key_in(&self, sid: ServerId) -> Result<Option<String>, StoreError> {
        let (key, pair, retired) = self
            .conn
            .query_row(
                "SELECT s.tls_key, p.name, p.retired_at
                 FROM servers s JOIN pairs p ON p.id = s.pair_id WHERE s.sid = ?1",
                [sid.to_string()],
                |r| Ok((r.get(0)?, r.get::<_, String>(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(db("reading a certificate key"))?
            .ok_or(StoreError::UnknownServer(sid))?;
        not_retired(sid, &pair, retired)?;
        Ok(key)
    }

    pub(super) fn tunnel_peers_in(&self) -> Result<Vec<(String, Ipv4Addr)>, StoreError> {
        let mut statement = self
            .conn
            .prepare(&format!(
                "SELECT wireguard_key, overlay_address FROM servers
                     WHERE wireguard_key IS NOT NULL AND overlay_address IS NOT NULL
                     AND pair_id IN ({SERVED_PAIRS}) ORDER BY sid"
            ))
            .map_err(db("reading tunnel peers"))?;
        let rows = statement
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(db("reading tunnel peers"))?;
        let mut peers = Vec::new();
        for row in rows {
            let (key, overlay) = row.map_err(db("reading tunnel peers"))?;
            if let Ok(overlay) = overlay.parse() {
                peers.push((key, overlay));
            }
        }
        Ok(peers)
    }

    pub(super) fn tunnel_pairs_in(&self) -> Result<Vec<Vec<(String, Ipv4Addr)>>, StoreError> {
        let mut statement = self
            .conn
            .prepare(&format!(
                "SELECT pair_id, wireguard_key, overlay_address FROM servers
                     WHERE wireguard_key IS NOT NULL AND overlay_address IS NOT NULL
                     AND pair_id IN ({SERVED_PAIRS}) ORDER BY pair_id, wireguard_key"
            ))
            .map_err(db("reading tunnel peers"))?;
        let rows = statement
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(db("reading tunnel peers"))?;
        let mut pairs: Vec<(i64, Vec<(String, Ipv4Addr)>)> = Vec::new();
        for row in rows {
            let (pair, key, overlay) = row.map_err(db("reading tunnel peers"))?;
            let Ok(overlay) = overlay.parse() else {
                continue;
            };
            match pairs.last_mut() {
                Some((last, boxes)) if *last == pair => boxes.push((key, overlay)),
                _ => pairs.push((pair, vec![(key, overlay)])),
            }
        }
        Ok(pairs.into_iter().map(|(_, boxes)| boxes).collect())
    }

    pub(super) fn events_in(&self, after: i64) -> Result<Vec<Event>, StoreError> {
        let mut statement = self
            .conn
            .prepare(
                "SELECT e.id, e.at, p.name, e.sid, e.kind, e.from_generation, e.to_generation,
                        e.actor, e.detail
                 FROM events e LEFT JOIN pairs p ON p.id = e.pair_id
                 WHERE e.id > ?1 ORDER BY e.id",
            )
            .map_err(db("reading the audit log"))?;
        let events = statement
            .query_map([after], |r| {
                Ok(Event {
                    id: r.get(0)?,
                    at: r.get(1)?,
                    pair: r.get(2)?,
                    sid: r.get(3)?,
                    kind: r.get(4)?,
                    from_generation: r
                        .get::<_, Option<i64>>(5)?
                        .and_then(|g| u64::try_from(g).ok()),
                    to_generation: r
                        .get::<_, Option<i64>>(6)?
                        .and_then(|g| u64::try_from(g).ok()),
                    actor: r.get(7)?,
                    detail: r.get(8)?,
                })
            })
            .map_err(db("reading the audit log"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db("reading the audit log"))?;
        Ok(events)
    }
}
