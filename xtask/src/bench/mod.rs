//! `cargo xtask bench sync`: lbs against rsync on the same data, in the same run.
//!
//! Datasets come from fixed seeds (and, for the PBX tree, from Debian's Asterisk sound
//! packages), so two runs on two machines measure the same bytes. Each case brings both
//! sides to the old state (untimed), makes the edit on the source (untimed), then times one
//! `lbs sync pull` and one rsync push to a daemon on 127.0.0.1 of the same source, taking
//! turns, `--runs` times; the table shows medians.
//!
//! lbs runs as it does on a box: a long-running `lbs sync serve` whose index already knows
//! the old tree, and a receiver whose index knows its own. Every byte the changed files
//! hold is hashed again on the sender inside the timed run.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};

use crate::process::{Guard, Server, checked, run_watched};
use crate::util::{cargo, ensure_packages, is_root, remove_all, run_step, target_dir};

const PRIMARY: &str = "00-1A-2B-3C-4D-5E";
const BACKUP: &str = "00-1A-2B-3C-4D-5F";
/// The longest one timed or untimed step may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(900);
/// What the benchmark needs installed.
const BENCH_PACKAGES: &[(&str, &str)] = &[
    (
        "rsync",
        "the tool lbs is measured against (as a daemon on 127.0.0.1)",
    ),
    ("dpkg", "unpacks the Asterisk sound packages"),
];

mod datacenter;
mod datasets;
mod report;
mod setup;

use datasets::*;
use report::Floors;
use setup::*;

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand)]
enum What {
    /// lbs sync against rsync: big-file edits and appends, the PBX prompt tree, 100,000 files.
    Sync(SyncArgs),
    /// VPN failover in network namespaces (root): a box and two data-center endpoints, dc1
    /// blackholed under a 50 ms ping stream; median detection time and largest gap.
    Vpn(VpnArgs),
    /// The data center under a fleet: a real `lbs-datacenter serve` on loopback and
    /// simulated boxes with real certificates reporting at the agent's interval, promotions
    /// fired meanwhile; reports/s, round trips p50/p99, the server's RSS and CPU, errors.
    Datacenter(datacenter::DatacenterArgs),
    /// Failover in the lab's office (root): the primary dies, P on the backup; median RTO
    /// (P pressed → the SIP phone's first answer) and RPO (a voicemail written → verified on
    /// the backup), each run in a fresh office.
    Failover(FailoverArgs),
}

#[derive(clap::Args)]
struct FailoverArgs {
    /// Failovers to measure; the summary shows medians.
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

#[derive(clap::Args)]
struct VpnArgs {
    /// Blackholes to measure; the summary shows medians.
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

#[derive(clap::Args)]
struct SyncArgs {
    /// Timed runs per case and tool; the table shows medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Scratch directory for datasets and trees (about 5 GiB); kept between runs.
    #[arg(long)]
    work: Option<PathBuf>,
    /// Size of the big file, MiB.
    #[arg(long, default_value_t = 1024)]
    big_mib: u64,
    /// What case (b) appends, MiB.
    #[arg(long, default_value_t = 10)]
    append_mib: u64,
    /// Files in the unchanged tree of case (e).
    #[arg(long, default_value_t = 100_000)]
    small_files: usize,
    /// Size of case (f)'s sparse file, MiB (two 1 MiB islands of data, holes elsewhere).
    #[arg(long, default_value_t = 5120)]
    sparse_mib: u64,
    /// Size of case (g)'s recording when the pull starts, MiB (it grows during the pull).
    #[arg(long, default_value_t = 256)]
    recording_mib: u64,
    /// Only these cases (letters a–g, comma-separated); all by default.
    #[arg(long, value_delimiter = ',')]
    cases: Vec<char>,
    /// The rsync daemon's port on 127.0.0.1.
    #[arg(long, default_value_t = 8730)]
    rsync_port: u16,
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    match &args.what {
        What::Sync(args) => sync(args),
        What::Vpn(args) => vpn(args),
        What::Failover(args) => failover(args),
        What::Datacenter(args) => datacenter::run(args),
    }
}

/// `lbs-lab bench`: the lab's failover `runs` times, in the same office the scenario tests
/// and the demo use.
fn failover(args: &FailoverArgs) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the failover benchmark needs root (network namespaces, a SIP server and phone)");
    }
    crate::demo::run_lab(
        "the failover benchmark",
        &["bench", "--runs", &args.runs.to_string()],
        &[],
    )
}

