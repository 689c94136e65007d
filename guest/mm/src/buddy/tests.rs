//! Host tests of the buddy allocator: one unit test per behaviour, then a
//! property test against a model (a bitmap of free frames).

use std::cell::Cell;
use std::collections::BTreeSet;
use std::vec::Vec;

use guest_abi::Gpa;

use super::*;
use crate::phys::{ArenaMem, FRAME_WORDS};

/// Backing memory and metadata for one allocator.
struct Fixture {
    base: Pfn,
    backing: Vec<u64>,
    meta: Vec<FrameMeta>,
    sections: Vec<u8>,
}

impl Fixture {
    fn new(base: Pfn, frames: usize) -> Self {
        let sections = vec![0; section_bytes(frames as u64) as usize];
        Self { base, backing: vec![0; frames * FRAME_WORDS], meta: vec![FrameMeta::default(); frames], sections }
    }

    /// Like [`empty`](Self::empty), with deferred initialisation (over the
    /// fixture's zeroed metadata and section arrays).
    fn empty_deferred(&mut self, pgtables: FrameRange) -> BuddyAllocator<'_, ArenaMem<'_>> {
        let mem = ArenaMem::new(self.base.addr(), &mut self.backing);
        let mut a = BuddyAllocator::new_deferred(mem, &mut self.meta, &mut self.sections, self.base, pgtables).unwrap();
        a.set_verify_pgtables(true);
        a
    }

    /// An allocator over the whole fixture with the given page-table zone,
    /// nothing added yet.
    fn empty(&mut self, pgtables: FrameRange) -> BuddyAllocator<'_, ArenaMem<'_>> {
        let mem = ArenaMem::new(self.base.addr(), &mut self.backing);
        let mut a = BuddyAllocator::new(mem, &mut self.meta, self.base, pgtables).unwrap();
        a.set_verify_pgtables(true);
        a
    }

    /// An allocator with every frame added.
    fn full(&mut self, pgtables: FrameRange) -> BuddyAllocator<'_, ArenaMem<'_>> {
        let span = FrameRange::new(self.base, self.base.add(self.meta.len() as u64));
        let mut a = self.empty(pgtables);
        a.add_free_range(span).unwrap();
        a
    }
}

/// The free lists as a sorted list of `(head, order, zone)`.
fn free_blocks<M: PhysMem>(a: &BuddyAllocator<'_, M>) -> Vec<(u64, u8, ZoneId)> {
    let mut v = Vec::new();
    a.for_each_free_block(|p, o, z| v.push((p.0, o, z)));
    v.sort_by_key(|b| b.0);
    v
}

fn hot_frames<M: PhysMem>(a: &BuddyAllocator<'_, M>) -> Vec<u64> {
    let mut v = Vec::new();
    a.for_each_hot_frame(|p, _| v.push(p.0));
    v
}

/// A frame range in the NORMAL zone only: `[DMA_LIMIT, DMA_LIMIT + n)`.
fn normal(n: u64) -> Fixture {
    Fixture::new(DMA_LIMIT, n as usize)
}

const NO_PGTABLES: FrameRange = FrameRange { start: Pfn(0), end: Pfn(0) };

#[test]
fn a_new_allocator_manages_nothing_until_ranges_are_added() {
    let mut fx = normal(64);
    let mut a = fx.empty(NO_PGTABLES);
    assert_eq!(a.alloc(0, ZonePref::Normal), None);
    assert_eq!(a.stats(ZoneId::Normal).managed_pages, 0);
    assert_eq!(a.free(DMA_LIMIT, 0), Err(FreeError::NotManaged));
    a.check_invariants().unwrap();
}

#[test]
fn garbage_metadata_is_overwritten_by_new() {
    let mut fx = normal(16);
    for m in &mut fx.meta {
        *m = FrameMeta { prev: 7, next: 9, owner: [3, 4], order: 200, state: 99, zone: 42, _pad: 1 };
    }
    let a = fx.full(NO_PGTABLES);
    a.check_invariants().unwrap();
    assert_eq!(free_blocks(&a), vec![(DMA_LIMIT.0, 4, ZoneId::Normal)]);
}

#[test]
fn added_ranges_become_maximal_naturally_aligned_blocks() {
    let mut fx = Fixture::new(Pfn(0), 1030);
    let mut a = fx.empty(NO_PGTABLES);
    a.add_free_range(FrameRange::new(Pfn(1), Pfn(1030))).unwrap();
    a.check_invariants().unwrap();
    let expected: Vec<_> = [(1, 0), (2, 1), (4, 2), (8, 3), (16, 4), (32, 5), (64, 6), (128, 7), (256, 8), (512, 9)]
        .into_iter()
        .chain([(1024, 2), (1028, 1)])
        .map(|(p, o)| (p, o, ZoneId::Dma))
        .collect();
    assert_eq!(free_blocks(&a), expected);
    assert_eq!(a.stats(ZoneId::Dma).managed_pages, 1029);
    assert_eq!(a.stats(ZoneId::Dma).free_pages, 1029);
}

