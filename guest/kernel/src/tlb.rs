//! TLB shootdown: keeping every CPU's TLB in step with page-table changes
//! (Linux's `arch/x86/mm/tlb.c` in small; Intel SDM vol. 3 §4.10.5,
//! "Propagation of Paging-Structure Changes to Multiple Processors").
//!
//! # The protocol
//!
//! - **CPU mask of an address space**: the CPUs whose per-CPU
//!   `loaded_root` names its root ([`cpumask`]). A CPU stores
//!   `loaded_root` (`SeqCst`) before its `mov cr3`; an initiator changes
//!   the entry, then reads the masks (`SeqCst`): a CPU it misses loaded
//!   CR3 after the change and caches nothing stale.
//! - **Initiator**: only the holder of the memory-manager lock changes page
//!   tables, so one shootdown is in flight at a time. It flushes its own
//!   TLB, publishes the request (root, ranges or full, whether page-table
//!   pages were freed), sets `PENDING` to the target mask, sends each
//!   target a `VECTOR_CALL` IPI and waits (`cli; check; sti; hlt`) until
//!   every target cleared its bit. The last target to acknowledge wakes it.
//! - **Target** (interrupt handler, no lock): flushes the ranges (or all)
//!   if the request's root is the one it has loaded, clears its bit.
//! - **Batching**: inside a lazy-MMU bracket (`MmuPlatform::enter_lazy`)
//!   page invalidations are gathered as ranges and sent as one request at
//!   the outermost `leave_lazy`. More than [`FLUSH_CEILING`] pages (Linux's
//!   `tlb_single_page_flush_ceiling`, 33) or more ranges than a request
//!   holds become one full flush.
//! - **Lazy TLB**: a CPU that finishes its work goes back to running only
//!   kernel code without reloading CR3 (`enter_lazy_cpu`): its user root
//!   stays loaded, and shootdowns of that root skip it and set its `stale`
//!   flag instead (re-checked after setting, so a CPU leaving lazy mode at
//!   that moment gets the IPI). A CPU leaving lazy mode flushes if `stale`.
//!   When page-table pages are freed, lazy CPUs are not skipped: they
//!   switch to the kernel root, since a speculative walk could otherwise
//!   cache (or set A/D bits in) a freed table. Before an address space is
//!   torn down (which clears its kernel half), every CPU that has it
//!   loaded lazily moves to the kernel root first ([`evict`], called by
//!   `mm::destroy`), or its next interrupt would find no IDT.
//! - **Freed frames** (`mm::Gather`): frames and table pages unmapped
//!   while other CPUs run are freed only after every CPU that could cache
//!   them has done a full flush since they were unmapped. The one
//!   exception, as in Linux: a lazy CPU is skipped for data frames (it
//!   runs only kernel code, which never touches user addresses, and it
//!   flushes before it uses the root again); for table pages it is not.
//!
//! - **pv mode**: a shootdown is one `PV_FLUSH_REMOTE` hypercall naming
//!   the targets (and the initiator) instead of IPIs: the VMM applies every
//!   CPU's write queue and flushes the targets (stopping those in guest
//!   mode before it answers), as KVM's `KVM_FEATURE_PV_TLB_FLUSH` and
//!   Hyper-V's `HvFlushVirtualAddressList` do. Evicting lazy CPUs from a
//!   root being destroyed still takes IPIs (they must load another CR3).
//!
//! With one CPU online none of this runs: a flush is the local
//! instruction, exactly as before SMP (the exit counts the shadow-mode
//! tests assert are unchanged).

use crate::arch::{self, apic, percpu};
use crate::smp;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// Above this many pages one request becomes a full flush.
pub const FLUSH_CEILING: u64 = 33;
/// Most ranges one request carries.
pub const MAX_RANGES: usize = 8;

/// Invalidations gathered for one request.
#[derive(Clone, Copy)]
pub struct Flush {
    ranges: [(u64, u64); MAX_RANGES],
    n: usize,
    pages: u64,
    full: bool,
}

