//! Address spaces: a root of page tables whose upper (kernel) half is
//! shared with every other address space, a lower (user) half of its own,
//! and the [VMAs](crate::vma) that say what the user half may hold.
//!
//! # Invariants
//!
//! - The upper half is borrowed: PML4 entries 256..=511 are copies of the
//!   kernel template's at creation, and point at the template's PDPTs,
//!   which must never be freed while an address space exists (build the
//!   template with [`PageTable::new_pinned_upper`], and preallocate its
//!   upper PDPTs if kernel mappings are added later). An address space
//!   never maps, unmaps or frees anything in the upper half; `destroy`
//!   zeroes those entries before freeing its own tables.
//! - Every user leaf marked [`PteFlags::ANON`] — a 4 KiB page, or a
//!   2 MiB THP ([`crate::folio`]) — maps frames that came from the
//!   [`FrameSource`], and the [`FrameRefs`] count of each 4 KiB frame is
//!   the number of user leaves (in all address spaces) that cover it. A
//!   frame goes back to the source, alone, when its count drops to zero,
//!   so a partially unmapped folio frees exactly the pages unmapped.
//!   Leaves without `ANON` (device memory, say) are not counted and never
//!   freed.
//! - No VMA boundary lies strictly inside a 2 MiB leaf: a THP is mapped
//!   only where its VMA covers the aligned 2 MiB, and [`AddressSpace::munmap`],
//!   [`AddressSpace::mprotect`] and [`AddressSpace::unmap_range`] split a
//!   2 MiB leaf into 512 PTEs (Linux's `split_huge_pmd`) before they
//!   change part of it. Splitting changes no translation and no count.
//! - Copy-on-write (after [`AddressSpace::fork`]): an `ANON` leaf that was
//!   writable becomes read-only with [`PteFlags::COW`] in both address
//!   spaces, and its frame's count goes up by one. A write fault on it
//!   copies the frame, or, if the count is one, just makes it writable
//!   again (the fault handler, [`crate::fault`]). `D` is copied with the
//!   entry (and by a split into every PTE), so a clean leaf's frames are
//!   all zeroes (never written: see [`crate::aging`], which relies on
//!   this).
//! - `mprotect` never makes a leaf writable: a leaf of a range made
//!   writable stays read-only until its first write, which the fault
//!   handler resolves as copy-on-write (reuse when unshared), so a frame
//!   shared after a fork never becomes writable in place. (Execute rights
//!   follow the new protection at once: no sharing rule is involved.)
//! - [`AddressSpace::rss`] is the number of 4 KiB pages the address
//!   space's `ANON` leaves map (Linux's `MM_ANONPAGES`: a 2 MiB leaf counts
//!   512, a 64 KiB folio 16), kept by every operation here, the fault
//!   handler and reclaim; a change made through
//!   [`AddressSpace::page_table_mut`] is the caller's to account.
//! - The per-frame counts live in a caller-supplied array indexed by pfn
//!   (no allocation), like Linux's `page->_refcount` in `struct page`.

use guest_abi::Gva;

use crate::folio::FolioSize;
use crate::paging::{
    ENTRIES, FrameSource, Leaf, MapError, MapperFlushAll, MmuPlatform, PageSizeKind, PageTable, PageTableEntry,
    PteFlags, UPPER_HALF_FIRST,
};
use crate::phys::{Pfn, PhysMem};
use crate::vma::{Prot, Vma, VmaError, VmaList};

/// First address above the user half (exclusive end of every user range).
pub const USER_END: Gva = Gva(1 << 47);

/// Why a reference count could not be changed. Nothing was changed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RefError {
    /// The frame is outside the array.
    OutOfRange,
    /// The count is at its maximum.
    Overflow,
    /// The count is already zero.
    Underflow,
}

