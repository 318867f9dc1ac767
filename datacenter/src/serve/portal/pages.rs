//! The portal's pages as HTML text: no scripts, one small inline style, every value escaped.
//! Pure functions of what the store said, so they are tested without a server.

use std::fmt::Write;

use super::{EventsQuery, FleetQuery, Who};
use crate::accounts::AccountRole;
use crate::fleet::{self, Problem, SILENT_AFTER};
use crate::store::{Event, Millis, PairView, PromotionRequest, ServerView};
use crate::time::utc;
use crate::view::RequestState;
use lbs_protocol::control::{ReportDetails, SetPhase};

/// Escapes text for HTML content and attribute values.
pub(super) fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a path segment or query value.
pub(super) fn url_part(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

const STYLE: &str = "body{font:15px/1.4 system-ui,sans-serif;margin:0;color:#222}\
header{background:#1d3557;color:#fff;padding:.6em 1em;display:flex;gap:1.5em;align-items:center}\
header a{color:#fff}header form{margin-left:auto}main{padding:1em}\
table{border-collapse:collapse;margin:.5em 0}td,th{border-bottom:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}\
.bad{color:#b00020;font-weight:600}.ok{color:#2a7a2a}.counts span{margin-right:1.5em}\
.problem{background:#fff3f3}.boxes{display:flex;gap:2em;flex-wrap:wrap}.box{border:1px solid #ccc;padding:.6em 1em;min-width:20em}";

/// A whole page: the bar (who is logged in, where) and `body`.
pub(super) fn page(title: &str, who: Option<&Who>, body: &str) -> String {
    let bar = match who {
        Some(who) => format!(
            "<header><b>lbs portal</b><a href=\"/\">Fleet</a><a href=\"/events\">Events</a>\
             <form method=\"post\" action=\"/logout\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             {} ({}) <button>Log out</button></form></header>",
            esc(&who.csrf),
            esc(&who.name),
            who.role
        ),
        None => "<header><b>lbs portal</b></header>".to_owned(),
    };
    format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\"><title>{} — lbs</title>\
         <style>{STYLE}</style></head><body>{bar}<main>{body}</main></body></html>",
        esc(title)
    )
}

pub(super) fn login(error: Option<&str>) -> String {
    let error = error
        .map(|e| format!("<p class=\"bad\">{}</p>", esc(e)))
        .unwrap_or_default();
    page(
        "Log in",
        None,
        &format!(
            "<h1>Log in</h1>{error}<form method=\"post\" action=\"/login\">\
             <p><label>Account <input name=\"name\" autocomplete=\"username\" required></label></p>\
             <p><label>Password <input name=\"password\" type=\"password\" autocomplete=\"current-password\" required></label></p>\
             <p><button>Log in</button></p></form>"
        ),
    )
}

pub(super) fn refused(why: &str) -> String {
    page(
        "Not done",
        None,
        &format!(
            "<h1>Not done</h1><p class=\"bad\">{}</p><p><a href=\"/\">Back to the fleet</a></p>",
            esc(why)
        ),
    )
}

/// "12 s ago", "never".
fn ago(at: Option<Millis>, now: Millis) -> String {
    match at {
        None => "never".to_owned(),
        Some(at) => {
            let s = now.saturating_sub(at).max(0) / 1000;
            match s {
                0..=119 => format!("{s} s ago"),
                120..=7199 => format!("{} min ago", s / 60),
                _ => format!("{} h ago", s / 3600),
            }
        }
    }
}

fn sync_words(server: &ServerView) -> String {
    match &server.report {
        Some(r) if server.role == "backup" => match &r.details {
            Some(details) => lag_words(details),
            None if r.in_sync() => "in sync".to_owned(),
            None => match (r.sync_pending_files, r.sync_pending_bytes) {
                (Some(files), Some(bytes)) => format!("{files} file(s), {bytes} bytes to copy"),
                _ => "not said".to_owned(),
            },
        },
        _ => "—".to_owned(),
    }
}

