//! Answers read ahead of the writer. While the writing thread stores one file, the async side
//! reads the next small files' answers off the connection into [`Ready`], so the writer finds
//! them waiting instead of handing a request over and sleeping until the answer comes back
//! (once per file, that hand-off was what kept an initial copy behind rsync). Bounded by files
//! and bytes; a sender that sends more than it listed fills nothing.

use std::collections::VecDeque;
use std::sync::Mutex;

use lbs_protocol::{RelPath, SYNC_CHUNK_LEN};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;

use super::pull::{Pipeline, chunk_of, discard};
use super::{Chunk, Connection, SessionError, receive};

/// At most this many answers wait for the writer.
pub(super) const READY_FILES: usize = 64;

/// At most this many bytes of answers wait for the writer.
pub(super) const READY_BYTES: u64 = 8 << 20;

/// Only answers of files up to this long are read ahead; longer ones stream through the
/// writer's bounded channel as it asks.
const READY_FILE_MAX: u64 = 1 << 20;

/// At most this many chunks make one answer read ahead (a small sparse file is many holes).
const READY_CHUNKS: usize = 4096;

/// One file's answer, complete.
struct Answer {
    path: RelPath,
    chunks: Vec<Chunk>,
    bytes: u64,
}

#[derive(Default)]
struct State {
    answers: VecDeque<Answer>,
    bytes: u64,
    /// The async side waits for room.
    waiting: bool,
    /// The connection is gone or the pull cancelled: nothing more is handed out.
    closed: bool,
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

    /// Resolves once the writer took an answer after [`Ready::has_room`] said no.
    pub(super) async fn room(&self) {
        self.room.notified().await;
    }

    fn push(&self, answer: Answer) {
        let mut state = self.state();
        if !state.closed {
            state.bytes += answer.bytes;
            state.answers.push_back(answer);
        }
    }

