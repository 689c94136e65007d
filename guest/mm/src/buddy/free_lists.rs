//! The free lists (`free_area[order]` of each zone), and the two moves of
//! a buddy allocator: merging a freed block with its buddy (Linux's
//! `__free_one_page`) and splitting a larger block to serve a smaller one
//! (`__rmqueue_smallest` and `expand`).
//!
//! Part of [`crate::buddy`], whose module doc states the allocator's
//! invariants. Here:
//!
//! - The lists are doubly linked through [`FrameMeta`]'s `prev` and `next`
//!   (span indices, `NIL`-terminated), never through the free frames.
//! - A block on `free_area[k]` of a zone is a `FREE` head of order `k` in
//!   that zone; `nr_free` is the list's length, and the zone's
//!   `free_pages` the sum of its blocks' sizes.
//! - [`free_block`](BuddyAllocator::free_block) leaves the zone fully
//!   merged if it was; [`rmqueue`](BuddyAllocator::rmqueue) puts every
//!   upper half it splits off back on the lists, so no frame is lost.

use super::frame::{ALLOCATED, FREE, FrameMeta, NIL, TAIL};
use super::zone::Zone;
use super::{BuddyAllocator, MAX_ORDER, ZoneId};
use crate::phys::{Pfn, PhysMem};

/// Head and length of one `free_area[order]` list.
#[derive(Clone, Copy, Debug)]
pub(super) struct FreeArea {
    pub(super) head: u32,
    pub(super) nr_free: u64,
}

impl FreeArea {
    pub(super) const EMPTY: FreeArea = FreeArea { head: NIL, nr_free: 0 };
}

impl Zone {
    /// Put the free block headed by `idx` (already marked `FREE` with its
    /// order) at the head of `free_area[order]`.
    pub(super) fn push(&mut self, meta: &mut [FrameMeta], order: u8, idx: u32) {
        let area = &mut self.free_area[order as usize];
        let old = area.head;
        meta[idx as usize].prev = NIL;
        meta[idx as usize].next = old;
        if old != NIL {
            meta[old as usize].prev = idx;
        }
        area.head = idx;
        area.nr_free += 1;
        self.stats.free_pages += 1 << order;
    }

    /// Unlink the free block headed by `idx` from `free_area[order]`.
    pub(super) fn remove(&mut self, meta: &mut [FrameMeta], order: u8, idx: u32) {
        let FrameMeta { prev, next, .. } = meta[idx as usize];
        if prev == NIL {
            self.free_area[order as usize].head = next;
        } else {
            meta[prev as usize].next = next;
        }
        if next != NIL {
            meta[next as usize].prev = prev;
        }
        meta[idx as usize].prev = NIL;
        meta[idx as usize].next = NIL;
        self.free_area[order as usize].nr_free -= 1;
        self.stats.free_pages -= 1 << order;
    }

    /// Unlink and return the first block of `free_area[order]`.
    pub(super) fn pop(&mut self, meta: &mut [FrameMeta], order: u8) -> Option<u32> {
        let head = self.free_area[order as usize].head;
        if head == NIL {
            return None;
        }
        self.remove(meta, order, head);
        Some(head)
    }
}

impl<M: PhysMem> BuddyAllocator<'_, M> {
    /// Call `f(head, order, zone)` for every block on the free lists.
    pub fn for_each_free_block(&self, mut f: impl FnMut(Pfn, u8, ZoneId)) {
        for zone in ZoneId::ALL {
            for order in 0..=MAX_ORDER {
                let mut idx = self.zones[zone as usize].free_area[order as usize].head;
                while idx != NIL {
                    f(self.pfn(idx), order, zone);
                    idx = self.meta[idx as usize].next;
                }
            }
        }
    }

    /// Span index of the buddy of the block of `order` at `idx`: the block
    /// at absolute `pfn ^ (1 << order)`, if inside the span.
    #[inline]
    pub(super) fn buddy_index(&self, idx: u32, order: u8) -> Option<u32> {
        buddy_of(self.base, self.meta.len() as u64, idx, order)
    }

    /// Insert the block of `order` at `idx` (its frames tails or a head, not
    /// on any list) into its zone's free lists, merging with its buddy while
    /// the buddy is a free block of the same order and zone (Linux's
    /// `__free_one_page`).
    pub(super) fn free_block(&mut self, mut idx: u32, mut order: u8) {
        let (base, len) = (self.base, self.meta.len() as u64);
        let zone = self.meta[idx as usize].zone;
        let z = &mut self.zones[zone as usize];
        while order < MAX_ORDER {
            let Some(buddy) = buddy_of(base, len, idx, order) else { break };
            let b = self.meta[buddy as usize];
            if b.state != FREE || b.order != order || b.zone != zone {
                break;
            }
            z.remove(self.meta, order, buddy);
            let (head, tail) = if buddy < idx { (buddy, idx) } else { (idx, buddy) };
            self.meta[tail as usize].state = TAIL;
            idx = head;
            order += 1;
            z.stats.merges += 1;
        }
        let m = &mut self.meta[idx as usize];
        m.state = FREE;
        m.order = order;
        z.push(self.meta, order, idx);
    }

    /// Take a block of `order` from `zone`'s free lists, splitting a larger
    /// one if needed (Linux's `__rmqueue_smallest` and `expand`). The block
    /// is returned marked allocated.
    pub(super) fn rmqueue(&mut self, zone: ZoneId, order: u8) -> Option<u32> {
        let mut found = order;
        let idx = loop {
            if let Some(idx) = self.zones[zone as usize].pop(self.meta, found) {
                break idx;
            }
            if found == MAX_ORDER {
                // The free lists cannot serve: take a deferred section.
                if !self.grow(zone) {
                    return None;
                }
                continue;
            }
            found += 1;
        };
        let z = &mut self.zones[zone as usize];
        // expand: give back the upper half until the block has `order`.
        while found > order {
            found -= 1;
            let upper = idx + (1 << found);
            let m = &mut self.meta[upper as usize];
            m.state = FREE;
            m.order = found;
            z.push(self.meta, found, upper);
            z.stats.splits += 1;
        }
        let m = &mut self.meta[idx as usize];
        m.state = ALLOCATED;
        m.order = order;
        m.clear_tag();
        Some(idx)
    }
}

/// Span index of the buddy of the block of `order` at span index `idx`, in
/// a span of `len` frames from absolute pfn `base`: the block at absolute
/// pfn `pfn ^ (1 << order)`, if it is inside the span.
#[inline]
fn buddy_of(base: u64, len: u64, idx: u32, order: u8) -> Option<u32> {
    let buddy = (base + idx as u64) ^ (1 << order);
    let off = buddy.checked_sub(base)?;
    if off < len { Some(off as u32) } else { None }
}
