//! This box's identity and mutual-TLS connections to its partner.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use lbs_protocol::handshake::HELLO_TIMEOUT;
use lbs_protocol::listen::{Serving, Unproven};
use lbs_protocol::tls::{self, AcceptPeers};
use lbs_protocol::{
    Connection, Envelope, Generation, Hello, Identity, Message, Meter, Metered, Negotiated,
    PROTOCOL_VERSION, PeerName, Refusal, Role, Sender, ServerId, SoftwareVersion, TrustRoot,
};
use tokio::io::BufReader;
use tokio::net::TcpStream;

/// How long a TCP connection to the partner may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a pull reads from the socket at a time. rustls asks for at most one TLS record (16 KiB)
/// per read: a 256 MiB file took 16,500 `recvfrom` calls, a quarter of the receiver's time.
const READ_BUFFER: usize = 256 << 10;

/// Sessions a sync port serves at once once the partner proved itself (its watch and a pull
/// need two; more are its retries).
const MAX_SESSIONS: usize = 16;
/// Connections still in TLS and the hello at once, and from one address: anything on the
/// office LAN can reach the port, and a flood from one machine must never take the
/// partner's place.
const UNPROVEN: usize = 32;
const UNPROVEN_PER_SOURCE: usize = 4;

/// The bounds of a port only the partner may use (the daemon's sync port, `lbs sync serve`):
/// a stranger holds at most a few places, each for at most the TLS and hello deadlines.
pub fn partner_port(what: &'static str, drain: Duration) -> Serving {
    Serving::new(what, MAX_SESSIONS + UNPROVEN, drain).with_unproven(Unproven::new(
        UNPROVEN,
        UNPROVEN_PER_SOURCE,
        tls::HANDSHAKE_TIMEOUT + HELLO_TIMEOUT,
    ))
}

/// Why a partner that got in (its certificate, its hello) is still not synced with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Inconsistent {
    /// What answered is not a box.
    #[error("the partner did not introduce itself as a box")]
    NotABox,
    /// The backup pulls only from a primary.
    #[error("the partner says it is {theirs}, not primary: there is nothing to pull from it")]
    NotPrimary { theirs: Role },
    /// The primary serves only a backup.
    #[error(
        "the partner says it is {theirs}, not backup: this primary serves only its backup (two primaries are settled by the data center, not by a copy)"
    )]
    NotBackup { theirs: Role },
    /// Sync never flows from a lower generation (DESIGN §9).
    #[error(
        "the partner is primary at {theirs}, older than this box's {ours}: a replaced primary that has not yet learned it; sync never flows from a lower generation"
    )]
    StalePrimary {
        ours: Generation,
        theirs: Generation,
    },
    /// The backup knows a newer generation than this primary: this primary was replaced.
    #[error(
        "the partner announces {theirs}, newer than this box's {ours}: this box is no longer the primary; it serves nothing until the data center confirms its role"
    )]
    Replaced {
        ours: Generation,
        theirs: Generation,
    },
}

/// Whether this box, as `role` at generation `ours`, syncs with the partner that said
/// `theirs` in its hello: data flows from the primary to the backup, and never from a lower
/// generation.
pub fn consistent(role: Role, ours: Generation, theirs: &Negotiated) -> Result<(), Inconsistent> {
    let Sender::Box {
        role: their_role, ..
    } = theirs.peer.sender
    else {
        return Err(Inconsistent::NotABox);
    };
    let their_gen = theirs.peer_generation;
    match role {
        Role::Backup if their_role != Role::Primary => {
            Err(Inconsistent::NotPrimary { theirs: their_role })
        }
        Role::Backup if their_gen < ours => Err(Inconsistent::StalePrimary {
            ours,
            theirs: their_gen,
        }),
        Role::Primary if their_role != Role::Backup => {
            Err(Inconsistent::NotBackup { theirs: their_role })
        }
        Role::Primary if their_gen > ours => Err(Inconsistent::Replaced {
            ours,
            theirs: their_gen,
        }),
        _ => Ok(()),
    }
}

