//! WireGuard in this process: boringtun devices on tun interfaces, each configured over a
//! private socket pair with WireGuard's text control protocol.
//!
//! The protocol is spoken here rather than through wireguard-control's userspace backend,
//! which prints to standard output on every read and starts `wireguard-go` when a socket is
//! missing. boringtun 0.7.1's traps, handled here:
//! - setting a peer that exists panics inside the device: peers are only removed and added
//!   ([`WireGuard::put_peer`]), each in its own request (a removal and an add in one request
//!   would also remove the added peer);
//! - `last_handshake_time_sec` is an age, not a timestamp;
//! - with a control socket file (`/var/run/wireguard/<name>.sock`) boringtun also reads
//!   SIGINT and SIGTERM from a signalfd, racing the host program for them: a SIGTERM then
//!   stops one device and never reaches the program. Given a socket pair instead it installs
//!   no signal handling, leaves no file behind when killed, and its interface names need only
//!   be unique in their network namespace (the socket directory is shared by all of them).
//!   The price: `wg show` cannot see these devices; `lbs vpn status` shows them.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boringtun::device::{DeviceConfig, DeviceHandle};

use crate::error::VpnError;
use crate::wg::{
    BackendKind, DeviceState, Key, PeerConfig, PeerState, WireGuard, allowed_text, allowed_v4,
    check_interface_name, link_exists, wait_gone,
};

/// How long one control request may take before the device is declared hung.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);

/// A running device and our end of its control socket pair.
struct Device {
    /// Dropping it stops the device's threads.
    _running: DeviceHandle,
    /// Requests go one at a time: boringtun reads each with a fresh buffer, so a second
    /// request sent before the first is answered could be lost.
    control: Mutex<Control>,
}

struct Control {
    stream: BufReader<UnixStream>,
    /// Set when a request timed out: a late answer would be read as the next one's.
    broken: bool,
}

/// boringtun devices owned by this process, by interface name; dropping this stops them.
pub struct Userspace {
    devices: Mutex<HashMap<String, Arc<Device>>>,
}

impl std::fmt::Debug for Userspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = match self.devices.lock() {
            Ok(devices) => devices.keys().cloned().collect(),
            Err(_) => Vec::new(),
        };
        f.debug_struct("Userspace")
            .field("devices", &names)
            .finish()
    }
}

impl Default for Userspace {
    fn default() -> Self {
        Self::new()
    }
}

impl Userspace {
    /// No devices yet.
    pub fn new() -> Userspace {
        Userspace {
            devices: Mutex::new(HashMap::new()),
        }
    }

