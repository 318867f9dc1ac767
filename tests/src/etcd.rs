//! A real etcd (Debian's `etcd-server`) for the tests: one member, or a cluster of several,
//! on loopback ports, each member in its own temporary directory; every member is killed and
//! reaped on drop. Panics when it cannot (a test's setup).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a member may take to answer its health check after starting.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// One member: its ports and, while it runs, its process.
#[derive(Debug)]
struct Member {
    name: String,
    client: u16,
    peer: u16,
    /// Where it answers `/health` (plain HTTP, also when its clients need TLS).
    metrics: u16,
    child: Option<Child>,
}

/// An etcd cluster of our own.
#[derive(Debug)]
pub struct Etcd {
    members: Vec<Member>,
    dir: tempfile::TempDir,
    /// With mutual TLS for clients: the files.
    tls: Option<TlsFiles>,
}

/// The PEM files of a cluster whose clients need mutual TLS: its CA, a client certificate
/// it accepts, and one from another CA that it must refuse.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub stranger_cert: PathBuf,
    pub stranger_key: PathBuf,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Some(mut child) = member.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Etcd {
    /// Starts a cluster of `members` and waits until each answers healthy.
    pub fn start(members: usize) -> Etcd {
        Etcd::start_with(members, false)
    }

    /// Like [`Etcd::start`], its clients served over mutual TLS only (`https://`).
    pub fn start_tls(members: usize) -> Etcd {
        Etcd::start_with(members, true)
    }

    fn start_with(members: usize, tls: bool) -> Etcd {
        assert!(members > 0, "a cluster needs a member");
        let members: Vec<Member> = (0..members)
            .map(|i| Member {
                name: format!("m{i}"),
                client: crate::bind::free_port(),
                peer: crate::bind::free_port(),
                metrics: crate::bind::free_port(),
                child: None,
            })
            .collect();
        let dir = tempfile::tempdir().expect("a temporary directory for etcd");
        let tls = tls.then(|| make_certificates(dir.path()));
        let mut etcd = Etcd { members, dir, tls };
        for i in 0..etcd.members.len() {
            etcd.spawn(i, "new");
        }
        for i in 0..etcd.members.len() {
            etcd.wait_healthy(i);
        }
        etcd
    }

    /// The files of mutual TLS, for a cluster started with [`Etcd::start_tls`].
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// The client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Member `i`'s client URL.
    pub fn endpoint(&self, i: usize) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.members[i].client)
    }

    /// Kills member `i` (SIGKILL) and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data (after [`Etcd::kill`]) and waits until it is
    /// healthy.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} is running");
        self.spawn(i, "existing");
        self.wait_healthy(i);
    }

    /// Freezes member `i` (SIGSTOP): its sockets take requests and answer none.
    pub fn freeze(&self, i: usize) {
        self.signal(i, "-STOP");
    }

    /// Lets a frozen member go on (SIGCONT).
    pub fn thaw(&self, i: usize) {
        self.signal(i, "-CONT");
    }

    fn signal(&self, i: usize, signal: &str) {
        let child = self.members[i].child.as_ref().expect("the member runs");
        let sent = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(sent.success(), "kill {signal} etcd member {i} failed");
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let cluster: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect();
        let member = &self.members[i];
        let data = self.dir.path().join(&member.name);
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", member.name)))
            .expect("etcd's log file");
        let mut command = Command::new("etcd");
        command
            .args(member_args(
                &member.name,
                &self.endpoint(i),
                &format!("127.0.0.1:{}", member.peer),
                &cluster.join(","),
                state,
            ))
            .arg("--data-dir")
            .arg(&data)
            .arg(format!(
                "--listen-metrics-urls=http://127.0.0.1:{}",
                member.metrics
            ));
        if let Some(tls) = &self.tls {
            let dir = self.dir.path();
            command
                .arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--cert-file")
                .arg(dir.join("server.pem"))
                .arg("--key-file")
                .arg(dir.join("server.key"));
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting etcd (Debian package etcd-server; cargo xtask test installs it)");
        self.members[i].child = Some(child);
    }

    fn wait_healthy(&self, i: usize) {
        let deadline = Instant::now() + START_DEADLINE;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.members[i].metrics));
        while Instant::now() < deadline {
            if healthy(addr) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log =
            std::fs::read_to_string(self.dir.path().join(format!("m{i}.log"))).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        panic!(
            "etcd member {i} not healthy within {START_DEADLINE:?}; its log ends:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
}

/// A CA, the members' server certificate (for 127.0.0.1), a client certificate, and a
/// stranger's client certificate from a CA of its own, as PEM files in `dir`.
fn make_certificates(dir: &Path) -> TlsFiles {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        SanType,
    };
    let authority = || {
        let key = KeyPair::generate().expect("a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("a CA certificate");
        (cert.pem(), Issuer::new(params, key))
    };
    let issue = |issuer: &Issuer<'_, KeyPair>, name: &str, server: bool, stem: &str| {
        let key = KeyPair::generate().expect("a key");
        let mut params = CertificateParams::new(vec![name.to_owned()]).expect("parameters");
        if server {
            params
                .subject_alt_names
                .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        }
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, issuer).expect("a certificate");
        let (cert_path, key_path) = (
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).expect("writing a certificate");
        std::fs::write(&key_path, key.serialize_pem()).expect("writing a key");
        (cert_path, key_path)
    };
    let (ca_pem, ca) = authority();
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca_pem).expect("writing the CA certificate");
    issue(&ca, "localhost", true, "server");
    let (client_cert, client_key) = issue(&ca, "dc1", false, "client");
    let (_, other) = authority();
    let (stranger_cert, stranger_key) = issue(&other, "dc1", false, "stranger");
    TlsFiles {
        ca: ca_path,
        client_cert,
        client_key,
        stranger_cert,
        stranger_key,
    }
}

/// The arguments of member `name` serving clients at the URL `client` and peers at `peer`
/// (`address:port`, plain HTTP), of the cluster `cluster` (`name=http://address:port,…`),
/// whose state is `new` or `existing`; the data directory is the caller's to add.
pub(crate) fn member_args(
    name: &str,
    client: &str,
    peer: &str,
    cluster: &str,
    state: &str,
) -> Vec<String> {
    [
        "--name",
        name,
        "--listen-client-urls",
        client,
        "--advertise-client-urls",
        client,
        "--listen-peer-urls",
        &format!("http://{peer}"),
        "--initial-advertise-peer-urls",
        &format!("http://{peer}"),
        "--initial-cluster",
        cluster,
        "--initial-cluster-state",
        state,
        "--initial-cluster-token",
        "lbs-test",
        // Elections within a second, as a test wants them.
        "--heartbeat-interval",
        "50",
        "--election-timeout",
        "500",
        // Old revisions go (every report writes one): the history stays bounded.
        "--auto-compaction-mode",
        "periodic",
        "--auto-compaction-retention",
        "5m",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Whether the member at `addr` says it is healthy (`GET /health`, one second at most).
pub(crate) fn healthy(addr: SocketAddr) -> bool {
    let limit = Duration::from_secs(1);
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, limit) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(limit));
    let _ = stream.set_write_timeout(Some(limit));
    if stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = Vec::new();
    let _ = stream.take(64 * 1024).read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).contains("\"health\":\"true\"")
}
