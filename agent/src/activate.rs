//! `lbs activate`: the box's first conversation with the data center. It generates the box's
//! keys (TLS and WireGuard; neither private key leaves the box), sends the SID, the one-time
//! key, the signing request, the LAN address and the hardware inventory, and writes what
//! comes back under the state directory:
//!
//! | file | what |
//! | --- | --- |
//! | `identity.pem`, `identity.key` | the box's certificate (SAN = its SID) and key |
//! | `ca.pem` | the data center's CA: the only issuer trusted from now on |
//! | `vpn.key`, `vpn.toml` | the WireGuard key and the tunnels (the `lbs vpn run` format) |
//! | `box.json` | SID, pair, name, overlay address, partner, control addresses ([`BoxInfo`]) |
//! | `role.json` | the role and generation ([`crate::role::RoleRecord`]) |

use std::io::{BufRead, IsTerminal, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use lbs_protocol::control::{self, ActivationGrant, ActivationRequest, CallError, PartnerInfo};
use lbs_protocol::tls::{self, PendingIdentity};
use lbs_protocol::{PROTOCOL_VERSION, PeerName, ServerId, SoftwareVersion, TrustRoot};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use crate::role::{Event, RoleMachine, RoleRecord, RoleState};

/// How long activation may take, connection included.
const ACTIVATION_TIMEOUT: Duration = Duration::from_secs(20);

/// The files of an activated box, under its state directory.
#[derive(Clone, Debug)]
pub struct StatePaths {
    /// The directory (`/var/lib/lbs`).
    pub dir: PathBuf,
}

impl StatePaths {
    /// The paths under `dir`.
    pub fn new(dir: &Path) -> StatePaths {
        StatePaths {
            dir: dir.to_owned(),
        }
    }
    /// The box's certificate.
    pub fn cert(&self) -> PathBuf {
        self.dir.join("identity.pem")
    }
    /// The box's TLS key.
    pub fn key(&self) -> PathBuf {
        self.dir.join("identity.key")
    }
    /// The TLS key of an activation not answered yet (kept for the next attempt).
    pub fn pending_key(&self) -> PathBuf {
        self.dir.join("activation-pending.key")
    }
    /// The data center's CA.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    /// The root's revocation list of sites' CAs, as the data center last gave it.
    pub fn crl(&self) -> PathBuf {
        self.dir.join("ca.crl")
    }
    /// The latest role steps, for the data center's portal.
    pub fn recent_steps(&self) -> PathBuf {
        self.dir.join("steps.json")
    }
    /// The root this box pins, less the sites' CAs its revocation list revokes. A list that
    /// cannot be used (damaged) is said and left out: the box must still reach its data
    /// center, which gives it the list again.
    pub fn trust_root(&self) -> anyhow::Result<TrustRoot> {
        let root = TrustRoot::load(&self.ca()).context("loading the data-center CA")?;
        let crl = match std::fs::read(self.crl()) {
            Ok(crl) => crl,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(root),
            Err(err) => {
                tracing::warn!(
                    "reading {}: {err}; no site is taken as revoked",
                    self.crl().display()
                );
                return Ok(root);
            }
        };
        match root.clone().revoking(&crl) {
            Ok(revoking) => Ok(revoking),
            Err(err) => {
                tracing::warn!(
                    "{}: {err}; no site is taken as revoked",
                    self.crl().display()
                );
                Ok(root)
            }
        }
    }
    /// The WireGuard private key.
    pub fn vpn_key(&self) -> PathBuf {
        self.dir.join("vpn.key")
    }
    /// The tunnels' configuration.
    pub fn vpn_config(&self) -> PathBuf {
        self.dir.join("vpn.toml")
    }
    /// What activation said about the box and its pair.
    pub fn info(&self) -> PathBuf {
        self.dir.join("box.json")
    }
    /// The role record.
    pub fn role(&self) -> PathBuf {
        self.dir.join("role.json")
    }
    /// Left by `lbs net boot-check` when it booted a primary with its own address (another
    /// machine answered for the shared one); the agent takes it up at its start.
    pub fn boot_changed(&self) -> PathBuf {
        self.dir.join("boot-check-changed")
    }
}

/// What activation told the box about itself and its pair (kept current by the daemon).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoxInfo {
    /// This box.
    pub sid: ServerId,
    /// The pair's name.
    pub pair: String,
    /// The name phones use.
    pub fqdn: String,
    /// This box's LAN address.
    pub lan: Ipv4Addr,
    /// This box's overlay address.
    pub overlay: Ipv4Addr,
    /// The overlay's prefix length.
    pub overlay_prefix: u8,
    /// The partner, as last heard of.
    pub partner: Option<PartnerInfo>,
    /// The data center's control API.
    pub control: Vec<SocketAddr>,
    /// Where this box activated (for re-activation).
    pub activated_at: SocketAddr,
    /// How this box's hardware differs from the partner's, as the data center compared
    /// them (`None`: not compared yet).
    #[serde(default)]
    pub hardware_differences: Option<Vec<String>>,
    /// The partner's hardware address on the office LAN, as last seen answering for its own
    /// address: who may take the shared address from this box (see the address guard).
    #[serde(default)]
    pub partner_mac: Option<lbs_netconfig::MacAddr>,
    /// The partner's TLS key as the data center last certified it: the only one accepted
    /// from the partner (a box activated again has a new key; its old certificate must no
    /// longer reach this box's files). `None` until a data center of protocol 1.5 said it.
    #[serde(default)]
    pub partner_key: Option<PartnerKey>,
}

