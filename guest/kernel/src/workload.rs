//! Benchmark workloads (docs/architecture.md, "Workloads"), selected with
//! `workload=NAME size=N`. Each builds its state, sends `BENCH_BEGIN`, runs
//! `N` operations, sends `BENCH` with the operations and guest cycles, and
//! checks its own result (a workload that silently did nothing fails).
//!
//! | name | one operation |
//! | --- | --- |
//! | `fault` | first touch (write) of a fresh page: a demand-zero fault |
//! | `fork` | fork a 16-page address space copy-on-write, write every page in the child, destroy it |
//! | `ctxsw` | switch to the next of `spaces=N` address spaces (default 4; a CR3 load) and touch its page |
//! | `mmap` | map a 4-page area, touch it, unmap it |
//! | `tlb` | a read at a pseudo-random page of a working set of `tlbset=N` pages (default 64; 16384 = 64 MiB misses the TLB) with stable tables |
//! | `alloc` | a kmalloc 64-byte alloc+free and an order-0 page alloc+free (no MMU change) |
//! | `aging` | one page-aging pass over a 512-page working set (clear A where set, move idle pages to the inactive list), then a write to each page of its hot half |
//! | `shootdown` | CPU 0 unmaps one page of an address space every other CPU runs in and reads (a TLB shootdown: IPIs, or one `PV_FLUSH_REMOTE` in pv mode) |

use crate::ktest::vm_suites::{USER_BASE, enter_user, leave_user};
use crate::mm::{self, KernelMmu};
use crate::{arch, kprintln};
use guest_abi::Gva;
use guest_abi::report::{BenchRecord, kind};
use guest_mm::aging::Lru;
use guest_mm::aspace::AddressSpace;
use guest_mm::buddy::{ZoneId, ZonePref};
use guest_mm::paging::MmuPlatform;
use guest_mm::vma::Prot;

fn send(k: u32, name: &str, ops: u64, cycles: u64, ok: bool) {
    let mut n = [0u8; 16];
    let len = name.len().min(16);
    n[..len].copy_from_slice(&name.as_bytes()[..len]);
    let rec = BenchRecord { name: n, ops, cycles, ok: ok as u64 };
    if let Err(why) = crate::report::send(k, &[crate::report::bytes_of(&[rec])]) {
        crate::panic::fatal(why);
    }
}

fn page(i: u64) -> *mut u64 {
    (USER_BASE + i * 4096) as *mut u64
}

/// The workloads `workload=` accepts, one per arm of [`run`]'s match: the
/// command-line check refuses any other (keep the two together).
pub const NAMES: &[&str] = &["fault", "fork", "ctxsw", "mmap", "tlb", "alloc", "aging", "shootdown"];

/// Run workload `name` with `size` operations; ends the VM.
pub fn run(name: &str, size: u64) -> ! {
    crate::arch::idt::set_page_fault_hook(crate::ktest::vm_suites::user_fault);
    let size = size.max(1);
    if crate::cmdline::value(crate::boot::cmdline(), "harvest") == Some("off") {
        arch::mmu::set_harvest(false);
    }
    let result = match name {
        "fault" => fault(size),
        "fork" => fork(size),
        "ctxsw" => ctxsw(size),
        "mmap" => mmap(size),
        "tlb" => tlb(size),
        "alloc" => alloc(size),
        "aging" => aging(size),
        "shootdown" => shootdown(size),
        _ => Err("unknown workload"),
    };
    match result {
        Ok(()) => arch::exit(guest_abi::ports::EXIT_SUCCESS),
        Err(why) => {
            kprintln!("workload {} failed: {}", name, why);
            arch::exit(guest_abi::ports::EXIT_FAILURE)
        }
    }
}

/// Time `op` over `n` operations after a BEGIN record; the caller sends
/// the END record (before any teardown, which is not part of the phase).
fn measure(name: &str, n: u64, mut op: impl FnMut(u64)) -> u64 {
    send(kind::BENCH_BEGIN, name, 0, 0, true);
    let t0 = arch::rdtsc();
    for i in 0..n {
        op(i);
    }
    arch::rdtsc() - t0
}

fn fault(n: u64) -> Result<(), &'static str> {
    // The area is whole 2 MiB pages (its start is aligned), so that every
    // `anon=` size maps whole folios, as a large malloc'd buffer would.
    enter_user(n.next_multiple_of(512))?;
    let cycles = measure("fault", n, |i| {
        // SAFETY: inside the VMA; the first touch demand-faults.
        unsafe { page(i).write_volatile(i) }
    });
    // SAFETY: all mapped now.
    let ok = (0..n).all(|i| unsafe { page(i).read_volatile() } == i);
    send(kind::BENCH, "fault", n, cycles, ok);
    leave_user()?;
    if ok { Ok(()) } else { Err("pages lost their contents") }
}

