//! Mutual-TLS identities: the data center's `CertificateAuthority` (`crate::ca`, feature
//! `ca`) issues every box an [`Identity`] naming its SID; boxes pin the CA as their
//! [`TrustRoot`]. A connection is accepted only when the peer's certificate chains to that
//! root *and* names the peer we expect ([`AcceptPeers`]): a box talks to its partner and the
//! data center, nobody else.
//!
//! Names live in the certificate's DNS subject-alternative-name under the `.invalid` TLD
//! (see [`PeerName::certificate_name`]), so the ordinary WebPKI name check does the work on
//! the client side and a small wrapper ([`PeerVerifier`]) does it on the server side.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    AlertDescription, CertificateError, CommonState, DigitallySignedStruct,
    DistinguishedName as RustlsDn, OtherError, RootCertStore, SignatureScheme,
};
pub use rustls_pki_types::CertificateDer;
use rustls_pki_types::CertificateRevocationListDer;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::ids::ServerId;

// Callers hold these configurations; re-exported so they need no rustls dependency of their own.
pub use rustls::{ClientConfig, ServerConfig};

/// A TLS stream this side dialled.
pub type ClientStream<S> = tokio_rustls::client::TlsStream<S>;
/// A TLS stream this side accepted.
pub type ServerStream<S> = tokio_rustls::server::TlsStream<S>;

/// The certificate name of the data center's endpoints.
const DATACENTER_NAME: &str = "datacenter.lbs.invalid";

/// How long a box or data-center certificate is valid. PBX boxes run for a decade between
/// hardware refreshes; renewal happens over the tunnel long before this runs out.
pub const IDENTITY_VALIDITY: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

/// How long the data center's CA certificate is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(30 * 366 * 24 * 3600);

/// Whom a certificate speaks for.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum PeerName {
    /// A PBX box, by its server ID.
    Box(ServerId),
    /// Any endpoint of the data center.
    DataCenter,
}

impl PeerName {
    /// The DNS-style name carried in the certificate's subject alternative names.
    pub fn certificate_name(&self) -> String {
        match self {
            PeerName::Box(sid) => sid.certificate_name(),
            PeerName::DataCenter => DATACENTER_NAME.to_owned(),
        }
    }

    /// Reads a peer name back from a certificate name; `None` for anything lbs did not issue.
    pub fn from_certificate_name(name: &str) -> Option<Self> {
        if name == DATACENTER_NAME {
            Some(PeerName::DataCenter)
        } else {
            ServerId::from_certificate_name(name).map(PeerName::Box)
        }
    }

    /// The name a TLS client checks the server's certificate against.
    pub fn server_name(&self) -> Result<ServerName<'static>, TlsError> {
        // Always a valid DNS name by construction (hex digits, hyphens, dots); a unit test
        // checks it for every SID shape. Never fall back to another name: that would verify
        // the wrong peer.
        ServerName::try_from(self.certificate_name())
            .map_err(|e| TlsError::Config(format!("{self} has no usable certificate name: {e}")))
    }

    /// The lbs identity a certificate names. Only the structure is read: call this on
    /// certificates rustls has already verified.
    pub fn of_certificate(cert: &CertificateDer<'_>) -> Result<PeerName, TlsError> {
        let names = certificate_dns_names(cert)?;
        let mut peers = names
            .iter()
            .filter_map(|name| PeerName::from_certificate_name(name));
        match (peers.next(), peers.next()) {
            (Some(peer), None) => Ok(peer),
            _ => Err(TlsError::NotAnLbsCertificate { names }),
        }
    }
}

impl fmt::Display for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerName::Box(sid) => write!(f, "box {sid}"),
            PeerName::DataCenter => f.write_str("the data center"),
        }
    }
}

/// The DNS subject alternative names of a certificate.
fn certificate_dns_names(cert: &CertificateDer<'_>) -> Result<Vec<String>, TlsError> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, parsed) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| TlsError::Certificate(format!("cannot parse certificate: {e}")))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| TlsError::Certificate(format!("bad subject alternative names: {e}")))?;
    Ok(san
        .into_iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            _ => None,
        })
        .collect())
}

