//! Which tunnel carries the traffic, decided from probe results and a clock.
//!
//! Handshake age and byte counters cannot tell a dead WireGuard tunnel (handshakes refresh
//! every ~2 minutes and keepalives are not counted), so each tunnel is probed through the
//! overlay several times a second. From those results alone:
//!
//! - one lost probe makes a tunnel **degraded** (still used); `dead_after` lost in a row make
//!   it **down**, and the route moves to a healthy tunnel at once;
//! - a good probe makes a tunnel **up** again, but the route goes back to the preferred tunnel
//!   only after it has been up without a single loss for `failback_after` (no flapping);
//! - while a tunnel is down its peer is reset (removed and added again) every `reset_every`:
//!   after a data-center restart that brings a tunnel back in about a second instead of ~12.
//!
//! Time is passed in (`now`, a duration since any fixed start), so every rule is tested
//! without waiting.

use std::time::Duration;

/// The rules' parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailoverConfig {
    /// How often each tunnel is probed. A heartbeat not answered before the next one leaves
    /// counts as lost, so this must stay above the tunnels' worst round trip.
    pub probe_interval: Duration,
    /// Lost probes in a row that make a tunnel down.
    pub dead_after: u32,
    /// How long the preferred tunnel must be up, with no loss, before traffic goes back to it.
    pub failback_after: Duration,
    /// How often a down tunnel's peer is reset.
    pub reset_every: Duration,
    /// The tunnel traffic prefers (the first data center).
    pub preferred: usize,
}

impl Default for FailoverConfig {
    /// Probes every 200 ms, down after 3 losses (detection in about 0.6–0.8 s, the spike's
    /// 0.87–0.94 s with its probe timeout), fail back after 10 s, resets every 2 s.
    fn default() -> Self {
        FailoverConfig {
            probe_interval: Duration::from_millis(200),
            dead_after: 3,
            failback_after: Duration::from_secs(10),
            reset_every: Duration::from_secs(2),
            preferred: 0,
        }
    }
}

/// What a probe through one tunnel found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// An answer, after this long.
    Answered(Duration),
    /// No answer within the probe's timeout.
    Lost,
}

/// A tunnel's health as status shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Not probed yet.
    Unknown,
    /// Probes answered.
    Up,
    /// The last probe (or few) lost, fewer than `dead_after`.
    Degraded,
    /// `dead_after` or more lost in a row.
    Down,
}

/// What the caller must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Route the overlay through this tunnel.
    Route {
        tunnel: usize,
        /// Why, for the log and status.
        why: Why,
    },
    /// Remove this tunnel's peer and add it again (never modify it in place).
    ResetPeer { tunnel: usize },
}

/// Why the route moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// No tunnel was in use and this one answered.
    FirstAnswer,
    /// The tunnel in use went down after this many lost probes in a row.
    FailedOver {
        /// The tunnel that went down.
        from: usize,
        /// Its lost probes in a row.
        lost: u32,
    },
    /// The preferred tunnel answered every probe for this long.
    FailedBack {
        /// The tunnel left.
        from: usize,
        /// The clean run required.
        after: Duration,
    },
}

/// One tunnel's state, for `lbs status` and the data center.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelStatus {
    pub health: Health,
    /// Whether the overlay is routed through it.
    pub active: bool,
    /// The last answered probe's round trip.
    pub last_rtt: Option<Duration>,
    /// Time since the last answered probe (`None`: never).
    pub since_last_good: Option<Duration>,
    /// Lost probes in a row now.
    pub misses: u32,
}

#[derive(Clone, Copy, Debug, Default)]
struct Tunnel {
    misses: u32,
    probed: bool,
    last_good: Option<Duration>,
    last_rtt: Option<Duration>,
    /// Start of the current run of answered probes.
    healthy_since: Option<Duration>,
    last_reset: Option<Duration>,
}

