//! Host tests of the page tables: one unit test per behaviour, then a
//! property test against a model (a map from page to frame and flags).

use std::collections::BTreeMap;
use std::vec::Vec;

use proptest::prelude::*;

use super::*;
use crate::phys::ArenaMem;
use crate::testutil::{MmuEvent, RecordingMmu, tables_in_use, with_mm, with_mm_sized};

/// A page-table source that checks, independently of the buddy
/// allocator, that every table page it takes back is all zeroes.
pub(crate) struct CheckingSource<'a, A> {
    pub mem: &'a ArenaMem<'a>,
    pub inner: A,
    pub freed: usize,
}

impl<A: PageTableSource> PageTableSource for CheckingSource<'_, A> {
    fn alloc_table(&mut self) -> Option<Pfn> {
        let t = self.inner.alloc_table()?;
        assert!(self.mem.frame_is_zero(t), "table page handed out not zeroed");
        Some(t)
    }
    fn free_table(&mut self, table: Pfn) {
        assert!(self.mem.frame_is_zero(table), "table page freed with a non-zero entry");
        self.freed += 1;
        self.inner.free_table(table)
    }
}

fn page<S: PageSize>(va: u64) -> Page<S> {
    Page::from_start_address(Gva(va)).unwrap()
}

fn frame<S: PageSize>(pa: u64) -> PhysFrame<S> {
    PhysFrame::from_start_address(Gpa(pa)).unwrap()
}

const RW: PteFlags = PteFlags::WRITABLE;

#[test]
fn flag_bits_sit_where_the_sdm_puts_them() {
    // SDM vol. 3A Table 4-19 (PTE) and 4-18 (PDE mapping a 2 MiB page).
    let expect = [
        (PteFlags::PRESENT, 0),
        (PteFlags::WRITABLE, 1),
        (PteFlags::USER, 2),
        (PteFlags::WRITE_THROUGH, 3),
        (PteFlags::NO_CACHE, 4),
        (PteFlags::ACCESSED, 5),
        (PteFlags::DIRTY, 6),
        (PteFlags::HUGE, 7),
        (PteFlags::GLOBAL, 8),
        (PteFlags::COW, 9),
        (PteFlags::ANON, 10),
        (PteFlags::NO_EXECUTE, 63),
    ];
    for (f, bit) in expect {
        assert_eq!(f.bits(), 1 << bit);
    }
    let mut f = PteFlags::PRESENT | PteFlags::DIRTY;
    f.set(PteFlags::DIRTY, false);
    assert_eq!(f, PteFlags::PRESENT);
    assert_eq!(PteFlags::from_bits_truncate(0x000f_ffff_ffff_f001), PteFlags::PRESENT);
    assert!(!PteFlags::LEAF_SETTABLE.intersects(PteFlags::PRESENT | PteFlags::HUGE));
    assert_eq!(std::format!("{:?}", PteFlags::PRESENT | RW | PteFlags::NO_EXECUTE), "P|RW|NX");
}

#[test]
fn pages_and_frames_are_aligned_canonical_and_in_range_by_construction() {
    assert_eq!(Page::<Size4KiB>::from_start_address(Gva(0x1001)), Err(AddrError::Unaligned));
    assert_eq!(Page::<Size2MiB>::from_start_address(Gva(0x1000)), Err(AddrError::Unaligned));
    assert_eq!(Page::<Size4KiB>::from_start_address(Gva(0x0000_8000_0000_0000)), Err(AddrError::NotCanonical));
    assert!(Page::<Size1GiB>::from_start_address(Gva(0xffff_8000_0000_0000)).is_ok());
    assert_eq!(Page::<Size2MiB>::containing_address(Gva(0x3f_ffff)).unwrap().start(), Gva(0x20_0000));
    assert_eq!(PhysFrame::<Size4KiB>::from_start_address(Gpa(1 << 52)), Err(AddrError::BeyondPhysLimit));
    assert_eq!(PhysFrame::<Size1GiB>::from_start_address(Gpa(0x20_0000)), Err(AddrError::Unaligned));
    assert_eq!(PhysFrame::<Size4KiB>::from_pfn(Pfn(5)).start(), Gpa(0x5000));
    assert_eq!(table_index(0xffff_ffff_ffff_f000, 4), 511);
    assert_eq!(table_index(0x40_2000, 2), 2);
    assert_eq!(canonicalize(0x8000_0000_0000), 0xffff_8000_0000_0000);
}

