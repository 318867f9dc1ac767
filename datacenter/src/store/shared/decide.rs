//! Decisions on the shared store: provisioning, activation, promotion and fencing, a fenced
//! box back as backup, a pair retired, a report that moves a DNS name. The same rules as
//! SQLite's (`store/activation.rs`, `store/roles.rs`), on one pair's document.

use super::*;

/// Writes per provisioned pair in one transaction: its document, two SID keys, two events and
/// the two old events they push out.
const OPS_PER_PAIR: usize = 7;

impl KvStore {
    pub(super) fn provision_pairs_kv(
        &self,
        pairs: &[(String, String)],
        servers: usize,
        key_ttl: Duration,
        now: Millis,
    ) -> Result<Vec<Vec<Provisioned>>, StoreError> {
        check_servers(servers)?;
        // Names taken refuse the whole list before anything is written.
        let keys: Vec<String> = pairs
            .iter()
            .map(|(name, _)| self.key("pair", name))
            .collect();
        let mut seen = std::collections::HashSet::new();
        for (((name, _), key), found) in pairs.iter().zip(&keys).zip(self.get_many(&keys)?) {
            if let Some(found) = found {
                let doc: PairDoc = decode(key, &found)?;
                return Err(name_taken(name, doc.retired_at));
            }
            if !seen.insert(name) {
                return Err(StoreError::PairExists(name.clone()));
            }
        }
        // More pairs than one transaction may write go in several: if one fails (another site
        // took a name meanwhile, the authority went away), those already made are undone, so
        // the list is made whole or not at all and no key is lost unseen.
        let mut made: Vec<Vec<Provisioned>> = Vec::with_capacity(pairs.len());
        for chunk in pairs.chunks((BATCH - 1) / OPS_PER_PAIR) {
            match self.provision_chunk(chunk, servers, key_ttl, now) {
                Ok(servers) => made.extend(servers),
                Err(err) => {
                    let undone = self.undo_provisioning(&pairs[..made.len()]);
                    return Err(match undone {
                        Ok(()) => err,
                        Err(undo) => StoreError::NotAllowed(format!(
                            "{err}; undoing the {} pairs made before it failed too ({undo}): retire them or rekey their servers",
                            made.len()
                        )),
                    });
                }
            }
        }
        Ok(made)
    }

    fn provision_chunk(
        &self,
        pairs: &[(String, String)],
        servers: usize,
        key_ttl: Duration,
        now: Millis,
    ) -> Result<Vec<Vec<Provisioned>>, StoreError> {
        let keys: Vec<String> = pairs
            .iter()
            .map(|(name, _)| self.key("pair", name))
            .collect();
        self.transact("provisioning", |store| {
            let (mut tx, read) = store.begin(&keys)?;
            for ((name, _), (key, found)) in pairs.iter().zip(keys.iter().zip(&read)) {
                if let Some(found) = found {
                    let doc: PairDoc = decode(key, found)?;
                    return Ok((tx, Err(name_taken(name, doc.retired_at))));
                }
            }
            let mut all = Vec::with_capacity(pairs.len());
            for (name, fqdn) in pairs {
                let mut doc = PairDoc {
                    id: tx.next_pair_id(),
                    name: name.clone(),
                    fqdn: fqdn.clone(),
                    generation: 0,
                    primary: None,
                    created_at: now,
                    retired_at: None,
                    servers: Vec::new(),
                    dns: Vec::new(),
                    requests: Vec::new(),
                    last_hand_over_at: None,
                    event_seq: 0,
                };
                let mut made = Vec::new();
                for _ in 0..servers {
                    let server = store.new_server(&mut tx, &mut doc, key_ttl, now);
                    tx.log(
                        now,
                        Some(server.sid),
                        "provisioned",
                        (None, None),
                        "cli",
                        &format!(
                            "pair {name} ({fqdn}), key valid until {}",
                            crate::time::utc(server.expires_at)
                        ),
                        &mut doc,
                    );
                    made.push(server);
                }
                tx.put_pair(&doc);
                all.push(made);
            }
            Ok((tx, Ok(all)))
        })
    }

