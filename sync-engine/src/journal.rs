//! Changing a large file in place, crash-safely: a redo journal.
//!
//! When a few blocks of a large file changed (a recording growing, a database page written),
//! rewriting the whole file to a temporary copy costs a full read, write and fsync of it. A
//! [`Patch`] instead streams the changed blocks into a journal beside the root
//! ([`JOURNAL_NAME`]), computing their BLAKE3 chaining values on the way; at the end the new
//! file's root hash is rebuilt from those values and the receiver's own (from its index) and
//! must equal the sender's. Only then is the journal sealed (a trailer with the hash of
//! everything before it) and synced, the blocks written into the file, the file synced and
//! the journal removed.
//!
//! A crash before the seal leaves the old file untouched (the journal is discarded by
//! [`recover`]); a crash after it is finished by [`recover`], which writes the blocks again.
//! Either way each file is its old version or its new one.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt};

use lbs_protocol::RelPath;
use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::Mode;
use nix::unistd::{UnlinkatFlags, unlinkat};

use crate::apply::{ApplyError, Durability, Root, Target};
use crate::index::{Known, PatchedList};
use crate::tree::{Cv, RootBuilder, block_cv};

/// The journal's name in the root directory; scans skip it.
pub const JOURNAL_NAME: &str = ".lbs-journal";
const MAGIC: &[u8; 8] = b"LBSJRNL1";
/// Marks the trailer where a record's offset would be.
const SEAL: u64 = u64::MAX;
/// No record is longer than this (a transfer chunk is 256 KiB).
const MAX_RECORD: u32 = 4 << 20;

/// Why a patch could not be used; the caller falls back to writing a whole new version.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// The change does not fit a patch (sizes, alignment, a block the receiver lacks).
    #[error("{0}")]
    Unfit(String),
    /// The file changed on this box since it was indexed.
    #[error("the file changed on this box since it was indexed")]
    Changed,
    /// The result would not hash to the sender's hash.
    #[error("patched content would hash to {got}, the sender announced {want}")]
    Mismatch {
        /// The sender's hash.
        want: blake3::Hash,
        /// What the patch would give.
        got: blake3::Hash,
    },
    /// Writing the journal or the file failed.
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

/// An in-place change being received (see the module documentation).
#[derive(Debug)]
pub struct Patch<'r> {
    root: &'r Root,
    rel: RelPath,
    known: Known,
    size: u64,
    journal: Option<BufWriter<File>>,
    digest: blake3::Hasher,
    /// Chaining values of the blocks received so far, by block number (as many as were
    /// sent, whatever the announced size).
    received: std::collections::BTreeMap<u64, Cv>,
    /// Blocks of the result.
    blocks: u64,
    /// Where the next block may start (the sender sends them in order).
    next: u64,
    bytes: u64,
}

