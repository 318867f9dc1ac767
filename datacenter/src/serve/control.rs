//! The control API's sessions: a box's reports, promotions, hand-overs and registration, and
//! another site's questions about the tunnel peers. Each answer is one store transaction.

use super::trust::Recheck;
use super::*;
use crate::store::ReportKind;

pub(super) fn role_named(text: &str) -> Role {
    match text {
        "primary" => Role::Primary,
        "backup" => Role::Backup,
        "fenced" => Role::Fenced,
        _ => Role::Unactivated,
    }
}

pub(super) fn silent_ms(last: Option<Millis>, now: Millis) -> Option<u64> {
    last.map(|at| u64::try_from(now.saturating_sub(at)).unwrap_or(0))
}

pub(super) fn partner_of(pair: &PairView, sid: ServerId, now: Millis) -> Option<PartnerInfo> {
    let me = sid.to_string();
    let partner = pair.servers.iter().find(|s| s.sid != me)?;
    Some(PartnerInfo {
        sid: partner.sid.parse().ok()?,
        role: role_named(&partner.role),
        overlay: partner.overlay.as_deref().and_then(|a| a.parse().ok()),
        // Where it says it is now (a promoted box took the shared address), else where it
        // activated.
        lan: partner
            .advertised
            .as_deref()
            .or(partner.lan.as_deref())
            .and_then(|a| a.parse().ok()),
        silent_ms: silent_ms(partner.last_heartbeat_at, now),
    })
}

pub(super) fn pair_state(
    pair: &PairView,
    sid: ServerId,
    believes: Option<Role>,
    now: Millis,
) -> PairState {
    let me = sid.to_string();
    let recorded = pair
        .servers
        .iter()
        .find(|s| s.sid == me)
        .map_or(Role::Unactivated, |s| role_named(&s.role));
    // A box that believes it is primary when the records say otherwise must stand down.
    let role = if believes == Some(Role::Primary) && recorded != Role::Primary {
        Role::Fenced
    } else {
        recorded
    };
    PairState {
        role,
        generation: Generation(pair.generation),
        primary: pair.primary.as_deref().and_then(|p| p.parse().ok()),
        partner: partner_of(pair, sid, now),
        hardware_differences: pair.hardware_differences.clone(),
    }
}

pub(super) fn denial(err: StoreError) -> Denial {
    match err {
        StoreError::StaleGeneration { current, .. } => Denial::StaleGeneration { current },
        StoreError::Db { .. }
        | StoreError::Authority(_)
        | StoreError::Corrupt { .. }
        | StoreError::Busy(_) => Denial::Unavailable(err.to_string()),
        other => Denial::NotAllowed(other.to_string()),
    }
}

/// Keeps a box's resource samples for the portal; says up to when it has them.
async fn on_samples(
    inner: &Arc<Inner>,
    sid: ServerId,
    samples: Vec<lbs_protocol::control::ResourceSample>,
) -> Message {
    let shared = inner.clone();
    let kept = tokio::task::spawn_blocking(move || {
        shared
            .history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(&sid.to_string(), &samples, now_ms())
    })
    .await;
    match kept {
        Ok(Ok(upto_ms)) => Message::ResourceSamplesKept { upto_ms },
        Ok(Err(err)) => {
            tracing::warn!(%sid, "keeping resource samples: {err:#}");
            Message::Denied(Denial::Unavailable(format!(
                "the resource history cannot be written: {err:#}"
            )))
        }
        Err(err) => Message::Denied(Denial::Unavailable(err.to_string())),
    }
}

/// Says no to a peer no longer trusted, and closes.
async fn deny_and_close(
    conn: &mut ControlConn,
    generation: Generation,
    why: String,
) -> anyhow::Error {
    tracing::warn!("{why}");
    let denied = conn.send(Envelope {
        generation,
        message: Message::Denied(Denial::NotAllowed(why.clone())),
    });
    if tokio::time::timeout(IO_TIMEOUT, denied).await.is_ok() {
        linger(conn).await;
    }
    anyhow::anyhow!(why)
}

