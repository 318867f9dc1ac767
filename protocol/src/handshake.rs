//! The `Hello` exchange that opens every connection: both sides send their [`Hello`] at once,
//! read the peer's, and check that
//! - the majors of the protocol versions agree (the lower minor is then used), and
//! - the peer's `Hello` claims the identity its TLS certificate proves.
//!
//! A side that refuses says why in a [`Message::Refused`] before it closes, and returns an
//! error naming both sides' facts. The first frame is read by hand, not through the codec, so
//! that a `Hello` from a future major version can still be understood far enough to refuse it
//! with both version numbers.

use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::Framed;

use crate::frame::{self, FrameCodec, FrameError, HEADER_LEN, MAX_FRAME_LEN};
use crate::ids::Generation;
use crate::message::{Envelope, Hello, Message, Refusal, Sender};
use crate::tls::{PeerName, TlsError};
use crate::version::ProtocolVersion;

/// How long a peer may take to answer our `Hello` unless the caller says otherwise.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection after a successful `Hello` exchange.
pub type Connection<S> = Framed<S, FrameCodec<Envelope>>;

/// What both sides agreed on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// The protocol version both use from now on.
    pub version: ProtocolVersion,
    /// The peer's `Hello`.
    pub peer: Hello,
    /// The generation the peer's envelope carried.
    pub peer_generation: Generation,
}

/// Why the `Hello` exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The peer speaks another major protocol version.
    #[error(
        "{peer} speaks protocol {theirs} but this side speaks {ours}; the major versions \
         differ, so they cannot work together: update the older side"
    )]
    IncompatibleProtocol {
        /// Whom we talked to.
        peer: PeerName,
        /// Our version.
        ours: ProtocolVersion,
        /// The peer's version.
        theirs: ProtocolVersion,
    },
    /// The peer refused us and said why.
    #[error("{peer} refused the connection: {refusal}")]
    Refused {
        /// Whom we talked to.
        peer: PeerName,
        refusal: Refusal,
    },
    /// The peer's `Hello` claims someone its certificate does not prove.
    #[error("the certificate proves {certificate} but its hello claims to be {hello}; refused")]
    IdentityMismatch {
        /// Who the certificate says.
        certificate: PeerName,
        /// Who the hello says.
        hello: Sender,
    },
    /// The peer's first frame was not a `Hello`.
    #[error("{peer} opened with a {kind} message instead of hello; refused")]
    NotHello {
        /// Whom we talked to.
        peer: PeerName,
        /// What it sent.
        kind: &'static str,
    },
    /// The peer did not answer in time.
    #[error("{peer} did not complete the hello exchange within {timeout:?}")]
    Timeout {
        /// Whom we talked to.
        peer: PeerName,
        /// How long we waited.
        timeout: Duration,
    },
    /// The peer closed the connection before its `Hello` arrived.
    #[error("{peer} closed the connection before saying hello")]
    Closed {
        /// Whom we talked to.
        peer: PeerName,
    },
    /// The peer's first frame could not be read.
    #[error("hello from {peer} unreadable: {source}")]
    Frame {
        /// Whom we talked to.
        peer: PeerName,
        /// What was wrong with it.
        source: FrameError,
    },
    /// TLS failed (often: the peer refused our certificate).
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// The leading fields every `Hello` of every version keeps (see the module docs of
/// [`crate::message`]): the envelope's generation, the message variant, the protocol version.
#[derive(Deserialize)]
struct HelloPrefix {
    _generation: Generation,
    variant: u32,
    protocol: ProtocolVersion,
}

