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

/// A duration as seconds with two decimals ("1.25 s"), the unit of every timeline we print.
pub fn seconds(duration: Duration) -> String {
    format!("{:.2} s", duration.as_secs_f64())
}
