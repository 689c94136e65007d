//! The guest kernel: boots from the VMM in long mode, sets up its own
//! GDT/TSS/IDT, prints a banner with the memory map it was given, and runs
//! what the command line asks for.
//!
//! Invariants this kernel keeps (docs/host.md explains why):
//! - No SSE/AVX instruction ever executes: the crate is built with
//!   `-sse,-sse2` and never calls `core::fmt` at run time (formatting goes
//!   through `ufmt`).
//! - Every exception and interrupt handler runs on an IST stack, so a fault
//!   inside precompiled `core` code (built with a red zone) cannot clobber
//!   that code's red zone.
//! - The VMM hands over zeroed RAM, so `.bss` is zero at entry.
#![no_std]
#![no_main]

extern crate alloc;

mod arch;
mod boot;
mod cmdline;
mod console;
mod crash;
mod hypercall;
mod ktest;
mod mem;
mod mm;
mod panic;
mod report;
mod selftest;
mod workload;

use core::arch::global_asm;

/// Size of the kernel's boot stack.
const BOOT_STACK_SIZE: usize = 64 * 1024;

#[repr(C, align(16))]
struct Stack([u8; BOOT_STACK_SIZE]);

/// The boot stack. Only `_start` names it, to load `rsp`.
#[unsafe(no_mangle)]
static mut BOOT_STACK: Stack = Stack([0; BOOT_STACK_SIZE]);

// Entry from the VMM: long mode, paging on with the VMM's boot tables,
// interrupts off, `rdi` = GPA of the BootInfo record. Switch to our own
// stack and call `kmain(boot_info_gpa)`, which never returns.
global_asm!(
    ".section .text.entry, \"ax\"",
    ".global _start",
    "_start:",
    "    cli",
    "    cld",
    "    lea rsp, [rip + {stack} + {size}]",
    "    xor ebp, ebp",
    "    call {kmain}",
    "2:  hlt",
    "    jmp 2b",
    stack = sym BOOT_STACK,
    size = const BOOT_STACK_SIZE,
    kmain = sym kmain,
);

/// The kernel's main function, called by `_start`.
extern "C" fn kmain(boot_info_gpa: u64) -> ! {
    let tsc_at_entry = arch::rdtsc();
    arch::init();
    let info = boot::BootParams::from_gpa(boot_info_gpa);
    arch::mmu::init(info.mmu_mode());
    boot::print_banner(&info);
    boot::report_boot(&info, tsc_at_entry);
    let cmdline = info.cmdline();
    if let Err(bad) = cmdline::check(cmdline) {
        refuse_cmdline(bad);
    }
    if let Some(mode) = cmdline::value(cmdline, "crash") {
        crash::run(mode);
    }
    if let Some(n) = cmdline::value(cmdline, "calibrate") {
        selftest::calibrate(cmdline::parse_u64(n).unwrap_or(200_000));
    }
    if cmdline::value(cmdline, "explain").is_some() {
        selftest::explain(boot_info_gpa);
    }
    if cmdline::value(cmdline, "matrix").is_some() {
        mm::init(boot::info());
        arch::idt::set_page_fault_hook(ktest::vm_suites::user_fault);
        match ktest::matrix::run() {
            Ok(_) => arch::exit(guest_abi::ports::EXIT_SUCCESS),
            Err(why) => panic::fatal(why),
        }
    }
    if let Some(name) = cmdline::value(cmdline, "workload") {
        mm::init(boot::info());
        let size = cmdline::value(cmdline, "size").and_then(cmdline::parse_u64).unwrap_or(64);
        workload::run(name, size);
    }
    if let Some(filter) = cmdline::value(cmdline, "test") {
        let t0 = arch::rdtsc();
        mm::init(boot::info());
        kprintln!("memory manager up in {} cycles", arch::rdtsc() - t0);
        ktest::run(filter);
    }
    // A plain boot still runs on the VMM's shadow in shadow and pv mode.
    arch::mmu::start_shadowing();
    console::println("boot ok");
    arch::exit(guest_abi::ports::EXIT_SUCCESS)
}

/// Print why a command-line word was refused and end the VM with
/// `EXIT_BAD_CMDLINE` + its index, so that the VMM can name it too.
fn refuse_cmdline(bad: cmdline::BadWord<'_>) -> ! {
    kprintln!("error: command-line word {} \"{}\": {}", bad.index, bad.word, bad.why);
    if !bad.expected.is_empty() {
        console::write_bytes(b"  expected one of:");
        for v in bad.expected {
            kprint!(" {}", *v);
        }
        console::write_bytes(b"\n");
    } else if bad.why == cmdline::UNKNOWN_WORD {
        console::println(
            "  the kernel knows: crash=MODE workload=NAME size=N calibrate[=N] test[=FILTER] explain matrix fail-on-request",
        );
    }
    let index = bad.index.min(guest_abi::ports::MAX_CMDLINE_WORD_INDEX as usize) as u8;
    arch::exit(guest_abi::ports::EXIT_BAD_CMDLINE + index)
}
