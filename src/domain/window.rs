//! Exact rolling windows of one counter series: one-second buckets in a ring with
//! running totals, so a read is O(1) and a slide is O(seconds passed).
//!
//! Owns: the buckets of the last `BUCKET_HISTORY_S` seconds (plus the seconds of
//! allowed clock skew ahead), the totals of `30s`, `15m`, their `prev`, and `today`.
//! Must not: read the clock, know about events, tenants or actors. Every call
//! takes `now_ms`, and time never moves backwards inside a series.
//!
//! A window `W` at time `t` covers the events whose second `floor(ts/1000)` lies in
//! `(floor(t/1000) - W, floor(t/1000)]`; its `prev` covers the `W` seconds before
//! that; `today` covers the seconds from the tenant's local midnight to `t`.

use std::collections::BTreeMap;

use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use super::time::{day_bounds, second_of_ms, DayBounds, SlidingWindow, BUCKET_HISTORY_S};

/// A sum and a count. For ratio metrics `sum` holds the numerator count and
/// `count` the denominator count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub sum: i128,
    pub count: u64,
}

impl Tally {
    pub fn add(&mut self, other: Tally) {
        self.sum += other.sum;
        self.count += other.count;
    }

    /// Removes a tally that was added before; the totals never go below zero
    /// because only what entered a total ever leaves it.
    pub fn sub(&mut self, other: Tally) {
        self.sum -= other.sum;
        self.count -= other.count;
    }
}

/// A sliding window's current value and its `prev`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlidingTally {
    pub current: Tally,
    pub prev: Tally,
}

/// Every window of a counter series at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterReading {
    pub sec30: SlidingTally,
    pub min15: SlidingTally,
    pub today: Tally,
}

impl CounterReading {
    pub fn sliding(&self, window: SlidingWindow) -> SlidingTally {
        match window {
            SlidingWindow::Sec30 => self.sec30,
            SlidingWindow::Min15 => self.min15,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("event second {ts_second} is beyond the allowed skew ahead of {head_second}")]
    TooFarAhead { ts_second: i64, head_second: i64 },
    #[error("value {0} is outside the histogram's range")]
    ValueOutOfRange(u64),
}

/// A counter series as a snapshot stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterExport {
    pub head_s: i64,
    /// `(second, sum, count)` of every non-zero bucket.
    pub buckets: Vec<(i64, i128, u64)>,
    pub today: (i128, u64),
}

/// The windows of one counter series.
#[derive(Debug, Clone)]
pub struct CounterWindows {
    // Narrow cells keep a series within its memory budget; the rare second whose
    // sum or count would overflow them spills the excess into `overflow`. The
    // rings are allocated when the first event arrives and freed once every
    // second of them has left the windows, so an idle series costs its struct
    // alone (memory follows traffic, not the number of series).
    sums: Box<[i64]>,
    counts: Box<[u32]>,
    overflow: BTreeMap<i64, Tally>,
    ring_len: i64,
    ahead_s: i64,
    head_s: i64,
    tz: Tz,
    day: DayBounds,
    sec30: SlidingTally,
    min15: SlidingTally,
    today: Tally,
}

/// Ring length for a series that accepts events up to `ahead_s` seconds in the
/// future: the history, the future, and one slot for the second being expired.
pub fn ring_len_s(ahead_s: i64) -> i64 {
    BUCKET_HISTORY_S + ahead_s + 1
}

impl CounterWindows {
    /// `ahead_s`: how many seconds past `now` an event may lie (the clock skew).
    pub fn new(now_ms: i64, ahead_s: i64, tz: Tz) -> Self {
        let ring_len = ring_len_s(ahead_s);
        let head_s = second_of_ms(now_ms);
        CounterWindows {
            sums: Box::default(),
            counts: Box::default(),
            overflow: BTreeMap::new(),
            ring_len,
            ahead_s,
            head_s,
            tz,
            day: day_bounds(head_s, tz),
            sec30: SlidingTally::default(),
            min15: SlidingTally::default(),
            today: Tally::default(),
        }
    }

    pub fn head_second(&self) -> i64 {
        self.head_s
    }

