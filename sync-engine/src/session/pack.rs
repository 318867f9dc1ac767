//! Packing whole-file data with zstd where it pays, and learning, within a session, which
//! kinds of file do not pack so that their data is not tried at all.
//!
//! Whether a file packs is mostly a matter of what it holds: a PBX's prompts of one voice share
//! their recording's noise floor, and either most of them pack (silence) or few do; its GSM
//! prompts and music on hold never do. Trying every file cost the sender a fifth of its CPU in
//! an initial copy of the prompt tree, three quarters of it on data that did not pack.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lbs_protocol::RelPath;

/// zstd's level for file data: its fastest regular one packs a PBX's WAV prompts about 5%
/// (level 1 packs 14% but at a quarter of the speed, slower than the link it saves on).
const PACK_LEVEL: i32 = -1;

/// A packed chunk is sent only when it saves at least 1/this of the chunk, and at least what
/// packing costs on the link ([`PackHistory::needed`]).
const PACK_SAVES: u64 = 32;

/// A chunk that packs to 1/this of its length or less is always worth packing, however fast
/// the link: zstd packs such data (silence, text) at several GB/s, and it halves the transfer.
const PACK_ALWAYS: u64 = 2;

/// Shares of a chunk are counted in 1/this.
const SHARE_UNIT: u64 = 1024;

/// Until the connection has taken this many bytes of file data, and packing has been timed
/// on this many, packing keeps to [`PACK_SAVES`].
const MEASURED_BYTES: u64 = 1 << 20;

/// A measure's totals are halved when its bytes reach this: recent transfers weigh more.
const MEASURE_MEMORY: u64 = 64 << 20;

/// After this many chunks of a file that did not pack, the rest of it is sent as it is
/// (compressed audio, encrypted or random data).
const PACK_TRIES: u32 = 2;

/// Chunks shorter than this are sent as they are.
const PACK_MIN: usize = 512;

/// The files of a kind tried before its record decides.
const KIND_WARM: u32 = 4;

/// A kind stays tried while at least 1 in this many of its files tried packed ...
const KIND_SHARE: u32 = 3;

/// ... and otherwise only every this-many-th of its files (so a kind that starts to pack, a
/// directory of new recordings, say, is noticed).
const KIND_PROBE: u32 = 16;

/// A kind's counts are halved when its files tried reach this: recent files weigh more.
const KIND_MEMORY: u32 = 64;

/// Kinds recorded per session at most; files of kinds beyond them are always tried.
const MAX_KINDS: usize = 4096;

/// A part of a file as read: data (packed or not), or a hole of some length.
pub(super) enum Piece {
    Data(Vec<u8>),
    Hole(u64),
    /// `len` bytes of data as one zstd frame.
    Packed {
        len: u32,
        bytes: Vec<u8>,
    },
}

impl Piece {
    /// The memory it holds.
    pub(super) fn held(&self) -> u64 {
        match self {
            Piece::Data(bytes) | Piece::Packed { bytes, .. } => bytes.len() as u64,
            Piece::Hole(_) => 0,
        }
    }
}

/// A kind of file: its directory and its name's extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct Kind(u64);

impl Kind {
    pub(super) fn of(path: &RelPath) -> Kind {
        let name = path.file_name().as_encoded_bytes();
        let extension = name
            .iter()
            .rposition(|&b| b == b'.')
            .map_or(&b""[..], |dot| &name[dot + 1..]);
        let mut hasher = DefaultHasher::new();
        path.parent_bytes().hash(&mut hasher);
        extension.hash(&mut hasher);
        Kind(hasher.finish())
    }
}

/// How the files of one kind packed.
#[derive(Default)]
struct Record {
    tried: u32,
    packed: u32,
    /// Files passed over since the record last decided against trying.
    passed: u32,
}

/// Bytes and the time they took, kept as two counters any thread may add to.
#[derive(Default)]
struct Rate {
    bytes: AtomicU64,
    nanos: AtomicU64,
}

