//! Exact-membership rolling windows of one histogram series.
//!
//! Owns: one compact slice per second (HDR bucket → count) for the seconds the
//! sliding windows and their `prev` cover (plus the allowed skew ahead), and a
//! running HDR histogram for `today`. Sliding windows are merged from their slices
//! when read, so a window's edges are exact to the second and its quantiles equal
//! those of one HDR histogram fed the same values.
//! Must not: read the clock, or grow without bound: a slice holds at most one
//! entry per HDR bucket, and the ring has a fixed number of slices.

use chrono_tz::Tz;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::time::{day_bounds, second_of_ms, DayBounds, SlidingWindow, BUCKET_HISTORY_S};
use super::window::{ring_len_s, RecordError};

/// Significant decimal digits of every histogram (API.md §4).
pub const HISTOGRAM_SIGNIFICANT_DIGITS: u8 = 3;

/// Count and quantiles of one window; quantiles are `None` when it is empty.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistogramStats {
    pub count: u64,
    pub p50: Option<u64>,
    pub p90: Option<u64>,
    pub p95: Option<u64>,
    pub p99: Option<u64>,
    pub max: Option<u64>,
}

impl HistogramStats {
    pub fn of(histogram: &Histogram<u64>) -> HistogramStats {
        if histogram.is_empty() {
            return HistogramStats::default();
        }
        HistogramStats {
            count: histogram.len(),
            p50: Some(histogram.value_at_quantile(0.50)),
            p90: Some(histogram.value_at_quantile(0.90)),
            p95: Some(histogram.value_at_quantile(0.95)),
            p99: Some(histogram.value_at_quantile(0.99)),
            max: Some(histogram.max()),
        }
    }
}

/// Every window of a histogram series at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistogramReading {
    pub sec30: HistogramStats,
    pub min15: HistogramStats,
    pub today: HistogramStats,
}

/// A new empty histogram for values in `[0, value_max]`.
pub fn empty_histogram(value_max: u64) -> Histogram<u64> {
    // Invariant: low = 1, high >= 2 = 2 * low and 3 significant digits are valid
    // bounds for every u64 `value_max`, so creation cannot fail.
    Histogram::new_with_bounds(1, value_max.max(2), HISTOGRAM_SIGNIFICANT_DIGITS)
        .expect("valid histogram bounds")
}

/// A histogram series as a snapshot stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistogramExport {
    pub head_s: i64,
    /// `(second, [(value, count)])` of every non-empty slice.
    pub slices: Vec<(i64, Vec<(u64, u64)>)>,
    /// `(value, count)` of today's histogram.
    pub today: Vec<(u64, u64)>,
}

#[derive(Debug, Clone)]
pub struct HistogramWindows {
    // Per second: (lowest equivalent value of an HDR bucket, count), sorted by
    // value. The ring of slices and today's histogram are allocated with the
    // first value and the ring is freed once it has left every window, so an
    // idle series costs its struct alone.
    slices: Vec<Vec<(u64, u64)>>,
    ring_len: i64,
    ahead_s: i64,
    head_s: i64,
    tz: Tz,
    day: DayBounds,
    today: Option<Histogram<u64>>,
    value_max: u64,
}

impl HistogramWindows {
    pub fn new(now_ms: i64, ahead_s: i64, tz: Tz, value_max: u64) -> Self {
        let ring_len = ring_len_s(ahead_s);
        let head_s = second_of_ms(now_ms);
        HistogramWindows {
            slices: Vec::new(),
            ring_len,
            ahead_s,
            head_s,
            tz,
            day: day_bounds(head_s, tz),
            today: None,
            value_max,
        }
    }

    /// Today's histogram, made on first use.
    fn today_mut(&mut self) -> &mut Histogram<u64> {
        let value_max = self.value_max;
        self.today.get_or_insert_with(|| empty_histogram(value_max))
    }

    fn reset_today(&mut self) {
        if let Some(today) = &mut self.today {
            today.reset();
        }
    }

    /// The slice of `second`, with the ring made on first use.
    fn slice_mut(&mut self, second: i64) -> &mut Vec<(u64, u64)> {
        if self.slices.is_empty() {
            self.slices = vec![Vec::new(); self.ring_len as usize];
        }
        let slot = self.slot(second);
        &mut self.slices[slot]
    }

    fn slice(&self, second: i64) -> &[(u64, u64)] {
        if self.slices.is_empty() {
            return &[];
        }
        &self.slices[self.slot(second)]
    }

    fn slot(&self, second: i64) -> usize {
        second.rem_euclid(self.ring_len) as usize
    }