    fn slot(&self, second: i64) -> usize {
        second.rem_euclid(self.ring_len) as usize
    }

    /// True while the rings hold (or may hold) data.
    fn has_rings(&self) -> bool {
        !self.sums.is_empty()
    }

    /// The tally of one second; meaningful for seconds inside the ring.
    pub fn bucket(&self, second: i64) -> Tally {
        let mut tally = Tally::default();
        if self.has_rings() {
            let slot = self.slot(second);
            tally = Tally {
                sum: self.sums[slot] as i128,
                count: self.counts[slot] as u64,
            };
        }
        if !self.overflow.is_empty() {
            if let Some(extra) = self.overflow.get(&second) {
                tally.add(*extra);
            }
        }
        tally
    }

    fn clear_bucket(&mut self, second: i64) {
        if self.has_rings() {
            let slot = self.slot(second);
            self.sums[slot] = 0;
            self.counts[slot] = 0;
        }
        if !self.overflow.is_empty() {
            self.overflow.remove(&second);
        }
    }

    fn add_to_bucket(&mut self, second: i64, sum: i64, count: u32) {
        if !self.has_rings() {
            self.sums = vec![0; self.ring_len as usize].into_boxed_slice();
            self.counts = vec![0; self.ring_len as usize].into_boxed_slice();
        }
        let slot = self.slot(second);
        match (
            self.sums[slot].checked_add(sum),
            self.counts[slot].checked_add(count),
        ) {
            (Some(new_sum), Some(new_count)) => {
                self.sums[slot] = new_sum;
                self.counts[slot] = new_count;
            }
            _ => self.overflow.entry(second).or_default().add(Tally {
                sum: sum as i128,
                count: count as u64,
            }),
        }
    }

    /// Slides every window to `now_ms`; a time before the head changes nothing.
    pub fn advance(&mut self, now_ms: i64) {
        let target_s = second_of_ms(now_ms);
        // Past `ring_len` steps every bucket that held data has entered and left
        // all sliding windows, so the rest of a long idle gap is a jump; a
        // series without data jumps at once.
        let steps = if self.has_rings() || !self.overflow.is_empty() {
            (target_s - self.head_s).min(self.ring_len)
        } else {
            0
        };
        for _ in 0..steps {
            self.step();
        }
        if steps == self.ring_len {
            // every second of the rings has left the windows: give them back
            self.sums = Box::default();
            self.counts = Box::default();
        }
        if target_s > self.head_s {
            debug_assert_eq!(self.sec30, SlidingTally::default());
            debug_assert_eq!(self.min15, SlidingTally::default());
            self.head_s = target_s;
            if target_s >= self.day.end_s {
                self.day = day_bounds(target_s, self.tz);
                self.today = Tally::default();
            }
        }
    }

    fn step(&mut self) {
        let second = self.head_s + 1;
        let entering = self.bucket(second);
        if second >= self.day.end_s {
            self.day = day_bounds(second, self.tz);
            self.today = Tally::default();
        }
        self.today.add(entering);
        for window in SlidingWindow::ALL {
            let length_s = window.length_s();
            let leaving_current = self.bucket(second - length_s);
            let leaving_prev = self.bucket(second - 2 * length_s);
            let totals = match window {
                SlidingWindow::Sec30 => &mut self.sec30,
                SlidingWindow::Min15 => &mut self.min15,
            };
            totals.current.add(entering);
            totals.current.sub(leaving_current);
            totals.prev.add(leaving_current);
            totals.prev.sub(leaving_prev);
        }
        self.clear_bucket(second - BUCKET_HISTORY_S);
        self.head_s = second;
    }