#[test]
fn blocks_are_capped_at_max_order() {
    let mut fx = normal(4096);
    let a = fx.full(NO_PGTABLES);
    let blocks = free_blocks(&a);
    assert_eq!(blocks.len(), 4);
    assert!(blocks.iter().all(|&(_, o, _)| o == MAX_ORDER));
}

#[test]
fn adjacent_ranges_added_separately_merge() {
    let mut fx = normal(64);
    let mut a = fx.empty(NO_PGTABLES);
    a.add_free_range(FrameRange::new(DMA_LIMIT, DMA_LIMIT.add(32))).unwrap();
    a.add_free_range(FrameRange::new(DMA_LIMIT.add(32), DMA_LIMIT.add(64))).unwrap();
    assert_eq!(free_blocks(&a), vec![(DMA_LIMIT.0, 6, ZoneId::Normal)]);
    assert_eq!(a.stats(ZoneId::Normal).merges, 1);
}

#[test]
fn blocks_never_straddle_zone_boundaries() {
    // 64 DMA frames, then NORMAL with a page-table zone at +16..+48.
    let base = Pfn(DMA_LIMIT.0 - 64);
    let pt = FrameRange::new(DMA_LIMIT.add(16), DMA_LIMIT.add(48));
    let mut fx = Fixture::new(base, 192);
    let a = fx.full(pt);
    a.check_invariants().unwrap();
    for (p, o, z) in free_blocks(&a) {
        let (first, last) = (Pfn(p), Pfn(p + (1 << o) - 1));
        assert_eq!(a.zone_of(first), Some(z));
        assert_eq!(a.zone_of(last), Some(z));
        let expected = if pt.contains(first) {
            ZoneId::PageTables
        } else if first < DMA_LIMIT {
            ZoneId::Dma
        } else {
            ZoneId::Normal
        };
        assert_eq!(z, expected);
    }
    assert_eq!(a.stats(ZoneId::Dma).managed_pages, 64);
    assert_eq!(a.stats(ZoneId::PageTables).managed_pages, 32);
    assert_eq!(a.stats(ZoneId::Normal).managed_pages, 96);
}

#[test]
fn the_page_table_zone_takes_precedence_over_dma() {
    let pt = FrameRange::new(Pfn(8), Pfn(16));
    let mut fx = Fixture::new(Pfn(0), 32);
    let a = fx.full(pt);
    assert_eq!(a.zone_of(Pfn(7)), Some(ZoneId::Dma));
    assert_eq!(a.zone_of(Pfn(8)), Some(ZoneId::PageTables));
    assert_eq!(a.zone_of(Pfn(16)), Some(ZoneId::Dma));
    assert_eq!(a.zone_of(Pfn(32)), None);
    assert_eq!(a.stats(ZoneId::PageTables).managed_pages, 8);
}

#[test]
fn bad_ranges_and_zones_are_refused_and_change_nothing() {
    let mut fx = normal(64);
    assert_eq!(
        BuddyAllocator::new(ArenaMem::new(DMA_LIMIT.addr(), &mut fx.backing), &mut fx.meta, DMA_LIMIT, {
            FrameRange::new(DMA_LIMIT.add(60), DMA_LIMIT.add(70))
        })
        .err(),
        Some(InitError::PageTablesOutsideSpan)
    );
    let pt = FrameRange::new(DMA_LIMIT.add(32), DMA_LIMIT.add(48));
    let mut fx = normal(64);
    fx.backing[40 * FRAME_WORDS + 3] = 1; // a dirty frame in the page-table zone
    let mut a = fx.empty(pt);
    let whole = FrameRange::new(DMA_LIMIT, DMA_LIMIT.add(64));
    assert_eq!(a.add_free_range(FrameRange::new(DMA_LIMIT, DMA_LIMIT.add(65))), Err(InitError::RangeOutsideSpan));
    assert_eq!(a.add_free_range(FrameRange::new(Pfn(0), DMA_LIMIT)), Err(InitError::RangeOutsideSpan));
    assert_eq!(a.add_free_range(whole), Err(InitError::PageTablesNotZeroed));
    assert_eq!(free_blocks(&a), vec![]);
    a.add_free_range(FrameRange::new(DMA_LIMIT, DMA_LIMIT.add(32))).unwrap();
    let before = free_blocks(&a);
    assert_eq!(a.add_free_range(FrameRange::new(DMA_LIMIT.add(16), DMA_LIMIT.add(33))), Err(InitError::AlreadyManaged));
    assert_eq!(free_blocks(&a), before);
    a.check_invariants().unwrap();
    // Without verification the dirty frame is accepted (the VMM promised).
    a.set_verify_pgtables(false);
    a.add_free_range(FrameRange::new(DMA_LIMIT.add(32), DMA_LIMIT.add(64))).unwrap();
}