fn fork(n: u64) -> Result<(), &'static str> {
    const PAGES: u64 = 16;
    enter_user(PAGES)?;
    for i in 0..PAGES {
        // SAFETY: inside the VMA.
        unsafe { page(i).write_volatile(i) };
    }
    let mut ok = true;
    let cycles = measure("fork", n, |_| {
        let parent = mm::with(|m| {
            m.ctx(|cx, _, user| {
                let a = user.as_mut()?;
                let (child, flush) = a.fork(cx).ok()?;
                flush.flush(cx.mmu);
                let parent = user.replace(child)?;
                user.as_ref()?.switch_to(cx.mmu);
                Some(parent)
            })
        })
        .flatten();
        let Some(parent) = parent else {
            ok = false;
            return;
        };
        for i in 0..PAGES {
            // SAFETY: mapped copy-on-write in the child.
            unsafe { page(i).write_volatile(i + 1000) };
        }
        mm::with(|m| {
            m.ctx(|cx, _, user| {
                if let Some(child) = user.replace(parent) {
                    user.as_ref().expect("parent").switch_to(cx.mmu);
                    crate::mm::destroy(cx, child);
                }
            })
        });
    });
    // SAFETY: the parent's pages.
    ok &= (0..PAGES).all(|i| unsafe { page(i).read_volatile() } == i);
    send(kind::BENCH, "fork", n, cycles, ok);
    leave_user()?;
    if ok { Ok(()) } else { Err("fork broke the parent's pages") }
}

fn ctxsw(n: u64) -> Result<(), &'static str> {
    let count = crate::cmdline::value(crate::boot::cmdline(), "spaces")
        .and_then(crate::cmdline::parse_u64)
        .unwrap_or(4)
        .clamp(2, 4096) as usize;
    let mut spaces: alloc::vec::Vec<Option<AddressSpace>> = (0..count).map(|_| None).collect();
    let setup = mm::with(|m| {
        m.ctx(|cx, kpt, _| {
            for s in spaces.iter_mut() {
                let mut a = mm::new_address_space(cx, kpt).ok()?;
                a.add_vma(Gva(USER_BASE), Gva(USER_BASE + 4096), Prot::READ | Prot::WRITE).ok()?;
                *s = Some(a);
            }
            Some(())
        })
    })
    .flatten();
    if setup.is_none() {
        return Err("could not build the address spaces");
    }
    // Touch each space's page once (demand faults happen here, not below).
    let mut next = 0usize;
    let mut switch = |spaces: &mut [Option<AddressSpace>], to: usize| {
        mm::with(|m| {
            m.ctx(|cx, _, user| {
                if let Some(prev) = user.take() {
                    spaces[next] = Some(prev);
                }
                let a = spaces[to].take().expect("space present");
                a.switch_to(cx.mmu);
                *user = Some(a);
            })
        });
        next = to;
    };
    for s in 0..count {
        switch(&mut spaces, s);
        // SAFETY: inside the current space's VMA.
        unsafe { page(0).write_volatile(s as u64) };
    }
    let mut ok = true;
    let cycles = measure("ctxsw", n, |i| {
        let to = (i as usize + 1) % count;
        switch(&mut spaces, to);
        // SAFETY: mapped in every space.
        ok &= unsafe { page(0).read_volatile() } == to as u64;
    });
    send(kind::BENCH, "ctxsw", n, cycles, ok);
    // With other CPUs online each does the same switches in turn, measured
    // as a phase of its own (the VMM counts its exits: a switch to a
    // cached root costs none in pv mode, on every vCPU).
    let roots: alloc::vec::Vec<u64> = (0..count)
        .map(|s| {
            if s == next {
                mm::with(|m| m.user.as_ref().map(|a| a.root().addr().0)).flatten()
            } else {
                spaces[s].as_ref().map(|a| a.root().addr().0)
            }
        })
        .map(|r| r.unwrap_or(0))
        .collect();
    CTXSW_ROOTS.store(roots.as_ptr() as u64, core::sync::atomic::Ordering::SeqCst);
    CTXSW_COUNT.store(count as u64, core::sync::atomic::Ordering::SeqCst);
    for cpu in crate::smp::online_cpus().skip(1) {
        ok &= crate::smp::run_on(cpu, ctxsw_on_ap, n) == Some(1);
    }
    mm::with(|m| {
        m.ctx(|cx, kpt, user| {
            KernelMmu.load_cr3(kpt.root());
            if let Some(a) = user.take() {
                crate::mm::destroy(cx, a);
            }
            for s in spaces.iter_mut() {
                if let Some(a) = s.take() {
                    crate::mm::destroy(cx, a);
                }
            }
        })
    });
    if ok { Ok(()) } else { Err("an address space saw another's page") }
}

