//! Per-CPU page lists in front of the zones ([`PerCpuBuddy`], Linux's
//! `per_cpu_pages`): order-0 frames are allocated from and freed to the
//! calling CPU's own list, which is refilled from the zone and drained to
//! it in batches of [`HOT_BATCH`] (Linux's `rmqueue_bulk` and
//! `free_pcppages_bulk`), holding at most [`HOT_HIGH`] frames per CPU and
//! zone (Linux's `pcp->batch` and `pcp->high`).
//!
//! # Locks and their order
//!
//! The [`BuddyAllocator`] (every zone, its free lists, its metadata) sits
//! behind one lock, the *zone lock* (Linux has one `zone->lock` per zone;
//! one here, since the slab's slow paths need the metadata of any zone).
//! Each CPU's lists sit behind that CPU's own *pcp lock*, as in Linux since
//! 6.0 (`pcp->lock`, which replaced the IPI-driven drain): the owning CPU
//! takes it uncontended on every order-0 operation, and another CPU takes
//! it only to drain the lists. Order: **pcp lock, then zone lock**; pcp
//! locks are never nested except by [`check_invariants`](PerCpuBuddy::check_invariants),
//! which takes them in CPU order. (The slab's cache lock comes before both.)
//!
//! # Invariants (checked by [`PerCpuBuddy::check_invariants`])
//!
//! - Every frame on a per-CPU list is, for the zone, an allocated order-0
//!   block with a clear tag, in the list's zone (`DMA` or `NORMAL`: page
//!   tables do not use the per-CPU lists), and is on exactly one list.
//! - The per-frame [`PcpFlag`] side table says `LISTED` exactly for the
//!   frames on a per-CPU list, `OUT` for frames handed out by
//!   [`alloc_on`](PerCpuBuddy::alloc_on)'s per-CPU path and not yet freed
//!   (allocated order-0 blocks of the flag's zone), and `NONE` otherwise.
//!   It exists because the per-CPU paths do not take the zone lock and so
//!   cannot read the metadata: it is how a free of a listed frame (a
//!   double free) is refused, and how a free knows its frame's zone. A
//!   double free racing with itself on two CPUs is not caught (as in
//!   Linux without `DEBUG_VM`); [`check_invariants`](PerCpuBuddy::check_invariants)
//!   finds its trace. Neighbouring frames' flags are on different cache
//!   lines (the table is indexed by a permutation of the frame index that
//!   spreads 64 consecutive frames over 64 lines), so two CPUs working on
//!   nearby frames do not share a line.
//! - No counter is shared by the CPUs on the fast paths (each list's
//!   length and counters sit behind its own pcp lock): the fast paths
//!   touch only the CPU's own lock and list, and the frame's flag.
//! - CPUs at or above `nr_cpus` have empty lists.
//!
//! # No stranded page (the drain rule)
//!
//! An allocation through [`alloc_on`](PerCpuBuddy::alloc_on) fails only
//! after (1) the calling CPU's lists and the zones of its zonelist could
//! not serve it, (2) every CPU's lists were then drained to the zones
//! (Linux's `drain_all_pages`), and (3) a retry, made if the drain
//! returned any frame, still could not. So with no allocation running on another
//! CPU, a failure means no free block of that order exists in those zones
//! on any list. (Frames another CPU frees to its list after the drain may
//! stay there through the retry, the window Linux has too.) A CPU going
//! offline calls [`drain_cpu`](PerCpuBuddy::drain_cpu) (Linux's
//! `page_alloc_cpu_dead`).
//!
//! Frames freed through the per-CPU path must carry a clear
//! [`BlockTag`](super::BlockTag) (the path cannot reach the metadata to
//! clear it); the slab, the one user of tags, takes and returns its slabs
//! through the zone lock, which clears them.

use core::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use super::frame::ALLOCATED;
use super::zone_hot_list::ZoneHotList;
use super::{BuddyAllocator, FreeError, HOT_BATCH, HOT_HIGH, ZoneId, ZonePref, ZoneStats};
use crate::percpu::{CachePadded, CpuId, MAX_CPUS};
use crate::phys::{Pfn, PhysMem};
use crate::sync::{Lock, LockGuard, RawLock};

/// Zones with per-CPU lists: `DMA` and `NORMAL` (indices equal to their
/// [`ZoneId`]s).
const PCP_ZONES: usize = 2;
const _: () = assert!(ZoneId::Dma as usize == 0 && ZoneId::Normal as usize == 1);

