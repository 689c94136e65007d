//! Host tests of address spaces, demand paging and copy-on-write: unit
//! tests, then a property test of fork/COW/fault handling against a model
//! of each address space's memory contents, run through a CPU model with a
//! TLB (so a forgotten flush is caught as wrong data).

use std::collections::BTreeMap;
use std::vec::Vec;

use guest_abi::Gpa;
use proptest::prelude::*;

use super::*;
use crate::buddy::BuddyAllocator;
use crate::fault::{FaultError, FaultFix, PfErrorCode, Segfault};
use crate::folio::FolioSize;
use crate::paging::{Page, PhysFrame, Size1GiB};
use crate::phys::ArenaMem;
use crate::testutil::{
    BASE, MmuEvent, PGTABLE_FRAMES, RecordingMmu, TlbMmu, cpu_access, frames_in_use, tables_in_use, with_mm,
    with_mm_sized,
};

const KERNEL_VA: u64 = 0xffff_8000_0000_0000;

/// A kernel template with one 1 GiB page at [`KERNEL_VA`].
fn kernel(mem: &ArenaMem<'_>, buddy: &mut BuddyAllocator<'_, &ArenaMem<'_>>) -> PageTable {
    let mut k = PageTable::new_pinned_upper(buddy).unwrap();
    let p = Page::<Size1GiB>::from_start_address(Gva(KERNEL_VA)).unwrap();
    let f = PhysFrame::<Size1GiB>::from_start_address(Gpa(0)).unwrap();
    k.map(mem, buddy, p, f, PteFlags::WRITABLE | PteFlags::GLOBAL).unwrap();
    k
}

fn counts(buddy: &BuddyAllocator<'_, &ArenaMem<'_>>) -> Vec<u16> {
    vec![0; buddy.span().len() as usize]
}

const W: PfErrorCode = PfErrorCode(PfErrorCode::USER | PfErrorCode::WRITE);
const R: PfErrorCode = PfErrorCode(PfErrorCode::USER);

#[test]
fn a_new_address_space_shares_the_kernel_half_and_nothing_else() {
    with_mm(|mem, buddy| {
        let k = kernel(mem, buddy);
        let mut c = counts(buddy);
        let mmu = RecordingMmu::default();
        let mut cx = MmCtx { mem, frames: &mut *buddy, refs: FrameRefs::new(BASE, &mut c), mmu: &mmu };
        let a = AddressSpace::new(&mut cx, &k).unwrap();
        assert_ne!(a.root(), k.root());
        let t = a.page_table().translate(mem, Gva(KERNEL_VA + 0x1234)).unwrap();
        assert_eq!(t.addr, Gpa(0x1234));
        assert_eq!(a.page_table().next_leaf(mem, Gva(0), USER_END), None);
        a.switch_to(&mmu);
        assert_eq!(mmu.take(), [MmuEvent::LoadCr3(a.root())]);
        a.destroy(&mut cx);
        assert_eq!(tables_in_use(buddy), 2, "the kernel's root and PDPT survive");
        assert!(k.translate(mem, Gva(KERNEL_VA)).is_some());
    })
}

#[test]
fn demand_paging_maps_zeroed_frames_with_a_set_and_d_only_on_writes() {
    with_mm(|mem, buddy| {
        let k = kernel(mem, buddy);
        let mut c = counts(buddy);
        let mmu = RecordingMmu::default();
        let mut cx = MmCtx { mem, frames: &mut *buddy, refs: FrameRefs::new(BASE, &mut c), mmu: &mmu };
        let mut a = AddressSpace::new(&mut cx, &k).unwrap();
        a.add_vma(Gva(0x10_0000), Gva(0x10_4000), Prot::RW).unwrap();
        a.add_vma(Gva(0x20_0000), Gva(0x20_1000), Prot::READ | Prot::EXEC).unwrap();
        // Leave garbage in the frame the allocator will hand out next.
        let next = cx.frames.alloc_frame().unwrap();
        mem.write_u64(next.addr(), 0xdead);
        cx.frames.free_frame(next);
        assert_eq!(a.handle_fault(&mut cx, Gva(0x10_0008), R), Ok(FaultFix::DemandZero(Gva(0x10_0000))));
        let t = a.page_table().translate(mem, Gva(0x10_0008)).unwrap();
        assert!(mem.frame_is_zero(Pfn::containing(t.frame)));
        let base = PteFlags::PRESENT | PteFlags::USER | PteFlags::ANON | PteFlags::ACCESSED;
        assert_eq!(t.flags, base | PteFlags::WRITABLE | PteFlags::NO_EXECUTE);
        assert_eq!(a.handle_fault(&mut cx, Gva(0x10_1000), W), Ok(FaultFix::DemandZero(Gva(0x10_1000))));
        let t = a.page_table().translate(mem, Gva(0x10_1000)).unwrap();
        assert_eq!(t.flags, base | PteFlags::WRITABLE | PteFlags::NO_EXECUTE | PteFlags::DIRTY);
        let fetch = PfErrorCode(PfErrorCode::USER | PfErrorCode::FETCH);
        assert_eq!(a.handle_fault(&mut cx, Gva(0x20_0000), fetch), Ok(FaultFix::DemandZero(Gva(0x20_0000))));
        assert_eq!(a.page_table().translate(mem, Gva(0x20_0000)).unwrap().flags, base);
        assert_eq!(cx.refs.get(Pfn::containing(t.frame)), 1);
        assert!(mmu.take().is_empty(), "making a page present needs no flush");
        a.destroy(&mut cx);
        assert!(cx.refs.all_zero());
        assert_eq!(frames_in_use(buddy), 0);
    })
}

