//! The CPU slab: the one slab per cache that is *frozen*, whose free
//! objects sit on a free list the fast paths pop and push without touching
//! any descriptor (SLUB's `kmem_cache_cpu` and its lockless
//! `c->freelist`), and those fast paths, [`KmemCache::alloc`] and
//! [`KmemCache::free`].
//!
//! A [`KmemCache`] used on its own has one CPU slab (one CPU, `&mut`
//! access). For SMP, [`PerCpuCache`](super::PerCpuCache) (`cpu_cache.rs`)
//! keeps one [`CpuSlab`] per CPU, with remote frees handed to the owning
//! CPU, and runs this file's slow paths with the calling CPU's slab
//! swapped into the cache under the cache lock.
//!
//! Part of [`crate::slab`], whose module doc states the cache's
//! invariants. Here:
//!
//! - `slab == NIL` exactly when `base == NO_CPU_SLAB`, and then the free
//!   list is empty; otherwise `base` is the slab's address.
//! - A frozen slab's descriptor is on no list, says `Cpu`, has no free
//!   list of its own and counts every object as in use; its free objects
//!   are exactly those on the CPU free list.
//! - A free pointer that leaves the CPU slab is never followed (it is the
//!   trace of a write after free): the rest of the list is dropped and
//!   counted in [`CacheStats::corruptions`](super::CacheStats::corruptions).

use guest_abi::Gpa;

use super::page::{FREELIST_END, NIL, SlabList, desc, set_desc};
use super::{KmemCache, SlabError};
use crate::buddy::BuddyAllocator;
use crate::phys::{PAGE_SHIFT, PhysMem};

/// [`CpuSlab::base`] when there is no CPU slab (never a slab address: a
/// slab is page-aligned).
pub(super) const NO_CPU_SLAB: u64 = u64::MAX;

/// A cache's frozen slab and its free list.
#[derive(Clone, Copy, Debug)]
pub(super) struct CpuSlab {
    /// The frozen slab (pfn), or `NIL`.
    pub(super) slab: u32,
    /// The slab's address, or `NO_CPU_SLAB`, kept with `slab` for the free
    /// fast path.
    pub(super) base: u64,
    /// First free object of the slab, or `FREELIST_END`.
    pub(super) freelist: u64,
}

impl CpuSlab {
    /// No CPU slab.
    pub(super) const NONE: CpuSlab = CpuSlab { slab: NIL, base: NO_CPU_SLAB, freelist: FREELIST_END };
}

impl KmemCache {
    /// Allocate an object; `None` when the buddy allocator is out of memory.
    /// Its contents are whatever was there (the first word is the stale
    /// free pointer).
    // Always inlined, as Linux's `slab_alloc_node` and `slab_free` are:
    // the fast path is a few instructions, the slow path a call.
    #[inline(always)]
    pub fn alloc<M: PhysMem>(&mut self, buddy: &mut BuddyAllocator<'_, M>) -> Option<Gpa> {
        match self.pop_cpu_object(buddy) {
            Some(obj) => Some(obj),
            None => self.alloc_slow(buddy),
        }
    }

    /// Take the first object of the CPU free list, if any: the fast path
    /// of [`alloc`](Self::alloc), and the end of its slow path once that
    /// has frozen a new CPU slab.
    #[inline(always)]
    pub(super) fn pop_cpu_object<M: PhysMem>(&mut self, buddy: &BuddyAllocator<'_, M>) -> Option<Gpa> {
        let obj = self.cpu.freelist;
        if obj == FREELIST_END {
            return None;
        }
        self.cpu.freelist = self.follow_free_pointer(buddy, obj);
        self.stats.allocs += 1;
        Some(Gpa(obj))
    }