#[test]
fn a_span_too_large_for_u32_indices_is_refused() {
    // Build the metadata slice lazily: a zero-sized check is enough to
    // exercise the overflow path of the base.
    let mut backing = vec![0u64; FRAME_WORDS];
    let mut meta = vec![FrameMeta::default(); 1];
    let r = BuddyAllocator::new(ArenaMem::new(Gpa(0), &mut backing), &mut meta, Pfn(u64::MAX), NO_PGTABLES);
    assert_eq!(r.err(), Some(InitError::SpanTooLarge));
}

#[test]
fn every_order_is_served_naturally_aligned() {
    let mut fx = normal(4096);
    let mut a = fx.full(NO_PGTABLES);
    // Misalign the free memory first with a single order-0 allocation.
    let first = a.alloc(0, ZonePref::Normal).unwrap();
    for order in 0..=MAX_ORDER {
        let p = a.alloc(order, ZonePref::Normal).unwrap();
        assert!(p.is_aligned(order), "order {order} at {p:?}");
        assert!(p.addr().is_aligned(crate::PAGE_SIZE << order));
        a.check_invariants().unwrap();
    }
    assert_ne!(first, Pfn(0));
}

#[test]
fn orders_above_max_order_are_refused() {
    let mut fx = normal(1024);
    let mut a = fx.full(NO_PGTABLES);
    assert_eq!(a.alloc(MAX_ORDER + 1, ZonePref::Normal), None);
    assert_eq!(a.stats(ZoneId::Normal).failures, 1);
    assert_eq!(a.free(DMA_LIMIT, MAX_ORDER + 1), Err(FreeError::InvalidOrder));
}

#[test]
fn allocation_splits_by_halving_and_freeing_merges_back() {
    let mut fx = normal(1024);
    let mut a = fx.full(NO_PGTABLES);
    let initial = free_blocks(&a);
    let p = a.alloc(1, ZonePref::Normal).unwrap();
    assert_eq!(p, DMA_LIMIT, "the lower half is kept");
    // 1024 -> 512+512 -> ... -> 2+2: nine splits leave one block of each
    // order 1..=9 free, the upper halves.
    assert_eq!(a.stats(ZoneId::Normal).splits, 9);
    let expected: Vec<_> = (1..=9u8).map(|o| (DMA_LIMIT.0 + (1 << o), o, ZoneId::Normal)).collect();
    assert_eq!(free_blocks(&a), expected);
    a.free(p, 1).unwrap();
    assert_eq!(a.stats(ZoneId::Normal).merges, 9);
    assert_eq!(free_blocks(&a), initial);
    a.check_invariants().unwrap();
}

#[test]
fn a_block_merges_only_with_a_free_buddy_of_the_same_order() {
    let mut fx = normal(4);
    let mut a = fx.full(NO_PGTABLES);
    let p0 = a.alloc(1, ZonePref::Normal).unwrap(); // frames 0,1
    let p2 = a.alloc(1, ZonePref::Normal).unwrap(); // frames 2,3
    a.free(p2, 1).unwrap();
    // p2's buddy p0 is allocated: no merge.
    assert_eq!(free_blocks(&a), vec![(p2.0, 1, ZoneId::Normal)]);
    assert_eq!(a.stats(ZoneId::Normal).merges, 0);
    a.free(p0, 1).unwrap();
    assert_eq!(free_blocks(&a), vec![(p0.0, 2, ZoneId::Normal)]);
    a.check_invariants().unwrap();
}

#[test]
fn normal_falls_back_to_dma_and_dma_never_uses_normal() {
    let base = Pfn(DMA_LIMIT.0 - 4);
    let mut fx = Fixture::new(base, 8);
    let mut a = fx.full(NO_PGTABLES);
    for _ in 0..4 {
        let p = a.alloc(0, ZonePref::Normal).unwrap();
        assert_eq!(a.zone_of(p), Some(ZoneId::Normal));
    }
    for _ in 0..4 {
        let p = a.alloc(0, ZonePref::Normal).unwrap();
        assert_eq!(a.zone_of(p), Some(ZoneId::Dma));
    }
    assert_eq!(a.alloc(0, ZonePref::Normal), None);
    assert_eq!(a.stats(ZoneId::Normal).failures, 1);

    let mut fx = Fixture::new(base, 8);
    let mut a = fx.full(NO_PGTABLES);
    let d = a.alloc(2, ZonePref::Dma).unwrap();
    assert_eq!(a.zone_of(d), Some(ZoneId::Dma));
    assert_eq!(a.alloc(0, ZonePref::Dma), None);
    assert_eq!(a.stats(ZoneId::Dma).failures, 1);
    assert_eq!(a.stats(ZoneId::Normal).free_pages, 4);
}

#[test]
fn ordinary_allocations_never_come_from_the_page_table_zone() {
    let pt = FrameRange::new(DMA_LIMIT.add(8), DMA_LIMIT.add(16));
    let mut fx = normal(16);
    let mut a = fx.full(pt);
    let mut got = BTreeSet::new();
    while let Some(p) = a.alloc(0, ZonePref::Normal) {
        assert!(!pt.contains(p));
        got.insert(p);
    }
    assert_eq!(got.len(), 8);
    assert_eq!(a.stats(ZoneId::PageTables).free_pages, 8);
}

