//! Redundant WireGuard tunnels for lbs (DESIGN §7): every box keeps one tunnel to each
//! data-center endpoint, both up and probed, and its traffic moves to the healthy one within
//! about a second of a failure.
//!
//! - [`failover`]: the decisions — when a tunnel is degraded or dead, when to move the route,
//!   when to fail back, when to reset a peer — as pure logic driven by probe results and a
//!   clock, so every rule is tested without root or time passing.
//!
//! The tunnel devices (boringtun in userspace, the kernel module where present), the probes
//! and the routes follow with the rest of issue 5.

pub mod failover;

pub use failover::{Action, Failover, FailoverConfig, Health, ProbeOutcome, TunnelStatus};
