//! `cargo xtask dist`: the Debian packages `lbs` (the agent and the operator's command line,
//! for every PBX box) and `lbs-datacenter`, from a release build, checked with lintian and
//! `systemd-analyze verify`.
//!
//! What goes into each package is listed once, in [`PACKAGES`]; the files themselves (units,
//! default configurations, maintainer scripts, the console's shell) live in `dist/<package>/`
//! and the man pages and completions come from the binaries' own CLI definitions
//! (`<binary> generate-docs`). The version is the workspace's.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::process::checked;
use crate::util::{
    cargo, ensure_packages, project_root, remove_all, run_step, seconds, target_dir,
};

/// What `cargo xtask dist` needs besides a toolchain, and what for.
pub const DIST_PACKAGES: &[(&str, &str)] = &[
    (
        "dpkg-dev",
        "dpkg-shlibdeps, which computes the packages' Depends",
    ),
    (
        "lintian",
        "Debian's package checker; the packages must have no errors",
    ),
    ("systemd", "systemd-analyze verify on the packages' units"),
    ("binutils", "strip, for the packaged binaries"),
];

/// The Debian revision of our own packaging, after the workspace's version.
const DEBIAN_REVISION: &str = "1";
const MAINTAINER: &str = "lbs developers <lbs@lbs-project.org>";
const HOMEPAGE: &str = "https://lbs-project.org";
/// Units go where Debian 12's systemd and deb-systemd-helper look for packaged ones.
const UNIT_DIR: &str = "lib/systemd/system";

/// A file copied from `dist/<package>/` into the package.
struct Shipped {
    /// Its name in `dist/<package>/`.
    source: &'static str,
    /// Where it is installed (relative to `/`).
    dest: &'static str,
    mode: u32,
    /// Under `/etc`: the admin's to edit, never overwritten by an upgrade.
    conffile: bool,
}

const fn file(source: &'static str, dest: &'static str, mode: u32) -> Shipped {
    Shipped {
        source,
        dest,
        mode,
        conffile: false,
    }
}

const fn conffile(source: &'static str, dest: &'static str) -> Shipped {
    Shipped {
        source,
        dest,
        mode: 0o644,
        conffile: true,
    }
}

/// One Debian package.
pub struct Package {
    /// The package's name, also its `dist/` directory.
    pub name: &'static str,
    /// The cargo package that builds the binary.
    crate_name: &'static str,
    /// The binary, installed as `/usr/bin/<binary>`.
    pub binary: &'static str,
    /// The units (in `dist/<package>/`), all enabled by the postinst.
    pub units: &'static [&'static str],
    files: &'static [Shipped],
    /// Depends besides the shared libraries dpkg-shlibdeps finds.
    depends: &'static [&'static str],
    recommends: &'static str,
    summary: &'static str,
    description: &'static str,
}

pub const PACKAGES: &[Package] = &[
    Package {
        name: "lbs",
        crate_name: "lbs-agent",
        binary: "lbs",
        units: &[
            "lbs-agent.service",
            "lbs-boot-check.service",
            "lbs-console-password.service",
        ],
        files: &[
            conffile("agent.toml", "etc/lbs/agent.toml"),
            conffile(
                "sshd-lbs-console.conf",
                "etc/ssh/sshd_config.d/lbs-console.conf",
            ),
            file("console-shell", "usr/lib/lbs/console-shell", 0o755),
            file("console-password", "usr/lib/lbs/console-password", 0o755),
        ],
        // useradd, groupadd (passwd) in the postinst; deb-systemd-helper (init-system-helpers).
        depends: &["passwd", "init-system-helpers (>= 1.54~)"],
        recommends: "systemd",
        summary: "Live Backup Server agent for PBX boxes",
        description: "lbs keeps a second PBX box continuously in sync with the primary. When \
            the primary fails, an operator presses P at the backup's console and the backup \
            takes over the primary's address, DNS names and role within seconds; phones and \
            trunks carry on. The repaired box becomes the new backup with B.\n\
            This package holds the agent (a systemd service that waits for `lbs activate` \
            on a new box), the operator's command line `lbs`, and the console login `ip` \
            whose shell is the lbs console, on the box's own screen and serial port only.",
    },
    Package {
        name: "lbs-datacenter",
        crate_name: "lbs-datacenter",
        binary: "lbs-datacenter",
        units: &["lbs-datacenter.service", "lbs-datacenter-site.service"],
        files: &[conffile(
            "datacenter.toml",
            "etc/lbs-datacenter/datacenter.toml",
        )],
        depends: &["init-system-helpers (>= 1.54~)", "nftables"],
        recommends: "",
        summary: "Live Backup Server data center: activation, pairing, role authority",
        description: "The data center side of lbs, run by the service provider for all its \
            PBX pairs: the certificate authority, box activation and pairing, the control \
            API that records every role change (the authority on which box is primary), DNS \
            updates that move a pair's name to its primary, and the WireGuard endpoints that \
            carry a remote backup's traffic.\n\
            `lbs-datacenter init` creates the CA once; the lbs-datacenter service then serves. \
            Another site runs only its tunnel endpoints with the lbs-datacenter-site service.",
    },
];

