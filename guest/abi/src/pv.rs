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
//! ## Layout version 2: one queue per vCPU (SMP)
//!
//! `PV_SETUP(gpa, LAYOUT_V2)` registers [`area_pages_v2`]`(cpus)` pages:
//! pages 0 and 1 as above, then the queue of vCPU `i ≥ 1` at page `1 + i`
//! ([`queue_page`]; vCPU 0's is page 0, so one vCPU's v2 area is a v1 area
//! with a ring). Each queue page is a **ring** with a single producer (the
//! vCPU that owns it) and a single consumer (the VMM, under its MMU lock,
//! on whichever vCPU's exit applies it — `PV_FLUSH_REMOTE` applies every
//! queue while their owners run):
//!
//! | word | meaning | written by |
//! | --- | --- | --- |
//! | 0 | tail: entries ever queued (free-running) | the guest only |
//! | 1 | head: entries ever applied (free-running) | the VMM only |
//! | 2.. | entry `n` at word `QUEUE_FIRST + n % QUEUE_CAP` | the guest |
//!
//! The guest writes entry `n` only when `n - head < QUEUE_CAP` (otherwise
//! it syncs first), then stores `tail = n + 1` with release ordering; the
//! VMM loads `tail` with acquire ordering, applies `head..tail`
//! ([`ring_pending`]; more than `QUEUE_CAP` is [`BatchError::Count`]), and
//! stores `head = tail`. A refused entry drops it and the rest of that
//! batch (`head = tail` still), as in v1; the error is the answer of the
//! hypercall that applied the owner's queue.
//!
//! The guest contract: record every write to a page-table page before the
//! next sync point; sync (at least `PV_FLUSH`) wherever hardware would need
//! `invlpg` or a CR3 load; load a published shadow root only with an empty
//! queue. A guest that breaks it only hurts itself: the VMM validates every
//! entry, never trusts the pool, and the shadow maps guest RAM only.

/// Pages in the shared area (layout version 1).
pub const AREA_PAGES: u64 = 2;
/// `PV_SETUP`'s layout: version 1, one queue (`0` means the same).
pub const LAYOUT_V1: u64 = 1;
/// `PV_SETUP`'s layout: version 2, one ring queue per vCPU (module doc).
pub const LAYOUT_V2: u64 = 2;
/// The most vCPUs a v2 area serves (a `PV_FLUSH_REMOTE` CPU set is a
/// 64-bit mask).
pub const MAX_CPUS: u32 = 64;

/// Pages of a layout-v2 area for `cpus` vCPUs: a queue each, and the
/// published roots.
pub const fn area_pages_v2(cpus: u32) -> u64 {
    1 + cpus as u64
}

/// The page of a layout-v2 area holding vCPU `cpu`'s queue.
pub const fn queue_page(cpu: u32) -> u64 {
    if cpu == 0 { 0 } else { 1 + cpu as u64 }
}

/// Word index of a v2 queue's tail (written by the guest).
pub const RING_TAIL: usize = 0;
/// Word index of a v2 queue's head (written by the VMM).
pub const RING_HEAD: usize = 1;

/// The entries a v2 ring holds: `(first, count)`, entry `first + k` at word
/// `QUEUE_FIRST + (first + k) % QUEUE_CAP`; [`BatchError::Count`] when the
/// guest claims more than the ring holds.
pub const fn ring_pending(tail: u64, head: u64) -> Result<(u64, usize), BatchError> {
    let count = tail.wrapping_sub(head);
    if count > QUEUE_CAP as u64 { Err(BatchError::Count) } else { Ok((head, count as usize)) }
}

/// The word of a v2 queue page holding entry `n` (free-running count).
pub const fn ring_word(n: u64) -> usize {
    QUEUE_FIRST + (n % QUEUE_CAP as u64) as usize
}

/// `PV_FLUSH_REMOTE`'s CPU set naming every vCPU.
pub const ALL_CPUS: u64 = u64::MAX;
/// Range entries one `PV_FLUSH_REMOTE` takes (Linux flushes everything past
/// `tlb_single_page_flush_ceiling` = 33 pages anyway).
pub const FLUSH_RANGES_CAP: usize = 32;

/// A `PV_FLUSH_REMOTE` range entry: `pages` (1..=4096) pages from the
/// page-aligned `gva`, the count less one in bits 0..12 (Hyper-V's
/// `HvFlushVirtualAddressList` encoding). `None` for an unaligned `gva` or
/// a count out of range.
pub const fn range_entry(gva: u64, pages: u64) -> Option<u64> {
    if gva & 0xfff != 0 || pages == 0 || pages > 4096 { None } else { Some(gva | (pages - 1)) }
}

/// Decode a range entry: `(first page's GVA, pages)`.
pub const fn decode_range(entry: u64) -> (u64, u64) {
    (entry & !0xfff, (entry & 0xfff) + 1)
}
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
    fn v2_areas_give_every_cpu_its_own_page_and_keep_v1s_for_cpu_0() {
        assert_eq!(area_pages_v2(1), AREA_PAGES);
        assert_eq!(queue_page(0), 0);
        let mut used = [false; 1 + MAX_CPUS as usize];
        used[1] = true; // the published roots
        for cpu in 0..MAX_CPUS {
            let page = queue_page(cpu);
            assert!(page < area_pages_v2(MAX_CPUS), "vCPU {cpu}'s queue outside the area");
            assert!(!core::mem::replace(&mut used[page as usize], true), "vCPU {cpu}'s queue page shared");
        }
    }

    #[test]
    fn rings_count_across_wraparound_and_refuse_a_claim_past_their_size() {
        assert_eq!(ring_pending(5, 5), Ok((5, 0)));
        assert_eq!(ring_pending(3, u64::MAX - 1), Ok((u64::MAX - 1, 5)));
        assert_eq!(ring_pending(QUEUE_CAP as u64, 0), Ok((0, QUEUE_CAP)));
        assert_eq!(ring_pending(QUEUE_CAP as u64 + 1, 0), Err(BatchError::Count));
        assert_eq!(ring_pending(0, 1), Err(BatchError::Count), "a head past the tail");
        // Entries wrap within the page, past the tail and head words.
        assert_eq!(ring_word(0), QUEUE_FIRST);
        assert_eq!(ring_word(QUEUE_CAP as u64 - 1), QUEUE_FIRST + QUEUE_CAP - 1);
        assert_eq!(ring_word(QUEUE_CAP as u64), QUEUE_FIRST);
        assert!(ring_word(u64::MAX) < QUEUE_FIRST + QUEUE_CAP);
    }

    #[test]
    fn range_entries_round_trip_and_refuse_what_they_cannot_say() {
        assert_eq!(range_entry(0x7000, 1).map(decode_range), Some((0x7000, 1)));
        assert_eq!(range_entry(0xffff_8000_0000_0000, 4096).map(decode_range), Some((0xffff_8000_0000_0000, 4096)));
        assert_eq!(range_entry(0x7001, 1), None);
        assert_eq!(range_entry(0x7000, 0), None);
        assert_eq!(range_entry(0x7000, 4097), None);
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
