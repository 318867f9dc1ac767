//! Provisioning and activation: new pairs and their one-time keys, and a box's first (or
//! repeated) activation: its role, overlay address, certificate and DNS names.

use super::*;

impl SqliteStore {
    pub(super) fn provision_pairs_in(
        &mut self,
        pairs: &[(String, String)],
        servers: usize,
        key_ttl: Duration,
        now: Millis,
    ) -> Result<Vec<Vec<Provisioned>>, StoreError> {
        check_servers(servers)?;
        let tx = begin(&mut self.conn)?;
        let mut all = Vec::with_capacity(pairs.len());
        for (name, fqdn) in pairs {
            let inserted = tx
                .execute(
                    "INSERT OR IGNORE INTO pairs (name, fqdn, created_at) VALUES (?1, ?2, ?3)",
                    params![name, fqdn, now],
                )
                .map_err(db("adding a pair"))?;
            if inserted == 0 {
                return Err(name_taken(name, retired_at(&tx, name)?));
            }
            let pair_id = tx.last_insert_rowid();
            let mut made = Vec::new();
            for position in 0..servers {
                let server = new_server(&tx, pair_id, position as i64, key_ttl, now)?;
                log(
                    &tx,
                    now,
                    Some(pair_id),
                    Some(server.sid),
                    "provisioned",
                    (None, None),
                    "cli",
                    &format!(
                        "pair {name} ({fqdn}), key valid until {}",
                        crate::time::utc(server.expires_at)
                    ),
                )?;
                made.push(server);
            }
            all.push(made);
        }
        tx.commit().map_err(db("committing"))?;
        Ok(all)
    }

    pub(super) fn provision_backup_in(
        &mut self,
        partner: ServerId,
        key_ttl: Duration,
        now: Millis,
    ) -> Result<Provisioned, StoreError> {
        let tx = begin(&mut self.conn)?;
        let row = row(&tx, partner)?;
        let count: i64 = tx
            .query_row(
                "SELECT COUNT(*) FROM servers WHERE pair_id = ?1",
                [row.pair_id],
                |r| r.get(0),
            )
            .map_err(db("counting servers"))?;
        if count >= 2 {
            return Err(StoreError::PairFull(row.pair_name));
        }
        let server = new_server(&tx, row.pair_id, 1, key_ttl, now)?;
        log(
            &tx,
            now,
            Some(row.pair_id),
            Some(server.sid),
            "provisioned",
            (None, None),
            "cli",
            &format!("backup for {partner} in pair {}", row.pair_name),
        )?;
        tx.commit().map_err(db("committing"))?;
        Ok(server)
    }

    pub(super) fn rekey_in(
        &mut self,
        sid: ServerId,
        key_ttl: Duration,
        now: Millis,
    ) -> Result<Provisioned, StoreError> {
        let tx = begin(&mut self.conn)?;
        let row = row(&tx, sid)?;
        let key = ActivationKey::generate();
        let expires_at = now.saturating_add(ms(key_ttl));
        tx.execute(
            "UPDATE servers SET key_hash = ?2, key_expires_at = ?3 WHERE sid = ?1",
            params![
                sid.to_string(),
                key.hash().as_bytes().as_slice(),
                expires_at
            ],
        )
        .map_err(db("storing the new key"))?;
        log(
            &tx,
            now,
            Some(row.pair_id),
            Some(sid),
            "rekeyed",
            (None, None),
            "cli",
            &format!(
                "new activation key for the {} of pair {}, valid until {}",
                row.role,
                row.pair_name,
                crate::time::utc(expires_at)
            ),
        )?;
        tx.commit().map_err(db("committing"))?;
        Ok(Provisioned {
            sid,
            key,
            expires_at,
        })
    }

