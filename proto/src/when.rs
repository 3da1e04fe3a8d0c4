//! Times and durations as people type them (`30d`, `2027-01-31`, `2027-01-31T12:00:00Z`) and
//! as both binaries print them (RFC 3339, UTC). Shared so that the client and the appliance read
//! `--until` and `--lock` the same way.

use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time};

const US: i64 = 1_000_000;

/// Reads a duration: a whole number and a unit, `s`, `m`, `h`, `d`, `w` or `y` (365 days):
/// `90m`, `12h`, `30d`, `1y`. Returns seconds.
///
/// # Errors
/// Anything else, and durations beyond 1,000 years.
pub fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let bad =
        || format!("duration {s:?}: expected a number and a unit (s, m, h, d, w, y), e.g. 30d");
    let t = s.trim();
    let unit = t.chars().last().ok_or_else(bad)?;
    let n: u64 = t[..t.len() - unit.len_utf8()].parse().map_err(|_| bad())?;
    let per = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        'w' => 7 * 86_400,
        'y' => 365 * 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(per)
        .filter(|secs| *secs <= 1000 * 365 * 86_400)
        .ok_or_else(bad)
}

/// Reads a point in time: `YYYY-MM-DD` (midnight UTC), `YYYY-MM-DDTHH:MM[:SS][Z]` (UTC), or a
/// duration from `now_us` (`30d`, `+30d`). Returns Unix microseconds.
///
/// # Errors
/// Anything else.
pub fn parse_time_us(s: &str, now_us: i64) -> Result<i64, String> {
    let t = s.trim();
    let relative = t.strip_prefix('+').unwrap_or(t);
    if let Ok(secs) = parse_duration_secs(relative) {
        let d = i64::try_from(secs).unwrap_or(i64::MAX).saturating_mul(US);
        return Ok(now_us.saturating_add(d));
    }
    let bad = || {
        format!("time {s:?}: expected YYYY-MM-DD, YYYY-MM-DDTHH:MM[:SS]Z (UTC) or a duration from now such as 30d")
    };
    let t = t.strip_suffix('Z').unwrap_or(t);
    let (day, clock) = t.split_once(['T', ' ']).unwrap_or((t, "00:00"));
    let mut days = day.split('-');
    let num = |part: Option<&str>| part.and_then(|v| v.parse::<i32>().ok()).ok_or_else(bad);
    let (year, month, mday) = (num(days.next())?, num(days.next())?, num(days.next())?);
    let mut clocks = clock.split(':');
    let (hour, minute) = (num(clocks.next())?, num(clocks.next())?);
    let second = match clocks.next() {
        Some(v) => num(Some(v))?,
        None => 0,
    };
    if days.next().is_some() || clocks.next().is_some() {
        return Err(bad());
    }
    let small = |v: i32| u8::try_from(v).map_err(|_| bad());
    let month = Month::try_from(small(month)?).map_err(|_| bad())?;
    let date = Date::from_calendar_date(year, month, small(mday)?).map_err(|_| bad())?;
    let time = Time::from_hms(small(hour)?, small(minute)?, small(second)?).map_err(|_| bad())?;
    let at = PrimitiveDateTime::new(date, time).assume_utc();
    i64::try_from(at.unix_timestamp_nanos() / 1000).map_err(|_| bad())
}

/// `2027-01-31T12:00:00Z` for Unix microseconds.
#[must_use]
pub fn format_us(us: i64) -> String {
    match OffsetDateTime::from_unix_timestamp(us.div_euclid(US)) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("{us} µs"),
    }
}

/// How a snapshot's protection and lock read in a listing at `now_us` (empty for neither):
/// `  protected`, `  protected until …`, `  locked until …`.
#[must_use]
pub fn holds(protected_until_us: i64, lock_until_us: i64, now_us: i64) -> String {
    let mut out = String::new();
    if protected_until_us == i64::MAX {
        out.push_str("  protected");
    } else if protected_until_us > now_us {
        out.push_str("  protected until ");
        out.push_str(&format_us(protected_until_us));
    }
    if lock_until_us > now_us {
        out.push_str("  locked until ");
        out.push_str(&format_us(lock_until_us));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_times() {
        assert_eq!(parse_duration_secs("90m"), Ok(5400));
        assert_eq!(parse_duration_secs("2w"), Ok(14 * 86_400));
        for bad in ["", "d", "5", "5x", "-5d", "99999999y"] {
            assert!(parse_duration_secs(bad).is_err(), "{bad:?}");
        }
        let t = parse_time_us("2027-01-31", 0).unwrap();
        assert_eq!(format_us(t), "2027-01-31T00:00:00Z");
        let t = parse_time_us("2027-01-31T12:34:56Z", 0).unwrap();
        assert_eq!(format_us(t), "2027-01-31T12:34:56Z");
        assert_eq!(parse_time_us("+1d", 5), Ok(5 + 86_400 * US));
        assert_eq!(parse_time_us("1h", 0), Ok(3600 * US));
        for bad in ["2027-13-01", "2027-02-30", "tomorrow", "2027-01-01T25:00"] {
            assert!(parse_time_us(bad, 0).is_err(), "{bad:?}");
        }
    }
}
