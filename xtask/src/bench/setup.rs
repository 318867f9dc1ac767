//! What the sync benchmark's runs stand on: a fresh file system per tree (so every run
//! starts from cold caches and the same layout) and the rsync daemon lbs is compared with.

use super::*;

/// Resets rsync's destination, then times one push of the case's source.
/// `run` names the run in a fresh destination (`{run}` in the case's path): each mode of each
/// run copies into a directory of its own.
pub(super) fn rsync_run(case: &Case<'_>, args: &[String], run: &str) -> anyhow::Result<Sample> {
    (case.rsync_reset)()?;
    flush_disks()?;
    let mut cmd = Command::new("rsync");
    cmd.arg("--stats")
        .args(args)
        .arg(&case.rsync_paths.0)
        .arg(case.rsync_paths.1.replace("{run}", run));
    // rsync's receiver is the daemon's per-connection child, gone by the end: only the
    // client's memory is measured.
    timed(&mut cmd, None, |out| {
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
    .context("timed rsync")
}

/// Where both tools' trees live: a fresh journaled ext4 (as on a PBX box) in an image under
/// the work directory, mounted for the run. This machine's root file system has no journal,
/// and there ext4 checks every new inode against recently deleted ones: after the benchmark's
/// own deletions that check took 75% of a receiver's time (perf), and rsync's initial copy
/// varied from 0.98 to 1.46 s. Without root or loop devices, the work directory is used.
pub(super) struct TreeFs {
    pub(super) dir: PathBuf,
    pub(super) mounted: bool,
}

impl TreeFs {
    /// Mounts a fresh (sparse) image of `image_gib` GiB on `work/trees`.
    pub(super) fn mount(work: &Path, image_gib: u64) -> anyhow::Result<TreeFs> {
        let dir = work.join("trees");
        fs::create_dir_all(&dir)?;
        let image = work.join("trees.img");
        if is_mount_point(&dir) {
            // Left mounted by an interrupted run.
            checked(Command::new("umount").arg(&dir), STEP_TIMEOUT)?;
        }
        let made = is_root()
            && fs::File::create(&image)
                .and_then(|file| file.set_len(image_gib << 30))
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
            let direct = direct_io(&dir);
            println!(
                "\n==> trees on a fresh journaled ext4 ({} GiB sparse image {}, mounted on {}{})",
                image_gib,
                image.display(),
                dir.display(),
                if direct {
                    ", its loop device in direct I/O"
                } else {
                    "; its loop device could not use direct I/O: syncs write everything twice"
                }
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

/// Switches the loop device under `dir` to direct I/O, so that it stands for a disk as on a
/// PBX box: buffered, the loop device writes into the image file's own page cache, the
/// benchmark's file system sees its write-back done at once, and each sync then writes
/// everything again to the real disk (a 256 MiB file's fsync took 0.3–1.1 s that way; `dd`
/// with `fdatasync` to the machine's own disk, 0.13 s). Whether it did.
fn direct_io(dir: &Path) -> bool {
    let Ok(out) = Command::new("findmnt")
        .args(["-n", "-o", "SOURCE", "--target"])
        .arg(dir)
        .output()
    else {
        return false;
    };
    let device = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    device.starts_with("/dev/loop")
        && checked(
            Command::new("losetup").arg("--direct-io=on").arg(&device),
            STEP_TIMEOUT,
        )
        .is_ok()
}

/// Whether `dir` is the top of a mounted file system (another device than its parent's).
pub(super) fn is_mount_point(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(dir), dir.parent().map(fs::metadata)) {
        (Ok(here), Some(Ok(parent))) => here.dev() != parent.dev(),
        _ => false,
    }
}

impl Drop for TreeFs {
    fn drop(&mut self) {
        if self.mounted {
            // The servers and rsync's daemon were just stopped: one still exiting keeps the
            // file system busy for a moment ("target is busy" seen once at the end of a run).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                match checked(Command::new("umount").arg(&self.dir), STEP_TIMEOUT) {
                    Ok(_) => break,
                    Err(_) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                    Err(err) => {
                        eprintln!("bench: could not unmount {}: {err:#}", self.dir.display());
                        break;
                    }
                }
            }
        }
        if let Some(image) = self.dir.parent().map(|work| work.join("trees.img")) {
            let _ = fs::remove_file(image);
        }
    }
}

/// An rsync daemon on 127.0.0.1, our child, stopped when dropped.
pub(super) struct RsyncDaemon {
    /// Holds the daemon, stopping it when dropped.
    _guard: Guard,
    pub(super) url: String,
    pub(super) module: PathBuf,
}

impl RsyncDaemon {
    pub(super) fn start(work: &Path, port: u16) -> anyhow::Result<RsyncDaemon> {
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
            _guard: guard,
            url: format!("rsync://127.0.0.1:{port}/bench"),
            module,
        })
    }

    /// The daemon-side directory of one tree, created if needed.
    pub(super) fn module_dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = self.module.join(name);
        fs::create_dir_all(&dir)?;
        Ok(dir)
    }
}
