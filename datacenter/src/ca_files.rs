//! The CA files of a data directory. `ca.pem` is the root every box pins; its key, `ca.key`,
//! signs only the sites' CAs and the list of revoked ones (`init`, `site-init`,
//! `site-revoke`), so once the sites are made it can live offline (`--root-key`). Each site
//! signs boxes and its own endpoints with its CA, `site-ca.pem` and `site-ca.key`. A
//! directory made before sites had their own CA has only the root, which signs everything.
//!
//! The sites' CAs the root issued, and the revocation list, are kept in the store, so the
//! root key and any site's directory are all `site-revoke` needs (the lost site's are not).

use std::path::Path;

use anyhow::{Context, bail};
use lbs_protocol::CertificateAuthority;
use lbs_protocol::ca::{revoked_serials, serial_of};
use lbs_protocol::tls::CertificateDer;

use crate::store::Store;

/// The root certificate (boxes pin it).
pub const CA_CERT: &str = "ca.pem";
/// The root's key.
pub const CA_KEY: &str = "ca.key";
/// This site's CA certificate.
pub const SITE_CA_CERT: &str = "site-ca.pem";
/// This site's CA key.
pub const SITE_CA_KEY: &str = "site-ca.key";

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
            "the root key {} is not here: give it with --root-key FILE (it signs sites' CAs and revocations only)",
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

/// The serial numbers the list in force in `store` revokes (none without a list); a list
/// the root did not sign is an error.
fn revoked_now(store: &dyn Store, root: &CertificateAuthority) -> anyhow::Result<Vec<Vec<u8>>> {
    let Some(crl) = store.revocation_list()? else {
        return Ok(Vec::new());
    };
    root.trust_root()
        .revoking(&crl)
        .context("the revocation list in the store")?;
    Ok(revoked_serials(&crl)?)
}

/// Issues the CA of `site` from `root` and records it in `store`. Refused while the site
/// has a CA not revoked (two of one name would make revoking one ambiguous).
pub fn issue_site(
    store: &mut dyn Store,
    root: &CertificateAuthority,
    site: &str,
    now: i64,
) -> anyhow::Result<CertificateAuthority> {
    if let Some(existing) = store.site_ca(site)? {
        let serial = serial_of(&CertificateDer::from(existing))?;
        if !revoked_now(store, root)?.contains(&serial) {
            bail!(
                "site {site} has a CA already; revoke it first (lbs-datacenter site-revoke --site {site}) to make the site anew"
            );
        }
    }
    let ca = root.issue_site_ca(site)?;
    store.record_site_ca(site, ca.certificate(), now)?;
    Ok(ca)
}

/// Revokes `site`'s CA: the root signs a list of every CA revoked so far and this one, and
/// `store` carries it to every site.
pub fn revoke(
    store: &mut dyn Store,
    root: &CertificateAuthority,
    site: &str,
    now: i64,
) -> anyhow::Result<()> {
    let Some(cert) = store.site_ca(site)? else {
        bail!(
            "the store holds no CA of a site {site:?} (sites get theirs from init and site-init)"
        );
    };
    let serial = serial_of(&CertificateDer::from(cert))?;
    let mut revoked = revoked_now(store, root)?;
    if revoked.contains(&serial) {
        bail!("site {site}'s CA is revoked already");
    }
    revoked.push(serial);
    // Lists are numbered by the time they were made: a newer one has a larger number.
    let number = u64::try_from(now).unwrap_or(0);
    let crl = root.revocation_list(&revoked, number)?;
    store.set_revocation_list(&crl, now)?;
    Ok(())
}
