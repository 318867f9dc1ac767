//! The decoding harness shared by the `cargo fuzz` target (`protocol/fuzz`) and the property
//! test that runs the same code over random bytes in CI.

use bytes::BytesMut;
use tokio_util::codec::Decoder;

use crate::frame::{self, FrameCodec, MAX_FRAME_LEN};
use crate::message::Envelope;

/// Feeds `data` to every decoder a peer's bytes can reach. Decoding may fail but must never
/// panic, and whatever decodes must re-encode to an equal message.
pub fn decode_untrusted(data: &[u8]) {
    // As a stream of frames, split at an arbitrary point to exercise partial reads.
    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let mut codec = FrameCodec::<Envelope>::with_max_len(MAX_FRAME_LEN);
    let mut buf = BytesMut::from(&data[..split]);
    let mut decoded = Vec::new();
    let mut failed = false;
    for chunk in [&data[split..], &[][..]] {
        buf.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(envelope)) => decoded.push(envelope),
                Ok(None) => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            break;
        }
    }
    if !failed {
        let _ = codec.decode_eof(&mut buf);
    }
    // As a single payload, the way the hello exchange reads its first frame.
    if let Ok(envelope) = frame::decode_payload::<Envelope>(data) {
        decoded.push(envelope);
    }
    for envelope in decoded {
        let mut wire = BytesMut::new();
        frame::encode(&envelope, &mut wire, MAX_FRAME_LEN)
            .expect("a decoded message fits in a frame when encoded again");
        let again = frame::decode::<Envelope>(&mut wire, MAX_FRAME_LEN)
            .expect("re-encoded message decodes")
            .expect("re-encoded frame is complete");
        assert_eq!(
            again, envelope,
            "decode/encode round trip changed the message"
        );
    }
}
