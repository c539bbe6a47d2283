//! .NET ticks (the wire format's timestamps) as RFC 3339 UTC text.

use fusioncache::backplane::UNIX_EPOCH_TICKS;

/// Ticks per second (a tick is 100 ns).
const TICKS_PER_SECOND: i64 = 10_000_000;

/// `ticks` (100 ns units since 0001-01-01T00:00:00Z) as `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
pub fn rfc3339(ticks: i64) -> String {
    let since_epoch = i128::from(ticks) - i128::from(UNIX_EPOCH_TICKS);
    let seconds = since_epoch.div_euclid(i128::from(TICKS_PER_SECOND));
    let micros = since_epoch.rem_euclid(i128::from(TICKS_PER_SECOND)) / 10;
    let (days, second_of_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60
    )
}

/// The proleptic Gregorian date of a day number counted from 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i128) -> (i128, i128, i128) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i128::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_format_as_utc_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH_TICKS), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339(1), "0001-01-01T00:00:00.000000Z");
        // 2024-02-29T23:59:59.1234567Z, as .NET computes it: new DateTime(2024, 2, 29, 23, 59, 59).Ticks + 1234567.
        assert_eq!(
            rfc3339(638_448_479_990_000_000 + 1_234_567),
            "2024-02-29T23:59:59.123456Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH_TICKS + 951_782_400 * TICKS_PER_SECOND),
            "2000-02-29T00:00:00.000000Z"
        );
        assert_eq!(rfc3339(i64::MAX), "29228-09-14T02:48:05.477580Z");
    }
}