impl RefError {
    /// A description that needs no formatting machinery.
    pub const fn as_str(self) -> &'static str {
        match self {
            RefError::OutOfRange => "frame outside the reference-count array",
            RefError::Overflow => "frame reference count at its maximum",
            RefError::Underflow => "frame reference count already zero",
        }
    }
}

/// Per-frame reference counts of anonymous frames, in a caller-supplied
/// array: `counts[i]` is the count of frame `base + i`.
#[derive(Debug)]
pub struct FrameRefs<'a> {
    base: Pfn,
    counts: &'a mut [u16],
}

impl<'a> FrameRefs<'a> {
    /// Counts for the frames `base..base + counts.len()`, all set to zero.
    pub fn new(base: Pfn, counts: &'a mut [u16]) -> Self {
        counts.fill(0);
        Self { base, counts }
    }

    /// The counts already kept in `counts` (for `base..base + len`), as
    /// they are: for a caller that keeps the array across operations and
    /// wraps it anew for each (the guest kernel does).
    pub fn attach(base: Pfn, counts: &'a mut [u16]) -> Self {
        Self { base, counts }
    }

    fn slot(&mut self, pfn: Pfn) -> Result<&mut u16, RefError> {
        let i = pfn.0.checked_sub(self.base.0).ok_or(RefError::OutOfRange)?;
        self.counts.get_mut(i as usize).ok_or(RefError::OutOfRange)
    }

    /// The count of `pfn` (zero outside the array).
    pub fn get(&self, pfn: Pfn) -> u16 {
        pfn.0.checked_sub(self.base.0).and_then(|i| self.counts.get(i as usize)).copied().unwrap_or(0)
    }

    /// Add one reference; returns the new count.
    pub fn inc(&mut self, pfn: Pfn) -> Result<u16, RefError> {
        let c = self.slot(pfn)?;
        *c = c.checked_add(1).ok_or(RefError::Overflow)?;
        Ok(*c)
    }

    /// Drop one reference; returns the new count.
    pub fn dec(&mut self, pfn: Pfn) -> Result<u16, RefError> {
        let c = self.slot(pfn)?;
        *c = c.checked_sub(1).ok_or(RefError::Underflow)?;
        Ok(*c)
    }

    /// Add one reference to each of the `n` frames from `pfn`: all or
    /// nothing (on an error the counts already raised are lowered again).
    pub fn inc_range(&mut self, pfn: Pfn, n: u64) -> Result<(), RefError> {
        for i in 0..n {
            if let Err(e) = self.inc(pfn.add(i)) {
                for j in 0..i {
                    let _ = self.dec(pfn.add(j));
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Whether every count is zero (for tests and teardown checks).
    pub fn all_zero(&self) -> bool {
        self.counts.iter().all(|&c| c == 0)
    }
}

/// What the memory-management operations need, gathered once: physical
/// memory, the frame and table source, the reference counts and the MMU
/// platform.
pub struct MmCtx<'a, M, A, P> {
    /// Physical memory.
    pub mem: &'a M,
    /// Data frames and page-table pages.
    pub frames: A,
    /// Reference counts of anonymous frames.
    pub refs: FrameRefs<'a>,
    /// CR3 loads and TLB invalidation.
    pub mmu: &'a P,
}

impl<M: PhysMem, A: FrameSource, P: MmuPlatform> MmCtx<'_, M, A, P> {
    /// Drop the reference a user leaf held on each frame it covers,
    /// freeing every anonymous frame with its last reference.
    pub(crate) fn release(&mut self, leaf: &Leaf) {
        if !leaf.flags().contains(PteFlags::ANON) {
            return;
        }
        debug_assert!(leaf.size != PageSizeKind::Size1GiB, "anonymous pages are 4 KiB or 2 MiB");
        let pfn = Pfn::containing(leaf.entry.addr());
        for i in 0..leaf_frames(leaf) {
            if let Ok(0) = self.refs.dec(pfn.add(i)) {
                self.frames.free_frame(pfn.add(i));
            }
        }
    }
}

/// How many 4 KiB frames `leaf` covers.
pub(crate) fn leaf_frames(leaf: &Leaf) -> u64 {
    leaf.size.bytes() / crate::PAGE_SIZE
}

/// Why an address space could not be built. Nothing was leaked.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AspaceError {
    /// No page-table page left.
    OutOfTables,
    /// A frame's reference count is at its maximum.
    TooManyReferences,
}

impl AspaceError {
    /// A description that needs no formatting machinery.
    pub const fn as_str(self) -> &'static str {
        match self {
            AspaceError::OutOfTables => "no page-table page left",
            AspaceError::TooManyReferences => "frame reference count at its maximum",
        }
    }
}

