//! How one fetched file is received: the [`Sink`] that picks, from what arrives first, a whole
//! new version, a rebuild from changed blocks, an in-place patch behind a journal or a delta,
//! and refuses anything beyond the planned size.

use std::fs::File;
use std::io::{self, Read, Write};

use lbs_protocol::RelPath;

use super::Sink;
use crate::apply::{ApplyError, Root, Staged, Target, TempFile};
use crate::index::{Known, PatchedList};
use crate::journal::{Patch, PatchError};

/// Patch in place only when the changed blocks are at most this fraction of the file: beyond
/// it, writing a new version costs less than journalling the changes and writing them twice.
const PATCH_MAX_SHARE: u64 = 4;

/// How one file is being received.
enum Receiving<'r> {
    /// Nothing arrived yet.
    Start,
    /// The whole file, into a new version.
    Whole(TempFile<'r>),
    /// Changed blocks into a new version, the rest copied from the old one.
    Rebuild {
        temp: TempFile<'r>,
        old: File,
        pos: u64,
    },
    /// Changed blocks into the old file itself, behind a journal.
    Patch(Box<Patch<'r>>),
    /// A delta against the old file (small files only), applied at the end.
    Delta(Vec<u8>),
}

/// The [`Sink`] of one fetch: picks how to receive from what arrives first.
pub(super) struct Receiver<'r> {
    root: &'r Root,
    path: RelPath,
    known: Option<Known>,
    /// What changed blocks are laid over: a partial new version an interrupted pull kept,
    /// instead of the file's current version.
    pub(super) partial: Option<File>,
    state: Receiving<'r>,
    /// Why it stopped, when it did: returned as is (a full disk must stay a full disk).
    pub(super) failed: Option<ApplyError>,
    /// Bytes that came from the sender.
    pub(super) fetched: u64,
    /// The size the plan expects (the sender's manifest, checked against the largest file
    /// lbs syncs): no transfer may announce or send more.
    planned: u64,
    /// Bytes of whole-file data received.
    whole: u64,
    buf: Vec<u8>,
    /// The version being received, named by its temporary file so a run killed in the middle
    /// leaves a partial the next one resumes from.
    pub(super) expected: Option<blake3::Hash>,
    /// Its mode, whose permission bits its temporary file is made with.
    pub(super) mode: u32,
}

impl<'r> Receiver<'r> {
    pub(super) fn new(root: &'r Root, path: &RelPath, known: Option<Known>, planned: u64) -> Self {
        Receiver {
            root,
            path: path.clone(),
            known,
            planned,
            whole: 0,
            partial: None,
            expected: None,
            mode: 0o600,
            state: Receiving::Start,
            failed: None,
            fetched: 0,
            buf: Vec::new(),
        }
    }

    /// Refuses what goes beyond the planned size.
    fn beyond_plan(&self, what: String) -> io::Error {
        io::Error::other(format!(
            "the sender {what}, beyond the {} bytes planned for {}; refused",
            self.planned, self.path
        ))
    }

    fn fail(&mut self, err: ApplyError) -> io::Error {
        let text = err.to_string();
        self.failed = Some(err);
        io::Error::other(text)
    }