#[derive(clap::Args)]
pub struct DistArgs {
    /// Where the .deb files go (default: <target>/dist).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Do not install missing tools (dpkg-dev, lintian), only say which are missing.
    #[arg(long)]
    pub no_install: bool,
}

pub fn run(args: &DistArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let debs = build_checked(args.out.clone(), !args.no_install)?;
    println!();
    for deb in &debs {
        let size = fs::metadata(deb).map(|m| m.len()).unwrap_or(0);
        println!("  {} ({:.1} MB)", deb.display(), size as f64 / 1e6);
    }
    println!(
        "\ndist: {} packages built and checked in {}",
        debs.len(),
        seconds(started.elapsed())
    );
    Ok(())
}

/// Builds every package into `out` (default `<target>/dist`) and checks it with lintian and
/// systemd-analyze; the paths of the .deb files, in [`PACKAGES`] order.
pub fn build_checked(out: Option<PathBuf>, install: bool) -> anyhow::Result<Vec<PathBuf>> {
    let missing = ensure_packages(DIST_PACKAGES, install)?;
    if !missing.is_empty() {
        bail!("cannot build packages without {}", missing.join(", "));
    }
    let out = out.unwrap_or_else(|| target_dir().join("dist"));
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut build = cargo();
    build.args(["build", "--release", "--locked"]);
    for package in PACKAGES {
        build.args(["-p", package.crate_name]);
    }
    run_step("cargo build --release", &mut build)?;

    let version = format!("{}-{DEBIAN_REVISION}", workspace_version()?);
    let arch = capture(Command::new("dpkg").arg("--print-architecture"))?;
    let mut debs = Vec::new();
    for package in PACKAGES {
        let started = Instant::now();
        println!("\n==> package {} {version} ({arch})", package.name);
        let deb = build_package(package, &version, &arch, &out)?;
        check_units(package, &deb)?;
        lintian(&deb)?;
        println!(
            "==> package {}: ok in {}",
            package.name,
            seconds(started.elapsed())
        );
        debs.push(deb);
    }
    Ok(debs)
}

/// `[workspace.package] version` of the root Cargo.toml.
pub fn workspace_version() -> anyhow::Result<String> {
    let manifest = project_root().join("Cargo.toml");
    let text =
        fs::read_to_string(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
    let mut in_section = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_section = line == "[workspace.package]";
        } else if in_section && let Some(value) = line.strip_prefix("version") {
            let value = value.trim_start().trim_start_matches('=').trim();
            return Ok(value.trim_matches('"').to_owned());
        }
    }
    bail!(
        "no version in [workspace.package] of {}",
        manifest.display()
    )
}

