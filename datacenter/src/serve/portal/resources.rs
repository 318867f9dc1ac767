//! The Status / Resources pages: a box's CPU, memory, disk and network over 1 h, 24 h, 7 d or
//! 90 d with the stretches it was primary shaded, and the pair's combined view — always the
//! primary of the moment, so its history runs on across failovers with no gap.

use super::charts::{self, Line, chart, primary_spans, values};
use super::pages::{esc, page, url_part};
use super::*;
use crate::history::Point;

/// Colours of a pair's first and second box.
const COLOURS: [&str; 2] = ["#1f77b4", "#d62728"];

#[derive(serde::Deserialize, Default)]
pub(super) struct RangeQuery {
    #[serde(default)]
    range: String,
}

/// A gap between samples longer than this many of the range's steps breaks a line.
fn gap(length: i64) -> i64 {
    if length <= crate::history::FINE {
        // The agent samples every 60 s by default: three missed samples are a silence.
        3 * 60_000
    } else {
        3 * crate::history::BUCKET
    }
}

fn range_links(base: &str, current: &str) -> String {
    charts::RANGES
        .iter()
        .map(|(name, _)| {
            if *name == current {
                format!("<b>{name}</b>")
            } else {
                format!("<a href=\"{base}?range={name}\">{name}</a>")
            }
        })
        .collect::<Vec<_>>()
        .join(" · ")
}

/// The four charts of a set of lines per measure.
fn four_charts(
    per_line: &[(&str, &str, Vec<Point>)],
    bands: &[(Millis, Millis, String)],
    window: (Millis, Millis),
    gap: Millis,
) -> String {
    let measure = |pick: &dyn Fn(&Point) -> Option<f64>| -> Vec<Line<'_>> {
        per_line
            .iter()
            .map(|(name, colour, points)| Line {
                name,
                colour,
                points: values(points, pick),
            })
            .collect()
    };
    [
        chart("CPU busy", true, &measure(&|p| p.cpu), bands, window, gap),
        chart(
            "Memory in use",
            true,
            &measure(&|p| p.memory),
            bands,
            window,
            gap,
        ),
        chart(
            "Disk in use",
            true,
            &measure(&|p| p.disk),
            bands,
            window,
            gap,
        ),
        chart(
            "Network received",
            false,
            &measure(&|p| p.rx),
            bands,
            window,
            gap,
        ),
        chart(
            "Network sent",
            false,
            &measure(&|p| p.tx),
            bands,
            window,
            gap,
        ),
    ]
    .concat()
}

pub(super) async fn box_page(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    UrlPath(sid): UrlPath<String>,
    Query(query): Query<RangeQuery>,
) -> Response {
    let Some(who) = who(&inner, &headers).await else {
        return to_login();
    };
    let Ok(id) = sid.parse::<ServerId>() else {
        return html(
            StatusCode::NOT_FOUND,
            pages::refused(&format!("no box {sid}")),
        );
    };
    let (name, length) = charts::range(&query.range);
    let now = now_ms();
    let found = with_store(&inner, move |s| {
        let pair = s.pair_of(id)?;
        let events: Vec<store::Event> = s
            .events(0)?
            .into_iter()
            .filter(|e| e.pair.as_deref() == Some(pair.name.as_str()))
            .collect();
        Ok((pair, events))
    })
    .await;
    let (pair, events) = match found {
        Ok(found) => found,
        Err(err) => return html(StatusCode::NOT_FOUND, pages::refused(&err.to_string())),
    };
    let window = (now - length, now);
    let points = match read_series(&inner, &sid, window, now).await {
        Ok(points) => points,
        Err(err) => return html(StatusCode::SERVICE_UNAVAILABLE, pages::refused(&err)),
    };
    let bands: Vec<(Millis, Millis, String)> = primary_spans(&events, now)
        .into_iter()
        .filter(|(primary, ..)| *primary == sid)
        .map(|(_, from, to)| (from, to, format!("{sid} primary")))
        .collect();
    let position = pair.servers.iter().position(|s| s.sid == sid).unwrap_or(0);
    let role = pair
        .servers
        .iter()
        .find(|s| s.sid == sid)
        .map(|s| s.role.clone())
        .unwrap_or_default();
    let base = format!("/box/{}", url_part(&sid));
    let body = format!(
        "<h1>{} — Status / Resources</h1><p>{} of pair <a href=\"/pair/{}\">{}</a> · \
         shaded: when it was the primary · {} samples · {}</p>{}",
        esc(&sid),
        esc(&role),
        url_part(&pair.name),
        esc(&pair.name),
        points.len(),
        range_links(&base, name),
        four_charts(
            &[(sid.as_str(), COLOURS[position.min(1)], points)],
            &bands,
            window,
            gap(length)
        )
    );
    html(
        StatusCode::OK,
        page(&format!("{sid} resources"), Some(&who), &body),
    )
}

