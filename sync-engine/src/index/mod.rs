//! The persistent index of one sync root: for every entry its metadata, and for every regular
//! file its BLAKE3 hash and per-block chaining values, so that
//! - a pass over an unchanged tree costs one `lstat` per entry and reads no file, and
//! - a side never re-reads its own file to compare blocks.
//!
//! Stored in one SQLite file (WAL). An entry's hash is trusted only while the file's content
//! key — size, mtime, ctime, inode — is unchanged, and never when the file was modified in the
//! same moment it was hashed (the "racy" flag: such a file is hashed again on the next pass).

use std::path::Path;

use lbs_protocol::RelPath;
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OptionalExtension, params};

use crate::tree::{BlockSize, Cv};

mod lists;
pub use lists::{BlockList, PatchedList, StoredParts};

/// What an entry is.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum EntryKind {
    /// A regular file.
    File,
    Dir,
    /// A symbolic link, copied as a link (never followed); the target as raw bytes.
    Symlink(Vec<u8>),
}

impl EntryKind {
    fn code(&self) -> i64 {
        match self {
            EntryKind::File => 0,
            EntryKind::Dir => 1,
            EntryKind::Symlink(_) => 2,
        }
    }
}

/// The receiver's current version of a file, as its index knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Known {
    /// Block size of `blocks`.
    pub block_size: BlockSize,
    /// Its per-block chaining values.
    pub blocks: BlockList,
    /// Its metadata when indexed (size, mtime, ctime, inode: the content key).
    pub meta: Meta,
}

/// The metadata lbs carries and compares.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Meta {
    /// Length in bytes (files), 0 otherwise.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Status-change time, nanoseconds since the epoch (local only: it cannot be carried).
    pub ctime_ns: i64,
    /// Inode number (local only).
    pub inode: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner user id on this box.
    pub uid: u32,
    /// Owner group id on this box.
    pub gid: u32,
    /// Owner user name, carried instead of the id (ids differ between boxes).
    pub owner: String,
    /// Owner group name.
    pub group: String,
}

impl Meta {
    /// Whether the file's content may have changed between two observations: any change of
    /// size, mtime, ctime or inode means the stored hash can no longer be trusted.
    pub fn content_key_matches(&self, other: &Meta) -> bool {
        self.size == other.size
            && self.mtime_ns == other.mtime_ns
            && self.ctime_ns == other.ctime_ns
            && self.inode == other.inode
    }
}

/// A file's content hash as the index keeps it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ContentHash {
    /// The BLAKE3 hash of the whole file.
    pub root: [u8; 32],
    /// Whether the file changed in the same moment it was hashed; if so the next pass hashes
    /// it again even when its metadata looks unchanged.
    pub racy: bool,
}

/// One indexed entry (per-block values are loaded separately, by [`Index::blocks`]).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Entry {
    /// Where it is, relative to the root.
    pub path: RelPath,
    /// What it is.
    pub kind: EntryKind,
    pub meta: Meta,
    /// Regular files: the content hash.
    pub hash: Option<ContentHash>,
}

/// Why the index could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// SQLite failed.
    #[error("index {path}: {source}")]
    Sqlite {
        /// The index file.
        path: String,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// A stored row is not valid (a corrupt or foreign index file).
    #[error("index {path}: corrupt entry {what}; delete the index file to rebuild it")]
    Corrupt {
        /// The index file.
        path: String,
        /// What was wrong.
        what: String,
    },
}

/// The current schema; [`Index::open`] migrates older ones forward.
/// 1: block lists in the `entries` row. 2: block lists in `blocks`, in parts.
const SCHEMA_VERSION: i64 = 2;

/// Lists are stored a part ([`PART_CVS`] values) per row of `blocks`: SQLite never builds one
/// record of a large file's list (a 10 GiB file's is 20 MiB, and SQLite held two copies of it
/// while writing the row).
pub use crate::tree::PART_CVS;

