//! Host tests of the per-CPU caches ([`PerCpuCache`], [`PerCpuKmalloc`]):
//! the lock-free fast paths, remote frees, flushing, alloc/free storms on
//! several threads with the invariants and counts checked after, and the
//! kmalloc property test run on several CPUs.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use super::*;
use crate::percpu::{CpuId, ThisCpu};
use crate::sync::{RawLock, SpinLock};
use crate::testutil::{SmpBuddy, SmpFixture};

/// A lock that panics instead of waiting: held by the test, it proves
/// that a path under test does not take it.
struct PanicLock(AtomicBool);

// SAFETY: `lock` returns only after swapping `false` for `true` with
// acquire ordering (it panics otherwise), `try_lock` likewise, and
// `unlock` stores `false` with release ordering.
unsafe impl RawLock for PanicLock {
    const INIT: Self = PanicLock(AtomicBool::new(false));
    fn lock(&self) {
        assert!(self.try_lock(), "lock taken by the path under test");
    }
    fn try_lock(&self) -> bool {
        self.0.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok()
    }
    unsafe fn unlock(&self) {
        self.0.store(false, Ordering::Release);
    }
}

/// One token per CPU, for a test that plays every CPU on one thread.
fn tokens(n: usize) -> Vec<ThisCpu> {
    // SAFETY: one token per id, each used only by this thread; tests that
    // run threads make their own, one id per thread, after these are gone.
    (0..n).map(|i| unsafe { ThisCpu::new(CpuId::new(i).unwrap()) }).collect()
}

