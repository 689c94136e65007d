//! SMP suites: every online CPU at once (`smp::run_on_all`). With one CPU
//! they run on the boot CPU alone and check the same invariants; `vmm
//! test` runs them again at two vCPUs (and `--vcpus N` at N).
//!
//! The roles: CPU 0 drives (unmaps, forks, checks), the others are
//! "threads" of one address space (readers, writers, faulters). Waiting is
//! at wait points (`arch::wait_until`), never a long ring-0 spin, except
//! the workers' own bounded loops, which run with interrupts enabled so
//! shootdowns reach them.

use super::vm_suites::{COW, DEMAND, DEMAND_PAGES, enter_user, frames_in_use, leave_user, user_ptr};
use super::{TestResult, check};
use crate::arch::{self, apic, percpu};
use crate::sync::SpinLock;
use crate::{kprintln, mm, smp, tlb};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use guest_abi::{DIRECT_MAP_BASE, Gpa, Gva};
use guest_mm::buddy::ZonePref;
use guest_mm::paging::{MmuPlatform, PteFlags};
use guest_mm::phys::Pfn;

fn user_root() -> Result<u64, &'static str> {
    mm::with(|m| m.user.as_ref().map(|a| a.root().addr().0)).flatten().ok_or("no user address space")
}

/// A reusable barrier for the online CPUs (the last to arrive wakes the
/// others, who wait halted).
struct Barrier {
    count: AtomicU64,
    generation: AtomicU64,
}

impl Barrier {
    const fn new() -> Self {
        Barrier { count: AtomicU64::new(0), generation: AtomicU64::new(0) }
    }
    fn wait(&self) {
        let n = smp::online_count() as u64;
        let irq = arch::interrupts_enabled();
        let generation = self.generation.load(Ordering::SeqCst);
        if self.count.fetch_add(1, Ordering::SeqCst) + 1 == n {
            self.count.store(0, Ordering::SeqCst);
            self.generation.fetch_add(1, Ordering::SeqCst);
            smp::wake_mask(smp::online_mask());
        } else {
            arch::wait_until(|| self.generation.load(Ordering::SeqCst) != generation);
        }
        if irq {
            arch::enable_interrupts();
        }
    }
}

static BARRIER: Barrier = Barrier::new();

/// Each CPU reports its id through its GS base, and (with an APIC) an
/// APIC id equal to it.
pub fn cpus_have_distinct_ids() -> TestResult {
    fn ids(_: u64) -> u64 {
        let apic_id = if apic::is_enabled() { apic::id() as u64 } else { 0 };
        (apic_id << 32) | percpu::cpu_id() as u64 | 1 << 31
    }
    let out = smp::run_on_all(ids, 0);
    for cpu in smp::online_cpus() {
        let r = out[cpu as usize];
        check(r & (1 << 31) != 0, "a CPU did not run its work")?;
        check(r & 0x7fff_ffff == cpu as u64, "a CPU's per-CPU id is not its own")?;
        if apic::is_enabled() {
            check(r >> 32 == cpu as u64, "a CPU's APIC id is not its CPU id")?;
        }
    }
    check(percpu::area(0).id() == 0, "the boot CPU is not CPU 0")
}

/// What CPU 0 found in the storm's quiesced phases (the storm's own
/// result channel: the other CPUs only return their bad counts).
static STORM_ERROR: SpinLock<Option<&'static str>> = SpinLock::new(None);
static STORM_FREE_BEFORE: AtomicU64 = AtomicU64::new(0);
static STORM_PATHS: SpinLock<(mm::PathCounts, mm::PathCounts)> =
    SpinLock::new((mm::PathCounts::ZERO, mm::PathCounts::ZERO));

/// CPU 0, every other CPU waiting at [`BARRIER`]: [`mm::quiesce`].
fn storm_quiesced(check: bool) -> Result<u64, &'static str> {
    // SAFETY: the other online CPUs are waiting at the barrier (outside the
    // allocators) until this CPU reaches it; offline CPUs never allocate.
    unsafe { mm::quiesce(check) }
}

