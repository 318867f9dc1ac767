//! The command line.

use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};

use crate::{activate, console, daemon, net_cmd, promote_cmd, status_cmd, sync_cmd, vpn_cmd};

#[derive(Parser)]
#[command(
    name = "lbs",
    version,
    about = "lbs — Live Backup Server for office phone systems"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Activate this box with the data center: its SID and one-time key give it a
    /// certificate, its role (the pair's first box primary, the second backup) and tunnels.
    Activate(activate::ActivateCmd),
    /// The daemon: reports to the data center, replicates (serves on the primary, pulls on
    /// the backup), keeps the tunnels up; stops cleanly on SIGTERM.
    Agent(daemon::AgentCmd),
    /// What the agent knows: role, partner, data center, tunnels, sync state per set,
    /// resources. Exit 0 when all is well, 1 when degraded (not in sync, partner or data
    /// center silent, fenced), 2 when the agent does not answer.
    Status(status_cmd::StatusCmd),
    /// P: make this backup the primary — checks, confirmation, then every step timed. Exit 3
    /// if refused; 4 if refused because the primary was heard lately (P again after the wait
    /// the refusal names may succeed).
    Promote(promote_cmd::PromoteCmd),
    /// B: make this fenced box (the old primary, repaired) the backup, and follow the
    /// re-sync until in sync. Exit 3 if refused.
    Demote(promote_cmd::DemoteCmd),
    /// Make the running agent read agent.toml again (what `systemctl reload lbs-agent` runs):
    /// hooks, notes, intervals, the P threshold and automatic failover change at once; it
    /// says which other settings wait for a restart. Exit 1 if the file does not parse.
    Reload(promote_cmd::ReloadCmd),
    /// Check agent.toml as the agent would read it, and say what the agent would do with it
    /// on this box. Exit 0 when valid (warnings printed), 1 when the agent would refuse it.
    CheckConfig(crate::check_config::CheckConfigCmd),
    /// The console menu (the `ip` login's shell): role, partner, sync state, and the keys
    /// P, B, S and Q; plain text for a bare VGA or serial console (80×25).
    Console(console::ConsoleCmd),
    /// Replicate a directory tree from the primary to the backup.
    #[command(subcommand)]
    Sync(SyncCommand),
    /// Take over an office address, give it back, or probe who holds one (needs root).
    #[command(subcommand)]
    Net(NetCommand),
    /// WireGuard tunnels to the data centers with failover, and the data center's endpoint.
    #[command(subcommand)]
    Vpn(VpnCommand),
    /// Write the man pages and shell completions (for packaging).
    #[command(hide = true)]
    GenerateDocs {
        /// Where (`man/`, `completions/` are made in it).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum VpnCommand {
    /// Write a private key (kept if the file exists) and print its public key.
    Keygen(vpn_cmd::KeygenCmd),
    /// Keep one tunnel per data-center endpoint up, probed, with the overlay routed through
    /// a healthy one (needs root). Stops cleanly on SIGTERM, removing everything.
    Run(vpn_cmd::RunCmd),
    /// Serve a data-center endpoint for boxes (needs root); SIGHUP re-reads the peers.
    Endpoint(vpn_cmd::EndpointCmd),
    /// Show the tunnels' health: exit 3 if none is up or `lbs vpn run` is not running.
    Status(vpn_cmd::StatusCmd),
}

#[derive(Subcommand)]
enum NetCommand {
    /// Ask (RFC 5227 ARP probe) whether anyone holds an address: exit 0 free, 3 in use.
    Probe(net_cmd::ProbeCmd),
    /// Move this box from its own address to the shared one, step by step, timed; any
    /// failure restores the previous state. Exit 3 if another machine still answers for it.
    TakeOver(net_cmd::MoveCmd),
    /// Move this box from the shared address back to its own.
    GiveUp(net_cmd::MoveCmd),
    /// Report any other machine claiming an address of this box, and carrier changes: exit 3
    /// if another machine claimed it.
    Watch(net_cmd::WatchCmd),
    /// This box's hardware (CPU, memory, disks, NICs, telephony cards), or every difference
    /// from the partner's: exit 3 if there is one.
    Inventory(net_cmd::InventoryCmd),
    /// Check that a takeover can work: interface, static address in the boot configuration,
    /// partner in the same subnet and answering. Exit 3 if anything is a problem.
    Preflight(net_cmd::PreflightCmd),
    /// At boot, before the network is configured: if this box was the primary, check that
    /// nobody else answers for the shared address, and boot with its own address if someone
    /// does (the partner took over meanwhile). Always exits 0.
    BootCheck(crate::boot_check::BootCheckCmd),
}

