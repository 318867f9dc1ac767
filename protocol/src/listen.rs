//! One accept loop for every listener of lbs (the data center's two ports, the primary's sync
//! port, `lbs sync serve`, the agent's control socket, the lab's hello server): connections
//! bounded, each in a task the loop owns, and on shutdown a drain with a deadline, then the
//! rest cut.

use std::fmt::Debug;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// A listener [`serve_until`] can accept from.
pub trait Listener {
    /// What a connection is.
    type Stream: Send + 'static;
    /// Where it comes from.
    type Addr: Debug + Send + 'static;
    /// The next connection.
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, Self::Addr)>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, Self::Addr)>> + Send {
        tokio::net::TcpListener::accept(self)
    }
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, Self::Addr)>> + Send {
        tokio::net::UnixListener::accept(self)
    }
}

/// How a listener serves.
#[derive(Clone, Debug)]
pub struct Serving {
    /// For the journal ("the control socket", "the sync port").
    pub what: &'static str,
    /// Connections served at once; one more is closed at once (listeners may share it).
    pub limit: Arc<Semaphore>,
    /// On shutdown, how long connections under way may take to end before they are cut.
    pub drain: Duration,
}

impl Serving {
    /// `limit` connections at once of its own, `drain` to end.
    pub fn new(what: &'static str, limit: usize, drain: Duration) -> Serving {
        Serving {
            what,
            limit: Arc::new(Semaphore::new(limit)),
            drain,
        }
    }
}

/// Accepts from `listener` until `shutdown`, each connection handled by `handler`'s future in
/// a task of its own (handlers that should end early at shutdown watch the token
/// themselves); then waits up to `serving.drain` for them and cuts the rest. Returns how
/// many connections it accepted.
pub async fn serve_until<L, H, F>(
    listener: L,
    shutdown: CancellationToken,
    serving: Serving,
    mut handler: H,
) -> u64
where
    L: Listener,
    H: FnMut(L::Stream, L::Addr) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let what = serving.what;
    let mut connections = JoinSet::new();
    let mut accepted_count = 0u64;
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (stream, source) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors, say: wait a little rather than spin.
                tracing::warn!("{what}: accepting a connection: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = serving.limit.clone().try_acquire_owned() else {
            tracing::warn!(
                "{what}: {} connections already; one from {source:?} closed",
                connections.len()
            );
            continue;
        };
        accepted_count += 1;
        let handled = handler(stream, source);
        connections.spawn(async move {
            let _permit = permit;
            handled.await;
        });
    }
    let drained = tokio::time::timeout(serving.drain, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::info!(
            "{what}: {} connection(s) still open after {:?}; cut",
            connections.len(),
            serving.drain
        );
        connections.shutdown().await;
    }
    accepted_count
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn connections_are_bounded_and_drained_then_cut_at_shutdown() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let serving = Serving::new("the test port", 2, Duration::from_millis(200));
        let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
        let stop = shutdown.clone();
        let server = tokio::spawn(serve_until(
            listener,
            shutdown.clone(),
            serving,
            move |mut stream: tokio::net::TcpStream, _| {
                let (stop, ended) = (stop.clone(), ended_tx.clone());
                async move {
                    stream.write_all(b"hi").await.unwrap();
                    // Holds the connection until shutdown, like a session.
                    stop.cancelled().await;
                    let _ = ended.send(());
                    // One that will not end in time: cut.
                    std::future::pending::<()>().await;
                }
            },
        ));
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
            let mut hi = [0; 2];
            stream.read_exact(&mut hi).await.unwrap();
            held.push(stream);
        }
        // A third is closed at once: it reads end of file, not a greeting.
        let mut third = tokio::net::TcpStream::connect(address).await.unwrap();
        let mut buf = [0; 2];
        let read = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        shutdown.cancel();
        let served = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(served, 2);
        for _ in 0..2 {
            ended.recv().await.unwrap();
        }
    }
}