fn mmap(n: u64) -> Result<(), &'static str> {
    enter_user(0)?;
    let mut ok = true;
    let cycles = measure("mmap", n, |i| {
        let added = mm::with(|m| {
            m.ctx(|_, _, user| {
                user.as_mut()
                    .map(|a| a.add_vma(Gva(USER_BASE), Gva(USER_BASE + 4 * 4096), Prot::READ | Prot::WRITE).is_ok())
            })
        })
        .flatten()
        .unwrap_or(false);
        ok &= added;
        for p in 0..4 {
            // SAFETY: inside the new VMA.
            unsafe { page(p).write_volatile(i + p) };
        }
        // SAFETY: mapped above.
        ok &= unsafe { page(3).read_volatile() } == i + 3;
        mm::with(|m| {
            m.ctx(|cx, _, user| {
                if let Some((_, flush)) = user.as_mut().and_then(|a| a.remove_vma(cx, Gva(USER_BASE))) {
                    flush.flush(cx.mmu);
                }
            })
        });
    });
    send(kind::BENCH, "mmap", n, cycles, ok);
    leave_user()?;
    if ok { Ok(()) } else { Err("map/touch/unmap lost data") }
}

fn tlb(n: u64) -> Result<(), &'static str> {
    let pages =
        crate::cmdline::value(crate::boot::cmdline(), "tlbset").and_then(crate::cmdline::parse_u64).unwrap_or(64);
    // The working set must fit in free memory, or its first touch would
    // fail deep in the fault handler: refuse it here, saying so.
    let free =
        mm::with(|m| m.buddy.stats(ZoneId::Dma).free_total() + m.buddy.stats(ZoneId::Normal).free_total()).unwrap_or(0);
    if pages.next_multiple_of(512) > free {
        kprintln!("tlb: a working set of {} pages needs more guest RAM ({} pages free): raise --memory", pages, free);
        return Err("working set larger than free memory (raise --memory)");
    }
    // Whole 2 MiB pages, as for `fault`: every `anon=` size fits.
    enter_user(pages.next_multiple_of(512))?;
    for i in 0..pages {
        // SAFETY: inside the VMA.
        unsafe { page(i).write_volatile(i * 3) };
    }
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut sum = 0u64;
    let mut want = 0u64;
    let cycles = measure("tlb", n, |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let p = x % pages;
        // SAFETY: mapped above; the tables do not change.
        sum = sum.wrapping_add(unsafe { page(p).read_volatile() });
        want = want.wrapping_add(p * 3);
    });
    send(kind::BENCH, "tlb", n, cycles, sum == want);
    leave_user()?;
    if sum == want { Ok(()) } else { Err("reads returned wrong data") }
}

fn alloc(n: u64) -> Result<(), &'static str> {
    let mut ok = true;
    let cycles = measure("alloc", n, |_| {
        // The per-CPU paths, without the MM lock (as the kernel heap and
        // the fault path take them).
        let done = mm::pages().map(|pages| {
            let obj = mm::kmalloc(64, 8);
            let page = pages.alloc(0, ZonePref::Normal);
            let freed_obj = obj.is_some_and(|o| mm::kfree(o, 64, 8).is_ok());
            let freed_page = page.is_some_and(|p| pages.free(p, 0).is_ok());
            freed_obj && freed_page
        });
        ok &= done == Some(true);
    });
    send(kind::BENCH, "alloc", n, cycles, ok);
    if ok { Ok(()) } else { Err("an allocation or free failed") }
}

/// Pages of `aging`'s working set: one page table's worth.
const AGING_PAGES: u64 = 512;

/// Where `aging`'s working set starts: one page past a 2 MiB boundary, so
/// that its VMA covers no aligned 2 MiB and every page is a 4 KiB leaf
/// whatever `anon=` says (the LRU ages 4 KiB pages; it drops large ones).
const AGING_BASE: u64 = USER_BASE + 4096;

