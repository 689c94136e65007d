//! Object allocation: our slab allocator (`KmemCache`, `Kmalloc`) against
//! `buddy_system_allocator`'s `Heap` and `slabmalloc` (`SCAllocator`,
//! `ZoneAllocator`), on identical operation sequences.
//!
//! Run: `cargo bench -p guest-mm --bench slab` (wall clock), or with
//! `GUEST_MM_BENCH_CLOCK=cpu` (this thread's CPU time; see `common`).

mod common;

use std::alloc::Layout;
use std::hint::black_box;
use std::ptr::NonNull;

use buddy_system_allocator::Heap;
use criterion::measurement::Measurement;
use criterion::{Criterion, Throughput};
use guest_abi::Gpa;
use guest_mm::buddy::ZonePref;
use guest_mm::slab::{Kmalloc, KmemCache};
use slabmalloc::{AllocationError, Allocator, ObjectPage, SCAllocator, ZoneAllocator};

use common::{FRAMES, Fixture, Op, PageArena};

/// Host pages given to each of the other crates (16 MiB).
const HOST_PAGES: usize = 4096;

fn their_heap(arena: &mut PageArena) -> Heap<32> {
    let (start, end) = arena.range();
    let mut h = Heap::<32>::new();
    // SAFETY: the range is the leaked arena, used by nothing else.
    unsafe { h.add_to_heap(start, end) };
    h
}

/// `slabmalloc`'s `ZoneAllocator::allocate`, refilled from `arena` when it
/// asks for a page (the caller's job in that crate's design).
#[inline]
fn zone_alloc(z: &mut ZoneAllocator<'static>, arena: &mut PageArena, layout: Layout) -> NonNull<u8> {
    match z.allocate(layout) {
        Ok(p) => p,
        Err(AllocationError::OutOfMemory) => {
            let page = arena.object_page().expect("slabmalloc arena exhausted");
            // SAFETY: a fresh, zeroed, page-aligned page used by nothing else.
            unsafe { z.refill(layout, page).unwrap() };
            z.allocate(layout).unwrap()
        }
        Err(e) => panic!("slabmalloc: {e:?}"),
    }
}

/// The same for one `SCAllocator`.
#[inline]
fn sc_alloc(sc: &mut SCAllocator<'static, ObjectPage<'static>>, arena: &mut PageArena, layout: Layout) -> NonNull<u8> {
    match sc.allocate(layout) {
        Ok(p) => p,
        Err(_) => {
            let page = arena.object_page().expect("slabmalloc arena exhausted");
            // SAFETY: as in `zone_alloc`.
            unsafe { sc.refill(page) };
            sc.allocate(layout).unwrap()
        }
    }
}

/// One 64-byte object allocated and immediately freed, with one other
/// 64-byte object held throughout in every allocator (so that, in
/// `buddy_system_allocator`'s `Heap`, the freed object's buddy is in use and
/// the free does not merge all the way up: the steady state of a heap that
/// is partly in use, as in `buddy_order0_alloc_free`).
fn slab64_alloc_free<M: Measurement>(c: &mut Criterion<M>) {
    let mut g = c.benchmark_group(common::group_name("slab64_alloc_free"));
    let layout = Layout::from_size_align(64, 8).unwrap();

    let mut fx = Fixture::new(FRAMES);
    let mut buddy = fx.buddy();
    let mut cache = KmemCache::new("bench-64", 100, 64, 8, ZonePref::Normal).unwrap();
    let _held = cache.alloc(&mut buddy).unwrap();
    g.bench_function("guest_mm_kmem_cache", |b| {
        b.iter(|| {
            let a = cache.alloc(&mut buddy).unwrap();
            cache.free(&mut buddy, black_box(a)).unwrap();
        })
    });
    let mut km = Kmalloc::new(ZonePref::Normal);
    let _held = km.alloc(&mut buddy, 64, 8).unwrap();
    g.bench_function("guest_mm_kmalloc", |b| {
        b.iter(|| {
            let a = km.alloc(&mut buddy, black_box(64), 8).unwrap();
            km.free(&mut buddy, black_box(a), black_box(64), 8).unwrap();
        })
    });

    let mut arena = PageArena::new(HOST_PAGES);
    let mut heap = their_heap(&mut arena);
    let _held = heap.alloc(layout).unwrap();
    g.bench_function("buddy_system_allocator_heap", |b| {
        b.iter(|| {
            let p = heap.alloc(black_box(layout)).unwrap();
            // SAFETY: `p` was just allocated by `heap` with `layout`.
            // The layout goes through `black_box` here too, as the size
            // does in both of Kmalloc's calls above: run time on both sides.
            unsafe { heap.dealloc(black_box(p), black_box(layout)) };
        })
    });
    // The same two with the size known at compile time (as in
    // `Box::new`, or a kernel's `kmalloc(sizeof(...))`): each allocator's
    // size-class computation can fold to a constant. Only the pointer goes
    // through `black_box`.
    g.bench_function("guest_mm_kmalloc_const_size", |b| {
        b.iter(|| {
            let a = km.alloc(&mut buddy, 64, 8).unwrap();
            km.free(&mut buddy, black_box(a), 64, 8).unwrap();
        })
    });
    g.bench_function("buddy_system_allocator_heap_const_size", |b| {
        b.iter(|| {
            let p = heap.alloc(layout).unwrap();
            // SAFETY: `p` was just allocated by `heap` with `layout`.
            unsafe { heap.dealloc(black_box(p), layout) };
        })
    });

    let mut arena = PageArena::new(HOST_PAGES);
    let mut sc: SCAllocator<'static, ObjectPage<'static>> = SCAllocator::new(64);
    let _held = sc_alloc(&mut sc, &mut arena, layout);
    g.bench_function("slabmalloc_sc_allocator", |b| {
        b.iter(|| {
            let p = sc_alloc(&mut sc, &mut arena, black_box(layout));
            sc.deallocate(black_box(p), layout).unwrap();
        })
    });

    let mut arena = PageArena::new(HOST_PAGES);
    let mut zone = ZoneAllocator::new();
    let _held = zone_alloc(&mut zone, &mut arena, layout);
    g.bench_function("slabmalloc_zone_allocator", |b| {
        b.iter(|| {
            let p = zone_alloc(&mut zone, &mut arena, black_box(layout));
            zone.deallocate(black_box(p), layout).unwrap();
        })
    });
    g.finish();
}

