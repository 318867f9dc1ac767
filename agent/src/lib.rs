//! `lbs-agent`: the `lbs` binary — today the `lbs sync`, `lbs net` and `lbs vpn` commands;
//! the daemon, activation, status and the role changes grow here (issues 7 and 8).
//!
//! - [`activate`]: `lbs activate`, and the files an activated box keeps.
//! - [`daemon`]: `lbs agent` — reports to the data center, replication (serve or pull), tunnels,
//!   resource history, the control socket; [`config`]: its TOML.
//! - [`promote_cmd`]: `lbs promote` (**P**).
//! - [`status_cmd`]: `lbs status`; [`resources`]: this machine's resource history.
//! - [`cli`]: the command line (clap) and the runtime around it.
//! - [`role`]: the role state machine, pure (events in, actions out), and its persisted record.
//! - [`peer`]: identities, and mutual-TLS connections to the partner (dial and accept).
//! - [`sync_cmd`]: `lbs sync serve | pull | verify`.
//! - [`net_cmd`]: `lbs net probe | take-over | give-up | watch | inventory | preflight`.
//! - [`vpn_cmd`]: `lbs vpn keygen | run | endpoint | status`.

pub mod activate;
pub mod boot_check;
pub mod check_config;
pub mod cli;
pub mod config;
pub mod console;
pub mod control;
pub mod daemon;
pub mod health;
mod hook;
pub mod net_cmd;
pub mod peer;
pub mod promote_cmd;
mod pull;
pub mod resources;
pub mod role;
pub mod status;
pub mod status_cmd;
pub mod sync_cmd;
mod text;
pub mod vpn_cmd;