/// Runs the namespace scenario of `agent/tests/vpn_failover.rs` (the same code the tests
/// check) `runs` times, optimised.
fn vpn(args: &VpnArgs) -> anyhow::Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if !is_root() {
        bail!("the VPN benchmark needs root (network namespaces and tun devices)");
    }
    let missing = ensure_packages(crate::test::SYSTEM_PACKAGES, true)?;
    if !missing.is_empty() {
        bail!("the VPN benchmark needs {}", missing.join(" "));
    }
    let status = cargo()
        .args([
            "test",
            "--release",
            "-p",
            "lbs-agent",
            "--test",
            "vpn_failover",
            "bench_vpn_failover",
            "--",
            "--ignored",
            "--nocapture",
        ])
        .env("LBS_VPN_RUNS", args.runs.to_string())
        .status()
        .context("running cargo test")?;
    if !status.success() {
        bail!("the VPN benchmark failed: {status}");
    }
    Ok(())
}

fn sync(args: &SyncArgs) -> anyhow::Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let missing = ensure_packages(BENCH_PACKAGES, true)?;
    if !missing.is_empty() {
        bail!("the benchmark needs {}", missing.join(" "));
    }
    run_step(
        "cargo build --release (lbs, lbs-hello)",
        cargo().args([
            "build",
            "--release",
            "--locked",
            "-p",
            "lbs-agent",
            "-p",
            "lbs-tests",
            "--bins",
        ]),
    )?;
    let bin = target_dir().join("release");
    let work = args
        .work
        .clone()
        .unwrap_or_else(|| target_dir().join("bench-sync"));
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    // Dropped last: everything writing to it (servers, the rsync daemon) stops first.
    // Four copies of the big file (lbs's source and copy, rsync's copy and the temporary
    // file rsync's default mode writes beside it), the trees and theirs: 16 GiB for the
    // default 1 GiB file; `--big-mib 10240` needs 48 (38 ran out in rsync's default mode).
    let image_gib = 16.max(4 * args.big_mib.div_ceil(1024) + 8);
    let trees = TreeFs::mount(&work, image_gib)?;
    let bench = Bench::new(&bin, &work, &trees.dir)?;

    println!("\n==> datasets in {}", work.display());
    let data = Datasets::build(&work.join("data"), args)?;

    println!("\n==> floors on this machine");
    let floors = Floors::measure(&data.big_old)?;
    println!(
        "    blake3 one core {:.2} GiB/s, page-cache read {:.2} GiB/s",
        floors.blake3, floors.page_cache
    );

    let rsync = RsyncDaemon::start(&trees.dir, args.rsync_port)?;
    let wanted = |key: char| args.cases.is_empty() || args.cases.contains(&key);
    let mut results = Vec::new();
    let big = Target::new(&bench, "big")?;
    let big_file = |root: &Path| root.join("big");
    if wanted('a') {
        let case = Case {
            key: "a-big-scatter",
            title: format!(
                "(a) {} MiB file, 1% of 4 KiB blocks rewritten",
                args.big_mib
            ),
            target: &big,
            fresh_receiver: false,
            growing: None,
            prepare: &|| data.restore_big(&big_file(&big.src)),
            edit: &|| data.scatter(&big_file(&big.src)),
            rsync_reset: &|| copy_file(&data.big_old, &big_file(&rsync.module_dir("big")?)),
            rsync_args: vec!["-I".into(), "--no-whole-file".into()],
            rsync_paths: (big_file(&big.src), format!("{}/big/big", rsync.url)),
            rsync_best: Some((
                "--inplace",
                vec!["-I".into(), "--no-whole-file".into(), "--inplace".into()],
            )),
        };
        results.push(bench.run_case(&case, args.runs, &rsync)?);
    }
    if wanted('b') {
        let case = Case {
            key: "b-big-append",
            title: format!(
                "(b) {} MiB file + {} MiB appended",
                args.big_mib, args.append_mib
            ),
            target: &big,
            fresh_receiver: false,
            growing: None,
            prepare: &|| data.restore_big(&big_file(&big.src)),
            edit: &|| data.append(&big_file(&big.src)),
            rsync_reset: &|| copy_file(&data.big_old, &big_file(&rsync.module_dir("big")?)),
            rsync_args: vec!["-I".into(), "--no-whole-file".into()],
            rsync_paths: (big_file(&big.src), format!("{}/big/big", rsync.url)),
            rsync_best: Some((
                "--inplace --append-verify",
                vec![
                    "-I".into(),
                    "--no-whole-file".into(),
                    "--inplace".into(),
                    "--append-verify".into(),
                ],
            )),
        };
        results.push(bench.run_case(&case, args.runs, &rsync)?);
    }
    drop(big);
    let tree = Target::new(&bench, "tree")?;
    let tree_args = || -> Vec<String> {
        ["-a", "--no-whole-file", "--delete"]
            .map(String::from)
            .to_vec()
    };
    let rsync_tree = format!("{}/tree/", rsync.url);
    let src_tree = || slash(&tree.src);
    if wanted('c') {
        let case = Case {
            key: "c-tree-initial",
            title: format!("(c) initial copy of the PBX tree ({})", data.tree_summary),
            target: &tree,
            fresh_receiver: true,
            growing: None,
            prepare: &|| mirror(&data.tree_old, &tree.src),
            edit: &|| Ok(()),
            // Each run copies into new directories beside each other (see `Case::fresh_receiver`).
            rsync_reset: &|| Ok(()),
            rsync_args: tree_args(),
            rsync_paths: (src_tree(), format!("{}/fresh/rsync-{{run}}/", rsync.url)),
            rsync_best: Some((
                "--whole-file",
                ["-a", "--whole-file", "--delete"]
                    .map(String::from)
                    .to_vec(),
            )),
        };
        results.push(bench.run_case(&case, args.runs, &rsync)?);
    }
    if wanted('d') {
        let case = Case {
            key: "d-tree-1pct-renumber",
            title: "(d) the tree, 1% of files edited, a mailbox renumbered".into(),
            target: &tree,
            fresh_receiver: false,
            growing: None,
            prepare: &|| mirror(&data.tree_old, &tree.src),
            edit: &|| mirror(&data.tree_new, &tree.src),
            rsync_reset: &|| mirror(&data.tree_old, &rsync.module_dir("tree")?),
            rsync_args: tree_args(),
            rsync_paths: (src_tree(), rsync_tree.clone()),
            rsync_best: None,
        };
        results.push(bench.run_case(&case, args.runs, &rsync)?);
    }
    drop(tree);
    if wanted('e') {
        let small = Target::new(&bench, "small")?;
        let case = Case {
            key: "e-small-unchanged",
            title: format!("(e) unchanged tree of {} small files", args.small_files),
            target: &small,
            fresh_receiver: false,
            growing: None,
            prepare: &|| mirror(&data.small, &small.src),
            edit: &|| Ok(()),
            rsync_reset: &|| mirror(&data.small, &rsync.module_dir("small")?),
            rsync_args: tree_args(),
            rsync_paths: (slash(&small.src), format!("{}/small/", rsync.url)),
            rsync_best: None,
        };
        results.push(bench.run_case(&case, args.runs, &rsync)?);
    }
    if wanted('f') {
        let sparse = Target::new(&bench, "sparse")?;
        let image = sparse.src.join("disk.img");
        let rsync_copy =
            || -> anyhow::Result<PathBuf> { Ok(rsync.module_dir("fresh")?.join("rsync-disk.img")) };
        let case = Case {
            key: "f-sparse",
            title: format!(
                "(f) initial copy of a {} MiB sparse file holding 2 MiB of data",
                args.sparse_mib
            ),
            target: &sparse,
            fresh_receiver: true,
            growing: None,
            prepare: &|| make_sparse(&image, args.sparse_mib << 20),
            edit: &|| Ok(()),
            // One file: removing the last copy costs no inode scan (see `Case::fresh_receiver`).
            rsync_reset: &|| match fs::remove_file(rsync_copy()?) {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err.into()),
                _ => Ok(()),
            },
            rsync_args: vec!["-a".into()],
            rsync_paths: (image.clone(), format!("{}/fresh/rsync-disk.img", rsync.url)),
            rsync_best: Some(("-S", vec!["-a".into(), "-S".into()])),
        };
        results.push(bench.run_case(&case, args.runs, &rsync)?);
    }
    if wanted('g') {
        let rec = Target::new(&bench, "rec")?;
        let file = rec.src.join("rec.wav");
        let recorder = Recorder::default();
        let record_anew = || -> anyhow::Result<()> {
            recorder.stop()?;
            write_stream(&file, "recording", args.recording_mib << 20)
        };
        let rsync_copy =
            || -> anyhow::Result<PathBuf> { Ok(rsync.module_dir("fresh")?.join("rsync-rec.wav")) };
        let case = Case {
            key: "g-growing-recording",
            title: format!(
                "(g) initial copy of a {} MiB recording growing by 16 kB every 100 ms",
                args.recording_mib
            ),
            target: &rec,
            fresh_receiver: true,
            growing: Some((file.clone(), args.recording_mib << 20)),
            prepare: &record_anew,
            edit: &|| recorder.start(&file),
            rsync_reset: &|| {
                record_anew()?;
                match fs::remove_file(rsync_copy()?) {
                    Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                        return Err(err.into());
                    }
                    _ => {}
                }
                recorder.start(&file)
            },
            rsync_args: vec!["-a".into()],
            rsync_paths: (file.clone(), format!("{}/fresh/rsync-rec.wav", rsync.url)),
            rsync_best: Some(("--whole-file", vec!["-a".into(), "--whole-file".into()])),
        };
        results.push(bench.run_case(&case, args.runs, &rsync)?);
        recorder.stop()?;
    }
    drop(rsync);
    report::report(&results, &floors, args.runs);
    Ok(())
}

