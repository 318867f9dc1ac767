//! `lbs-datacenter serve` end to end on loopback, with boxes played by this test through the
//! same protocol calls the agent uses: activation, reports, promotion, fencing, registration,
//! DNS takeover checked in a real BIND with `dig`, and the service restarted between steps.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lbs_protocol::control::{
    self, ActivationGrant, ActivationRequest, BoxReport, CallError, Denial, PairState, Promotion,
    PromotionKind, SyncSummary,
};
use lbs_protocol::handshake::HELLO_TIMEOUT;
use lbs_protocol::inventory::Inventory;
use lbs_protocol::tls::{self, PendingIdentity};
use lbs_protocol::{
    CertificateAuthority, Connection, Generation, Hello, Identity, Message, PROTOCOL_VERSION,
    PeerName, ProtocolVersion, Role, Sender, ServerId, SoftwareVersion, TrustRoot, exchange_hello,
};
use lbs_tests::require_root;
use tokio::net::{TcpSocket, TcpStream};

mod common;
use common::{Bind, SECRET_BASE64, ZONE, dig, free_port, start_bind};

const DC: &str = env!("CARGO_BIN_EXE_lbs-datacenter");
const WAIT: Duration = Duration::from_secs(10);
const FQDN: &str = "pbx.acme.example";

fn inventory(memory_gib: u64) -> Inventory {
    Inventory {
        cpu_model: "Test CPU".into(),
        cpus: 4,
        memory_bytes: memory_gib << 30,
        disks: Vec::new(),
        nics: Vec::new(),
        telephony: Vec::new(),
    }
}

/// A data center in a temporary directory; `serve` is killed and reaped on drop.
struct Dc {
    dir: tempfile::TempDir,
    activation: SocketAddr,
    control: SocketAddr,
    child: Option<Child>,
}

impl Drop for Dc {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.path().join("serve.log"));
            eprintln!("--- serve's log ---\n{}", log.unwrap_or_default());
        }
    }
}

