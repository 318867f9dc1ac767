//! Man pages and shell completions of a binary, generated from its clap definition, for the
//! Debian packages (`cargo xtask dist` runs each binary's hidden `generate-docs`).

use std::io;
use std::path::{Path, PathBuf};

use clap_complete::Shell;

/// Writes into `out`: `man/<name>.1` and one page per subcommand (`<name>-<sub>.1`, down to
/// the last level), and `completions/<name>.bash`, `_<name>` (zsh) and `<name>.fish`. Hidden
/// commands get no page. The files written.
pub fn write(mut cmd: clap::Command, out: &Path) -> io::Result<Vec<PathBuf>> {
    cmd.build();
    let name = cmd.get_name().to_owned();
    let man = out.join("man");
    std::fs::create_dir_all(&man)?;
    let mut written = Vec::new();
    pages(&cmd, &name, &man, &mut written)?;
    let completions = out.join("completions");
    std::fs::create_dir_all(&completions)?;
    for (shell, file) in [
        (Shell::Bash, format!("{name}.bash")),
        (Shell::Zsh, format!("_{name}")),
        (Shell::Fish, format!("{name}.fish")),
    ] {
        let path = completions.join(file);
        let mut buffer = Vec::new();
        clap_complete::generate(shell, &mut cmd, &name, &mut buffer);
        std::fs::write(&path, buffer)?;
        written.push(path);
    }
    Ok(written)
}

fn pages(
    cmd: &clap::Command,
    title: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> io::Result<()> {
    let page = cmd.clone().name(title.to_owned());
    let path = dir.join(format!("{title}.1"));
    let mut buffer = Vec::new();
    clap_mangen::Man::new(page).render(&mut buffer)?;
    std::fs::write(&path, buffer)?;
    written.push(path);
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        pages(sub, &format!("{title}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_visible_subcommand_gets_a_page_and_every_shell_a_completion() {
        let cmd = clap::Command::new("tool")
            .version("1.0")
            .about("a tool")
            .subcommand(
                clap::Command::new("net")
                    .about("network")
                    .subcommand(clap::Command::new("probe").about("probe an address")),
            )
            .subcommand(clap::Command::new("secret").hide(true));
        let tmp = tempfile::tempdir().expect("tempdir");
        let written = write(cmd, tmp.path()).expect("written");
        let names: Vec<String> = written
            .iter()
            .map(|p| {
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(
            names,
            [
                "tool.1",
                "tool-net.1",
                "tool-net-probe.1",
                "tool.bash",
                "_tool",
                "tool.fish"
            ]
        );
        let page = std::fs::read_to_string(tmp.path().join("man/tool-net-probe.1")).expect("page");
        assert!(page.contains("probe an address"), "{page}");
        let bash = std::fs::read_to_string(tmp.path().join("completions/tool.bash")).expect("bash");
        assert!(bash.contains("probe"), "{bash}");
    }
}
