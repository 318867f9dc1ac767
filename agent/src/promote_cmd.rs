//! `lbs promote`: **P** from the command line. The agent checks (the copy's freshness, the
//! hardware, that the data center lost the primary, that nobody answers ARP for the shared
//! address), the operator confirms, and the agent promotes this box step by step — each step
//! printed with its time as it ends.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::control::DEFAULT_SOCKET;

/// Options of `lbs promote`.
#[derive(clap::Args, Debug)]
pub struct PromoteCmd {
    /// The agent's control socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Promote even though the primary seems alive (asks a second time).
    #[arg(long)]
    pub force: bool,
    /// The data center is unreachable and the primary surely dead: promote without it
    /// (this box must have lost the primary itself; asks a second time). The data center is
    /// told when it answers again; if the pair moved on meanwhile, this box steps back.
    #[arg(long)]
    pub offline: bool,
    /// Take this address instead of `[network] shared` (like 192.168.1.2/24).
    #[arg(long, value_name = "ADDRESS/PREFIX")]
    pub address: Option<String>,
    /// With this gateway instead of `[network] gateway`.
    #[arg(long, value_name = "ADDRESS")]
    pub gateway: Option<String>,
    /// Do not ask for confirmation (scripts, tests).
    #[arg(long)]
    pub yes: bool,
}

/// Options of `lbs demote`.
#[derive(clap::Args, Debug)]
pub struct DemoteCmd {
    /// The agent's control socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Do not ask for confirmation (scripts, tests).
    #[arg(long)]
    pub yes: bool,
}

/// `lbs demote`: **B** on a fenced box.
pub async fn demote(cmd: DemoteCmd) -> anyhow::Result<ExitCode> {
    let last = converse(
        &cmd.socket,
        "demote-check",
        Duration::from_secs(20),
        |line| println!("{line}"),
    )
    .await?;
    if !last.as_deref().is_some_and(|l| l.starts_with("ready:")) {
        return Ok(ExitCode::from(EXIT_REFUSED));
    }
    if !cmd.yes && !confirm("Make this box the BACKUP now? [y/N]", "y")? {
        println!("cancelled: nothing changed");
        return Ok(ExitCode::SUCCESS);
    }
    let last = converse(&cmd.socket, "demote", Duration::from_secs(120), |line| {
        println!("{line}")
    })
    .await?;
    Ok(if last.as_deref().is_some_and(|l| l.starts_with("done:")) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_REFUSED)
    })
}

/// Exit code when the promotion was refused.
pub const EXIT_REFUSED: u8 = 3;

/// Sends `request` and hands every answered line to `each` until the agent closes.
pub(crate) async fn converse(
    socket: &PathBuf,
    request: &str,
    timeout: Duration,
    mut each: impl FnMut(&str),
) -> anyhow::Result<Option<String>> {
    let mut stream = UnixStream::connect(socket)
        .await
        .with_context(|| format!("the agent is not answering on {}", socket.display()))?;
    stream.write_all(format!("{request}\n").as_bytes()).await?;
    let mut lines = BufReader::new(stream).lines();
    let mut last = None;
    loop {
        match tokio::time::timeout(timeout, lines.next_line()).await {
            Err(_) => anyhow::bail!("the agent said nothing for {timeout:?}"),
            Ok(line) => match line? {
                Some(line) => {
                    // Steps and checks wrapped for an 80-column terminal (continuations
                    // indented); the last line is kept whole for the caller to read.
                    for piece in crate::text::wrap(&line, 79) {
                        each(&piece);
                    }
                    last = Some(line);
                }
                None => return Ok(last),
            },
        }
    }
}

fn confirm(question: &str, expected: &str) -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("confirmation needed and no terminal to ask on: add --yes");
    }
    print!("{question} ");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(answer.trim().eq_ignore_ascii_case(expected))
}

/// `lbs promote`.
pub async fn promote(cmd: PromoteCmd) -> anyhow::Result<ExitCode> {
    let mut words = String::new();
    for (on, word) in [(cmd.force, "force"), (cmd.offline, "offline")] {
        if on {
            words += &format!(" {word}");
        }
    }
    for (value, key) in [(&cmd.address, "address"), (&cmd.gateway, "gateway")] {
        if let Some(value) = value {
            if value.contains(char::is_whitespace) {
                anyhow::bail!("--{key} {value:?}: no spaces, like 192.168.1.2/24");
            }
            words += &format!(" {key}={value}");
        }
    }
    // With --yes nobody reads the checks before the promotion: the promotion runs them
    // itself (and prints them) — one ARP probe fewer while the phones are down.
    if !cmd.yes {
        let last = converse(
            &cmd.socket,
            &format!("promote-check{words}"),
            Duration::from_secs(20),
            |line| println!("{line}"),
        )
        .await?;
        if !last.as_deref().is_some_and(|l| l.starts_with("ready:")) {
            return Ok(ExitCode::from(EXIT_REFUSED));
        }
        if !confirm("Promote this box to PRIMARY? [y/N]", "y")? {
            println!("cancelled: nothing changed");
            return Ok(ExitCode::SUCCESS);
        }
        if cmd.offline
            && !confirm(
                "--offline: the data center cannot fence the old primary. Type OFFLINE to go on:",
                "offline",
            )?
        {
            println!("cancelled: nothing changed");
            return Ok(ExitCode::SUCCESS);
        }
        if cmd.force
            && !confirm(
                "--force: the primary may still be alive. Type YES to go on:",
                "yes",
            )?
        {
            println!("cancelled: nothing changed");
            return Ok(ExitCode::SUCCESS);
        }
    }
    // The operator read the checks already: the agent runs them again but does not repeat
    // them.
    if !cmd.yes {
        words += " checked";
    }
    let last = converse(
        &cmd.socket,
        &format!("promote{words}"),
        Duration::from_secs(120),
        |line| println!("{line}"),
    )
    .await?;
    Ok(if last.as_deref().is_some_and(|l| l.starts_with("done:")) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_REFUSED)
    })
}

/// Options of `lbs reload`.
#[derive(clap::Args, Debug)]
pub struct ReloadCmd {
    /// The agent's control socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

/// `lbs reload` (what `systemctl reload lbs-agent` runs): the agent reads agent.toml again
/// and says what is in force and what waits for a restart. Exit 0 done, 1 refused (the file
/// does not parse: nothing changed).
pub async fn reload(cmd: ReloadCmd) -> anyhow::Result<ExitCode> {
    let last = converse(&cmd.socket, "reload", Duration::from_secs(10), |line| {
        println!("{line}")
    })
    .await?;
    Ok(if last.as_deref().is_some_and(|l| l.starts_with("done:")) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