/// A failed fork: the child is gone, but the parent's writable pages may
/// already have been made copy-on-write, so its TLB must still be flushed.
#[must_use = "the parent's TLB must be flushed"]
#[derive(Debug)]
pub struct ForkError {
    /// Why.
    pub error: AspaceError,
    /// The flush the parent needs.
    pub flush: MapperFlushAll,
}

/// An address space: page tables and VMAs. See the module documentation.
#[derive(Debug)]
pub struct AddressSpace {
    pt: PageTable,
    vmas: VmaList,
    anon: FolioSize,
    /// 4 KiB pages mapped by `ANON` leaves (module doc).
    pub(crate) rss: u64,
}

impl AddressSpace {
    /// An empty address space sharing the upper half of `kernel`.
    pub fn new<M: PhysMem, A: FrameSource, P>(
        cx: &mut MmCtx<'_, M, A, P>,
        kernel: &PageTable,
    ) -> Result<Self, AspaceError> {
        let pt = PageTable::new(&mut cx.frames).ok_or(AspaceError::OutOfTables)?;
        for idx in UPPER_HALF_FIRST..ENTRIES {
            let off = idx as u64 * 8;
            let e = cx.mem.read_u64(guest_abi::Gpa(kernel.root().addr().0 + off));
            if e != 0 {
                cx.mem.write_u64(guest_abi::Gpa(pt.root().addr().0 + off), e);
            }
        }
        Ok(Self { pt: PageTable::from_root(pt.root(), true), vmas: VmaList::new(), anon: FolioSize::K4, rss: 0 })
    }

    /// The page tables.
    pub fn page_table(&self) -> &PageTable {
        &self.pt
    }

    /// The page tables, to change them directly (the caller keeps the
    /// module invariants: user half only, `ANON` leaves counted).
    pub fn page_table_mut(&mut self) -> &mut PageTable {
        &mut self.pt
    }

    /// The PML4 page.
    pub fn root(&self) -> Pfn {
        self.pt.root()
    }

    /// The VMAs.
    pub fn vmas(&self) -> &VmaList {
        &self.vmas
    }

    /// Resident anonymous memory, in 4 KiB pages (module documentation).
    pub fn rss(&self) -> u64 {
        self.rss
    }

    /// The size of the folios demand faults map ([`crate::folio`]); a
    /// fork's child inherits it. 4 KiB for a new address space.
    pub fn anon_folio(&self) -> FolioSize {
        self.anon
    }

    /// Set the size of the folios later demand faults map (pages already
    /// mapped stay as they are).
    pub fn set_anon_folio(&mut self, size: FolioSize) {
        self.anon = size;
    }

    /// Make this the current address space (CR3 load through the platform,
    /// which in shadow mode is the `LOAD_CR3` hypercall).
    pub fn switch_to(&self, mmu: &impl MmuPlatform) {
        mmu.load_cr3(self.pt.root());
    }

    /// Add an anonymous VMA `[start, end)` with `prot`. Pages appear on
    /// first touch (demand paging).
    pub fn add_vma(&mut self, start: Gva, end: Gva, prot: Prot) -> Result<(), VmaError> {
        self.vmas.insert(Vma { start, end, prot })
    }

