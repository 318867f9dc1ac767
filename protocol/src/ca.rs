//! The data center's certificate authority (feature `ca`): it signs the identities of boxes
//! (from their signing requests: the key never leaves the box) and of its own endpoints.
//! Boxes and their commands never sign, so they do not link this.
//!
//! An installation has one root, the certificate every box pins. Its key signs only the
//! sites' own CAs (intermediates, one per site) and the list of revoked ones, so it can be
//! kept offline; each site signs boxes and its endpoints with its own key, and a site whose
//! key is lost is revoked without touching a box. A root made before sites had their own CA
//! (path length 0) signs boxes itself, at every site that holds its key.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::tls::*;

/// The data center's certificate authority: issues box and data-center identities (feature
/// `ca`: only the data center signs).
pub struct CertificateAuthority {
    /// The signer's certificate: the root, or a site's CA.
    cert: CertificateDer<'static>,
    /// The root above it, when the signer is a site's CA.
    root: Option<CertificateDer<'static>>,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("CertificateAuthority")
            .field("cert_len", &self.cert.len())
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Creates a new root with a fresh key; `common_name` names the installation
    /// ("Example Telecom lbs CA"). It may sign sites' CAs ([`Self::issue_site_ca`]).
    pub fn generate(common_name: &str) -> Result<Self, TlsError> {
        Self::generate_with_depth(common_name, 1)
    }

    /// A root as made before sites had their own CA: it signs boxes itself (tests of older
    /// installations).
    pub fn generate_single(common_name: &str) -> Result<Self, TlsError> {
        Self::generate_with_depth(common_name, 0)
    }

    fn generate_with_depth(common_name: &str, depth: u8) -> Result<Self, TlsError> {
        let key = KeyPair::generate().map_err(rcgen_error)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "lbs");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(depth));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, CA_VALIDITY);
        let cert = params.self_signed(&key).map_err(rcgen_error)?;
        Ok(Self {
            cert: cert.der().clone(),
            root: None,
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Issues the CA of site `site` (`dc2`), signed by this root: the site signs its boxes
    /// and endpoints with it, and it can be revoked alone ([`Self::revocation_list`]).
    pub fn issue_site_ca(&self, site: &str) -> Result<CertificateAuthority, TlsError> {
        if self.root.is_some() {
            return Err(TlsError::Certificate(
                "a site's CA is signed by the root, not by another site's CA".to_owned(),
            ));
        }
        if !self.signs_sites()? {
            return Err(TlsError::Certificate(
                "this root was made before sites had their own CA (path length 0): \
                 it signs boxes itself and cannot sign a site's CA"
                    .to_owned(),
            ));
        }
        let key = KeyPair::generate().map_err(rcgen_error)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("lbs site {site}"));
        params
            .distinguished_name
            .push(DnType::OrganizationName, "lbs");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, CA_VALIDITY);
        let cert = params.signed_by(&key, &self.issuer).map_err(rcgen_error)?;
        Ok(Self {
            cert: cert.der().clone(),
            root: Some(self.cert.clone()),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Whether this is a root that may sign sites' CAs (path length at least 1).
    pub fn signs_sites(&self) -> Result<bool, TlsError> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        if self.root.is_some() {
            return Ok(false);
        }
        let (_, parsed) = X509Certificate::from_der(self.cert.as_ref())
            .map_err(|e| TlsError::Certificate(format!("cannot parse the CA certificate: {e}")))?;
        let depth = parsed
            .basic_constraints()
            .ok()
            .flatten()
            .and_then(|c| c.value.path_len_constraint);
        Ok(depth.is_none_or(|depth| depth >= 1))
    }

    /// The revocation list of this root: the certificates whose serial numbers are in
    /// `revoked` (sites' CAs, see [`serial_of`]) no longer vouch for anyone. `number` counts
    /// the lists this root issued (a newer list has a larger one).
    pub fn revocation_list(&self, revoked: &[Vec<u8>], number: u64) -> Result<Vec<u8>, TlsError> {
        if self.root.is_some() {
            return Err(TlsError::Certificate(
                "only the root revokes a site's CA".to_owned(),
            ));
        }
        let now = time::OffsetDateTime::now_utc();
        let revoked_certs = revoked
            .iter()
            .map(|serial| rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(serial),
                revocation_time: now,
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect();
        let params = rcgen::CertificateRevocationListParams {
            this_update: now - time::Duration::hours(1),
            next_update: now + CA_VALIDITY,
            crl_number: rcgen::SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer).map_err(rcgen_error)?;
        Ok(crl.der().to_vec())
    }

    /// The certificates a holder of this CA's identities presents after its own: the site's
    /// CA, or nothing when the root signs.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        match self.root {
            Some(_) => vec![self.cert.clone()],
            None => Vec::new(),
        }
    }

    /// This CA's own certificate (the root, or the site's CA).
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// Reads a CA certificate and its key from PEM files.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, TlsError> {
        let cert = CertificateDer::from_pem_file(cert_path).map_err(|e| pem_error(cert_path, e))?;
        let key_pem = lbs_host::fs::read_secret(key_path).map_err(|source| TlsError::Io {
            path: key_path.to_owned(),
            cause: source,
        })?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| TlsError::Pem {
            path: key_path.to_owned(),
            detail: e.to_string(),
        })?;
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(rcgen_error)?;
        Ok(Self {
            cert,
            root: None,
            key_pem,
            issuer,
        })
    }

    /// Reads a site's CA (certificate and key) and the root it was signed by, from PEM files.
    pub fn load_site(
        root_path: &Path,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<Self, TlsError> {
        let root = TrustRoot::load(root_path)?;
        let mut site = Self::load(cert_path, key_path)?;
        if site.cert == root.cert {
            return Err(TlsError::Certificate(format!(
                "{} is the root itself, not a site's CA",
                cert_path.display()
            )));
        }
        site.root = Some(root.cert);
        // A CA signed by another root would issue certificates no box accepts.
        let identity = site.issue_identity(&PeerName::DataCenter)?;
        crate::tls::check_chain(&identity, &site.trust_root()).map_err(|e| {
            TlsError::Certificate(format!(
                "{} was not signed by the root in {}: {e}",
                cert_path.display(),
                root_path.display()
            ))
        })?;
        Ok(site)
    }

    /// Writes the CA certificate and key as PEM, atomically; the key is owner-only.
    pub fn save(&self, cert_path: &Path, key_path: &Path) -> Result<(), TlsError> {
        write_atomic(key_path, self.key_pem.as_bytes(), 0o600)?;
        write_atomic(
            cert_path,
            to_pem("CERTIFICATE", &self.cert).as_bytes(),
            0o644,
        )
    }

    /// The certificate boxes pin: the root.
    pub fn trust_root(&self) -> TrustRoot {
        TrustRoot::from_der(self.root.clone().unwrap_or_else(|| self.cert.clone()))
    }

    /// Issues a certificate for `name` over a public key the subject generated itself (the
    /// key never leaves the box).
    pub fn issue(
        &self,
        name: &PeerName,
        public_key: &impl PublicKeyData,
    ) -> Result<CertificateDer<'static>, TlsError> {
        let mut params = named_params(name)?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Boxes are both clients and servers: either side of a pair may dial the other.
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, IDENTITY_VALIDITY);
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(rcgen_error)?;
        Ok(cert.der().clone())
    }

    /// Generates a key pair and issues an identity for it in one step: for the data center's
    /// own endpoints, the lab and tests. Boxes generate their key themselves and use
    /// [`CertificateAuthority::issue`].
    pub fn issue_identity(&self, name: &PeerName) -> Result<Identity, TlsError> {
        let key = KeyPair::generate().map_err(rcgen_error)?;
        let cert = self.issue(name, &key)?;
        let key = PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| TlsError::Certificate(format!("generated key: {e}")))?;
        let mut chain = vec![cert];
        chain.extend(self.chain());
        Ok(Identity {
            name: name.clone(),
            chain,
            key,
        })
    }
}

