//! A role one site at a time holds (sending the DNS updates), held as a key that lives with
//! the holder's lease: the holder renews the lease while it works; when it dies, freezes or is
//! cut off from the majority, the lease runs out, the key goes with it, and another site takes
//! the role at its next step. The same shape as Patroni's leader key.

use std::time::{Duration, Instant};

use super::{Expect, Kv, KvError, LeaseId, Op};

/// Who holds the role, as one step found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holder {
    /// This site: it may act until its next step is due.
    Me,
    /// Another site, by name.
    Other(String),
    /// Nobody (the key was free, and taking it did not go through this time).
    Nobody,
}

/// One site's bid for a role. Call [`Candidate::step`] at least three times per `ttl`, and
/// act on the role only while [`Candidate::holds`]: until three quarters of the lease's time
/// after the renewal was sent, so a holder cut off stops before its lease can run out and
/// another site take over — even while its step still waits for an answer.
#[derive(Debug)]
pub struct Candidate {
    key: String,
    me: String,
    ttl: Duration,
    lease: Option<LeaseId>,
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
            until: None,
        }
    }

    /// Whether this site may act on the role at `now`.
    pub fn holds(&self, now: Instant) -> bool {
        self.until.is_some_and(|until| now < until)
    }

    /// What the key holds when this site holds the role under `lease`: its name and the
    /// lease, so a restarted site does not take the key its old lease still holds for itself.
    fn mine(&self, lease: LeaseId) -> Vec<u8> {
        format!("{} {lease:x}", self.me).into_bytes()
    }

    /// Renews this site's lease (or takes a new one), then holds the role if it is free.
    pub fn step(&mut self, kv: &dyn Kv) -> Result<Holder, KvError> {
        let sent = Instant::now();
        let step = self.try_step(kv);
        self.until = match step {
            Ok(Holder::Me) => Some(sent + self.ttl - self.ttl / 4),
            _ => None,
        };
        step
    }

    fn try_step(&mut self, kv: &dyn Kv) -> Result<Holder, KvError> {
        let lease = match self.lease {
            Some(lease) if kv.renew(lease)? => lease,
            _ => {
                self.lease = None;
                let lease = kv.grant(self.ttl)?;
                self.lease = Some(lease);
                lease
            }
        };
        let read = kv.get(std::slice::from_ref(&self.key))?;
        let held = read.items.into_iter().next().flatten();
        let mine = self.mine(lease);
        match held {
            Some(held) if held.value == mine => Ok(Holder::Me),
            Some(held) => {
                let value = String::from_utf8_lossy(&held.value);
                let name = value.split(' ').next().unwrap_or_default();
                Ok(Holder::Other(name.to_owned()))
            }
            None => {
                let take = Op::PutLeased {
                    key: self.key.clone(),
                    value: mine,
                    lease,
                };
                match kv.commit(&[Expect::as_read(&self.key, None)], &[take])? {
                    Some(_) => Ok(Holder::Me),
                    None => Ok(Holder::Nobody),
                }
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
