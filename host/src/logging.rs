//! Where the daemons and commands log. Under systemd (its `$JOURNAL_STREAM` names our standard
//! error) records go to journald with their level as the priority, so `journalctl -p warning
//! -u lbs-agent` shows the warnings and journald's own timestamp is the only one; anywhere
//! else, lines on standard error with their time and level. `RUST_LOG` overrides the filter.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Sets up logging once for the process (`default_filter` like `"info"` or
/// `"warn,lbs_vpn=info"`); a second call does nothing.
pub fn init(identifier: &str, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    if stderr_is_the_journal() {
        match tracing_journald::layer() {
            Ok(layer) => {
                let _ = tracing_subscriber::registry()
                    .with(filter)
                    .with(layer.with_syslog_identifier(identifier.to_owned()))
                    .try_init();
                return;
            }
            Err(err) => {
                eprintln!("{identifier}: journald not reachable ({err}); logging to standard error")
            }
        }
    }
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Whether standard error is the stream systemd connected to journald (`$JOURNAL_STREAM` is
/// `device:inode` of it); a command run from a shell inside a service is not.
fn stderr_is_the_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((device, inode)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    device.parse() == Ok(meta.dev()) && inode.parse() == Ok(meta.ino())
}