#[test]
fn faults_outside_a_vma_or_against_its_protection_are_segfaults() {
    with_mm(|mem, buddy| {
        let k = kernel(mem, buddy);
        let mut c = counts(buddy);
        let mmu = RecordingMmu::default();
        let mut cx = MmCtx { mem, frames: &mut *buddy, refs: FrameRefs::new(BASE, &mut c), mmu: &mmu };
        let mut a = AddressSpace::new(&mut cx, &k).unwrap();
        a.add_vma(Gva(0x10_0000), Gva(0x10_1000), Prot::READ).unwrap();
        let segv = |s| Err(FaultError::Segfault(s));
        assert_eq!(a.handle_fault(&mut cx, Gva(0x10_1000), R), segv(Segfault::NoVma));
        assert_eq!(a.handle_fault(&mut cx, Gva(KERNEL_VA), R), segv(Segfault::NoVma));
        assert_eq!(a.handle_fault(&mut cx, Gva(0x10_0000), W), segv(Segfault::Protection));
        let fetch = PfErrorCode(PfErrorCode::USER | PfErrorCode::FETCH);
        assert_eq!(a.handle_fault(&mut cx, Gva(0x10_0000), fetch), segv(Segfault::Protection));
        let rsvd = PfErrorCode(PfErrorCode::PRESENT | PfErrorCode::RSVD);
        assert_eq!(a.handle_fault(&mut cx, Gva(0x10_0000), rsvd), segv(Segfault::ReservedBit));
        assert_eq!(frames_in_use(cx.frames), 0, "no frame was taken for a segfault");
        assert_eq!(FaultError::OutOfMemory.as_str(), "out of memory");
        // A fault on a page that already allows the access is spurious.
        a.handle_fault(&mut cx, Gva(0x10_0000), R).unwrap();
        mmu.take();
        assert_eq!(a.handle_fault(&mut cx, Gva(0x10_0010), R), Ok(FaultFix::Spurious(Gva(0x10_0000))));
        assert_eq!(mmu.take(), [MmuEvent::Invlpg(Gva(0x10_0000))]);
        a.destroy(&mut cx);
    })
}

#[test]
fn fork_shares_frames_copy_on_write_and_a_write_copies_then_reuses() {
    with_mm(|mem, buddy| {
        let k = kernel(mem, buddy);
        let mut c = counts(buddy);
        let mmu = RecordingMmu::default();
        let mut cx = MmCtx { mem, frames: &mut *buddy, refs: FrameRefs::new(BASE, &mut c), mmu: &mmu };
        let mut parent = AddressSpace::new(&mut cx, &k).unwrap();
        parent.add_vma(Gva(0x10_0000), Gva(0x10_2000), Prot::RW).unwrap();
        parent.handle_fault(&mut cx, Gva(0x10_0000), W).unwrap();
        let shared = parent.page_table().translate(mem, Gva(0x10_0000)).unwrap().frame;
        mem.write_u64(shared, 41);
        let (mut child, flush) = parent.fork(&mut cx).unwrap();
        flush.flush(&mmu);
        assert_eq!(mmu.take(), [MmuEvent::FlushAll]);
        assert_eq!(child.vmas(), parent.vmas());
        for a in [&parent, &child] {
            let t = a.page_table().translate(mem, Gva(0x10_0000)).unwrap();
            assert_eq!(t.frame, shared);
            assert!(t.flags.contains(PteFlags::COW) && !t.flags.contains(PteFlags::WRITABLE));
            assert!(t.flags.contains(PteFlags::DIRTY), "D is copied with the entry");
        }
        assert_eq!(cx.refs.get(Pfn::containing(shared)), 2);
        // The child writes: it gets its own copy; the parent keeps 41.
        let fix = child.handle_fault(&mut cx, Gva(0x10_0000), PfErrorCode(W.0 | PfErrorCode::PRESENT));
        assert_eq!(fix, Ok(FaultFix::CowCopied(Gva(0x10_0000))));
        assert_eq!(mmu.take(), [MmuEvent::Invlpg(Gva(0x10_0000))]);
        let copy = child.page_table().translate(mem, Gva(0x10_0000)).unwrap();
        assert_ne!(copy.frame, shared);
        assert_eq!(mem.read_u64(copy.frame), 41);
        assert!(copy.flags.contains(PteFlags::WRITABLE | PteFlags::DIRTY) && !copy.flags.contains(PteFlags::COW));
        assert_eq!(cx.refs.get(Pfn::containing(shared)), 1);
        // The parent writes: it is the last user, so the page is reused.
        let fix = parent.handle_fault(&mut cx, Gva(0x10_0000), PfErrorCode(W.0 | PfErrorCode::PRESENT));
        assert_eq!(fix, Ok(FaultFix::CowReused(Gva(0x10_0000))));
        assert_eq!(parent.page_table().translate(mem, Gva(0x10_0000)).unwrap().frame, shared);
        child.destroy(&mut cx);
        parent.destroy(&mut cx);
        assert!(cx.refs.all_zero());
        assert_eq!(frames_in_use(buddy), 0);
        assert_eq!(tables_in_use(buddy), 2);
    })
}