    /// Removes pairs this provisioning made before a later part of it failed, with their
    /// events: nobody has their keys (they were never shown), and the name is free again.
    fn undo_provisioning(&self, pairs: &[(String, String)]) -> Result<(), StoreError> {
        for (name, _) in pairs {
            self.transact("undoing a provisioning", |store| {
                let (mut tx, doc) = store.begin_pair(name)?;
                let Some(doc) = doc else {
                    return Ok((tx, Ok(())));
                };
                for server in &doc.servers {
                    tx.delete(store.key("sid", &server.sid));
                }
                tx.delete(store.key("pair", name));
                // As if never made: its events go too (nobody saw its keys).
                for seq in 1..=doc.event_seq {
                    tx.delete(event_key(&store.prefix, name, seq));
                }
                Ok((tx, Ok(())))
            })?;
        }
        Ok(())
    }

    /// A server with a fresh SID and key added to `doc` (its SID key created with it).
    fn new_server(
        &self,
        tx: &mut Tx,
        doc: &mut PairDoc,
        key_ttl: Duration,
        now: Millis,
    ) -> Provisioned {
        let key = ActivationKey::generate();
        let expires_at = now.saturating_add(ms(key_ttl));
        // A random SID: a collision (one in 2^48 per pair of boxes) fails the compare and the
        // whole decision runs again with fresh ones.
        let sid = crate::keys::random_sid();
        let sid_key = self.key("sid", &sid.to_string());
        tx.rely(&sid_key, None);
        tx.put(sid_key, &doc.name);
        doc.servers.push(ServerDoc {
            sid: sid.to_string(),
            role: Role::Unactivated,
            key_hash: Some(key.hash().to_hex()),
            key_expires_at: Some(expires_at),
            used_key_hash: None,
            activated_at: None,
            wireguard_key: None,
            tls_key: None,
            overlay: None,
            lan: None,
            inventory: None,
        });
        Provisioned {
            sid,
            key,
            expires_at,
        }
    }

    pub(super) fn provision_backup_kv(
        &self,
        partner: ServerId,
        key_ttl: Duration,
        now: Millis,
    ) -> Result<Provisioned, StoreError> {
        self.transact("provisioning a backup", |store| {
            let (mut tx, mut doc) = store.begin_server(partner)?;
            if doc.servers.len() >= 2 {
                return Ok((tx, Err(StoreError::PairFull(doc.name))));
            }
            let server = store.new_server(&mut tx, &mut doc, key_ttl, now);
            tx.log(
                now,
                Some(server.sid),
                "provisioned",
                (None, None),
                "cli",
                &format!("backup for {partner} in pair {}", doc.name),
                &mut doc,
            );
            tx.put_pair(&doc);
            Ok((tx, Ok(server)))
        })
    }

    pub(super) fn rekey_kv(
        &self,
        sid: ServerId,
        key_ttl: Duration,
        now: Millis,
    ) -> Result<Provisioned, StoreError> {
        self.transact("storing a new key", |store| {
            let (mut tx, mut doc) = store.begin_server(sid)?;
            let key = ActivationKey::generate();
            let expires_at = now.saturating_add(ms(key_ttl));
            let Some(server) = doc.server_mut(sid) else {
                return Err(StoreError::UnknownServer(sid));
            };
            server.key_hash = Some(key.hash().to_hex());
            server.key_expires_at = Some(expires_at);
            let role = server.role;
            tx.log(
                now,
                Some(sid),
                "rekeyed",
                (None, None),
                "cli",
                &format!(
                    "new activation key for the {role} of pair {}, valid until {}",
                    doc.name,
                    crate::time::utc(expires_at)
                ),
                &mut doc,
            );
            tx.put_pair(&doc);
            Ok((
                tx,
                Ok(Provisioned {
                    sid,
                    key,
                    expires_at,
                }),
            ))
        })
    }