/// Which key the partner's certificate must carry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartnerKey {
    /// The partner it is for.
    pub sid: ServerId,
    /// `tls::key_fingerprint` of its certificate.
    pub fingerprint: String,
}

impl BoxInfo {
    /// Reads `box.json`.
    pub fn load(paths: &StatePaths) -> anyhow::Result<BoxInfo> {
        let path = paths.info();
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{} (run `lbs activate` first)", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is damaged", path.display()))
    }

    /// Writes `box.json` atomically.
    pub fn save(&self, paths: &StatePaths) -> anyhow::Result<()> {
        let path = paths.info();
        lbs_host::write_file_atomic(&path, &serde_json::to_vec_pretty(self)?, 0o644)
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// Options of `lbs activate`; what is missing is asked for on a terminal.
#[derive(clap::Args, Debug)]
pub struct ActivateCmd {
    /// The server ID on the provisioning sheet (`00-1A-2B-3C-4D-5E`).
    #[arg(long)]
    pub sid: Option<ServerId>,
    /// The one-time activation key on the sheet. Other local users see command lines: prefer
    /// --key-file, or leave both out to be asked for it.
    #[arg(long, conflicts_with = "key_file")]
    pub key: Option<String>,
    /// A file holding the activation key (`-`: standard input).
    #[arg(long, value_name = "PATH")]
    pub key_file: Option<PathBuf>,
    /// The data center's activation address (`dc.example.net:7440`). Default: the one
    /// shipped with the box in `datacenter-address` beside the CA certificate, if any.
    #[arg(long)]
    pub datacenter: Option<String>,
    /// The data center's CA certificate shipped with the box (pinned: no other server is
    /// believed).
    #[arg(long, default_value = "/etc/lbs/datacenter-ca.pem")]
    pub ca: PathBuf,
    /// This box's LAN address (default: the address it reaches the data center from).
    #[arg(long)]
    pub lan: Option<Ipv4Addr>,
    /// Where lbs keeps its state.
    #[arg(long, default_value = "/var/lib/lbs")]
    pub state: PathBuf,
    /// Activate again (a reinstalled box or a new key): keeps the role the data center
    /// records.
    #[arg(long)]
    pub again: bool,
}

/// The file an image build writes beside the data center's CA: its activation address.
pub const SHIPPED_ADDRESS: &str = "datacenter-address";

/// The activation address shipped with the box (`datacenter-address` beside `ca`: its
/// first line that is not blank or a `#` comment), if there is that file.
fn shipped_address(ca: &Path) -> anyhow::Result<Option<String>> {
    let path = ca.with_file_name(SHIPPED_ADDRESS);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
    };
    let address = text
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_owned);
    if address.is_none() {
        bail!(
            "{} names no address: write the data center's `host:port` in it, or give \
             --datacenter",
            path.display()
        );
    }
    Ok(address)
}

fn ask(what: &str) -> anyhow::Result<String> {
    if !std::io::stdin().is_terminal() {
        bail!("{what} is missing: give it on the command line");
    }
    print!("{what}: ");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let line = line.trim().to_owned();
    if line.is_empty() {
        bail!("{what} is needed to activate");
    }
    Ok(line)
}

/// The activation key from `path` (`-`: standard input): its first line, trimmed.
fn read_key_file(path: &Path) -> anyhow::Result<String> {
    // A key is a few dozen characters; a larger input is a mistake (the wrong file).
    const MAX: u64 = 4096;
    let mut text = String::new();
    if path == Path::new("-") {
        std::io::stdin().take(MAX).read_to_string(&mut text)
    } else {
        std::fs::File::open(path).and_then(|file| file.take(MAX).read_to_string(&mut text))
    }
    .with_context(|| format!("reading the activation key from {}", path.display()))?;
    let key = text.lines().next().unwrap_or("").trim();
    if key.is_empty() {
        bail!("{} holds no activation key", path.display());
    }
    Ok(key.to_owned())
}

