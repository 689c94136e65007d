//! Shared host-test fixtures: a buddy allocator over an arena with a
//! page-table zone, and a recording fake of the MMU platform.

use std::cell::RefCell;
use std::vec::Vec;

use guest_abi::Gva;

use std::boxed::Box;
use std::sync::atomic::AtomicU64;

use crate::buddy::{
    BuddyAllocator, DMA_LIMIT, FrameMeta, PcpFlag, PcpLists, PerCpuBuddy, ZoneId, pcp_flag_bytes, section_bytes,
};
use crate::paging::MmuPlatform;
use crate::phys::{ArenaMem, FRAME_WORDS, FrameRange, Pfn, SharedArenaMem};
use crate::sync::SpinLock;

/// First frame of the fixture (the start of the NORMAL zone).
pub const BASE: Pfn = DMA_LIMIT;
/// Frames of the page-table zone, at the start of the span.
pub const PGTABLE_FRAMES: u64 = 512;
/// Frames of ordinary memory, after the page-table zone.
pub const NORMAL_FRAMES: u64 = 1024;

/// Run `f` with an arena and a buddy allocator managing all of it
/// (`pgtable_frames` frames of page-table zone, then `normal_frames`).
pub fn with_mm_sized<R>(
    pgtable_frames: u64,
    normal_frames: u64,
    f: impl FnOnce(&ArenaMem<'_>, &mut BuddyAllocator<'_, &ArenaMem<'_>>) -> R,
) -> R {
    let frames = pgtable_frames + normal_frames;
    let mut backing = vec![0u64; frames as usize * FRAME_WORDS];
    let mut meta = vec![FrameMeta::default(); frames as usize];
    let mem = ArenaMem::new(BASE.addr(), &mut backing);
    let pgtables = FrameRange::new(BASE, BASE.add(pgtable_frames));
    let mut buddy = BuddyAllocator::new(&mem, &mut meta, BASE, pgtables).unwrap();
    buddy.set_verify_pgtables(true);
    buddy.add_free_range(FrameRange::new(BASE, BASE.add(frames))).unwrap();
    f(&mem, &mut buddy)
}

/// [`with_mm_sized`] with the default sizes.
pub fn with_mm<R>(f: impl FnOnce(&ArenaMem<'_>, &mut BuddyAllocator<'_, &ArenaMem<'_>>) -> R) -> R {
    with_mm_sized(PGTABLE_FRAMES, NORMAL_FRAMES, f)
}

/// Backing memory, metadata and the per-CPU flag table for one
/// [`PerCpuBuddy`] over a thread-shareable arena.
pub struct SmpFixture {
    base: Pfn,
    backing: Vec<AtomicU64>,
    meta: Vec<FrameMeta>,
    sections: Vec<u8>,
    flags: Vec<PcpFlag>,
    pcp: Box<PcpLists<SpinLock>>,
}

pub type SmpBuddy<'a> = PerCpuBuddy<'a, SharedArenaMem<'a>, SpinLock>;

impl SmpFixture {
    pub fn new(base: Pfn, frames: usize) -> Self {
        Self {
            base,
            backing: (0..frames * FRAME_WORDS).map(|_| AtomicU64::new(0)).collect(),
            meta: vec![FrameMeta::default(); frames],
            sections: vec![0; section_bytes(frames as u64) as usize],
            flags: (0..pcp_flag_bytes(frames as u64)).map(|_| PcpFlag::default()).collect(),
            pcp: Box::default(),
        }
    }

    /// Per-CPU lists for `cpus` CPUs over an allocator (deferred or not)
    /// with page-table zone `pgtables` and `ranges` added.
    pub fn buddy(&mut self, pgtables: FrameRange, ranges: &[FrameRange], cpus: usize, deferred: bool) -> SmpBuddy<'_> {
        let mem = SharedArenaMem::new(self.base.addr(), &self.backing);
        let mut a = if deferred {
            BuddyAllocator::new_deferred(mem, &mut self.meta, &mut self.sections, self.base, pgtables).unwrap()
        } else {
            BuddyAllocator::new(mem, &mut self.meta, self.base, pgtables).unwrap()
        };
        a.set_verify_pgtables(true);
        for &r in ranges {
            a.add_free_range(r).unwrap();
        }
        PerCpuBuddy::new(a, &self.pcp, cpus, &self.flags).unwrap()
    }

    /// An eager [`buddy`](Self::buddy) over the caller's per-CPU lists
    /// (a `static`, as in the kernel).
    pub fn buddy_with<'a>(
        &'a mut self,
        pcp: &'a PcpLists<SpinLock>,
        pgtables: FrameRange,
        ranges: &[FrameRange],
        cpus: usize,
    ) -> SmpBuddy<'a> {
        let mem = SharedArenaMem::new(self.base.addr(), &self.backing);
        let mut a = BuddyAllocator::new(mem, &mut self.meta, self.base, pgtables).unwrap();
        a.set_verify_pgtables(true);
        for &r in ranges {
            a.add_free_range(r).unwrap();
        }
        PerCpuBuddy::new(a, pcp, cpus, &self.flags).unwrap()
    }
}

