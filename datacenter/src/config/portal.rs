//! `[portal]`: the provider's web portal on `serve` (off unless `listen` names an address).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct PortalFile {
    #[serde(default)]
    listen: Vec<SocketAddr>,
    #[serde(default)]
    names: Vec<String>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    metrics_token_file: Option<PathBuf>,
}

/// Where the portal listens and what it presents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortalSettings {
    /// HTTPS listeners.
    pub listen: Vec<SocketAddr>,
    /// The names browsers reach it by (DNS names or addresses), for the certificate this
    /// site's CA issues it; unused with `certificate`.
    pub names: Vec<String>,
    /// A certificate chain and key of the provider's own (PEM), instead of one from the CA.
    pub certificate: Option<(PathBuf, PathBuf)>,
    /// The bearer token Prometheus presents for `/metrics` (without one, `/metrics` needs a
    /// logged-in account).
    pub metrics_token: Option<String>,
}

pub(super) fn portal_settings(
    file: PortalFile,
    base: &Path,
) -> anyhow::Result<Option<PortalSettings>> {
    if file.listen.is_empty() {
        return Ok(None);
    }
    let certificate = match (file.cert_file, file.key_file) {
        (Some(cert), Some(key)) => Some((base.join(cert), base.join(key))),
        (None, None) => None,
        _ => bail!("[portal]: cert_file and key_file go together"),
    };
    if certificate.is_none() && file.names.is_empty() {
        bail!(
            "[portal]: give names (what browsers call the portal, for its certificate) or cert_file and key_file"
        );
    }
    let metrics_token = match file.metrics_token_file {
        Some(path) => {
            let path = base.join(path);
            let token = lbs_host::fs::read_secret(&path)
                .with_context(|| format!("[portal] metrics_token_file {}", path.display()))?;
            let token = token.trim().to_owned();
            if token.len() < 16 {
                bail!(
                    "[portal] metrics_token_file {}: use a token of 16 characters or more",
                    path.display()
                );
            }
            Some(token)
        }
        None => None,
    };
    Ok(Some(PortalSettings {
        listen: file.listen,
        names: file.names,
        certificate,
        metrics_token,
    }))
}
