//! Per-CPU caches for SMP ([`PerCpuCache`], [`PerCpuKmalloc`]): one
//! [`CpuSlab`] per CPU (SLUB's `kmem_cache_cpu`), whose fast paths take no
//! lock, in front of the cache's shared slab lists (SLUB's
//! `kmem_cache_node`), which sit behind the cache's lock.
//!
//! # Paths
//!
//! - **Fast** (no lock, no atomic read-modify-write): [`PerCpuCache::alloc`]
//!   pops the calling CPU's free list; [`PerCpuCache::free`] of an object
//!   of the calling CPU's own CPU slab pushes onto it. The CPU reaches its
//!   slot through its [`ThisCpu`] token.
//! - **Remote free** (lock-free): an object whose slab is frozen as
//!   *another* CPU's CPU slab is pushed onto that CPU's **per-CPU, per-cache
//!   remote-free list** (a Treiber stack linked through the objects' first
//!   words, heads in [`CpuShared`]), by compare-and-swap. This is the
//!   snmalloc-style per-owner queue, not SLUB's per-slab list (a free here
//!   cannot reach the slab descriptor without the zone lock). The owner
//!   takes its whole list with one swap (so no ABA) at the start of its
//!   alloc slow path, and in [`flush_cpu`](PerCpuCache::flush_cpu):
//!   objects of its current CPU slab go onto its free list; others (their
//!   slab was unfrozen since) are freed through the locked path. The
//!   owner is found from the CPU slab address each CPU publishes
//!   ([`CpuShared`]'s `frozen`); a stale answer only sends the object the
//!   long way round, never loses it: until the owner drains it, the object
//!   counts as in use in its slab, so the slab cannot be freed under it.
//! - **Slow** (the cache lock, then the zone lock of the
//!   [`PerCpuBuddy`]): a new CPU slab, and frees into slabs no CPU has
//!   frozen (which may move a slab between lists, as SLUB takes
//!   `n->list_lock`). Under the cache lock, "slab `S` is frozen by CPU `x`"
//!   is stable (freezing and unfreezing happen only under it), so a locked
//!   free into a frozen slab is routed to its owner's remote list exactly.
//!   Slabs come from and go back to the zones directly, under the zone
//!   lock, never through the per-CPU page lists.
//!
//! Lock order: cache lock, then (per-CPU page lists' pcp lock, then) the
//! zone lock; no path takes two cache locks.
//!
//! # Invariants (checked by [`PerCpuCache::check_invariants`])
//!
//! Those of [`crate::slab`] for the lists, with one CPU slab per CPU
//! instead of one per cache; besides: each CPU's published `frozen`
//! address is its CPU slab's (or none), no slab is frozen by two CPUs; the
//! remote-free lists hold distinct object starts of this cache's slabs;
//! and objects are counted exactly: allocations minus frees equals the
//! objects in use by the descriptors of the listed slabs plus the frozen
//! slabs' objects not on their CPU's free list (objects waiting on a
//! remote-free list are among these: they count as freed when the owner
//! takes them).
//!
//! Counters: each CPU counts its fast-path operations in its own slot;
//! a remote free is counted as a free when its owner drains it.

use core::sync::atomic::{AtomicU64, Ordering};

use guest_abi::Gpa;

use super::cpu_slab::{CpuSlab, NO_CPU_SLAB};
use super::page::{FREELIST_END, NIL, SlabDesc, SlabList};
use super::size_class::cache_of;
use super::{CacheError, CacheStats, KmemCache, NR_KMALLOC_CACHES, SizeClass, SlabError, size_class};
use crate::buddy::{BuddyAllocator, PerCpuBuddy, ZonePref};
use crate::percpu::{CachePadded, ConstInit, CpuId, MAX_CPUS, PerCpu, ThisCpu};
use crate::phys::{PAGE_SHIFT, Pfn, PhysMem};
use crate::sync::{Lock, RawLock};

/// One CPU's lock-free state of one cache: its CPU slab and counters.
#[derive(Clone, Copy, Debug)]
struct CpuCache {
    slab: CpuSlab,
    allocs: u64,
    frees: u64,
    corruptions: u64,
    /// Frees this CPU pushed onto another CPU's remote-free list.
    remote_frees: u64,
}

impl ConstInit for CpuCache {
    const INIT: Self = CpuCache { slab: CpuSlab::NONE, allocs: 0, frees: 0, corruptions: 0, remote_frees: 0 };
}

