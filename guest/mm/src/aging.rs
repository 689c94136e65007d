//! Page aging and reclaim: a two-list clock over an address space's
//! anonymous pages, driven by the accessed and dirty bits the CPU sets in
//! the leaf entries (Linux's `_PAGE_ACCESSED`/`_PAGE_DIRTY` mechanism:
//! `mm/vmscan.c`, `folio_referenced` → `ptep_clear_flush_young`).
//!
//! # Mechanism
//!
//! - The CPU sets `A` in a leaf whenever it walks to it, and `D` on the
//!   first write through it (Intel SDM vol. 3A §4.8). A translation cached
//!   in the TLB is used without a walk, so once `A` is cleared the page
//!   must be flushed, or later accesses would not set `A` again and the
//!   page would look idle while in use. Every bit cleared here goes with a
//!   [`MapperFlush`](crate::paging::MapperFlush) token, gathered in a [`FlushBatch`] and flushed before
//!   the scan returns (when the address space is loaded; otherwise its
//!   translations are not cached, CR3 loads having flushed them).
//! - [`Lru::age_active`] takes the oldest pages of the active list: a page
//!   with `A` set has it cleared and goes to the back of the active list
//!   (it was used since the last look); a page with `A` clear moves to the
//!   inactive list.
//! - [`Lru::shrink_inactive`] takes the oldest pages of the inactive list:
//!   `A` set → cleared, and the page is promoted to the active list
//!   (second chance); `D` set → kept on the inactive list (an anonymous
//!   page with data has nowhere to go without swap); clean → reclaimed:
//!   unmapped, flushed, and its frame reference dropped (the frame is freed
//!   with its last mapping). A clean anonymous page is all zeroes (it was
//!   never written, and nothing in this crate ever clears `D`: see
//!   [`crate::aspace`]), so the next touch demand-zeroes an identical page.
//! - Frames are freed only after the flush of their mapping, so no stale
//!   TLB entry can reach a frame that has gone back to the allocator.
//! - The clears of one scan are one lazy-MMU bracket
//!   ([`MmuPlatform::enter_lazy`]): a paravirtual platform syncs them with
//!   one request. The bracket closes before any frame is freed.
//! - **Harvest.** A platform that keeps a second-level accessed bit
//!   ([`MmuPlatform::harvest_young`]: pv mode's `PV_HARVEST`, which reads
//!   the A bits the CPU sets in the shadow leaves) answers "used since the
//!   last look?" for all the pages of a scan in one request, without any
//!   entry being written. A scan of a loaded address space whose pages span
//!   at most [`HARVEST_SPAN`] pages asks it first ([`Lru::age_all`]: one
//!   request for a whole pass over both lists) and, when it answers,
//!   clears no `A` bit: the entries keep the `A` bits the CPU set (exact,
//!   SDM vol. 3A §4.8) and nothing needs flushing for them. Otherwise each
//!   bit is tested and cleared in the entry, as above.
//!
//! # Invariants of an [`Lru`]
//!
//! - Each list is a FIFO ring of page addresses with a fixed capacity `N`
//!   (no allocation); a page is on at most one list, at most once (the
//!   caller adds a page once, when the fault handler maps it).
//! - An entry names the first address of an anonymous leaf: a 4 KiB page
//!   (each page of a 16 or 64 KiB folio is its own PTE, aged alone), or a
//!   2 MiB THP, aged and reclaimed whole by its PMD's `A` and `D` bits
//!   (all 512 frames of a clean THP are zero, [`crate::aspace`]).
//! - Entries may go stale (the page was unmapped by other means); a scan
//!   drops an entry whose page no longer starts an anonymous leaf. A THP
//!   split since it was added leaves its entry naming the first 4 KiB
//!   page, which is then aged alone (the other 511 are not on the lists:
//!   never reclaimed, which is safe).

use guest_abi::Gva;
use guest_abi::pv::HARVEST_PAGES;

use crate::aspace::{AddressSpace, MmCtx};
use crate::paging::{FlushBatch, FrameSource, Leaf, MmuPlatform, PageSizeKind, PteFlags};
use crate::phys::{Pfn, PhysMem};

/// A FIFO ring of page addresses with room for `N`.
#[derive(Clone, Debug)]
pub struct PageRing<const N: usize> {
    pages: [Gva; N],
    head: usize,
    len: usize,
}