/// Page-table pages in use (allocated and not freed).
pub fn tables_in_use<M: crate::phys::PhysMem>(buddy: &BuddyAllocator<'_, M>) -> u64 {
    let s = buddy.stats(ZoneId::PageTables);
    s.managed_pages - s.free_pages - s.hot_pages
}

/// Ordinary frames in use.
pub fn frames_in_use<M: crate::phys::PhysMem>(buddy: &BuddyAllocator<'_, M>) -> u64 {
    let s = buddy.stats(ZoneId::Normal);
    s.managed_pages - s.free_pages - s.hot_pages
}

/// One call the memory manager made to the platform.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MmuEvent {
    /// `load_cr3(root)`.
    LoadCr3(Pfn),
    /// `invlpg(va)`.
    Invlpg(Gva),
    /// `flush_all()`.
    FlushAll,
}

/// A platform that records every call.
#[derive(Default, Debug)]
pub struct RecordingMmu {
    pub events: RefCell<Vec<MmuEvent>>,
    /// Lazy-MMU brackets opened so far (`enter_lazy` calls).
    pub brackets: core::cell::Cell<u32>,
    /// Open brackets now (`enter_lazy` minus `leave_lazy`).
    pub lazy_depth: core::cell::Cell<i32>,
}

impl RecordingMmu {
    /// The events so far, emptying the record.
    pub fn take(&self) -> Vec<MmuEvent> {
        std::mem::take(&mut *self.events.borrow_mut())
    }
}

impl MmuPlatform for RecordingMmu {
    fn load_cr3(&self, root: Pfn) {
        self.events.borrow_mut().push(MmuEvent::LoadCr3(root));
    }
    fn invlpg(&self, va: Gva) {
        self.events.borrow_mut().push(MmuEvent::Invlpg(va));
    }
    fn flush_all(&self) {
        self.events.borrow_mut().push(MmuEvent::FlushAll);
    }
    fn enter_lazy(&self) {
        self.brackets.set(self.brackets.get() + 1);
        self.lazy_depth.set(self.lazy_depth.get() + 1);
    }
    fn leave_lazy(&self) {
        self.lazy_depth.set(self.lazy_depth.get() - 1);
    }
}

/// One cached translation of the [`TlbMmu`] model.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TlbEntry {
    /// Physical address of the page.
    pub frame: u64,
    /// Whether writes are allowed through this entry.
    pub writable: bool,
    /// Whether the CPU has already set D for this entry.
    pub dirty: bool,
    /// The page the translation came from (its leaf's first address and
    /// size): an `invlpg` anywhere in it drops the entry, as the SDM says
    /// of large pages (vol. 3A §4.10.4.1).
    pub leaf: (u64, u64),
}

/// A platform whose TLB is modelled: translations are cached on first use
/// and survive until `invlpg`, `flush_all` or a CR3 load. An access through
/// a stale entry goes to the old frame, so a forgotten flush shows up as
/// wrong data.
#[derive(Default, Debug)]
pub struct TlbMmu {
    pub tlb: RefCell<std::collections::BTreeMap<u64, TlbEntry>>,
    pub cr3: std::cell::Cell<Option<Pfn>>,
    pub invlpgs: std::cell::Cell<u64>,
    pub flushes: std::cell::Cell<u64>,
}

