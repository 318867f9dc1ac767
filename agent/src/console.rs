//! `lbs console`: the seed's console menu, the shell of the `ip` console login. A plain text
//! menu for a bare VGA or serial console — no mouse, no colours, ASCII only, 80×25: role,
//! partner, data center and sync state, and the keys **P** (promote), **B** (back to
//! backup), **S** (status in full) and **Q** (quit). Every prompt says what it does and what
//! cancels it; a key is typed and confirmed with Enter, which works on any terminal.
//!
//! The console only talks to the agent's control socket: the agent does the checks and the
//! steps, the console shows them and asks.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines, Stdin};

use crate::control::{
    ControlReply, ControlRequest, DEFAULT_SOCKET, Offer, PromoteRequest, offer, parse_address,
    parse_gateway,
};
use crate::promote_cmd::converse;
use crate::status::{AgentStatus, SetState};
use crate::status_cmd::ask;
use crate::text::{ago, fit, wrap};

/// Options of `lbs console`.
#[derive(clap::Args, Debug)]
pub struct ConsoleCmd {
    /// The agent's control socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

/// The screen's width: lines are wrapped to fit.
const WIDTH: usize = 80;
/// Lines of the menu's state part (the rest is keys and the prompt), so the menu fits 25.
const STATE_LINES: usize = 15;

struct Console {
    socket: PathBuf,
    input: Lines<BufReader<Stdin>>,
    out: tokio::io::Stdout,
}

/// What the operator typed: a line, or the end of input (Ctrl-D, the terminal gone).
type Typed = Option<String>;

impl Console {
    async fn print(&mut self, text: &str) {
        let mut bytes = String::new();
        for line in text.split('\n') {
            for piece in wrap(&ascii(line), WIDTH - 1) {
                bytes.push_str(&piece);
                bytes.push_str("\r\n");
            }
        }
        let _ = self.out.write_all(bytes.as_bytes()).await;
        let _ = self.out.flush().await;
    }

    async fn clear(&mut self) {
        // Home and erase: understood by the Linux console and every VT100 serial terminal.
        let _ = self.out.write_all(b"\x1b[H\x1b[2J").await;
    }

    /// Asks `prompt` (no newline) and reads one line.
    async fn ask(&mut self, prompt: &str) -> Typed {
        // Everything but the prompt's last piece as lines; the answer is typed after it.
        let (before, last) = prompt.rsplit_once('\n').unwrap_or(("", prompt));
        let mut pieces = wrap(&ascii(last), WIDTH - 12);
        let last = pieces.pop().unwrap_or_default();
        let mut head = before.to_owned();
        for piece in pieces {
            head.push('\n');
            head.push_str(&piece);
        }
        if !head.is_empty() {
            self.print(head.strip_prefix('\n').unwrap_or(&head)).await;
        }
        let _ = self.out.write_all(last.as_bytes()).await;
        let _ = self.out.write_all(b" ").await;
        let _ = self.out.flush().await;
        match self.input.next_line().await {
            Ok(Some(line)) => Some(line.trim().to_owned()),
            _ => None,
        }
    }

    async fn pause(&mut self) -> Typed {
        self.ask("Press Enter for the menu.").await
    }

