//! The buddy page allocator, in the shape of Linux's `mm/page_alloc.c`.
//!
//! # Structure
//!
//! The allocator manages one contiguous span of frames `base..base + n`,
//! described by a caller-supplied array of [`FrameMeta`] (Linux's
//! `struct page` array; the guest carves it out of RAM at boot, sized with
//! [`meta_bytes`]). Frames are divided among three [zones](ZoneId):
//! `DMA` (below 16 MiB), `PGTABLE` (the page-table zone named in
//! `BootInfo`, which takes precedence where it overlaps DMA) and `NORMAL`
//! (the rest). Each zone has `free_area[order]` for orders
//! `0..=MAX_ORDER`: a doubly-linked list of free blocks of `2^order`
//! frames, and a small [hot list](HOT_HIGH) of order-0 frames in front of
//! it. The hot list plays the part of Linux's `per_cpu_pages` when the
//! allocator is used on its own, one per *zone*; for SMP,
//! [`PerCpuBuddy`] puts per-CPU lists in front of the allocator (and the
//! allocator behind a lock).
//!
//! One file per concern, all `impl` blocks of the one [`BuddyAllocator`]
//! defined here (each file's doc states its own invariants):
//!
//! - `zone.rs`: the zones, the zonelist ([`ZonePref`]), the per-zone
//!   counters ([`ZoneStats`]) and the per-zone state.
//! - `frame.rs`: the per-frame metadata ([`FrameMeta`]) and the owner's
//!   [`BlockTag`].
//! - `free_lists.rs`: the `free_area` lists, merging a freed block with
//!   its buddy and splitting a larger block to serve a smaller one.
//! - `zone_hot_list.rs`: each zone's hot list of order-0 frames, refilled
//!   from and drained to the free lists in batches.
//! - `cpu_pages.rs`: [`PerCpuBuddy`], the SMP front end: this allocator
//!   behind a lock (the zone lock), per-CPU lists of order-0 frames in
//!   front of it (Linux's `per_cpu_pages`, each behind its CPU's own
//!   lock), refilled and drained in batches, drained under memory pressure
//!   so that no free page is stranded. Its doc states the lock order and
//!   the drain rule.
//! - `alloc.rs`: the entry points ([`alloc`](BuddyAllocator::alloc),
//!   [`free`](BuddyAllocator::free) and their page-table variants), their
//!   fast paths and the zone fallback.
//! - `deferred.rs`: giving frames to the allocator at boot
//!   ([`add_free_range`](BuddyAllocator::add_free_range)) and deferred
//!   initialisation by section.
//! - `invariants.rs`: [`BuddyAllocator::check_invariants`].
//! - `error.rs`: [`FreeError`] and [`InitError`].
//!
//! # Invariants (checked by [`BuddyAllocator::check_invariants`])
//!
//! - Every frame is in exactly one of these states: `Reserved` (never given
//!   to the allocator), the head of a free block (on exactly one free list,
//!   that of its zone and order), the head of an allocated block, a hot
//!   order-0 frame (on exactly one hot list), or a tail frame inside a free
//!   or allocated block. Only a block's head carries its order; tails are
//!   marked as tails, so freeing an address inside a block is caught.
//! - A block of order `k` is naturally aligned (its absolute pfn is a
//!   multiple of `2^k`), lies inside the span, and within one zone.
//! - Fully merged: no free block has a free buddy (`pfn ^ (1 << k)`) of
//!   the same order and zone below `MAX_ORDER`. So once every frame has been
//!   freed and the hot lists drained, the free lists hold exactly the
//!   maximal blocks they held after [`BuddyAllocator::add_free_range`].
//! - Free-list links live in the metadata, never in the free frames. The
//!   allocator therefore never writes a frame it manages, except to zero
//!   one for [`BuddyAllocator::alloc_zeroed`]: this is what lets the
//!   `PGTABLE` zone hand out zeroed page-table pages without writing them
//!   (in shadow mode each such write would trap to the VMM).
//! - Every free or hot `PGTABLE` frame is all zeroes. Page-table pages go
//!   out only through [`BuddyAllocator::alloc_pgtable`] and come back only
//!   through [`BuddyAllocator::free_pgtable`], which (when verification is
//!   on, by default in debug builds) reads the 512 entries and refuses a
//!   page that is not clear. Ordinary allocations never fall back into
//!   `PGTABLE`.
//! - A rejected [`free`](BuddyAllocator::free) (double free, wrong order,
//!   address inside a block or outside the allocator) changes nothing.
//! - An allocated block's head metadata carries a [`BlockTag`] that belongs
//!   to the block's owner (the slab allocator's descriptor); it is all
//!   zeroes when the block is handed out (cleared when a hot frame is
//!   freed, and when a block leaves the free lists).
//!
//! The hot lists hold order-0 frames that the buddy lists count as
//! allocated; a higher-order allocation that fails drains its zone's hot
//! list and retries, so hot frames never cause a spurious failure.
//!
//! # Deferred initialisation
//!
//! An allocator made with [`BuddyAllocator::new_deferred`] writes no
//! metadata at creation and initialises it one 4 MiB section at a time,
//! when a zone first needs the section's frames (Linux's
//! `DEFERRED_STRUCT_PAGE_INIT`; `deferred.rs` explains the section
//! states). Every invariant above holds for the initialised sections, and
//! a deferred frame never causes a spurious failure.
//!
//! Trust assumption: the caller of `new_deferred` passes metadata and
//! section arrays that are all zeroes (the guest carves them out of the
//! zeroed RAM the VMM hands over). Metadata that is not zero inside an
//! untouched or deferred section is not detected (reading it is what the
//! deferral saves); [`BuddyAllocator::deferred_metadata_is_zero`] checks it
//! for tests. An allocator made with [`BuddyAllocator::new`] has every
//! section initialised from the start.