#[test]
fn a_fork_that_runs_out_of_table_pages_leaks_nothing() {
    // 2 kernel tables + 4 for the parent's page + 1 child root + 1 spare:
    // the child cannot get its PD.
    with_mm_sized(8, 64, |mem, buddy| {
        let k = kernel(mem, buddy);
        let mut c = counts(buddy);
        let mmu = RecordingMmu::default();
        let mut cx = MmCtx { mem, frames: &mut *buddy, refs: FrameRefs::new(BASE, &mut c), mmu: &mmu };
        let mut parent = AddressSpace::new(&mut cx, &k).unwrap();
        parent.add_vma(Gva(0x10_0000), Gva(0x10_1000), Prot::RW).unwrap();
        parent.handle_fault(&mut cx, Gva(0x10_0000), W).unwrap();
        let before = tables_in_use(cx.frames);
        let err = parent.fork(&mut cx).unwrap_err();
        assert_eq!(err.error, AspaceError::OutOfTables);
        err.flush.flush(&mmu);
        assert_eq!(tables_in_use(cx.frames), before);
        let t = parent.page_table().translate(mem, Gva(0x10_0000)).unwrap();
        assert_eq!(cx.refs.get(Pfn::containing(t.frame)), 1, "the child's reference was dropped");
        // The parent's page became COW; its next write simply reuses it.
        let fix = parent.handle_fault(&mut cx, Gva(0x10_0000), PfErrorCode(W.0 | PfErrorCode::PRESENT));
        assert_eq!(fix, Ok(FaultFix::CowReused(Gva(0x10_0000))));
        parent.destroy(&mut cx);
        assert_eq!(frames_in_use(cx.frames), 0);
    })
}

#[test]
fn removing_a_vma_unmaps_its_pages_and_frees_their_frames() {
    with_mm(|mem, buddy| {
        let k = kernel(mem, buddy);
        let mut c = counts(buddy);
        let mmu = RecordingMmu::default();
        let mut cx = MmCtx { mem, frames: &mut *buddy, refs: FrameRefs::new(BASE, &mut c), mmu: &mmu };
        let mut a = AddressSpace::new(&mut cx, &k).unwrap();
        a.add_vma(Gva(0x1f_e000), Gva(0x20_2000), Prot::RW).unwrap();
        for va in (0x1f_e000..0x20_2000).step_by(0x1000) {
            a.handle_fault(&mut cx, Gva(va), W).unwrap();
        }
        assert_eq!(frames_in_use(cx.frames), 4);
        let (vma, flush) = a.remove_vma(&mut cx, Gva(0x1f_e000)).unwrap();
        flush.flush(&mmu);
        assert_eq!(vma.end, Gva(0x20_2000));
        assert_eq!(frames_in_use(cx.frames), 0);
        assert_eq!(a.page_table().check_invariants(mem), Ok(2), "own root + the shared kernel PDPT: user tables freed");
        assert_eq!(a.handle_fault(&mut cx, Gva(0x1f_e000), R), Err(FaultError::Segfault(Segfault::NoVma)));
        a.destroy(&mut cx);
    })
}

#[test]
fn frame_refs_refuse_overflow_underflow_and_foreign_frames() {
    let mut c = vec![0u16; 4];
    let mut r = FrameRefs::new(Pfn(10), &mut c);
    assert_eq!(r.dec(Pfn(10)), Err(RefError::Underflow));
    assert_eq!(r.inc(Pfn(9)), Err(RefError::OutOfRange));
    assert_eq!(r.inc(Pfn(14)), Err(RefError::OutOfRange));
    assert_eq!(r.inc(Pfn(13)), Ok(1));
    assert_eq!(r.get(Pfn(13)), 1);
    assert_eq!(r.get(Pfn(99)), 0);
    c[3] = u16::MAX;
    let mut r = FrameRefs { base: Pfn(10), counts: &mut c };
    assert_eq!(r.inc(Pfn(13)), Err(RefError::Overflow));
}

// ---------------------------------------------------------------- model

/// The VMAs every address space of the property test starts with: one
/// read-write area crossing a page-table boundary, one read-only area,
/// and one aligned 2 MiB read-write area (where a THP fits).
const VMAS: [(u64, u64, Prot); 4] = [
    (0x10_0000, 0x10_6000, Prot::RW),
    (0x1f_d000, 0x20_3000, Prot::RW),
    (0x40_0000, 0x40_2000, Prot::READ),
    (0x60_0000, 0x80_0000, Prot::RW),
];

/// Candidate pages: every page of the small VMAs, pages on and around the
/// folio boundaries of the 2 MiB one, and two outside.
fn pages() -> Vec<u64> {
    let mut v: Vec<u64> = VMAS[..3].iter().flat_map(|&(s, e, _)| (s..e).step_by(0x1000)).collect();
    v.extend([0, 1, 3, 4, 15, 16, 17, 255, 256, 511].map(|p| 0x60_0000 + p * 0x1000));
    v.extend([0x30_0000, 0x10_6000]);
    v
}

/// Candidate ranges for unmap, munmap and mprotect: across folio and page
/// table boundaries, inside a THP, whole areas, and one across two areas.
const RANGES: [(u64, u64); 9] = [
    (0x10_1000, 0x10_3000),
    (0x10_0000, 0x10_6000),
    (0x1f_f000, 0x20_1000),
    (0x60_3000, 0x60_5000),
    (0x60_0000, 0x60_1000),
    (0x61_0000, 0x62_0000),
    (0x60_f000, 0x61_1000),
    (0x70_0000, 0x80_0000),
    (0x10_5000, 0x1f_e000),
];

/// Rights an mprotect may give (not `PROT_NONE`: a mapped page stays
/// readable here, where Linux would make it not present).
const PROTS: [Prot; 3] = [Prot::READ, Prot::RW, Prot::READ.union(Prot::EXEC)];

/// Most address spaces at once (a fork beyond is skipped).
const MAX_SPACES: usize = 6;

#[derive(Clone, Debug)]
enum Op {
    Read(usize, usize, u64),
    Write(usize, usize, u64, u64),
    Fork(usize),
    Destroy(usize),
    /// `unmap_range` (the VMAs stay).
    Zap(usize, usize),
    Munmap(usize, usize),
    Mprotect(usize, usize, usize),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let n = pages().len();
    let r = RANGES.len();
    prop_oneof![
        5 => (any::<usize>(), 0..n, 0u64..4).prop_map(|(a, p, w)| Op::Read(a, p, w)),
        6 => (any::<usize>(), 0..n, 0u64..4, 1u64..1000).prop_map(|(a, p, w, v)| Op::Write(a, p, w, v)),
        2 => any::<usize>().prop_map(Op::Fork),
        1 => any::<usize>().prop_map(Op::Destroy),
        1 => (any::<usize>(), 0..r).prop_map(|(a, i)| Op::Zap(a, i)),
        1 => (any::<usize>(), 0..r).prop_map(|(a, i)| Op::Munmap(a, i)),
        1 => (any::<usize>(), 0..r, 0..PROTS.len()).prop_map(|(a, i, p)| Op::Mprotect(a, i, p)),
    ]
}