#[test]
fn out_of_memory_returns_none_and_is_counted() {
    let mut fx = normal(8);
    let mut a = fx.full(NO_PGTABLES);
    assert_eq!(a.alloc(4, ZonePref::Normal), None);
    let p = a.alloc(3, ZonePref::Normal).unwrap();
    assert_eq!(a.alloc(0, ZonePref::Normal), None);
    assert_eq!(a.stats(ZoneId::Normal).failures, 2);
    a.free(p, 3).unwrap();
    assert_eq!(a.stats(ZoneId::Normal).allocs, 1);
    assert_eq!(a.stats(ZoneId::Normal).frees, 1);
}

#[test]
fn bad_frees_are_reported_and_change_nothing() {
    let base = Pfn(DMA_LIMIT.0 - 16);
    let pt = FrameRange::new(DMA_LIMIT.add(16), DMA_LIMIT.add(32));
    let mut fx = Fixture::new(base, 64);
    let mut a = fx.empty(pt);
    // Leave the last 8 frames reserved.
    a.add_free_range(FrameRange::new(base, base.add(56))).unwrap();
    let big = a.alloc(2, ZonePref::Normal).unwrap();
    let small = a.alloc(0, ZonePref::Normal).unwrap();
    let gone = a.alloc(1, ZonePref::Normal).unwrap();
    a.free(gone, 1).unwrap();
    let pt_page = a.alloc_pgtable().unwrap();
    let snapshot = (free_blocks(&a), hot_frames(&a), a.stats(ZoneId::Normal));
    let cases = [
        (big, 1, FreeError::WrongOrder { allocated: 2 }),
        (big, 3, FreeError::WrongOrder { allocated: 2 }),
        (big.add(1), 0, FreeError::NotBlockHead),
        (big.add(2), 1, FreeError::NotBlockHead),
        (small, 1, FreeError::WrongOrder { allocated: 0 }),
        (gone, 1, FreeError::DoubleFree),
        (base.add(60), 0, FreeError::NotManaged),
        (base.add(64), 0, FreeError::OutOfRange),
        (Pfn(base.0 - 1), 0, FreeError::OutOfRange),
        (Pfn(0), 0, FreeError::OutOfRange),
        (pt_page, 0, FreeError::WrongZone),
        (big, MAX_ORDER + 1, FreeError::InvalidOrder),
    ];
    for (pfn, order, err) in cases {
        assert_eq!(a.free(pfn, order), Err(err), "free({pfn:?}, {order})");
        assert_eq!((free_blocks(&a), hot_frames(&a), a.stats(ZoneId::Normal)), snapshot);
        a.check_invariants().unwrap();
    }
    assert_eq!(a.free_pgtable(small), Err(FreeError::WrongZone));
    a.free(small, 0).unwrap();
    assert_eq!(a.free(small, 0), Err(FreeError::DoubleFree), "a hot frame freed twice");
    // Once the hot frame has merged into a larger free block, a second
    // free hits a tail or a free head: still refused.
    a.drain_hot_lists();
    let again = a.free(small, 0);
    assert!(matches!(again, Err(FreeError::DoubleFree | FreeError::NotBlockHead)), "{again:?}");
    a.free(big, 2).unwrap();
    a.check_invariants().unwrap();
}

#[test]
fn a_freed_order0_frame_is_the_next_one_allocated() {
    let mut fx = normal(256);
    let mut a = fx.full(NO_PGTABLES);
    let p = a.alloc(0, ZonePref::Normal).unwrap();
    assert_eq!(a.stats(ZoneId::Normal).hot_pages, HOT_BATCH as u64 - 1, "refilled a batch");
    let q = a.alloc(0, ZonePref::Normal).unwrap();
    a.free(p, 0).unwrap();
    assert_eq!(a.alloc(0, ZonePref::Normal), Some(p), "hot (LIFO) reuse");
    a.free(q, 0).unwrap();
    a.free(p, 0).unwrap();
    a.check_invariants().unwrap();
}

#[test]
fn the_hot_list_stays_bounded_and_drains_its_oldest_frames() {
    let mut fx = normal(1024);
    let mut a = fx.full(NO_PGTABLES);
    let initial = free_blocks(&a);
    let frames: Vec<_> = (0..200).map(|_| a.alloc(0, ZonePref::Normal).unwrap()).collect();
    for (i, &p) in frames.iter().enumerate() {
        a.free(p, 0).unwrap();
        let hot = a.stats(ZoneId::Normal).hot_pages as usize;
        assert!(hot <= HOT_HIGH);
        assert_eq!(hot_frames(&a).last(), Some(&p.0), "the newest frame is on top");
        if i + 1 > HOT_HIGH {
            assert!(hot > HOT_HIGH - HOT_BATCH);
        }
        a.check_invariants().unwrap();
    }
    a.drain_hot_lists();
    assert_eq!(hot_frames(&a), vec![]);
    assert_eq!(free_blocks(&a), initial);
}

