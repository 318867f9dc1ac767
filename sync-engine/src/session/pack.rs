//! File data packed with zstd for a receiver that unpacks it (protocol 1.11), while packing
//! pays: a chunk is packed only if that saves enough, a file whose first chunks did not pack
//! is sent as it is, and a chunk that a quick look finds unlikely to pack is not tried.

use super::whole::Piece;

/// zstd's level for file data: its fastest regular one packs a PBX's WAV prompts about 5%
/// (level 1 packs 14% but at a quarter of the speed, slower than the link it saves on).
const PACK_LEVEL: i32 = -1;

/// A packed chunk is sent only when it saves at least 1/this of the chunk.
const PACK_SAVES: usize = 32;

/// After this many chunks of a file that did not pack, the rest of it is sent as it is
/// (compressed audio, encrypted or random data).
const PACK_TRIES: u32 = 2;

/// Chunks shorter than this are sent as they are.
const PACK_MIN: usize = 512;

/// Packs data chunks for a receiver that unpacks them, while packing pays.
pub(super) struct Packer {
    /// Whether the receiver unpacks.
    packed: bool,
    /// Whether the current file is packed at all (the receiver unpacks and it is listed).
    on: bool,
    /// Chunks of the current file that did not pack.
    misses: u32,
}

thread_local! {
    /// Each reading thread's zstd context, made at its first packed chunk and kept: one made
    /// per batch of files cost more than packing the small ones in it.
    static ZSTD: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

impl Packer {
    /// A packer; with `packed` false, one that leaves data as it is.
    pub(super) fn new(packed: bool) -> Packer {
        Packer {
            packed,
            on: false,
            misses: 0,
        }
    }

    /// The next file's chunks follow; `listed`: whether its index listed it (one that was
    /// not is hashed as it is sent, from the bytes as they are).
    pub(super) fn next_file(&mut self, listed: bool) {
        self.on = self.packed && listed;
        self.misses = 0;
    }

    /// `piece`, packed if that saves enough (as it is if zstd cannot start).
    pub(super) fn pack(&mut self, piece: Piece) -> Piece {
        let Piece::Data(bytes) = piece else {
            return piece;
        };
        let tried = self.on && self.misses < PACK_TRIES && bytes.len() >= PACK_MIN;
        let Some(len) = tried.then(|| u32::try_from(bytes.len()).ok()).flatten() else {
            return Piece::Data(bytes);
        };
        if !may_pack(&bytes) {
            self.misses += 1;
            return Piece::Data(bytes);
        }
        let packed = ZSTD.with_borrow_mut(|zstd| {
            let zstd = match zstd {
                Some(zstd) => zstd,
                None => zstd.insert(zstd::bulk::Compressor::new(PACK_LEVEL).ok()?),
            };
            zstd.compress(&bytes).ok()
        });
        match packed {
            Some(packed) if packed.len() <= bytes.len() - bytes.len() / PACK_SAVES => {
                Piece::Packed { len, bytes: packed }
            }
            _ => {
                self.misses += 1;
                Piece::Data(bytes)
            }
        }
    }
}

/// How many windows of a chunk [`may_pack`] looks at, and how long each is.
const PROBE_WINDOWS: usize = 8;
const PROBE_WINDOW: usize = 1024;

/// Whether zstd at [`PACK_LEVEL`] may save enough on `bytes` to be worth trying, from a look
/// at a few windows spread over them. At negative levels zstd only finds repeats (it leaves
/// literals as they are), so it packs data that repeats itself at short range (silence in
/// audio, zeros, tables) and data made of few distinct bytes (text, configuration), which
/// also repeats; it does not pack audio samples, compressed or encrypted data, whose windows
/// show neither. On the PBX tree's prompts this tries 40% of the bytes it tried before and
/// keeps 98% of what packing saved; on the tree's initial copy zstd had been a third of the
/// sender's CPU.
fn may_pack(bytes: &[u8]) -> bool {
    /// At most this many bits per byte: few distinct bytes.
    const FEW_BYTES_BITS: f64 = 6.0;
    /// At least this share of 4-byte words the same as the word before: repeats.
    const REPEATS: f64 = 0.01;
    let mut counts = [0u32; 256];
    let (mut words, mut repeated) = (0usize, 0usize);
    let mut look = |window: &[u8]| {
        for &byte in window {
            counts[usize::from(byte)] += 1;
        }
        for pair in window.chunks_exact(8) {
            words += 1;
            repeated += usize::from(pair[..4] == pair[4..]);
        }
    };
    if bytes.len() <= PROBE_WINDOWS * PROBE_WINDOW {
        look(bytes);
    } else {
        let step = (bytes.len() - PROBE_WINDOW) / (PROBE_WINDOWS - 1);
        for at in (0..PROBE_WINDOWS).map(|n| n * step) {
            look(&bytes[at..at + PROBE_WINDOW]);
        }
    }
    let seen: u32 = counts.iter().sum();
    if seen == 0 {
        return false;
    }
    let total = f64::from(seen);
    let bits: f64 = counts
        .iter()
        .filter(|&&count| count > 0)
        .map(|&count| {
            let share = f64::from(count) / total;
            -share * share.log2()
        })
        .sum();
    bits <= FEW_BYTES_BITS || repeated as f64 >= REPEATS * words.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes from a fixed-seed generator (xorshift), as random as compressed audio.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Whether zstd at the packing level saves what packing asks of `bytes`.
    fn packs(bytes: &[u8]) -> bool {
        let packed = zstd::bulk::compress(bytes, PACK_LEVEL).unwrap();
        packed.len() <= bytes.len() - bytes.len() / PACK_SAVES
    }

    #[test]
    fn the_probe_tries_what_packs_and_skips_noise() {
        let noisy = noise(256 * 1024, 7);
        // Noise with a stretch of digital silence (a prompt's pause) in the middle.
        let mut paused = noise(256 * 1024, 9);
        paused[100_000..120_000].fill(0);
        let text: Vec<u8> = (0..4000)
            .flat_map(|n| format!("exten => {n},1,Dial(PJSIP/{n},30)\n").into_bytes())
            .collect();
        for (name, bytes, expected) in [
            ("noise", &noisy[..], false),
            ("a small noise", &noisy[..3000], false),
            ("silence", &vec![0u8; 64 * 1024][..], true),
            ("noise with a pause", &paused[..], true),
            ("a dial plan", &text[..], true),
        ] {
            assert_eq!(may_pack(bytes), expected, "{name}");
            assert_eq!(packs(bytes), expected, "zstd on {name}");
        }
    }

    #[test]
    fn a_chunk_the_probe_skips_is_sent_as_it_is_and_counts_as_a_miss() {
        let mut packer = Packer::new(true);
        packer.next_file(true);
        let noisy = noise(64 * 1024, 3);
        for _ in 0..PACK_TRIES {
            assert!(
                matches!(packer.pack(Piece::Data(noisy.clone())), Piece::Data(b) if b == noisy)
            );
        }
        // The file's next chunks are not tried, even a packable one.
        assert!(matches!(
            packer.pack(Piece::Data(vec![0; 64 * 1024])),
            Piece::Data(_)
        ));
        packer.next_file(true);
        assert!(matches!(
            packer.pack(Piece::Data(vec![0; 64 * 1024])),
            Piece::Packed { .. }
        ));
    }
}
