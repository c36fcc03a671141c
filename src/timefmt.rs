//! Timestamps as operators read them.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Formats Unix seconds as RFC 3339 UTC (`2026-11-26T16:39:50Z`); out-of-range values print
/// as the raw number rather than failing.
pub(crate) fn rfc3339(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_utc() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_710_000), "2026-11-26T16:20:00Z");
    }
}
