//! Application processors: bring-up through the VMM's `CPU_ON` hypercall,
//! the interrupt path of the IPI vectors, and running work on every CPU.
//!
//! Bring-up (`docs/architecture.md`, "SMP"): the boot CPU enables its
//! x2APIC, then for each CPU `1..cpus` allocates a stack block (IST stacks,
//! ring-0 stack, kernel stack) from the page allocator, names the CPU's
//! per-CPU area and asks the VMM to start it (`CPU_ON(cpu, ap_entry,
//! stack, area)`). The AP starts in long mode on the VMM's boot tables,
//! loads the kernel's root first (the stack block may lie above what the
//! boot tables map), then its GS base, GDT/TSS, the shared IDT and its
//! x2APIC, marks itself online and wakes the boot CPU, which starts the
//! next. An AP then waits for work, halted.
//!
//! Invariants:
//! - Only the boot CPU posts work ([`run_on_all`]); a CPU runs one work
//!   item at a time, with interrupts enabled (so it serves shootdowns at
//!   once), and goes lazy (`tlb::enter_lazy_cpu`) when it is done.
//! - `ONLINE` has bit `i` set once CPU `i` can take IPIs; nothing sends an
//!   IPI to a CPU outside it.
//! - SMP runs in ept mode only: shadow and pv keep one vCPU (the VMM
//!   refuses `--vcpus` > 1 there; a record saying otherwise is ignored
//!   with a message).

use crate::arch::{self, apic, percpu};
use crate::{hypercall, kprintln, mm, tlb};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use guest_abi::hypercall as hc;

/// Bit `i`: CPU `i` is online.
static ONLINE: AtomicU64 = AtomicU64::new(1);

/// Order of the stack block an AP gets: 128 KiB = 5 IST stacks (80 KiB),
/// the ring-0 stack (16 KiB) and a 32 KiB kernel stack.
const STACK_ORDER: u8 = 5;
const STACK_BLOCK: u64 = 4096 << STACK_ORDER;

/// The online CPUs' mask.
pub fn online_mask() -> u64 {
    ONLINE.load(Ordering::Acquire)
}

/// How many CPUs are online.
pub fn online_count() -> u32 {
    online_mask().count_ones()
}

/// The CPU ids in `mask`, lowest first.
pub fn cpus_in(mask: u64) -> impl Iterator<Item = u32> {
    (0..64u32).filter(move |c| mask & (1 << c) != 0)
}

/// The online CPU ids.
pub fn online_cpus() -> impl Iterator<Item = u32> {
    cpus_in(online_mask())
}

/// Interrupt `cpu` so that a wait point there re-checks its condition.
pub fn wake(cpu: u32) {
    if apic::is_enabled() && online_mask() & (1 << cpu) != 0 {
        apic::send_ipi(cpu, apic::VECTOR_WAKE);
    }
}

/// [`wake`] every CPU in `mask` but this one.
pub fn wake_mask(mask: u64) {
    let me = percpu::cpu_id();
    for cpu in cpus_in(mask & !(1 << me)) {
        wake(cpu);
    }
}

/// An interrupt arrived (`idt.rs`, vectors 32 and up, not spurious).
pub fn interrupt(vector: u8) {
    if vector == apic::VECTOR_CALL {
        tlb::handle_ipi();
    }
    // VECTOR_WAKE: the interrupt itself ended the `hlt`.
}

/// Start every CPU the VMM created (`BootInfo::cpus`). Needs the memory
/// manager (stack blocks, the kernel root). Returns how many are online.
pub fn start_aps(cpus: u32, ept: bool) -> u32 {
    if cpus <= 1 {
        return 1;
    }
    if !ept && !arch::mmu::is_shadow() {
        kprintln!("smp: {} vCPUs offered, but shadowing has not started: using one", cpus);
        return 1;
    }
    // Shadow and pv mode: an AP's first root goes through LOAD_CR3 (the
    // entry code below), which points its CR3 at the VMM's shadow.
    AP_LOAD_CR3_BY_VMM.store(!ept, Ordering::Relaxed);
    let kernel_root = tlb::kernel_root();
    apic::enable();
    for cpu in 1..cpus.min(percpu::MAX_CPUS as u32) {
        let Some(block) = mm::with(|m| m.buddy.alloc(STACK_ORDER, guest_mm::buddy::ZonePref::Normal)).flatten() else {
            crate::panic::fatal("smp: no memory for an AP's stacks");
        };
        let base = guest_abi::DIRECT_MAP_BASE + block.addr().0;
        let a = percpu::prepare(cpu);
        a.stack_base.store(base, Ordering::Relaxed);
        a.entry_cr3.store(kernel_root, Ordering::Relaxed);
        let area = a as *const percpu::PerCpu as u64;
        let r = hypercall::call(hc::CPU_ON, cpu as u64, ap_entry as *const () as u64, base + STACK_BLOCK, area);
        if r != hc::OK {
            kprintln!("smp: CPU_ON({}) refused: {:#x}", cpu, r);
            crate::panic::fatal("smp: the VMM refused CPU_ON");
        }
        arch::wait_until(|| a.online.load(Ordering::Acquire));
    }
    online_count()
}

/// Shadow mode: an AP loads its first root through the VMM's `LOAD_CR3`
/// instead of `mov cr3` (read by the entry code).
static AP_LOAD_CR3_BY_VMM: AtomicBool = AtomicBool::new(false);