    /// The answer for `path` if it was read ahead; answers before it (files the writer went
    /// past) are dropped.
    pub(super) fn take(&self, path: &RelPath) -> Option<Vec<Chunk>> {
        let mut state = self.state();
        let at = state.answers.iter().position(|a| &a.path == path)?;
        let mut taken = None;
        for answer in state.answers.drain(..=at) {
            taken = Some(answer);
        }
        let answer = taken?;
        state.bytes = state.answers.iter().map(|a| a.bytes).sum();
        if state.waiting {
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

impl Pipeline {
    /// Reads the answer to the oldest request in flight and leaves it in `ready`. An answer
    /// larger than the file's listed size (plus one chunk) or of more than [`READY_CHUNKS`]
    /// chunks is not kept: the writer gets a failure for that file, the rest is read and
    /// dropped.
    pub(super) async fn read_ahead<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Connection<S>,
        ready: &Ready,
    ) -> Result<(), SessionError> {
        let Some(planned) = self.ahead.pop_front() else {
            return Ok(());
        };
        let limit = planned.size.saturating_add(SYNC_CHUNK_LEN as u64);
        let mut chunks = Vec::new();
        let mut bytes = 0u64;
        loop {
            let chunk = chunk_of(receive(conn, "a file transfer").await?)?;
            bytes += match &chunk {
                Chunk::Data(data) | Chunk::At(_, data) | Chunk::Delta(data) => data.len() as u64,
                _ => 0,
            };
            let done = matches!(chunk, Chunk::End(_) | Chunk::Failed(_));
            if bytes > limit || chunks.len() >= READY_CHUNKS {
                if !done {
                    discard(conn).await?;
                }
                chunks = vec![Chunk::Failed(format!(
                    "the sender sent more for {} than the {} bytes it listed",
                    planned.path, planned.size
                ))];
                bytes = 0;
                break;
            }
            chunks.push(chunk);
            if done {
                break;
            }
        }
        ready.push(Answer {
            path: planned.path,
            chunks,
            bytes,
        });
        Ok(())
    }

    /// The listed size of the next answer on the connection, if it may be read ahead.
    pub(super) fn read_ahead_next(&self) -> Option<u64> {
        self.ahead
            .front()
            .map(|p| p.size)
            .filter(|size| *size <= READY_FILE_MAX)
    }

    /// Whether `path` is a planned fetch not answered yet (so everything read ahead comes
    /// before it in plan order).
    pub(super) fn holds(&self, path: &RelPath) -> bool {
        self.ahead.iter().any(|p| &p.path == path) || self.upcoming.iter().any(|p| &p.path == path)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use futures_util::{SinkExt, StreamExt};
    use lbs_protocol::{Envelope, Generation, Message};

    use super::super::pull::Planned;
    use super::super::{Ask, Chunk};
    use super::*;

    /// A sender that answers each whole-file request in order: for "big" many chunks of
    /// zeros (far more than its listed byte), for any other path the path itself.
    fn sender(
        mut conn: Connection<tokio::io::DuplexStream>,
    ) -> tokio::task::JoinHandle<Vec<String>> {
        tokio::spawn(async move {
            let mut asked = Vec::new();
            while let Some(Ok(envelope)) = conn.next().await {
                let Message::SyncFetch { path } = envelope.message else {
                    break;
                };
                asked.push(path.to_string());
                let mut messages = Vec::new();
                if path.as_bytes() == b"big" {
                    for _ in 0..12 {
                        let bytes = vec![0u8; SYNC_CHUNK_LEN];
                        messages.push(Message::SyncData { bytes });
                    }
                } else {
                    let bytes = path.as_bytes().to_vec();
                    messages.push(Message::SyncData { bytes });
                }
                messages.push(Message::SyncDataEnd {
                    size: 0,
                    blake3: [0; 32],
                });
                for message in messages {
                    let envelope = Envelope {
                        generation: Generation(1),
                        message,
                    };
                    if conn.send(envelope).await.is_err() {
                        return asked;
                    }
                }
            }
            asked
        })
    }

    fn data(chunks: &[Chunk]) -> Vec<u8> {
        chunks
            .iter()
            .flat_map(|c| match c {
                Chunk::Data(bytes) => bytes.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    #[tokio::test]
    async fn answers_are_read_ahead_in_plan_order_and_an_oversized_one_is_refused() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut conn = tokio_util::codec::Framed::new(a, lbs_protocol::FrameCodec::new());
        let asked = sender(tokio_util::codec::Framed::new(
            b,
            lbs_protocol::FrameCodec::new(),
        ));
        let upcoming = ["one", "big", "two"]
            .into_iter()
            .map(|p| Planned {
                path: path(p),
                size: 3,
                ask: Ask::Whole,
                ahead: true,
            })
            .collect();
        let mut pipeline = Pipeline {
            upcoming,
            ahead: VecDeque::new(),
        };
        pipeline.top_up(&mut conn, Generation(1)).await.unwrap();
        assert_eq!(pipeline.read_ahead_next(), Some(3));
        let ready = Ready::default();
        for _ in 0..3 {
            pipeline.read_ahead(&mut conn, &ready).await.unwrap();
        }
        assert_eq!(pipeline.read_ahead_next(), None);
        // Only what was listed is held: 6 bytes of the two small answers, nothing of "big".
        assert_eq!(ready.state().bytes, 6);
        let big = ready.take(&path("big")).unwrap();
        assert!(
            matches!(&big[..], [Chunk::Failed(why)] if why.contains("more for big than the 3 bytes")),
            "{:?}",
            big.len()
        );
        // "one" came before "big": the writer went past it.
        assert!(ready.take(&path("one")).is_none());
        // The rest of "big" was read and dropped: the next answer is whole and in step.
        assert_eq!(data(&ready.take(&path("two")).unwrap()), b"two");
        drop(conn);
        assert_eq!(asked.await.unwrap(), ["one", "big", "two"]);
    }

    #[tokio::test]
    async fn files_over_a_mebibyte_are_not_read_ahead() {
        let (a, _b) = tokio::io::duplex(1 << 16);
        let mut conn = tokio_util::codec::Framed::new(a, lbs_protocol::FrameCodec::new());
        let mut pipeline = Pipeline {
            upcoming: [Planned {
                path: path("large"),
                size: READY_FILE_MAX + 1,
                ask: Ask::Whole,
                ahead: true,
            }]
            .into(),
            ahead: VecDeque::new(),
        };
        pipeline.top_up(&mut conn, Generation(1)).await.unwrap();
        assert_eq!(pipeline.ahead.len(), 1, "requested ahead");
        assert_eq!(
            pipeline.read_ahead_next(),
            None,
            "but streamed as the writer asks"
        );
    }

    fn answer(name: &str, bytes: u64) -> Answer {
        Answer {
            path: RelPath::from_bytes(name.as_bytes().to_vec()).unwrap(),
            chunks: vec![Chunk::End(bytes)],
            bytes,
        }
    }

    fn path(name: &str) -> RelPath {
        RelPath::from_bytes(name.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn takes_in_order_and_drops_what_the_writer_went_past() {
        let ready = Ready::default();
        for name in ["a", "b", "c"] {
            ready.push(answer(name, 10));
        }
        assert!(ready.take(&path("b")).is_some());
        // "a" was passed over: gone.
        assert!(ready.take(&path("a")).is_none());
        assert!(ready.take(&path("c")).is_some());
        assert!(ready.take(&path("c")).is_none());
        assert_eq!(ready.state().bytes, 0);
    }

    #[test]
    fn room_is_bounded_by_files_and_bytes_and_a_take_makes_room() {
        let ready = Ready::default();
        // One answer always fits, however large.
        assert!(ready.has_room(READY_BYTES * 4));
        ready.push(answer("big", READY_BYTES - 1));
        assert!(!ready.has_room(2));
        assert!(ready.state().waiting);
        assert!(ready.take(&path("big")).is_some());
        assert!(!ready.state().waiting, "the taker noticed the waiting side");
        for n in 0..READY_FILES {
            assert!(ready.has_room(1));
            ready.push(answer(&format!("f{n}"), 1));
        }
        assert!(!ready.has_room(1));
    }

    #[test]
    fn a_closed_queue_hands_nothing_out() {
        let ready = Ready::default();
        ready.push(answer("a", 1));
        ready.close();
        assert!(ready.take(&path("a")).is_none());
        ready.push(answer("b", 1));
        assert!(ready.take(&path("b")).is_none());
        assert!(!ready.has_room(1));
    }

    #[tokio::test]
    async fn the_waiting_side_is_woken_by_a_take() {
        let ready = std::sync::Arc::new(Ready::default());
        ready.push(answer("a", READY_BYTES));
        assert!(!ready.has_room(1));
        let taker = ready.clone();
        let took = std::thread::spawn(move || taker.take(&path("a")).is_some());
        tokio::time::timeout(std::time::Duration::from_secs(10), ready.room())
            .await
            .expect("woken");
        assert!(took.join().unwrap());
    }
}
