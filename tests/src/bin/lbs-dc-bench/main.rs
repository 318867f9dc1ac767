//! `lbs-dc-bench` (what `cargo xtask bench datacenter` runs): a real `lbs-datacenter serve` on
//! loopback, in a directory of its own, its records in SQLite and then (`--store`) in a
//! three-member etcd on loopback, loaded by simulated boxes
//! (`lbs_tests::fleet`) with real certificates, the real reports at the agent's interval, and
//! promotions of random pairs while the reports run.
//!
//! For each fleet size in `--boxes`, on a freshly started server: every box connects, one
//! report interval passes, then `--seconds` are measured. The table has reports/s, report and
//! promotion round trips (p50, p99), the server's RSS and CPU, its descriptors, the errors;
//! the last lines are `dc-bench <store>: <boxes> boxes, reports p99 <ms> ms, promotion p99
//! <ms> ms, server RSS <MiB> MiB, errors <n>` for the largest fleet, one per store.
//!
//! With `--dns-outage-s S`, instead: a real BIND 9 (`lbs_tests::bind`) holds the pairs' zone;
//! once every name is written it is frozen (SIGSTOP: updates reach it and get no answer), the
//! backup of every pair is promoted (three names each change), and S seconds later it is let
//! go on; the figure is how long the data center takes to write the whole backlog. Last line
//! `dc-bench dns: <names> names behind after a <S> s outage, all written <s> s after BIND
//! came back`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use lbs_tests::fleet::load::{Load, Phase, activate_all, run_phase};
use lbs_tests::fleet::server::Server;
use lbs_tests::fleet::{self};

mod dns;

#[derive(Parser)]
#[command(
    name = "lbs-dc-bench",
    about = "Load a real lbs-datacenter with simulated boxes"
)]
struct Args {
    /// The lbs-datacenter binary.
    #[arg(long)]
    datacenter: PathBuf,
    /// Fleet sizes to measure, in boxes (two per pair).
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000")]
    boxes: Vec<usize>,
    /// The measured time per fleet size.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// How often each box reports (the agent's report_interval_s).
    #[arg(long, default_value_t = 5)]
    interval_s: u64,
    /// Promotions fired per second at random pairs while the reports run.
    #[arg(long, default_value_t = 2.0)]
    promotions_per_s: f64,
    /// Control connections being set up at once.
    #[arg(long, default_value_t = 64)]
    ramp: usize,
    /// Instead of the load phases: a DNS outage of this many seconds (BIND frozen) while
    /// every pair is promoted; how long the backlog takes to drain once BIND is back.
    #[arg(long)]
    dns_outage_s: Option<u64>,
    /// Pairs in the DNS outage (three names each).
    #[arg(long, default_value_t = 1667)]
    dns_pairs: usize,
    /// Where the data center keeps its records: `sqlite`, `etcd` (three members on
    /// loopback), or both one after the other.
    #[arg(long, value_delimiter = ',', default_value = "sqlite,etcd")]
    store: Vec<String>,
}

