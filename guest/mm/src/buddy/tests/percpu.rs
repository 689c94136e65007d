//! Host tests of the per-CPU front end ([`PerCpuBuddy`]): the lists'
//! batches and marks, refused frees, the drain under pressure, and
//! alloc/free storms on several threads with the invariants checked after.

use std::sync::mpsc;
use std::vec::Vec;

use super::*;
use crate::percpu::CpuId;

pub(super) use crate::testutil::{SmpBuddy, SmpFixture};

fn cpu(i: usize) -> CpuId {
    CpuId::new(i).unwrap()
}

/// `n` NORMAL frames from 16 MiB, all added, on `cpus` CPUs.
fn with_normal<R>(n: u64, cpus: usize, f: impl FnOnce(&SmpBuddy<'_>) -> R) -> R {
    let mut fx = SmpFixture::new(DMA_LIMIT, n as usize);
    let b = fx.buddy(NO_PGTABLES, &[FrameRange::new(DMA_LIMIT, DMA_LIMIT.add(n))], cpus, false);
    f(&b)
}

/// Every managed frame is on the free lists, fully merged, and the
/// counters agree: what a quiet allocator looks like once all is freed
/// and drained.
fn all_returned(b: &SmpBuddy<'_>) {
    b.drain_all();
    b.check_invariants().unwrap();
    assert_eq!(b.pcp_pages(), 0);
    b.with_zone(|a| {
        a.drain_hot_lists();
        for zone in ZoneId::ALL {
            let s = a.stats(zone);
            assert_eq!(s.free_pages + s.deferred_pages, s.managed_pages, "{zone:?}: a frame not returned");
            assert_eq!(s.allocs, s.frees, "{zone:?}: allocations and frees do not match");
        }
        a.check_invariants().unwrap();
    });
}

#[test]
fn per_cpu_lists_refuse_bad_arguments() {
    use crate::phys::SharedArenaMem;
    use crate::sync::SpinLock;
    use std::sync::atomic::AtomicU64;
    let backing: Vec<AtomicU64> = (0..100 * FRAME_WORDS).map(|_| AtomicU64::new(0)).collect();
    let flags: Vec<PcpFlag> = (0..pcp_flag_bytes(100)).map(|_| PcpFlag::default()).collect();
    assert_eq!(flags.len(), 128, "a power of two");
    let pcp: PcpLists<SpinLock> = PcpLists::new();
    let mem = SharedArenaMem::new(DMA_LIMIT.addr(), &backing);
    let fresh = || vec![FrameMeta::default(); 100];
    let (mut m1, mut m2, mut m3, mut m4, mut m5) = (fresh(), fresh(), fresh(), fresh(), fresh());
    fn mk<'a>(mem: SharedArenaMem<'a>, meta: &'a mut [FrameMeta]) -> BuddyAllocator<'a, SharedArenaMem<'a>> {
        BuddyAllocator::new(mem, meta, DMA_LIMIT, NO_PGTABLES).unwrap()
    }
    assert!(PerCpuBuddy::new(mk(mem, &mut m1), &pcp, 0, &flags).is_none(), "no CPU");
    assert!(PerCpuBuddy::new(mk(mem, &mut m2), &pcp, crate::percpu::MAX_CPUS + 1, &flags).is_none(), "too many CPUs");
    assert!(PerCpuBuddy::new(mk(mem, &mut m3), &pcp, 2, &flags[..100]).is_none(), "flag table too short");
    flags[7].0.store(3, core::sync::atomic::Ordering::Relaxed);
    assert!(PerCpuBuddy::new(mk(mem, &mut m4), &pcp, 2, &flags).is_none(), "flag table not zero");
    flags[7].0.store(0, core::sync::atomic::Ordering::Relaxed);
    let mut a = mk(mem, &mut m5);
    a.add_free_range(FrameRange::new(DMA_LIMIT, DMA_LIMIT.add(100))).unwrap();
    let b = PerCpuBuddy::new(a, &pcp, 2, &flags).unwrap();
    let p = b.alloc_on(cpu(0), 0, ZonePref::Normal).unwrap();
    b.free_on(cpu(0), p, 0).unwrap();
    let a = b.into_inner();
    assert_eq!(a.stats(ZoneId::Normal).hot_pages, 0, "into_inner drained the per-CPU lists");
    a.check_invariants().unwrap();
}

#[test]
fn order0_frames_come_from_the_calling_cpus_list_refilled_by_batch() {
    with_normal(256, 2, |b| {
        let p = b.alloc_on(cpu(0), 0, ZonePref::Normal).unwrap();
        assert_eq!(b.pcp_stats(cpu(0)).refills, 1);
        assert_eq!(b.pcp_pages(), HOT_BATCH as u64 - 1, "one batch taken, one frame handed out");
        assert_eq!(b.pcp_stats(cpu(1)), PcpStats::default(), "CPU 1 untouched");
        // Freed on CPU 1, the frame goes onto CPU 1's list and is the next
        // one CPU 1 hands out (still cache-hot there).
        b.free_on(cpu(1), p, 0).unwrap();
        assert_eq!(b.pcp_stats(cpu(1)).frees, 1);
        assert_eq!(b.alloc_on(cpu(1), 0, ZonePref::Normal), Some(p));
        assert_eq!(b.pcp_stats(cpu(1)).refills, 0, "served from CPU 1's list without a refill");
        b.check_invariants().unwrap();
        b.free_on(cpu(1), p, 0).unwrap();
        assert_eq!(b.stats(ZoneId::Normal).free_total(), 256, "listed frames count as free");
        all_returned(b);
    });
}

