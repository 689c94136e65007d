//! The allocator's entry points: [`alloc`](BuddyAllocator::alloc) and
//! [`free`](BuddyAllocator::free) with their fast paths (Linux's
//! `rmqueue_pcplist` and `free_unref_page`), the walk down the zonelist,
//! and the page-table zone's own pair,
//! [`alloc_pgtable`](BuddyAllocator::alloc_pgtable) and
//! [`free_pgtable`](BuddyAllocator::free_pgtable).
//!
//! Part of [`crate::buddy`], whose module doc states the allocator's
//! invariants. Here:
//!
//! - Every free is validated ([`check_free`](BuddyAllocator::check_free),
//!   or the fast path's equivalent tests) before anything changes, so a
//!   refused free changes nothing.
//! - The fast paths take only the cases they can serve entirely and with
//!   the same checks; everything else, including every bad free, goes to
//!   the slow path, which reports it.
//! - Ordinary allocations and frees never touch the page-table zone;
//!   page-table pages come and go only through the `_pgtable` pair.

use super::deferred::SEC_DEFERRED;
use super::frame::{ALLOCATED, FREE, HOT, TAIL};
use super::{BuddyAllocator, FreeError, HOT_HIGH, MAX_ORDER, ZoneId, ZonePref};
use crate::phys::{Pfn, PhysMem};