    pub(super) fn activate_in(
        &mut self,
        request: &ActivationRequest,
        pool: Ipv4Cidr,
        now: Millis,
    ) -> Result<Activated, StoreError> {
        let sid = request.sid;
        let tx = begin(&mut self.conn)?;
        let row = row(&tx, sid)?;
        let (stored, expires, used, keys) = tx
            .query_row(
                "SELECT key_hash, key_expires_at, used_key_hash, wireguard_key, tls_key
                 FROM servers WHERE sid = ?1",
                [sid.to_string()],
                |r| {
                    Ok((
                        r.get::<_, Option<Vec<u8>>>(0)?,
                        r.get::<_, Option<Millis>>(1)?,
                        r.get::<_, Option<Vec<u8>>>(2)?,
                        (
                            r.get::<_, Option<String>>(3)?,
                            r.get::<_, Option<String>>(4)?,
                        ),
                    ))
                },
            )
            .map_err(db("reading the key"))?;
        // The same box asking again with the same key and the same public keys (the answer
        // to its first request was lost): it gets the same answer, nothing changes.
        let repeat = stored.is_none()
            && used
                .as_deref()
                .and_then(KeyHash::from_slice)
                .is_some_and(|hash| hash.matches(&request.key))
            && keys.0.as_deref() == Some(request.wireguard_key.as_str())
            && keys.1.as_deref() == Some(request.tls_key.as_str());
        if repeat {
            let overlay = overlay_of(&tx, &sid.to_string())?;
            let partner: Option<String> = partner_of(&tx, row.pair_id, sid)?;
            if let Some(overlay) = overlay {
                log(
                    &tx,
                    now,
                    Some(row.pair_id),
                    Some(sid),
                    "activation-repeated",
                    (None, None),
                    &request.source,
                    "the same box asked again (its first answer was lost); same answer",
                )?;
                tx.commit().map_err(db("committing"))?;
                return Ok(Activated {
                    role: row.role,
                    generation: row.generation,
                    overlay,
                    partner: partner.and_then(|p| p.parse().ok()),
                });
            }
        }
        let refusal = match stored.as_deref().and_then(KeyHash::from_slice) {
            None => Some(Refusal::Used),
            Some(hash) if !hash.matches(&request.key) => Some(Refusal::WrongKey),
            Some(_) if expires.is_none_or(|at| now > at) => Some(Refusal::Expired),
            Some(_) => None,
        };
        if let Some(why) = refusal {
            // The refusal is logged in its own transaction: the box learns nothing more.
            drop(tx);
            let tx = begin(&mut self.conn)?;
            log(
                &tx,
                now,
                Some(row.pair_id),
                Some(sid),
                "activation-refused",
                (None, None),
                &request.source,
                &why.to_string(),
            )?;
            tx.commit().map_err(db("committing"))?;
            return Err(StoreError::ActivationRefused { sid, why });
        }
        let kept: Option<String> = tx
            .query_row(
                "SELECT overlay_address FROM servers WHERE sid = ?1",
                [sid.to_string()],
                |r| r.get(0),
            )
            .map_err(db("reading the overlay address"))?;
        // A re-activation (a reinstalled box with a fresh key) keeps its address and role;
        // otherwise the first box of the pair to activate is primary at generation 1 and the
        // second its backup.
        let reactivation = row.role != Role::Unactivated;
        let overlay = match kept.and_then(|text| text.parse().ok()) {
            Some(address) => address,
            None => free_address(&tx, pool)?,
        };
        let (role, generation) = match (reactivation, &row.primary) {
            (true, _) => (row.role, row.generation),
            (false, None) => (Role::Primary, Generation::FIRST),
            (false, Some(_)) => (Role::Backup, row.generation),
        };
        tx.execute(
            "UPDATE servers SET role = ?2, used_key_hash = key_hash, key_hash = NULL,
               activated_at = ?3, wireguard_key = ?4, overlay_address = ?5, lan_address = ?6,
               software = ?7, inventory = ?8, reported_generation = ?9, tls_key = ?10
             WHERE sid = ?1",
            params![
                sid.to_string(),
                role_text(role),
                now,
                request.wireguard_key,
                overlay.to_string(),
                request.lan_address.to_string(),
                request.software,
                request.inventory,
                gen_sql(generation),
                request.tls_key
            ],
        )
        .map_err(db("activating"))?;
        tx.execute(
            "UPDATE servers SET advertised_address = COALESCE(advertised_address, ?2) WHERE sid = ?1",
            params![sid.to_string(), request.lan_address.to_string()],
        )
        .map_err(db("recording the advertised address"))?;
        let [fqdn, primary_name, backup_name] = dns_names(&row.fqdn);
        if role == Role::Primary {
            tx.execute(
                "UPDATE pairs SET primary_sid = ?2, generation = ?3 WHERE id = ?1",
                params![row.pair_id, sid.to_string(), gen_sql(generation)],
            )
            .map_err(db("recording the primary"))?;
            if !reactivation {
                want_dns(&tx, row.pair_id, &fqdn, request.lan_address, now)?;
            }
            want_dns(&tx, row.pair_id, &primary_name, overlay, now)?;
        } else {
            want_dns(&tx, row.pair_id, &backup_name, overlay, now)?;
        }
        let partner: Option<String> = tx
            .query_row(
                "SELECT sid FROM servers WHERE pair_id = ?1 AND sid != ?2",
                params![row.pair_id, sid.to_string()],
                |r| r.get(0),
            )
            .optional()
            .map_err(db("reading the partner"))?;
        log(
            &tx,
            now,
            Some(row.pair_id),
            Some(sid),
            if reactivation {
                "reactivated"
            } else {
                "activated"
            },
            (
                (row.generation.0 > 0).then_some(row.generation),
                Some(generation),
            ),
            &request.source,
            &format!(
                "{role} of pair {}, overlay {overlay}, LAN {}, software {}",
                row.pair_name, request.lan_address, request.software
            ),
        )?;
        tx.commit().map_err(db("committing"))?;
        Ok(Activated {
            role,
            generation,
            overlay,
            partner: partner.and_then(|p| p.parse().ok()),
        })
    }
}

