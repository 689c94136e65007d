//! How the project's JSON writes the numbers tools misread: addresses as
//! `"0x…"` hex strings (a JSON number is a double in `jq` and JavaScript,
//! so a 64-bit address above 2^53 loses its low bits), and durations as
//! integer nanoseconds (serde's own `Duration` form is `{secs, nanos}`).
//! Use with `#[serde(serialize_with = "ept::json::hex")]` and friends.

use serde::Serializer;
use std::time::Duration;

/// An address (a `u64` or a typed address) as a `"0x…"` string.
pub fn hex<S: Serializer, T: std::fmt::LowerHex>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:#x}"))
}

/// An optional address as a `"0x…"` string or `null`.
pub fn hex_opt<S: Serializer, T: std::fmt::LowerHex>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => hex(v, s),
        None => s.serialize_none(),
    }
}

/// A duration as integer nanoseconds (saturating at `u64::MAX`, 584 years).
pub fn ns<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// An optional duration as integer nanoseconds or `null`.
pub fn ns_opt<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ns(d, s),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use serde::Serialize;
    use std::time::Duration;

    #[derive(Serialize)]
    struct T {
        #[serde(serialize_with = "super::hex")]
        a: u64,
        #[serde(serialize_with = "super::hex_opt")]
        b: Option<u64>,
        #[serde(serialize_with = "super::ns")]
        d: Duration,
        #[serde(serialize_with = "super::ns_opt")]
        e: Option<Duration>,
    }

    #[test]
    fn addresses_are_hex_strings_and_durations_nanoseconds() {
        let t = T { a: 0xffff_ffff_8020_0001, b: None, d: Duration::new(2, 5), e: Some(Duration::from_micros(3)) };
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            r#"{"a":"0xffffffff80200001","b":null,"d":2000000005,"e":3000}"#
        );
    }
}