    /// Counts `sum` and `count` at event time `ts_ms`, after sliding to `now_ms`.
    pub fn record(
        &mut self,
        ts_ms: i64,
        sum: i64,
        count: u32,
        now_ms: i64,
    ) -> Result<(), RecordError> {
        self.advance(now_ms);
        let second = second_of_ms(ts_ms);
        let head_s = self.head_s;
        if second > head_s + self.ahead_s {
            return Err(RecordError::TooFarAhead {
                ts_second: second,
                head_second: head_s,
            });
        }
        let delta = Tally {
            sum: sum as i128,
            count: count as u64,
        };
        if second <= head_s - BUCKET_HISTORY_S {
            // Older than every sliding window: only today can still hold it.
            if second >= self.day.start_s {
                self.today.add(delta);
            }
            return Ok(());
        }
        self.add_to_bucket(second, sum, count);
        if second > head_s {
            // A future second enters the totals when the head reaches it.
            return Ok(());
        }
        if second >= self.day.start_s {
            self.today.add(delta);
        }
        for window in SlidingWindow::ALL {
            let length_s = window.length_s();
            let totals = match window {
                SlidingWindow::Sec30 => &mut self.sec30,
                SlidingWindow::Min15 => &mut self.min15,
            };
            if second > head_s - length_s {
                totals.current.add(delta);
            } else if second > head_s - 2 * length_s {
                totals.prev.add(delta);
            }
        }
        Ok(())
    }

    /// Every window after sliding to `now_ms`.
    pub fn read(&mut self, now_ms: i64) -> CounterReading {
        self.advance(now_ms);
        CounterReading {
            sec30: self.sec30,
            min15: self.min15,
            today: self.today,
        }
    }

    /// Sets a bucket's tally (import only; the totals are recomputed after).
    fn set_bucket(&mut self, second: i64, tally: Tally) {
        self.clear_bucket(second);
        match (i64::try_from(tally.sum), u32::try_from(tally.count)) {
            (Ok(sum), Ok(count)) => self.add_to_bucket(second, sum, count),
            _ => {
                self.overflow.insert(second, tally);
            }
        }
    }

    /// The state as a snapshot keeps it: the non-zero buckets and today.
    pub fn export(&self) -> CounterExport {
        self.export_from(i64::MIN)
    }

    /// `export`, with the buckets of seconds before `from_s` left out.
    pub fn export_from(&self, from_s: i64) -> CounterExport {
        let mut buckets = Vec::new();
        let first_s = from_s.max(self.head_s - BUCKET_HISTORY_S + 1);
        for second in first_s..=(self.head_s + self.ahead_s) {
            let tally = self.bucket(second);
            if tally != Tally::default() {
                buckets.push((second, tally.sum, tally.count));
            }
        }
        CounterExport {
            head_s: self.head_s,
            buckets,
            today: (self.today.sum, self.today.count),
        }
    }

    /// The oldest second whose bucket the series still holds (and `import`
    /// keeps); `None` while it holds none.
    pub fn held_from_s(&self) -> Option<i64> {
        (self.has_rings() || !self.overflow.is_empty())
            .then_some(self.head_s - BUCKET_HISTORY_S + 1)
    }

    /// Rebuilds a series from `export`. Buckets outside the ring (a smaller
    /// skew than when exported) are dropped; totals are recomputed.
    pub fn import(export: &CounterExport, ahead_s: i64, tz: Tz) -> CounterWindows {
        // a smaller skew than when exported must not drop acknowledged future events
        let furthest_s = export
            .buckets
            .iter()
            .map(|b| b.0 - export.head_s)
            .max()
            .unwrap_or(0);
        let ahead_s = ahead_s.max(furthest_s.min(3600));
        let mut windows = CounterWindows::new(export.head_s.saturating_mul(1000), ahead_s, tz);
        let head_s = windows.head_s;
        for &(second, sum, count) in &export.buckets {
            if second > head_s - BUCKET_HISTORY_S && second <= head_s + ahead_s {
                windows.set_bucket(second, Tally { sum, count });
            }
        }
        for window in SlidingWindow::ALL {
            let length_s = window.length_s();
            let mut totals = SlidingTally::default();
            for second in (head_s - 2 * length_s + 1)..=head_s {
                if second > head_s - length_s {
                    totals.current.add(windows.bucket(second));
                } else {
                    totals.prev.add(windows.bucket(second));
                }
            }
            match window {
                SlidingWindow::Sec30 => windows.sec30 = totals,
                SlidingWindow::Min15 => windows.min15 = totals,
            }
        }
        windows.today = Tally {
            sum: export.today.0,
            count: export.today.1,
        };
        windows
    }