/// Cycles CPU 0 measured from the barrier before the storm to the one
/// after it (the storm proper, without the checks).
static STORM_CYCLES: AtomicU64 = AtomicU64::new(0);

/// Every CPU allocates and frees pages and heap objects at once through
/// the per-CPU fast paths (no MM lock), each block stamped with its owner
/// and checked before it is freed. With every CPU quiesced at a barrier
/// before and after, CPU 0 drains every CPU's lists and slabs and checks
/// the buddy, per-CPU list and slab invariants: the free frame count is
/// exactly what it was (no page stranded on a list, nothing leaked).
pub fn alloc_free_storm() -> TestResult {
    fn storm(_: u64) -> u64 {
        let me = percpu::cpu_id() as u64;
        let Some(pages) = mm::pages() else { return 1 };
        BARRIER.wait();
        if me == 0 {
            match storm_quiesced(false) {
                Ok(free) => STORM_FREE_BEFORE.store(free, Ordering::SeqCst),
                Err(e) => *STORM_ERROR.lock() = Some(e),
            }
            STORM_PATHS.lock().0 = mm::path_counts();
        }
        BARRIER.wait();
        let t0 = arch::rdtsc();
        let mut held = [0u64; 8];
        let mut bad = 0;
        for i in 0..storm_rounds() {
            let slot = (i % 8) as usize;
            if held[slot] != 0 {
                let (pfn, order) = (held[slot] >> 8, held[slot] & 0xff);
                // SAFETY: a block this CPU allocated and still owns, in the
                // direct map.
                let stamp = unsafe { ((DIRECT_MAP_BASE + (pfn << 12)) as *const u64).read_volatile() };
                bad += u64::from(stamp != me << 32 | pfn);
                bad += u64::from(pages.free(Pfn(pfn), order as u8).is_err());
                held[slot] = 0;
            }
            let order = (i % 3) as u8;
            if let Some(pfn) = pages.alloc(order, ZonePref::Normal) {
                // SAFETY: a block just allocated to this CPU, in the
                // direct map.
                unsafe { ((DIRECT_MAP_BASE + pfn.addr().0) as *mut u64).write_volatile(me << 32 | pfn.0) };
                held[slot] = pfn.0 << 8 | order as u64;
            }
            // The kernel heap (slab) from every CPU at once.
            let v: alloc::vec::Vec<u64> = alloc::vec![me; 1 + (i % 24) as usize];
            bad += u64::from(v.iter().any(|&x| x != me));
        }
        for h in held.iter().filter(|&&h| h != 0) {
            bad += u64::from(pages.free(Pfn(h >> 8), (h & 0xff) as u8).is_err());
        }
        BARRIER.wait();
        if me == 0 {
            STORM_CYCLES.store(arch::rdtsc().wrapping_sub(t0), Ordering::SeqCst);
            STORM_PATHS.lock().1 = mm::path_counts();
            match storm_quiesced(true) {
                Ok(free) if free != STORM_FREE_BEFORE.load(Ordering::SeqCst) => {
                    *STORM_ERROR.lock() = Some("free frames after draining differ from before the storm")
                }
                Ok(_) => {}
                Err(e) => *STORM_ERROR.lock() = Some(e),
            }
        }
        BARRIER.wait();
        bad
    }
    *STORM_ERROR.lock() = None;
    let out = smp::run_on_all(storm, 0);
    check(out.iter().all(|&b| b == 0), "a block lost its owner's stamp or a free was refused")?;
    if let Some(e) = *STORM_ERROR.lock() {
        return Err(e);
    }
    let (a, b) = *STORM_PATHS.lock();
    let (heap_fast, heap_slow) = (b.heap_fast - a.heap_fast, b.heap_slow - a.heap_slow);
    let (page_fast, page_slow) = (b.page_fast - a.page_fast, b.page_slow - a.page_slow);
    kprintln!(
        "storm on {} CPUs: {} cycles; heap {} fast / {} slow, order-0 pages {} fast / {} slow",
        smp::online_count(),
        STORM_CYCLES.load(Ordering::SeqCst),
        heap_fast,
        heap_slow,
        page_fast,
        page_slow
    );
    // Each CPU allocates an order-0 page every third round and frees each
    // once. Its lists start drained, so its first allocation refills them
    // with a batch (16) through the zone lock; it never holds more than 8
    // blocks, so every later call is served by (or frees onto) its own
    // list: exactly one slow path per CPU, whatever the interleaving.
    let cpus = smp::online_count() as u64;
    check(page_fast + page_slow == 2 * storm_rounds().div_ceil(3) * cpus, "order-0 page calls miscounted")?;
    check(page_slow == cpus, "an order-0 page call after the first refill took the zone lock")?;
    // Each CPU allocates one `Vec` at a time (8 to 192 bytes) and frees it
    // before the next: after its caches were flushed, only its first
    // allocation in each size class finds no CPU slab; every other heap
    // call is served by (or frees onto) its CPU slab, without a lock.
    let class = |k: usize| guest_mm::slab::size_class(8 * k, 8);
    let classes = 1 + (2..=24).filter(|&k| class(k) != class(k - 1)).count() as u64;
    check(heap_fast + heap_slow == 2 * storm_rounds() * cpus, "heap calls miscounted")?;
    check(heap_slow == classes * cpus, "a heap call other than a size class's first took a lock")
}