/// The index of one sync root.
#[derive(Debug)]
pub struct Index {
    conn: Connection,
    location: String,
    /// What [`Index::remember`] kept, with SQLite's `data_version` at that moment.
    remembered: Option<(i64, Vec<Entry>)>,
    /// Batches begun on this handle ([`Index::writes`]).
    writes: u64,
}

impl Index {
    /// Opens (creating if needed) the index stored at `path`.
    pub fn open(path: &Path) -> Result<Index, IndexError> {
        let location = path.display().to_string();
        let conn = Connection::open(path).map_err(|source| IndexError::Sqlite {
            path: location.clone(),
            source,
        })?;
        Self::init(conn, location)
    }

    /// An index in memory, for tests and one-off comparisons.
    pub fn in_memory() -> Result<Index, IndexError> {
        let location = ":memory:".to_owned();
        let conn = Connection::open_in_memory().map_err(|source| IndexError::Sqlite {
            path: location.clone(),
            source,
        })?;
        Self::init(conn, location)
    }

    fn init(conn: Connection, location: String) -> Result<Index, IndexError> {
        let index = Index {
            conn,
            location,
            remembered: None,
            writes: 0,
        };
        index
            .conn
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = NORMAL;
                 PRAGMA foreign_keys = ON;",
            )
            .map_err(|e| index.sqlite(e))?;
        // Closing leaves the write-ahead log for the next opening instead of copying it into
        // the database and syncing both (20-35 ms at the end of every `lbs sync pull`, seen
        // with strace): the log is as valid then as now, and SQLite folds it in once it
        // holds 1,000 pages, whoever has the index open.
        index
            .conn
            .set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
            .map_err(|e| index.sqlite(e))?;
        let version: i64 = index
            .conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(|e| index.sqlite(e))?;
        if version > SCHEMA_VERSION {
            return Err(index.corrupt(format!(
                "schema version {version} is newer than this lbs understands ({SCHEMA_VERSION})"
            )));
        }
        if version < 1 {
            index
                .conn
                .execute_batch(
                    "BEGIN;
                     CREATE TABLE entries (
                         path BLOB PRIMARY KEY NOT NULL,
                         kind INTEGER NOT NULL,
                         link_target BLOB,
                         size INTEGER NOT NULL,
                         mtime_ns INTEGER NOT NULL,
                         ctime_ns INTEGER NOT NULL,
                         inode INTEGER NOT NULL,
                         mode INTEGER NOT NULL,
                         uid INTEGER NOT NULL,
                         gid INTEGER NOT NULL,
                         owner TEXT NOT NULL,
                         grp TEXT NOT NULL,
                         blake3 BLOB,
                         racy INTEGER NOT NULL DEFAULT 0,
                         block_size INTEGER,
                         blocks BLOB
                     ) WITHOUT ROWID;
                     PRAGMA user_version = 1;
                     COMMIT;",
                )
                .map_err(|e| index.sqlite(e))?;
        }
        if version < 2 {
            index.move_block_lists_into_parts()?;
        }
        Ok(index)
    }

    /// Schema 1 → 2: each row's block list into parts in `blocks`, one row at a time.
    fn move_block_lists_into_parts(&self) -> Result<(), IndexError> {
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(|e| self.sqlite(e))?;
        tx.execute_batch(
            "CREATE TABLE blocks (
                 path BLOB NOT NULL,
                 part INTEGER NOT NULL,
                 cvs BLOB NOT NULL,
                 PRIMARY KEY (path, part)
             );",
        )
        .map_err(|e| self.sqlite(e))?;
        let paths: Vec<Vec<u8>> = tx
            .prepare("SELECT path FROM entries WHERE blocks IS NOT NULL")
            .and_then(|mut stmt| {
                stmt.query_map([], |row| row.get(0))?
                    .collect::<Result<_, _>>()
            })
            .map_err(|e| self.sqlite(e))?;
        for path in paths {
            let list: Vec<u8> = tx
                .query_row(
                    "SELECT blocks FROM entries WHERE path = ?1",
                    [&path],
                    |row| row.get(0),
                )
                .map_err(|e| self.sqlite(e))?;
            let (cvs, rest) = list.as_chunks::<32>();
            if !rest.is_empty() {
                // Not whole values: drop the hash too, so the next pass hashes the file again.
                tx.execute(
                    "UPDATE entries SET blake3 = NULL, block_size = NULL WHERE path = ?1",
                    [&path],
                )
                .map_err(|e| self.sqlite(e))?;
                continue;
            }
            write_parts(&tx, &path, cvs).map_err(|e| self.sqlite(e))?;
        }
        tx.execute_batch("UPDATE entries SET blocks = NULL; PRAGMA user_version = 2;")
            .map_err(|e| self.sqlite(e))?;
        tx.commit().map_err(|e| self.sqlite(e))
    }

    fn sqlite(&self, source: rusqlite::Error) -> IndexError {
        IndexError::Sqlite {
            path: self.location.clone(),
            source,
        }
    }

    fn corrupt(&self, what: String) -> IndexError {
        IndexError::Corrupt {
            path: self.location.clone(),
            what,
        }
    }

    /// Every entry, sorted by path (without per-block values).
    pub fn entries(&self) -> Result<Vec<Entry>, IndexError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {ENTRY_COLUMNS} FROM entries ORDER BY path"
            ))
            .map_err(|e| self.sqlite(e))?;
        let rows = stmt
            .query_map([], raw_entry)
            .map_err(|e| self.sqlite(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.sqlite(e))?;
        rows.into_iter().map(|raw| self.entry(raw)).collect()
    }

    /// One entry.
    pub fn get(&self, path: &RelPath) -> Result<Option<Entry>, IndexError> {
        let raw = self
            .conn
            .prepare_cached(&format!(
                "SELECT {ENTRY_COLUMNS} FROM entries WHERE path = ?1"
            ))
            .map_err(|e| self.sqlite(e))?
            .query_row([path.as_bytes()], raw_entry)
            .optional()
            .map_err(|e| self.sqlite(e))?;
        raw.map(|raw| self.entry(raw)).transpose()
    }

    /// The entries of `paths`, in their order, read in one transaction: one pair of lock
    /// calls for the lot instead of one per path (a sender's batch of small files).
    pub fn get_each<'p>(
        &self,
        paths: impl IntoIterator<Item = &'p RelPath>,
    ) -> Result<Vec<Option<Entry>>, IndexError> {
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(|e| self.sqlite(e))?;
        let entries = paths
            .into_iter()
            .map(|path| self.get(path))
            .collect::<Result<Vec<_>, _>>()?;
        tx.finish().map_err(|e| self.sqlite(e))?;
        Ok(entries)
    }

    /// The per-block chaining values stored for a file, if any.
    pub fn blocks(&self, path: &RelPath) -> Result<Option<(BlockSize, Vec<Cv>)>, IndexError> {
        read_blocks(&self.conn, path).map_err(|e| e.at(&self.location))
    }

    /// One part of a file's block list (values `part * PART_CVS` onwards), if stored.
    pub fn block_part(&self, path: &RelPath, part: u64) -> Result<Option<Vec<Cv>>, IndexError> {
        read_part(&self.conn, path, part).map_err(|e| e.at(&self.location))
    }

    /// Stages part `part` of the list of a file being written, at once (outside any batch):
    /// a large new file's list goes here as it is made, and [`crate::record_installed`]
    /// makes it the file's list once the file is in place.
    pub fn stage_part(&mut self, path: &RelPath, part: u64, cvs: &[Cv]) -> Result<(), IndexError> {
        let batch = self.batch()?;
        batch.stage_part(path, part, cvs)?;
        batch.commit()
    }

    /// Forgets every staged list: what a pass stopped half way left. Entries are untouched
    /// (what [`Index::remember`] kept stays current).
    pub fn drop_all_staged(&mut self) -> Result<(), IndexError> {
        self.conn
            .execute("DELETE FROM blocks WHERE path < x'01'", [])
            .map_err(|e| self.sqlite(e))?;
        Ok(())
    }

    /// The block size of the list stored for `path`, if it has one.
    pub fn block_size(&self, path: &RelPath) -> Result<Option<BlockSize>, IndexError> {
        stored_block_size(&self.conn, path).map_err(|e| e.at(&self.location))
    }

    /// What the index knows of a file that has a hash and block values: the basis for
    /// receiving only its changed blocks. A racy hash (taken in the second the file was
    /// written) serves too: whatever is built on it is verified against the sender's hash,
    /// and a patch is refused if the file's content key moved since it was indexed.
    pub fn known(&self, path: &RelPath) -> Result<Option<Known>, IndexError> {
        let Some(entry) = self.get(path)? else {
            return Ok(None);
        };
        if entry.kind != EntryKind::File || entry.hash.is_none() {
            return Ok(None);
        }
        Ok(self.blocks(path)?.map(|(block_size, blocks)| Known {
            block_size,
            blocks: BlockList::Held(blocks.into()),
            meta: entry.meta,
        }))
    }

    /// Every entry, sorted by path, like [`Index::entries`] — but what [`Index::remember`]
    /// kept, if nothing changed the index since, instead of reading them all again (a server
    /// scanning a large tree for each reconcile saves the read).
    pub fn take_entries(&mut self) -> Result<Vec<Entry>, IndexError> {
        if let Some((version, entries)) = self.remembered.take()
            && version == self.data_version()?
        {
            return Ok(entries);
        }
        self.entries()
    }

    /// Keeps `entries` — exactly what the index holds now, as [`crate::scan::scan_from`]
    /// returned them — for the next [`Index::take_entries`]. Any batch on this handle, or a
    /// change by another process, makes it forget them.
    pub fn remember(&mut self, entries: Vec<Entry>) -> Result<(), IndexError> {
        self.remembered = Some((self.data_version()?, entries));
        Ok(())
    }

    /// Whether the next [`Index::take_entries`] comes from memory (what [`Index::remember`]
    /// kept, still current as far as this handle knows).
    pub fn remembers(&self) -> bool {
        self.remembered.is_some()
    }

    /// How many batches were begun on this handle: the same count at two moments means its
    /// entries did not change in between (another connection's changes are
    /// [`Index::remember`]'s to notice).
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// SQLite's counter of changes committed by other connections.
    fn data_version(&self) -> Result<i64, IndexError> {
        self.conn
            .query_row("PRAGMA data_version", [], |row| row.get(0))
            .map_err(|e| self.sqlite(e))
    }

    /// Starts a batch of changes applied all at once (or not at all) by [`Batch::commit`].
    pub fn batch(&mut self) -> Result<Batch<'_>, IndexError> {
        self.remembered = None;
        self.writes += 1;
        let location = self.location.clone();
        let tx = self
            .conn
            .transaction()
            .map_err(|source| IndexError::Sqlite {
                path: location.clone(),
                source,
            })?;
        Ok(Batch { tx, location })
    }

    fn entry(&self, raw: RawEntry) -> Result<Entry, IndexError> {
        let path = RelPath::from_bytes(raw.path).map_err(|e| self.corrupt(e.to_string()))?;
        let kind = match (raw.kind, raw.link_target) {
            (0, _) => EntryKind::File,
            (1, _) => EntryKind::Dir,
            (2, Some(target)) => EntryKind::Symlink(target),
            (kind, _) => return Err(self.corrupt(format!("{path}: kind {kind}"))),
        };
        let hash = match (kind == EntryKind::File, raw.blake3) {
            (true, Some(bytes)) => {
                let root: [u8; 32] = bytes
                    .try_into()
                    .map_err(|_| self.corrupt(format!("{path}: hash length")))?;
                Some(ContentHash {
                    root,
                    racy: raw.racy,
                })
            }
            (true, None) => None,
            (false, _) => None,
        };
        Ok(Entry {
            path,
            kind,
            meta: raw.meta,
            hash,
        })
    }
}

