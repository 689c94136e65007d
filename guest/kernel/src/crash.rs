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
//! | `storm` | random hypercalls and random page-table writes | survive (shadow mode: every write traps) |
//! | `livelock` | the same `SHADOW_FAULT` twice with nothing changed | shadow mode: a one-line livelock error, exit 4 (ept mode: both refused, the guest fails) |

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
        "storm" => {
            storm();
            return;
        }
        "livelock" => {
            // A fault on a mapped kernel address, reported twice in a row as
            // if the vCPU kept faulting after the VMM fixed it.
            let va = run as *const () as u64;
            for _ in 0..2 {
                let r = hypercall::call(hc::SHADOW_FAULT, va, 0, 0, 0);
                kprintln!("SHADOW_FAULT answered {:#x}", r);
            }
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

/// A storm of random hypercalls (every number but `LOAD_CR3`, which would
/// move the vCPU onto garbage tables) and random page-table writes: to
/// unlinked page-table pages, and random mappings in a live address space.
/// The VMM must answer or absorb every one of them.
fn storm() {
    use crate::mm;
    use guest_mm::paging::{Page, PhysFrame, PteFlags, Size4KiB};
    use guest_mm::phys::PhysMem;
    mm::init(crate::boot::info());
    let mut x: u64 = 0x853c_49e6_748f_ea9b;
    let mut rand = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let ram = crate::boot::info().ram_size;
    let mut refused = 0u32;
    for _ in 0..300 {
        let nr = (rand() % 12) as u32;
        if nr == hc::LOAD_CR3 || nr == hc::EXPLAIN {
            continue;
        }
        let arg = |r: u64| match r % 4 {
            0 => r % ram,
            1 => r,
            2 => r & 0xffff,
            _ => u64::MAX - (r & 0xff),
        };
        let r = hypercall::call(nr, arg(rand()), arg(rand()), arg(rand()), arg(rand()));
        refused += u32::from(hc::is_error(r));
    }
    // Raw writes into a page-table page that nothing links.
    let wrote = mm::with(|m| {
        let Some(pt) = m.buddy.alloc_pgtable() else { return 0 };
        let mem = *m.buddy.mem();
        let mut n = 0;
        for _ in 0..64 {
            let at = guest_abi::Gpa(pt.addr().0 + (rand() % 512) * 8);
            mem.write_u64(at, rand());
            n += 1;
        }
        for i in 0..512 {
            mem.write_u64(guest_abi::Gpa(pt.addr().0 + i * 8), 0);
        }
        let _ = m.buddy.free_pgtable(pt);
        n
    })
    .unwrap_or(0);
    // Random mappings in a live address space (never touched), then gone.
    let _ = crate::ktest::vm_suites::enter_user(0);
    mm::with(|m| {
        m.ctx(|cx, _, user| {
            let Some(a) = user.as_mut() else { return };
            for i in 0..32u64 {
                let va = crate::ktest::vm_suites::USER_BASE + i * 4096;
                let target = (rand() & 0x000f_ffff_f000) % (4 * ram);
                let flags = PteFlags::from_bits_truncate(rand()) - PteFlags::HUGE - PteFlags::ANON - PteFlags::COW;
                if let (Ok(p), Ok(f)) = (
                    Page::<Size4KiB>::from_start_address(guest_abi::Gva(va)),
                    PhysFrame::<Size4KiB>::from_start_address(guest_abi::Gpa(target)),
                ) {
                    let _ = a.page_table_mut().map(cx.mem, &mut cx.frames, p, f, flags);
                }
            }
        })
    });
    let _ = crate::ktest::vm_suites::leave_user();
    kprintln!("storm survived: {} hypercalls refused, {} raw page-table writes", refused, wrote);
}
