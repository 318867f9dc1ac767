//! The control socket's language, spoken by the agent and by `lbs status`, `lbs promote`,
//! `lbs demote`, `lbs reload` and `lbs console`: one [`ControlRequest`] per connection (a JSON
//! line), answered by [`ControlReply`] lines until the agent closes. What an operator may do
//! next (force, go offline) follows from the reply's type, never from its wording; the words
//! are rendered here, in one place.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::role::RoleState;
use crate::status::{AgentStatus, SetState};

/// Where the control socket lives unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/lbs/agent.sock";

/// The longest request line the agent reads (a request is a few hundred bytes).
pub const MAX_REQUEST: u64 = 16 * 1024;

/// What a client asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "request")]
pub enum ControlRequest {
    /// Everything `lbs status` shows: one [`ControlReply::Status`].
    Status,
    /// **P**: the checks, then (unless `check_only`) the promotion step by step.
    Promote(PromoteRequest),
    /// **B** on a fenced box: what it does, then (unless `check_only`) the steps and the
    /// re-sync.
    Demote {
        /// Say what B would do, change nothing.
        check_only: bool,
    },
    /// Read agent.toml again.
    Reload,
}

/// **P** as asked: its options and the address the operator chose, if not the configured one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromoteRequest {
    /// Run the checks only; change nothing.
    pub check_only: bool,
    /// Promote although the primary seems alive or its address is answered.
    pub force: bool,
    /// Promote without the data center.
    pub offline: bool,
    /// The operator saw the checks: they run again but are not repeated.
    pub checked: bool,
    /// Instead of `[network] shared`, with its prefix.
    pub address: Option<(Ipv4Addr, u8)>,
    /// Instead of `[network] gateway`.
    pub gateway: Option<Ipv4Addr>,
}

/// One line of the agent's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "reply")]
pub enum ControlReply {
    Status(Box<AgentStatus>),
    /// One finding of P's checks.
    Check(Check),
    /// What B will do, or a note for the operator.
    Say {
        /// For a person.
        text: String,
    },
    /// A step of the role change (or of the re-sync after it) as it ended.
    Step {
        /// Seconds since the request.
        at_s: f64,
        /// What it did, for a person.
        text: String,
    },
    /// The checks passed; nothing was changed.
    Ready(Change),
    /// It is done.
    Done {
        /// What is so now.
        text: String,
        /// How long it took, when it was a change.
        after_s: Option<f64>,
    },
    /// Not done; nothing was changed unless the steps above say otherwise.
    Refused(Refusal),
}

/// What a [`ControlReply::Ready`] is ready for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Change {
    /// P.
    Promotion,
    /// B.
    Demotion,
}

/// What P's checks found (each shown to the operator before they confirm).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "check")]
pub enum Check {
    /// The copy of one set.
    Copy {
        set: String,
        state: SetState,
        last_in_sync_ago_ms: Option<u64>,
        pending_files: u64,
        pending_bytes: u64,
    },
    /// This box's hardware differs from the primary's.
    HardwareDiffers { differences: Vec<String> },
    /// This box last heard the primary itself this long ago (offline).
    BoxHeardPrimary { ago_ms: u64 },
    /// This box has not heard the primary since it started (offline).
    BoxNeverHeardPrimary,
    /// P goes ahead without the data center.
    Offline,
    /// The data center last heard the primary this long ago.
    DataCenterHeardPrimary { ago_ms: u64 },
    /// The data center never heard the primary.
    DataCenterNeverHeardPrimary,
    /// Nobody answers ARP for the shared address.
    AddressFree {
        address: Ipv4Addr,
        interface: String,
    },
    /// The address this box will take.
    WillTake {
        shared: String,
        gateway: Ipv4Addr,
        interface: String,
        own: String,
    },
    /// Somebody answers ARP for the shared address, and the operator forced it.
    AddressAnsweredForced { address: Ipv4Addr, mac: String },
    /// Without `[network]`: the box keeps its own address.
    KeepsOwnAddress,
    /// The operator's `promote_note`.
    Note { text: String },
}

/// Why the agent did not do what was asked: each kind says what the operator may try next.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "refusal")]
pub enum Refusal {
    /// P on a box that is not the backup.
    NotBackup { state: RoleState },
    /// B on a box that is not fenced.
    NotFenced { state: RoleState },
    /// P --offline while the data center answers.
    DataCenterAnswers,
    /// P --offline while this box still hears the primary.
    BoxHeardPrimary { ago_ms: u64, gone_after_ms: u64 },
    /// The data center has not answered lately.
    DataCenterSilent,
    /// The data center heard the primary recently.
    PrimaryAlive { silent_ms: u64, gone_after_ms: u64 },
    /// Somebody answers ARP for the shared address.
    AddressAnswered { address: Ipv4Addr, mac: String },
    /// The shared address could not be probed.
    ProbeFailed { address: Ipv4Addr, error: String },
    /// The checks ran without probing the shared address (never sent: the agent probes).
    NotProbed,
    /// The request does not make sense here (an address off its gateway's network, …).
    BadRequest { why: String },
    /// The role machine refused, or a step failed (its own words).
    RoleChange { why: String },
    /// agent.toml does not parse: the configuration in force is kept.
    Config { why: String },
}