    /// Sends `request` to the agent and shows every line it answers as it comes; the last.
    async fn run(
        &mut self,
        request: &ControlRequest,
        timeout: Duration,
    ) -> Result<Option<ControlReply>, String> {
        let socket = self.socket.clone();
        // The lines are shown as they come: the steps of P take a second, the re-sync of B
        // may take minutes.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let talk = converse(&socket, request, timeout, move |line| {
            let _ = tx.send(line.to_owned());
        });
        tokio::pin!(talk);
        let result = loop {
            tokio::select! {
                result = &mut talk => break result,
                Some(line) = rx.recv() => {
                    self.print(&line).await;
                }
            }
        };
        while let Ok(line) = rx.try_recv() {
            self.print(&line).await;
        }
        result.map_err(|err| format!("{err:#}"))
    }

    async fn menu(&mut self) -> Typed {
        self.clear().await;
        let status = ask(&self.socket).await;
        let mut screen = match &status {
            Ok(status) => state_lines(status),
            Err(_) if crate::daemon::unactivated_note(&self.socket).exists() => vec![
                "lbs console".to_owned(),
                "-".repeat(WIDTH - 1),
                "This box is not activated yet: its agent waits for it.".to_owned(),
                "An administrator activates it as root with `lbs activate` and the SID and".into(),
                "key from the provisioning sheet; P and B work once it is part of a pair.".into(),
            ],
            Err(err) => vec![
                "lbs console".to_owned(),
                "-".repeat(WIDTH - 1),
                format!(
                    "The lbs agent is not answering on {}:",
                    self.socket.display()
                ),
                format!("  {err:#}"),
                "Start it: systemctl start lbs-agent  (its log: journalctl -u lbs-agent)".into(),
            ],
        };
        screen.truncate(STATE_LINES);
        while screen.len() < STATE_LINES {
            screen.push(String::new());
        }
        let text = screen
            .iter()
            .map(|l| fit(&ascii(l), WIDTH - 1))
            .collect::<Vec<_>>()
            .join("\r\n");
        let _ = self.out.write_all(text.as_bytes()).await;
        let _ = self.out.write_all(b"\r\n").await;
        self.print(
            "  P  Promote: make this box the PRIMARY (when the primary is dead)\n  \
             B  Back to backup: this box was primary, the other took over\n  \
             S  Status in full\n  \
             Q  Quit\n",
        )
        .await;
        self.ask("Type a key and Enter (Enter alone refreshes):")
            .await
    }

    /// **P**: the agent's checks, the address, the note, the confirmation, the steps.
    async fn promote(&mut self) -> Typed {
        self.clear().await;
        self.print("P - PROMOTE THIS BOX TO PRIMARY\nChecking: the copy, the hardware, the data center, who answers ARP ...")
            .await;
        let mut asked = PromoteRequest {
            check_only: true,
            ..PromoteRequest::default()
        };
        loop {
            let last = match self
                .run(&ControlRequest::Promote(asked), Duration::from_secs(20))
                .await
            {
                Ok(last) => last,
                Err(err) => {
                    self.print(&format!("The agent did not answer: {err}"))
                        .await;
                    return self.pause().await;
                }
            };
            let refusal = match last {
                Some(ControlReply::Ready(_)) => break,
                Some(ControlReply::Refused(refusal)) => refusal,
                other => {
                    let said = other.map_or("nothing".to_owned(), |r| r.to_string());
                    self.print(&format!("\nThe agent answered: {said}")).await;
                    return self.pause().await;
                }
            };
            match offer(&refusal, asked.force, asked.offline) {
                Offer::Offline => {
                    self.print(&format!(
                        "\nNOT PROMOTED: {refusal}\nO promotes without the data center: only if it is down and the primary surely dead."
                    ))
                    .await;
                    match self
                        .ask("O and Enter for offline, Enter alone to go back:")
                        .await?
                        .as_str()
                    {
                        "O" | "o" => asked.offline = true,
                        _ => return Some(String::new()),
                    }
                }
                Offer::Force => {
                    self.print(&format!(
                        "\nNOT PROMOTED: {refusal}\nOnly if you are sure the primary is dead or unplugged: F forces the promotion."
                    ))
                    .await;
                    match self
                        .ask("F and Enter to force, Enter alone to go back:")
                        .await?
                        .as_str()
                    {
                        "F" | "f" => asked.force = true,
                        _ => return Some(String::new()),
                    }
                }
                Offer::Nothing => {
                    self.print(&format!("\nNOT PROMOTED: {refusal}")).await;
                    return self.pause().await;
                }
            }
        }
        // The address to take: the configured one offered, editable (as in the seed).
        let status = ask(&self.socket).await.ok();
        if let Some(network) = status.as_ref().and_then(|s| s.network.clone()) {
            self.print(&format!(
                "\nThis box takes the primary's address {} with gateway {} on {}.",
                network.shared, network.gateway, network.interface
            ))
            .await;
            let address = self
                .ask(&format!(
                    "Address [{}] (Enter keeps it, C cancels):",
                    network.shared
                ))
                .await?;
            if address.eq_ignore_ascii_case("c") {
                return self.cancelled().await;
            }
            let gateway = self
                .ask(&format!(
                    "Gateway [{}] (Enter keeps it, C cancels):",
                    network.gateway
                ))
                .await?;
            if gateway.eq_ignore_ascii_case("c") {
                return self.cancelled().await;
            }
            let typed = (
                Some(address.as_str())
                    .filter(|a| !a.is_empty())
                    .map(parse_address)
                    .transpose(),
                Some(gateway.as_str())
                    .filter(|g| !g.is_empty())
                    .map(parse_gateway)
                    .transpose(),
            );
            match typed {
                (Ok(address), Ok(gateway)) => {
                    asked.address = address;
                    asked.gateway = gateway;
                }
                (Err(why), _) | (_, Err(why)) => {
                    self.print(&format!("\nNOT PROMOTED: {why}")).await;
                    return self.pause().await;
                }
            }
            if asked.address.is_some() || asked.gateway.is_some() {
                // The agent checks the new address (and who answers for it) again.
                self.print("Checking the new address ...").await;
                let last = self
                    .run(&ControlRequest::Promote(asked), Duration::from_secs(20))
                    .await
                    .unwrap_or_default();
                match last {
                    Some(ControlReply::Ready(_)) => {}
                    Some(ControlReply::Refused(refusal)) => {
                        self.print(&format!("\nNOT PROMOTED: {refusal}")).await;
                        return self.pause().await;
                    }
                    _ => {
                        self.print("\nNOT PROMOTED: the agent did not answer the check")
                            .await;
                        return self.pause().await;
                    }
                }
            }
        }
        if let Some(note) = status.as_ref().and_then(|s| s.notes.promote.clone()) {
            self.print(&format!("\nNOTE: {note}")).await;
            let done = self.ask("Type Y and Enter when done, C cancels:").await?;
            if !done.eq_ignore_ascii_case("y") {
                return self.cancelled().await;
            }
        }
        let confirm = self
            .ask("\nPromote this box to PRIMARY now? Type P and Enter to confirm, anything else cancels:")
            .await?;
        if !confirm.eq_ignore_ascii_case("p") {
            return self.cancelled().await;
        }
        if asked.offline {
            let sure = self
                .ask("Without the data center nothing fences the old primary. Type OFFLINE to promote anyway:")
                .await?;
            if sure != "OFFLINE" {
                return self.cancelled().await;
            }
        }
        if asked.force {
            let sure = self
                .ask("The primary may still be alive: two primaries confuse the phones. Type YES to promote anyway:")
                .await?;
            if sure != "YES" {
                return self.cancelled().await;
            }
        }
        self.print("").await;
        // Checked and shown above: the agent does not print the checks again.
        let promote = PromoteRequest {
            check_only: false,
            checked: true,
            ..asked
        };
        match self
            .run(&ControlRequest::Promote(promote), Duration::from_secs(120))
            .await
        {
            Ok(Some(ControlReply::Done { .. })) => {
                self.print(
                    "\nThis box is the PRIMARY: the phones reach it at the primary's address.",
                )
                .await
            }
            Ok(_) => self.print("\nNOT PROMOTED: see the reason above.").await,
            Err(err) => {
                self.print(&format!("\nThe agent stopped answering: {err}"))
                    .await
            }
        }
        self.pause().await
    }

    /// **B**: what it does, the note, the confirmation, the steps and the re-sync.
    async fn demote(&mut self) -> Typed {
        self.clear().await;
        self.print("B - MAKE THIS BOX THE BACKUP").await;
        let check = ControlRequest::Demote { check_only: true };
        let last = match self.run(&check, Duration::from_secs(20)).await {
            Ok(last) => last,
            Err(err) => {
                self.print(&format!("The agent did not answer: {err}"))
                    .await;
                return self.pause().await;
            }
        };
        match last {
            Some(ControlReply::Ready(_)) => {}
            Some(ControlReply::Refused(refusal)) => {
                self.print(&format!("\nNOT CHANGED: {refusal}")).await;
                return self.pause().await;
            }
            other => {
                let said = other.map_or("nothing".to_owned(), |r| r.to_string());
                self.print(&format!("\nNOT CHANGED: the agent answered {said}"))
                    .await;
                return self.pause().await;
            }
        }
        let note = ask(&self.socket).await.ok().and_then(|s| s.notes.demote);
        if note.is_some() {
            let done = self.ask("Type Y and Enter when done, C cancels:").await?;
            if !done.eq_ignore_ascii_case("y") {
                return self.cancelled().await;
            }
        }
        let confirm = self
            .ask("\nMake this box the BACKUP now? Type B and Enter to confirm, anything else cancels:")
            .await?;
        if !confirm.eq_ignore_ascii_case("b") {
            return self.cancelled().await;
        }
        self.print("").await;
        let demote = ControlRequest::Demote { check_only: false };
        match self.run(&demote, Duration::from_secs(600)).await {
            Ok(Some(ControlReply::Done { .. })) => {
                self.print("\nThis box is the BACKUP and in sync with the primary.")
                    .await
            }
            Ok(_) => self.print("\nNot finished: see above.").await,
            Err(err) => {
                self.print(&format!("\nThe agent stopped answering: {err}"))
                    .await
            }
        }
        self.pause().await
    }

    async fn cancelled(&mut self) -> Typed {
        self.print("Cancelled: nothing changed.").await;
        self.pause().await
    }

    /// **S**: everything `lbs status` shows, a screen at a time.
    async fn status(&mut self) -> Typed {
        self.clear().await;
        let text = match ask(&self.socket).await {
            Ok(status) => crate::status_cmd::render(&status),
            Err(err) => format!("The agent is not answering: {err:#}"),
        };
        let mut lines: Vec<String> = Vec::new();
        for line in text.lines() {
            lines.extend(wrap(&ascii(line), WIDTH - 1));
        }
        for (i, page) in lines.chunks(22).enumerate() {
            if i > 0 {
                let more = self.ask("-- more: Enter, Q back to the menu --").await?;
                if more.eq_ignore_ascii_case("q") {
                    return Some(String::new());
                }
                self.clear().await;
            }
            self.print(&page.join("\n")).await;
        }
        self.pause().await
    }
}