use crate::phys::{FrameRange, Pfn, PhysMem};

mod alloc;
mod cpu_pages;
mod deferred;
mod error;
mod frame;
mod free_lists;
mod invariants;
mod split;
mod zone;
mod zone_hot_list;

pub use cpu_pages::{CpuFrames, PcpFlag, PcpLists, PcpStats, PerCpuBuddy, pcp_flag_bytes};
pub use deferred::{SECTION_FRAMES, section_bytes};
pub use error::{FreeError, InitError};
pub use frame::{BlockTag, FrameMeta, meta_bytes};
pub use zone::{NR_ZONES, ZoneId, ZonePref, ZoneStats};
pub use zone_hot_list::{HOT_BATCH, HOT_HIGH};

use deferred::SEC_INIT;
use frame::NIL;
use zone::Zone;

/// The largest block order: blocks are `2^0 ..= 2^MAX_ORDER` frames
/// (4 KiB to 4 MiB), as in Linux (`MAX_PAGE_ORDER`).
pub const MAX_ORDER: u8 = 10;
/// Number of orders, `0..=MAX_ORDER`.
pub const NR_ORDERS: usize = MAX_ORDER as usize + 1;
/// First frame above the DMA zone (16 MiB, the ISA DMA limit).
pub const DMA_LIMIT: Pfn = Pfn((16 << 20) >> 12);

/// The buddy allocator over one span of frames. See the module
/// documentation for its structure and invariants.
pub struct BuddyAllocator<'m, M> {
    mem: M,
    meta: &'m mut [FrameMeta],
    /// Absolute pfn of span index 0.
    base: u64,
    pgtables: FrameRange,
    zones: [Zone; NR_ZONES],
    verify_pgtables: bool,
    /// Per section (index 0 = the section holding `base`): `SEC_*`. Empty
    /// for an eager allocator, whose sections are all initialised.
    sections: &'m mut [u8],
    /// Per zone: no deferred section of the zone has a lower index.
    deferred_cursor: [usize; NR_ZONES],
}

impl<'m, M: PhysMem> BuddyAllocator<'m, M> {
    /// An allocator for the span of `meta.len()` frames starting at `base`,
    /// with `pgtables` as its page-table zone (possibly empty). Every frame
    /// starts reserved: give the usable ones with
    /// [`add_free_range`](Self::add_free_range).
    pub fn new(mem: M, meta: &'m mut [FrameMeta], base: Pfn, pgtables: FrameRange) -> Result<Self, InitError> {
        let a = Self::bare(mem, meta, &mut [], base, pgtables)?;
        for i in 0..a.meta.len() {
            let zone = a.expected_zone(base.add(i as u64));
            a.meta[i] = FrameMeta { zone: zone as u8, ..FrameMeta::RESERVED };
        }
        Ok(a)
    }

