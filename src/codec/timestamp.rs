//! RFC 3339 timestamps as the Awala Internet Endpoint reads them: UTC, milliseconds, `Z`.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;

use crate::domain::Timestamp;

/// Formats `t` as `2026-01-02T03:04:05.678Z`.
pub fn format_rfc3339(t: Timestamp) -> String {
    let fmt =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    let nanos = i128::from(t.0) * 1_000_000;
    OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|dt| dt.format(&fmt).ok())
        // Out-of-range instants cannot come from a real clock; keep a valid string anyway.
        .unwrap_or_else(|| "1970-01-01T00:00:00.000Z".to_owned())
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

    proptest! {
        #[test]
        fn round_trips(ms in 0i64..4_102_444_800_000) {
            prop_assert_eq!(parse_rfc3339(&format_rfc3339(Timestamp(ms))), Some(Timestamp(ms)));
        }
    }
}
