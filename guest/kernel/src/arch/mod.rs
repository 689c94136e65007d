//! x86-64 specifics: descriptor tables, exceptions, control registers,
//! MSRs, the local x2APIC, per-CPU areas, the exit device.
//!
//! Interrupts: every CPU runs with `IF = 0` except in SMP work that other
//! CPUs may need to interrupt ([`crate::smp`]) and at wait points
//! ([`wait_until`]), which wait with `cli; check; sti; hlt` and never spin
//! (an interrupt to a vCPU spinning in ring 0 takes ~0.7 ms here,
//! docs/host.md). Handlers run with `IF = 0` (interrupt gates) and take no
//! lock.

pub mod apic;
pub mod gdt;
pub mod idt;
pub mod mmu;
pub mod percpu;

use guest_abi::ports::EXIT_DEVICE;

/// Load the boot CPU's own GDT, TSS and per-CPU area, and the IDT.
pub fn init() {
    gdt::init_bsp();
    percpu::init_bsp();
    idt::init();
}

/// Read model-specific register `msr`.
///
/// # Safety
/// `msr` must exist on this CPU (else `#GP`) and reading it must have no
/// side effect the caller does not expect.
#[inline]
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller's contract; `rdmsr` writes only edx:eax.
    unsafe {
        core::arch::asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    ((hi as u64) << 32) | lo as u64
}

/// Write model-specific register `msr`.
///
/// # Safety
/// `msr` must exist on this CPU and `value` must be one the kernel means
/// to set (MSRs change CPU behaviour).
#[inline]
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller's contract.
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack, preserves_flags))
    };
}

/// Whether maskable interrupts are enabled (RFLAGS.IF).
#[inline]
pub fn interrupts_enabled() -> bool {
    let flags: u64;
    // SAFETY: reads RFLAGS through the stack; no other effect.
    unsafe { core::arch::asm!("pushfq", "pop {}", out(reg) flags, options(nomem, preserves_flags)) };
    flags & (1 << 9) != 0
}

/// Enable maskable interrupts.
#[inline]
pub fn enable_interrupts() {
    // SAFETY: `sti` only sets IF; every vector the APIC can deliver has a
    // gate (idt.rs).
    unsafe { core::arch::asm!("sti", options(nomem, nostack)) }
}

/// Wait until `cond` holds: `cli; check; sti; hlt` (the `sti` shadow makes
/// `sti; hlt` atomic, so a wake-up interrupt sent after the check ends the
/// `hlt`). Returns with interrupts disabled; whoever makes `cond` true must
/// send this CPU an interrupt ([`crate::smp::wake`]). Only called with
/// another CPU online (the local APIC enabled): with one CPU no one could
/// make `cond` true.
pub fn wait_until(mut cond: impl FnMut() -> bool) {
    loop {
        disable_interrupts();
        if cond() {
            return;
        }
        // SAFETY: halts until the next interrupt, whose handler (idt.rs)
        // returns here; IF is cleared again at once.
        unsafe { core::arch::asm!("sti", "hlt", "cli", options(nomem, nostack)) }
    }
}

/// Whether the CPU maps 1 GiB pages (CPUID.80000001H:EDX.Page1GB[bit 26],
/// Intel SDM Vol. 3A §4.1.4).
pub fn has_1g_pages() -> bool {
    // `cpuid` exists on every x86-64 CPU; leaf 0x8000_0000 gives the
    // highest extended leaf, checked before 0x8000_0001 is trusted.
    let max = core::arch::x86_64::__cpuid(0x8000_0000).eax;
    max >= 0x8000_0001 && core::arch::x86_64::__cpuid(0x8000_0001).edx & (1 << 26) != 0
}

/// Read the time-stamp counter.
#[inline]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: `rdtsc` only reads the TSC into edx:eax.
    unsafe {
        core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags));
    }
    ((hi as u64) << 32) | lo as u64
}

/// Read CR2 (the faulting address of the last `#PF`).
#[inline]
pub fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effects; we run in ring 0.
    unsafe {
        core::arch::asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags));
    }
    v
}

/// Disable maskable interrupts.
#[inline]
pub fn disable_interrupts() {
    // SAFETY: `cli` only clears IF; we run in ring 0.
    unsafe { core::arch::asm!("cli", options(nomem, nostack)) }
}

/// End the VM through the exit device with `value` (`EXIT_SUCCESS` or
/// `EXIT_FAILURE`). Never returns: if the VMM ignored the write, halt.
pub fn exit(value: u8) -> ! {
    // SAFETY: a port write to the exit device; the VMM ends the VM.
    unsafe {
        core::arch::asm!("out {port}, al", port = const EXIT_DEVICE, in("al") value, options(nomem, nostack, preserves_flags));
    }
    loop {
        // SAFETY: halting with interrupts off parks the vCPU for good.
        unsafe { core::arch::asm!("cli; hlt", options(nomem, nostack)) }
    }
}
