//! The invariant checker: [`KmemCache::check_invariants`] walks every
//! slab list and every free list, and compares them with the descriptors
//! and the counters. For tests.
//!
//! Part of [`crate::slab`], whose module doc lists the invariants checked.
//! It only reads, and follows a free list no further than a slab's objects
//! (a cycle or a pointer out of the slab is reported, not followed).

use guest_abi::Gpa;

use super::KmemCache;
use super::cache::MAX_OBJECTS;
use super::cpu_slab::{CpuSlab, NO_CPU_SLAB};
use super::page::{FREELIST_END, NIL, SlabDesc, SlabList};
use crate::buddy::BuddyAllocator;
use crate::phys::{PAGE_SHIFT, Pfn, PhysMem};

impl KmemCache {
    /// Check every invariant of the module documentation by walking every
    /// list and free list. For tests.
    pub fn check_invariants<M: PhysMem>(&self, buddy: &BuddyAllocator<'_, M>) -> Result<(), &'static str> {
        let (mut live_slabs, _) = self.check_lists(buddy)?;
        if self.cpu.slab != NIL {
            live_slabs += 1;
            self.check_cpu_slab(buddy, &self.cpu)?;
        } else if self.cpu.base != NO_CPU_SLAB || self.cpu.freelist != FREELIST_END {
            return Err("CPU free list or address without a CPU slab");
        }
        if self.stats.slabs_allocated - self.stats.slabs_freed != live_slabs {
            return Err("slab counters disagree with the lists");
        }
        Ok(())
    }

    /// Check the partial, full and empty lists; returns the slabs on them
    /// and the objects in use in those slabs.
    pub(super) fn check_lists<M: PhysMem>(&self, buddy: &BuddyAllocator<'_, M>) -> Result<(u64, u64), &'static str> {
        let mut live_slabs = 0u64;
        let mut inuse = 0u64;
        for (list, head) in [
            (SlabList::Partial, self.lists.partial),
            (SlabList::Full, self.lists.full),
            (SlabList::Empty, self.lists.empty),
        ] {
            let (mut prev, mut cur, mut n) = (NIL, head.head, 0u32);
            while cur != NIL {
                let (order, tag) = buddy.block_tag(Pfn(cur as u64)).ok_or("slab not an allocated block")?;
                let d = SlabDesc::from_tag(tag).ok_or("slab without a descriptor")?;
                if order != self.order || d.cache != self.id || d.list != list || d.prev != prev {
                    return Err("slab of another order, cache or list, or a broken back link");
                }
                let free = self.walk_freelist(buddy, cur, d.freelist)?;
                if d.inuse as u32 + free != self.objects {
                    return Err("inuse plus free objects is not objects per slab");
                }
                let ok = match list {
                    SlabList::Partial => d.inuse > 0 && (d.inuse as u32) < self.objects,
                    SlabList::Full => d.inuse as u32 == self.objects,
                    _ => d.inuse == 0,
                };
                if !ok {
                    return Err("slab on the wrong list for its use");
                }
                inuse += d.inuse as u64;
                n += 1;
                if n > head.len {
                    return Err("slab list longer than its count (or a cycle)");
                }
                (prev, cur) = (cur, d.next);
            }
            if n != head.len {
                return Err("slab list shorter than its count");
            }
            live_slabs += n as u64;
        }
        if self.lists.empty.len > self.max_empty {
            return Err("more empty slabs than max_empty");
        }
        Ok((live_slabs, inuse))
    }

    /// Check a CPU slab (`cpu.slab != NIL`): its address, its descriptor
    /// (frozen) and its free list; returns the free objects on it.
    pub(super) fn check_cpu_slab<M: PhysMem>(
        &self,
        buddy: &BuddyAllocator<'_, M>,
        cpu: &CpuSlab,
    ) -> Result<u32, &'static str> {
        let base = (cpu.slab as u64) << PAGE_SHIFT;
        if cpu.base != base {
            return Err("CPU slab address disagrees with the CPU slab");
        }
        let (order, tag) = buddy.block_tag(Pfn(cpu.slab as u64)).ok_or("CPU slab not an allocated block")?;
        let d = SlabDesc::from_tag(tag).ok_or("CPU slab without a descriptor")?;
        if order != self.order || d.cache != self.id || d.list != SlabList::Cpu || d.freelist != NIL {
            return Err("CPU slab descriptor wrong");
        }
        let first = if cpu.freelist == FREELIST_END {
            NIL
        } else {
            u32::try_from(cpu.freelist.wrapping_sub(base)).map_err(|_| "CPU free list outside the CPU slab")?
        };
        self.walk_freelist(buddy, cpu.slab, first)
    }

    /// Length of the free list starting at byte offset `first` of `slab`,
    /// checking that it holds distinct object starts of the slab and ends.
    fn walk_freelist<M: PhysMem>(
        &self,
        buddy: &BuddyAllocator<'_, M>,
        slab: u32,
        first: u32,
    ) -> Result<u32, &'static str> {
        let base = (slab as u64) << PAGE_SHIFT;
        let mut seen = [0u64; MAX_OBJECTS as usize / 64];
        let (mut off, mut n) = (first as u64, 0u32);
        if first == NIL {
            return Ok(0);
        }
        loop {
            self.check_offset(off).map_err(|_| "free list holds a non-object address")?;
            let i = (off / self.size as u64) as usize;
            if seen[i / 64] & (1 << (i % 64)) != 0 {
                return Err("free list holds an object twice");
            }
            seen[i / 64] |= 1 << (i % 64);
            n += 1;
            let next = buddy.mem().read_u64(Gpa(base + off));
            if next == FREELIST_END {
                return Ok(n);
            }
            off = next.checked_sub(base).ok_or("free list leaves its slab")?;
        }
    }
}
