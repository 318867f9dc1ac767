//! The sync benchmark's floors on this machine, medians and its table.

use super::*;

/// The machine's own limits, measured in the same run as the cases.
pub(super) struct Floors {
    /// blake3 on one core, in memory, GiB/s.
    pub(super) blake3: f64,
    /// Reading a cached file into memory, GiB/s.
    pub(super) page_cache: f64,
}

impl Floors {
    pub(super) fn measure(cached: &Path) -> anyhow::Result<Floors> {
        const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
        let mut buffer = vec![0u8; 256 << 20];
        Prng::new("floors").fill(&mut buffer);
        let started = Instant::now();
        let mut hasher = blake3::Hasher::new();
        for _ in 0..4 {
            hasher.update(&buffer);
        }
        std::hint::black_box(hasher.finalize());
        let blake3 = 4.0 * buffer.len() as f64 / GIB / started.elapsed().as_secs_f64();
        drop(buffer);
        let mut chunk = vec![0u8; 1 << 20];
        let read_all = |chunk: &mut [u8]| -> anyhow::Result<u64> {
            let mut file = File::open(cached)?;
            let mut total = 0u64;
            loop {
                match file.read(chunk)? {
                    0 => return Ok(total),
                    n => total += n as u64,
                }
            }
        };
        // Once to be sure it is cached, then timed.
        read_all(&mut chunk)?;
        let started = Instant::now();
        let total = read_all(&mut chunk)?;
        let page_cache = total as f64 / GIB / started.elapsed().as_secs_f64();
        Ok(Floors { blake3, page_cache })
    }
}

/// The median time of `samples`, seconds.
fn secs(samples: &[Sample]) -> f64 {
    median(samples.iter().map(|s| s.secs).collect())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

pub(super) fn report(results: &[CaseResult], floors: &Floors, runs: usize) {
    const MIB: f64 = 1024.0 * 1024.0;
    println!(
        "\n=== sync benchmark: medians of {runs} run(s); bytes are both directions on the wire; \
         lbs syncs new content to disk before it replaces the old (no-fsync: with --no-fsync); \
         rsync never syncs (but with --fsync, below the table); rsync's columns and the ratios \
         are its faster mode (the default, or the one named at the right)"
    );
    println!(
        "{:<22} {:>8} {:>8} {:>8} {:>6} {:>13} {:>13} {:>6}  {:>16}  rsync's better mode",
        "case",
        "lbs s",
        "no-fsync",
        "rsync s",
        "time",
        "lbs bytes",
        "rsync bytes",
        "bytes",
        "lbs peak RSS MiB"
    );
    println!(
        "{:<22} {:>8} {:>8} {:>8} {:>6} {:>13} {:>13} {:>6}  {:>16}",
        "", "", "lbs s", "", "ratio", "", "", "ratio", "(pull/serve)"
    );
    let mut worst_time = (0.0f64, "none");
    let mut worst_bytes = (0.0f64, "none");
    let mut short = Vec::new();
    for result in results {
        let bytes =
            |samples: &[Sample]| median(samples.iter().map(|s| s.wire_bytes as f64).collect());
        let peak =
            |i: usize| result.lbs.iter().map(|s| s.peak_rss[i]).max().unwrap_or(0) as f64 / MIB;
        let lbs_s = secs(&result.lbs);
        let lbs_b = bytes(&result.lbs);
        // Against the faster of rsync's modes (its default, or its best for the case).
        let (rsync_s, rsync_b) = match &result.best {
            Some((_, best)) if secs(best) < secs(&result.rsync) => (secs(best), bytes(best)),
            _ => (secs(&result.rsync), bytes(&result.rsync)),
        };
        let time_ratio = lbs_s / rsync_s;
        let bytes_ratio = lbs_b / rsync_b.max(1.0);
        let best = result
            .best
            .as_ref()
            .map_or(String::new(), |(label, samples)| {
                format!(
                    "{label}: {:.3} s, {:.0} B (lbs/it {:.2})",
                    secs(samples),
                    bytes(samples),
                    lbs_s / secs(samples)
                )
            });
        println!(
            "{:<22} {:>8.3} {:>8.3} {:>8.3} {:>6.2} {:>13.0} {:>13.0} {:>6.2}  {:>7.1}/{:<8.1}  {best}",
            result.key,
            lbs_s,
            secs(&result.unsynced),
            rsync_s,
            time_ratio,
            lbs_b,
            rsync_b,
            bytes_ratio,
            peak(0),
            peak(1)
        );
        if time_ratio > worst_time.0 {
            worst_time = (time_ratio, result.key);
        }
        if bytes_ratio > worst_bytes.0 {
            worst_bytes = (bytes_ratio, result.key);
        }
        let mut misses = Vec::new();
        let goal = result.goal;
        if time_ratio > goal {
            misses.push(format!("time {time_ratio:.2}× rsync (goal ≤ {goal}×)"));
        }
        if bytes_ratio > 1.0 {
            misses.push(format!("bytes {bytes_ratio:.2}× rsync (goal ≤ 1×)"));
        }
        if result.key.starts_with('e') && lbs_s > 2.0 {
            misses.push(format!("{lbs_s:.2} s (goal under 2 s)"));
        }
        if !misses.is_empty() {
            short.push(format!("{}: {}", result.title, misses.join(", ")));
        }
    }
    for result in results.iter().filter(|r| !r.durable.is_empty()) {
        let (lbs_s, durable_s) = (secs(&result.lbs), secs(&result.durable));
        println!(
            "durable, both tools: {} lbs {lbs_s:.3} s, rsync with --fsync {durable_s:.3} s \
             (one run, after the timed ones; lbs/it {:.2})",
            result.key,
            lbs_s / durable_s
        );
    }
    println!(
        "floors: blake3 one core {:.2} GiB/s; page-cache read {:.2} GiB/s",
        floors.blake3, floors.page_cache
    );
    if short.is_empty() {
        println!("every case meets its goal");
    } else {
        println!("short of the goal:");
        for line in short {
            println!("  {line}");
        }
    }
    println!(
        "sync-bench: worst time ratio {:.2} ({}), worst bytes ratio {:.2} ({})",
        worst_time.0, worst_time.1, worst_bytes.0, worst_bytes.1
    );
}
