//! One accept loop for every listener of lbs (the data center's two ports, the primary's sync
//! port, `lbs sync serve`, the agent's control socket, the lab's hello server): connections
//! bounded, each in a task the loop owns, and on shutdown a drain with a deadline, then the
//! rest cut.
//!
//! A port that strangers can reach also bounds what a stranger may hold ([`Unproven`]): a
//! connection counts as unproven until its handler says who is at the other end
//! ([`Admission::proven`]); unproven connections are limited in all and per source address,
//! and cut when they take longer than their deadline. A flood of silent connections from one
//! machine then costs a few slots for a few seconds, never the partner's or a box's place.

use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
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
    /// The machine a connection comes from, for the per-source bound (none for local sockets).
    fn source(_addr: &Self::Addr) -> Option<IpAddr> {
        None
    }
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, Self::Addr)>> + Send {
        tokio::net::TcpListener::accept(self)
    }
    fn source(addr: &Self::Addr) -> Option<IpAddr> {
        Some(addr.ip())
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
    /// What connections not yet proven may hold; `None`: no bound beyond `limit` (a local
    /// socket only its owners can open).
    pub unproven: Option<Unproven>,
}

impl Serving {
    /// `limit` connections at once of its own, `drain` to end.
    pub fn new(what: &'static str, limit: usize, drain: Duration) -> Serving {
        Serving {
            what,
            limit: Arc::new(Semaphore::new(limit)),
            drain,
            unproven: None,
        }
    }

    /// With the bounds of `unproven` on connections not yet proven.
    pub fn with_unproven(mut self, unproven: Unproven) -> Serving {
        self.unproven = Some(unproven);
        self
    }
}

/// The bounds on connections whose peer has not proven who it is (a TLS handshake and hello
/// under way, an activation request not yet answered).
#[derive(Clone, Debug)]
pub struct Unproven {
    /// At once, from anywhere (kept below the listener's `limit`, so that proven peers always
    /// find room).
    pub limit: Arc<Semaphore>,
    /// At once from one source address.
    pub per_source: usize,
    /// How long a connection may stay unproven before it is cut.
    pub within: Duration,
    counts: Counts,
}

/// Unproven connections per source address.
type Counts = Arc<Mutex<HashMap<IpAddr, usize>>>;

impl Unproven {
    /// `limit` unproven connections at once, `per_source` from one address, each for at most
    /// `within`.
    pub fn new(limit: usize, per_source: usize, within: Duration) -> Unproven {
        Unproven {
            limit: Arc::new(Semaphore::new(limit)),
            per_source,
            within,
            counts: Arc::default(),
        }
    }

    /// A place for a connection from `source`, if its address and the whole have room.
    fn admit(&self, source: Option<IpAddr>) -> Result<Admitted, &'static str> {
        let permit = self
            .limit
            .clone()
            .try_acquire_owned()
            .map_err(|_| "unproven connections")?;
        if let Some(ip) = source {
            let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            let count = counts.entry(ip).or_insert(0);
            if *count >= self.per_source {
                return Err("unproven connections from that address");
            }
            *count += 1;
        }
        Ok(Admitted {
            _permit: permit,
            source: source.map(|ip| (ip, self.counts.clone())),
        })
    }
}

/// An unproven connection's place (released on drop).
#[derive(Debug)]
struct Admitted {
    _permit: OwnedSemaphorePermit,
    source: Option<(IpAddr, Counts)>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some((ip, counts)) = &self.source {
            let mut counts = counts.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(count) = counts.get_mut(ip) {
                *count -= 1;
                if *count == 0 {
                    counts.remove(ip);
                }
            }
        }
    }
}

/// Handed to each connection's handler: while it is held and [`Admission::proven`] has not
/// been called, the connection counts against [`Unproven`]'s bounds and its deadline runs.
#[derive(Debug)]
#[must_use = "call proven() once the peer is known, or hold it for the connection's life"]
pub struct Admission {
    admitted: Option<Admitted>,
    proven: Option<oneshot::Sender<()>>,
}

