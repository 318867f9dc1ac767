//! `cargo xtask image`: a Debian 12 PBX root filesystem with lbs preinstalled, as a tarball
//! and as a bootable qcow2 disk (MBR, one ext4 partition, extlinux, the Debian kernel).
//!
//! The Debian base comes from debootstrap once and is kept as a tarball in a cache (keyed by
//! suite, mirror and package list), so later builds and `--check` start from it. Every
//! output is written under a temporary name and renamed only when complete: a build that
//! fails halfway leaves nothing named like a good image.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::dist::{self, capture};
use crate::process::checked;
use crate::util::{ensure_packages, is_root, remove_all, run_step, seconds, target_dir};

mod boot;
mod disk;

use boot::{boot, check_outputs};
use disk::write_disk;

/// What building an image needs on this machine, and what for.
pub const IMAGE_PACKAGES: &[(&str, &str)] = &[
    ("debootstrap", "the Debian 12 base system of the image"),
    ("fdisk", "sfdisk, the qcow2 disk's partition table"),
    (
        "e2fsprogs",
        "mkfs.ext4 -d, the root filesystem made from the tree",
    ),
    ("qemu-utils", "qemu-img, the raw disk converted to qcow2"),
    (
        "qemu-system-x86",
        "--check boots the disk (software emulation, no network) to its login prompt",
    ),
];

const SUITE: &str = "bookworm";
/// The base system: a minimal Debian with systemd, a kernel and its boot loader, SSH for the
/// administrators, and what lbs's package depends on (and nftables, lbs-datacenter's, which
/// `--check` installs beside it).
const BASE_PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "udev",
    "kmod",
    "passwd",
    "init-system-helpers",
    "iproute2",
    "iputils-ping",
    "procps",
    "openssh-server",
    "ca-certificates",
    "e2fsprogs",
    "linux-image-amd64",
    "initramfs-tools",
    "extlinux",
    "syslinux-common",
    "nftables",
];
/// The root partition starts 1 MiB into the disk, where partitioning tools put it.
const PARTITION_OFFSET: u64 = 1 << 20;
const ROOT_LABEL: &str = "lbs-root";
/// Long steps (debootstrap, the package installs) and short ones.
const LONG: Duration = Duration::from_secs(1800);
const SHORT: Duration = Duration::from_secs(300);

#[derive(clap::Args)]
pub struct ImageArgs {
    /// Where the tarball and the qcow2 disk go (default: <target>/image).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// The images' file name, without extension (default: lbs-pbx-<version>).
    #[arg(long)]
    name: Option<String>,
    /// The box's static address on the office LAN.
    #[arg(long, value_name = "CIDR", default_value = "192.168.1.2/24")]
    ip: String,
    /// The office gateway.
    #[arg(long, value_name = "IP", default_value = "192.168.1.1")]
    gateway: std::net::Ipv4Addr,
    /// DNS servers the box asks (repeat for more; default: the gateway).
    #[arg(long, value_name = "IP")]
    dns: Vec<std::net::Ipv4Addr>,
    /// The office interface (the image boots with classic names: eth0, eth1…).
    #[arg(long, default_value = "eth0")]
    interface: String,
    /// The box's host name.
    #[arg(long, default_value = "pbx")]
    hostname: String,
    /// The pair's shared address (the one phones use), when the box should take it over at P:
    /// writes agent.toml's [network] with --ip as this box's own address.
    #[arg(long, value_name = "CIDR")]
    shared: Option<String>,
    /// The data center's CA certificate, shipped as /etc/lbs/datacenter-ca.pem (boxes
    /// believe no other server at activation).
    #[arg(long, value_name = "FILE")]
    datacenter_ca: Option<PathBuf>,
    /// The data center's activation address (`dc.example.net:7440`), the default of
    /// `lbs activate` on the box.
    #[arg(long, value_name = "HOST:PORT")]
    datacenter: Option<String>,
    /// A file holding the console login `ip`'s password (its first line). Without it the box
    /// asks for one on its screen at first boot; there is no default password.
    #[arg(long, value_name = "FILE")]
    console_password_file: Option<PathBuf>,
    /// SSH public keys for root (an authorized_keys file); without it root has no way in
    /// over SSH.
    #[arg(long, value_name = "FILE")]
    authorized_keys: Option<PathBuf>,
    /// The qcow2 disk's size (it grows on demand; the root filesystem fills it).
    #[arg(long, value_name = "GiB", default_value_t = 8)]
    disk_gib: u64,
    /// The Debian mirror.
    #[arg(long, default_value = "http://deb.debian.org/debian")]
    mirror: String,
    /// Where the debootstrap base is kept between builds.
    #[arg(long, value_name = "DIR", default_value = "/var/cache/lbs-xtask")]
    cache: PathBuf,
    /// Make the debootstrap base again even if the cache has it.
    #[arg(long)]
    fresh_base: bool,
    /// Build with these options into a scratch directory, check the result (lbs runs in it,
    /// the agent is enabled, the disk boots under qemu to its login prompt with the agent
    /// started, both packages install and purge cleanly), then remove it. What
    /// `cargo xtask test` runs.
    #[arg(long)]
    check: bool,
    /// Do not install missing tools, only say which are missing.
    #[arg(long)]
    no_install: bool,
}

