//! Whom the control port trusts: the root, less the sites' CAs its revocation list (carried
//! by the store, so every site sees it) revokes. The list is read again every
//! [`TRUST_RELOAD`]; new connections meet the new list at once, and a connection accepted
//! before it is checked again at its next request.

use std::sync::RwLock;

use lbs_protocol::TrustRoot;
use lbs_protocol::tls::CertificateDer;

use super::*;

/// How often the revocation list is read from the store.
pub const TRUST_RELOAD: Duration = Duration::from_secs(10);

pub(super) struct Trust {
    /// The root without any list.
    root: TrustRoot,
    /// This site's identity on the control port.
    identity: Identity,
    state: RwLock<State>,
}

struct State {
    /// The list in force (DER), as the store holds it.
    crl: Option<Vec<u8>>,
    root: TrustRoot,
    control_tls: Arc<ServerConfig>,
    /// Counts the lists taken in, so a connection knows when to check itself again.
    version: u64,
    /// Why this site itself is no longer trusted, once its CA is revoked.
    revoked: Option<String>,
}

impl Trust {
    /// Trust in `root` as revoked by `crl`; an error when `identity` (this site's) is revoked.
    pub(super) fn new(
        identity: Identity,
        root: TrustRoot,
        crl: Option<Vec<u8>>,
    ) -> anyhow::Result<Trust> {
        let (revoking, control_tls) = configured(&identity, &root, crl.as_deref())?;
        Ok(Trust {
            root,
            identity,
            state: RwLock::new(State {
                crl,
                root: revoking,
                control_tls,
                version: 0,
                revoked: None,
            }),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The control port's TLS configuration now.
    pub(super) fn control_tls(&self) -> Arc<ServerConfig> {
        self.read().control_tls.clone()
    }

    /// Which list is in force (changes when another is taken in).
    pub(super) fn version(&self) -> u64 {
        self.read().version
    }

    /// The revocation list in force (DER), as the store holds it.
    pub(super) fn crl(&self) -> Option<Vec<u8>> {
        self.read().crl.clone()
    }

    /// Why this site's own CA is no longer trusted, if it is revoked.
    pub(super) fn revoked(&self) -> Option<String> {
        self.read().revoked.clone()
    }

    /// Whether a peer's `chain` (as it presented it) is still trusted; why not.
    pub(super) fn check(&self, chain: &[CertificateDer<'_>]) -> Result<(), String> {
        let root = self.read().root.clone();
        tls::verify_chain(chain, &root).map_err(|e| e.to_string())
    }

    /// Takes in the list the store holds now. `Ok(true)`: it changed; an error when it
    /// revokes this site itself (then nothing changes but [`Trust::revoked`]).
    pub(super) fn update(&self, crl: Option<Vec<u8>>) -> anyhow::Result<bool> {
        if self.read().crl == crl {
            return Ok(false);
        }
        match configured(&self.identity, &self.root, crl.as_deref()) {
            Ok((root, control_tls)) => {
                let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
                state.crl = crl;
                state.root = root;
                state.control_tls = control_tls;
                state.version += 1;
                Ok(true)
            }
            Err(err) => {
                let why = format!("{err:#}");
                self.state
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .revoked = Some(why.clone());
                anyhow::bail!(why)
            }
        }
    }
}

/// `root` revoking what `crl` lists, and the control port's configuration with it; an error
/// when the list is not the root's or revokes `identity`.
fn configured(
    identity: &Identity,
    root: &TrustRoot,
    crl: Option<&[u8]>,
) -> anyhow::Result<(TrustRoot, Arc<ServerConfig>)> {
    let revoking = match crl {
        Some(crl) => root
            .clone()
            .revoking(crl)
            .context("the revocation list in the store")?,
        None => root.clone(),
    };
    tls::check_chain(identity, &revoking).map_err(|err| {
        anyhow::anyhow!(
            "this site's certificate is no longer trusted ({err}): its CA was revoked \
             (lbs-datacenter site-revoke); make the site anew with site-init from the root"
        )
    })?;
    let control_tls = tls::server_config(identity, &revoking, AcceptPeers::BoxesAndSites)?;
    Ok((revoking, control_tls))
}

/// Reads the revocation list every [`TRUST_RELOAD`] and takes it in; stops the service
/// (`shutdown`) when it revokes this site.
pub(super) async fn trust_reloader(inner: Arc<Inner>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(TRUST_RELOAD) => {}
        }
        let crl = match with_store(&inner, |s| s.revocation_list()).await {
            Ok(crl) => crl,
            Err(err) => {
                tracing::warn!("reading the revocation list: {err}; the last one stays in force");
                continue;
            }
        };
        match inner.trust.update(crl) {
            Ok(true) => tracing::warn!(
                "a new revocation list of sites' CAs is in force: boxes and sites they signed are refused"
            ),
            Ok(false) => {}
            Err(err) => {
                tracing::error!("{err:#}; serve stops");
                shutdown.cancel();
                return;
            }
        }
    }
}

/// A connection's certificates as presented, checked again whenever another list comes in.
pub(super) struct Recheck {
    chain: Vec<CertificateDer<'static>>,
    seen: u64,
}

impl Recheck {
    /// For a connection that presented `chain` when `trust` was at its current list.
    pub(super) fn new(trust: &Trust, chain: Option<&[CertificateDer<'_>]>) -> Recheck {
        Recheck {
            chain: chain
                .unwrap_or_default()
                .iter()
                .map(|c| c.clone().into_owned())
                .collect(),
            seen: trust.version(),
        }
    }

    /// Whether the connection may go on: its chain is checked again when the list changed.
    pub(super) fn still_trusted(&mut self, trust: &Trust) -> Result<(), String> {
        let now = trust.version();
        if now == self.seen {
            return Ok(());
        }
        self.seen = now;
        trust.check(&self.chain).map_err(|err| {
            format!("this certificate is no longer trusted ({err}): the CA of the site that signed it was revoked; activate the box again at another site")
        })
    }
}