/// A frame's per-CPU state, one byte in a side table the caller supplies
/// ([`pcp_flag_bytes`]); all-zero bytes are the right initial value.
#[derive(Default, Debug)]
#[repr(transparent)]
pub struct PcpFlag(pub(super) AtomicU8);

/// Not known to the per-CPU lists.
const NONE: u8 = 0;
/// Handed out by a per-CPU list; the zone is `flag - OUT_DMA`.
const OUT_DMA: u8 = 1;
const OUT_NORMAL: u8 = 2;
/// On a per-CPU list.
const LISTED: u8 = 3;
const _: () = assert!(OUT_DMA + ZoneId::Normal as u8 == OUT_NORMAL);

impl PcpFlag {
    #[inline]
    fn get(&self) -> u8 {
        self.0.load(Ordering::Relaxed)
    }

    #[inline]
    fn set(&self, v: u8) {
        self.0.store(v, Ordering::Relaxed)
    }
}

/// Bytes of [`PcpFlag`] side table needed for a span of `frames` frames:
/// the next power of two of at least 64 (so at most two per frame).
pub const fn pcp_flag_bytes(frames: u64) -> u64 {
    (if frames < 64 { 64 } else { frames }).next_power_of_two()
}

/// Counters of one CPU's lists.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct PcpStats {
    /// Order-0 frames handed out from the CPU's lists.
    pub allocs: u64,
    /// Order-0 frames freed onto the CPU's lists.
    pub frees: u64,
    /// Batches taken from the zones (`rmqueue_bulk`).
    pub refills: u64,
    /// Frames returned to the zones (`free_pcppages_bulk`), by batch or
    /// by a drain.
    pub drained: u64,
}

/// One CPU's lists, one per ordinary zone (Linux's `per_cpu_pages`).
#[derive(Clone, Copy, Debug)]
struct CpuPages {
    lists: [ZoneHotList; PCP_ZONES],
    stats: PcpStats,
}

impl CpuPages {
    const EMPTY: CpuPages = CpuPages {
        lists: [ZoneHotList::EMPTY; PCP_ZONES],
        stats: PcpStats { allocs: 0, frees: 0, refills: 0, drained: 0 },
    };
}

/// Every CPU's lists, each behind its own lock: kept apart from
/// [`PerCpuBuddy`] so that the guest can place them in a `static`
/// (`const`-constructed, about 36 KiB for [`MAX_CPUS`] CPUs) rather than
/// build them on its small boot stack.
pub struct PcpLists<R> {
    cpus: [CachePadded<Lock<R, CpuPages>>; MAX_CPUS],
}

impl<R: RawLock> PcpLists<R> {
    /// Every list empty.
    pub const fn new() -> Self {
        PcpLists { cpus: [const { CachePadded(Lock::new(CpuPages::EMPTY)) }; MAX_CPUS] }
    }
}

impl<R: RawLock> Default for PcpLists<R> {
    fn default() -> Self {
        Self::new()
    }
}

/// The buddy allocator behind a lock, with per-CPU lists in front. See the
/// module documentation for the locks, the invariants and the drain rule.
pub struct PerCpuBuddy<'m, M, R> {
    /// The zones' memory accessor, usable without the zone lock.
    mem: M,
    base: u64,
    frames: u64,
    zone: Lock<R, BuddyAllocator<'m, M>>,
    pcp: &'m [CachePadded<Lock<R, CpuPages>>; MAX_CPUS],
    nr_cpus: usize,
    flags: &'m [PcpFlag],
    /// `flags.len() / 64 - 1` and its bit count: frame `i`'s flag is at
    /// `(i & flag_mask) * 64 + (i >> flag_shift)`.
    flag_mask: u64,
    flag_shift: u32,
    /// `drain_all_pages` calls made because an allocation failed.
    pressure_drains: AtomicU64,
}

