//! The Status / Resources charts: SVG drawn here (no script, nothing fetched), with the
//! stretches when a box was the pair's primary shaded, so a failover shows on the time axis.
//! And which box was primary when, from the pair's audit log.

use std::fmt::Write;

use super::pages::esc;
use crate::history::Point;
use crate::store::{Event, Millis};

/// The ranges a page offers: name, length.
pub(super) const RANGES: [(&str, i64); 4] = [
    ("1h", 3_600_000),
    ("24h", 24 * 3_600_000),
    ("7d", 7 * 24 * 3_600_000),
    ("90d", 90 * 24 * 3_600_000),
];

/// The length of range `name` (1 hour for anything else).
pub(super) fn range(name: &str) -> (&'static str, i64) {
    RANGES
        .iter()
        .find(|(n, _)| *n == name)
        .copied()
        .unwrap_or(RANGES[0])
}

/// Who was the pair's primary from when: (sid, from, to) in time order, from its audit log
/// (the first box's activation, then each promotion). The last one runs to `now`.
pub(super) fn primary_spans(events: &[Event], now: Millis) -> Vec<(String, Millis, Millis)> {
    let mut starts: Vec<(String, Millis)> = Vec::new();
    for e in events {
        let became = match e.kind.as_str() {
            "activated" | "reactivated" => e.detail.starts_with("primary"),
            "promoted" => true,
            _ => false,
        };
        if let (true, Some(sid)) = (became, &e.sid) {
            if starts.last().is_some_and(|(last, _)| last == sid) {
                continue;
            }
            starts.push((sid.clone(), e.at));
        }
    }
    let mut spans = Vec::new();
    for (i, (sid, from)) in starts.iter().enumerate() {
        let to = starts.get(i + 1).map_or(now, |(_, next)| *next);
        spans.push((sid.clone(), *from, to));
    }
    spans
}

/// One line of a chart: its name, colour and points (time, value).
pub(super) struct Line<'a> {
    pub(super) name: &'a str,
    pub(super) colour: &'a str,
    pub(super) points: Vec<(Millis, f64)>,
}

/// The values of `pick` in `points`, those present.
pub(super) fn values(points: &[Point], pick: impl Fn(&Point) -> Option<f64>) -> Vec<(Millis, f64)> {
    points
        .iter()
        .filter_map(|p| pick(p).map(|v| (p.at, v)))
        .collect()
}

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 160.0;
const LEFT: f64 = 56.0;
const BOTTOM: f64 = 20.0;

/// Bytes per second in words ("1.2 MB/s").
fn rate(value: f64) -> String {
    match value {
        v if v >= 1e9 => format!("{:.1} GB/s", v / 1e9),
        v if v >= 1e6 => format!("{:.1} MB/s", v / 1e6),
        v if v >= 1e3 => format!("{:.1} kB/s", v / 1e3),
        v => format!("{v:.0} B/s"),
    }
}