async fn read_series(
    inner: &Arc<Inner>,
    sid: &str,
    (from, to): (Millis, Millis),
    now: Millis,
) -> Result<Vec<Point>, String> {
    let (shared, sid) = (inner.clone(), sid.to_owned());
    tokio::task::spawn_blocking(move || {
        shared
            .history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .series(&sid, from, to, now)
            .map_err(|e| format!("the resource history cannot be read: {e:#}"))
    })
    .await
    .map_err(|e| e.to_string())?
}

pub(super) async fn pair_resources(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
    Query(query): Query<RangeQuery>,
) -> Response {
    let Some(who) = who(&inner, &headers).await else {
        return to_login();
    };
    let (range_name, length) = charts::range(&query.range);
    let now = now_ms();
    let wanted = name.clone();
    let found = with_store(&inner, move |s| {
        let pair = s.pair_named(&wanted)?;
        let events: Vec<store::Event> = s
            .events(0)?
            .into_iter()
            .filter(|e| e.pair.as_deref() == Some(wanted.as_str()))
            .collect();
        Ok((pair, events))
    })
    .await;
    let (pair, events) = match found {
        Ok((Some(pair), events)) => (pair, events),
        Ok((None, _)) => {
            return html(
                StatusCode::NOT_FOUND,
                pages::refused(&format!("no pair {name}")),
            );
        }
        Err(err) => {
            return html(
                StatusCode::SERVICE_UNAVAILABLE,
                pages::refused(&err.to_string()),
            );
        }
    };
    let window = (now - length, now);
    let spans = primary_spans(&events, now);
    // Each box's series once; each span takes the primary's points within it.
    let mut lines: Vec<(String, &str, Vec<Point>)> = Vec::new();
    for (position, server) in pair.servers.iter().enumerate() {
        let points = match read_series(&inner, &server.sid, window, now).await {
            Ok(points) => points,
            Err(err) => return html(StatusCode::SERVICE_UNAVAILABLE, pages::refused(&err)),
        };
        let as_primary: Vec<Point> = points
            .into_iter()
            .filter(|p| {
                spans
                    .iter()
                    .any(|(sid, from, to)| *sid == server.sid && p.at >= *from && p.at < *to)
            })
            .collect();
        lines.push((
            format!("{} (while primary)", server.sid),
            COLOURS[position.min(1)],
            as_primary,
        ));
    }
    let bands: Vec<(Millis, Millis, String)> = spans
        .iter()
        .filter(|(sid, ..)| pair.servers.first().is_some_and(|s| &s.sid == sid))
        .map(|(sid, from, to)| (*from, *to, format!("{sid} primary")))
        .collect();
    let failovers = spans.len().saturating_sub(1);
    let per_line: Vec<(&str, &str, Vec<Point>)> = lines
        .iter()
        .map(|(name, colour, points)| (name.as_str(), *colour, points.clone()))
        .collect();
    let base = format!("/pair/{}/resources", url_part(&pair.name));
    let body = format!(
        "<h1>{} — the pair's primary, continuous</h1><p>Always the box that was primary at the time \
         ({failovers} failover(s) in the audit log); shaded: the first box primary · {}</p>{}",
        esc(&pair.name),
        range_links(&base, range_name),
        four_charts(&per_line, &bands, window, gap(length))
    );
    html(
        StatusCode::OK,
        page(&format!("{} resources", pair.name), Some(&who), &body),
    )
}