#[test]
fn order0_frees_return_to_their_own_zones_hot_list() {
    // 64 DMA frames below 16 MiB, 64 NORMAL frames above.
    let base = Pfn(DMA_LIMIT.0 - 64);
    let mut fx = Fixture::new(base, 128);
    let mut a = fx.full(NO_PGTABLES);
    let d = a.alloc(0, ZonePref::Dma).unwrap();
    let n = a.alloc(0, ZonePref::Normal).unwrap();
    assert_eq!((a.zone_of(d), a.zone_of(n)), (Some(ZoneId::Dma), Some(ZoneId::Normal)));
    let (dma_hot, normal_hot) = (a.stats(ZoneId::Dma).hot_pages, a.stats(ZoneId::Normal).hot_pages);
    a.free(d, 0).unwrap();
    a.free(n, 0).unwrap();
    assert_eq!(a.stats(ZoneId::Dma).hot_pages, dma_hot + 1);
    assert_eq!(a.stats(ZoneId::Normal).hot_pages, normal_hot + 1);
    assert_eq!((a.stats(ZoneId::Dma).frees, a.stats(ZoneId::Normal).frees), (1, 1));
    assert_eq!(a.alloc(0, ZonePref::Dma), Some(d));
    assert_eq!(a.alloc(0, ZonePref::Normal), Some(n));
    a.check_invariants().unwrap();
}

#[test]
fn a_high_order_allocation_drains_the_hot_list_rather_than_fail() {
    let mut fx = normal(4);
    let mut a = fx.full(NO_PGTABLES);
    let frames: Vec<_> = (0..4).map(|_| a.alloc(0, ZonePref::Normal).unwrap()).collect();
    for p in frames {
        a.free(p, 0).unwrap();
    }
    assert_eq!(a.stats(ZoneId::Normal).hot_pages, 4);
    assert_eq!(a.stats(ZoneId::Normal).free_pages, 0);
    assert_eq!(a.alloc(2, ZonePref::Normal), Some(DMA_LIMIT));
    a.check_invariants().unwrap();
}

#[test]
fn alloc_zeroed_zeroes_every_frame_of_the_block() {
    let mut fx = normal(8);
    fx.backing.iter_mut().for_each(|w| *w = 0xdead_beef);
    let mut a = fx.full(NO_PGTABLES);
    let p = a.alloc_zeroed(3, ZonePref::Normal).unwrap();
    assert!((0..8).all(|i| a.mem().frame_is_zero(p.add(i))));
}

/// A physical memory that counts reads and writes, to prove the page-table
/// zone is served without writes.
struct Counting<M> {
    inner: M,
    reads: Cell<u64>,
    writes: Cell<u64>,
}

impl<M: PhysMem> PhysMem for Counting<M> {
    fn read_u64(&self, addr: Gpa) -> u64 {
        self.reads.set(self.reads.get() + 1);
        self.inner.read_u64(addr)
    }
    fn write_u64(&self, addr: Gpa, value: u64) {
        self.writes.set(self.writes.get() + 1);
        self.inner.write_u64(addr, value)
    }
}

#[test]
fn page_table_pages_come_out_zeroed_without_being_written() {
    let pt = FrameRange::new(DMA_LIMIT.add(16), DMA_LIMIT.add(32));
    let mut backing = vec![0u64; 32 * FRAME_WORDS];
    let mut meta = vec![FrameMeta::default(); 32];
    let arena = ArenaMem::new(DMA_LIMIT.addr(), &mut backing);
    let mem = Counting { inner: &arena, reads: Cell::new(0), writes: Cell::new(0) };
    let mut a = BuddyAllocator::new(&mem, &mut meta, DMA_LIMIT, pt).unwrap();
    a.set_verify_pgtables(true);
    a.add_free_range(FrameRange::new(DMA_LIMIT, DMA_LIMIT.add(32))).unwrap();
    let pages: Vec<_> = (0..16).map(|_| a.alloc_pgtable().unwrap()).collect();
    assert!(pages.iter().all(|&p| pt.contains(p) && arena.frame_is_zero(p)));
    assert_eq!(a.alloc_pgtable(), None, "page tables never come from another zone");
    assert_eq!(a.stats(ZoneId::PageTables).failures, 1);
    for &p in &pages {
        a.free_pgtable(p).unwrap();
    }
    for _ in 0..100 {
        let p = a.alloc_pgtable().unwrap();
        a.free_pgtable(p).unwrap();
    }
    assert_eq!(mem.writes.get(), 0, "the allocator never writes a page-table page");
    assert!(mem.reads.get() > 0, "verification reads");
    a.check_invariants().unwrap();

    // With verification off, nothing is read either.
    a.set_verify_pgtables(false);
    let reads = mem.reads.get();
    let p = a.alloc_pgtable().unwrap();
    a.free_pgtable(p).unwrap();
    assert_eq!((mem.reads.get(), mem.writes.get()), (reads, 0));
}