// AP entry (CPU_ON): long mode on the VMM's boot tables, IF = 0,
// rdi = the per-CPU area, rsi = the CPU id, rsp = top of the stack block.
// Load the kernel's root (offset 16 of the area) before touching the
// stack, which may lie above what the boot tables map: `mov cr3`, or in
// shadow mode the `LOAD_CR3` hypercall (rax = number, rdi = root; the
// port write changes only rax: `crate::hypercall`).
core::arch::global_asm!(
    ".section .text",
    ".global ap_entry",
    "ap_entry:",
    "    cli",
    "    cld",
    "    mov rax, [rdi + 16]",
    "    cmp byte ptr [rip + {by_vmm}], 0",
    "    jne 3f",
    "    mov cr3, rax",
    "    jmp 4f",
    "3:  mov r12, rdi",
    "    mov rdi, rax",
    "    mov eax, {load_cr3}",
    "    mov dx, {port}",
    "    out dx, eax",
    "    mov rdi, r12",
    "4:  xor ebp, ebp",
    "    call {main}",
    "2:  cli",
    "    hlt",
    "    jmp 2b",
    main = sym ap_main,
    by_vmm = sym AP_LOAD_CR3_BY_VMM,
    load_cr3 = const guest_abi::hypercall::LOAD_CR3,
    port = const guest_abi::ports::HYPERCALL,
);

unsafe extern "C" {
    fn ap_entry();
}

/// An AP's first Rust code; never returns.
extern "C" fn ap_main(area: u64, cpu: u64) -> ! {
    let a = percpu::area(cpu as u32);
    if a as *const percpu::PerCpu as u64 != area {
        arch::exit(guest_abi::ports::EXIT_FAILURE);
    }
    // SAFETY: `a` is this CPU's area, prepared by the boot CPU.
    unsafe { percpu::set_gs_base(a) };
    let base = a.stack_base.load(Ordering::Relaxed);
    let ist = base;
    let rsp0 = base + (arch::gdt::IST_COUNT * arch::gdt::IST_STACK_SIZE + arch::gdt::IST_STACK_SIZE) as u64;
    // SAFETY: once, by this CPU, on the stack block the boot CPU gave it
    // alone: IST stacks first, then the ring-0 stack, then this kernel
    // stack (at the top, below `base + STACK_BLOCK`).
    unsafe { arch::gdt::load(a, ist, rsp0) };
    // `gdt::load` zeroed GS; point it back at the area.
    // SAFETY: as above.
    unsafe { percpu::set_gs_base(a) };
    arch::idt::load();
    a.loaded_root.store(a.entry_cr3.load(Ordering::Relaxed), Ordering::SeqCst);
    a.guest_cr3.store(a.entry_cr3.load(Ordering::Relaxed), Ordering::Relaxed);
    apic::enable();
    a.online.store(true, Ordering::Release);
    ONLINE.fetch_or(1 << cpu, Ordering::AcqRel);
    wake(0);
    loop {
        arch::wait_until(|| a.work.load(Ordering::Acquire) != 0);
        let f = a.work.load(Ordering::Acquire);
        let arg = a.work_arg.load(Ordering::Relaxed);
        // SAFETY: only `run_on_all` posts work, and it stores a valid
        // `fn(u64) -> u64`.
        let f = unsafe { core::mem::transmute::<usize, fn(u64) -> u64>(f as usize) };
        arch::enable_interrupts();
        let r = f(arg);
        arch::disable_interrupts();
        tlb::enter_lazy_cpu();
        a.work_result.store(r, Ordering::Relaxed);
        a.work.store(0, Ordering::Release);
        wake(0);
    }
}

/// Run `f(arg)` on application processor `cpu` alone (interrupts
/// enabled there) and return its result once done; `None` if `cpu` is
/// not an online AP. Called by the boot CPU.
pub fn run_on(cpu: u32, f: fn(u64) -> u64, arg: u64) -> Option<u64> {
    if cpu == 0 || online_mask() & (1u64 << (cpu % 64)) == 0 {
        return None;
    }
    let a = percpu::area(cpu);
    a.work_arg.store(arg, Ordering::Relaxed);
    a.work.store(f as usize as u64, Ordering::Release);
    wake(cpu);
    let irq = arch::interrupts_enabled();
    arch::wait_until(|| a.work.load(Ordering::Acquire) == 0);
    if irq {
        arch::enable_interrupts();
    }
    Some(a.work_result.load(Ordering::Relaxed))
}

/// Run `f(arg)` on every online CPU at once (this one included, which
/// must be the boot CPU), interrupts enabled; returns each CPU's result
/// (index = CPU id) once all are done.
pub fn run_on_all(f: fn(u64) -> u64, arg: u64) -> [u64; percpu::MAX_CPUS] {
    let mut out = [0u64; percpu::MAX_CPUS];
    let others = online_mask() & !1;
    for cpu in cpus_in(others) {
        let a = percpu::area(cpu);
        a.work_arg.store(arg, Ordering::Relaxed);
        a.work.store(f as usize as u64, Ordering::Release);
        wake(cpu);
    }
    let irq = arch::interrupts_enabled();
    arch::enable_interrupts();
    out[0] = f(arg);
    arch::wait_until(|| cpus_in(others).all(|c| percpu::area(c).work.load(Ordering::Acquire) == 0));
    if irq {
        arch::enable_interrupts();
    }
    for cpu in cpus_in(others) {
        out[cpu as usize] = percpu::area(cpu).work_result.load(Ordering::Relaxed);
    }
    out
}