    /// Remove the VMA that starts at `start`, unmapping its pages and
    /// dropping their frames. Returns the VMA and the flush to perform.
    pub fn remove_vma<M: PhysMem, A: FrameSource, P: MmuPlatform>(
        &mut self,
        cx: &mut MmCtx<'_, M, A, P>,
        start: Gva,
    ) -> Option<(Vma, MapperFlushAll)> {
        let vma = self.vmas.remove(start)?;
        // No VMA boundary lies inside a 2 MiB leaf (module doc): nothing
        // to split, so this cannot fail.
        cx.mmu.enter_lazy();
        self.unmap_leaves(cx, vma.start, vma.end);
        cx.mmu.leave_lazy();
        Some((vma, MapperFlushAll::new()))
    }

    /// Unmap every user page in `[start, end)`, dropping frames; the VMAs
    /// stay (the next touch demand-faults again, as after Linux's
    /// `MADV_DONTNEED`). A 2 MiB leaf that straddles either end is split
    /// first, so only the pages inside go. Fails only when such a split
    /// finds no page-table page: then nothing was unmapped.
    pub fn unmap_range<M: PhysMem, A: FrameSource, P: MmuPlatform>(
        &mut self,
        cx: &mut MmCtx<'_, M, A, P>,
        start: Gva,
        end: Gva,
    ) -> Result<MapperFlushAll, VmaError> {
        let end = if end > USER_END { USER_END } else { end };
        cx.mmu.enter_lazy();
        let r = self.split_at(cx, start).and_then(|()| self.split_at(cx, end));
        if r.is_ok() {
            self.unmap_leaves(cx, start, end);
        }
        cx.mmu.leave_lazy();
        r.map(|()| MapperFlushAll::new())
    }

    /// Unmap and release every leaf that starts in `[start, end)`.
    fn unmap_leaves<M: PhysMem, A: FrameSource, P: MmuPlatform>(
        &mut self,
        cx: &mut MmCtx<'_, M, A, P>,
        start: Gva,
        end: Gva,
    ) {
        let mut at = start;
        while let Some(leaf) = self.pt.next_leaf(cx.mem, at, end) {
            if let Ok((_, flush)) = self.pt.unmap_leaf(cx.mem, &mut cx.frames, leaf.va) {
                flush.ignore();
            }
            if leaf.flags().contains(PteFlags::ANON) {
                self.rss -= leaf_frames(&leaf);
            }
            cx.release(&leaf);
            at = Gva(leaf.va.0 + leaf.size.bytes());
        }
    }