impl Refusal {
    /// Whether `--force` (F at the console) may override it: the primary seems alive, or its
    /// address is answered — the operator may know it is dead or unplugged.
    pub fn can_force(&self) -> bool {
        matches!(
            self,
            Refusal::BoxHeardPrimary { .. }
                | Refusal::PrimaryAlive { .. }
                | Refusal::AddressAnswered { .. }
        )
    }

    /// Whether `--offline` (O at the console) may go around it: the data center is silent.
    pub fn can_go_offline(&self) -> bool {
        matches!(self, Refusal::DataCenterSilent)
    }
}

fn secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NotBackup { state } => {
                write!(f, "only the backup can be promoted; this box is {state}")
            }
            Refusal::NotFenced { state } => match state {
                RoleState::Primary => f.write_str(
                    "this box is the PRIMARY: B is for the old primary after the other box took over (P there first)",
                ),
                RoleState::Backup => f.write_str("this box is the BACKUP already"),
                other => write!(
                    f,
                    "only a fenced box becomes the backup with B; this box is {other}"
                ),
            },
            Refusal::DataCenterAnswers => f.write_str(
                "the data center answers: promote normally (without --offline), it fences the old primary",
            ),
            Refusal::BoxHeardPrimary {
                ago_ms,
                gone_after_ms,
            } => write!(
                f,
                "this box heard the primary {:.1} s ago: it is alive (wait {} s of silence)",
                secs(*ago_ms),
                gone_after_ms / 1000
            ),
            Refusal::DataCenterSilent => f.write_str(
                "the data center has not answered lately; a promotion needs it (it fences the old primary). If it is down and the primary surely dead: --offline",
            ),
            Refusal::PrimaryAlive {
                silent_ms,
                gone_after_ms,
            } => write!(
                f,
                "the data center heard the primary {:.1} s ago: it is alive (after {} s of silence it counts as gone: wait {} s more, or use --force)",
                secs(*silent_ms),
                gone_after_ms / 1000,
                gone_after_ms.saturating_sub(*silent_ms).div_ceil(1000)
            ),
            Refusal::AddressAnswered { address, mac } => write!(
                f,
                "cannot take {address}: {mac} still answers ARP; unplug the old primary or use --force"
            ),
            Refusal::ProbeFailed { address, error } => write!(f, "probing {address}: {error}"),
            Refusal::NotProbed => f.write_str("the shared address was not probed"),
            Refusal::BadRequest { why }
            | Refusal::RoleChange { why }
            | Refusal::Config { why } => f.write_str(why),
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use crate::text::human_bytes;
        match self {
            Check::Copy {
                set,
                state,
                last_in_sync_ago_ms,
                pending_files,
                pending_bytes,
            } => {
                let last = last_in_sync_ago_ms
                    .map_or("never".to_owned(), |ago| format!("{:.1} s ago", secs(ago)));
                let left = match (*pending_files, *pending_bytes) {
                    (0, 0) => String::new(),
                    (files, 0) => format!(", {files} file(s) not copied yet"),
                    (0, bytes) => format!(", {} not copied yet", human_bytes(bytes as f64)),
                    (files, bytes) => format!(
                        ", {files} file(s) and {} not copied yet",
                        human_bytes(bytes as f64)
                    ),
                };
                write!(f, "copy of {set:<11} {state} — last in sync {last}{left}")
            }
            Check::HardwareDiffers { differences } => write!(
                f,
                "WARNING: this box's hardware differs from the primary's: {}",
                differences.join("; ")
            ),
            Check::BoxHeardPrimary { ago_ms } => write!(
                f,
                "this box last heard the primary {:.1} s ago",
                secs(*ago_ms)
            ),
            Check::BoxNeverHeardPrimary => {
                f.write_str("this box has not heard the primary since it started")
            }
            Check::Offline => f.write_str(
                "OFFLINE: the data center is unreachable; it is told when it answers again (if the pair moved on meanwhile, this box steps back)",
            ),
            Check::DataCenterHeardPrimary { ago_ms } => write!(
                f,
                "the data center last heard the primary {:.1} s ago",
                secs(*ago_ms)
            ),
            Check::DataCenterNeverHeardPrimary => {
                f.write_str("the data center never heard the primary")
            }
            Check::AddressFree { address, interface } => {
                write!(f, "nobody answers ARP for {address} on {interface}")
            }
            Check::WillTake {
                shared,
                gateway,
                interface,
                own,
            } => write!(
                f,
                "this box will take {shared} via {gateway} on {interface} (it has {own} now)"
            ),
            Check::AddressAnsweredForced { address, mac } => {
                write!(f, "WARNING: {mac} still answers ARP for {address} (--force)")
            }
            Check::KeepsOwnAddress => f.write_str(
                "no [network] section: this box keeps its own address; phones follow the DNS update",
            ),
            Check::Note { text } => write!(f, "NOTE: {text}"),
        }
    }
}