/// Rounds of the storm on each CPU (alone, the CPU only checks the stamps
/// and invariants: fewer).
fn storm_rounds() -> u64 {
    if smp::online_count() > 1 { 96 } else { 24 }
}

/// All CPUs fault in their own pages of one address space at once, then
/// read everyone's: one demand fault per page (per folio with `anon=`),
/// every value seen.
pub fn parallel_demand_faults() -> TestResult {
    const PER_CPU: u64 = 8;
    fn fault_in(root: u64) -> u64 {
        // SAFETY: the test's user address space, which maps the kernel.
        unsafe { tlb::use_root(root) };
        let (me, n) = (percpu::cpu_id() as u64, smp::online_count() as u64);
        for k in 0..PER_CPU {
            let page = me * PER_CPU + k;
            // SAFETY: inside the test's VMA (demand-paged).
            unsafe { user_ptr(page).write_volatile(0xabc0_0000 | page) };
        }
        BARRIER.wait();
        let mut bad = 0;
        for page in 0..n * PER_CPU {
            // SAFETY: as above; every page was written before the barrier.
            bad += u64::from(unsafe { user_ptr(page).read_volatile() } != 0xabc0_0000 | page);
        }
        bad
    }
    let n = smp::online_count() as u64;
    let before = frames_in_use();
    enter_user(n * PER_CPU)?;
    let (d0, p0) = (DEMAND.load(Ordering::Relaxed), DEMAND_PAGES.load(Ordering::Relaxed));
    let out = smp::run_on_all(fault_in, user_root()?);
    let demand = DEMAND.load(Ordering::Relaxed) - d0;
    let pages = DEMAND_PAGES.load(Ordering::Relaxed) - p0;
    leave_user()?;
    check(out.iter().all(|&b| b == 0), "a CPU read a wrong value from a page another CPU faulted in")?;
    check(pages == n * PER_CPU, "not every page demand-mapped exactly once")?;
    // One demand fault per folio (`anon=`): each aligned block of the
    // largest size that fits in the VMA is mapped whole by the first CPU
    // to touch it (the VMA starts 2 MiB-aligned).
    let (total, folio) = (n * PER_CPU, mm::anon_folio());
    let mut folios = 0;
    let mut page = 0;
    while page < total {
        page += folio.fallbacks().map(|s| s.pages()).find(|&k| page % k == 0 && page + k <= total).unwrap_or(1);
        folios += 1;
    }
    check(demand == folios, "not exactly one demand fault per folio")?;
    check(frames_in_use() == before, "the shared address space leaked frames or tables")
}

static STOP: AtomicBool = AtomicBool::new(false);
/// `fork_while_threads_write`: the fork has returned.
static FORKED: AtomicBool = AtomicBool::new(false);
/// `fork_while_threads_write`: the writers that wrote after the fork.
static WROTE_AFTER_FORK: AtomicU64 = AtomicU64::new(0);
/// Per CPU: reads of the value so far (the readers of
/// [`unmap_while_reading`]).
static SEEN: [AtomicU64; percpu::MAX_CPUS] = [const { AtomicU64::new(0) }; percpu::MAX_CPUS];