impl Dc {
    fn new(extra_config: &str) -> Dc {
        let dir = tempfile::tempdir().unwrap();
        let activation = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let control = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let dc = Dc {
            dir,
            activation,
            control,
            child: None,
        };
        assert!(dc.cli(&["init"]).0);
        std::fs::write(
            dc.path().join("datacenter.toml"),
            format!("activation = [\"{activation}\"]\ncontrol = [\"{control}\"]\n{extra_config}"),
        )
        .unwrap();
        // It may hold the TSIG secret: only its owner may read it.
        std::fs::set_permissions(
            dc.path().join("datacenter.toml"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        dc
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("dc")
    }

    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(DC)
            .arg("--dir")
            .arg(self.path())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Provisions a pair; returns (SID, key) of each server.
    fn provision(&self, name: &str, args: &[&str]) -> Vec<(ServerId, String)> {
        let mut all = vec!["provision-pair", "--json", "--name", name, "--fqdn", FQDN];
        all.extend_from_slice(args);
        let (ok, out, err) = self.cli(&all);
        assert!(ok, "{err}");
        lbs_tests::provisioned(&out)
    }

    fn start(&mut self) {
        self.stop();
        let mut child = Command::new(DC)
            .arg("--dir")
            .arg(self.path())
            .arg("serve")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(self.log())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        self.child = Some(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if line.starts_with("ready:") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("serve did not say ready within 30 s");
        assert!(line.contains(&self.activation.to_string()), "{line}");
    }

    /// serve's standard error, appended across restarts (shown when a test fails).
    fn log(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("serve.log"))
            .unwrap()
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM first: the orderly path must work; kill if it does not end in time.
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let deadline = Instant::now() + WAIT;
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("serve did not stop within {WAIT:?} of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn root(&self) -> TrustRoot {
        TrustRoot::load(&self.path().join("ca.pem")).unwrap()
    }

    fn status(&self) -> serde_json::Value {
        let (ok, out, err) = self.cli(&["status", "--json"]);
        assert!(ok, "{err}");
        serde_json::from_str(&out).unwrap()
    }

    fn events(&self) -> Vec<serde_json::Value> {
        let (ok, out, err) = self.cli(&["events", "--json"]);
        assert!(ok, "{err}");
        serde_json::from_str(&out).unwrap()
    }
}

/// A box as the data center sees it: its SID, key, keys and addresses.
struct TestBox {
    sid: ServerId,
    key: String,
    lan: Ipv4Addr,
    memory_gib: u64,
    wireguard: String,
    identity: Option<Identity>,
    /// Activates as a box of protocol 1.6 does: the inventory as JSON text.
    json_form: bool,
}

impl TestBox {
    fn new(provisioned: &(ServerId, String), lan: u8) -> TestBox {
        TestBox {
            sid: provisioned.0,
            key: provisioned.1.clone(),
            lan: Ipv4Addr::new(192, 168, 1, lan),
            memory_gib: 8,
            wireguard: lbs_vpn::Key::generate_private().get_public().to_base64(),
            identity: None,
            json_form: false,
        }
    }

    fn request(&self, pending: &PendingIdentity) -> ActivationRequest {
        ActivationRequest {
            protocol: PROTOCOL_VERSION,
            software: SoftwareVersion::current(),
            sid: self.sid,
            key: self.key.clone(),
            csr: pending.request().to_vec(),
            wireguard_key: self.wireguard.clone(),
            lan_address: self.lan,
            inventory: inventory(self.memory_gib),
        }
    }

    async fn activate(&mut self, dc: &Dc) -> Result<ActivationGrant, CallError> {
        self.activate_from(dc, Ipv4Addr::LOCALHOST).await
    }

    async fn activate_from(
        &mut self,
        dc: &Dc,
        source: Ipv4Addr,
    ) -> Result<ActivationGrant, CallError> {
        let pending = PendingIdentity::generate(PeerName::Box(self.sid)).unwrap();
        let request = self.request(&pending);
        let tls = activation_tls(dc, source).await;
        let message = if self.json_form {
            Message::ActivateJson(request.into())
        } else {
            Message::Activate(request)
        };
        let grant = control::activate_with(tls, message, WAIT).await?;
        let root = TrustRoot::from_pem(&grant.ca_pem).unwrap();
        assert_eq!(root, dc.root(), "the grant carries the data center's CA");
        self.identity = Some(
            pending
                .complete(grant.certificate.clone(), grant.chain.clone(), &root)
                .unwrap(),
        );
        Ok(grant)
    }

    async fn control(&self, dc: &Dc, generation: Generation, role: Role) -> Connection<TlsStream> {
        self.control_as(dc, generation, role, PROTOCOL_VERSION)
            .await
    }

    /// A control connection whose hello says `protocol` (an older box's).
    async fn control_as(
        &self,
        dc: &Dc,
        generation: Generation,
        role: Role,
        protocol: ProtocolVersion,
    ) -> Connection<TlsStream> {
        connect_control(
            dc,
            self.identity.as_ref().unwrap(),
            generation,
            role,
            protocol,
        )
        .await
        .unwrap()
    }

    fn report(&self, role: Role, advertised: Ipv4Addr) -> Message {
        Message::Report(BoxReport {
            role,
            software: SoftwareVersion::current(),
            advertised,
            sync: SyncSummary::default(),
            tunnels: Vec::new(),
        })
    }
}

type TlsStream = tls::ClientStream<TcpStream>;

async fn tcp_from(source: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    tokio::time::timeout(WAIT, socket.connect(to))
        .await
        .unwrap()
        .unwrap()
}

async fn activation_tls(dc: &Dc, source: Ipv4Addr) -> TlsStream {
    let config = tls::activation_client_config(&dc.root()).unwrap();
    tls::connect(
        config,
        &PeerName::DataCenter,
        tcp_from(source, dc.activation).await,
    )
    .await
    .unwrap()
}

async fn connect_control(
    dc: &Dc,
    identity: &Identity,
    generation: Generation,
    role: Role,
    protocol: ProtocolVersion,
) -> anyhow::Result<Connection<TlsStream>> {
    let PeerName::Box(sid) = identity.name().clone() else {
        panic!("not a box identity")
    };
    let config = tls::client_config(identity, &dc.root())?;
    let tcp = TcpStream::connect(dc.control).await?;
    let stream = tls::connect(config, &PeerName::DataCenter, tcp).await?;
    let hello = Hello {
        protocol,
        software: SoftwareVersion::current(),
        sender: Sender::Box { sid, role },
    };
    let (conn, _) = exchange_hello(
        stream,
        &PeerName::DataCenter,
        hello,
        generation,
        HELLO_TIMEOUT,
    )
    .await?;
    Ok(conn)
}

async fn state(
    conn: &mut Connection<TlsStream>,
    generation: Generation,
    message: Message,
) -> PairState {
    match control::call(conn, generation, message, WAIT)
        .await
        .unwrap()
    {
        (_, Message::PairState(state)) => state,
        // Boxes speaking 1.2 get the DNS names with it.
        (_, Message::PairStateWithDns { state, dns }) => {
            let names: Vec<&str> = dns.iter().map(|r| r.name.as_str()).collect();
            assert!(names.contains(&"pbx.acme.example"), "{names:?}");
            state
        }
        (_, other) => panic!("expected a pair state, got {other:?}"),
    }
}

/// A running data center with pair acme provisioned and both its boxes activated.
async fn activated_pair() -> (Dc, TestBox, TestBox) {
    let mut dc = Dc::new("");
    let servers = dc.provision("acme", &[]);
    let (mut a, mut b) = (TestBox::new(&servers[0], 2), TestBox::new(&servers[1], 3));
    dc.start();
    a.activate(&dc).await.unwrap();
    b.activate(&dc).await.unwrap();
    (dc, a, b)
}

async fn promote(
    conn: &mut Connection<TlsStream>,
    generation: Generation,
    advertised: Ipv4Addr,
) -> Result<Promotion, CallError> {
    match control::call(conn, generation, Message::Promote { advertised }, WAIT).await? {
        (_, Message::Promoted(promotion)) => Ok(promotion),
        (_, other) => panic!("expected a promotion, got {other:?}"),
    }
}

fn wait_for_dig(bind: &Bind, name: &str, want: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = dig(bind.port, name);
        if got == [want] {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} answers {got:?}, expected {want} within {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn dns_config(bind: &Bind) -> String {
    format!(
        "[dns]\nserver = \"127.0.0.1:{}\"\nzone = \"{ZONE}\"\nkey_name = \"lbs-dc\"\nsecret = \"{SECRET_BASE64}\"\nttl = 30\n",
        bind.port
    )
}

fn server(status: &serde_json::Value, sid: ServerId) -> &serde_json::Value {
    status[0]["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["sid"] == sid.to_string())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_activate_promote_fence_register_with_a_restart_between_every_step() {
    if !require_root(
        "provision_activate_promote_fence_register_with_a_restart_between_every_step",
        "a real BIND (bind9, installed by cargo xtask test)",
    ) {
        return;
    }
    let bind = start_bind();
    let mut dc = Dc::new(&dns_config(&bind));
    let servers = dc.provision("acme", &[]);
    let (mut a, mut b) = (TestBox::new(&servers[0], 2), TestBox::new(&servers[1], 3));
    b.memory_gib = 4;
    // b is a box of protocol 1.6: its inventory arrives as JSON text, and is compared all
    // the same.
    b.json_form = true;

    dc.start();
    let grant_a = a.activate(&dc).await.unwrap();
    assert_eq!(
        (grant_a.role, grant_a.generation),
        (Role::Primary, Generation(1))
    );
    assert_eq!(grant_a.partner.as_ref().unwrap().sid, b.sid);
    assert_eq!(grant_a.control, [dc.control]);
    assert_eq!(grant_a.fqdn, FQDN);
    // The primary's activation already points the pair's name at it.
    wait_for_dig(&bind, FQDN, "192.168.1.2");
    wait_for_dig(
        &bind,
        &format!("primary.{FQDN}"),
        &grant_a.overlay.to_string(),
    );

    dc.start();
    let grant_b = b.activate(&dc).await.unwrap();
    assert_eq!(
        (grant_b.role, grant_b.generation),
        (Role::Backup, Generation(1))
    );
    assert_eq!(grant_b.partner.as_ref().unwrap().sid, a.sid);
    assert_eq!(
        grant_b.partner.as_ref().unwrap().overlay,
        Some(grant_a.overlay)
    );
    wait_for_dig(
        &bind,
        &format!("backup.{FQDN}"),
        &grant_b.overlay.to_string(),
    );

    dc.start();
    let mut ca = a.control(&dc, Generation(1), Role::Primary).await;
    let s = state(&mut ca, Generation(1), a.report(Role::Primary, a.lan)).await;
    assert_eq!(
        (s.role, s.generation, s.primary),
        (Role::Primary, Generation(1), Some(a.sid))
    );
    let mut cb = b.control(&dc, Generation(1), Role::Backup).await;
    let s = state(&mut cb, Generation(1), b.report(Role::Backup, b.lan)).await;
    assert_eq!((s.role, s.primary), (Role::Backup, Some(a.sid)));
    let partner = s.partner.unwrap();
    assert_eq!(partner.sid, a.sid);
    assert!(partner.silent_ms.unwrap() < 5_000, "{partner:?}");
    let status = dc.status();
    assert_eq!(
        status[0]["hardware_differences"].as_array().unwrap().len(),
        1,
        "the memory differs: {}",
        status[0]["hardware_differences"]
    );

    dc.start();
    // The primary cannot promote itself; the backup can, once.
    let mut ca = a.control(&dc, Generation(1), Role::Primary).await;
    let refused = promote(&mut ca, Generation(1), a.lan).await.unwrap_err();
    assert!(
        matches!(&refused, CallError::Denied(Denial::NotAllowed(why)) if why.contains("only the backup")),
        "{refused}"
    );
    let remote = Ipv4Addr::new(127, 0, 0, 99);
    let mut cb = b.control(&dc, Generation(1), Role::Backup).await;
    let promotion = promote(&mut cb, Generation(1), remote).await.unwrap();
    assert_eq!(promotion.generation, Generation(2));
    assert_eq!(promotion.previous, Some(a.sid));
    assert!(promotion.previous_silent_ms.is_some());
    // DNS takeover: the pair's name points at B now, primary./backup. swapped.
    let started = Instant::now();
    wait_for_dig(&bind, FQDN, "127.0.0.99");
    eprintln!("DNS followed the promotion in {:?}", started.elapsed());
    wait_for_dig(
        &bind,
        &format!("primary.{FQDN}"),
        &grant_b.overlay.to_string(),
    );
    wait_for_dig(
        &bind,
        &format!("backup.{FQDN}"),
        &grant_a.overlay.to_string(),
    );

    dc.start();
    // A, still believing it is primary at generation 1, is told it is fenced.
    let mut ca = a.control(&dc, Generation(1), Role::Primary).await;
    let s = state(&mut ca, Generation(1), a.report(Role::Primary, a.lan)).await;
    assert_eq!(
        (s.role, s.generation, s.primary),
        (Role::Fenced, Generation(2), Some(b.sid))
    );
    // Its old generation cannot promote it back.
    assert!(promote(&mut ca, Generation(1), a.lan).await.is_err());

    dc.start();
    let mut ca = a.control(&dc, Generation(2), Role::Fenced).await;
    let s = state(&mut ca, Generation(2), Message::RegisterBackup).await;
    assert_eq!((s.role, s.generation), (Role::Backup, Generation(2)));

    dc.start();
    let status = dc.status();
    assert_eq!(status[0]["generation"], 2);
    assert_eq!(status[0]["primary"], b.sid.to_string());
    assert_eq!(server(&status, a.sid)["role"], "backup");
    assert_eq!(server(&status, b.sid)["role"], "primary");
    for record in status[0]["dns"].as_array().unwrap() {
        assert_eq!(record["state"], "done", "{record}");
    }
    let (_, table, _) = dc.cli(&["status"]);
    assert!(table.contains("HARDWARE DIFFERS"), "{table}");
    assert!(
        table.contains("says primary, serving at 192.168.1.2; sync: 0 files"),
        "{table}"
    );
    assert!(
        table.contains(&format!("DNS {FQDN} → 127.0.0.99  ok")),
        "{table}"
    );
    let kinds: Vec<String> = dc
        .events()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .filter(|k| k != "dns-updated")
        .collect();
    assert_eq!(
        kinds,
        [
            "provisioned",
            "provisioned",
            "activated",
            "activated",
            "promoted",
            "registered-backup"
        ]
    );
    dc.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_updates_wait_for_a_dns_server_that_is_down_and_status_shows_them_pending() {
    if !require_root(
        "dns_updates_wait_for_a_dns_server_that_is_down_and_status_shows_them_pending",
        "a real BIND (bind9, installed by cargo xtask test)",
    ) {
        return;
    }
    let bind = start_bind();
    let config = dns_config(&bind);
    let port = bind.port;
    drop(bind);
    let mut dc = Dc::new(&config);
    let servers = dc.provision("acme", &[]);
    let mut a = TestBox::new(&servers[0], 2);
    dc.start();
    a.activate(&dc).await.unwrap();
    // The server is down: the update fails, is retried, and status says so.
    let deadline = Instant::now() + WAIT;
    loop {
        let status = dc.status();
        let record = status[0]["dns"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == FQDN)
            .cloned()
            .unwrap();
        if record["state"] == "retrying" {
            assert!(
                record["last_error"]
                    .as_str()
                    .unwrap()
                    .contains("did not answer"),
                "{record}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "never retried: {record}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, table, _) = dc.cli(&["status"]);
    assert!(table.contains("RETRYING"), "{table}");
    // BIND comes back on the same port: the record is written without anyone's help.
    let bind = common::start_bind_on(port);
    let deadline = Instant::now() + Duration::from_secs(90);
    while dig(bind.port, FQDN) != ["192.168.1.2"] {
        assert!(Instant::now() < deadline, "the retry never reached BIND");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let status = dc.status();
    assert!(
        status[0]["dns"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["state"] == "done"),
        "{}",
        status[0]["dns"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_server_that_rejects_the_key_is_a_failure_for_the_operator_said_once() {
    if !require_root(
        "a_dns_server_that_rejects_the_key_is_a_failure_for_the_operator_said_once",
        "a real BIND (bind9, installed by cargo xtask test)",
    ) {
        return;
    }
    let bind = start_bind();
    // Another secret than BIND's: every update is refused (BADSIG/BADKEY), forever.
    let config = dns_config(&bind).replace(SECRET_BASE64, "d3Jvbmcgd3Jvbmcgd3Jvbmcgd3Jvbmc=");
    let mut dc = Dc::new(&config);
    let servers = dc.provision("acme", &[]);
    let mut a = TestBox::new(&servers[0], 2);
    dc.start();
    a.activate(&dc).await.unwrap();
    let deadline = Instant::now() + WAIT;
    let record = loop {
        let status = dc.status();
        let record = status[0]["dns"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == FQDN)
            .cloned()
            .unwrap();
        // A few retries in: the failure is still said once.
        if record["state"] == "failed" && record["attempts"].as_i64().unwrap() >= 3 {
            break record;
        }
        assert!(Instant::now() < deadline, "never failed: {record}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        record["last_error"].as_str().unwrap().contains("TSIG key"),
        "{record}"
    );
    let failures = dc
        .events()
        .iter()
        .filter(|e| {
            e["kind"] == "dns-failed"
                && e["detail"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("{FQDN} →"))
        })
        .count();
    assert_eq!(failures, 1, "said once, not at every retry");
    let (_, table, _) = dc.cli(&["status"]);
    assert!(table.contains("FAILED, the server refuses it"), "{table}");
    assert!(dig(bind.port, FQDN).is_empty(), "nothing was written");
    dc.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_promotions_over_the_wire_promote_once_per_round() {
    let (dc, a, b) = activated_pair().await;
    // Protocol 1.5: each box learns the key its partner's latest activation certified.
    for (me, partner) in [(&a, &b), (&b, &a)] {
        let role = if std::ptr::eq(me, &a) {
            Role::Primary
        } else {
            Role::Backup
        };
        let mut conn = me.control(&dc, Generation(1), role).await;
        let (_, answer) = control::call(&mut conn, Generation(1), Message::PartnerKeyRequest, WAIT)
            .await
            .unwrap();
        let key = tls::key_fingerprint(partner.identity.as_ref().unwrap().certificate()).unwrap();
        assert_eq!(
            answer,
            Message::PartnerKey {
                partner: Some(partner.sid),
                key: Some(key)
            }
        );
    }
    const ROUNDS: u64 = 15;
    let (mut primary, mut backup) = (&a, &b);
    for round in 0..ROUNDS {
        let generation = Generation(1 + round);
        // Three consoles pressing P on the backup at once.
        let mut racers = Vec::new();
        for _ in 0..3 {
            racers.push(backup.control(&dc, generation, Role::Backup).await);
        }
        let results = futures_util::future::join_all(
            racers
                .iter_mut()
                .map(|conn| promote(conn, generation, Ipv4Addr::new(192, 0, 2, 1))),
        )
        .await;
        // One of them promotes; the same box asking again at the same generation is
        // answered the same (a retry after a lost answer or a crash), never promoted twice.
        for result in &results {
            let promotion = result.as_ref().unwrap();
            assert_eq!(promotion.generation, Generation(2 + round), "round {round}");
        }
        // From a generation it no longer has, it is refused.
        let mut late = backup.control(&dc, generation, Role::Backup).await;
        let stale = promote(&mut late, Generation(round), Ipv4Addr::new(192, 0, 2, 1)).await;
        assert!(matches!(stale, Err(CallError::Denied(_))), "{stale:?}");
        // The old primary registers as backup; roles swap for the next round.
        let mut old = primary
            .control(&dc, Generation(2 + round), Role::Fenced)
            .await;
        let s = state(&mut old, Generation(2 + round), Message::RegisterBackup).await;
        assert_eq!(s.role, Role::Backup);
        (primary, backup) = (backup, primary);
    }
    let events = dc.events();
    let promoted: Vec<(u64, u64)> = events
        .iter()
        .filter(|e| e["kind"] == "promoted")
        .map(|e| {
            (
                e["from_generation"].as_u64().unwrap(),
                e["to_generation"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(u64, u64)> = (1..=ROUNDS).map(|g| (g, g + 1)).collect();
    assert_eq!(
        promoted, expected,
        "one promotion logged per round, in order"
    );
    assert_eq!(dc.status()[0]["generation"], 1 + ROUNDS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impostors_bad_keys_and_bad_input_are_refused_and_change_nothing() {
    let mut dc = Dc::new("[rate_limit]\nburst = 3\nper_minute = 1\n");
    let servers = dc.provision("acme", &[]);
    let expired = dc.provision("late", &["--single", "--key-days", "0"]);
    let (mut a, mut b) = (TestBox::new(&servers[0], 2), TestBox::new(&servers[1], 3));
    dc.start();
    a.activate(&dc).await.unwrap();
    let before = dc.status();
    let denied = |result: Result<ActivationGrant, CallError>| match result {
        Err(CallError::Denied(Denial::Activation(why))) => why,
        other => panic!("expected a refusal, got {other:?}"),
    };

    // Each from its own loopback address: the rate limit is per source.
    let mut wrong = TestBox::new(&servers[1], 3);
    wrong.key = "0000-0000-0000-0000-0000-0000".into();
    assert!(
        denied(wrong.activate_from(&dc, Ipv4Addr::new(127, 0, 0, 2)).await)
            .contains("wrong activation key")
    );
    let mut unknown = TestBox::new(&(ServerId::from_bytes([7; 6]), servers[1].1.clone()), 3);
    assert!(
        denied(
            unknown
                .activate_from(&dc, Ipv4Addr::new(127, 0, 0, 3))
                .await
        )
        .contains("unknown server")
    );
    let mut late = TestBox::new(&expired[0], 4);
    assert!(denied(late.activate_from(&dc, Ipv4Addr::new(127, 0, 0, 4)).await).contains("expired"));
    // A's key replayed by another machine (other keys): spent.
    let mut replay = TestBox::new(&servers[0], 2);
    assert!(
        denied(replay.activate_from(&dc, Ipv4Addr::new(127, 0, 0, 5)).await)
            .contains("activated already")
    );
    // A request whose CSR is not one: refused before anything is recorded.
    let pending = PendingIdentity::generate(PeerName::Box(b.sid)).unwrap();
    let mut request = b.request(&pending);
    request.csr = b"not a certificate signing request".to_vec();
    let tls = activation_tls(&dc, Ipv4Addr::new(127, 0, 0, 6)).await;
    let why = denied(control::activate_with(tls, Message::Activate(request), WAIT).await);
    assert!(why.contains("signing request"), "{why}");
    // A 1.6-form request whose inventory is not one: refused before anything is recorded.
    let pending = PendingIdentity::generate(PeerName::Box(b.sid)).unwrap();
    let mut request = control::ActivationRequestJson::from(b.request(&pending));
    request.inventory = "{\"cpu_model\": 7}".into();
    let tls = activation_tls(&dc, Ipv4Addr::new(127, 0, 0, 6)).await;
    let why = denied(control::activate_with(tls, Message::ActivateJson(request), WAIT).await);
    assert!(why.contains("hardware inventory"), "{why}");

    // Malformed and oversized frames: refused, connection closed, service still there.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for garbage in [
        [0u32.to_be_bytes().to_vec(), vec![]].concat(),
        [5u32.to_be_bytes().to_vec(), vec![0xff; 5]].concat(),
        (64u32 * 1024 * 1024).to_be_bytes().to_vec(),
    ] {
        let mut tls = activation_tls(&dc, Ipv4Addr::new(127, 0, 0, 7)).await;
        tls.write_all(&garbage).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(WAIT, tls.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "the service kept a bad connection open");
    }

    // Five attempts from one source with a burst of three: the last two are rate-limited.
    let mut limited = 0;
    for _ in 0..5 {
        let mut wrong = TestBox::new(&servers[1], 3);
        wrong.key = "0000-0000-0000-0000-0000-0000".into();
        match wrong.activate_from(&dc, Ipv4Addr::new(127, 0, 0, 8)).await {
            Err(CallError::Denied(Denial::RateLimited { retry_after_ms })) => {
                assert!(retry_after_ms > 1_000);
                limited += 1;
            }
            Err(CallError::Denied(Denial::Activation(_))) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(limited, 2);

    // An impostor: a box certificate from another CA is refused at the TLS handshake.
    let other_ca = CertificateAuthority::generate("another installation").unwrap();
    let impostor = other_ca.issue_identity(&PeerName::Box(b.sid)).unwrap();
    let refused = match connect_control(
        &dc,
        &impostor,
        Generation(1),
        Role::Backup,
        PROTOCOL_VERSION,
    )
    .await
    {
        Ok(mut conn) => control::call(
            &mut conn,
            Generation(1),
            b.report(Role::Backup, b.lan),
            WAIT,
        )
        .await
        .map(drop)
        .map_err(anyhow::Error::from),
        Err(err) => Err(err),
    };
    assert!(refused.is_err(), "an impostor got in");

    // Nothing changed for the refusals, and the service still activates B.
    assert_eq!(dc.status(), before);
    let grant = b.activate(&dc).await.unwrap();
    assert_eq!(grant.role, Role::Backup);

    // A re-activated box's old certificate no longer gets in.
    let old_identity = a.identity.clone().unwrap();
    let (ok, out, err) = dc.cli(&["rekey", "--sid", &a.sid.to_string()]);
    assert!(ok, "{err}");
    a.key = out.split_whitespace().nth(3).unwrap().to_owned();
    let regrant = a.activate(&dc).await.unwrap();
    assert_eq!(regrant.role, Role::Primary, "re-activation keeps the role");
    let mut stale = connect_control(
        &dc,
        &old_identity,
        Generation(1),
        Role::Primary,
        PROTOCOL_VERSION,
    )
    .await
    .unwrap();
    let err = control::call(
        &mut stale,
        Generation(1),
        a.report(Role::Primary, a.lan),
        WAIT,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("replaced"), "{err}");
    let mut fresh = a.control(&dc, Generation(1), Role::Primary).await;
    let s = state(&mut fresh, Generation(1), a.report(Role::Primary, a.lan)).await;
    assert_eq!(s.role, Role::Primary);
    let refusals = dc
        .events()
        .iter()
        .filter(|e| e["kind"] == "activation-refused")
        .count();
    assert_eq!(
        refusals,
        3 + 3,
        "wrong key, expired, replay, and three more wrong keys"
    );
}

#[test]
fn serve_explains_a_bad_configuration_and_a_missing_ca() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(DC)
        .arg("--dir")
        .arg(dir.path())
        .arg("serve")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("init` first"));
    let dc = Dc::new("overlay_pool = \"banana\"\n");
    let (ok, _, err) = dc.cli(&["serve"]);
    assert!(!ok);
    assert!(
        err.contains("overlay_pool") && err.contains("datacenter.toml"),
        "{err}"
    );
}

/// Another site of the data center (`site-identity`'s certificate) asks which boxes may use
/// its tunnels and is told every activated box; a box asking the same is refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_site_learns_the_tunnel_peers_and_a_box_cannot_ask() {
    let mut dc = Dc::new("");
    let servers = dc.provision("acme", &[]);
    let mut a = TestBox::new(&servers[0], 2);
    dc.start();
    let grant = a.activate(&dc).await.unwrap();
    let site_dir = dc.dir.path().join("site");
    let (ok, out, err) = dc.cli(&["site-identity", "--out", &site_dir.display().to_string()]);
    assert!(ok && out.contains("copy them"), "{out}{err}");
    // Never over an identity already there.
    let (ok, _, err) = dc.cli(&["site-identity", "--out", &site_dir.display().to_string()]);
    assert!(!ok && err.contains("holds an identity already"), "{err}");

    let identity = Identity::load(
        &site_dir.join("datacenter.pem"),
        &site_dir.join("datacenter.key"),
    )
    .unwrap();
    let root = TrustRoot::load(&site_dir.join("ca.pem")).unwrap();
    assert_eq!(root, dc.root());
    let config = tls::client_config(&identity, &root).unwrap();
    let tcp = TcpStream::connect(dc.control).await.unwrap();
    let stream = tls::connect(config, &PeerName::DataCenter, tcp)
        .await
        .unwrap();
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        software: SoftwareVersion::current(),
        sender: Sender::DataCenter { site: "dc2".into() },
    };
    let (mut site, _) = exchange_hello(
        stream,
        &PeerName::DataCenter,
        hello,
        Generation::default(),
        HELLO_TIMEOUT,
    )
    .await
    .unwrap();
    let (_, answer) = control::call(
        &mut site,
        Generation::default(),
        Message::TunnelPeersRequest,
        WAIT,
    )
    .await
    .unwrap();
    let Message::TunnelPeers { peers } = answer else {
        panic!("expected the peers, got {answer:?}")
    };
    assert_eq!(
        peers,
        [control::TunnelPeer {
            public_key: a.wireguard.clone(),
            overlay: grant.overlay
        }]
    );
    // Protocol 1.5: the same boxes pair by pair, so the site keeps pairs apart too.
    let (_, answer) = control::call(
        &mut site,
        Generation::default(),
        Message::TunnelPairsRequest,
        WAIT,
    )
    .await
    .unwrap();
    let Message::TunnelPairs { pairs } = answer else {
        panic!("expected the pairs, got {answer:?}")
    };
    assert_eq!(pairs, [peers]);
    // A site cannot report or promote: those are a box's.
    let refused = control::call(
        &mut site,
        Generation::default(),
        a.report(Role::Primary, a.lan),
        WAIT,
    )
    .await;
    assert!(matches!(refused, Err(CallError::Refused(_))), "{refused:?}");

    // A box asking for the peers is refused.
    let mut conn = a.control(&dc, grant.generation, Role::Primary).await;
    let refused = control::call(
        &mut conn,
        grant.generation,
        Message::TunnelPeersRequest,
        WAIT,
    )
    .await;
    assert!(matches!(refused, Err(CallError::Refused(_))), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_and_slow_connections_leaves_room_for_reports_and_a_promotion() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (dc, a, b) = activated_pair().await;
    // The internet: from one address, 1,100 connections to the activation port that never
    // start TLS and 50 that start it and stall; from another, 300 to the control port that
    // never finish their handshake. (Before the ports had bounds of their own, the first
    // 1,024 of these held every place of both ports.)
    let intruder = Ipv4Addr::new(127, 0, 0, 5);
    let mut idle = Vec::new();
    for _ in 0..1100 {
        idle.push(tcp_from(intruder, dc.activation).await);
    }
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut stream = tcp_from(intruder, dc.activation).await;
        // The first bytes of a TLS record header, then nothing.
        let _ = stream.write_all(&[0x16, 0x03]).await;
        slow.push(stream);
    }
    let mut control_flood = Vec::new();
    for _ in 0..300 {
        control_flood.push(tcp_from(Ipv4Addr::new(127, 0, 0, 6), dc.control).await);
    }
    // A box reports and the backup promotes, well within the data center's answer deadline.
    let started = Instant::now();
    let mut ca = a.control(&dc, Generation(1), Role::Primary).await;
    let s = state(&mut ca, Generation(1), a.report(Role::Primary, a.lan)).await;
    assert_eq!(s.role, Role::Primary);
    let mut cb = b.control(&dc, Generation(1), Role::Backup).await;
    let s = state(&mut cb, Generation(1), b.report(Role::Backup, b.lan)).await;
    assert_eq!(s.role, Role::Backup);
    let promotion = promote(&mut cb, Generation(1), b.lan).await.unwrap();
    assert_eq!(promotion.generation, Generation(2));
    let took = started.elapsed();
    eprintln!("report, report and promotion under the flood in {took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // Nearly all of the flood was closed at once: one address holds a handful of places.
    let mut closed = 0;
    for stream in idle.iter_mut().chain(slow.iter_mut()) {
        let mut byte = [0u8; 1];
        if matches!(
            tokio::time::timeout(Duration::from_millis(20), stream.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        ) {
            closed += 1;
        }
    }
    assert!(closed >= 1150 - 8, "only {closed} of 1,150 closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_pair_is_told_so_and_the_others_carry_on() {
    let mut dc = Dc::new("");
    let acme = dc.provision("acme", &[]);
    let beta = dc.provision("beta", &[]);
    let (mut a, mut b) = (TestBox::new(&acme[0], 2), TestBox::new(&acme[1], 3));
    let mut other = TestBox::new(&beta[0], 4);
    dc.start();
    a.activate(&dc).await.unwrap();
    b.activate(&dc).await.unwrap();
    other.activate(&dc).await.unwrap();
    let mut conn = a.control(&dc, Generation(1), Role::Primary).await;
    let s = state(&mut conn, Generation(1), a.report(Role::Primary, a.lan)).await;
    assert_eq!(s.role, Role::Primary);

    let (ok, out, err) = dc.cli(&["retire", "acme", "--by", "noc"]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&a.sid.to_string()) && out.contains(&b.sid.to_string()),
        "{out}"
    );

    // The connected box is told at its next report, with the reason.
    let denied = |result: Result<(Generation, Message), CallError>| match result {
        Err(CallError::Denied(Denial::NotAllowed(why))) => why,
        other => panic!("expected a denial, got {other:?}"),
    };
    let report = a.report(Role::Primary, a.lan);
    let why = denied(control::call(&mut conn, Generation(1), report, WAIT).await);
    assert!(why.contains("pair acme, retired"), "{why}");
    // A new connection gets the same answer, after the hello, not a silent close.
    let mut conn = b.control(&dc, Generation(1), Role::Backup).await;
    let report = b.report(Role::Backup, b.lan);
    let why = denied(control::call(&mut conn, Generation(1), report, WAIT).await);
    assert!(
        why.contains(&b.sid.to_string()) && why.contains("retired"),
        "{why}"
    );

    // The other pair carries on; status leaves acme out, the audit log keeps it.
    let mut conn = other.control(&dc, Generation(1), Role::Primary).await;
    let s = state(
        &mut conn,
        Generation(1),
        other.report(Role::Primary, other.lan),
    )
    .await;
    assert_eq!(s.role, Role::Primary);
    let names: Vec<String> = dc
        .status()
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["beta"]);
    let retired: Vec<_> = dc
        .events()
        .into_iter()
        .filter(|e| e["kind"] == "retired")
        .collect();
    assert_eq!(retired.len(), 1, "{retired:?}");
    assert_eq!(retired[0]["pair"], "acme");
    assert_eq!(retired[0]["actor"], "noc");
    // Asked about by name, it says so (not a problem for monitoring), its events stay
    // readable, and its name is not given out again.
    let (ok, out, err) = dc.cli(&["status", "acme"]);
    assert!(ok && out.contains("pair acme was retired"), "{out}{err}");
    let (ok, out, err) = dc.cli(&["events", "--pair", "acme"]);
    assert!(
        ok && out.contains("retired") && out.contains("activated"),
        "{out}{err}"
    );
    let (ok, _, err) = dc.cli(&["provision-pair", "--name", "acme", "--fqdn", FQDN]);
    assert!(!ok && err.contains("was retired"), "{err}");
    let (ok, _, err) = dc.cli(&["promote", "acme", "--wait-s", "1"]);
    assert!(!ok && err.contains("was retired"), "{err}");
    // serve renews its alive file while it runs (status reads it) and removes it at a
    // clean stop.
    let alive = dc.path().join("serve.alive");
    let renewed = || std::fs::metadata(&alive).and_then(|m| m.modified()).ok();
    let first = renewed().expect("serve.alive while serve runs");
    let deadline = Instant::now() + WAIT;
    while renewed() == Some(first) {
        assert!(Instant::now() < deadline, "serve.alive not renewed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, out, _) = dc.cli(&["status"]);
    assert!(!out.contains("serve: NOT"), "{out}");
    dc.stop();
    assert!(!alive.exists(), "serve.alive left after a clean stop");
    let (_, out, _) = dc.cli(&["status"]);
    assert!(out.starts_with("serve: NOT RUNNING"), "{out}");
}

/// Chaos seed 2808 run 83: the backup decided the primary was gone and asked; meanwhile the
/// primary booted and reported. A promotion that rests on the primary's silence is refused
/// while the data center hears it; one that does not (P --force) goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_that_needs_the_primary_silent_is_refused_while_it_reports() {
    let (dc, a, b) = activated_pair().await;
    let mut ca = a.control(&dc, Generation(1), Role::Primary).await;
    state(&mut ca, Generation(1), a.report(Role::Primary, a.lan)).await;
    let mut cb = b.control(&dc, Generation(1), Role::Backup).await;
    state(&mut cb, Generation(1), b.report(Role::Backup, b.lan)).await;
    let quiet = |quiet_ms| Message::PromoteIfQuiet {
        advertised: b.lan,
        how: PromotionKind::Automatic,
        quiet_ms,
    };
    // Heard a moment ago: refused, with how long ago, and nothing changes.
    match control::call(&mut cb, Generation(1), quiet(5_000), WAIT).await {
        Err(CallError::Denied(Denial::PrimaryAlive {
            silent_ms,
            quiet_ms,
        })) => assert!(silent_ms < 5_000 && quiet_ms == 5_000, "{silent_ms}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // A box of 1.13 does not know that denial: it is told in words.
    let old = ProtocolVersion {
        major: 1,
        minor: 13,
    };
    let mut old_cb = b.control_as(&dc, Generation(1), Role::Backup, old).await;
    match control::call(&mut old_cb, Generation(1), quiet(5_000), WAIT).await {
        Err(CallError::Denied(Denial::NotAllowed(why))) => {
            assert!(why.contains("reported") && why.contains("alive"), "{why}");
        }
        other => panic!("expected a refusal in words, got {other:?}"),
    }
    drop(old_cb);
    let s = state(&mut ca, Generation(1), a.report(Role::Primary, a.lan)).await;
    assert_eq!((s.role, s.generation), (Role::Primary, Generation(1)));
    // Silent for longer than asked: granted.
    tokio::time::sleep(Duration::from_millis(600)).await;
    match control::call(&mut cb, Generation(1), quiet(500), WAIT).await {
        Ok((_, Message::Promoted(promotion))) => assert_eq!(promotion.generation, Generation(2)),
        other => panic!("expected the promotion, got {other:?}"),
    }
}
