//! The kmalloc size classes: which power-of-two cache (`kmalloc-8` …
//! `kmalloc-4k`) serves a request of a given size and alignment, or which
//! buddy order serves it when no cache can.
//!
//! Part of [`crate::slab`]. Invariants: a class's objects are at least as
//! large as the request and aligned to their size, so aligned to the
//! request's alignment; [`size_class`] and the compare tree `cache_of`
//! (the one [`Kmalloc`](super::Kmalloc)'s fast path uses) agree on every
//! request a cache serves (a test checks every size up to twice the
//! largest class, at every alignment up to 8 KiB).

use crate::PAGE_SIZE;
use crate::buddy::MAX_ORDER;

/// Number of kmalloc size classes: 8, 16, …, 4096 bytes.
pub const NR_KMALLOC_CACHES: usize = 10;
/// The largest request served by a slab cache.
pub const KMALLOC_MAX_CACHE_SIZE: usize = 4096;
/// Where a request of a given size and alignment is served.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SizeClass {
    /// By `kmalloc-(8 << i)`.
    Cache(usize),
    /// By the buddy allocator, a block of this order.
    Pages(u8),
    /// By nobody: larger or more aligned than a `MAX_ORDER` block.
    TooLarge,
}

/// The size class of a request (`align` a power of two, as `Layout`
/// guarantees).
#[inline]
pub const fn size_class(size: usize, align: usize) -> SizeClass {
    let need = if size > align { size } else { align };
    if need <= KMALLOC_MAX_CACHE_SIZE {
        // ceil(log2(max(need, 8))) - 3 without a branch: the top bit of
        // `(need - 1) | 7` is bit ceil(log2(need)) - 1 for `need >= 9`, and
        // bit 2 for `need <= 8`.
        return SizeClass::Cache((need.saturating_sub(1) | 7).ilog2() as usize - 2);
    }
    let pages = need.div_ceil(PAGE_SIZE as usize);
    let order = usize::BITS - (pages - 1).leading_zeros();
    if order > MAX_ORDER as u32 { SizeClass::TooLarge } else { SizeClass::Pages(order as u8) }
}

/// The kmalloc cache of a request, as [`size_class`], by a tree of
/// compares: each way through it ends in a constant index, so once the
/// branches are predicted the cache's address does not wait for the size
/// (a computed index puts the size computation on the critical path of
/// every allocation: about 2 ns measured).
#[inline(always)]
pub(super) const fn cache_of(size: usize, align: usize) -> Option<usize> {
    let need = if size > align { size } else { align };
    if need <= 64 {
        if need <= 16 {
            if need <= 8 { Some(0) } else { Some(1) }
        } else if need <= 32 {
            Some(2)
        } else {
            Some(3)
        }
    } else if need <= 512 {
        if need <= 128 {
            Some(4)
        } else if need <= 256 {
            Some(5)
        } else {
            Some(6)
        }
    } else if need <= 1024 {
        Some(7)
    } else if need <= 2048 {
        Some(8)
    } else if need <= KMALLOC_MAX_CACHE_SIZE {
        Some(9)
    } else {
        None
    }
}
