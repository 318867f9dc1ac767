//! Who may connect, and how: the server-side check of a peer's name ([`PeerVerifier`] for
//! [`AcceptPeers`]), the TLS configurations of each port, and the handshakes within their
//! deadlines.

use super::*;

/// Which clients a server accepts, beyond "issued by our CA".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AcceptPeers {
    /// Exactly this peer (a box serving its partner).
    Only(PeerName),
    /// Any box the CA issued (the data center).
    AnyBox,
    /// Any box, and the data center's other sites (the data center's control API).
    BoxesAndSites,
}

impl fmt::Display for AcceptPeers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AcceptPeers::Only(peer) => write!(f, "{peer}"),
            AcceptPeers::AnyBox => f.write_str("an lbs box"),
            AcceptPeers::BoxesAndSites => f.write_str("an lbs box or data-center site"),
        }
    }
}

/// The reason our server refused a client certificate, carried through rustls so that the
/// accepting side can report it precisely.
#[derive(Debug, thiserror::Error)]
#[error("{presented} is not allowed to connect; only {expected} is")]
pub(super) struct PeerRefused {
    pub(super) expected: String,
    pub(super) presented: String,
}

/// A client-certificate verifier: the WebPKI chain check against our CA, then the name check
/// of [`AcceptPeers`].
#[derive(Debug)]
pub struct PeerVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    accept: AcceptPeers,
}

impl ClientCertVerifier for PeerVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[RustlsDn] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let presented = PeerName::of_certificate(end_entity);
        let allowed = match (&self.accept, &presented) {
            (AcceptPeers::Only(want), Ok(got)) => want == got,
            (AcceptPeers::AnyBox | AcceptPeers::BoxesAndSites, Ok(PeerName::Box(_))) => true,
            (AcceptPeers::BoxesAndSites, Ok(PeerName::DataCenter)) => true,
            _ => false,
        };
        if allowed {
            return Ok(ClientCertVerified::assertion());
        }
        let presented = match presented {
            Ok(peer) => peer.to_string(),
            Err(err) => err.to_string(),
        };
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(PeerRefused {
                expected: self.accept.to_string(),
                presented,
            })),
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// ring's suites, AES-128-GCM first: it has 10 rounds to AES-256's 14, and a pull of a
/// large file spends a sixth of both boxes' CPU in AES (both sides prefer it, so either
/// one's order decides; a peer that prefers AES-256 still gets it).
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

/// A TLS 1.3 server configuration presenting `identity` and accepting only clients that
/// chain to `root` and match `accept`.
pub fn server_config(
    identity: &Identity,
    root: &TrustRoot,
    accept: AcceptPeers,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let inner = client_verifier(root, provider.clone())?;
    let verifier = Arc::new(PeerVerifier { inner, accept });
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(config))
}

/// The WebPKI check of a client's chain against `root` and its revocation list.
fn client_verifier(
    root: &TrustRoot,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut builder = WebPkiClientVerifier::builder_with_provider(root.store()?, provider);
    if root.revokes() {
        // Only the root publishes a list (of revoked sites' CAs); the sites publish none.
        builder = builder
            .with_crls(root.crls())
            .allow_unknown_revocation_status();
    }
    builder.build().map_err(|e| TlsError::Config(e.to_string()))
}

/// Checks that `identity`'s chain leads to `root` as a peer checks it (its CA not revoked).
pub fn check_chain(identity: &Identity, root: &TrustRoot) -> Result<(), TlsError> {
    verify_chain(&identity.chain, root)
}

/// Checks that `chain` (leaf first, as a peer presented it) leads to `root`, its CA not
/// revoked: a connection accepted before a revocation is checked again with it.
pub fn verify_chain(chain: &[CertificateDer<'_>], root: &TrustRoot) -> Result<(), TlsError> {
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err(TlsError::Certificate("no certificate".to_owned()));
    };
    client_verifier(root, provider())?
        .verify_client_cert(leaf, intermediates, UnixTime::now())
        .map(|_| ())
        .map_err(|e| TlsError::Certificate(e.to_string()))
}

/// A TLS 1.3 client configuration presenting `identity` and trusting only servers that chain
/// to `root`; the expected server is named at [`connect`].
pub fn client_config(identity: &Identity, root: &TrustRoot) -> Result<Arc<ClientConfig>, TlsError> {
    let config = trusting(root)?
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(config))
}

