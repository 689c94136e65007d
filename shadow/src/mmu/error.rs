//! Why the shadow MMU cannot proceed. Every error is reported to the VMM,
//! which turns it into a guest-visible failure or a VM stop; none leaves the
//! MMU inconsistent, and no guest input panics.

use super::*;

/// Why the MMU cannot proceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowError {
    /// No guest CR3 has been loaded yet.
    NoRoot,
    /// The pool is too small to hold even one path, or what fault delivery
    /// needs of the kernel half (the hinted slots of
    /// [`ShadowMmu::set_prefill_hints`]) even when empty.
    PoolTooSmall,
    /// The guest root is not in a frame whose writes trap (invariant 6).
    RootNotTrapped(Gpa),
    /// The same fault came back right after it was answered "fixed", with
    /// nothing changed in between (invariant 7).
    Livelock {
        /// The faulting address.
        cr2: Gva,
        /// The error code, as the vCPU reported it.
        error_code: u32,
    },
}

impl std::fmt::Display for ShadowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShadowError::NoRoot => write!(f, "no guest CR3 loaded yet"),
            ShadowError::PoolTooSmall => write!(f, "the shadow pool cannot hold one path"),
            ShadowError::RootNotTrapped(r) => {
                write!(f, "guest root {r:#x} is outside the page-table zone, so its changes would not trap")
            }
            ShadowError::Livelock { cr2, error_code } => write!(
                f,
                "shadow MMU livelock: page fault at {cr2:#x} (error code {error_code:#x}) repeated right after it was fixed, with nothing changed"
            ),
        }
    }
}

impl std::error::Error for ShadowError {}