/// What other CPUs see of one CPU's state in one cache.
#[derive(Debug)]
struct CpuShared {
    /// The CPU slab's address, or `NO_CPU_SLAB`; written by the owner
    /// under the cache lock.
    frozen: AtomicU64,
    /// Head of the remote-free list (an object address), or
    /// `FREELIST_END`.
    remote: AtomicU64,
}

impl CpuShared {
    const fn new() -> Self {
        CpuShared { frozen: AtomicU64::new(NO_CPU_SLAB), remote: AtomicU64::new(FREELIST_END) }
    }
}

/// A cache of equal-sized objects with per-CPU slabs; see the module doc.
pub struct PerCpuCache<R> {
    /// The geometry, read by the fast paths (never changed).
    shape: KmemCache,
    /// The lists, counters and slow paths; its own `cpu` holds a CPU's
    /// slab only while that CPU's slow path runs.
    node: Lock<R, KmemCache>,
    cpus: PerCpu<CpuCache>,
    shared: [CachePadded<CpuShared>; MAX_CPUS],
    nr_cpus: usize,
}

impl<R: RawLock> PerCpuCache<R> {
    /// A cache as [`KmemCache::new`] makes it, for CPUs `0..nr_cpus`
    /// (clamped to `1..=MAX_CPUS`).
    pub const fn new(
        name: &'static str,
        id: u8,
        size: u32,
        align: u32,
        zone: ZonePref,
        nr_cpus: usize,
    ) -> Result<Self, CacheError> {
        let (shape, node) =
            match (KmemCache::new(name, id, size, align, zone), KmemCache::new(name, id, size, align, zone)) {
                (Ok(a), Ok(b)) => (a, b),
                (Err(e), _) | (_, Err(e)) => return Err(e),
            };
        Ok(Self::from_parts(shape, node, nr_cpus))
    }

    /// The cache around `shape` and `node`, two equal fresh caches.
    const fn from_parts(shape: KmemCache, node: KmemCache, nr_cpus: usize) -> Self {
        let nr_cpus = if nr_cpus == 0 {
            1
        } else if nr_cpus > MAX_CPUS {
            MAX_CPUS
        } else {
            nr_cpus
        };
        PerCpuCache {
            shape,
            node: Lock::new(node),
            cpus: PerCpu::new(),
            shared: [const { CachePadded(CpuShared::new()) }; MAX_CPUS],
            nr_cpus,
        }
    }

    /// The cache's geometry and name (its lists and counters are not
    /// those of this value).
    pub const fn shape(&self) -> &KmemCache {
        &self.shape
    }

    /// Allocate an object on the calling CPU; `None` when the buddy
    /// allocator is out of memory.
    #[inline(always)]
    pub fn alloc<M: PhysMem, B: RawLock>(&self, cpu: &mut ThisCpu, buddy: &PerCpuBuddy<'_, M, B>) -> Option<Gpa> {
        let id = cpu.id();
        let c = self.cpus.get(cpu);
        let obj = c.slab.freelist;
        if obj != FREELIST_END {
            c.slab.freelist = self.next_free(c, buddy.mem(), obj);
            c.allocs += 1;
            return Some(Gpa(obj));
        }
        self.alloc_slow(id, c, buddy)
    }

    /// The free pointer of `obj` (a free object of `c`'s CPU slab); one
    /// that leaves the slab is not followed (counted as a corruption).
    #[inline(always)]
    fn next_free<M: PhysMem>(&self, c: &mut CpuCache, mem: &M, obj: u64) -> u64 {
        let next = mem.read_u64(Gpa(obj));
        if (next ^ obj) & self.shape.slab_mask != 0 && next != FREELIST_END {
            c.corruptions += 1;
            return FREELIST_END;
        }
        next
    }

    #[cold]
    #[inline(never)]
    fn alloc_slow<M: PhysMem, B: RawLock>(
        &self,
        id: CpuId,
        c: &mut CpuCache,
        buddy: &PerCpuBuddy<'_, M, B>,
    ) -> Option<Gpa> {
        let others = self.take_remote(id, c, buddy.mem());
        if c.slab.freelist != FREELIST_END && others == FREELIST_END {
            let obj = c.slab.freelist;
            c.slab.freelist = self.next_free(c, buddy.mem(), obj);
            c.allocs += 1;
            return Some(Gpa(obj));
        }
        let mut node = self.node.lock();
        buddy.with_zone(|b| {
            self.free_chain(&mut node, c, b, others);
            if c.slab.freelist != FREELIST_END {
                let obj = c.slab.freelist;
                c.slab.freelist = self.next_free(c, b.mem(), obj);
                c.allocs += 1;
                return Some(Gpa(obj));
            }
            core::mem::swap(&mut node.cpu, &mut c.slab);
            let obj = node.alloc_slow(b);
            core::mem::swap(&mut node.cpu, &mut c.slab);
            self.shared[id.index()].frozen.store(c.slab.base, Ordering::Release);
            obj
        })
    }