impl CertificateAuthority {
    /// Issues a web server certificate (the portal's) for `names` — DNS names or IP
    /// addresses, as browsers reach it — with a fresh key, and the chain to present.
    pub fn issue_web_server(&self, names: &[String]) -> Result<WebIdentity, TlsError> {
        let key = KeyPair::generate().map_err(rcgen_error)?;
        let mut params = CertificateParams::new(names.to_vec())
            .map_err(|e| TlsError::Certificate(format!("portal names {names:?}: {e}")))?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        // Browsers refuse server certificates valid for more than 398 days.
        set_validity(&mut params, Duration::from_secs(397 * 24 * 3600));
        let cert = params.signed_by(&key, &self.issuer).map_err(rcgen_error)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain());
        let key = PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| TlsError::Certificate(format!("generated key: {e}")))?;
        Ok(WebIdentity { chain, key })
    }

    /// Issues a certificate for `name` from a box's certificate signing request (PKCS #10,
    /// DER). The request's signature proves the box holds the private key; everything else it
    /// asks for (names, usages, CA flag) is ignored: the certificate names `name` only and has
    /// the same usages as every box certificate.
    ///
    /// Returns the certificate and its [`key_fingerprint`].
    pub fn sign_request(
        &self,
        name: &PeerName,
        csr_der: &[u8],
    ) -> Result<(CertificateDer<'static>, String), TlsError> {
        let request = rcgen::CertificateSigningRequestParams::from_der(&csr_der.into())
            .map_err(|e| TlsError::Certificate(format!("certificate signing request: {e}")))?;
        let certificate = self.issue(name, &request.public_key)?;
        Ok((certificate, fingerprint(request.public_key.der_bytes())))
    }
}

/// The serial numbers a revocation list revokes (its signature is not checked here: see
/// [`TrustRoot::revoking`]).
pub fn revoked_serials(crl: &[u8]) -> Result<Vec<Vec<u8>>, TlsError> {
    use x509_parser::prelude::FromDer;
    use x509_parser::revocation_list::CertificateRevocationList;
    let (_, parsed) = CertificateRevocationList::from_der(crl)
        .map_err(|e| TlsError::Certificate(format!("unreadable revocation list: {e}")))?;
    Ok(parsed
        .iter_revoked_certificates()
        .map(|revoked| revoked.raw_serial().to_vec())
        .collect())
}

