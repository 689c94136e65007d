//! The invariant checker: [`BuddyAllocator::check_invariants`] walks the
//! whole metadata array and every list and compares them with each other
//! and with the counters. For tests; `O(frames)`.
//!
//! Part of [`crate::buddy`], whose module doc lists the invariants checked
//! (and `deferred.rs` those of the sections). It only reads: metadata of
//! untouched and deferred sections is not read (see
//! [`deferred_metadata_is_zero`](BuddyAllocator::deferred_metadata_is_zero)).

use super::deferred::{SEC_DEFERRED, SEC_INIT, SEC_UNTOUCHED, SECTION_FRAMES};
use super::frame::{ALLOCATED, FREE, HOT, NIL, RESERVED, TAIL};
use super::{BuddyAllocator, MAX_ORDER, NR_ORDERS, NR_ZONES, ZoneId};
use crate::phys::PhysMem;

impl<M: PhysMem> BuddyAllocator<'_, M> {
    /// Check every invariant of the module documentation, by walking the
    /// whole metadata array, every list, and (when verification is on)
    /// reading every free page-table frame. For tests: it is `O(frames)`.
    pub fn check_invariants(&self) -> Result<(), &'static str> {
        let mut heads = [[0u64; NR_ORDERS]; NR_ZONES];
        let mut free_pages = [0u64; NR_ZONES];
        let mut hot_frames = [0usize; NR_ZONES];
        let mut deferred = [0u64; NR_ZONES];
        let len = self.meta.len();
        let mut idx = 0usize;
        while idx < len {
            let sec = self.section_of(idx as u32);
            let state = self.section_state(sec);
            if state != SEC_INIT {
                // Untouched or deferred: metadata not read (see
                // `deferred_metadata_is_zero`). Blocks never cross a section
                // boundary, so `idx` is at the section's start.
                let start = self.base + idx as u64;
                let end = self.section_end(start);
                if state == SEC_DEFERRED {
                    let Some(zone) = self.deferrable(start, end) else {
                        return Err("deferred section not whole, or straddling zones");
                    };
                    if end > self.base + len as u64 {
                        return Err("deferred section beyond the span");
                    }
                    if sec < self.deferred_cursor[zone as usize] {
                        return Err("deferred section below its zone's cursor");
                    }
                    deferred[zone as usize] += SECTION_FRAMES;
                } else if state != SEC_UNTOUCHED {
                    return Err("section with an invalid state");
                }
                idx = (end - self.base) as usize;
                continue;
            }
            let m = self.meta[idx];
            let Some(zone) = ZoneId::from_raw(m.zone) else { return Err("frame with an invalid zone") };
            if zone != self.expected_zone(self.pfn(idx as u32)) {
                return Err("frame in the wrong zone");
            }
            match m.state {
                RESERVED => idx += 1,
                TAIL => return Err("tail frame outside any block"),
                HOT => {
                    if m.order != 0 {
                        return Err("hot frame with a non-zero order");
                    }
                    hot_frames[zone as usize] += 1;
                    if zone == ZoneId::PageTables
                        && self.verify_pgtables
                        && !self.mem.frame_is_zero(self.pfn(idx as u32))
                    {
                        return Err("hot page-table frame not zeroed");
                    }
                    idx += 1;
                }
                FREE | ALLOCATED => {
                    let order = m.order;
                    if order > MAX_ORDER {
                        return Err("block with an order above MAX_ORDER");
                    }
                    let size = 1usize << order;
                    if !self.pfn(idx as u32).is_aligned(order) {
                        return Err("block not naturally aligned");
                    }
                    if idx + size > len {
                        return Err("block beyond the span");
                    }
                    if self.meta[idx + 1..idx + size].iter().any(|t| t.state != TAIL || t.zone != m.zone) {
                        return Err("block with a non-tail frame or straddling zones");
                    }
                    if m.state == FREE {
                        heads[zone as usize][order as usize] += 1;
                        free_pages[zone as usize] += size as u64;
                        if let Some(b) = self.buddy_index(idx as u32, order) {
                            let bm = self.meta[b as usize];
                            if order < MAX_ORDER && bm.state == FREE && bm.order == order && bm.zone == m.zone {
                                return Err("free block with a free buddy: not fully merged");
                            }
                        }
                        if zone == ZoneId::PageTables && self.verify_pgtables {
                            let pfn = self.pfn(idx as u32);
                            if (0..size as u64).any(|i| !self.mem.frame_is_zero(pfn.add(i))) {
                                return Err("free page-table frame not zeroed");
                            }
                        }
                    }
                    idx += size;
                }
                _ => return Err("frame with an invalid state"),
            }
        }
        for zone in ZoneId::ALL {
            let z = &self.zones[zone as usize];
            for order in 0..=MAX_ORDER {
                let area = z.free_area[order as usize];
                let (mut prev, mut cur, mut n) = (NIL, area.head, 0u64);
                while cur != NIL {
                    let m = self.meta.get(cur as usize).ok_or("free-list link outside the span")?;
                    if m.prev != prev {
                        return Err("free-list back link broken");
                    }
                    if m.state != FREE || m.order != order || m.zone != zone as u8 {
                        return Err("free list holds a block of another state, order or zone");
                    }
                    n += 1;
                    if n > len as u64 {
                        return Err("free list has a cycle");
                    }
                    (prev, cur) = (cur, m.next);
                }
                if n != area.nr_free || n != heads[zone as usize][order as usize] {
                    return Err("free-list length differs from its count or from the free heads");
                }
            }
            if z.stats.free_pages != free_pages[zone as usize] {
                return Err("free_pages counter wrong");
            }
            if z.stats.deferred_pages != deferred[zone as usize] {
                return Err("deferred_pages counter wrong");
            }
            let hot = z.hot.as_slice();
            if hot.len() != hot_frames[zone as usize] {
                return Err("hot-list length differs from the hot frames");
            }
            for (i, &h) in hot.iter().enumerate() {
                let m = self.meta.get(h as usize).ok_or("hot frame outside the span")?;
                if m.state != HOT || m.zone != zone as u8 || hot[..i].contains(&h) {
                    return Err("hot list holds a frame twice, or a frame not hot in its zone");
                }
            }
        }
        Ok(())
    }
}
