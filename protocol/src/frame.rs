//! Framing: a frame is a big-endian `u32` payload length followed by that many bytes of
//! postcard-encoded payload. [`MAX_FRAME_LEN`] is a hard limit on both sides: a peer that
//! announces more is cut off before anything is allocated, and we never send what a peer
//! would have to refuse. Bulk data (file contents, deltas) travels as many bounded frames.
//!
//! [`decode`] is the pure core (a buffer in, a message or "incomplete" out); [`FrameCodec`]
//! adapts it to `tokio_util::codec::Framed`.

use std::io;
use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::codec::{Decoder, Encoder};

/// The largest payload a frame may carry: 1 MiB. Bulk transfers use chunks well below this.
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// The size of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more than the limit.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// The announced (or, when sending, the encoded) payload length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The payload is not a valid message.
    #[error("malformed {len}-byte frame: {source}")]
    Malformed {
        /// The payload length.
        len: usize,
        /// What the decoder found wrong.
        source: postcard::Error,
    },
    /// The payload holds a valid message followed by unexplained bytes.
    #[error("malformed frame: {extra} unexpected bytes after the message")]
    TrailingBytes {
        /// How many bytes were left over.
        extra: usize,
    },
    /// The connection ended in the middle of a frame.
    #[error("connection closed in the middle of a frame ({buffered} bytes received)")]
    Truncated {
        /// How many bytes of the unfinished frame had arrived.
        buffered: usize,
    },
    /// A message could not be encoded (never expected for our own types).
    #[error("cannot encode message: {0}")]
    Encode(postcard::Error),
    /// The connection broke under it (how, in the text): the peer stopped or the link went
    /// down. Said in our words: rustls's for an unexpected end end in a link to its manual.
    #[error("the connection broke ({0}): the peer stopped or the link went down")]
    Lost(&'static str),
    /// The transport failed otherwise.
    #[error(transparent)]
    Io(io::Error),
}

impl From<io::Error> for FrameError {
    fn from(err: io::Error) -> FrameError {
        match err.kind() {
            io::ErrorKind::UnexpectedEof => {
                FrameError::Lost("it hung up without ending the session")
            }
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted => FrameError::Lost("it was reset"),
            // The kernel gave up: what was sent stayed unacknowledged (`TCP_USER_TIMEOUT`),
            // or keepalive probes went unanswered.
            io::ErrorKind::TimedOut => FrameError::Lost("nothing sent was acknowledged in time"),
            _ => FrameError::Io(err),
        }
    }
}

/// Returns the total length (header + payload) of the frame at the start of `buf`, `None` if
/// it has not fully arrived, or an error if its announced length exceeds `max_len`.
pub fn check(buf: &[u8], max_len: usize) -> Result<Option<usize>, FrameError> {
    let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(*header) as usize;
    if len > max_len {
        return Err(FrameError::TooLarge { len, max: max_len });
    }
    let total = HEADER_LEN + len;
    Ok((buf.len() >= total).then_some(total))
}

/// Takes one complete frame off the front of `buf` and decodes its payload, or returns
/// `Ok(None)` (leaving `buf` untouched) when the frame has not fully arrived.
pub fn decode<T: FromFrame>(buf: &mut BytesMut, max_len: usize) -> Result<Option<T>, FrameError> {
    let Some(total) = check(buf, max_len)? else {
        // Make room for the rest of the frame in one allocation; `check` bounded its size.
        if let Some(header) = buf.first_chunk::<HEADER_LEN>() {
            let total = HEADER_LEN + u32::from_be_bytes(*header) as usize;
            buf.reserve(total.saturating_sub(buf.len()));
        }
        return Ok(None);
    };
    let frame = buf.split_to(total).freeze();
    T::from_frame(frame.slice(HEADER_LEN..)).map(Some)
}

/// What a frame's payload decodes into. By default postcard decodes it, copying what it
/// holds; a type may instead keep a large byte string as a slice of the frame (see
/// [`crate::Envelope`]), as long as it decodes to exactly what postcard would.
pub trait FromFrame: DeserializeOwned {
    /// The value `payload` (one frame's, without its length prefix) holds.
    fn from_frame(payload: Bytes) -> Result<Self, FrameError> {
        decode_payload(&payload)
    }
}

/// Decodes one payload (without its length prefix), insisting that it is used up exactly.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let (value, rest) =
        postcard::take_from_bytes(payload).map_err(|source| FrameError::Malformed {
            len: payload.len(),
            source,
        })?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes { extra: rest.len() });
    }
    Ok(value)
}