impl Flush {
    /// Nothing to flush.
    pub const fn new() -> Self {
        Flush { ranges: [(0, 0); MAX_RANGES], n: 0, pages: 0, full: false }
    }
    /// Everything.
    pub const fn all() -> Self {
        Flush { ranges: [(0, 0); MAX_RANGES], n: 0, pages: 0, full: true }
    }
    /// Add the 4 KiB page at `va` (merged with the last range when
    /// adjacent).
    pub fn add_page(&mut self, va: u64) {
        if self.full {
            return;
        }
        let va = va & !0xfff;
        self.pages += 1;
        if self.pages > FLUSH_CEILING {
            self.full = true;
            return;
        }
        if self.n > 0 {
            let (start, pages) = &mut self.ranges[self.n - 1];
            if *start + *pages * 4096 == va {
                *pages += 1;
                return;
            }
        }
        if self.n == MAX_RANGES {
            self.full = true;
            return;
        }
        self.ranges[self.n] = (va, 1);
        self.n += 1;
    }
    /// Make it a full flush.
    pub fn add_all(&mut self) {
        self.full = true;
    }
    /// Whether nothing is to be flushed.
    pub fn is_empty(&self) -> bool {
        !self.full && self.n == 0
    }
    /// The gathered ranges (start, pages), or `None` for a full flush.
    pub fn ranges(&self) -> Option<&[(u64, u64)]> {
        (!self.full).then_some(&self.ranges[..self.n])
    }
    /// Flush on this CPU.
    fn run_local(&self) {
        if self.full {
            arch::mmu::flush_all();
        } else {
            for &(start, pages) in &self.ranges[..self.n] {
                for i in 0..pages {
                    arch::mmu::invlpg(start + i * 4096);
                }
            }
        }
    }
}

impl Default for Flush {
    fn default() -> Self {
        Self::new()
    }
}

/// The request in flight (written by the initiator, which holds the
/// memory-manager lock, before `PENDING` is set; read by targets).
struct Request {
    root: AtomicU64,
    any_root: AtomicBool,
    full: AtomicBool,
    freed_tables: AtomicBool,
    n: AtomicUsize,
    ranges: [(AtomicU64, AtomicU64); MAX_RANGES],
    initiator: AtomicU64,
}

static REQ: Request = Request {
    root: AtomicU64::new(0),
    any_root: AtomicBool::new(false),
    full: AtomicBool::new(false),
    freed_tables: AtomicBool::new(false),
    n: AtomicUsize::new(0),
    ranges: [const { (AtomicU64::new(0), AtomicU64::new(0)) }; MAX_RANGES],
    initiator: AtomicU64::new(0),
};

/// CPUs that have not acknowledged the request in flight.
static PENDING: AtomicU64 = AtomicU64::new(0);
/// The kernel's own root (no user mappings).
static KERNEL_ROOT: AtomicU64 = AtomicU64::new(0);

/// Shootdown statistics (for the SMP suites and reports).
pub static SHOOTDOWNS: AtomicU64 = AtomicU64::new(0);
/// IPIs sent for shootdowns.
pub static IPIS: AtomicU64 = AtomicU64::new(0);
/// `PV_FLUSH_REMOTE` calls made for shootdowns (pv mode: instead of IPIs).
pub static PV_REMOTE_FLUSHES: AtomicU64 = AtomicU64::new(0);
/// Targets skipped because they were lazy.
pub static LAZY_SKIPS: AtomicU64 = AtomicU64::new(0);
/// TSC cycles initiators spent from the first IPI to the last
/// acknowledgement.
pub static WAIT_CYCLES: AtomicU64 = AtomicU64::new(0);

/// Remember the kernel's root (lazy CPUs switch to it when tables go).
pub fn set_kernel_root(root: u64) {
    KERNEL_ROOT.store(root, Ordering::Relaxed);
}

/// The kernel's root.
pub fn kernel_root() -> u64 {
    KERNEL_ROOT.load(Ordering::Relaxed)
}

/// The CPU mask of the address space rooted at `root`: the online CPUs
/// that have it loaded (lazy ones included).
pub fn cpumask(root: u64) -> u64 {
    let mut mask = 0;
    for cpu in smp::online_cpus() {
        if percpu::area(cpu).loaded_root.load(Ordering::SeqCst) == root {
            mask |= 1 << cpu;
        }
    }
    mask
}

/// The address space the memory manager's current operation works on
/// (`mm::MemoryManager::ctx` sets it: the user address space, 0 for
/// none), so that a change made by a CPU running another root still
/// reaches the CPUs that run this one.
static OPERAND_ROOT: AtomicU64 = AtomicU64::new(0);

/// Name the address space page-table operations now work on (0: none).
/// Caller holds the memory-manager lock.
pub fn set_operand_root(root: u64) {
    OPERAND_ROOT.store(root, Ordering::Relaxed);
}

/// Flush `flush` on this CPU and on every other CPU in the mask of the
/// address space this CPU has loaded or of the one being operated on.
/// Caller holds the memory-manager lock.
pub fn flush_current(flush: &Flush) {
    let root = percpu::this().loaded_root.load(Ordering::Relaxed);
    let operand = OPERAND_ROOT.load(Ordering::Relaxed);
    let me = !(1 << percpu::cpu_id());
    if arch::mmu::is_pv() {
        // One exit for the whole shootdown, this CPU's flush included
        // (`pv_shootdown`).
        let targets = if operand == 0 || operand == root { cpumask(root) } else { cpumask(root) | cpumask(operand) };
        pv_shootdown(targets & me, flush, true);
        return;
    }
    flush.run_local();
    if operand == 0 || operand == root {
        shootdown(cpumask(root) & me, Some(root), flush, false);
    } else {
        // Two address spaces: flush on any root (an extra flush for the
        // CPUs on ours, which the change may not concern).
        shootdown((cpumask(root) | cpumask(operand)) & me, None, flush, false);
    }
}