    pub(super) fn activate_kv(
        &self,
        request: &ActivationRequest,
        pool: Ipv4Cidr,
        now: Millis,
    ) -> Result<Activated, StoreError> {
        let sid = request.sid;
        self.transact("activating", |store| {
            let (mut tx, mut doc) = store.begin_server(sid)?;
            let partner = doc.partner(sid);
            let pair_generation = Generation(doc.generation);
            let Some(server) = doc.server(sid).cloned() else {
                return Err(StoreError::UnknownServer(sid));
            };
            // The same box asking again with the same key and the same public keys (the
            // answer to its first request was lost): the same answer, nothing changes.
            let repeat = server.key_hash.is_none()
                && server
                    .used_key_hash
                    .as_deref()
                    .and_then(KeyHash::from_hex)
                    .is_some_and(|hash| hash.matches(&request.key))
                && server.wireguard_key.as_deref() == Some(request.wireguard_key.as_str())
                && server.tls_key.as_deref() == Some(request.tls_key.as_str());
            if let (true, Some(overlay)) = (repeat, server.overlay) {
                tx.log(
                    now,
                    Some(sid),
                    "activation-repeated",
                    (None, None),
                    &request.source,
                    "the same box asked again (its first answer was lost); same answer",
                    &mut doc,
                );
                tx.put_pair(&doc);
                let activated = Activated {
                    role: server.role,
                    generation: pair_generation,
                    overlay,
                    partner,
                };
                return Ok((tx, Ok(activated)));
            }
            let refusal = match server.key_hash.as_deref().and_then(KeyHash::from_hex) {
                None => Some(Refusal::Used),
                Some(hash) if !hash.matches(&request.key) => Some(Refusal::WrongKey),
                Some(_) if server.key_expires_at.is_none_or(|at| now > at) => {
                    Some(Refusal::Expired)
                }
                Some(_) => None,
            };
            if let Some(why) = refusal {
                // Logged; the box learns nothing more.
                tx.log(
                    now,
                    Some(sid),
                    "activation-refused",
                    (None, None),
                    &request.source,
                    &why.to_string(),
                    &mut doc,
                );
                tx.put_pair(&doc);
                return Ok((tx, Err(StoreError::ActivationRefused { sid, why })));
            }
            // A re-activation keeps its address and role; otherwise the pair's first box to
            // activate is primary at generation 1 and the second its backup.
            let reactivation = server.role != Role::Unactivated;
            let overlay = match server.overlay {
                Some(address) => address,
                None => {
                    let address = store.free_overlay(pool)?;
                    let key = store.key("overlay", &address.to_string());
                    tx.rely(&key, None);
                    tx.put(key, &sid.to_string());
                    address
                }
            };
            let (role, generation) = match (reactivation, &doc.primary) {
                (true, _) => (server.role, pair_generation),
                (false, None) => (Role::Primary, Generation::FIRST),
                (false, Some(_)) => (Role::Backup, pair_generation),
            };
            store.update_report(&mut tx, sid, |report| {
                report.software = Some(request.software.clone());
                report.generation = Some(generation.0);
                report.advertised = report.advertised.or(Some(request.lan_address));
            })?;
            if let Some(server) = doc.server_mut(sid) {
                server.role = role;
                server.used_key_hash = server.key_hash.take();
                server.activated_at = Some(now);
                server.wireguard_key = Some(request.wireguard_key.clone());
                server.tls_key = Some(request.tls_key.clone());
                server.overlay = Some(overlay);
                server.lan = Some(request.lan_address);
                server.inventory = Some(request.inventory.clone());
            }
            let [fqdn, primary_name, backup_name] = dns_names(&doc.fqdn);
            if role == Role::Primary {
                doc.primary = Some(sid.to_string());
                doc.generation = generation.0;
                if !reactivation {
                    doc.want_dns(&fqdn, request.lan_address, now);
                }
                doc.want_dns(&primary_name, overlay, now);
            } else {
                doc.want_dns(&backup_name, overlay, now);
            }
            tx.log(
                now,
                Some(sid),
                if reactivation {
                    "reactivated"
                } else {
                    "activated"
                },
                (
                    (pair_generation.0 > 0).then_some(pair_generation),
                    Some(generation),
                ),
                &request.source,
                &format!(
                    "{role} of pair {}, overlay {overlay}, LAN {}, software {}",
                    doc.name, request.lan_address, request.software
                ),
                &mut doc,
            );
            tx.put_pair(&doc);
            Ok((
                tx,
                Ok(Activated {
                    role,
                    generation,
                    overlay,
                    partner,
                }),
            ))
        })
    }

