//! Small probes the VMM runs the kernel for, selected on the command line:
//!
//! - `calibrate=N`: a `dec; jnz` loop of N iterations timed with `NOW` and
//!   `rdtsc`, reported with `REPORT` (kind `CALIBRATION`); `vmm info` turns
//!   it into nanoseconds per guest instruction.
//! - `explain`: ask the VMM to `EXPLAIN` a kernel-image address and a
//!   direct-map address, and check the GPAs it answers against what the
//!   boot layout says they must be.

use crate::{arch, hypercall, kprintln};
use guest_abi::report::{CalibrationRecord, kind};
use guest_abi::{DIRECT_MAP_BASE, KERNEL_VMA};

/// Run the calibration loop and report it.
pub fn calibrate(iterations: u64) {
    let iterations = iterations.max(1);
    let (t0, c0) = (hypercall::now_ns(), arch::rdtsc());
    // SAFETY: a register-only countdown loop.
    unsafe {
        core::arch::asm!("2: dec {n}", "jnz 2b", n = inout(reg) iterations => _, options(nomem, nostack));
    }
    let (c1, t1) = (arch::rdtsc(), hypercall::now_ns());
    let rec = CalibrationRecord { iterations, ns: t1.wrapping_sub(t0), cycles: c1.wrapping_sub(c0) };
    if let Err(why) = crate::report::send(kind::CALIBRATION, &[crate::report::bytes_of(&[rec])]) {
        crate::panic::fatal(why);
    }
    kprintln!("calibration: {} iterations", iterations);
}

/// Check `EXPLAIN` on two addresses whose GPAs the layout fixes.
pub fn explain(boot_info_gpa: u64) {
    crate::arch::mmu::start_shadowing();
    let kernel_va = calibrate as fn(u64) as usize as u64;
    let cases = [
        ("kernel image", kernel_va, kernel_va - KERNEL_VMA),
        ("direct map", DIRECT_MAP_BASE + boot_info_gpa, boot_info_gpa),
    ];
    let mut ok = true;
    for (what, va, want) in cases {
        let got = hypercall::call(guest_abi::hypercall::EXPLAIN, va, 0, 0, 0);
        if got == want {
            kprintln!("explain {}: {:#x} -> {:#x} ok", what, va, got);
        } else {
            kprintln!("explain {}: {:#x} -> {:#x}, want {:#x}", what, va, got, want);
            ok = false;
        }
    }
    let unmapped = hypercall::call(guest_abi::hypercall::EXPLAIN, 0x0000_7fff_dead_b000, 0, 0, 0);
    if unmapped != guest_abi::hypercall::ERR_FAULT {
        kprintln!("explain of an unmapped address answered {:#x}", unmapped);
        ok = false;
    }
    if !ok {
        arch::exit(guest_abi::ports::EXIT_FAILURE);
    }
    kprintln!("explain checks passed");
}