/// One address space as the model sees it: its words (absent = zero) and
/// its areas.
#[derive(Clone, Debug)]
struct Model {
    words: BTreeMap<u64, u64>,
    vmas: Vec<(u64, u64, Prot)>,
}

impl Model {
    fn new() -> Self {
        Self { words: BTreeMap::new(), vmas: VMAS.to_vec() }
    }

    /// Expected outcome of an access.
    fn access(&mut self, va: u64, write: Option<u64>) -> Result<u64, FaultError> {
        let Some(&(_, _, prot)) = self.vmas.iter().find(|&&(s, e, _)| s <= va && va < e) else {
            return Err(FaultError::Segfault(Segfault::NoVma));
        };
        match write {
            Some(_) if !prot.contains(Prot::WRITE) => Err(FaultError::Segfault(Segfault::Protection)),
            Some(v) => {
                self.words.insert(va, v);
                Ok(v)
            }
            None => Ok(self.words.get(&va).copied().unwrap_or(0)),
        }
    }

    fn zap(&mut self, (s, e): (u64, u64)) {
        self.words.retain(|&va, _| va < s || va >= e);
    }

    /// munmap (`prot` none) or mprotect: the expected result, applied.
    fn carve(&mut self, (s, e): (u64, u64), prot: Option<Prot>) -> Result<(), VmaError> {
        let Some(i) = self.vmas.iter().position(|&(vs, ve, _)| vs <= s && e <= ve) else {
            return Err(VmaError::NotMapped);
        };
        let (vs, ve, vp) = self.vmas[i];
        let parts = [(vs < s).then_some((vs, s, vp)), prot.map(|p| (s, e, p)), (e < ve).then_some((e, ve, vp))];
        if self.vmas.len() - 1 + parts.iter().flatten().count() > crate::vma::MAX_VMAS {
            return Err(VmaError::Full);
        }
        self.vmas.remove(i);
        self.vmas.extend(parts.into_iter().flatten());
        self.vmas.sort_by_key(|v| v.0);
        if prot.is_none() {
            self.zap((s, e));
        }
        Ok(())
    }
}

/// Check the reference counts against the leaves of every address space,
/// the table and frame accounting, each address space's tables and areas,
/// and that no 2 MiB leaf straddles an area's edge.
fn check_accounting<M: PhysMem, A: FrameSource>(
    spaces: &[(AddressSpace, Model)],
    cx: &MmCtx<'_, M, A, TlbMmu>,
    buddy_frames: u64,
    buddy_tables: u64,
    kernel_tables: usize,
) {
    let mut refs: BTreeMap<u64, u16> = BTreeMap::new();
    let mut own_tables = 0;
    for (a, model) in spaces {
        let n = a.page_table().check_invariants(cx.mem).unwrap();
        own_tables += n - (kernel_tables - 1);
        let vmas: Vec<_> = a.vmas().as_slice().iter().map(|v| (v.start.0, v.end.0, v.prot)).collect();
        assert_eq!(vmas, model.vmas, "the areas");
        let mut at = Gva(0);
        let mut rss = 0;
        while let Some(l) = a.page_table().next_leaf(cx.mem, at, USER_END) {
            assert!(l.flags().contains(PteFlags::ANON));
            rss += l.size.bytes() / 0x1000;
            assert!(!l.flags().contains(PteFlags::WRITABLE | PteFlags::COW), "a COW page is never writable");
            let end = l.va.0 + l.size.bytes();
            let inside = model.vmas.iter().find(|&&(s, e, _)| s <= l.va.0 && end <= e);
            let &(_, _, prot) = inside.unwrap_or_else(|| panic!("leaf {:#x} not inside one area", l.va.0));
            assert!(prot.contains(Prot::WRITE) || !l.flags().contains(PteFlags::WRITABLE), "writable leaf, RO area");
            for i in 0..l.size.bytes() / 0x1000 {
                let pfn = (l.entry.addr().0 >> 12) + i;
                *refs.entry(pfn).or_default() += 1;
                if l.flags().contains(PteFlags::WRITABLE) {
                    assert_eq!(cx.refs.get(Pfn(pfn)), 1, "a writable leaf's frame {pfn:#x} is not shared");
                }
            }
            at = Gva(end);
        }
        assert_eq!(a.rss(), rss, "resident pages");
    }
    for (&pfn, &n) in &refs {
        assert_eq!(cx.refs.get(Pfn(pfn)), n, "reference count of frame {pfn:#x}");
    }
    assert_eq!(buddy_frames, refs.len() as u64, "every in-use frame is mapped somewhere");
    assert_eq!(buddy_tables, (kernel_tables + own_tables) as u64, "every table page is reachable");
}

/// How many leaves of each size the run saw after a fault (to show that
/// the folio size was used).
#[derive(Default, Debug)]
struct Seen {
    folios: u64,
    huge: u64,
}