    pub(super) fn promote_kv(
        &self,
        sid: ServerId,
        believed: Generation,
        advertised: Ipv4Addr,
        actor: &str,
        now: Millis,
    ) -> Result<Promoted, StoreError> {
        self.transact("promoting", |store| {
            let (mut tx, mut doc) = store.begin_server(sid)?;
            let current = Generation(doc.generation);
            let role = doc.server(sid).map_or(Role::Unactivated, |s| s.role);
            if role == Role::Primary && believed.next() == Some(current) {
                // The same box asking again for the promotion it was granted (the answer was
                // lost, or unconfirmed when the authority went away): the same answer.
                let promoted = Promoted {
                    generation: current,
                    previous: doc.partner(sid),
                    repeat: true,
                };
                return Ok((tx, Ok(promoted)));
            }
            if role != Role::Backup {
                return Err(StoreError::NotAllowed(format!(
                    "{sid} is {role} of pair {}, not its backup: only the backup can be promoted",
                    doc.name
                )));
            }
            let next = believed.next().ok_or_else(|| {
                StoreError::NotAllowed("the generation counter is exhausted".into())
            })?;
            // The compare-and-set: only if nobody moved the generation since the box looked
            // (and, through the document's version, since this site read it).
            if current != believed {
                return Err(StoreError::StaleGeneration { believed, current });
            }
            let old = doc.primary.clone();
            let old_heard = match old.as_deref() {
                Some(old) => store.report_in(&mut tx, old)?.at,
                None => None,
            };
            for server in &mut doc.servers {
                if server.role == Role::Primary {
                    server.role = Role::Fenced;
                }
            }
            let overlay = doc.server_mut(sid).and_then(|s| {
                s.role = Role::Primary;
                s.overlay
            });
            let old_overlay = old
                .as_deref()
                .and_then(|o| o.parse().ok())
                .and_then(|o| doc.server(o))
                .and_then(|s| s.overlay);
            doc.generation = next.0;
            doc.primary = Some(sid.to_string());
            store.update_report(&mut tx, sid, |report| {
                report.generation = Some(next.0);
                report.advertised = Some(advertised);
            })?;
            let [fqdn, primary_name, backup_name] = dns_names(&doc.fqdn);
            doc.want_dns(&fqdn, advertised, now);
            if let Some(overlay) = overlay {
                doc.want_dns(&primary_name, overlay, now);
            }
            if let Some(overlay) = old_overlay {
                doc.want_dns(&backup_name, overlay, now);
            }
            tx.log(
                now,
                Some(sid),
                "promoted",
                (Some(believed), Some(next)),
                actor,
                &promoted_detail(sid, &doc.name, advertised, old.as_deref(), old_heard, now),
                &mut doc,
            );
            if let Some(pending) = doc.pending() {
                pending.state = RequestState::Promoted;
                pending.answer = Some(format!("promoted at {next}"));
                pending.answered_at = Some(now);
            }
            tx.put_pair(&doc);
            let promoted = Promoted {
                generation: next,
                previous: old.and_then(|o| o.parse().ok()),
                repeat: false,
            };
            Ok((tx, Ok(promoted)))
        })
    }

    pub(super) fn register_backup_kv(
        &self,
        sid: ServerId,
        actor: &str,
        now: Millis,
    ) -> Result<Generation, StoreError> {
        self.transact("registering a backup", |store| {
            let (mut tx, mut doc) = store.begin_server(sid)?;
            let generation = Generation(doc.generation);
            match doc.server(sid).map_or(Role::Unactivated, |s| s.role) {
                Role::Backup => return Ok((tx, Ok(generation))),
                Role::Fenced => {}
                Role::Primary => {
                    return Err(StoreError::NotAllowed(format!(
                        "{sid} is the current primary of pair {}: promote its partner first",
                        doc.name
                    )));
                }
                Role::Unactivated => {
                    return Err(StoreError::NotAllowed(format!(
                        "{sid} is not activated yet"
                    )));
                }
            }
            if let Some(server) = doc.server_mut(sid) {
                server.role = Role::Backup;
            }
            store.update_report(&mut tx, sid, |report| {
                report.generation = Some(generation.0);
            })?;
            tx.log(
                now,
                Some(sid),
                "registered-backup",
                (Some(generation), Some(generation)),
                actor,
                &format!("{sid} is backup of pair {}", doc.name),
                &mut doc,
            );
            tx.put_pair(&doc);
            Ok((tx, Ok(generation)))
        })
    }

