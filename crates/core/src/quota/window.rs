//! Fixed windows on the UTC clock: a minute, a day, a calendar month. A
//! counter lives for one window (its id is part of its key), so every
//! replica counting the same window agrees on where it starts and ends
//! without talking to the others; a counter without a window (requests in
//! flight) never resets.

use crate::civil;

/// The period a limit counts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    Minute,
    Day,
    Month,
    /// No period: a gauge (requests in flight).
    None,
}

const MINUTE_MS: u64 = 60_000;
const DAY_MS: u64 = 86_400_000;

impl Window {
    /// The window containing `now_ms` (Unix milliseconds): its id and the
    /// Unix milliseconds at which it ends.
    pub fn at(self, now_ms: u64) -> (u64, u64) {
        match self {
            Window::Minute => {
                let id = now_ms / MINUTE_MS;
                (id, (id + 1) * MINUTE_MS)
            }
            Window::Day => {
                let id = now_ms / DAY_MS;
                (id, (id + 1) * DAY_MS)
            }
            Window::Month => {
                let (y, m) = year_month(now_ms / DAY_MS);
                let id = y * 12 + (m - 1);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                (id, days_from_civil(ny, nm) * DAY_MS)
            }
            Window::None => (0, u64::MAX),
        }
    }

    /// One letter in counter keys.
    pub fn tag(self) -> &'static str {
        match self {
            Window::Minute => "m",
            Window::Day => "d",
            Window::Month => "M",
            Window::None => "g",
        }
    }
}

/// The (year, month) of a day count since 1970-01-01.
fn year_month(days: u64) -> (u64, u64) {
    let (y, m, _) = civil::civil_from_days(days as i64);
    (y as u64, u64::from(m))
}

/// Days since 1970-01-01 of the first day of `m`/`y` (dates after the epoch).
fn days_from_civil(y: u64, m: u64) -> u64 {
    civil::days_from_civil(y as i64, m as u32, 1) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_start_and_end_on_the_utc_clock() {
        // 2026-12-06T16:45:30Z
        let now = 1_796_575_530_000;
        let (m, end) = Window::Minute.at(now);
        assert_eq!(end - now, 30_000);
        assert_eq!(Window::Minute.at(end).0, m + 1);
        let (_, day_end) = Window::Day.at(now);
        assert_eq!(day_end, 1_796_601_600_000, "2026-12-07T00:00Z");
        let (id, month_end) = Window::Month.at(now);
        assert_eq!(id, 2026 * 12 + 11);
        assert_eq!(month_end, 1_798_761_600_000, "2027-01-01T00:00Z");
        // Leap February: 2028-02-29 is still February.
        let feb29 = days_from_civil(2028, 2) * DAY_MS + 28 * DAY_MS;
        assert_eq!(year_month(feb29 / DAY_MS), (2028, 2));
        assert_eq!(Window::Month.at(feb29).1, days_from_civil(2028, 3) * DAY_MS);
        assert_eq!(days_from_civil(1970, 1), 0);
        assert_eq!(Window::None.at(now), (0, u64::MAX));
    }
}
