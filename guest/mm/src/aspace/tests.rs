//! Host tests of address spaces, demand paging and copy-on-write: unit
//! tests, then a property test of fork/COW/fault handling against a model
//! of each address space's memory contents, run through a CPU model with a
//! TLB (so a forgotten flush is caught as wrong data).

use std::collections::{BTreeMap, BTreeSet};
use std::vec::Vec;

use guest_abi::Gpa;
use proptest::prelude::*;

use super::*;
use crate::buddy::BuddyAllocator;
use crate::fault::{FaultError, FaultFix, PfErrorCode, Segfault};
use crate::paging::{Page, PhysFrame, Size1GiB};
use crate::phys::ArenaMem;
use crate::testutil::{
    BASE, MmuEvent, RecordingMmu, TlbMmu, cpu_access, frames_in_use, tables_in_use, with_mm, with_mm_sized,
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
/// read-write area crossing a page-table boundary, one read-only area.
const VMAS: [(u64, u64, Prot); 3] =
    [(0x10_0000, 0x10_6000, Prot::RW), (0x1f_d000, 0x20_3000, Prot::RW), (0x40_0000, 0x40_2000, Prot::READ)];

/// Candidate pages: every VMA page, and two outside.
fn pages() -> Vec<u64> {
    let mut v: Vec<u64> = VMAS.iter().flat_map(|&(s, e, _)| (s..e).step_by(0x1000)).collect();
    v.extend([0x30_0000, 0x10_6000]);
    v
}

#[derive(Clone, Debug)]
enum Op {
    Read(usize, usize, u64),
    Write(usize, usize, u64, u64),
    Fork(usize),
    Destroy(usize),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let n = pages().len();
    prop_oneof![
        5 => (any::<usize>(), 0..n, 0u64..4).prop_map(|(a, p, w)| Op::Read(a, p, w)),
        6 => (any::<usize>(), 0..n, 0u64..4, 1u64..1000).prop_map(|(a, p, w, v)| Op::Write(a, p, w, v)),
        2 => any::<usize>().prop_map(Op::Fork),
        1 => any::<usize>().prop_map(Op::Destroy),
    ]
}

/// Expected outcome of an access in the model.
fn model_access(mem: &mut BTreeMap<u64, u64>, va: u64, write: Option<u64>) -> Result<u64, FaultError> {
    let Some(&(_, _, prot)) = VMAS.iter().find(|&&(s, e, _)| s <= va && va < e) else {
        return Err(FaultError::Segfault(Segfault::NoVma));
    };
    match write {
        Some(_) if !prot.contains(Prot::WRITE) => Err(FaultError::Segfault(Segfault::Protection)),
        Some(v) => {
            mem.insert(va, v);
            Ok(v)
        }
        None => Ok(mem.get(&va).copied().unwrap_or(0)),
    }
}

/// Check the reference counts against the leaves of every address space,
/// the table and frame accounting, and each address space's tables.
fn check_accounting<M: PhysMem, A: FrameSource>(
    spaces: &[(AddressSpace, BTreeMap<u64, u64>)],
    cx: &MmCtx<'_, M, A, TlbMmu>,
    buddy_frames: u64,
    buddy_tables: u64,
    kernel_tables: usize,
) {
    let mut refs: BTreeMap<u64, u16> = BTreeMap::new();
    let mut own_tables = 0;
    for (a, _) in spaces {
        let n = a.page_table().check_invariants(cx.mem).unwrap();
        own_tables += n - (kernel_tables - 1);
        let mut at = Gva(0);
        while let Some(l) = a.page_table().next_leaf(cx.mem, at, USER_END) {
            assert!(l.flags().contains(PteFlags::ANON));
            assert!(!l.flags().contains(PteFlags::WRITABLE | PteFlags::COW), "a COW page is never writable");
            *refs.entry(l.entry.addr().0 >> 12).or_default() += 1;
            at = Gva(l.va.0 + 0x1000);
        }
    }
    for (&pfn, &n) in &refs {
        assert_eq!(cx.refs.get(Pfn(pfn)), n, "reference count of frame {pfn:#x}");
    }
    let distinct: BTreeSet<_> = refs.keys().collect();
    assert_eq!(buddy_frames, distinct.len() as u64, "every in-use frame is mapped somewhere");
    assert_eq!(buddy_tables, (kernel_tables + own_tables) as u64, "every table page is reachable");
}

fn run_model(ops: &[Op]) {
    with_mm(|mem, buddy| {
        let k = kernel(mem, buddy);
        let kernel_tables = k.check_invariants(mem).unwrap();
        let mut c = counts(buddy);
        let mmu = TlbMmu::default();
        let frames_of = |b: &BuddyAllocator<'_, &ArenaMem<'_>>| (frames_in_use(b), tables_in_use(b));
        let mut cx = MmCtx { mem, frames: &mut *buddy, refs: FrameRefs::new(BASE, &mut c), mmu: &mmu };
        let mut first = AddressSpace::new(&mut cx, &k).unwrap();
        for &(s, e, p) in &VMAS {
            first.add_vma(Gva(s), Gva(e), p).unwrap();
        }
        let mut spaces = vec![(first, BTreeMap::new())];
        let mut current: Option<usize> = None;
        let pages = pages();
        for op in ops {
            match *op {
                Op::Read(a, p, w) | Op::Write(a, p, w, _) => {
                    let i = a % spaces.len();
                    if current != Some(i) {
                        spaces[i].0.switch_to(&mmu);
                        current = Some(i);
                    }
                    let va = pages[p] + w * 8;
                    let write = if let Op::Write(.., v) = *op { Some(v) } else { None };
                    let (space, model) = &mut spaces[i];
                    let got = cpu_access(space, &mut cx, va, write);
                    assert_eq!(got, model_access(model, va, write), "{op:?} in space {i}");
                }
                Op::Fork(a) => {
                    let i = a % spaces.len();
                    let (child, flush) = spaces[i].0.fork(&mut cx).unwrap();
                    if current == Some(i) {
                        flush.flush(&mmu);
                    } else {
                        flush.ignore();
                    }
                    let model = spaces[i].1.clone();
                    spaces.push((child, model));
                }
                Op::Destroy(a) => {
                    if spaces.len() > 1 {
                        let i = a % spaces.len();
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
            }
            let (f, t) = (frames_in_use(cx.frames), tables_in_use(cx.frames));
            check_accounting(&spaces, &cx, f, t, kernel_tables);
        }
        // Every address space still reads what the model says.
        for (space, model) in &mut spaces {
            space.switch_to(&mmu);
            for (&va, &v) in model.iter() {
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
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn fork_cow_and_faults_keep_every_address_space_s_contents(
        ops in prop::collection::vec(op_strategy(), 1..120)
    ) {
        run_model(&ops);
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