impl Tunnel {
    fn health(&self, dead_after: u32) -> Health {
        match (self.probed, self.misses) {
            (false, _) => Health::Unknown,
            (true, 0) => Health::Up,
            (true, n) if n < dead_after => Health::Degraded,
            _ => Health::Down,
        }
    }
}

/// The decisions for a set of tunnels.
#[derive(Clone, Debug)]
pub struct Failover {
    config: FailoverConfig,
    tunnels: Vec<Tunnel>,
    active: Option<usize>,
    failovers: u64,
}

impl Failover {
    /// `count` tunnels, none active until one answers.
    pub fn new(config: FailoverConfig, count: usize) -> Failover {
        Failover {
            config,
            tunnels: vec![Tunnel::default(); count],
            active: None,
            failovers: 0,
        }
    }

    /// The tunnel the overlay goes through now.
    pub fn active(&self) -> Option<usize> {
        self.active
    }

    /// How often traffic moved away from a failed tunnel.
    pub fn failovers(&self) -> u64 {
        self.failovers
    }

    /// Every tunnel's status at `now`.
    pub fn status(&self, now: Duration) -> Vec<TunnelStatus> {
        self.tunnels
            .iter()
            .enumerate()
            .map(|(i, t)| TunnelStatus {
                health: t.health(self.config.dead_after),
                active: self.active == Some(i),
                last_rtt: t.last_rtt,
                since_last_good: t.last_good.map(|at| now.saturating_sub(at)),
                misses: t.misses,
            })
            .collect()
    }

    /// Up, or degraded after having answered: a tunnel that never answered is not used.
    fn usable(&self, i: usize) -> bool {
        let t = &self.tunnels[i];
        match t.health(self.config.dead_after) {
            Health::Up => true,
            Health::Degraded => t.last_good.is_some(),
            Health::Unknown | Health::Down => false,
        }
    }

    /// Takes one probe result; returns what to do. A result for an unknown tunnel is ignored.
    pub fn probe(&mut self, now: Duration, tunnel: usize, outcome: ProbeOutcome) -> Vec<Action> {
        let dead_after = self.config.dead_after;
        let Some(t) = self.tunnels.get_mut(tunnel) else {
            return Vec::new();
        };
        let mut actions = Vec::new();
        t.probed = true;
        match outcome {
            ProbeOutcome::Answered(rtt) => {
                t.misses = 0;
                t.last_good = Some(now);
                t.last_rtt = Some(rtt);
                t.healthy_since.get_or_insert(now);
            }
            ProbeOutcome::Lost => {
                t.misses = t.misses.saturating_add(1);
                t.healthy_since = None;
                if t.misses >= dead_after
                    && t.last_reset
                        .is_none_or(|at| now.saturating_sub(at) >= self.config.reset_every)
                {
                    t.last_reset = Some(now);
                    actions.push(Action::ResetPeer { tunnel });
                }
            }
        }
        actions.extend(self.reroute(now));
        actions
    }