/// Resolves `host:port` (a name or an address) to the first IPv4 address.
fn resolve(text: &str) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    let with_port = if text.contains(':') {
        text.to_owned()
    } else {
        format!("{text}:7440")
    };
    with_port
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve the data center {text:?}"))?
        .find(SocketAddr::is_ipv4)
        .with_context(|| format!("the data center {text:?} has no IPv4 address"))
}

/// The local address the kernel would use towards `to` (no packet is sent).
fn source_towards(to: SocketAddr) -> anyhow::Result<Ipv4Addr> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket
        .connect(to)
        .with_context(|| format!("no route to the data center at {to}"))?;
    match socket.local_addr()?.ip() {
        std::net::IpAddr::V4(ip) => Ok(ip),
        other => bail!("the route to the data center uses {other}, not IPv4"),
    }
}

/// The tunnels' configuration for `lbs vpn run` and the daemon.
fn vpn_toml(paths: &StatePaths, grant: &ActivationGrant) -> String {
    let mut toml = format!(
        "# Written by `lbs activate` from the data center's answer.\nprivate_key_file = \"{}\"\naddress = \"{}\"\n",
        paths.vpn_key().display(),
        grant.overlay
    );
    let network = u32::from(grant.overlay)
        & (u32::MAX << (32 - u32::from(grant.overlay_prefix.clamp(1, 32))));
    for endpoint in &grant.endpoints {
        toml += &format!(
            "\n[[endpoint]]\nname = \"{}\"\npublic_key = \"{}\"\nendpoint = \"{}\"\naddress = \"{}\"\nprefix = \"{}/{}\"\n",
            endpoint.name,
            endpoint.public_key,
            endpoint.endpoint,
            endpoint.overlay,
            Ipv4Addr::from(network),
            grant.overlay_prefix
        );
    }
    toml
}