impl<const N: usize> Default for PageRing<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> PageRing<N> {
    /// An empty ring.
    pub const fn new() -> Self {
        Self { pages: [Gva(0); N], head: 0, len: 0 }
    }
    /// Number of pages.
    pub const fn len(&self) -> usize {
        self.len
    }
    /// Whether the ring is empty.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Add `page` at the back (newest); `false` if full.
    pub fn push_back(&mut self, page: Gva) -> bool {
        if self.len == N {
            return false;
        }
        self.pages[(self.head + self.len) % N] = page;
        self.len += 1;
        true
    }
    /// Take the front (oldest) page.
    pub fn pop_front(&mut self) -> Option<Gva> {
        if self.len == 0 {
            return None;
        }
        let p = self.pages[self.head];
        self.head = (self.head + 1) % N;
        self.len -= 1;
        Some(p)
    }
    /// The pages, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = Gva> + Clone + '_ {
        (0..self.len).map(move |i| self.pages[(self.head + i) % N])
    }
    /// Whether `page` is in the ring (`O(N)`).
    pub fn contains(&self, page: Gva) -> bool {
        (0..self.len).any(|i| self.pages[(self.head + i) % N] == page)
    }
}

/// Counters of the scans so far.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct AgingStats {
    /// Pages looked at.
    pub scanned: u64,
    /// Inactive pages found referenced and promoted.
    pub activated: u64,
    /// Active pages found idle and demoted.
    pub deactivated: u64,
    /// Inactive clean pages unmapped.
    pub reclaimed: u64,
    /// Inactive dirty pages kept.
    pub kept_dirty: u64,
    /// Entries dropped because the page was gone.
    pub stale: u64,
    /// Scans whose young bits came from one platform harvest.
    pub harvests: u64,
}

/// The active and inactive lists of one address space, `N` pages each.
#[derive(Clone, Debug)]
pub struct Lru<const N: usize> {
    active: PageRing<N>,
    inactive: PageRing<N>,
    stats: AgingStats,
}

impl<const N: usize> Default for Lru<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Lru<N> {
    /// Empty lists.
    pub const fn new() -> Self {
        Self {
            active: PageRing::new(),
            inactive: PageRing::new(),
            stats: AgingStats {
                scanned: 0,
                activated: 0,
                deactivated: 0,
                reclaimed: 0,
                kept_dirty: 0,
                stale: 0,
                harvests: 0,
            },
        }
    }

    /// Track a newly mapped page — a 4 KiB page, or the start of a 2 MiB
    /// THP (it starts inactive, as Linux puts new anonymous pages since
    /// 5.9). `false` if the inactive list is full.
    pub fn add(&mut self, page: Gva) -> bool {
        self.inactive.push_back(page.align_down(crate::PAGE_SIZE))
    }

    /// The active list.
    pub fn active(&self) -> &PageRing<N> {
        &self.active
    }

    /// The inactive list.
    pub fn inactive(&self) -> &PageRing<N> {
        &self.inactive
    }

    /// Whether `page` is on either list.
    pub fn contains(&self, page: Gva) -> bool {
        self.active.contains(page) || self.inactive.contains(page)
    }

    /// The counters.
    pub fn stats(&self) -> AgingStats {
        self.stats
    }

    /// Look at up to `nr` of the oldest active pages (module
    /// documentation). `loaded`: whether `aspace` is the current address
    /// space (its TLB entries then need flushing).
    pub fn age_active<M: PhysMem, A: FrameSource, P: MmuPlatform>(
        &mut self,
        aspace: &mut AddressSpace,
        cx: &mut MmCtx<'_, M, A, P>,
        nr: usize,
        loaded: bool,
    ) {
        let harvest = Harvest::take(self.active.iter().take(nr), cx.mmu, loaded);
        self.stats.harvests += harvest.is_some() as u64;
        self.age_active_with(aspace, cx, nr, loaded, &harvest);
    }

    /// Look at up to `nr` of the oldest inactive pages, reclaiming the
    /// clean idle ones (module documentation). Returns how many were
    /// reclaimed.
    pub fn shrink_inactive<M: PhysMem, A: FrameSource, P: MmuPlatform>(
        &mut self,
        aspace: &mut AddressSpace,
        cx: &mut MmCtx<'_, M, A, P>,
        nr: usize,
        loaded: bool,
    ) -> usize {
        let harvest = Harvest::take(self.inactive.iter().take(nr), cx.mmu, loaded);
        self.stats.harvests += harvest.is_some() as u64;
        self.shrink_inactive_with(aspace, cx, nr, loaded, &harvest)
    }