/// Why a certificate, key or TLS connection could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    // The cause is in the message, so it is not also the error's `source` (a chain printed
    // with `{:#}` would say it twice).
    #[error("{}: {cause}", path.display())]
    Io {
        path: PathBuf,
        /// What the OS said.
        cause: io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{}: {detail}", path.display())]
    Pem {
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// A certificate could not be made or read.
    #[error("certificate: {0}")]
    Certificate(String),
    /// The certificate names no lbs peer, or several.
    #[error("certificate names {names:?}, which is not exactly one lbs box or data center")]
    NotAnLbsCertificate {
        /// The DNS names it carries.
        names: Vec<String>,
    },
    /// rustls refused the configuration (a key that does not match its certificate, say).
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The peer proved to be someone else than expected.
    #[error(
        "{expected} was expected, but the peer's certificate is for {presented}; \
         check the address, or this is an impostor"
    )]
    WrongPeer {
        /// Whom we meant to talk to.
        expected: String,
        /// Whom the certificate names.
        presented: String,
    },
    /// A client with a valid certificate connected, but it is not one we accept.
    #[error(
        "{presented} tried to connect, but only {allowed} may; refused (a box of another \
         pair, or an impostor)"
    )]
    NotAllowed {
        /// Whom we accept.
        allowed: String,
        /// Whom the client's certificate names.
        presented: String,
    },
    /// The peer's certificate was not issued by our data center's CA.
    #[error(
        "the certificate of {who} was not issued by this installation's data-center CA \
         ({detail}); it belongs to another installation or is forged"
    )]
    Untrusted {
        /// Whom we meant to talk to.
        who: String,
        /// rustls's finding.
        detail: String,
    },
    /// The peer rejected our certificate.
    #[error(
        "{who} refused this box's certificate (TLS alert {alert:?}); it was probably \
         issued for another pair or another data center, or the peer expects another partner"
    )]
    RefusedByPeer {
        /// Whom we talked to.
        who: String,
        /// The TLS alert it sent.
        alert: AlertDescription,
    },
    /// The peer did not complete the handshake in time (it accepted TCP and fell silent, or
    /// is too slow to be served).
    #[error(
        "{who} did not complete the TLS handshake within {after:?}: it is not an lbs peer, \
         or hangs; check what listens at that address"
    )]
    TimedOut {
        /// Whom we talked to.
        who: String,
        /// The deadline.
        after: Duration,
    },
    /// Any other failure during the TLS handshake.
    #[error("TLS with {who} failed: {cause}")]
    Handshake {
        /// Whom we talked to.
        who: String,
        /// The underlying error.
        cause: io::Error,
    },
}

impl TlsError {
    /// Turns an I/O error from a TLS stream into the most useful explanation for an operator,
    /// recognising certificate refusals on either side. `who` describes the peer.
    pub fn explain(who: impl fmt::Display, err: io::Error) -> TlsError {
        let who = who.to_string();
        let Some(tls) = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        else {
            return TlsError::Handshake { who, cause: err };
        };
        match tls {
            rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                presented,
                ..
            }) => TlsError::WrongPeer {
                expected: who,
                presented: describe_names(presented),
            },
            rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
                match other.0.downcast_ref::<PeerRefused>() {
                    Some(refused) => TlsError::NotAllowed {
                        allowed: refused.expected.clone(),
                        presented: refused.presented.clone(),
                    },
                    None => TlsError::Handshake { who, cause: err },
                }
            }
            rustls::Error::InvalidCertificate(
                e @ (CertificateError::UnknownIssuer | CertificateError::BadSignature),
            ) => TlsError::Untrusted {
                who,
                detail: format!("{e:?}"),
            },
            rustls::Error::AlertReceived(
                alert @ (AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateUnknown
                | AlertDescription::AccessDenied
                | AlertDescription::CertificateRequired
                // What a TLS 1.3 server sends when its certificate check of the client fails
                // after the client thinks the handshake is done.
                | AlertDescription::DecryptError),
            ) => TlsError::RefusedByPeer { who, alert: *alert },
            _ => TlsError::Handshake { who, cause: err },
        }
    }
}

