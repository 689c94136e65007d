//! x86-64 specifics: descriptor tables, exceptions, control registers, the
//! exit device.

pub mod gdt;
pub mod idt;
pub mod mmu;

use guest_abi::ports::EXIT_DEVICE;

/// Load the kernel's own GDT, TSS and IDT.
pub fn init() {
    gdt::init();
    idt::init();
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
