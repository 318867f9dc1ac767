//! Packing whole-file data with zstd where it pays, and learning, within a session, which
//! kinds of file do not pack so that their data is not tried at all.
//!
//! Whether a file packs is mostly a matter of what it holds: a PBX's prompts of one voice share
//! their recording's noise floor, and either most of them pack (silence) or few do; its GSM
//! prompts and music on hold never do. Trying every file cost the sender a fifth of its CPU in
//! an initial copy of the prompt tree, three quarters of it on data that did not pack.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};

use lbs_protocol::RelPath;

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

/// What packing did for each kind of file so far in a session: shared by every packer of the
/// session (the small files' reader threads, each large file's).
#[derive(Default)]
pub(super) struct PackHistory {
    kinds: Mutex<HashMap<Kind, Record>>,
}

impl PackHistory {
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
        let tried = self.on && self.misses < PACK_TRIES && bytes.len() >= PACK_MIN;
        let Some(len) = tried.then(|| u32::try_from(bytes.len()).ok()).flatten() else {
            return Piece::Data(bytes);
        };
        let packed = ZSTD.with_borrow_mut(|zstd| {
            let zstd = match zstd {
                Some(zstd) => zstd,
                None => zstd.insert(zstd::bulk::Compressor::new(PACK_LEVEL).ok()?),
            };
            zstd.compress(&bytes).ok()
        });
        let packed = packed.filter(|packed| packed.len() <= bytes.len() - bytes.len() / PACK_SAVES);
        // A file's first try speaks for its kind.
        if let (Some(kind), Some(history)) = (self.unrecorded.take(), &self.history) {
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
