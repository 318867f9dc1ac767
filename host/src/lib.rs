//! What an lbs process needs from the host it runs on, below every other crate of the
//! workspace: files written so that a crash leaves the old or the new version ([`fs`]) and
//! systemd's readiness and watchdog protocol ([`systemd`]); behind features, logging to
//! journald or standard error (`logging`), man pages and completions from a clap definition
//! (`cli-docs`: `cli_docs`), and for the daemons (`daemon`) TCP options that notice a
//! vanished peer (`tcp`) and the open-files limit (`limits`); jittered exponential waits
//! between attempts to reach a server ([`backoff`]); Prometheus's text format ([`metrics`]).

#![forbid(unsafe_code)]

pub mod backoff;
#[cfg(feature = "cli-docs")]
pub mod cli_docs;
pub mod fs;
#[cfg(feature = "daemon")]
pub mod limits;
#[cfg(feature = "logging")]
pub mod logging;
pub mod metrics;
pub mod systemd;
#[cfg(feature = "daemon")]
pub mod tcp;
pub mod term;

pub use fs::write_file_atomic;