#[test]
fn a_4k_mapping_translates_with_its_offset_and_uses_three_new_tables() {
    with_mm(|mem, buddy| {
        let mut pt = PageTable::new(buddy).unwrap();
        let flags = RW | PteFlags::USER | PteFlags::NO_EXECUTE;
        pt.map(mem, buddy, page::<Size4KiB>(0x4000_1000), frame(0x7_7000), flags).unwrap();
        let t = pt.translate(mem, Gva(0x4000_1abc)).unwrap();
        assert_eq!(t.addr, Gpa(0x7_7abc));
        assert_eq!(t.frame, Gpa(0x7_7000));
        assert_eq!(t.flags, flags | PteFlags::PRESENT);
        assert_eq!(t.size, PageSizeKind::Size4KiB);
        assert_eq!(pt.translate(mem, Gva(0x4000_2000)), None);
        assert_eq!(pt.check_invariants(mem), Ok(4));
        assert_eq!(tables_in_use(buddy), 4);
    })
}

#[test]
fn large_and_huge_pages_are_leaves_with_ps_at_the_pd_and_pdpt() {
    with_mm(|mem, buddy| {
        let mut pt = PageTable::new(buddy).unwrap();
        pt.map(mem, buddy, page::<Size2MiB>(0x60_0000), frame(0x4000_0000), RW).unwrap();
        pt.map(mem, buddy, page::<Size1GiB>(0x80_0000_0000), frame(0x1_4000_0000), PteFlags::empty()).unwrap();
        let t = pt.translate(mem, Gva(0x7f_fff8)).unwrap();
        assert_eq!((t.addr, t.size), (Gpa(0x401f_fff8), PageSizeKind::Size2MiB));
        let t = pt.translate(mem, Gva(0x80_3fff_fff0)).unwrap();
        assert_eq!((t.addr, t.size, t.flags), (Gpa(0x1_7fff_fff0), PageSizeKind::Size1GiB, PteFlags::PRESENT));
        let leaf = pt.leaf(mem, Gva(0x60_0000)).unwrap();
        assert_eq!(leaf.entry.0, 0x4000_0000 | 0x83, "P|RW|PS and the frame");
        // root + PDPT + PD for the 2 MiB page; root's second PDPT for the 1 GiB one.
        assert_eq!(pt.check_invariants(mem), Ok(4));
        let root_e = read_entry(mem, pt.root(), 0);
        assert_eq!(root_e.flags(), TABLE_FLAGS, "non-leaf entries are P|RW|US|A");
    })
}

