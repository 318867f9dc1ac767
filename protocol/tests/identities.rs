//! Mutual TLS between lbs peers: only the partner with a certificate from our CA gets through,
//! and every refusal says who was refused and why.

// In tests a panic is the failure report; helpers outside #[test] fns unwrap too.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use lbs_protocol::handshake::HELLO_TIMEOUT;
use lbs_protocol::tls::{self, AcceptPeers};
use lbs_protocol::{
    CertificateAuthority, Generation, HandshakeError, Hello, Identity, Negotiated,
    PROTOCOL_VERSION, PeerName, Refusal, Role, Sender, ServerId, SoftwareVersion, TlsError,
    TrustRoot,
};

fn sid(text: &str) -> ServerId {
    text.parse().unwrap()
}

fn hello_for(name: &PeerName, role: Role) -> Hello {
    let sender = match name {
        PeerName::Box(sid) => Sender::Box { sid: *sid, role },
        PeerName::DataCenter => Sender::DataCenter { site: "dc1".into() },
    };
    Hello {
        protocol: PROTOCOL_VERSION,
        software: SoftwareVersion::current(),
        sender,
    }
}

struct Side {
    identity: Identity,
    root: TrustRoot,
    hello: Hello,
}

impl Side {
    fn new(ca: &CertificateAuthority, name: PeerName) -> Side {
        Side {
            identity: ca.issue_identity(&name).unwrap(),
            root: ca.trust_root(),
            hello: hello_for(&name, Role::Primary),
        }
    }
}

/// Runs a connection: `client` dials expecting `expected`, `server` accepts `accept`.
async fn connect(
    server: Side,
    accept: AcceptPeers,
    client: Side,
    expected: PeerName,
) -> (
    Result<Negotiated, HandshakeError>,
    Result<(PeerName, Negotiated), HandshakeError>,
) {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let server_config = tls::server_config(&server.identity, &server.root, accept).unwrap();
    let client_config = tls::client_config(&client.identity, &client.root).unwrap();
    let serve = async move {
        let (stream, peer) = tls::accept(server_config, server_io).await?;
        let (_conn, negotiated) =
            lbs_protocol::exchange_hello(stream, &peer, server.hello, Generation(3), HELLO_TIMEOUT)
                .await?;
        Ok::<_, HandshakeError>((peer, negotiated))
    };
    let dial = async move {
        let stream = tls::connect(client_config, &expected, client_io).await?;
        let (_conn, negotiated) = lbs_protocol::exchange_hello(
            stream,
            &expected,
            client.hello,
            Generation(3),
            HELLO_TIMEOUT,
        )
        .await?;
        Ok::<_, HandshakeError>(negotiated)
    };
    tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(dial, serve) })
        .await
        .expect("handshake finished in time")
}

const PRIMARY: &str = "00-1A-2B-3C-4D-5E";
const BACKUP: &str = "00-1A-2B-3C-4D-5F";
const STRANGER: &str = "66-77-88-99-AA-BB";

#[tokio::test]
async fn partners_complete_mutual_tls_and_hello() {
    let ca = CertificateAuthority::generate("test CA").unwrap();
    let primary = PeerName::Box(sid(PRIMARY));
    let backup = PeerName::Box(sid(BACKUP));
    let mut backup_side = Side::new(&ca, backup.clone());
    backup_side.hello = hello_for(&backup, Role::Backup);
    let (client, server) = connect(
        Side::new(&ca, primary.clone()),
        AcceptPeers::Only(backup.clone()),
        backup_side,
        primary.clone(),
    )
    .await;
    let client = client.unwrap();
    let (seen_by_server, server) = server.unwrap();
    assert_eq!(seen_by_server, backup);
    assert_eq!(
        server.peer.sender,
        Sender::Box {
            sid: sid(BACKUP),
            role: Role::Backup
        }
    );
    assert_eq!(
        client.peer.sender,
        Sender::Box {
            sid: sid(PRIMARY),
            role: Role::Primary
        }
    );
    assert_eq!(client.version, PROTOCOL_VERSION);
    assert_eq!(server.peer_generation, Generation(3));
}