impl Admission {
    /// The peer proved who it is: its place among the unproven is freed and the deadline
    /// no longer applies.
    pub fn proven(mut self) {
        self.admitted = None;
        if let Some(tell) = self.proven.take() {
            let _ = tell.send(());
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
    H: FnMut(L::Stream, L::Addr, Admission) -> F,
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
        let (admitted, deadline) = match &serving.unproven {
            None => (None, None),
            Some(unproven) => match unproven.admit(L::source(&source)) {
                Ok(admitted) => (Some(admitted), Some(unproven.within)),
                Err(full) => {
                    tracing::warn!("{what}: too many {full}; one from {source:?} closed");
                    continue;
                }
            },
        };
        accepted_count += 1;
        let (proven, told) = oneshot::channel();
        let what_source = format!("{source:?}");
        let handled = handler(
            stream,
            source,
            Admission {
                admitted,
                proven: Some(proven),
            },
        );
        connections.spawn(async move {
            let _permit = permit;
            let Some(within) = deadline else {
                return handled.await;
            };
            tokio::pin!(handled);
            let in_time = tokio::select! {
                () = &mut handled => return,
                in_time = tokio::time::timeout(within, told) => in_time,
            };
            match in_time {
                // Proven, or the handler let its admission go: the connection is its own.
                Ok(_) => handled.await,
                Err(_) => tracing::info!(
                    "{what}: {what_source} did not say who it is within {within:?}; cut"
                ),
            }
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
            move |mut stream: tokio::net::TcpStream, _, _admission| {
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

    /// A server whose handler greets, then proves the peer when it sends `p` and holds the
    /// connection until end of file; its address.
    async fn proving_server(serving: Serving, shutdown: CancellationToken) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(serve_until(
            listener,
            shutdown,
            serving,
            |mut stream: tokio::net::TcpStream, _, admission: Admission| async move {
                stream.write_all(b"hi").await.unwrap();
                let mut byte = [0; 1];
                if matches!(stream.read(&mut byte).await, Ok(1)) && byte[0] == b'p' {
                    admission.proven();
                    while matches!(stream.read(&mut byte).await, Ok(n) if n > 0) {}
                }
            },
        ));
        address
    }

    async fn connect_from(source: &str, to: std::net::SocketAddr) -> tokio::net::TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        socket.connect(to).await.unwrap()
    }

    /// Whether the server greets on `stream` (it was let in) or closes it.
    async fn let_in(stream: &mut tokio::net::TcpStream) -> bool {
        let mut hi = [0; 2];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut hi))
            .await
            .unwrap();
        read.is_ok()
    }

    /// Whether the server has closed `stream` within `wait`.
    async fn closed_within(stream: &mut tokio::net::TcpStream, wait: Duration) -> bool {
        let mut buf = [0; 8];
        matches!(
            tokio::time::timeout(wait, stream.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn one_address_cannot_hold_more_than_its_share_of_unproven_places() {
        let shutdown = CancellationToken::new();
        let serving = Serving::new("the test port", 100, Duration::ZERO)
            .with_unproven(Unproven::new(10, 2, Duration::from_secs(30)));
        let address = proving_server(serving, shutdown.clone()).await;
        let mut flood = Vec::new();
        for _ in 0..2 {
            let mut silent = connect_from("127.0.0.1", address).await;
            assert!(let_in(&mut silent).await);
            flood.push(silent);
        }
        // The third from the same machine is closed at once...
        let mut third = connect_from("127.0.0.1", address).await;
        assert!(!let_in(&mut third).await);
        // ...while another machine still gets in,
        let mut other = connect_from("127.0.0.2", address).await;
        assert!(let_in(&mut other).await);
        // and a connection that proves itself frees its place for the next one.
        other.write_all(b"p").await.unwrap();
        let mut proven = flood.pop().unwrap();
        proven.write_all(b"p").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut next = connect_from("127.0.0.1", address).await;
        assert!(let_in(&mut next).await);
        assert!(!closed_within(&mut proven, Duration::from_millis(200)).await);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn the_unproven_limit_holds_across_addresses_and_a_silent_peer_is_cut_at_its_deadline() {
        let shutdown = CancellationToken::new();
        let serving = Serving::new("the test port", 100, Duration::ZERO)
            .with_unproven(Unproven::new(3, 2, Duration::from_millis(500)));
        let address = proving_server(serving, shutdown.clone()).await;
        let mut silent = Vec::new();
        for source in ["127.0.0.1", "127.0.0.2", "127.0.0.3"] {
            let mut stream = connect_from(source, address).await;
            assert!(let_in(&mut stream).await, "{source}");
            silent.push(stream);
        }
        let mut fourth = connect_from("127.0.0.4", address).await;
        assert!(!let_in(&mut fourth).await);
        // A proven connection outlives the deadline; the silent ones do not.
        silent[0].write_all(b"p").await.unwrap();
        let started = std::time::Instant::now();
        assert!(closed_within(&mut silent[1], Duration::from_secs(5)).await);
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(closed_within(&mut silent[2], Duration::from_secs(5)).await);
        assert!(!closed_within(&mut silent[0], Duration::from_millis(700)).await);
        // Their places are free again.
        let mut after = connect_from("127.0.0.4", address).await;
        assert!(let_in(&mut after).await);
        shutdown.cancel();
    }
}
