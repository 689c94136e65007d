//! Host tests of the slab allocator: one unit test per behaviour, then a
//! property test that checks every object handed out against a model of
//! the live objects and every page handed out comes back.

use std::collections::BTreeMap;
use std::vec::Vec;

use proptest::prelude::*;

use guest_abi::Gpa;

use super::size_class::cache_of;
use super::*;
use crate::PAGE_SIZE;
use crate::buddy::{BuddyAllocator, DMA_LIMIT, FrameMeta, FreeError, MAX_ORDER, ZoneId};
use crate::phys::{ArenaMem, FRAME_WORDS, FrameRange, Pfn, PhysMem};

/// Backing memory and metadata for a NORMAL-only buddy allocator.
struct Fixture {
    backing: Vec<u64>,
    meta: Vec<FrameMeta>,
}

impl Fixture {
    fn new(frames: usize) -> Self {
        Self { backing: vec![0; frames * FRAME_WORDS], meta: vec![FrameMeta::default(); frames] }
    }

    fn buddy(&mut self) -> BuddyAllocator<'_, ArenaMem<'_>> {
        let n = self.meta.len() as u64;
        let mem = ArenaMem::new(DMA_LIMIT.addr(), &mut self.backing);
        let no_pt = FrameRange::default();
        let mut b = BuddyAllocator::new(mem, &mut self.meta, DMA_LIMIT, no_pt).unwrap();
        b.add_free_range(FrameRange::new(DMA_LIMIT, DMA_LIMIT.add(n))).unwrap();
        b
    }
}

fn free_blocks<M: PhysMem>(b: &BuddyAllocator<'_, M>) -> Vec<(u64, u8)> {
    let mut v = Vec::new();
    b.for_each_free_block(|p, o, _| v.push((p.0, o)));
    v.sort();
    v
}

fn cache(size: u32, align: u32) -> KmemCache {
    KmemCache::new("test", 100, size, align, ZonePref::Normal).unwrap()
}

#[test]
fn requests_map_to_the_smallest_class_that_fits() {
    assert_eq!(size_class(0, 1), SizeClass::Cache(0));
    assert_eq!(size_class(8, 8), SizeClass::Cache(0));
    assert_eq!(size_class(9, 1), SizeClass::Cache(1));
    assert_eq!(size_class(1, 16), SizeClass::Cache(1));
    assert_eq!(size_class(64, 8), SizeClass::Cache(3));
    assert_eq!(size_class(65, 8), SizeClass::Cache(4));
    assert_eq!(size_class(4096, 1), SizeClass::Cache(9));
    assert_eq!(size_class(8, 4096), SizeClass::Cache(9));
    assert_eq!(size_class(4097, 1), SizeClass::Pages(1));
    assert_eq!(size_class(8192, 8), SizeClass::Pages(1));
    assert_eq!(size_class(8193, 8), SizeClass::Pages(2));
    assert_eq!(size_class(1, 8192), SizeClass::Pages(1));
    assert_eq!(size_class(4 << 20, 8), SizeClass::Pages(MAX_ORDER));
    assert_eq!(size_class((4 << 20) + 1, 8), SizeClass::TooLarge);
    assert_eq!(size_class(8, 8 << 20), SizeClass::TooLarge);
}

#[test]
fn the_size_class_is_the_smallest_power_of_two_class_that_fits() {
    // The branch-free formula against the obvious loop, for every request
    // up to twice the largest cache and every alignment up to 8 KiB.
    for size in 0..=2 * KMALLOC_MAX_CACHE_SIZE {
        for align in (0..=13).map(|k| 1usize << k) {
            let need = size.max(align);
            let expected = if need <= KMALLOC_MAX_CACHE_SIZE {
                SizeClass::Cache((0..NR_KMALLOC_CACHES).find(|&i| 8usize << i >= need).unwrap())
            } else {
                SizeClass::Pages(if need <= PAGE_SIZE as usize { 0 } else { 1 })
            };
            assert_eq!(size_class(size, align), expected, "size {size}, align {align}");
            // Kmalloc's dispatch (a tree of compares) agrees.
            let cache = match expected {
                SizeClass::Cache(i) => Some(i),
                _ => None,
            };
            assert_eq!(cache_of(size, align), cache, "size {size}, align {align}");
        }
    }
    assert_eq!(cache_of(usize::MAX, 8), None);
    assert_eq!(cache_of(8, 1 << 63), None);
}

