//! A real BIND 9 for the tests and `lbs-dc-bench`: `named` on a free loopback port with a
//! TSIG-protected dynamic zone, and `dig` to check what it answers. Panics when it cannot
//! (a test's setup).

use std::net::{TcpListener, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SECRET: &[u8] = b"a shared secret of thirty-two b.";
/// `SECRET` in base64, as named.conf wants it.
pub const SECRET_BASE64: &str = "YSBzaGFyZWQgc2VjcmV0IG9mIHRoaXJ0eS10d28gYi4=";
pub const ZONE: &str = "acme.example";

/// A `named` of our own, killed and reaped on drop.
#[derive(Debug)]
pub struct Bind {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Bind {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Bind {
    /// Freezes `named` (SIGSTOP): queries and updates reach its sockets and get no answer,
    /// like a server that hangs.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Lets a frozen `named` go on (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(sent.success(), "kill {signal} named failed");
    }
}

/// A loopback port free for both UDP and TCP.
pub fn free_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("a free UDP port on loopback");
        let port = udp.local_addr().expect("the bound address").port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub fn start_bind() -> Bind {
    start_bind_on(free_port())
}

/// A `named` on `port` (one that was used before: the server coming back).
pub fn start_bind_on(port: u16) -> Bind {
    let dir = tempfile::tempdir().expect("a temporary directory for named");
    let d = dir.path();
    std::fs::write(
        d.join("zone"),
        format!(
            "$TTL 60\n@ IN SOA ns.{ZONE}. hostmaster.{ZONE}. 1 60 60 600 60\n@ IN NS ns.{ZONE}.\nns IN A 127.0.0.1\nold IN A 192.0.2.1\n"
        ),
    )
    .expect("writing named's files");
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
    .expect("writing named's files");
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
pub fn dig(port: u16, name: &str) -> Vec<String> {
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