/// `lbs activate`.
pub async fn activate(cmd: ActivateCmd) -> anyhow::Result<ExitCode> {
    let paths = StatePaths::new(&cmd.state);
    let record = RoleRecord::load(&paths.role())?;
    if record.state != RoleState::Unactivated && !cmd.again {
        bail!(
            "this box is activated already ({}, {}); to activate it again with a fresh key, add --again",
            record.state,
            record.generation
        );
    }
    let root = TrustRoot::load(&cmd.ca).with_context(|| {
        format!(
            "the data center's CA {} (shipped with the box, or from your provider)",
            cmd.ca.display()
        )
    })?;
    let sid = match cmd.sid {
        Some(sid) => sid,
        None => ask("Server ID (SID)")?
            .parse()
            .context("that is not a SID like 00-1A-2B-3C-4D-5E")?,
    };
    let key = match (cmd.key, &cmd.key_file) {
        (Some(key), _) => key,
        (None, Some(path)) => read_key_file(path)?,
        (None, None) => ask("Activation key")?,
    };
    let datacenter = match cmd.datacenter {
        Some(dc) => dc,
        None => match shipped_address(&cmd.ca)? {
            Some(dc) => dc,
            None => ask("Data center address")?,
        },
    };
    let address = resolve(&datacenter)?;
    let lan = match cmd.lan {
        Some(lan) => lan,
        None => source_towards(address)?,
    };
    let inventory =
        <lbs_netconfig::inventory::Inventory as lbs_netconfig::inventory::Collect>::collect()
            .context("reading this box's hardware inventory")?;

    std::fs::create_dir_all(&paths.dir)
        .with_context(|| format!("creating {}", paths.dir.display()))?;
    // The WireGuard key is kept if it exists (a repeated activation must send the same one);
    // a new one is written only once the data center granted the activation, so a failed
    // attempt leaves nothing behind.
    let (wireguard, new_key) = if paths.vpn_key().exists() {
        (
            lbs_vpn::config::read_private_key(Path::new("."), &paths.vpn_key())?,
            false,
        )
    } else {
        (lbs_vpn::Key::generate_private(), true)
    };
    // The TLS key, like the WireGuard key, is kept until the activation is answered: if the
    // answer was lost (the data center restarted while granting it), the next attempt sends
    // the same keys and gets the same answer instead of "activated already".
    let pending = match std::fs::read_to_string(paths.pending_key()) {
        Ok(pem) => PendingIdentity::from_key_pem(PeerName::Box(sid), &pem)
            .with_context(|| format!("reading {}", paths.pending_key().display()))?,
        Err(_) => {
            let pending = PendingIdentity::generate(PeerName::Box(sid))?;
            lbs_host::write_file_atomic(&paths.pending_key(), pending.key_pem().as_bytes(), 0o600)
                .with_context(|| format!("writing {}", paths.pending_key().display()))?;
            pending
        }
    };
    let request = ActivationRequest {
        protocol: PROTOCOL_VERSION,
        software: SoftwareVersion::current(),
        sid,
        key,
        csr: pending.request().to_vec(),
        wireguard_key: wireguard.get_public().to_base64(),
        lan_address: lan,
        inventory,
    };
    println!("activating {sid} at {address} (LAN address {lan}) …");
    let grant = tokio::time::timeout(ACTIVATION_TIMEOUT, async {
        let config = tls::activation_client_config(&root)?;
        let connect = || async {
            let tcp = TcpStream::connect(address)
                .await
                .with_context(|| format!("cannot reach the data center at {address}"))?;
            anyhow::Ok(tls::connect(config.clone(), &PeerName::DataCenter, tcp).await?)
        };
        match control::activate(connect, request, ACTIVATION_TIMEOUT).await? {
            Ok(grant) => Ok(grant),
            Err(CallError::Denied(denial)) => bail!("the data center refused: {denial}"),
            Err(err) => Err(err.into()),
        }
    })
    .await
    .with_context(|| {
        format!("the data center at {address} did not answer within {ACTIVATION_TIMEOUT:?}")
    })??;

    // The grant's CA must be the one we pinned: the answer came over a connection that
    // proved it, and a different one here would be a misconfigured data center.
    let granted_root = TrustRoot::from_pem(&grant.ca_pem)?;
    if granted_root != root {
        bail!(
            "the data center sent another CA than the one pinned in {}; refusing",
            cmd.ca.display()
        );
    }
    let identity = pending.complete(grant.certificate.clone(), grant.chain.clone(), &root)?;
    if new_key {
        lbs_host::write_file_atomic(
            &paths.vpn_key(),
            format!("{}\n", wireguard.to_base64()).as_bytes(),
            0o600,
        )
        .with_context(|| format!("writing {}", paths.vpn_key().display()))?;
    }
    identity.save(&paths.cert(), &paths.key())?;
    if let Err(err) = std::fs::remove_file(paths.pending_key()) {
        tracing::warn!("removing {}: {err}", paths.pending_key().display());
    }
    root.save(&paths.ca())?;
    lbs_host::write_file_atomic(
        &paths.vpn_config(),
        vpn_toml(&paths, &grant).as_bytes(),
        0o644,
    )
    .with_context(|| format!("writing {}", paths.vpn_config().display()))?;
    let info = BoxInfo {
        sid,
        pair: grant.pair.clone(),
        fqdn: grant.fqdn.clone(),
        lan,
        overlay: grant.overlay,
        overlay_prefix: grant.overlay_prefix,
        partner: grant.partner.clone(),
        control: grant.control.clone(),
        activated_at: address,
        hardware_differences: None,
        partner_mac: None,
        partner_key: None,
    };
    info.save(&paths)?;
    let mut machine = RoleMachine::new(if cmd.again { RoleRecord::new() } else { record });
    let now = lbs_vpn::tunnels::unix_ms();
    machine
        .handle(
            Event::Activated {
                role: grant.role,
                generation: grant.generation,
            },
            now,
        )
        .map_err(|refused| anyhow::anyhow!("{refused}"))?;
    machine.record.save(&paths.role())?;

    let partner = match &grant.partner {
        None => "no partner yet (add one with `lbs-datacenter provision-backup`)".to_owned(),
        Some(p) => match p.overlay {
            Some(overlay) => format!("partner {} ({}, overlay {overlay})", p.sid, p.role),
            None => format!("partner {} (not activated yet)", p.sid),
        },
    };
    println!(
        "this box {sid} is the {} of pair {} ({}), {}; overlay address {}; {partner}",
        machine.record.state, grant.pair, grant.fqdn, grant.generation, grant.overlay
    );
    println!(
        "{} tunnel endpoint(s), control API at {}",
        grant.endpoints.len(),
        grant
            .control
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    match machine.record.state {
        RoleState::Primary => println!(
            "next: the agent (`lbs agent`, the lbs-agent service) takes it from here, within a second if it is running: it serves this box's data to the backup"
        ),
        _ => println!(
            "next: the agent (`lbs agent`, the lbs-agent service) takes it from here, within a second if it is running: its first full sync from the primary starts at once"
        ),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::{SHIPPED_ADDRESS, shipped_address};

    #[test]
    fn the_shipped_address_beside_the_ca_is_the_default() {
        let dir = std::env::temp_dir().join(format!("lbs-shipped-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("datacenter-ca.pem");
        assert_eq!(shipped_address(&ca).unwrap(), None);
        std::fs::write(
            dir.join(SHIPPED_ADDRESS),
            "# written by cargo xtask image\n\n  dc.example.net:7440  \n",
        )
        .unwrap();
        assert_eq!(
            shipped_address(&ca).unwrap().as_deref(),
            Some("dc.example.net:7440")
        );
        std::fs::write(dir.join(SHIPPED_ADDRESS), "# nothing\n").unwrap();
        let err = shipped_address(&ca).unwrap_err().to_string();
        assert!(err.contains("names no address"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