impl fmt::Display for ControlReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ControlReply::Status(status) => {
                write!(f, "status of {} ({})", status.info.fqdn, status.role.state)
            }
            ControlReply::Check(check) => check.fmt(f),
            ControlReply::Say { text } => f.write_str(text),
            ControlReply::Step { at_s, text } => write!(f, "{at_s:>6.2} s  {text}"),
            ControlReply::Ready(Change::Promotion) => f.write_str("ready: promotion possible"),
            ControlReply::Ready(Change::Demotion) => f.write_str("ready: demotion possible"),
            ControlReply::Done {
                text,
                after_s: Some(after),
            } => write!(f, "done: {text} after {after:.2} s"),
            ControlReply::Done {
                text,
                after_s: None,
            } => write!(f, "done: {text}"),
            ControlReply::Refused(refusal) => write!(f, "refused: {refusal}"),
        }
    }
}

impl ControlReply {
    /// Whether this ends a request well (ready, or done).
    pub fn is_success(&self) -> bool {
        matches!(self, ControlReply::Ready(_) | ControlReply::Done { .. })
    }
}

/// What the console offers after a refused P: decided by the refusal's kind alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// O: promote without the data center.
    Offline,
    /// F: force it.
    Force,
    /// Nothing: go back.
    Nothing,
}

/// The offer after `refusal`, given what the operator has chosen already.
pub fn offer(refusal: &Refusal, forced: bool, offline: bool) -> Offer {
    if !offline && refusal.can_go_offline() {
        Offer::Offline
    } else if !forced && refusal.can_force() {
        Offer::Force
    } else {
        Offer::Nothing
    }
}

/// `--address` as the operator typed it: an address with its prefix (`192.168.1.2/24`).
pub fn parse_address(text: &str) -> Result<(Ipv4Addr, u8), String> {
    let like = || format!("{text:?} is not an address with its prefix, like 192.168.1.2/24");
    let (address, prefix) = text.split_once('/').ok_or_else(like)?;
    let address = address.parse::<Ipv4Addr>().map_err(|_| like())?;
    let prefix = prefix
        .parse::<u8>()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(like)?;
    Ok((address, prefix))
}

/// `--gateway` as the operator typed it.
pub fn parse_gateway(text: &str) -> Result<Ipv4Addr, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not an address, like 192.168.1.1"))
}

/// Sends `request` and hands every reply to `each` until the agent closes; the last reply.
/// `timeout` bounds the wait for each reply (a role change answers step by step).
pub async fn converse(
    socket: &Path,
    request: &ControlRequest,
    timeout: Duration,
    mut each: impl FnMut(&ControlReply),
) -> anyhow::Result<Option<ControlReply>> {
    let mut stream = tokio::time::timeout(timeout, UnixStream::connect(socket))
        .await
        .with_context(|| format!("the agent did not accept on {}", socket.display()))?
        .with_context(|| format!("the agent is not answering on {}", socket.display()))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes()).await?;
    let mut lines = BufReader::new(stream).lines();
    let mut last = None;
    loop {
        let next = tokio::time::timeout(timeout, lines.next_line())
            .await
            .with_context(|| format!("the agent said nothing for {timeout:?}"))??;
        let Some(line) = next else { return Ok(last) };
        let reply: ControlReply = serde_json::from_str(&line)
            .with_context(|| format!("the agent answered {line:?}, not a control reply"))?;
        each(&reply);
        last = Some(reply);
    }
}

