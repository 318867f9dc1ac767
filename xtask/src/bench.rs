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

/// Every dataset derives from this seed (the same date the rsync baseline script uses).
const SEED: &str = "lbs sync bench 20240601";
const PRIMARY: &str = "00-1A-2B-3C-4D-5E";
const BACKUP: &str = "00-1A-2B-3C-4D-5F";
/// The longest one timed or untimed step may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(900);
/// The Debian packages whose prompts and music on hold make the PBX tree: 5,672 files.
const SOUND_PACKAGES: &[&str] = &[
    "asterisk-core-sounds-en-wav",
    "asterisk-core-sounds-en-gsm",
    "asterisk-core-sounds-es-wav",
    "asterisk-core-sounds-es-gsm",
    "asterisk-core-sounds-fr-wav",
    "asterisk-core-sounds-fr-gsm",
    "asterisk-core-sounds-it-wav",
    "asterisk-core-sounds-it-gsm",
    "asterisk-core-sounds-ru-wav",
    "asterisk-core-sounds-ru-gsm",
    "asterisk-moh-opsound-wav",
    "asterisk-moh-opsound-gsm",
];
/// What the benchmark needs installed.
const BENCH_PACKAGES: &[(&str, &str)] = &[
    (
        "rsync",
        "the tool lbs is measured against (as a daemon on 127.0.0.1)",
    ),
    ("dpkg", "unpacks the Asterisk sound packages"),
];
/// Voicemail messages in the benchmark's mailbox; message 2 is deleted in case (d).
const MAILBOX_MESSAGES: usize = 12;
/// 2020-01-01 00:00:00 UTC: every dataset file's mtime, so quick checks are deterministic.
const OLD_MTIME: u64 = 1_577_836_800;
/// 2025-01-01 00:00:00 UTC: the mtime of an edited file in the tree.
const NEW_MTIME: u64 = 1_735_689_600;

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
    /// Only these cases (letters a–e, comma-separated); all by default.
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
    let trees = TreeFs::mount(&work)?;
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
            prepare: &|| data.restore_big(&big_file(&big.src)),
            edit: &|| data.scatter(&big_file(&big.src)),
            rsync_reset: &|| copy_file(&data.big_old, &big_file(&rsync.module_dir("big")?)),
            rsync_args: vec!["-I".into(), "--no-whole-file".into()],
            rsync_paths: (big_file(&big.src), format!("{}/big/big", rsync.url)),
            rsync_best: None,
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
            prepare: &|| mirror(&data.tree_old, &tree.src),
            edit: &|| Ok(()),
            // Each run copies into new directories beside each other (see `Case::fresh_receiver`).
            rsync_reset: &|| Ok(()),
            rsync_args: tree_args(),
            rsync_paths: (src_tree(), format!("{}/fresh/rsync-{{run}}/", rsync.url)),
            rsync_best: None,
        };
        results.push(bench.run_case(&case, args.runs, &rsync)?);
    }
    if wanted('d') {
        let case = Case {
            key: "d-tree-1pct-renumber",
            title: "(d) the tree, 1% of files edited, a mailbox renumbered".into(),
            target: &tree,
            fresh_receiver: false,
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
            prepare: &|| mirror(&data.small, &small.src),
            edit: &|| Ok(()),
            rsync_reset: &|| mirror(&data.small, &rsync.module_dir("small")?),
            rsync_args: tree_args(),
            rsync_paths: (slash(&small.src), format!("{}/small/", rsync.url)),
            rsync_best: None,
        };
        results.push(bench.run_case(&case, args.runs, &rsync)?);
    }
    drop(rsync);
    report(&results, &floors, args.runs);
    Ok(())
}

/// What a case measures and how it resets both sides between runs.
struct Case<'a> {
    key: &'static str,
    title: String,
    target: &'a Target,
    /// Whether the receiver starts empty (no tree, no index) in every run. Both tools then
    /// copy into new sibling directories (`fresh/lbs-<run>`, `fresh/rsync-<run>` in rsync's
    /// module), removed only after the case: this disk's ext4 has no journal and skips
    /// recently freed inodes when it allocates, so deleting a tree just before a run would slow
    /// down whichever tool creates files next.
    fresh_receiver: bool,
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
    /// Peak anonymous memory (RssAnon, sampled) of the receiver and of the sender, bytes.
    anon: [u64; 2],
}