impl Rate {
    fn add(&self, bytes: u64, took: Duration) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let total = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let spent = self
            .nanos
            .fetch_add(nanos, Ordering::Relaxed)
            .saturating_add(nanos);
        if total >= MEASURE_MEMORY {
            // Racing adds may be halved with the rest or not: a measure, not an account.
            self.bytes.store(total / 2, Ordering::Relaxed);
            self.nanos.store(spent / 2, Ordering::Relaxed);
        }
    }

    /// Bytes and nanoseconds, once `least` bytes are measured.
    fn measured(&self, least: u64) -> Option<(u64, u64)> {
        let bytes = self.bytes.load(Ordering::Relaxed);
        let nanos = self.nanos.load(Ordering::Relaxed);
        (bytes >= least && nanos > 0).then_some((bytes, nanos))
    }
}

/// What packing did for each kind of file so far in a session, and how fast packing and the
/// connection go: shared by every packer of the session (the small files' reader threads,
/// each large file's) and its sending side.
#[derive(Default)]
pub(super) struct PackHistory {
    kinds: Mutex<HashMap<Kind, Record>>,
    /// File data the connection took, and the time spent handing it over (waiting for room
    /// included): how fast the link, or the receiver, takes data.
    sent: Rate,
    /// Data packing was tried on, and the time it took.
    packing: Rate,
}

impl PackHistory {
    /// Records that the connection took `bytes` of file data in `took`.
    pub(super) fn sent(&self, bytes: u64, took: Duration) {
        self.sent.add(bytes, took);
    }

    /// The share of a chunk (in 1/[`SHARE_UNIT`]) packing must save to pay: a chunk of `n`
    /// bytes takes `n / pack rate` to pack and saves `share × n / link rate` on the link, so
    /// packing pays when `share > link rate / pack rate`. On a slow link (a remote backup over
    /// the overlay) that is the floor of 1/[`PACK_SAVES`]; on a fast LAN, or when the sender
    /// itself is what is slow (the connection takes data as fast as it is handed over), only
    /// data that packs well (silence, text) is worth the time. Until both are measured: the
    /// floor.
    fn needed(&self) -> u64 {
        let floor = SHARE_UNIT / PACK_SAVES;
        let (Some((sent, send_ns)), Some((packed, pack_ns))) = (
            self.sent.measured(MEASURED_BYTES),
            self.packing.measured(MEASURED_BYTES),
        ) else {
            return floor;
        };
        // share = (sent / send_ns) / (packed / pack_ns), in u128 to keep every digit.
        let share = (u128::from(sent) * u128::from(pack_ns) * u128::from(SHARE_UNIT))
            / (u128::from(send_ns) * u128::from(packed)).max(1);
        u64::try_from(share)
            .unwrap_or(u64::MAX)
            .clamp(floor, SHARE_UNIT / PACK_ALWAYS)
    }

    /// Whether the next file of `kind` is worth trying.
    fn worth_trying(&self, kind: Kind) -> bool {
        let Ok(mut kinds) = self.kinds.lock() else {
            return true;
        };
        let Some(record) = kinds.get_mut(&kind) else {
            return true;
        };
        if record.tried < KIND_WARM || record.packed * KIND_SHARE >= record.tried {
            return true;
        }
        record.passed += 1;
        record.passed.is_multiple_of(KIND_PROBE)
    }

    /// Records whether a file of `kind` packed.
    fn record(&self, kind: Kind, packed: bool) {
        let Ok(mut kinds) = self.kinds.lock() else {
            return;
        };
        if kinds.len() >= MAX_KINDS && !kinds.contains_key(&kind) {
            return;
        }
        let record = kinds.entry(kind).or_default();
        record.tried += 1;
        record.packed += u32::from(packed);
        if record.tried >= KIND_MEMORY {
            record.tried /= 2;
            record.packed /= 2;
        }
    }
}

/// Packs data chunks for a receiver that unpacks them, while packing pays.
pub(super) struct Packer {
    /// The session's history, when the receiver unpacks.
    history: Option<Arc<PackHistory>>,
    /// Whether the current file is packed at all (the receiver unpacks, it is listed and its
    /// kind is worth trying).
    on: bool,
    /// The current file's kind, until its first try is recorded.
    unrecorded: Option<Kind>,
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
    /// A packer learning from and into `history`; without one, a packer that leaves data as
    /// it is.
    pub(super) fn new(history: Option<Arc<PackHistory>>) -> Packer {
        Packer {
            history,
            on: false,
            unrecorded: None,
            misses: 0,
        }
    }