/// Changes to an [`Index`], committed atomically.
#[derive(Debug)]
pub struct Batch<'a> {
    tx: rusqlite::Transaction<'a>,
    location: String,
}

impl Batch<'_> {
    fn sqlite(&self, source: rusqlite::Error) -> IndexError {
        IndexError::Sqlite {
            path: self.location.clone(),
            source,
        }
    }

    /// Runs one (cached) statement of the batch.
    fn run(&self, sql: &str, params: impl rusqlite::Params) -> Result<(), IndexError> {
        self.tx
            .prepare_cached(sql)
            .and_then(|mut statement| statement.execute(params))
            .map(drop)
            .map_err(|e| self.sqlite(e))
    }

    /// Records an entry; for files with fresh hashes, also their per-block values.
    pub fn put(&self, entry: &Entry, blocks: Option<(BlockSize, &[Cv])>) -> Result<(), IndexError> {
        self.put_entry(entry, blocks.map(|(size, _)| size))?;
        self.truncate_parts(&entry.path, 0)?;
        if let Some((_, cvs)) = blocks {
            write_parts(&self.tx, entry.path.as_bytes(), cvs).map_err(|e| self.sqlite(e))?;
        }
        Ok(())
    }

    /// Stages part `part` of a new block list for `path` (values `part * PART_CVS` onwards;
    /// at most [`PART_CVS`] of them): lists too long to hold are stored as they are made,
    /// beside the current one, which [`Batch::commit_staged`] then replaces (or
    /// [`Batch::drop_staged`] keeps).
    pub fn stage_part(&self, path: &RelPath, part: u64, cvs: &[Cv]) -> Result<(), IndexError> {
        if part == 0 {
            self.drop_staged(path)?;
        }
        self.run(
            "INSERT INTO blocks (path, part, cvs) VALUES (?1, ?2, ?3)",
            params![staged_key(path), part as i64, cvs.as_flattened()],
        )
    }

    /// Part `part` of the list staged for `path`, if there is one.
    pub fn staged_part(&self, path: &RelPath, part: u64) -> Result<Option<Vec<Cv>>, IndexError> {
        read_part_at(&self.tx, &staged_key(path), path, part).map_err(|e| e.at(&self.location))
    }

    /// Makes the staged list `path`'s block list, and records `entry` with it.
    pub fn commit_staged(&self, entry: &Entry, block_size: BlockSize) -> Result<(), IndexError> {
        self.put_entry(entry, Some(block_size))?;
        self.truncate_parts(&entry.path, 0)?;
        self.run(
            "UPDATE blocks SET path = ?1 WHERE path = ?2",
            params![entry.path.as_bytes(), staged_key(&entry.path)],
        )
    }

    /// Forgets a staged list; the current one stays.
    pub fn drop_staged(&self, path: &RelPath) -> Result<(), IndexError> {
        self.run("DELETE FROM blocks WHERE path = ?1", [staged_key(path)])
    }

    /// The block size of the list stored for `path`, if it has one.
    pub fn block_size(&self, path: &RelPath) -> Result<Option<BlockSize>, IndexError> {
        stored_block_size(&self.tx, path).map_err(|e| e.at(&self.location))
    }

    /// Forgets the parts of a file's block list from `from` on.
    pub fn truncate_parts(&self, path: &RelPath, from: u64) -> Result<(), IndexError> {
        self.run(
            "DELETE FROM blocks WHERE path = ?1 AND part >= ?2",
            params![path.as_bytes(), from as i64],
        )
    }

    /// One part of a file's block list, as of before this batch's writes to it.
    pub fn block_part(&self, path: &RelPath, part: u64) -> Result<Option<Vec<Cv>>, IndexError> {
        read_part(&self.tx, path, part).map_err(|e| e.at(&self.location))
    }

    /// Records an entry, leaving its block list's parts as they are.
    fn put_entry(&self, entry: &Entry, block_size: Option<BlockSize>) -> Result<(), IndexError> {
        let m = &entry.meta;
        let link_target = match &entry.kind {
            EntryKind::Symlink(target) => Some(target.as_slice()),
            _ => None,
        };
        let (root, racy) = match &entry.hash {
            Some(hash) => (Some(&hash.root[..]), hash.racy),
            None => (None, false),
        };
        let block_size = block_size.map(BlockSize::get);
        self.run(
            "INSERT OR REPLACE INTO entries
                 (path, kind, link_target, size, mtime_ns, ctime_ns, inode, mode, uid, gid,
                  owner, grp, blake3, racy, block_size)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            params![
                entry.path.as_bytes(),
                entry.kind.code(),
                link_target,
                m.size as i64,
                m.mtime_ns,
                m.ctime_ns,
                m.inode as i64,
                m.mode,
                m.uid,
                m.gid,
                m.owner,
                m.group,
                root,
                racy,
                block_size.map(|b| b as i64),
            ],
        )
    }

    /// Updates only the metadata of an entry whose content is unchanged.
    pub fn put_meta(&self, path: &RelPath, meta: &Meta) -> Result<(), IndexError> {
        self.run(
            "UPDATE entries SET size = ?2, mtime_ns = ?3, ctime_ns = ?4, inode = ?5,
                 mode = ?6, uid = ?7, gid = ?8, owner = ?9, grp = ?10 WHERE path = ?1",
            params![
                path.as_bytes(),
                meta.size as i64,
                meta.mtime_ns,
                meta.ctime_ns,
                meta.inode as i64,
                meta.mode,
                meta.uid,
                meta.gid,
                meta.owner,
                meta.group,
            ],
        )
    }

    /// Forgets an entry.
    pub fn remove(&self, path: &RelPath) -> Result<(), IndexError> {
        self.run("DELETE FROM entries WHERE path = ?1", [path.as_bytes()])?;
        self.truncate_parts(path, 0)
    }

    /// Makes every change of the batch durable at once.
    pub fn commit(self) -> Result<(), IndexError> {
        let location = self.location;
        self.tx.commit().map_err(|source| IndexError::Sqlite {
            path: location,
            source,
        })
    }
}

