//! The activation port (internet-facing, server-authenticated TLS): one request per
//! connection, checked, rate-limited per source, answered with a grant or a refusal.

use super::control::partner_of;
use super::*;

pub(super) fn refuse(detail: impl Into<String>) -> Message {
    Message::Refused(Refusal::ProtocolViolation {
        detail: detail.into(),
    })
}

pub(super) async fn activation(
    inner: &Arc<Inner>,
    tcp: TcpStream,
    source: SocketAddr,
    local: Option<SocketAddr>,
) -> anyhow::Result<()> {
    let tls = tokio::time::timeout(
        IO_TIMEOUT,
        tls::accept_any(inner.activation_tls.clone(), tcp),
    )
    .await
    .context("TLS handshake timed out")??;
    let mut conn = Framed::new(
        tls,
        FrameCodec::<Envelope>::with_max_len(MAX_ACTIVATION_LEN),
    );
    let first = tokio::time::timeout(IO_TIMEOUT, conn.next())
        .await
        .context("no request within the time limit")?;
    let reply = match first {
        None => return Ok(()),
        Some(Err(err)) => refuse(format!("activation request unreadable: {err}")),
        Some(Ok(Envelope {
            message: Message::Activate(request),
            ..
        })) => {
            let (sid, protocol) = (request.sid, request.protocol);
            answer(inner, sid, protocol, Ok(request), source, local).await
        }
        Some(Ok(Envelope {
            message: Message::ActivateJson(request),
            ..
        })) => {
            let (sid, protocol) = (request.sid, request.protocol);
            let typed = ActivationRequest::try_from(request).map_err(|_| {
                "the hardware inventory is not one `lbs net inventory --json` wrote".to_string()
            });
            answer(inner, sid, protocol, typed, source, local).await
        }
        Some(Ok(other)) => refuse(format!(
            "expected an activation request, got {}",
            other.message.kind()
        )),
    };
    let denied = !matches!(
        reply,
        Message::Activated(_) | Message::ActivatedWithChain { .. }
    );
    tokio::time::timeout(
        IO_TIMEOUT,
        conn.send(Envelope {
            generation: Generation::default(),
            message: reply,
        }),
    )
    .await
    .context("sending the answer timed out")??;
    if denied {
        linger(&mut conn).await;
    }
    Ok(())
}

/// The answer to an activation request of either form (`request` is the 1.6 form's error
/// when its inventory is not one): rate-limited per source, then checked and granted.
async fn answer(
    inner: &Arc<Inner>,
    sid: ServerId,
    protocol: lbs_protocol::ProtocolVersion,
    request: Result<ActivationRequest, String>,
    source: SocketAddr,
    local: Option<SocketAddr>,
) -> Message {
    let limited = inner
        .limiter
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take(source.ip(), Instant::now());
    if let Err(wait) = limited {
        tracing::warn!(%source, %sid, "activation attempt rate-limited");
        return Message::Denied(Denial::RateLimited {
            retry_after_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
        });
    }
    if protocol.major != PROTOCOL_VERSION.major {
        return Message::Refused(Refusal::IncompatibleProtocol {
            ours: PROTOCOL_VERSION,
            yours: protocol,
        });
    }
    // A box before 1.8 cannot take the site's CA with its certificate, and without it the
    // certificate leads to no root another site or its partner accepts.
    if !inner.ca.chain().is_empty() && protocol < lbs_protocol::control::CHAIN_IN_GRANT {
        let why = format!(
            "this site signs with its own CA under the root, which lbs of protocol {protocol} cannot present; update lbs on the box (protocol {} or later) and activate again",
            lbs_protocol::control::CHAIN_IN_GRANT
        );
        tracing::warn!(%source, %sid, "activation refused: {why}");
        return Message::Denied(Denial::Activation(why));
    }
    let request = match request {
        Ok(request) => request,
        Err(why) => {
            tracing::warn!(%source, %sid, "activation refused: {why}");
            return Message::Denied(Denial::Activation(why));
        }
    };
    match activate(inner, request, source, local).await {
        Ok(grant) => grant.into_answer(protocol),
        Err(denial) => Message::Denied(denial),
    }
}

pub(super) async fn activate(
    inner: &Arc<Inner>,
    request: ActivationRequest,
    source: SocketAddr,
    local: Option<SocketAddr>,
) -> Result<ActivationGrant, Denial> {
    let sid = request.sid;
    let refuse = |why: String| {
        tracing::warn!(%source, %sid, "activation refused: {why}");
        Denial::Activation(why)
    };
    if crate::config::box_key(&request.wireguard_key).is_none() {
        return Err(refuse(
            "the WireGuard public key is not a WireGuard key (44 base64 characters)".into(),
        ));
    }
    let (certificate, tls_key) = inner
        .ca
        .sign_request(&PeerName::Box(sid), &request.csr)
        .map_err(|e| refuse(format!("{e}")))?;
    let record = store::ActivationRequest {
        sid,
        key: request.key,
        wireguard_key: request.wireguard_key,
        tls_key,
        lan_address: request.lan_address,
        software: request.software.to_string(),
        inventory: serde_json::to_string(&request.inventory)
            .map_err(|e| refuse(format!("the hardware inventory cannot be stored: {e}")))?,
        source: source.ip().to_string(),
    };
    let pool = inner.config.overlay_pool;
    let activated = with_store(inner, move |s| {
        let activated = s.activate(&record, pool, now_ms())?;
        let pair = s.pair_of(sid)?;
        Ok((activated, pair))
    })
    .await;
    let (activated, pair) = match activated {
        Ok(done) => done,
        Err(err @ (StoreError::ActivationRefused { .. } | StoreError::UnknownServer(_))) => {
            return Err(refuse(err.to_string()));
        }
        Err(err @ (StoreError::PoolExhausted(_) | StoreError::Db { .. })) => {
            tracing::error!(%sid, "activation failed: {err}");
            return Err(Denial::Unavailable(err.to_string()));
        }
        Err(err) => return Err(refuse(err.to_string())),
    };
    tracing::info!(%source, %sid, role = %activated.role, overlay = %activated.overlay, "activated");
    inner.dns_wake.notify_one();
    inner.peers_wake.notify_one();
    let now = now_ms();
    let control = if inner.config.advertise_control.is_empty() {
        inner
            .config
            .control
            .iter()
            .map(|c| match (c.ip().is_unspecified(), local) {
                (true, Some(local)) => SocketAddr::new(local.ip(), c.port()),
                _ => *c,
            })
            .collect()
    } else {
        inner.config.advertise_control.clone()
    };
    Ok(ActivationGrant {
        role: activated.role,
        generation: activated.generation,
        pair: pair.name.clone(),
        fqdn: pair.fqdn.clone(),
        certificate: certificate.to_vec(),
        ca_pem: inner.ca.trust_root().to_pem(),
        overlay: activated.overlay,
        overlay_prefix: inner.config.overlay_pool.prefix,
        partner: partner_of(&pair, sid, now),
        endpoints: inner
            .config
            .endpoints
            .iter()
            .map(|settings| TunnelEndpoint {
                name: settings.name.clone(),
                endpoint: settings.public,
                public_key: settings.public_key.clone(),
                overlay: settings.overlay,
            })
            .collect(),
        control,
        chain: inner.ca.chain().iter().map(|c| c.to_vec()).collect(),
    })
}