pub(super) async fn control(
    inner: &Arc<Inner>,
    tcp: TcpStream,
    source: SocketAddr,
    admission: Admission,
) -> anyhow::Result<()> {
    lbs_host::tcp::watch_peer(&tcp).context("setting up the connection")?;
    let (tls, peer) = tls::accept(inner.trust.control_tls(), tcp).await?;
    let mut recheck = Recheck::new(&inner.trust, tls.get_ref().1.peer_certificates());
    let sid = match peer {
        PeerName::Box(sid) => sid,
        PeerName::DataCenter => {
            admission.proven();
            return site_session(inner, tls, source, recheck).await;
        }
    };
    let presented = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(tls::key_fingerprint)
        .transpose()?;
    let shared = inner.clone();
    let found = with_store(inner, move |s| {
        Ok((s.certificate_key(sid)?, shared.liveness.pair_of(s, sid)?))
    })
    .await;
    let (current, pair) = match found {
        Ok(found) => found,
        Err(err) => {
            // Said to the box (a retired pair, the database failing: its log and status show
            // why), not just a closed connection.
            let why = err.to_string();
            let (mut conn, _) = exchange_hello(
                tls,
                &peer,
                our_hello(inner),
                Generation::default(),
                HELLO_TIMEOUT,
            )
            .await?;
            conn.send(Envelope {
                generation: Generation::default(),
                message: Message::Denied(denial(err)),
            })
            .await?;
            linger(&mut conn).await;
            anyhow::bail!(why);
        }
    };
    let (mut conn, negotiated) = exchange_hello(
        tls,
        &peer,
        our_hello(inner),
        Generation(pair.generation),
        HELLO_TIMEOUT,
    )
    .await?;
    *conn.codec_mut() = FrameCodec::with_max_len(MAX_CONTROL_LEN);
    if current.is_none() || current != presented {
        let why = format!(
            "the certificate of {sid} was replaced when the box was activated again; this one no longer gets in"
        );
        tracing::warn!(%source, "{why}");
        conn.send(Envelope {
            generation: Generation(pair.generation),
            message: Message::Denied(Denial::NotAllowed(why.clone())),
        })
        .await?;
        linger(&mut conn).await;
        anyhow::bail!(why);
    }
    admission.proven();
    let actor = format!("{sid} from {}", source.ip());
    loop {
        let Some(next) = next_request(&mut conn).await? else {
            return Ok(());
        };
        if let Err(why) = recheck.still_trusted(&inner.trust) {
            return Err(deny_and_close(&mut conn, next.generation, why).await);
        }
        let believed = next.generation;
        let reply = match next.message {
            Message::Report(report) => {
                on_report(inner, sid, believed, report, None, negotiated.version).await
            }
            Message::DetailedReport { report, details } => {
                if let Some(why) = details.too_large() {
                    let why = format!("a report's details hold {why}");
                    return Err(refuse_and_close(&mut conn, why).await);
                }
                on_report(
                    inner,
                    sid,
                    believed,
                    report,
                    Some(details),
                    negotiated.version,
                )
                .await
            }
            Message::PromotionRefused { id, reason } => on_refused(inner, sid, id, reason).await,
            Message::Promote { advertised } => {
                on_promote(inner, sid, believed, advertised, actor.clone(), None).await
            }
            Message::PromoteAs { advertised, how } => {
                // The audit log says how it came about (forced, offline, a hand-over, …).
                let actor = format!("{actor} ({how})");
                on_promote(inner, sid, believed, advertised, actor, None).await
            }
            Message::PromoteIfQuiet {
                advertised,
                how,
                quiet_ms,
            } => {
                let actor = format!("{actor} ({how})");
                let quiet = Some((quiet_ms, negotiated.version));
                on_promote(inner, sid, believed, advertised, actor, quiet).await
            }
            Message::HandOver { reason } => on_hand_over(inner, sid, reason).await,
            Message::PartnerKeyRequest => {
                match with_store(inner, move |s| {
                    let pair = s.pair_of(sid)?;
                    let partner = pair
                        .servers
                        .iter()
                        .find(|other| other.sid != sid.to_string())
                        .and_then(|other| other.sid.parse::<ServerId>().ok());
                    let key = match partner {
                        Some(partner) => s.certificate_key(partner)?,
                        None => None,
                    };
                    Ok((partner, key))
                })
                .await
                {
                    Ok((partner, key)) => Message::PartnerKey { partner, key },
                    Err(err) => Message::Denied(denial(err)),
                }
            }
            Message::RegisterBackup => on_register(inner, sid, actor.clone()).await,
            Message::RevocationListRequest => Message::RevocationList {
                crl: inner.trust.crl(),
            },
            Message::ResourceSamples { samples } => {
                if samples.len() > lbs_protocol::control::MAX_SAMPLES {
                    let why = format!(
                        "{} resource samples in one message; at most {} are read",
                        samples.len(),
                        lbs_protocol::control::MAX_SAMPLES
                    );
                    return Err(refuse_and_close(&mut conn, why).await);
                }
                on_samples(inner, sid, samples).await
            }
            Message::Goodbye { .. } => return Ok(()),
            other => {
                let why = format!("{} is not a control request", other.kind());
                return Err(refuse_and_close(&mut conn, why).await);
            }
        };
        // The envelope carries the pair's generation as the answer knows it.
        let generation = match &reply {
            Message::PairState(state) => state.generation,
            Message::PromotionRequested { state, .. }
            | Message::HandOverRequested { state, .. }
            | Message::PairStateWithDns { state, .. } => state.generation,
            Message::Promoted(promotion) => promotion.generation,
            Message::Denied(Denial::StaleGeneration { current }) => *current,
            _ => believed,
        };
        answer(&mut conn, generation, reply).await?;
    }
}