fn describe_names(names: &[String]) -> String {
    let peers: Vec<String> = names
        .iter()
        .map(|name| {
            // rustls reports names in their Debug form: `DnsName("…")`.
            let bare = name
                .strip_prefix("DnsName(\"")
                .and_then(|rest| rest.strip_suffix("\")"))
                .unwrap_or(name);
            (bare, name)
        })
        .map(|(bare, name)| match PeerName::from_certificate_name(bare) {
            Some(peer) => peer.to_string(),
            None => format!("{name:?}"),
        })
        .collect();
    if peers.is_empty() {
        "no name at all".to_owned()
    } else {
        peers.join(", ")
    }
}

/// The CA certificate a box pins: the only issuer it trusts; with the revocation list of the
/// sites' CAs it no longer trusts, when there is one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustRoot {
    pub(crate) cert: CertificateDer<'static>,
    crls: Vec<CertificateRevocationListDer<'static>>,
}

impl TrustRoot {
    /// A root from its DER certificate.
    pub fn from_der(cert: CertificateDer<'static>) -> Self {
        Self {
            cert,
            crls: Vec::new(),
        }
    }

    /// Reads the CA certificate from a PEM file.
    pub fn load(path: &Path) -> Result<Self, TlsError> {
        let cert = CertificateDer::from_pem_file(path).map_err(|e| pem_error(path, e))?;
        Ok(Self::from_der(cert))
    }

    /// Parses the CA certificate from PEM text (as given at activation).
    pub fn from_pem(pem: &str) -> Result<Self, TlsError> {
        let cert = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| TlsError::Certificate(format!("CA certificate: {e}")))?;
        Ok(Self::from_der(cert))
    }

    /// The same root, refusing what the revocation list `crl` (DER, signed by the root)
    /// revokes. A list the root did not sign is refused here, not at the first connection.
    pub fn revoking(mut self, crl: &[u8]) -> Result<Self, TlsError> {
        let crl = CertificateRevocationListDer::from(crl.to_vec());
        self.crls = vec![crl];
        // Building a verifier parses the list; its signature is checked against the root
        // here, so a list from elsewhere never silently revokes nothing.
        check_revocation_list(&self)?;
        Ok(self)
    }

    /// Whether a revocation list is in force.
    pub fn revokes(&self) -> bool {
        !self.crls.is_empty()
    }

    /// The certificate as PEM text.
    pub fn to_pem(&self) -> String {
        to_pem("CERTIFICATE", &self.cert)
    }

    /// Writes the certificate as PEM, atomically.
    pub fn save(&self, path: &Path) -> Result<(), TlsError> {
        write_atomic(path, self.to_pem().as_bytes(), 0o644)
    }

    /// The DER certificate.
    pub fn der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    fn store(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.cert.clone())
            .map_err(|e| TlsError::Config(format!("CA certificate unusable: {e}")))?;
        Ok(Arc::new(roots))
    }

    pub(crate) fn crls(&self) -> Vec<CertificateRevocationListDer<'static>> {
        self.crls.clone()
    }
}

/// Checks that every revocation list of `root` is signed by it.
fn check_revocation_list(root: &TrustRoot) -> Result<(), TlsError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    use x509_parser::revocation_list::CertificateRevocationList;
    let (_, ca) = X509Certificate::from_der(root.cert.as_ref())
        .map_err(|e| TlsError::Certificate(format!("cannot parse the CA certificate: {e}")))?;
    for crl in &root.crls {
        let (_, parsed) = CertificateRevocationList::from_der(crl.as_ref())
            .map_err(|e| TlsError::Certificate(format!("unreadable revocation list: {e}")))?;
        parsed.verify_signature(ca.public_key()).map_err(|e| {
            TlsError::Certificate(format!(
                "the revocation list is not signed by the root: {e}"
            ))
        })?;
    }
    Ok(())
}

