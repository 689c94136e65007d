//! Command-line parsing: whitespace-separated `key=value` or `key` words.
//!
//! [`check`] runs before anything else reads the command line: a word the
//! kernel does not know, or a value it cannot use, ends the VM at once
//! with [`guest_abi::ports::EXIT_BAD_CMDLINE`] + the word's index, so a
//! typo (`worklaod=fault`, `size=abc`) is never silently ignored.

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

/// How a key takes its value.
#[derive(Clone, Copy)]
enum Takes {
    /// No value: `explain`.
    Nothing,
    /// Optional text: `test` or `test=FILTER`.
    AnyText,
    /// A number greater than zero, optional (`calibrate`) or required (`size`).
    Number { required: bool },
    /// One of a list.
    OneOf(&'static [&'static str]),
}

const KEYS: &[(&str, Takes)] = &[
    ("crash", Takes::OneOf(crate::crash::MODES)),
    ("workload", Takes::OneOf(crate::workload::NAMES)),
    ("size", Takes::Number { required: true }),
    ("spaces", Takes::Number { required: true }),
    // The `tlb` workload's working set, in pages (default 64).
    ("tlbset", Takes::Number { required: true }),
    // pv mode without PV_HARVEST: aging clears A in the entries (the
    // lazy-MMU bracket path), for comparison.
    ("harvest", Takes::OneOf(&["on", "off"])),
    ("calibrate", Takes::Number { required: false }),
    ("test", Takes::AnyText),
    // The size of anonymous folios a demand fault maps (guest_mm::folio).
    ("anon", Takes::OneOf(&guest_mm::folio::FolioSize::NAMES)),
    ("explain", Takes::Nothing),
    ("matrix", Takes::Nothing),
    ("fail-on-request", Takes::Nothing),
    // Set by `vmm test` on a host whose MMU is QEMU's TCG model (nested
    // NPT): tests that compare against the host MMU allow for its known
    // differences from silicon.
    ("hostmmu", Takes::OneOf(&["qemu-tcg", "kvm-pvm"])),
];

/// The reason given for a word whose key the kernel does not know.
pub const UNKNOWN_WORD: &str = "unknown word";

/// Why a word was refused.
pub struct BadWord<'a> {
    /// Its index among the words.
    pub index: usize,
    /// The word.
    pub word: &'a str,
    /// What is wrong with it.
    pub why: &'static str,
    /// The values the key accepts, when it takes one of a list.
    pub expected: &'static [&'static str],
}

/// Check every word of `cmdline`.
pub fn check(cmdline: &str) -> Result<(), BadWord<'_>> {
    for (index, word) in cmdline.split_ascii_whitespace().enumerate() {
        let (key, val) = match word.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (word, None),
        };
        let bad = |why, expected| Err(BadWord { index, word, why, expected });
        let Some(&(_, takes)) = KEYS.iter().find(|(k, _)| *k == key) else {
            return bad(UNKNOWN_WORD, &[]);
        };
        match (takes, val) {
            (Takes::Nothing, Some(_)) => return bad("takes no value", &[]),
            (Takes::Number { required: true }, None) => return bad("needs a value", &[]),
            (Takes::Number { .. }, Some(v)) if parse_u64(v).is_none_or(|n| n == 0) => {
                return bad("needs a number greater than zero (decimal or 0x hexadecimal)", &[]);
            }
            (Takes::OneOf(list), v) if !list.contains(&v.unwrap_or("")) => return bad("unknown value", list),
            _ => {}
        }
    }
    Ok(())
}