    /// Like [`new`](Self::new), but with deferred initialisation (see the
    /// module documentation): `O(1)`, nothing is written. `meta` and
    /// `sections` must be all zeroes (the trust assumption documented
    /// there); `sections` must hold at least [`section_bytes`]`(meta.len())`
    /// bytes.
    pub fn new_deferred(
        mem: M,
        meta: &'m mut [FrameMeta],
        sections: &'m mut [u8],
        base: Pfn,
        pgtables: FrameRange,
    ) -> Result<Self, InitError> {
        if (sections.len() as u64) < section_bytes(meta.len() as u64) {
            return Err(InitError::SectionArrayTooSmall);
        }
        Self::bare(mem, meta, sections, base, pgtables)
    }

    fn bare(
        mem: M,
        meta: &'m mut [FrameMeta],
        sections: &'m mut [u8],
        base: Pfn,
        pgtables: FrameRange,
    ) -> Result<Self, InitError> {
        let len = meta.len() as u64;
        if len >= NIL as u64 || base.0.checked_add(len).is_none_or(|end| end > u64::MAX >> 12) {
            return Err(InitError::SpanTooLarge);
        }
        let span = FrameRange::new(base, base.add(len));
        if !pgtables.is_empty() && (pgtables.start < span.start || pgtables.end > span.end) {
            return Err(InitError::PageTablesOutsideSpan);
        }
        Ok(Self {
            mem,
            meta,
            base: base.0,
            pgtables,
            zones: [Zone::EMPTY; NR_ZONES],
            verify_pgtables: cfg!(debug_assertions),
            sections,
            deferred_cursor: [0; NR_ZONES],
        })
    }

    /// Whether page-table pages are read to check they are all zero when
    /// added and freed (default: in debug builds).
    pub fn set_verify_pgtables(&mut self, on: bool) {
        self.verify_pgtables = on;
    }

    /// The physical memory accessor.
    pub fn mem(&self) -> &M {
        &self.mem
    }

    /// The frames this allocator covers.
    pub fn span(&self) -> FrameRange {
        FrameRange::new(Pfn(self.base), Pfn(self.base + self.meta.len() as u64))
    }

    /// The page-table zone.
    pub fn pgtable_zone(&self) -> FrameRange {
        self.pgtables
    }

    /// The zone of `pfn`, or `None` if it is outside the span.
    pub fn zone_of(&self, pfn: Pfn) -> Option<ZoneId> {
        let idx = self.index(pfn)?;
        if self.section_state(self.section_of(idx)) != SEC_INIT {
            return Some(self.expected_zone(pfn));
        }
        ZoneId::from_raw(self.meta[idx as usize].zone)
    }

    /// The counters of `zone`.
    pub fn stats(&self, zone: ZoneId) -> ZoneStats {
        let z = &self.zones[zone as usize];
        ZoneStats { hot_pages: z.hot.len() as u64, ..z.stats }
    }

    // ---- span indices and the zone layout ----

    #[inline]
    fn pfn(&self, idx: u32) -> Pfn {
        Pfn(self.base + idx as u64)
    }

    #[inline]
    fn index(&self, pfn: Pfn) -> Option<u32> {
        let off = pfn.0.checked_sub(self.base)?;
        if off < self.meta.len() as u64 { Some(off as u32) } else { None }
    }

    /// The zone `pfn` belongs to by the layout (page-table zone first).
    fn expected_zone(&self, pfn: Pfn) -> ZoneId {
        if self.pgtables.contains(pfn) {
            ZoneId::PageTables
        } else if pfn < DMA_LIMIT {
            ZoneId::Dma
        } else {
            ZoneId::Normal
        }
    }

    /// The pfns where one zone may end and another begin: no block or
    /// deferred section straddles one.
    fn zone_boundaries(&self) -> [u64; 3] {
        [DMA_LIMIT.0, self.pgtables.start.0, self.pgtables.end.0]
    }

    /// The first zone boundary above `pfn` (`u64::MAX` if none).
    fn zone_end(&self, pfn: u64) -> u64 {
        self.zone_boundaries().into_iter().filter(|&b| b > pfn).min().unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests;