fn with_buddy<T>(frames: usize, cpus: usize, f: impl FnOnce(&SmpBuddy<'_>) -> T) -> T {
    let mut fx = SmpFixture::new(DMA_LIMIT, frames);
    let b = fx.buddy(FrameRange::default(), &[FrameRange::new(DMA_LIMIT, DMA_LIMIT.add(frames as u64))], cpus, false);
    f(&b)
}

/// Every frame back on the buddy's free lists, fully merged.
fn all_pages_returned(b: &SmpBuddy<'_>) {
    b.drain_all();
    b.check_invariants().unwrap();
    b.with_zone(|a| {
        a.drain_hot_lists();
        let s = a.stats(ZoneId::Normal);
        assert_eq!(s.free_pages, s.managed_pages, "a page not returned");
    });
}

fn cache64<R: RawLock>(cpus: usize) -> PerCpuCache<R> {
    PerCpuCache::new("test-64", 40, 64, 8, ZonePref::Normal, cpus).unwrap()
}

#[test]
fn each_cpu_allocates_from_its_own_cpu_slab_and_the_fast_paths_take_no_lock() {
    let mut fx = SmpFixture::new(DMA_LIMIT, 256);
    let b = fx.buddy(FrameRange::default(), &[FrameRange::new(DMA_LIMIT, DMA_LIMIT.add(256))], 2, false);
    let mut c: PerCpuCache<PanicLock> = cache64(2);
    let mut t = tokens(2);
    let a0 = c.alloc(&mut t[0], &b).unwrap();
    let a1 = c.alloc(&mut t[1], &b).unwrap();
    let slab = |a: Gpa| a.0 & !(PAGE_SIZE - 1);
    assert_ne!(slab(a0), slab(a1), "each CPU has its own CPU slab");
    assert_eq!(c.slab_counts(), (0, 0, 0, 2));
    // With the cache lock and the zone lock held, the fast paths still run
    // (a `PanicLock` panics if taken twice).
    {
        let _node = c.lock_node();
        b.with_zone(|_| {
            c.free(&mut t[0], &b, a0).unwrap();
            assert_eq!(c.alloc(&mut t[0], &b), Some(a0), "the last freed object comes back first");
            let x = c.alloc(&mut t[1], &b).unwrap();
            assert_eq!(slab(x), slab(a1));
            c.free(&mut t[1], &b, x).unwrap();
        });
    }
    c.free(&mut t[0], &b, a0).unwrap();
    c.free(&mut t[1], &b, a1).unwrap();
    c.check_invariants(&b).unwrap();
    let s = c.stats();
    assert_eq!((s.allocs, s.frees, s.slabs_allocated), (4, 4, 2));
    for t in &mut t {
        c.shrink(t, &b);
    }
    c.check_invariants(&b).unwrap();
    all_pages_returned(&b);
}

#[test]
fn a_remote_free_waits_on_the_owners_list_and_comes_back_to_its_slab() {
    with_buddy(256, 2, |b| {
        let mut c: PerCpuCache<SpinLock> = cache64(2);
        let mut t = tokens(2);
        let n = c.shape().objects_per_slab() as usize;
        let objs: Vec<Gpa> = (0..n).map(|_| c.alloc(&mut t[0], b).unwrap()).collect();
        // CPU 1 frees an object of CPU 0's CPU slab: it waits on CPU 0's
        // remote-free list (no lock, no new slab), still counted in use.
        c.free(&mut t[1], b, objs[5]).unwrap();
        c.check_invariants(b).unwrap();
        // The same check as a running kernel makes it: with every CPU's
        // token, in order, under the cache lock.
        c.check_invariants_with(&mut t, b).unwrap();
        t.swap(0, 1);
        assert!(c.check_invariants_with(&mut t, b).is_err(), "tokens out of order refused");
        t.swap(0, 1);
        assert_eq!(c.objects_in_use(), n as u64, "counted as freed only when CPU 0 takes it");
        // CPU 0's free list is empty: its slow path takes the remote list
        // first, and hands the object out again, from the same slab.
        assert_eq!(c.alloc(&mut t[0], b), Some(objs[5]));
        assert_eq!(c.stats().slabs_allocated, 1, "no new slab");
        assert_eq!(c.objects_in_use(), n as u64);
        // A double free through the remote path is not caught on the way
        // (SLUB checks no more), only an interior address is.
        assert_eq!(c.free(&mut t[1], b, Gpa(objs[5].0 + 8)), Err(SlabError::NotObjectStart));
        for (i, &o) in objs.iter().enumerate() {
            c.free(&mut t[i % 2], b, o).unwrap();
        }
        c.check_invariants(b).unwrap();
        for t in &mut t {
            c.shrink(t, b);
        }
        c.check_invariants(b).unwrap();
        assert_eq!(c.objects_in_use(), 0);
        assert_eq!(c.slab_counts(), (0, 0, 0, 0));
        all_pages_returned(b);
    });
}

#[test]
fn a_free_into_a_slab_no_cpu_has_frozen_takes_the_locked_path() {
    with_buddy(256, 2, |b| {
        let mut c: PerCpuCache<SpinLock> = cache64(2);
        let mut t = tokens(2);
        let n = c.shape().objects_per_slab() as usize;
        // One slab more than full: the first is retired to the full list.
        let objs: Vec<Gpa> = (0..n + 1).map(|_| c.alloc(&mut t[0], b).unwrap()).collect();
        assert_eq!(c.slab_counts(), (0, 1, 0, 1));
        c.free(&mut t[1], b, objs[0]).unwrap();
        assert_eq!(c.slab_counts(), (1, 0, 0, 1), "full to partial, at once");
        c.check_invariants(b).unwrap();
        assert_eq!(c.free(&mut t[1], b, objs[0]), Err(SlabError::DoubleFree), "the locked path's check");
        for &o in &objs[1..] {
            c.free(&mut t[1], b, o).unwrap();
        }
        for t in &mut t {
            c.shrink(t, b);
        }
        c.check_invariants(b).unwrap();
        all_pages_returned(b);
    });
}

#[test]
fn flushing_a_cpu_gives_back_its_slab_and_its_remote_frees() {
    with_buddy(256, 2, |b| {
        let mut c: PerCpuCache<SpinLock> = cache64(2);
        let mut t = tokens(2);
        let objs: Vec<Gpa> = (0..3).map(|_| c.alloc(&mut t[0], b).unwrap()).collect();
        c.free(&mut t[1], b, objs[1]).unwrap();
        c.free(&mut t[0], b, objs[0]).unwrap();
        c.free(&mut t[0], b, objs[2]).unwrap();
        c.flush_cpu(&mut t[0], b);
        assert_eq!(c.slab_counts(), (0, 0, 1, 0), "the CPU slab is empty, on the empty list");
        assert_eq!(c.objects_in_use(), 0, "the remote free was taken");
        c.check_invariants(b).unwrap();
        c.shrink(&mut t[0], b);
        assert_eq!(c.slab_counts(), (0, 0, 0, 0));
        all_pages_returned(b);
    });
}

#[test]
fn remote_frees_from_several_cpus_at_once_all_reach_the_owner() {
    with_buddy(256, 4, |b| {
        let mut c: PerCpuCache<SpinLock> = PerCpuCache::new("test-8", 41, 8, 8, ZonePref::Normal, 4).unwrap();
        let n = c.shape().objects_per_slab() as usize;
        // SAFETY: this thread plays CPU 0 only; the threads below play
        // CPUs 1..=3, one each.
        let mut t0 = unsafe { ThisCpu::new(CpuId::BOOT) };
        let mut objs: Vec<Gpa> = (0..n).map(|_| c.alloc(&mut t0, b).unwrap()).collect();
        objs.sort();
        for round in 0..200 {
            // Every object of CPU 0's CPU slab, freed by CPUs 1..=3 at
            // once: three pushers on CPU 0's remote-free list.
            // A spinning start line, so that the pushers run at once.
            let start = std::sync::atomic::AtomicUsize::new(0);
            std::thread::scope(|s| {
                for (i, part) in objs.chunks(n.div_ceil(3)).enumerate() {
                    let (c, start) = (&c, &start);
                    s.spawn(move || {
                        // SAFETY: thread `i` is the only user of CPU `i + 1`.
                        let mut me = unsafe { ThisCpu::new(CpuId::new(i + 1).unwrap()) };
                        start.fetch_add(1, Ordering::SeqCst);
                        let mut spins = 0u32;
                        while start.load(Ordering::SeqCst) < 3 {
                            spins += 1;
                            if spins < 100_000 {
                                std::hint::spin_loop();
                            } else {
                                std::thread::yield_now();
                            }
                        }
                        for &o in part {
                            c.free(&mut me, b, o).unwrap();
                        }
                    });
                }
            });
            // CPU 0 takes them all back, from the same slab.
            let mut again: Vec<Gpa> = (0..n).map(|_| c.alloc(&mut t0, b).unwrap()).collect();
            again.sort();
            assert_eq!(again, objs, "round {round}: a remote free was lost");
            assert_eq!(c.stats().slabs_allocated, 1, "round {round}: a new slab was needed");
        }
        for &o in &objs {
            c.free(&mut t0, b, o).unwrap();
        }
        c.shrink(&mut t0, b);
        c.check_invariants(b).unwrap();
        all_pages_returned(b);
    });
}

/// The kernel's shape: the kmalloc caches and the per-CPU page lists in
/// `static`s (`const`-constructed, `Sync`), not on a stack.
static KMALLOC: PerCpuKmalloc<SpinLock> = PerCpuKmalloc::new(ZonePref::Normal, 2);
static PCP: crate::buddy::PcpLists<SpinLock> = crate::buddy::PcpLists::new();

#[test]
fn the_front_ends_can_live_in_statics() {
    let mut fx = SmpFixture::new(DMA_LIMIT, 256);
    let b = fx.buddy_with(&PCP, FrameRange::default(), &[FrameRange::new(DMA_LIMIT, DMA_LIMIT.add(256))], 2);
    std::thread::scope(|s| {
        for i in 0..2 {
            let b = &b;
            s.spawn(move || {
                // SAFETY: thread `i` is the only user of CPU `i`.
                let mut me = unsafe { ThisCpu::new(CpuId::new(i).unwrap()) };
                let a = KMALLOC.alloc(&mut me, b, 100, 8).unwrap();
                let p = KMALLOC.alloc(&mut me, b, 3 * PAGE_SIZE as usize, 8).unwrap();
                KMALLOC.free(&mut me, b, p, 3 * PAGE_SIZE as usize, 8).unwrap();
                KMALLOC.free(&mut me, b, a, 100, 8).unwrap();
                KMALLOC.shrink(&mut me, b);
            });
        }
    });
    let mut t = tokens(2);
    KMALLOC.check_invariants_with(&mut t, &b).unwrap();
    b.drain_all();
    all_pages_returned(&b);
}

/// What an object at `addr` holds while live.
fn stamp(addr: u64, word: u64) -> u64 {
    addr.rotate_left(23) ^ word ^ 0x5eed
}

/// `cpus` threads each allocate and free kmalloc objects of random sizes
/// (stamped, the stamp checked before the free), handing about one in four
/// to another CPU to free (remote frees from several CPUs at once, racing
/// with each other and with the owner's slow
/// paths). Afterwards every CPU is shrunk, and the invariants, the exact
/// counts and the buddy's pages must all check out.
fn storm(cpus: usize, steps: usize) {
    with_buddy(4096, cpus, |b| {
        let mut k: PerCpuKmalloc<SpinLock> = PerCpuKmalloc::new(ZonePref::Normal, cpus);
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..cpus).map(|_| mpsc::channel::<(Gpa, usize)>()).unzip();
        std::thread::scope(|s| {
            for (i, rx) in rxs.into_iter().enumerate() {
                let others: Vec<_> = txs.clone();
                let k = &k;
                s.spawn(move || {
                    // SAFETY: thread `i` is the only user of CPU id `i`.
                    let mut me = unsafe { ThisCpu::new(CpuId::new(i).unwrap()) };
                    let mut x = 0x2545_f491_4f6c_dd1du64 ^ (i as u64 + 1) << 32;
                    let mut live: Vec<(Gpa, usize)> = Vec::new();
                    let free = |me: &mut ThisCpu, a: Gpa, size: usize| {
                        for w in 0..(size as u64).div_ceil(8) {
                            assert_eq!(b.mem().read_u64(Gpa(a.0 + w * 8)), stamp(a.0, w), "live object changed");
                        }
                        k.free(me, b, a, size, 8).unwrap();
                    };
                    for _ in 0..steps {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        while let Ok((a, size)) = rx.try_recv() {
                            free(&mut me, a, size);
                        }
                        if x % 5 < 3 || live.is_empty() {
                            let size = [8, 16, 24, 64, 64, 64, 100, 200, 512, 1000][(x >> 12) as usize % 10];
                            let a = k.alloc(&mut me, b, size, 8).expect("out of memory");
                            for w in 0..(size as u64).div_ceil(8) {
                                b.mem().write_u64(Gpa(a.0 + w * 8), stamp(a.0, w));
                            }
                            live.push((a, size));
                        } else {
                            let (a, size) = live.swap_remove((x >> 24) as usize % live.len());
                            if (x >> 40).is_multiple_of(4) {
                                others[(i + 1 + (x >> 44) as usize % (cpus - 1)) % cpus].send((a, size)).unwrap();
                            } else {
                                free(&mut me, a, size);
                            }
                        }
                    }
                    for (a, size) in std::mem::take(&mut live) {
                        free(&mut me, a, size);
                    }
                    drop(others);
                    while let Ok((a, size)) = rx.recv() {
                        free(&mut me, a, size);
                    }
                });
            }
            drop(txs);
        });
        // The threads are gone: one thread may now play every CPU.
        let mut t = tokens(cpus);
        k.check_invariants(b).unwrap();
        for t in &mut t {
            k.shrink(t, b);
        }
        k.check_invariants(b).unwrap();
        for i in 0..NR_KMALLOC_CACHES {
            let c = k.cache(i);
            let s = c.stats();
            assert_eq!(s.allocs, s.frees, "{}: allocations and frees differ", c.shape().name());
            assert_eq!(s.slabs_allocated, s.slabs_freed, "{}: a slab not returned", c.shape().name());
            assert_eq!(s.corruptions, 0);
        }
        all_pages_returned(b);
    });
}