    pub(super) fn retire_pair_kv(
        &self,
        pair: &str,
        actor: &str,
        now: Millis,
    ) -> Result<Vec<ServerId>, StoreError> {
        self.transact("retiring a pair", |store| {
            let (mut tx, doc) = store.begin_pair(pair)?;
            let Some(mut doc) = doc else {
                return Err(StoreError::NotAllowed(format!(
                    "there is no pair called {pair:?}"
                )));
            };
            if let Some(at) = doc.retired_at {
                return Err(StoreError::NotAllowed(format!(
                    "pair {pair} was retired {} already",
                    crate::time::utc(at)
                )));
            }
            let sids: Vec<ServerId> = doc
                .servers
                .iter()
                .filter_map(|s| s.sid.parse().ok())
                .collect();
            doc.retired_at = Some(now);
            if let Some(pending) = doc.pending() {
                pending.state = RequestState::Refused;
                pending.answer = Some("the pair was retired".into());
                pending.answered_at = Some(now);
            }
            tx.log(
                now,
                None,
                "retired",
                (None, None),
                actor,
                &retired_detail(pair, &sids),
                &mut doc,
            );
            tx.put_pair(&doc);
            Ok((tx, Ok(sids)))
        })
    }

    pub(super) fn heartbeat_kv(
        &self,
        sid: ServerId,
        report: &Report,
        now: Millis,
    ) -> Result<(Role, Generation), StoreError> {
        self.transact("recording a report", |store| {
            let (mut tx, mut doc) = store.begin_server(sid)?;
            let role = doc.server(sid).map_or(Role::Unactivated, |s| s.role);
            if role == Role::Unactivated {
                return Err(StoreError::NotAllowed(format!(
                    "{sid} is not activated yet"
                )));
            }
            let generation = Generation(doc.generation);
            tx.put(
                store.key("report", &sid.to_string()),
                &report_doc(report, now),
            );
            // The primary's address may change (a new uplink): the pair's name follows it.
            if role == Role::Primary && report.believed == generation {
                let [fqdn, ..] = dns_names(&doc.fqdn);
                if doc.want_dns(&fqdn, report.advertised, now) {
                    tx.put_pair(&doc);
                }
            }
            Ok((tx, Ok((role, generation))))
        })
    }
}

/// Random addresses of the pool tried at once for a new box.
const PROBES: usize = 16;

impl KvStore {
    /// What a decision says of `sid`'s last report (its generation, its address), written
    /// with the decision and relying on the report as read.
    fn update_report(
        &self,
        tx: &mut Tx,
        sid: ServerId,
        change: impl FnOnce(&mut ReportDoc),
    ) -> Result<(), StoreError> {
        let mut report = self.report_in(tx, &sid.to_string())?;
        change(&mut report);
        tx.put(self.key("report", &sid.to_string()), &report);
        Ok(())
    }

    /// A free overlay address of `pool`: the first free of a few random ones read at once
    /// (sites activating at the same time rarely pick the same, and no activation reads every
    /// address); when all of those are taken (a pool nearly full), the lowest free one.
    fn free_overlay(&self, pool: Ipv4Cidr) -> Result<Ipv4Addr, StoreError> {
        let network = u32::from(pool.network());
        let size = 1u64 << (32 - u32::from(pool.prefix.min(32)));
        // The first ten and the last 256 are the data center's own, as lowest_free keeps them.
        let span = size.saturating_sub(256).saturating_sub(10);
        if span > 0 {
            let candidates: Vec<Ipv4Addr> = (0..PROBES)
                .filter_map(|_| {
                    let offset = 10 + crate::keys::random_u64() % span;
                    Some(Ipv4Addr::from(
                        network.wrapping_add(u32::try_from(offset).ok()?),
                    ))
                })
                .collect();
            let keys: Vec<String> = candidates
                .iter()
                .map(|ip| self.key("overlay", &ip.to_string()))
                .collect();
            let read = self.kv.get(&keys)?.items;
            if let Some((ip, _)) = candidates.iter().zip(&read).find(|(_, r)| r.is_none()) {
                return Ok(*ip);
            }
        }
        let used: std::collections::BTreeSet<Ipv4Addr> = self
            .scan("overlay")?
            .iter()
            .filter_map(|(key, _)| key.rsplit('/').next()?.parse().ok())
            .collect();
        super::super::activation::lowest_free(pool, &used)
    }
}

/// A report as the store keeps it.
pub(super) fn report_doc(report: &Report, at: Millis) -> ReportDoc {
    ReportDoc {
        at: Some(at),
        generation: Some(report.believed.0),
        software: Some(report.software.clone()),
        advertised: Some(report.advertised),
        report: Some(report.json.clone()),
    }
}
