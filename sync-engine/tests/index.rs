//! The index's block lists: stored in parts, replaced and removed whole, and carried over
//! from an index of the first schema.

// In tests a panic is the failure report; helpers outside #[test] fns unwrap too.
#![allow(clippy::unwrap_used)]

use lbs_protocol::RelPath;
use lbs_sync::index::PART_CVS;
use lbs_sync::{BlockSize, ContentHash, Cv, Entry, EntryKind, Index, Meta};

fn rel(text: &str) -> RelPath {
    RelPath::try_from(text).unwrap()
}

fn file(path: &str, size: u64) -> Entry {
    Entry {
        path: rel(path),
        kind: EntryKind::File,
        meta: Meta {
            size,
            mtime_ns: 1,
            ctime_ns: 2,
            inode: 3,
            mode: 0o644,
            uid: 0,
            gid: 0,
            owner: "root".into(),
            group: "root".into(),
        },
        hash: Some(ContentHash {
            root: [7; 32],
            racy: false,
        }),
    }
}

fn values(count: usize, seed: u8) -> Vec<Cv> {
    (0..count)
        .map(|i| {
            let mut cv = [seed; 32];
            cv[..8].copy_from_slice(&(i as u64).to_le_bytes());
            cv
        })
        .collect()
}

#[test]
fn a_long_list_is_stored_in_parts_and_replaced_and_removed_whole() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("index.sqlite");
    let mut index = Index::open(&db).unwrap();
    let bs = BlockSize::DEFAULT;
    let long = values(2 * PART_CVS + 17, 1);
    let batch = index.batch().unwrap();
    batch
        .put(&file("big.wav", 1 << 30), Some((bs, &long)))
        .unwrap();
    batch.put(&file("empty", 0), Some((bs, &[]))).unwrap();
    batch.commit().unwrap();
    assert_eq!(index.blocks(&rel("big.wav")).unwrap(), Some((bs, long)));
    assert_eq!(index.blocks(&rel("empty")).unwrap(), Some((bs, vec![])));
    let parts = |db: &std::path::Path| -> i64 {
        rusqlite::Connection::open(db)
            .unwrap()
            .query_row("SELECT count(*) FROM blocks", [], |row| row.get(0))
            .unwrap()
    };
    assert_eq!(parts(&db), 3);

    // A shorter list replaces every part of the longer one.
    let short = values(5, 2);
    let batch = index.batch().unwrap();
    batch
        .put(&file("big.wav", 5 * bs.get()), Some((bs, &short)))
        .unwrap();
    batch.commit().unwrap();
    assert_eq!(index.blocks(&rel("big.wav")).unwrap(), Some((bs, short)));
    assert_eq!(parts(&db), 1);

    // No list, and then no entry: nothing left behind.
    let batch = index.batch().unwrap();
    batch.put(&file("big.wav", 1), None).unwrap();
    batch.commit().unwrap();
    assert_eq!(index.blocks(&rel("big.wav")).unwrap(), None);
    assert_eq!(parts(&db), 0);
    let batch = index.batch().unwrap();
    batch
        .put(&file("big.wav", 5 * bs.get()), Some((bs, &values(5, 3))))
        .unwrap();
    batch.remove(&rel("big.wav")).unwrap();
    batch.commit().unwrap();
    assert_eq!(parts(&db), 0);
}

#[test]
fn an_index_of_the_first_schema_keeps_its_block_lists() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("index.sqlite");
    let list = values(PART_CVS + 3, 9);
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(
            "CREATE TABLE entries (
                 path BLOB PRIMARY KEY NOT NULL, kind INTEGER NOT NULL, link_target BLOB,
                 size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
                 inode INTEGER NOT NULL, mode INTEGER NOT NULL, uid INTEGER NOT NULL,
                 gid INTEGER NOT NULL, owner TEXT NOT NULL, grp TEXT NOT NULL, blake3 BLOB,
                 racy INTEGER NOT NULL DEFAULT 0, block_size INTEGER, blocks BLOB
             ) WITHOUT ROWID;
             PRAGMA user_version = 1;",
        )
        .unwrap();
        let insert = "INSERT INTO entries VALUES (?1, 0, NULL, ?2, 1, 2, 3, 420, 0, 0, 'root', \
                      'root', ?3, 0, 16384, ?4)";
        let size = list.len() as i64 * 16384;
        conn.execute(
            insert,
            rusqlite::params![b"a.wav".as_slice(), size, [7u8; 32], list.as_flattened()],
        )
        .unwrap();
        // A list that is not whole values: its hash is dropped, so the file is hashed again.
        conn.execute(
            insert,
            rusqlite::params![b"torn.wav".as_slice(), 16384, [7u8; 32], [1u8; 33]],
        )
        .unwrap();
    }
    let index = Index::open(&db).unwrap();
    assert_eq!(
        index.blocks(&rel("a.wav")).unwrap(),
        Some((BlockSize::DEFAULT, list))
    );
    let a = index.get(&rel("a.wav")).unwrap().unwrap();
    assert_eq!(a.hash.unwrap().root, [7; 32]);
    assert_eq!(index.known(&rel("torn.wav")).unwrap(), None);
    assert_eq!(index.get(&rel("torn.wav")).unwrap().unwrap().hash, None);
    drop(index);
    // Opened again, nothing more to move.
    let index = Index::open(&db).unwrap();
    assert_eq!(index.entries().unwrap().len(), 2);
}

#[test]
fn entries_read_together_come_in_the_order_asked_missing_ones_as_none() {
    let dir = tempfile::tempdir().unwrap();
    let mut index = Index::open(&dir.path().join("index.sqlite")).unwrap();
    let batch = index.batch().unwrap();
    batch.put(&file("a.wav", 10), None).unwrap();
    batch.put(&file("c.wav", 30), None).unwrap();
    batch.commit().unwrap();
    let asked = [rel("c.wav"), rel("b.wav"), rel("a.wav"), rel("c.wav")];
    let sizes: Vec<Option<u64>> = index
        .get_each(&asked)
        .unwrap()
        .into_iter()
        .map(|entry| entry.map(|e| e.meta.size))
        .collect();
    assert_eq!(sizes, vec![Some(30), None, Some(10), Some(30)]);
    // The read left no transaction open: a write goes through.
    let batch = index.batch().unwrap();
    batch.put(&file("b.wav", 20), None).unwrap();
    batch.commit().unwrap();
    assert_eq!(index.get(&rel("b.wav")).unwrap().unwrap().meta.size, 20);
}
