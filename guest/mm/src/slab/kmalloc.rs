//! [`Kmalloc`]: the guest's general-purpose heap (Linux's `kmalloc`), the
//! ten power-of-two caches `kmalloc-8` … `kmalloc-4k` in front of the
//! buddy allocator, which serves larger or more strictly aligned requests
//! as whole blocks.
//!
//! Part of [`crate::slab`]. Invariants: a request is freed by the path
//! that served it, because both choose by the same size and alignment (the
//! caller passes the same ones to [`Kmalloc::free`] as to
//! [`Kmalloc::alloc`]); the caches use ids `KMALLOC_ID_BASE..` and no
//! other cache sharing the buddy allocator may; `large_allocs -
//! large_frees` is the number of live large blocks.

use guest_abi::Gpa;

use super::size_class::cache_of;
use super::{KmemCache, NR_KMALLOC_CACHES, SizeClass, SlabError, size_class};
use crate::buddy::{BuddyAllocator, ZonePref};
use crate::phys::{Pfn, PhysMem};

/// Cache ids `KMALLOC_ID_BASE..KMALLOC_ID_BASE + NR_KMALLOC_CACHES` are
/// kmalloc's; named caches should use others.
pub const KMALLOC_ID_BASE: u8 = 1;

const KMALLOC_NAMES: [&str; NR_KMALLOC_CACHES] = [
    "kmalloc-8",
    "kmalloc-16",
    "kmalloc-32",
    "kmalloc-64",
    "kmalloc-128",
    "kmalloc-256",
    "kmalloc-512",
    "kmalloc-1k",
    "kmalloc-2k",
    "kmalloc-4k",
];

/// The kmalloc caches (`kmalloc-8` … `kmalloc-4k`) in front of the buddy
/// allocator: the guest's general-purpose heap.
#[derive(Debug)]
pub struct Kmalloc {
    caches: [KmemCache; NR_KMALLOC_CACHES],
    zone: ZonePref,
    large_allocs: u64,
    large_frees: u64,
}

impl Kmalloc {
    /// The kmalloc caches, taking slabs and large blocks from `zone`.
    pub const fn new(zone: ZonePref) -> Self {
        Kmalloc {
            caches: [
                kmalloc_cache(0, zone),
                kmalloc_cache(1, zone),
                kmalloc_cache(2, zone),
                kmalloc_cache(3, zone),
                kmalloc_cache(4, zone),
                kmalloc_cache(5, zone),
                kmalloc_cache(6, zone),
                kmalloc_cache(7, zone),
                kmalloc_cache(8, zone),
                kmalloc_cache(9, zone),
            ],
            zone,
            large_allocs: 0,
            large_frees: 0,
        }
    }

    /// The cache `kmalloc-(8 << i)`.
    pub fn cache(&self, i: usize) -> &KmemCache {
        &self.caches[i]
    }

    /// Large (buddy) allocations and frees so far.
    pub const fn large_counts(&self) -> (u64, u64) {
        (self.large_allocs, self.large_frees)
    }

    /// Allocate `size` bytes aligned to `align` (a power of two); `None`
    /// when out of memory or the request cannot be served.
    // Always inlined, as Linux's `slab_alloc_node` and `slab_free` are:
    // the fast path is a few instructions, the slow path a call.
    #[inline(always)]
    pub fn alloc<M: PhysMem>(&mut self, buddy: &mut BuddyAllocator<'_, M>, size: usize, align: usize) -> Option<Gpa> {
        match cache_of(size, align) {
            Some(i) => self.caches[i].alloc(buddy),
            None => self.alloc_large(buddy, size_class(size, align)),
        }
    }

    /// A request beyond the caches: a block from the buddy allocator.
    #[inline(never)]
    fn alloc_large<M: PhysMem>(&mut self, buddy: &mut BuddyAllocator<'_, M>, class: SizeClass) -> Option<Gpa> {
        let SizeClass::Pages(order) = class else { return None };
        let pfn = buddy.alloc(order, self.zone)?;
        self.large_allocs += 1;
        Some(pfn.addr())
    }

    /// Free `addr`, allocated by [`alloc`](Self::alloc) with the same `size`
    /// and `align`. A bad free is refused and changes nothing.
    // Always inlined, as Linux's `slab_alloc_node` and `slab_free` are:
    // the fast path is a few instructions, the slow path a call.
    #[inline(always)]
    pub fn free<M: PhysMem>(
        &mut self,
        buddy: &mut BuddyAllocator<'_, M>,
        addr: Gpa,
        size: usize,
        align: usize,
    ) -> Result<(), SlabError> {
        match cache_of(size, align) {
            Some(i) => self.caches[i].free(buddy, addr),
            None => self.free_large(buddy, addr, size_class(size, align)),
        }
    }

    /// Free a request beyond the caches: a block of the buddy allocator.
    #[inline(never)]
    fn free_large<M: PhysMem>(
        &mut self,
        buddy: &mut BuddyAllocator<'_, M>,
        addr: Gpa,
        class: SizeClass,
    ) -> Result<(), SlabError> {
        let SizeClass::Pages(order) = class else { return Err(SlabError::Foreign) };
        let pfn = Pfn::from_addr(addr).ok_or(SlabError::NotObjectStart)?;
        buddy.free(pfn, order).map_err(SlabError::Pages)?;
        self.large_frees += 1;
        Ok(())
    }

    /// [`KmemCache::shrink`] every cache.
    pub fn shrink<M: PhysMem>(&mut self, buddy: &mut BuddyAllocator<'_, M>) {
        self.caches.iter_mut().for_each(|c| c.shrink(buddy));
    }

    /// [`KmemCache::check_invariants`] of every cache.
    pub fn check_invariants<M: PhysMem>(&self, buddy: &BuddyAllocator<'_, M>) -> Result<(), &'static str> {
        self.caches.iter().try_for_each(|c| c.check_invariants(buddy))
    }
}

/// `kmalloc-(8 << i)`: objects of `8 << i` bytes aligned to their size.
pub(super) const fn kmalloc_cache(i: usize, zone: ZonePref) -> KmemCache {
    let size = 8u32 << i;
    match KmemCache::new(KMALLOC_NAMES[i], KMALLOC_ID_BASE + i as u8, size, size, zone) {
        Ok(c) => c,
        Err(_) => panic!("kmalloc size class not constructible"),
    }
}