/// Page `i` of `aging`'s working set.
fn aging_page(i: u64) -> *mut u64 {
    (AGING_BASE + i * 4096) as *mut u64
}

/// Whether page `i` of `aging`'s working set is in its hot half (every
/// other page, so hot and cold pages share every table).
fn hot(i: u64) -> bool {
    i.is_multiple_of(2)
}

/// One aging pass (Linux's `shrink_active_list` then
/// `shrink_inactive_list`) over the whole working set of the current
/// address space; `false` if there is none.
fn aging_pass(lru: &mut Lru<{ AGING_PAGES as usize }>) -> bool {
    mm::with(|m| {
        m.ctx(|cx, _, user| {
            let a = user.as_mut()?;
            lru.age_all(a, cx, true);
            Some(())
        })
    })
    .flatten()
    .is_some()
}

/// The lists say what the accesses were: the hot half on the active list,
/// the cold half on the inactive list, nothing reclaimed (every page holds
/// data) or lost.
fn aging_sorted(lru: &Lru<{ AGING_PAGES as usize }>) -> bool {
    let index = |p: Gva| (p.0 - AGING_BASE) / 4096;
    let half = (AGING_PAGES / 2) as usize;
    lru.active().len() == half
        && lru.inactive().len() == half
        && lru.active().iter().all(|p| hot(index(p)))
        && lru.inactive().iter().all(|p| !hot(index(p)))
        && lru.stats().reclaimed == 0
        && lru.stats().stale == 0
}

fn aging(n: u64) -> Result<(), &'static str> {
    enter_user(0)?;
    let added = mm::with(|m| {
        m.ctx(|_, _, user| {
            let end = AGING_BASE + AGING_PAGES * 4096;
            user.as_mut().map(|a| a.add_vma(Gva(AGING_BASE), Gva(end), Prot::READ | Prot::WRITE).is_ok())
        })
    })
    .flatten();
    if added != Some(true) {
        return Err("could not map the working set");
    }
    let mut lru = alloc::boxed::Box::new(Lru::<{ AGING_PAGES as usize }>::new());
    for i in 0..AGING_PAGES {
        // SAFETY: inside the VMA; the first touch demand-faults.
        unsafe { aging_page(i).write_volatile(i) };
        if !lru.add(Gva(AGING_BASE + i * 4096)) {
            return Err("the LRU lists are too small");
        }
    }
    let touch_hot = |v: u64| {
        for i in (0..AGING_PAGES).filter(|&i| hot(i)) {
            // SAFETY: mapped above, never unmapped (every page is dirty).
            unsafe { aging_page(i).write_volatile(v + i) };
        }
    };
    // Warm-up: the first pass finds every page used and activates it, the
    // second demotes the cold half; from then on every pass does the same.
    let mut ok = aging_pass(&mut lru);
    touch_hot(0);
    ok &= aging_pass(&mut lru) && aging_sorted(&lru);
    touch_hot(0);
    let cycles = measure("aging", n, |k| {
        ok &= aging_pass(&mut lru) && aging_sorted(&lru);
        touch_hot(k + 1);
    });
    send(kind::BENCH, "aging", n, cycles, ok);
    // After the measured phase: reading the cold pages faults their A bits
    // back in under shadow paging.
    // SAFETY: all mapped.
    ok &= (0..AGING_PAGES).all(|i| unsafe { aging_page(i).read_volatile() } == if hot(i) { n + i } else { i });
    leave_user()?;
    if ok { Ok(()) } else { Err("the aging pass sorted the pages wrongly") }
}
/// Set when the `shootdown` initiator is done: the readers stop.
static SHOOTDOWN_STOP: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// `shootdown`: `n` pages mapped, then CPU 0 unmaps them one per
/// operation while every other CPU runs in the same address space and
/// reads its last page (never unmapped): each unmap must reach every
/// reader's TLB before the frame can be reused (`crate::tlb`). The
/// shootdown counts (IPIs, pv remote flushes) go to the console.
fn shootdown(n: u64) -> Result<(), &'static str> {
    use core::sync::atomic::Ordering;
    fn role(root: u64) -> u64 {
        // SAFETY: the workload's user address space, which maps the kernel.
        unsafe { crate::tlb::use_root(root) };
        let hot = SHOOTDOWN_HOT.load(Ordering::Relaxed);
        if crate::arch::percpu::cpu_id() != 0 {
            // SAFETY: as below.
            let _ = unsafe { page(hot).read_volatile() };
            // In the address space's CPU mask and reading: the initiator
            // may start (every operation then reaches every reader).
            SHOOTDOWN_READY.fetch_add(1, Ordering::SeqCst);
            crate::smp::wake(0);
            let mut reads = 1u64;
            while !SHOOTDOWN_STOP.load(Ordering::Relaxed) {
                // SAFETY: the last page of the VMA, mapped and never unmapped.
                let _ = unsafe { page(hot).read_volatile() };
                reads += 1;
            }
            return reads;
        }
        let readers = crate::smp::online_count() as u64 - 1;
        crate::arch::wait_until(|| SHOOTDOWN_READY.load(Ordering::SeqCst) >= readers);
        let (ipis, pv) =
            (crate::tlb::IPIS.load(Ordering::Relaxed), crate::tlb::PV_REMOTE_FLUSHES.load(Ordering::Relaxed));
        let mut ok = true;
        let cycles = measure("shootdown", hot, |i| {
            let r = mm::with(|m| {
                m.ctx(|cx, _, user| {
                    let a = user.as_mut()?;
                    let start = Gva(USER_BASE + i * 4096);
                    a.unmap_range(cx, start, Gva(start.0 + 4096)).ok().map(|f| f.flush(cx.mmu))
                })
            });
            ok &= matches!(r, Some(Some(())));
        });
        send(kind::BENCH, "shootdown", hot, cycles, ok);
        SHOOTDOWN_STOP.store(true, Ordering::Relaxed);
        let ipis = crate::tlb::IPIS.load(Ordering::Relaxed) - ipis;
        let pv = crate::tlb::PV_REMOTE_FLUSHES.load(Ordering::Relaxed) - pv;
        kprintln!(
            "shootdown: {} ops on {} CPUs, {} IPIs, {} pv remote flushes",
            hot,
            crate::smp::online_count(),
            ipis,
            pv
        );
        u64::from(ok)
    }
    enter_user(n + 1)?;
    for i in 0..=n {
        // SAFETY: inside the VMA.
        unsafe { page(i).write_volatile(i) };
    }
    SHOOTDOWN_HOT.store(n, Ordering::Relaxed);
    SHOOTDOWN_STOP.store(false, Ordering::Relaxed);
    SHOOTDOWN_READY.store(0, Ordering::SeqCst);
    let root = mm::with(|m| m.user.as_ref().map(|a| a.root().addr().0)).flatten().ok_or("no user address space")?;
    let out = crate::smp::run_on_all(role, root);
    leave_user()?;
    if out[0] != 1 {
        return Err("unmapping a page failed");
    }
    if crate::smp::online_cpus().skip(1).any(|cpu| out[cpu as usize] == 0) {
        return Err("a reader never read");
    }
    Ok(())
}