/// Asks for the status.
pub async fn ask_status(socket: &Path, timeout: Duration) -> anyhow::Result<AgentStatus> {
    match converse(socket, &ControlRequest::Status, timeout, |_| {}).await? {
        Some(ControlReply::Status(status)) => Ok(*status),
        Some(other) => anyhow::bail!("the agent answered a status request with {other}"),
        None => anyhow::bail!("the agent closed without answering"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn every_refusal(words: &str) -> Vec<Refusal> {
        let address = Ipv4Addr::new(192, 168, 1, 2);
        vec![
            Refusal::NotBackup {
                state: RoleState::Primary,
            },
            Refusal::NotFenced {
                state: RoleState::Backup,
            },
            Refusal::DataCenterAnswers,
            Refusal::BoxHeardPrimary {
                ago_ms: 1200,
                gone_after_ms: 10_000,
            },
            Refusal::DataCenterSilent,
            Refusal::PrimaryAlive {
                silent_ms: 1200,
                gone_after_ms: 10_000,
            },
            Refusal::AddressAnswered {
                address,
                mac: words.to_owned(),
            },
            Refusal::ProbeFailed {
                address,
                error: words.to_owned(),
            },
            Refusal::NotProbed,
            Refusal::BadRequest {
                why: words.to_owned(),
            },
            Refusal::RoleChange {
                why: words.to_owned(),
            },
            Refusal::Config {
                why: words.to_owned(),
            },
        ]
    }

    #[test]
    fn the_console_offers_by_the_kind_of_refusal_never_by_its_words() {
        // Words that once decided the offers ("--offline", "alive", "answers ARP"), and none.
        let tricky = "the primary is alive and still answers ARP; try --offline";
        for (plain, worded) in every_refusal("").iter().zip(every_refusal(tricky)) {
            for (forced, offline) in [(false, false), (true, false), (false, true)] {
                assert_eq!(
                    offer(plain, forced, offline),
                    offer(&worded, forced, offline),
                    "{plain:?}"
                );
            }
        }
        let offers: Vec<Offer> = every_refusal(tricky)
            .iter()
            .map(|r| offer(r, false, false))
            .collect();
        use Offer::{Force, Nothing, Offline};
        assert_eq!(
            offers,
            [
                Nothing, Nothing, Nothing, Force, Offline, Force, Force, Nothing, Nothing, Nothing,
                Nothing, Nothing
            ]
        );
        // Once forced (or offline), the same refusal offers nothing more.
        assert_eq!(
            offer(&Refusal::DataCenterSilent, false, true),
            Offer::Nothing
        );
        let alive = Refusal::PrimaryAlive {
            silent_ms: 0,
            gone_after_ms: 10_000,
        };
        assert_eq!(offer(&alive, true, false), Offer::Nothing);
    }

    #[test]
    fn replies_travel_as_json_lines_and_render_as_before() {
        let replies = [
            (
                ControlReply::Refused(Refusal::PrimaryAlive {
                    silent_ms: 1234,
                    gone_after_ms: 10_000,
                }),
                "refused: the data center heard the primary 1.2 s ago: it is alive (after 10 s of silence it counts as gone: wait 9 s more, or use --force)",
            ),
            (
                ControlReply::Refused(Refusal::AddressAnswered {
                    address: Ipv4Addr::new(192, 168, 70, 2),
                    mac: "02:00:00:00:00:01".into(),
                }),
                "refused: cannot take 192.168.70.2: 02:00:00:00:00:01 still answers ARP; unplug the old primary or use --force",
            ),
            (
                ControlReply::Done {
                    text: "this box is the PRIMARY (gen 2)".into(),
                    after_s: Some(0.4321),
                },
                "done: this box is the PRIMARY (gen 2) after 0.43 s",
            ),
            (
                ControlReply::Ready(Change::Promotion),
                "ready: promotion possible",
            ),
            (
                ControlReply::Step {
                    at_s: 0.25,
                    text: "PBX start".into(),
                },
                "  0.25 s  PBX start",
            ),
            (
                ControlReply::Check(Check::Copy {
                    set: "voicemail".into(),
                    state: SetState::InSync,
                    last_in_sync_ago_ms: Some(300),
                    pending_files: 2,
                    pending_bytes: 0,
                }),
                "copy of voicemail   in sync — last in sync 0.3 s ago, 2 file(s) not copied yet",
            ),
        ];
        for (reply, text) in replies {
            assert_eq!(reply.to_string(), text);
            let line = serde_json::to_string(&reply).unwrap();
            assert!(!line.contains('\n'));
            let back = serde_json::from_str::<ControlReply>(&line).unwrap();
            assert_eq!(serde_json::to_string(&back).unwrap(), line);
        }
        let request = ControlRequest::Promote(PromoteRequest {
            force: true,
            address: Some((Ipv4Addr::new(192, 168, 1, 20), 24)),
            ..PromoteRequest::default()
        });
        let line = serde_json::to_string(&request).unwrap();
        assert_eq!(
            serde_json::from_str::<ControlRequest>(&line).unwrap(),
            request
        );
    }
}