struct CaseResult {
    key: &'static str,
    title: String,
    lbs: Vec<Sample>,
    /// lbs with `--no-fsync`, for comparison with rsync, which never syncs.
    unsynced: Vec<Sample>,
    rsync: Vec<Sample>,
    best: Option<(&'static str, Vec<Sample>)>,
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
            lbs: Vec::new(),
            unsynced: Vec::new(),
            rsync: Vec::new(),
            best: case
                .rsync_best
                .as_ref()
                .map(|(label, _)| (*label, Vec::new())),
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
                if run == 0 {
                    checked(
                        Command::new(&self.lbs)
                            .args(["sync", "verify"])
                            .arg(&target.src)
                            .arg(&dst),
                        STEP_TIMEOUT,
                    )
                    .context("after the pull, lbs sync verify finds the trees differ")?;
                }
                Ok(sample)
            };
            let lbs = lbs_run(true, "")?;
            let unsynced = lbs_run(false, "-nofsync")?;
            result.unsynced.push(unsynced);
            let default = rsync_run(case, &case.rsync_args, rsync, run)?;
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
                let best = rsync_run(case, args, rsync, run)?;
                println!(
                    "           rsync {label}: {:.3} s {} B",
                    best.secs, best.wire_bytes
                );
                samples.push(best);
            }
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

/// Resets rsync's destination, then times one push of the case's source.
fn rsync_run(
    case: &Case<'_>,
    args: &[String],
    rsync: &RsyncDaemon,
    run: usize,
) -> anyhow::Result<Sample> {
    (case.rsync_reset)()?;
    flush_disks()?;
    let mut cmd = Command::new("rsync");
    cmd.arg("--stats")
        .args(args)
        .arg(&case.rsync_paths.0)
        .arg(case.rsync_paths.1.replace("{run}", &run.to_string()));
    let mut sample = timed(&mut cmd, Some(rsync.pid()), |out| {
        let number = |label: &str| -> Option<u64> {
            after(out, label)?
                .split_whitespace()
                .next()?
                .replace(',', "")
                .parse()
                .ok()
        };
        Some(number("Total bytes sent: ")? + number("Total bytes received: ")?)
    })
    .context("timed rsync")?;
    // rsync's receiver is the daemon's per-connection child, gone by now: not sampled.
    sample.anon[1] = 0;
    Ok(sample)
}

/// The rest of the first line of `text` that starts with `label`.
fn after<'t>(text: &'t str, label: &str) -> Option<&'t str> {
    text.lines().find_map(|line| line.strip_prefix(label))
}

/// Runs `cmd` to success, timing it and sampling its (and `also`'s) anonymous memory; the
/// wire bytes come from its output through `bytes_of`.
fn timed(
    cmd: &mut Command,
    also: Option<u32>,
    bytes_of: impl Fn(&str) -> Option<u64>,
) -> anyhow::Result<Sample> {
    let started = Instant::now();
    let mut anon = [0u64; 2];
    let output = run_watched(cmd, STEP_TIMEOUT, Duration::from_millis(2), |pid| {
        anon[0] = anon[0].max(rss_anon(pid).unwrap_or(0));
        if let Some(also) = also {
            anon[1] = anon[1].max(rss_anon(also).unwrap_or(0));
        }
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
        anon,
    })
}

/// A process's resident anonymous memory, bytes (`RssAnon` in `/proc/<pid>/status`).
fn rss_anon(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = after(&status, "RssAnon:")?
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

/// Where both tools' trees live: a fresh journaled ext4 (as on a PBX box) in an image under
/// the work directory, mounted for the run. This machine's root file system has no journal,
/// and there ext4 checks every new inode against recently deleted ones: after the benchmark's
/// own deletions that check took 75% of a receiver's time (perf), and rsync's initial copy
/// varied from 0.98 to 1.46 s. Without root or loop devices, the work directory is used.
struct TreeFs {
    dir: PathBuf,
    mounted: bool,
}

impl TreeFs {
    /// Size of the (sparse) image: three copies of the big file, the trees and their copies.
    const IMAGE_GIB: u64 = 16;

    fn mount(work: &Path) -> anyhow::Result<TreeFs> {
        let dir = work.join("trees");
        fs::create_dir_all(&dir)?;
        let image = work.join("trees.img");
        if is_mount_point(&dir) {
            // Left mounted by an interrupted run.
            checked(Command::new("umount").arg(&dir), STEP_TIMEOUT)?;
        }
        let made = is_root()
            && fs::File::create(&image)
                .and_then(|file| file.set_len(Self::IMAGE_GIB << 30))
                .is_ok()
            && checked(
                Command::new("mkfs.ext4")
                    .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
                    .arg(&image),
                STEP_TIMEOUT,
            )
            .is_ok()
            && checked(
                Command::new("mount")
                    .args(["-o", "loop"])
                    .arg(&image)
                    .arg(&dir),
                STEP_TIMEOUT,
            )
            .is_ok();
        if made {
            println!(
                "\n==> trees on a fresh journaled ext4 ({} GiB sparse image {}, mounted on {})",
                Self::IMAGE_GIB,
                image.display(),
                dir.display()
            );
        } else {
            let _ = fs::remove_file(&image);
            println!(
                "\n==> trees in {} (could not mount an ext4 image: needs root and loop devices)",
                dir.display()
            );
        }
        Ok(TreeFs { dir, mounted: made })
    }
}

/// Whether `dir` is the top of a mounted file system (another device than its parent's).
fn is_mount_point(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(dir), dir.parent().map(fs::metadata)) {
        (Ok(here), Some(Ok(parent))) => here.dev() != parent.dev(),
        _ => false,
    }
}

