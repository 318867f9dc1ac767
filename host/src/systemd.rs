//! systemd's readiness protocol (`Type=notify`): a datagram to `$NOTIFY_SOCKET`. Both
//! daemons, the agent and the data center, say `READY=1` once they serve and `STOPPING=1`
//! when they begin to stop, so `systemctl start` returns when the service really works.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (`READY=1\nSTATUS=…`) to systemd when started by it (`$NOTIFY_SOCKET` set);
/// does nothing otherwise. A failure to tell is logged, never fatal: the service works either
/// way and systemd names the missing notification itself.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(err) = notify_to(&path.to_string_lossy(), state) {
        tracing::warn!("telling systemd {state:?}: {err}");
    }
}

/// The watchdog period systemd asks for (`WatchdogSec=`, passed as `$WATCHDOG_USEC` to the
/// main process), if any: ping with `WATCHDOG=1` more often than that.
pub fn watchdog_period() -> Option<std::time::Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    // Meant for another process (a child that inherited the environment)? Then not ours.
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse() != Ok(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| std::time::Duration::from_micros(usec))
}

/// Sends `state` to the notification socket `path` (a file, or `@name` for an abstract one).
pub fn notify_to(path: &str, state: &str) -> std::io::Result<()> {
    let address = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
        None => SocketAddr::from_pathname(path)?,
    };
    UnixDatagram::unbound()?
        .send_to_addr(state.as_bytes(), &address)
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::notify_to;

    #[test]
    fn a_state_reaches_a_socket_by_path_and_by_abstract_name() {
        let dir = std::env::temp_dir().join(format!("lbs-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        notify_to(path.to_str().unwrap(), "READY=1\nSTATUS=serving").unwrap();
        let mut buf = [0u8; 64];
        let n = socket.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");
        std::fs::remove_dir_all(&dir).unwrap();

        use std::os::linux::net::SocketAddrExt;
        let name = format!("lbs-notify-test-{}", std::process::id());
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = std::os::unix::net::UnixDatagram::bind_addr(&address).unwrap();
        notify_to(&format!("@{name}"), "STOPPING=1").unwrap();
        let n = socket.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
        assert!(notify_to("/nonexistent/lbs/notify", "READY=1").is_err());
    }
}
