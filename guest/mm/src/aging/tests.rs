//! Host tests of page aging: unit tests of each list transition, then a
//! property test that interleaves accesses (through the CPU and TLB model)
//! with scans and reclaim, against a model of the memory contents.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::aspace::{FrameRefs, USER_END};
use crate::buddy::BuddyAllocator;
use crate::fault::PfErrorCode;
use crate::paging::PageTable;
use crate::phys::ArenaMem;
use crate::testutil::{BASE, MmuEvent, RecordingMmu, TlbMmu, cpu_access, frames_in_use, tables_in_use, with_mm};
use crate::vma::Prot;

const W: PfErrorCode = PfErrorCode(PfErrorCode::USER | PfErrorCode::WRITE);
const R: PfErrorCode = PfErrorCode(PfErrorCode::USER);

fn flags_at<M: PhysMem, A, P>(a: &AddressSpace, cx: &MmCtx<'_, M, A, P>, va: u64) -> Option<PteFlags> {
    a.page_table().translate(cx.mem, Gva(va)).map(|t| t.flags)
}

fn setup(buddy: &mut BuddyAllocator<'_, &ArenaMem<'_>>) -> (PageTable, Vec<u16>) {
    (PageTable::new_pinned_upper(buddy).unwrap(), vec![0; buddy.span().len() as usize])
}

#[test]
fn a_ring_is_a_bounded_fifo() {
    let mut r = PageRing::<2>::new();
    assert!(r.push_back(Gva(1)) && r.push_back(Gva(2)));
    assert!(!r.push_back(Gva(3)));
    assert_eq!(r.pop_front(), Some(Gva(1)));
    assert!(r.push_back(Gva(3)));
    assert!(r.contains(Gva(3)) && !r.contains(Gva(1)));
    assert_eq!((r.pop_front(), r.pop_front(), r.pop_front()), (Some(Gva(2)), Some(Gva(3)), None));
    assert!(r.is_empty());
}

#[test]
fn referenced_pages_are_promoted_idle_ones_demoted_and_a_bits_cleared_with_a_flush() {
    with_mm(|mem, buddy| {
        let (k, mut c) = setup(buddy);
        let mmu = RecordingMmu::default();
        let mut cx = MmCtx { mem, frames: &mut *buddy, refs: FrameRefs::new(BASE, &mut c), mmu: &mmu };
        let mut a = AddressSpace::new(&mut cx, &k).unwrap();
        a.add_vma(Gva(0x10_0000), Gva(0x10_4000), Prot::RW).unwrap();
        let mut lru = Lru::<8>::new();
        for va in [0x10_0000, 0x10_1000] {
            a.handle_fault(&mut cx, Gva(va), W).unwrap();
            assert!(lru.add(Gva(va)));
        }
        // Both were just faulted in with A set: the first look promotes them.
        assert_eq!(lru.shrink_inactive(&mut a, &mut cx, 8, true), 0);
        assert_eq!((lru.active().len(), lru.inactive().len(), lru.stats().activated), (2, 0, 2));
        assert_eq!(mmu.take(), [MmuEvent::Invlpg(Gva(0x10_0000)), MmuEvent::Invlpg(Gva(0x10_1000))]);
        assert!(!flags_at(&a, &cx, 0x10_0000).unwrap().contains(PteFlags::ACCESSED));
        // Only the second is used again (the CPU sets A).
        let leaf = a.page_table().leaf(mem, Gva(0x10_1000)).unwrap();
        mem.write_u64(leaf.entry_addr, leaf.entry.0 | PteFlags::ACCESSED.bits());
        lru.age_active(&mut a, &mut cx, 8, true);
        assert_eq!((lru.active().len(), lru.inactive().len()), (1, 1));
        assert!(lru.inactive().contains(Gva(0x10_0000)) && lru.active().contains(Gva(0x10_1000)));
        assert_eq!(mmu.take(), [MmuEvent::Invlpg(Gva(0x10_1000))]);
        // Not loaded: no flush is issued.
        lru.age_active(&mut a, &mut cx, 8, false);
        assert!(mmu.take().is_empty());
        a.destroy(&mut cx);
    })
}