/// What a case measures and how it resets both sides between runs.
struct Case<'a> {
    key: &'static str,
    title: String,
    target: &'a Target,
    /// Whether the receiver starts empty (no tree, no index) in every run. Both tools then
    /// copy into new directories of rsync's `fresh` module (`lbs-<run>`, `rsync-<run>`), and
    /// each tool's copy (and lbs's state) is removed right after its run. Kept until the end
    /// of the case, every run's copy had to be held in page cache the host was not backing:
    /// this virtual machine hands free memory back to its host (virtio-balloon free page
    /// reporting, 2 MiB blocks) and the host backs it again only when it is touched, so runs
    /// slowed by 0.3–0.45 s each from the third or fourth copy of the prompt tree on, both
    /// tools alike (0.39 → 0.82 s for rsync, 0.57 → 0.89 s for lbs, by hand; with 13 GiB
    /// touched just before, or with each copy removed, neither slowed). That flattened the
    /// ratio towards 1. A removed copy's pages are reused by the next run before they are
    /// handed back; touching memory once at the start does not last (tried: the floors'
    /// page-cache read fell from 5.5 to 1.4 GiB/s after it). The trees live on the journaled
    /// image ([`TreeFs`]), where removing a tree does not slow the next one's creation.
    fresh_receiver: bool,
    /// A file that grows during the run (and its length when the run starts): the copy must
    /// be its beginning, at least that long, instead of the trees verifying equal.
    growing: Option<(PathBuf, u64)>,
    /// Untimed: the source holds the old version.
    prepare: &'a dyn Fn() -> anyhow::Result<()>,
    /// Untimed: the source holds the new version.
    edit: &'a dyn Fn() -> anyhow::Result<()>,
    /// Untimed: rsync's destination holds the old version.
    rsync_reset: &'a dyn Fn() -> anyhow::Result<()>,
    rsync_args: Vec<String>,
    /// Source and destination URL (`{run}` stands for the run's number).
    rsync_paths: (PathBuf, String),
    /// rsync's better mode for this case, if it has one: label and arguments.
    rsync_best: Option<(&'static str, Vec<String>)>,
}

