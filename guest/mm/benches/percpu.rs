//! The SMP front ends on one and two threads: order-0 alloc+free through
//! `PerCpuBuddy` (each thread on its own CPU's list) and 64-byte alloc+free
//! through `PerCpuCache` (each thread on its own CPU slab, the lock-free
//! fast path). Issue 17's targets: two threads at >= 1.8x the one-thread
//! throughput, the lock-free fast path <= 10 ns.
//!
//! Run: `cargo bench -p guest-mm --bench percpu` (wall clock), or with
//! `GUEST_MM_BENCH_CLOCK=cpu` (each worker thread's CPU time; see
//! `common`). One "iteration" is one alloc+free pair on *each* thread, so
//! the throughput shown (pairs per second) is the total over the threads,
//! and the two-thread speedup is `2 * t(1 thread) / t(2 threads)`. Each
//! sample times the workers only (from a spinning start line to their own
//! end, the longest of them), not the spawning of threads.

mod common;

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::measurement::{Measurement, WallTime};
use criterion::{Criterion, Throughput};
use guest_mm::buddy::{BuddyAllocator, DMA_LIMIT, FrameMeta, PcpFlag, PcpLists, PerCpuBuddy, ZonePref, pcp_flag_bytes};
use guest_mm::percpu::{CpuId, ThisCpu};
use guest_mm::phys::{FRAME_WORDS, FrameRange, SharedArenaMem};
use guest_mm::slab::PerCpuCache;
use guest_mm::sync::SpinLock;

use common::{CpuTime, FRAMES};

/// A measurement value from nanoseconds.
trait FromNanos: Measurement {
    fn from_nanos(ns: u64) -> Self::Value;
}

impl FromNanos for WallTime {
    fn from_nanos(ns: u64) -> Duration {
        Duration::from_nanos(ns)
    }
}

impl FromNanos for CpuTime {
    fn from_nanos(ns: u64) -> u64 {
        ns
    }
}

/// Run `work(thread, iters)` on `threads` threads at once; the sample is
/// the longest thread's time (wall, or its CPU time with the CPU clock).
fn run_threads<W: Fn(usize, u64) + Sync>(threads: usize, iters: u64, work: &W) -> u64 {
    let start = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let start = &start;
                s.spawn(move || {
                    start.fetch_add(1, Ordering::SeqCst);
                    while start.load(Ordering::SeqCst) < threads {
                        std::hint::spin_loop();
                    }
                    let (w0, c0) = (Instant::now(), common::thread_cpu_ns());
                    work(t, iters);
                    if common::cpu_clock() { common::thread_cpu_ns() - c0 } else { w0.elapsed().as_nanos() as u64 }
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).max().unwrap_or(0)
    })
}

fn token(t: usize) -> ThisCpu {
    // SAFETY: each bench thread `t` is the only user of CPU id `t` while
    // it runs, and the threads of one sample are joined before the next.
    unsafe { ThisCpu::new(CpuId::new(t).unwrap()) }
}

fn percpu<M: FromNanos>(c: &mut Criterion<M>) {
    let backing: Vec<AtomicU64> = (0..FRAMES * FRAME_WORDS).map(|_| AtomicU64::new(0)).collect();
    let mut meta = vec![FrameMeta::default(); FRAMES];
    let flags: Vec<PcpFlag> = (0..pcp_flag_bytes(FRAMES as u64)).map(|_| PcpFlag::default()).collect();
    let mem = SharedArenaMem::new(DMA_LIMIT.addr(), &backing);
    let mut a = BuddyAllocator::new(mem, &mut meta, DMA_LIMIT, FrameRange::default()).unwrap();
    a.add_free_range(FrameRange::new(DMA_LIMIT, DMA_LIMIT.add(FRAMES as u64))).unwrap();
    let pcp: Box<PcpLists<SpinLock>> = Box::default();
    let buddy: PerCpuBuddy<'_, _, SpinLock> = PerCpuBuddy::new(a, &pcp, 2, &flags).unwrap();
    let cache: PerCpuCache<SpinLock> = PerCpuCache::new("bench-64", 100, 64, 8, ZonePref::Normal, 2).unwrap();
    // One frame and one object held on each CPU throughout, as in the
    // single-CPU benches.
    let held: Vec<_> = (0..2)
        .map(|t| {
            let mut me = token(t);
            (buddy.alloc_on(me.id(), 0, ZonePref::Normal).unwrap(), cache.alloc(&mut me, &buddy).unwrap())
        })
        .collect();

    let order0 = |t: usize, iters: u64| {
        let cpu = CpuId::new(t).unwrap();
        for _ in 0..iters {
            let p = buddy.alloc_on(cpu, black_box(0), ZonePref::Normal).unwrap();
            buddy.free_on(cpu, black_box(p), 0).unwrap();
        }
    };
    let slab64 = |t: usize, iters: u64| {
        let mut me = token(t);
        for _ in 0..iters {
            let a = cache.alloc(&mut me, &buddy).unwrap();
            cache.free(&mut me, &buddy, black_box(a)).unwrap();
        }
    };

    let mut g = c.benchmark_group(common::group_name("percpu_buddy_order0_alloc_free"));
    for threads in [1, 2] {
        g.throughput(Throughput::Elements(threads as u64));
        g.bench_function(format!("{threads}_thread"), |b| {
            b.iter_custom(|iters| M::from_nanos(run_threads(threads, iters, &order0)))
        });
    }
    g.finish();
    let mut g = c.benchmark_group(common::group_name("percpu_slab64_alloc_free"));
    for threads in [1, 2] {
        g.throughput(Throughput::Elements(threads as u64));
        g.bench_function(format!("{threads}_thread"), |b| {
            b.iter_custom(|iters| M::from_nanos(run_threads(threads, iters, &slab64)))
        });
    }
    g.finish();
    for (t, (p, a)) in held.into_iter().enumerate() {
        let mut me = token(t);
        buddy.free_on(me.id(), p, 0).unwrap();
        cache.free(&mut me, &buddy, a).unwrap();
    }
}

common::bench_main!(percpu);