    /// Take this CPU's remote-free list: objects of its CPU slab go onto
    /// its free list (counted as frees); the others are returned as a
    /// chain (linked through their first words) for the locked path.
    fn take_remote<M: PhysMem>(&self, id: CpuId, c: &mut CpuCache, mem: &M) -> u64 {
        let mut obj = self.shared[id.index()].remote.swap(FREELIST_END, Ordering::Acquire);
        let mut others = FREELIST_END;
        while obj != FREELIST_END {
            let next = mem.read_u64(Gpa(obj));
            if obj & self.shape.slab_mask == c.slab.base {
                mem.write_u64(Gpa(obj), c.slab.freelist);
                c.slab.freelist = obj;
                c.frees += 1;
            } else {
                mem.write_u64(Gpa(obj), others);
                others = obj;
            }
            obj = next;
        }
        others
    }

    /// Free a chain from [`take_remote`](Self::take_remote) through the
    /// locked path. A refused object (a double free that went remote) is
    /// dropped and counted as a corruption.
    fn free_chain<M: PhysMem>(
        &self,
        node: &mut KmemCache,
        c: &mut CpuCache,
        b: &mut BuddyAllocator<'_, M>,
        mut obj: u64,
    ) {
        while obj != FREELIST_END {
            let next = b.mem().read_u64(Gpa(obj));
            if self.free_locked(node, b, Gpa(obj)).is_err() {
                c.corruptions += 1;
            }
            obj = next;
        }
    }

    /// Free the object at `addr` on the calling CPU. A bad free is refused
    /// with the reason and changes nothing; a free handed to another CPU's
    /// remote-free list is checked for an object start only.
    #[inline(always)]
    pub fn free<M: PhysMem, B: RawLock>(
        &self,
        cpu: &mut ThisCpu,
        buddy: &PerCpuBuddy<'_, M, B>,
        addr: Gpa,
    ) -> Result<(), SlabError> {
        let id = cpu.id();
        let c = self.cpus.get(cpu);
        let slab_base = addr.0 & self.shape.slab_mask;
        if slab_base == c.slab.base {
            self.shape.check_offset(addr.0 - slab_base)?;
            if addr.0 == c.slab.freelist {
                return Err(SlabError::DoubleFree);
            }
            buddy.mem().write_u64(addr, c.slab.freelist);
            c.slab.freelist = addr.0;
            c.frees += 1;
            return Ok(());
        }
        self.free_slow(id, c, buddy, addr, slab_base)
    }

    #[cold]
    #[inline(never)]
    fn free_slow<M: PhysMem, B: RawLock>(
        &self,
        id: CpuId,
        c: &mut CpuCache,
        buddy: &PerCpuBuddy<'_, M, B>,
        addr: Gpa,
        slab_base: u64,
    ) -> Result<(), SlabError> {
        if let Some(owner) = self.frozen_by(slab_base)
            && owner != id
        {
            self.shape.check_offset(addr.0 - slab_base)?;
            self.push_remote(owner, buddy.mem(), addr);
            c.remote_frees += 1;
            return Ok(());
        }
        let mut node = self.node.lock();
        buddy.with_zone(|b| self.free_locked(&mut node, b, addr))
    }

    /// The CPU whose published CPU slab is at `slab_base`, if any.
    #[inline]
    fn frozen_by(&self, slab_base: u64) -> Option<CpuId> {
        (0..self.nr_cpus).find(|&x| self.shared[x].frozen.load(Ordering::Acquire) == slab_base).and_then(CpuId::new)
    }

    /// Push `addr` onto `owner`'s remote-free list.
    fn push_remote<M: PhysMem>(&self, owner: CpuId, mem: &M, addr: Gpa) {
        let head = &self.shared[owner.index()].remote;
        let mut old = head.load(Ordering::Relaxed);
        loop {
            mem.write_u64(addr, old);
            match head.compare_exchange_weak(old, addr.0, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => return,
                Err(now) => old = now,
            }
        }
    }