pub fn run(args: &ImageArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    if !is_root() {
        bail!(
            "cargo xtask image needs root (debootstrap, chroot, a loop mount for the boot \
             loader): run it with sudo"
        );
    }
    validate(args)?;
    let missing = ensure_packages(IMAGE_PACKAGES, !args.no_install)?;
    if !missing.is_empty() {
        bail!("cannot build an image without {}", missing.join(", "));
    }
    let work = target_dir().join("image-work");
    let out = match (&args.out, args.check) {
        (_, true) => work.join("check-out"),
        (Some(out), false) => out.clone(),
        (None, false) => target_dir().join("image"),
    };
    let debs = dist::build_checked(Some(work.join("debs")), !args.no_install)?;
    let base = base_tarball(args)?;

    let tree = work.join("rootfs");
    let _unmounted = TreeMounts::clean(&tree);
    remove_all(&tree)?;
    fs::create_dir_all(&tree)?;
    run_step(
        "unpack the base",
        Command::new("tar")
            .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf"])
            .arg(&base)
            .arg("-C")
            .arg(&tree),
    )?;
    install_deb(&tree, &debs[0])?;
    if args.check {
        // The check also boots a data center: the package beside lbs, its CA made, so
        // systemd must start lbs-datacenter.service under its hardening too.
        for deb in &debs[1..] {
            install_deb(&tree, deb)?;
        }
        chroot(
            &tree,
            &[
                "lbs-datacenter",
                "--dir",
                "/var/lib/lbs-datacenter",
                "init",
                "--name",
                "image check CA",
            ],
            SHORT,
        )?;
    }
    // The check boots the disk and reads systemd's progress on the serial console, which
    // systemd holds back while the first-boot password prompt owns a terminal: the checked
    // image gets a password, as a provider's build with --console-password-file does.
    let password = match (&args.console_password_file, args.check) {
        (Some(file), _) => Some(console_password(file)?),
        (None, true) => Some(format!("image-check-{}", std::process::id())),
        (None, false) => None,
    };
    configure(args, &tree, password.as_deref())?;
    check_tree(&tree)?;

    fs::create_dir_all(&out)?;
    let name = match &args.name {
        Some(name) => name.clone(),
        None => format!("lbs-pbx-{}", dist::workspace_version()?),
    };
    let tarball = out.join(format!("{name}.tar.gz"));
    let qcow2 = out.join(format!("{name}.qcow2"));
    write_tarball(&tree, &tarball)?;
    write_disk(args, &tree, &work, &qcow2)?;

    if args.check {
        check_outputs(&tarball, &qcow2)?;
        boot(
            &qcow2,
            &work.join("boot.log"),
            &args.hostname,
            &["lbs-agent.service", "lbs-datacenter.service"],
        )?;
        check_packages(&tree)?;
        remove_all(&out)?;
        remove_all(&tree)?;
        println!("\nimage --check: passed in {}", seconds(started.elapsed()));
        return Ok(());
    }
    remove_all(&tree)?;
    println!();
    for path in [&tarball, &qcow2] {
        let size = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        println!("  {} ({:.0} MB)", path.display(), size as f64 / 1e6);
    }
    println!("\nimage: built in {}", seconds(started.elapsed()));
    Ok(())
}