#[test]
fn caches_size_their_slabs_for_at_least_eight_objects() {
    let k = Kmalloc::new(ZonePref::Normal);
    let geometry: Vec<_> = (0..NR_KMALLOC_CACHES)
        .map(|i| (k.cache(i).name(), k.cache(i).object_size(), k.cache(i).slab_order(), k.cache(i).objects_per_slab()))
        .collect();
    assert_eq!(geometry[0], ("kmalloc-8", 8, 0, 512));
    assert_eq!(geometry[6], ("kmalloc-512", 512, 0, 8));
    assert_eq!(geometry[7], ("kmalloc-1k", 1024, 1, 8));
    assert_eq!(geometry[9], ("kmalloc-4k", 4096, 3, 8));
    let c = cache(24, 8);
    assert_eq!((c.object_size(), c.slab_order(), c.objects_per_slab()), (24, 0, 170));
    let c = cache(100, 64);
    assert_eq!((c.object_size(), c.align(), c.objects_per_slab()), (128, 64, 32));
    let c = cache(3000, 1);
    assert_eq!((c.object_size(), c.slab_order(), c.objects_per_slab()), (3000, 3, 10));
    assert_eq!(cache(1, 1).object_size(), 8);
    assert_eq!(KmemCache::new("x", 1, 8, 3, ZonePref::Normal).err(), Some(CacheError::BadAlign));
    assert_eq!(KmemCache::new("x", 1, 8, 8192, ZonePref::Normal).err(), Some(CacheError::BadAlign));
    assert_eq!(KmemCache::new("x", 1, 40000, 8, ZonePref::Normal).err(), Some(CacheError::TooLarge));
    assert_eq!(KmemCache::new("x", 1, u32::MAX, 64, ZonePref::Normal).err(), Some(CacheError::TooLarge));
}

#[test]
fn objects_are_distinct_aligned_and_fill_a_slab_before_the_next() {
    let mut fx = Fixture::new(64);
    let mut b = fx.buddy();
    let mut c = cache(100, 64);
    let objs: Vec<_> = (0..32).map(|_| c.alloc(&mut b).unwrap()).collect();
    let slab = objs[0].0 & !(PAGE_SIZE - 1);
    for (i, o) in objs.iter().enumerate() {
        assert!(o.is_aligned(64));
        assert_eq!(o.0 & !(PAGE_SIZE - 1), slab, "object {i} outside the first slab");
    }
    let mut sorted: Vec<_> = objs.iter().map(|o| o.0).collect();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 32);
    assert_eq!(c.stats().slabs_allocated, 1);
    let next = c.alloc(&mut b).unwrap();
    assert_ne!(next.0 & !(PAGE_SIZE - 1), slab);
    assert_eq!(c.stats().slabs_allocated, 2);
    assert_eq!(c.slab_counts(), (0, 1, 0, true), "the first slab is full");
    c.check_invariants(&b).unwrap();
}

#[test]
fn slabs_move_full_to_partial_to_empty_and_back_to_the_buddy() {
    let mut fx = Fixture::new(64);
    let mut b = fx.buddy();
    let initial = free_blocks(&b);
    let mut c = cache(512, 8); // 8 per slab
    c.set_max_empty(0);
    let objs: Vec<_> = (0..17).map(|_| c.alloc(&mut b).unwrap()).collect();
    assert_eq!(c.slab_counts(), (0, 2, 0, true));
    c.check_invariants(&b).unwrap();
    // One free into the first full slab makes it partial.
    c.free(&mut b, objs[0]).unwrap();
    assert_eq!(c.slab_counts(), (1, 1, 0, true));
    c.check_invariants(&b).unwrap();
    // Emptying it returns it to the buddy at once (max_empty 0).
    for &o in &objs[1..8] {
        c.free(&mut b, o).unwrap();
        c.check_invariants(&b).unwrap();
    }
    assert_eq!(c.slab_counts(), (0, 1, 0, true));
    assert_eq!(c.stats().slabs_freed, 1);
    // Keeping one empty slab.
    c.set_max_empty(1);
    for &o in &objs[8..16] {
        c.free(&mut b, o).unwrap();
    }
    assert_eq!(c.slab_counts(), (0, 0, 1, true));
    // A partial slab is preferred to an empty one for the next CPU slab.
    c.free(&mut b, objs[16]).unwrap();
    c.check_invariants(&b).unwrap();
    c.shrink(&mut b);
    assert_eq!(c.slab_counts(), (0, 0, 0, false));
    assert_eq!(c.stats().slabs_allocated, c.stats().slabs_freed);
    b.drain_hot_lists();
    assert_eq!(free_blocks(&b), initial, "every page came back");
    assert_eq!((c.stats().allocs, c.stats().frees), (17, 17));
}