#[tokio::test]
async fn partners_agree_on_aes_128_gcm() {
    let ca = CertificateAuthority::generate("test CA").unwrap();
    let primary = PeerName::Box(sid(PRIMARY));
    let backup = PeerName::Box(sid(BACKUP));
    let (server, client) = (
        Side::new(&ca, primary.clone()),
        Side::new(&ca, backup.clone()),
    );
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let server_config =
        tls::server_config(&server.identity, &server.root, AcceptPeers::Only(backup)).unwrap();
    let client_config = tls::client_config(&client.identity, &client.root).unwrap();
    let (accepted, connected) = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::join!(
            tls::accept(server_config, server_io),
            tls::connect(client_config, &primary, client_io)
        )
    })
    .await
    .expect("handshake finished in time");
    let (accepted, connected) = (accepted.unwrap().0, connected.unwrap());
    let suites = [
        accepted.get_ref().1.negotiated_cipher_suite(),
        connected.get_ref().1.negotiated_cipher_suite(),
    ];
    for suite in suites {
        assert_eq!(
            suite.map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
    }
}

#[tokio::test]
async fn a_client_from_another_ca_is_refused() {
    let ca = CertificateAuthority::generate("our CA").unwrap();
    let rogue_ca = CertificateAuthority::generate("rogue CA").unwrap();
    let primary = PeerName::Box(sid(PRIMARY));
    let backup = PeerName::Box(sid(BACKUP));
    // The impostor claims the backup's SID but its certificate comes from another CA; it
    // trusts our CA, so it gets as far as presenting its certificate.
    let mut impostor = Side::new(&rogue_ca, backup.clone());
    impostor.root = ca.trust_root();
    let (client, server) = connect(
        Side::new(&ca, primary.clone()),
        AcceptPeers::Only(backup),
        impostor,
        primary,
    )
    .await;
    let server = server.unwrap_err();
    assert!(
        matches!(server, HandshakeError::Tls(TlsError::Untrusted { .. })),
        "server: {server}"
    );
    assert!(
        server
            .to_string()
            .contains("not issued by this installation"),
        "{server}"
    );
    let client = client.unwrap_err();
    assert!(
        matches!(client, HandshakeError::Tls(TlsError::RefusedByPeer { .. })),
        "client: {client}"
    );
}

#[tokio::test]
async fn a_client_with_our_ca_but_another_sid_is_refused() {
    let ca = CertificateAuthority::generate("our CA").unwrap();
    let primary = PeerName::Box(sid(PRIMARY));
    let backup = PeerName::Box(sid(BACKUP));
    let (client, server) = connect(
        Side::new(&ca, primary.clone()),
        AcceptPeers::Only(backup),
        Side::new(&ca, PeerName::Box(sid(STRANGER))),
        primary,
    )
    .await;
    let server = server.unwrap_err();
    match &server {
        HandshakeError::Tls(TlsError::NotAllowed { allowed, presented }) => {
            assert_eq!(allowed, &format!("box {BACKUP}"));
            assert_eq!(presented, &format!("box {STRANGER}"));
        }
        other => panic!("server: {other}"),
    }
    let client = client.unwrap_err();
    assert!(
        matches!(client, HandshakeError::Tls(TlsError::RefusedByPeer { .. })),
        "client: {client}"
    );
}

#[tokio::test]
async fn a_server_with_our_ca_but_another_sid_is_refused() {
    let ca = CertificateAuthority::generate("our CA").unwrap();
    let primary = PeerName::Box(sid(PRIMARY));
    let backup = PeerName::Box(sid(BACKUP));
    // The backup dials what it believes is the primary; a stranger answers.
    let (client, _server) = connect(
        Side::new(&ca, PeerName::Box(sid(STRANGER))),
        AcceptPeers::Only(backup.clone()),
        Side::new(&ca, backup),
        primary,
    )
    .await;
    let client = client.unwrap_err();
    match &client {
        HandshakeError::Tls(TlsError::WrongPeer {
            expected,
            presented,
        }) => {
            assert_eq!(expected, &format!("box {PRIMARY}"));
            assert_eq!(presented, &format!("box {STRANGER}"));
        }
        other => panic!("client: {other}"),
    }
    assert!(client.to_string().contains("impostor"), "{client}");
}