/// Appends `value` as one frame to `dst`, refusing to produce a frame over `max_len`.
pub fn encode<T: Serialize>(
    value: &T,
    dst: &mut BytesMut,
    max_len: usize,
) -> Result<(), FrameError> {
    // The header cannot express more than `u32::MAX`, whatever the caller asked for.
    let max_len = max_len.min(u32::MAX as usize);
    let start = dst.len();
    dst.put_u32(0);
    let written = postcard::to_io(value, (&mut *dst).writer()).map(drop);
    let len = match written.map(|()| dst.len() - start - HEADER_LEN) {
        Ok(len) if len <= max_len => len,
        Ok(len) => {
            dst.truncate(start);
            return Err(FrameError::TooLarge { len, max: max_len });
        }
        Err(err) => {
            dst.truncate(start);
            return Err(FrameError::Encode(err));
        }
    };
    let header = u32::try_from(len).map_err(|_| FrameError::TooLarge { len, max: max_len })?;
    dst[start..start + HEADER_LEN].copy_from_slice(&header.to_be_bytes());
    Ok(())
}

/// A `tokio_util` codec for frames carrying `T` (in practice [`crate::Envelope`]).
#[derive(Debug)]
pub struct FrameCodec<T> {
    max_len: usize,
    _message: PhantomData<fn() -> T>,
}

impl<T> FrameCodec<T> {
    /// A codec with the protocol's [`MAX_FRAME_LEN`].
    pub fn new() -> Self {
        Self::with_max_len(MAX_FRAME_LEN)
    }

    /// A codec with a different limit (tests, or a peer known to need less).
    pub fn with_max_len(max_len: usize) -> Self {
        Self {
            max_len,
            _message: PhantomData,
        }
    }
}

impl<T> Default for FrameCodec<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: FromFrame> Decoder for FrameCodec<T> {
    type Item = T;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<T>, FrameError> {
        decode(src, self.max_len)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<T>, FrameError> {
        match self.decode(src)? {
            Some(item) => Ok(Some(item)),
            None if src.has_remaining() => Err(FrameError::Truncated {
                buffered: src.len(),
            }),
            None => Ok(None),
        }
    }
}

impl<T: Serialize> Encoder<T> for FrameCodec<T> {
    type Error = FrameError;

    fn encode(&mut self, item: T, dst: &mut BytesMut) -> Result<(), FrameError> {
        encode(&item, dst, self.max_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Envelope, Generation, Message};

    fn goodbye(reason: &str) -> Envelope {
        Envelope {
            generation: Generation(7),
            message: Message::Goodbye {
                reason: reason.into(),
            },
        }
    }

    #[test]
    fn a_frame_arriving_byte_by_byte_decodes_once_complete() {
        let mut wire = BytesMut::new();
        encode(&goodbye("bye"), &mut wire, MAX_FRAME_LEN).unwrap();
        let mut buf = BytesMut::new();
        for (idx, byte) in wire.iter().enumerate() {
            buf.put_u8(*byte);
            let got = decode::<Envelope>(&mut buf, MAX_FRAME_LEN).unwrap();
            if idx + 1 < wire.len() {
                assert_eq!(got, None, "decoded early at byte {idx}");
            } else {
                assert_eq!(got, Some(goodbye("bye")));
            }
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let mut buf = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
        let err = decode::<Envelope>(&mut buf, MAX_FRAME_LEN).unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { len, max } if len == u32::MAX as usize && max == MAX_FRAME_LEN),
            "{err}"
        );
        assert!(buf.capacity() < 1024, "allocated {} bytes", buf.capacity());
    }

    #[test]
    fn oversized_message_is_not_sent() {
        let mut dst = BytesMut::from(&b"earlier"[..]);
        let err = encode(&goodbye(&"x".repeat(100)), &mut dst, 64).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { max: 64, .. }), "{err}");
        assert_eq!(
            &dst[..],
            b"earlier",
            "a refused frame must leave nothing behind"
        );
    }

    #[test]
    fn trailing_bytes_in_a_frame_are_an_error() {
        let mut wire = BytesMut::new();
        encode(&goodbye("bye"), &mut wire, MAX_FRAME_LEN).unwrap();
        wire.put_u8(0);
        let len = (wire.len() - HEADER_LEN) as u32;
        wire[..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
        let err = decode::<Envelope>(&mut wire, MAX_FRAME_LEN).unwrap_err();
        assert!(
            matches!(err, FrameError::TrailingBytes { extra: 1 }),
            "{err}"
        );
    }

    #[test]
    fn eof_inside_a_frame_is_an_error_and_clean_eof_is_not() {
        let mut codec = FrameCodec::<Envelope>::new();
        let mut wire = BytesMut::new();
        encode(&goodbye("bye"), &mut wire, MAX_FRAME_LEN).unwrap();
        wire.truncate(wire.len() - 1);
        let err = codec.decode_eof(&mut wire).unwrap_err();
        assert!(matches!(err, FrameError::Truncated { .. }), "{err}");
        assert_eq!(codec.decode_eof(&mut BytesMut::new()).unwrap(), None);
    }
}