#[derive(Subcommand)]
enum SyncCommand {
    /// Serve a tree to the partner (the primary's side).
    Serve(sync_cmd::ServeArgs),
    /// Make a local tree identical to the partner's (the backup's side): one reconcile.
    ///
    /// Exit status 0: in sync; 2: done, but some files were deferred or still changing on the
    /// partner (run again); 1: failed.
    Pull(sync_cmd::PullArgs),
    /// Compare two local trees by BLAKE3 and metadata; exit 1 on any difference.
    Verify {
        /// The reference tree.
        expected: PathBuf,
        /// The tree to check.
        actual: PathBuf,
    },
}

/// Parses the command line, runs the command and turns its outcome into an exit code.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Reports piped into `head` end quietly; what runs for long or changes state keeps
    // SIGPIPE ignored, so a closed socket is an error it handles and not its sudden end.
    if matches!(
        cli.command,
        Command::Status(_)
            | Command::CheckConfig(_)
            | Command::Sync(SyncCommand::Verify { .. })
            | Command::Net(
                NetCommand::Probe(_)
                    | NetCommand::Watch(_)
                    | NetCommand::Inventory(_)
                    | NetCommand::Preflight(_)
            )
            | Command::Vpn(VpnCommand::Status(_) | VpnCommand::Keygen(_))
    ) {
        sigpipe::reset();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("lbs: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Activate(cmd) => activate::activate(cmd).await,
            Command::Agent(cmd) => daemon::run(cmd).await,
            Command::Status(cmd) => status_cmd::status(cmd).await,
            Command::Promote(cmd) => promote_cmd::promote(cmd).await,
            Command::Demote(cmd) => promote_cmd::demote(cmd).await,
            Command::Console(cmd) => console::console(cmd).await,
            Command::CheckConfig(cmd) => crate::check_config::check_config(&cmd),
            Command::Reload(cmd) => promote_cmd::reload(cmd).await,
            Command::Sync(SyncCommand::Serve(args)) => sync_cmd::serve(args).await,
            Command::Sync(SyncCommand::Pull(args)) => sync_cmd::pull(args).await,
            Command::Sync(SyncCommand::Verify { expected, actual }) => {
                sync_cmd::verify(&expected, &actual)
            }
            Command::Net(NetCommand::Probe(cmd)) => net_cmd::probe(cmd).await,
            Command::Net(NetCommand::TakeOver(cmd)) => {
                net_cmd::run(cmd, net_cmd::Direction::TakeOver).await
            }
            Command::Net(NetCommand::GiveUp(cmd)) => {
                net_cmd::run(cmd, net_cmd::Direction::GiveUp).await
            }
            Command::Net(NetCommand::Watch(cmd)) => net_cmd::watch(cmd).await,
            Command::Net(NetCommand::Inventory(cmd)) => net_cmd::inventory(&cmd),
            Command::Net(NetCommand::Preflight(cmd)) => net_cmd::preflight(cmd).await,
            Command::Net(NetCommand::BootCheck(cmd)) => crate::boot_check::run(cmd).await,
            Command::Vpn(VpnCommand::Keygen(cmd)) => vpn_cmd::keygen(&cmd),
            Command::Vpn(VpnCommand::Run(cmd)) => vpn_cmd::run(cmd).await,
            Command::Vpn(VpnCommand::Endpoint(cmd)) => vpn_cmd::endpoint(cmd).await,
            Command::Vpn(VpnCommand::Status(cmd)) => vpn_cmd::status(&cmd),
            Command::GenerateDocs { out } => {
                lbs_host::cli_docs::write(Cli::command(), &out)?;
                Ok(std::process::ExitCode::SUCCESS)
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("lbs: {}", lbs_host::term::printable(&format!("{err:#}")));
            std::process::ExitCode::FAILURE
        }
    }
}