fn run_model(anon: FolioSize, ops: &[Op]) -> Seen {
    let mut seen = Seen::default();
    with_mm_sized(PGTABLE_FRAMES, 4096, |mem, buddy| {
        let k = kernel(mem, buddy);
        let kernel_tables = k.check_invariants(mem).unwrap();
        let mut c = counts(buddy);
        let mmu = TlbMmu::default();
        let frames_of = |b: &BuddyAllocator<'_, &ArenaMem<'_>>| (frames_in_use(b), tables_in_use(b));
        let mut cx = MmCtx { mem, frames: &mut *buddy, refs: FrameRefs::new(BASE, &mut c), mmu: &mmu };
        let mut first = AddressSpace::new(&mut cx, &k).unwrap();
        first.set_anon_folio(anon);
        for &(s, e, p) in &VMAS {
            first.add_vma(Gva(s), Gva(e), p).unwrap();
        }
        let mut spaces = vec![(first, Model::new())];
        let mut current: Option<usize> = None;
        let pages = pages();
        for op in ops {
            let i = match *op {
                Op::Read(a, ..)
                | Op::Write(a, ..)
                | Op::Fork(a)
                | Op::Destroy(a)
                | Op::Zap(a, _)
                | Op::Munmap(a, _)
                | Op::Mprotect(a, ..) => a % spaces.len(),
            };
            let flush = |f: MapperFlushAll, current: Option<usize>| {
                if current == Some(i) { f.flush(&mmu) } else { f.ignore() }
            };
            match *op {
                Op::Read(_, p, w) | Op::Write(_, p, w, _) => {
                    if current != Some(i) {
                        spaces[i].0.switch_to(&mmu);
                        current = Some(i);
                    }
                    let va = pages[p] + w * 8;
                    let write = if let Op::Write(.., v) = *op { Some(v) } else { None };
                    let (space, model) = &mut spaces[i];
                    let got = cpu_access(space, &mut cx, va, write);
                    assert_eq!(got, model.access(va, write), "{op:?} in space {i}");
                    if let Some(l) = space.page_table().leaf(mem, Gva(va)) {
                        seen.huge += u64::from(l.size == PageSizeKind::Size2MiB);
                        let folio = Gva(va).align_down(anon.bytes());
                        let t = |va: Gva| space.page_table().translate(mem, va).map(|t| t.addr.0 - va.0);
                        seen.folios += u64::from(
                            anon != FolioSize::K4
                                && t(folio).is_some()
                                && t(folio) == t(Gva(folio.0 + anon.bytes() - 0x1000)),
                        );
                    }
                }
                Op::Fork(_) => {
                    if spaces.len() < MAX_SPACES {
                        let (child, f) = spaces[i].0.fork(&mut cx).unwrap();
                        flush(f, current);
                        assert_eq!(child.anon_folio(), anon, "the child inherits the folio size");
                        let model = spaces[i].1.clone();
                        spaces.push((child, model));
                    }
                }
                Op::Destroy(_) => {
                    if spaces.len() > 1 {
                        if current == Some(i) {
                            mmu.load_cr3(k.root());
                        }
                        current = match current {
                            Some(c) if c == i => None,
                            Some(c) if c > i => Some(c - 1),
                            c => c,
                        };
                        spaces.remove(i).0.destroy(&mut cx);
                    }
                }
                Op::Zap(_, r) => {
                    let (s, e) = RANGES[r];
                    let f = spaces[i].0.unmap_range(&mut cx, Gva(s), Gva(e)).unwrap();
                    flush(f, current);
                    spaces[i].1.zap((s, e));
                }
                Op::Munmap(_, r) => {
                    let (s, e) = RANGES[r];
                    let got = spaces[i].0.munmap(&mut cx, Gva(s), Gva(e));
                    assert_eq!(
                        got.as_ref().map(|_| ()).map_err(|e| *e),
                        spaces[i].1.carve((s, e), None),
                        "{op:?} in space {i}"
                    );
                    if let Ok(f) = got {
                        flush(f, current);
                    }
                }
                Op::Mprotect(_, r, p) => {
                    let (s, e) = RANGES[r];
                    let got = spaces[i].0.mprotect(&mut cx, Gva(s), Gva(e), PROTS[p]);
                    assert_eq!(
                        got.as_ref().map(|_| ()).map_err(|e| *e),
                        spaces[i].1.carve((s, e), Some(PROTS[p])),
                        "{op:?}"
                    );
                    if let Ok(f) = got {
                        flush(f, current);
                    }
                }
            }
            let (f, t) = (frames_in_use(cx.frames), tables_in_use(cx.frames));
            check_accounting(&spaces, &cx, f, t, kernel_tables);
        }
        // Every address space still reads what the model says.
        for (space, model) in &mut spaces {
            space.switch_to(&mmu);
            for (&va, &v) in model.words.iter() {
                assert_eq!(cpu_access(space, &mut cx, va, None), Ok(v));
            }
        }
        mmu.load_cr3(k.root());
        for (a, _) in spaces.drain(..) {
            a.destroy(&mut cx);
        }
        assert!(cx.refs.all_zero());
        assert_eq!(frames_of(cx.frames), (0, kernel_tables as u64), "every frame and user table page is back");
        buddy.check_invariants().unwrap();
    });
    seen
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn fork_cow_unmap_mprotect_and_faults_keep_every_address_space_s_contents(
        anon in prop::sample::select(FolioSize::ALL.to_vec()),
        ops in prop::collection::vec(op_strategy(), 1..120)
    ) {
        run_model(anon, &ops);
    }
}

/// The property test is not vacuous: a fixed run at each size maps folios
/// of that size (and THPs at 2 MiB).
#[test]
fn the_model_run_maps_folios_of_the_configured_size() {
    let ops: Vec<Op> = (0..pages().len()).map(|p| Op::Write(0, p, 0, 7)).collect();
    for anon in FolioSize::ALL {
        let seen = run_model(anon, &ops);
        assert_eq!(seen.folios > 0, anon != FolioSize::K4, "{anon:?}: {seen:?}");
        assert_eq!(seen.huge > 0, anon == FolioSize::M2, "{anon:?}: {seen:?}");
    }
}

