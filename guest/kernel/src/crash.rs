//! Deliberate failures, selected with `crash=MODE` on the command line, so
//! the VMM's handling of each can be tested end to end:
//!
//! | mode | what happens | what the VMM must do |
//! | --- | --- | --- |
//! | `pf` | read of an unmapped address | the guest's handler prints `#PF` with `cr2`, fails |
//! | `ud` | `ud2` | the handler prints `#UD`, fails |
//! | `panic` | `panic!` | the panic handler prints location and message, fails |
//! | `sse` | an SSE instruction | emulating host: internal error with the bytes; else `#UD` |
//! | `triple` | `ud2` with an empty IDT | `KVM_EXIT_SHUTDOWN`: triple fault |
//! | `hang` | an endless loop | `--timeout` ends it |
//! | `hypercall` | nonsense hypercalls | each gets an error result; the guest checks them and succeeds |

use crate::{arch, console, hypercall, kprintln};
use guest_abi::hypercall as hc;

/// Run crash mode `mode`; returns only for modes that end in success.
pub fn run(mode: &str) {
    match mode {
        "pf" => {
            // An address in the non-canonical-free, unmapped lower half
            // above what the boot tables identity-map.
            let p = 0x0000_7fff_dead_b000 as *const u64;
            // SAFETY: deliberately faults; the #PF handler ends the VM.
            let v = unsafe { core::ptr::read_volatile(p) };
            kprintln!("read {:#x} without a fault", v);
        }
        // SAFETY: `ud2` raises #UD, handled by the IDT.
        "ud" => unsafe { core::arch::asm!("ud2", options(nomem, nostack)) },
        "panic" => panic!("deliberate panic (crash=panic)"),
        // SAFETY: deliberately executes SSE with CR4.OSFXSR clear; the VMM
        // ends the VM (emulation failure) or #UD ends it.
        "sse" => unsafe { deliberate_sse_instruction() },
        "triple" => {
            arch::idt::load_empty();
            // SAFETY: with an empty IDT the #UD cannot be delivered: #GP,
            // then #DF, then a triple fault (shutdown).
            unsafe { core::arch::asm!("ud2", options(nomem, nostack)) }
        }
        "hang" => loop {
            core::hint::spin_loop();
        },
        "hypercall" => {
            check_hypercall_errors();
            return;
        }
        _ => {
            kprintln!("unknown crash mode \"{}\"", mode);
            arch::exit(guest_abi::ports::EXIT_FAILURE);
        }
    }
    console::println("crash mode did not crash");
    arch::exit(guest_abi::ports::EXIT_FAILURE);
}

// The kernel's only SSE instruction, in a function of its own so that
// tests/no_sse.rs can allow exactly this one and no other.
core::arch::global_asm!(
    ".section .text",
    ".global deliberate_sse_instruction",
    "deliberate_sse_instruction:",
    "    pxor xmm0, xmm0",
    "    ret",
);

unsafe extern "C" {
    fn deliberate_sse_instruction();
}

/// Send hypercalls the VMM must refuse, and check that it does.
fn check_hypercall_errors() {
    let cases: [(&str, u32, u64, u64, u64); 5] = [
        ("unknown number", 0xdead, 0, 0, 0),
        ("report outside RAM", hc::REPORT, 1 << 50, 64, hc::ERR_FAULT),
        ("report wrapping around", hc::REPORT, u64::MAX - 8, 64, hc::ERR_FAULT),
        ("report too long", hc::REPORT, 0x1000, 1 << 20, hc::ERR_INVALID),
        ("report not a record", hc::REPORT, 0x0, 64, hc::ERR_INVALID),
    ];
    let mut failed = false;
    for (name, nr, a0, a1, want) in cases {
        let got = hypercall::call(nr, a0, a1, 0, 0);
        let want = if want == 0 { hc::ERR_UNKNOWN } else { want };
        if got == want {
            kprintln!("hypercall check: {}: refused ok", name);
        } else {
            kprintln!("hypercall check: {}: got {:#x}, want {:#x}", name, got, want);
            failed = true;
        }
    }
    let t0 = hypercall::now_ns();
    let t1 = hypercall::now_ns();
    if hc::is_error(t0) || t1 < t0 {
        kprintln!("hypercall check: NOW not monotonic: {} then {}", t0, t1);
        failed = true;
    }
    if failed {
        arch::exit(guest_abi::ports::EXIT_FAILURE);
    }
    console::println("hypercall checks passed");
}