#[test]
fn map_range_maps_what_one_map_per_page_would() {
    with_mm(|mem, buddy| {
        // 1100 pages of 4 KiB from just below a PD boundary: three leaf
        // tables (the middle one whole), against one `map` per page.
        let (va, pa, n) = (0x4000_0000 - 5 * 4096, 0x10_0000, 1100u64);
        let mut range = PageTable::new(buddy).unwrap();
        range.map_range(mem, buddy, page::<Size4KiB>(va), frame(pa), n, RW).unwrap();
        let mut each = PageTable::new(buddy).unwrap();
        for i in 0..n {
            each.map(mem, buddy, page::<Size4KiB>(va + i * 4096), frame(pa + i * 4096), RW).unwrap();
        }
        for i in [0, 1, 4, 5, 6, 511, 516, 517, 1028, n - 1, n] {
            let a = Gva(va + i * 4096 + 8);
            assert_eq!(range.translate(mem, a), each.translate(mem, a), "page {i}");
        }
        assert_eq!(range.check_invariants(mem), each.check_invariants(mem));
        // 2 MiB pages across a PDPT boundary, and no pages at all.
        let mut big = PageTable::new(buddy).unwrap();
        big.map_range(mem, buddy, page::<Size2MiB>(0x3fe0_0000), frame(0), 3, RW).unwrap();
        assert_eq!(big.translate(mem, Gva(0x4020_0010)).unwrap().addr, Gpa(0x40_0010));
        assert_eq!(big.translate(mem, Gva(0x4040_0000)), None);
        big.map_range(mem, buddy, page::<Size2MiB>(0x8000_0000), frame(0), 0, RW).unwrap();
        assert_eq!(big.translate(mem, Gva(0x8000_0000)), None);
    })
}

#[test]
fn map_range_stops_at_a_conflict_or_the_canonical_hole() {
    with_mm(|mem, buddy| {
        let mut pt = PageTable::new(buddy).unwrap();
        pt.map(mem, buddy, page::<Size4KiB>(0x7000), frame(0x1000), RW).unwrap();
        // Pages 0x5000 and 0x6000 are mapped, then 0x7000 is in the way.
        assert_eq!(
            pt.map_range(mem, buddy, page::<Size4KiB>(0x5000), frame(0x20_0000), 4, RW),
            Err(MapError::AlreadyMapped)
        );
        assert_eq!(pt.translate(mem, Gva(0x6000)).unwrap().addr, Gpa(0x20_1000));
        assert_eq!(pt.translate(mem, Gva(0x7000)).unwrap().addr, Gpa(0x1000));
        assert_eq!(pt.translate(mem, Gva(0x8000)), None);
        // A range running off the lower canonical half is refused up front.
        let last = 0x0000_7fff_ffe0_0000;
        assert_eq!(pt.map_range(mem, buddy, page::<Size2MiB>(last), frame(0), 2, RW), Err(MapError::NotCanonical));
        assert_eq!(pt.translate(mem, Gva(last)), None);
        pt.map_range(mem, buddy, page::<Size2MiB>(last), frame(0), 1, RW).unwrap();
    })
}

#[test]
fn conflicting_maps_are_refused_and_change_nothing() {
    with_mm(|mem, buddy| {
        let mut pt = PageTable::new(buddy).unwrap();
        pt.map(mem, buddy, page::<Size2MiB>(0x20_0000), frame(0x20_0000), RW).unwrap();
        pt.map(mem, buddy, page::<Size4KiB>(0x40_0000), frame(0x1000), RW).unwrap();
        let before = tables_in_use(buddy);
        assert_eq!(pt.map(mem, buddy, page::<Size2MiB>(0x20_0000), frame(0), RW), Err(MapError::AlreadyMapped));
        assert_eq!(pt.map(mem, buddy, page::<Size4KiB>(0x20_1000), frame(0), RW), Err(MapError::ParentIsHuge));
        assert_eq!(pt.map(mem, buddy, page::<Size2MiB>(0x40_0000), frame(0), RW), Err(MapError::TableInTheWay));
        assert_eq!(pt.map(mem, buddy, page::<Size1GiB>(0), frame(0), RW), Err(MapError::TableInTheWay));
        assert_eq!(tables_in_use(buddy), before);
        assert_eq!(pt.translate(mem, Gva(0x20_1000)).unwrap().addr, Gpa(0x20_1000));
    })
}