/// Wait (with `NOW` exits, which let other vCPUs run) until every other
/// online CPU's [`SEEN`] count has moved past `since`, or `limit_ns`.
fn wait_for_readers(since: &[u64; percpu::MAX_CPUS], limit_ns: u64) {
    let t0 = crate::hypercall::now_ns();
    while crate::hypercall::now_ns().saturating_sub(t0) < limit_ns {
        if smp::online_cpus().skip(1).all(|c| SEEN[c as usize].load(Ordering::Relaxed) > since[c as usize]) {
            return;
        }
    }
}
const POISON: u64 = 0xdead_dead_dead_dead;
const VALUE: u64 = 0x5afe_5afe;

/// CPU 0 unmaps a page the others keep reading, then poisons the old
/// frame once the shootdown returned: no reader ever sees the poison
/// (it would have to read through a stale TLB entry).
pub fn unmap_while_reading() -> TestResult {
    const ROUNDS: u64 = 12;
    fn role(root: u64) -> u64 {
        // SAFETY: the test's user address space, which maps the kernel.
        unsafe { tlb::use_root(root) };
        if percpu::cpu_id() != 0 {
            // A reader: count reads of the value, and of the poison.
            let (mut seen, mut poisoned) = (0u64, 0u64);
            while !STOP.load(Ordering::Relaxed) {
                // SAFETY: inside the VMA: mapped, or demand-zeroed anew.
                let v = unsafe { user_ptr(0).read_volatile() };
                seen += u64::from(v == VALUE);
                poisoned += u64::from(v == POISON);
                SEEN[percpu::cpu_id() as usize].store(seen, Ordering::Relaxed);
            }
            return poisoned << 32 | seen.min(0xffff_ffff);
        }
        let mut errors = 0;
        // Alone, the CPU only checks the unmap/poison/free cycle: 2 rounds.
        let rounds = if smp::online_count() > 1 { ROUNDS } else { 2 };
        for _ in 0..rounds {
            // SAFETY: inside the VMA (demand-paged on first touch).
            unsafe { user_ptr(0).write_volatile(VALUE) };
            // Let every reader read it (up to 20 ms: with more vCPUs than
            // host cores a reader may wait for a core).
            let since: [u64; percpu::MAX_CPUS] = core::array::from_fn(|c| SEEN[c].load(Ordering::Relaxed));
            wait_for_readers(&since, 20_000_000);
            let r = mm::with(|m| {
                m.ctx(|cx, _, user| -> Result<Gpa, &'static str> {
                    let a = user.as_mut().ok_or("no user space")?;
                    let gpa = a.page_table().translate(cx.mem, Gva(user_ptr(0) as u64)).ok_or("not mapped")?;
                    let frame = Pfn::containing(gpa.addr);
                    // Keep the frame ours past the unmap, to poison it.
                    cx.refs.inc(frame).map_err(|e| e.as_str())?;
                    let start = Gva(user_ptr(0) as u64);
                    a.unmap_range(cx, start, Gva(start.0 + 4096)).map_err(|e| e.as_str())?.flush(cx.mmu);
                    Ok(frame.addr())
                })
            });
            let Some(Ok(old)) = r else {
                errors += 1;
                break;
            };
            // The shootdown has returned: no CPU can reach `old` now.
            // SAFETY: a frame only this test holds a reference to.
            unsafe { ((DIRECT_MAP_BASE + old.0) as *mut u64).write_volatile(POISON) };
            for _ in 0..20 {
                crate::hypercall::now_ns();
            }
            mm::with(|m| {
                m.ctx(|cx, _, _| {
                    let f = Pfn::containing(old);
                    if let Ok(0) = cx.refs.dec(f) {
                        guest_mm::paging::FrameSource::free_frame(&mut cx.frames, f);
                    }
                })
            });
        }
        STOP.store(true, Ordering::Relaxed);
        errors
    }
    let before = frames_in_use();
    enter_user(1)?;
    STOP.store(false, Ordering::Relaxed);
    SEEN.iter().for_each(|s| s.store(0, Ordering::Relaxed));
    let s0 = tlb::SHOOTDOWNS.load(Ordering::Relaxed);
    let out = smp::run_on_all(role, user_root()?);
    let shootdowns = tlb::SHOOTDOWNS.load(Ordering::Relaxed) - s0;
    leave_user()?;
    check(out[0] == 0, "the driver could not unmap the page")?;
    for cpu in smp::online_cpus().skip(1) {
        let r = out[cpu as usize];
        check(r >> 32 == 0, "a reader saw the poisoned old frame after the shootdown")?;
        check(r & 0xffff_ffff > 0, "a reader never saw the value")?;
    }
    check(smp::online_count() == 1 || shootdowns > 0, "no shootdown with readers online")?;
    check(frames_in_use() == before, "unmap/poison leaked frames")
}