#[test]
fn a_full_cpu_list_returns_its_oldest_batch_to_the_zone() {
    with_normal(512, 1, |b| {
        let frames: Vec<Pfn> = (0..HOT_HIGH + 1).map(|_| b.alloc_on(cpu(0), 0, ZonePref::Normal).unwrap()).collect();
        b.drain_cpu(cpu(0));
        for &p in &frames[..HOT_HIGH] {
            b.free_on(cpu(0), p, 0).unwrap();
        }
        assert_eq!(b.pcp_pages(), HOT_HIGH as u64, "the list holds up to its high mark");
        // 65 frames took 5 batches of 16; the 15 left were drained.
        assert_eq!(b.pcp_stats(cpu(0)).drained, 15);
        b.free_on(cpu(0), frames[HOT_HIGH], 0).unwrap();
        assert_eq!(b.pcp_pages(), (HOT_HIGH - HOT_BATCH + 1) as u64, "one batch went back before the push");
        assert_eq!(b.pcp_stats(cpu(0)).drained, 15 + HOT_BATCH as u64);
        let mut listed = Vec::new();
        b.for_each_pcp_frame(|p, _, _| listed.push(p));
        assert!(!listed.contains(&frames[0]) && listed.contains(&frames[HOT_BATCH]), "the oldest batch went back");
        b.check_invariants().unwrap();
        all_returned(b);
    });
}

#[test]
fn bad_frees_through_the_cpu_path_are_refused_and_change_nothing() {
    let mut fx = SmpFixture::new(DMA_LIMIT, 64);
    let pt = FrameRange::new(DMA_LIMIT, DMA_LIMIT.add(8));
    let b = fx.buddy(pt, &[FrameRange::new(DMA_LIMIT, DMA_LIMIT.add(64))], 2, false);
    let p = b.alloc_on(cpu(0), 0, ZonePref::Normal).unwrap();
    let big = b.alloc_on(cpu(0), 2, ZonePref::Normal).unwrap();
    let t = b.with_zone(|a| a.alloc_pgtable()).unwrap();
    b.free_on(cpu(0), p, 0).unwrap();
    let before = b.pcp_pages();
    // A second free of a listed frame, on either CPU.
    assert_eq!(b.free_on(cpu(0), p, 0), Err(FreeError::DoubleFree));
    assert_eq!(b.free_on(cpu(1), p, 0), Err(FreeError::DoubleFree));
    // The zone's own checks for everything else.
    assert_eq!(b.free_on(cpu(1), big, 1), Err(FreeError::WrongOrder { allocated: 2 }));
    assert_eq!(b.free_on(cpu(1), big.add(1), 0), Err(FreeError::NotBlockHead));
    assert_eq!(b.free_on(cpu(1), t, 0), Err(FreeError::WrongZone));
    assert_eq!(b.free_on(cpu(1), Pfn(3), 0), Err(FreeError::OutOfRange));
    assert_eq!(b.pcp_pages(), before);
    b.check_invariants().unwrap();
    b.free_on(cpu(1), big, 2).unwrap();
    b.with_zone(|a| a.free_pgtable(t)).unwrap();
    all_returned(&b);
}

#[test]
fn an_allocation_drains_other_cpus_lists_rather_than_fail() {
    // 64 frames, all of them cached on CPU 1's list.
    with_normal(64, 2, |b| {
        let frames: Vec<Pfn> = (0..64).map(|_| b.alloc_on(cpu(1), 0, ZonePref::Normal).unwrap()).collect();
        assert_eq!(b.alloc_on(cpu(1), 0, ZonePref::Normal), None, "all 64 handed out");
        frames.iter().for_each(|&p| b.free_on(cpu(1), p, 0).unwrap());
        assert_eq!(b.pcp_pages(), 64);
        // The whole span as one block, on CPU 0: only a drain of CPU 1's
        // list can serve it.
        let drains = b.pressure_drains();
        let all = b.alloc_on(cpu(0), 6, ZonePref::Normal);
        assert_eq!(all, Some(DMA_LIMIT));
        assert_eq!(b.pressure_drains(), drains + 1);
        b.free_on(cpu(0), DMA_LIMIT, 6).unwrap();
        // And frame by frame, after CPU 1 cached them again.
        let frames: Vec<Pfn> = (0..64).map(|_| b.alloc_on(cpu(1), 0, ZonePref::Normal).unwrap()).collect();
        frames.iter().for_each(|&p| b.free_on(cpu(1), p, 0).unwrap());
        let got: Vec<Pfn> = (0..64).map_while(|_| b.alloc_on(cpu(0), 0, ZonePref::Normal)).collect();
        assert_eq!(got.len(), 64, "a frame stranded on CPU 1's list");
        assert_eq!(b.alloc_on(cpu(0), 0, ZonePref::Normal), None);
        got.iter().for_each(|&p| b.free_on(cpu(0), p, 0).unwrap());
        all_returned(b);
    });
}

