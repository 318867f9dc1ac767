//! A TCP connection to a peer that vanishes — power cut, cable pulled, a router gone — sends
//! nothing more, not even a reset: without help each side would wait on it for hours (the
//! kernel's defaults) and hold its place. With these options the kernel gives up on it within
//! about half a minute: keepalive probes after [`IDLE`] of silence, and `TCP_USER_TIMEOUT` for
//! data that stays unacknowledged. A peer that is alive but busy answers the probes and is
//! never cut.

use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

/// Silence before the first keepalive probe.
pub const IDLE: Duration = Duration::from_secs(10);
/// Between probes.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// Probes unanswered before the connection is dropped.
pub const PROBES: u32 = 3;
/// How long sent data may stay unacknowledged before the connection is dropped.
pub const UNACKNOWLEDGED: Duration = Duration::from_secs(30);

/// Sets keepalive and `TCP_USER_TIMEOUT` on a connection to a peer, and `TCP_NODELAY`
/// (requests are small and answered at once: never wait 40 ms for a delayed ACK).
pub fn watch_peer(stream: &impl AsFd) -> io::Result<()> {
    let socket = SockRef::from(stream);
    socket.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(IDLE)
            .with_interval(INTERVAL)
            .with_retries(PROBES),
    )?;
    socket.set_tcp_user_timeout(Some(UNACKNOWLEDGED))?;
    socket.set_tcp_nodelay(true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_watched_connection_probes_its_peer_and_gives_up_on_unacknowledged_data() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let socket = SockRef::from(&stream);
        assert!(!socket.keepalive().unwrap());
        watch_peer(&stream).unwrap();
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), IDLE);
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), INTERVAL);
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), PROBES);
        assert_eq!(socket.tcp_user_timeout().unwrap(), Some(UNACKNOWLEDGED));
        assert!(socket.tcp_nodelay().unwrap());
    }
}