    /// Split the 2 MiB leaf that maps `at`, if `at` lies strictly inside
    /// one (an edge of a range about to change). The flush is done at once
    /// (deferred to the end of an open lazy-MMU bracket).
    fn split_at<M: PhysMem, A: FrameSource, P: MmuPlatform>(
        &mut self,
        cx: &mut MmCtx<'_, M, A, P>,
        at: Gva,
    ) -> Result<(), VmaError> {
        if at.is_aligned(crate::LARGE_PAGE_SIZE) || at >= USER_END {
            return Ok(());
        }
        match self.pt.split_large_leaf(cx.mem, &mut cx.frames, at) {
            Ok(Some(flush)) => {
                flush.flush(cx.mmu);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(_) => Err(VmaError::NoMemory),
        }
    }

    /// The VMA that holds all of `[start, end)` (page-aligned, non-empty).
    fn vma_holding(&self, start: Gva, end: Gva) -> Result<Vma, VmaError> {
        if start >= end {
            return Err(VmaError::Empty);
        }
        if !start.is_aligned(crate::PAGE_SIZE) || !end.is_aligned(crate::PAGE_SIZE) {
            return Err(VmaError::Unaligned);
        }
        match self.vmas.find(start) {
            Some(v) if end <= v.end => Ok(v),
            _ => Err(VmaError::NotMapped),
        }
    }

    /// Replace `vma` by its parts outside `[start, end)` and, if `middle`
    /// is given, the part inside with those rights. Checks the room first:
    /// on an error nothing changed.
    fn carve_vma(&mut self, vma: Vma, start: Gva, end: Gva, middle: Option<Prot>) -> Result<(), VmaError> {
        let parts = [
            (vma.start < start).then_some(Vma { start: vma.start, end: start, prot: vma.prot }),
            middle.map(|prot| Vma { start, end, prot }),
            (end < vma.end).then_some(Vma { start: end, end: vma.end, prot: vma.prot }),
        ];
        let n = parts.iter().flatten().count();
        if self.vmas.as_slice().len() - 1 + n > crate::vma::MAX_VMAS {
            return Err(VmaError::Full);
        }
        self.vmas.remove(vma.start);
        for p in parts.into_iter().flatten() {
            let inserted = self.vmas.insert(p);
            debug_assert!(inserted.is_ok(), "a part of a removed area fits where it was");
        }
        Ok(())
    }

    /// `munmap(start, end)`: remove `[start, end)`, which must lie in one
    /// VMA, from the VMAs (splitting it) and unmap its pages, dropping
    /// frames; a 2 MiB leaf across either end is split first. On an error
    /// nothing changed.
    pub fn munmap<M: PhysMem, A: FrameSource, P: MmuPlatform>(
        &mut self,
        cx: &mut MmCtx<'_, M, A, P>,
        start: Gva,
        end: Gva,
    ) -> Result<MapperFlushAll, VmaError> {
        let vma = self.vma_holding(start, end)?;
        let parts = usize::from(vma.start < start) + usize::from(end < vma.end);
        if self.vmas.as_slice().len() - 1 + parts > crate::vma::MAX_VMAS {
            return Err(VmaError::Full);
        }
        let flush = self.unmap_range(cx, start, end)?;
        self.carve_vma(vma, start, end, None)?;
        Ok(flush)
    }

    /// `mprotect(start, end, prot)`: give `[start, end)`, which must lie
    /// in one VMA, the rights `prot` (splitting the VMA), and its mapped
    /// pages execute rights as `prot` says and no write right `prot` lacks
    /// (reading is never refused to a mapped page). Write is never added
    /// to a leaf (module documentation): the first write faults and is
    /// resolved as copy-on-write. A 2 MiB leaf across either end is split
    /// first. On an error nothing changed.
    pub fn mprotect<M: PhysMem, A: FrameSource, P: MmuPlatform>(
        &mut self,
        cx: &mut MmCtx<'_, M, A, P>,
        start: Gva,
        end: Gva,
        prot: Prot,
    ) -> Result<MapperFlushAll, VmaError> {
        let vma = self.vma_holding(start, end)?;
        let parts = 1 + usize::from(vma.start < start) + usize::from(end < vma.end);
        if self.vmas.as_slice().len() - 1 + parts > crate::vma::MAX_VMAS {
            return Err(VmaError::Full);
        }
        cx.mmu.enter_lazy();
        let r = self.split_at(cx, start).and_then(|()| self.split_at(cx, end));
        if r.is_ok() {
            let mut at = start;
            while let Some(leaf) = self.pt.next_leaf(cx.mem, at, end) {
                at = Gva(leaf.va.0 + leaf.size.bytes());
                let old = leaf.flags();
                let mut new = old;
                if !prot.contains(Prot::WRITE) {
                    new.remove(PteFlags::WRITABLE | PteFlags::COW);
                }
                new.set(PteFlags::NO_EXECUTE, !prot.contains(Prot::EXEC));
                if new != old
                    && let Ok((_, flush)) = self.pt.update_leaf(cx.mem, leaf.va, |_| new)
                {
                    flush.ignore();
                }
            }
        }
        cx.mmu.leave_lazy();
        r?;
        self.carve_vma(vma, start, end, Some(prot))?;
        Ok(MapperFlushAll::new())
    }

    /// Destroy the address space: drop every user frame it maps, free every
    /// table page it owns (not the shared upper half). It must not be the
    /// current address space.
    pub fn destroy<M: PhysMem, A: FrameSource, P: MmuPlatform>(self, cx: &mut MmCtx<'_, M, A, P>) {
        cx.mmu.enter_lazy();
        self.destroy_tables(cx);
        cx.mmu.leave_lazy();
    }

    fn destroy_tables<M: PhysMem, A: FrameSource, P: MmuPlatform>(mut self, cx: &mut MmCtx<'_, M, A, P>) {
        cx.mmu.enter_lazy();
        self.unmap_leaves(cx, Gva(0), USER_END);
        cx.mmu.leave_lazy();
        let root = self.pt.root();
        for idx in UPPER_HALF_FIRST..ENTRIES {
            let addr = guest_abi::Gpa(root.addr().0 + idx as u64 * 8);
            if cx.mem.read_u64(addr) != 0 {
                cx.mem.write_u64(addr, 0);
            }
        }
        self.pt.free_tables(cx.mem, &mut cx.frames);
    }

    /// A copy of this address space, copy-on-write: every anonymous
    /// writable page becomes read-only and `COW` in both, and its frame
    /// gains a reference; other leaves are shared as they are. The child
    /// has the same VMAs. The returned flush is for this (the parent's)
    /// address space.
    pub fn fork<M: PhysMem, A: FrameSource, P: MmuPlatform>(
        &mut self,
        cx: &mut MmCtx<'_, M, A, P>,
    ) -> Result<(AddressSpace, MapperFlushAll), ForkError> {
        cx.mmu.enter_lazy();
        let r = self.fork_tables(cx);
        cx.mmu.leave_lazy();
        r
    }

    fn fork_tables<M: PhysMem, A: FrameSource, P: MmuPlatform>(
        &mut self,
        cx: &mut MmCtx<'_, M, A, P>,
    ) -> Result<(AddressSpace, MapperFlushAll), ForkError> {
        let kernel = PageTable::from_root(self.pt.root(), true);
        let mut child =
            AddressSpace::new(cx, &kernel).map_err(|error| ForkError { error, flush: MapperFlushAll::new() })?;
        child.vmas = self.vmas.clone();
        child.anon = self.anon;
        let mut at = Gva(0);
        while let Some(leaf) = self.pt.next_leaf(cx.mem, at, USER_END) {
            at = Gva(leaf.va.0 + leaf.size.bytes());
            let mut flags = leaf.entry.flags();
            if flags.contains(PteFlags::ANON) {
                let pfn = Pfn::containing(leaf.entry.addr());
                if cx.refs.inc_range(pfn, leaf_frames(&leaf)).is_err() {
                    child.destroy(cx);
                    return Err(ForkError { error: AspaceError::TooManyReferences, flush: MapperFlushAll::new() });
                }
                if flags.contains(PteFlags::WRITABLE) {
                    flags = flags.difference(PteFlags::WRITABLE).union(PteFlags::COW);
                    cx.mem.write_u64(leaf.entry_addr, leaf.entry.with_flags(flags).0);
                }
            }
            let entry = PageTableEntry::new(leaf.entry.addr(), flags);
            if let Err(e) = child.pt.install(cx.mem, &mut cx.frames, leaf.va.0, leaf.size.level(), entry) {
                debug_assert!(e == MapError::OutOfTables, "fresh tables hold no conflicting mapping");
                if flags.contains(PteFlags::ANON) {
                    let pfn = Pfn::containing(leaf.entry.addr());
                    for i in 0..leaf_frames(&leaf) {
                        let _ = cx.refs.dec(pfn.add(i));
                    }
                }
                child.destroy(cx);
                return Err(ForkError { error: AspaceError::OutOfTables, flush: MapperFlushAll::new() });
            }
        }
        child.rss = self.rss;
        Ok((child, MapperFlushAll::new()))
    }
}

#[cfg(test)]
mod tests;
