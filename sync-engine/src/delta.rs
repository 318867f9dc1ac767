//! The rolling delta (rsync's algorithm, through `fast_rsync`) for content that shifted: a
//! config file with lines inserted, a message whose header grew. Block values cannot see
//! those (every block after the insertion differs); a rolling checksum can.
//!
//! Used only for files of at most [`DELTA_MAX_FILE`] on both sides whose size changed:
//! `fast_rsync` works on whole in-memory slices, and its MD4 costs about 2 s/GiB. Nothing it
//! produces is trusted: a signature from the wire is checked before use and a panic inside
//! the library is contained; a delta is applied with a limit of the announced size; the
//! result is verified against the sender's BLAKE3 like every other transfer, and anything
//! that fails falls back to the whole file.

use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};

use fast_rsync::{Signature, SignatureOptions};

/// The largest file (old or new) moved as a delta: configuration and other text, where
/// content shifts. Larger files (recordings, music, databases) change in place or grow at the
/// end, which block values handle at a fraction of the cost.
pub const DELTA_MAX_FILE: u64 = 1 << 20;
/// Below this the whole file costs about as much as a signature and a delta.
pub const DELTA_MIN_FILE: u64 = 8 << 10;
/// Bytes of MD4 per block in a signature (the measurements: 8 is best).
const STRONG_HASH_BYTES: u32 = 8;

/// Whether a file going from `old` to `new` bytes moves as a delta.
pub fn wants_delta(old: u64, new: u64) -> bool {
    old != new
        && (DELTA_MIN_FILE..=DELTA_MAX_FILE).contains(&old)
        && (DELTA_MIN_FILE..=DELTA_MAX_FILE).contains(&new)
}

/// The signature block size for a file of `len` bytes: about its square root, a power of
/// two from 512 B to 4 KiB.
fn block_size_for(len: u64) -> u32 {
    let root = (len as f64).sqrt() as u64;
    root.next_power_of_two().clamp(512, 4096) as u32
}

/// The receiver's signature of its version, `data`.
pub fn signature_of(data: &[u8]) -> Vec<u8> {
    Signature::calculate(
        data,
        SignatureOptions {
            block_size: block_size_for(data.len() as u64),
            crypto_hash_size: STRONG_HASH_BYTES,
        },
    )
    .into_serialized()
}

/// The sender's delta turning the receiver's version (described by `signature`, from the
/// wire) into `data`; `None` when the signature is unusable or the delta would not be
/// smaller than `data` (then the whole file goes).
pub fn delta_for(signature: Vec<u8>, data: &[u8]) -> Option<Vec<u8>> {
    let signature = Signature::deserialize(signature).ok()?;
    let header = signature.serialized().get(4..12)?;
    let block_size = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    let hash_size = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    // A zero block size deserialises fine and then panics in `diff`.
    if !(64..=1 << 20).contains(&block_size) || !(1..=16).contains(&hash_size) {
        return None;
    }
    let delta = catch_unwind(AssertUnwindSafe(|| {
        let mut out = Vec::new();
        fast_rsync::diff(&signature.index(), data, &mut out)
            .ok()
            .map(|()| out)
    }))
    .ok()
    .flatten()?;
    (delta.len() < data.len()).then_some(delta)
}

/// Applies `delta` to `base`, writing at most `len` bytes (the size the sender announced) to
/// `out`. A damaged or hostile delta is an error, never a panic or unbounded output.
pub fn apply_delta(base: &[u8], delta: &[u8], out: &mut dyn Write, len: u64) -> Result<(), String> {
    let limit = usize::try_from(len).map_err(|_| "the announced size is too large".to_owned())?;
    let mut buffered = std::io::BufWriter::new(out);
    catch_unwind(AssertUnwindSafe(|| {
        fast_rsync::apply_limited(base, delta, &mut buffered, limit)
    }))
    .map_err(|_| "the delta made the decoder fail".to_owned())?
    .map_err(|err| format!("the delta does not apply: {err}"))?;
    buffered
        .flush()
        .map_err(|err| format!("writing the result: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(lines: std::ops::Range<u32>) -> Vec<u8> {
        lines
            .map(|i| format!("exten => {i},1,Dial(PJSIP/{i},30,tT)\n"))
            .collect::<String>()
            .into_bytes()
    }

    #[test]
    fn an_insertion_moves_as_a_small_delta() {
        let old = text(0..2000);
        let mut new = text(0..1000);
        new.extend_from_slice(b"exten => 9999,1,Voicemail(9999)\n");
        new.extend(text(1000..2000));
        assert!(wants_delta(old.len() as u64, new.len() as u64));
        let delta = delta_for(signature_of(&old), &new).unwrap();
        assert!(delta.len() < 4096, "{} byte delta", delta.len());
        let mut out = Vec::new();
        apply_delta(&old, &delta, &mut out, new.len() as u64).unwrap();
        assert_eq!(out, new);
    }

    #[test]
    fn hostile_signatures_and_deltas_are_refused_not_panicked_on() {
        let data = text(0..500);
        // Block size zero: deserialises, then would panic inside diff.
        let mut zero = signature_of(&data);
        zero[4..8].copy_from_slice(&0u32.to_be_bytes());
        assert_eq!(delta_for(zero, &data), None);
        assert_eq!(delta_for(b"garbage".to_vec(), &data), None);
        // A delta that expands far beyond the announced size stops at the limit.
        let delta = delta_for(signature_of(&data), &text(0..400)).unwrap();
        let mut out = Vec::new();
        assert!(apply_delta(&data, &delta, &mut out, 10).is_err());
        // A truncated delta is an error.
        let mut out = Vec::new();
        assert!(apply_delta(&data, &delta[..delta.len() / 2], &mut out, 1 << 20).is_err());
    }
}