/// Inserts a server with a fresh SID and key at `position` of the pair.
pub(super) fn new_server(
    tx: &rusqlite::Transaction<'_>,
    pair_id: i64,
    position: i64,
    key_ttl: Duration,
    now: Millis,
) -> Result<Provisioned, StoreError> {
    let key = ActivationKey::generate();
    let expires_at = now.saturating_add(ms(key_ttl));
    // A fresh random SID; a collision (one in 2^48 per pair of boxes) just tries again.
    loop {
        let sid = crate::keys::random_sid();
        let inserted = tx
            .execute(
                "INSERT OR IGNORE INTO servers (sid, pair_id, position, role, key_hash, key_expires_at)
                 VALUES (?1, ?2, ?3, 'unactivated', ?4, ?5)",
                params![
                    sid.to_string(),
                    pair_id,
                    position,
                    key.hash().as_bytes().as_slice(),
                    expires_at
                ],
            )
            .map_err(db("adding a server"))?;
        if inserted == 1 {
            return Ok(Provisioned {
                sid,
                key,
                expires_at,
            });
        }
    }
}

/// The lowest free host address of `pool` from its 10th (the first few are the data
/// center's own).
pub(super) fn free_address(
    tx: &rusqlite::Transaction<'_>,
    pool: Ipv4Cidr,
) -> Result<Ipv4Addr, StoreError> {
    let used: std::collections::BTreeSet<Ipv4Addr> = {
        let mut statement = tx
            .prepare("SELECT overlay_address FROM servers WHERE overlay_address IS NOT NULL")
            .map_err(db("reading overlay addresses"))?;
        let rows = statement
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(db("reading overlay addresses"))?;
        let mut used = std::collections::BTreeSet::new();
        for text in rows {
            if let Ok(ip) = text.map_err(db("reading overlay addresses"))?.parse() {
                used.insert(ip);
            }
        }
        used
    };
    lowest_free(pool, &used)
}

/// The lowest host address of `pool` from its 10th that is not in `used`.
pub(super) fn lowest_free(
    pool: Ipv4Cidr,
    used: &std::collections::BTreeSet<Ipv4Addr>,
) -> Result<Ipv4Addr, StoreError> {
    let network = u32::from(pool.network());
    let size = 1u64 << (32 - u32::from(pool.prefix.min(32)));
    (10..size.saturating_sub(256).max(10))
        .filter_map(|offset| u32::try_from(offset).ok())
        .map(|offset| Ipv4Addr::from(network.wrapping_add(offset)))
        .find(|ip| !used.contains(ip))
        .ok_or(StoreError::PoolExhausted(pool))
}
