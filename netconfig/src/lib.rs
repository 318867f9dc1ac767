//! Network takeover for lbs (DESIGN §8): the backup takes the failed primary's office address
//! in well under a second once it decides to, never while the old primary still answers, and
//! never leaves the box without an address.
//!
//! - [`types`]: IPv4 prefixes, MAC addresses, links and routes as lbs speaks of them.
//! - [`backend`]: the [`NetBackend`] trait (links, carrier, addresses, default route,
//!   `promote_secondaries`) and the [`Arp`] trait (RFC 5227 probe, gratuitous announce).
//! - [`arp`]: [`PacketArp`], probes and announcements on an `AF_PACKET` socket.
//! - [`fake`]: an in-memory network that behaves like the kernel where it matters (deleting a
//!   primary address takes its secondaries and the default route with it unless
//!   `promote_secondaries` is set; a gateway outside every subnet is unreachable) and injects
//!   failures, so the takeover logic is tested without root.
//! - [`inventory`]: CPU, memory, disks, NICs and telephony cards, and a comparison naming
//!   each difference between the two boxes of a pair.
//! - [`lan`]: what runs on after a takeover — the announcement's slow [`Refresh`] and the
//!   [`ConflictWatch`] for another machine claiming the address.
//! - [`netlink`]: the real backend (rtnetlink, `/proc/sys`).
//! - [`persist`]: the address change written into whichever of systemd-networkd, ifupdown,
//!   NetworkManager or ifcfg owns the interface, so it survives a reboot.
//! - [`preflight`]: interface, static address, same subnet, partner answering.
//! - [`takeover`]: [`take_over`] and [`give_up`], each one idempotent, logged sequence with a
//!   timed report per step that restores the previous address and route on any failure before
//!   verification.

pub mod arp;
pub mod backend;
pub mod dynamic;
pub mod fake;
pub mod inventory;
pub mod lan;
pub mod netlink;
pub mod persist;
pub mod preflight;
pub mod takeover;
pub mod types;

pub use arp::{PacketArp, ProbeProfile};
pub use backend::{Arp, CarrierEvents, NetBackend, NetError, ProbeResult};
pub use dynamic::{AnyArp, AnyNet};
pub use fake::FakeNet;
pub use lan::{Conflict, ConflictWatch, Refresh, neighbour_mac};
pub use netlink::Netlink;
pub use takeover::{
    PersistTo, Step, StepOutcome, StepReport, TakeoverError, TakeoverPlan, TakeoverReport, give_up,
    give_up_observed, take_back, take_over, take_over_observed,
};
pub use types::{DefaultRoute, Ipv4Cidr, LinkInfo, MacAddr, ParseError};