impl<'r> Patch<'r> {
    /// Starts receiving `changed` bytes of changes that make `rel` (currently `known`) a
    /// `size`-byte file.
    pub fn begin(
        root: &'r Root,
        rel: &RelPath,
        known: Known,
        size: u64,
        changed: u64,
    ) -> Result<Patch<'r>, PatchError> {
        let bs = known.block_size.get();
        if size <= bs || known.meta.size <= bs {
            return Err(PatchError::Unfit("single-block file".into()));
        }
        // Every block of the result is one held here or one sent: a size beyond that cannot
        // be patched (and is never allocated for).
        let blocks = known.block_size.blocks_for(size);
        let possible = known
            .blocks
            .len()
            .saturating_add(known.block_size.blocks_for(changed))
            .saturating_add(1);
        if blocks > possible {
            return Err(PatchError::Unfit(format!(
                "{blocks} blocks cannot come from {} held and {changed} bytes sent",
                known.blocks.len()
            )));
        }
        let file = root
            .create_at_root(JOURNAL_NAME)
            .map_err(|err| PatchError::Apply(root.error(rel, "creating the journal", err)))?;
        let mut patch = Patch {
            root,
            rel: rel.clone(),
            received: std::collections::BTreeMap::new(),
            blocks,
            known,
            size,
            journal: Some(BufWriter::with_capacity(1 << 20, file)),
            digest: blake3::Hasher::new(),
            next: 0,
            bytes: 0,
        };
        let path = rel.as_bytes();
        let mut header = Vec::with_capacity(64 + path.len());
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&(path.len() as u32).to_le_bytes());
        header.extend_from_slice(path);
        header.extend_from_slice(&size.to_le_bytes());
        header.extend_from_slice(&patch.known.meta.inode.to_le_bytes());
        patch.write(&header)?;
        Ok(patch)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), PatchError> {
        self.digest.update(bytes);
        let journal = self
            .journal
            .as_mut()
            .ok_or_else(|| PatchError::Unfit("the journal is closed".into()))?;
        journal.write_all(bytes).map_err(|err| {
            PatchError::Apply(self.root.error(&self.rel, "writing the journal", err))
        })
    }

    /// Bytes of changed blocks received.
    pub fn received_bytes(&self) -> u64 {
        self.bytes
    }

    /// Changed bytes at `offset`: whole blocks, the last one possibly short at the file's end.
    pub fn at(&mut self, offset: u64, bytes: &[u8]) -> Result<(), PatchError> {
        let bs = self.known.block_size.get();
        let end = offset.saturating_add(bytes.len() as u64);
        if !offset.is_multiple_of(bs) || offset < self.next || end > self.size || bytes.is_empty() {
            return Err(PatchError::Unfit(format!(
                "changed bytes {offset}..{end} do not fit the file's blocks"
            )));
        }
        if !end.is_multiple_of(bs) && end != self.size {
            return Err(PatchError::Unfit(format!(
                "changed bytes end at {end}, inside a block"
            )));
        }
        for (i, block) in bytes.chunks(bs as usize).enumerate() {
            let index = offset / bs + i as u64;
            self.received
                .insert(index, block_cv(block, index, self.known.block_size));
        }
        let mut record = Vec::with_capacity(12);
        record.extend_from_slice(&offset.to_le_bytes());
        record.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        self.write(&record)?;
        self.write(bytes)?;
        self.next = end;
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    /// Verifies the result (`size` bytes, as the sender ended it) against `expected`, then seals
    /// the journal and changes the file in place with `target`'s metadata. Returns the new
    /// version's tree hash.
    pub fn finish(
        self,
        size: u64,
        expected: &blake3::Hash,
        target: &Target,
    ) -> Result<PatchedList, PatchError> {
        Ok(self.seal(size, expected)?.apply(target)?)
    }

    /// The first half of [`Patch::finish`]: verifies the result and seals the journal, on
    /// disk. The file is not touched yet; from here on a crash is finished by [`recover`].
    pub fn seal(mut self, size: u64, expected: &blake3::Hash) -> Result<Sealed<'r>, PatchError> {
        if size != self.size {
            return Err(PatchError::Unfit(format!(
                "the sender ended at {size} bytes after announcing {}",
                self.size
            )));
        }
        let bs = self.known.block_size;
        // Each block is one sent or one held: more than both together cannot be rebuilt.
        let held = self
            .known
            .blocks
            .len()
            .saturating_add(self.received.len() as u64);
        if self.blocks > held {
            return Err(PatchError::Unfit(format!(
                "{} blocks, {} sent and {} held here",
                self.blocks,
                self.received.len(),
                self.known.blocks.len()
            )));
        }
        // The old values are read in order (a part at a time when stored), the received ones
        // put in their places, and the hash rebuilt as they go.
        let mut old = self.known.blocks.iter();
        let old_count = self.known.blocks.len();
        let mut rebuilt = RootBuilder::default();
        for index in 0..self.blocks {
            let held = if index < old_count { old.next() } else { None };
            match self.received.get(&index).copied().or(held) {
                Some(cv) => rebuilt.push(cv),
                None => {
                    return Err(PatchError::Unfit(format!(
                        "block {index} was neither sent nor held here"
                    )));
                }
            }
        }
        drop(old);
        let root_hash = rebuilt
            .finish(bs, self.size)
            .ok()
            .flatten()
            .ok_or_else(|| PatchError::Unfit("cannot rebuild the root hash".into()))?;
        if root_hash != *expected {
            return Err(PatchError::Mismatch {
                want: *expected,
                got: root_hash,
            });
        }
        let file = self.open_target()?;
        // Only the version that was indexed may be patched.
        let now = file
            .metadata()
            .map_err(|err| self.root.error(&self.rel, "reading metadata", err))?;
        let meta = &self.known.meta;
        if now.len() != meta.size
            || now.ino() != meta.inode
            || now.mtime() * 1_000_000_000 + now.mtime_nsec() != meta.mtime_ns
            || now.ctime() * 1_000_000_000 + now.ctime_nsec() != meta.ctime_ns
            || now.nlink() != 1
        {
            return Err(PatchError::Changed);
        }
        let mut trailer = SEAL.to_le_bytes().to_vec();
        trailer.extend_from_slice(&0u32.to_le_bytes());
        self.write(&trailer)?;
        let seal = *self.digest.finalize().as_bytes();
        let mut journal = self
            .journal
            .take()
            .ok_or_else(|| PatchError::Unfit("the journal is closed".into()))?;
        journal
            .write_all(&seal)
            .and_then(|()| journal.flush())
            .map_err(|err| self.root.error(&self.rel, "writing the journal", err))?;
        let journal = journal.into_inner().map_err(|err| {
            self.root
                .error(&self.rel, "writing the journal", err.into_error())
        })?;
        self.root
            .durable(&journal, &self.rel, "syncing the journal")?;
        self.root.durable_root(&self.rel)?;
        Ok(Sealed {
            root: self.root,
            rel: self.rel.clone(),
            file,
            journal,
            tree: PatchedList {
                len: self.size,
                block_size: bs,
                root: root_hash,
                old: self.known.blocks.clone(),
                changed: std::mem::take(&mut self.received),
            },
        })
    }

    fn open_target(&self) -> Result<File, PatchError> {
        let dir = self.root.parent_dir(&self.rel, false)?;
        openat(
            dir.as_fd(),
            self.rel.file_name(),
            OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
            Mode::empty(),
        )
        .map(File::from)
        .map_err(|err| PatchError::Apply(self.root.error(&self.rel, "opening", err)))
    }
}