#[test]
fn clean_idle_inactive_pages_are_reclaimed_and_dirty_ones_kept() {
    with_mm(|mem, buddy| {
        let (k, mut c) = setup(buddy);
        let mmu = RecordingMmu::default();
        let mut cx = MmCtx { mem, frames: &mut *buddy, refs: FrameRefs::new(BASE, &mut c), mmu: &mmu };
        let mut a = AddressSpace::new(&mut cx, &k).unwrap();
        a.add_vma(Gva(0x10_0000), Gva(0x10_4000), Prot::RW).unwrap();
        let mut lru = Lru::<8>::new();
        a.handle_fault(&mut cx, Gva(0x10_0000), R).unwrap(); // clean
        a.handle_fault(&mut cx, Gva(0x10_1000), W).unwrap(); // dirty
        lru.add(Gva(0x10_0000));
        lru.add(Gva(0x10_1000));
        assert_eq!(lru.shrink_inactive(&mut a, &mut cx, 8, true), 0, "young: promoted first");
        lru.age_active(&mut a, &mut cx, 8, true);
        assert_eq!(lru.inactive().len(), 2, "idle: both demoted");
        mmu.take();
        assert_eq!(lru.shrink_inactive(&mut a, &mut cx, 8, true), 1);
        assert_eq!(mmu.take(), [MmuEvent::Invlpg(Gva(0x10_0000))], "the reclaimed page is flushed");
        assert_eq!(flags_at(&a, &cx, 0x10_0000), None);
        assert!(flags_at(&a, &cx, 0x10_1000).is_some());
        assert_eq!(lru.stats().kept_dirty, 1);
        assert_eq!(frames_in_use(cx.frames), 1, "the clean page's frame went back");
        // Touching the reclaimed page demand-zeroes it again.
        a.handle_fault(&mut cx, Gva(0x10_0000), R).unwrap();
        assert_eq!(mem.read_u64(a.page_table().translate(mem, Gva(0x10_0000)).unwrap().frame), 0);
        a.destroy(&mut cx);
    })
}

#[test]
fn stale_entries_are_dropped_and_shared_frames_survive_reclaim_in_one_space() {
    with_mm(|mem, buddy| {
        let (k, mut c) = setup(buddy);
        let mmu = RecordingMmu::default();
        let mut cx = MmCtx { mem, frames: &mut *buddy, refs: FrameRefs::new(BASE, &mut c), mmu: &mmu };
        let mut a = AddressSpace::new(&mut cx, &k).unwrap();
        a.add_vma(Gva(0x10_0000), Gva(0x10_4000), Prot::RW).unwrap();
        let mut lru = Lru::<8>::new();
        a.handle_fault(&mut cx, Gva(0x10_0000), R).unwrap();
        let shared = a.page_table().translate(mem, Gva(0x10_0000)).unwrap().frame;
        let (b, flush) = a.fork(&mut cx).unwrap();
        flush.flush(&mmu);
        lru.add(Gva(0x10_0000));
        lru.add(Gva(0x10_2000)); // never mapped: stale
        a.page_table_mut().update_leaf(mem, Gva(0x10_0000), |f| f - PteFlags::ACCESSED).unwrap().1.ignore();
        assert_eq!(lru.shrink_inactive(&mut a, &mut cx, 8, false), 1);
        assert_eq!(lru.stats().stale, 1);
        assert_eq!(cx.refs.get(Pfn::containing(shared)), 1, "the child still maps it");
        assert_eq!(b.page_table().translate(mem, Gva(0x10_0000)).unwrap().frame, shared);
        b.destroy(&mut cx);
        a.destroy(&mut cx);
        assert_eq!(frames_in_use(cx.frames), 0);
    })
}

#[derive(Clone, Debug)]
enum Op {
    Read(usize, u64),
    Write(usize, u64, u64),
    Age(usize),
    Shrink(usize),
}

const PAGES: u64 = 24;
const VMA_START: u64 = 0x1f_0000;