#[test]
fn unmapping_the_last_page_frees_every_table_but_the_root() {
    with_mm(|mem, buddy| {
        let mut src = CheckingSource { mem, inner: buddy, freed: 0 };
        let mut pt = PageTable::new(&mut src).unwrap();
        let flags = RW | PteFlags::DIRTY;
        pt.map(mem, &mut src, page::<Size4KiB>(0x1234_5000), frame(0x9000), flags).unwrap();
        pt.map(mem, &mut src, page::<Size4KiB>(0x1234_6000), frame(0xa000), flags).unwrap();
        let (f, old, flush) = pt.unmap(mem, &mut src, page::<Size4KiB>(0x1234_5000)).unwrap();
        assert_eq!((f, old, flush.page()), (frame(0x9000), flags | PteFlags::PRESENT, Gva(0x1234_5000)));
        flush.ignore();
        assert_eq!(src.freed, 0, "the PT still holds a page");
        let (_, _, flush) = pt.unmap(mem, &mut src, page::<Size4KiB>(0x1234_6000)).unwrap();
        flush.ignore();
        assert_eq!(src.freed, 3, "PT, PD and PDPT freed");
        assert_eq!(pt.check_invariants(mem), Ok(1));
        assert!(mem.frame_is_zero(pt.root()));
        pt.free_tables(mem, &mut src);
        assert_eq!(tables_in_use(src.inner), 0);
        src.inner.check_invariants().unwrap();
    })
}

#[test]
fn unmap_and_protect_say_why_they_failed() {
    with_mm(|mem, buddy| {
        let mut pt = PageTable::new(buddy).unwrap();
        pt.map(mem, buddy, page::<Size2MiB>(0x20_0000), frame(0x20_0000), RW).unwrap();
        assert_eq!(
            pt.unmap(mem, buddy, page::<Size4KiB>(0x20_0000)),
            Err(UnmapError::SizeMismatch(PageSizeKind::Size2MiB))
        );
        assert_eq!(pt.unmap(mem, buddy, page::<Size1GiB>(0)), Err(UnmapError::NotMapped));
        assert_eq!(pt.unmap(mem, buddy, page::<Size2MiB>(0x40_0000)), Err(UnmapError::NotMapped));
        assert_eq!(pt.protect(mem, page::<Size4KiB>(0x9000_0000), RW), Err(UnmapError::NotMapped));
        assert_eq!(UnmapError::NotMapped.as_str(), "no page of that size mapped there");
    })
}

#[test]
fn protect_rewrites_the_flags_and_its_flush_executes_invlpg() {
    with_mm(|mem, buddy| {
        let mmu = RecordingMmu::default();
        let mut pt = PageTable::new(buddy).unwrap();
        pt.map(mem, buddy, page::<Size2MiB>(0xffff_8000_0020_0000), frame(0x20_0000), RW).unwrap();
        let flush = pt.protect(mem, page::<Size2MiB>(0xffff_8000_0020_0000), PteFlags::NO_EXECUTE).unwrap();
        flush.flush(&mmu);
        assert_eq!(mmu.take(), [MmuEvent::Invlpg(Gva(0xffff_8000_0020_0000))]);
        let t = pt.translate(mem, Gva(0xffff_8000_0020_0010)).unwrap();
        assert_eq!(t.flags, PteFlags::PRESENT | PteFlags::NO_EXECUTE);
        assert_eq!(t.size, PageSizeKind::Size2MiB, "PS survives protect");
    })
}

#[test]
fn running_out_of_table_pages_fails_cleanly_without_leaking() {
    // Two table pages: the root and one more; a 4 KiB map needs three more.
    with_mm_sized(2, 16, |mem, buddy| {
        let mut pt = PageTable::new(buddy).unwrap();
        assert_eq!(pt.map(mem, buddy, page::<Size4KiB>(0x1000), frame(0x1000), RW), Err(MapError::OutOfTables));
        assert_eq!(tables_in_use(buddy), 1, "the PDPT made on the way was freed");
        assert_eq!(pt.check_invariants(mem), Ok(1));
        pt.map(mem, buddy, page::<Size1GiB>(0x4000_0000), frame(0), RW).unwrap();
        assert_eq!(tables_in_use(buddy), 2);
    })
}