/// Stages `package`'s tree and packs it with dpkg-deb; the staging tree is made under a
/// temporary name and the .deb written beside its final name, then renamed, so a failure
/// never leaves a half-made package named like a good one.
fn build_package(
    package: &Package,
    version: &str,
    arch: &str,
    out: &Path,
) -> anyhow::Result<PathBuf> {
    let sources = project_root().join("dist").join(package.name);
    let stage = scratch(&format!("{}_{version}_{arch}", package.name))?;
    let put = |dest: &str, from: &Path, mode: u32| -> anyhow::Result<()> {
        let to = stage.join(dest);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::copy(from, &to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        set_mode(&to, mode)
    };

    // The binary, stripped (the release build keeps line tables for backtraces).
    let built = target_dir().join("release").join(package.binary);
    let binary = format!("usr/bin/{}", package.binary);
    put(&binary, &built, 0o755)?;
    checked(
        Command::new("strip")
            .args([
                "--strip-unneeded",
                "--remove-section=.comment",
                "--remove-section=.note",
            ])
            .arg(stage.join(&binary)),
        Duration::from_secs(60),
    )?;

    for unit in package.units {
        put(&format!("{UNIT_DIR}/{unit}"), &sources.join(unit), 0o644)?;
    }
    for shipped in package.files {
        put(shipped.dest, &sources.join(shipped.source), shipped.mode)?;
    }
    write_docs(package, &stage)?;
    let doc = stage.join("usr/share/doc").join(package.name);
    fs::create_dir_all(&doc)?;
    fs::write(doc.join("copyright"), copyright()?)?;
    gzip_to(
        &changelog(package, version)?,
        &doc.join("changelog.Debian.gz"),
    )?;
    // Not an upload to Debian's archive: there are no Debian bugs for the changelog to close.
    let overrides = stage.join("usr/share/lintian/overrides");
    fs::create_dir_all(&overrides)?;
    fs::write(
        overrides.join(package.name),
        format!(
            "# Built by cargo xtask dist, not uploaded to Debian: no Debian bug to close.\n\
             {}: initial-upload-closes-no-bugs\n",
            package.name
        ),
    )?;
    let readme = project_root().join("README.md");
    if package.name == "lbs" {
        gzip_to(&fs::read(&readme)?, &doc.join("README.md.gz"))?;
    }

    // DEBIAN/: control, conffiles, maintainer scripts, md5sums.
    let control_dir = stage.join("DEBIAN");
    fs::create_dir_all(&control_dir)?;
    set_mode(&control_dir, 0o755)?;
    for script in ["postinst", "prerm", "postrm"] {
        put(&format!("DEBIAN/{script}"), &sources.join(script), 0o755)?;
    }
    let conffiles: String = package
        .files
        .iter()
        .filter(|f| f.conffile)
        .map(|f| format!("/{}\n", f.dest))
        .collect();
    if !conffiles.is_empty() {
        fs::write(control_dir.join("conffiles"), conffiles)?;
    }
    fs::write(control_dir.join("md5sums"), md5sums(&stage)?)?;
    let depends = shlib_depends(package, &stage.join(&binary))?;
    fs::write(
        control_dir.join("control"),
        control(package, version, arch, &depends, installed_kb(&stage)?),
    )?;

    let deb = out.join(format!("{}_{version}_{arch}.deb", package.name));
    let partial = out.join(format!(".{}_{version}_{arch}.deb.partial", package.name));
    let _ = fs::remove_file(&partial);
    checked(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&partial),
        Duration::from_secs(300),
    )
    .inspect_err(|_| {
        let _ = fs::remove_file(&partial);
    })?;
    fs::rename(&partial, &deb).with_context(|| format!("naming {}", deb.display()))?;
    Ok(deb)
}

/// `<target>/dist-stage/<name>`, emptied: where a package's tree, docs or checks are made.
fn scratch(name: &str) -> anyhow::Result<PathBuf> {
    let dir = target_dir().join("dist-stage").join(name);
    remove_all(&dir)?;
    Ok(dir)
}

/// Man pages (gzipped) and the shell completions, from the binary's CLI definition.
fn write_docs(package: &Package, stage: &Path) -> anyhow::Result<()> {
    let generated = scratch(&format!("{}-docs", package.name))?;
    checked(
        Command::new(target_dir().join("release").join(package.binary))
            .arg("generate-docs")
            .arg("--out")
            .arg(&generated),
        Duration::from_secs(60),
    )?;
    let man = stage.join("usr/share/man/man1");
    fs::create_dir_all(&man)?;
    let mut pages = 0;
    for entry in fs::read_dir(generated.join("man"))? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        gzip_to(&fs::read(&path)?, &man.join(format!("{name}.gz")))?;
        pages += 1;
    }
    if pages == 0 {
        bail!("{} generate-docs wrote no man page", package.binary);
    }
    let completions = generated.join("completions");
    let bin = package.binary;
    for (from, to) in [
        (
            format!("{bin}.bash"),
            format!("usr/share/bash-completion/completions/{bin}"),
        ),
        (
            format!("_{bin}"),
            format!("usr/share/zsh/vendor-completions/_{bin}"),
        ),
        (
            format!("{bin}.fish"),
            format!("usr/share/fish/vendor_completions.d/{bin}.fish"),
        ),
    ] {
        let to = stage.join(to);
        fs::create_dir_all(to.parent().unwrap_or(stage))?;
        fs::copy(completions.join(&from), &to)
            .with_context(|| format!("{bin} generate-docs wrote no {from}"))?;
        set_mode(&to, 0o644)?;
    }
    println!("    {pages} man pages, bash/zsh/fish completions");
    fs::remove_dir_all(&generated)?;
    Ok(())
}