    pub fn advance(&mut self, now_ms: i64) {
        let target_s = second_of_ms(now_ms);
        // without a ring there is nothing to slide: jump
        let steps = if self.slices.is_empty() {
            0
        } else {
            (target_s - self.head_s).min(self.ring_len)
        };
        for _ in 0..steps {
            let second = self.head_s + 1;
            if second >= self.day.end_s {
                self.day = day_bounds(second, self.tz);
                self.reset_today();
            }
            let slot = self.slot(second);
            if !self.slices[slot].is_empty() {
                let entering = std::mem::take(&mut self.slices[slot]);
                let today = self.today_mut();
                for &(value, count) in &entering {
                    // values in slices were range-checked when recorded
                    let _ = today.record_n(value, count);
                }
                self.slices[slot] = entering;
            }
            let expired = self.slot(second - BUCKET_HISTORY_S);
            self.slices[expired].clear();
            self.head_s = second;
        }
        if steps == self.ring_len {
            // every slice has left the windows: give the ring back
            self.slices = Vec::new();
        }
        if target_s > self.head_s {
            self.head_s = target_s;
            if target_s >= self.day.end_s {
                self.day = day_bounds(target_s, self.tz);
                self.reset_today();
            }
        }
    }

    pub fn record(&mut self, ts_ms: i64, value: u64, now_ms: i64) -> Result<(), RecordError> {
        self.advance(now_ms);
        if value > self.value_max {
            return Err(RecordError::ValueOutOfRange(value));
        }
        let second = second_of_ms(ts_ms);
        let head_s = self.head_s;
        if second > head_s + self.ahead_s {
            return Err(RecordError::TooFarAhead {
                ts_second: second,
                head_second: head_s,
            });
        }
        let in_today = second <= head_s && second >= self.day.start_s;
        if in_today {
            self.today_mut()
                .record(value)
                .map_err(|_| RecordError::ValueOutOfRange(value))?;
        }
        if second <= head_s - BUCKET_HISTORY_S {
            return Ok(());
        }
        let key = self.today_mut().lowest_equivalent(value);
        let slice = self.slice_mut(second);
        match slice.binary_search_by_key(&key, |&(value, _)| value) {
            Ok(index) => slice[index].1 += 1,
            Err(index) => slice.insert(index, (key, 1)),
        }
        Ok(())
    }

    /// Merges the slices of seconds `(to_s - length_s, to_s]` into one histogram.
    pub fn merge_seconds(&self, to_s: i64, length_s: i64) -> Histogram<u64> {
        let mut merged = empty_histogram(self.value_max);
        let from_s = (to_s - length_s + 1).max(self.head_s - BUCKET_HISTORY_S + 1);
        for second in from_s..=to_s.min(self.head_s) {
            for &(value, count) in self.slice(second) {
                let _ = merged.record_n(value, count);
            }
        }
        merged
    }

    pub fn window_histogram(&mut self, window: SlidingWindow, now_ms: i64) -> Histogram<u64> {
        self.advance(now_ms);
        self.merge_seconds(self.head_s, window.length_s())
    }

    pub fn read(&mut self, now_ms: i64) -> HistogramReading {
        self.advance(now_ms);
        HistogramReading {
            sec30: HistogramStats::of(&self.merge_seconds(self.head_s, 30)),
            min15: HistogramStats::of(&self.merge_seconds(self.head_s, 900)),
            today: self
                .today
                .as_ref()
                .map_or_else(HistogramStats::default, HistogramStats::of),
        }
    }

    pub fn head_second(&self) -> i64 {
        self.head_s
    }

    pub fn export(&self) -> HistogramExport {
        self.export_from(i64::MIN)
    }

    /// `export`, with the slices of seconds before `from_s` left out.
    pub fn export_from(&self, from_s: i64) -> HistogramExport {
        let mut slices = Vec::new();
        let first_s = from_s.max(self.head_s - BUCKET_HISTORY_S + 1);
        for second in first_s..=(self.head_s + self.ahead_s) {
            let slice = self.slice(second);
            if !slice.is_empty() {
                slices.push((second, slice.to_vec()));
            }
        }
        let today = self.today.as_ref().map_or_else(Vec::new, |today| {
            today
                .iter_recorded()
                .map(|bucket| (bucket.value_iterated_to(), bucket.count_at_value()))
                .collect()
        });
        HistogramExport {
            head_s: self.head_s,
            slices,
            today,
        }
    }

    /// The oldest second whose slice the series still holds (and `import`
    /// keeps); `None` while it holds none.
    pub fn held_from_s(&self) -> Option<i64> {
        (!self.slices.is_empty()).then_some(self.head_s - BUCKET_HISTORY_S + 1)
    }

