//! Recording what the receiver has just written, so its next pass does not read it again.

use super::*;

/// Records files this side has just written (their tree hash computed while writing, or for
/// files patched in place their old list with the received values), so the next pass does
/// not read them again. An entry whose file no longer looks as written (another size, not a
/// file) is skipped and left to the next scan. Returns how many were recorded.
pub fn record_installed(
    root: &Path,
    index: &mut Index,
    installed: &[(RelPath, crate::tree::TreeHash)],
    patched: &[(RelPath, PatchedList)],
) -> Result<u64, ScanError> {
    let mut names = Names::default();
    let batch = index.batch()?;
    let mut recorded = 0;
    let written = installed
        .iter()
        .map(|(path, tree)| (path, tree.len, tree.root, tree.block_size));
    let patched_ones = patched
        .iter()
        .map(|(path, list)| (path, list.len, list.root, list.block_size));
    for (at, (path, len, hash, block_size)) in written.chain(patched_ones).enumerate() {
        let Ok(meta) = fs::symlink_metadata(path.under(root)) else {
            continue;
        };
        if !meta.is_file() || meta.len() != len {
            continue;
        }
        let entry = Entry {
            path: path.clone(),
            kind: EntryKind::File,
            meta: to_meta(&meta, &mut names),
            // Verified against the sender's hash as it was written: not racy.
            hash: Some(ContentHash {
                root: *hash.as_bytes(),
                racy: false,
            }),
        };
        match at.checked_sub(installed.len()) {
            None if installed[at].1.staged_parts == 0 => {
                batch.put(&entry, Some((block_size, &installed[at].1.blocks)))?;
            }
            None => {
                if !stage_rest(&batch, path, &installed[at].1)? {
                    // Its staged parts are not all there: the next pass hashes it.
                    batch.drop_staged(path)?;
                    continue;
                }
                batch.commit_staged(&entry, block_size)?;
            }
            Some(n) => {
                if !stage_patched(&batch, path, &patched[n].1)? {
                    // Its old list is not what the patch was made on: the next pass hashes it.
                    batch.drop_staged(path)?;
                    continue;
                }
                batch.commit_staged(&entry, block_size)?;
            }
        }
        recorded += 1;
    }
    batch.commit()?;
    Ok(recorded)
}

/// Completes the staged list of a new file whose first parts were staged as it was written
/// ([`crate::tree::PartSink`]): the rest, then a check that the whole staged list hashes to
/// the file's hash (a part the sink could not keep is missing).
fn stage_rest(
    batch: &crate::index::Batch<'_>,
    path: &RelPath,
    tree: &crate::tree::TreeHash,
) -> Result<bool, ScanError> {
    for (i, cvs) in tree.blocks.chunks(PART_CVS).enumerate() {
        batch.stage_part(path, tree.staged_parts + i as u64, cvs)?;
    }
    let count = tree.block_size.blocks_for(tree.len);
    let mut root = RootBuilder::default();
    for part in 0..count.div_ceil(PART_CVS as u64) {
        let want = (count - part * PART_CVS as u64).min(PART_CVS as u64) as usize;
        match batch.staged_part(path, part)? {
            Some(cvs) if cvs.len() == want => cvs.into_iter().for_each(|cv| root.push(cv)),
            _ => return Ok(false),
        }
    }
    Ok(root.finish(tree.block_size, tree.len).ok().flatten() == Some(tree.root))
}

/// Stages the new list of a patched file a part at a time: its old list (as the index holds
/// it, or as held) with the received values in their places. False if the result does not
/// hash to the patch's hash.
fn stage_patched(
    batch: &crate::index::Batch<'_>,
    path: &RelPath,
    list: &PatchedList,
) -> Result<bool, ScanError> {
    let count = list.count();
    let old_count = list.old.len();
    let mut root = RootBuilder::default();
    let mut out: Vec<Cv> = Vec::with_capacity(PART_CVS);
    for part in 0..count.div_ceil(PART_CVS as u64) {
        let first = part * PART_CVS as u64;
        let end = (first + PART_CVS as u64).min(count);
        let old: Vec<Cv> = match &list.old {
            BlockList::Held(cvs) => cvs
                .get(first as usize..(end.min(old_count) as usize).max(first as usize))
                .map(<[Cv]>::to_vec)
                .unwrap_or_default(),
            BlockList::Stored { .. } if first < old_count => {
                batch.block_part(path, part)?.unwrap_or_default()
            }
            BlockList::Stored { .. } => Vec::new(),
        };
        out.clear();
        for index in first..end {
            let cv = match list.changed.get(&index) {
                Some(cv) => *cv,
                None => match old.get((index - first) as usize) {
                    Some(cv) => *cv,
                    None => return Ok(false),
                },
            };
            root.push(cv);
            out.push(cv);
        }
        batch.stage_part(path, part, &out)?;
    }
    Ok(root.finish(list.block_size, list.len).ok().flatten() == Some(list.root))
}