#[test]
fn two_cpus_storm_and_every_object_and_page_comes_back() {
    storm(2, 30_000);
}

#[test]
fn four_cpus_storm_and_every_object_and_page_comes_back() {
    storm(4, 15_000);
}

// ---- the kmalloc property test, on several CPUs ----

#[derive(Clone, Debug)]
enum CpuOp {
    Alloc { cpu: usize, size: usize, align_shift: u32 },
    Free { cpu: usize, pick: usize },
    Shrink { cpu: usize },
}

fn cpu_op() -> impl Strategy<Value = CpuOp> {
    let size = prop_oneof![6 => 1..=256usize, 3 => 1..=4096usize, 1 => 1..=20_000usize];
    let align = prop_oneof![8 => 0..=4u32, 1 => 0..=14u32];
    prop_oneof![
        6 => (0..4usize, size, align).prop_map(|(cpu, size, align_shift)| CpuOp::Alloc { cpu, size, align_shift }),
        5 => (0..4usize, any::<usize>()).prop_map(|(cpu, pick)| CpuOp::Free { cpu, pick }),
        1 => (0..4usize).prop_map(|cpu| CpuOp::Shrink { cpu }),
    ]
}

/// The single-CPU property test's model (live objects never overlap, stay
/// unchanged, and every page comes back), with each operation on a random
/// CPU: frees are local, remote, or locked, as the object's slab is.
fn run_cpus(ops: Vec<CpuOp>, cpus: usize) -> Result<(), TestCaseError> {
    with_buddy(8192, cpus, |b| {
        let mut k: PerCpuKmalloc<SpinLock> = PerCpuKmalloc::new(ZonePref::Normal, cpus);
        let mut t = tokens(cpus);
        let mut live: BTreeMap<u64, (usize, usize)> = BTreeMap::new();
        for op in ops {
            match op {
                CpuOp::Alloc { cpu, size, align_shift } => {
                    let align = 1usize << align_shift;
                    let p = k.alloc(&mut t[cpu % cpus], b, size, align);
                    prop_assert!(p.is_some(), "out of memory with {} objects live", live.len());
                    let p = p.unwrap_or(Gpa(0));
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
                CpuOp::Free { cpu, pick } if !live.is_empty() => {
                    let (&addr, &(size, align)) = live.iter().nth(pick % live.len()).unwrap_or((&0, &(0, 0)));
                    for w in 0..(size as u64).div_ceil(8) {
                        prop_assert_eq!(b.mem().read_u64(Gpa(addr + w * 8)), stamp(addr, w), "live object changed");
                    }
                    prop_assert_eq!(k.free(&mut t[cpu % cpus], b, Gpa(addr), size, align), Ok(()));
                    live.remove(&addr);
                }
                CpuOp::Free { .. } => {}
                CpuOp::Shrink { cpu } => k.shrink(&mut t[cpu % cpus], b),
            }
            k.check_invariants(b).map_err(TestCaseError::fail)?;
            b.check_invariants().map_err(TestCaseError::fail)?;
        }
        for (i, (addr, (size, align))) in core::mem::take(&mut live).into_iter().enumerate() {
            prop_assert_eq!(k.free(&mut t[i % cpus], b, Gpa(addr), size, align), Ok(()));
        }
        for t in &mut t {
            k.shrink(t, b);
        }
        k.check_invariants(b).map_err(TestCaseError::fail)?;
        for i in 0..NR_KMALLOC_CACHES {
            let s = k.cache(i).stats();
            prop_assert_eq!(s.allocs, s.frees);
            prop_assert_eq!(s.slabs_allocated, s.slabs_freed);
        }
        all_pages_returned(b);
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_kmalloc_sequences_on_several_cpus_keep_objects_disjoint_and_return_every_page(
        ops in proptest::collection::vec(cpu_op(), 1..300),
        cpus in 1..=4usize,
    ) {
        run_cpus(ops, cpus)?;
    }
}