/// Another site of the data center (`lbs-datacenter site`, running tunnel endpoints) asks
/// which boxes its endpoints must accept, every few seconds, for as long as it runs.
pub(super) async fn site_session(
    inner: &Arc<Inner>,
    tls: tls::ServerStream<TcpStream>,
    source: SocketAddr,
    mut recheck: Recheck,
) -> anyhow::Result<()> {
    let (mut conn, negotiated) = exchange_hello(
        tls,
        &PeerName::DataCenter,
        our_hello(inner),
        Generation::default(),
        HELLO_TIMEOUT,
    )
    .await?;
    *conn.codec_mut() = FrameCodec::with_max_len(MAX_CONTROL_LEN);
    tracing::info!(%source, version = %negotiated.version, "a data-center site follows the tunnel peers");
    loop {
        let Some(next) = next_request(&mut conn)
            .await
            .with_context(|| format!("site at {source}"))?
        else {
            return Ok(());
        };
        if let Err(why) = recheck.still_trusted(&inner.trust) {
            return Err(deny_and_close(&mut conn, next.generation, why).await);
        }
        let reply = match next.message {
            Message::TunnelPairsRequest => match with_store(inner, |s| s.tunnel_pairs()).await {
                Ok(pairs) => Message::TunnelPairs {
                    pairs: pairs
                        .into_iter()
                        .map(|pair| {
                            pair.into_iter()
                                .map(|(public_key, overlay)| TunnelPeer {
                                    public_key,
                                    overlay,
                                })
                                .collect()
                        })
                        .collect(),
                },
                Err(err) => Message::Denied(denial(err)),
            },
            Message::TunnelPeersRequest => match with_store(inner, |s| s.tunnel_peers()).await {
                Ok(peers) => Message::TunnelPeers {
                    peers: peers
                        .into_iter()
                        .map(|(public_key, overlay)| TunnelPeer {
                            public_key,
                            overlay,
                        })
                        .collect(),
                },
                Err(err) => Message::Denied(denial(err)),
            },
            Message::Goodbye { .. } => return Ok(()),
            other => {
                let why = format!("{} is not a request a site makes", other.kind());
                let err = refuse_and_close(&mut conn, why).await;
                return Err(err.context(format!("site at {source}")));
            }
        };
        answer(&mut conn, Generation::default(), reply).await?;
    }
}

