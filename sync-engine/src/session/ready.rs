//! Answers read ahead of the writer. While the writing thread stores one file, the async side
//! reads the next small files' answers off the connection into [`Ready`]
//! (`Pipeline::read_ahead`), so the writer finds them waiting instead of handing a request
//! over and sleeping until the answer comes back (once per file, that hand-off was what kept
//! an initial copy behind rsync). Bounded by files and bytes.

use std::collections::VecDeque;
use std::sync::Mutex;

use lbs_protocol::RelPath;
use tokio::sync::Notify;

use super::Chunk;

/// At most this many answers wait for the writer (as many as run ahead, see
/// [`super::pipeline::AHEAD_FILES`]).
pub(super) const READY_FILES: usize = 256;

/// At most this many bytes of answers wait for the writer.
pub(super) const READY_BYTES: u64 = 8 << 20;

/// One file's answer, complete.
struct Answer {
    path: RelPath,
    chunks: Vec<Chunk>,
    bytes: u64,
}

#[derive(Default)]
struct State {
    answers: VecDeque<Answer>,
    /// The content bytes of `answers`.
    bytes: u64,
    /// The async side waits for room.
    waiting: bool,
    /// The connection is gone or the pull cancelled: nothing more is handed out.
    closed: bool,
}

impl State {
    /// Whether a waiting async side is woken: once the writer took half of what waits, not at
    /// every answer it takes (a wake-up per small file, and the lock the two sides then fought
    /// over, cost the initial copy of the PBX tree more than its writes).
    fn half_empty(&self) -> bool {
        self.answers.len() <= READY_FILES / 2 && self.bytes <= READY_BYTES / 2
    }
}

/// Answers read ahead, in plan order, shared by the async side (which fills it) and the
/// writing thread (which takes from it).
#[derive(Default)]
pub(super) struct Ready {
    state: Mutex<State>,
    room: Notify,
}

impl Ready {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing panics while holding it; a poisoned queue is still a queue.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How many bytes of answers wait.
    #[cfg(test)]
    pub(super) fn held_bytes(&self) -> u64 {
        self.state().bytes
    }

    /// Whether an answer of `size` bytes may be read ahead now; if not, the next
    /// [`Ready::room`] wakes the caller once the writer took something.
    pub(super) fn has_room(&self, size: u64) -> bool {
        let mut state = self.state();
        let room = !state.closed
            && state.answers.len() < READY_FILES
            && (state.answers.is_empty() || state.bytes + size <= READY_BYTES);
        state.waiting = !room;
        room
    }

    /// Resolves once the writer took half of what waits after [`Ready::has_room`] said no.
    pub(super) async fn room(&self) {
        self.room.notified().await;
    }

    /// Leaves `path`'s complete answer, `bytes` of content, for the writer.
    pub(super) fn push(&self, path: RelPath, chunks: Vec<Chunk>, bytes: u64) {
        let mut state = self.state();
        if !state.closed {
            state.bytes += bytes;
            state.answers.push_back(Answer {
                path,
                chunks,
                bytes,
            });
        }
    }

    /// The answer for `path` if it was read ahead; answers before it (files the writer went
    /// past) are dropped.
    pub(super) fn take(&self, path: &RelPath) -> Option<Vec<Chunk>> {
        let mut state = self.state();
        let at = state.answers.iter().position(|a| &a.path == path)?;
        let mut taken = None;
        let mut freed = 0;
        for answer in state.answers.drain(..=at) {
            freed += answer.bytes;
            taken = Some(answer);
        }
        state.bytes -= freed;
        let answer = taken?;
        if state.waiting && state.half_empty() {
            state.waiting = false;
            self.room.notify_one();
        }
        Some(answer.chunks)
    }

    /// Drops every waiting answer: the writer asked for a file that comes after them.
    pub(super) fn clear(&self) {
        let mut state = self.state();
        state.answers.clear();
        state.bytes = 0;
    }

    /// No more answers: the writer asks the async side, which tells it why.
    pub(super) fn close(&self) {
        let mut state = self.state();
        state.closed = true;
        state.answers.clear();
        state.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(name: &str) -> RelPath {
        RelPath::from_bytes(name.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn takes_in_order_and_drops_what_the_writer_went_past() {
        let ready = Ready::default();
        for name in ["a", "b", "c"] {
            ready.push(path(name), Vec::new(), 10);
        }
        assert!(ready.take(&path("b")).is_some());
        // "a" was passed over: gone.
        assert!(ready.take(&path("a")).is_none());
        assert!(ready.take(&path("c")).is_some());
        assert!(ready.take(&path("c")).is_none());
        assert_eq!(ready.held_bytes(), 0);
    }

    #[test]
    fn room_is_bounded_by_files_and_bytes_and_a_take_makes_room() {
        let ready = Ready::default();
        // One answer always fits, however large.
        assert!(ready.has_room(READY_BYTES * 4));
        ready.push(path("big"), Vec::new(), READY_BYTES - 1);
        assert!(!ready.has_room(2));
        assert!(ready.state().waiting);
        assert!(ready.take(&path("big")).is_some());
        assert!(!ready.state().waiting, "the taker noticed the waiting side");
        for n in 0..READY_FILES {
            assert!(ready.has_room(1));
            ready.push(path(&format!("f{n}")), Vec::new(), 1);
        }
        assert!(!ready.has_room(1));
    }

    #[test]
    fn a_closed_queue_hands_nothing_out() {
        let ready = Ready::default();
        ready.push(path("a"), Vec::new(), 1);
        ready.close();
        assert!(ready.take(&path("a")).is_none());
        ready.push(path("b"), Vec::new(), 1);
        assert!(ready.take(&path("b")).is_none());
        assert!(!ready.has_room(1));
    }

    #[test]
    fn the_waiting_side_is_woken_once_half_is_taken_not_at_every_take() {
        let ready = Ready::default();
        for n in 0..READY_FILES {
            ready.push(path(&format!("f{n}")), Vec::new(), 1);
        }
        assert!(!ready.has_room(1));
        for n in 0..READY_FILES / 2 - 1 {
            assert!(ready.take(&path(&format!("f{n}"))).is_some());
            assert!(ready.state().waiting, "woken after {} takes", n + 1);
        }
        assert!(
            ready
                .take(&path(&format!("f{}", READY_FILES / 2 - 1)))
                .is_some()
        );
        assert!(!ready.state().waiting, "woken once half was taken");
        assert_eq!(ready.held_bytes(), (READY_FILES / 2) as u64);
        ready.clear();
        assert_eq!(ready.held_bytes(), 0);
    }

    #[tokio::test]
    async fn the_waiting_side_is_woken_by_a_take() {
        let ready = std::sync::Arc::new(Ready::default());
        ready.push(path("a"), Vec::new(), READY_BYTES);
        assert!(!ready.has_room(1));
        let taker = ready.clone();
        let took = std::thread::spawn(move || taker.take(&path("a")).is_some());
        tokio::time::timeout(std::time::Duration::from_secs(10), ready.room())
            .await
            .expect("woken");
        assert!(took.join().unwrap());
    }
}