    /// One pass over every page of both lists: [`age_active`](Self::age_active)
    /// then [`shrink_inactive`](Self::shrink_inactive) (Linux's
    /// `shrink_active_list` then `shrink_inactive_list`), with one harvest
    /// for the two when the platform has one (a page the first demotes is
    /// looked at again by the second with the same answer: idle). Returns
    /// how many pages were reclaimed.
    pub fn age_all<M: PhysMem, A: FrameSource, P: MmuPlatform>(
        &mut self,
        aspace: &mut AddressSpace,
        cx: &mut MmCtx<'_, M, A, P>,
        loaded: bool,
    ) -> usize {
        let harvest = Harvest::take(self.active.iter().chain(self.inactive.iter()), cx.mmu, loaded);
        self.stats.harvests += harvest.is_some() as u64;
        self.age_active_with(aspace, cx, N, loaded, &harvest);
        self.shrink_inactive_with(aspace, cx, 2 * N, loaded, &harvest)
    }

    fn age_active_with<M: PhysMem, A: FrameSource, P: MmuPlatform>(
        &mut self,
        aspace: &mut AddressSpace,
        cx: &mut MmCtx<'_, M, A, P>,
        nr: usize,
        loaded: bool,
        harvest: &Option<Harvest>,
    ) {
        let mut batch = FlushBatch::new();
        cx.mmu.enter_lazy();
        for _ in 0..nr.min(self.active.len()) {
            let Some(page) = self.active.pop_front() else { break };
            self.stats.scanned += 1;
            let Some(leaf) = anon_leaf(aspace, cx, page) else {
                self.stats.stale += 1;
                continue;
            };
            if young(harvest, aspace, cx, &leaf, &mut batch) {
                self.active.push_back(page);
            } else {
                self.stats.deactivated += 1;
                self.inactive.push_back(page);
            }
        }
        finish(batch, cx.mmu, loaded);
        cx.mmu.leave_lazy();
    }

    fn shrink_inactive_with<M: PhysMem, A: FrameSource, P: MmuPlatform>(
        &mut self,
        aspace: &mut AddressSpace,
        cx: &mut MmCtx<'_, M, A, P>,
        nr: usize,
        loaded: bool,
        harvest: &Option<Harvest>,
    ) -> usize {
        let mut batch = FlushBatch::new();
        cx.mmu.enter_lazy();
        // Leaves unmapped but whose frames wait for the flush.
        let mut pending = [None::<Leaf>; FlushBatch::CAPACITY];
        let mut npending = 0;
        let mut reclaimed = 0;
        for _ in 0..nr.min(self.inactive.len()) {
            let Some(page) = self.inactive.pop_front() else { break };
            self.stats.scanned += 1;
            let Some(leaf) = anon_leaf(aspace, cx, page) else {
                self.stats.stale += 1;
                continue;
            };
            if young(harvest, aspace, cx, &leaf, &mut batch) {
                self.stats.activated += 1;
                // A full active list keeps the page inactive instead.
                if !self.active.push_back(page) {
                    self.inactive.push_back(page);
                }
                continue;
            }
            if leaf.flags().contains(PteFlags::DIRTY) {
                self.stats.kept_dirty += 1;
                self.inactive.push_back(page);
                continue;
            }
            debug_assert!(
                (0..crate::aspace::leaf_frames(&leaf))
                    .all(|i| cx.mem.frame_is_zero(Pfn::containing(leaf.entry.addr()).add(i))),
                "clean anonymous page not zero"
            );
            let Ok((_, flush)) = aspace.page_table_mut().unmap_leaf(cx.mem, &mut cx.frames, page) else { continue };
            aspace.rss -= crate::aspace::leaf_frames(&leaf);
            batch.add(flush);
            if npending == pending.len() {
                // Flush before freeing: no stale translation may reach a
                // freed frame.
                finish(core::mem::take(&mut batch), cx.mmu, loaded);
                cx.mmu.leave_lazy();
                for l in pending.iter_mut().take(npending) {
                    if let Some(l) = l.take() {
                        cx.release(&l);
                    }
                }
                npending = 0;
                cx.mmu.enter_lazy();
            }
            pending[npending] = Some(leaf);
            npending += 1;
            reclaimed += 1;
            self.stats.reclaimed += 1;
        }
        finish(batch, cx.mmu, loaded);
        cx.mmu.leave_lazy();
        for l in pending.iter_mut().take(npending) {
            if let Some(l) = l.take() {
                cx.release(&l);
            }
        }
        reclaimed
    }
}