/// A verified, sealed patch whose blocks are not yet in the file (see [`Patch::seal`]).
/// Dropped without [`Sealed::apply`] (or when applying fails half way), its journal stays for
/// [`recover`], and no other patch starts in this root until then (the journal is created
/// exclusively): other changed files are rewritten whole meanwhile.
#[derive(Debug)]
pub struct Sealed<'r> {
    root: &'r Root,
    rel: RelPath,
    file: File,
    journal: File,
    tree: PatchedList,
}

impl Sealed<'_> {
    /// Writes the blocks into the file, gives it `target`'s metadata, syncs it and removes
    /// the journal. Returns the new version's tree hash.
    pub fn apply(self, target: &Target) -> Result<PatchedList, ApplyError> {
        replay(self.root, &self.journal, &self.rel, &self.file)?;
        self.root.set_file_meta(&self.file, &self.rel, target)?;
        self.root
            .durable(&self.file, &self.rel, "syncing the file")?;
        drop(self.journal);
        self.root.remove_at_root(JOURNAL_NAME);
        self.root.durable_root(&self.rel)?;
        Ok(self.tree)
    }
}

impl Drop for Patch<'_> {
    fn drop(&mut self) {
        if self.journal.take().is_some() {
            // Abandoned before it was sealed: the file was never touched.
            self.root.remove_at_root(JOURNAL_NAME);
        }
    }
}

/// What [`recover`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// No journal: the last run ended cleanly.
    Clean,
    /// A sealed journal was replayed: this file now holds its new version.
    Finished(RelPath),
    /// An unsealed journal was thrown away: the file kept its old version.
    Discarded(String),
}

/// Finishes or discards what a crashed run left in `root`'s journal. Run it before anything
/// else touches the root.
pub fn recover(root: &Root) -> Result<Recovery, ApplyError> {
    let journal = match root.open_at_root(JOURNAL_NAME) {
        Ok(file) => file,
        Err(Errno::ENOENT) => return Ok(Recovery::Clean),
        Err(err) => {
            return Err(ApplyError::Root {
                root: root.path().to_owned(),
                source: io::Error::other(format!("opening the journal: {err}")),
            });
        }
    };
    let outcome = match check(&journal) {
        Ok((rel, inode)) => {
            let target = root.parent_dir(&rel, false).and_then(|dir| {
                openat(
                    dir.as_fd(),
                    rel.file_name(),
                    OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
                    Mode::empty(),
                )
                .map(File::from)
                .map_err(|err| root.error(&rel, "opening", err))
            });
            match target {
                Ok(file) if file.metadata().map(|m| m.ino()).ok() == Some(inode) => {
                    replay(root, &journal, &rel, &file)?;
                    root.durable(&file, &rel, "syncing the file")?;
                    Recovery::Finished(rel)
                }
                _ => Recovery::Discarded(format!(
                    "{rel} is no longer the file the journal was written for"
                )),
            }
        }
        Err(reason) => Recovery::Discarded(reason),
    };
    drop(journal);
    root.remove_at_root(JOURNAL_NAME);
    let anchor = RelPath::from_bytes(JOURNAL_NAME).map_err(|err| ApplyError::Root {
        root: root.path().to_owned(),
        source: io::Error::other(err.to_string()),
    })?;
    root.durable_root(&anchor)?;
    Ok(outcome)
}

