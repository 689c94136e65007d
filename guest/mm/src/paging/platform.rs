//! What paging needs of its platform: table pages ([`PageTableSource`]), TLB control ([`MmuPlatform`]) and the flush tokens.
//!
//! Part of [`crate::paging`]; its module doc states the invariants.

use super::*;

/// Where page-table pages come from, and go back to.
pub trait PageTableSource {
    /// A table page, all zeroes, or `None` when there is none left.
    fn alloc_table(&mut self) -> Option<Pfn>;
    /// Give back a table page whose 512 entries are all zero.
    fn free_table(&mut self, table: Pfn);
}

impl<T: PageTableSource + ?Sized> PageTableSource for &mut T {
    fn alloc_table(&mut self) -> Option<Pfn> {
        (**self).alloc_table()
    }
    fn free_table(&mut self, table: Pfn) {
        (**self).free_table(table)
    }
}

impl<M: PhysMem> PageTableSource for BuddyAllocator<'_, M> {
    fn alloc_table(&mut self) -> Option<Pfn> {
        self.alloc_pgtable()
    }
    fn free_table(&mut self, table: Pfn) {
        // The mapper only frees tables it emptied; a refusal is a bug in
        // this module, and the page stays allocated (a leak the tests see).
        let refused = self.free_pgtable(table).is_err();
        debug_assert!(!refused, "page-table page refused by the buddy allocator");
    }
}

impl<M: PhysMem, R: crate::sync::RawLock> PageTableSource for crate::buddy::CpuFrames<'_, '_, M, R> {
    fn alloc_table(&mut self) -> Option<Pfn> {
        self.buddy.with_zone(|b| b.alloc_pgtable())
    }
    fn free_table(&mut self, table: Pfn) {
        // As for `BuddyAllocator`: a refusal is a bug of the mapper.
        let refused = self.buddy.with_zone(|b| b.free_pgtable(table)).is_err();
        debug_assert!(!refused, "page-table page refused by the buddy allocator");
    }
}

/// Where ordinary data frames (for anonymous memory) come from.
pub trait FrameSource: PageTableSource {
    /// A 4 KiB frame (contents unspecified), or `None`.
    fn alloc_frame(&mut self) -> Option<Pfn>;
    /// Give back a frame from [`alloc_frame`](Self::alloc_frame) or one
    /// frame of an [`alloc_folio`](Self::alloc_folio) block.
    fn free_frame(&mut self, frame: Pfn);
    /// A naturally aligned block of `2^order` frames (contents
    /// unspecified) whose frames are given back one by one with
    /// [`free_frame`](Self::free_frame), or `None`. By default only order 0
    /// is served (a source without large blocks makes every fault fall
    /// back to 4 KiB).
    fn alloc_folio(&mut self, order: u8) -> Option<Pfn> {
        if order == 0 { self.alloc_frame() } else { None }
    }
}

impl<T: FrameSource + ?Sized> FrameSource for &mut T {
    fn alloc_frame(&mut self) -> Option<Pfn> {
        (**self).alloc_frame()
    }
    fn free_frame(&mut self, frame: Pfn) {
        (**self).free_frame(frame)
    }
    fn alloc_folio(&mut self, order: u8) -> Option<Pfn> {
        (**self).alloc_folio(order)
    }
}

impl<M: PhysMem> FrameSource for BuddyAllocator<'_, M> {
    fn alloc_frame(&mut self) -> Option<Pfn> {
        self.alloc(0, ZonePref::Normal)
    }
    fn free_frame(&mut self, frame: Pfn) {
        let refused = self.free(frame, 0).is_err();
        debug_assert!(!refused, "data frame refused by the buddy allocator");
    }
    fn alloc_folio(&mut self, order: u8) -> Option<Pfn> {
        let pfn = self.alloc(order, ZonePref::Normal)?;
        if order > 0 {
            // Just allocated with this order: the split cannot be refused.
            let refused = self.split_block(pfn, order).is_err();
            debug_assert!(!refused, "fresh block refused by split_block");
        }
        Some(pfn)
    }
}

impl<M: PhysMem, R: crate::sync::RawLock> FrameSource for crate::buddy::CpuFrames<'_, '_, M, R> {
    fn alloc_frame(&mut self) -> Option<Pfn> {
        self.buddy.alloc_on(self.cpu, 0, ZonePref::Normal)
    }
    fn free_frame(&mut self, frame: Pfn) {
        let refused = self.buddy.free_on(self.cpu, frame, 0).is_err();
        debug_assert!(!refused, "data frame refused by the buddy allocator");
    }
}