impl<'m, M: PhysMem + Clone, R: RawLock> PerCpuBuddy<'m, M, R> {
    /// Per-CPU lists `pcp` for CPUs `0..nr_cpus` (at most [`MAX_CPUS`]) in
    /// front of `buddy`. `pcp` must be empty; `flags` must hold
    /// [`pcp_flag_bytes`] of the span, all zero. `None` if any is wrong —
    /// except that "all zero" is checked in debug builds only: it is one
    /// read per frame, and in the guest kernel (release, ring 0 emulated
    /// instruction by instruction on a host without VMX/SVM) that scan
    /// made the memory manager's bring-up at 8 GiB take 3.7 s instead of
    /// 0.1 s. The kernel carves `flags` from RAM the VMM hands over zeroed.
    pub fn new(
        buddy: BuddyAllocator<'m, M>,
        pcp: &'m PcpLists<R>,
        nr_cpus: usize,
        flags: &'m [PcpFlag],
    ) -> Option<Self> {
        if pcp.cpus.iter().any(|c| c.lock().lists.iter().any(|l| !l.is_empty())) {
            return None;
        }
        let span = buddy.span();
        let need = pcp_flag_bytes(span.len());
        if nr_cpus == 0 || nr_cpus > MAX_CPUS || (flags.len() as u64) < need {
            return None;
        }
        if cfg!(debug_assertions) && flags[..need as usize].iter().any(|f| f.get() != NONE) {
            return None;
        }
        let lines = need / 64;
        Some(Self {
            mem: buddy.mem().clone(),
            base: span.start.0,
            frames: span.len(),
            zone: Lock::new(buddy),
            pcp: &pcp.cpus,
            nr_cpus,
            flags: &flags[..need as usize],
            flag_mask: lines - 1,
            flag_shift: lines.trailing_zeros(),
            pressure_drains: AtomicU64::new(0),
        })
    }
}

impl<'m, M: PhysMem, R: RawLock> PerCpuBuddy<'m, M, R> {
    /// The flag of span index `idx` (`idx < frames`).
    #[inline(always)]
    fn flag(&self, idx: u64) -> &PcpFlag {
        &self.flags[(((idx & self.flag_mask) << 6) | (idx >> self.flag_shift)) as usize]
    }

    /// The span index whose flag is at `slot` (the inverse of `flag`).
    fn flag_owner(&self, slot: u64) -> u64 {
        ((slot & 63) << self.flag_shift) | (slot >> 6)
    }

    /// The memory accessor (the zones' own, cloned).
    #[inline]
    pub fn mem(&self) -> &M {
        &self.mem
    }

    /// CPUs with lists.
    pub fn nr_cpus(&self) -> usize {
        self.nr_cpus
    }

    /// Run `f` on the allocator under the zone lock: for page-table pages,
    /// block tags, counters, and any order. Frames handed out by
    /// [`alloc_on`](Self::alloc_on) must come back through
    /// [`free_on`](Self::free_on), not the allocator's own `free`.
    #[inline]
    pub fn with_zone<T>(&self, f: impl FnOnce(&mut BuddyAllocator<'m, M>) -> T) -> T {
        f(&mut self.zone.lock())
    }

    /// The allocator, draining every per-CPU list into it first.
    pub fn into_inner(self) -> BuddyAllocator<'m, M> {
        self.drain_all();
        self.zone.into_inner()
    }

    /// Allocate a block of `2^order` frames on CPU `cpu`: order 0 from the
    /// CPU's lists (refilled in a batch when empty), larger orders from the
    /// zones; on failure, drain every CPU's lists and retry once (the
    /// module doc's drain rule).
    #[inline]
    pub fn alloc_on(&self, cpu: CpuId, order: u8, pref: ZonePref) -> Option<Pfn> {
        if let Some(p) = self.try_alloc(cpu, order, pref) {
            return Some(p);
        }
        self.alloc_under_pressure(cpu, order, pref)
    }

    #[cold]
    #[inline(never)]
    fn alloc_under_pressure(&self, cpu: CpuId, order: u8, pref: ZonePref) -> Option<Pfn> {
        if self.drain_all() == 0 {
            return None;
        }
        self.pressure_drains.fetch_add(1, Ordering::Relaxed);
        self.try_alloc(cpu, order, pref)
    }

    #[inline]
    fn try_alloc(&self, cpu: CpuId, order: u8, pref: ZonePref) -> Option<Pfn> {
        if order != 0 {
            return self.zone.lock().alloc(order, pref);
        }
        let mut pcp = self.pcp[cpu.index()].lock();
        for &zone in pref.zonelist() {
            let z = zone as usize;
            if pcp.lists[z].is_empty() {
                self.refill(&mut pcp, zone);
            }
            if let Some(idx) = pcp.lists[z].pop() {
                pcp.stats.allocs += 1;
                self.flag(idx as u64).set(OUT_DMA + z as u8);
                return Some(Pfn(self.base + idx as u64));
            }
        }
        None
    }

    /// Move up to [`HOT_BATCH`] order-0 frames of `zone` from the zone to
    /// the (empty) list (Linux's `rmqueue_bulk`).
    fn refill(&self, pcp: &mut LockGuard<'_, R, CpuPages>, zone: ZoneId) {
        let mut b = self.zone.lock();
        let mut n = 0;
        while n < HOT_BATCH
            && let Some(idx) = b.pcp_take(zone)
        {
            self.flag(idx as u64).set(LISTED);
            pcp.lists[zone as usize].push(idx);
            n += 1;
        }
        if n > 0 {
            pcp.stats.refills += 1;
        }
    }

