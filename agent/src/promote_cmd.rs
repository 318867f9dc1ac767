//! `lbs promote`: **P** from the command line. The agent checks (the copy's freshness, the
//! hardware, that the data center lost the primary, that nobody answers ARP for the shared
//! address), the operator confirms, and the agent promotes this box step by step — each step
//! printed with its time as it ends.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use crate::control::{
    ControlReply, ControlRequest, DEFAULT_SOCKET, PromoteRequest, Refusal, parse_address,
    parse_gateway,
};

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
        &ControlRequest::Demote { check_only: true },
        Duration::from_secs(20),
        |line| lbs_host::say!("{line}"),
    )
    .await?;
    if !succeeded(&last) {
        return Ok(ExitCode::from(EXIT_REFUSED));
    }
    if !cmd.yes && !confirm("Make this box the BACKUP now? [y/N]", "y")? {
        lbs_host::say!("cancelled: nothing changed");
        return Ok(ExitCode::SUCCESS);
    }
    let last = converse(
        &cmd.socket,
        &ControlRequest::Demote { check_only: false },
        Duration::from_secs(120),
        |line| lbs_host::say!("{line}"),
    )
    .await?;
    Ok(if succeeded(&last) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_REFUSED)
    })
}

/// Exit code when the promotion was refused.
pub const EXIT_REFUSED: u8 = 3;

/// Exit code when the promotion was refused because the primary was heard lately (by this
/// box or the data center): P pressed again after the wait the refusal names may succeed.
pub const EXIT_PRIMARY_ALIVE: u8 = 4;

/// The exit code of a promotion whose conversation ended with `last`.
pub(crate) fn promote_exit(last: &Option<ControlReply>) -> ExitCode {
    match last {
        _ if succeeded(last) => ExitCode::SUCCESS,
        Some(ControlReply::Refused(
            Refusal::PrimaryAlive { .. } | Refusal::BoxHeardPrimary { .. },
        )) => ExitCode::from(EXIT_PRIMARY_ALIVE),
        _ => ExitCode::from(EXIT_REFUSED),
    }
}

/// Sends `request` and hands every reply, as lines for an 80-column terminal (continuations
/// indented), to `each` until the agent closes; the last reply.
pub(crate) async fn converse(
    socket: &Path,
    request: &ControlRequest,
    timeout: Duration,
    mut each: impl FnMut(&str),
) -> anyhow::Result<Option<ControlReply>> {
    crate::control::converse(socket, request, timeout, |reply| {
        for piece in crate::text::wrap(&reply.to_string(), 79) {
            each(&piece);
        }
    })
    .await
}

/// Whether the conversation ended well (ready, or done).
pub(crate) fn succeeded(last: &Option<ControlReply>) -> bool {
    last.as_ref().is_some_and(ControlReply::is_success)
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
    let parsed = (
        cmd.address.as_deref().map(parse_address).transpose(),
        cmd.gateway.as_deref().map(parse_gateway).transpose(),
    );
    let (address, gateway) = match parsed {
        (Ok(address), Ok(gateway)) => (address, gateway),
        (Err(why), _) | (_, Err(why)) => {
            lbs_host::say!("{}", ControlReply::Refused(Refusal::BadRequest { why }));
            return Ok(ExitCode::from(EXIT_REFUSED));
        }
    };
    let mut request = PromoteRequest {
        force: cmd.force,
        offline: cmd.offline,
        address,
        gateway,
        ..PromoteRequest::default()
    };
    // With --yes nobody reads the checks before the promotion: the promotion runs them
    // itself (and prints them) — one ARP probe fewer while the phones are down.
    if !cmd.yes {
        let check = PromoteRequest {
            check_only: true,
            ..request
        };
        let last = converse(
            &cmd.socket,
            &ControlRequest::Promote(check),
            Duration::from_secs(20),
            |line| lbs_host::say!("{line}"),
        )
        .await?;
        if !succeeded(&last) {
            return Ok(promote_exit(&last));
        }
        if !confirm("Promote this box to PRIMARY? [y/N]", "y")? {
            lbs_host::say!("cancelled: nothing changed");
            return Ok(ExitCode::SUCCESS);
        }
        if cmd.offline
            && !confirm(
                "--offline: the data center cannot fence the old primary. Type OFFLINE to go on:",
                "offline",
            )?
        {
            lbs_host::say!("cancelled: nothing changed");
            return Ok(ExitCode::SUCCESS);
        }
        if cmd.force
            && !confirm(
                "--force: the primary may still be alive. Type YES to go on:",
                "yes",
            )?
        {
            lbs_host::say!("cancelled: nothing changed");
            return Ok(ExitCode::SUCCESS);
        }
        // The operator read the checks already: the agent runs them again but does not
        // repeat them.
        request.checked = true;
    }
    let last = converse(
        &cmd.socket,
        &ControlRequest::Promote(request),
        Duration::from_secs(120),
        |line| lbs_host::say!("{line}"),
    )
    .await?;
    Ok(promote_exit(&last))
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
    let last = converse(
        &cmd.socket,
        &ControlRequest::Reload,
        Duration::from_secs(10),
        |line| lbs_host::say!("{line}"),
    )
    .await?;
    Ok(if succeeded(&last) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Change;
    use crate::role::RoleState;

    #[test]
    fn a_refusal_because_the_primary_is_alive_has_an_exit_code_of_its_own() {
        let refused = |refusal| promote_exit(&Some(ControlReply::Refused(refusal)));
        let alive = Refusal::PrimaryAlive {
            silent_ms: 1_200,
            gone_after_ms: 10_000,
        };
        let heard = Refusal::BoxHeardPrimary {
            ago_ms: 300,
            gone_after_ms: 10_000,
        };
        let other = Refusal::RoleChange {
            why: "the data center is at generation 7".into(),
        };
        let code = |c: u8| ExitCode::from(c);
        assert_eq!(refused(alive), code(EXIT_PRIMARY_ALIVE));
        assert_eq!(refused(heard), code(EXIT_PRIMARY_ALIVE));
        assert_eq!(refused(other), code(EXIT_REFUSED));
        let not_backup = Refusal::NotBackup {
            state: RoleState::Primary,
        };
        assert_eq!(refused(not_backup), code(EXIT_REFUSED));
        assert_eq!(promote_exit(&None), code(EXIT_REFUSED));
        let ready = Some(ControlReply::Ready(Change::Promotion));
        assert_eq!(promote_exit(&ready), ExitCode::SUCCESS);
    }
}