#[test]
fn empty_slabs_beyond_the_threshold_go_back_at_once() {
    let mut fx = Fixture::new(64);
    let mut b = fx.buddy();
    let mut c = cache(512, 8);
    let objs: Vec<_> = (0..8 * 6).map(|_| c.alloc(&mut b).unwrap()).collect();
    c.alloc(&mut b).unwrap(); // a seventh CPU slab, so the six are full
    let free_before = b.stats(ZoneId::Normal).free_pages + b.stats(ZoneId::Normal).hot_pages;
    for &o in &objs {
        c.free(&mut b, o).unwrap();
        c.check_invariants(&b).unwrap();
    }
    assert_eq!(c.slab_counts(), (0, 0, DEFAULT_MAX_EMPTY, true));
    assert_eq!(c.stats().slabs_freed, 6 - DEFAULT_MAX_EMPTY as u64);
    let free_after = b.stats(ZoneId::Normal).free_pages + b.stats(ZoneId::Normal).hot_pages;
    assert_eq!(free_after - free_before, 6 - DEFAULT_MAX_EMPTY as u64);
}

#[test]
fn an_emptied_slab_is_reused_before_a_new_one_is_taken() {
    let mut fx = Fixture::new(64);
    let mut b = fx.buddy();
    let mut c = cache(2048, 8); // order 2, 8 per slab
    let first: Vec<_> = (0..8).map(|_| c.alloc(&mut b).unwrap()).collect();
    let _second = c.alloc(&mut b).unwrap();
    for &o in &first {
        c.free(&mut b, o).unwrap();
    }
    assert_eq!(c.slab_counts(), (0, 0, 1, true));
    for _ in 0..7 {
        c.alloc(&mut b).unwrap(); // the rest of the CPU slab
    }
    let reused = c.alloc(&mut b).unwrap();
    assert!(first.contains(&reused));
    assert_eq!(c.stats().slabs_allocated, 2);
    c.check_invariants(&b).unwrap();
}

#[test]
fn bad_frees_are_reported_and_change_nothing() {
    let mut fx = Fixture::new(64);
    let mut b = fx.buddy();
    let mut c = cache(24, 8); // 170 per slab, 16 bytes of tail waste
    let mut other = KmemCache::new("other", 101, 24, 8, ZonePref::Normal).unwrap();
    let objs: Vec<_> = (0..171).map(|_| c.alloc(&mut b).unwrap()).collect();
    let foreign_obj = other.alloc(&mut b).unwrap();
    let page = b.alloc(0, ZonePref::Normal).unwrap();
    let full_slab = objs[0].0 & !(PAGE_SIZE - 1);
    let stats = c.stats();
    let cases = [
        (Gpa(objs[0].0 + 8), SlabError::NotObjectStart),
        (Gpa(full_slab + 170 * 24), SlabError::NotObjectStart), // the tail waste
        (Gpa(objs[170].0 + 4), SlabError::NotObjectStart),      // in the CPU slab
        (foreign_obj, SlabError::Foreign),
        (page.addr(), SlabError::Foreign),
        (Gpa(0), SlabError::Foreign),
    ];
    for (addr, err) in cases {
        assert_eq!(c.free(&mut b, addr), Err(err), "free({addr:?})");
        assert_eq!(c.stats(), stats);
        c.check_invariants(&b).unwrap();
    }
    // Double frees: the last object freed, in the CPU slab and in another.
    c.free(&mut b, objs[170]).unwrap();
    assert_eq!(c.free(&mut b, objs[170]), Err(SlabError::DoubleFree));
    c.free(&mut b, objs[5]).unwrap();
    assert_eq!(c.free(&mut b, objs[5]), Err(SlabError::DoubleFree));
    c.check_invariants(&b).unwrap();
    // A free into a slab with nothing in use.
    for &o in objs[..170].iter().filter(|&&o| o != objs[5]) {
        c.free(&mut b, o).unwrap();
    }
    assert_eq!(c.slab_counts().2, 1);
    assert_eq!(c.free(&mut b, objs[9]), Err(SlabError::DoubleFree));
    c.check_invariants(&b).unwrap();
    other.free(&mut b, foreign_obj).unwrap();
    other.check_invariants(&b).unwrap();
    assert_eq!(SlabError::DoubleFree.as_str(), "object already free");
    assert_eq!(SlabError::Pages(FreeError::WrongZone).as_str(), FreeError::WrongZone.as_str());
}

