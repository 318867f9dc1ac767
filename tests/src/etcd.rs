//! A real etcd (Debian's `etcd-server`) for the tests: one member, or a cluster of several,
//! on loopback ports, each member in its own temporary directory; every member is killed and
//! reaped on drop. Panics when it cannot (a test's setup).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
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
    child: Option<Child>,
}

/// An etcd cluster of our own.
#[derive(Debug)]
pub struct Etcd {
    members: Vec<Member>,
    dir: tempfile::TempDir,
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
        assert!(members > 0, "a cluster needs a member");
        let members: Vec<Member> = (0..members)
            .map(|i| Member {
                name: format!("m{i}"),
                client: crate::bind::free_port(),
                peer: crate::bind::free_port(),
                child: None,
            })
            .collect();
        let mut etcd = Etcd {
            members,
            dir: tempfile::tempdir().expect("a temporary directory for etcd"),
        };
        for i in 0..etcd.members.len() {
            etcd.spawn(i, "new");
        }
        for i in 0..etcd.members.len() {
            etcd.wait_healthy(i);
        }
        etcd
    }

    /// The client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Member `i`'s client URL.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client)
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
        let child = Command::new("etcd")
            .args(member_args(
                &member.name,
                &format!("127.0.0.1:{}", member.client),
                &format!("127.0.0.1:{}", member.peer),
                &cluster.join(","),
                state,
            ))
            .arg("--data-dir")
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting etcd (Debian package etcd-server; cargo xtask test installs it)");
        self.members[i].child = Some(child);
    }

    fn wait_healthy(&self, i: usize) {
        let deadline = Instant::now() + START_DEADLINE;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.members[i].client));
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

/// The arguments of member `name` serving clients at `client` and peers at `peer` (both
/// `address:port`, plain HTTP), of the cluster `cluster` (`name=http://address:port,…`),
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
        &format!("http://{client}"),
        "--advertise-client-urls",
        &format!("http://{client}"),
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