impl Drop for TreeFs {
    fn drop(&mut self) {
        if self.mounted {
            let unmounted = checked(Command::new("umount").arg(&self.dir), STEP_TIMEOUT);
            if let Err(err) = unmounted {
                eprintln!("bench: could not unmount {}: {err:#}", self.dir.display());
            }
        }
        if let Some(image) = self.dir.parent().map(|work| work.join("trees.img")) {
            let _ = fs::remove_file(image);
        }
    }
}

/// An rsync daemon on 127.0.0.1, our child, stopped when dropped.
struct RsyncDaemon {
    guard: Guard,
    url: String,
    module: PathBuf,
}

impl RsyncDaemon {
    fn start(work: &Path, port: u16) -> anyhow::Result<RsyncDaemon> {
        let module = work.join("rsync-dst");
        fs::create_dir_all(&module)?;
        let config = work.join("rsyncd.conf");
        let user = if is_root() {
            "uid = root\n  gid = root\n"
        } else {
            ""
        };
        fs::write(
            &config,
            format!(
                "log file = {}\naddress = 127.0.0.1\nport = {port}\nuse chroot = no\n\
                 [bench]\n  path = {}\n  read only = no\n  {user}",
                work.join("rsyncd.log").display(),
                module.display()
            ),
        )?;
        let child = Command::new("rsync")
            .args(["--daemon", "--no-detach"])
            .arg(format!("--config={}", config.display()))
            .stdin(Stdio::null())
            .spawn()
            .context("starting the rsync daemon")?;
        let mut guard = Guard(Some(child));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = guard.child()?.try_wait()? {
                bail!("the rsync daemon exited ({status}); is port {port} taken? (--rsync-port)");
            }
            if Instant::now() > deadline {
                bail!("the rsync daemon did not listen on 127.0.0.1:{port} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(RsyncDaemon {
            guard,
            url: format!("rsync://127.0.0.1:{port}/bench"),
            module,
        })
    }

    fn pid(&self) -> u32 {
        self.guard.0.as_ref().map_or(0, std::process::Child::id)
    }

    /// The daemon-side directory of one tree, created if needed.
    fn module_dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = self.module.join(name);
        fs::create_dir_all(&dir)?;
        Ok(dir)
    }
}

/// The machine's own limits, measured in the same run as the cases.
struct Floors {
    /// blake3 on one core, in memory, GiB/s.
    blake3: f64,
    /// Reading a cached file into memory, GiB/s.
    page_cache: f64,
}

