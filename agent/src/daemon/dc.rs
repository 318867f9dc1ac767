//! The link to the data center: one connection (TCP, TLS and hello within one deadline) and
//! what its answers say about the pair.

use std::net::SocketAddr;
use std::time::Duration;

use lbs_protocol::handshake::HELLO_TIMEOUT;
use lbs_protocol::tls;
use lbs_protocol::{Hello, PROTOCOL_VERSION, PeerName, Sender, SoftwareVersion};
use tokio::net::TcpStream;

use crate::activate::BoxInfo;
use crate::role::Event;

use crate::daemon::state::{Shared, lock};

/// How long a connection to the data center may take, handshakes included, and how long it
/// may take to answer a request.
pub(crate) const DC_DEADLINE: Duration = Duration::from_secs(5);
/// How long P waits for the data center's grant, all addresses tried, before it gives up.
pub(crate) const PROMOTION_DEADLINE: Duration = Duration::from_secs(12);

/// A control connection to the first data-center address that answers.
pub(crate) async fn connect_dc(shared: &Shared) -> anyhow::Result<(DcConnection, SocketAddr)> {
    let (conn, address, _) = connect_dc_negotiated(shared).await?;
    Ok((conn, address))
}

/// How long a site has to answer before the next one is tried alongside it.
const NEXT_SITE_AFTER: Duration = Duration::from_secs(1);

/// [`connect_dc`], with the protocol version both sides speak. The sites are tried in
/// [`dc_order`], each [`NEXT_SITE_AFTER`] after the one before unless that one failed
/// sooner, and the first to answer is kept: a site gone dark costs a second, not the whole
/// [`DC_DEADLINE`].
pub(crate) async fn connect_dc_negotiated(
    shared: &Shared,
) -> anyhow::Result<(DcConnection, SocketAddr, lbs_protocol::ProtocolVersion)> {
    use futures_util::StreamExt;
    let mut last_error = anyhow::anyhow!("the data center gave no control address");
    let mut waiting = dc_order(shared).into_iter();
    let mut trying = futures_util::stream::FuturesUnordered::new();
    let attempt = |address: SocketAddr| async move { (address, connect_at(shared, address).await) };
    if let Some(first) = waiting.next() {
        trying.push(attempt(first));
    }
    while !trying.is_empty() {
        let next = tokio::select! {
            Some((address, result)) = trying.next() => match result {
                Ok((conn, version)) => return Ok((conn, address, version)),
                Err(err) => {
                    dc_failed(shared, address);
                    last_error = err.context(format!("data center at {address}"));
                    true
                }
            },
            () = tokio::time::sleep(NEXT_SITE_AFTER) => true,
        };
        if next && let Some(address) = waiting.next() {
            trying.push(attempt(address));
        }
    }
    Err(last_error)
}

/// The data center's control addresses (one per site) in the order to try them: the one that
/// failed this box last goes last, as every site answers for the same shared authority.
pub(crate) fn dc_order(shared: &Shared) -> Vec<SocketAddr> {
    let mut addresses = lock(&shared.info).control.clone();
    if let Some(failed) = *lock(&shared.dc_failed)
        && let Some(at) = addresses.iter().position(|a| *a == failed)
    {
        let failed = addresses.remove(at);
        addresses.push(failed);
    }
    addresses
}

/// Records that the site at `address` failed this box (unreachable, silent, or unable to
/// reach the authority): the others are tried first from now on.
pub(crate) fn dc_failed(shared: &Shared, address: SocketAddr) {
    let mut failed = lock(&shared.dc_failed);
    if *failed != Some(address) && lock(&shared.info).control.len() > 1 {
        tracing::info!("the data center at {address} failed: the other sites are tried first");
    }
    *failed = Some(address);
}

