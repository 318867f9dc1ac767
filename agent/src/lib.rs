//! `lbs-agent`: the `lbs` binary — today the `lbs sync` commands; the daemon, activation,
//! status and the role changes grow here (issues 7 and 8).
//!
//! - [`cli`]: the command line (clap) and the runtime around it.
//! - [`peer`]: identities, and mutual-TLS connections to the partner (dial and accept).
//! - [`sync_cmd`]: `lbs sync serve | pull | verify`.

pub mod cli;
pub mod net_cmd;
pub mod peer;
pub mod sync_cmd;