/// The menu's state part: who this box is, its partner, the data center and the copies.
fn state_lines(status: &AgentStatus) -> Vec<String> {
    let now = status.at_ms;
    let info = &status.info;
    let mut lines = vec![
        format!("lbs console - {} (pair {})", info.fqdn, info.pair),
        "-".repeat(WIDTH - 1),
        format!(
            "This box   {}  {}  {}, since {}{}",
            info.sid,
            status.role.state,
            status.role.generation,
            ago(now, Some(status.role.since_unix_ms)),
            if status.role.offline {
                " (OFFLINE: not confirmed by the data center yet)"
            } else {
                ""
            }
        ),
    ];
    lines.push(match &status.network {
        Some(n) => format!(
            "Address    {} on {}; P takes {} via {}",
            status.serving_at, n.interface, n.shared, n.gateway
        ),
        None => format!(
            "Address    {} (remote box: keeps it on P; phones follow {} by DNS)",
            status.serving_at, info.fqdn
        ),
    });
    if let Some(withdrawn) = &status.address_withdrawn {
        lines.push(format!("           WITHDRAWN: {}", withdrawn.reason));
    }
    // The name phones use: where the data center points it, and whether DNS has it yet.
    if let Some(record) = status
        .datacenter
        .dns
        .iter()
        .flatten()
        .find(|r| r.name.trim_end_matches('.') == info.fqdn.trim_end_matches('.'))
    {
        lines.push(format!(
            "DNS        {} -> {} ({})",
            record.name, record.want, record.state
        ));
    }
    lines.push(match &info.partner {
        None => "Partner    none provisioned yet".to_owned(),
        Some(p) => format!(
            "Partner    {} {} at {}; DC heard it {}",
            p.sid,
            p.role,
            p.lan.map_or("-".into(), |a| a.to_string()),
            p.silent_ms
                .map_or("never".into(), |ms| ago(now, Some(now.saturating_sub(ms))))
        ),
    });
    let dc = &status.datacenter;
    lines.push(match (&dc.connected_to, &dc.last_error) {
        (Some(at), _) => format!("Data ctr   {at}, answered {}", ago(now, dc.last_answer_ms)),
        (None, Some(error)) => format!("Data ctr   NOT REACHABLE: {error}"),
        (None, None) => "Data ctr   connecting ...".to_owned(),
    });
    if let Some(d) = info.hardware_differences.as_ref().filter(|d| !d.is_empty()) {
        lines.push(format!(
            "Hardware   DIFFERS from the partner's: {}",
            d.join("; ")
        ));
    }
    if let Some(auto) = &status.auto_failover {
        lines.push(format!("Automatic  failover {auto}"));
    }
    lines.push(format!("Copies     {}", status.replication));
    for set in &status.sets {
        let copy = match set.state {
            SetState::Serving => "(the copy's source)".to_owned(),
            SetState::Stopped => String::new(),
            _ => format!("last in sync {}", ago(now, set.last_in_sync_ms)),
        };
        lines.push(format!(
            "  {:<11} {:<9} {copy}{}",
            set.name,
            set.state,
            set.last_error
                .as_ref()
                .map(|e| format!(" - {e}"))
                .unwrap_or_default()
        ));
    }
    if let Some(error) = &status.role.last_error {
        lines.push(format!("Last error {error}"));
    }
    if lines.len() > STATE_LINES {
        let hidden = lines.len() - (STATE_LINES - 1);
        lines.truncate(STATE_LINES - 1);
        lines.push(format!("  ... {hidden} more line(s): S shows everything"));
    }
    lines
}

