//! Per-CPU areas, reached through the GS base (`IA32_GS_BASE`, MSR
//! 0xc000_0101; Intel SDM vol. 3 §3.4.4.1, as Linux's `%gs`-relative
//! per-CPU variables).
//!
//! Invariants:
//! - CPU `i` (APIC id `i`, `BootInfo::cpus` of them) owns `AREAS[i]`; its
//!   GS base points at that area from its first instructions on (the boot
//!   CPU in [`init_bsp`], an application processor in `smp::ap_main`), so
//!   [`cpu_id`] is one `gs`-relative load. `gs:[0]` holds the area's own
//!   address, `gs:[8]` the CPU id, `gs:[16]` the kernel root an AP loads
//!   on entry (read by the entry code in `smp.rs`), `gs:[24]` the matrix
//!   probe's saved stack pointer (`ktest::matrix`); keep the offsets
//!   (a test in `ktest::smp_suites` checks them).
//! - The GDT and TSS in an area ([`UnsafeCell`]s) are written only by the
//!   CPU that owns it, once, before it is online. Every other field is an
//!   atomic that other CPUs may read (the CPU mask of an address space is
//!   built from `loaded_root`) or write (work posted by `smp`, `stale`).
//! - Ring 3 code never changes GS (our user code is the kernel's own test
//!   probes), so no `swapgs` is needed on entry from ring 3.

use super::gdt::Tss;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Most CPUs (`guest_abi::MAX_CPUS`): a CPU mask is one `u64`.
pub const MAX_CPUS: usize = guest_abi::MAX_CPUS as usize;

const IA32_GS_BASE: u32 = 0xc000_0101;

/// One CPU's area.
#[repr(C, align(64))]
pub struct PerCpu {
    /// `gs:[0]`: the area's own address.
    self_addr: AtomicU64,
    /// `gs:[8]`: the CPU id (= APIC id).
    id: AtomicU64,
    /// `gs:[16]`: the root an application processor loads first.
    pub entry_cr3: AtomicU64,
    /// `gs:[24]`: the kernel stack pointer an access-matrix probe returns
    /// to (`ktest::matrix`'s assembly).
    pub probe_rsp: AtomicU64,
    /// This CPU's GDT (written by this CPU only, `gdt::load`).
    pub gdt: UnsafeCell<[u64; 7]>,
    /// This CPU's TSS (written by this CPU only, `gdt::load`).
    pub tss: UnsafeCell<Tss>,
    /// Base of the stack block an application processor runs on (0 for
    /// the boot CPU, whose stacks are static).
    pub stack_base: AtomicU64,
    /// Set once the CPU runs on its own GDT, IDT and APIC.
    pub online: AtomicBool,
    /// The page-table root loaded in CR3 (guest-physical): the CPU is in
    /// the CPU mask of that address space.
    pub loaded_root: AtomicU64,
    /// Lazy TLB: the CPU runs only kernel code but kept a user root
    /// loaded; shootdowns of that root skip it and set `stale` instead.
    pub lazy: AtomicBool,
    /// A shootdown skipped this lazy CPU: flush before using the root.
    pub stale: AtomicBool,
    /// Full TLB flushes (CR3 loads) this CPU has done: a frame unmapped
    /// before a CPU's count moved on is not in that CPU's TLB.
    pub full_flushes: AtomicU64,
    /// Work posted to this CPU (`smp::run_on`): a `fn(u64) -> u64` as an
    /// address, 0 when none.
    pub work: AtomicU64,
    /// The argument of the posted work.
    pub work_arg: AtomicU64,
    /// The result of the last work.
    pub work_result: AtomicU64,
    /// Shadow and pv mode: the guest's own root (the hardware CR3 holds
    /// the VMM's shadow of it; `arch::mmu::read_cr3`).
    pub guest_cr3: AtomicU64,
    /// pv mode: the depth of this CPU's lazy-MMU brackets
    /// (`arch::mmu::enter_lazy`).
    pub pv_lazy_depth: AtomicU64,
    /// pv mode: an invalidation waits for the outermost bracket's end.
    pub pv_lazy_pending: AtomicBool,
}

// SAFETY: the `UnsafeCell` fields are written only by the owning CPU
// before the area is shared (module invariants); everything else is
// atomic.
unsafe impl Sync for PerCpu {}

impl PerCpu {
    const fn new() -> Self {
        PerCpu {
            self_addr: AtomicU64::new(0),
            id: AtomicU64::new(0),
            entry_cr3: AtomicU64::new(0),
            probe_rsp: AtomicU64::new(0),
            gdt: UnsafeCell::new(super::gdt::GDT_TEMPLATE),
            tss: UnsafeCell::new(Tss::new()),
            stack_base: AtomicU64::new(0),
            online: AtomicBool::new(false),
            loaded_root: AtomicU64::new(0),
            lazy: AtomicBool::new(false),
            stale: AtomicBool::new(false),
            full_flushes: AtomicU64::new(0),
            work: AtomicU64::new(0),
            work_arg: AtomicU64::new(0),
            work_result: AtomicU64::new(0),
            guest_cr3: AtomicU64::new(0),
            pv_lazy_depth: AtomicU64::new(0),
            pv_lazy_pending: AtomicBool::new(false),
        }
    }

    /// The CPU id.
    pub fn id(&self) -> u32 {
        self.id.load(Ordering::Relaxed) as u32
    }
}

static AREAS: [PerCpu; MAX_CPUS] = [const { PerCpu::new() }; MAX_CPUS];

/// CPU `i`'s area (`i` < [`MAX_CPUS`], else CPU 0's: callers pass ids
/// below `BootInfo::cpu_count()`).
pub fn area(i: u32) -> &'static PerCpu {
    AREAS.get(i as usize).unwrap_or(&AREAS[0])
}

/// Name the area of CPU `i` (its id and own address) before it is used.
pub fn prepare(i: u32) -> &'static PerCpu {
    let a = area(i);
    a.id.store(i as u64, Ordering::Relaxed);
    a.self_addr.store(a as *const PerCpu as u64, Ordering::Relaxed);
    a
}

/// Point this CPU's GS base at `a`.
///
/// # Safety
/// `a` is this CPU's area (prepared by [`prepare`]).
pub unsafe fn set_gs_base(a: &'static PerCpu) {
    // SAFETY: IA32_GS_BASE exists on every x86-64 CPU; the value is the
    // address of a static area (the caller's contract says it is ours).
    unsafe { super::wrmsr(IA32_GS_BASE, a as *const PerCpu as u64) };
}

/// Make CPU 0's area the boot CPU's.
pub fn init_bsp() {
    let a = prepare(0);
    // SAFETY: the boot CPU, before any other CPU exists.
    unsafe { set_gs_base(a) };
    a.loaded_root.store(super::mmu::read_cr3() & !0xfff, Ordering::Relaxed);
    a.online.store(true, Ordering::Release);
}

/// This CPU's id (`gs:[8]`).
#[inline]
pub fn cpu_id() -> u32 {
    let id: u64;
    // SAFETY: the GS base points at this CPU's area from its first
    // instructions on (module invariants); the load has no side effect.
    unsafe { core::arch::asm!("mov {}, gs:[8]", out(reg) id, options(nostack, preserves_flags, readonly)) };
    id as u32
}

/// This CPU's area.
#[inline]
pub fn this() -> &'static PerCpu {
    area(cpu_id())
}
