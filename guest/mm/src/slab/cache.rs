//! A cache's geometry (object stride, slab order, objects per slab), its
//! counters, and the slow paths: taking a new CPU slab, freeing into a
//! slab that is not the CPU slab (moving it between the lists), and giving
//! slabs back to the buddy allocator.
//!
//! Part of [`crate::slab`], whose module doc states the cache's
//! invariants and the slab lifecycle. Here:
//!
//! - The geometry is fixed at [`KmemCache::new`]: the stride is a multiple
//!   of the alignment (at most [`MAX_ALIGN`]), and a slab holds between
//!   [`MIN_OBJECTS`] (unless the order is capped) and [`MAX_OBJECTS`]
//!   objects.
//! - A slab goes back to the buddy allocator only from no list, and only
//!   when empty: at once when the empty list already holds `max_empty`
//!   slabs, or by [`KmemCache::shrink`].
//! - `slabs_allocated - slabs_freed` is the number of live slabs.

use guest_abi::Gpa;

use super::cpu_slab::CpuSlab;
use super::page::{FREELIST_END, NIL, SlabDesc, SlabList, SlabLists, desc, set_desc};
use super::{CacheError, KmemCache, SlabError};
use crate::PAGE_SIZE;
use crate::buddy::{BuddyAllocator, ZonePref};
use crate::phys::{PAGE_SHIFT, Pfn, PhysMem};

/// Fewest objects a slab is sized for (Linux's `slub_min_objects` idea).
const MIN_OBJECTS: u32 = 8;
/// Largest slab order.
const MAX_SLAB_ORDER: u8 = 3;
/// Most objects in a slab: 8-byte objects in an order-0 slab. (A cache
/// only takes a larger order when objects exceed 512 bytes, and then has
/// at most `32 KiB / 513 < 64` objects.)
pub(super) const MAX_OBJECTS: u32 = PAGE_SIZE as u32 / 8;
/// Default number of empty slabs a cache keeps.
pub const DEFAULT_MAX_EMPTY: u32 = 2;
/// The largest alignment a cache can honour.
pub const MAX_ALIGN: u32 = PAGE_SIZE as u32;

/// Per-cache counters (Linux's `/sys/kernel/slab/*/`, in small).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct CacheStats {
    /// Objects handed out.
    pub allocs: u64,
    /// Objects taken back.
    pub frees: u64,
    /// Slabs taken from the buddy allocator.
    pub slabs_allocated: u64,
    /// Slabs returned to the buddy allocator.
    pub slabs_freed: u64,
    /// Allocations that failed for want of memory.
    pub failures: u64,
    /// Free pointers found pointing outside the CPU slab (use after free);
    /// the objects behind them are leaked rather than handed out.
    pub corruptions: u64,
}

impl KmemCache {
    /// A cache named `name` (for reports) of objects of `size` bytes aligned
    /// to `align` (a power of two, at most [`MAX_ALIGN`]; at least 8 is
    /// used), with slabs from `zone`. `id` tells this cache's slabs from
    /// other caches' and must be unique among the caches sharing a buddy
    /// allocator.
    pub const fn new(name: &'static str, id: u8, size: u32, align: u32, zone: ZonePref) -> Result<Self, CacheError> {
        if !align.is_power_of_two() || align > MAX_ALIGN {
            return Err(CacheError::BadAlign);
        }
        let align = if align < 8 { 8 } else { align };
        let size = if size < 8 { 8 } else { size };
        let size = match size.checked_next_multiple_of(align) {
            Some(s) => s,
            None => return Err(CacheError::TooLarge),
        };
        // The smallest order giving MIN_OBJECTS objects, capped.
        let mut order = 0u8;
        while order < MAX_SLAB_ORDER && ((PAGE_SIZE as u32) << order) / size < MIN_OBJECTS {
            order += 1;
        }
        let objects = ((PAGE_SIZE as u32) << order) / size;
        if objects == 0 || objects > MAX_OBJECTS {
            return Err(CacheError::TooLarge);
        }
        Ok(KmemCache {
            name,
            id,
            size,
            size_mask: if size.is_power_of_two() { size - 1 } else { 0 },
            objects_bytes: objects * size,
            slab_mask: !((PAGE_SIZE << order) - 1),
            align,
            order,
            objects,
            zone,
            max_empty: DEFAULT_MAX_EMPTY,
            cpu: CpuSlab::NONE,
            lists: SlabLists::EMPTY,
            stats: CacheStats { allocs: 0, frees: 0, slabs_allocated: 0, slabs_freed: 0, failures: 0, corruptions: 0 },
        })
    }

