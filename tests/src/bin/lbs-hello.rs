//! `lbs-hello`: two lbs peers completing a mutual-TLS `Hello` exchange over TCP.
//!
//! ```text
//! lbs-hello issue --dir DIR --box primary=00-1A-2B-3C-4D-5E --box backup=00-1A-2B-3C-4D-5F
//! lbs-hello serve --identity DIR/primary --ca DIR/ca.pem --partner 00-1A-2B-3C-4D-5F --listen 127.0.0.1:0
//! lbs-hello dial  --identity DIR/backup  --ca DIR/ca.pem --partner 00-1A-2B-3C-4D-5E --connect 127.0.0.1:PORT
//! lbs-hello flood --connect ADDR --count 1000 --hold-s 30
//! ```
//!
//! `serve` prints `listening on ADDR` first, answers heartbeats from its partner only, and
//! stops cleanly on SIGTERM or Ctrl-C. `dial` prints both identities and heartbeat round
//! trips, and exits non-zero with the reason when it is refused. `flood` plays a hostile
//! machine: `count` connections that never start TLS (with `--slow`: start it and stall),
//! held for `hold-s`; it prints `flooding: N open`, and at the end how many the server closed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use lbs_protocol::handshake::HELLO_TIMEOUT;
use lbs_protocol::listen::{Admission, Serving, Unproven, serve_until};
use lbs_protocol::tls::{self, AcceptPeers};
use lbs_protocol::{
    CertificateAuthority, Connection, Envelope, Generation, Hello, Identity, Message,
    PROTOCOL_VERSION, PeerName, Role, Sender, ServerId, SoftwareVersion, TrustRoot,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(version, about = "Two lbs peers completing a mutual-TLS hello")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Me {
    /// This box's identity: PATH.pem (certificate) and PATH.key (private key).
    #[arg(long, value_name = "PATH")]
    identity: PathBuf,
    /// The data-center CA certificate to trust.
    #[arg(long, value_name = "FILE")]
    ca: PathBuf,
    /// The partner's server ID; nobody else is accepted.
    #[arg(long, value_name = "SID")]
    partner: ServerId,
    /// This box's role, as announced in its hello.
    #[arg(long, default_value = "primary", value_parser = parse_role)]
    role: Role,
    /// The pair's generation as this box knows it.
    #[arg(long, default_value_t = 1)]
    generation: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Create a CA (DIR/ca.pem, DIR/ca.key) and an identity DIR/LABEL.{pem,key} per box.
    Issue {
        /// Where to write the files.
        #[arg(long)]
        dir: PathBuf,
        /// A box to issue an identity for, as LABEL=SID.
        #[arg(long = "box", value_name = "LABEL=SID", required = true)]
        boxes: Vec<String>,
    },
    /// Accept the partner's connections and answer its heartbeats until stopped.
    Serve {
        #[command(flatten)]
        me: Me,
        /// Address to listen on (port 0 picks a free one).
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Connect to the partner, exchange hellos and heartbeats, say goodbye.
    Dial {
        #[command(flatten)]
        me: Me,
        /// The partner's address.
        #[arg(long)]
        connect: SocketAddr,
        /// How many heartbeats to time.
        #[arg(long, default_value_t = 3)]
        heartbeats: u64,
    },
    /// Open connections that never finish a handshake and hold them.
    Flood {
        /// Where to.
        #[arg(long)]
        connect: SocketAddr,
        /// How many.
        #[arg(long, default_value_t = 1000)]
        count: usize,
        /// How long to hold them, in seconds.
        #[arg(long, default_value_t = 30)]
        hold_s: u64,
        /// Send the first bytes of a TLS record, then nothing.
        #[arg(long)]
        slow: bool,
    },
}

fn parse_role(text: &str) -> Result<Role, String> {
    match text {
        "primary" => Ok(Role::Primary),
        "backup" => Ok(Role::Backup),
        "fenced" => Ok(Role::Fenced),
        "unactivated" => Ok(Role::Unactivated),
        other => Err(format!(
            "unknown role {other:?}: use primary, backup, fenced or unactivated"
        )),
    }
}

/// How long an established connection may stay silent before we give up on it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `serve` lets connections say goodbye when asked to stop.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("lbs-hello: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Issue { dir, boxes } => issue(&dir, &boxes),
            Command::Serve { me, listen } => serve(me, listen).await,
            Command::Dial {
                me,
                connect,
                heartbeats,
            } => dial(me, connect, heartbeats).await,
            Command::Flood {
                connect,
                count,
                hold_s,
                slow,
            } => flood(connect, count, Duration::from_secs(hold_s), slow).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("lbs-hello: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn flood(to: SocketAddr, count: usize, hold: Duration, slow: bool) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut held = Vec::with_capacity(count);
    let mut refused = 0usize;
    for _ in 0..count {
        match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(to)).await {
            Ok(Ok(mut stream)) => {
                if slow {
                    let _ = stream.write_all(&[0x16, 0x03]).await;
                }
                held.push(stream);
            }
            _ => refused += 1,
        }
    }
    println!("flooding: {} open, {refused} not accepted", held.len());
    tokio::time::sleep(hold).await;
    let mut closed = 0usize;
    for stream in &mut held {
        let mut byte = [0u8; 1];
        if matches!(
            tokio::time::timeout(Duration::from_millis(5), stream.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        ) {
            closed += 1;
        }
    }
    println!("flood over: the server closed {closed} of {}", held.len());
    Ok(())
}

fn issue(dir: &Path, boxes: &[String]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca = CertificateAuthority::generate("lbs demo CA")?;
    ca.save(&dir.join("ca.pem"), &dir.join("ca.key"))?;
    println!("CA        {}", dir.join("ca.pem").display());
    for spec in boxes {
        let (label, sid) = spec
            .split_once('=')
            .with_context(|| format!("--box {spec:?}: expected LABEL=SID"))?;
        let sid: ServerId = sid.parse().with_context(|| format!("--box {spec:?}"))?;
        let identity = ca.issue_identity(&PeerName::Box(sid))?;
        let base = dir.join(label);
        identity.save(&base.with_extension("pem"), &base.with_extension("key"))?;
        println!("{label:<9} {sid}  {}", base.with_extension("pem").display());
    }
    Ok(())
}

struct Loaded {
    identity: Identity,
    root: TrustRoot,
    sid: ServerId,
    partner: PeerName,
    hello: Hello,
    role: Role,
    generation: Generation,
}

fn load(me: Me) -> anyhow::Result<Loaded> {
    let identity = Identity::load(
        &me.identity.with_extension("pem"),
        &me.identity.with_extension("key"),
    )
    .context("loading this box's identity")?;
    let root = TrustRoot::load(&me.ca).context("loading the CA certificate")?;
    let PeerName::Box(sid) = identity.name().clone() else {
        bail!(
            "{} is a data-center identity, not a box's",
            me.identity.display()
        );
    };
    Ok(Loaded {
        hello: Hello {
            protocol: PROTOCOL_VERSION,
            software: SoftwareVersion::current(),
            sender: Sender::Box { sid, role: me.role },
        },
        identity,
        root,
        sid,
        partner: PeerName::Box(me.partner),
        role: me.role,
        generation: Generation(me.generation),
    })
}

fn describe(hello: &Hello, generation: Generation) -> String {
    format!(
        "{}, lbs {}, protocol {}, {generation}",
        hello.sender, hello.software, hello.protocol
    )
}

async fn serve(me: Me, listen: SocketAddr) -> anyhow::Result<()> {
    let me = load(me)?;
    let config = tls::server_config(
        &me.identity,
        &me.root,
        AcceptPeers::Only(me.partner.clone()),
    )?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    println!("listening on {addr}");
    println!(
        "this side: {}; accepting only {}",
        describe(&me.hello, me.generation),
        me.partner
    );

    let shutdown = CancellationToken::new();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    // Every connection is asked to say goodbye at shutdown, given a moment, then cut.
    let serving = Serving::new("lbs-hello", 64, DRAIN_TIMEOUT).with_unproven(Unproven::new(
        32,
        4,
        tls::HANDSHAKE_TIMEOUT + HELLO_TIMEOUT,
    ));
    let stop = shutdown.clone();
    let connections = serve_until(
        listener,
        shutdown.clone(),
        serving,
        move |tcp, remote, admission| {
            let config = config.clone();
            let hello = me.hello.clone();
            let (role, generation) = (me.role, me.generation);
            let stop = stop.clone();
            async move {
                if let Err(err) =
                    answer(config, tcp, admission, hello, role, generation, stop).await
                {
                    println!("refused {remote}: {err:#}");
                }
            }
        },
    );
    tokio::pin!(connections);
    let served = tokio::select! {
        served = &mut connections => served,
        _ = sigterm.recv() => {
            shutdown.cancel();
            connections.await
        }
        _ = tokio::signal::ctrl_c() => {
            shutdown.cancel();
            connections.await
        }
    };
    println!("stopped after {served} connection(s)");
    Ok(())
}

async fn answer(
    config: std::sync::Arc<tls::ServerConfig>,
    tcp: TcpStream,
    admission: Admission,
    hello: Hello,
    role: Role,
    generation: Generation,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let (stream, peer) = tls::accept(config, tcp).await?;
    let (mut conn, negotiated) =
        lbs_protocol::exchange_hello(stream, &peer, hello, generation, HELLO_TIMEOUT).await?;
    admission.proven();
    println!(
        "accepted {} (certificate verified)",
        describe(&negotiated.peer, negotiated.peer_generation)
    );
    loop {
        let next = tokio::select! {
            () = stop.cancelled() => {
                send(&mut conn, generation, Message::Goodbye { reason: "peer stopping".into() }).await?;
                return Ok(());
            }
            next = tokio::time::timeout(IDLE_TIMEOUT, conn.next()) => next,
        };
        let Ok(next) = next else {
            bail!("{peer} silent for {IDLE_TIMEOUT:?}; closing");
        };
        let Some(envelope) = next.transpose()? else {
            println!("{peer} hung up");
            return Ok(());
        };
        match envelope.message {
            Message::Heartbeat { seq, .. } => {
                send(&mut conn, generation, Message::HeartbeatAck { seq, role }).await?;
            }
            Message::Goodbye { reason } => {
                println!("{peer} said goodbye: {reason}");
                return Ok(());
            }
            other => bail!("{peer} sent an unexpected {} message", other.kind()),
        }
    }
}

async fn send<S>(
    conn: &mut Connection<S>,
    generation: Generation,
    message: Message,
) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    conn.send(Envelope {
        generation,
        message,
    })
    .await?;
    Ok(())
}

async fn dial(me: Me, connect: SocketAddr, heartbeats: u64) -> anyhow::Result<()> {
    let me = load(me)?;
    let config = tls::client_config(&me.identity, &me.root)?;
    let started = Instant::now();
    let tcp = tokio::time::timeout(HELLO_TIMEOUT, TcpStream::connect(connect))
        .await
        .with_context(|| format!("no answer from {connect} within {HELLO_TIMEOUT:?}"))?
        .with_context(|| format!("cannot connect to {connect}"))?;
    let stream = tls::connect(config, &me.partner, tcp).await?;
    let (mut conn, negotiated) = lbs_protocol::exchange_hello(
        stream,
        &me.partner,
        me.hello.clone(),
        me.generation,
        HELLO_TIMEOUT,
    )
    .await?;
    println!("this side: {}", describe(&me.hello, me.generation));
    println!(
        "peer:      {} (certificate verified)",
        describe(&negotiated.peer, negotiated.peer_generation)
    );
    println!(
        "negotiated protocol {} in {:.2} ms (TCP + TLS 1.3 + hello)",
        negotiated.version,
        started.elapsed().as_secs_f64() * 1000.0
    );
    let role = me.role;
    for seq in 1..=heartbeats {
        let sent = Instant::now();
        send(&mut conn, me.generation, Message::Heartbeat { seq, role }).await?;
        let reply = tokio::time::timeout(HELLO_TIMEOUT, conn.next())
            .await
            .with_context(|| format!("no heartbeat answer within {HELLO_TIMEOUT:?}"))?
            .context("peer closed the connection")??;
        match reply.message {
            Message::HeartbeatAck { seq: got, .. } if got == seq => println!(
                "heartbeat {seq}: {:.3} ms round trip",
                sent.elapsed().as_secs_f64() * 1000.0
            ),
            other => bail!("expected heartbeat-ack {seq}, got {}", other.kind()),
        }
    }
    send(
        &mut conn,
        me.generation,
        Message::Goodbye {
            reason: format!("box {} done", me.sid),
        },
    )
    .await?;
    Ok(())
}
