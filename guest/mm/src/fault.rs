//! The page-fault handler of the user half: demand paging, copy-on-write
//! and segfaults (Linux's `handle_mm_fault` → `do_anonymous_page` /
//! `do_wp_page`, reduced to anonymous memory).
//!
//! # Rules
//!
//! - The error code is the CPU's (Intel SDM vol. 3A §4.7, Figure 4-12):
//!   P (bit 0: a protection violation, else a not-present page), W/R
//!   (bit 1), U/S (bit 2), RSVD (bit 3), I/D (bit 4).
//! - The access must be allowed by the VMA containing the address: a
//!   write needs `WRITE`, a fetch `EXEC`, a read `READ`. Otherwise, or
//!   outside every VMA, the answer is a [`Segfault`] value, never a panic.
//! - A not-present page in a VMA gets a fresh zeroed folio of the address
//!   space's size ([`crate::folio`]: the largest of the configured size
//!   and the smaller ones whose aligned range lies in the VMA, is wholly
//!   unmapped, and can be allocated), mapped with `P | US | ANON`, `RW` if
//!   the VMA is writable, `NX` unless it is executable, and `A` set, plus
//!   `D` on a write fault — on every page of the folio, as Linux's
//!   `set_ptes` maps a large folio with one `mk_pte` + `pte_mkyoung`/
//!   `pte_mkdirty`, so the CPU need not write the entries after the fault
//!   (in shadow mode each such write would trap). 16 and 64 KiB folios
//!   are mapped as 4 KiB PTEs, a 2 MiB folio as one PMD leaf. No flush is
//!   needed (nothing in the range was present).
//! - A write to an `ANON` page that is not writable (copy-on-write, or
//!   shared read-only after a fork) in a writable VMA: if this address
//!   space holds the only reference, the page is made writable in place
//!   (`COW` cleared); otherwise the frame is copied into a new one, which
//!   replaces it here, and the old frame loses a reference. Either way the
//!   entry changed while present, so the handler flushes it (`invlpg`).
//!   A 2 MiB leaf is reused whole when every one of its frames has one
//!   reference; otherwise it is split into 512 PTEs and only the written
//!   page is copied (Linux's `do_huge_pmd_wp_page` → `__split_huge_pmd`).
//! - A fault on a page that already allows the access (a stale TLB entry,
//!   say after another CPU's change) is spurious: the page is flushed and
//!   the access retried.

use guest_abi::Gva;

use crate::aspace::{AddressSpace, MmCtx};
use crate::folio::FolioSize;
use crate::paging::{FrameSource, MmuPlatform, Page, PageSizeKind, PhysFrame, PteFlags, Size2MiB, Size4KiB};
use crate::phys::{Pfn, PhysMem};
use crate::vma::{Prot, Vma};

/// A page-fault error code (SDM vol. 3A §4.7).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Debug)]
pub struct PfErrorCode(pub u64);

impl PfErrorCode {
    /// The page was present (a protection violation).
    pub const PRESENT: u64 = 1 << 0;
    /// The access was a write.
    pub const WRITE: u64 = 1 << 1;
    /// The access was made in user mode.
    pub const USER: u64 = 1 << 2;
    /// A reserved bit was set in a paging-structure entry.
    pub const RSVD: u64 = 1 << 3;
    /// The access was an instruction fetch.
    pub const FETCH: u64 = 1 << 4;

    /// Whether every bit of `bits` is set.
    pub const fn has(self, bits: u64) -> bool {
        self.0 & bits == bits
    }
}

/// What the handler did; the faulting access can be retried.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FaultFix {
    /// A zeroed frame was mapped at this page.
    DemandZero(Gva),
    /// A zeroed folio of this size was mapped from this (aligned) address
    /// on (16 KiB or more; a 4 KiB one is [`FaultFix::DemandZero`]).
    DemandFolio(Gva, FolioSize),
    /// The shared frame was copied into a new, writable one.
    CowCopied(Gva),
    /// The page was the last user of its frame and became writable again.
    CowReused(Gva),
    /// The page already allowed the access; its TLB entry was flushed.
    Spurious(Gva),
}