    fn temp(&mut self) -> io::Result<TempFile<'r>> {
        let temp = match &self.expected {
            Some(expected) => self
                .root
                .create_resumable_temp(&self.path, expected, self.mode),
            None => self.root.create_temp(&self.path),
        };
        temp.map_err(|err| self.fail(err))
    }

    fn rebuild(&mut self) -> io::Result<()> {
        let old = match self.partial.take() {
            Some(partial) => partial,
            None => self
                .root
                .open_file(&self.path)
                .map_err(|err| self.fail(err))?,
        };
        let temp = self.temp()?;
        self.state = Receiving::Rebuild { temp, old, pos: 0 };
        Ok(())
    }

    /// After an interruption: keeps what was received (a prefix of the new version) for the
    /// next pull; returns the bytes kept.
    pub(super) fn keep_partial(&mut self, expected: &blake3::Hash) -> u64 {
        match std::mem::replace(&mut self.state, Receiving::Start) {
            Receiving::Whole(temp) | Receiving::Rebuild { temp, .. } => temp.keep_partial(expected),
            // A patch is not sealed: its journal goes, the file is untouched.
            Receiving::Patch(_) | Receiving::Delta(_) | Receiving::Start => 0,
        }
    }

    /// Ends the transfer at `size`: a new version to commit, or a patched file in place.
    pub(super) fn finish(
        mut self,
        size: u64,
        expected: &blake3::Hash,
        target: &Target,
    ) -> Result<Received, ApplyError> {
        if size != self.planned {
            return Err(self.root.error(
                &self.path,
                "receiving",
                self.beyond_plan(format!("ended at {size} bytes")),
            ));
        }
        let state = std::mem::replace(&mut self.state, Receiving::Start);
        let staged = match state {
            Receiving::Start => {
                let mut temp = self.root.create_temp(&self.path)?;
                if size != 0 {
                    return Err(self.root.error(
                        &self.path,
                        "receiving",
                        io::Error::other(format!("the sender ended at {size} bytes, sent none")),
                    ));
                }
                temp.writer()
                    .flush()
                    .map_err(|e| self.root.error(&self.path, "writing", e))?;
                temp.finish(expected, target)?
            }
            Receiving::Whole(temp) => temp.finish(expected, target)?,
            Receiving::Rebuild { mut temp, old, pos } => {
                keep_old(&old, pos, size, &mut self.buf, &mut temp.writer())
                    .map_err(|err| self.root.error(&self.path, "copying unchanged blocks", err))?;
                temp.finish(expected, target)?
            }
            Receiving::Delta(delta) => {
                let mut old = Vec::new();
                self.root.open_file(&self.path).and_then(|file| {
                    file.take(crate::delta::DELTA_MAX_FILE + 1)
                        .read_to_end(&mut old)
                        .map_err(|err| self.root.error(&self.path, "reading", err))
                })?;
                let mut temp = self.root.create_temp(&self.path)?;
                if let Err(reason) =
                    crate::delta::apply_delta(&old, &delta, &mut temp.writer(), size)
                {
                    return Ok(Received::Refetch(reason));
                }
                match temp.finish(expected, target) {
                    Ok(staged) => staged,
                    Err(ApplyError::HashMismatch { .. }) => {
                        return Ok(Received::Refetch(
                            "the delta's result does not hash to the sender's hash".into(),
                        ));
                    }
                    Err(other) => return Err(other),
                }
            }
            Receiving::Patch(patch) => {
                return match patch.finish(size, expected, target) {
                    Ok(tree) => Ok(Received::Patched(tree)),
                    Err(PatchError::Apply(err)) => Err(err),
                    Err(other) => Ok(Received::Refetch(other.to_string())),
                };
            }
        };
        Ok(Received::Staged(staged))
    }
}

