//! The bootable qcow2 disk: a raw disk with one ext4 partition made from the tree, extlinux,
//! converted to qcow2; loop mounts released on every path.

use super::*;

/// The bootable disk: MBR with one active Linux partition at 1 MiB, the ext4 root made from
/// the tree (no mount needed), extlinux installed through a loop mount of the partition, the
/// MBR's boot code; then converted to qcow2.
pub(super) fn write_disk(
    args: &ImageArgs,
    tree: &Path,
    work: &Path,
    qcow2: &Path,
) -> anyhow::Result<()> {
    let started = Instant::now();
    println!("\n==> write the qcow2 disk ({} GiB)", args.disk_gib);
    let raw = work.join("disk.raw");
    let _ = fs::remove_file(&raw);
    let size = args.disk_gib << 30;
    let file = fs::File::create(&raw)?;
    file.set_len(size)?;
    drop(file);
    let mut sfdisk = Command::new("sfdisk");
    sfdisk
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(&raw);
    feed(
        &mut sfdisk,
        &format!(
            "label: dos\nstart={}, type=83, bootable\n",
            PARTITION_OFFSET / 512
        ),
    )?;
    let partition_kib = (size - PARTITION_OFFSET) / 1024;
    checked(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", ROOT_LABEL, "-d"])
            .arg(tree)
            .args(["-E", &format!("offset={PARTITION_OFFSET}")])
            .arg(&raw)
            .arg(format!("{partition_kib}k")),
        LONG,
    )?;
    {
        let mount = LoopMount::new(&raw, &work.join("mnt"))?;
        // The image's own extlinux, run from here (it needs only libc).
        checked(
            Command::new(tree.join("usr/bin/extlinux"))
                .arg("--install")
                .arg(mount.dir.join("boot/extlinux")),
            SHORT,
        )?;
        mount.unmount()?;
    }
    // extlinux took the loop device for a whole disk: its boot sector must count from the
    // partition's start ("hidden sectors" at 0x1C, as in a FAT boot sector).
    patch(
        &raw,
        PARTITION_OFFSET + 0x1C,
        &((PARTITION_OFFSET / 512) as u32).to_le_bytes(),
    )?;
    let mbr = fs::read(tree.join("usr/lib/EXTLINUX/mbr.bin"))?;
    if mbr.len() > 440 {
        bail!(
            "extlinux's mbr.bin is {} bytes, more than the MBR's 440",
            mbr.len()
        );
    }
    patch(&raw, 0, &mbr)?;

    let partial = partial_name(qcow2);
    let _ = fs::remove_file(&partial);
    checked(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&partial),
        LONG,
    )
    .inspect_err(|_| {
        let _ = fs::remove_file(&partial);
    })?;
    fs::remove_file(&raw)?;
    fs::rename(&partial, qcow2)?;
    println!(
        "==> write the qcow2 disk: ok in {}",
        seconds(started.elapsed())
    );
    Ok(())
}

/// Writes `bytes` into `file` at `offset`.
fn patch(file: &Path, offset: u64, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    fs::OpenOptions::new()
        .write(true)
        .open(file)?
        .write_all_at(bytes, offset)
        .with_context(|| format!("writing {} at {offset}", file.display()))
}

/// The root partition of the raw disk, loop-mounted; unmounted on drop (the loop device goes
/// with it: `autoclear`).
struct LoopMount {
    dir: PathBuf,
    mounted: bool,
}

impl LoopMount {
    fn new(raw: &Path, dir: &Path) -> anyhow::Result<LoopMount> {
        fs::create_dir_all(dir)?;
        checked(
            Command::new("mount")
                .args([
                    "-t",
                    "ext4",
                    "-o",
                    &format!("loop,offset={PARTITION_OFFSET}"),
                ])
                .arg(raw)
                .arg(dir),
            SHORT,
        )
        .context("loop-mounting the image's root partition (extlinux needs it mounted)")?;
        Ok(LoopMount {
            dir: dir.to_path_buf(),
            mounted: true,
        })
    }

    fn unmount(mut self) -> anyhow::Result<()> {
        self.mounted = false;
        checked(Command::new("umount").arg(&self.dir), SHORT)?;
        Ok(())
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.dir).status();
        }
    }
}