/// The serial number of a certificate (its bytes, as encoded).
pub fn serial_of(cert: &CertificateDer<'_>) -> Result<Vec<u8>, TlsError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, parsed) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| TlsError::Certificate(format!("cannot parse certificate: {e}")))?;
    Ok(parsed.raw_serial().to_vec())
}

fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let now = time::OffsetDateTime::now_utc();
    // An hour of slack for boxes whose clock is a little behind the data center's.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + validity;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ServerId;
    use crate::tls::check_chain;

    fn a_box(n: u8) -> PeerName {
        PeerName::Box(ServerId::from_bytes([n; 6]))
    }

    #[test]
    fn sites_sign_with_their_own_ca_and_a_revoked_one_vouches_for_nobody() {
        let root = CertificateAuthority::generate("test root").unwrap();
        assert!(root.signs_sites().unwrap());
        let dc1 = root.issue_site_ca("dc1").unwrap();
        let dc2 = root.issue_site_ca("dc2").unwrap();
        assert_eq!(dc1.trust_root(), root.trust_root(), "boxes pin the root");
        let from_dc1 = dc1.issue_identity(&a_box(1)).unwrap();
        let from_dc2 = dc2.issue_identity(&a_box(2)).unwrap();
        assert_eq!(from_dc1.chain.len(), 2, "the leaf and the site's CA");
        for identity in [&from_dc1, &from_dc2] {
            check_chain(identity, &root.trust_root()).unwrap();
        }
        // A leaf without its site's CA does not chain to the root.
        let bare =
            Identity::new(vec![from_dc1.chain[0].clone()], from_dc1.key.clone_key()).unwrap();
        assert!(check_chain(&bare, &root.trust_root()).is_err());
        // A site cannot make sites, nor revoke.
        assert!(dc1.issue_site_ca("dc3").is_err());
        assert!(dc1.revocation_list(&[], 1).is_err());

        let dc2_serial = serial_of(dc2.certificate()).unwrap();
        let crl = root
            .revocation_list(std::slice::from_ref(&dc2_serial), 1)
            .unwrap();
        assert_eq!(revoked_serials(&crl).unwrap(), vec![dc2_serial]);
        let revoking = root.trust_root().revoking(&crl).unwrap();
        check_chain(&from_dc1, &revoking).unwrap();
        let refused = check_chain(&from_dc2, &revoking).unwrap_err().to_string();
        assert!(refused.to_lowercase().contains("revoked"), "{refused}");
        // An empty list revokes nothing.
        let none = root
            .trust_root()
            .revoking(&root.revocation_list(&[], 2).unwrap())
            .unwrap();
        check_chain(&from_dc2, &none).unwrap();
    }

    #[test]
    fn a_list_not_signed_by_the_root_and_an_old_root_are_refused_with_reasons() {
        let root = CertificateAuthority::generate("test root").unwrap();
        let other = CertificateAuthority::generate("another root").unwrap();
        let forged = other.revocation_list(&[], 1).unwrap();
        let err = root.trust_root().revoking(&forged).unwrap_err().to_string();
        assert!(err.contains("not signed by the root"), "{err}");
        assert!(root.trust_root().revoking(b"garbage").is_err());

        let single = CertificateAuthority::generate_single("old root").unwrap();
        assert!(!single.signs_sites().unwrap());
        let err = single.issue_site_ca("dc2").unwrap_err().to_string();
        assert!(err.contains("path length 0"), "{err}");
        // It still signs boxes itself, with no CA after the leaf.
        let identity = single.issue_identity(&a_box(3)).unwrap();
        assert_eq!(identity.chain.len(), 1);
        check_chain(&identity, &single.trust_root()).unwrap();
    }

    #[test]
    fn a_site_ca_is_saved_and_loaded_with_its_root_and_a_foreign_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = CertificateAuthority::generate("test root").unwrap();
        let site = root.issue_site_ca("dc1").unwrap();
        let (root_pem, cert, key) = (
            dir.path().join("ca.pem"),
            dir.path().join("site-ca.pem"),
            dir.path().join("site-ca.key"),
        );
        root.trust_root().save(&root_pem).unwrap();
        site.save(&cert, &key).unwrap();
        let loaded = CertificateAuthority::load_site(&root_pem, &cert, &key).unwrap();
        assert_eq!(loaded.certificate(), site.certificate());
        assert_eq!(loaded.trust_root(), root.trust_root());
        let identity = loaded.issue_identity(&a_box(4)).unwrap();
        check_chain(&identity, &root.trust_root()).unwrap();

        let stranger = CertificateAuthority::generate("another root").unwrap();
        stranger.trust_root().save(&root_pem).unwrap();
        let err = CertificateAuthority::load_site(&root_pem, &cert, &key)
            .unwrap_err()
            .to_string();
        assert!(err.contains("was not signed by the root"), "{err}");
    }
}