#[test]
fn fork_munmap_and_teardown_each_run_in_one_lazy_mmu_bracket() {
    with_mm(|mem, buddy| {
        let k = kernel(mem, buddy);
        let mut c = counts(buddy);
        let mmu = RecordingMmu::default();
        let mut cx = MmCtx { mem, frames: &mut *buddy, refs: FrameRefs::new(BASE, &mut c), mmu: &mmu };
        let mut parent = AddressSpace::new(&mut cx, &k).unwrap();
        parent.add_vma(Gva(0x10_0000), Gva(0x11_0000), Prot::RW).unwrap();
        for i in 0..16 {
            parent.handle_fault(&mut cx, Gva(0x10_0000 + i * 4096), W).unwrap();
        }
        mmu.take();
        let (child, flush) = parent.fork(&mut cx).unwrap();
        flush.ignore();
        assert_eq!((mmu.brackets.get(), mmu.lazy_depth.get()), (1, 0), "fork: one bracket");
        child.destroy(&mut cx);
        // destroy's bracket holds unmap_range's (nested).
        assert_eq!((mmu.brackets.get(), mmu.lazy_depth.get()), (3, 0), "teardown: one outer bracket");
        let (_, flush) = parent.remove_vma(&mut cx, Gva(0x10_0000)).unwrap();
        flush.ignore();
        assert_eq!((mmu.brackets.get(), mmu.lazy_depth.get()), (4, 0), "munmap: one bracket");
        assert!(mmu.take().is_empty(), "no per-page invalidation inside the brackets");
    });
}

// ---------------------------------------------------------------- folios

fn present(a: &AddressSpace, mem: &ArenaMem<'_>, va: u64) -> Option<(u64, PteFlags)> {
    a.page_table().translate(mem, Gva(va)).map(|t| (t.addr.0, t.flags))
}

#[test]
fn folio_faults_map_aligned_folios_of_ptes_and_fall_back_to_what_fits() {
    with_mm(|mem, buddy| {
        let k = kernel(mem, buddy);
        let mut c = counts(buddy);
        let mmu = RecordingMmu::default();
        let mut cx = MmCtx { mem, frames: &mut *buddy, refs: FrameRefs::new(BASE, &mut c), mmu: &mmu };
        let mut a = AddressSpace::new(&mut cx, &k).unwrap();
        assert_eq!(a.anon_folio(), FolioSize::K4, "4 KiB unless configured");
        a.set_anon_folio(FolioSize::K64);
        a.add_vma(Gva(0x10_0000), Gva(0x10_6000), Prot::RW).unwrap();
        a.add_vma(Gva(0x20_0000), Gva(0x30_0000), Prot::RW).unwrap();
        // 64 KiB does not fit the 24 KiB area; 16 KiB does, aligned.
        assert_eq!(
            a.handle_fault(&mut cx, Gva(0x10_1008), W),
            Ok(FaultFix::DemandFolio(Gva(0x10_0000), FolioSize::K16))
        );
        // The rest of the area fits no 16 KiB folio: 4 KiB.
        assert_eq!(a.handle_fault(&mut cx, Gva(0x10_5000), R), Ok(FaultFix::DemandZero(Gva(0x10_5000))));
        assert_eq!(frames_in_use(cx.frames), 5);
        // A 16 KiB range already partly mapped gets no folio either.
        assert_eq!(a.handle_fault(&mut cx, Gva(0x10_4000), R), Ok(FaultFix::DemandZero(Gva(0x10_4000))));
        let fix = a.handle_fault(&mut cx, Gva(0x21_2345), W);
        assert_eq!(fix, Ok(FaultFix::DemandFolio(Gva(0x21_0000), FolioSize::K64)));
        let (first, flags) = present(&a, mem, 0x21_0000).unwrap();
        for i in 0..16 {
            // Consecutive zeroed frames, each with one reference, every
            // page accessed and dirty (the fault was a write).
            let (pa, f) = present(&a, mem, 0x21_0000 + i * 0x1000).unwrap();
            assert_eq!((pa, f), (first + i * 0x1000, flags));
            assert_eq!(cx.refs.get(Pfn(pa >> 12)), 1);
            assert!(mem.frame_is_zero(Pfn(pa >> 12)));
        }
        assert!(flags.contains(PteFlags::ACCESSED | PteFlags::DIRTY | PteFlags::WRITABLE));
        assert!(Pfn(first >> 12).is_aligned(4), "the folio is a naturally aligned block");
        assert_eq!(present(&a, mem, 0x22_0000), None, "nothing beyond the folio");
        assert!(mmu.take().is_empty(), "making pages present needs no flush");
        // Unmapping part of the folio frees exactly those pages and splits
        // the area.
        let before = frames_in_use(cx.frames);
        a.munmap(&mut cx, Gva(0x21_4000), Gva(0x21_8000)).unwrap().flush(&mmu);
        assert_eq!(frames_in_use(cx.frames), before - 4);
        assert_eq!(present(&a, mem, 0x21_3000).map(|p| p.0), Some(first + 0x3000));
        assert_eq!(a.handle_fault(&mut cx, Gva(0x21_5000), R), Err(FaultError::Segfault(Segfault::NoVma)));
        assert_eq!(a.vmas().as_slice().len(), 3);
        // munmap and mprotect need a range inside one area.
        assert_eq!(a.munmap(&mut cx, Gva(0x10_0000), Gva(0x20_1000)).unwrap_err(), VmaError::NotMapped);
        assert_eq!(a.mprotect(&mut cx, Gva(0x10_0000), Gva(0x10_0800), Prot::READ).unwrap_err(), VmaError::Unaligned);
        // Execute follows the new rights at once; write goes, and is not given.
        a.mprotect(&mut cx, Gva(0x21_0000), Gva(0x21_1000), Prot::READ | Prot::EXEC).unwrap().flush(&mmu);
        let (_, f) = present(&a, mem, 0x21_0000).unwrap();
        assert!(!f.intersects(PteFlags::NO_EXECUTE | PteFlags::WRITABLE), "{f:?}");
        a.mprotect(&mut cx, Gva(0x21_0000), Gva(0x21_1000), Prot::RW).unwrap().flush(&mmu);
        let (_, f) = present(&a, mem, 0x21_0000).unwrap();
        assert!(f.contains(PteFlags::NO_EXECUTE) && !f.contains(PteFlags::WRITABLE), "{f:?}");
        let reuse = a.handle_fault(&mut cx, Gva(0x21_0000), PfErrorCode(W.0 | PfErrorCode::PRESENT));
        assert_eq!(reuse, Ok(FaultFix::CowReused(Gva(0x21_0000))), "the first write gets write back");
        a.destroy(&mut cx);
        assert!(cx.refs.all_zero());
        assert_eq!(frames_in_use(cx.frames), 0);
    })
}