    /// The cache's name.
    pub const fn name(&self) -> &'static str {
        self.name
    }

    /// Object stride in bytes (the size rounded up to the alignment).
    pub const fn object_size(&self) -> u32 {
        self.size
    }

    /// Alignment of every object.
    pub const fn align(&self) -> u32 {
        self.align
    }

    /// Order of the cache's slabs.
    pub const fn slab_order(&self) -> u8 {
        self.order
    }

    /// Objects per slab.
    pub const fn objects_per_slab(&self) -> u32 {
        self.objects
    }

    /// The counters.
    pub const fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Slabs on the partial, full and empty lists, and whether there is a
    /// CPU slab.
    pub const fn slab_counts(&self) -> (u32, u32, u32, bool) {
        (self.lists.partial.len, self.lists.full.len, self.lists.empty.len, self.cpu.slab != NIL)
    }

    /// How many empty slabs the cache keeps before returning them to the
    /// buddy allocator (default [`DEFAULT_MAX_EMPTY`]). Takes effect at the
    /// next free that empties a slab, or [`shrink`](Self::shrink).
    pub fn set_max_empty(&mut self, n: u32) {
        self.max_empty = n;
    }

    /// Take the next slab with free objects as the CPU slab, and allocate
    /// from it.
    #[cold]
    #[inline(never)]
    pub(super) fn alloc_slow<M: PhysMem>(&mut self, buddy: &mut BuddyAllocator<'_, M>) -> Option<Gpa> {
        // The CPU free list ran dry: every object is in use.
        self.retire_cpu_slab(buddy);
        let slab = if self.lists.partial.head != NIL {
            self.lists.unlink(buddy, self.lists.partial.head)
        } else if self.lists.empty.head != NIL {
            self.lists.unlink(buddy, self.lists.empty.head)
        } else {
            match self.new_slab(buddy) {
                Some(slab) => slab,
                None => {
                    self.stats.failures += 1;
                    return None;
                }
            }
        };
        self.freeze(buddy, slab);
        let obj = self.pop_cpu_object(buddy);
        if obj.is_none() {
            // A slab on the partial or empty list always has a free object.
            self.stats.failures += 1;
        }
        obj
    }

    /// A fresh slab from the buddy allocator, every object on its free
    /// list, on no list.
    fn new_slab<M: PhysMem>(&mut self, buddy: &mut BuddyAllocator<'_, M>) -> Option<u32> {
        let pfn = buddy.alloc(self.order, self.zone)?;
        if pfn.0 >= NIL as u64 {
            // Beyond what a descriptor can name (16 TiB): not usable here.
            let _ = buddy.free(pfn, self.order);
            return None;
        }
        let base = pfn.addr().0;
        let size = self.size as u64;
        for i in 0..self.objects as u64 {
            let next = if i + 1 == self.objects as u64 { FREELIST_END } else { base + (i + 1) * size };
            buddy.mem().write_u64(Gpa(base + i * size), next);
        }
        let slab = pfn.0 as u32;
        let d = SlabDesc { prev: NIL, next: NIL, freelist: 0, inuse: 0, cache: self.id, list: SlabList::Empty };
        set_desc(buddy, slab, d);
        self.stats.slabs_allocated += 1;
        Some(slab)
    }

    /// Whether `off` (bytes into a slab) is an object start.
    #[inline]
    pub(super) fn check_offset(&self, off: u64) -> Result<(), SlabError> {
        let rem = if self.size_mask != 0 { off & self.size_mask as u64 } else { off % self.size as u64 };
        if rem != 0 || off >= self.objects_bytes as u64 {
            return Err(SlabError::NotObjectStart);
        }
        Ok(())
    }

    /// Everything [`free`](Self::free) does beyond its fast path: a free
    /// into a slab that is not the CPU slab, which may move the slab to
    /// another list or back to the buddy allocator.
    #[cold]
    #[inline(never)]
    pub(super) fn free_slow<M: PhysMem>(
        &mut self,
        buddy: &mut BuddyAllocator<'_, M>,
        addr: Gpa,
        slab_base: u64,
    ) -> Result<(), SlabError> {
        let pfn = Pfn(slab_base >> PAGE_SHIFT);
        let Some((order, tag)) = buddy.block_tag(pfn) else { return Err(SlabError::Foreign) };
        let Some(mut d) = SlabDesc::from_tag(tag) else { return Err(SlabError::Foreign) };
        if order != self.order || d.cache != self.id || d.list == SlabList::Cpu {
            return Err(SlabError::Foreign);
        }
        let off = addr.0 - slab_base;
        self.check_offset(off)?;
        if d.inuse == 0 || d.freelist == off as u32 {
            return Err(SlabError::DoubleFree);
        }
        let slab = pfn.0 as u32;
        let next = if d.freelist == NIL { FREELIST_END } else { slab_base + d.freelist as u64 };
        buddy.mem().write_u64(addr, next);
        d.freelist = off as u32;
        d.inuse -= 1;
        self.stats.frees += 1;
        let target = if d.inuse == 0 { SlabList::Empty } else { SlabList::Partial };
        if d.list == target {
            set_desc(buddy, slab, d);
            return Ok(());
        }
        // Move it: unlink keeps the updated free list and count.
        set_desc(buddy, slab, d);
        self.lists.unlink(buddy, slab);
        let d = desc(buddy, slab);
        if target == SlabList::Empty && self.lists.empty.len >= self.max_empty {
            self.discard(buddy, slab);
        } else {
            self.lists.push(buddy, slab, d, target);
        }
        Ok(())
    }

    /// Return every empty slab to the buddy allocator, and the CPU slab too
    /// if none of its objects is in use (Linux's `kmem_cache_shrink`).
    pub fn shrink<M: PhysMem>(&mut self, buddy: &mut BuddyAllocator<'_, M>) {
        self.flush_cpu_slab(buddy);
        while self.lists.empty.head != NIL {
            let slab = self.lists.unlink(buddy, self.lists.empty.head);
            self.discard(buddy, slab);
        }
    }

    /// Return a slab (on no list) to the buddy allocator.
    fn discard<M: PhysMem>(&mut self, buddy: &mut BuddyAllocator<'_, M>, slab: u32) {
        if buddy.free(Pfn(slab as u64), self.order).is_ok() {
            self.stats.slabs_freed += 1;
        }
    }
}
