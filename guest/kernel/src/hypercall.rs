//! Hypercalls to the VMM (calling convention in `guest_abi::hypercall`).

use guest_abi::ports::HYPERCALL;

/// Issue hypercall `nr` with up to four arguments; returns the VMM's
/// answer (`guest_abi::hypercall::is_error` tells errors apart).
#[inline]
pub fn call(nr: u32, a0: u64, a1: u64, a2: u64, a3: u64) -> u64 {
    let ret: u64;
    // SAFETY: a port write that exits to the VMM; the VMM changes only
    // `rax` (the result) and reads guest memory only where the arguments
    // point and the call's contract allows.
    unsafe {
        core::arch::asm!(
            "out dx, eax",
            in("dx") HYPERCALL,
            inout("rax") nr as u64 => ret,
            in("rdi") a0,
            in("rsi") a1,
            in("rcx") a2,
            in("r8") a3,
            options(nostack, preserves_flags)
        );
    }
    ret
}

/// Host monotonic nanoseconds since the VM was created.
pub fn now_ns() -> u64 {
    call(guest_abi::hypercall::NOW, 0, 0, 0, 0)
}

/// Send a report record at guest-physical `gpa`, `len` bytes long.
pub fn report(gpa: u64, len: u64) -> u64 {
    call(guest_abi::hypercall::REPORT, gpa, len, 0, 0)
}
