//! Time as the data center records it (milliseconds since the Unix epoch) and shows it.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (passed in, so tests control time).
pub type Millis = i64;

/// Milliseconds since the Unix epoch now.
pub fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A time for people: UTC, to the second.
pub fn utc(at: Millis) -> String {
    match time::OffsetDateTime::from_unix_timestamp(at.div_euclid(1000)) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        // Beyond year 9999 (a corrupt value): the number as it is.
        Err(_) => format!("{at} ms since 1970"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_as_utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_795_842_492_911), "2026-11-28 05:08:12 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
    }
}