/// A backup's copy in a few words from its sets: "in sync", or the set furthest behind.
fn lag_words(details: &ReportDetails) -> String {
    let worst = details
        .sets
        .iter()
        .filter(|s| s.phase != SetPhase::InSync)
        .max_by_key(|s| s.lag_ms.unwrap_or(u64::MAX));
    match worst {
        None if details.sets.is_empty() => "no sets".to_owned(),
        None => "in sync".to_owned(),
        Some(set) => match set.lag_ms {
            Some(ms) => format!("{} {}, {} behind", set.name, set.phase, seconds(ms)),
            None => format!("{} {}", set.name, set.phase),
        },
    }
}

/// "0.4 s", "12 s", "3 min".
fn seconds(ms: u64) -> String {
    match ms {
        0..=9_999 => format!("{:.1} s", ms as f64 / 1000.0),
        10_000..=119_999 => format!("{} s", ms / 1000),
        _ => format!("{} min", ms / 60_000),
    }
}

/// A box's sets, PBX check and latest role steps, as its last report said (boxes of
/// protocol 1.9 and later).
fn box_details(server: &ServerView) -> String {
    let Some(details) = server.report.as_ref().and_then(|r| r.details.as_ref()) else {
        return String::new();
    };
    let mut out = String::from(
        "<h3>Sets</h3><table><tr><th>set</th><th>state</th><th>behind</th><th>to copy</th></tr>",
    );
    for set in &details.sets {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}{}</td><td>{}</td><td>{} file(s), {} bytes</td></tr>",
            esc(&set.name),
            set.phase,
            set.error
                .as_deref()
                .map(|e| format!(": {}", esc(e)))
                .unwrap_or_default(),
            set.lag_ms.map(seconds).unwrap_or_else(|| "—".to_owned()),
            set.pending_files,
            set.pending_bytes
        );
    }
    out.push_str("</table>");
    if let Some(pbx) = &details.pbx {
        let state = if pbx.down {
            "DOWN (unhealthy after every restart)".to_owned()
        } else if pbx.ok {
            "healthy".to_owned()
        } else {
            format!(
                "failing ({} in a row, {} restart(s))",
                pbx.failures, pbx.restarts
            )
        };
        let _ = write!(
            out,
            "<h3>PBX check</h3><p class=\"{}\">{} — checked {}{}</p>",
            if pbx.ok { "ok" } else { "bad" },
            state,
            esc(&utc(i64::try_from(pbx.checked_ms).unwrap_or(0))),
            pbx.last_failure
                .as_deref()
                .map(|e| format!("; last failure: {}", esc(e)))
                .unwrap_or_default()
        );
    }
    if !details.steps.is_empty() {
        out.push_str(
            "<h3>Last role steps</h3><table><tr><th>ended (UTC)</th><th>step</th><th>took</th><th>outcome</th></tr>",
        );
        for step in details.steps.iter().rev() {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{} ms</td><td>{}</td></tr>",
                esc(&utc(i64::try_from(step.at_ms).unwrap_or(0))),
                esc(&step.step),
                step.took_ms,
                match &step.error {
                    None => "done".to_owned(),
                    Some(why) => format!("<span class=\"bad\">failed: {}</span>", esc(why)),
                }
            );
        }
        out.push_str("</table>");
    }
    out
}

fn matches(pair: &PairView, q: &str) -> bool {
    let q = q.trim().to_lowercase();
    q.is_empty()
        || pair.name.to_lowercase().contains(&q)
        || pair.fqdn.to_lowercase().contains(&q)
        || pair
            .servers
            .iter()
            .any(|s| s.sid.to_lowercase().contains(&q))
}