    /// A free under the cache lock and the zone lock: into a frozen slab,
    /// onto its owner's remote-free list; else [`KmemCache`]'s slow free.
    fn free_locked<M: PhysMem>(
        &self,
        node: &mut KmemCache,
        b: &mut BuddyAllocator<'_, M>,
        addr: Gpa,
    ) -> Result<(), SlabError> {
        let slab_base = addr.0 & self.shape.slab_mask;
        let Some((order, tag)) = b.block_tag(Pfn(slab_base >> PAGE_SHIFT)) else { return Err(SlabError::Foreign) };
        let Some(d) = SlabDesc::from_tag(tag) else { return Err(SlabError::Foreign) };
        if order != self.shape.order || d.cache != self.shape.id {
            return Err(SlabError::Foreign);
        }
        if d.list == SlabList::Cpu {
            let owner = self.frozen_by(slab_base).ok_or(SlabError::Foreign)?;
            self.shape.check_offset(addr.0 - slab_base)?;
            self.push_remote(owner, b.mem(), addr);
            return Ok(());
        }
        node.free_slow(b, addr, slab_base)
    }

    /// Give back the calling CPU's CPU slab and remote-free list: for a CPU
    /// going offline (its token made by another CPU once it is down), or
    /// before shrinking. Objects other CPUs push while this runs wait on
    /// the list for the CPU's next slow path, or for
    /// [`check_invariants`](Self::check_invariants)' count.
    pub fn flush_cpu<M: PhysMem, B: RawLock>(&self, cpu: &mut ThisCpu, buddy: &PerCpuBuddy<'_, M, B>) {
        let id = cpu.id();
        let c = self.cpus.get(cpu);
        let mut node = self.node.lock();
        buddy.with_zone(|b| {
            let others = self.take_remote(id, c, b.mem());
            self.free_chain(&mut node, c, b, others);
            self.shared[id.index()].frozen.store(NO_CPU_SLAB, Ordering::Release);
            core::mem::swap(&mut node.cpu, &mut c.slab);
            node.flush_cpu_slab(b);
            core::mem::swap(&mut node.cpu, &mut c.slab);
            let late = self.take_remote(id, c, b.mem());
            self.free_chain(&mut node, c, b, late);
        });
    }

    /// [`flush_cpu`](Self::flush_cpu), then return every empty slab to the
    /// buddy allocator (Linux's `kmem_cache_shrink`, for this CPU's part).
    pub fn shrink<M: PhysMem, B: RawLock>(&self, cpu: &mut ThisCpu, buddy: &PerCpuBuddy<'_, M, B>) {
        self.flush_cpu(cpu, buddy);
        let mut node = self.node.lock();
        buddy.with_zone(|b| node.shrink(b));
    }

    /// The counters, summed over the cache and every CPU (`&mut self`:
    /// the CPUs' own counters are read while no CPU runs).
    pub fn stats(&mut self) -> CacheStats {
        let mut s = self.node.get_mut().stats();
        for c in self.cpus.iter_mut() {
            s.allocs += c.allocs;
            s.frees += c.frees;
            s.corruptions += c.corruptions;
        }
        s
    }

    /// Slabs on the partial, full and empty lists, and CPU slabs.
    pub fn slab_counts(&mut self) -> (u32, u32, u32, usize) {
        let (p, f, e, _) = self.node.get_mut().slab_counts();
        let frozen = self.cpus.iter_mut().filter(|c| c.slab.slab != NIL).count();
        (p, f, e, frozen)
    }