#[test]
fn a_deeper_double_free_is_found_by_the_invariant_check() {
    let mut fx = Fixture::new(16);
    let mut b = fx.buddy();
    let mut c = cache(64, 8);
    let x = c.alloc(&mut b).unwrap();
    let y = c.alloc(&mut b).unwrap();
    c.free(&mut b, x).unwrap();
    c.free(&mut b, y).unwrap();
    // `x` is no longer at the head of the free list: not caught here...
    assert_eq!(c.free(&mut b, x), Ok(()));
    // ...but the free list now holds it twice.
    assert_eq!(c.check_invariants(&b), Err("free list holds an object twice"));
}

#[test]
fn a_corrupted_free_pointer_is_not_followed() {
    let mut fx = Fixture::new(16);
    let mut b = fx.buddy();
    let mut c = cache(64, 8);
    let x = c.alloc(&mut b).unwrap();
    c.free(&mut b, x).unwrap();
    // Use after free: the object's first word now points far away.
    b.mem().write_u64(x, 0xdead_0000);
    assert_eq!(c.alloc(&mut b), Some(x));
    assert_eq!(c.stats().corruptions, 1);
    let y = c.alloc(&mut b).unwrap();
    assert_ne!(y.0 & !(PAGE_SIZE - 1), x.0 & !(PAGE_SIZE - 1), "the rest of the slab was dropped");
}

#[test]
fn out_of_memory_is_none_never_a_panic() {
    let mut fx = Fixture::new(4);
    let mut b = fx.buddy();
    let mut k = Kmalloc::new(ZonePref::Normal);
    let mut got = Vec::new();
    while let Some(p) = k.alloc(&mut b, 2048, 8) {
        got.push(p);
    }
    assert_eq!(got.len(), 8, "one order-2 slab of 2 KiB objects");
    assert_eq!(k.cache(8).stats().failures, 1);
    assert_eq!(k.alloc(&mut b, 8192, 8), None);
    assert_eq!(k.alloc(&mut b, 8, 1 << 23), None);
    for p in got {
        k.free(&mut b, p, 2048, 8).unwrap();
    }
    k.check_invariants(&b).unwrap();
}

#[test]
fn large_and_strictly_aligned_requests_go_to_the_buddy_allocator() {
    let mut fx = Fixture::new(64);
    let mut b = fx.buddy();
    let initial = free_blocks(&b);
    let mut k = Kmalloc::new(ZonePref::Normal);
    let small = k.alloc(&mut b, 8, 1).unwrap();
    let big = k.alloc(&mut b, 10_000, 8).unwrap();
    assert_eq!(b.block_tag(Pfn::containing(big)).map(|t| t.0), Some(2));
    let aligned = k.alloc(&mut b, 64, 32768).unwrap();
    assert!(aligned.is_aligned(32768));
    assert_eq!(k.large_counts(), (2, 0));
    assert_eq!(k.free(&mut b, Gpa(big.0 + 8), 10_000, 8), Err(SlabError::NotObjectStart));
    assert_eq!(k.free(&mut b, big, 10_000, 8192 * 4), Err(SlabError::Pages(FreeError::WrongOrder { allocated: 2 })));
    k.free(&mut b, big, 10_000, 8).unwrap();
    k.free(&mut b, aligned, 64, 32768).unwrap();
    k.free(&mut b, small, 8, 1).unwrap();
    assert_eq!(k.large_counts(), (2, 2));
    k.shrink(&mut b);
    b.drain_hot_lists();
    assert_eq!(free_blocks(&b), initial);
}