impl Floors {
    fn measure(cached: &Path) -> anyhow::Result<Floors> {
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

/// A deterministic byte stream: blake3's extendable output keyed by the seed and a label.
struct Prng(blake3::OutputReader);

impl Prng {
    fn new(label: &str) -> Prng {
        let mut hasher = blake3::Hasher::new_derive_key(SEED);
        hasher.update(label.as_bytes());
        Prng(hasher.finalize_xof())
    }

    fn fill(&mut self, buf: &mut [u8]) {
        self.0.fill(buf);
    }

    fn below(&mut self, n: u64) -> u64 {
        let mut bytes = [0u8; 8];
        self.0.fill(&mut bytes);
        u64::from_le_bytes(bytes) % n.max(1)
    }
}

/// The benchmark's inputs, built once under `data/` and reused by later runs.
struct Datasets {
    big_old: PathBuf,
    big_len: u64,
    /// Case (a): offsets and new contents of the scattered 4 KiB rewrites.
    edits: Vec<(u64, Vec<u8>)>,
    append_len: u64,
    tree_old: PathBuf,
    tree_new: PathBuf,
    tree_summary: String,
    small: PathBuf,
}

impl Datasets {
    fn build(dir: &Path, args: &SyncArgs) -> anyhow::Result<Datasets> {
        fs::create_dir_all(dir)?;
        let big_len = args.big_mib << 20;
        let big_old = dir.join(format!("big-{}MiB.old", args.big_mib));
        if fs::metadata(&big_old).map(|m| m.len()).ok() != Some(big_len) {
            println!("    writing {} ({} MiB)", big_old.display(), args.big_mib);
            write_stream(&big_old, "big", big_len)?;
        }
        // 1% of the file's 4 KiB blocks, rewritten at unaligned places.
        let mut prng = Prng::new("scatter");
        let count = big_len / 4096 / 100;
        let mut edits: Vec<(u64, Vec<u8>)> = (0..count)
            .map(|_| {
                let offset = prng.below(big_len.saturating_sub(4096));
                let mut bytes = vec![0u8; 4096];
                prng.fill(&mut bytes);
                (offset, bytes)
            })
            .collect();
        edits.sort_by_key(|(offset, _)| *offset);
        println!("    case (a): {count} rewrites of 4 KiB");

        let tree_old = dir.join("tree.old");
        let tree_new = dir.join("tree.new");
        if !tree_old.is_dir() {
            build_sound_tree(dir, &tree_old)?;
        }
        if !tree_new.is_dir() {
            edit_tree(&tree_old, &tree_new)?;
        }
        let (files, bytes) = tree_size(&tree_old)?;
        let tree_summary = format!("{files} files, {:.0} MB", bytes as f64 / 1e6);
        println!("    PBX tree: {tree_summary}");

        let small = dir.join(format!("small-{}", args.small_files));
        if !small.is_dir() {
            build_small_tree(&small, args.small_files)?;
        }
        Ok(Datasets {
            big_old,
            big_len,
            edits,
            append_len: args.append_mib << 20,
            tree_old,
            tree_new,
            tree_summary,
            small,
        })
    }

    /// Makes `file` the old big file again: its length, and the old bytes where edits were.
    fn restore_big(&self, file: &Path) -> anyhow::Result<()> {
        let len = fs::metadata(file).map(|m| m.len()).ok();
        if len == Some(self.big_len + self.append_len) {
            OpenOptions::new()
                .write(true)
                .open(file)?
                .set_len(self.big_len)?;
        } else if len != Some(self.big_len) {
            // Missing, or left by a run with other sizes.
            copy_file(&self.big_old, file)?;
            return set_mtime(file, OLD_MTIME);
        }
        let old = File::open(&self.big_old)?;
        let out = OpenOptions::new().write(true).open(file)?;
        let mut block = vec![0u8; 4096];
        for (offset, _) in &self.edits {
            old.read_exact_at(&mut block, *offset)?;
            out.write_all_at(&block, *offset)?;
        }
        drop(out);
        // The old version's mtime too: the old state is content and metadata.
        set_mtime(file, OLD_MTIME)
    }

    /// Case (a)'s edit: the scattered rewrites.
    fn scatter(&self, file: &Path) -> anyhow::Result<()> {
        let out = OpenOptions::new().write(true).open(file)?;
        for (offset, bytes) in &self.edits {
            out.write_all_at(bytes, *offset)?;
        }
        Ok(())
    }

    /// Case (b)'s edit: a tail appended.
    fn append(&self, file: &Path) -> anyhow::Result<()> {
        let mut out = OpenOptions::new().append(true).open(file)?;
        let mut prng = Prng::new("tail");
        let mut chunk = vec![0u8; 1 << 20];
        let mut left = self.append_len;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            prng.fill(&mut chunk[..n]);
            out.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        Ok(())
    }
}

/// Writes `len` bytes of the labelled stream to `path`.
fn write_stream(path: &Path, label: &str, len: u64) -> anyhow::Result<()> {
    let tmp = path.with_extension("partial");
    let mut out = std::io::BufWriter::new(File::create(&tmp)?);
    let mut prng = Prng::new(label);
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        prng.fill(&mut chunk[..n]);
        out.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    out.flush()?;
    drop(out);
    fs::rename(&tmp, path)?;
    Ok(())
}

/// The Asterisk prompts and music on hold of [`SOUND_PACKAGES`], plus one voicemail box.
fn build_sound_tree(dir: &Path, tree: &Path) -> anyhow::Result<()> {
    let debs = dir.join("debs");
    fs::create_dir_all(&debs)?;
    let have = |package: &str| -> anyhow::Result<bool> {
        Ok(fs::read_dir(&debs)?.filter_map(Result::ok).any(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with(&format!("{package}_"))
        }))
    };
    let mut missing = Vec::new();
    for package in SOUND_PACKAGES {
        if !have(package)? {
            missing.push(*package);
        }
    }
    if !missing.is_empty() {
        run_step(
            "apt-get download (Asterisk sound packages)",
            Command::new("apt-get")
                .arg("download")
                .args(&missing)
                .current_dir(&debs),
        )
        .context(
            "fetching Debian's Asterisk sound packages (run `apt-get update` if apt knows none)",
        )?;
    }
    let unpacked = dir.join("tree.unpacked");
    remove_all(&unpacked)?;
    for entry in fs::read_dir(&debs)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            checked(
                Command::new("dpkg").arg("-x").arg(&path).arg(&unpacked),
                STEP_TIMEOUT,
            )?;
        }
    }
    let partial = dir.join("tree.partial");
    remove_all(&partial)?;
    fs::rename(unpacked.join("usr/share/asterisk"), &partial)
        .context("the sound packages did not hold usr/share/asterisk")?;
    remove_all(&unpacked)?;
    let inbox = partial.join("voicemail/default/1234/INBOX");
    fs::create_dir_all(&inbox)?;
    let mut prng = Prng::new("voicemail");
    for i in 0..MAILBOX_MESSAGES {
        // 20 to 60 s of 8 kHz 16-bit audio, each message a different length.
        let len = 320_000 + 61_111 * i as u64 + prng.below(1000);
        let mut audio = vec![0u8; len as usize];
        prng.fill(&mut audio);
        let base = inbox.join(format!("msg{i:04}"));
        fs::write(base.with_extension("wav"), &audio)?;
        fs::write(
            base.with_extension("txt"),
            format!(
                ";\n; Message Information file\n;\n[message]\norigmailbox=1234\ncallerid=\"Caller {i}\" <55501{i:02}>\nduration={}\n",
                len / 16_000
            ),
        )?;
    }
    set_all_mtimes(&partial, OLD_MTIME)?;
    // Each message its own mtime, as recorded at different times.
    for i in 0..MAILBOX_MESSAGES {
        for ext in ["wav", "txt"] {
            set_mtime(
                &inbox.join(format!("msg{i:04}.{ext}")),
                OLD_MTIME + 3600 * i as u64,
            )?;
        }
    }
    fs::rename(&partial, tree)?;
    Ok(())
}

