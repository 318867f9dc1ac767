//! A fleet of simulated boxes against a running server: activation of all of them, and one
//! measured phase (every box connected, one report interval, then the window with promotions
//! fired at random pairs).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::bail;
use lbs_protocol::{Role, TrustRoot};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::server::{Server, cpu_time, descriptors, memory};
use super::{Dice, Order, PairSlot, Provisioned, SimBox, Stats, Target, percentile, run_box};

/// How a phase loads the server.
#[derive(Clone, Debug)]
pub struct Load {
    /// Each box's report interval.
    pub interval: Duration,
    /// The measured window.
    pub window: Duration,
    /// Promotions fired per second at random pairs in the window (0: none).
    pub promotions_per_s: f64,
    /// Control connections being set up at once.
    pub ramp: usize,
}

/// One phase's figures.
#[derive(Clone, Debug)]
pub struct Phase {
    pub boxes: usize,
    /// From the first connect until every box was connected.
    pub connect_s: f64,
    pub reports_per_s: f64,
    pub report_p50_ms: f64,
    pub report_p99_ms: f64,
    /// Promotions answered `Promoted` in the window.
    pub promotions: usize,
    pub promotion_p50_ms: f64,
    pub promotion_p99_ms: f64,
    /// Fenced old primaries that registered as backup.
    pub registrations: u64,
    pub rss_mib: f64,
    pub peak_mib: f64,
    /// The server's CPU in the window, in cores (1.0: one core busy all the time).
    pub server_cpu: f64,
    /// This process's (the boxes').
    pub client_cpu: f64,
    /// The server's open descriptors at the end of the window.
    pub descriptors: usize,
    pub reconnects: u64,
    pub errors: u64,
    /// Per kind of error: the count and the first one's text.
    pub error_kinds: Vec<String>,
}

fn ms(micros: u32) -> f64 {
    f64::from(micros) / 1000.0
}

/// Activates every box, `concurrency` pairs at a time; each pair's first box first (it
/// becomes primary). Boxes in pair order, two per pair.
pub async fn activate_all(
    activation: SocketAddr,
    root: &TrustRoot,
    pairs: &[[Provisioned; 2]],
    concurrency: usize,
) -> anyhow::Result<Vec<Arc<SimBox>>> {
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for (index, pair) in pairs.iter().enumerate() {
        let (gate, root, pair) = (gate.clone(), root.clone(), pair.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let a = super::activate(activation, &root, index, 0, &pair[0]).await?;
            let b = super::activate(activation, &root, index, 1, &pair[1]).await?;
            anyhow::Ok((index, [a, b]))
        });
    }
    let mut boxes: Vec<Option<[SimBox; 2]>> = (0..pairs.len()).map(|_| None).collect();
    while let Some(done) = tasks.join_next().await {
        let (index, pair) = done??;
        boxes[index] = Some(pair);
    }
    Ok(boxes
        .into_iter()
        .flatten()
        .flatten()
        .map(Arc::new)
        .collect())
}

/// A fleet running against a control port: its tasks end when it is dropped.
#[derive(Debug)]
pub struct Running {
    pub stats: Arc<Stats>,
    slots: Vec<Arc<PairSlot>>,
    orders: Vec<mpsc::Sender<Order>>,
    tasks: tokio::task::JoinSet<()>,
    stop: tokio_util::sync::DropGuard,
    dice: Dice,
    /// From the first connect until every box was connected.
    pub connect_s: f64,
}

impl Running {
    /// Starts one task per box (whole pairs, in pair order) and waits until every box is
    /// connected: at most 60 s plus 20 ms per box.
    pub async fn start(
        control: SocketAddr,
        root: &TrustRoot,
        boxes: &[Arc<SimBox>],
        load: &Load,
    ) -> anyhow::Result<Running> {
        let target = Arc::new(Target {
            control,
            root: root.clone(),
            interval: load.interval,
        });
        let stats = Arc::new(Stats::default());
        let ramp = Arc::new(Semaphore::new(load.ramp.max(1)));
        let stop = CancellationToken::new();
        let pairs = boxes.len() / 2;
        let slots: Vec<Arc<PairSlot>> = (0..pairs).map(|_| Arc::new(PairSlot::default())).collect();
        let mut orders = Vec::with_capacity(boxes.len());
        let mut tasks = tokio::task::JoinSet::new();
        let mut dice = Dice::new(0x0001_b5dc);
        for b in boxes {
            let slot = slots[b.pair].clone();
            if b.role == Role::Backup {
                slot.backup.store(b.position, Ordering::Relaxed);
            }
            let (tx, rx) = mpsc::channel(1);
            orders.push(tx);
            tasks.spawn(run_box(
                b.clone(),
                target.clone(),
                slot,
                rx,
                stats.clone(),
                ramp.clone(),
                dice.unit(),
                stop.clone(),
            ));
        }
        let mut running = Running {
            stats,
            slots,
            orders,
            tasks,
            stop: stop.drop_guard(),
            dice,
            connect_s: 0.0,
        };
        let limit = Duration::from_secs(60) + Duration::from_millis(20 * boxes.len() as u64);
        running.connect_s = running.connected(limit).await?.as_secs_f64();
        Ok(running)
    }