#[test]
fn every_kmalloc_class_honours_its_alignment() {
    let mut fx = Fixture::new(256);
    let mut b = fx.buddy();
    let mut k = Kmalloc::new(ZonePref::Normal);
    for shift in 0..=13 {
        let align = 1usize << shift;
        for size in [1, align / 2 + 1, align, align + 1, 3 * align] {
            let p = k.alloc(&mut b, size, align).unwrap();
            assert!(p.is_aligned(align as u64), "size {size} align {align}: {p:?}");
            k.free(&mut b, p, size, align).unwrap();
        }
    }
    k.check_invariants(&b).unwrap();
}

// ---- property test ----

#[derive(Clone, Debug)]
enum Op {
    Alloc { size: usize, align_shift: u32 },
    Free { pick: usize },
    Shrink,
}

fn op() -> impl Strategy<Value = Op> {
    let size = prop_oneof![6 => 1..=256usize, 3 => 1..=4096usize, 1 => 1..=20_000usize];
    let align = prop_oneof![8 => 0..=4u32, 1 => 0..=14u32];
    prop_oneof![
        6 => (size, align).prop_map(|(size, align_shift)| Op::Alloc { size, align_shift }),
        5 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        1 => Just(Op::Shrink),
    ]
}

/// What an object of `size` at `addr` holds while it is live.
fn stamp(addr: u64, word: u64) -> u64 {
    addr.rotate_left(17) ^ word ^ 0x0b1e_c7ed
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut fx = Fixture::new(8192);
    let mut b = fx.buddy();
    let initial = free_blocks(&b);
    let mut k = Kmalloc::new(ZonePref::Normal);
    // Live objects: address -> (size, align).
    let mut live: BTreeMap<u64, (usize, usize)> = BTreeMap::new();
    for op in ops {
        match op {
            Op::Alloc { size, align_shift } => {
                let align = 1usize << align_shift;
                let Some(p) = k.alloc(&mut b, size, align) else {
                    prop_assert!(false, "out of memory with {} objects live", live.len());
                    unreachable!()
                };
                prop_assert!(p.is_aligned(align as u64), "{:?} not aligned to {}", p, align);
                let (start, end) = (p.0, p.0 + size as u64);
                if let Some((&a, &(s, _))) = live.range(..end).next_back() {
                    prop_assert!(a + s as u64 <= start, "{:#x}+{} overlaps live {:#x}+{}", start, size, a, s);
                }
                for w in 0..(size as u64).div_ceil(8) {
                    b.mem().write_u64(Gpa(start + w * 8), stamp(start, w));
                }
                live.insert(start, (size, align));
            }
            Op::Free { pick } if !live.is_empty() => {
                let (&addr, &(size, align)) = live.iter().nth(pick % live.len()).unwrap();
                for w in 0..(size as u64).div_ceil(8) {
                    prop_assert_eq!(b.mem().read_u64(Gpa(addr + w * 8)), stamp(addr, w), "live object changed");
                }
                prop_assert_eq!(k.free(&mut b, Gpa(addr), size, align), Ok(()));
                prop_assert_eq!(k.free(&mut b, Gpa(addr), size, align).is_ok(), false, "immediate double free");
                live.remove(&addr);
            }
            Op::Free { .. } => {}
            Op::Shrink => k.shrink(&mut b),
        }
        k.check_invariants(&b).map_err(TestCaseError::fail)?;
        b.check_invariants().map_err(TestCaseError::fail)?;
    }
    for (addr, (size, align)) in core::mem::take(&mut live) {
        prop_assert_eq!(k.free(&mut b, Gpa(addr), size, align), Ok(()));
    }
    k.shrink(&mut b);
    k.check_invariants(&b).map_err(TestCaseError::fail)?;
    b.drain_hot_lists();
    prop_assert_eq!(free_blocks(&b), initial, "pages not all returned");
    for i in 0..NR_KMALLOC_CACHES {
        let s = k.cache(i).stats();
        prop_assert_eq!(s.allocs, s.frees);
        prop_assert_eq!(s.slabs_allocated, s.slabs_freed);
        prop_assert_eq!(s.corruptions, 0);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_kmalloc_sequences_keep_objects_disjoint_and_return_every_page(
        ops in proptest::collection::vec(op(), 1..300)
    ) {
        run(ops)?;
    }
}

mod percpu;
