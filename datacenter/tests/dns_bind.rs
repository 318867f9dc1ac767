//! DNS takeover against a real BIND 9 (Debian's `bind9`, installed by `cargo xtask test`),
//! started by the test on loopback with a TSIG-protected dynamic zone; every change is checked
//! with a real query (`dig`). Root only (the packages); skipped and counted otherwise.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lbs_datacenter::dns::{DnsError, DnsServer};
use lbs_tests::require_root;

const SECRET: &[u8] = b"a shared secret of thirty-two b.";
/// `SECRET` in base64, as named.conf wants it.
const SECRET_BASE64: &str = "YSBzaGFyZWQgc2VjcmV0IG9mIHRoaXJ0eS10d28gYi4=";
const ZONE: &str = "acme.example";

/// A `named` of our own, killed and reaped on drop.
struct Bind {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Bind {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn start_bind() -> Bind {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    std::fs::write(
        d.join("zone"),
        format!(
            "$TTL 60\n@ IN SOA ns.{ZONE}. hostmaster.{ZONE}. 1 60 60 600 60\n@ IN NS ns.{ZONE}.\nns IN A 127.0.0.1\nold IN A 192.0.2.1\n"
        ),
    )
    .unwrap();
    std::fs::write(
        d.join("named.conf"),
        format!(
            "options {{ directory \"{dir}\"; pid-file \"{dir}/named.pid\"; listen-on port {port} {{ 127.0.0.1; }}; listen-on-v6 {{ none; }}; recursion no; dnssec-validation no; }};\n\
             controls {{ }};\n\
             key \"lbs-dc\" {{ algorithm hmac-sha256; secret \"{secret}\"; }};\n\
             zone \"{ZONE}\" {{ type primary; file \"{dir}/zone\"; allow-update {{ key \"lbs-dc\"; }}; }};\n",
            dir = d.display(),
            secret = SECRET_BASE64
        ),
    )
    .unwrap();
    let child = Command::new("named")
        .args(["-g", "-c"])
        .arg(d.join("named.conf"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("named (apt-get install bind9; cargo xtask test does it as root)");
    let bind = Bind {
        child,
        port,
        _dir: dir,
    };
    // Ready when it answers for the zone.
    let deadline = Instant::now() + Duration::from_secs(20);
    while dig(port, &format!("ns.{ZONE}")) != ["127.0.0.1"] {
        assert!(
            Instant::now() < deadline,
            "named did not start on port {port}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    bind
}

/// What `dig` answers for a name's A record.
fn dig(port: u16, name: &str) -> Vec<String> {
    let out = Command::new("dig")
        .args([
            "+short",
            "+time=1",
            "+tries=1",
            "-p",
            &port.to_string(),
            "@127.0.0.1",
            name,
            "A",
        ])
        .output()
        .expect("dig (apt-get install bind9-dnsutils)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with(';'))
        .map(str::to_owned)
        .collect()
}

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
