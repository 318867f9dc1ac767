//! `lbs-datacenter user add | passwd | remove | list`: the portal's accounts, in the store (so
//! every site's portal knows them). A password is typed twice at a terminal with echo off, or
//! read as one line from standard input (`--password-stdin`, for scripts).

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};

use crate::accounts::{self, Account, AccountRole};
use crate::time::now_ms;

#[derive(clap::Subcommand)]
pub(super) enum UserAction {
    /// Add an account (the password is asked for).
    Add {
        name: String,
        /// viewer: sees everything; operator: may also promote.
        #[arg(long, value_enum, default_value_t = AccountRole::Viewer)]
        role: AccountRole,
        /// Read the password as one line from standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Set an account's password.
    Passwd {
        name: String,
        /// Read the password as one line from standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Remove an account (its sessions end at their next request).
    Remove { name: String },
    /// The accounts and their roles.
    List,
}

pub(super) fn user(dir: &Path, action: UserAction) -> anyhow::Result<ExitCode> {
    let mut store = super::open(dir)?;
    match action {
        UserAction::Add {
            name,
            role,
            password_stdin,
        } => {
            accounts::check_name(&name)?;
            if store.accounts()?.iter().any(|a| a.name == name) {
                bail!("there is an account {name} already (passwd sets its password)");
            }
            let hash = accounts::hash_password(&password(password_stdin)?)?;
            store.put_account(&Account {
                name: name.clone(),
                role,
                hash,
                changed_at: now_ms(),
            })?;
            lbs_host::say!("account {name} added ({role})");
        }
        UserAction::Passwd {
            name,
            password_stdin,
        } => {
            let Some(mut account) = store.accounts()?.into_iter().find(|a| a.name == name) else {
                bail!("there is no account {name}");
            };
            account.hash = accounts::hash_password(&password(password_stdin)?)?;
            account.changed_at = now_ms();
            store.put_account(&account)?;
            lbs_host::say!("account {name}: password set; its sessions end at their next request");
        }
        UserAction::Remove { name } => {
            if !store.remove_account(&name)? {
                bail!("there is no account {name}");
            }
            lbs_host::say!("account {name} removed");
        }
        UserAction::List => {
            for account in store.accounts()? {
                lbs_host::say!(
                    "{}  {}  since {}",
                    account.name,
                    account.role,
                    crate::time::utc(account.changed_at)
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The new password: one line of standard input, or typed twice at the terminal unseen.
fn password(from_stdin: bool) -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    if from_stdin {
        let mut line = String::new();
        stdin.lock().read_line(&mut line)?;
        return Ok(line.trim_end_matches(['\r', '\n']).to_owned());
    }
    if !stdin.is_terminal() {
        bail!(
            "no terminal to type the password at: give it on standard input with --password-stdin"
        );
    }
    let first = unseen("password: ")?;
    let again = unseen("again: ")?;
    if first != again {
        bail!("the two passwords differ; nothing was changed");
    }
    Ok(first)
}

/// A line read from the terminal with echo off (restored whatever happens).
fn unseen(prompt: &str) -> anyhow::Result<String> {
    use nix::sys::termios::{LocalFlags, SetArg, tcgetattr, tcsetattr};
    let stdin = std::io::stdin();
    let before = tcgetattr(&stdin).context("reading the terminal's settings")?;
    let mut quiet = before.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    tcsetattr(&stdin, SetArg::TCSANOW, &quiet).context("turning echo off")?;
    eprint!("{prompt}");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    let _ = tcsetattr(&stdin, SetArg::TCSANOW, &before);
    eprintln!();
    read?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}