/// The MMU operations that differ between the guest's two modes: in ept
/// mode they are the instructions (`mov cr3`, `invlpg`); in shadow mode a
/// CR3 load is the `LOAD_CR3` hypercall. Host tests use a recording fake.
pub trait MmuPlatform {
    /// Make `root` (a PML4 page) the current address space; flushes every
    /// non-global TLB entry (SDM §4.10.4.1).
    fn load_cr3(&self, root: Pfn);
    /// Invalidate the TLB entry of the page containing `va`, of any size,
    /// and the paging-structure caches (SDM §4.10.4.1, INVLPG).
    fn invlpg(&self, va: Gva);
    /// Invalidate every non-global TLB entry (a CR3 reload).
    fn flush_all(&self);
    /// Start a batch of page-table changes (Linux's
    /// `arch_enter_lazy_mmu_mode`): until the matching
    /// [`leave_lazy`](Self::leave_lazy) the platform may defer
    /// [`invlpg`](Self::invlpg) and [`flush_all`](Self::flush_all) and do
    /// them as one at the end. Brackets nest. No-op by default (hardware
    /// paging, trapping shadow paging, host tests); paravirtual shadow
    /// paging syncs its write queue once at the outermost `leave_lazy`.
    fn enter_lazy(&self) {}
    /// End a batch begun with [`enter_lazy`](Self::enter_lazy): every
    /// deferred invalidation is done before this returns.
    fn leave_lazy(&self) {}
    /// Test and clear, in one request, whether pages of the current
    /// address space were accessed since the last such request named them
    /// (a second-level accessed bit kept by the platform, like EPT's A
    /// bits: the page-table entries are not changed). Bit `i` of `young`
    /// names page `base + i * 4096` on entry and says on return whether it
    /// was accessed; the platform flushes what the answer requires. `false`
    /// (the default: hardware paging, trapping shadow paging, host tests)
    /// when the platform has no such request: the caller then clears A in
    /// the entries itself. pv mode answers with one `PV_HARVEST`.
    fn harvest_young(&self, _base: Gva, _young: &mut [u64]) -> bool {
        false
    }
}

impl<T: MmuPlatform + ?Sized> MmuPlatform for &T {
    fn load_cr3(&self, root: Pfn) {
        (**self).load_cr3(root)
    }
    fn invlpg(&self, va: Gva) {
        (**self).invlpg(va)
    }
    fn flush_all(&self) {
        (**self).flush_all()
    }
    fn enter_lazy(&self) {
        (**self).enter_lazy()
    }
    fn leave_lazy(&self) {
        (**self).leave_lazy()
    }
    fn harvest_young(&self, base: Gva, young: &mut [u64]) -> bool {
        (**self).harvest_young(base, young)
    }
}

/// A pending invalidation of one page's translation: call
/// [`flush`](Self::flush) once the change should be visible, or
/// [`ignore`](Self::ignore) when the address space is not loaded.
#[must_use = "a changed mapping stays cached in the TLB until flushed: call flush() or ignore()"]
#[derive(Debug, PartialEq, Eq)]
pub struct MapperFlush(Gva);

impl MapperFlush {
    /// A pending invalidation of `page`.
    pub const fn new(page: Gva) -> Self {
        Self(page)
    }
    /// The page to invalidate.
    pub const fn page(&self) -> Gva {
        self.0
    }
    /// Invalidate the page (`invlpg`).
    pub fn flush(self, mmu: &impl MmuPlatform) {
        mmu.invlpg(self.0)
    }
    /// Drop the invalidation (the address space is not loaded, or a later
    /// full flush covers it).
    pub fn ignore(self) {}
}

/// A pending invalidation of the whole TLB (after a bulk change).
#[must_use = "changed mappings stay cached in the TLB until flushed: call flush() or ignore()"]
#[derive(Debug, PartialEq, Eq)]
pub struct MapperFlushAll(());

impl MapperFlushAll {
    /// A pending full invalidation.
    pub const fn new() -> Self {
        Self(())
    }
    /// Invalidate everything (a CR3 reload).
    pub fn flush(self, mmu: &impl MmuPlatform) {
        mmu.flush_all()
    }
    /// Drop the invalidation.
    pub fn ignore(self) {}
}

impl Default for MapperFlushAll {
    fn default() -> Self {
        Self::new()
    }
}

/// Gathers page invalidations (Linux's `mmu_gather`, in small): up to
/// [`FlushBatch::CAPACITY`] pages are flushed one by one; beyond that, one
/// full flush is cheaper.
#[must_use = "gathered invalidations must be flushed: call finish()"]
#[derive(Debug)]
pub struct FlushBatch {
    pages: [Gva; Self::CAPACITY],
    count: usize,
    overflow: bool,
}

impl FlushBatch {
    /// Most pages flushed one by one.
    pub const CAPACITY: usize = 32;

    /// An empty batch.
    pub const fn new() -> Self {
        Self { pages: [Gva(0); Self::CAPACITY], count: 0, overflow: false }
    }
    /// Add a pending page invalidation.
    pub fn add(&mut self, flush: MapperFlush) {
        if self.count < Self::CAPACITY {
            self.pages[self.count] = flush.0;
            self.count += 1;
        } else {
            self.overflow = true;
        }
    }
    /// Add a pending full invalidation.
    pub fn add_all(&mut self, flush: MapperFlushAll) {
        flush.ignore();
        self.overflow = true;
    }
    /// How many pages are pending (not counting an overflow).
    pub const fn len(&self) -> usize {
        self.count
    }
    /// Whether nothing is pending.
    pub const fn is_empty(&self) -> bool {
        self.count == 0 && !self.overflow
    }
    /// Execute the gathered invalidations.
    pub fn finish(self, mmu: &impl MmuPlatform) {
        if self.overflow {
            mmu.flush_all();
        } else {
            self.pages[..self.count].iter().for_each(|&p| mmu.invlpg(p));
        }
    }
    /// Drop the gathered invalidations (the address space is not loaded).
    pub fn ignore(self) {}
}

impl Default for FlushBatch {
    fn default() -> Self {
        Self::new()
    }
}