/// One timed run.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    secs: f64,
    wire_bytes: u64,
    /// Peak resident memory of the receiver and of the sender over the run, bytes.
    peak_rss: [u64; 2],
}

struct CaseResult {
    key: &'static str,
    title: String,
    /// At most this many times rsync's time: initial copies (every byte new) are to match
    /// rsync's faster mode (issue 24); edits, appends and unchanged trees to take half of it.
    goal: f64,
    lbs: Vec<Sample>,
    /// lbs with `--no-fsync`, for comparison with rsync, which never syncs.
    unsynced: Vec<Sample>,
    rsync: Vec<Sample>,
    best: Option<(&'static str, Vec<Sample>)>,
    /// For an initial copy: one run of rsync's best mode with `--fsync`, durable as lbs is.
    durable: Vec<Sample>,
}

/// The built binaries, identities and state directories the runs share.
struct Bench {
    lbs: PathBuf,
    ids: PathBuf,
    /// Where both tools' trees, indexes and trash live ([`TreeFs`]).
    trees: PathBuf,
}

/// One benchmark tree: lbs's source and receiver roots and the sender's server.
struct Target {
    name: &'static str,
    src: PathBuf,
    dst: PathBuf,
    dst_state: PathBuf,
    server: Server,
}

impl Target {
    fn new(bench: &Bench, name: &'static str) -> anyhow::Result<Target> {
        let src = bench.trees.join("lbs-src").join(name);
        let dst = bench.trees.join("lbs-dst").join(name);
        fs::create_dir_all(&src)?;
        fs::create_dir_all(&dst)?;
        let server = Server::start(
            bench
                .peer("serve", "primary", BACKUP)
                .arg("--root")
                .arg(&src)
                .arg("--state")
                .arg(bench.trees.join("state-src"))
                .args(["--listen", "127.0.0.1:0"]),
            |line| line.split(" on ").nth(1)?.split(' ').next(),
            STEP_TIMEOUT,
        )?;
        Ok(Target {
            name,
            dst_state: bench.trees.join(format!("state-dst-{name}")),
            src,
            dst,
            server,
        })
    }
}

impl Bench {
    fn new(bin: &Path, work: &Path, trees: &Path) -> anyhow::Result<Bench> {
        let ids = work.join("ids");
        if !ids.join("ca.pem").exists() {
            checked(
                Command::new(bin.join("lbs-hello"))
                    .args(["issue", "--dir"])
                    .arg(&ids)
                    .args(["--box", &format!("primary={PRIMARY}")])
                    .args(["--box", &format!("backup={BACKUP}")]),
                STEP_TIMEOUT,
            )?;
        }
        Ok(Bench {
            lbs: bin.join("lbs"),
            ids,
            trees: trees.to_owned(),
        })
    }

