//! Parsers for the scalar value forms of unit files: durations, byte sizes and CPU limits.
//!
//! Each returns a short reason on failure; the caller adds file, position, key and help.

use std::time::Duration;

use crate::model::CpuMax;

/// Help text for durations.
pub(crate) const DURATION_HELP: &str = "use seconds as a number (e.g. 10 or 1.5) or a string \
     with units us, ms, s, m or h (e.g. \"500ms\", \"2s\", \"1m30s\")";

/// Help text for byte sizes.
pub(crate) const BYTES_HELP: &str =
    "use bytes or a size with K, M, G or T, e.g. \"512M\" (1024-based; \"512MiB\" works too)";

/// Help text for CPU limits.
pub(crate) const CPU_HELP: &str =
    "use a percentage of one CPU as a string (e.g. \"150%\") or a number of CPUs (e.g. 1.5)";

/// The cgroup `cpu.max` period used for every CPU limit.
pub(crate) const CPU_PERIOD_US: u64 = 100_000;

/// Seconds given as a number (integer or float) to a `Duration`.
pub(crate) fn duration_from_secs(secs: f64) -> Result<Duration, String> {
    if secs.is_nan() {
        return Err("not a number".into());
    }
    if secs < 0.0 {
        return Err("durations cannot be negative".into());
    }
    Duration::try_from_secs_f64(secs).map_err(|_| "duration is too large".into())
}

/// Parses `"500ms"`, `"2s"`, `"1.5s"`, `"1m30s"`, `"1h"` or a bare number of seconds (`"5"`).
/// Components may be separated by spaces.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if s.starts_with('-') {
        return Err("durations cannot be negative".into());
    }
    if let Ok(secs) = s.parse::<f64>() {
        if s.chars().all(|c| c.is_ascii_digit() || c == '.') {
            return duration_from_secs(secs);
        }
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, after) = rest.split_at(num_len);
        if num.is_empty() {
            return Err(format!("expected a number at \"{rest}\""));
        }
        let value: f64 = num
            .parse()
            .map_err(|_| format!("\"{num}\" is not a number"))?;
        let after = after.trim_start();
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.' || c.is_whitespace())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let scale = match unit {
            "us" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err(format!("missing unit after \"{num}\"")),
            other => return Err(format!("unknown unit \"{other}\"")),
        };
        total = total
            .checked_add(duration_from_secs(value * scale)?)
            .ok_or_else(|| "duration is too large".to_string())?;
        rest = after.trim_start();
    }
    Ok(total)
}

/// Parses a byte size: `"1048576"`, `"512K"`, `"512M"`, `"1.5G"`, `"512MiB"`, `"2TB"`, `"100B"`.
pub(crate) fn parse_bytes(text: &str) -> Result<u64, String> {
    let s = text.trim();
    if s.eq_ignore_ascii_case("max") || s.eq_ignore_ascii_case("infinity") {
        return Err("there is no \"max\" value".into());
    }
    if s.starts_with('-') {
        return Err("sizes cannot be negative".into());
    }
    let num_len = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(num_len);
    if num.is_empty() {
        return Err("expected a number".into());
    }
    let unit = unit.trim_start();
    let upper = unit.to_ascii_uppercase();
    let shift = match upper.as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KI" | "KIB" => 10,
        "M" | "MB" | "MI" | "MIB" => 20,
        "G" | "GB" | "GI" | "GIB" => 30,
        "T" | "TB" | "TI" | "TIB" => 40,
        _ => return Err(format!("unknown unit \"{unit}\"")),
    };
    let multiplier = 1u64 << shift;
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_mul(multiplier)
            .ok_or_else(|| "size is too large".into());
    }
    let value: f64 = num
        .parse()
        .map_err(|_| format!("\"{num}\" is not a number"))?;
    #[allow(clippy::cast_precision_loss)]
    let bytes = (value * multiplier as f64).round();
    if !bytes.is_finite() || bytes >= 1.8e19 {
        return Err("size is too large".into());
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(bytes as u64)
}