    /// Bytes this series holds on the heap and inline (for the memory budget).
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.sums.len() * std::mem::size_of::<i64>()
            + self.counts.len() * std::mem::size_of::<u32>()
            + self.overflow.len() * (std::mem::size_of::<(i64, Tally)>() + 16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_series_holds_no_rings_until_data_comes_and_after_it_left() {
        let now_ms = 1_763_805_600_000;
        let mut windows = CounterWindows::new(now_ms, 300, Tz::UTC);
        let bare = std::mem::size_of::<CounterWindows>();
        assert_eq!(windows.memory_bytes(), bare);
        // an idle hour costs no steps and no memory
        assert_eq!(windows.read(now_ms + 3_600_000).today, Tally::default());
        assert_eq!(windows.memory_bytes(), bare);
        let at_ms = now_ms + 3_600_000;
        windows.record(at_ms, 250, 1, at_ms).unwrap();
        assert_eq!(windows.memory_bytes(), bare + (2 * 900 + 300 + 1) * 12);
        assert_eq!(
            windows.read(at_ms).sec30.current,
            Tally { sum: 250, count: 1 }
        );
        // once every second of the ring has left the windows, it is given back
        let later_ms = at_ms + (2 * 900 + 300 + 1) * 1000;
        let reading = windows.read(later_ms);
        assert_eq!(windows.memory_bytes(), bare);
        assert_eq!(reading.min15, SlidingTally::default());
        assert_eq!(reading.today, Tally { sum: 250, count: 1 }, "still today");
        windows.record(later_ms, 5, 1, later_ms).unwrap();
        assert_eq!(windows.read(later_ms).today, Tally { sum: 255, count: 2 });
    }

    const T0_MS: i64 = 1_763_805_600_000; // 2025-11-22T10:00:00Z

    fn tally(sum: i128, count: u64) -> Tally {
        Tally { sum, count }
    }

    #[test]
    fn an_event_slides_through_current_prev_and_out() {
        let mut windows = CounterWindows::new(T0_MS, 300, Tz::UTC);
        windows.record(T0_MS, 500, 1, T0_MS).unwrap();
        let now = windows.read(T0_MS);
        assert_eq!(now.sec30.current, tally(500, 1));
        assert_eq!(now.min15.current, tally(500, 1));
        assert_eq!(now.today, tally(500, 1));
        // 29 s later still inside (t - 30, t]; at 30 s it is in prev.
        assert_eq!(windows.read(T0_MS + 29_999).sec30.current, tally(500, 1));
        let at30 = windows.read(T0_MS + 30_000);
        assert_eq!(at30.sec30.current, tally(0, 0));
        assert_eq!(at30.sec30.prev, tally(500, 1));
        assert_eq!(windows.read(T0_MS + 60_000).sec30.prev, tally(0, 0));
        let at900 = windows.read(T0_MS + 900_000);
        assert_eq!(at900.min15.current, tally(0, 0));
        assert_eq!(at900.min15.prev, tally(500, 1));
        assert_eq!(windows.read(T0_MS + 1_800_000).min15.prev, tally(0, 0));
        assert_eq!(windows.read(T0_MS + 1_800_000).today, tally(500, 1));
    }

    #[test]
    fn future_events_enter_when_the_clock_reaches_them() {
        let mut windows = CounterWindows::new(T0_MS, 300, Tz::UTC);
        windows.record(T0_MS + 10_000, 7, 1, T0_MS).unwrap();
        assert_eq!(windows.read(T0_MS + 9_999).sec30.current, tally(0, 0));
        assert_eq!(windows.read(T0_MS + 9_999).today, tally(0, 0));
        assert_eq!(windows.read(T0_MS + 10_000).sec30.current, tally(7, 1));
        assert_eq!(windows.read(T0_MS + 10_000).today, tally(7, 1));
    }

    #[test]
    fn beyond_the_skew_is_refused() {
        let mut windows = CounterWindows::new(T0_MS, 300, Tz::UTC);
        let error = windows.record(T0_MS + 301_000, 1, 1, T0_MS).unwrap_err();
        assert!(matches!(error, RecordError::TooFarAhead { .. }));
    }

    #[test]
    fn old_events_of_today_count_only_in_today() {
        let mut windows = CounterWindows::new(T0_MS, 300, Tz::UTC);
        windows.record(T0_MS - 3 * 3_600_000, 40, 1, T0_MS).unwrap();
        let reading = windows.read(T0_MS);
        assert_eq!(reading.today, tally(40, 1));
        assert_eq!(reading.min15.current, tally(0, 0));
        assert_eq!(reading.min15.prev, tally(0, 0));
    }

    #[test]
    fn today_resets_at_local_midnight_and_keeps_early_events_of_the_new_day() {
        let midnight_ms = 1_763_856_000_000; // 2025-11-23T00:00:00Z
        let mut windows = CounterWindows::new(midnight_ms - 5_000, 300, Tz::UTC);
        windows
            .record(midnight_ms - 2_000, 3, 1, midnight_ms - 5_000)
            .unwrap();
        windows
            .record(midnight_ms + 1_000, 4, 1, midnight_ms - 5_000)
            .unwrap();
        assert_eq!(windows.read(midnight_ms - 1).today, tally(3, 1));
        let after = windows.read(midnight_ms + 1_000);
        assert_eq!(after.today, tally(4, 1));
        assert_eq!(after.sec30.current, tally(7, 2));
    }

    #[test]
    fn a_long_idle_gap_clears_sliding_windows_and_rolls_the_day() {
        let mut windows = CounterWindows::new(T0_MS, 300, Tz::UTC);
        windows.record(T0_MS, 9, 1, T0_MS).unwrap();
        windows.record(T0_MS + 200_000, 5, 1, T0_MS).unwrap();
        let later = windows.read(T0_MS + 2 * 86_400_000);
        assert_eq!(later, CounterReading::default());
        windows.record(T0_MS + 2 * 86_400_000, 1, 1, T0_MS).unwrap();
        assert_eq!(
            windows.read(T0_MS + 2 * 86_400_000).sec30.current,
            tally(1, 1)
        );
    }

    #[test]
    fn overflowing_cells_spill_without_losing_a_unit() {
        let mut windows = CounterWindows::new(T0_MS, 300, Tz::UTC);
        let big = 1_000_000_000_000_000_i64; // 10^15, the largest amount
        for _ in 0..10_000 {
            windows.record(T0_MS, big, 1, T0_MS).unwrap();
        }
        let expected = tally(10_000 * big as i128, 10_000);
        assert_eq!(windows.read(T0_MS).sec30.current, expected);
        assert_eq!(windows.bucket(second_of_ms(T0_MS)), expected);
        assert_eq!(windows.read(T0_MS + 30_000).sec30.prev, expected);
        assert_eq!(windows.read(T0_MS + 1_800_000).min15.prev, tally(0, 0));
        assert!(windows.overflow.is_empty());
    }

    #[test]
    fn export_and_import_keep_every_window_and_the_future() {
        let mut windows = CounterWindows::new(T0_MS, 300, Tz::UTC);
        windows.record(T0_MS - 1_000_000, 1, 1, T0_MS).unwrap();
        windows.record(T0_MS - 40_000, 2, 1, T0_MS).unwrap();
        windows.record(T0_MS - 3_000, 4, 1, T0_MS).unwrap();
        windows.record(T0_MS + 9_000, 8, 1, T0_MS).unwrap();
        windows.record(T0_MS - 5 * 3_600_000, 16, 1, T0_MS).unwrap();
        for _ in 0..10_000 {
            windows
                .record(T0_MS - 1_000, 1_000_000_000_000_000, 1, T0_MS)
                .unwrap();
        }
        let export = windows.export();
        let mut restored = CounterWindows::import(&export, 300, Tz::UTC);
        for offset_ms in [0, 5_000, 9_000, 30_000, 900_000, 1_800_000] {
            assert_eq!(
                restored.read(T0_MS + offset_ms),
                windows.read(T0_MS + offset_ms),
                "at +{offset_ms}"
            );
        }
    }

    #[test]
    fn a_counter_series_fits_the_memory_budget() {
        let windows = CounterWindows::new(T0_MS, 300, Tz::UTC);
        assert!(
            windows.memory_bytes() <= 32 * 1024,
            "{}",
            windows.memory_bytes()
        );
    }
}
