//! The sync benchmark's datasets: made from fixed seeds (and, for the PBX tree, Debian's
//! Asterisk sounds), the same on every run, and the edits a day brings to them.

use super::*;

/// Every dataset derives from this seed (the same date the rsync baseline script uses).
pub(super) const SEED: &str = "lbs sync bench 20240601";

/// The Debian packages whose prompts and music on hold make the PBX tree: 5,672 files.
pub(super) const SOUND_PACKAGES: &[&str] = &[
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

/// Voicemail messages in the benchmark's mailbox; message 2 is deleted in case (d).
pub(super) const MAILBOX_MESSAGES: usize = 12;

/// 2020-01-01 00:00:00 UTC: every dataset file's mtime, so quick checks are deterministic.
pub(super) const OLD_MTIME: u64 = 1_577_836_800;

/// 2025-01-01 00:00:00 UTC: the mtime of an edited file in the tree.
pub(super) const NEW_MTIME: u64 = 1_735_689_600;

/// A deterministic byte stream: blake3's extendable output keyed by the seed and a label.
pub(super) struct Prng(blake3::OutputReader);

impl Prng {
    pub(super) fn new(label: &str) -> Prng {
        let mut hasher = blake3::Hasher::new_derive_key(SEED);
        hasher.update(label.as_bytes());
        Prng(hasher.finalize_xof())
    }

    pub(super) fn fill(&mut self, buf: &mut [u8]) {
        self.0.fill(buf);
    }

    pub(super) fn below(&mut self, n: u64) -> u64 {
        let mut bytes = [0u8; 8];
        self.0.fill(&mut bytes);
        u64::from_le_bytes(bytes) % n.max(1)
    }
}

/// The benchmark's inputs, built once under `data/` and reused by later runs.
pub(super) struct Datasets {
    pub(super) big_old: PathBuf,
    pub(super) big_len: u64,
    /// Case (a): offsets and new contents of the scattered 4 KiB rewrites.
    pub(super) edits: Vec<(u64, Vec<u8>)>,
    pub(super) append_len: u64,
    pub(super) tree_old: PathBuf,
    pub(super) tree_new: PathBuf,
    pub(super) tree_summary: String,
    pub(super) small: PathBuf,
}

impl Datasets {
    pub(super) fn build(dir: &Path, args: &SyncArgs) -> anyhow::Result<Datasets> {
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
    pub(super) fn restore_big(&self, file: &Path) -> anyhow::Result<()> {
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
    pub(super) fn scatter(&self, file: &Path) -> anyhow::Result<()> {
        let out = OpenOptions::new().write(true).open(file)?;
        for (offset, bytes) in &self.edits {
            out.write_all_at(bytes, *offset)?;
        }
        Ok(())
    }

    /// Case (b)'s edit: a tail appended.
    pub(super) fn append(&self, file: &Path) -> anyhow::Result<()> {
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
pub(super) fn write_stream(path: &Path, label: &str, len: u64) -> anyhow::Result<()> {
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
pub(super) fn build_sound_tree(dir: &Path, tree: &Path) -> anyhow::Result<()> {
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
pub(super) fn edit_tree(old: &Path, new: &Path) -> anyhow::Result<()> {
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
pub(super) fn build_small_tree(root: &Path, count: usize) -> anyhow::Result<()> {
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

pub(super) fn walk_files(dir: &Path, out: &mut Vec<(PathBuf, u64)>) -> anyhow::Result<()> {
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

pub(super) fn tree_size(dir: &Path) -> anyhow::Result<(usize, u64)> {
    let mut files = Vec::new();
    walk_files(dir, &mut files)?;
    Ok((files.len(), files.iter().map(|(_, len)| len).sum()))
}

pub(super) fn set_mtime(path: &Path, secs: u64) -> anyhow::Result<()> {
    let when = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
    File::open(path)?
        .set_modified(when)
        .with_context(|| format!("setting the mtime of {}", path.display()))
}

/// Sets the mtime of everything under `root` (symlinks themselves, not their targets).
pub(super) fn set_all_mtimes(root: &Path, secs: u64) -> anyhow::Result<()> {
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
pub(super) fn mirror(from: &Path, to: &Path) -> anyhow::Result<()> {
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
pub(super) fn slash(dir: &Path) -> PathBuf {
    let mut text = dir.as_os_str().to_owned();
    text.push("/");
    PathBuf::from(text)
}

pub(super) fn copy_file(from: &Path, to: &Path) -> anyhow::Result<()> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent)?;
    }
    let _ = fs::remove_file(to);
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// Case (f)'s file at `path` (kept when it is already there): `len` bytes, holes but for two
/// 1 MiB islands of seeded data, at a fifth and at four fifths of it.
pub(super) fn make_sparse(path: &Path, len: u64) -> anyhow::Result<()> {
    if fs::metadata(path).is_ok_and(|m| m.len() == len) {
        return Ok(());
    }
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.set_len(len)?;
    let mut island = vec![0u8; 1 << 20];
    let mut prng = Prng::new("sparse");
    for at in [len / 5, len / 5 * 4] {
        prng.fill(&mut island);
        file.write_all_at(&island, at.min(len.saturating_sub(island.len() as u64)))?;
    }
    file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_650_000_000))?;
    Ok(())
}

/// Case (g)'s call being recorded: a child shell appends 16 kB to the file every 100 ms (a
/// stereo G.711 call's second) until it is stopped, or dropped.
#[derive(Default)]
pub(super) struct Recorder(std::cell::RefCell<Option<std::process::Child>>);

impl Recorder {
    /// Starts recording onto `file` (stopping a recording still going).
    pub(super) fn start(&self, file: &Path) -> anyhow::Result<()> {
        self.stop()?;
        let child = Command::new("sh")
            .args([
                "-c",
                "while :; do head -c 16384 /dev/urandom >> \"$0\" || exit 1; sleep 0.1; done",
            ])
            .arg(file)
            .stdin(std::process::Stdio::null())
            .spawn()
            .context("starting the recording")?;
        *self.0.borrow_mut() = Some(child);
        Ok(())
    }

    pub(super) fn stop(&self) -> anyhow::Result<()> {
        if let Some(mut child) = self.0.borrow_mut().take() {
            let _ = child.kill();
            child.wait().context("stopping the recording")?;
        }
        Ok(())
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Checks that `copy` is the beginning of `original` (which may have grown since) and holds
/// at least `least` bytes; its length.
pub(super) fn check_prefix(copy: &Path, original: &Path, least: u64) -> anyhow::Result<u64> {
    let (mut a, mut b) = (File::open(copy)?, File::open(original)?);
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut len = 0u64;
    loop {
        let n = a.read(&mut x)?;
        if n == 0 {
            break;
        }
        b.read_exact(&mut y[..n])
            .with_context(|| format!("{} is longer than {}", copy.display(), original.display()))?;
        if x[..n] != y[..n] {
            bail!(
                "{} differs from {} after {len} bytes",
                copy.display(),
                original.display()
            );
        }
        len += n as u64;
    }
    if len < least {
        bail!(
            "{} holds {len} bytes, fewer than the {least} listed",
            copy.display()
        );
    }
    Ok(len)
}