    /// Rebuilds a series from `export`; values past `value_max` (a smaller
    /// maximum than when exported) are dropped.
    pub fn import(export: &HistogramExport, ahead_s: i64, tz: Tz, value_max: u64) -> Self {
        // a smaller skew than when exported must not drop acknowledged future events
        let furthest_s = export
            .slices
            .iter()
            .map(|s| s.0 - export.head_s)
            .max()
            .unwrap_or(0);
        let ahead_s = ahead_s.max(furthest_s.min(3600));
        let mut windows =
            HistogramWindows::new(export.head_s.saturating_mul(1000), ahead_s, tz, value_max);
        let head_s = windows.head_s;
        for (second, slice) in &export.slices {
            if *second > head_s - BUCKET_HISTORY_S && *second <= head_s + ahead_s {
                *windows.slice_mut(*second) = slice
                    .iter()
                    .copied()
                    .filter(|&(value, _)| value <= value_max)
                    .collect();
            }
        }
        for &(value, count) in &export.today {
            let _ = windows.today_mut().record_n(value, count);
        }
        windows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0_MS: i64 = 1_763_805_600_000;

    #[test]
    fn quantiles_match_one_histogram_of_the_same_values() {
        let mut windows = HistogramWindows::new(T0_MS, 300, Tz::UTC, 3_600_000);
        let mut reference = empty_histogram(3_600_000);
        for (offset_s, value) in [(0, 120), (1, 455), (2, 1300), (3, 212), (4, 390), (5, 800)] {
            windows
                .record(T0_MS + offset_s * 1000, value, T0_MS + 5_000)
                .unwrap();
            reference.record(value).unwrap();
        }
        let reading = windows.read(T0_MS + 5_000);
        assert_eq!(reading.sec30, HistogramStats::of(&reference));
        assert_eq!(reading.sec30.count, 6);
        assert_eq!(reading.sec30.max, Some(1300));
        assert_eq!(reading.today, reading.sec30);
        // 30 s after the first value it leaves the 30 s window but not 15 m.
        let later = windows.read(T0_MS + 30_000);
        assert_eq!(later.sec30.count, 5);
        assert_eq!(later.min15.count, 6);
    }

    #[test]
    fn export_and_import_keep_every_window() {
        let mut windows = HistogramWindows::new(T0_MS, 300, Tz::UTC, 3_600_000);
        for (offset_ms, value) in [
            (-2_000_000, 5),
            (-800_000, 7000),
            (-20_000, 123_456),
            (0, 3),
            (60_000, 99),
        ] {
            windows.record(T0_MS + offset_ms, value, T0_MS).unwrap();
        }
        let mut restored = HistogramWindows::import(&windows.export(), 300, Tz::UTC, 3_600_000);
        for offset_ms in [0, 30_000, 60_000, 900_000] {
            assert_eq!(
                restored.read(T0_MS + offset_ms),
                windows.read(T0_MS + offset_ms),
                "at +{offset_ms}"
            );
        }
    }

    #[test]
    fn an_idle_series_holds_no_ring_nor_histogram_until_a_value_comes() {
        let mut windows = HistogramWindows::new(T0_MS, 300, Tz::UTC, 3_600_000);
        assert!(windows.slices.is_empty() && windows.today.is_none());
        assert_eq!(windows.read(T0_MS + 3_600_000).today.count, 0);
        assert!(windows.slices.is_empty() && windows.today.is_none());
        let at_ms = T0_MS + 3_600_000;
        windows.record(at_ms, 120, at_ms).unwrap();
        assert_eq!(windows.slices.len(), 2 * 900 + 300 + 1);
        assert_eq!(windows.read(at_ms).sec30.count, 1);
        let later_ms = at_ms + (2 * 900 + 300 + 1) * 1000;
        assert_eq!(windows.read(later_ms).today.count, 1);
        assert!(windows.slices.is_empty(), "the ring is given back");
        assert_eq!(windows.export().today, vec![(120, 1)]);
    }

    #[test]
    fn an_empty_window_has_no_quantiles() {
        let mut windows = HistogramWindows::new(T0_MS, 300, Tz::UTC, 3_600_000);
        assert_eq!(windows.read(T0_MS).sec30, HistogramStats::default());
        assert_eq!(windows.read(T0_MS).sec30.p95, None);
    }

    #[test]
    fn values_past_the_maximum_are_refused() {
        let mut windows = HistogramWindows::new(T0_MS, 300, Tz::UTC, 1000);
        assert_eq!(
            windows.record(T0_MS, 1001, T0_MS),
            Err(RecordError::ValueOutOfRange(1001))
        );
        assert_eq!(windows.read(T0_MS).today.count, 0);
    }
}