#[tokio::test]
async fn a_server_from_another_ca_is_refused() {
    let ca = CertificateAuthority::generate("our CA").unwrap();
    let rogue_ca = CertificateAuthority::generate("rogue CA").unwrap();
    let primary = PeerName::Box(sid(PRIMARY));
    let backup = PeerName::Box(sid(BACKUP));
    let mut impostor = Side::new(&rogue_ca, primary.clone());
    impostor.root = ca.trust_root();
    let (client, _server) = connect(
        impostor,
        AcceptPeers::Only(backup.clone()),
        Side::new(&ca, backup),
        primary,
    )
    .await;
    let client = client.unwrap_err();
    assert!(
        matches!(client, HandshakeError::Tls(TlsError::Untrusted { .. })),
        "client: {client}"
    );
}

#[tokio::test]
async fn a_hello_claiming_another_identity_is_refused() {
    let ca = CertificateAuthority::generate("our CA").unwrap();
    let primary = PeerName::Box(sid(PRIMARY));
    let backup = PeerName::Box(sid(BACKUP));
    let mut liar = Side::new(&ca, backup.clone());
    liar.hello = hello_for(&PeerName::Box(sid(STRANGER)), Role::Primary);
    let (client, server) = connect(
        Side::new(&ca, primary.clone()),
        AcceptPeers::Only(backup),
        liar,
        primary,
    )
    .await;
    let server = server.unwrap_err();
    assert!(
        matches!(server, HandshakeError::IdentityMismatch { .. }),
        "server: {server}"
    );
    assert!(server.to_string().contains(STRANGER), "{server}");
    // The liar itself completed its side; it learns of the refusal on its next read, which a
    // test of the whole connection covers. Here it must at least not have failed for another
    // reason.
    client.unwrap();
}

#[tokio::test]
async fn the_data_center_accepts_any_box_of_its_ca_but_no_other() {
    let ca = CertificateAuthority::generate("our CA").unwrap();
    let box_name = PeerName::Box(sid(STRANGER));
    let (client, server) = connect(
        Side::new(&ca, PeerName::DataCenter),
        AcceptPeers::AnyBox,
        Side::new(&ca, box_name.clone()),
        PeerName::DataCenter,
    )
    .await;
    assert_eq!(server.unwrap().0, box_name);
    assert_eq!(
        client.unwrap().peer.sender,
        Sender::DataCenter { site: "dc1".into() }
    );

    // A data-center certificate is not a box: it may not pose as a client box.
    let (_client, server) = connect(
        Side::new(&ca, PeerName::DataCenter),
        AcceptPeers::AnyBox,
        Side::new(&ca, PeerName::DataCenter),
        PeerName::DataCenter,
    )
    .await;
    assert!(
        matches!(
            server,
            Err(HandshakeError::Tls(TlsError::NotAllowed { .. }))
        ),
        "{server:?}"
    );
}

#[tokio::test]
async fn identities_and_the_ca_survive_a_save_and_load() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("our CA").unwrap();
    ca.save(&dir.path().join("ca.pem"), &dir.path().join("ca.key"))
        .unwrap();
    let loaded_ca =
        CertificateAuthority::load(&dir.path().join("ca.pem"), &dir.path().join("ca.key")).unwrap();
    assert_eq!(loaded_ca.trust_root(), ca.trust_root());

    let primary = PeerName::Box(sid(PRIMARY));
    let backup = PeerName::Box(sid(BACKUP));
    let identity = loaded_ca.issue_identity(&backup).unwrap();
    let (cert, key) = (dir.path().join("box.pem"), dir.path().join("box.key"));
    identity.save(&cert, &key).unwrap();
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "private key must be owner-only");
    let loaded = Identity::load(&cert, &key).unwrap();
    assert_eq!(loaded.name(), &backup);
    let root = TrustRoot::load(&dir.path().join("ca.pem")).unwrap();

    // A certificate issued by the reloaded CA is trusted by the original root.
    let client = Side {
        identity: loaded,
        root,
        hello: hello_for(&backup, Role::Backup),
    };
    let (client, server) = connect(
        Side::new(&ca, primary.clone()),
        AcceptPeers::Only(backup),
        client,
        primary,
    )
    .await;
    client.unwrap();
    server.unwrap();
}