/// Reads a journal through, checking its seal; returns the file it is for and its inode.
fn check(journal: &File) -> Result<(RelPath, u64), String> {
    let fail = |what: &str| format!("journal unfinished or damaged ({what})");
    let mut reader = Reader::new(journal).map_err(|_| fail("unreadable"))?;
    let magic = reader.take(8).map_err(|_| fail("header"))?;
    if magic != MAGIC {
        return Err(fail("not an lbs journal"));
    }
    let len = reader.u32().map_err(|_| fail("header"))?;
    if len > 4096 {
        return Err(fail("path too long"));
    }
    let path = reader.take(len as usize).map_err(|_| fail("header"))?;
    let rel = RelPath::from_bytes(path).map_err(|e| fail(&e.to_string()))?;
    let _size = reader.u64().map_err(|_| fail("header"))?;
    let inode = reader.u64().map_err(|_| fail("header"))?;
    loop {
        let offset = reader.u64().map_err(|_| fail("record"))?;
        let len = reader.u32().map_err(|_| fail("record"))?;
        if offset == SEAL {
            let digest = *reader.digest.finalize().as_bytes();
            let mut seal = [0u8; 32];
            reader
                .inner
                .read_exact(&mut seal)
                .map_err(|_| fail("seal"))?;
            return if seal == digest {
                Ok((rel, inode))
            } else {
                Err(fail("seal does not match"))
            };
        }
        if len > MAX_RECORD {
            return Err(fail("record too long"));
        }
        reader.skip(len as u64).map_err(|_| fail("record"))?;
    }
}

/// Writes a sealed journal's records into `file` and sets its length.
fn replay(root: &Root, journal: &File, rel: &RelPath, file: &File) -> Result<(), ApplyError> {
    let io_err = |err: io::Error| root.error(rel, "writing changed blocks", err);
    let mut reader = Reader::new(journal).map_err(io_err)?;
    reader.take(8).map_err(io_err)?;
    let len = reader.u32().map_err(io_err)?;
    reader.take(len as usize).map_err(io_err)?;
    let size = reader.u64().map_err(io_err)?;
    reader.u64().map_err(io_err)?;
    loop {
        let offset = reader.u64().map_err(io_err)?;
        let len = reader.u32().map_err(io_err)?;
        if offset == SEAL {
            break;
        }
        let bytes = reader.take(len.min(MAX_RECORD) as usize).map_err(io_err)?;
        file.write_all_at(&bytes, offset).map_err(io_err)?;
    }
    file.set_len(size).map_err(io_err)
}

/// Sequential reads of a journal, hashing what it reads.
struct Reader<'f> {
    inner: BufReader<&'f File>,
    digest: blake3::Hasher,
}

impl<'f> Reader<'f> {
    /// Reads `file` from its start.
    fn new(mut file: &'f File) -> io::Result<Reader<'f>> {
        file.seek(SeekFrom::Start(0))?;
        Ok(Reader {
            inner: BufReader::with_capacity(1 << 20, file),
            digest: blake3::Hasher::new(),
        })
    }

    fn take(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut bytes = vec![0u8; n];
        self.inner.read_exact(&mut bytes)?;
        self.digest.update(&bytes);
        Ok(bytes)
    }

    fn skip(&mut self, mut n: u64) -> io::Result<()> {
        let mut buf = [0u8; 64 * 1024];
        while n > 0 {
            let step = n.min(buf.len() as u64) as usize;
            self.inner.read_exact(&mut buf[..step])?;
            self.digest.update(&buf[..step]);
            n -= step as u64;
        }
        Ok(())
    }

    fn u32(&mut self) -> io::Result<u32> {
        let bytes = self.take(4)?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn u64(&mut self) -> io::Result<u64> {
        let bytes = self.take(8)?;
        let mut array = [0u8; 8];
        array.copy_from_slice(&bytes);
        Ok(u64::from_le_bytes(array))
    }
}

impl Durability {
    fn syncs(self) -> bool {
        self != Durability::Off
    }
}

impl Root {
    /// Syncs `fd` unless durability is off (a patch is always synced step by step: its
    /// journal must be on disk before the file changes).
    pub(crate) fn durable(
        &self,
        fd: &impl AsFd,
        rel: &RelPath,
        what: &'static str,
    ) -> Result<(), ApplyError> {
        if self.durability().syncs() {
            nix::unistd::fsync(fd.as_fd()).map_err(|err| self.error(rel, what, err))?;
        }
        Ok(())
    }

    /// Syncs the root directory itself (the journal's entry) unless durability is off.
    pub(crate) fn durable_root(&self, rel: &RelPath) -> Result<(), ApplyError> {
        self.durable(&self.handle(), rel, "syncing the root directory")
    }

    fn create_at_root(&self, name: &str) -> nix::Result<File> {
        openat(
            self.handle().as_fd(),
            name,
            // Never over an existing journal: a sealed one must be replayed first.
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map(File::from)
    }

    fn open_at_root(&self, name: &str) -> nix::Result<File> {
        openat(
            self.handle().as_fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map(File::from)
    }

    fn remove_at_root(&self, name: &str) {
        let _ = unlinkat(self.handle().as_fd(), name, UnlinkatFlags::NoRemoveDir);
    }
}