#[test]
fn a_folio_falls_back_to_smaller_orders_when_no_block_is_free() {
    // 64 normal frames, every other one taken: no order-2 block is left.
    with_mm_sized(PGTABLE_FRAMES, 64, |mem, buddy| {
        let k = kernel(mem, buddy);
        let mut held = Vec::new();
        while let Some(p) = buddy.alloc_frame() {
            held.push(p);
        }
        let kept: Vec<_> = held.iter().copied().filter(|p| p.0 % 2 == 1).collect();
        held.iter().filter(|p| p.0 % 2 == 0).for_each(|&p| buddy.free_frame(p));
        let mut c = counts(buddy);
        let mmu = RecordingMmu::default();
        let mut cx = MmCtx { mem, frames: &mut *buddy, refs: FrameRefs::new(BASE, &mut c), mmu: &mmu };
        let mut a = AddressSpace::new(&mut cx, &k).unwrap();
        a.set_anon_folio(FolioSize::K64);
        a.add_vma(Gva(0x20_0000), Gva(0x30_0000), Prot::RW).unwrap();
        assert_eq!(a.handle_fault(&mut cx, Gva(0x20_0000), W), Ok(FaultFix::DemandZero(Gva(0x20_0000))));
        a.destroy(&mut cx);
        kept.into_iter().for_each(|p| cx.frames.free_frame(p));
        assert_eq!(frames_in_use(cx.frames), 0);
    })
}

#[test]
fn a_thp_is_one_pmd_leaf_shared_by_fork_and_split_by_cow_munmap_and_mprotect() {
    with_mm_sized(PGTABLE_FRAMES, 2048, |mem, buddy| {
        let k = kernel(mem, buddy);
        let mut c = counts(buddy);
        let mmu = RecordingMmu::default();
        let mut cx = MmCtx { mem, frames: &mut *buddy, refs: FrameRefs::new(BASE, &mut c), mmu: &mmu };
        let mut a = AddressSpace::new(&mut cx, &k).unwrap();
        a.set_anon_folio(FolioSize::M2);
        a.add_vma(Gva(0x40_0000), Gva(0x80_0000), Prot::RW).unwrap();
        a.add_vma(Gva(0x90_0000), Gva(0xa0_0000), Prot::RW).unwrap();
        let thp = Gva(0x40_0000);
        assert_eq!(a.handle_fault(&mut cx, Gva(0x40_1000), W), Ok(FaultFix::DemandFolio(thp, FolioSize::M2)));
        let leaf = a.page_table().leaf(mem, thp).unwrap();
        assert_eq!(leaf.size, PageSizeKind::Size2MiB);
        let head = Pfn::containing(leaf.entry.addr());
        assert_eq!(frames_in_use(cx.frames), 512);
        assert!((0..512).all(|i| cx.refs.get(head.add(i)) == 1));
        // An area that does not cover an aligned 2 MiB gets 64 KiB folios.
        let fix = a.handle_fault(&mut cx, Gva(0x90_0000), W);
        assert_eq!(fix, Ok(FaultFix::DemandFolio(Gva(0x90_0000), FolioSize::K64)));
        a.switch_to(&mmu);
        mem.write_u64(Gpa(head.addr().0 + 0x3000), 33);
        // Fork shares the PMD copy-on-write: every frame gains a reference.
        let (mut child, flush) = a.fork(&mut cx).unwrap();
        flush.flush(&mmu);
        assert_eq!(child.anon_folio(), FolioSize::M2);
        assert!((0..512).all(|i| cx.refs.get(head.add(i)) == 2));
        let cleaf = child.page_table().leaf(mem, thp).unwrap();
        assert_eq!((cleaf.size, cleaf.entry.addr()), (PageSizeKind::Size2MiB, head.addr()));
        assert!(cleaf.flags().contains(PteFlags::COW) && !cleaf.flags().contains(PteFlags::WRITABLE));
        // The child's write splits its PMD and copies one page.
        mmu.take();
        let p = PfErrorCode(W.0 | PfErrorCode::PRESENT);
        assert_eq!(child.handle_fault(&mut cx, Gva(0x40_3008), p), Ok(FaultFix::CowCopied(Gva(0x40_3000))));
        assert_eq!(mmu.take(), [MmuEvent::Invlpg(thp), MmuEvent::Invlpg(Gva(0x40_3000))]);
        assert_eq!(child.page_table().leaf(mem, thp).unwrap().size, PageSizeKind::Size4KiB);
        let copy = present(&child, mem, 0x40_3000).unwrap().0;
        assert_ne!(copy, head.addr().0 + 0x3000);
        assert_eq!(mem.read_u64(Gpa(copy)), 33);
        assert_eq!(present(&child, mem, 0x40_4000).unwrap().0, head.addr().0 + 0x4000, "other pages still shared");
        assert_eq!((cx.refs.get(head.add(3)), cx.refs.get(head.add(4))), (1, 2));
        // The parent's write: its frames are still shared, so it splits too.
        assert_eq!(a.handle_fault(&mut cx, Gva(0x40_5000), p), Ok(FaultFix::CowCopied(Gva(0x40_5000))));
        assert_eq!(a.page_table().leaf(mem, thp).unwrap().size, PageSizeKind::Size4KiB);
        child.destroy(&mut cx);
        // A second THP, unshared: a write after a failed-then-undone fork
        // share reuses the whole PMD.
        assert_eq!(
            a.handle_fault(&mut cx, Gva(0x60_0000), R),
            Ok(FaultFix::DemandFolio(Gva(0x60_0000), FolioSize::M2))
        );
        let (child, flush) = a.fork(&mut cx).unwrap();
        flush.flush(&mmu);
        child.destroy(&mut cx);
        let big = a.page_table().leaf(mem, Gva(0x60_0000)).unwrap();
        assert!(!big.flags().contains(PteFlags::WRITABLE), "still COW after the fork");
        assert_eq!(a.handle_fault(&mut cx, Gva(0x70_0000), p), Ok(FaultFix::CowReused(Gva(0x60_0000))));
        assert_eq!(a.page_table().leaf(mem, Gva(0x60_0000)).unwrap().size, PageSizeKind::Size2MiB);
        // mprotect of part of a THP splits it; only that part loses write.
        let before = tables_in_use(cx.frames);
        a.mprotect(&mut cx, Gva(0x61_0000), Gva(0x62_0000), Prot::READ).unwrap().flush(&mmu);
        assert_eq!(tables_in_use(cx.frames), before + 1, "one PT page for the split");
        assert!(!present(&a, mem, 0x61_0000).unwrap().1.contains(PteFlags::WRITABLE));
        assert!(present(&a, mem, 0x62_0000).unwrap().1.contains(PteFlags::WRITABLE | PteFlags::DIRTY));
        assert_eq!(a.vmas().as_slice().len(), 4);
        // munmap of part of it frees exactly that part.
        let frames = frames_in_use(cx.frames);
        a.munmap(&mut cx, Gva(0x70_0000), Gva(0x70_2000)).unwrap().flush(&mmu);
        assert_eq!(frames_in_use(cx.frames), frames - 2);
        a.page_table().check_invariants(mem).unwrap();
        a.destroy(&mut cx);
        assert!(cx.refs.all_zero());
        assert_eq!(frames_in_use(cx.frames), 0);
    })
}

