//! Event time: RFC 3339 parsing and formatting, epoch milliseconds, and the
//! injected clock (`Clock`) that every time-dependent component reads.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

/// Milliseconds since the Unix epoch, UTC.
pub type Millis = i64;

pub const MINUTE_MS: Millis = 60_000;
pub const HOUR_MS: Millis = 3_600_000;
pub const DAY_MS: Millis = 86_400_000;

/// Latest instant accepted as an event time: 9999-12-31T23:59:59.999Z.
pub const MAX_TS: Millis = 253_402_300_799_999;

/// Days since 1970-01-01 for a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// Why a timestamp string was refused; the message is shown to API users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    #[error("not RFC 3339 or epoch ms")]
    Syntax,
    #[error("missing UTC offset (RFC 3339 needs `Z` or `+HH:MM`)")]
    NoOffset,
    #[error("date or time out of range")]
    Range,
}

fn digits(b: &[u8], at: usize, n: usize) -> Result<u32, TimeError> {
    let s = b.get(at..at + n).ok_or(TimeError::Syntax)?;
    let mut v = 0u32;
    for &c in s {
        if !c.is_ascii_digit() {
            return Err(TimeError::Syntax);
        }
        v = v * 10 + (c - b'0') as u32;
    }
    Ok(v)
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`; `t`/space may stand for `T`,
/// `z` for `Z`. Fractions beyond milliseconds are truncated.
pub fn parse_rfc3339(s: &str) -> Result<Millis, TimeError> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return Err(if b.len() == 19 {
            TimeError::NoOffset
        } else {
            TimeError::Syntax
        });
    }
    let year = digits(b, 0, 4)? as i64;
    if b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return Err(TimeError::Syntax);
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return Err(TimeError::Syntax);
    }
    let month = digits(b, 5, 2)?;
    let day = digits(b, 8, 2)?;
    let hour = digits(b, 11, 2)?;
    let min = digits(b, 14, 2)?;
    let sec = digits(b, 17, 2)?;
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return Err(TimeError::Range);
    }
    // 60 is a leap second; it is folded into the next second like most systems do.
    if hour > 23 || min > 59 || sec > 60 {
        return Err(TimeError::Range);
    }
    let mut i = 19;
    let mut ms = 0u32;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 3 {
                ms = ms * 10 + (b[i] - b'0') as u32;
            }
            i += 1;
        }
        let n = i - start;
        if n == 0 {
            return Err(TimeError::Syntax);
        }
        for _ in n..3 {
            ms *= 10;
        }
    }
    let offset_min: i64 = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
            let oh = digits(b, i + 1, 2)? as i64;
            let om = digits(b, i + 4, 2)? as i64;
            if oh > 23 || om > 59 {
                return Err(TimeError::Range);
            }
            let o = oh * 60 + om;
            if sign == b'-' { -o } else { o }
        }
        None => return Err(TimeError::NoOffset),
        _ => return Err(TimeError::Syntax),
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour as i64 * 3600 + min as i64 * 60 + sec as i64 - offset_min * 60;
    let t = secs * 1000 + ms as i64;
    if !(0..=MAX_TS).contains(&t) {
        return Err(TimeError::Range);
    }
    Ok(t)
}

/// `86400000` → `1d`, `300000` → `5m`, `5000` → `5s`.
pub fn human_ms(ms: Millis) -> String {
    if ms % 86_400_000 == 0 && ms > 0 {
        format!("{}d", ms / 86_400_000)
    } else if ms % 3_600_000 == 0 && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % MINUTE_MS == 0 && ms > 0 {
        format!("{}m", ms / MINUTE_MS)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// A duration rounded down to its largest whole unit: `2d`, `3h`, `12m`, `40s`.
pub fn human_approx(ms: Millis) -> String {
    let units = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1000, "s"),
    ];
    for (u, name) in units {
        if ms.abs() >= u {
            return format!("{}{name}", ms / u);
        }
    }
    format!("{ms}ms")
}

/// Formats epoch ms as RFC 3339 UTC with `Z`, with milliseconds only when non-zero.
pub fn format_rfc3339(t: Millis) -> String {
    let mut s = String::with_capacity(24);
    write_rfc3339(&mut s, t);
    s
}

/// Appends [`format_rfc3339`]`(t)` to `out` without the formatting
/// machinery (answers with many points write one per point).
pub fn write_rfc3339(out: &mut String, t: Millis) {
    let days = t.div_euclid(DAY_MS);
    let rem = t.rem_euclid(DAY_MS);
    let (y, m, d) = civil_from_days(days);
    if !(0..=9999).contains(&y) {
        // Outside four-digit years: the general path.
        use std::fmt::Write;
        let secs = rem / 1000;
        let (hh, mm, ss, ms) = (secs / 3600, (secs / 60) % 60, secs % 60, rem % 1000);
        let _ = if ms == 0 {
            write!(out, "{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
        } else {
            write!(out, "{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{ms:03}Z")
        };
        return;
    }
    let secs = (rem / 1000) as u32;
    let ms = (rem % 1000) as u32;
    let digits = |b: &mut [u8], v: u32| {
        let mut v = v;
        for c in b.iter_mut().rev() {
            *c = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    let mut b = *b"0000-00-00T00:00:00.000Z";
    digits(&mut b[0..4], y as u32);
    digits(&mut b[5..7], m);
    digits(&mut b[8..10], d);
    digits(&mut b[11..13], secs / 3600);
    digits(&mut b[14..16], (secs / 60) % 60);
    digits(&mut b[17..19], secs % 60);
    let text = if ms == 0 {
        b[19] = b'Z';
        &b[..20]
    } else {
        digits(&mut b[20..23], ms);
        &b[..]
    };
    // ASCII digits and punctuation only.
    out.push_str(std::str::from_utf8(text).unwrap_or_default());
}

/// Parses a query-string time: RFC 3339 or integer epoch ms.
pub fn parse_time_param(s: &str) -> Result<Millis, TimeError> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()) {
        let v: Millis = s.parse().map_err(|_| TimeError::Range)?;
        return if v <= MAX_TS {
            Ok(v)
        } else {
            Err(TimeError::Range)
        };
    }
    parse_rfc3339(s)
}

/// Floor `t` to a multiple of `step` (UTC-aligned since the epoch is);
/// saturates at `Millis::MIN` for the open lower bound of a range.
pub fn align_down(t: Millis, step: Millis) -> Millis {
    t.div_euclid(step).saturating_mul(step)
}

/// The one source of wall-clock time. Production uses [`Clock::system`]; tests
/// use [`Clock::manual`] and advance it explicitly.
#[derive(Clone, Debug)]
pub struct Clock {
    manual: Option<Arc<AtomicI64>>,
}

impl Clock {
    pub fn system() -> Self {
        Clock { manual: None }
    }

    pub fn manual(start: Millis) -> Self {
        Clock {
            manual: Some(Arc::new(AtomicI64::new(start))),
        }
    }

    pub fn now_ms(&self) -> Millis {
        match &self.manual {
            Some(t) => t.load(Ordering::Relaxed),
            None => {
                #[allow(clippy::disallowed_methods)]
                let d = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                d.as_millis() as Millis
            }
        }
    }

    /// Moves a manual clock forward; a no-op on the system clock.
    pub fn advance(&self, by: Millis) {
        if let Some(t) = &self.manual {
            t.fetch_add(by, Ordering::Relaxed);
        }
    }

    pub fn set(&self, to: Millis) {
        if let Some(t) = &self.manual {
            t.store(to, Ordering::Relaxed);
        }
    }
}

/// Parses durations such as `5s`, `30s`, `2m`, `1h`, `7d`, `250ms` into milliseconds.
pub fn parse_duration_ms(s: &str) -> Option<Millis> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: Millis = num.parse().ok()?;
    let mult = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => MINUTE_MS,
        "h" => HOUR_MS,
        "d" => DAY_MS,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_examples() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_rfc3339("2026-11-01T12:03:00Z"), Ok(1_793_534_580_000));
        assert_eq!(
            parse_rfc3339("2026-11-01T12:03:00.5Z"),
            Ok(1_793_534_580_500)
        );
        assert_eq!(
            parse_rfc3339("2026-11-01T13:03:00.123456+01:00"),
            Ok(1_793_534_580_123)
        );
        assert_eq!(
            parse_rfc3339("2026-11-01T12:03:00"),
            Err(TimeError::NoOffset)
        );
        assert_eq!(parse_rfc3339("2026-02-30T12:03:00Z"), Err(TimeError::Range));
        assert_eq!(parse_rfc3339("yesterday"), Err(TimeError::Syntax));
        assert_eq!(
            parse_rfc3339("2026-11-01T12:03:00ZZ"),
            Err(TimeError::Syntax)
        );
    }

    #[test]
    fn formats_examples() {
        assert_eq!(format_rfc3339(1_793_534_580_000), "2026-11-01T12:03:00Z");
        assert_eq!(
            format_rfc3339(1_793_534_580_007),
            "2026-11-01T12:03:00.007Z"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("5s"), Some(5000));
        assert_eq!(parse_duration_ms("2m"), Some(120_000));
        assert_eq!(parse_duration_ms("250ms"), Some(250));
        assert_eq!(parse_duration_ms("5"), None);
        assert_eq!(parse_duration_ms("x"), None);
    }

    proptest! {
        #[test]
        fn format_parse_roundtrip(t in 0i64..MAX_TS) {
            prop_assert_eq!(parse_rfc3339(&format_rfc3339(t)), Ok(t));
        }

        /// The hand-written digits agree with `format!` everywhere,
        /// before the epoch and past year 9999 included.
        #[test]
        fn fast_format_matches_the_formatter(t in -100_000_000_000_000i64..400_000_000_000_000) {
            let days = t.div_euclid(DAY_MS);
            let rem = t.rem_euclid(DAY_MS);
            let (y, m, d) = civil_from_days(days);
            let secs = rem / 1000;
            let ms = rem % 1000;
            let (hh, mm, ss) = (secs / 3600, (secs / 60) % 60, secs % 60);
            let want = if ms == 0 {
                format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
            } else {
                format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{ms:03}Z")
            };
            prop_assert_eq!(format_rfc3339(t), want);
            if (0..=9999).contains(&y) {
                prop_assert_eq!(format_rfc3339(align_down(t, MINUTE_MS)).len(), 20);
            }
        }

        #[test]
        fn civil_roundtrip(days in -1_000_000i64..2_000_000) {
            let (y, m, d) = civil_from_days(days);
            prop_assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