/// Who this box is and whom it talks to, from the command line.
#[derive(clap::Args, Clone, Debug)]
pub struct PeerArgs {
    /// This box's identity: PATH.pem (certificate) and PATH.key (private key).
    #[arg(long, value_name = "PATH", default_value = "/var/lib/lbs/identity")]
    pub identity: PathBuf,
    /// The data-center CA certificate.
    #[arg(long, value_name = "FILE", default_value = "/var/lib/lbs/ca.pem")]
    pub ca: PathBuf,
    /// The partner's server ID; no other box is accepted.
    #[arg(long, value_name = "SID")]
    pub partner: ServerId,
    /// The pair's generation as this box knows it.
    #[arg(long, default_value_t = 1)]
    pub generation: u64,
    /// Accept the partner only with this key (its fingerprint, as `lbs-datacenter status
    /// --json` or the agent's `box.json` shows it).
    #[arg(long, value_name = "FINGERPRINT")]
    pub partner_key: Option<String>,
}

/// A loaded identity, ready to connect or accept.
#[derive(Debug)]
pub struct Peer {
    /// This box's SID.
    pub sid: ServerId,
    /// The partner.
    pub partner: PeerName,
    identity: Identity,
    root: TrustRoot,
    /// The generation this box announces.
    pub generation: Generation,
    /// The fingerprint the partner's key must have, when the data center said it.
    pub pin: Option<String>,
}

impl Peer {
    /// Loads the identity and CA named on the command line.
    pub fn load(args: &PeerArgs) -> anyhow::Result<Peer> {
        let identity = Identity::load(
            &args.identity.with_extension("pem"),
            &args.identity.with_extension("key"),
        )
        .context("loading this box's identity (run `lbs activate` first)")?;
        let root = TrustRoot::load(&args.ca).context("loading the data-center CA")?;
        let PeerName::Box(sid) = identity.name().clone() else {
            bail!("{} is not a box's identity", args.identity.display());
        };
        Ok(Peer {
            sid,
            partner: PeerName::Box(args.partner),
            identity,
            root,
            generation: Generation(args.generation),
            pin: args.partner_key.clone(),
        })
    }

    /// An activated box's identity from its state directory, talking to `partner`.
    pub fn from_state(
        paths: &crate::activate::StatePaths,
        partner: ServerId,
        generation: Generation,
    ) -> anyhow::Result<Peer> {
        let identity = Identity::load(&paths.cert(), &paths.key())
            .context("loading this box's identity (run `lbs activate` first)")?;
        let root = paths.trust_root()?;
        let PeerName::Box(sid) = identity.name().clone() else {
            bail!("{} is not a box's identity", paths.cert().display());
        };
        Ok(Peer {
            sid,
            partner: PeerName::Box(partner),
            identity,
            root,
            generation,
            pin: None,
        })
    }

    /// Accepts from the partner only the key `key` names (when it is this partner's).
    pub fn pinned(mut self, key: Option<&crate::activate::PartnerKey>) -> Self {
        self.pin = key
            .filter(|k| PeerName::Box(k.sid) == self.partner)
            .map(|k| k.fingerprint.clone());
        self
    }