/// A CPU limit from a number of CPUs (1.5 = one and a half CPUs).
pub(crate) fn cpu_from_cores(cores: f64) -> Result<CpuMax, String> {
    if cores.is_nan() {
        return Err("not a number".into());
    }
    if cores < 0.0 {
        return Err("CPU limits cannot be negative".into());
    }
    #[allow(clippy::cast_precision_loss)]
    let quota = (cores * CPU_PERIOD_US as f64).round();
    if quota < 1000.0 {
        return Err("the smallest CPU limit is 1% (0.01 CPUs)".into());
    }
    if !quota.is_finite() || quota > 1e15 {
        return Err("CPU limit is too large".into());
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(CpuMax {
        quota_us: quota as u64,
        period_us: CPU_PERIOD_US,
    })
}

/// A CPU limit from a string: `"150%"` (percent of one CPU).
pub(crate) fn parse_cpu(text: &str) -> Result<CpuMax, String> {
    let s = text.trim();
    let Some(num) = s.strip_suffix('%') else {
        return Err("a CPU limit string must end with %".into());
    };
    let pct: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("\"{}\" is not a number", num.trim()))?;
    cpu_from_cores(pct / 100.0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn durations() {
        let ok = [
            ("500ms", Duration::from_millis(500)),
            ("2s", Duration::from_secs(2)),
            ("1.5s", Duration::from_millis(1500)),
            ("1m", Duration::from_secs(60)),
            ("1h", Duration::from_secs(3600)),
            ("1m30s", Duration::from_secs(90)),
            ("1m 30s", Duration::from_secs(90)),
            ("250us", Duration::from_micros(250)),
            ("5", Duration::from_secs(5)),
            ("0", Duration::ZERO),
        ];
        for (text, want) in ok {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
        let bad = [
            ("", "empty"),
            ("-5s", "negative"),
            ("5x", "unknown unit \"x\""),
            ("5 min", "unknown unit \"min\""),
            ("s", "expected a number"),
            ("1.2.3s", "not a number"),
        ];
        for (text, want) in bad {
            let err = parse_duration(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
        assert!(duration_from_secs(-1.0).is_err());
        assert_eq!(duration_from_secs(0.1), Ok(Duration::from_millis(100)));
    }

    #[test]
    fn bytes() {
        let ok = [
            ("1048576", 1_048_576),
            ("512K", 512 << 10),
            ("512M", 512 << 20),
            ("512MiB", 512 << 20),
            ("512MB", 512 << 20),
            ("1G", 1 << 30),
            ("1.5G", 3 << 29),
            ("2T", 2 << 40),
            ("100B", 100),
            ("4k", 4096),
        ];
        for (text, want) in ok {
            assert_eq!(parse_bytes(text), Ok(want), "{text}");
        }
        for (text, want) in [
            ("12XB", "unknown unit \"XB\""),
            ("max", "no \"max\""),
            ("-1", "negative"),
            ("M", "expected a number"),
            ("99999999999T", "too large"),
        ] {
            let err = parse_bytes(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn cpu() {
        let c = |q| CpuMax {
            quota_us: q,
            period_us: 100_000,
        };
        assert_eq!(parse_cpu("150%"), Ok(c(150_000)));
        assert_eq!(parse_cpu("12.5%"), Ok(c(12_500)));
        assert_eq!(cpu_from_cores(1.5), Ok(c(150_000)));
        assert_eq!(cpu_from_cores(2.0), Ok(c(200_000)));
        assert!(parse_cpu("1.5").unwrap_err().contains("end with %"));
        assert!(parse_cpu("0.5%").unwrap_err().contains("smallest"));
        assert!(cpu_from_cores(-1.0).unwrap_err().contains("negative"));
        assert!(parse_cpu("x%").unwrap_err().contains("not a number"));
    }
}
