//! Server timestamps for chat messages: RFC 3339 in UTC with milliseconds, from the system clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The last second humantime formats (9999-12-31T23:59:59Z): past it, it fails instead.
const LAST_FORMATTED_SECOND: u64 = 253_402_300_799;

/// Now as `2026-11-21T10:34:13.123Z` (a clock before 1970 reads as 1970).
pub fn now_rfc3339() -> String {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format_rfc3339(since.as_secs(), since.subsec_millis())
}

/// Formats seconds since the Unix epoch (UTC) plus milliseconds; an instant after the year 9999
/// is written as its last millisecond.
pub fn format_rfc3339(secs: u64, millis: u32) -> String {
    let (secs, millis) = if secs > LAST_FORMATTED_SECOND {
        (LAST_FORMATTED_SECOND, 999)
    } else {
        (secs, millis.min(999))
    };
    let at = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(u64::from(millis));
    humantime::format_rfc3339_millis(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants() {
        assert_eq!(format_rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_rfc3339(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(
            format_rfc3339(1_795_256_927, 705),
            "2026-11-21T10:28:47.705Z"
        );
        assert_eq!(
            format_rfc3339(4_102_444_799, 999),
            "2099-12-31T23:59:59.999Z"
        );
        assert_eq!(format_rfc3339(u64::MAX, 0), "9999-12-31T23:59:59.999Z");
    }

    #[test]
    fn now_has_the_same_shape() {
        let now = now_rfc3339();
        assert_eq!(now.len(), "2026-11-21T10:28:47.705Z".len());
        assert!(now.ends_with('Z') && now.as_bytes()[19] == b'.');
    }
}
