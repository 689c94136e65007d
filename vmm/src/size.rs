//! Sizes with units (`256M`, `1G`, `512KiB`) and durations (`60s`, `500ms`,
//! `2m`) as the command line spells them, and their display.

use std::time::Duration;

/// Parse a size: a number followed by a unit `K`, `M`, `G`, `T` (also
/// `KiB`, `MB`, ... — all binary) or `B` for bytes. A bare number is
/// refused: `--memory 64` would otherwise mean 64 bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("invalid size '{s}': expected a number with a unit, like 256M or 1G"));
    }
    let n: u64 = num.parse().map_err(|_| format!("invalid size '{s}': number too large"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" => return Err(format!("invalid size '{s}': give a unit, like {n}M or {n}G ({n}B for bytes)")),
        "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => return Err(format!("invalid size '{s}': unknown unit '{other}' (use K, M, G or T)")),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("invalid size '{s}': too large"))
}

/// Display a size with the largest binary unit that divides it.
pub fn format_size(n: u64) -> String {
    const UNITS: [(u32, &str); 4] = [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")];
    for (shift, name) in UNITS {
        if n >= 1 << shift && n.is_multiple_of(1 << shift) {
            return format!("{} {name}", n >> shift);
        }
    }
    format!("{n} B")
}

/// The longest duration [`parse_duration`] accepts: a year, far beyond
/// any run, and small enough that deadlines computed from it never
/// overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parse a duration: a number, possibly with a fraction (`1.5s`), with
/// `ms`, `s` (default), `m` or `h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() && frac.is_empty() || frac.contains('.') {
        return Err(format!("invalid duration '{s}': expected a number with a unit, like 60s or 1.5s"));
    }
    let nanos_per_unit: u128 = match unit {
        "ms" => 1_000_000,
        "" | "s" => 1_000_000_000,
        "m" | "min" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        other => return Err(format!("invalid duration '{s}': unknown unit '{other}' (use ms, s, m or h)")),
    };
    let too_long = || format!("invalid duration '{s}': too long (at most {})", format_duration(MAX_DURATION));
    // Integer arithmetic on nanoseconds: exact for any fraction digits.
    let int: u128 = if int.is_empty() { 0 } else { int.parse().map_err(|_| too_long())? };
    let mut nanos = int.checked_mul(nanos_per_unit).ok_or_else(too_long)?;
    let mut scale = nanos_per_unit;
    for d in frac.bytes() {
        scale /= 10;
        nanos += u128::from(d - b'0') * scale;
    }
    if nanos > MAX_DURATION.as_nanos() {
        return Err(too_long());
    }
    let d = Duration::from_nanos(nanos as u64);
    if d.is_zero() {
        return Err(format!("invalid duration '{s}': must be greater than zero"));
    }
    Ok(d)
}

/// Display a duration the way `parse_duration` reads it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) { format!("{}s", ms / 1000) } else { format!("{ms}ms") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_with_units() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size(" 2 G "), Ok(2 << 30));
    }

    #[test]
    fn bad_sizes_are_refused_with_a_reason() {
        assert!(parse_size("").unwrap_err().contains("expected a number"));
        assert!(parse_size("M").unwrap_err().contains("expected a number"));
        assert!(parse_size("12X").unwrap_err().contains("unknown unit"));
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("99999999999999999999").unwrap_err().contains("too large"));
        assert!(parse_size("20000000T").unwrap_err().contains("too large"));
    }

    #[test]
    fn a_bare_number_needs_a_unit() {
        let e = parse_size("64").unwrap_err();
        assert!(e.contains("give a unit, like 64M"), "{e}");
    }

    #[test]
    fn sizes_display_in_the_largest_exact_unit() {
        assert_eq!(format_size(256 << 20), "256 MiB");
        assert_eq!(format_size(3 << 30), "3 GiB");
        assert_eq!(format_size(1536 << 10), "1536 KiB");
        assert_eq!(format_size(1000), "1000 B");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0.25m"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("2.5ms"), Ok(Duration::from_micros(2500)));
        assert!(parse_duration("1.2.3s").is_err());
        assert!(parse_duration(".").is_err());
        let e = parse_duration("99999999999999999999999s").unwrap_err();
        assert!(e.contains("too long (at most"), "{e}");
        assert!(parse_duration("9999999h").unwrap_err().contains("too long"));
        assert_eq!(format_duration(Duration::from_secs(60)), "60s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }
}