/// The anonymous 4 KiB or 2 MiB leaf that starts at `page`, if it still
/// is one.
fn anon_leaf<M: PhysMem, A, P>(aspace: &AddressSpace, cx: &MmCtx<'_, M, A, P>, page: Gva) -> Option<Leaf> {
    let leaf = aspace.page_table().leaf(cx.mem, page)?;
    (leaf.va == page && leaf.size != PageSizeKind::Size1GiB && leaf.flags().contains(PteFlags::ANON)).then_some(leaf)
}

/// Whether the leaf was accessed since the last look; clears `A`, with
/// the flush gathered in `batch` (Linux's `ptep_clear_flush_young`).
fn test_and_clear_young<M: PhysMem, A, P>(
    aspace: &mut AddressSpace,
    cx: &MmCtx<'_, M, A, P>,
    leaf: &Leaf,
    batch: &mut FlushBatch,
) -> bool {
    if !leaf.flags().contains(PteFlags::ACCESSED) {
        return false;
    }
    if let Ok((_, flush)) = aspace.page_table_mut().update_leaf(cx.mem, leaf.va, |f| f - PteFlags::ACCESSED) {
        batch.add(flush);
    }
    true
}

/// Most pages one scan may span and still ask the platform for a harvest
/// (`guest_abi::pv::HARVEST_PAGES`).
pub const HARVEST_SPAN: usize = HARVEST_PAGES as usize;

/// The young bits of one scan's pages, harvested in one platform request.
struct Harvest {
    base: Gva,
    bits: [u64; HARVEST_SPAN / 64],
}

impl Harvest {
    /// Ask `mmu` about `pages` (the pages a scan will look at, each once):
    /// `None` when the address space is not loaded, the pages span more
    /// than [`HARVEST_SPAN`], or the platform has no harvest.
    fn take(pages: impl Iterator<Item = Gva> + Clone, mmu: &impl MmuPlatform, loaded: bool) -> Option<Harvest> {
        let lo = pages.clone().min()?;
        let hi = pages.clone().max()?;
        let span = ((hi.0 - lo.0) / crate::PAGE_SIZE) as usize;
        if !loaded || span >= HARVEST_SPAN {
            return None;
        }
        let mut h = Harvest { base: lo, bits: [0; HARVEST_SPAN / 64] };
        for page in pages {
            let i = ((page.0 - lo.0) / crate::PAGE_SIZE) as usize;
            h.bits[i / 64] |= 1 << (i % 64);
        }
        mmu.harvest_young(lo, &mut h.bits[..span / 64 + 1]).then_some(h)
    }

    /// What the harvest said of `page` (one of the pages it named; any
    /// other is taken as young).
    fn young(&self, page: Gva) -> bool {
        let Some(off) = page.0.checked_sub(self.base.0) else { return true };
        let i = (off / crate::PAGE_SIZE) as usize;
        self.bits.get(i / 64).is_none_or(|w| w >> (i % 64) & 1 != 0)
    }
}

/// Whether the page of `leaf` was used since the last look: from the
/// harvest when there is one (no entry written), else tested and cleared
/// in the entry.
fn young<M: PhysMem, A, P>(
    harvest: &Option<Harvest>,
    aspace: &mut AddressSpace,
    cx: &MmCtx<'_, M, A, P>,
    leaf: &Leaf,
    batch: &mut FlushBatch,
) -> bool {
    match harvest {
        Some(h) => h.young(leaf.va),
        None => test_and_clear_young(aspace, cx, leaf, batch),
    }
}

fn finish(batch: FlushBatch, mmu: &impl MmuPlatform, loaded: bool) {
    if loaded { batch.finish(mmu) } else { batch.ignore() }
}

#[cfg(test)]
mod tests;