/// A certificate chain and its private key: who this process is on the wire.
#[derive(Debug)]
pub struct Identity {
    pub(crate) name: PeerName,
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// Builds an identity from a chain (leaf first) and its key; the name comes from the leaf.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsError> {
        let leaf = chain
            .first()
            .ok_or_else(|| TlsError::Certificate("empty certificate chain".to_owned()))?;
        let name = PeerName::of_certificate(leaf)?;
        Ok(Self { name, chain, key })
    }

    /// Reads a certificate chain and a private key from PEM files.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, TlsError> {
        let (chain, key) = load_chain_and_key(cert_path, key_path)?;
        Self::new(chain, key)
    }

    /// Writes the chain and the key as PEM, atomically; the key file is readable by its owner
    /// only.
    pub fn save(&self, cert_path: &Path, key_path: &Path) -> Result<(), TlsError> {
        let chain: String = self
            .chain
            .iter()
            .map(|cert| to_pem("CERTIFICATE", cert))
            .collect();
        write_atomic(key_path, key_pem(&self.key).as_bytes(), 0o600)?;
        write_atomic(cert_path, chain.as_bytes(), 0o644)
    }

    /// Whom this identity speaks for.
    pub fn name(&self) -> &PeerName {
        &self.name
    }

    /// The leaf certificate.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        // `new` refuses an empty chain.
        &self.chain[0]
    }
}

/// A certificate chain (leaf first, at least one) and its private key from PEM files; the key
/// file must be private.
fn load_chain_and_key(
    cert_path: &Path,
    key_path: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| pem_error(cert_path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(cert_path, e))?;
    if chain.is_empty() {
        return Err(TlsError::Pem {
            path: cert_path.to_owned(),
            detail: "no certificate in the file".to_owned(),
        });
    }
    let key_pem = lbs_host::fs::read_secret(key_path).map_err(|cause| TlsError::Io {
        path: key_path.to_owned(),
        cause,
    })?;
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| pem_error(key_path, e))?;
    Ok((chain, key))
}

/// A web server's certificate chain and key (the portal's): not an lbs peer, so no name check.
#[derive(Debug)]
pub struct WebIdentity {
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
}

impl WebIdentity {
    /// Reads a certificate chain (leaf first) and its key from PEM files (the provider's own).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, TlsError> {
        let (chain, key) = load_chain_and_key(cert_path, key_path)?;
        Ok(Self { chain, key })
    }

    /// The certificate chain as PEM (leaf first).
    pub fn chain_pem(&self) -> String {
        self.chain
            .iter()
            .map(|cert| to_pem("CERTIFICATE", cert))
            .collect()
    }
}

/// A short fingerprint of a certificate's public key (BLAKE3 of the key bits, hex): the data
/// center records the one it signed, so a certificate it replaced (a re-activated box) no
/// longer gets in.
pub fn key_fingerprint(cert: &CertificateDer<'_>) -> Result<String, TlsError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, parsed) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| TlsError::Certificate(format!("cannot parse certificate: {e}")))?;
    Ok(fingerprint(&parsed.public_key().subject_public_key.data))
}

pub(crate) fn fingerprint(key_bits: &[u8]) -> String {
    blake3::hash(key_bits).to_hex()[..32].to_owned()
}

/// A key pair generated on this box and waiting for the data center's certificate: the
/// private key never leaves the box, only the signing request does.
pub struct PendingIdentity {
    name: PeerName,
    key: KeyPair,
    request: Vec<u8>,
}

impl fmt::Debug for PendingIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("PendingIdentity")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl PendingIdentity {
    /// Generates a key pair for `name` and a signing request for it.
    pub fn generate(name: PeerName) -> Result<Self, TlsError> {
        let key = KeyPair::generate().map_err(rcgen_error)?;
        let request = named_params(&name)?
            .serialize_request(&key)
            .map_err(rcgen_error)?
            .der()
            .to_vec();
        Ok(Self { name, key, request })
    }

    /// The signing request (DER) to send.
    pub fn request(&self) -> &[u8] {
        &self.request
    }

    /// The key pair (PKCS#8 PEM), kept while the request is unanswered: asked again with the
    /// same key (the answer was lost), the data center answers the activation the same.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A pending identity for `name` on a kept key ([`PendingIdentity::key_pem`]), its
    /// request made anew.
    pub fn from_key_pem(name: PeerName, pem: &str) -> Result<Self, TlsError> {
        let key = KeyPair::from_pem(pem).map_err(rcgen_error)?;
        let request = named_params(&name)?
            .serialize_request(&key)
            .map_err(rcgen_error)?
            .der()
            .to_vec();
        Ok(Self { name, key, request })
    }

