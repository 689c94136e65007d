//! Frame allocation: our buddy allocator against `buddy_system_allocator`'s
//! `FrameAllocator`, on identical operation sequences.
//!
//! Run: `cargo bench -p guest-mm --bench buddy` (wall clock), or with
//! `GUEST_MM_BENCH_CLOCK=cpu` (this thread's CPU time; see `common`).

mod common;

use std::hint::black_box;

use buddy_system_allocator::FrameAllocator;
use criterion::measurement::Measurement;
use criterion::{Criterion, Throughput};
use guest_mm::buddy::{MAX_ORDER, ZonePref};
use guest_mm::phys::Pfn;

use common::{FRAMES, Fixture, Op};

/// `buddy_system_allocator` with the same largest order as ours
/// (`ORDER - 1 == MAX_ORDER`), over the same number of frames.
type TheirFrames = FrameAllocator<{ MAX_ORDER as usize + 1 }>;

fn theirs() -> TheirFrames {
    let mut f = TheirFrames::new();
    let base = 16 << 8; // the same pfns as ours: 16 MiB up
    f.add_frame(base, base + FRAMES);
    f
}

/// Order-0 alloc immediately followed by its free, with one other frame
/// held throughout (so that, in `buddy_system_allocator`, the freed frame's
/// buddy is in use and the free does not merge all the way up: the steady
/// state of a machine whose memory is partly in use). The variant with
/// everything free is measured too.
fn order0_alloc_free<M: Measurement>(c: &mut Criterion<M>) {
    let mut g = c.benchmark_group(common::group_name("buddy_order0_alloc_free"));
    let mut fx = Fixture::new(FRAMES);
    let mut ours = fx.buddy();
    let _held = ours.alloc(0, ZonePref::Normal).unwrap();
    g.bench_function("guest_mm", |b| {
        b.iter(|| {
            let p = ours.alloc(black_box(0), ZonePref::Normal).unwrap();
            ours.free(black_box(p), 0).unwrap();
        })
    });
    let mut t = theirs();
    let _held = t.alloc(1).unwrap();
    g.bench_function("buddy_system_allocator", |b| {
        b.iter(|| {
            let p = t.alloc(black_box(1)).unwrap();
            t.dealloc(black_box(p), 1);
        })
    });
    let mut t = theirs();
    g.bench_function("buddy_system_allocator_all_free", |b| {
        b.iter(|| {
            let p = t.alloc(black_box(1)).unwrap();
            t.dealloc(black_box(p), 1);
        })
    });
    g.finish();
}

/// Orders of the frame mix: mostly single frames, as in a kernel.
const FRAME_ORDERS: &[(u16, u32)] = &[(0, 70), (1, 12), (2, 10), (3, 6), (4, 2)];

/// A working set of up to 256 blocks of orders 0..=4, frees in another
/// order than the allocations.
fn frame_mix<M: Measurement>(c: &mut Criterion<M>) {
    let ops = common::mix(0x5eed_f4a3, 4096, 256, FRAME_ORDERS);
    let n = common::allocs(&ops);
    let mut g = c.benchmark_group(common::group_name("buddy_mix"));
    g.throughput(Throughput::Elements(n as u64));
    let mut fx = Fixture::new(FRAMES);
    let mut ours = fx.buddy();
    let mut slots = vec![(Pfn(0), 0u8); 256];
    g.bench_function("guest_mm", |b| {
        b.iter(|| {
            for op in black_box(&ops[..]) {
                match *op {
                    Op::Alloc { slot, class } => {
                        let order = class as u8;
                        slots[slot as usize] = (ours.alloc(order, ZonePref::Normal).unwrap(), order);
                    }
                    Op::Free { slot } => {
                        let (p, order) = slots[slot as usize];
                        ours.free(p, order).unwrap();
                    }
                }
            }
        })
    });
    let mut t = theirs();
    let mut slots = vec![(0usize, 0usize); 256];
    g.bench_function("buddy_system_allocator", |b| {
        b.iter(|| {
            for op in black_box(&ops[..]) {
                match *op {
                    Op::Alloc { slot, class } => {
                        let count = 1usize << class;
                        slots[slot as usize] = (t.alloc(count).unwrap(), count);
                    }
                    Op::Free { slot } => {
                        let (p, count) = slots[slot as usize];
                        t.dealloc(p, count);
                    }
                }
            }
        })
    });
    g.finish();
}

common::bench_main!(order0_alloc_free, frame_mix);
