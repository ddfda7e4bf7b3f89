//! The one grammar for durations and sizes across wasmesh: the mesh file,
//! the control plane's resources and the stock plugins' configurations all
//! read `250ms`, `1.5s`, `2m`, `16Mi` with these functions, so an operator
//! writes a duration the same way everywhere.
//!
//! A crate of its own because both sides need it: the proxy (native) and
//! the stock plugins (WebAssembly guests). No dependencies.

use std::time::Duration;

/// Parse a duration as Istio and protobuf write them: a decimal number and a
/// unit, `us` (or `µs`), `ms`, `s`, `m` or `h` — `250ms`, `1s`, `1.5s`,
/// `0.25s`, `2m`, `1h`, `100us`. Up to 10⁹ seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("{text:?} needs a unit (ms, s, m, h), e.g. 2s or 250ms"))?;
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration, e.g. 2s or 250ms"))?;
    let secs = match unit {
        "us" | "µs" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "{text:?} has an unknown unit {unit:?} (use us, ms, s, m or h)"
            ));
        }
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parse a size: bytes, or a number with `Ki`, `Mi` or `Gi` — `16Mi`,
/// `512Ki`, `1Gi`, `1000000`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (num, mult) = if let Some(n) = t.strip_suffix("Ki") {
        (n, 1u64 << 10)
    } else if let Some(n) = t.strip_suffix("Mi") {
        (n, 1 << 20)
    } else if let Some(n) = t.strip_suffix("Gi") {
        (n, 1 << 30)
    } else {
        (t, 1)
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size: bytes, or a number with Ki, Mi or Gi"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{text:?} is out of range"))
}

/// Write a duration the way [`parse_duration`] reads it, in the largest
/// unit that keeps it whole: `10s`, `1m`, `250ms`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        return format!("{}us", d.as_micros());
    }
    if ms == 0 {
        return String::from("0s");
    }
    for (unit, size) in [("h", 3_600_000u128), ("m", 60_000), ("s", 1_000)] {
        if ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// Write a size the way [`parse_size`] reads it: `16Mi`, `512Ki`, `1000`.
pub fn format_size(bytes: u64) -> String {
    for (unit, size) in [("Gi", 1u64 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
        if bytes >= size && bytes.is_multiple_of(size) {
            return format!("{}{unit}", bytes / size);
        }
    }
    format!("{bytes}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap().as_millis(), 250);
        assert_eq!(parse_duration("0.25s").unwrap().as_millis(), 250);
        assert_eq!(parse_duration("1.5s").unwrap().as_millis(), 1500);
        assert_eq!(parse_duration("2m").unwrap().as_secs(), 120);
        assert_eq!(parse_duration(" 1h ").unwrap().as_secs(), 3600);
        assert_eq!(parse_duration("100us").unwrap().as_micros(), 100);
        for bad in ["10", "5d", "", "s", "-1s", "1e400s", "ms"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        for d in ["10s", "1m", "250ms", "2h", "0s", "100us"] {
            assert_eq!(format_duration(parse_duration(d).unwrap()), d);
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16Mi").unwrap(), 16 << 20);
        assert_eq!(parse_size("512Ki").unwrap(), 512 << 10);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999999Gi").is_err());
        for s in ["16Mi", "4Gi", "8Ki", "1000"] {
            assert_eq!(format_size(parse_size(s).unwrap()), s);
        }
    }
}
