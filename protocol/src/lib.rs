//! `lbs-protocol`: the language boxes and the data center speak.
//!
//! - [`ids`]: [`ServerId`] (the SID), [`PairId`], [`PairName`], [`Role`], [`Generation`].
//! - [`version`]: [`ProtocolVersion`] (negotiated) and [`SoftwareVersion`] (reported).
//! - [`message`]: [`Envelope`] (generation + [`Message`]), [`Hello`], [`Refusal`].
//! - [`metered`]: [`Metered`], a stream that counts the bytes it carries.
//! - [`path`]: [`RelPath`], a path inside a sync root that can never leave it.
//! - [`sync`]: [`sync::ManifestEntry`], what a sending side says about each entry of its tree.
//! - [`control`]: activation and the control API (reports, promotion, registration).
//! - [`frame`]: `u32` big-endian length prefix, postcard payload, [`MAX_FRAME_LEN`];
//!   [`FrameCodec`] for tokio.
//! - [`handshake`]: [`exchange_hello`], the version and identity check that opens every
//!   connection.
//! - [`systemd`]: readiness notification for `Type=notify` units.
//! - [`tls`]: mutual-TLS [`Identity`], [`TrustRoot`] and the rustls configurations that
//!   accept only the expected peer; `ca` (feature `ca`, the data center only): the
//!   `CertificateAuthority` that signs identities.
//! - [`listen`]: [`listen::serve_until`], the one accept loop of every listener.
//! - [`net`], [`inventory`]: addresses, MACs and a box's hardware, as every crate speaks of
//!   them.
//!
//! This crate owns every type that crosses the wire; changing one is a compatibility
//! decision (see [`PROTOCOL_VERSION`]). It opens no network sockets of its own: callers hand it
//! streams.

#![forbid(unsafe_code)]

#[cfg(feature = "ca")]
pub mod ca;
pub mod control;
pub mod frame;
pub mod handshake;
pub mod ids;
pub mod inventory;
pub mod listen;
pub mod message;
pub mod metered;
pub mod net;
pub mod path;
pub mod sync;
pub mod tls;
pub mod version;

#[doc(hidden)]
pub mod fuzzing;

#[cfg(feature = "ca")]
pub use ca::CertificateAuthority;
pub use frame::{FrameCodec, FrameError, MAX_FRAME_LEN};
pub use handshake::{Connection, HandshakeError, Negotiated, exchange_hello};
pub use ids::{Generation, IdError, PairId, PairName, Role, ServerId};
pub use message::{
    Envelope, Hello, Message, Refusal, SYNC_CHUNK_LEN, SYNC_SCANNING_EVERY, Sender, sync_data_head,
};
pub use metered::{Meter, Metered};
pub use path::{PathError, RelPath};
pub use tls::{AcceptPeers, Identity, PeerName, TlsError, TrustRoot};
pub use version::{PROTOCOL_VERSION, ProtocolVersion, SoftwareVersion};