fn table(phases: &[Phase]) {
    println!(
        "\n{:>6}  {:>9}  {:>9}  {:>16}  {:>18}  {:>12}  {:>10}  {:>10}  {:>5}  {:>6}",
        "boxes",
        "connect",
        "reports/s",
        "report p50/p99",
        "promotion p50/p99",
        "server RSS",
        "server CPU",
        "client CPU",
        "fds",
        "errors"
    );
    for p in phases {
        println!(
            "{:>6}  {:>7.1} s  {:>9.0}  {:>6.1}/{:>6.1} ms  {:>3} × {:>5.0}/{:>5.0} ms  {:>8.0} MiB  {:>9.0}%  {:>9.0}%  {:>5}  {:>6}",
            p.boxes,
            p.connect_s,
            p.reports_per_s,
            p.report_p50_ms,
            p.report_p99_ms,
            p.promotions,
            p.promotion_p50_ms,
            p.promotion_p99_ms,
            p.rss_mib,
            p.server_cpu * 100.0,
            p.client_cpu * 100.0,
            p.descriptors,
            p.errors
        );
    }
    for p in phases {
        println!(
            "  {} boxes: peak RSS {:.0} MiB, {} fenced primaries registered as backup, {} reconnects",
            p.boxes, p.peak_mib, p.registrations, p.reconnects
        );
        for error in &p.error_kinds {
            println!("    {error}");
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let most = args.boxes.iter().copied().max().unwrap_or(0);
    if args.boxes.iter().any(|&n| n < 2 || n % 2 != 0) {
        bail!("--boxes: even numbers of at least 2 (two boxes per pair)");
    }
    if most / 2 > fleet::MAX_PAIRS {
        bail!("--boxes: at most {} boxes", 2 * fleet::MAX_PAIRS);
    }
    // Each box holds a descriptor here and one in the server.
    let limit = lbs_host::limits::raise_open_files().context("raising the open-files limit")?;
    if (limit as usize) < most + 256 {
        bail!(
            "{most} boxes need {} open files; the hard limit is {limit} (ulimit -Hn)",
            most + 256
        );
    }
    if let Some(outage) = args.dns_outage_s {
        let runtime = tokio::runtime::Runtime::new()?;
        return runtime.block_on(dns::outage(&args, Duration::from_secs(outage)));
    }
    let mut last_lines = Vec::new();
    for store in &args.store {
        // The etcd members live as long as their run.
        let (extra, _etcd) = match store.as_str() {
            "sqlite" => (String::new(), None),
            "etcd" => {
                let etcd = lbs_tests::etcd::Etcd::start(3);
                let endpoints: Vec<String> = etcd
                    .endpoints()
                    .iter()
                    .map(|e| format!("\"{e}\""))
                    .collect();
                let extra = format!(
                    "[store]\nbackend = \"etcd\"\nendpoints = [{}]\n",
                    endpoints.join(", ")
                );
                println!(
                    "\n== etcd: three members on loopback ({})",
                    etcd.endpoints().join(", ")
                );
                (extra, Some(etcd))
            }
            other => bail!("--store {other}: sqlite or etcd"),
        };
        if store == "sqlite" {
            println!("\n== SQLite");
        }
        let started = Instant::now();
        let (mut server, pairs) =
            Server::prepare(&args.datacenter, most / 2, "bench.example", &extra)?;
        println!(
            "provisioned {} pairs with one provision-pair --from: {:.1} s",
            pairs.len(),
            started.elapsed().as_secs_f64()
        );
        let runtime = tokio::runtime::Runtime::new()?;
        match runtime.block_on(run(&args, &mut server, &pairs)) {
            Ok(Some(last)) => last_lines.push(format!(
                "dc-bench {store}: {} boxes, reports p99 {:.1} ms, promotion p99 {:.0} ms, server RSS {:.0} MiB, errors {}",
                last.boxes, last.report_p99_ms, last.promotion_p99_ms, last.rss_mib, last.errors
            )),
            Ok(None) => {}
            Err(err) => {
                eprintln!("serve.log, last lines:\n{}", server.log_tail(20));
                return Err(err);
            }
        }
    }
    println!();
    for line in last_lines {
        println!("{line}");
    }
    Ok(())
}

/// The load phases on `server`: the largest fleet's figures.
async fn run(
    args: &Args,
    server: &mut Server,
    pairs: &[[fleet::Provisioned; 2]],
) -> anyhow::Result<Option<Phase>> {
    let root = server.root()?;
    server.start()?;
    let started = Instant::now();
    let boxes = activate_all(server.activation, &root, pairs, 32).await?;
    let took = started.elapsed().as_secs_f64();
    println!(
        "activated {} boxes: {:.1} s, {:.0} activations/s",
        boxes.len(),
        took,
        boxes.len() as f64 / took
    );
    let load = Load {
        interval: Duration::from_secs(args.interval_s),
        window: Duration::from_secs(args.seconds),
        promotions_per_s: args.promotions_per_s,
        ramp: args.ramp,
    };
    let mut phases = Vec::new();
    let mut sizes = args.boxes.clone();
    sizes.sort_unstable();
    for (i, &n) in sizes.iter().enumerate() {
        if i > 0 {
            server.stop()?;
            server.start()?;
        }
        println!("{n} boxes: connecting, then {} s measured …", args.seconds);
        let phase = run_phase(server, &root, &boxes[..n], &load).await?;
        if phase.errors > 0 {
            println!("serve.log, last lines:\n{}", server.log_tail(10));
        }
        phases.push(phase);
        table(&phases[phases.len() - 1..]);
    }
    server.stop()?;
    println!("\nall sizes, {} s measured each:", args.seconds);
    table(&phases);
    Ok(phases.pop())
}