/// CPU 0 forks the address space while the others keep writing their own
/// pages: the child's copy is a snapshot that never changes afterwards
/// (copy-on-write stays exact), and the writers go on in the parent.
pub fn fork_while_threads_write() -> TestResult {
    fn role(root: u64) -> u64 {
        // SAFETY: the test's user address space, which maps the kernel.
        unsafe { tlb::use_root(root) };
        let me = percpu::cpu_id() as u64;
        if me != 0 {
            let mut v = 0u64;
            while !STOP.load(Ordering::Relaxed) {
                let forked = FORKED.load(Ordering::SeqCst);
                v += 1;
                // SAFETY: this CPU's own page of the VMA.
                unsafe { user_ptr(me).write_volatile(v) };
                // A write after the fork returned (its copy-on-write break
                // is done): tell CPU 0, which waits for every writer's.
                if forked && WROTE_AFTER_FORK.fetch_or(1 << me, Ordering::SeqCst) & (1 << me) == 0 {
                    smp::wake(0);
                }
            }
            return v;
        }
        // Let the writers run a little, fork, read the child twice with
        // the writers still writing in between.
        for _ in 0..20 {
            crate::hypercall::now_ns();
        }
        let child = mm::with(|m| {
            m.ctx(|cx, _, user| {
                let a = user.as_mut()?;
                match a.fork(cx) {
                    Ok((child, flush)) => {
                        flush.flush(cx.mmu);
                        Some(child)
                    }
                    Err(e) => {
                        e.flush.flush(cx.mmu);
                        None
                    }
                }
            })
        })
        .flatten();
        FORKED.store(true, Ordering::SeqCst);
        let Some(child) = child else { return u64::MAX };
        let n = smp::online_count() as u64;
        let read_child = |page: u64| -> u64 {
            mm::with(|m| {
                let mem = *m.buddy.mem();
                child.page_table().translate(&mem, Gva(user_ptr(page) as u64)).map(|gpa| {
                    // SAFETY: a frame the child maps, in the direct map.
                    unsafe { ((DIRECT_MAP_BASE + gpa.addr.0) as *const u64).read_volatile() }
                })
            })
            .flatten()
            .unwrap_or(u64::MAX)
        };
        let first: [u64; 64] = core::array::from_fn(|p| if (p as u64) < n { read_child(p as u64) } else { 0 });
        for _ in 0..40 {
            crate::hypercall::now_ns();
        }
        let mut changed = 0;
        for p in 1..n {
            changed += u64::from(read_child(p) != first[p as usize]);
        }
        // Every writer wrote after the fork (so broke copy-on-write once)
        // before they stop: under load a writer may not have run yet.
        let writers = smp::online_mask() & !1;
        arch::wait_until(|| WROTE_AFTER_FORK.load(Ordering::SeqCst) & writers == writers);
        STOP.store(true, Ordering::Relaxed);
        mm::with(|m| m.ctx(|cx, _, _| crate::mm::destroy(cx, child)));
        changed
    }
    let n = smp::online_count() as u64;
    let before = frames_in_use();
    enter_user(n.max(2))?;
    // Fault every page in first, so the fork shares them all.
    for p in 0..n.max(2) {
        // SAFETY: inside the VMA.
        unsafe { user_ptr(p).write_volatile(0) };
    }
    STOP.store(false, Ordering::Relaxed);
    FORKED.store(false, Ordering::SeqCst);
    WROTE_AFTER_FORK.store(0, Ordering::SeqCst);
    let c0 = COW.load(Ordering::Relaxed);
    let out = smp::run_on_all(role, user_root()?);
    let cows = COW.load(Ordering::Relaxed) - c0;
    leave_user()?;
    check(out[0] != u64::MAX, "the fork failed")?;
    check(out[0] == 0, "the child's copy changed after the fork returned")?;
    for cpu in smp::online_cpus().skip(1) {
        check(out[cpu as usize] > 0, "a writer never wrote")?;
    }
    check(cows == n - 1, "not exactly one copy-on-write break per writer")?;
    check(frames_in_use() == before, "fork/destroy with writers leaked frames")
}

