//! RFC 3339 timestamps as the Awala Internet Endpoint reads them: UTC, milliseconds, `Z`.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::domain::Timestamp;

/// Formats `t` as `2026-01-02T03:04:05.678Z`.
pub fn format_rfc3339(t: Timestamp) -> String {
    format_fraction(t.0.div_euclid(1000), t.0.rem_euclid(1000), 3)
}

/// Formats `micros` microseconds since the epoch as `2026-01-02T03:04:05.678901Z`: the
/// time of a log line.
pub fn format_rfc3339_micros(micros: i64) -> String {
    format_fraction(
        micros.div_euclid(1_000_000),
        micros.rem_euclid(1_000_000),
        6,
    )
}

/// Written by hand, not through `time`'s formatter: every delivery formats two times and
/// every log line one, and the formatter's generality cost about 1% of the server's CPU.
fn format_fraction(seconds: i64, fraction: i64, digits: usize) -> String {
    let (year, month, day) = civil_date(seconds.div_euclid(86_400));
    if !(0..=9999).contains(&year) {
        // Out-of-range instants cannot come from a real clock; keep a valid string anyway.
        return format!("1970-01-01T00:00:00.{:0digits$}Z", 0);
    }
    let of_day = seconds.rem_euclid(86_400);
    let mut out = String::with_capacity(21 + digits);
    for (value, width, then) in [
        (year, 4, '-'),
        (month, 2, '-'),
        (day, 2, 'T'),
        (of_day / 3600, 2, ':'),
        (of_day / 60 % 60, 2, ':'),
        (of_day % 60, 2, '.'),
        (fraction, digits, 'Z'),
    ] {
        push_digits(&mut out, value, width);
        out.push(then);
    }
    out
}

/// Appends the last `width` decimal digits of `value` (not negative), zero-padded.
fn push_digits(out: &mut String, value: i64, width: usize) {
    for place in (0..width).rev() {
        let digit = value / 10i64.pow(place as u32) % 10;
        out.push(char::from(b'0' + digit as u8));
    }
}

/// The proleptic Gregorian date `days` after 1970-01-01, as (year, month, day).
/// Counted in 400-year eras of 146,097 days from 0000-03-01, so that the leap day ends
/// a year (the civil-from-days method of Howard Hinnant's date algorithms).
fn civil_date(days: i64) -> (i64, i64, i64) {
    let from_march_0000 = days + 719_468;
    let era = from_march_0000.div_euclid(146_097);
    let day_of_era = from_march_0000.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    // Months from March, each run of five spanning 153 days.
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = era * 400 + year_of_era + i64::from(month <= 2);
    (year, month, day)
}

/// Parses an RFC 3339 timestamp; `None` if it is not one.
pub fn parse_rfc3339(s: &str) -> Option<Timestamp> {
    let dt = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    i64::try_from(dt.unix_timestamp_nanos() / 1_000_000)
        .ok()
        .map(Timestamp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn formats_with_milliseconds_and_z() {
        assert_eq!(format_rfc3339(Timestamp(0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_rfc3339(Timestamp(1_767_323_045_678)),
            "2026-01-02T03:04:05.678Z"
        );
    }

    #[test]
    fn leap_days_and_the_ends_of_the_range() {
        // A leap day, 2100-03-01 (2100 is no leap year), the last instant of 9999, and
        // the first out of range at each end.
        for (ms, expected) in [
            (1_709_251_199_999, "2024-02-29T23:59:59.999Z"),
            (4_107_542_400_000, "2100-03-01T00:00:00.000Z"),
            (253_402_300_799_999, "9999-12-31T23:59:59.999Z"),
            (253_402_300_800_000, "1970-01-01T00:00:00.000Z"),
            (-62_167_219_200_001, "1970-01-01T00:00:00.000Z"),
        ] {
            assert_eq!(format_rfc3339(Timestamp(ms)), expected, "{ms}");
        }
        assert_eq!(format_rfc3339_micros(-1), "1969-12-31T23:59:59.999999Z");
    }

    #[test]
    fn every_day_from_year_0_to_9999_is_the_date_time_gives() {
        let mut date = time::Date::from_calendar_date(0, time::Month::January, 1).expect("date");
        let mut days = -719_528; // 0000-01-01, in days from 1970-01-01
        loop {
            let expected = (
                i64::from(date.year()),
                i64::from(u8::from(date.month())),
                i64::from(date.day()),
            );
            assert_eq!(civil_date(days), expected, "day {days}");
            match date.next_day() {
                Some(next) if next.year() <= 9999 => date = next,
                _ => break,
            }
            days += 1;
        }
        assert_eq!(days, 2_932_896, "9999-12-31");
    }

    proptest! {
        /// Against `time`'s formatter, from year 0 to 9999.
        #[test]
        fn formats_as_time_does(micros in -62_167_219_200_000_000i64..253_402_300_800_000_000) {
            let ms = micros.div_euclid(1000);
            let at = |us: i64| {
                OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000).expect("in range")
            };
            let millis = time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
            );
            let micro = time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
            );
            prop_assert_eq!(
                format_rfc3339(Timestamp(ms)),
                at(ms * 1000).format(&millis).expect("format")
            );
            prop_assert_eq!(
                format_rfc3339_micros(micros),
                at(micros).format(&micro).expect("format")
            );
        }

        #[test]
        fn round_trips(ms in 0i64..4_102_444_800_000) {
            prop_assert_eq!(parse_rfc3339(&format_rfc3339(Timestamp(ms))), Some(Timestamp(ms)));
        }
    }
}
