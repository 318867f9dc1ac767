//! The DNS worker: every name the store wants moved is written with a signed RFC 2136
//! update, retried with backoff; a refusal that needs the operator is said once.

use super::*;

/// The longest wait between two tries of a failing DNS update.
pub(super) const DNS_MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The wait before the next try of a DNS update that failed `attempts` times.
pub(super) fn dns_backoff(attempts: i64) -> Duration {
    let exponent = u32::try_from(attempts.clamp(0, 16)).unwrap_or(16);
    Duration::from_millis(500u64.saturating_mul(1 << exponent)).min(DNS_MAX_BACKOFF)
}

/// At most this many names are being updated at once: after an outage of the DNS server a
/// backlog of thousands of names drains in parallel, not one answer (or one timeout) after
/// another.
pub(super) const DNS_IN_FLIGHT: usize = 32;

pub(super) async fn dns_worker(inner: Arc<Inner>, shutdown: CancellationToken) {
    let Some((server, ttl)) = inner.config.dns.clone() else {
        return;
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = inner.dns_wake.notified() => {}
            () = tokio::time::sleep(TICK) => {}
        }
        if !may_send_dns(&inner) {
            continue;
        }
        let due = match with_store(&inner, |s| s.dns_due(now_ms())).await {
            Ok(due) => due,
            Err(err) => {
                tracing::error!("reading DNS work: {err}");
                continue;
            }
        };
        let names = sweep(due, DNS_IN_FLIGHT, |work| {
            settle(&inner, &server, ttl, work)
        });
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = names => {}
        }
    }
}

/// Whether this site may send DNS updates now: always with its own store; with a shared one
/// only while it holds the role.
fn may_send_dns(inner: &Inner) -> bool {
    inner.dns_until.as_ref().is_none_or(|until| {
        until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|until| std::time::Instant::now() < until)
    })
}

/// Keeps this site's bid for the DNS role (a shared store): a step every third of the lease
/// on a blocking thread, the time it may act published for the worker, who holds it logged
/// when it changes; at shutdown the role is given up so another site takes it at once.
pub(super) async fn dns_role(
    inner: Arc<Inner>,
    role: crate::authority::DnsRole,
    shutdown: CancellationToken,
) {
    let every = role.candidate.ttl() / 3;
    let mut role = Some(role);
    let mut last: Option<String> = None;
    loop {
        let Some(mut bid) = role.take() else { return };
        let stepped = tokio::task::spawn_blocking(move || {
            let held = bid.candidate.step(&*bid.kv);
            (bid, held)
        })
        .await;
        let Ok((bid, held)) = stepped else {
            tracing::error!("the DNS role's step failed; DNS updates stop at this site");
            return;
        };
        if let Some(until) = &inner.dns_until {
            *until.lock().unwrap_or_else(|p| p.into_inner()) = bid.candidate.until();
        }
        let now = match &held {
            Ok(crate::kv::Holder::Me) => "this site".to_owned(),
            Ok(crate::kv::Holder::Other(site)) => format!("site {site}"),
            Ok(crate::kv::Holder::Nobody) => "nobody yet".to_owned(),
            Err(err) => format!("nobody this site can tell ({err})"),
        };
        if last.as_deref() != Some(now.as_str()) {
            tracing::info!("DNS updates are sent by {now}");
            if matches!(held, Ok(crate::kv::Holder::Me)) {
                inner.dns_wake.notify_one();
            }
            last = Some(now);
        }
        role = Some(bid);
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(every) => {}
        }
    }
    if let Some(mut bid) = role {
        let _ = tokio::task::spawn_blocking(move || bid.candidate.resign(&*bid.kv)).await;
    }
}

/// Runs `settle` for every name in `due`, at most `in_flight` at once.
pub(super) async fn sweep<W, F: std::future::Future<Output = ()>>(
    due: Vec<W>,
    in_flight: usize,
    settle: impl FnMut(W) -> F,
) {
    use futures_util::StreamExt;
    futures_util::stream::iter(due)
        .map(settle)
        .buffer_unordered(in_flight.max(1))
        .for_each(|()| std::future::ready(()))
        .await;
}

/// Moves one name where the store wants it and records how that went.
async fn settle(
    inner: &Arc<Inner>,
    server: &crate::dns::DnsServer,
    ttl: u32,
    work: store::DnsWork,
) {
    // The role may have moved while the round ran: the name stays due for its holder.
    if !may_send_dns(inner) {
        return;
    }
    let outcome = server
        .replace_a(&work.name, work.have, work.want, ttl)
        .await;
    let result = match outcome {
        Ok(()) => {
            tracing::info!(name = work.name, address = %work.want, "DNS updated");
            Ok(())
        }
        Err(crate::dns::DnsError::Changed { .. }) => {
            // Someone else changed the record: read what is there, so the next try
            // replaces exactly that (our decision is the newest: it was just taken).
            let found = server.lookup_a(&work.name).await;
            match found {
                Ok(values) if values.contains(&work.want) => Ok(()),
                Ok(values) => {
                    let value = values.first().copied();
                    let w = work.clone();
                    let _ = with_store(inner, move |s| s.dns_found(&w, value)).await;
                    Err(DnsFailure {
                        why: format!(
                            "{} held {} (changed outside lbs); replacing it",
                            work.name,
                            value.map_or("nothing".to_owned(), |v| v.to_string())
                        ),
                        needs_operator: false,
                    })
                }
                Err(err) => Err(DnsFailure {
                    needs_operator: !err.is_transient(),
                    why: err.to_string(),
                }),
            }
        }
        Err(err) => {
            if work.attempts == 0 && err.is_transient() {
                tracing::warn!(name = work.name, "DNS update failed, will retry: {err}");
            }
            Err(DnsFailure {
                needs_operator: !err.is_transient(),
                why: err.to_string(),
            })
        }
    };
    let retry_at = now_ms()
        .saturating_add(i64::try_from(dns_backoff(work.attempts).as_millis()).unwrap_or(i64::MAX));
    let w = work.clone();
    let failure = result.as_ref().err().map(|f| f.why.clone());
    match with_store(inner, move |s| s.dns_result(&w, result, retry_at, now_ms())).await {
        Ok(true) => tracing::error!(
            name = work.name,
            "DNS update refused, and retrying cannot help until the DNS server's \
             configuration or the [dns] section is fixed (tried again every {} s): {}",
            DNS_MAX_BACKOFF.as_secs(),
            failure.unwrap_or_default()
        ),
        Ok(false) => {}
        Err(err) => tracing::error!(name = work.name, "recording a DNS result: {err}"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_backlog_is_settled_in_parallel_up_to_the_bound() {
        let (busy, peak, done) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let started = tokio::time::Instant::now();
        // 200 names after an outage, each answered only by a 2 s timeout (in virtual time).
        sweep((0..200).collect::<Vec<u32>>(), DNS_IN_FLIGHT, |_| {
            let (busy, peak, done) = (busy.clone(), peak.clone(), done.clone());
            async move {
                let now = busy.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(2)).await;
                busy.fetch_sub(1, Ordering::SeqCst);
                done.fetch_add(1, Ordering::SeqCst);
            }
        })
        .await;
        assert_eq!(done.load(Ordering::SeqCst), 200);
        assert_eq!(peak.load(Ordering::SeqCst), DNS_IN_FLIGHT);
        // Seven rounds of 32, not 200 timeouts one after another (400 s).
        assert_eq!(started.elapsed(), Duration::from_secs(14));
    }
}