    /// Check the module doc's invariants (`&mut self`: while no CPU runs).
    pub fn check_invariants<M: PhysMem, B: RawLock>(
        &mut self,
        buddy: &PerCpuBuddy<'_, M, B>,
    ) -> Result<(), &'static str> {
        let PerCpuCache { shape, node, cpus, shared, nr_cpus } = self;
        let cpus = cpus.iter_mut().map(|c| &*c).enumerate();
        check(shape, node.get_mut(), shared, *nr_cpus, cpus, buddy)
    }

    /// [`check_invariants`](Self::check_invariants) for a running system:
    /// `cpus` holds the token of every CPU `0..nr_cpus`, in order (the
    /// caller's own, and those of the other CPUs made while they are held
    /// outside the allocators, `ThisCpu::new`'s contract); takes the cache
    /// lock.
    pub fn check_invariants_with<M: PhysMem, B: RawLock>(
        &self,
        cpus: &mut [ThisCpu],
        buddy: &PerCpuBuddy<'_, M, B>,
    ) -> Result<(), &'static str> {
        if cpus.len() != self.nr_cpus || cpus.iter().enumerate().any(|(i, t)| t.id().index() != i) {
            return Err("not one token per CPU, in order");
        }
        let node = self.node.lock();
        let slots = cpus.iter_mut().map(|t| &*self.cpus.get(t)).enumerate();
        check(&self.shape, &node, &self.shared, self.nr_cpus, slots, buddy)
    }

    /// The cache lock, held: for tests that prove a path takes no lock.
    #[cfg(test)]
    pub(super) fn lock_node(&self) -> crate::sync::LockGuard<'_, R, KmemCache> {
        self.node.lock()
    }

    /// Objects allocated and not freed (`&mut self`: while no CPU runs).
    pub fn objects_in_use(&mut self) -> u64 {
        let s = self.stats();
        s.allocs - s.frees
    }
}

/// The body of [`PerCpuCache::check_invariants`], over the CPU slots
/// `cpus` (index, slot) however the caller reached them.
fn check<'a, M: PhysMem, B: RawLock>(
    shape: &KmemCache,
    node: &KmemCache,
    shared: &[CachePadded<CpuShared>; MAX_CPUS],
    nr_cpus: usize,
    cpus: impl Iterator<Item = (usize, &'a CpuCache)>,
    buddy: &PerCpuBuddy<'_, M, B>,
) -> Result<(), &'static str> {
    buddy.with_zone(|b| {
        let (mut live_slabs, mut inuse) = node.check_lists(b)?;
        let mut allocs = node.stats().allocs;
        let mut frees = node.stats().frees;
        for (x, c) in cpus {
            allocs += c.allocs;
            frees += c.frees;
            let frozen = shared[x].frozen.load(Ordering::Relaxed);
            if frozen != c.slab.base {
                return Err("a CPU's published CPU slab differs from its CPU slab");
            }
            if c.slab.slab == NIL {
                if c.slab.freelist != FREELIST_END || c.slab.base != NO_CPU_SLAB {
                    return Err("CPU free list or address without a CPU slab");
                }
                continue;
            }
            if x >= nr_cpus {
                return Err("CPU slab of a CPU beyond nr_cpus");
            }
            if (0..x).any(|y| shared[y].frozen.load(Ordering::Relaxed) == c.slab.base) {
                return Err("a slab frozen by two CPUs");
            }
            let free = node.check_cpu_slab(b, &c.slab)?;
            live_slabs += 1;
            inuse += (node.objects - free) as u64;
        }
        let stats = node.stats();
        if stats.slabs_allocated - stats.slabs_freed != live_slabs {
            return Err("slab counters disagree with the lists and CPU slabs");
        }
        let mut waiting = 0u64;
        for s in shared {
            let mut obj = s.remote.load(Ordering::Relaxed);
            while obj != FREELIST_END {
                let slab_base = obj & shape.slab_mask;
                let d = b.block_tag(Pfn(slab_base >> PAGE_SHIFT)).and_then(|(_, t)| SlabDesc::from_tag(t));
                if d.is_none_or(|d| d.cache != shape.id) || shape.check_offset(obj - slab_base).is_err() {
                    return Err("remote-free list holds something not an object of this cache");
                }
                waiting += 1;
                if waiting > inuse {
                    return Err("remote-free list longer than the objects in use (a cycle or a double free)");
                }
                obj = b.mem().read_u64(Gpa(obj));
            }
        }
        // An object waiting on a remote-free list is counted as freed when
        // its owner takes it: until then it is in use.
        if allocs - frees != inuse {
            return Err("allocations minus frees differ from the objects in use");
        }
        Ok(())
    })
}

/// The kmalloc caches with per-CPU slabs (see [`Kmalloc`](super::Kmalloc)
/// for the size classes); large requests go to the per-CPU buddy front end.
pub struct PerCpuKmalloc<R> {
    caches: [PerCpuCache<R>; NR_KMALLOC_CACHES],
    zone: ZonePref,
}