    fn peer(&self, verb: &str, me: &str, partner: &str) -> Command {
        let mut cmd = Command::new(&self.lbs);
        cmd.args(["sync", verb])
            .arg("--identity")
            .arg(self.ids.join(me))
            .arg("--ca")
            .arg(self.ids.join("ca.pem"))
            .args(["--partner", partner]);
        cmd
    }

    fn pull(&self, target: &Target) -> Command {
        self.pull_into(target, &target.dst, &target.dst_state)
    }

    fn pull_into(&self, target: &Target, dst: &Path, state: &Path) -> Command {
        let mut cmd = self.peer("pull", "backup", PRIMARY);
        cmd.arg("--root")
            .arg(dst)
            .arg("--state")
            .arg(state)
            .arg("--trash")
            .arg(self.trees.join("lbs-trash").join(target.name))
            .args(["--from", &target.server.addr]);
        cmd
    }

    /// An untimed pull that must leave the receiver in sync.
    fn settle(&self, target: &Target) -> anyhow::Result<()> {
        checked(&mut self.pull(target), STEP_TIMEOUT).context("untimed pull between runs")?;
        Ok(())
    }

    fn run_case(
        &self,
        case: &Case<'_>,
        runs: usize,
        rsync: &RsyncDaemon,
    ) -> anyhow::Result<CaseResult> {
        println!("\n==> {}", case.title);
        let target = case.target;
        // Warm-up, untimed: the sender's index learns the old tree, as on a running box.
        (case.prepare)()?;
        self.settle(target)?;
        let mut result = CaseResult {
            key: case.key,
            title: case.title.clone(),
            goal: if case.fresh_receiver { 1.0 } else { 0.5 },
            lbs: Vec::new(),
            unsynced: Vec::new(),
            rsync: Vec::new(),
            best: case
                .rsync_best
                .as_ref()
                .map(|(label, _)| (*label, Vec::new())),
            durable: Vec::new(),
        };
        let fresh = rsync.module_dir("fresh")?;
        for run in 0..runs {
            let lbs_run = |durable: bool, tag: &str| -> anyhow::Result<Sample> {
                (case.prepare)()?;
                let (dst, state) = if case.fresh_receiver {
                    let state = self.trees.join(format!("state-fresh-{run}{tag}"));
                    remove_all(&state)?;
                    let dst = fresh.join(format!("lbs-{run}{tag}"));
                    remove_all(&dst)?;
                    fs::create_dir_all(&dst)?;
                    (dst, state)
                } else {
                    self.settle(target)?;
                    (target.dst.clone(), target.dst_state.clone())
                };
                (case.edit)()?;
                flush_disks()?;
                let mut pull = self.pull_into(target, &dst, &state);
                if !durable {
                    pull.arg("--no-fsync");
                }
                let sample = timed(&mut pull, target.server.pid(), |out| {
                    after(out, "on the wire: ")?.split(' ').next()?.parse().ok()
                })
                .context("timed lbs sync pull")?;
                if let Some((file, least)) = &case.growing {
                    let name = file.file_name().context("the growing file has a name")?;
                    check_prefix(&dst.join(name), file, *least)
                        .context("after the pull, the copy is not the recording's beginning")?;
                } else if run == 0 {
                    checked(
                        Command::new(&self.lbs)
                            .args(["sync", "verify"])
                            .arg(&target.src)
                            .arg(&dst),
                        STEP_TIMEOUT,
                    )
                    .context("after the pull, lbs sync verify finds the trees differ")?;
                }
                if case.fresh_receiver {
                    remove_all(&dst)?;
                    remove_all(&state)?;
                }
                Ok(sample)
            };
            // rsync's copies in `fresh` go as soon as they are timed (see `Case::fresh_receiver`).
            let rsync_run = |args: &[String], run: &str| -> anyhow::Result<Sample> {
                let sample = rsync_run(case, args, run)?;
                if case.fresh_receiver {
                    remove_all(&fresh.join(format!("rsync-{run}")))?;
                }
                Ok(sample)
            };
            let lbs = lbs_run(true, "")?;
            let unsynced = lbs_run(false, "-nofsync")?;
            result.unsynced.push(unsynced);
            let default = rsync_run(&case.rsync_args, &run.to_string())?;
            println!(
                "    run {}: lbs {:.3} s {} B (no fsync {:.3} s) | rsync {:.3} s {} B",
                run + 1,
                lbs.secs,
                lbs.wire_bytes,
                unsynced.secs,
                default.secs,
                default.wire_bytes
            );
            result.lbs.push(lbs);
            result.rsync.push(default);
            if let (Some((label, args)), Some((_, samples))) = (&case.rsync_best, &mut result.best)
            {
                let best = rsync_run(args, &format!("{run}-best"))?;
                println!(
                    "           rsync {label}: {:.3} s {} B",
                    best.secs, best.wire_bytes
                );
                samples.push(best);
            }
        }
        if case.fresh_receiver {
            // Durable as lbs is: every file synced before rsync ends (its own way). Once, after
            // the timed runs: thousands of fsyncs could slow the disk for the runs after them.
            let mut args = case
                .rsync_best
                .as_ref()
                .map_or(&case.rsync_args, |b| &b.1)
                .clone();
            args.push("--fsync".into());
            let durable = rsync_run(case, &args, "fsync")?;
            println!("    rsync with --fsync: {:.3} s", durable.secs);
            result.durable.push(durable);
        }
        remove_all(&fresh)?;
        for run in 0..runs {
            for tag in ["", "-nofsync"] {
                remove_all(&self.trees.join(format!("state-fresh-{run}{tag}")))?;
            }
        }
        Ok(result)
    }
}

/// The rest of the first line of `text` that starts with `label`.
fn after<'t>(text: &'t str, label: &str) -> Option<&'t str> {
    text.lines().find_map(|line| line.strip_prefix(label))
}