fn op_strategy() -> impl Strategy<Value = Op> {
    let p = 0..PAGES as usize;
    prop_oneof![
        6 => (p.clone(), 0u64..4).prop_map(|(p, w)| Op::Read(p, w)),
        3 => (p, 0u64..4, 1u64..1000).prop_map(|(p, w, v)| Op::Write(p, w, v)),
        2 => (1usize..16).prop_map(Op::Age),
        2 => (1usize..16).prop_map(Op::Shrink),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Reclaim never changes what the program reads, pages in use are not
    /// reclaimed from under it, and every frame is accounted for.
    #[test]
    fn aging_and_reclaim_keep_the_memory_contents(ops in prop::collection::vec(op_strategy(), 1..150)) {
        with_mm(|mem, buddy| {
            let (k, mut c) = setup(buddy);
            let mmu = TlbMmu::default();
            let mut cx = MmCtx { mem, frames: &mut *buddy, refs: FrameRefs::new(BASE, &mut c), mmu: &mmu };
            let mut a = AddressSpace::new(&mut cx, &k).unwrap();
            a.add_vma(Gva(VMA_START), Gva(VMA_START + PAGES * 0x1000), Prot::RW).unwrap();
            a.switch_to(&mmu);
            let mut lru = Lru::<{ PAGES as usize }>::new();
            let mut model: BTreeMap<u64, u64> = BTreeMap::new();
            for op in &ops {
                match *op {
                    Op::Read(p, w) | Op::Write(p, w, _) => {
                        let va = VMA_START + p as u64 * 0x1000 + w * 8;
                        let write = if let Op::Write(.., v) = *op { Some(v) } else { None };
                        let got = cpu_access(&mut a, &mut cx, va, write).unwrap();
                        let want = match write {
                            Some(v) => *model.entry(va).insert_entry(v).get(),
                            None => model.get(&va).copied().unwrap_or(0),
                        };
                        prop_assert_eq!(got, want);
                        let page = Gva(va & !0xfff);
                        if !lru.contains(page) {
                            prop_assert!(lru.add(page));
                        }
                    }
                    Op::Age(n) => lru.age_active(&mut a, &mut cx, n, true),
                    Op::Shrink(n) => {
                        lru.shrink_inactive(&mut a, &mut cx, n, true);
                    }
                }
                // Every mapped page is tracked, and every frame in use is mapped.
                let mut mapped = 0;
                let mut at = Gva(0);
                while let Some(l) = a.page_table().next_leaf(mem, at, USER_END) {
                    prop_assert!(lru.contains(l.va));
                    mapped += 1;
                    at = Gva(l.va.0 + 0x1000);
                }
                prop_assert_eq!(frames_in_use(cx.frames), mapped);
                // A page with data is never reclaimed.
                for &va in model.keys() {
                    prop_assert!(a.page_table().translate(mem, Gva(va)).is_some());
                }
            }
            let s = lru.stats();
            prop_assert!(s.scanned >= s.reclaimed + s.activated + s.deactivated + s.kept_dirty);
            mmu.load_cr3(k.root());
            a.destroy(&mut cx);
            prop_assert!(cx.refs.all_zero());
            prop_assert_eq!((frames_in_use(cx.frames), tables_in_use(cx.frames)), (0, 1));
            Ok(())
        })?;
    }
}

/// A platform with a second-level accessed bit per page, as pv mode's
/// `PV_HARVEST` keeps one: `used` holds the pages accessed since the last
/// harvest that named them.
#[derive(Default)]
struct HarvestMmu {
    inner: RecordingMmu,
    used: std::cell::RefCell<std::collections::BTreeSet<u64>>,
    asked: std::cell::RefCell<Vec<(Gva, Vec<u64>)>>,
}

impl MmuPlatform for HarvestMmu {
    fn load_cr3(&self, root: Pfn) {
        self.inner.load_cr3(root)
    }
    fn invlpg(&self, va: Gva) {
        self.inner.invlpg(va)
    }
    fn flush_all(&self) {
        self.inner.flush_all()
    }
    fn enter_lazy(&self) {
        self.inner.enter_lazy()
    }
    fn leave_lazy(&self) {
        self.inner.leave_lazy()
    }
    fn harvest_young(&self, base: Gva, young: &mut [u64]) -> bool {
        self.asked.borrow_mut().push((base, young.to_vec()));
        for (w, word) in young.iter_mut().enumerate() {
            for b in 0..64 {
                let page = base.0 + (w as u64 * 64 + b) * 4096;
                if *word >> b & 1 != 0 && !self.used.borrow_mut().remove(&page) {
                    *word &= !(1 << b);
                }
            }
        }
        true
    }
}

#[test]
fn a_harvest_answers_a_whole_scan_in_one_request_and_writes_no_entry() {
    with_mm(|mem, buddy| {
        let (k, mut c) = setup(buddy);
        let mmu = HarvestMmu::default();
        let mut cx = MmCtx { mem, frames: &mut *buddy, refs: FrameRefs::new(BASE, &mut c), mmu: &mmu };
        let mut a = AddressSpace::new(&mut cx, &k).unwrap();
        a.add_vma(Gva(0x10_0000), Gva(0x20_0000), Prot::RW).unwrap();
        let mut lru = Lru::<8>::new();
        // Pages 0, 1, 2 and 70 (a scan spanning two bitmap words).
        let pages = [0u64, 1, 2, 70].map(|i| 0x10_0000 + i * 4096);
        for va in pages {
            a.handle_fault(&mut cx, Gva(va), W).unwrap();
            assert!(lru.add(Gva(va)));
            mmu.used.borrow_mut().insert(va);
        }
        // All were used: one request promotes all four, and no A bit is cleared.
        assert_eq!(lru.shrink_inactive(&mut a, &mut cx, 8, true), 0);
        assert_eq!((lru.active().len(), lru.stats().activated, lru.stats().harvests), (4, 4, 1));
        assert_eq!(*mmu.asked.borrow(), [(Gva(0x10_0000), vec![0b111, 1 << 6])]);
        for va in pages {
            assert!(flags_at(&a, &cx, va).unwrap().contains(PteFlags::ACCESSED), "{va:#x}: A stays as the CPU set it");
        }
        assert!(mmu.inner.take().is_empty(), "no entry changed, nothing to flush");
        // Only page 1 is used again: the others are demoted, in one request.
        mmu.used.borrow_mut().insert(pages[1]);
        lru.age_active(&mut a, &mut cx, 8, true);
        assert_eq!((lru.active().len(), lru.inactive().len()), (1, 3));
        assert!(lru.active().contains(Gva(pages[1])));
        assert_eq!(mmu.asked.borrow().len(), 2);
        // An address space that is not loaded is not asked about: its A bits
        // are tested and cleared in the entries.
        lru.age_active(&mut a, &mut cx, 8, false);
        assert_eq!(mmu.asked.borrow().len(), 2);
        assert!(!flags_at(&a, &cx, pages[1]).unwrap().contains(PteFlags::ACCESSED));
        assert_eq!(mmu.inner.lazy_depth.get(), 0, "every bracket closed");
        assert_eq!(mmu.inner.brackets.get(), 3, "one bracket per scan");
        a.destroy(&mut cx);
    })
}

#[test]
fn a_scan_too_wide_for_one_harvest_clears_a_bits_in_the_entries() {
    with_mm(|mem, buddy| {
        let (k, mut c) = setup(buddy);
        let mmu = HarvestMmu::default();
        let mut cx = MmCtx { mem, frames: &mut *buddy, refs: FrameRefs::new(BASE, &mut c), mmu: &mmu };
        let mut a = AddressSpace::new(&mut cx, &k).unwrap();
        let far = 0x10_0000 + HARVEST_SPAN as u64 * 4096;
        a.add_vma(Gva(0x10_0000), Gva(far + 4096), Prot::RW).unwrap();
        let mut lru = Lru::<8>::new();
        for va in [0x10_0000, far] {
            a.handle_fault(&mut cx, Gva(va), W).unwrap();
            assert!(lru.add(Gva(va)));
        }
        assert_eq!(lru.shrink_inactive(&mut a, &mut cx, 8, true), 0);
        assert!(mmu.asked.borrow().is_empty());
        assert_eq!((lru.stats().activated, lru.stats().harvests), (2, 0));
        assert!(!flags_at(&a, &cx, far).unwrap().contains(PteFlags::ACCESSED));
        a.destroy(&mut cx);
    })
}

#[test]
fn a_whole_pass_is_one_harvest_for_both_lists() {
    with_mm(|mem, buddy| {
        let (k, mut c) = setup(buddy);
        let mmu = HarvestMmu::default();
        let mut cx = MmCtx { mem, frames: &mut *buddy, refs: FrameRefs::new(BASE, &mut c), mmu: &mmu };
        let mut a = AddressSpace::new(&mut cx, &k).unwrap();
        a.add_vma(Gva(0x10_0000), Gva(0x10_8000), Prot::RW).unwrap();
        let mut lru = Lru::<8>::new();
        let pages: Vec<u64> = (0..8).map(|i| 0x10_0000 + i * 4096).collect();
        for &va in &pages {
            a.handle_fault(&mut cx, Gva(va), W).unwrap();
            assert!(lru.add(Gva(va)));
            mmu.used.borrow_mut().insert(va);
        }
        // First pass: all used, all promoted.
        assert_eq!(lru.age_all(&mut a, &mut cx, true), 0);
        assert_eq!((lru.active().len(), lru.inactive().len()), (8, 0));
        // The even pages are used again: the odd ones go inactive, and the
        // inactive scan that follows finds them idle and dirty (kept).
        for &va in pages.iter().step_by(2) {
            mmu.used.borrow_mut().insert(va);
        }
        assert_eq!(lru.age_all(&mut a, &mut cx, true), 0);
        assert_eq!((lru.active().len(), lru.inactive().len()), (4, 4));
        assert!(lru.inactive().iter().all(|p| (p.0 - 0x10_0000) / 4096 % 2 == 1));
        assert_eq!((lru.stats().harvests, lru.stats().kept_dirty), (2, 4));
        assert_eq!(*mmu.asked.borrow(), [(Gva(0x10_0000), vec![0xff]), (Gva(0x10_0000), vec![0xff])]);
        assert!(mmu.inner.take().is_empty(), "no entry changed");
        a.destroy(&mut cx);
    })
}
