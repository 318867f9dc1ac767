//! `lbs-dc-bench --dns-outage-s S`: the DNS backlog after an outage of the DNS server, against
//! a real BIND 9.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use lbs_tests::bind::{self, Bind, SECRET_BASE64, ZONE};
use lbs_tests::fleet::load::{Load, Running, activate_all};
use lbs_tests::fleet::server::Server;

use crate::Args;

/// The data center's names as `status --json` shows them: (name, where it must point, state).
fn names(server: &Server) -> anyhow::Result<Vec<(String, String, String)>> {
    let json = server.cli(&["status", "--json"])?;
    let pairs: serde_json::Value = serde_json::from_str(&json).context("status --json")?;
    let mut names = Vec::new();
    for pair in pairs.as_array().context("status --json: not an array")? {
        for record in pair["dns"].as_array().into_iter().flatten() {
            let field = |key: &str| record[key].as_str().unwrap_or_default().to_owned();
            names.push((field("name"), field("want"), field("state")));
        }
    }
    Ok(names)
}

fn behind(names: &[(String, String, String)]) -> usize {
    names.iter().filter(|(_, _, state)| state != "done").count()
}

/// Polls until no name is behind, at most `limit`; how long it took.
async fn drained(server: &Server, limit: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let left = behind(&names(server)?);
        if left == 0 {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            bail!("{left} names still not written after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn dns_config(bind: &Bind) -> String {
    format!(
        "[dns]\nserver = \"127.0.0.1:{}\"\nzone = \"{ZONE}\"\nkey_name = \"lbs-dc\"\nsecret = \"{SECRET_BASE64}\"\nttl = 60\ntimeout_ms = 2000\n",
        bind.port
    )
}

pub async fn outage(args: &Args, outage: Duration) -> anyhow::Result<()> {
    let bind = bind::start_bind();
    let (mut server, pairs) = Server::prepare(
        &args.datacenter,
        args.dns_pairs.max(1),
        ZONE,
        &dns_config(&bind),
    )?;
    let result = scenario(args, outage, &bind, &mut server, &pairs).await;
    if result.is_err() {
        eprintln!("serve.log, last lines:\n{}", server.log_tail(20));
    }
    bind.thaw();
    result
}

async fn scenario(
    args: &Args,
    outage: Duration,
    bind: &Bind,
    server: &mut Server,
    pairs: &[[lbs_tests::fleet::Provisioned; 2]],
) -> anyhow::Result<()> {
    let root = server.root()?;
    server.start()?;
    let started = Instant::now();
    let boxes = activate_all(server.activation, &root, pairs, 32).await?;
    let initial = drained(server, Duration::from_secs(600)).await?;
    let count = names(server)?.len();
    println!(
        "{} boxes activated, their {count} names written: {:.1} s",
        boxes.len(),
        started.elapsed().as_secs_f64()
    );
    let load = Load {
        interval: Duration::from_secs(args.interval_s),
        window: Duration::ZERO,
        promotions_per_s: 0.0,
        ramp: args.ramp,
    };
    let mut running = Running::start(server.control, &root, &boxes, &load).await?;
    tokio::time::sleep(load.interval).await;

    bind.freeze();
    let frozen = Instant::now();
    println!(
        "BIND frozen (SIGSTOP); promoting the backup of all {} pairs",
        pairs.len()
    );
    running
        .stats
        .measuring
        .store(true, std::sync::atomic::Ordering::Relaxed);
    for pair in 0..pairs.len() {
        if !running.promote(pair) {
            bail!("pair {pair} was busy: it cannot be promoted");
        }
    }
    let promoted = loop {
        let done = running
            .stats
            .promotions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        if done == pairs.len() {
            break frozen.elapsed();
        }
        if frozen.elapsed() > outage.max(Duration::from_secs(120)) {
            bail!("{done} of {} promotions answered", pairs.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "{} promotions answered in {:.1} s, DNS down",
        pairs.len(),
        promoted.as_secs_f64()
    );
    while frozen.elapsed() < outage {
        let left = outage - frozen.elapsed();
        tokio::time::sleep(left.min(Duration::from_secs(60))).await;
        println!(
            "  {:>4.0} s into the outage: {} names behind",
            frozen.elapsed().as_secs_f64(),
            behind(&names(server)?)
        );
    }
    let backlog = behind(&names(server)?);
    bind.thaw();
    println!(
        "BIND back (SIGCONT) after {:.0} s: {backlog} names behind",
        frozen.elapsed().as_secs_f64()
    );
    let drain = drained(server, Duration::from_secs(600)).await?;
    // What BIND answers now is what the data center decided.
    let wanted = names(server)?;
    let step = (wanted.len() / 50).max(1);
    for (name, want, _) in wanted.iter().step_by(step) {
        let answer = bind::dig(bind.port, name);
        if answer != [want.clone()] {
            bail!("{name}: BIND answers {answer:?}, the data center wants {want}");
        }
    }
    let stats = running.stats.clone();
    running.finish().await;
    if stats.error_count() > 0 {
        let errors = stats.errors.lock().unwrap_or_else(|p| p.into_inner());
        bail!("errors from the boxes: {errors:?}");
    }
    println!(
        "initial write of {count} names: {:.1} s",
        initial.as_secs_f64()
    );
    println!(
        "dc-bench dns: {backlog} names behind after a {:.0} s outage, all written {:.1} s after BIND came back",
        outage.as_secs_f64(),
        drain.as_secs_f64()
    );
    Ok(())
}