impl<R: RawLock> PerCpuKmalloc<R> {
    /// The kmalloc caches for CPUs `0..nr_cpus`, taking slabs and large
    /// blocks from `zone`.
    pub const fn new(zone: ZonePref, nr_cpus: usize) -> Self {
        PerCpuKmalloc {
            caches: [
                kmalloc_cache(0, zone, nr_cpus),
                kmalloc_cache(1, zone, nr_cpus),
                kmalloc_cache(2, zone, nr_cpus),
                kmalloc_cache(3, zone, nr_cpus),
                kmalloc_cache(4, zone, nr_cpus),
                kmalloc_cache(5, zone, nr_cpus),
                kmalloc_cache(6, zone, nr_cpus),
                kmalloc_cache(7, zone, nr_cpus),
                kmalloc_cache(8, zone, nr_cpus),
                kmalloc_cache(9, zone, nr_cpus),
            ],
            zone,
        }
    }

    /// The cache `kmalloc-(8 << i)`.
    pub fn cache(&mut self, i: usize) -> &mut PerCpuCache<R> {
        &mut self.caches[i]
    }

    /// Allocate `size` bytes aligned to `align` on the calling CPU.
    #[inline(always)]
    pub fn alloc<M: PhysMem, B: RawLock>(
        &self,
        cpu: &mut ThisCpu,
        buddy: &PerCpuBuddy<'_, M, B>,
        size: usize,
        align: usize,
    ) -> Option<Gpa> {
        match cache_of(size, align) {
            Some(i) => self.caches[i].alloc(cpu, buddy),
            None => match size_class(size, align) {
                SizeClass::Pages(order) => buddy.alloc_on(cpu.id(), order, self.zone).map(Pfn::addr),
                _ => None,
            },
        }
    }

    /// Free `addr`, allocated by [`alloc`](Self::alloc) with the same size
    /// and alignment, on the calling CPU.
    #[inline(always)]
    pub fn free<M: PhysMem, B: RawLock>(
        &self,
        cpu: &mut ThisCpu,
        buddy: &PerCpuBuddy<'_, M, B>,
        addr: Gpa,
        size: usize,
        align: usize,
    ) -> Result<(), SlabError> {
        match cache_of(size, align) {
            Some(i) => self.caches[i].free(cpu, buddy, addr),
            None => match size_class(size, align) {
                SizeClass::Pages(order) => {
                    let pfn = Pfn::from_addr(addr).ok_or(SlabError::NotObjectStart)?;
                    buddy.free_on(cpu.id(), pfn, order).map_err(SlabError::Pages)
                }
                _ => Err(SlabError::Foreign),
            },
        }
    }

    /// [`PerCpuCache::flush_cpu`] of every cache.
    pub fn flush_cpu<M: PhysMem, B: RawLock>(&self, cpu: &mut ThisCpu, buddy: &PerCpuBuddy<'_, M, B>) {
        self.caches.iter().for_each(|c| c.flush_cpu(cpu, buddy));
    }

    /// [`PerCpuCache::shrink`] of every cache.
    pub fn shrink<M: PhysMem, B: RawLock>(&self, cpu: &mut ThisCpu, buddy: &PerCpuBuddy<'_, M, B>) {
        self.caches.iter().for_each(|c| c.shrink(cpu, buddy));
    }

    /// [`PerCpuCache::check_invariants_with`] of every cache.
    pub fn check_invariants_with<M: PhysMem, B: RawLock>(
        &self,
        cpus: &mut [ThisCpu],
        buddy: &PerCpuBuddy<'_, M, B>,
    ) -> Result<(), &'static str> {
        self.caches.iter().try_for_each(|c| c.check_invariants_with(cpus, buddy))
    }

    /// [`PerCpuCache::check_invariants`] of every cache.
    pub fn check_invariants<M: PhysMem, B: RawLock>(
        &mut self,
        buddy: &PerCpuBuddy<'_, M, B>,
    ) -> Result<(), &'static str> {
        self.caches.iter_mut().try_for_each(|c| c.check_invariants(buddy))
    }
}

const fn kmalloc_cache<R: RawLock>(i: usize, zone: ZonePref, nr_cpus: usize) -> PerCpuCache<R> {
    PerCpuCache::from_parts(super::kmalloc::kmalloc_cache(i, zone), super::kmalloc::kmalloc_cache(i, zone), nr_cpus)
}

impl<R> core::fmt::Debug for PerCpuCache<R> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PerCpuCache").field("name", &self.shape.name).field("nr_cpus", &self.nr_cpus).finish()
    }
}

impl<R> core::fmt::Debug for PerCpuKmalloc<R> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PerCpuKmalloc").field("zone", &self.zone).finish()
    }
}