/// The reference records of [`access_matrix_on_every_cpu`] (the boot
/// CPU's), compared by each AP in turn.
static REFERENCE: crate::sync::IrqSpinLock<alloc::vec::Vec<u16>> =
    crate::sync::IrqSpinLock::new(alloc::vec::Vec::new());

/// The access matrix (`ktest::matrix`, its first block: 4 KiB and 2 MiB
/// leaves with NXE = 1 and WP = 1) on the boot CPU, then on each AP in
/// turn: every CPU's MMU gives the same verdict, error code and A/D bits
/// for every case. (Also checks the per-CPU area's fixed offsets the
/// assembly relies on.)
pub fn access_matrix_on_every_cpu() -> TestResult {
    fn on_ap(_: u64) -> u64 {
        let Ok(mine) = super::matrix::collect(false) else { return u64::MAX };
        let reference = REFERENCE.lock();
        if mine.len() != reference.len() {
            return u64::MAX;
        }
        mine.iter().zip(reference.iter()).filter(|(a, b)| a != b).count() as u64
    }
    let a = percpu::area(0);
    let base = a as *const percpu::PerCpu as u64;
    check(&a.entry_cr3 as *const _ as u64 - base == 16, "entry_cr3 is not at gs:[16]")?;
    check(&a.probe_rsp as *const _ as u64 - base == 24, "probe_rsp is not at gs:[24]")?;
    if smp::online_count() == 1 {
        // Nothing to compare: the full matrix has its own runs (`matrix`).
        return Ok(());
    }
    let records = super::matrix::collect(false)?;
    check(records.len() == super::matrix::BLOCK, "the matrix did not run every case of its first block")?;
    *REFERENCE.lock() = records;
    let mut result = Ok(());
    for cpu in smp::online_cpus().skip(1) {
        match smp::run_on(cpu, on_ap, 0) {
            Some(0) => {}
            Some(u64::MAX) | None => result = Err("an AP could not run the access matrix"),
            Some(_) => result = Err("an AP's MMU disagrees with the boot CPU's on some access-matrix cases"),
        }
    }
    *REFERENCE.lock() = alloc::vec::Vec::new();
    result
}