/// A control connection to the site at `address`, within [`DC_DEADLINE`]: TCP, the TLS
/// handshake and the hello. A site that accepts connections but does not answer (stopped,
/// overloaded) is given up on like one that is down.
pub(crate) async fn connect_at(
    shared: &Shared,
    address: SocketAddr,
) -> anyhow::Result<(DcConnection, lbs_protocol::ProtocolVersion)> {
    let sid = lock(&shared.info).sid;
    let identity = lbs_protocol::Identity::load(&shared.paths.cert(), &shared.paths.key())?;
    let root = shared.paths.trust_root()?;
    let config = tls::client_config(&identity, &root)?;
    tokio::time::timeout(DC_DEADLINE, async {
        let tcp = TcpStream::connect(address).await?;
        lbs_host::tcp::watch_peer(&tcp)?;
        let stream = tls::connect(config, &PeerName::DataCenter, tcp).await?;
        let record = lock(&shared.machine).record.clone();
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            software: SoftwareVersion::current(),
            sender: Sender::Box {
                sid,
                role: record.state.wire_role(),
            },
        };
        let (conn, negotiated) = lbs_protocol::exchange_hello(
            stream,
            &PeerName::DataCenter,
            hello,
            record.generation,
            HELLO_TIMEOUT,
        )
        .await?;
        anyhow::Ok((conn, negotiated.version))
    })
    .await
    .unwrap_or_else(|_| {
        Err(anyhow::anyhow!(
            "connected, but no TLS handshake and hello within {} s",
            DC_DEADLINE.as_secs()
        ))
    })
}

/// A control connection to the data center.
pub(crate) type DcConnection = lbs_protocol::Connection<tls::ClientStream<TcpStream>>;

/// Restarts replication (whom it accepts changed); once for all that one answer changed.
pub(crate) fn restart_replication(shared: &Shared) {
    tracing::info!("replication restarts with whom it accepts now");
    shared.mode.send_modify(|_| {});
}

/// The partner's key as the data center certified it: kept in `box.json`; true when it
/// changed (the partner was activated again): replication must restart, accepting only the
/// new one.
#[must_use]
pub(crate) fn apply_partner_key(
    shared: &Shared,
    partner: Option<lbs_protocol::ServerId>,
    key: Option<String>,
) -> bool {
    let key = match (partner, key) {
        (Some(sid), Some(fingerprint)) => Some(crate::activate::PartnerKey { sid, fingerprint }),
        _ => None,
    };
    let changed = {
        let mut info = lock(&shared.info);
        if info.partner_key == key || key.is_none() {
            false
        } else {
            info.partner_key = key;
            if let Err(err) = info.save(&shared.paths) {
                tracing::warn!("saving the partner's key: {err:#}");
            }
            true
        }
    };
    if changed {
        tracing::info!("the partner's key is new to this box: only it is accepted from now on");
    }
    changed
}

/// What the data center said about the pair: partner, hardware, and the role (through the
/// machine: a stale primary fences itself). True when the partner changed: replication must
/// restart ([`restart_replication`]).
#[must_use]
pub(crate) fn apply_pair_state(shared: &Shared, state: lbs_protocol::control::PairState) -> bool {
    let partner_changed = {
        let mut info = lock(&shared.info);
        let partner_known = |i: &BoxInfo| i.partner.as_ref().map(|p| (p.sid, p.lan, p.overlay));
        let before = partner_known(&info);
        info.partner = state.partner.clone();
        let changed = partner_known(&info) != before;
        let hardware_changed = info.hardware_differences != state.hardware_differences;
        if hardware_changed {
            info.hardware_differences = state.hardware_differences.clone();
            if let Some(differences) = info.hardware_differences.as_ref().filter(|d| !d.is_empty())
            {
                tracing::warn!("the partner's hardware differs: {}", differences.join("; "));
            }
        }
        if (changed || hardware_changed)
            && let Err(err) = info.save(&shared.paths)
        {
            tracing::warn!("saving the partner's addresses: {err:#}");
        }
        // Addresses are read afresh by every pass; only another partner (a backup
        // provisioned later) changes whom the primary lets in.
        before.map(|b| b.0) != info.partner.as_ref().map(|p| p.sid)
    };
    if partner_changed {
        tracing::info!("the partner changed");
    }
    shared.handle(Event::Authority {
        role: state.role,
        generation: state.generation,
    });
    partner_changed
}