    /// Free the block of `2^order` frames at `pfn` on CPU `cpu`: an
    /// order-0 frame that came from a per-CPU list goes onto this CPU's
    /// list (the oldest [`HOT_BATCH`] going back to the zone first if the
    /// list holds [`HOT_HIGH`]); everything else goes to the zone, which
    /// checks it as [`BuddyAllocator::free`] does. A bad free is refused
    /// and changes nothing.
    #[inline]
    pub fn free_on(&self, cpu: CpuId, pfn: Pfn, order: u8) -> Result<(), FreeError> {
        let off = pfn.0.wrapping_sub(self.base);
        if order == 0 && off < self.frames {
            let flag = self.flag(off);
            match flag.get() {
                f @ (OUT_DMA | OUT_NORMAL) => {
                    let z = (f - OUT_DMA) as usize;
                    let mut pcp = self.pcp[cpu.index()].lock();
                    if !pcp.lists[z].has_room() {
                        self.drain_batch(&mut pcp, z, HOT_BATCH);
                    }
                    flag.set(LISTED);
                    pcp.lists[z].push(off as u32);
                    pcp.stats.frees += 1;
                    return Ok(());
                }
                LISTED => return Err(FreeError::DoubleFree),
                _ => {}
            }
        }
        self.zone.lock().free(pfn, order)
    }

    /// Return the `n` oldest frames of list `z` to the zone (Linux's
    /// `free_pcppages_bulk`).
    fn drain_batch(&self, pcp: &mut LockGuard<'_, R, CpuPages>, z: usize, n: usize) -> usize {
        let n = n.min(pcp.lists[z].len());
        if n == 0 {
            return 0;
        }
        let mut b = self.zone.lock();
        for &idx in &pcp.lists[z].as_slice()[..n] {
            self.flag(idx as u64).set(NONE);
            b.pcp_return(idx);
        }
        pcp.lists[z].remove_oldest(n);
        pcp.stats.drained += n as u64;
        n
    }

    /// Return every frame on `cpu`'s lists to the zones: for a CPU going
    /// offline, or to give back what it holds. Returns the frames drained.
    pub fn drain_cpu(&self, cpu: CpuId) -> usize {
        let mut pcp = self.pcp[cpu.index()].lock();
        (0..PCP_ZONES).map(|z| self.drain_batch(&mut pcp, z, HOT_HIGH)).sum()
    }

    /// Return every frame on every CPU's lists to the zones (Linux's
    /// `drain_all_pages`), one CPU at a time. Returns the frames drained.
    pub fn drain_all(&self) -> usize {
        (0..self.nr_cpus).filter_map(CpuId::new).map(|cpu| self.drain_cpu(cpu)).sum()
    }

    /// Frames on all per-CPU lists (a snapshot, taking each pcp lock).
    pub fn pcp_pages(&self) -> u64 {
        self.pcp.iter().map(|p| p.lock().lists.iter().map(|l| l.len() as u64).sum::<u64>()).sum()
    }

    /// How many times an allocation failure drained every CPU's lists.
    pub fn pressure_drains(&self) -> u64 {
        self.pressure_drains.load(Ordering::Relaxed)
    }

    /// The counters of `cpu`'s lists.
    pub fn pcp_stats(&self, cpu: CpuId) -> PcpStats {
        self.pcp[cpu.index()].lock().stats
    }

    /// The counters of `zone`, with `hot_pages` counting the per-CPU lists
    /// too (a snapshot: the lists are read one at a time, before the zone).
    /// `allocs` and `frees` count the frames the lists moved in batches.
    pub fn stats(&self, zone: ZoneId) -> ZoneStats {
        let mut listed = 0;
        if (zone as usize) < PCP_ZONES {
            for pcp in &self.pcp[..self.nr_cpus] {
                listed += pcp.lock().lists[zone as usize].len() as u64;
            }
        }
        let mut s = self.zone.lock().stats(zone);
        s.hot_pages += listed;
        s
    }

