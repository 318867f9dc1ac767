//! The data center's certificate authority (feature `ca`): it signs the identities of boxes
//! (from their signing requests: the key never leaves the box) and of its own endpoints.
//! Boxes and their commands never sign, so they do not link this.

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
    cert: CertificateDer<'static>,
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
    /// Creates a new CA with a fresh key; `common_name` names the installation
    /// ("Example Telecom lbs CA").
    pub fn generate(common_name: &str) -> Result<Self, TlsError> {
        let key = KeyPair::generate().map_err(rcgen_error)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "lbs");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, CA_VALIDITY);
        let cert = params.self_signed(&key).map_err(rcgen_error)?;
        Ok(Self {
            cert: cert.der().clone(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
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
            key_pem,
            issuer,
        })
    }

    /// Writes the CA certificate and key as PEM, atomically; the key is owner-only.
    pub fn save(&self, cert_path: &Path, key_path: &Path) -> Result<(), TlsError> {
        write_atomic(key_path, self.key_pem.as_bytes(), 0o600)?;
        self.trust_root().save(cert_path)
    }

    /// The certificate boxes pin.
    pub fn trust_root(&self) -> TrustRoot {
        TrustRoot {
            cert: self.cert.clone(),
        }
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
        Ok(Identity {
            name: name.clone(),
            chain: vec![cert],
            key,
        })
    }
}

impl CertificateAuthority {
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

fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let now = time::OffsetDateTime::now_utc();
    // An hour of slack for boxes whose clock is a little behind the data center's.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + validity;
}