#[test]
fn pinned_upper_half_pdpts_outlive_their_last_mapping() {
    with_mm(|mem, buddy| {
        let mut pt = PageTable::new_pinned_upper(buddy).unwrap();
        let va = 0xffff_8880_0000_0000;
        pt.map(mem, buddy, page::<Size1GiB>(va), frame(0), RW).unwrap();
        pt.map(mem, buddy, page::<Size1GiB>(0x4000_0000), frame(0), RW).unwrap();
        pt.unmap(mem, buddy, page::<Size1GiB>(va)).unwrap().2.ignore();
        pt.unmap(mem, buddy, page::<Size1GiB>(0x4000_0000)).unwrap().2.ignore();
        assert_eq!(pt.check_invariants(mem), Ok(2), "the upper PDPT stays; the lower one went");
        pt.free_tables(mem, buddy);
        assert_eq!(tables_in_use(buddy), 0);
        buddy.check_invariants().unwrap();
    })
}

#[test]
fn preallocating_the_upper_half_fills_every_kernel_slot() {
    with_mm(|mem, buddy| {
        let mut pt = PageTable::new_pinned_upper(buddy).unwrap();
        pt.preallocate_upper(mem, buddy).unwrap();
        assert_eq!(pt.check_invariants(mem), Ok(1 + 256));
        pt.free_tables(mem, buddy);
        assert_eq!(tables_in_use(buddy), 0);
    })
}

#[test]
fn next_leaf_walks_the_lower_half_then_the_upper_half() {
    with_mm(|mem, buddy| {
        let mut pt = PageTable::new(buddy).unwrap();
        let vas = [0x1000u64, 0x20_0000, 0x7fff_ffff_f000, 0xffff_8000_0000_0000, 0xffff_ffff_ffff_f000];
        for &va in &vas {
            pt.map(mem, buddy, page::<Size4KiB>(va), frame(0x1000), RW).unwrap();
        }
        let mut seen = Vec::new();
        let mut at = Gva(0);
        while let Some(l) = pt.next_leaf(mem, at, Gva(u64::MAX)) {
            seen.push(l.va.0);
            at = Gva(canonicalize(l.va.0.wrapping_add(0x1000)));
            if at.0 == 0 {
                break;
            }
        }
        assert_eq!(seen, vas);
        assert_eq!(pt.next_leaf(mem, Gva(0x2000), Gva(1 << 47)).unwrap().va, Gva(0x20_0000));
        assert_eq!(pt.next_leaf(mem, Gva(0x1000), Gva(0x1000)), None);
        // Clear the lower half only.
        let mut cleared = 0;
        pt.clear_range(mem, buddy, Gva(0), Gva(1 << 47), |_| cleared += 1).ignore();
        assert_eq!(cleared, 3);
        assert_eq!(pt.next_leaf(mem, Gva(0), Gva(u64::MAX)).unwrap().va, Gva(0xffff_8000_0000_0000));
        pt.check_invariants(mem).unwrap();
    })
}

#[test]
fn update_and_remap_leaf_keep_the_size_and_return_the_old_entry() {
    with_mm(|mem, buddy| {
        let mut pt = PageTable::new(buddy).unwrap();
        pt.map(mem, buddy, page::<Size2MiB>(0x20_0000), frame(0x40_0000), RW | PteFlags::ACCESSED).unwrap();
        let (old, flush) = pt.update_leaf(mem, Gva(0x21_0000), |f| f - PteFlags::ACCESSED).unwrap();
        assert_eq!((old.va, flush.page()), (Gva(0x20_0000), Gva(0x20_0000)));
        flush.ignore();
        assert!(old.flags().contains(PteFlags::ACCESSED));
        let t = pt.translate(mem, Gva(0x20_0000)).unwrap();
        assert_eq!((t.flags, t.size), (PteFlags::PRESENT | RW, PageSizeKind::Size2MiB));
        pt.remap_leaf(mem, Gva(0x20_0000), Gpa(0x60_0000), PteFlags::empty()).unwrap().1.ignore();
        assert_eq!(pt.translate(mem, Gva(0x20_0008)).unwrap().addr, Gpa(0x60_0008));
        let (l, flush) = pt.unmap_leaf(mem, buddy, Gva(0x3f_f000)).unwrap();
        flush.ignore();
        assert_eq!(l.size, PageSizeKind::Size2MiB);
        assert_eq!(pt.check_invariants(mem), Ok(1));
    })
}

