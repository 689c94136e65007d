//! Each zone's hot list: a small stack of order-0 frames in front of the
//! zone's free lists, refilled from them and drained to them in batches
//! of [`HOT_BATCH`] (Linux's `rmqueue_bulk` and `free_pcppages_bulk`).
//!
//! It plays the part of Linux's `per_cpu_pages` for the allocator used on
//! its own (one CPU, `&mut` access): one per zone. On SMP, the per-CPU
//! lists of [`PerCpuBuddy`](super::PerCpuBuddy) (`cpu_pages.rs`) sit in
//! front of the zones, each a [`ZoneHotList`] of one CPU and one zone;
//! the zone's own hot list then only buffers the zone-path order-0 frees.
//!
//! Part of [`crate::buddy`], whose module doc states the allocator's
//! invariants. Here:
//!
//! - A hot list holds at most [`HOT_HIGH`] distinct span indices, each a
//!   frame of the list's zone whose metadata says `HOT`, order 0, clear
//!   tag. The buddy lists count those frames as allocated; callers count
//!   them as free.
//! - The bottom of the stack is the oldest frame: a drain returns the
//!   oldest, an allocation takes the most recently freed (still cache-hot).
//! - A hot frame never causes a spurious failure: an allocation of a
//!   higher order that the free lists cannot serve drains its zone's hot
//!   list and retries, and [`drain_hot_lists`](BuddyAllocator::drain_hot_lists)
//!   returns them all.

use super::frame::{ALLOCATED, HOT};
use super::{BuddyAllocator, NR_ZONES, ZoneId};
use crate::phys::{Pfn, PhysMem};

/// Capacity of each zone's hot list; a free that finds it full first
/// returns [`HOT_BATCH`] of its oldest frames to the buddy lists (Linux's
/// `pcp->high`).
pub const HOT_HIGH: usize = 64;
/// How many frames a hot list takes from, or gives back to, the buddy
/// lists at a time (Linux's `pcp->batch`).
pub const HOT_BATCH: usize = 16;

/// One zone's stack of hot order-0 frames (span indices); the bottom is
/// the oldest.
#[derive(Clone, Copy, Debug)]
pub(super) struct ZoneHotList {
    frames: [u32; HOT_HIGH],
    count: usize,
}

impl ZoneHotList {
    pub(super) const EMPTY: ZoneHotList = ZoneHotList { frames: [0; HOT_HIGH], count: 0 };

    /// The frames, oldest first.
    #[inline]
    pub(super) fn as_slice(&self) -> &[u32] {
        &self.frames[..self.count]
    }

    #[inline]
    pub(super) fn len(&self) -> usize {
        self.count
    }

    #[inline]
    pub(super) fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether a push fits. (Written `count < HOT_HIGH`, not as a test
    /// for full, so that the compiler drops `push`'s bounds check on the
    /// free fast path.)
    #[inline]
    pub(super) fn has_room(&self) -> bool {
        self.count < HOT_HIGH
    }

    /// Take the most recently freed frame, if any.
    #[inline]
    pub(super) fn pop(&mut self) -> Option<u32> {
        let n = self.count.checked_sub(1)?;
        // `count <= HOT_HIGH` always; `get` turns the bounds check into the
        // same branch as the empty test.
        let idx = *self.frames.get(n)?;
        self.count = n;
        Some(idx)
    }

    /// Push a frame; the caller has made room ([`has_room`](Self::has_room)).
    #[inline]
    pub(super) fn push(&mut self, idx: u32) {
        self.frames[self.count] = idx;
        self.count += 1;
    }

    /// Forget the `n` oldest frames (`n <= len`), which the caller has
    /// returned to the free lists.
    pub(super) fn remove_oldest(&mut self, n: usize) {
        self.frames.copy_within(n..self.count, 0);
        self.count -= n;
    }
}

impl<M: PhysMem> BuddyAllocator<'_, M> {
    /// Return every hot frame to the buddy lists (Linux's
    /// `drain_all_pages`), after which free memory is fully merged.
    pub fn drain_hot_lists(&mut self) {
        for zone in 0..NR_ZONES {
            self.hot_drain(zone, HOT_HIGH);
        }
    }

    /// Call `f(frame, zone)` for every frame on the hot lists.
    pub fn for_each_hot_frame(&self, mut f: impl FnMut(Pfn, ZoneId)) {
        for zone in ZoneId::ALL {
            for &idx in self.zones[zone as usize].hot.as_slice() {
                f(self.pfn(idx), zone);
            }
        }
    }

    /// An order-0 frame from `zone`'s hot list, refilled with
    /// [`HOT_BATCH`] frames from the free lists when empty.
    #[inline]
    pub(super) fn hot_alloc(&mut self, zone: ZoneId) -> Option<u32> {
        let z = zone as usize;
        if self.zones[z].hot.is_empty() {
            self.hot_refill(zone);
        }
        let z = &mut self.zones[z];
        let idx = z.hot.pop()?;
        z.stats.allocs += 1;
        // A hot frame's tag was cleared when it was freed.
        self.meta[idx as usize].state = ALLOCATED;
        Some(idx)
    }

    /// Move up to [`HOT_BATCH`] order-0 frames from the free lists to the
    /// (empty) hot list (Linux's `rmqueue_bulk`).
    fn hot_refill(&mut self, zone: ZoneId) {
        for _ in 0..HOT_BATCH {
            let Some(idx) = self.rmqueue(zone, 0) else { break };
            self.meta[idx as usize].state = HOT;
            self.zones[zone as usize].hot.push(idx);
        }
    }

    /// Put the allocated order-0 frame `idx` (tag cleared) on its zone's
    /// hot list, first draining [`HOT_BATCH`] old frames if the list is
    /// full.
    #[inline]
    pub(super) fn hot_free(&mut self, zone: usize, idx: u32) {
        if !self.zones[zone].hot.has_room() {
            self.hot_drain(zone, HOT_BATCH);
        }
        self.meta[idx as usize].state = HOT;
        self.zones[zone].hot.push(idx);
    }

    /// Return the `n` oldest hot frames of `zone` (at most all of them) to
    /// the free lists (Linux's `free_pcppages_bulk`).
    pub(super) fn hot_drain(&mut self, zone: usize, n: usize) {
        let n = n.min(self.zones[zone].hot.len());
        for i in 0..n {
            let idx = self.zones[zone].hot.as_slice()[i];
            self.meta[idx as usize].state = ALLOCATED;
            self.free_block(idx, 0);
        }
        self.zones[zone].hot.remove_oldest(n);
    }
}
