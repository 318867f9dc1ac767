//! The data center's WireGuard endpoints in network namespaces: `serve` runs in `dc` with an
//! endpoint (userspace WireGuard), a box in `box` activates over the LAN, brings its tunnel
//! up with what the grant says, and reaches the control API through the tunnel — the
//! endpoint learned the box's key at activation, nobody configured it. Root only.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use lbs_protocol::control::{self, ActivationRequest, BoxReport, SyncSummary};
use lbs_protocol::handshake::HELLO_TIMEOUT;
use lbs_protocol::net::Ipv4Cidr;
use lbs_protocol::tls::{self, PendingIdentity};
use lbs_protocol::{
    Generation, Hello, Message, PROTOCOL_VERSION, PeerName, Role, Sender, SoftwareVersion,
    TrustRoot, exchange_hello,
};
use lbs_tests::netns::{Lab, in_netns};
use lbs_tests::{ok, require_root};
use lbs_vpn::{BackendChoice, EndpointSpec, FailoverConfig, Health, Key, Tunnels, TunnelsConfig};
use tokio::net::TcpStream;

const DC: &str = env!("CARGO_BIN_EXE_lbs-datacenter");
const WAIT: Duration = Duration::from_secs(20);

#[test]
fn an_activated_box_reaches_the_control_api_through_the_data_centers_endpoint() {
    if !require_root(
        "an_activated_box_reaches_the_control_api_through_the_data_centers_endpoint",
        "network namespaces and a tun device",
    ) {
        return;
    }
    let mut lab = Lab::new();
    lab.add_lan().unwrap();
    lab.add_host("dc", "192.168.60.1/24").unwrap();
    lab.add_host("box", "192.168.60.2/24").unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dc");
    let cli = |args: &[&str]| {
        ok(Command::new(DC)
            .arg("--dir")
            .arg(&dir)
            .args(args)
            .output()
            .unwrap())
    };
    cli(&["init"]);
    let sheet = cli(&[
        "provision-pair",
        "--name",
        "solo",
        "--fqdn",
        "pbx.solo.example",
        "--single",
        "--json",
    ]);
    let (sid, key) = lbs_tests::provisioned(&sheet).remove(0);
    let endpoint_key = Key::generate_private();
    lbs_host::fs::write_file_atomic(
        &dir.join("dc1.key"),
        endpoint_key.to_base64().as_bytes(),
        0o600,
    )
    .unwrap();
    std::fs::write(
        dir.join("datacenter.toml"),
        "activation = [\"192.168.60.1:7440\"]\ncontrol = [\"0.0.0.0:7441\"]\n\
         [[endpoint]]\nname = \"dc1\"\ninterface = \"lbs-dc1\"\npublic = \"192.168.60.1:51820\"\n\
         address = \"10.77.255.1/16\"\nprivate_key_file = \"dc1.key\"\nbackend = \"userspace\"\n",
    )
    .unwrap();
    let mut serve = lab.command("dc", DC);
    serve.arg("--dir").arg(&dir).arg("serve");
    let (serve_pid, ready) = lab.spawn_until(serve, "ready:", WAIT).unwrap();
    assert!(ready.contains("192.168.60.1:7440"), "{ready}");

    let root = TrustRoot::load(&dir.join("ca.pem")).unwrap();
    let box_ns = lab.ns("box");
    let outcome = in_netns(&box_ns, move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let wireguard = Key::generate_private();
            let pending = PendingIdentity::generate(PeerName::Box(sid)).unwrap();
            let request = ActivationRequest {
                protocol: PROTOCOL_VERSION,
                software: SoftwareVersion::current(),
                sid,
                key,
                csr: pending.request().to_vec(),
                wireguard_key: wireguard.get_public().to_base64(),
                lan_address: Ipv4Addr::new(192, 168, 60, 2),
                inventory: serde_json::from_str(
                    r#"{"cpu_model":"x","cpus":1,"memory_bytes":1,"disks":[],"nics":[],"telephony":[]}"#,
                )
                .unwrap(),
            };
            let tcp = TcpStream::connect("192.168.60.1:7440").await.unwrap();
            let stream = tls::connect(
                tls::activation_client_config(&root).unwrap(),
                &PeerName::DataCenter,
                tcp,
            )
            .await
            .unwrap();
            let grant = control::activate_with(stream, Message::Activate(request), WAIT).await.unwrap();
            assert_eq!(grant.role, Role::Primary);
            let [endpoint] = grant.endpoints.as_slice() else {
                panic!("expected one endpoint: {:?}", grant.endpoints)
            };
            assert_eq!(endpoint.public_key, endpoint_key.get_public().to_base64());
            assert_eq!(endpoint.endpoint, "192.168.60.1:51820".parse().unwrap());
            let identity = pending.complete(grant.certificate, grant.chain, &root).unwrap();

            // The tunnel, exactly as the grant describes it.
            let tunnels = Tunnels::start(TunnelsConfig {
                private_key: wireguard,
                address: grant.overlay,
                interface_prefix: "lbs-t".into(),
                backend: BackendChoice::Userspace,
                failover: FailoverConfig::default(),
                keepalive: Some(5),
                heartbeat_port: lbs_vpn::heartbeat::HEARTBEAT_PORT,
                endpoints: vec![EndpointSpec {
                    name: endpoint.name.clone(),
                    public_key: Key::from_base64(&endpoint.public_key).unwrap(),
                    endpoint: endpoint.endpoint,
                    address: endpoint.overlay,
                    prefix: Ipv4Cidr {
                        addr: grant.overlay,
                        prefix: grant.overlay_prefix,
                    },
                }],
            })
            .await
            .unwrap();
            let deadline = Instant::now() + WAIT;
            while tunnels.status().tunnels[0].health != Health::Up {
                assert!(
                    Instant::now() < deadline,
                    "the endpoint never answered: {:?}",
                    tunnels.status()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let up_after = deadline - WAIT;

            // The control API over the overlay, at the endpoint's overlay address.
            let config = tls::client_config(&identity, &root).unwrap();
            let tcp = TcpStream::connect(SocketAddr::from((endpoint.overlay, 7441)))
                .await
                .unwrap();
            let stream = tls::connect(config, &PeerName::DataCenter, tcp).await.unwrap();
            let hello = Hello {
                protocol: PROTOCOL_VERSION,
                software: SoftwareVersion::current(),
                sender: Sender::Box {
                    sid,
                    role: Role::Primary,
                },
            };
            let (mut conn, _) =
                exchange_hello(stream, &PeerName::DataCenter, hello, Generation(1), HELLO_TIMEOUT)
                    .await
                    .unwrap();
            let report = Message::Report(BoxReport {
                role: Role::Primary,
                software: SoftwareVersion::current(),
                advertised: Ipv4Addr::new(192, 168, 60, 2),
                sync: SyncSummary::default(),
                tunnels: Vec::new(),
            });
            let answer = control::call(&mut conn, Generation(1), report, WAIT)
                .await
                .unwrap();
            tunnels.shutdown().await.unwrap();
            (answer.1, up_after.elapsed())
        })
    })
    .unwrap();
    let Message::PairStateWithDns { state, dns } = outcome.0 else {
        panic!("expected a pair state with DNS, got {:?}", outcome.0)
    };
    assert!(dns.iter().any(|r| r.name == "pbx.solo.example"), "{dns:?}");
    assert_eq!(state.role, Role::Primary);
    eprintln!(
        "tunnel up and control answered {:?} after activation",
        outcome.1
    );

    // SIGTERM: serve stops cleanly and removes its endpoint's interface.
    let status = lab.stop(serve_pid, WAIT).unwrap();
    assert!(status.success(), "serve exited with {status}");
    let links = ok(lab.sh("dc", &["ip", "-o", "link"]).unwrap());
    assert!(!links.contains("lbs-dc1"), "lbs-dc1 left behind: {links}");
}