/// Runs the `Hello` exchange over `io` with `peer` (the name its TLS certificate proved) and
/// returns the framed connection ready for messages.
pub async fn exchange_hello<S>(
    mut io: S,
    peer: &PeerName,
    ours: Hello,
    generation: Generation,
    timeout: Duration,
) -> Result<(Connection<S>, Negotiated), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let our_version = ours.protocol;
    let exchange = async {
        send(&mut io, peer, generation, Message::Hello(ours)).await?;
        let payload = read_first_frame(&mut io, peer).await?;
        let envelope = match frame::decode_payload::<Envelope>(&payload) {
            Ok(envelope) => envelope,
            Err(err) => {
                return Err(match newer_hello_version(&payload) {
                    Some(theirs) if theirs.major != our_version.major => {
                        refuse_version(&mut io, peer, generation, our_version, theirs).await
                    }
                    _ => HandshakeError::Frame {
                        peer: peer.clone(),
                        source: err,
                    },
                });
            }
        };
        let hello = match envelope.message {
            Message::Hello(hello) => hello,
            Message::Refused(refusal) => {
                return Err(HandshakeError::Refused {
                    peer: peer.clone(),
                    refusal,
                });
            }
            other => {
                let kind = other.kind();
                let refusal = Refusal::ProtocolViolation {
                    detail: format!("first message was {kind}, not hello"),
                };
                let _ = send(&mut io, peer, generation, Message::Refused(refusal)).await;
                return Err(HandshakeError::NotHello {
                    peer: peer.clone(),
                    kind,
                });
            }
        };
        if !sender_matches(&hello.sender, peer) {
            let refusal = Refusal::IdentityMismatch {
                certificate: peer.to_string(),
                hello: hello.sender.to_string(),
            };
            let _ = send(&mut io, peer, generation, Message::Refused(refusal)).await;
            return Err(HandshakeError::IdentityMismatch {
                certificate: peer.clone(),
                hello: hello.sender,
            });
        }
        let Some(version) = our_version.negotiate(hello.protocol) else {
            return Err(
                refuse_version(&mut io, peer, generation, our_version, hello.protocol).await,
            );
        };
        Ok(Negotiated {
            version,
            peer: hello,
            peer_generation: envelope.generation,
        })
    };
    let negotiated = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| HandshakeError::Timeout {
            peer: peer.clone(),
            timeout,
        })??;
    Ok((Framed::new(io, FrameCodec::new()), negotiated))
}

/// Whether a `Hello`'s claimed identity is the one the certificate proved.
fn sender_matches(sender: &Sender, peer: &PeerName) -> bool {
    match (sender, peer) {
        (Sender::Box { sid, .. }, PeerName::Box(proved)) => sid == proved,
        (Sender::DataCenter { .. }, PeerName::DataCenter) => true,
        _ => false,
    }
}

/// The protocol version of a `Hello` we cannot fully decode, if the payload is one.
fn newer_hello_version(payload: &[u8]) -> Option<ProtocolVersion> {
    let (prefix, _) = postcard::take_from_bytes::<HelloPrefix>(payload).ok()?;
    (prefix.variant == 0).then_some(prefix.protocol)
}

async fn refuse_version<S: AsyncWrite + Unpin>(
    io: &mut S,
    peer: &PeerName,
    generation: Generation,
    ours: ProtocolVersion,
    theirs: ProtocolVersion,
) -> HandshakeError {
    let refusal = Refusal::IncompatibleProtocol {
        ours,
        yours: theirs,
    };
    // Best effort: the peer learns why, but our error does not depend on it hearing us.
    let _ = send(io, peer, generation, Message::Refused(refusal)).await;
    HandshakeError::IncompatibleProtocol {
        peer: peer.clone(),
        ours,
        theirs,
    }
}

async fn send<S: AsyncWrite + Unpin>(
    io: &mut S,
    peer: &PeerName,
    generation: Generation,
    message: Message,
) -> Result<(), HandshakeError> {
    let mut buf = bytes::BytesMut::new();
    frame::encode(
        &Envelope {
            generation,
            message,
        },
        &mut buf,
        MAX_FRAME_LEN,
    )
    .map_err(|source| HandshakeError::Frame {
        peer: peer.clone(),
        source,
    })?;
    io.write_all(&buf)
        .await
        .map_err(|err| TlsError::explain(peer, err))?;
    io.flush()
        .await
        .map_err(|err| TlsError::explain(peer, err))?;
    Ok(())
}

/// Reads exactly one frame's payload, without reading past it.
async fn read_first_frame<S: AsyncRead + Unpin>(
    io: &mut S,
    peer: &PeerName,
) -> Result<Vec<u8>, HandshakeError> {
    let mut header = [0u8; HEADER_LEN];
    match io.read_exact(&mut header).await {
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(HandshakeError::Closed { peer: peer.clone() });
        }
        Err(err) => return Err(TlsError::explain(peer, err).into()),
    }
    let frame_error = |source| HandshakeError::Frame {
        peer: peer.clone(),
        source,
    };
    let len = frame::check(&header, MAX_FRAME_LEN)
        .map_err(frame_error)
        .map(|_| u32::from_be_bytes(header) as usize)?;
    let mut payload = vec![0u8; len];
    io.read_exact(&mut payload).await.map_err(|err| {
        if err.kind() == std::io::ErrorKind::UnexpectedEof {
            frame_error(FrameError::Truncated {
                buffered: HEADER_LEN,
            })
        } else {
            TlsError::explain(peer, err).into()
        }
    })?;
    Ok(payload)
}
