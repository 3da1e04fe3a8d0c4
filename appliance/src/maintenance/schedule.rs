//! When things run: an interval (`30m`, `6h`, `1d`) or a daily time (`daily 02:30`, UTC).
//! Used by `serve --maintenance-at` and validated for policies' `schedule` field.

use std::fmt;

/// A schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Every so many seconds, counted from the Unix epoch (so `6h` runs at 00:00, 06:00, …).
    Every(u64),
    /// Every day at this minute of the day, UTC.
    Daily { hour: u8, minute: u8 },
}

/// Why a schedule could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("schedule {0:?}: expected an interval like `30m`, `6h` or `1d`, or `daily HH:MM` (UTC)")]
pub struct BadSchedule(pub String);

const US: i64 = 1_000_000;
/// Longest interval accepted: a year.
const MAX_INTERVAL_SECS: u64 = 366 * 86_400;

impl Schedule {
    /// Parses `30m`, `6h`, `1d` or `daily HH:MM`.
    ///
    /// # Errors
    /// [`BadSchedule`] for anything else (and intervals under a minute).
    pub fn parse(s: &str) -> Result<Self, BadSchedule> {
        let bad = || BadSchedule(s.to_string());
        let t = s.trim();
        if let Some(hm) = t.strip_prefix("daily ") {
            let (h, m) = hm.trim().split_once(':').ok_or_else(bad)?;
            let hour: u8 = h.parse().map_err(|_| bad())?;
            let minute: u8 = m.parse().map_err(|_| bad())?;
            if hour > 23 || minute > 59 || m.len() != 2 {
                return Err(bad());
            }
            return Ok(Self::Daily { hour, minute });
        }
        let unit = t.chars().last().ok_or_else(bad)?;
        let n: u64 = t[..t.len() - unit.len_utf8()].parse().map_err(|_| bad())?;
        let secs = match unit {
            'm' => n.checked_mul(60),
            'h' => n.checked_mul(3600),
            'd' => n.checked_mul(86_400),
            _ => None,
        }
        .filter(|s| (60..=MAX_INTERVAL_SECS).contains(s))
        .ok_or_else(bad)?;
        Ok(Self::Every(secs))
    }

    /// The first time strictly after `now_us` this schedule fires (microseconds since the
    /// epoch).
    #[must_use]
    pub fn next_after(self, now_us: i64) -> i64 {
        let period = match self {
            Self::Every(secs) => i64::try_from(secs.min(MAX_INTERVAL_SECS)).unwrap_or(1) * US,
            Self::Daily { .. } => 86_400 * US,
        };
        let offset = match self {
            Self::Every(_) => 0,
            Self::Daily { hour, minute } => (i64::from(hour) * 3600 + i64::from(minute) * 60) * US,
        };
        // The next instant of the form k·period + offset after now.
        let k = (now_us - offset).div_euclid(period) + 1;
        k * period + offset
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Every(s) if s % 86_400 == 0 => write!(f, "{}d", s / 86_400),
            Self::Every(s) if s % 3600 == 0 => write!(f, "{}h", s / 3600),
            Self::Every(s) => write!(f, "{}m", s / 60),
            Self::Daily { hour, minute } => write!(f, "daily {hour:02}:{minute:02}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3600 * US;
    /// 2026-01-05 00:00 UTC.
    const T0: i64 = 1_767_571_200_000_000;

    #[test]
    fn parses_and_prints_back() {
        for s in ["30m", "6h", "1d", "daily 02:30", "daily 00:00"] {
            assert_eq!(Schedule::parse(s).unwrap().to_string(), s);
        }
        for bad in [
            "",
            "6",
            "30s",
            "1m0",
            "daily 24:00",
            "daily 2:3",
            "daily",
            "weekly 03:00",
            "0h",
            "367d",
            "200000000d",
        ] {
            assert!(Schedule::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn next_times_fall_on_the_schedule() {
        let daily = Schedule::parse("daily 03:00").unwrap();
        assert_eq!(daily.next_after(T0), T0 + 3 * H);
        assert_eq!(daily.next_after(T0 + 3 * H), T0 + 27 * H, "strictly after");
        assert_eq!(daily.next_after(T0 + 3 * H - 1), T0 + 3 * H);
        let six = Schedule::parse("6h").unwrap();
        assert_eq!(six.next_after(T0 + H), T0 + 6 * H);
        assert_eq!(six.next_after(T0 + 6 * H), T0 + 12 * H);
    }
}