#[test]
fn aging_reclaims_a_clean_thp_whole() {
    use crate::aging::Lru;
    with_mm_sized(PGTABLE_FRAMES, 2048, |mem, buddy| {
        let k = kernel(mem, buddy);
        let mut c = counts(buddy);
        let mmu = RecordingMmu::default();
        let mut cx = MmCtx { mem, frames: &mut *buddy, refs: FrameRefs::new(BASE, &mut c), mmu: &mmu };
        let mut a = AddressSpace::new(&mut cx, &k).unwrap();
        a.set_anon_folio(FolioSize::M2);
        a.add_vma(Gva(0x40_0000), Gva(0x60_0000), Prot::RW).unwrap();
        assert_eq!(
            a.handle_fault(&mut cx, Gva(0x40_8000), R),
            Ok(FaultFix::DemandFolio(Gva(0x40_0000), FolioSize::M2))
        );
        let mut lru: Lru<4> = Lru::new();
        assert!(lru.add(Gva(0x40_0000)));
        assert_eq!(lru.shrink_inactive(&mut a, &mut cx, 4, false), 0, "accessed: promoted");
        lru.age_active(&mut a, &mut cx, 4, false);
        assert_eq!((frames_in_use(cx.frames), a.rss()), (512, 512));
        assert_eq!(lru.shrink_inactive(&mut a, &mut cx, 4, false), 1, "clean and idle: reclaimed");
        assert_eq!((frames_in_use(cx.frames), a.rss()), (0, 0), "all 512 frames freed");
        assert_eq!(a.page_table().translate(mem, Gva(0x40_8000)), None);
        a.destroy(&mut cx);
        assert!(cx.refs.all_zero());
    })
}

#[test]
fn a_thp_falls_back_when_a_page_table_is_in_the_way() {
    with_mm_sized(PGTABLE_FRAMES, 2048, |mem, buddy| {
        let k = kernel(mem, buddy);
        let mut c = counts(buddy);
        let mmu = RecordingMmu::default();
        let mut cx = MmCtx { mem, frames: &mut *buddy, refs: FrameRefs::new(BASE, &mut c), mmu: &mmu };
        let mut a = AddressSpace::new(&mut cx, &k).unwrap();
        a.set_anon_folio(FolioSize::M2);
        a.add_vma(Gva(0x40_0000), Gva(0x60_0000), Prot::RW).unwrap();
        // An empty page table under the PD slot (left by someone changing
        // the tables directly): no PMD leaf can go there.
        let f = cx.frames.alloc_frame().unwrap();
        let p = Page::<crate::paging::Size4KiB>::from_start_address(Gva(0x40_0000)).unwrap();
        a.page_table_mut().map(mem, &mut cx.frames, p, PhysFrame::from_pfn(f), PteFlags::empty()).unwrap();
        mem.write_u64(a.page_table().leaf(mem, Gva(0x40_0000)).unwrap().entry_addr, 0);
        cx.frames.free_frame(f);
        let fix = a.handle_fault(&mut cx, Gva(0x40_0000), W);
        assert_eq!(fix, Ok(FaultFix::DemandFolio(Gva(0x40_0000), FolioSize::K64)));
        assert_eq!(frames_in_use(cx.frames), 16, "the 2 MiB block went back");
        a.destroy(&mut cx);
        assert!(cx.refs.all_zero());
    })
}