#[test]
fn a_flush_batch_invalidates_page_by_page_until_it_overflows() {
    let mmu = RecordingMmu::default();
    let mut b = FlushBatch::new();
    assert!(b.is_empty());
    b.add(MapperFlush::new(Gva(0x1000)));
    b.add(MapperFlush::new(Gva(0x2000)));
    b.finish(&mmu);
    assert_eq!(mmu.take(), [MmuEvent::Invlpg(Gva(0x1000)), MmuEvent::Invlpg(Gva(0x2000))]);
    let mut b = FlushBatch::new();
    for i in 0..=FlushBatch::CAPACITY as u64 {
        b.add(MapperFlush::new(Gva(i << 12)));
    }
    b.finish(&mmu);
    assert_eq!(mmu.take(), [MmuEvent::FlushAll]);
    MapperFlushAll::new().flush(&mmu);
    assert_eq!(mmu.take(), [MmuEvent::FlushAll]);
}

// ---------------------------------------------------------------- model

#[derive(Clone, Copy, Debug)]
enum Size {
    K4,
    M2,
    G1,
}

impl Size {
    fn kind(self) -> PageSizeKind {
        match self {
            Size::K4 => PageSizeKind::Size4KiB,
            Size::M2 => PageSizeKind::Size2MiB,
            Size::G1 => PageSizeKind::Size1GiB,
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Map(Size, u64, u64, u64),
    Unmap(Size, u64),
    Protect(Size, u64, u64),
    Translate(u64),
}

/// A virtual address among a few interesting table slots (both halves,
/// first and last entries), so that operations collide often.
fn va_strategy() -> impl Strategy<Value = u64> {
    (
        prop::sample::select(vec![0u64, 1, 256, 511]),
        prop::sample::select(vec![0u64, 1, 511]),
        prop::sample::select(vec![0u64, 1, 511]),
        prop::sample::select(vec![0u64, 1, 511]),
        0u64..4096,
    )
        .prop_map(|(a, b, c, d, off)| canonicalize(a << 39 | b << 30 | c << 21 | d << 12 | off))
}

fn size_strategy() -> impl Strategy<Value = Size> {
    prop_oneof![4 => Just(Size::K4), 2 => Just(Size::M2), 1 => Just(Size::G1)]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (size_strategy(), va_strategy(), 0u64..1024, any::<u64>()).prop_map(|(s, v, f, fl)| Op::Map(s, v, f, fl)),
        3 => (size_strategy(), va_strategy()).prop_map(|(s, v)| Op::Unmap(s, v)),
        1 => (size_strategy(), va_strategy(), any::<u64>()).prop_map(|(s, v, fl)| Op::Protect(s, v, fl)),
        2 => va_strategy().prop_map(Op::Translate),
    ]
}

/// The model: page start (48-bit linear) → (frame, size, flags).
type Model = BTreeMap<u64, (u64, PageSizeKind, PteFlags)>;

fn lin(va: u64) -> u64 {
    va & LINEAR_MASK
}

/// The model mapping covering `va`.
fn covering(m: &Model, va: u64) -> Option<(u64, (u64, PageSizeKind, PteFlags))> {
    let (&start, &v) = m.range(..=lin(va)).next_back()?;
    (lin(va) < start + v.1.bytes()).then_some((start, v))
}

fn model_map(m: &mut Model, va: u64, size: PageSizeKind, frame: u64, flags: PteFlags) -> Result<(), MapError> {
    if let Some((start, (_, s, _))) = covering(m, va) {
        return Err(if s > size {
            MapError::ParentIsHuge
        } else if start == lin(va) && s == size {
            MapError::AlreadyMapped
        } else {
            MapError::TableInTheWay
        });
    }
    if m.range(lin(va)..lin(va) + size.bytes()).next().is_some() {
        return Err(MapError::TableInTheWay);
    }
    m.insert(lin(va), (frame, size, flags.intersection(PteFlags::LEAF_SETTABLE) | PteFlags::PRESENT));
    Ok(())
}

/// The model's answer to unmap/protect of a page of `size` at `va`.
fn model_find(m: &Model, va: u64, size: PageSizeKind) -> Result<(u64, PteFlags), UnmapError> {
    match covering(m, va) {
        Some((_, (_, s, _))) if s > size => Err(UnmapError::SizeMismatch(s)),
        Some((start, (f, s, fl))) if start == lin(va) && s == size => Ok((f, fl)),
        _ => Err(UnmapError::NotMapped),
    }
}

fn do_map<S: PageSize, T: PageTableSource>(
    pt: &mut PageTable,
    mem: &ArenaMem<'_>,
    src: &mut T,
    va: u64,
    fr: u64,
    flags: PteFlags,
) -> Result<(), MapError> {
    pt.map(mem, src, page::<S>(va), frame::<S>(fr), flags)
}

fn do_unmap<S: PageSize, T: PageTableSource>(
    pt: &mut PageTable,
    mem: &ArenaMem<'_>,
    src: &mut T,
    va: u64,
) -> Result<(u64, PteFlags, Gva), UnmapError> {
    pt.unmap(mem, src, page::<S>(va)).map(|(f, fl, flush)| {
        let p = flush.page();
        flush.ignore();
        (f.start().0, fl, p)
    })
}

fn do_protect<S: PageSize>(
    pt: &mut PageTable,
    mem: &ArenaMem<'_>,
    va: u64,
    flags: PteFlags,
) -> Result<Gva, UnmapError> {
    pt.protect(mem, page::<S>(va), flags).map(|flush| {
        let p = flush.page();
        flush.ignore();
        p
    })
}

fn run_model(ops: &[Op], pinned: bool) {
    with_mm(|mem, buddy| {
        let mut src = CheckingSource { mem, inner: buddy, freed: 0 };
        let mut pt = if pinned { PageTable::new_pinned_upper(&mut src) } else { PageTable::new(&mut src) }.unwrap();
        let mut model = Model::new();
        for op in ops {
            match *op {
                Op::Map(size, va, f, flags) => {
                    let kind = size.kind();
                    let va = va & !(kind.bytes() - 1);
                    let fr = f * kind.bytes();
                    let flags = PteFlags::from_bits_truncate(flags);
                    let got = match size {
                        Size::K4 => do_map::<Size4KiB, _>(&mut pt, mem, &mut src, va, fr, flags),
                        Size::M2 => do_map::<Size2MiB, _>(&mut pt, mem, &mut src, va, fr, flags),
                        Size::G1 => do_map::<Size1GiB, _>(&mut pt, mem, &mut src, va, fr, flags),
                    };
                    assert_eq!(got, model_map(&mut model, va, kind, fr, flags), "{op:?}");
                }
                Op::Unmap(size, va) => {
                    let kind = size.kind();
                    let va = va & !(kind.bytes() - 1);
                    let got = match size {
                        Size::K4 => do_unmap::<Size4KiB, _>(&mut pt, mem, &mut src, va),
                        Size::M2 => do_unmap::<Size2MiB, _>(&mut pt, mem, &mut src, va),
                        Size::G1 => do_unmap::<Size1GiB, _>(&mut pt, mem, &mut src, va),
                    };
                    let want = model_find(&model, va, kind).map(|(f, fl)| (f, fl, Gva(va)));
                    if want.is_ok() {
                        model.remove(&lin(va));
                    }
                    assert_eq!(got, want, "{op:?}");
                }
                Op::Protect(size, va, flags) => {
                    let kind = size.kind();
                    let va = va & !(kind.bytes() - 1);
                    let flags = PteFlags::from_bits_truncate(flags);
                    let got = match size {
                        Size::K4 => do_protect::<Size4KiB>(&mut pt, mem, va, flags),
                        Size::M2 => do_protect::<Size2MiB>(&mut pt, mem, va, flags),
                        Size::G1 => do_protect::<Size1GiB>(&mut pt, mem, va, flags),
                    };
                    let want = model_find(&model, va, kind).map(|_| Gva(va));
                    if want.is_ok() {
                        model.get_mut(&lin(va)).unwrap().2 =
                            flags.intersection(PteFlags::LEAF_SETTABLE) | PteFlags::PRESENT;
                    }
                    assert_eq!(got, want, "{op:?}");
                }
                Op::Translate(va) => {
                    let want = covering(&model, va).map(|(start, (f, s, fl))| Translation {
                        addr: Gpa(f + lin(va) - start),
                        frame: Gpa(f),
                        flags: fl,
                        size: s,
                    });
                    assert_eq!(pt.translate(mem, Gva(va)), want, "{op:?}");
                }
            }
            // Invariants after every step: the structure is sound and every
            // table page in use is reachable from the root.
            let reachable = pt.check_invariants(mem).unwrap();
            assert_eq!(reachable as u64, tables_in_use(src.inner));
            src.inner.check_invariants().unwrap();
        }
        // Every model page is found by a walk, and nothing else.
        let mut walked = Vec::new();
        let mut at = Gva(0);
        while let Some(l) = pt.next_leaf(mem, at, Gva(u64::MAX)) {
            walked.push((lin(l.va.0), (l.entry.addr().0, l.size, l.flags())));
            match l.va.0.checked_add(l.size.bytes()) {
                Some(n) if n & LINEAR_MASK != 0 => at = Gva(canonicalize(n)),
                _ => break,
            }
        }
        assert_eq!(walked, model.iter().map(|(&k, &v)| (k, v)).collect::<Vec<_>>());
        // Unmap everything: only the root (and pinned upper PDPTs) remain.
        for (&va, &(_, size, _)) in &model {
            let va = canonicalize(va);
            let r = match size {
                PageSizeKind::Size4KiB => do_unmap::<Size4KiB, _>(&mut pt, mem, &mut src, va),
                PageSizeKind::Size2MiB => do_unmap::<Size2MiB, _>(&mut pt, mem, &mut src, va),
                PageSizeKind::Size1GiB => do_unmap::<Size1GiB, _>(&mut pt, mem, &mut src, va),
            };
            r.unwrap();
        }
        let upper_pdpts = (UPPER_HALF_FIRST..ENTRIES).filter(|&i| read_entry(mem, pt.root(), i).is_present()).count();
        if !pinned {
            assert_eq!(upper_pdpts, 0);
        }
        assert_eq!(tables_in_use(src.inner), 1 + upper_pdpts as u64);
        assert_eq!(
            src.freed as u64 + tables_in_use(src.inner),
            src.inner.stats(crate::buddy::ZoneId::PageTables).allocs
        );
        pt.free_tables(mem, &mut src);
        assert_eq!(tables_in_use(src.inner), 0, "every table page is back in the allocator");
        src.inner.drain_hot_lists();
        src.inner.check_invariants().unwrap();
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn page_tables_answer_like_the_model(ops in prop::collection::vec(op_strategy(), 1..80)) {
        run_model(&ops, false);
    }

    #[test]
    fn pinned_page_tables_answer_like_the_model(ops in prop::collection::vec(op_strategy(), 1..60)) {
        run_model(&ops, true);
    }
}
