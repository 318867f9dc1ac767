//! The CA files of a data directory. `ca.pem` is the root every box pins; its key, `ca.key`,
//! signs only the sites' CAs and the list of revoked ones (`init`, `site-init`,
//! `site-revoke`), so once the sites are made it can live offline (`--root-key`). Each site
//! signs boxes and its own endpoints with its CA, `site-ca.pem` and `site-ca.key`. A
//! directory made before sites had their own CA has only the root, which signs everything.
//!
//! The root's side keeps the sites' CAs it issued under `sites/` (`<site>.pem`), and those it
//! revoked under `sites/revoked/`: the revocation list is made from them.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use lbs_protocol::{CertificateAuthority, TrustRoot};

/// The root certificate (boxes pin it).
pub const CA_CERT: &str = "ca.pem";
/// The root's key.
pub const CA_KEY: &str = "ca.key";
/// This site's CA certificate.
pub const SITE_CA_CERT: &str = "site-ca.pem";
/// This site's CA key.
pub const SITE_CA_KEY: &str = "site-ca.key";
/// The sites' CAs the root issued.
pub const SITES_DIR: &str = "sites";
/// The revocation list last issued, as written by `site-revoke` (for reference: the sites
/// read it from the store).
pub const REVOCATIONS: &str = "revocations.crl";

/// The CA this site signs with: its own when it has one, else the root (a directory made
/// before sites had their own CA).
pub fn signer(dir: &Path) -> anyhow::Result<CertificateAuthority> {
    let (root, cert, key) = (
        dir.join(CA_CERT),
        dir.join(SITE_CA_CERT),
        dir.join(SITE_CA_KEY),
    );
    if cert.exists() || key.exists() {
        return CertificateAuthority::load_site(&root, &cert, &key).with_context(|| {
            format!(
                "loading this site's CA ({}, {})",
                cert.display(),
                key.display()
            )
        });
    }
    CertificateAuthority::load(&root, &dir.join(CA_KEY))
        .context("loading the CA (run `lbs-datacenter init` first)")
}

/// The root with its key: `root_key` when given (kept offline), else `ca.key` here.
pub fn root(dir: &Path, root_key: Option<&Path>) -> anyhow::Result<CertificateAuthority> {
    let key = root_key.map_or_else(|| dir.join(CA_KEY), Path::to_owned);
    if !key.exists() {
        bail!(
            "the root key {} is not here: bring it (--root-key PATH) — it signs sites' CAs and revocations only",
            key.display()
        );
    }
    CertificateAuthority::load(&dir.join(CA_CERT), &key).with_context(|| {
        format!(
            "loading the root ({} with {})",
            dir.join(CA_CERT).display(),
            key.display()
        )
    })
}

/// Where the root keeps the CA it issued for `site`.
pub fn issued(dir: &Path, site: &str) -> PathBuf {
    dir.join(SITES_DIR).join(format!("{site}.pem"))
}

/// Records `ca`, the CA of `site` the root just issued.
pub fn record_issued(dir: &Path, site: &str, ca: &CertificateAuthority) -> anyhow::Result<()> {
    let path = issued(dir, site);
    let sites = dir.join(SITES_DIR);
    std::fs::create_dir_all(&sites).with_context(|| format!("creating {}", sites.display()))?;
    TrustRoot::from_der(ca.certificate().clone())
        .save(&path)
        .with_context(|| format!("writing {}", path.display()))
}

/// Revokes `site`'s CA: its record moves to `sites/revoked/`, and the root signs a list of
/// every CA revoked so far (`number`: newer lists have larger ones). Returns the list (DER).
pub fn revoke(
    dir: &Path,
    root: &CertificateAuthority,
    site: &str,
    number: u64,
) -> anyhow::Result<Vec<u8>> {
    let path = issued(dir, site);
    let revoked_dir = dir.join(SITES_DIR).join("revoked");
    if !path.exists() {
        let known: Vec<String> = std::fs::read_dir(dir.join(SITES_DIR))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|name| name.strip_suffix(".pem").map(str::to_owned))
            .collect();
        bail!(
            "no CA of site {site:?} was issued from this directory ({}); sites with one: {}",
            dir.join(SITES_DIR).display(),
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        );
    }
    std::fs::create_dir_all(&revoked_dir)
        .with_context(|| format!("creating {}", revoked_dir.display()))?;
    let cert = TrustRoot::load(&path)?.der().clone();
    let serial = lbs_protocol::ca::serial_of(&cert)?;
    let hex: String = serial.iter().map(|b| format!("{b:02x}")).collect();
    let moved = revoked_dir.join(format!("{site}-{}.pem", &hex[..hex.len().min(16)]));
    std::fs::rename(&path, &moved).with_context(|| format!("moving {}", path.display()))?;
    let mut all = Vec::new();
    for entry in std::fs::read_dir(&revoked_dir)? {
        let entry = entry?.path();
        if entry.extension().is_some_and(|e| e == "pem") {
            all.push(TrustRoot::load(&entry)?.der().clone());
        }
    }
    let crl = root.revocation_list(&all, number)?;
    lbs_host::write_file_atomic(&dir.join(REVOCATIONS), &crl, 0o644)
        .with_context(|| format!("writing {}", dir.join(REVOCATIONS).display()))?;
    Ok(crl)
}