#[test]
fn a_page_table_page_with_a_live_entry_is_not_taken_back() {
    let pt = FrameRange::new(DMA_LIMIT, DMA_LIMIT.add(4));
    let mut fx = normal(8);
    let mut a = fx.full(pt);
    let p = a.alloc_pgtable().unwrap();
    let entry = p.addr().checked_add(511 * 8).unwrap();
    a.mem().write_u64(entry, 0x1000 | 1);
    assert_eq!(a.free_pgtable(p), Err(FreeError::NotZeroed));
    assert_eq!(a.free_pgtable(p), Err(FreeError::NotZeroed), "still allocated, still refused");
    a.mem().write_u64(entry, 0);
    a.free_pgtable(p).unwrap();
    assert_eq!(a.free_pgtable(p), Err(FreeError::DoubleFree));
    let n = a.alloc(0, ZonePref::Normal).unwrap();
    assert_eq!(a.free_pgtable(n), Err(FreeError::WrongZone));
    a.check_invariants().unwrap();
}

#[test]
fn errors_describe_themselves_without_formatting() {
    let errs = [
        FreeError::OutOfRange,
        FreeError::NotManaged,
        FreeError::NotBlockHead,
        FreeError::DoubleFree,
        FreeError::WrongOrder { allocated: 1 },
        FreeError::InvalidOrder,
        FreeError::WrongZone,
        FreeError::NotZeroed,
    ];
    let texts: BTreeSet<_> = errs.iter().map(|e| e.as_str()).collect();
    assert_eq!(texts.len(), errs.len());
    assert_eq!(std::format!("{}", FreeError::DoubleFree), "block already free");
    assert_eq!(InitError::AlreadyManaged.as_str(), "range already managed");
    assert_eq!(ZoneId::ALL.map(ZoneId::as_str), ["DMA", "Normal", "PageTables"]);
    assert_eq!(meta_bytes(10), 200);
}

#[test]
fn an_allocated_block_carries_its_owners_tag_until_freed() {
    let mut fx = normal(64);
    let mut a = fx.full(NO_PGTABLES);
    let p = a.alloc(2, ZonePref::Normal).unwrap();
    assert_eq!(a.block_tag(p), Some((2, [0; 4])), "a fresh block has a clear tag");
    assert!(a.set_block_tag(p, [1, 2, 3, 4]));
    assert_eq!(a.block_tag(p), Some((2, [1, 2, 3, 4])));
    assert_eq!(a.block_tag(p.add(1)), None, "a tail has no tag");
    assert!(!a.set_block_tag(p.add(1), [9; 4]));
    assert!(!a.set_block_tag(Pfn(0), [9; 4]));
    a.check_invariants().unwrap();
    a.free(p, 2).unwrap();
    assert_eq!(a.block_tag(p), None, "a free block has no tag");
    a.check_invariants().unwrap();
    let q = a.alloc(2, ZonePref::Normal).unwrap();
    assert_eq!(q, p);
    assert_eq!(a.block_tag(q), Some((2, [0; 4])), "the old owner's tag is gone");
    // Order 0 goes through the hot list: the same holds.
    let r = a.alloc(0, ZonePref::Normal).unwrap();
    assert!(a.set_block_tag(r, [5; 4]));
    a.free(r, 0).unwrap();
    assert_eq!(a.alloc(0, ZonePref::Normal), Some(r));
    assert_eq!(a.block_tag(r), Some((0, [0; 4])));
    a.free(r, 0).unwrap();
    // And page-table pages.
    let mut fx = normal(8);
    let mut a = fx.full(FrameRange::new(DMA_LIMIT, DMA_LIMIT.add(8)));
    let t = a.alloc_pgtable().unwrap();
    assert!(a.set_block_tag(t, [7; 4]));
    a.free_pgtable(t).unwrap();
    assert_eq!(a.alloc_pgtable(), Some(t));
    assert_eq!(a.block_tag(t), Some((0, [0; 4])));
}

// ---- deferred initialisation ----

/// A span of DMA frames below 16 MiB, then NORMAL, with a 2-section
/// page-table zone: `[DMA_LIMIT - 1024 - 7, DMA_LIMIT + 7 * 1024 + 5)`.
const D_BASE: Pfn = Pfn(DMA_LIMIT.0 - SECTION_FRAMES - 7);
const D_FRAMES: u64 = 8 * SECTION_FRAMES + 12;
const D_PGTABLES: FrameRange =
    FrameRange { start: Pfn(DMA_LIMIT.0 + 2 * SECTION_FRAMES), end: Pfn(DMA_LIMIT.0 + 4 * SECTION_FRAMES) };

fn deferred_fixture() -> Fixture {
    Fixture::new(D_BASE, D_FRAMES as usize)
}