    /// Call `f(frame, zone, cpu)` for every frame on a per-CPU list.
    pub fn for_each_pcp_frame(&self, mut f: impl FnMut(Pfn, ZoneId, CpuId)) {
        for (i, pcp) in self.pcp.iter().enumerate() {
            let pcp = pcp.lock();
            for (z, list) in pcp.lists.iter().enumerate() {
                for &idx in list.as_slice() {
                    let zone = if z == 0 { ZoneId::Dma } else { ZoneId::Normal };
                    f(Pfn(self.base + idx as u64), zone, CpuId::new(i).unwrap_or(CpuId::BOOT));
                }
            }
        }
    }

    /// Check the allocator's invariants and the module doc's, taking every
    /// pcp lock in CPU order and then the zone lock. For tests: `O(frames)`.
    pub fn check_invariants(&self) -> Result<(), &'static str> {
        let guards: [_; MAX_CPUS] = core::array::from_fn(|i| self.pcp[i].lock());
        let b = self.zone.lock();
        b.check_invariants()?;
        let mut listed = 0u64;
        for (cpu, pcp) in guards.iter().enumerate() {
            for (z, list) in pcp.lists.iter().enumerate() {
                if cpu >= self.nr_cpus && !list.is_empty() {
                    return Err("per-CPU list of a CPU beyond nr_cpus");
                }
                for &idx in list.as_slice() {
                    let pfn = Pfn(self.base + idx as u64);
                    if self.flag(idx as u64).get() != LISTED {
                        return Err("frame on a per-CPU list not flagged LISTED");
                    }
                    if b.block_tag(pfn) != Some((0, [0; 4])) || b.zone_of(pfn).map(|z| z as usize) != Some(z) {
                        return Err(
                            "frame on a per-CPU list not an allocated order-0 block of its zone with a clear tag",
                        );
                    }
                    listed += 1;
                }
            }
        }
        let mut flagged = 0u64;
        for (slot, flag) in self.flags.iter().enumerate() {
            let i = self.flag_owner(slot as u64);
            if i >= self.frames {
                if flag.get() != NONE {
                    return Err("flag of a frame beyond the span set");
                }
                continue;
            }
            let pfn = Pfn(self.base + i);
            match flag.get() {
                NONE => {}
                LISTED => flagged += 1,
                f @ (OUT_DMA | OUT_NORMAL) => {
                    let allocated = b.block_tag(pfn).is_some_and(|(order, _)| order == 0);
                    if !allocated || b.zone_of(pfn).map(|z| z as u8) != Some(f - OUT_DMA) {
                        return Err("frame flagged OUT is not an allocated order-0 block of its zone");
                    }
                }
                _ => return Err("invalid per-CPU flag"),
            }
        }
        if flagged != listed {
            return Err("a frame is on two per-CPU lists, or flagged LISTED and on none");
        }
        Ok(())
    }
}

/// CPU `cpu`'s handle on a [`PerCpuBuddy`], for the paging code
/// ([`FrameSource`](crate::paging::FrameSource) and
/// [`PageTableSource`](crate::paging::PageTableSource)): data frames
/// through the CPU's lists (`NORMAL`, falling back to `DMA`), page-table
/// pages from the page-table zone under the zone lock.
pub struct CpuFrames<'a, 'm, M, R> {
    /// The allocator.
    pub buddy: &'a PerCpuBuddy<'m, M, R>,
    /// The calling CPU.
    pub cpu: CpuId,
}

impl<'m, M: PhysMem, R: RawLock> PerCpuBuddy<'m, M, R> {
    /// This allocator as seen from CPU `cpu`.
    pub fn on(&self, cpu: CpuId) -> CpuFrames<'_, 'm, M, R> {
        CpuFrames { buddy: self, cpu }
    }
}

impl<M: PhysMem> BuddyAllocator<'_, M> {
    /// An order-0 frame of `zone` for a per-CPU list: from the zone's own
    /// hot list, else its free lists (growing a deferred section if need
    /// be). Marked allocated, tag clear, counted as an allocation.
    pub(super) fn pcp_take(&mut self, zone: ZoneId) -> Option<u32> {
        let z = zone as usize;
        let idx = match self.zones[z].hot.pop() {
            Some(idx) => {
                self.meta[idx as usize].state = ALLOCATED;
                idx
            }
            None => self.rmqueue(zone, 0)?,
        };
        self.zones[z].stats.allocs += 1;
        Some(idx)
    }

    /// Take back an order-0 frame from a per-CPU list (allocated, tag
    /// clear) onto the free lists, merging (counted as a free).
    pub(super) fn pcp_return(&mut self, idx: u32) {
        let zone = self.meta[idx as usize].zone as usize;
        self.meta[idx as usize].clear_tag();
        self.zones[zone].stats.frees += 1;
        self.free_block(idx, 0);
    }
}
