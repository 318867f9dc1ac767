//! A role one site at a time holds (sending the DNS updates), held as a key on a lease: when
//! its holder dies, freezes or is cut off from the majority, the lease runs out, the key goes
//! with it, and another site takes the role at its next step. The shape of Patroni's leader
//! key.
//!
//! Every step takes a fresh lease and moves the key onto it with a compare-and-set, both
//! through the cluster's log. A keep-alive is not enough: etcd answers it from the leader's
//! memory, and a member that was frozen while it led still answers as leader for a moment
//! after it thaws — in the lab it renewed a lease the new leader had already ended, and two
//! sites held the role at once. A grant and a transaction cannot be answered without the
//! majority, so a step that says [`Holder::Me`] proves the key is this site's, on a lease that
//! ends no earlier than the lease's time after the step began.

use std::time::{Duration, Instant};

use super::{Expect, Kv, KvError, LeaseId, Op};

/// The site named by a role key's value (`<site> <first lease>`).
pub fn holder_name(value: &[u8]) -> String {
    let value = String::from_utf8_lossy(value);
    value.split(' ').next().unwrap_or_default().to_owned()
}

/// Who holds the role, as one step found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holder {
    /// This site: it may act while [`Candidate::holds`].
    Me,
    /// Another site, by name.
    Other(String),
    /// Nobody this step could see (the key changed under it): the next step tries again.
    Nobody,
}

/// One site's bid for a role. Call [`Candidate::step`] at least three times per `ttl`, and
/// act on the role only while [`Candidate::holds`]: until three quarters of the lease's time
/// after the step began, and not at all after a failed step, so a holder cut off stops before
/// its lease can run out and another site take over — even while its step still waits for an
/// answer.
#[derive(Debug)]
pub struct Candidate {
    key: String,
    me: String,
    ttl: Duration,
    /// The lease the key is on while this site holds it.
    lease: Option<LeaseId>,
    /// What the key holds while this candidate holds the role: the site's name and the first
    /// lease it took (unique in the cluster), so another process under the same name (a
    /// restart, a misconfigured second site) waits for this one's lease instead of taking
    /// the key from it.
    mine: Option<String>,
    /// Until when this site may act on the role.
    until: Option<Instant>,
}

impl Candidate {
    /// A bid by site `me` for the role kept at `key`, its lease `ttl` long.
    pub fn new(key: &str, me: &str, ttl: Duration) -> Candidate {
        Candidate {
            key: key.to_owned(),
            me: me.to_owned(),
            ttl,
            lease: None,
            mine: None,
            until: None,
        }
    }

    /// Until when this site may act on the role (`None`: it may not).
    pub fn until(&self) -> Option<Instant> {
        self.until
    }

    /// The role's lease time.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Whether this site may act on the role at `now`.
    pub fn holds(&self, now: Instant) -> bool {
        self.until.is_some_and(|until| now < until)
    }

    /// Takes a fresh lease and, if the role is free or this site's, puts the key on it.
    pub fn step(&mut self, kv: &dyn Kv) -> Result<Holder, KvError> {
        let began = Instant::now();
        // Nothing is acted on while the step runs: its outcome decides.
        self.until = None;
        let step = self.try_step(kv);
        if let Ok(Holder::Me) = step {
            self.until = Some(began + self.ttl - self.ttl / 4);
        }
        step
    }

    fn try_step(&mut self, kv: &dyn Kv) -> Result<Holder, KvError> {
        let lease = kv.grant(self.ttl)?;
        let mine = self
            .mine
            .get_or_insert_with(|| format!("{} {lease:x}", self.me))
            .clone();
        let held = match kv.get(std::slice::from_ref(&self.key)) {
            Ok(read) => read.items.into_iter().next().flatten(),
            Err(err) => {
                let _ = kv.revoke(lease);
                return Err(err);
            }
        };
        if let Some(other) = held.as_ref().filter(|held| held.value != mine.as_bytes()) {
            let _ = kv.revoke(lease);
            return Ok(Holder::Other(holder_name(&other.value)));
        }
        // Free, or this candidate's: moved onto the new lease if nobody changed it since the
        // read.
        let take = Op::PutLeased {
            key: self.key.clone(),
            value: mine.into_bytes(),
            lease,
        };
        let moved = kv.commit(&[Expect::as_read(&self.key, held.as_ref())], &[take]);
        let previous = self.lease.take();
        match moved {
            Ok(Some(_)) => {
                self.lease = Some(lease);
                // The old lease holds nothing now; it would run out by itself.
                if let Some(old) = previous {
                    let _ = kv.revoke(old);
                }
                Ok(Holder::Me)
            }
            Ok(None) | Err(KvError::LeaseEnded { .. }) => {
                let _ = kv.revoke(lease);
                self.lease = previous;
                Ok(Holder::Nobody)
            }
            Err(err) => {
                // Unconfirmed: the key may be on the new lease; keep both until a step tells.
                self.lease = previous;
                Err(err)
            }
        }
    }

    /// Gives the role up now (its lease revoked, the key with it), so another site takes it
    /// at its next step instead of after the lease runs out.
    pub fn resign(&mut self, kv: &dyn Kv) -> Result<(), KvError> {
        self.until = None;
        match self.lease.take() {
            Some(lease) => kv.revoke(lease),
            None => Ok(()),
        }
    }
}