const ENTRY_COLUMNS: &str = "path, kind, link_target, size, mtime_ns, ctime_ns, inode, mode, \
                             uid, gid, owner, grp, blake3, racy";

struct RawEntry {
    path: Vec<u8>,
    kind: i64,
    link_target: Option<Vec<u8>>,
    meta: Meta,
    blake3: Option<Vec<u8>>,
    racy: bool,
}

fn raw_entry(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawEntry> {
    Ok(RawEntry {
        path: row.get(0)?,
        kind: row.get(1)?,
        link_target: row.get(2)?,
        meta: Meta {
            size: row.get::<_, i64>(3)? as u64,
            mtime_ns: row.get(4)?,
            ctime_ns: row.get(5)?,
            inode: row.get::<_, i64>(6)? as u64,
            mode: row.get(7)?,
            uid: row.get(8)?,
            gid: row.get(9)?,
            owner: row.get(10)?,
            group: row.get(11)?,
        },
        blake3: row.get(12)?,
        racy: row.get(13)?,
    })
}

enum BlocksError {
    Sqlite(rusqlite::Error),
    Corrupt(String),
}

impl BlocksError {
    /// The error of the index file at `location`.
    fn at(self, location: &str) -> IndexError {
        match self {
            BlocksError::Sqlite(source) => IndexError::Sqlite {
                path: location.to_owned(),
                source,
            },
            BlocksError::Corrupt(what) => IndexError::Corrupt {
                path: location.to_owned(),
                what,
            },
        }
    }
}

fn write_parts(conn: &rusqlite::Connection, path: &[u8], cvs: &[Cv]) -> rusqlite::Result<()> {
    let mut insert =
        conn.prepare_cached("INSERT INTO blocks (path, part, cvs) VALUES (?1, ?2, ?3)")?;
    for (part, values) in cvs.chunks(PART_CVS).enumerate() {
        insert.execute(params![path, part as i64, values.as_flattened()])?;
    }
    Ok(())
}

fn read_blocks(
    conn: &rusqlite::Connection,
    path: &RelPath,
) -> Result<Option<(BlockSize, Vec<Cv>)>, BlocksError> {
    let Some(block_size) = stored_block_size(conn, path)? else {
        return Ok(None);
    };
    let mut blocks: Vec<Cv> = Vec::new();
    let mut stmt = conn
        .prepare_cached("SELECT part, cvs FROM blocks WHERE path = ?1 ORDER BY part")
        .map_err(BlocksError::Sqlite)?;
    let mut rows = stmt.query([path.as_bytes()]).map_err(BlocksError::Sqlite)?;
    let mut expected = 0i64;
    while let Some(row) = rows.next().map_err(BlocksError::Sqlite)? {
        let part: i64 = row.get(0).map_err(BlocksError::Sqlite)?;
        // Copied once, from SQLite's buffer into the list.
        let bytes = row
            .get_ref(1)
            .and_then(|value| Ok(value.as_blob()?))
            .map_err(BlocksError::Sqlite)?;
        let (cvs, rest) = bytes.as_chunks::<32>();
        if part != expected || !rest.is_empty() || cvs.len() > PART_CVS {
            return Err(BlocksError::Corrupt(format!(
                "{path}: block list part {part} of {} bytes",
                bytes.len()
            )));
        }
        blocks.extend_from_slice(cvs);
        expected += 1;
    }
    Ok(Some((block_size, blocks)))
}

fn read_part(
    conn: &rusqlite::Connection,
    path: &RelPath,
    part: u64,
) -> Result<Option<Vec<Cv>>, BlocksError> {
    read_part_at(conn, path.as_bytes(), path, part)
}

/// Part `part` of the list stored under `key` (a path's, or one staged for it); `path` names
/// it in an error.
fn read_part_at(
    conn: &rusqlite::Connection,
    key: &[u8],
    path: &RelPath,
    part: u64,
) -> Result<Option<Vec<Cv>>, BlocksError> {
    conn.prepare_cached("SELECT cvs FROM blocks WHERE path = ?1 AND part = ?2")
        .map_err(BlocksError::Sqlite)?
        .query_row(params![key, part as i64], |row| {
            let bytes = row.get_ref(0)?.as_blob()?;
            let (cvs, rest) = bytes.as_chunks::<32>();
            Ok((rest.is_empty() && cvs.len() <= PART_CVS).then(|| cvs.to_vec()))
        })
        .optional()
        .map_err(BlocksError::Sqlite)?
        .map(|cvs| {
            cvs.ok_or_else(|| BlocksError::Corrupt(format!("{path}: block list part {part}")))
        })
        .transpose()
}

/// Where a list being made for `path` is staged: a key no path has (paths never start with a
/// NUL byte).
fn staged_key(path: &RelPath) -> Vec<u8> {
    let mut key = Vec::with_capacity(path.as_bytes().len() + 1);
    key.push(0);
    key.extend_from_slice(path.as_bytes());
    key
}

fn stored_block_size(
    conn: &rusqlite::Connection,
    path: &RelPath,
) -> Result<Option<BlockSize>, BlocksError> {
    let block_size: Option<Option<u32>> = conn
        .prepare_cached("SELECT block_size FROM entries WHERE path = ?1")
        .map_err(BlocksError::Sqlite)?
        .query_row([path.as_bytes()], |row| row.get(0))
        .optional()
        .map_err(BlocksError::Sqlite)?;
    block_size
        .flatten()
        .map(|size| BlockSize::new(size).map_err(|e| BlocksError::Corrupt(format!("{path}: {e}"))))
        .transpose()
}