    /// The next file's chunks follow: `path`'s; `listed`: whether its index listed it (one
    /// that was not is hashed as it is sent, from the bytes as they are).
    pub(super) fn next_file(&mut self, path: &RelPath, listed: bool) {
        self.misses = 0;
        self.unrecorded = None;
        self.on = false;
        if let (Some(history), true) = (&self.history, listed) {
            let kind = Kind::of(path);
            self.on = history.worth_trying(kind);
            self.unrecorded = self.on.then_some(kind);
        }
    }

    /// `piece`, packed if that saves enough (as it is if zstd cannot start).
    pub(super) fn pack(&mut self, piece: Piece) -> Piece {
        let Piece::Data(bytes) = piece else {
            return piece;
        };
        // Only a file of a listed version whose kind is worth trying is `on`: with a history.
        let tried = self.on && self.misses < PACK_TRIES && bytes.len() >= PACK_MIN;
        let (Some(history), true) = (self.history.as_deref(), tried) else {
            return Piece::Data(bytes);
        };
        let Ok(len) = u32::try_from(bytes.len()) else {
            return Piece::Data(bytes);
        };
        let started = Instant::now();
        let packed = ZSTD.with_borrow_mut(|zstd| {
            let zstd = match zstd {
                Some(zstd) => zstd,
                None => zstd.insert(zstd::bulk::Compressor::new(PACK_LEVEL).ok()?),
            };
            zstd.compress(&bytes).ok()
        });
        history.packing.add(u64::from(len), started.elapsed());
        let saved = (u64::from(len) * history.needed()).div_ceil(SHARE_UNIT);
        let packed = packed.filter(|packed| packed.len() as u64 + saved <= u64::from(len));
        // A file's first try speaks for its kind.
        if let Some(kind) = self.unrecorded.take() {
            history.record(kind, packed.is_some());
        }
        match packed {
            Some(packed) => Piece::Packed { len, bytes: packed },
            None => {
                self.misses += 1;
                Piece::Data(bytes)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(text: &str) -> RelPath {
        RelPath::from_bytes(text).unwrap()
    }

    /// Whether each of `count` files at `at` was tried, as the history decides and with its
    /// outcome `packs(i)` recorded.
    fn tries(
        history: &PackHistory,
        at: &str,
        count: u32,
        packs: impl Fn(u32) -> bool,
    ) -> Vec<bool> {
        let kind = Kind::of(&path(at));
        (0..count)
            .map(|i| {
                let tried = history.worth_trying(kind);
                if tried {
                    history.record(kind, packs(i));
                }
                tried
            })
            .collect()
    }

    #[test]
    fn a_kind_that_never_packs_is_tried_on_its_first_files_then_only_now_and_then() {
        let history = PackHistory::default();
        let tried = tries(&history, "moh/a.gsm", 4 + 64, |_| false);
        assert!(tried[..4].iter().all(|&t| t));
        let later = tried[4..].iter().filter(|&&t| t).count();
        assert_eq!(later, 64 / KIND_PROBE as usize, "{tried:?}");
        // Another directory, or another extension in the same one, is another kind.
        assert!(history.worth_trying(Kind::of(&path("sounds/a.gsm"))));
        assert!(history.worth_trying(Kind::of(&path("moh/a.wav"))));
        assert!(!history.worth_trying(Kind::of(&path("moh/zz.gsm"))));
    }

    #[test]
    fn a_kind_where_half_the_files_pack_stays_tried_and_one_that_starts_is_noticed() {
        let history = PackHistory::default();
        let tried = tries(&history, "sounds/es/a.wav", 200, |i| i % 2 == 1);
        assert!(tried.iter().all(|&t| t));
        // Files of a kind that did not pack start to: the probes bring it back within a few.
        tries(&history, "rec/a.wav", 40, |_| false);
        let tried = tries(&history, "rec/a.wav", 200, |_| true);
        let first_back = tried.iter().rposition(|&t| !t).map_or(0, |i| i + 1);
        assert!(first_back <= 4 * KIND_PROBE as usize, "{tried:?}");
    }

    /// A history whose connection took `sent` bytes a second and whose packing went at
    /// `packed` bytes a second, each measured over 8 MiB.
    fn measured(sent: u64, packed: u64) -> PackHistory {
        let history = PackHistory::default();
        let secs = |rate: u64| Duration::from_secs_f64((8 << 20) as f64 / rate as f64);
        history.sent(8 << 20, secs(sent));
        history.packing.add(8 << 20, secs(packed));
        history
    }

    #[test]
    fn the_share_packing_must_save_follows_the_link_against_the_packing_speed() {
        let floor = SHARE_UNIT / PACK_SAVES;
        // Nothing measured yet, or too little: the floor.
        assert_eq!(PackHistory::default().needed(), floor);
        let little = PackHistory::default();
        little.sent(MEASURED_BYTES - 1, Duration::from_millis(1));
        little.packing.add(8 << 20, Duration::from_millis(10));
        assert_eq!(little.needed(), floor);
        // A remote backup's 100 Mbit/s link, packing at 500 MB/s: anything past the floor.
        assert_eq!(measured(12_000_000, 500_000_000).needed(), floor);
        // A gigabit LAN: a quarter of a chunk (117 / 500 MB/s).
        let lan = measured(117_000_000, 500_000_000).needed();
        assert!((235..=245).contains(&lan), "{lan}");
        // Loopback, or a sender slower than its link: only what packs to half.
        assert_eq!(
            measured(3_000_000_000, 500_000_000).needed(),
            SHARE_UNIT / PACK_ALWAYS
        );
    }

    #[test]
    fn on_a_fast_link_data_that_packs_a_little_goes_as_it_is_and_silence_packs() {
        let fast = Arc::new(measured(3_000_000_000, 500_000_000));
        let slow = Arc::new(measured(12_000_000, 500_000_000));
        // Bytes of which a sixth are runs of zeros: zstd saves about that much.
        let mut some = vec![0u8; 64 << 10];
        blake3::Hasher::new().finalize_xof().fill(&mut some);
        for run in some.chunks_mut(6 << 10) {
            run[..1 << 10].fill(0);
        }
        let packs_little = |history: &Arc<PackHistory>| {
            let mut packer = Packer::new(Some(history.clone()));
            packer.next_file(&path("sounds/a.wav"), true);
            matches!(packer.pack(Piece::Data(some.clone())), Piece::Packed { .. })
        };
        assert!(packs_little(&slow));
        assert!(!packs_little(&fast));
        let mut packer = Packer::new(Some(fast.clone()));
        packer.next_file(&path("sounds/silence/1.wav"), true);
        assert!(matches!(
            packer.pack(Piece::Data(vec![0; 64 << 10])),
            Piece::Packed { .. }
        ));
    }

    #[test]
    fn kinds_beyond_the_limit_are_always_tried() {
        let history = PackHistory::default();
        for i in 0..MAX_KINDS {
            tries(&history, &format!("d{i}/a.gsm"), 1, |_| false);
        }
        let tried = tries(&history, "beyond/a.gsm", 40, |_| false);
        assert!(tried.iter().all(|&t| t));
    }

    #[test]
    fn a_packer_records_each_file_once_and_skips_what_its_kind_says() {
        let history = Arc::new(PackHistory::default());
        let mut packer = Packer::new(Some(history.clone()));
        let mut noise = vec![0u8; 64 << 10];
        blake3::Hasher::new().finalize_xof().fill(&mut noise);
        for i in 0..KIND_WARM {
            packer.next_file(&path(&format!("moh/{i}.gsm")), true);
            // Two chunks each: only the first speaks for the kind.
            for _ in 0..2 {
                assert!(matches!(
                    packer.pack(Piece::Data(noise.clone())),
                    Piece::Data(_)
                ));
            }
        }
        let record = |kind: &str| {
            let kinds = history.kinds.lock().unwrap();
            let record = &kinds[&Kind::of(&path(kind))];
            (record.tried, record.packed)
        };
        assert_eq!(record("moh/x.gsm"), (KIND_WARM, 0));
        // The kind now says no: even data that would pack is sent as it is.
        packer.next_file(&path("moh/next.gsm"), true);
        assert!(matches!(
            packer.pack(Piece::Data(vec![7; 4096])),
            Piece::Data(_)
        ));
        assert_eq!(record("moh/x.gsm"), (KIND_WARM, 0));
        // A kind that packs is packed.
        packer.next_file(&path("sounds/a.wav"), true);
        assert!(matches!(
            packer.pack(Piece::Data(vec![7; 4096])),
            Piece::Packed { .. }
        ));
        assert_eq!(record("sounds/b.wav"), (1, 1));
    }
}