/// Why an access is a segfault.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Segfault {
    /// No VMA contains the address.
    NoVma,
    /// The VMA (or the mapping) does not allow the access.
    Protection,
    /// The CPU found a reserved bit set in an entry (a corrupted table).
    ReservedBit,
}

/// A fault that could not be fixed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FaultError {
    /// The access is not allowed: deliver a segfault.
    Segfault(Segfault),
    /// No frame or table page left to fix it.
    OutOfMemory,
}

impl FaultError {
    /// A description that needs no formatting machinery.
    pub const fn as_str(self) -> &'static str {
        match self {
            FaultError::Segfault(Segfault::NoVma) => "segfault: address outside every VMA",
            FaultError::Segfault(Segfault::Protection) => "segfault: access against the protection",
            FaultError::Segfault(Segfault::ReservedBit) => "segfault: reserved bit in a page-table entry",
            FaultError::OutOfMemory => "out of memory",
        }
    }
}

const SEGV_PROT: FaultError = FaultError::Segfault(Segfault::Protection);

impl AddressSpace {
    /// Handle a page fault at `addr` with the CPU's error `code`. See the
    /// module documentation for the rules.
    pub fn handle_fault<M: PhysMem, A: FrameSource, P: MmuPlatform>(
        &mut self,
        cx: &mut MmCtx<'_, M, A, P>,
        addr: Gva,
        code: PfErrorCode,
    ) -> Result<FaultFix, FaultError> {
        if code.has(PfErrorCode::RSVD) {
            return Err(FaultError::Segfault(Segfault::ReservedBit));
        }
        let vma = self.vmas().find(addr).ok_or(FaultError::Segfault(Segfault::NoVma))?;
        let write = code.has(PfErrorCode::WRITE);
        let fetch = code.has(PfErrorCode::FETCH);
        let need = if write {
            Prot::WRITE
        } else if fetch {
            Prot::EXEC
        } else {
            Prot::READ
        };
        if !vma.prot.contains(need) {
            return Err(SEGV_PROT);
        }
        let page = addr.align_down(crate::PAGE_SIZE);
        let Some(leaf) = self.page_table().leaf(cx.mem, addr) else {
            return self.demand_zero(cx, addr, vma, write);
        };
        let flags = leaf.flags();
        let allowed =
            (!write || flags.contains(PteFlags::WRITABLE)) && (!fetch || !flags.contains(PteFlags::NO_EXECUTE));
        if allowed {
            cx.mmu.invlpg(leaf.va);
            return Ok(FaultFix::Spurious(leaf.va));
        }
        if !write || !flags.contains(PteFlags::ANON) || leaf.size == PageSizeKind::Size1GiB {
            return Err(SEGV_PROT);
        }
        // A write to a read-only anonymous page in a writable VMA: COW.
        let new_flags =
            flags.difference(PteFlags::COW).union(PteFlags::WRITABLE | PteFlags::ACCESSED | PteFlags::DIRTY);
        if leaf.size == PageSizeKind::Size2MiB {
            let head = Pfn::containing(leaf.entry.addr());
            if (0..512).all(|i| cx.refs.get(head.add(i)) <= 1) {
                let (_, flush) =
                    self.page_table_mut().update_leaf(cx.mem, leaf.va, |_| new_flags).map_err(|_| SEGV_PROT)?;
                flush.flush(cx.mmu);
                return Ok(FaultFix::CowReused(leaf.va));
            }
            match self.page_table_mut().split_large_leaf(cx.mem, &mut cx.frames, leaf.va) {
                Ok(Some(flush)) => flush.flush(cx.mmu),
                Ok(None) => return Err(SEGV_PROT),
                Err(_) => return Err(FaultError::OutOfMemory),
            }
        }
        let old = Pfn::containing(self.page_table().translate(cx.mem, page).ok_or(SEGV_PROT)?.frame);
        if cx.refs.get(old) <= 1 {
            let (_, flush) = self.page_table_mut().update_leaf(cx.mem, page, |_| new_flags).map_err(|_| SEGV_PROT)?;
            flush.flush(cx.mmu);
            return Ok(FaultFix::CowReused(page));
        }
        let new = cx.frames.alloc_frame().ok_or(FaultError::OutOfMemory)?;
        if cx.refs.inc(new).is_err() {
            cx.frames.free_frame(new);
            return Err(FaultError::OutOfMemory);
        }
        cx.mem.copy_frame(new, old);
        let (_, flush) =
            self.page_table_mut().remap_leaf(cx.mem, page, new.addr(), new_flags).map_err(|_| SEGV_PROT)?;
        flush.flush(cx.mmu);
        let _ = cx.refs.dec(old);
        Ok(FaultFix::CowCopied(page))
    }