    /// The free pointer of the free CPU-slab object `obj`: the next object
    /// of the CPU free list, or `FREELIST_END`. A free pointer that leaves
    /// the CPU slab was overwritten after a free: it is not followed (the
    /// rest of the list is dropped, and counted).
    #[inline]
    fn follow_free_pointer<M: PhysMem>(&mut self, buddy: &BuddyAllocator<'_, M>, obj: u64) -> u64 {
        let next = buddy.mem().read_u64(Gpa(obj));
        if (next ^ obj) & self.slab_mask != 0 && next != FREELIST_END {
            self.stats.corruptions += 1;
            return FREELIST_END;
        }
        next
    }

    /// Free the object at `addr`, allocated from this cache. A bad free is
    /// refused with the reason and changes nothing.
    // Always inlined, as Linux's `slab_alloc_node` and `slab_free` are:
    // the fast path is a few instructions, the slow path a call.
    #[inline(always)]
    pub fn free<M: PhysMem>(&mut self, buddy: &mut BuddyAllocator<'_, M>, addr: Gpa) -> Result<(), SlabError> {
        let slab_base = addr.0 & self.slab_mask;
        if slab_base == self.cpu.base {
            self.check_offset(addr.0 - slab_base)?;
            if addr.0 == self.cpu.freelist {
                return Err(SlabError::DoubleFree);
            }
            buddy.mem().write_u64(addr, self.cpu.freelist);
            self.cpu.freelist = addr.0;
            self.stats.frees += 1;
            return Ok(());
        }
        self.free_slow(buddy, addr, slab_base)
    }

    /// Retire the CPU slab, whose free list ran dry (every object is in
    /// use), to the full list.
    pub(super) fn retire_cpu_slab<M: PhysMem>(&mut self, buddy: &mut BuddyAllocator<'_, M>) {
        if self.cpu.slab == NIL {
            return;
        }
        let slab = self.cpu.slab;
        self.cpu.slab = NIL;
        self.cpu.base = NO_CPU_SLAB;
        let mut d = desc(buddy, slab);
        d.freelist = NIL;
        d.inuse = self.objects as u16;
        self.lists.push(buddy, slab, d, SlabList::Full);
    }

    /// Freeze `slab` (on no list) as the CPU slab: its free list becomes
    /// the CPU free list. There is no CPU slab.
    pub(super) fn freeze<M: PhysMem>(&mut self, buddy: &mut BuddyAllocator<'_, M>, slab: u32) {
        let mut d = desc(buddy, slab);
        let base = (slab as u64) << PAGE_SHIFT;
        self.cpu.freelist = if d.freelist == NIL { FREELIST_END } else { base + d.freelist as u64 };
        d.freelist = NIL;
        d.inuse = self.objects as u16;
        d.list = SlabList::Cpu;
        d.prev = NIL;
        d.next = NIL;
        set_desc(buddy, slab, d);
        self.cpu.slab = slab;
        self.cpu.base = base;
    }

    /// Unfreeze the CPU slab: count its free objects, give them back to its
    /// descriptor, and put it on the list its use says.
    pub(super) fn flush_cpu_slab<M: PhysMem>(&mut self, buddy: &mut BuddyAllocator<'_, M>) {
        if self.cpu.slab == NIL {
            return;
        }
        let slab = self.cpu.slab;
        let base = (slab as u64) << PAGE_SHIFT;
        let mut d = desc(buddy, slab);
        let (mut free, mut obj) = (0u32, self.cpu.freelist);
        while obj != FREELIST_END && free < self.objects {
            free += 1;
            obj = buddy.mem().read_u64(Gpa(obj));
        }
        d.freelist = if self.cpu.freelist == FREELIST_END { NIL } else { (self.cpu.freelist - base) as u32 };
        d.inuse = (self.objects - free) as u16;
        self.cpu = CpuSlab::NONE;
        let list = match d.inuse {
            0 => SlabList::Empty,
            n if n as u32 == self.objects => SlabList::Full,
            _ => SlabList::Partial,
        };
        self.lists.push(buddy, slab, d, list);
    }
}