    /// The route decision after any change.
    fn reroute(&mut self, now: Duration) -> Option<Action> {
        let preferred = self.config.preferred;
        // The best usable tunnel: the preferred one if usable, else the first usable.
        let best = if preferred < self.tunnels.len() && self.usable(preferred) {
            Some(preferred)
        } else {
            (0..self.tunnels.len()).find(|&i| self.usable(i))
        };
        match self.active {
            Some(active) if self.usable(active) => {
                // Only a sustained, loss-free run brings traffic back to the preferred tunnel.
                let back = active != preferred
                    && preferred < self.tunnels.len()
                    && self.tunnels[preferred].healthy_since.is_some_and(|since| {
                        now.saturating_sub(since) >= self.config.failback_after
                    });
                back.then(|| {
                    self.active = Some(preferred);
                    Action::Route {
                        tunnel: preferred,
                        why: Why::FailedBack {
                            from: active,
                            after: self.config.failback_after,
                        },
                    }
                })
            }
            Some(active) => {
                let to = best?;
                self.active = Some(to);
                self.failovers += 1;
                Some(Action::Route {
                    tunnel: to,
                    why: Why::FailedOver {
                        from: active,
                        lost: self.tunnels[active].misses,
                    },
                })
            }
            None => {
                // At the start the preferred tunnel gets its chance: another one is used
                // only once the preferred one answered nothing `dead_after` times.
                let preferred_down = self
                    .tunnels
                    .get(preferred)
                    .is_none_or(|t| t.health(self.config.dead_after) == Health::Down);
                let to = best.filter(|&to| to == preferred || preferred_down)?;
                self.active = Some(to);
                Some(Action::Route {
                    tunnel: to,
                    why: Why::FirstAnswer,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const RTT: ProbeOutcome = ProbeOutcome::Answered(Duration::from_millis(3));

    /// Drives both tunnels with a probe each every 200 ms from `from` to `to`; `outcome`
    /// says per tunnel and time what happens. Returns the actions with their times.
    fn drive(
        f: &mut Failover,
        from: Duration,
        to: Duration,
        outcome: impl Fn(usize, Duration) -> ProbeOutcome,
    ) -> Vec<(Duration, Action)> {
        let mut out = Vec::new();
        let mut now = from;
        while now < to {
            for tunnel in 0..2 {
                for action in f.probe(now, tunnel, outcome(tunnel, now)) {
                    out.push((now, action));
                }
            }
            now += 200 * MS;
        }
        out
    }

    fn routes(actions: &[(Duration, Action)]) -> Vec<(Duration, usize)> {
        actions
            .iter()
            .filter_map(|(at, a)| match a {
                Action::Route { tunnel, .. } => Some((*at, *tunnel)),
                Action::ResetPeer { .. } => None,
            })
            .collect()
    }

    #[test]
    fn traffic_starts_on_the_preferred_tunnel_and_moves_within_a_second_of_its_death() {
        let mut f = Failover::new(FailoverConfig::default(), 2);
        let start = drive(&mut f, Duration::ZERO, Duration::from_secs(5), |_, _| RTT);
        assert_eq!(routes(&start), [(Duration::ZERO, 0)]);

        // Tunnel 0 dies at t = 5 s.
        let dead_at = Duration::from_secs(5);
        let after = drive(&mut f, dead_at, Duration::from_secs(8), |t, _| {
            if t == 0 { ProbeOutcome::Lost } else { RTT }
        });
        let moved = routes(&after);
        assert_eq!(moved.len(), 1, "{after:?}");
        assert_eq!(moved[0].1, 1);
        let detection = moved[0].0 - dead_at;
        assert!(detection < Duration::from_secs(1), "{detection:?}");
        assert_eq!(f.failovers(), 1);
        let status = f.status(Duration::from_secs(8));
        assert_eq!(status[0].health, Health::Down);
        assert!(status[1].active && status[1].health == Health::Up);
        assert!(
            status[0]
                .since_last_good
                .is_some_and(|d| d >= Duration::from_secs(3))
        );
        // Its peer was reset while down, not on every probe.
        let resets = after
            .iter()
            .filter(|(_, a)| *a == Action::ResetPeer { tunnel: 0 })
            .count();
        assert_eq!(resets, 2, "at 5.4 s and 7.4 s: {after:?}");
    }

    #[test]
    fn a_single_loss_degrades_without_moving_and_failback_waits_for_a_clean_run() {
        let mut f = Failover::new(FailoverConfig::default(), 2);
        drive(&mut f, Duration::ZERO, Duration::from_secs(1), |_, _| RTT);
        // One lost probe on the active tunnel: degraded, still used.
        let blip = f.probe(Duration::from_secs(1), 0, ProbeOutcome::Lost);
        assert!(blip.is_empty(), "{blip:?}");
        assert_eq!(f.status(Duration::from_secs(1))[0].health, Health::Degraded);
        assert_eq!(f.active(), Some(0));

        // Now it dies, traffic moves; then it flaps: every 5th probe lost for 30 s.
        drive(
            &mut f,
            Duration::from_secs(2),
            Duration::from_secs(4),
            |t, _| {
                if t == 0 { ProbeOutcome::Lost } else { RTT }
            },
        );
        assert_eq!(f.active(), Some(1));
        let flapping = drive(
            &mut f,
            Duration::from_secs(4),
            Duration::from_secs(34),
            |t, now| {
                if t == 0 && (now.as_millis() / 200) % 5 == 0 {
                    ProbeOutcome::Lost
                } else {
                    RTT
                }
            },
        );
        assert!(
            routes(&flapping).is_empty(),
            "no flapping back: {flapping:?}"
        );

        // The last loss was at 33.0 s; clean from 33.2 s: back on tunnel 0 after 10 s of it.
        let clean = drive(
            &mut f,
            Duration::from_secs(34),
            Duration::from_secs(50),
            |_, _| RTT,
        );
        let back = routes(&clean);
        assert_eq!(back, [(Duration::from_millis(43_200), 0)], "{clean:?}");
        assert_eq!(f.failovers(), 1, "failing back is not a failover");
    }

    #[test]
    fn with_both_down_the_route_stays_and_the_first_to_recover_takes_it() {
        let mut f = Failover::new(FailoverConfig::default(), 2);
        drive(&mut f, Duration::ZERO, Duration::from_secs(1), |_, _| RTT);
        let dark = drive(
            &mut f,
            Duration::from_secs(1),
            Duration::from_secs(3),
            |_, _| ProbeOutcome::Lost,
        );
        // Both lose every probe from 1 s (the office's internet line is cut). Tunnel 0 reaches
        // its third loss first, while 1 is only degraded, so traffic moves to 1; when 1 is
        // down too there is nothing better and the route stays where it is.
        assert_eq!(routes(&dark), [(Duration::from_millis(1400), 1)]);
        assert!(
            f.status(Duration::from_secs(3))
                .iter()
                .all(|s| s.health == Health::Down)
        );
        // Tunnel 1 recovers first: a recovery (not a failback) moves at once.
        let up = f.probe(Duration::from_secs(3), 1, RTT);
        assert!(up.is_empty(), "already routed through 1: {up:?}");
        let zero = f.probe(Duration::from_secs(3) + MS, 0, RTT);
        assert!(
            zero.is_empty(),
            "0 must first stay clean for 10 s: {zero:?}"
        );
        assert_eq!(f.active(), Some(1));
    }

    #[test]
    fn nothing_is_routed_before_any_tunnel_answers_and_strangers_are_ignored() {
        let mut f = Failover::new(FailoverConfig::default(), 2);
        assert!(f.probe(Duration::ZERO, 0, ProbeOutcome::Lost).is_empty());
        assert!(f.probe(Duration::ZERO, 7, RTT).is_empty());
        assert_eq!(f.active(), None);
        // Tunnel 1 answers first, but the preferred one gets `dead_after` chances.
        assert!(f.probe(Duration::from_millis(200), 1, RTT).is_empty());
        assert_eq!(
            f.status(Duration::from_millis(200))[0].health,
            Health::Degraded
        );
        assert!(
            f.probe(Duration::from_millis(400), 0, ProbeOutcome::Lost)
                .is_empty()
        );
        let first = f.probe(Duration::from_millis(600), 0, ProbeOutcome::Lost);
        assert_eq!(
            first,
            [
                Action::ResetPeer { tunnel: 0 },
                Action::Route {
                    tunnel: 1,
                    why: Why::FirstAnswer,
                }
            ]
        );
        assert_eq!(f.failovers(), 0, "starting elsewhere is not a failover");
    }
}
