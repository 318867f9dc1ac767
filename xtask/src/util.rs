//! Helpers shared by the xtask commands: where the project is, how to run a step and time it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The workspace root (the parent of `xtask/`).
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The directory cargo builds into, honouring `CARGO_TARGET_DIR`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|dir| {
            if dir.is_absolute() {
                dir
            } else {
                project_root().join(dir)
            }
        })
        .unwrap_or_else(|| project_root().join("target"))
}

/// Removes a directory tree; one that is not there is already removed.
pub fn remove_all(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("removing {}", path.display())),
    }
}

/// A `cargo` command run from the project root, using the same cargo that runs xtask.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(project_root());
    cmd
}

/// Whether this process runs as root (uid 0), read from the owner of `/proc/self`.
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|meta| meta.uid() == 0)
}

/// Runs a step to completion, printing its name first and its duration after.
pub fn run_step(name: &str, cmd: &mut Command) -> anyhow::Result<Duration> {
    println!("\n==> {name}");
    let started = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("{name}: cannot start {:?}", cmd.get_program()))?;
    let took = started.elapsed();
    if !status.success() {
        bail!("{name} failed ({status}) after {}", seconds(took));
    }
    println!("==> {name}: ok in {}", seconds(took));
    Ok(took)
}

/// Like [`run_step`], for a command whose output nobody needs unless it fails (apt-get's
/// hundreds of "Unpacking …" lines): one line for the step, everything it printed in `log`,
/// and the end of that log shown when it fails.
pub fn run_step_logged(name: &str, cmd: &mut Command, log: &Path) -> anyhow::Result<Duration> {
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let started = Instant::now();
    let status = cmd
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .with_context(|| format!("{name}: cannot start {:?}", cmd.get_program()))?;
    let took = started.elapsed();
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        for line in tail.into_iter().rev() {
            println!("    {line}");
        }
        bail!(
            "{name} failed ({status}) after {}; its full output is in {}",
            seconds(took),
            log.display()
        );
    }
    println!(
        "==> {name}: ok in {} (output in {})",
        seconds(took),
        log.display()
    );
    Ok(took)
}

/// A duration as seconds with two decimals ("1.25 s"), the unit of every timeline we print.
pub fn seconds(duration: Duration) -> String {
    format!("{:.2} s", duration.as_secs_f64())
}

/// What building the workspace needs besides Rust: every command that installs packages
/// builds afterwards, so [`ensure_packages`] always adds these.
pub const BUILD_PACKAGES: &[(&str, &str)] = &[
    (
        "protobuf-compiler",
        "protoc, with which the etcd-client crate generates its gRPC code (the data center's etcd store)",
    ),
    (
        "libprotobuf-dev",
        "protobuf's own .proto files (descriptor.proto, struct.proto) that etcd's protos import; only a recommendation of protobuf-compiler, which we install without",
    ),
];

/// Installs the missing Debian `packages` (name, what for), and [`BUILD_PACKAGES`], with
/// apt-get when we are root on Debian; otherwise says what to install and returns the names
/// still missing.
pub fn ensure_packages<'a>(
    packages: &[(&'a str, &'a str)],
    install: bool,
) -> anyhow::Result<Vec<&'a str>> {
    let packages: Vec<(&str, &str)> = BUILD_PACKAGES.iter().chain(packages).copied().collect();
    let missing: Vec<&str> = packages
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !dpkg_installed(name))
        .collect();
    if missing.is_empty() {
        println!("==> system packages: all present");
        return Ok(Vec::new());
    }
    let list = missing.join(" ");
    let debian =
        Path::new("/etc/debian_version").exists() && Path::new("/usr/bin/apt-get").exists();
    if !install || !debian || !is_root() {
        let why = if !install {
            "--no-install given"
        } else if !debian {
            "not a Debian system"
        } else {
            "not root"
        };
        println!("==> system packages missing ({why}): {list}");
        for (name, what) in packages.iter().filter(|(n, _)| missing.contains(n)) {
            println!("    {name}: {what}");
        }
        println!("    install them with: apt-get install -y {list}");
        return Ok(missing);
    }
    let log = target_dir().join("xtask-apt.log");
    println!("==> installing {} system package(s): {list}", missing.len());
    run_step_logged(
        "apt-get update",
        Command::new("apt-get")
            .args(["update", "-qq"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
        &target_dir().join("xtask-apt-update.log"),
    )?;
    // Packages such as bind9 and kamailio would start their service on this machine; the
    // tests run their own inside namespaces. Debian's policy-rc.d says "do not start" for the
    // length of the install (unless the machine has its own policy already).
    let _no_services = NoServiceStarts::install()?;
    run_step_logged(
        "apt-get install",
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        &log,
    )?;
    let still: Vec<&str> = missing.into_iter().filter(|n| !dpkg_installed(n)).collect();
    if !still.is_empty() {
        bail!(
            "apt-get reported success but these are still missing: {}",
            still.join(" ")
        );
    }
    Ok(Vec::new())
}

/// `/usr/sbin/policy-rc.d` answering 101 ("action forbidden") while it lives: packages
/// installed meanwhile do not start their services. Removed on drop; an existing one is left
/// alone.
struct NoServiceStarts(Option<&'static Path>);

impl NoServiceStarts {
    const PATH: &'static str = "/usr/sbin/policy-rc.d";
    const MARK: &'static str = "written by cargo xtask";

    fn install() -> anyhow::Result<NoServiceStarts> {
        use std::os::unix::fs::PermissionsExt;
        let path = Path::new(Self::PATH);
        // Someone else's policy stays; ours left behind by a killed run is ours to remove.
        if std::fs::read_to_string(path).is_ok_and(|text| !text.contains(Self::MARK)) {
            return Ok(NoServiceStarts(None));
        }
        std::fs::write(
            path,
            format!(
                "#!/bin/sh\n# {}: no service starts while it installs packages\nexit 101\n",
                Self::MARK
            ),
        )
        .with_context(|| format!("writing {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
        Ok(NoServiceStarts(Some(path)))
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if let Some(path) = self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Whether dpkg says `package` is installed.
pub fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|out| out.status.success() && out.stdout.ends_with(b"install ok installed"))
}