/// Refuses options that would make a broken box, before anything is built.
fn validate(args: &ImageArgs) -> anyhow::Result<()> {
    let cidr = |what: &str, text: &str| -> anyhow::Result<()> {
        let (address, prefix) = text.split_once('/').with_context(|| {
            format!("{what} {text:?} needs a prefix length, like 192.168.1.2/24")
        })?;
        address
            .parse::<std::net::Ipv4Addr>()
            .with_context(|| format!("{what} {text:?}: {address:?} is not an IPv4 address"))?;
        match prefix.parse::<u8>() {
            Ok(p) if (1..=32).contains(&p) => Ok(()),
            _ => bail!("{what} {text:?}: the prefix length must be 1 to 32"),
        }
    };
    cidr("--ip", &args.ip)?;
    if let Some(shared) = &args.shared {
        cidr("--shared", shared)?;
        if shared.split('/').next() == args.ip.split('/').next() {
            bail!(
                "--shared {shared} is the box's own --ip: give the box its own address \
                 (the backup's, like 192.168.1.3/24) and the shared one the phones use"
            );
        }
    }
    let plain = |c: char| c.is_ascii_alphanumeric() || c == '-';
    if args.hostname.is_empty() || !args.hostname.chars().all(plain) {
        bail!(
            "--hostname {:?}: letters, digits and '-' only",
            args.hostname
        );
    }
    if args.interface.is_empty() || !args.interface.chars().all(|c| plain(c) || c == '.') {
        bail!("--interface {:?} is not an interface name", args.interface);
    }
    if let Some(name) = &args.name
        && (name.is_empty() || name.contains('/') || name.starts_with('.'))
    {
        bail!("--name {name:?}: a file name, without '/'");
    }
    for file in [
        &args.datacenter_ca,
        &args.console_password_file,
        &args.authorized_keys,
    ]
    .into_iter()
    .flatten()
    {
        if !file.is_file() {
            bail!("{} does not exist", file.display());
        }
    }
    if let Some(file) = &args.console_password_file {
        console_password(file)?;
    }
    if let Some(ca) = &args.datacenter_ca {
        let text = fs::read_to_string(ca).with_context(|| format!("reading {}", ca.display()))?;
        if !text.contains("-----BEGIN CERTIFICATE-----") {
            bail!(
                "{} is not a PEM certificate (the data center's ca.pem)",
                ca.display()
            );
        }
    }
    if let Some(dc) = &args.datacenter
        && !dc
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
    {
        bail!("--datacenter {dc:?}: give host:port, like dc.example.net:7440");
    }
    if !(2..=1024).contains(&args.disk_gib) {
        bail!("--disk-gib {}: from 2 to 1024", args.disk_gib);
    }
    Ok(())
}

/// The debootstrap base as a tarball in the cache, made first if it is not there.
fn base_tarball(args: &ImageArgs) -> anyhow::Result<PathBuf> {
    let key =
        blake3::hash(format!("{SUITE} {} {}", args.mirror, BASE_PACKAGES.join(",")).as_bytes())
            .to_hex();
    let tarball = args.cache.join(format!("base-{SUITE}-{}.tar", &key[..12]));
    if tarball.exists() && !args.fresh_base {
        println!("\n==> debootstrap base: cached at {}", tarball.display());
        return Ok(tarball);
    }
    fs::create_dir_all(&args.cache)
        .with_context(|| format!("creating the cache {}", args.cache.display()))?;
    let tree = args
        .cache
        .join(format!(".base-{SUITE}-{}.partial", &key[..12]));
    let _unmounted = TreeMounts::clean(&tree);
    remove_all(&tree)?;
    let took = run_step(
        &format!(
            "debootstrap {SUITE} (minbase + {} packages)",
            BASE_PACKAGES.len()
        ),
        Command::new("debootstrap")
            .args([
                "--variant=minbase",
                &format!("--include={}", BASE_PACKAGES.join(",")),
            ])
            .arg(SUITE)
            .arg(&tree)
            .arg(&args.mirror),
    )?;
    println!(
        "    the base took {}; later builds use the cache",
        seconds(took)
    );
    let partial = tarball.with_extension("tar.partial");
    run_step(
        "keep the base in the cache",
        Command::new("tar")
            .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-cpf"])
            .arg(&partial)
            .arg("-C")
            .arg(&tree)
            .arg("."),
    )?;
    fs::rename(&partial, &tarball)?;
    remove_all(&tree)?;
    Ok(tarball)
}