/// CPU 0 moves to the kernel's root, then write-protects the pages the
/// others keep writing: the shootdown must reach them although CPU 0 no
/// longer runs their address space. While CPU 0 still holds the memory
/// manager after the shootdown, no page may change (a write through a
/// stale entry would change it); then every writer faults exactly once
/// (the fault makes its page writable again). On a host where guest
/// ring 0 runs natively under EPT/NPT this catches a missing shootdown.
/// Measured: it does not on the development host (ring 0 is emulated,
/// with no TLB to go stale) nor on the nested TCG hosts (a vCPU thread is
/// preempted, and its TLB flushed, far more often than this window), so a
/// flush bug there shows only in the frame checks (poison, leaks).
pub fn write_protect_from_another_root() -> TestResult {
    fn role(root: u64) -> u64 {
        // SAFETY: the test's user address space, which maps the kernel.
        unsafe { tlb::use_root(root) };
        let me = percpu::cpu_id() as u64;
        if me != 0 {
            let mut v = 0u64;
            while !STOP.load(Ordering::Relaxed) {
                let forked = FORKED.load(Ordering::SeqCst);
                v += 1;
                // SAFETY: this CPU's own page of the VMA.
                unsafe { user_ptr(me).write_volatile(v) };
                // A write after the fork returned (its copy-on-write break
                // is done): tell CPU 0, which waits for every writer's.
                if forked && WROTE_AFTER_FORK.fetch_or(1 << me, Ordering::SeqCst) & (1 << me) == 0 {
                    smp::wake(0);
                }
            }
            return v;
        }
        let n = smp::online_count() as u64;
        mm::with(|m| m.ctx(|cx, kpt, _| cx.mmu.load_cr3(kpt.root())));
        for _ in 0..20 {
            crate::hypercall::now_ns();
        }
        let c0 = COW.load(Ordering::Relaxed);
        let mut moved = 0u64;
        let protected = mm::with(|m| {
            m.ctx(|cx, _, user| {
                let Some(a) = user.as_mut() else { return false };
                let mut frames = [0u64; 64];
                let done = (1..n).all(|p| {
                    let va = Gva(user_ptr(p) as u64);
                    frames[p as usize] = a.page_table().translate(cx.mem, va).map_or(0, |t| t.addr.0);
                    match a.page_table_mut().update_leaf(cx.mem, va, |f| f.difference(PteFlags::WRITABLE)) {
                        Ok((_, flush)) => {
                            flush.flush(cx.mmu);
                            true
                        }
                        Err(_) => false,
                    }
                });
                // The shootdown has returned and we still hold the memory
                // manager, so a writer's next write faults and waits for
                // it: no page may change now. (One written through a
                // stale writable TLB entry would.)
                // SAFETY: frames the writers' pages map, in the direct map.
                let read = |p: usize| unsafe { ((DIRECT_MAP_BASE + frames[p]) as *const u64).read_volatile() };
                let first: [u64; 64] = core::array::from_fn(|p| if p >= 1 && (p as u64) < n { read(p) } else { 0 });
                for _ in 0..50 {
                    crate::hypercall::now_ns();
                }
                moved = (1..n as usize).filter(|&p| read(p) != first[p]).count() as u64;
                done
            })
        });
        // Every writer must fault once now (bounded wait: 200 ms).
        let t0 = crate::hypercall::now_ns();
        while COW.load(Ordering::Relaxed) - c0 < n - 1 && crate::hypercall::now_ns() - t0 < 200_000_000 {}
        for _ in 0..20 {
            crate::hypercall::now_ns();
        }
        STOP.store(true, Ordering::Relaxed);
        if protected != Some(true) {
            return u64::MAX;
        }
        if moved != 0 {
            return u64::MAX - 1;
        }
        COW.load(Ordering::Relaxed) - c0
    }
    let n = smp::online_count() as u64;
    let before = frames_in_use();
    enter_user(n.max(2))?;
    for p in 0..n.max(2) {
        // SAFETY: inside the VMA.
        unsafe { user_ptr(p).write_volatile(0) };
    }
    STOP.store(false, Ordering::Relaxed);
    let out = smp::run_on_all(role, user_root()?);
    leave_user()?;
    check(out[0] != u64::MAX, "the pages could not be write-protected")?;
    check(out[0] != u64::MAX - 1, "a writer wrote through a stale TLB entry after the shootdown returned")?;
    check(out[0] == n - 1, "not exactly one write fault per writer after the write protection")?;
    check(frames_in_use() == before, "leaked frames")
}

