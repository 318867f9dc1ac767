//! Redundant WireGuard tunnels for lbs (DESIGN §7): every box keeps one tunnel to each
//! data-center endpoint, both up and probed, and its traffic moves to the healthy one within
//! about a second of a failure.
//!
//! - [`failover`]: the decisions — when a tunnel is degraded or dead, when to move the route,
//!   when to fail back, when to reset a peer — as pure logic driven by probe results and a
//!   clock, so every rule is tested without root or time passing.
//! - [`wg`]: the one trait both WireGuard backends implement: [`userspace`] (boringtun in
//!   this process) and [`kernel`] (the kernel module through wireguard-control), chosen
//!   automatically.
//! - [`heartbeat`]: the datagram a box sends through each tunnel and the endpoint echoes.
//! - [`tunnels`]: the box's side — the tunnels, their probes and the overlay route.
//! - [`endpoint`]: the data center's side — one interface, box peers added and removed live.
//! - [`config`]: the TOML files `lbs vpn` reads.

pub mod backend;
pub mod config;
pub mod endpoint;
pub mod error;
pub mod failover;
pub mod heartbeat;
pub mod kernel;
pub mod tunnels;
pub mod userspace;
pub mod wg;

pub use endpoint::{Endpoint, EndpointConfig, PeerChanges};
pub use error::VpnError;
pub use failover::{Action, Failover, FailoverConfig, Health, ProbeOutcome, TunnelStatus, Why};
pub use tunnels::{EndpointSpec, RouteChange, TunnelReport, Tunnels, TunnelsConfig, VpnStatus};
pub use wg::{BackendChoice, BackendKind, Key, WireGuard};