/// A chart from `from` to `to`: `lines`, with `bands` (from, to, label) shaded. Percent
/// charts run 0–100; others to their largest value. A gap of more than `gap` between two
/// points breaks the line (the box was silent), so nothing is drawn that was not measured.
pub(super) fn chart(
    title: &str,
    percent: bool,
    lines: &[Line<'_>],
    bands: &[(Millis, Millis, String)],
    (from, to): (Millis, Millis),
    gap: Millis,
) -> String {
    let top = if percent {
        100.0
    } else {
        lines
            .iter()
            .flat_map(|l| l.points.iter().map(|(_, v)| *v))
            .fold(0.0_f64, f64::max)
            .max(1.0)
    };
    let span = (to - from).max(1) as f64;
    let x = |at: Millis| LEFT + (at - from) as f64 / span * (WIDTH - LEFT - 4.0);
    let y = |v: f64| (HEIGHT - BOTTOM) - v / top * (HEIGHT - BOTTOM - 6.0);
    let mut svg = format!(
        "<figure><figcaption>{}</figcaption><svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" aria-label=\"{}\" style=\"font:11px sans-serif\">",
        esc(title),
        esc(title)
    );
    for (start, end, label) in bands {
        let (a, b) = (x((*start).max(from)), x((*end).min(to)));
        if b > a {
            let _ = write!(
                svg,
                "<rect class=\"band\" x=\"{a:.1}\" y=\"0\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#e3eefc\"><title>{}</title></rect>",
                b - a,
                HEIGHT - BOTTOM,
                esc(label)
            );
        }
    }
    // Axes and the top value.
    let label = |v: f64| {
        if percent {
            format!("{v:.0} %")
        } else {
            rate(v)
        }
    };
    let _ = write!(
        svg,
        "<line x1=\"{LEFT}\" y1=\"{0}\" x2=\"{WIDTH}\" y2=\"{0}\" stroke=\"#888\"/>\
         <line x1=\"{LEFT}\" y1=\"0\" x2=\"{LEFT}\" y2=\"{0}\" stroke=\"#888\"/>\
         <text x=\"2\" y=\"12\">{1}</text><text x=\"2\" y=\"{0}\">0</text>\
         <text x=\"{LEFT}\" y=\"{2}\">{3}</text><text x=\"{4}\" y=\"{2}\" text-anchor=\"end\">{5}</text>",
        HEIGHT - BOTTOM,
        esc(&label(top)),
        HEIGHT - 4.0,
        esc(&crate::time::utc(from)),
        WIDTH - 2.0,
        esc(&crate::time::utc(to)),
    );
    for line in lines {
        let mut path = String::new();
        let mut last: Option<Millis> = None;
        let mut drawn = 0;
        for (at, value) in &line.points {
            if *at < from || *at > to {
                continue;
            }
            let verb = if last.is_some_and(|l| at - l <= gap) {
                'L'
            } else {
                'M'
            };
            let _ = write!(path, "{verb}{:.1},{:.1} ", x(*at), y(value.min(top)));
            last = Some(*at);
            drawn += 1;
        }
        if drawn > 0 {
            let _ = write!(
                svg,
                "<path class=\"series\" data-points=\"{drawn}\" d=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\"><title>{}</title></path>",
                path.trim_end(),
                line.colour,
                esc(line.name)
            );
        }
    }
    svg.push_str("</svg>");
    let legend: Vec<String> = lines
        .iter()
        .map(|l| {
            format!(
                "<span style=\"color:{}\">■</span> {}",
                l.colour,
                esc(l.name)
            )
        })
        .collect();
    let _ = write!(svg, "<br>{}</figure>", legend.join(" "));
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(at: Millis, kind: &str, sid: &str, detail: &str) -> Event {
        Event {
            id: at,
            at,
            pair: Some("acme".into()),
            sid: Some(sid.into()),
            kind: kind.into(),
            from_generation: None,
            to_generation: None,
            actor: "test".into(),
            detail: detail.into(),
        }
    }

    #[test]
    fn the_primary_is_followed_through_activations_and_promotions() {
        let events = [
            event(10, "activated", "a", "primary of pair acme"),
            event(20, "activated", "b", "backup of pair acme"),
            event(100, "promoted", "b", "…"),
            event(200, "registered-backup", "a", "…"),
            event(300, "promoted", "a", "…"),
        ];
        assert_eq!(
            primary_spans(&events, 400),
            [
                ("a".to_owned(), 10, 100),
                ("b".to_owned(), 100, 300),
                ("a".to_owned(), 300, 400)
            ]
        );
    }

    #[test]
    fn a_chart_draws_what_was_measured_and_breaks_at_silence() {
        let line = Line {
            name: "cpu",
            colour: "#c00",
            points: vec![(0, 10.0), (10, 20.0), (100, 30.0), (110, 40.0)],
        };
        let svg = chart(
            "CPU",
            true,
            &[line],
            &[(50, 120, "primary".into())],
            (0, 120),
            15,
        );
        assert!(svg.contains("data-points=\"4\""), "{svg}");
        // Two stretches: the jump from 10 to 100 is a gap, not a line.
        assert_eq!(svg.matches('M').count(), 2, "{svg}");
        assert!(svg.contains("class=\"band\""));
        assert!(!svg.contains("<script"));
    }
}