pub(super) async fn on_report(
    inner: &Arc<Inner>,
    sid: ServerId,
    believed: Generation,
    report: BoxReport,
    details: Option<lbs_protocol::control::ReportDetails>,
    version: lbs_protocol::ProtocolVersion,
) -> Message {
    // Promotion requests only go to boxes that understand them (1.2 and later), hand-overs
    // likewise (1.4 and later).
    let remote = version >= lbs_protocol::control::PROMOTION_REQUESTS;
    let hand_over = version >= lbs_protocol::control::HAND_OVERS;
    let record = store::Report {
        believed,
        software: report.software.to_string(),
        advertised: report.advertised,
        json: serde_json::to_string(&stored_report(&report, details)).unwrap_or_default(),
    };
    let believes = report.role;
    let shared = inner.clone();
    let result = with_store(inner, move |s| {
        let now = now_ms();
        let look = s.look(sid, &record, remote, now)?;
        let request = look.request.filter(|r| hand_over || r.hand_over.is_none());
        // Most reports only say the box is alive: kept in memory, written in a batch.
        let mut pair = match look.kind {
            ReportKind::Liveness => {
                shared.liveness.note(sid, record, now);
                look.pair
            }
            ReportKind::Decision => {
                shared.liveness.forget(sid);
                s.heartbeat(sid, &record, now)?;
                s.pair_of(sid)?
            }
        };
        shared.liveness.overlay(&mut pair);
        Ok((pair, request, now))
    })
    .await;
    match result {
        Ok((pair, request, now)) => {
            let state = pair_state(&pair, sid, Some(believes), now);
            if state.role == Role::Fenced && believes == Role::Primary {
                tracing::warn!(%sid, %believed, pair = pair.generation, "a stale primary reported: told it is fenced");
            }
            match request {
                Some(request) => {
                    tracing::info!(%sid, id = request.id, by = %request.requested_by, "promotion requested from the backup");
                    let remote = lbs_protocol::control::RemotePromotion {
                        id: u64::try_from(request.id).unwrap_or(0),
                        by: request.requested_by,
                    };
                    match request.hand_over {
                        Some(reason) => Message::HandOverRequested {
                            state,
                            request: remote,
                            reason,
                        },
                        None => Message::PromotionRequested {
                            state,
                            request: remote,
                        },
                    }
                }
                None if remote => Message::PairStateWithDns {
                    state,
                    dns: pair
                        .dns
                        .iter()
                        // Without [dns] nothing updates the names: say so, not "pending".
                        .map(|record| {
                            let mut record = record.clone();
                            if inner.config.dns.is_none() {
                                record.state = DnsState::NotConfigured;
                                record.last_error = None;
                            }
                            record
                        })
                        .map(|record| lbs_protocol::control::DnsRecordState {
                            name: record.name.clone(),
                            want: record.want.clone(),
                            state: match (&record.last_error, record.state) {
                                (Some(why), DnsState::Retrying) => {
                                    format!("retrying ({} failed: {why})", record.attempts)
                                }
                                (_, state) => state.to_string(),
                            },
                        })
                        .collect(),
                },
                None => Message::PairState(state),
            }
        }
        Err(err) => Message::Denied(denial(err)),
    }
}

/// The backup refused a requested promotion: recorded and logged; it gets the pair's state.
/// How long the backup may take to act on a hand-over, and how recently it must have
/// reported.
pub(super) const HAND_OVER_TTL: Duration = Duration::from_secs(60);

pub(super) const HAND_OVER_ALIVE: Duration = Duration::from_secs(20);

pub(super) async fn on_hand_over(inner: &Arc<Inner>, sid: ServerId, reason: String) -> Message {
    let limits = crate::store::HandOverLimits {
        ttl: HAND_OVER_TTL,
        alive: HAND_OVER_ALIVE,
        holdoff: inner.config.handover_holdoff,
    };
    let shared = inner.clone();
    let result = with_store(inner, move |s| {
        // The backup's last report decides (alive, in sync): the latest one, written first.
        shared.liveness.write(s)?;
        let now = now_ms();
        let request = s.hand_over(sid, &reason, limits, now)?;
        Ok((request, s.pair_of(sid)?, now))
    })
    .await;
    match result {
        Ok((request, pair, now)) => {
            tracing::warn!(%sid, id = request.id, "the primary hands over to the backup");
            Message::PairState(pair_state(&pair, sid, None, now))
        }
        Err(err) => {
            tracing::warn!(%sid, "hand-over refused: {err}");
            Message::Denied(denial(err))
        }
    }
}

pub(super) async fn on_refused(
    inner: &Arc<Inner>,
    sid: ServerId,
    id: u64,
    reason: String,
) -> Message {
    let shared = inner.clone();
    let result = with_store(inner, move |s| {
        let now = now_ms();
        let id = i64::try_from(id).unwrap_or(i64::MAX);
        s.refuse_promotion(id, sid, &reason, now)?;
        Ok((shared.liveness.pair_of(s, sid)?, now))
    })
    .await;
    match result {
        Ok((pair, now)) => {
            tracing::warn!(%sid, id, "the backup refused the requested promotion");
            Message::PairState(pair_state(&pair, sid, None, now))
        }
        Err(err) => Message::Denied(denial(err)),
    }
}