/// An HTTPS server configuration for the portal: presents `identity` (TLS 1.2 and 1.3, as
/// browsers and Prometheus speak them), asks no client certificate, HTTP/1.1.
pub fn web_server_config(identity: &WebIdentity) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A TLS 1.3 server configuration for activation: presents `identity` and asks the client
/// for no certificate (a box that activates has none yet; it proves itself with its key).
pub fn activation_server_config(identity: &Identity) -> Result<Arc<ServerConfig>, TlsError> {
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(config))
}

/// A TLS 1.3 client configuration for activation: no client certificate, and only a server
/// that chains to `root` (the CA the box was shipped or told to pin).
pub fn activation_client_config(root: &TrustRoot) -> Result<Arc<ClientConfig>, TlsError> {
    Ok(Arc::new(trusting(root)?.with_no_client_auth()))
}

/// A TLS 1.3 client configuration, up to its client certificate, that accepts only servers
/// chaining to `root`.
fn trusting(
    root: &TrustRoot,
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>, TlsError> {
    let provider = provider();
    let mut builder = WebPkiServerVerifier::builder_with_provider(root.store()?, provider.clone());
    if root.revokes() {
        // Only the root publishes a list (of revoked sites' CAs); the sites publish none.
        builder = builder
            .with_crls(root.crls())
            .allow_unknown_revocation_status();
    }
    let verifier = builder
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_webpki_verifier(verifier))
}

/// Opens TLS over `io` to `expected`, which must present a certificate for exactly that name.
///
/// In TLS 1.3 the server checks our certificate after we finish, so a refusal of *our*
/// certificate surfaces on the first read (the `Hello` exchange), not here.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    config: Arc<ClientConfig>,
    expected: &PeerName,
    io: S,
) -> Result<tokio_rustls::client::TlsStream<S>, TlsError> {
    let handshake = tokio_rustls::TlsConnector::from(config).connect(expected.server_name()?, io);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(done) => done.map_err(|err| TlsError::explain(expected, err)),
        Err(_) => Err(TlsError::TimedOut {
            who: expected.to_string(),
            after: HANDSHAKE_TIMEOUT,
        }),
    }
}

/// How long a TLS handshake may take, on either side: a peer that accepts TCP and never
/// speaks, or a client that never finishes, is dropped after it.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a server keeps a refused connection open so its TLS alert reaches the client.
const REFUSAL_LINGER: std::time::Duration = std::time::Duration::from_millis(500);

/// Accepts TLS over `io` and returns the stream with the verified client's name.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    config: Arc<ServerConfig>,
    io: S,
) -> Result<(tokio_rustls::server::TlsStream<S>, PeerName), TlsError> {
    let stream = accept_any(config, io).await?;
    let peer = verified_peer(stream.get_ref().1)?;
    Ok((stream, peer))
}

/// Accepts TLS over `io` with a configuration that may not ask for a client certificate
/// ([`activation_server_config`]).
pub async fn accept_any<S: AsyncRead + AsyncWrite + Unpin>(
    config: Arc<ServerConfig>,
    io: S,
) -> Result<tokio_rustls::server::TlsStream<S>, TlsError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let handshake = tokio_rustls::TlsAcceptor::from(config)
        .accept(io)
        .into_fallible();
    let Ok(accepted) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await else {
        return Err(TlsError::TimedOut {
            who: "the connecting peer".into(),
            after: HANDSHAKE_TIMEOUT,
        });
    };
    let stream = match accepted {
        Ok(stream) => stream,
        Err((err, mut io)) => {
            // The client may already have sent its first message. Closing with that unread
            // makes the kernel answer with a reset, which can overtake our alert and leave the
            // client with "connection reset" instead of the reason: so close our side and
            // read until the client, having read the alert, hangs up.
            let _ = tokio::time::timeout(REFUSAL_LINGER, async {
                let _ = io.shutdown().await;
                let mut sink = [0u8; 1024];
                while matches!(io.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
            return Err(TlsError::explain("the connecting peer", err));
        }
    };
    Ok(stream)
}

/// The name in the certificate the peer of an established connection presented (and rustls
/// verified).
pub fn verified_peer(state: &CommonState) -> Result<PeerName, TlsError> {
    let leaf = state
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or_else(|| TlsError::Certificate("the peer presented no certificate".to_owned()))?;
    PeerName::of_certificate(leaf)
}