/// The page the `shootdown` readers read (the VMA's last).
static SHOOTDOWN_HOT: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// `ctxsw` on an application processor: the roots and their number.
static CTXSW_ROOTS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
static CTXSW_COUNT: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// `ctxsw`'s `n` switches on this application processor, after one warm-up
/// pass over the spaces, as a measured phase of its own; back on the
/// kernel's root after. 1 when every space showed its own page.
fn ctxsw_on_ap(n: u64) -> u64 {
    use core::sync::atomic::Ordering;
    let count = CTXSW_COUNT.load(Ordering::SeqCst) as usize;
    // SAFETY: CPU 0 keeps the vector alive (and unchanged) until this
    // returns (`smp::run_on` waits).
    let roots = unsafe { core::slice::from_raw_parts(CTXSW_ROOTS.load(Ordering::SeqCst) as *const u64, count) };
    let mut ok = roots.iter().all(|&r| r != 0);
    let visit = |to: usize| {
        // SAFETY: a live user address space's root: it maps the kernel.
        unsafe { crate::tlb::use_root(roots[to]) };
        // SAFETY: mapped in every space.
        unsafe { page(0).read_volatile() == to as u64 }
    };
    if ok {
        for s in 0..count {
            ok &= visit(s);
        }
        let cycles = measure("ctxsw", n, |i| ok &= visit((i as usize + 1) % count));
        send(kind::BENCH, "ctxsw", n, cycles, ok);
    }
    // SAFETY: the kernel's root maps the kernel.
    unsafe { crate::tlb::use_root(crate::tlb::kernel_root()) };
    u64::from(ok)
}

/// `shootdown` readers that have started reading.
static SHOOTDOWN_READY: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