    /// A not-present page at `addr` in `vma`: map a zeroed folio (module
    /// documentation), trying the configured size, then the smaller ones.
    fn demand_zero<M: PhysMem, A: FrameSource, P: MmuPlatform>(
        &mut self,
        cx: &mut MmCtx<'_, M, A, P>,
        addr: Gva,
        vma: Vma,
        write: bool,
    ) -> Result<FaultFix, FaultError> {
        let mut flags = PteFlags::USER | PteFlags::ANON | PteFlags::ACCESSED;
        flags.set(PteFlags::WRITABLE, vma.prot.contains(Prot::WRITE));
        flags.set(PteFlags::NO_EXECUTE, !vma.prot.contains(Prot::EXEC));
        flags.set(PteFlags::DIRTY, write);
        for size in self.anon_folio().fallbacks() {
            let start = addr.align_down(size.bytes());
            let end = Gva(start.0 + size.bytes());
            if size != FolioSize::K4
                && (start < vma.start || end > vma.end || self.page_table().next_leaf(cx.mem, start, end).is_some())
            {
                continue;
            }
            let Some(frame) = cx.frames.alloc_folio(size.order()) else { continue };
            if cx.refs.inc_range(frame, size.pages()).is_err() {
                (0..size.pages()).for_each(|i| cx.frames.free_frame(frame.add(i)));
                return Err(FaultError::OutOfMemory);
            }
            (0..size.pages()).for_each(|i| cx.mem.zero_frame(frame.add(i)));
            if let Err(e) = self.map_folio(cx, start, frame, size, flags) {
                for i in 0..size.pages() {
                    let _ = cx.refs.dec(frame.add(i));
                    cx.frames.free_frame(frame.add(i));
                }
                // A smaller folio may still fit (a table page in the way of
                // a PMD leaf, say); a 4 KiB page is the last resort.
                if size == FolioSize::K4 {
                    return Err(e);
                }
                continue;
            }
            self.rss += size.pages();
            return Ok(match size {
                FolioSize::K4 => FaultFix::DemandZero(start),
                _ => FaultFix::DemandFolio(start, size),
            });
        }
        Err(FaultError::OutOfMemory)
    }

    /// Map the folio of `size` at `frame` from `start` (which holds no
    /// mapping): one PMD leaf for 2 MiB, else one PTE per page. On an error
    /// nothing stays mapped.
    fn map_folio<M: PhysMem, A: FrameSource, P: MmuPlatform>(
        &mut self,
        cx: &mut MmCtx<'_, M, A, P>,
        start: Gva,
        frame: Pfn,
        size: FolioSize,
        flags: PteFlags,
    ) -> Result<(), FaultError> {
        let pt = self.page_table_mut();
        if size == FolioSize::M2 {
            let p = Page::<Size2MiB>::from_start_address(start).map_err(|_| SEGV_PROT)?;
            let f = PhysFrame::<Size2MiB>::from_start_address(frame.addr()).map_err(|_| SEGV_PROT)?;
            return pt.map(cx.mem, &mut cx.frames, p, f, flags).map_err(|_| FaultError::OutOfMemory);
        }
        let p = Page::<Size4KiB>::from_start_address(start).map_err(|_| SEGV_PROT)?;
        let f = PhysFrame::from_pfn(frame);
        if pt.map_range(cx.mem, &mut cx.frames, p, f, size.pages(), flags).is_ok() {
            return Ok(());
        }
        // The range was empty, so the failure is the first page's missing
        // table; unmap whatever went in all the same.
        for i in 0..size.pages() {
            if let Ok(page) = Page::<Size4KiB>::from_start_address(Gva(start.0 + i * crate::PAGE_SIZE))
                && let Ok((_, _, flush)) = pt.unmap(cx.mem, &mut cx.frames, page)
            {
                flush.ignore();
            }
        }
        Err(FaultError::OutOfMemory)
    }
}
