//! The slab allocator, in the shape of Linux's SLUB (`mm/slub.c`).
//!
//! # Structure
//!
//! A [`KmemCache`] hands out objects of one size. Its memory comes in
//! *slabs*: naturally aligned blocks of `2^order` frames taken from the
//! [buddy allocator](crate::buddy), cut into `objects` equal objects. Each
//! free object holds, in its first word, the guest-physical address of the
//! next free object of its slab (the *free pointer*), so free objects cost
//! no memory besides themselves. A slab's descriptor (its free list head,
//! how many objects are in use, its list links, its cache and list) lives
//! in the buddy metadata of its head frame, the block's
//! [`BlockTag`](crate::buddy::BlockTag), as Linux's `struct slab` overlays
//! `struct page`; so an object's slab is found by rounding its address
//! down to the slab size, and its descriptor by looking the slab up.
//!
//! # Slab lifecycle
//!
//! - **cpu**: at most one slab per cache is *frozen* as the CPU slab. Its
//!   free objects are on the cache's CPU free list, which the fast paths
//!   pop and push without touching any descriptor (SLUB's lockless
//!   `c->freelist`). A frozen slab counts all its objects as in use.
//! - **full**: when the CPU free list runs dry, the CPU slab (all objects
//!   in use) goes to the full list, and a new CPU slab is taken from the
//!   partial list, else the empty list, else the buddy allocator.
//! - **partial**: a free into a full slab moves it to the partial list.
//! - **empty**: a free that empties a slab moves it to the empty list; an
//!   empty slab beyond the cache's `max_empty` is returned to the buddy
//!   allocator at once. [`KmemCache::shrink`] returns them all (and the
//!   CPU slab if it is unused).
//!
//! # Files
//!
//! One file per concept; the [`KmemCache`] they all serve is defined here
//! (each file's doc states its own invariants):
//!
//! - `page.rs`: the slab page — its descriptor in the buddy metadata, the
//!   free pointers in its objects, and the partial, full and empty lists.
//! - `cpu_slab.rs`: the CPU slab and the fast paths that touch only it
//!   ([`KmemCache::alloc`], [`KmemCache::free`]).
//! - `cpu_cache.rs`: the SMP front ends [`PerCpuCache`] and
//!   [`PerCpuKmalloc`]: one `CpuSlab` per CPU with lock-free fast paths,
//!   per-CPU remote-free lists for objects freed on another CPU, the
//!   lists behind the cache's lock. Its doc states the paths and the lock
//!   order.
//! - `cache.rs`: a cache's geometry, counters and slow paths (a new CPU
//!   slab, frees into other slabs, shrinking).
//! - `invariants.rs`: [`KmemCache::check_invariants`].
//! - `size_class.rs`: which request goes to which kmalloc cache.
//! - `kmalloc.rs`: [`Kmalloc`], the general-purpose heap built of the
//!   caches.
//! - `error.rs`: [`SlabError`] and [`CacheError`].
//!
//! # Invariants (checked by [`KmemCache::check_invariants`])
//!
//! - Every slab of the cache is on exactly one of the partial, full and
//!   empty lists, or is the CPU slab; its descriptor says which, and names
//!   the cache. Partial slabs have `0 < inuse < objects`, full slabs
//!   `inuse == objects` and no free object, empty slabs `inuse == 0`; the
//!   empty list never holds more than `max_empty` slabs.
//! - For every slab but the CPU slab, `inuse` plus the length of its free
//!   list is `objects`; the CPU free list holds only objects of the CPU
//!   slab. Free lists hold object starts, each once, and end.
//! - An object is aligned to the cache's alignment: slabs are naturally
//!   aligned (at least 4 KiB) and the object stride is a multiple of the
//!   alignment, which is at most 4 KiB.
//! - Out of memory is `None`, never a panic (the `GlobalAlloc` contract).
//!
//! A free is checked as SLUB does without `slub_debug`: the object must
//! be an object start in a slab of this cache, and must not be the object
//! at the head of its free list (the `CONFIG_SLAB_FREELIST_HARDENED`
//! check); a free into a slab with no object in use is refused. Deeper
//! double frees are found by [`KmemCache::check_invariants`], not on the
//! fast path. A free pointer that does not point into the CPU slab (the
//! trace of a use after free) is never followed: the rest of that list is
//! dropped and counted in [`CacheStats::corruptions`].
//!
//! [`Kmalloc`] is the set of power-of-two caches `kmalloc-8` …
//! `kmalloc-4096`; larger or more strictly aligned requests go straight to
//! the buddy allocator.

use crate::buddy::ZonePref;

mod cache;
mod cpu_cache;
mod cpu_slab;
mod error;
mod invariants;
mod kmalloc;
mod page;
mod size_class;

pub use cache::{CacheStats, DEFAULT_MAX_EMPTY, MAX_ALIGN};
pub use cpu_cache::{PerCpuCache, PerCpuKmalloc};
pub use error::{CacheError, SlabError};
pub use kmalloc::{KMALLOC_ID_BASE, Kmalloc};
pub use size_class::{KMALLOC_MAX_CACHE_SIZE, NR_KMALLOC_CACHES, SizeClass, size_class};

use cpu_slab::CpuSlab;
use page::SlabLists;

/// A cache of equal-sized objects. See the module documentation.
#[derive(Debug)]
pub struct KmemCache {
    name: &'static str,
    id: u8,
    /// Object stride: the requested size rounded up to the alignment.
    size: u32,
    /// `size - 1` if `size` is a power of two, else 0 (modulo by mask).
    size_mask: u32,
    /// Bytes of a slab's objects, `objects * size` (the end of the last).
    objects_bytes: u32,
    /// `!(slab_bytes - 1)`: an address's slab base is `addr & slab_mask`.
    slab_mask: u64,
    align: u32,
    order: u8,
    objects: u32,
    zone: ZonePref,
    max_empty: u32,
    /// The frozen CPU slab and its free list.
    cpu: CpuSlab,
    /// The partial, full and empty slabs.
    lists: SlabLists,
    stats: CacheStats,
}

#[cfg(test)]
mod tests;
