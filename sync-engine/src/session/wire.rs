//! Messages to and from the peer on a session's connection, every wait with its deadline:
//! [`STALLED`] without a byte moving, not for a whole message, so a slow link is not cut
//! while it still carries the message.

use super::*;

/// Sends a message and flushes it (with anything queued before it).
pub(super) async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    generation: Generation,
    message: Message,
) -> Result<(), SessionError> {
    feed(conn, generation, message).await?;
    flush(conn).await
}

/// Writes out what is queued, waiting as long as the peer keeps taking it ([`while_read`]).
pub(super) async fn flush<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
) -> Result<(), SessionError> {
    while_read(conn, |conn, cx| conn.poll_flush_unpin(cx)).await
}

/// Polls a write on `conn` until it is done, giving up ([`SessionError::NotReading`]) once
/// the connection's write buffer has not shrunk for [`STALLED`]: a peer that reads nothing for
/// that long is stopped or cut off, and this side's session ends instead of holding on to it,
/// while a slow link that keeps taking bytes is not cut. Behind TLS the buffer shrinks as
/// rustls takes it, and rustls holds up to 64 KiB of records it has not sent: a link down to
/// ~10 kbit/s carries on.
async fn while_read<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    write: impl FnMut(&mut Connection<S>, &mut Context<'_>) -> Poll<Result<(), FrameError>>,
) -> Result<(), SessionError> {
    let written = |conn: &Connection<S>| conn.write_buffer().len();
    while_moving(conn, written, write)
        .await
        .ok_or(SessionError::NotReading)??;
    Ok(())
}

/// Polls `op` on `conn` until it is ready; `None` once `moved` (one of the connection's
/// buffers, measured) has not changed for [`STALLED`].
async fn while_moving<S: AsyncRead + AsyncWrite + Unpin, T>(
    conn: &mut Connection<S>,
    moved: impl Fn(&Connection<S>) -> usize,
    mut op: impl FnMut(&mut Connection<S>, &mut Context<'_>) -> Poll<T>,
) -> Option<T> {
    let deadline = tokio::time::sleep(STALLED);
    tokio::pin!(deadline);
    let mut last = moved(conn);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(done) = op(conn, cx) {
            return Poll::Ready(Some(done));
        }
        let now = moved(conn);
        if now != last {
            last = now;
            deadline
                .as_mut()
                .reset(tokio::time::Instant::now() + STALLED);
        }
        deadline.as_mut().poll(cx).map(|()| None)
    })
    .await
}

/// Queues a message without flushing it: for bursts (pipelined requests, the chunks of a
/// file). It goes out at the latest before this side next waits for the peer
/// ([`next_envelope`]), so a burst shares TLS records and write calls. A full buffer is
/// written out first ([`while_read`]).
pub(super) async fn feed<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    generation: Generation,
    message: Message,
) -> Result<(), SessionError> {
    let envelope = Envelope {
        generation,
        message,
    };
    while_read(conn, |conn, cx| conn.poll_ready_unpin(cx)).await?;
    conn.start_send_unpin(envelope)?;
    Ok(())
}

/// The peer's next envelope (`None` when it hung up). What this side queued is flushed
/// first — unless the peer's next message has already arrived in full (a burst of pipelined
/// requests): then the answers keep filling the buffer, which flushes itself when full.
pub(super) async fn next_envelope<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
) -> Option<Result<Envelope, SessionError>> {
    if let Err(err) = flush_unless_answered(conn).await {
        return Some(Err(err));
    }
    conn.next().await.map(|envelope| Ok(envelope?))
}

/// Writes out what is queued before this side waits for the peer, unless the peer's next
/// message has already arrived in full.
async fn flush_unless_answered<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
) -> Result<(), SessionError> {
    let arrived = matches!(
        lbs_protocol::frame::check(conn.read_buffer(), lbs_protocol::MAX_FRAME_LEN),
        Ok(Some(_))
    );
    if arrived { Ok(()) } else { flush(conn).await }
}

pub(super) async fn receive<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    during: &'static str,
) -> Result<Message, SessionError> {
    match next_envelope(conn).await {
        Some(envelope) => Ok(envelope?.message),
        None => Err(SessionError::Closed(during)),
    }
}

/// How long a receiver waits for more of an answer before it gives the pass up: it counts
/// from the last bytes that arrived, not from the start of a message, so a 256 KiB chunk
/// over a slow link is not cut while it is still coming. A sender reads the chunk it sends
/// next from its disk: nothing it does between two chunks takes this long unless it is
/// stopped or the link is gone (a link that flaps for less than this carries on). While it
/// scans it says so (protocol 1.12; an older sender's manifest is awaited as long as its scan
/// takes). Either side waits as long for the peer to take more of what it sends ([`flush`],
/// each write of a data chunk), whatever the transport; on the boxes' TCP connections the
/// kernel gives up first (`lbs_host::tcp::watch_peer`: 30 s unacknowledged, said as
/// [`SessionError::Lost`]).
pub(super) const STALLED: Duration = Duration::from_secs(60);

/// The next message of the sender's answer, given up on once nothing more of it arrived for
/// [`STALLED`] ([`next_while_heard`]).
pub(super) async fn receive_answer<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    during: &'static str,
) -> Result<Message, SessionError> {
    next_while_heard(conn, during)
        .await?
        .ok_or(SessionError::Closed(during))
}

/// The peer's next message (`None`: it hung up), waited for as long as bytes of it keep
/// arriving: the deadline ([`STALLED`], said as [`SessionError::Stalled`] `during`) moves on
/// whenever the read buffer changed (behind TLS a whole record, 16 KiB at most: a link down
/// to ~2 kbit/s carries on). What this side queued is written out first
/// ([`flush_unless_answered`]).
pub(super) async fn next_while_heard<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    during: &'static str,
) -> Result<Option<Message>, SessionError> {
    flush_unless_answered(conn).await?;
    let heard = |conn: &Connection<S>| conn.read_buffer().len();
    let next = while_moving(conn, heard, |conn, cx| conn.poll_next_unpin(cx))
        .await
        .ok_or(SessionError::Stalled(during))?;
    next.map(|envelope| Ok(envelope?.message)).transpose()
}