/// Case (d)'s new tree: 1% of the files get a 4 KiB rewrite and a new mtime; message 2 of
/// the mailbox is deleted and the later ones renumbered down, as Asterisk does.
fn edit_tree(old: &Path, new: &Path) -> anyhow::Result<()> {
    let partial = new.with_extension("partial");
    remove_all(&partial)?;
    checked(
        Command::new("cp").arg("-a").arg(old).arg(&partial),
        STEP_TIMEOUT,
    )?;
    let mut files = Vec::new();
    walk_files(&partial, &mut files)?;
    files.sort();
    files.retain(|(_, len)| *len > 0);
    let mut prng = Prng::new("tree edits");
    let count = (files.len() / 100).max(1);
    // A seeded partial shuffle picks the files.
    for i in 0..count {
        let j = i + prng.below((files.len() - i) as u64) as usize;
        files.swap(i, j);
        let (path, len) = &files[i];
        let n = (*len).min(4096);
        let offset = prng.below(len - n + 1);
        let mut bytes = vec![0u8; n as usize];
        prng.fill(&mut bytes);
        OpenOptions::new()
            .write(true)
            .open(path)?
            .write_all_at(&bytes, offset)?;
        set_mtime(path, NEW_MTIME)?;
    }
    let inbox = partial.join("voicemail/default/1234/INBOX");
    for ext in ["wav", "txt"] {
        fs::remove_file(inbox.join(format!("msg0002.{ext}")))?;
        for i in 3..MAILBOX_MESSAGES {
            fs::rename(
                inbox.join(format!("msg{i:04}.{ext}")),
                inbox.join(format!("msg{:04}.{ext}", i - 1)),
            )?;
        }
    }
    fs::rename(&partial, new)?;
    println!("    case (d): {count} files edited, mailbox renumbered from message 2");
    Ok(())
}