    /// The identity, once the data center returned the certificate. Refuses a certificate
    /// for another name or another key.
    pub fn complete(
        self,
        certificate: Vec<u8>,
        chain: Vec<Vec<u8>>,
        root: &TrustRoot,
    ) -> Result<Identity, TlsError> {
        let certificate = CertificateDer::from(certificate);
        let named = PeerName::of_certificate(&certificate)?;
        if named != self.name {
            return Err(TlsError::Certificate(format!(
                "the data center issued a certificate for {named}, not for {}",
                self.name
            )));
        }
        let key = PrivateKeyDer::try_from(self.key.serialize_der())
            .map_err(|e| TlsError::Certificate(format!("generated key: {e}")))?;
        let mut full = vec![certificate];
        full.extend(chain.into_iter().map(CertificateDer::from));
        let identity = Identity {
            name: self.name,
            chain: full,
            key,
        };
        // Building a configuration checks that the certificate matches our key; the chain
        // check, that it leads to the root we pin (the site's CA came with it).
        client_config(&identity, root)?;
        check_chain(&identity, root).map_err(|err| {
            TlsError::Certificate(format!(
                "the certificate the data center issued does not lead to the CA we pin: {err}"
            ))
        })?;
        Ok(identity)
    }
}

/// Certificate parameters naming `name` (common name and the SAN lbs checks).
pub(crate) fn named_params(name: &PeerName) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, name.to_string());
    let dns = name
        .certificate_name()
        .try_into()
        .map_err(|e| TlsError::Certificate(format!("name {name}: {e}")))?;
    params.subject_alt_names = vec![SanType::DnsName(dns)];
    Ok(params)
}

pub(crate) fn rcgen_error(err: rcgen::Error) -> TlsError {
    TlsError::Certificate(err.to_string())
}

pub(crate) fn pem_error(path: &Path, err: rustls_pki_types::pem::Error) -> TlsError {
    match err {
        rustls_pki_types::pem::Error::Io(cause) => TlsError::Io {
            path: path.to_owned(),
            cause,
        },
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::Pem {
            path: path.to_owned(),
            detail: "no PEM section of the expected kind in the file".to_owned(),
        },
        other => TlsError::Pem {
            path: path.to_owned(),
            detail: other.to_string(),
        },
    }
}

pub(crate) fn to_pem(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der))
}

fn key_pem(key: &PrivateKeyDer<'_>) -> String {
    let label = match key {
        PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        _ => "PRIVATE KEY",
    };
    to_pem(label, key.secret_der())
}

pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    lbs_host::write_file_atomic(path, contents, mode).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        cause: source,
    })
}

mod config;

use config::PeerRefused;
pub use config::*;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn every_peer_has_a_valid_server_name(bytes in any::<[u8; 6]>()) {
            let peer = PeerName::Box(ServerId::from_bytes(bytes));
            prop_assert!(peer.server_name().is_ok());
            prop_assert_eq!(PeerName::from_certificate_name(&peer.certificate_name()), Some(peer));
        }
    }

    #[test]
    fn a_refusal_after_the_handshake_is_named_and_causes_are_said_once() {
        let alert = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(AlertDescription::DecryptError),
        );
        let explained = TlsError::explain("box 00-1A-2B-3C-4D-5E", alert);
        assert!(
            explained
                .to_string()
                .contains("refused this box's certificate"),
            "{explained}"
        );
        let missing = TrustRoot::load(Path::new("/nonexistent/lbs/ca.pem")).unwrap_err();
        let chain = anyhow_like(&missing);
        assert_eq!(
            chain.matches("No such file or directory").count(),
            1,
            "{chain}"
        );
    }

    /// The error and its sources as `anyhow`'s `{:#}` prints them.
    fn anyhow_like(err: &(dyn std::error::Error + 'static)) -> String {
        let mut text = err.to_string();
        let mut next = err.source();
        while let Some(source) = next {
            text += &format!(": {source}");
            next = source.source();
        }
        text
    }

    #[test]
    fn the_data_center_has_a_valid_server_name() {
        assert!(PeerName::DataCenter.server_name().is_ok());
        assert_eq!(
            PeerName::from_certificate_name(&PeerName::DataCenter.certificate_name()),
            Some(PeerName::DataCenter)
        );
        assert_eq!(PeerName::from_certificate_name("www.example.com"), None);
    }
}