#[test]
fn unreadable_files_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.pem");
    let err = Identity::load(&missing, &missing).unwrap_err();
    assert!(err.to_string().contains("nope.pem"), "{err}");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let err = TrustRoot::load(&garbage).unwrap_err();
    assert!(err.to_string().contains("garbage.pem"), "{err}");
}

#[test]
fn refusal_reasons_read_well() {
    let refusal = Refusal::IncompatibleProtocol {
        ours: lbs_protocol::ProtocolVersion { major: 2, minor: 0 },
        yours: PROTOCOL_VERSION,
    };
    assert!(refusal.to_string().contains("2.0"));
}

#[test]
fn a_box_key_never_leaves_the_box_and_the_certificate_names_only_its_sid() {
    let ca = CertificateAuthority::generate("test CA").unwrap();
    let a = sid("00-1A-2B-3C-4D-5E");
    let b = sid("00-1A-2B-3C-4D-5F");
    let pending = tls::PendingIdentity::generate(PeerName::Box(a)).unwrap();
    // The data center names the certificate itself, whatever the request asks for.
    let (cert, fingerprint) = ca
        .sign_request(&PeerName::Box(a), pending.request())
        .unwrap();
    assert_eq!(PeerName::of_certificate(&cert).unwrap(), PeerName::Box(a));
    assert_eq!(tls::key_fingerprint(&cert).unwrap(), fingerprint);
    let identity = pending
        .complete(cert.to_vec(), Vec::new(), &ca.trust_root())
        .unwrap();
    assert_eq!(identity.name(), &PeerName::Box(a));

    // A certificate for another SID, or for another key, is refused by the box.
    let pending = tls::PendingIdentity::generate(PeerName::Box(a)).unwrap();
    let (for_b, _) = ca
        .sign_request(&PeerName::Box(b), pending.request())
        .unwrap();
    let err = pending
        .complete(for_b.to_vec(), Vec::new(), &ca.trust_root())
        .unwrap_err();
    assert!(err.to_string().contains("not for box"), "{err}");
    let pending = tls::PendingIdentity::generate(PeerName::Box(a)).unwrap();
    let other = tls::PendingIdentity::generate(PeerName::Box(a)).unwrap();
    let (other_key, other_fingerprint) =
        ca.sign_request(&PeerName::Box(a), other.request()).unwrap();
    assert_ne!(other_fingerprint, fingerprint);
    assert!(
        pending
            .complete(other_key.to_vec(), Vec::new(), &ca.trust_root())
            .is_err()
    );

    // Garbage is not a signing request.
    assert!(ca.sign_request(&PeerName::Box(a), b"garbage").is_err());
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_never_speaks_tls_is_given_up_at_the_handshake_deadline_on_either_side() {
    let ca = CertificateAuthority::generate("lbs test CA").unwrap();
    let (a, b) = (sid("00-1A-2B-3C-4D-5E"), sid("00-1A-2B-3C-4D-5F"));
    let client = Side::new(&ca, PeerName::Box(a));
    let server = Side::new(&ca, PeerName::Box(b));
    // A server that accepted TCP and says nothing: the client's handshake ends.
    let (client_io, _silent_server) = tokio::io::duplex(64 * 1024);
    let config = tls::client_config(&client.identity, &client.root).unwrap();
    // (The outer deadline only bounds the test should the handshake wait forever.)
    let bound = Duration::from_secs(60);
    let dialled = tokio::time::timeout(bound, tls::connect(config, &PeerName::Box(b), client_io))
        .await
        .unwrap();
    assert!(
        matches!(&dialled, Err(TlsError::TimedOut { after, .. }) if *after == tls::HANDSHAKE_TIMEOUT),
        "{:?}",
        dialled.err()
    );
    // A client that connected and says nothing: the server's handshake ends.
    let (_silent_client, server_io) = tokio::io::duplex(64 * 1024);
    let config = tls::server_config(
        &server.identity,
        &server.root,
        AcceptPeers::Only(PeerName::Box(a)),
    )
    .unwrap();
    let accepted = tokio::time::timeout(bound, tls::accept(config, server_io))
        .await
        .unwrap();
    let err = accepted.err().unwrap();
    assert!(matches!(err, TlsError::TimedOut { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("did not complete the TLS handshake")
    );
}
