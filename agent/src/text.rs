//! Text for an 80-column terminal or console: lines wrapped or cut between words.

/// `line` within `width` characters: whole if it fits, else cut at the last space that
/// leaves room for " ..." (never in the middle of a number and its unit).
pub(crate) fn fit(line: &str, width: usize) -> String {
    if line.chars().count() <= width {
        return line.to_owned();
    }
    let room: String = line.chars().take(width.saturating_sub(4)).collect();
    let cut = room
        .trim_end()
        .rfind(' ')
        .filter(|&at| at > 0)
        .unwrap_or(room.len());
    format!("{} ...", room[..cut].trim_end())
}

/// `line` broken at spaces into pieces of at most `width` characters (continuations
/// indented, the spacing inside a piece kept); a word longer than a line is cut.
pub(crate) fn wrap(line: &str, width: usize) -> Vec<String> {
    const INDENT: &str = "    ";
    if line.chars().count() <= width {
        return vec![line.to_owned()];
    }
    let mut pieces = Vec::new();
    let mut current = String::new();
    for (i, word) in line.split(' ').enumerate() {
        let continuation = !pieces.is_empty() && current == INDENT;
        if continuation && word.is_empty() {
            continue; // A continuation does not start with the spaces of a column.
        }
        if i > 0 && !continuation {
            current.push(' ');
        }
        if !current.trim().is_empty() && current.chars().count() + word.chars().count() > width {
            pieces.push(current.trim_end().to_owned());
            current = INDENT.to_owned();
        }
        current.push_str(word);
        while current.chars().count() > width {
            let head: String = current.chars().take(width).collect();
            let tail: String = current.chars().skip(width).collect();
            pieces.push(head);
            current = format!("{INDENT}{tail}");
        }
    }
    if !current.trim().is_empty() {
        pieces.push(current);
    }
    pieces
}

/// Percent, rate and time left of a copy, from what it reports as it goes.
#[derive(Debug, Default)]
pub(crate) struct Rate {
    /// The first sample of the copy under way: when, and how much was done.
    first: Option<(std::time::Instant, u64)>,
}

impl Rate {
    /// "42% of 1.2 GiB, 35.0 MiB/s, about 20 s left" for `done` of `total` bytes at `now`
    /// (`None` while nothing is being copied).
    pub(crate) fn line(
        &mut self,
        total: u64,
        done: u64,
        now: std::time::Instant,
    ) -> Option<String> {
        if total == 0 {
            self.first = None;
            return None;
        }
        let (since, from) = *self.first.get_or_insert((now, done));
        let percent = done.saturating_mul(100) / total;
        let size = human_bytes(total as f64);
        let elapsed = now.duration_since(since).as_secs_f64();
        if elapsed < 0.5 || done <= from {
            return Some(format!("{percent}% of {size}"));
        }
        let per_s = (done - from) as f64 / elapsed;
        let left = total.saturating_sub(done) as f64 / per_s;
        Some(format!(
            "{percent}% of {size}, {}/s, about {:.0} s left",
            human_bytes(per_s),
            left.ceil()
        ))
    }
}

pub(crate) fn ago(now: u64, at: Option<u64>) -> String {
    match at {
        None => "never".into(),
        Some(at) => {
            let s = now.saturating_sub(at) as f64 / 1000.0;
            if s < 120.0 {
                format!("{s:.1} s ago")
            } else {
                format!("{:.0} min ago", s / 60.0)
            }
        }
    }
}

/// Bytes for an operator, in binary units ("512 B", "3.40 KiB", "12.00 MiB"): indicatif's
/// form, the one the progress bars of `lbs sync pull` use. Rates and averages round to a byte.
pub(crate) fn human_bytes(bytes: f64) -> String {
    let bytes = if bytes.is_finite() && bytes > 0.0 {
        bytes.round() as u64
    } else {
        0
    };
    indicatif::HumanBytes(bytes).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_copy_says_percent_rate_and_time_left() {
        let mut rate = Rate::default();
        let start = Instant::now();
        assert_eq!(rate.line(0, 0, start), None);
        let mib = 1024 * 1024;
        assert_eq!(
            rate.line(100 * mib, 0, start).as_deref(),
            Some("0% of 100.00 MiB")
        );
        assert_eq!(
            rate.line(100 * mib, 20 * mib, start + Duration::from_secs(2))
                .as_deref(),
            Some("20% of 100.00 MiB, 10.00 MiB/s, about 8 s left")
        );
    }
}