/// Runs `cmd` to success, timing it, with its peak resident memory and `also`'s over the run
/// (`also` is a server already running: its peak is reset first); the wire bytes come from
/// its output through `bytes_of`. The kernel keeps both peaks: `cmd`'s is read every
/// [`PEAK_EVERY`] (and misses at most what it held in its last moments), `also`'s once at
/// the end, so measuring takes next to nothing from the run it measures.
fn timed(
    cmd: &mut Command,
    also: Option<u32>,
    bytes_of: impl Fn(&str) -> Option<u64>,
) -> anyhow::Result<Sample> {
    if let Some(also) = also {
        // "5" resets the process's peak (VmHWM) to what it holds now.
        fs::write(format!("/proc/{also}/clear_refs"), "5")
            .with_context(|| format!("resetting the peak memory of process {also}"))?;
    }
    let started = Instant::now();
    let mut peak = 0;
    let output = run_watched(cmd, STEP_TIMEOUT, PEAK_EVERY, |pid| {
        peak = peak_rss(pid).unwrap_or(0).max(peak);
    })?;
    let secs = started.elapsed().as_secs_f64();
    let status = output.status;
    let out = String::from_utf8_lossy(&output.stdout).into_owned();
    let err = String::from_utf8_lossy(&output.stderr).into_owned();
    if !status.success() {
        bail!("{cmd:?} failed ({status}):\n{out}{err}");
    }
    let wire_bytes = bytes_of(&out)
        .with_context(|| format!("{cmd:?} did not report its bytes on the wire:\n{out}"))?;
    Ok(Sample {
        secs,
        wire_bytes,
        peak_rss: [peak, also.and_then(peak_rss).unwrap_or(0)],
    })
}

/// How often a timed command's peak memory is read while it runs.
const PEAK_EVERY: Duration = Duration::from_millis(20);

/// A process's peak resident memory since it started or its peak was reset, bytes (`VmHWM`
/// in `/proc/<pid>/status`).
fn peak_rss(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = after(&status, "VmHWM:")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Writes dirty pages out, so one run's writeback does not land in the next run's timing.
fn flush_disks() -> anyhow::Result<()> {
    let status = Command::new("sync").status().context("running sync")?;
    if !status.success() {
        bail!("sync failed ({status})");
    }
    Ok(())
}