impl Sink for Receiver<'_> {
    fn delta(&mut self, bytes: &[u8]) -> io::Result<()> {
        if matches!(self.state, Receiving::Start) {
            self.state = Receiving::Delta(Vec::new());
        }
        self.fetched += bytes.len() as u64;
        let Receiving::Delta(delta) = &mut self.state else {
            return Err(io::Error::other("the sender mixed a delta with other data"));
        };
        // A delta is never larger than the file it makes (the sender sends the file then).
        if (delta.len() + bytes.len()) as u64 > crate::delta::DELTA_MAX_FILE {
            return Err(io::Error::other(
                "the sender's delta is larger than any file it may make",
            ));
        }
        delta.extend_from_slice(bytes);
        Ok(())
    }

    fn data(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.whole = self.whole.saturating_add(bytes.len() as u64);
        if self.whole > self.planned {
            return Err(self.beyond_plan(format!("sent {} bytes", self.whole)));
        }
        if matches!(self.state, Receiving::Start) {
            let temp = self.temp()?;
            self.state = Receiving::Whole(temp);
        }
        self.fetched += bytes.len() as u64;
        let Receiving::Whole(temp) = &mut self.state else {
            return Err(io::Error::other(
                "the sender mixed whole-file and block data",
            ));
        };
        let written = temp.writer().write_all(bytes);
        written.map_err(|err| {
            let err = self.root.error(&self.path, "writing", err);
            self.fail(err)
        })
    }

    fn hole(&mut self, len: u64) -> io::Result<()> {
        self.whole = self.whole.saturating_add(len);
        if self.whole > self.planned {
            return Err(self.beyond_plan(format!("sent {} bytes", self.whole)));
        }
        if matches!(self.state, Receiving::Start) {
            let temp = self.temp()?;
            self.state = Receiving::Whole(temp);
        }
        let Receiving::Whole(temp) = &mut self.state else {
            return Err(io::Error::other(
                "the sender mixed whole-file and block data",
            ));
        };
        temp.writer().hole(len);
        Ok(())
    }

    fn changes(&mut self, changed: u64, size: u64) -> io::Result<()> {
        if !matches!(self.state, Receiving::Start) {
            return Err(io::Error::other("the sender announced changes twice"));
        }
        if size != self.planned || changed > size {
            return Err(self.beyond_plan(format!(
                "announced {changed} changed bytes of a {size}-byte file"
            )));
        }
        if let Some(known) = &self.known
            && changed.saturating_mul(PATCH_MAX_SHARE) <= size
            && let Ok(patch) = Patch::begin(self.root, &self.path, known.clone(), size, changed)
        {
            self.state = Receiving::Patch(Box::new(patch));
            return Ok(());
        }
        self.rebuild()
    }

    fn at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        if offset
            .checked_add(bytes.len() as u64)
            .is_none_or(|end| end > self.planned)
        {
            return Err(self.beyond_plan(format!("sent {} bytes at offset {offset}", bytes.len())));
        }
        if matches!(self.state, Receiving::Start) {
            self.rebuild()?;
        }
        self.fetched += bytes.len() as u64;
        let result = match &mut self.state {
            Receiving::Rebuild { temp, old, pos } => {
                let mut out = temp.writer();
                let result = keep_old(old, *pos, offset, &mut self.buf, &mut out)
                    .and_then(|()| out.write_all(bytes));
                *pos = offset + bytes.len() as u64;
                result.map_err(|err| self.root.error(&self.path, "writing", err))
            }
            Receiving::Patch(patch) => patch.at(offset, bytes).map_err(|err| match err {
                PatchError::Apply(err) => err,
                other => {
                    self.root
                        .error(&self.path, "receiving", io::Error::other(other.to_string()))
                }
            }),
            _ => Err(self.root.error(
                &self.path,
                "receiving",
                io::Error::other("the sender mixed whole-file and block data"),
            )),
        };
        result.map_err(|err| self.fail(err))
    }
}

/// How a fetched file ended.
pub(super) enum Received {
    /// A verified new version, to rename into place with its group.
    Staged(Staged),
    /// The old file was patched in place and is done.
    Patched(PatchedList),
    /// The patch did not verify (or the file changed here): fetch the whole file.
    Refetch(String),
}

/// Copies bytes `from..to` of the old version, which the sender said are unchanged.
fn keep_old(
    old: &File,
    from: u64,
    to: u64,
    buf: &mut Vec<u8>,
    out: &mut dyn Write,
) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    if to < from {
        return Err(io::Error::other("the sender's changes are out of order"));
    }
    buf.resize(CHUNK.min((to - from) as usize).max(buf.len()), 0);
    let mut at = from;
    while at < to {
        let n = buf.len().min((to - at) as usize);
        old.read_exact_at(&mut buf[..n], at)?;
        out.write_all(&buf[..n])?;
        at += n as u64;
    }
    Ok(())
}

/// Buffer size for copies.
const CHUNK: usize = 256 * 1024;