/// `count` files of 64 B to 4 KiB in directories of 1,000, for case (e).
fn build_small_tree(root: &Path, count: usize) -> anyhow::Result<()> {
    println!("    writing {count} small files in {}", root.display());
    let partial = root.with_extension("partial");
    remove_all(&partial)?;
    let mut prng = Prng::new("small");
    let mut bytes = vec![0u8; 4096];
    for i in 0..count {
        let dir = partial.join(format!("d{:03}", i / 1000));
        if i % 1000 == 0 {
            fs::create_dir_all(&dir)?;
        }
        let len = 64 + prng.below(4096 - 64) as usize;
        prng.fill(&mut bytes[..len]);
        fs::write(dir.join(format!("f{i:06}")), &bytes[..len])?;
    }
    set_all_mtimes(&partial, OLD_MTIME)?;
    fs::rename(&partial, root)?;
    Ok(())
}

fn walk_files(dir: &Path, out: &mut Vec<(PathBuf, u64)>) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            walk_files(&entry.path(), out)?;
        } else if kind.is_file() {
            out.push((entry.path(), entry.metadata()?.len()));
        }
    }
    Ok(())
}

fn tree_size(dir: &Path) -> anyhow::Result<(usize, u64)> {
    let mut files = Vec::new();
    walk_files(dir, &mut files)?;
    Ok((files.len(), files.iter().map(|(_, len)| len).sum()))
}

fn set_mtime(path: &Path, secs: u64) -> anyhow::Result<()> {
    let when = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
    File::open(path)?
        .set_modified(when)
        .with_context(|| format!("setting the mtime of {}", path.display()))
}

/// Sets the mtime of everything under `root` (symlinks themselves, not their targets).
fn set_all_mtimes(root: &Path, secs: u64) -> anyhow::Result<()> {
    checked(
        Command::new("find")
            .arg(root)
            .args(["-exec", "touch", "-h", "-d"])
            .arg(format!("@{secs}"))
            .args(["{}", "+"]),
        STEP_TIMEOUT,
    )?;
    Ok(())
}

/// Makes `to` an exact copy of `from` (rsync used as a local copy tool, untimed).
fn mirror(from: &Path, to: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(to)?;
    checked(
        Command::new("rsync")
            .args(["-a", "--delete"])
            .arg(slash(from))
            .arg(slash(to)),
        STEP_TIMEOUT,
    )?;
    Ok(())
}

/// A directory path with a trailing slash: rsync's "the contents of".
fn slash(dir: &Path) -> PathBuf {
    let mut text = dir.as_os_str().to_owned();
    text.push("/");
    PathBuf::from(text)
}

fn copy_file(from: &Path, to: &Path) -> anyhow::Result<()> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent)?;
    }
    let _ = fs::remove_file(to);
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn report(results: &[CaseResult], floors: &Floors, runs: usize) {
    const MIB: f64 = 1024.0 * 1024.0;
    println!(
        "\n=== sync benchmark: medians of {runs} run(s); bytes are both directions on the wire; \
         lbs syncs new content to disk before it replaces the old (no-fsync: with --no-fsync); \
         rsync never syncs"
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
        "lbs anon MiB"
    );
    println!(
        "{:<22} {:>8} {:>8} {:>8} {:>6} {:>13} {:>13} {:>6}  {:>16}",
        "", "", "lbs s", "", "ratio", "", "", "ratio", "(pull/serve)"
    );
    let mut worst_time = (0.0f64, "none");
    let mut worst_bytes = (0.0f64, "none");
    let mut short = Vec::new();
    for result in results {
        let secs = |samples: &[Sample]| median(samples.iter().map(|s| s.secs).collect());
        let bytes =
            |samples: &[Sample]| median(samples.iter().map(|s| s.wire_bytes as f64).collect());
        let peak = |i: usize| result.lbs.iter().map(|s| s.anon[i]).max().unwrap_or(0) as f64 / MIB;
        let (lbs_s, rsync_s) = (secs(&result.lbs), secs(&result.rsync));
        let (lbs_b, rsync_b) = (bytes(&result.lbs), bytes(&result.rsync));
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
        if time_ratio > 0.5 {
            misses.push(format!("time {time_ratio:.2}× rsync (goal 0.5×)"));
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