/// The Depends dpkg-shlibdeps finds for the binary, then ours.
fn shlib_depends(package: &Package, binary: &Path) -> anyhow::Result<String> {
    // dpkg-shlibdeps wants to run in a source tree: a debian/control naming the package.
    let tree = target_dir().join("dist-stage").join("shlibdeps");
    fs::create_dir_all(tree.join("debian"))?;
    fs::write(
        tree.join("debian/control"),
        format!(
            "Source: {0}\nMaintainer: {MAINTAINER}\n\nPackage: {0}\nArchitecture: any\n",
            package.name
        ),
    )?;
    let found = capture(
        Command::new("dpkg-shlibdeps")
            .arg("-O")
            .arg(format!("-e{}", binary.display()))
            .current_dir(&tree),
    )?;
    let shlibs = found
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .with_context(|| format!("dpkg-shlibdeps printed no shlibs:Depends: {found}"))?;
    Ok(std::iter::once(shlibs)
        .chain(package.depends.iter().copied())
        .collect::<Vec<_>>()
        .join(", "))
}

fn control(package: &Package, version: &str, arch: &str, depends: &str, kb: u64) -> String {
    let mut text = format!(
        "Package: {}\nVersion: {version}\nArchitecture: {arch}\nMaintainer: {MAINTAINER}\n\
         Installed-Size: {kb}\nDepends: {depends}\n",
        package.name
    );
    if !package.recommends.is_empty() {
        text.push_str(&format!("Recommends: {}\n", package.recommends));
    }
    text.push_str(&format!(
        "Section: net\nPriority: optional\nHomepage: {HOMEPAGE}\nDescription: {}\n",
        package.summary
    ));
    // The long description: lines start with a space; a paragraph break is " .".
    for (n, paragraph) in package.description.split('\n').enumerate() {
        if n > 0 {
            text.push_str(" .\n");
        }
        for line in wrap(paragraph, 78) {
            text.push_str(&format!(" {line}\n"));
        }
    }
    text
}

/// `text` in lines of at most `width` characters, broken at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// The machine-readable copyright file: both licences of the workspace.
fn copyright() -> anyhow::Result<String> {
    let mit = fs::read_to_string(project_root().join("LICENSE-MIT"))?;
    let mit: String = mit
        .lines()
        .map(|l| {
            if l.trim().is_empty() {
                " .\n".to_owned()
            } else {
                format!(" {l}\n")
            }
        })
        .collect();
    Ok(format!(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: lbs\n\
         Source: {HOMEPAGE}\n\
         \n\
         Files: *\n\
         Copyright: the lbs developers\n\
         License: MIT or Apache-2.0\n\
         \n\
         License: MIT\n{mit}\
         \n\
         License: Apache-2.0\n \
         On Debian systems the full text of the Apache License, Version 2.0 is in\n \
         /usr/share/common-licenses/Apache-2.0.\n"
    ))
}

/// A Debian changelog entry for this build, dated by the commit it was built from (so two
/// builds of one commit are the same).
fn changelog(package: &Package, version: &str) -> anyhow::Result<Vec<u8>> {
    let git = |format: &str| {
        capture(
            Command::new("git")
                .args(["log", "-1", &format!("--format={format}")])
                .current_dir(project_root()),
        )
    };
    let (commit, date) = match (git("%h"), git("%aD")) {
        (Ok(commit), Ok(date)) if !commit.is_empty() => (format!(" at commit {commit}"), date),
        _ => (String::new(), "Thu, 01 Jan 2026 00:00:00 +0000".to_owned()),
    };
    Ok(format!(
        "{} ({version}) bookworm; urgency=medium\n\n  \
         * Built by `cargo xtask dist` from the lbs workspace{commit}.\n\n \
         -- {MAINTAINER}  {date}\n",
        package.name
    )
    .into_bytes())
}