/// Problems first (each with what needs a person), then every pair; counts at the top.
pub(super) fn fleet(
    who: &Who,
    pairs: &[PairView],
    query: &FleetQuery,
    now: Millis,
    site: &str,
) -> String {
    let summary = fleet::summary(pairs, now, SILENT_AFTER);
    let mut body = format!(
        "<h1>Fleet</h1><p class=\"counts\"><span>{} pairs</span><span>{} of {} boxes heard</span>\
         <span class=\"{}\">{} silent</span><span class=\"{}\">{} fenced</span>\
         <span class=\"{}\">DNS {} retrying, {} failed</span><span class=\"{}\">{} need a person</span>\
         <span>served by site {}</span></p>",
        summary.pairs,
        summary.heard,
        summary.boxes,
        if summary.silent > 0 { "bad" } else { "ok" },
        summary.silent,
        if summary.fenced > 0 { "bad" } else { "ok" },
        summary.fenced,
        if summary.dns_retrying + summary.dns_failed > 0 {
            "bad"
        } else {
            "ok"
        },
        summary.dns_retrying,
        summary.dns_failed,
        if summary.pairs_with_problems > 0 {
            "bad"
        } else {
            "ok"
        },
        summary.pairs_with_problems,
        esc(site),
    );
    let _ = write!(
        body,
        "<form method=\"get\" action=\"/\"><input name=\"q\" value=\"{}\" placeholder=\"pair, name or SID\">\
         <label><input type=\"checkbox\" name=\"problems\" value=\"1\"{}> only problems</label> <button>Show</button></form>",
        esc(&query.q),
        if query.problems.is_some() {
            " checked"
        } else {
            ""
        }
    );
    let shown: Vec<(&PairView, Vec<Problem>)> = pairs
        .iter()
        .filter(|p| matches(p, &query.q))
        .map(|p| (p, fleet::problems(p, now, SILENT_AFTER)))
        .filter(|(_, problems)| query.problems.is_none() || !problems.is_empty())
        .collect();
    let troubled: Vec<&(&PairView, Vec<Problem>)> =
        shown.iter().filter(|(_, p)| !p.is_empty()).collect();
    if !troubled.is_empty() {
        body.push_str("<h2>Needs a person</h2><table><tr><th>pair</th><th>what</th></tr>");
        // Fenced primaries first: an office may be without its PBX.
        let mut ordered = troubled.clone();
        ordered.sort_by_key(|(_, problems)| {
            !problems
                .iter()
                .any(|p| matches!(p, Problem::Fenced { .. } | Problem::NoPrimary))
        });
        for (pair, problems) in ordered {
            let _ = write!(
                body,
                "<tr class=\"problem\"><td><a href=\"/pair/{}\">{}</a></td><td>{}</td></tr>",
                url_part(&pair.name),
                esc(&pair.name),
                problems
                    .iter()
                    .map(|p| esc(&p.to_string()))
                    .collect::<Vec<_>>()
                    .join("<br>")
            );
        }
        body.push_str("</table>");
    }
    let pages = shown.len().div_ceil(PAIRS_PER_PAGE).max(1);
    let at = query.page.unwrap_or(1).clamp(1, pages);
    let _ = write!(
        body,
        "<h2>Pairs</h2><p>{} shown{}</p>",
        shown.len(),
        if pages > 1 {
            format!(
                ", page {at} of {pages} ({PAIRS_PER_PAGE} a page){}{}",
                page_link(query, at - 1, at > 1, "previous"),
                page_link(query, at + 1, at < pages, "next")
            )
        } else {
            String::new()
        }
    );
    body.push_str(
        "<table><tr><th>pair</th><th>name</th><th>generation</th><th>boxes</th><th>last heard</th><th>backup's copy</th></tr>",
    );
    for (pair, _) in shown
        .iter()
        .skip((at - 1) * PAIRS_PER_PAGE)
        .take(PAIRS_PER_PAGE)
    {
        let boxes = pair
            .servers
            .iter()
            .map(|s| format!("{} {}", esc(&s.sid), esc(&s.role)))
            .collect::<Vec<_>>()
            .join("<br>");
        let heard = pair
            .servers
            .iter()
            .map(|s| ago(s.last_heartbeat_at, now))
            .collect::<Vec<_>>()
            .join("<br>");
        let sync = pair
            .servers
            .iter()
            .filter(|s| s.role == "backup")
            .map(sync_words)
            .collect::<Vec<_>>()
            .join("<br>");
        let _ = write!(
            body,
            "<tr><td><a href=\"/pair/{}\">{}</a></td><td>{}</td><td>{}</td><td>{boxes}</td><td>{heard}</td><td>{}</td></tr>",
            url_part(&pair.name),
            esc(&pair.name),
            esc(&pair.fqdn),
            pair.generation,
            if sync.is_empty() {
                "—".to_owned()
            } else {
                sync
            }
        );
    }
    body.push_str("</table>");
    if shown.is_empty() {
        body.push_str("<p>No pair matches.</p>");
    }
    page("Fleet", Some(who), &body)
}

/// Pairs listed on one page of the fleet (problems are all listed above them).
const PAIRS_PER_PAGE: usize = 100;