impl MmuPlatform for TlbMmu {
    fn load_cr3(&self, root: Pfn) {
        self.cr3.set(Some(root));
        self.tlb.borrow_mut().clear();
    }
    fn invlpg(&self, va: Gva) {
        self.invlpgs.set(self.invlpgs.get() + 1);
        let va = va.0 & !0xfff;
        self.tlb.borrow_mut().retain(|&page, t| page != va && !(t.leaf.0 <= va && va < t.leaf.0 + t.leaf.1));
    }
    fn flush_all(&self) {
        self.flushes.set(self.flushes.get() + 1);
        self.tlb.borrow_mut().clear();
    }
}

/// The CPU side of a user access to the word at `va` of the current
/// address space (`write`: the value to store), with the TLB model:
/// translations come from the TLB, else a walk sets A (and D on a write)
/// and fills it; a missing or insufficient translation raises a page fault
/// handled by `aspace.handle_fault` and the access is retried (delivering
/// a #PF drops the TLB entry of the address, SDM vol. 3A §4.10.4.1).
pub fn cpu_access<M, A>(
    aspace: &mut crate::aspace::AddressSpace,
    cx: &mut crate::aspace::MmCtx<'_, M, A, TlbMmu>,
    va: u64,
    write: Option<u64>,
) -> Result<u64, crate::fault::FaultError>
where
    M: crate::phys::PhysMem,
    A: crate::paging::FrameSource,
{
    use crate::fault::PfErrorCode;
    use crate::paging::PteFlags;
    use guest_abi::Gpa;
    assert_eq!(cx.mmu.cr3.get(), Some(aspace.root()), "access to an address space that is not loaded");
    let page = va & !0xfff;
    let word = va & 0xff8;
    let is_write = write.is_some();
    for _ in 0..4 {
        let cached = cx.mmu.tlb.borrow().get(&page).copied();
        let mut code = PfErrorCode::USER | if is_write { PfErrorCode::WRITE } else { 0 };
        if let Some(t) = cached {
            if !is_write || t.writable {
                if is_write && !t.dirty {
                    // First write through a clean entry: the CPU walks again
                    // to set D (SDM vol. 3A §4.8).
                    let leaf = aspace.page_table().leaf(cx.mem, Gva(va)).expect("cached entry of an unmapped page");
                    cx.mem.write_u64(leaf.entry_addr, leaf.entry.0 | PteFlags::DIRTY.bits());
                    cx.mmu.tlb.borrow_mut().get_mut(&page).unwrap().dirty = true;
                }
                let addr = Gpa(t.frame + word);
                return Ok(match write {
                    Some(v) => {
                        cx.mem.write_u64(addr, v);
                        v
                    }
                    None => cx.mem.read_u64(addr),
                });
            }
            cx.mmu.tlb.borrow_mut().remove(&page);
            code |= PfErrorCode::PRESENT;
        } else {
            match aspace.page_table().leaf(cx.mem, Gva(va)) {
                Some(l) if !is_write || l.flags().contains(PteFlags::WRITABLE) => {
                    let mut e = l.entry.0 | PteFlags::ACCESSED.bits();
                    if is_write {
                        e |= PteFlags::DIRTY.bits();
                    }
                    if e != l.entry.0 {
                        cx.mem.write_u64(l.entry_addr, e);
                    }
                    let flags = PteFlags::from_bits_truncate(e);
                    let frame = l.entry.addr().0 + (page - l.va.0);
                    let t = TlbEntry {
                        frame,
                        writable: flags.contains(PteFlags::WRITABLE),
                        dirty: flags.contains(PteFlags::DIRTY),
                        leaf: (l.va.0, l.size.bytes()),
                    };
                    cx.mmu.tlb.borrow_mut().insert(page, t);
                    continue;
                }
                Some(_) => code |= PfErrorCode::PRESENT,
                None => {}
            }
        }
        aspace.handle_fault(cx, Gva(va), PfErrorCode(code))?;
    }
    panic!("access not completed after four faults");
}