/// Send `flush` to the CPUs in `targets` (not this one) and wait until all
/// of them have done it. `root`: flush only on CPUs that have it loaded
/// (`None`: any root). Lazy targets are skipped (marked stale) unless
/// `freed_tables`, when they move to the kernel root instead. Caller holds
/// the memory-manager lock (one request in flight).
pub fn shootdown(targets: u64, root: Option<u64>, flush: &Flush, freed_tables: bool) {
    let me = percpu::cpu_id();
    let mut targets = targets & !(1 << me);
    if targets == 0 || !apic::is_enabled() {
        return;
    }
    for cpu in smp::cpus_in(targets) {
        let a = percpu::area(cpu);
        if !freed_tables && a.lazy.load(Ordering::SeqCst) {
            a.stale.store(true, Ordering::SeqCst);
            if a.lazy.load(Ordering::SeqCst) {
                targets &= !(1 << cpu);
                LAZY_SKIPS.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    if targets == 0 {
        return;
    }
    if arch::mmu::is_pv() && !freed_tables {
        pv_shootdown(targets, flush, false);
        return;
    }
    REQ.root.store(root.unwrap_or(0), Ordering::Relaxed);
    REQ.any_root.store(root.is_none(), Ordering::Relaxed);
    REQ.full.store(flush.full, Ordering::Relaxed);
    REQ.freed_tables.store(freed_tables, Ordering::Relaxed);
    REQ.n.store(flush.n, Ordering::Relaxed);
    for (slot, &(start, pages)) in REQ.ranges.iter().zip(&flush.ranges[..flush.n]) {
        slot.0.store(start, Ordering::Relaxed);
        slot.1.store(pages, Ordering::Relaxed);
    }
    REQ.initiator.store(me as u64, Ordering::Relaxed);
    PENDING.store(targets, Ordering::SeqCst);
    SHOOTDOWNS.fetch_add(1, Ordering::Relaxed);
    let t0 = arch::rdtsc();
    for cpu in smp::cpus_in(targets) {
        IPIS.fetch_add(1, Ordering::Relaxed);
        apic::send_ipi(cpu, apic::VECTOR_CALL);
    }
    let irq = arch::interrupts_enabled();
    arch::wait_until(|| PENDING.load(Ordering::SeqCst) == 0);
    WAIT_CYCLES.fetch_add(arch::rdtsc().wrapping_sub(t0), Ordering::Relaxed);
    if irq {
        arch::enable_interrupts();
    }
}

/// pv mode: the shootdown as one `PV_FLUSH_REMOTE` instead of IPIs (the
/// VMM applies every CPU's write queue, then stops the targets in guest
/// mode and flushes them, or flushes them at their next entry: issue 18).
/// With `and_me`, this CPU is a target too (its own flush in the same
/// exit). Lazy targets are skipped as for IPIs (they are marked stale);
/// with no target left, this CPU flushes locally. A flush of everything
/// is a superset of any range list, so no ranges are sent.
fn pv_shootdown(targets: u64, flush: &Flush, and_me: bool) {
    let me = percpu::cpu_id();
    let mut targets = targets & !(1 << me);
    for cpu in smp::cpus_in(targets) {
        let a = percpu::area(cpu);
        if a.lazy.load(Ordering::SeqCst) {
            a.stale.store(true, Ordering::SeqCst);
            if a.lazy.load(Ordering::SeqCst) {
                targets &= !(1 << cpu);
                LAZY_SKIPS.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    if targets == 0 {
        if and_me {
            flush.run_local();
        }
        return;
    }
    SHOOTDOWNS.fetch_add(1, Ordering::Relaxed);
    PV_REMOTE_FLUSHES.fetch_add(1, Ordering::Relaxed);
    let t0 = arch::rdtsc();
    let all = targets | if and_me { 1 << me } else { 0 };
    arch::mmu::pv_flush_remote(all);
    WAIT_CYCLES.fetch_add(arch::rdtsc().wrapping_sub(t0), Ordering::Relaxed);
    // Each of them flushed its whole TLB (or will before it runs again):
    // count it as the full flush it is, so the frames gathered before are
    // not flushed for a second time (`mm::Gather`).
    for cpu in smp::cpus_in(all) {
        percpu::area(cpu).full_flushes.fetch_add(1, Ordering::SeqCst);
    }
}

/// Move every other CPU that has `root` loaded (lazily: a CPU running on
/// it while it is destroyed is the caller's bug) to the kernel's root,
/// before `root`'s tables are torn down. Caller holds the memory-manager
/// lock.
pub fn evict(root: u64) {
    let others = cpumask(root) & !(1 << percpu::cpu_id());
    if others != 0 {
        shootdown(others, Some(root), &Flush::all(), true);
    }
}

/// The `VECTOR_CALL` handler's TLB part: do the request in flight if this
/// CPU is a target.
pub fn handle_ipi() {
    let me = percpu::cpu_id();
    let bit = 1u64 << me;
    if PENDING.load(Ordering::SeqCst) & bit == 0 {
        return;
    }
    let a = percpu::this();
    let loaded = a.loaded_root.load(Ordering::Relaxed);
    let mine = REQ.any_root.load(Ordering::Relaxed) || REQ.root.load(Ordering::Relaxed) == loaded;
    if REQ.freed_tables.load(Ordering::Relaxed) && a.lazy.load(Ordering::Relaxed) && loaded != kernel_root() {
        // SAFETY: the kernel's root maps the kernel like every root does,
        // and this CPU runs only kernel code while lazy.
        unsafe { arch::mmu::load_cr3(kernel_root()) };
        a.lazy.store(false, Ordering::SeqCst);
    } else if mine {
        if REQ.full.load(Ordering::Relaxed) {
            arch::mmu::flush_all();
        } else {
            let n = REQ.n.load(Ordering::Relaxed).min(MAX_RANGES);
            for slot in &REQ.ranges[..n] {
                let (start, pages) = (slot.0.load(Ordering::Relaxed), slot.1.load(Ordering::Relaxed));
                for i in 0..pages.min(FLUSH_CEILING) {
                    arch::mmu::invlpg(start + i * 4096);
                }
            }
        }
    }
    if PENDING.fetch_and(!bit, Ordering::SeqCst) == bit {
        apic::send_ipi(REQ.initiator.load(Ordering::Relaxed) as u32, apic::VECTOR_WAKE);
    }
}

/// Run on `root` (a CPU starting work in an address space): leave lazy
/// mode if it is still loaded (flushing if a shootdown skipped us), else
/// load it.
///
/// # Safety
/// As `arch::mmu::load_cr3`: `root` maps the kernel as every root does.
pub unsafe fn use_root(root: u64) {
    let a = percpu::this();
    if a.loaded_root.load(Ordering::Relaxed) == root {
        a.lazy.store(false, Ordering::SeqCst);
        if a.stale.swap(false, Ordering::SeqCst) {
            arch::mmu::flush_all();
        }
    } else {
        a.lazy.store(false, Ordering::SeqCst);
        a.stale.store(false, Ordering::SeqCst);
        // SAFETY: the caller's contract.
        unsafe { arch::mmu::load_cr3(root) };
    }
}

/// This CPU goes back to kernel-only work keeping its root loaded (lazy
/// TLB).
pub fn enter_lazy_cpu() {
    let a = percpu::this();
    if a.loaded_root.load(Ordering::Relaxed) != kernel_root() {
        a.lazy.store(true, Ordering::SeqCst);
    }
}

/// Gathered invalidations of the open lazy-MMU bracket (the memory-manager
/// lock's holder is the only user).
/// A plain spinlock: taken only by the memory-manager lock's holder, for a
/// few instructions, never across a wait point.
static BATCH: crate::sync::SpinLock<Flush> = crate::sync::SpinLock::new(Flush::new());
static DEPTH: AtomicUsize = AtomicUsize::new(0);

/// `MmuPlatform::invlpg` with other CPUs online.
pub fn invlpg(va: u64) {
    if DEPTH.load(Ordering::Relaxed) > 0 {
        BATCH.lock().add_page(va);
        return;
    }
    let mut f = Flush::new();
    f.add_page(va);
    flush_current(&f);
}

/// `MmuPlatform::flush_all` with other CPUs online.
pub fn flush_all() {
    if DEPTH.load(Ordering::Relaxed) > 0 {
        BATCH.lock().add_all();
        return;
    }
    flush_current(&Flush::all());
}

/// Open a batch.
pub fn enter_batch() {
    DEPTH.fetch_add(1, Ordering::Relaxed);
}

/// Close a batch: the outermost sends what was gathered.
pub fn leave_batch() {
    if DEPTH.fetch_sub(1, Ordering::Relaxed) == 1 {
        let f = core::mem::take(&mut *BATCH.lock());
        if !f.is_empty() {
            flush_current(&f);
        }
    }
}