/// Plain ASCII for a bare console whatever its font and locale.
fn ascii(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '—' | '–' | '─' => '-',
            '…' => '.',
            '×' => 'x',
            c if c.is_ascii() && (!c.is_ascii_control() || c == '\t') => c,
            _ => '?',
        })
        .collect()
}

/// `lbs console`.
pub async fn console(cmd: ConsoleCmd) -> anyhow::Result<ExitCode> {
    let mut console = Console {
        socket: cmd.socket,
        input: BufReader::new(tokio::io::stdin()).lines(),
        out: tokio::io::stdout(),
    };
    loop {
        let Some(key) = console.menu().await else {
            break;
        };
        let next = match key.to_ascii_uppercase().as_str() {
            "P" => console.promote().await,
            "B" => console.demote().await,
            "S" => console.status().await,
            "Q" => break,
            "" => Some(String::new()),
            other => {
                console
                    .print(&format!(
                        "{other:?} is not a key of this menu: P, B, S or Q."
                    ))
                    .await;
                console.pause().await
            }
        };
        if next.is_none() {
            break;
        }
    }
    console.print("\nBye.").await;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_line_is_cut_between_words_and_says_so() {
        let line =
            "Partner    5A-EC-B4-27-71-CF backup at 192.168.1.3; data center heard it 11.5 s ago";
        let cut = fit(line, 79);
        assert!(cut.chars().count() <= 79, "{cut}");
        assert!(cut.ends_with(" ..."), "{cut}");
        assert!(
            !cut.contains("11.5 s ago") && !cut.contains(" 11.5 ..."),
            "{cut}"
        );
        assert_eq!(fit("short", 79), "short");
    }

    #[test]
    fn lines_fit_the_console() {
        let long = "  0.15 s  take-address: probe: nobody answers for 192.168.1.2 on eth0 after 3 probes of 50 ms each, so it is ours";
        let pieces = wrap(long, 79);
        assert!(pieces.len() > 1);
        assert!(pieces.iter().all(|p| p.chars().count() <= 79), "{pieces:?}");
        assert_eq!(
            pieces.join(" ").split_whitespace().collect::<Vec<_>>(),
            long.split_whitespace().collect::<Vec<_>>(),
            "nothing lost"
        );
        let word = "x".repeat(200);
        assert!(wrap(&word, 79).iter().all(|p| p.chars().count() <= 79));
        assert_eq!(wrap("short", 79), ["short"]);
        // The columns of a step line stay where they are on the first piece.
        let step = format!(
            "  0.17 s      ok   add address    1.597 ms  {}",
            "word ".repeat(20)
        );
        let pieces = wrap(&step, 79);
        assert!(
            pieces[0].starts_with("  0.17 s      ok   add address    1.597 ms  word"),
            "{pieces:?}"
        );
        assert!(pieces[1].starts_with("    word"), "{pieces:?}");
        assert_eq!(ascii("in sync — 3 s… ×2 ✓"), "in sync - 3 s. x2 ?");
    }
}
