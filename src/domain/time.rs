//! Seconds, windows and local days. Pure arithmetic on epoch times: nothing here
//! reads the clock; `now` always comes from the caller.

use chrono::{NaiveTime, TimeZone};
use chrono_tz::Tz;

/// The one-second bucket an epoch-millisecond time falls in.
pub fn second_of_ms(ts_ms: i64) -> i64 {
    ts_ms.div_euclid(1000)
}

/// The sliding windows every metric keeps (besides `today`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SlidingWindow {
    Sec30,
    Min15,
}

impl SlidingWindow {
    pub const ALL: [SlidingWindow; 2] = [SlidingWindow::Sec30, SlidingWindow::Min15];

    pub fn length_s(self) -> i64 {
        match self {
            SlidingWindow::Sec30 => 30,
            SlidingWindow::Min15 => 900,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SlidingWindow::Sec30 => "30s",
            SlidingWindow::Min15 => "15m",
        }
    }
}

/// A window as named in the API: one of the sliding ones, or `today`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WindowName {
    Sliding(SlidingWindow),
    Today,
}

impl WindowName {
    pub const ALL: [WindowName; 3] = [
        WindowName::Sliding(SlidingWindow::Sec30),
        WindowName::Sliding(SlidingWindow::Min15),
        WindowName::Today,
    ];

    pub fn parse(text: &str) -> Option<WindowName> {
        match text {
            "30s" => Some(WindowName::Sliding(SlidingWindow::Sec30)),
            "15m" => Some(WindowName::Sliding(SlidingWindow::Min15)),
            "today" => Some(WindowName::Today),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WindowName::Sliding(window) => window.name(),
            WindowName::Today => "today",
        }
    }
}

/// As the API names it: "30s", "15m" or "today".
impl serde::Serialize for WindowName {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for WindowName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        WindowName::parse(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown window {text:?}: one of \"30s\", \"15m\", \"today\""
            ))
        })
    }
}

/// How far back the in-memory buckets reach: the longest window and its `prev`.
pub const BUCKET_HISTORY_S: i64 = 2 * 900;

/// `[start_s, end_s)`: the local calendar day of a tenant, in epoch seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DayBounds {
    pub start_s: i64,
    pub end_s: i64,
}

impl DayBounds {
    pub fn contains(&self, second: i64) -> bool {
        self.start_s <= second && second < self.end_s
    }
}

/// The local day (in `tz`) that contains `second`. A local midnight that a DST
/// change skips starts the day at the first local time that exists.
pub fn day_bounds(second: i64, tz: Tz) -> DayBounds {
    let utc_day = || DayBounds {
        start_s: second.div_euclid(86_400) * 86_400,
        end_s: second.div_euclid(86_400) * 86_400 + 86_400,
    };
    let Some(local) = tz.timestamp_opt(second, 0).single() else {
        return utc_day();
    };
    let date = local.date_naive();
    let Some(next_date) = date.succ_opt() else {
        return utc_day();
    };
    match (first_instant_of(date, tz), first_instant_of(next_date, tz)) {
        (Some(start_s), Some(end_s)) if start_s <= second && second < end_s => {
            DayBounds { start_s, end_s }
        }
        _ => utc_day(),
    }
}

fn first_instant_of(date: chrono::NaiveDate, tz: Tz) -> Option<i64> {
    // A DST gap can swallow local midnight; try each minute of the first day-half.
    for minute in 0..(12 * 60) {
        let time = NaiveTime::from_hms_opt(minute / 60, minute % 60, 0)?;
        if let Some(instant) = tz.from_local_datetime(&date.and_time(time)).earliest() {
            return Some(instant.timestamp());
        }
    }
    None
}

/// True when an event at `ts_second` still counts in some window at `now_second`
/// or later: inside the longest window's `prev`, or inside the tenant's today.
pub fn counts_in_some_window(ts_second: i64, now_second: i64, today: DayBounds) -> bool {
    ts_second > now_second - BUCKET_HISTORY_S || ts_second >= today.start_s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_floor_negative_times() {
        assert_eq!(second_of_ms(1_999), 1);
        assert_eq!(second_of_ms(2_000), 2);
        assert_eq!(second_of_ms(-1), -1);
    }

    #[test]
    fn utc_day_is_aligned() {
        // 2025-11-22T10:00:00Z
        let bounds = day_bounds(1_763_805_600, Tz::UTC);
        assert_eq!(bounds.start_s, 1_763_769_600);
        assert_eq!(bounds.end_s, 1_763_769_600 + 86_400);
    }

    #[test]
    fn half_hour_zone_day_starts_at_local_midnight() {
        // 2025-11-22T10:00:00Z is 15:30 in Kolkata; local midnight is 2025-11-21T18:30Z.
        let bounds = day_bounds(1_763_805_600, Tz::Asia__Kolkata);
        assert_eq!(bounds.start_s, 1_763_769_600 - 5 * 3600 - 1800);
        assert_eq!(bounds.end_s - bounds.start_s, 86_400);
    }

    #[test]
    fn dst_days_are_23_and_25_hours_long() {
        // New York: 2025-03-09 (spring forward) and 2025-11-02 (fall back), at noon local.
        let spring = day_bounds(1_741_539_600, Tz::America__New_York);
        assert_eq!(spring.end_s - spring.start_s, 23 * 3600);
        let autumn = day_bounds(1_762_102_800, Tz::America__New_York);
        assert_eq!(autumn.end_s - autumn.start_s, 25 * 3600);
    }

    #[test]
    fn skipped_midnight_starts_the_day_at_one_am() {
        // Santiago springs forward at local midnight: 2024-09-08 00:00 does not exist.
        // 2024-09-08T16:00:00Z is noon local (UTC-3 after the change).
        let bounds = day_bounds(1_725_811_200, Tz::America__Santiago);
        // 01:00 local (-03:00) = 04:00Z
        assert_eq!(bounds.start_s, 1_725_768_000);
    }

    #[test]
    fn lateness_covers_prev_window_and_today() {
        let today = DayBounds {
            start_s: 0,
            end_s: 86_400,
        };
        assert!(counts_in_some_window(10_000 - 1799, 10_000, today));
        assert!(counts_in_some_window(5, 10_000, today));
        let late_day = DayBounds {
            start_s: 9_000,
            end_s: 95_400,
        };
        assert!(!counts_in_some_window(10_000 - 1800, 10_000, late_day));
    }
}