/// A link to page `to` of the fleet with the same search, or nothing.
fn page_link(query: &FleetQuery, to: usize, show: bool, words: &str) -> String {
    if !show {
        return String::new();
    }
    format!(
        " <a href=\"/?q={}{}&amp;page={to}\">{words}</a>",
        url_part(&query.q),
        if query.problems.is_some() {
            "&amp;problems=1"
        } else {
            ""
        }
    )
}

fn request_words(request: &PromotionRequest) -> (String, bool) {
    let answer = request.answer.as_deref().unwrap_or("");
    match request.state {
        RequestState::Pending => (
            format!(
                "request {}: waiting for the backup to act on it at its next report (asked by {})",
                request.id, request.requested_by
            ),
            true,
        ),
        RequestState::Promoted => (
            format!("request {}: done — the backup was {answer}", request.id),
            false,
        ),
        RequestState::Refused => (
            format!("request {}: the backup refused — {answer}", request.id),
            false,
        ),
        RequestState::Expired => (
            format!(
                "request {}: the backup did not act on it in time (silent, or its checks take longer)",
                request.id
            ),
            false,
        ),
    }
}

/// Both boxes side by side, the request under way, DNS, promote (operators), the audit log.
pub(super) fn pair(
    who: &Who,
    pair: &PairView,
    events: &[Event],
    request: Option<&PromotionRequest>,
    now: Millis,
) -> String {
    let mut body = format!(
        "<h1>{}</h1><p>{} · generation {}</p>",
        esc(&pair.name),
        esc(&pair.fqdn),
        pair.generation
    );
    let mut refresh = false;
    if let Some(request) = request {
        let (words, pending) = request_words(request);
        refresh = pending;
        let _ = write!(
            body,
            "<p class=\"{}\">{}</p>",
            if request.state == RequestState::Refused || request.state == RequestState::Expired {
                "bad"
            } else {
                "ok"
            },
            esc(&words)
        );
    }
    let problems = fleet::problems(pair, now, SILENT_AFTER);
    if !problems.is_empty() {
        body.push_str("<ul class=\"bad\">");
        for problem in &problems {
            let _ = write!(body, "<li>{}</li>", esc(&problem.to_string()));
        }
        body.push_str("</ul>");
    }
    body.push_str("<div class=\"boxes\">");
    for server in &pair.servers {
        let tunnels = server
            .report
            .as_ref()
            .map(|r| {
                r.tunnels
                    .iter()
                    .map(|(name, healthy, active)| {
                        format!(
                            "{} {}{}",
                            esc(name),
                            if *healthy { "up" } else { "down" },
                            if *active { " (carrying)" } else { "" }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let _ = write!(
            body,
            "<div class=\"box\"><h2><a href=\"/box/{}\">{}</a></h2><table>\
             <tr><th>role</th><td>{}</td></tr><tr><th>LAN</th><td>{}</td></tr>\
             <tr><th>serves phones at</th><td>{}</td></tr><tr><th>overlay</th><td>{}</td></tr>\
             <tr><th>last heard</th><td>{}</td></tr><tr><th>software</th><td>{}</td></tr>\
             <tr><th>copy</th><td>{}</td></tr><tr><th>tunnels</th><td>{}</td></tr></table>\
             {}<a href=\"/box/{}\">Status / Resources</a></div>",
            url_part(&server.sid),
            esc(&server.sid),
            esc(&server.role),
            esc(server.lan.as_deref().unwrap_or("—")),
            esc(server.advertised.as_deref().unwrap_or("—")),
            esc(server.overlay.as_deref().unwrap_or("—")),
            ago(server.last_heartbeat_at, now),
            esc(server.software.as_deref().unwrap_or("—")),
            esc(&sync_words(server)),
            if tunnels.is_empty() {
                "—".to_owned()
            } else {
                tunnels
            },
            box_details(server),
            url_part(&server.sid)
        );
    }
    let _ = write!(
        body,
        "</div><p><a href=\"/pair/{}/resources\">The pair's resources, continuous across failovers</a></p>",
        url_part(&pair.name)
    );
    if let Some(differences) = &pair.hardware_differences {
        let _ = write!(
            body,
            "<h2>Hardware</h2><p>{}</p>",
            if differences.is_empty() {
                "both boxes match".to_owned()
            } else {
                esc(&differences.join("; "))
            }
        );
    }
    body.push_str("<h2>DNS</h2><table><tr><th>name</th><th>must point at</th><th>points at</th><th>state</th></tr>");
    for record in &pair.dns {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}{}</td></tr>",
            esc(&record.name),
            esc(&record.want),
            esc(record.have.as_deref().unwrap_or("—")),
            record.state,
            record
                .last_error
                .as_deref()
                .map(|e| format!(": {}", esc(e)))
                .unwrap_or_default()
        );
    }
    body.push_str("</table>");
    if who.role == AccountRole::Operator {
        let _ = write!(
            body,
            "<h2>Promote the backup</h2><p>The provider's P: the backup checks as it does when P is pressed on it \
             (its copy, the primary unheard) and takes over, or refuses and says why.</p>\
             <form method=\"post\" action=\"/pair/{}/promote\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <label><input type=\"checkbox\" required> I mean it: the primary of {} is down</label> \
             <button>Promote</button></form>",
            url_part(&pair.name),
            esc(&who.csrf),
            esc(&pair.name)
        );
    }
    body.push_str("<h2>Notes</h2>");
    let notes: Vec<&Event> = events.iter().rev().filter(|e| e.kind == "note").collect();
    if notes.is_empty() {
        body.push_str("<p>None yet.</p>");
    }
    for note in notes {
        let _ = write!(
            body,
            "<p class=\"note\"><small>{} — {}</small><br>{}</p>",
            esc(&utc(note.at)),
            esc(&note.actor),
            esc(&note.detail).replace('\n', "<br>")
        );
    }
    if who.role == AccountRole::Operator {
        let _ = write!(
            body,
            "<form method=\"post\" action=\"/pair/{}/note\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <textarea name=\"text\" rows=\"3\" cols=\"70\" maxlength=\"2000\" required></textarea><br>\
             <button>Add the note</button></form>",
            url_part(&pair.name),
            esc(&who.csrf)
        );
    }
    body.push_str("<h2>Audit log</h2>");
    body.push_str(&event_table(events.iter().rev().take(200)));
    let mut html = page(&pair.name, Some(who), &body);
    if refresh {
        html = html.replacen(
            "<meta charset=\"utf-8\">",
            "<meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"1\">",
            1,
        );
    }
    html
}

fn event_table<'a>(events: impl Iterator<Item = &'a Event>) -> String {
    let mut out = String::from(
        "<table><tr><th>when (UTC)</th><th>pair</th><th>what</th><th>generation</th><th>by</th><th>detail</th></tr>",
    );
    for e in events {
        let generation = match (e.from_generation, e.to_generation) {
            (Some(a), Some(b)) if a != b => format!("{a} → {b}"),
            (_, Some(b)) => b.to_string(),
            _ => String::new(),
        };
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{generation}</td><td>{}</td><td>{}</td></tr>",
            esc(&utc(e.at)),
            esc(e.pair.as_deref().unwrap_or("")),
            esc(&e.kind),
            esc(&e.actor),
            esc(&e.detail)
        );
    }
    out.push_str("</table>");
    out
}

/// The audit log, newest first, filtered by pair, kind and age.
pub(super) fn events(who: &Who, events: &[Event], query: &EventsQuery, now: Millis) -> String {
    let since = (query.hours > 0).then(|| now - (query.hours as i64) * 3_600_000);
    let shown: Vec<&Event> = events
        .iter()
        .rev()
        .filter(|e| query.pair.is_empty() || e.pair.as_deref() == Some(query.pair.as_str()))
        .filter(|e| query.kind.is_empty() || e.kind == query.kind)
        .filter(|e| since.is_none_or(|since| e.at >= since))
        .take(1000)
        .collect();
    let body = format!(
        "<h1>Events</h1><form method=\"get\" action=\"/events\">\
         <input name=\"pair\" value=\"{}\" placeholder=\"pair\"> <input name=\"kind\" value=\"{}\" placeholder=\"kind (promoted, …)\"> \
         <input name=\"hours\" value=\"{}\" size=\"4\"> hours (0: all) <button>Show</button></form><p>{} shown (at most 1,000)</p>{}",
        esc(&query.pair),
        esc(&query.kind),
        query.hours,
        shown.len(),
        event_table(shown.into_iter())
    );
    page("Events", Some(who), &body)
}
