//! A box checks the data center and its partner against the root's revocation list it keeps
//! (`ca.crl`, given by the data center): a data center whose certificate a revoked site
//! signed is refused in the TLS handshake, one of another site is not; a damaged list is
//! said and left out rather than cutting the box off.
#![allow(clippy::unwrap_used)]

use lbs_agent::activate::StatePaths;
use lbs_protocol::tls::{self, AcceptPeers};
use lbs_protocol::{CertificateAuthority, PeerName, ServerId};

/// Whether a box with the trust `paths` gives reaches a data center presenting `server`.
async fn reaches(
    paths: &StatePaths,
    box_id: &lbs_protocol::Identity,
    server: &lbs_protocol::Identity,
) -> Result<(), String> {
    let root = paths.trust_root().unwrap();
    let client = tls::client_config(box_id, &root).unwrap();
    let server_config = tls::server_config(server, &root, AcceptPeers::AnyBox).unwrap();
    let (a, b) = tokio::io::duplex(64 * 1024);
    let accepting = tokio::spawn(async move { tls::accept(server_config, b).await.map(drop) });
    let connected = tls::connect(client, &PeerName::DataCenter, a)
        .await
        .map(drop)
        .map_err(|e| e.to_string());
    drop(accepting);
    connected
}

#[tokio::test]
async fn a_data_center_signed_by_a_revoked_site_is_refused_by_the_box() {
    let dir = tempfile::tempdir().unwrap();
    let paths = StatePaths::new(dir.path());
    let root = CertificateAuthority::generate("test root").unwrap();
    root.trust_root().save(&paths.ca()).unwrap();
    let (dc1, dc2) = (
        root.issue_site_ca("dc1").unwrap(),
        root.issue_site_ca("dc2").unwrap(),
    );
    let the_box = dc1
        .issue_identity(&PeerName::Box(ServerId::from_bytes([1; 6])))
        .unwrap();
    let (at_dc1, at_dc2) = (
        dc1.issue_identity(&PeerName::DataCenter).unwrap(),
        dc2.issue_identity(&PeerName::DataCenter).unwrap(),
    );
    reaches(&paths, &the_box, &at_dc1).await.unwrap();
    reaches(&paths, &the_box, &at_dc2).await.unwrap();

    let crl = root
        .revocation_list(
            &[lbs_protocol::ca::serial_of(dc2.certificate()).unwrap()],
            1,
        )
        .unwrap();
    std::fs::write(paths.crl(), &crl).unwrap();
    reaches(&paths, &the_box, &at_dc1).await.unwrap();
    let refused = reaches(&paths, &the_box, &at_dc2).await.unwrap_err();
    assert!(refused.to_lowercase().contains("revoked"), "{refused}");

    // A damaged list is left out (the box still reaches its data center for a new one).
    std::fs::write(paths.crl(), b"damaged").unwrap();
    reaches(&paths, &the_box, &at_dc2).await.unwrap();
}
