//! DNS takeover against a real BIND 9 (Debian's `bind9`, installed by `cargo xtask test`),
//! started by the test on loopback with a TSIG-protected dynamic zone; every change is checked
//! with a real query (`dig`). Root only (the packages); skipped and counted otherwise.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use lbs_datacenter::dns::{DnsError, DnsServer};
use lbs_tests::require_root;

mod common;
use common::{SECRET, ZONE, dig, free_port, start_bind};

fn server(port: u16, secret: &[u8]) -> DnsServer {
    DnsServer {
        server: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        zone: ZONE.into(),
        key_name: "lbs-dc".into(),
        secret: secret.to_vec(),
        timeout: Duration::from_secs(2),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_signed_replace_moves_the_name_and_a_stale_or_unsigned_one_cannot() {
    if !require_root(
        "dns against BIND",
        "the bind9 packages cargo xtask test installs",
    ) {
        return;
    }
    let bind = start_bind();
    let rt = runtime();
    let dns = server(bind.port, SECRET);
    let name = format!("pbx.{ZONE}");
    let (a, b) = (Ipv4Addr::new(192, 168, 1, 2), Ipv4Addr::new(192, 168, 1, 3));

    // Created (no record yet), then moved from A to B: dig sees each.
    let started = Instant::now();
    rt.block_on(dns.replace_a(&name, None, a, 60)).unwrap();
    eprintln!("first signed update took {:?}", started.elapsed());
    assert_eq!(dig(bind.port, &name), ["192.168.1.2"]);
    let started = Instant::now();
    rt.block_on(dns.replace_a(&name, Some(a), b, 60)).unwrap();
    eprintln!("signed replace took {:?}", started.elapsed());
    assert_eq!(dig(bind.port, &name), ["192.168.1.3"]);
    assert_eq!(rt.block_on(dns.lookup_a(&name)).unwrap(), [b]);

    // A stale decision (still thinks the record holds A) changes nothing.
    let stale = rt.block_on(dns.replace_a(&name, Some(a), Ipv4Addr::new(10, 0, 0, 9), 60));
    assert!(matches!(stale, Err(DnsError::Changed { .. })), "{stale:?}");
    // So does creating over an existing record.
    let created = rt.block_on(dns.replace_a(&name, None, a, 60));
    assert!(
        matches!(created, Err(DnsError::Changed { .. })),
        "{created:?}"
    );
    assert_eq!(dig(bind.port, &name), ["192.168.1.3"]);

    // A wrong secret is said plainly, and changes nothing.
    let wrong = server(bind.port, b"not the secret at all, not at all");
    let err = rt
        .block_on(wrong.replace_a(&name, Some(b), a, 60))
        .unwrap_err();
    assert!(matches!(err, DnsError::KeyRejected { .. }), "{err:?}");
    assert!(
        err.to_string().contains("TSIG key \"lbs-dc\" rejected"),
        "{err}"
    );
    assert_eq!(dig(bind.port, &name), ["192.168.1.3"]);

    // A name outside the zone is refused before anything is sent.
    let outside = rt.block_on(dns.replace_a("pbx.other.example", None, a, 60));
    assert!(matches!(outside, Err(DnsError::Name { .. })), "{outside:?}");
}

#[test]
fn a_server_that_is_down_is_a_transient_error() {
    if !require_root(
        "dns against BIND",
        "the bind9 packages cargo xtask test installs",
    ) {
        return;
    }
    let port = free_port();
    let rt = runtime();
    let err = rt
        .block_on(server(port, SECRET).replace_a(
            &format!("pbx.{ZONE}"),
            None,
            Ipv4Addr::LOCALHOST,
            60,
        ))
        .unwrap_err();
    assert!(err.is_transient(), "{err:?}");
}