/// A promotion asked by `sid`; `quiet`: the silence of the primary it needs, and the box's
/// protocol (which says whether a refusal for its lack is told as such or in words).
pub(super) async fn on_promote(
    inner: &Arc<Inner>,
    sid: ServerId,
    believed: Generation,
    advertised: Ipv4Addr,
    actor: String,
    quiet: Option<(u64, lbs_protocol::ProtocolVersion)>,
) -> Message {
    let shared = inner.clone();
    let result = with_store(inner, move |s| {
        // The audit says how long before this the old primary last reported; the reports this
        // site holds are written first, so a primary heard here a moment ago counts.
        shared.liveness.write(s)?;
        let now = now_ms();
        let before = s.pair_of(sid)?;
        if let Some((quiet_ms, _)) = quiet {
            still_quiet(&before, sid, now, quiet_ms)?;
        }
        let promoted = s.promote(sid, believed, advertised, &actor, now)?;
        let previous_silent_ms = promoted.previous.and_then(|previous| {
            let previous = previous.to_string();
            before
                .servers
                .iter()
                .find(|s| s.sid == previous)
                .and_then(|s| silent_ms(s.last_heartbeat_at, now))
        });
        Ok(Promotion {
            generation: promoted.generation,
            previous: promoted.previous,
            previous_silent_ms,
        })
    })
    .await;
    match result {
        Ok(promotion) => {
            tracing::info!(%sid, generation = %promotion.generation, "promoted");
            inner.dns_wake.notify_one();
            Message::Promoted(promotion)
        }
        Err(err) => {
            tracing::warn!(%sid, "promotion refused: {err}");
            match err {
                StoreError::PrimaryAlive {
                    silent_ms,
                    quiet_ms,
                    ..
                } if quiet.is_some_and(|(_, v)| v >= lbs_protocol::control::ALIVE_DENIALS) => {
                    Message::Denied(Denial::PrimaryAlive {
                        silent_ms,
                        quiet_ms,
                    })
                }
                err => Message::Denied(denial(err)),
            }
        }
    }
}

/// Refuses a promotion that needs the pair's primary silent for `quiet_ms` when it was heard
/// more lately (a primary whose cable came back, or that booted, while its backup asked). A
/// box asking again for the promotion it was granted is the primary itself: not refused.
fn still_quiet(
    pair: &PairView,
    asking: ServerId,
    now: Millis,
    quiet_ms: u64,
) -> Result<(), StoreError> {
    let Some(primary) = pair.primary.as_deref().filter(|p| *p != asking.to_string()) else {
        return Ok(());
    };
    let heard = pair
        .servers
        .iter()
        .find(|s| s.sid == primary)
        .and_then(|s| silent_ms(s.last_heartbeat_at, now));
    match heard {
        Some(silent_ms) if silent_ms < quiet_ms => Err(StoreError::PrimaryAlive {
            primary: primary.to_owned(),
            silent_ms,
            quiet_ms,
        }),
        _ => Ok(()),
    }
}

pub(super) async fn on_register(inner: &Arc<Inner>, sid: ServerId, actor: String) -> Message {
    let shared = inner.clone();
    let result = with_store(inner, move |s| {
        let now = now_ms();
        s.register_backup(sid, &actor, now)?;
        Ok((shared.liveness.pair_of(s, sid)?, now))
    })
    .await;
    match result {
        Ok((pair, now)) => {
            tracing::info!(%sid, "registered as backup");
            Message::PairState(pair_state(&pair, sid, None, now))
        }
        Err(err) => Message::Denied(denial(err)),
    }
}

/// A report as the data center keeps it (and `status --json` shows it).
pub(super) fn stored_report(
    r: &BoxReport,
    details: Option<lbs_protocol::control::ReportDetails>,
) -> store::StoredReport {
    store::StoredReport {
        details,
        role: r.role.to_string(),
        software: r.software.to_string(),
        advertised: Some(r.advertised),
        sync_last_complete_ms: r.sync.last_complete_ms,
        sync_pending_files: Some(r.sync.pending_files),
        sync_pending_bytes: Some(r.sync.pending_bytes),
        tunnels: r
            .tunnels
            .iter()
            .map(|t| (t.name.clone(), t.healthy, t.active))
            .collect(),
    }
}
