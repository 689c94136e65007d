//! Splitting an allocated block into order-0 blocks (Linux's
//! `split_page`, for non-compound high-order allocations): how a large
//! anonymous folio ([`crate::folio`]) becomes `2^order` frames that are
//! freed one by one as their mappings go.
//!
//! Part of [`crate::buddy`], whose module doc states the allocator's
//! invariants. Here: only an allocated block head of exactly the given
//! order is split (anything else is refused and nothing changes); after
//! the split every frame of the block is an allocated order-0 block of the
//! same zone with a clear tag, so each is freed with `free(pfn, 0)` and
//! the free lists merge them back as their buddies come home.

use super::frame::{ALLOCATED, TAIL};
use super::{BuddyAllocator, FreeError, MAX_ORDER, ZoneId};
use crate::phys::{Pfn, PhysMem};

impl<M: PhysMem> BuddyAllocator<'_, M> {
    /// Turn the allocated block of `2^order` frames at `pfn` into `2^order`
    /// allocated order-0 blocks. Refused (nothing changed) unless `pfn`
    /// heads an allocated block of exactly `order` in an ordinary zone.
    pub fn split_block(&mut self, pfn: Pfn, order: u8) -> Result<(), FreeError> {
        if order > MAX_ORDER {
            return Err(FreeError::InvalidOrder);
        }
        match self.block_tag(pfn) {
            Some((o, _)) if o == order => {}
            Some((allocated, _)) => return Err(FreeError::WrongOrder { allocated }),
            None => return Err(FreeError::NotBlockHead),
        }
        let idx = self.index(pfn).ok_or(FreeError::OutOfRange)? as usize;
        let zone = self.meta[idx].zone;
        if zone == ZoneId::PageTables as u8 {
            return Err(FreeError::WrongZone);
        }
        let n = 1usize << order;
        debug_assert!(self.meta[idx + 1..idx + n].iter().all(|m| m.state == TAIL), "block tails");
        for m in &mut self.meta[idx..idx + n] {
            m.clear_tag();
            m.order = 0;
            m.state = ALLOCATED;
        }
        // One allocation became `n`: each is freed (and counted) alone.
        self.zones[zone as usize].stats.allocs += n as u64 - 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::buddy::{FreeError, ZoneId, ZonePref};
    use crate::testutil::{frames_in_use, with_mm};

    #[test]
    fn a_split_block_is_freed_frame_by_frame_and_merges_back() {
        with_mm(|_, buddy| {
            let before = buddy.stats(ZoneId::Normal);
            let p = buddy.alloc(4, ZonePref::Normal).unwrap();
            assert_eq!(buddy.split_block(p, 3), Err(FreeError::WrongOrder { allocated: 4 }));
            assert_eq!(buddy.split_block(p.add(1), 4), Err(FreeError::NotBlockHead));
            buddy.split_block(p, 4).unwrap();
            buddy.check_invariants().unwrap();
            assert_eq!(buddy.free(p, 4), Err(FreeError::WrongOrder { allocated: 0 }), "no longer one block");
            for i in (0..16).rev() {
                assert_eq!(frames_in_use(buddy), i + 1);
                buddy.free(p.add(i), 0).unwrap();
            }
            assert_eq!(buddy.free(p.add(3), 0), Err(FreeError::DoubleFree));
            buddy.check_invariants().unwrap();
            let after = buddy.stats(ZoneId::Normal);
            assert_eq!(after.free_pages + after.hot_pages, before.free_pages + before.hot_pages);
            assert_eq!(after.allocs - before.allocs, after.frees - before.frees, "16 allocations, 16 frees");
        })
    }
}