/// `dpkg -i` of a package inside the tree (its dependencies are in the base).
fn install_deb(tree: &Path, deb: &Path) -> anyhow::Result<()> {
    let name = deb.file_name().context("a .deb without a name")?;
    let inside = Path::new("/tmp").join(name);
    fs::copy(deb, tree.join(inside.strip_prefix("/")?))?;
    let out = chroot(tree, &["dpkg", "-i", &inside.to_string_lossy()], LONG)?;
    print!("{out}");
    fs::remove_file(tree.join(inside.strip_prefix("/")?))?;
    Ok(())
}

/// `argv` inside the tree, with a clean environment (nothing of this machine's leaks in).
fn in_tree(tree: &Path, argv: &[&str]) -> Command {
    let mut cmd = Command::new("chroot");
    cmd.arg(tree)
        .args(argv)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("LC_ALL", "C");
    cmd
}

/// Runs `argv` inside the tree; its output, or an error with it.
fn chroot(tree: &Path, argv: &[&str], timeout: Duration) -> anyhow::Result<String> {
    let out = crate::process::run_with_timeout(&mut in_tree(tree, argv), timeout)?;
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "in the image, `{}` failed ({}): {}",
            argv.join(" "),
            out.status,
            said.trim()
        );
    }
    Ok(said)
}