#[test]
fn whole_sections_are_deferred_without_writing_metadata() {
    let mut fx = deferred_fixture();
    let span = FrameRange::new(D_BASE, D_BASE.add(D_FRAMES));
    let mut a = fx.empty_deferred(D_PGTABLES);
    a.add_free_range(span).unwrap();
    a.check_invariants().unwrap();
    assert!(a.deferred_metadata_is_zero());
    let mut deferred = Vec::new();
    a.for_each_deferred_section(|p, z| deferred.push((p.0, z)));
    // The ragged ends (7 DMA frames, 5 NORMAL frames at the top) and the
    // partial first section are initialised; every whole section is
    // deferred, the page-table zone's too.
    let n = DMA_LIMIT.0;
    let mut expect = vec![(n - SECTION_FRAMES, ZoneId::Dma)];
    expect.extend((0..7).map(|i| {
        let z = if (2..4).contains(&i) { ZoneId::PageTables } else { ZoneId::Normal };
        (n + i * SECTION_FRAMES, z)
    }));
    assert_eq!(deferred, expect);
    let (dma, normal, pt) = (a.stats(ZoneId::Dma), a.stats(ZoneId::Normal), a.stats(ZoneId::PageTables));
    assert_eq!((dma.free_pages, dma.deferred_pages, dma.managed_pages), (7, 1024, 1024 + 7));
    assert_eq!((normal.free_pages, normal.deferred_pages, normal.managed_pages), (5, 5 * 1024, 5 * 1024 + 5));
    assert_eq!((pt.free_pages, pt.deferred_pages, pt.managed_pages), (0, 2 * 1024, 2 * 1024));
    // Zones of deferred frames are answered by the layout.
    assert_eq!(a.zone_of(Pfn(n + 2 * SECTION_FRAMES + 3)), Some(ZoneId::PageTables));
    assert_eq!(a.zone_of(Pfn(n + 5 * SECTION_FRAMES + 3)), Some(ZoneId::Normal));
}

#[test]
fn an_eager_allocator_defers_nothing() {
    let mut fx = deferred_fixture();
    let span = FrameRange::new(D_BASE, D_BASE.add(D_FRAMES));
    let mut a = fx.empty(D_PGTABLES);
    a.add_free_range(span).unwrap();
    a.check_invariants().unwrap();
    let mut n = 0;
    a.for_each_deferred_section(|_, _| n += 1);
    assert_eq!(n, 0);
    assert_eq!(a.stats(ZoneId::Normal).free_pages, 5 * 1024 + 5);
}

#[test]
fn deferred_sections_are_grown_lowest_first_when_the_free_lists_run_dry() {
    let mut fx = deferred_fixture();
    let span = FrameRange::new(D_BASE, D_BASE.add(D_FRAMES));
    let mut a = fx.empty_deferred(D_PGTABLES);
    a.add_free_range(span).unwrap();
    let initial_free = free_blocks(&a);
    // An order-3 block: the 5 ragged NORMAL frames (blocks of order 2 and
    // 0) cannot serve it, so a section is grown, the lowest NORMAL one; the
    // others stay deferred.
    let p = a.alloc(3, ZonePref::Normal).unwrap();
    assert!(FrameRange::new(DMA_LIMIT, DMA_LIMIT.add(SECTION_FRAMES)).contains(p), "{p:?}");
    assert_eq!(a.stats(ZoneId::Normal).deferred_pages, 4 * 1024);
    let small: Vec<_> = (0..5).map(|_| a.alloc(0, ZonePref::Normal).unwrap()).collect();
    assert_eq!(a.stats(ZoneId::Normal).deferred_pages, 4 * 1024);
    a.check_invariants().unwrap();
    assert!(a.deferred_metadata_is_zero());
    // Every NORMAL frame can be allocated (order 10 grows the rest), and no
    // more; then everything comes back fully merged.
    let mut big = Vec::new();
    while let Some(b) = a.alloc(MAX_ORDER, ZonePref::Normal) {
        big.push(b);
    }
    // The 4 NORMAL sections not yet grown, then the DMA one (the fallback).
    let zones: Vec<_> = big.iter().map(|&b| a.zone_of(b).unwrap()).collect();
    assert_eq!(zones, [ZoneId::Normal, ZoneId::Normal, ZoneId::Normal, ZoneId::Normal, ZoneId::Dma]);
    assert_eq!(a.stats(ZoneId::Normal).deferred_pages + a.stats(ZoneId::Dma).deferred_pages, 0);
    a.check_invariants().unwrap();
    for b in big {
        a.free(b, MAX_ORDER).unwrap();
    }
    a.check_invariants().unwrap();
    for q in small {
        a.free(q, 0).unwrap();
    }
    a.free(p, 3).unwrap();
    a.drain_hot_lists();
    a.check_invariants().unwrap();
    let s = a.stats(ZoneId::Normal);
    assert_eq!((s.free_pages, s.deferred_pages), (5 * 1024 + 5, 0));
    let mut expect = initial_free;
    expect.extend([0, 1, 4, 5, 6].map(|i| (DMA_LIMIT.0 + i * SECTION_FRAMES, MAX_ORDER, ZoneId::Normal)));
    expect.push((DMA_LIMIT.0 - SECTION_FRAMES, MAX_ORDER, ZoneId::Dma));
    expect.sort_by_key(|b| b.0);
    assert_eq!(free_blocks(&a), expect);
}