/// Gathered invalidations: adjacent pages merge into one range; more than
/// `FLUSH_CEILING` (33) pages, or more ranges than a request carries,
/// become one full flush.
pub fn flush_batches_merge_and_cap() -> TestResult {
    let mut f = tlb::Flush::new();
    check(f.is_empty(), "a new batch is not empty")?;
    for p in [0x1000, 0x2000, 0x3000, 0x9000, 0x9fff] {
        f.add_page(USER_PAGE + p);
    }
    let expected: &[(u64, u64)] = &[(USER_PAGE + 0x1000, 3), (USER_PAGE + 0x9000, 1), (USER_PAGE + 0x9000, 1)];
    check(f.ranges() == Some(expected), "adjacent pages did not merge into ranges")?;
    let mut f = tlb::Flush::new();
    for p in 0..tlb::FLUSH_CEILING {
        f.add_page(USER_PAGE + p * 4096);
    }
    check(f.ranges().map(|r| r.len()) == Some(1), "33 adjacent pages are not one range")?;
    f.add_page(USER_PAGE + tlb::FLUSH_CEILING * 4096);
    check(f.ranges().is_none(), "the 34th page did not make it a full flush")?;
    let mut f = tlb::Flush::new();
    for p in 0..tlb::MAX_RANGES as u64 + 1 {
        f.add_page(USER_PAGE + p * 2 * 4096);
    }
    check(f.ranges().is_none(), "more ranges than a request carries did not make it a full flush")
}

const USER_PAGE: u64 = super::vm_suites::USER_BASE;

/// Lazy TLB: an AP that finished its work keeps the user root loaded; an
/// unmap skips it (no IPI, marked stale) and it flushes when it runs in
/// that address space again. Destroying the address space moves it to the
/// kernel's root.
pub fn lazy_cpus_are_skipped_then_flush() -> TestResult {
    fn touch(root: u64) -> u64 {
        // SAFETY: the test's user address space, which maps the kernel.
        unsafe { tlb::use_root(root) };
        // SAFETY: inside the VMA.
        unsafe { user_ptr(1).read_volatile() }
    }
    fn come_back(root: u64) -> u64 {
        let a = percpu::this();
        let (stale, before) = (a.stale.load(Ordering::SeqCst), a.full_flushes.load(Ordering::SeqCst));
        // SAFETY: as above.
        unsafe { tlb::use_root(root) };
        let flushed = a.full_flushes.load(Ordering::SeqCst) - before;
        u64::from(stale) << 32 | flushed
    }
    if smp::online_count() < 2 {
        return Ok(());
    }
    let before = frames_in_use();
    enter_user(2)?;
    // SAFETY: inside the VMA.
    unsafe {
        user_ptr(0).write_volatile(1);
        user_ptr(1).write_volatile(2);
    }
    let root = user_root()?;
    check(smp::run_on(1, touch, root) == Some(2), "CPU 1 did not read the page")?;
    check(percpu::area(1).lazy.load(Ordering::SeqCst), "CPU 1 is not lazy after its work")?;
    check(tlb::cpumask(root) & 0b10 != 0, "a lazy CPU left the address space's mask")?;
    let (skips, ipis) = (tlb::LAZY_SKIPS.load(Ordering::Relaxed), tlb::IPIS.load(Ordering::Relaxed));
    let unmapped = mm::with(|m| {
        m.ctx(|cx, _, user| -> Result<(), &'static str> {
            let a = user.as_mut().ok_or("no user space")?;
            let start = Gva(user_ptr(0) as u64);
            a.unmap_range(cx, start, Gva(start.0 + 4096)).map_err(|e| e.as_str())?.flush(cx.mmu);
            Ok(())
        })
    });
    check(matches!(unmapped, Some(Ok(()))), "unmapping the page failed")?;
    let ipis_to_lazy = tlb::IPIS.load(Ordering::Relaxed) - ipis;
    let skipped = tlb::LAZY_SKIPS.load(Ordering::Relaxed) - skips;
    let back = smp::run_on(1, come_back, root).unwrap_or(0);
    leave_user()?;
    check(skipped > 0 && ipis_to_lazy == 0, "the unmap sent an IPI to a lazy CPU")?;
    check(back >> 32 == 1, "the skipped lazy CPU was not marked stale")?;
    check(back & 0xffff_ffff == 1, "the stale CPU did not flush when it came back")?;
    check(
        percpu::area(1).loaded_root.load(Ordering::SeqCst) == tlb::kernel_root(),
        "the destroyed space stayed loaded",
    )?;
    check(frames_in_use() == before, "leaked frames")
}