/// Writes a file into the tree (`rel` relative to its root), creating its directory.
fn put(tree: &Path, rel: &str, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let path = tree.join(rel);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// The box's identity and network, the data center, the console password, the boot loader's
/// configuration, and what must differ between boxes made from one image.
fn configure(args: &ImageArgs, tree: &Path, password: Option<&str>) -> anyhow::Result<()> {
    println!("\n==> configure the image");
    let host = &args.hostname;
    put(tree, "etc/hostname", &format!("{host}\n"), 0o644)?;
    put(
        tree,
        "etc/hosts",
        &format!(
            "127.0.0.1\tlocalhost\n127.0.1.1\t{host}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        ),
        0o644,
    )?;
    let dns: Vec<String> = if args.dns.is_empty() {
        vec![args.gateway.to_string()]
    } else {
        args.dns.iter().map(ToString::to_string).collect()
    };
    put(
        tree,
        "etc/systemd/network/10-lbs-lan.network",
        &format!(
            "# The office LAN, written by cargo xtask image. lbs keeps Address= in step when\n\
             # the box takes over (P) or gives back (B) the shared address.\n\
             [Match]\nName={}\n\n[Network]\nAddress={}\nGateway={}\n{}",
            args.interface,
            args.ip,
            args.gateway,
            dns.iter().map(|d| format!("DNS={d}\n")).collect::<String>()
        ),
        0o644,
    )?;
    put(
        tree,
        "etc/resolv.conf",
        &dns.iter()
            .map(|d| format!("nameserver {d}\n"))
            .collect::<String>(),
        0o644,
    )?;
    put(
        tree,
        "etc/fstab",
        &format!("LABEL={ROOT_LABEL}\t/\text4\terrors=remount-ro\t0\t1\n"),
        0o644,
    )?;
    put(
        tree,
        "etc/apt/sources.list",
        &format!(
            "deb {0} {SUITE} main\ndeb {0} {SUITE}-updates main\n\
             deb http://security.debian.org/debian-security {SUITE}-security main\n",
            args.mirror
        ),
        0o644,
    )?;
    chroot(
        tree,
        &["systemctl", "enable", "systemd-networkd.service"],
        SHORT,
    )?;

    // Each box gets its own machine ID and SSH host keys at first boot, not the image's.
    put(tree, "etc/machine-id", "", 0o444)?;
    let _ = fs::remove_file(tree.join("var/lib/dbus/machine-id"));
    for entry in fs::read_dir(tree.join("etc/ssh"))? {
        let path = entry?.path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("ssh_host_"))
        {
            fs::remove_file(&path)?;
        }
    }
    put(
        tree,
        "etc/systemd/system/lbs-ssh-host-keys.service",
        "[Unit]\nDescription=SSH host keys of this box (made at its first boot)\n\
         ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key\nBefore=ssh.service\n\n\
         [Service]\nType=oneshot\nExecStart=/usr/bin/ssh-keygen -A\n\n\
         [Install]\nWantedBy=multi-user.target\n",
        0o644,
    )?;
    chroot(
        tree,
        &["systemctl", "enable", "lbs-ssh-host-keys.service"],
        SHORT,
    )?;
    if let Some(keys) = &args.authorized_keys {
        let text = fs::read_to_string(keys)?;
        put(tree, "root/.ssh/authorized_keys", &text, 0o600)?;
        crate::dist::set_mode(&tree.join("root/.ssh"), 0o700)?;
    }

    // The data center this box activates with.
    if let Some(ca) = &args.datacenter_ca {
        put(
            tree,
            "etc/lbs/datacenter-ca.pem",
            &fs::read_to_string(ca)?,
            0o644,
        )?;
    }
    if let Some(dc) = &args.datacenter {
        put(
            tree,
            "etc/lbs/datacenter-address",
            &format!("# The data center's activation address (cargo xtask image).\n{dc}\n"),
            0o644,
        )?;
    }
    if let Some(shared) = &args.shared {
        let config = tree.join("etc/lbs/agent.toml");
        let mut text = fs::read_to_string(&config)?;
        text.push_str(&format!(
            "\n# Written by cargo xtask image.\n[network]\ninterface = \"{}\"\nshared = \"{shared}\"\n\
             own = \"{}\"\ngateway = \"{}\"\nboot_config = \"/\"\n",
            args.interface, args.ip, args.gateway
        ));
        fs::write(&config, text)?;
    }

    // The console login's password: from the build, or asked at first boot.
    match password {
        Some(password) => {
            set_console_password(tree, password)?;
            let _ = fs::remove_file(tree.join("etc/lbs/console-password-needed"));
            println!("    console login ip: password set at build time");
        }
        None => {
            put(
                tree,
                "etc/lbs/console-password-needed",
                "# The console login ip has no password yet: asked on tty1 at first boot.\n",
                0o644,
            )?;
            println!("    console login ip: password asked on the screen at first boot");
        }
    }

    // extlinux: the Debian kernel, root by label, classic interface names (eth0).
    let boot = tree.join("boot");
    let newest = |prefix: &str| -> anyhow::Result<String> {
        let mut names: Vec<String> = fs::read_dir(&boot)?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(prefix))
            .collect();
        names.sort();
        names
            .pop()
            .with_context(|| format!("no {prefix}* in the image's /boot"))
    };
    let (kernel, initrd) = (newest("vmlinuz-")?, newest("initrd.img-")?);
    put(
        tree,
        "boot/extlinux/extlinux.conf",
        &format!(
            "# Written by cargo xtask image.\nDEFAULT lbs\nTIMEOUT 30\nPROMPT 0\n\n\
             LABEL lbs\n  LINUX /boot/{kernel}\n  INITRD /boot/{initrd}\n  \
             APPEND root=LABEL={ROOT_LABEL} ro net.ifnames=0 console=tty0 console=ttyS0,115200\n"
        ),
        0o644,
    )?;
    println!(
        "    {host}: {} on {} via {}, kernel {kernel}",
        args.ip, args.interface, args.gateway
    );
    Ok(())
}

/// The console password: the file's first line, at least 8 characters.
fn console_password(file: &Path) -> anyhow::Result<String> {
    let text = fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let password = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if password.chars().count() < 8 {
        bail!(
            "{}: the console password must be at least 8 characters",
            file.display()
        );
    }
    if password.contains(':') {
        bail!(
            "{}: the console password cannot contain ':'",
            file.display()
        );
    }
    Ok(password.to_owned())
}

/// Sets the `ip` login's password inside the tree (hashed by the tree's own chpasswd).
fn set_console_password(tree: &Path, password: &str) -> anyhow::Result<()> {
    feed(
        &mut in_tree(tree, &["chpasswd"]),
        &format!("ip:{password}\n"),
    )
    .context("setting the console password in the image")
}