/// Request sizes of the heap mix (bytes) and their weights: small objects
/// dominate, as in a kernel heap; sizes that are not powers of two are
/// rounded up by each allocator in its own way.
const HEAP_SIZES: &[(u16, u32)] =
    &[(8, 10), (16, 15), (24, 10), (32, 15), (48, 8), (64, 15), (96, 6), (128, 10), (200, 5), (256, 6)];

/// Working set of the heap mix.
const HEAP_SLOTS: usize = 512;

/// A working set of up to 512 objects of 8..=256 bytes, frees in another
/// order than the allocations.
fn heap_mix<M: Measurement>(c: &mut Criterion<M>) {
    let ops = common::mix(0x5eed_0b1e, 8192, HEAP_SLOTS, HEAP_SIZES);
    let n = common::allocs(&ops);
    let mut g = c.benchmark_group(common::group_name("slab_mix"));
    g.throughput(Throughput::Elements(n as u64));

    let mut fx = Fixture::new(FRAMES);
    let mut buddy = fx.buddy();
    let mut km = Kmalloc::new(ZonePref::Normal);
    let mut slots = vec![Gpa(0); HEAP_SLOTS];
    let mut live = vec![0usize; HEAP_SLOTS];
    g.bench_function("guest_mm_kmalloc", |b| {
        b.iter(|| {
            for op in black_box(&ops[..]) {
                match *op {
                    Op::Alloc { slot, class } => {
                        slots[slot as usize] = km.alloc(&mut buddy, class as usize, 8).unwrap();
                        live[slot as usize] = class as usize;
                    }
                    Op::Free { slot } => {
                        km.free(&mut buddy, slots[slot as usize], live[slot as usize], 8).unwrap();
                    }
                }
            }
        })
    });

    let mut arena = PageArena::new(HOST_PAGES);
    let mut heap = their_heap(&mut arena);
    let mut slots = vec![(NonNull::<u8>::dangling(), Layout::new::<u8>()); HEAP_SLOTS];
    g.bench_function("buddy_system_allocator_heap", |b| {
        b.iter(|| {
            for op in black_box(&ops[..]) {
                match *op {
                    Op::Alloc { slot, class } => {
                        let layout = Layout::from_size_align(class as usize, 8).unwrap();
                        slots[slot as usize] = (heap.alloc(layout).unwrap(), layout);
                    }
                    Op::Free { slot } => {
                        let (p, layout) = slots[slot as usize];
                        // SAFETY: `p` is live, allocated by `heap` with `layout`.
                        unsafe { heap.dealloc(p, layout) };
                    }
                }
            }
        })
    });

    let mut arena = PageArena::new(HOST_PAGES);
    let mut zone = ZoneAllocator::new();
    g.bench_function("slabmalloc_zone_allocator", |b| {
        b.iter(|| {
            for op in black_box(&ops[..]) {
                match *op {
                    Op::Alloc { slot, class } => {
                        let layout = Layout::from_size_align(class as usize, 8).unwrap();
                        slots[slot as usize] = (zone_alloc(&mut zone, &mut arena, layout), layout);
                    }
                    Op::Free { slot } => {
                        let (p, layout) = slots[slot as usize];
                        zone.deallocate(p, layout).unwrap();
                    }
                }
            }
        })
    });
    g.finish();
}

common::bench_main!(slab64_alloc_free, heap_mix);