#[test]
fn an_offline_cpus_lists_are_drained_whole() {
    with_normal(256, 3, |b| {
        let frames: Vec<Pfn> = (0..20).map(|_| b.alloc_on(cpu(2), 0, ZonePref::Normal).unwrap()).collect();
        frames.iter().for_each(|&p| b.free_on(cpu(2), p, 0).unwrap());
        let on_0 = b.alloc_on(cpu(0), 0, ZonePref::Normal).unwrap();
        b.drain_cpu(cpu(2));
        let mut cpus = Vec::new();
        b.for_each_pcp_frame(|_, _, c| cpus.push(c));
        assert!(!cpus.is_empty() && cpus.iter().all(|&c| c == cpu(0)), "only CPU 0's list is left");
        b.free_on(cpu(0), on_0, 0).unwrap();
        all_returned(b);
    });
}

/// A random order, mostly 0 as in a kernel.
fn storm_order(x: u64) -> u8 {
    [0, 0, 0, 0, 0, 0, 1, 2, 0, 3][(x % 10) as usize]
}

/// `cpus` threads each run `steps` random allocations and frees (orders
/// 0..=3, every frame stamped with its own pfn and the stamp checked
/// before the free), and hand about one block in four to another CPU to
/// free (a free on another CPU than the allocation). Afterwards every
/// frame must be back and every invariant hold.
fn storm(cpus: usize, steps: usize) {
    let n = 4096u64;
    with_normal(n, cpus, |b| {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..cpus).map(|_| mpsc::channel::<(Pfn, u8)>()).unzip();
        std::thread::scope(|s| {
            for (i, rx) in rxs.into_iter().enumerate() {
                let others: Vec<_> = txs.clone();
                s.spawn(move || {
                    let me = cpu(i);
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (i as u64 + 1);
                    let mut live: Vec<(Pfn, u8)> = Vec::new();
                    let check_and_free = |p: Pfn, o: u8| {
                        for f in 0..1u64 << o {
                            assert_eq!(
                                b.mem().read_u64(p.add(f).addr()),
                                p.add(f).0,
                                "frame {:?} changed while allocated",
                                p.add(f)
                            );
                        }
                        b.free_on(me, p, o).unwrap();
                    };
                    for _ in 0..steps {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        while let Ok((p, o)) = rx.try_recv() {
                            check_and_free(p, o);
                        }
                        if !x.is_multiple_of(3) || live.is_empty() {
                            let o = storm_order(x >> 20);
                            if let Some(p) = b.alloc_on(me, o, ZonePref::Normal) {
                                for f in 0..1u64 << o {
                                    b.mem().write_u64(p.add(f).addr(), p.add(f).0);
                                }
                                live.push((p, o));
                            }
                            if live.len() > 200 {
                                let (p, o) = live.swap_remove((x >> 8) as usize % live.len());
                                check_and_free(p, o);
                            }
                        } else {
                            let (p, o) = live.swap_remove((x >> 8) as usize % live.len());
                            if (x >> 40).is_multiple_of(4) {
                                others[(i + 1 + (x >> 44) as usize % (cpus - 1)) % cpus].send((p, o)).unwrap();
                            } else {
                                check_and_free(p, o);
                            }
                        }
                    }
                    for (p, o) in live {
                        check_and_free(p, o);
                    }
                    drop(others);
                    // What other CPUs sent after this one finished is freed here.
                    while let Ok((p, o)) = rx.recv() {
                        check_and_free(p, o);
                    }
                });
            }
            drop(txs);
        });
        assert_eq!(b.stats(ZoneId::Normal).free_total(), n, "a frame not returned");
        all_returned(b);
    });
}

#[test]
fn two_cpus_storm_and_every_frame_comes_back() {
    storm(2, 20_000);
}

#[test]
fn four_cpus_storm_and_every_frame_comes_back() {
    storm(4, 10_000);
}

#[test]
fn a_cpus_handle_serves_paging_from_its_lists_and_the_page_table_zone() {
    use crate::paging::{FrameSource, PageTableSource};
    let mut fx = SmpFixture::new(DMA_LIMIT, 64);
    let pt = FrameRange::new(DMA_LIMIT, DMA_LIMIT.add(8));
    let b = fx.buddy(pt, &[FrameRange::new(DMA_LIMIT, DMA_LIMIT.add(64))], 2, false);
    let mut on1 = b.on(cpu(1));
    let f = on1.alloc_frame().unwrap();
    assert!(!pt.contains(f));
    assert_eq!(b.pcp_stats(cpu(1)).allocs, 1, "a data frame from CPU 1's list");
    let t = on1.alloc_table().unwrap();
    assert!(pt.contains(t) && b.mem().frame_is_zero(t));
    on1.free_table(t);
    on1.free_frame(f);
    assert_eq!(b.pcp_stats(cpu(1)).frees, 1);
    all_returned(&b);
}