    /// Waits until every box is connected, at most `limit`; how long it took.
    pub async fn connected(&self, limit: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let all = self.orders.len();
        while self.stats.connected.load(Ordering::Relaxed) < all {
            if started.elapsed() > limit {
                bail!(
                    "only {} of {all} boxes connected in {:.0} s; errors: {:?}",
                    self.stats.connected.load(Ordering::Relaxed),
                    started.elapsed().as_secs_f64(),
                    self.stats.errors.lock().unwrap_or_else(|p| p.into_inner())
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(started.elapsed())
    }

    /// Asks the backup of a random pair to promote itself, unless that pair is in the
    /// middle of a promotion.
    pub fn promote_one(&mut self) {
        let pairs = self.slots.len();
        if pairs > 0 {
            let pair = self.dice.below(pairs);
            self.promote(pair);
        }
    }

    /// Asks the backup of pair `pair` to promote itself; false when that pair is in the
    /// middle of a promotion.
    pub fn promote(&mut self, pair: usize) -> bool {
        let Some(slot) = self.slots.get(pair) else {
            return false;
        };
        if slot.busy.swap(true, Ordering::AcqRel) {
            return false;
        }
        let backup = slot.backup.load(Ordering::Acquire);
        if self.orders[2 * pair + backup]
            .try_send(Order::Promote)
            .is_err()
        {
            slot.busy.store(false, Ordering::Release);
            return false;
        }
        true
    }

    /// Stops every box and waits for their tasks.
    pub async fn finish(mut self) {
        self.stop.disarm().cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Runs `boxes` (whole pairs, in pair order) against `server` as `load` says and measures.
pub async fn run_phase(
    server: &Server,
    root: &TrustRoot,
    boxes: &[Arc<SimBox>],
    load: &Load,
) -> anyhow::Result<Phase> {
    let pid = server.pid();
    let mut running = Running::start(server.control, root, boxes, load).await?;
    let stats = running.stats.clone();
    let connect_s = running.connect_s;
    // Every box reports once before the window opens.
    tokio::time::sleep(load.interval).await;
    let (cpu_before, mine_before) = (cpu_time(pid), cpu_time(std::process::id()));
    let opened = Instant::now();
    stats.measuring.store(true, Ordering::Relaxed);
    let mut next_promotion = opened;
    let gap = Duration::from_secs_f64(1.0 / load.promotions_per_s.max(0.01));
    while opened.elapsed() < load.window {
        if load.promotions_per_s > 0.0 && Instant::now() >= next_promotion {
            next_promotion += gap;
            running.promote_one();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stats.measuring.store(false, Ordering::Relaxed);
    let measured = opened.elapsed().as_secs_f64();
    let (cpu_after, mine_after) = (cpu_time(pid), cpu_time(std::process::id()));
    let (rss_mib, peak_mib) = memory(pid);
    let held = descriptors(pid);
    running.finish().await;
    let take = |v: &std::sync::Mutex<Vec<u32>>| {
        let mut v = std::mem::take(&mut *v.lock().unwrap_or_else(|p| p.into_inner()));
        v.sort_unstable();
        v
    };
    let (reports, promotions) = (take(&stats.reports), take(&stats.promotions));
    let errors = stats.errors.lock().unwrap_or_else(|p| p.into_inner());
    Ok(Phase {
        boxes: boxes.len(),
        connect_s,
        reports_per_s: reports.len() as f64 / measured,
        report_p50_ms: ms(percentile(&reports, 0.50)),
        report_p99_ms: ms(percentile(&reports, 0.99)),
        promotions: promotions.len(),
        promotion_p50_ms: ms(percentile(&promotions, 0.50)),
        promotion_p99_ms: ms(percentile(&promotions, 0.99)),
        registrations: stats.registrations.load(Ordering::Relaxed),
        rss_mib,
        peak_mib,
        server_cpu: (cpu_after - cpu_before).as_secs_f64() / measured,
        client_cpu: (mine_after - mine_before).as_secs_f64() / measured,
        descriptors: held,
        reconnects: stats.reconnects.load(Ordering::Relaxed),
        errors: errors.values().map(|(n, _)| n).sum(),
        error_kinds: errors
            .iter()
            .map(|(kind, (n, first))| format!("{n} × {kind} (first: {first})"))
            .collect(),
    })
}