    fn devices(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Device>>> {
        // A panic while holding the lock cannot leave the map inconsistent (single inserts
        // and removes), so a poisoned lock is still usable.
        self.devices
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Userspace {
    /// One request on a device's control socket; returns its `key=value` lines, `errno`
    /// checked.
    fn control(&self, name: &str, request: &str) -> Result<Vec<(String, String)>, VpnError> {
        let fail = |what: &str, err: &dyn std::fmt::Display| VpnError::device(name, what, err);
        let device = self
            .devices()
            .get(name)
            .cloned()
            .ok_or_else(|| fail("configuring it", &"this program does not run it"))?;
        let mut control = device
            .control
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if control.broken {
            return Err(fail(
                "configuring it",
                &"an earlier request went unanswered; the device is hung (restart lbs)",
            ));
        }
        control.broken = true;
        control
            .stream
            .get_mut()
            .write_all(request.as_bytes())
            .map_err(|e| fail("sending a control request", &e))?;
        let mut lines = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            let read = control
                .stream
                .read_line(&mut line)
                .map_err(|e| fail("reading the control answer", &e))?;
            if read == 0 {
                return Err(fail("reading the control answer", &"the device stopped"));
            }
            let line = line.trim_end_matches('\n');
            if line.is_empty() {
                break;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(fail(
                    "reading the control answer",
                    &format!("bad line {line:?}"),
                ));
            };
            lines.push((key.to_owned(), value.to_owned()));
        }
        control.broken = false;
        match lines.last() {
            Some((key, value)) if key == "errno" => {
                let code: i32 = value.parse().unwrap_or(-1);
                if code != 0 {
                    return Err(fail(
                        "the device refused the request",
                        &std::io::Error::from_raw_os_error(code),
                    ));
                }
                lines.pop();
                Ok(lines)
            }
            _ => Err(fail(
                "reading the control answer",
                &"it ended without a status",
            )),
        }
    }
}

fn hex(key: &Key) -> String {
    key.as_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a `get=1` answer.
fn parse_device(name: &str, lines: &[(String, String)]) -> Result<DeviceState, VpnError> {
    let bad = |key: &str, value: &str| {
        VpnError::device(name, "reading its state", format!("bad {key}={value}"))
    };
    let mut state = DeviceState::default();
    for (key, value) in lines {
        let peer = state.peers.last_mut();
        match (key.as_str(), peer) {
            ("listen_port", _) => {
                state.listen_port = Some(value.parse().map_err(|_| bad(key, value))?);
            }
            ("public_key", _) => {
                let key = Key::from_hex(value).map_err(|_| bad(key, value))?;
                state.peers.push(PeerState {
                    public_key: key,
                    endpoint: None,
                    handshake_age: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    allowed: Vec::new(),
                });
            }
            ("endpoint", Some(peer)) => {
                peer.endpoint = Some(value.parse::<SocketAddr>().map_err(|_| bad(key, value))?);
            }
            // boringtun reports the handshake's age here, not a time.
            ("last_handshake_time_sec", Some(peer)) => {
                let secs: u64 = value.parse().map_err(|_| bad(key, value))?;
                peer.handshake_age = Some(Duration::from_secs(secs));
            }
            ("rx_bytes", Some(peer)) => {
                peer.rx_bytes = value.parse().map_err(|_| bad(key, value))?
            }
            ("tx_bytes", Some(peer)) => {
                peer.tx_bytes = value.parse().map_err(|_| bad(key, value))?
            }
            ("allowed_ip", Some(peer)) => {
                let (ip, prefix) = value.split_once('/').ok_or_else(|| bad(key, value))?;
                let ip = ip.parse().map_err(|_| bad(key, value))?;
                let prefix = prefix.parse().map_err(|_| bad(key, value))?;
                peer.allowed.extend(allowed_v4(ip, prefix));
            }
            // Anything else (own key, fwmark, keepalive, nanoseconds) is not needed.
            _ => {}
        }
    }
    Ok(state)
}

impl WireGuard for Userspace {
    fn kind(&self) -> BackendKind {
        BackendKind::Userspace
    }

    fn create(&self, name: &str) -> Result<(), VpnError> {
        check_interface_name(name)?;
        if self.devices().contains_key(name) {
            return Err(VpnError::device(
                name,
                "creating it",
                "this program runs it already",
            ));
        }
        if link_exists(name) {
            return Err(VpnError::device(
                name,
                "creating it",
                format!(
                    "an interface by that name exists and is not a running userspace device; remove it (`ip link del {name}`) or choose another interface prefix"
                ),
            ));
        }
        let io = |what: &str| {
            let what = format!("{what} for {name}");
            move |error| VpnError::Io { what, error }
        };
        let (ours, theirs) = UnixStream::pair().map_err(io("making a control socket pair"))?;
        ours.set_read_timeout(Some(CONTROL_TIMEOUT))
            .and_then(|()| ours.set_write_timeout(Some(CONTROL_TIMEOUT)))
            .map_err(io("setting a timeout on the control socket"))?;
        // boringtun owns its end from here (and closes it when the device stops).
        let uapi_fd = theirs.into_raw_fd();
        // On a thread of its own, so whatever the device does to its creating thread's
        // signal mask stays there.
        let owned = name.to_owned();
        let created = std::thread::Builder::new()
            .name(format!("wg-create-{name}"))
            .spawn(move || {
                DeviceHandle::new(
                    &owned,
                    DeviceConfig {
                        n_threads: 2,
                        use_connected_socket: true,
                        use_multi_queue: true,
                        uapi_fd,
                    },
                )
                .map_err(|e| e.to_string())
            })
            .map_err(|error| VpnError::Io {
                what: "starting a thread".into(),
                error,
            })?
            .join()
            .map_err(|_| VpnError::device(name, "creating it", "the userspace device panicked"))?;
        let handle = created.map_err(|reason| {
            let hint = if nix::unistd::geteuid().is_root() {
                ""
            } else {
                " (tun devices need root)"
            };
            VpnError::device(
                name,
                "creating the userspace device on /dev/net/tun",
                format!("{reason}{hint}"),
            )
        })?;
        let device = Device {
            _running: handle,
            control: Mutex::new(Control {
                stream: BufReader::new(ours),
                broken: false,
            }),
        };
        self.devices().insert(name.to_owned(), Arc::new(device));
        Ok(())
    }

    fn set_identity(
        &self,
        name: &str,
        private_key: &Key,
        listen_port: Option<u16>,
    ) -> Result<(), VpnError> {
        let mut request = format!("set=1\nprivate_key={}\n", hex(private_key));
        if let Some(port) = listen_port {
            request.push_str(&format!("listen_port={port}\n"));
        }
        request.push('\n');
        self.control(name, &request).map(drop)
    }

    fn insert_peer(&self, name: &str, peer: &PeerConfig) -> Result<(), VpnError> {
        let mut request = format!("set=1\npublic_key={}\n", hex(&peer.public_key));
        if let Some(endpoint) = peer.endpoint {
            request.push_str(&format!("endpoint={endpoint}\n"));
        }
        if let Some(keepalive) = peer.keepalive {
            request.push_str(&format!("persistent_keepalive_interval={keepalive}\n"));
        }
        request.push_str("replace_allowed_ips=true\n");
        for allowed in &peer.allowed {
            request.push_str(&format!("allowed_ip={}\n", allowed_text(allowed)));
        }
        request.push('\n');
        self.control(name, &request).map(drop)
    }

    fn remove_peer(&self, name: &str, public_key: &Key) -> Result<(), VpnError> {
        self.control(
            name,
            &format!("set=1\npublic_key={}\nremove=true\n\n", hex(public_key)),
        )
        .map(drop)
    }

    fn device(&self, name: &str) -> Result<DeviceState, VpnError> {
        parse_device(name, &self.control(name, "get=1\n\n")?)
    }

    fn destroy(&self, name: &str) -> Result<(), VpnError> {
        let device = self.devices().remove(name);
        let Some(device) = device else {
            return Ok(());
        };
        // Dropping the handle stops the device's threads (a request in flight holds the
        // device a moment longer); the tun interface goes when the last thread lets go.
        drop(device);
        wait_gone(name)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn lines(text: &str) -> Vec<(String, String)> {
        text.lines()
            .map(|l| {
                let (k, v) = l.split_once('=').unwrap();
                (k.to_owned(), v.to_owned())
            })
            .collect()
    }

    #[test]
    fn a_get_answer_reads_peers_with_handshake_age_and_counters() {
        let key = Key::generate_private().get_public();
        let answer = format!(
            "private_key={}\nlisten_port=51820\npublic_key={}\nendpoint=10.0.0.2:4000\nlast_handshake_time_sec=7\nlast_handshake_time_nsec=12\nrx_bytes=100\ntx_bytes=200\npersistent_keepalive_interval=15\nallowed_ip=10.77.0.0/16\nallowed_ip=fd00::/64\nsomething_new=1",
            "00".repeat(32),
            hex(&key)
        );
        let state = parse_device("wg0", &lines(&answer)).unwrap();
        assert_eq!(state.listen_port, Some(51820));
        assert_eq!(state.peers.len(), 1);
        let peer = &state.peers[0];
        assert_eq!(peer.public_key, key);
        assert_eq!(peer.endpoint, Some("10.0.0.2:4000".parse().unwrap()));
        assert_eq!(peer.handshake_age, Some(Duration::from_secs(7)));
        assert_eq!((peer.rx_bytes, peer.tx_bytes), (100, 200));
        assert_eq!(peer.allowed, ["10.77.0.0/16".parse().unwrap()]);
    }

    #[test]
    fn a_garbled_answer_is_an_error_naming_the_interface() {
        let err = parse_device("wg0", &lines("listen_port=many")).unwrap_err();
        assert!(err.to_string().contains("wg0"), "{err}");
        assert!(err.to_string().contains("listen_port=many"), "{err}");
    }
}
