//! pv mode: the area the guest shares with the VMM.
//!
//! In pv mode (`MmuMode::Pv`) the page-table zone is ordinary writable RAM:
//! the guest writes its page-table entries itself and records the GPA of
//! every entry it wrote in the **write queue**. The VMM brings the shadow
//! tables in line with the queued entries at the next **sync point** — any
//! pv hypercall (`PV_FLUSH`, `SHADOW_FAULT`, `LOAD_CR3`, `FLUSH_TLB`) —
//! exactly as if each write had trapped. A queue the VMM refuses (see
//! [`batch_error`]) is reported the same way at every sync point: the call
//! answers the batch error and does nothing else (no CR3 load, no fault
//! handled, no flush), so the guest always learns which writes were not
//! applied. Until then the shadow may hold
//! translations the guest has changed, which is what a TLB may do until
//! `invlpg` or a CR3 load (Intel SDM vol. 3 §4.10.4): the guest syncs where
//! hardware would make it flush.
//!
//! The VMM also **publishes** the shadow roots it keeps ready: a guest
//! whose queue is empty may load a published shadow root into CR3 itself
//! (no exit) instead of calling `LOAD_CR3`.
//!
//! Layout: [`AREA_PAGES`] page-aligned pages of guest RAM, registered once
//! with `PV_SETUP(gpa)`:
//!
//! | page | word | meaning |
//! | --- | --- | --- |
//! | 0 | 0 | queue length: entries `2..2 + len` are valid (the VMM sets it to 0 after a sync) |
//! | 0 | 1 | reserved, 0 |
//! | 0 | 2.. | [`QUEUE_CAP`] entries: the GPA of an 8-byte entry written, or a page GPA with [`ENTRY_PAGE`] when the whole page was rewritten (zeroed, copied) |
//! | 1 | 0 | generation: changes whenever the table changes |
//! | 1 | 1 | number of published roots |
//! | 1 | 2.. | [`ROOTS_CAP`] pairs (guest root GPA, shadow root GPA) |
//!
//! The guest contract: record every write to a page-table page before the
//! next sync point; sync (at least `PV_FLUSH`) wherever hardware would need
//! `invlpg` or a CR3 load; load a published shadow root only with an empty
//! queue. A guest that breaks it only hurts itself: the VMM validates every
//! entry, never trusts the pool, and the shadow maps guest RAM only.

/// Pages in the shared area.
pub const AREA_PAGES: u64 = 2;
/// Entries the write queue holds.
pub const QUEUE_CAP: usize = 510;
/// Word index of the first queue entry.
pub const QUEUE_FIRST: usize = 2;
/// Queue entry flag: the whole 4 KiB page at this (page-aligned) GPA was
/// rewritten, as a partial write would be treated: every shadow entry
/// derived from it is zapped.
pub const ENTRY_PAGE: u64 = 1;
/// Published roots the table holds.
pub const ROOTS_CAP: usize = 255;
/// Word index of the first published pair.
pub const ROOTS_FIRST: usize = 2;
/// `PV_FLUSH`'s `gva` when no address is to be made current.
pub const NO_GVA: u64 = u64::MAX;

/// Most pages one `PV_HARVEST` may name (its bitmap is at most
/// `HARVEST_PAGES / 64` words: 256 bytes).
pub const HARVEST_PAGES: u64 = 2048;

/// Flag of a batch error result: bits 8..32 are the index of the first
/// entry not applied, bits 0..8 the [`BatchError`] code. Entries before
/// that index were applied; it and every later one were not.
pub const BATCH_ERROR: u64 = 1 << 48;

/// Why a queue entry was refused.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchError {
    /// The queue length is larger than [`QUEUE_CAP`]: nothing applied.
    Count = 1,
    /// The entry is not 8-byte aligned (or has unknown flag bits).
    Unaligned = 2,
    /// The entry lies outside the page-table zone.
    OutsideZone = 3,
}

impl BatchError {
    /// Decode a code.
    pub const fn from_raw(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Count),
            2 => Some(Self::Unaligned),
            3 => Some(Self::OutsideZone),
            _ => None,
        }
    }

    /// A short description.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Count => "queue length beyond the queue",
            Self::Unaligned => "entry not 8-byte aligned",
            Self::OutsideZone => "entry outside the page-table zone",
        }
    }
}

/// The result that says entries `index..` were not applied because of `why`.
pub const fn batch_error(index: usize, why: BatchError) -> u64 {
    BATCH_ERROR | ((index as u64 & 0xff_ffff) << 8) | why as u64
}

/// Decode a hypercall result: `Some((index, why))` for a batch error.
pub const fn decode_batch_error(result: u64) -> Option<(usize, Option<BatchError>)> {
    if result & BATCH_ERROR == 0 || result >= crate::hypercall::ERR_BASE {
        return None;
    }
    Some((((result >> 8) & 0xff_ffff) as usize, BatchError::from_raw(result as u8)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_fits_the_area() {
        assert_eq!((QUEUE_FIRST + QUEUE_CAP) * 8, 4096);
        assert_eq!((ROOTS_FIRST + 2 * ROOTS_CAP) * 8, 4096);
    }

    #[test]
    fn batch_errors_round_trip_and_are_not_errors_or_ok() {
        let r = batch_error(17, BatchError::OutsideZone);
        assert!(!crate::hypercall::is_error(r) && r != crate::hypercall::OK);
        assert_eq!(decode_batch_error(r), Some((17, Some(BatchError::OutsideZone))));
        assert_eq!(decode_batch_error(crate::hypercall::OK), None);
        assert_eq!(decode_batch_error(crate::hypercall::ERR_FAULT), None);
    }
}
