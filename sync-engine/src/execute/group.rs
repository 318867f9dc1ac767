//! New files staged and put in place in groups, the groups committed on a second thread.
//!
//! A group's commit waits for the disk (its `syncfs`); done on the writing thread, the transfer
//! stood still meanwhile. The committer thread takes a full group and syncs and renames it
//! while the writer stages the next. The plan's order makes that safe: everything a later step
//! reads is either untouched by the plan or read before it is rewritten, and the steps that
//! need files in place (hard links, directories' metadata, the end) first wait for every
//! group handed over ([`Group::commit`]).
//!
//! Given a [`Record`], the committer also records each group's files in the receiver's index
//! once they are in place: a pass that breaks off later leaves them known, not to be read and
//! hashed again by the next pass.

use std::sync::mpsc;

use lbs_protocol::RelPath;

use super::ExecuteReport;
use crate::apply::{ApplyError, Root, Staged};
use crate::tree::TreeHash;

/// At most this many new files wait, written but not yet in place, for one group commit.
/// Files of one directory share its handle ([`Root::parent_dir`]), so a group holds as many
/// open files as it spans directories.
const GROUP_FILES: usize = 1024;
/// At most this many bytes of new files wait for one group commit. The last group's sync is
/// what a pull waits for at its end: with 64 MiB an initial copy of the PBX tree took
/// 0.52 s, with 16 MiB 0.45–0.49 s (8 MiB: no better).
const GROUP_BYTES: u64 = 16 << 20;

/// Records files just put in place in the receiver's index; false: they were not (nothing of
/// them was), and the caller records them with the rest of the pass.
pub type Record<'a> = dyn Fn(&[(RelPath, TreeHash)]) -> bool + Sync + 'a;

/// What one group's commit gave.
struct Committed {
    /// The files in place.
    done: Vec<(RelPath, TreeHash)>,
    /// Whether `done` is recorded in the index already.
    recorded: bool,
    /// The files that could not be put in place.
    failed: Vec<(RelPath, ApplyError)>,
}

/// Puts `staged` in place, then records what went in place if it can.
fn commit_group(
    root: &Root,
    record: Option<&Record<'_>>,
    staged: Vec<Staged>,
) -> Result<Committed, ApplyError> {
    let (done, failed) = root.put_in_place(staged)?;
    let recorded = !done.is_empty() && record.is_some_and(|record| record(&done));
    Ok(Committed {
        done,
        recorded,
        failed,
    })
}

/// The committing thread, as the writer sees it.
struct Committer {
    groups: mpsc::SyncSender<Vec<Staged>>,
    results: mpsc::Receiver<Result<Committed, ApplyError>>,
    /// Groups handed over whose result has not been read.
    outstanding: usize,
}

/// Files staged and not yet handed over to be put in place (see [`Root::put_in_place`]).
#[derive(Default)]
pub(super) struct Group<'r> {
    pub(super) staged: Vec<Staged>,
    bytes: u64,
    /// Absent: groups are committed on the writing thread.
    committer: Option<Committer>,
    record: Option<&'r Record<'r>>,
}

impl Group<'_> {
    pub(super) fn add(&mut self, staged: Staged) {
        self.bytes += staged.len();
        self.staged.push(staged);
    }

    pub(super) fn full(&self) -> bool {
        self.staged.len() >= GROUP_FILES || self.bytes >= GROUP_BYTES
    }

    /// Hands the staged files over to be put in place, and takes in what earlier groups gave.
    /// Waits only while the committer still has a group queued.
    pub(super) fn hand_off(
        &mut self,
        root: &Root,
        report: &mut ExecuteReport,
    ) -> Result<(), ApplyError> {
        if self.staged.is_empty() {
            return Ok(());
        }
        self.bytes = 0;
        let staged = std::mem::take(&mut self.staged);
        let Some(committer) = &mut self.committer else {
            return take_in(commit_group(root, self.record, staged), report);
        };
        if let Err(mpsc::SendError(staged)) = committer.groups.send(staged) {
            // The thread is gone (it cannot be, short of a panic): commit here instead.
            self.committer = None;
            return take_in(commit_group(root, self.record, staged), report);
        }
        committer.outstanding += 1;
        while let Ok(result) = committer.results.try_recv() {
            committer.outstanding -= 1;
            take_in(result, report)?;
        }
        Ok(())
    }

    /// Puts the staged files in place and waits until every group handed over is: after it,
    /// every file fetched so far is at its path (renamed; durable after [`Root::sync`]).
    pub(super) fn commit(
        &mut self,
        root: &Root,
        report: &mut ExecuteReport,
    ) -> Result<(), ApplyError> {
        self.hand_off(root, report)?;
        let mut first_error = None;
        if let Some(committer) = &mut self.committer {
            while committer.outstanding > 0 {
                let Ok(result) = committer.results.recv() else {
                    break;
                };
                committer.outstanding -= 1;
                if let Err(err) = take_in(result, report) {
                    first_error.get_or_insert(err);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Records one group's result in `report`; a group that could not be synced is an error.
fn take_in(
    result: Result<Committed, ApplyError>,
    report: &mut ExecuteReport,
) -> Result<(), ApplyError> {
    let Committed {
        done,
        recorded,
        failed,
    } = result?;
    if !recorded {
        report.installed.extend(done);
    }
    for (path, err) in failed {
        report.done = report.done.saturating_sub(1);
        report.deferred.push((path, err.to_string()));
    }
    Ok(())
}

/// Runs `work` with a [`Group`] whose commits happen on a thread of their own (on the writing
/// thread if none can be started), each group recorded through `record` if given. Whatever
/// `work` returns, every group handed over is finished before this returns, and files still
/// staged are removed on an error.
pub(super) fn with_committer<'r, T>(
    root: &'r Root,
    record: Option<&'r Record<'r>>,
    work: impl FnOnce(&mut Group<'r>) -> Result<T, ApplyError>,
) -> Result<T, ApplyError> {
    std::thread::scope(|scope| {
        let (groups, incoming) = mpsc::sync_channel::<Vec<Staged>>(1);
        let (done, results) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("lbs-commit".into())
            .spawn_scoped(scope, move || {
                for staged in incoming {
                    if done.send(commit_group(root, record, staged)).is_err() {
                        break;
                    }
                }
            });
        let mut group = Group {
            committer: spawned.ok().map(|_| Committer {
                groups,
                results,
                outstanding: 0,
            }),
            record,
            ..Group::default()
        };
        let result = work(&mut group);
        if result.is_err() {
            root.discard(std::mem::take(&mut group.staged));
        }
        // Closing the channel ends the thread once it has put in place what it was given
        // (verified files: on an error too); the scope waits for it.
        if let Some(committer) = group.committer.take() {
            drop(committer.groups);
            for _ in committer.results {}
        }
        result
    })
}