/// What every image must be: lbs runs, its agent and boot check are enabled, the LAN is
/// configured, the console login exists with the console as its shell.
fn check_tree(tree: &Path) -> anyhow::Result<()> {
    let version = chroot(tree, &["lbs", "--version"], SHORT)?;
    if !version.starts_with("lbs ") {
        bail!("`lbs --version` in the image said {version:?}");
    }
    for unit in [
        "lbs-agent.service",
        "lbs-boot-check.service",
        "systemd-networkd.service",
    ] {
        let state = capture(
            Command::new("systemctl")
                .arg(format!("--root={}", tree.display()))
                .args(["is-enabled", unit]),
        )
        .with_context(|| format!("{unit} is not enabled in the image"))?;
        if state != "enabled" {
            bail!("{unit} is {state} in the image, not enabled");
        }
    }
    let passwd = chroot(tree, &["getent", "passwd", "ip"], SHORT)?;
    if !passwd.trim_end().ends_with(":/usr/lib/lbs/console-shell") {
        bail!("the console login ip in the image is {passwd:?}");
    }
    println!(
        "    checked: {} runs, lbs-agent enabled, console login ip",
        version.trim()
    );
    Ok(())
}

/// The tree as a gzipped tarball (numeric owners, file capabilities kept).
fn write_tarball(tree: &Path, tarball: &Path) -> anyhow::Result<()> {
    let partial = partial_name(tarball);
    let _ = fs::remove_file(&partial);
    run_step(
        "write the tarball",
        Command::new("tar")
            .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-czpf"])
            .arg(&partial)
            .arg("-C")
            .arg(tree)
            .arg("."),
    )
    .inspect_err(|_| {
        let _ = fs::remove_file(&partial);
    })?;
    fs::rename(&partial, tarball)?;
    Ok(())
}

/// `.<name>.partial` beside `path`: where an output is written until it is complete.
fn partial_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.partial"))
}

/// Unmounts whatever a killed earlier run left mounted inside a tree before it is removed
/// (debootstrap mounts /proc and /sys inside its target), and again when dropped.
struct TreeMounts(PathBuf);

impl TreeMounts {
    fn clean(tree: &Path) -> TreeMounts {
        let mounts = TreeMounts(tree.to_path_buf());
        mounts.unmount_all();
        mounts
    }

    fn unmount_all(&self) {
        let Ok(table) = fs::read_to_string("/proc/self/mounts") else {
            return;
        };
        let prefix = self.0.to_string_lossy().into_owned();
        let mut inside: Vec<&str> = table
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        // Deepest first.
        inside.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for mount in inside {
            let _ = Command::new("umount").arg("--lazy").arg(mount).status();
        }
    }
}

impl Drop for TreeMounts {
    fn drop(&mut self) {
        self.unmount_all();
    }
}

/// `--check`: lbs-datacenter (installed beside lbs for the check) is enabled, and purging
/// both leaves no trace of them (binaries, units, the console login) in the tree.
fn check_packages(tree: &Path) -> anyhow::Result<()> {
    let version = chroot(tree, &["lbs-datacenter", "--version"], SHORT)?;
    let state = capture(
        Command::new("systemctl")
            .arg(format!("--root={}", tree.display()))
            .args(["is-enabled", "lbs-datacenter.service"]),
    )?;
    if state != "enabled" {
        bail!("lbs-datacenter.service is {state} after dpkg -i");
    }
    chroot(tree, &["dpkg", "--purge", "lbs", "lbs-datacenter"], LONG)?;
    for gone in [
        "usr/bin/lbs",
        "usr/bin/lbs-datacenter",
        "lib/systemd/system/lbs-agent.service",
        "etc/systemd/system/multi-user.target.wants/lbs-agent.service",
        "etc/lbs/agent.toml",
        "var/lib/lbs",
    ] {
        if tree.join(gone).symlink_metadata().is_ok() {
            bail!("/{gone} is still in the tree after dpkg --purge");
        }
    }
    if chroot(tree, &["getent", "passwd", "ip"], SHORT).is_ok() {
        bail!("the console login ip is still there after dpkg --purge lbs");
    }
    println!(
        "    checked: {} installs and is enabled; dpkg --purge of both leaves nothing",
        version.trim()
    );
    Ok(())
}

/// Runs `cmd` with `input` on its standard input.
fn feed(cmd: &mut Command, input: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