#[test]
fn page_table_pages_come_from_grown_sections_zeroed() {
    let mut fx = deferred_fixture();
    let span = FrameRange::new(D_BASE, D_BASE.add(D_FRAMES));
    let mut a = fx.empty_deferred(D_PGTABLES);
    a.add_free_range(span).unwrap();
    let p = a.alloc_pgtable().unwrap();
    assert!(D_PGTABLES.contains(p) && a.mem().frame_is_zero(p));
    assert_eq!(a.stats(ZoneId::PageTables).deferred_pages, 1024);
    a.free_pgtable(p).unwrap();
    a.check_invariants().unwrap();
}

#[test]
fn frees_and_adds_inside_deferred_sections_are_refused_and_change_nothing() {
    let mut fx = deferred_fixture();
    let span = FrameRange::new(D_BASE, D_BASE.add(D_FRAMES));
    let mut a = fx.empty_deferred(D_PGTABLES);
    a.add_free_range(FrameRange::new(D_BASE, DMA_LIMIT.add(3 * SECTION_FRAMES))).unwrap();
    let before = (free_blocks(&a), ZoneId::ALL.map(|z| a.stats(z)));
    let inside = DMA_LIMIT.add(SECTION_FRAMES + 8);
    // Deferred frames are free: freeing one is a double free.
    assert_eq!(a.free(inside, 0), Err(FreeError::DoubleFree));
    assert_eq!(a.free(DMA_LIMIT.add(SECTION_FRAMES), MAX_ORDER), Err(FreeError::DoubleFree));
    assert_eq!(a.free_pgtable(D_PGTABLES.start), Err(FreeError::DoubleFree));
    // Untouched frames are not managed.
    assert_eq!(a.free(DMA_LIMIT.add(3 * SECTION_FRAMES + 8), 0), Err(FreeError::NotManaged));
    assert_eq!(a.block_tag(inside), None);
    assert!(!a.set_block_tag(inside, [1, 2, 3, 4]));
    // A range overlapping a deferred section, or a managed frame of an
    // initialised one, is refused as a whole.
    let over = FrameRange::new(DMA_LIMIT.add(3 * SECTION_FRAMES - 1), DMA_LIMIT.add(3 * SECTION_FRAMES + 10));
    assert_eq!(a.add_free_range(over), Err(InitError::AlreadyManaged));
    assert_eq!(a.add_free_range(span), Err(InitError::AlreadyManaged));
    assert_eq!((free_blocks(&a), ZoneId::ALL.map(|z| a.stats(z))), before);
    a.check_invariants().unwrap();
    assert!(a.deferred_metadata_is_zero());
    // The rest can still be added, and a section straddling nothing but
    // untouched frames is deferred.
    a.add_free_range(FrameRange::new(DMA_LIMIT.add(3 * SECTION_FRAMES), span.end)).unwrap();
    a.check_invariants().unwrap();
    assert_eq!(a.stats(ZoneId::Normal).deferred_pages, 5 * 1024);
    assert_eq!(a.free(DMA_LIMIT.add(3 * SECTION_FRAMES + 8), 0), Err(FreeError::DoubleFree));
}

#[test]
fn long_runs_of_sections_are_deferred_around_an_initialised_one() {
    let sec = |i: u64| DMA_LIMIT.add(i * SECTION_FRAMES);
    let mut fx = normal(40 * SECTION_FRAMES);
    let mut a = fx.empty_deferred(NO_PGTABLES);
    // Part of section 21: it is initialised, the rest of it unmanaged.
    a.add_free_range(FrameRange::new(sec(21).add(100), sec(21).add(200))).unwrap();
    assert_eq!(a.add_free_range(FrameRange::new(sec(0), sec(40))), Err(InitError::AlreadyManaged));
    assert_eq!(a.stats(ZoneId::Normal).deferred_pages, 0);
    a.add_free_range(FrameRange::new(sec(0), sec(21))).unwrap();
    a.add_free_range(FrameRange::new(sec(22), sec(40))).unwrap();
    // Overlapping a deferred section far into a run is refused too.
    assert_eq!(a.add_free_range(FrameRange::new(sec(39), sec(40))), Err(InitError::AlreadyManaged));
    a.check_invariants().unwrap();
    let s = a.stats(ZoneId::Normal);
    assert_eq!((s.deferred_pages, s.free_pages), (39 * SECTION_FRAMES, 100));
    let mut n = 0;
    a.for_each_deferred_section(|p, _| {
        assert_ne!(p, sec(21));
        n += 1;
    });
    assert_eq!(n, 39);
}

#[test]
fn a_short_section_array_is_refused() {
    let mut fx = deferred_fixture();
    let mem = ArenaMem::new(fx.base.addr(), &mut fx.backing);
    let mut short = vec![0u8; section_bytes(D_FRAMES) as usize - 1];
    let r = BuddyAllocator::new_deferred(mem, &mut fx.meta, &mut short, fx.base, D_PGTABLES);
    assert_eq!(r.err(), Some(InitError::SectionArrayTooSmall));
}

mod model;
mod percpu;