impl<M: PhysMem> BuddyAllocator<'_, M> {
    /// Allocate a naturally aligned block of `2^order` frames from the first
    /// zone of `pref`'s zonelist that can serve it. `None` when no zone can
    /// (or `order > MAX_ORDER`). The contents are whatever was there.
    #[inline]
    pub fn alloc(&mut self, order: u8, pref: ZonePref) -> Option<Pfn> {
        // Fast path: an order-0 frame from the preferred zone's hot list
        // (Linux's `rmqueue_pcplist`).
        if order == 0 {
            let z = &mut self.zones[pref.zonelist()[0] as usize];
            if let Some(idx) = z.hot.pop() {
                z.stats.allocs += 1;
                // Hot frames are span indices, so `get_mut` never fails; it
                // is the bounds check the compiler would otherwise insert,
                // folded into the branch to the slow path.
                if let Some(m) = self.meta.get_mut(idx as usize) {
                    // A hot frame's tag was cleared when it was freed.
                    m.state = ALLOCATED;
                    return Some(Pfn(self.base + idx as u64));
                }
            }
        }
        self.alloc_slow(order, pref)
    }

    /// Everything [`alloc`](Self::alloc) does beyond its fast path.
    #[inline(never)]
    fn alloc_slow(&mut self, order: u8, pref: ZonePref) -> Option<Pfn> {
        let zonelist = pref.zonelist();
        if order == 0 {
            for &zone in zonelist {
                if let Some(idx) = self.hot_alloc(zone) {
                    return Some(self.pfn(idx));
                }
            }
        } else if order <= MAX_ORDER {
            for &zone in zonelist {
                if let Some(idx) = self.zone_alloc(zone, order) {
                    return Some(self.pfn(idx));
                }
            }
        }
        self.zones[zonelist[0] as usize].stats.failures += 1;
        None
    }

    /// A block of `order > 0` from `zone`, draining the zone's hot list and
    /// retrying once if the free lists alone cannot serve.
    fn zone_alloc(&mut self, zone: ZoneId, order: u8) -> Option<u32> {
        let idx = match self.rmqueue(zone, order) {
            Some(idx) => idx,
            None if !self.zones[zone as usize].hot.is_empty() => {
                self.hot_drain(zone as usize, HOT_HIGH);
                self.rmqueue(zone, order)?
            }
            None => return None,
        };
        self.zones[zone as usize].stats.allocs += 1;
        Some(idx)
    }

    /// [`alloc`](Self::alloc), with every frame of the block zeroed.
    pub fn alloc_zeroed(&mut self, order: u8, pref: ZonePref) -> Option<Pfn> {
        let pfn = self.alloc(order, pref)?;
        for i in 0..1 << order {
            self.mem.zero_frame(pfn.add(i));
        }
        Some(pfn)
    }

    /// Free the block of `2^order` frames at `pfn`, allocated by
    /// [`alloc`](Self::alloc) with that order. A bad free is refused with
    /// the reason and changes nothing.
    #[inline]
    pub fn free(&mut self, pfn: Pfn, order: u8) -> Result<(), FreeError> {
        // Fast path (Linux's `free_unref_page`): an order-0 frame that heads
        // an allocated order-0 block of an ordinary zone, onto a hot list
        // with room. These are exactly the checks of `check_free` and the
        // zone check below, in the order that costs least; anything else,
        // including every bad free, takes the slow path, which reports it.
        // An offset below the base wraps to a huge value and fails `get`.
        let off = pfn.0.wrapping_sub(self.base);
        if order == 0
            && off < self.meta.len() as u64
            && let Some(m) = self.meta.get_mut(off as usize)
            && m.state == ALLOCATED
            && m.order == 0
        {
            // One arm per ordinary zone, each with its zone as a constant:
            // the hot list's address is then known before the metadata
            // is read (a predicted branch, not a load on the critical
            // path). Page-table frames are refused by the slow path.
            let zone = m.zone;
            let z = if zone == ZoneId::Normal as u8 {
                &mut self.zones[ZoneId::Normal as usize]
            } else if zone == ZoneId::Dma as u8 {
                &mut self.zones[ZoneId::Dma as usize]
            } else {
                return self.free_slow(pfn, order);
            };
            if z.hot.has_room() {
                m.clear_tag();
                m.state = HOT;
                z.stats.frees += 1;
                z.hot.push(off as u32);
                return Ok(());
            }
        }
        self.free_slow(pfn, order)
    }

    /// Everything [`free`](Self::free) does beyond its fast path.
    #[inline(never)]
    fn free_slow(&mut self, pfn: Pfn, order: u8) -> Result<(), FreeError> {
        let idx = self.check_free(pfn, order)?;
        let m = &mut self.meta[idx as usize];
        let zone = m.zone;
        if zone == ZoneId::PageTables as u8 {
            return Err(FreeError::WrongZone);
        }
        m.clear_tag();
        self.zones[zone as usize].stats.frees += 1;
        if order == 0 {
            self.hot_free(zone as usize, idx);
        } else {
            self.free_block(idx, order);
        }
        Ok(())
    }

    /// Allocate a page-table page from the page-table zone. It is all
    /// zeroes, and the allocator has not written it. `None` when the zone is
    /// exhausted: page tables never come from another zone.
    pub fn alloc_pgtable(&mut self) -> Option<Pfn> {
        match self.hot_alloc(ZoneId::PageTables) {
            Some(idx) => Some(self.pfn(idx)),
            None => {
                self.zones[ZoneId::PageTables as usize].stats.failures += 1;
                None
            }
        }
    }

    /// Free a page-table page from [`alloc_pgtable`](Self::alloc_pgtable).
    /// All its 512 entries must be zero; when verification is on this is
    /// checked by reading, and a page with a non-zero entry is refused
    /// ([`FreeError::NotZeroed`]) and stays allocated.
    pub fn free_pgtable(&mut self, pfn: Pfn) -> Result<(), FreeError> {
        let idx = self.check_free(pfn, 0)?;
        let zone = self.meta[idx as usize].zone;
        if zone != ZoneId::PageTables as u8 {
            return Err(FreeError::WrongZone);
        }
        if self.verify_pgtables && !self.mem.frame_is_zero(pfn) {
            return Err(FreeError::NotZeroed);
        }
        self.meta[idx as usize].clear_tag();
        self.zones[zone as usize].stats.frees += 1;
        self.hot_free(zone as usize, idx);
        Ok(())
    }

    /// Validate a free of `(pfn, order)`: returns the span index of an
    /// allocated block head of exactly that order.
    #[inline]
    fn check_free(&self, pfn: Pfn, order: u8) -> Result<u32, FreeError> {
        if order > MAX_ORDER {
            return Err(FreeError::InvalidOrder);
        }
        let idx = self.index(pfn).ok_or(FreeError::OutOfRange)?;
        let m = self.meta[idx as usize];
        match m.state {
            ALLOCATED if m.order == order => Ok(idx),
            ALLOCATED => Err(FreeError::WrongOrder { allocated: m.order }),
            FREE | HOT => Err(FreeError::DoubleFree),
            TAIL => Err(FreeError::NotBlockHead),
            // A deferred section's metadata reads as reserved; its frames
            // are free.
            _ if self.section_state(self.section_of(idx)) == SEC_DEFERRED => Err(FreeError::DoubleFree),
            _ => Err(FreeError::NotManaged),
        }
    }
}
