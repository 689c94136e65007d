//! Command-line parsing: whitespace-separated `key=value` or `key` words.

/// The value of the first `key=value` word, or `Some("")` for a bare `key`.
pub fn value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline.split_ascii_whitespace().find_map(|word| match word.split_once('=') {
        Some((k, v)) if k == key => Some(v),
        None if word == key => Some(""),
        _ => None,
    })
}

/// Parse a decimal or `0x` hexadecimal number.
pub fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}