/// `data` gzipped at the highest level, with no name or time inside (reproducible).
fn gzip_to(data: &[u8], to: &Path) -> anyhow::Result<()> {
    let mut child = Command::new("gzip")
        .args(["-9n", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting gzip")?;
    let mut stdin = child.stdin.take().context("gzip stdin")?;
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().context("gzip")?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("gzip writer panicked"))??;
    if !out.status.success() {
        bail!("gzip failed ({})", out.status);
    }
    fs::write(to, out.stdout).with_context(|| format!("writing {}", to.display()))?;
    set_mode(to, 0o644)
}

/// `DEBIAN/md5sums`: every file outside `DEBIAN/` and `/etc` (conffiles are dpkg's own).
fn md5sums(stage: &Path) -> anyhow::Result<String> {
    let files = files_under(stage)?;
    let mut cmd = Command::new("md5sum");
    cmd.current_dir(stage);
    let mut any = false;
    for file in &files {
        let rel = file.strip_prefix(stage)?;
        if rel.starts_with("DEBIAN") || rel.starts_with("etc") {
            continue;
        }
        cmd.arg(rel);
        any = true;
    }
    if !any {
        return Ok(String::new());
    }
    Ok(capture(&mut cmd)? + "\n")
}

/// Every regular file under `dir`, sorted.
fn files_under(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                files.push(entry.path());
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Installed-Size: the tree's size in KiB, as dpkg-gencontrol counts it.
fn installed_kb(stage: &Path) -> anyhow::Result<u64> {
    let mut bytes = 0;
    for file in files_under(stage)? {
        if !file.strip_prefix(stage)?.starts_with("DEBIAN") {
            bytes += fs::metadata(&file)?.len().div_ceil(1024) * 1024;
        }
    }
    Ok(bytes / 1024)
}

/// `systemd-analyze verify` on the package's units, inside the package's own tree so the
/// binary they start is the one packaged.
fn check_units(package: &Package, deb: &Path) -> anyhow::Result<()> {
    let tree = scratch(&format!("{}-verify", package.name))?;
    checked(
        Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tree),
        Duration::from_secs(60),
    )?;
    // The units they name (sysinit.target, network-online.target…) come from this
    // machine's systemd; ours are not overwritten.
    checked(
        Command::new("cp")
            .args(["-a", "--no-clobber", "/lib/systemd/system/."])
            .arg(tree.join(UNIT_DIR)),
        Duration::from_secs(60),
    )?;
    let units: Vec<PathBuf> = package
        .units
        .iter()
        .map(|u| tree.join(UNIT_DIR).join(u))
        .collect();
    // --root: ExecStart= is resolved in the tree, so it must name the packaged binary.
    let out = crate::process::run_with_timeout(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(format!("--root={}", tree.display()))
            .args(&units),
        Duration::from_secs(60),
    )?;
    let said =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    // Outside a booted systemd, verify also reports what it cannot reach on this machine
    // (its own bus, the system's other units); only lines about our units count.
    let ours: Vec<&str> = said
        .lines()
        .filter(|l| package.units.iter().any(|u| l.contains(u)))
        .collect();
    if !out.status.success() || !ours.is_empty() {
        bail!(
            "systemd-analyze verify of {}: {}",
            package.units.join(", "),
            if ours.is_empty() {
                said.trim().to_owned()
            } else {
                ours.join("\n")
            }
        );
    }
    println!("    systemd-analyze verify: {} units clean", units.len());
    fs::remove_dir_all(&tree)?;
    Ok(())
}

/// lintian on the .deb: no errors allowed; warnings and the rest are shown.
fn lintian(deb: &Path) -> anyhow::Result<()> {
    let out = crate::process::run_with_timeout(
        Command::new("lintian")
            .args(["--fail-on", "error", "--no-tag-display-limit"])
            .arg(deb),
        Duration::from_secs(600),
    )?;
    let said = String::from_utf8_lossy(&out.stdout);
    let tags: Vec<&str> = said.lines().filter(|l| !l.trim().is_empty()).collect();
    for tag in &tags {
        println!("    lintian: {tag}");
    }
    let errors = tags.iter().filter(|t| t.starts_with("E:")).count();
    if !out.status.success() || errors > 0 {
        bail!(
            "lintian found {errors} error(s) in {}: {}",
            deb.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    println!("    lintian: no errors ({} other tags)", tags.len());
    Ok(())
}

/// A command's standard output, trimmed; an error with its stderr if it fails.
pub fn capture(cmd: &mut Command) -> anyhow::Result<String> {
    let out = checked(cmd, Duration::from_secs(120))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

pub fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::{control, wrap};

    #[test]
    fn the_control_file_has_a_folded_long_description() {
        let text = control(
            &super::PACKAGES[0],
            "0.1.0-1",
            "amd64",
            "libc6 (>= 2.34)",
            12,
        );
        assert!(text.starts_with("Package: lbs\nVersion: 0.1.0-1\nArchitecture: amd64\n"));
        assert!(text.contains("\nDepends: libc6 (>= 2.34)\n"));
        let description: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("Description: "))
            .skip(1)
            .collect();
        assert!(description.len() > 3);
        assert!(
            description
                .iter()
                .all(|l| l.starts_with(' ') && l.len() <= 79)
        );
        assert!(description.contains(&" ."));
    }

    #[test]
    fn wrap_breaks_at_spaces_within_the_width() {
        assert_eq!(wrap("aa bb cc", 5), vec!["aa bb", "cc"]);
        assert_eq!(wrap("", 5), Vec::<String>::new());
        assert_eq!(wrap("abcdefgh", 5), vec!["abcdefgh"]);
    }
}