    /// Refuses a partner whose certificate does not carry the pinned key.
    fn check_pin(&self, chain: Option<&[tls::CertificateDer<'_>]>) -> anyhow::Result<()> {
        let Some(want) = &self.pin else {
            return Ok(());
        };
        let got = chain
            .and_then(|chain| chain.first())
            .map(tls::key_fingerprint)
            .transpose()?;
        if got.as_deref() != Some(want.as_str()) {
            bail!(
                "{} presented key {}, but the data center certified {want} at its latest activation: an old certificate of a box activated again no longer gets in",
                self.partner,
                got.as_deref().unwrap_or("none")
            );
        }
        Ok(())
    }

    fn hello(&self, role: Role) -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            software: SoftwareVersion::current(),
            sender: Sender::Box {
                sid: self.sid,
                role,
            },
        }
    }

    /// Dials the partner and completes mutual TLS and the hello exchange. The [`Meter`] counts
    /// every byte of the TCP stream, TLS included.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        role: Role,
    ) -> anyhow::Result<(
        Connection<tls::ClientStream<Metered<BufReader<TcpStream>>>>,
        Negotiated,
        Meter,
    )> {
        let config = tls::client_config(&self.identity, &self.root)?;
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .with_context(|| {
                format!(
                    "{} at {addr} did not answer within {CONNECT_TIMEOUT:?}",
                    self.partner
                )
            })?
            .with_context(|| format!("cannot reach {} at {addr}", self.partner))?;
        lbs_host::tcp::watch_peer(&tcp).context("setting up the connection to the partner")?;
        let (tcp, meter) = Metered::new(BufReader::with_capacity(READ_BUFFER, tcp));
        let stream = tls::connect(config, &self.partner, tcp).await?;
        self.check_pin(stream.get_ref().1.peer_certificates())
            .with_context(|| format!("not syncing with {} at {addr}", self.partner))?;
        let (conn, negotiated) = lbs_protocol::exchange_hello(
            stream,
            &self.partner,
            self.hello(role),
            self.generation,
            HELLO_TIMEOUT,
        )
        .await?;
        consistent(role, self.generation, &negotiated)
            .with_context(|| format!("not syncing with {} at {addr}", self.partner))?;
        Ok((conn, negotiated, meter))
    }

    /// The server configuration that accepts only the partner.
    pub fn server_config(&self) -> anyhow::Result<Arc<tls::ServerConfig>> {
        Ok(tls::server_config(
            &self.identity,
            &self.root,
            AcceptPeers::Only(self.partner.clone()),
        )?)
    }

    /// Completes mutual TLS and the hello exchange on an accepted connection.
    pub async fn accept(
        &self,
        config: Arc<tls::ServerConfig>,
        tcp: TcpStream,
        role: Role,
    ) -> anyhow::Result<(Connection<tls::ServerStream<TcpStream>>, Negotiated)> {
        lbs_host::tcp::watch_peer(&tcp).context("setting up a connection to the sync port")?;
        let (stream, peer) = tls::accept(config, tcp).await?;
        self.check_pin(stream.get_ref().1.peer_certificates())
            .with_context(|| format!("not serving {peer}"))?;
        let (mut conn, negotiated) = lbs_protocol::exchange_hello(
            stream,
            &peer,
            self.hello(role),
            self.generation,
            HELLO_TIMEOUT,
        )
        .await?;
        if let Err(why) = consistent(role, self.generation, &negotiated) {
            // Said to the partner too, so its status shows why nothing comes.
            let refusal = Envelope {
                generation: self.generation,
                message: Message::Refused(Refusal::ProtocolViolation {
                    detail: why.to_string(),
                }),
            };
            let _ = tokio::time::timeout(
                HELLO_TIMEOUT,
                futures_util::SinkExt::send(&mut conn, refusal),
            )
            .await;
            return Err(anyhow::Error::new(why).context(format!("not serving {peer}")));
        }
        Ok((conn, negotiated))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn said(role: Role, generation: u64) -> Negotiated {
        Negotiated {
            version: PROTOCOL_VERSION,
            peer: Hello {
                protocol: PROTOCOL_VERSION,
                software: SoftwareVersion::current(),
                sender: Sender::Box {
                    sid: "00-1A-2B-3C-4D-5E".parse().expect("a SID"),
                    role,
                },
            },
            peer_generation: Generation(generation),
        }
    }

    #[test]
    fn sync_flows_from_the_primary_and_never_from_a_lower_generation() {
        let (p, b) = (Role::Primary, Role::Backup);
        // The pair as it should be, and a backup that has not yet heard of a promotion.
        assert_eq!(consistent(b, Generation(3), &said(p, 3)), Ok(()));
        assert_eq!(consistent(b, Generation(2), &said(p, 3)), Ok(()));
        assert_eq!(consistent(p, Generation(3), &said(b, 3)), Ok(()));
        assert_eq!(consistent(p, Generation(3), &said(b, 2)), Ok(()));
        // A replaced primary still serving: its backup knows the newer generation.
        assert_eq!(
            consistent(b, Generation(4), &said(p, 3)),
            Err(Inconsistent::StalePrimary {
                ours: Generation(4),
                theirs: Generation(3)
            })
        );
        assert_eq!(
            consistent(p, Generation(3), &said(b, 4)),
            Err(Inconsistent::Replaced {
                ours: Generation(3),
                theirs: Generation(4)
            })
        );
        // Two primaries, or a fenced box: no copy either way.
        assert_eq!(
            consistent(p, Generation(4), &said(p, 3)),
            Err(Inconsistent::NotBackup { theirs: p })
        );
        assert_eq!(
            consistent(b, Generation(4), &said(Role::Fenced, 4)),
            Err(Inconsistent::NotPrimary {
                theirs: Role::Fenced
            })
        );
        let mut dc = said(p, 4);
        dc.peer.sender = Sender::DataCenter { site: "dc1".into() };
        assert_eq!(
            consistent(b, Generation(4), &dc),
            Err(Inconsistent::NotABox)
        );
        // What the operator reads.
        let stale = consistent(b, Generation(4), &said(p, 3))
            .unwrap_err()
            .to_string();
        assert!(
            stale.contains("never flows from a lower generation"),
            "{stale}"
        );
    }
}
