//! What an lbs process needs from the host it runs on, below every other crate of the
//! workspace: files written so that a crash leaves the old or the new version ([`fs`]),
//! systemd's readiness and watchdog protocol ([`systemd`]), logging to journald or standard
//! error ([`logging`]), man pages and completions from a clap definition ([`cli_docs`]), and TCP options
//! that notice a vanished peer ([`tcp`]).

#![forbid(unsafe_code)]

pub mod cli_docs;
pub mod fs;
pub mod limits;
pub mod logging;
pub mod systemd;
pub mod tcp;

pub use fs::write_file_atomic;
