//! The IDT and the exception entry path.
//!
//! Each of the 32 exception vectors has a small assembly stub that pushes a
//! dummy error code where the CPU pushes none, then the vector number, then
//! jumps to a common path that saves all general-purpose registers and calls
//! [`exception_dispatch`] with a pointer to the [`TrapFrame`]. Every gate
//! names an IST stack ([`super::gdt::Ist`]); none runs on the interrupted
//! stack. Returning from `exception_dispatch` resumes the interrupted code
//! with `iretq`: the `#UD` probe does so today (and is tested), `#PF` will
//! once demand paging exists; every other exception is fatal.

use super::apic;
use super::gdt::{Ist, KERNEL_CS};
use crate::{arch, kprintln};
use core::arch::global_asm;
use core::ptr::addr_of;

/// Registers saved on exception entry, lowest address first.
#[repr(C)]
#[derive(Debug)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

// Vectors whose exceptions push an error code (Intel SDM vol. 3 §6.13).
global_asm!(
    ".macro ISR_NOERR n",
    "isr_stub_\\n:",
    "    push 0",
    "    push \\n",
    "    jmp isr_common",
    ".endm",
    ".macro ISR_ERR n",
    "isr_stub_\\n:",
    "    push \\n",
    "    jmp isr_common",
    ".endm",
    ".section .text",
    "ISR_NOERR 0", "ISR_NOERR 1", "ISR_NOERR 2", "ISR_NOERR 3",
    "ISR_NOERR 4", "ISR_NOERR 5", "ISR_NOERR 6", "ISR_NOERR 7",
    "ISR_ERR 8", "ISR_NOERR 9", "ISR_ERR 10", "ISR_ERR 11",
    "ISR_ERR 12", "ISR_ERR 13", "ISR_ERR 14", "ISR_NOERR 15",
    "ISR_NOERR 16", "ISR_ERR 17", "ISR_NOERR 18", "ISR_NOERR 19",
    "ISR_NOERR 20", "ISR_ERR 21", "ISR_NOERR 22", "ISR_NOERR 23",
    "ISR_NOERR 24", "ISR_NOERR 25", "ISR_NOERR 26", "ISR_NOERR 27",
    "ISR_NOERR 28", "ISR_ERR 29", "ISR_ERR 30", "ISR_NOERR 31",
    // The interrupt vectors (apic.rs): IPI call, IPI wake, spurious.
    "ISR_NOERR 240", "ISR_NOERR 241", "ISR_NOERR 255",
    "isr_common:",
    "    push rax", "push rbx", "push rcx", "push rdx", "push rsi", "push rdi", "push rbp",
    "    push r8", "push r9", "push r10", "push r11", "push r12", "push r13", "push r14", "push r15",
    "    cld",
    "    mov rdi, rsp",
    // The CPU aligned the IST stack to 16 bytes; 22 quadwords later it is
    // still 16-byte aligned, as the call requires.
    "    call {dispatch}",
    "    pop r15", "pop r14", "pop r13", "pop r12", "pop r11", "pop r10", "pop r9", "pop r8",
    "    pop rbp", "pop rdi", "pop rsi", "pop rdx", "pop rcx", "pop rbx", "pop rax",
    "    add rsp, 16",
    "    iretq",
    ".section .rodata",
    ".balign 8",
    ".global ISR_STUBS",
    "ISR_STUBS:",
    ".irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    "    .quad isr_stub_\\n",
    ".endr",
    ".global IRQ_STUBS",
    "IRQ_STUBS:",
    "    .quad isr_stub_240, isr_stub_241, isr_stub_255",
    ".section .text",
    dispatch = sym exception_dispatch,
);

unsafe extern "C" {
    static ISR_STUBS: [u64; 32];
    static IRQ_STUBS: [u64; 3];
}

/// The interrupt vectors with a gate, in `IRQ_STUBS` order.
const IRQ_VECTORS: [u8; 3] = [apic::VECTOR_CALL, apic::VECTOR_WAKE, apic::VECTOR_SPURIOUS];

/// One 16-byte interrupt gate (Intel SDM vol. 3 §6.14.1).
#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

impl Gate {
    const EMPTY: Gate =
        Gate { offset_low: 0, selector: 0, ist: 0, type_attr: 0, offset_mid: 0, offset_high: 0, reserved: 0 };

    fn interrupt(handler: u64, ist: Ist) -> Gate {
        Gate {
            offset_low: handler as u16,
            selector: KERNEL_CS,
            ist: ist as u8,
            type_attr: 0x8e, // present, DPL0, 64-bit interrupt gate
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

static mut IDT: [Gate; 256] = [Gate::EMPTY; 256];

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

fn ist_for(vector: usize) -> Ist {
    match vector {
        8 => Ist::DoubleFault,
        14 => Ist::PageFault,
        2 | 18 => Ist::Nmi,
        _ => Ist::Other,
    }
}

/// Fill the 32 exception gates and the interrupt gates, and load the IDT.
/// Called once, by the boot CPU, before any other CPU runs; the IDT is
/// shared and never written again.
pub fn init() {
    // SAFETY: single-threaded boot with interrupts off, before any AP
    // exists; the gates point at the stubs above, every one with an IST
    // stack each CPU's TSS provides.
    unsafe {
        let idt = &mut *core::ptr::addr_of_mut!(IDT);
        let stubs = &*addr_of!(ISR_STUBS);
        for (v, stub) in stubs.iter().enumerate() {
            idt[v] = Gate::interrupt(*stub, ist_for(v));
        }
        for (v, stub) in IRQ_VECTORS.iter().zip(&*addr_of!(IRQ_STUBS)) {
            idt[*v as usize] = Gate::interrupt(*stub, Ist::Irq);
        }
    }
    load();
}

/// Load the (shared, filled) IDT on this CPU.
pub fn load() {
    let ptr = DescriptorPointer { limit: (core::mem::size_of::<[Gate; 256]>() - 1) as u16, base: addr_of!(IDT) as u64 };
    // SAFETY: the IDT is filled by `init` before any CPU loads it and never
    // changes afterwards.
    unsafe { core::arch::asm!("lidt [{}]", in(reg) &ptr, options(readonly, nostack, preserves_flags)) };
}

/// Load an empty IDT: the next exception becomes a triple fault. Used by
/// the `crash=triple` self-test of the VMM's shutdown handling.
pub fn load_empty() {
    let ptr = DescriptorPointer { limit: 0, base: 0 };
    // SAFETY: deliberately makes every exception unhandled; only called
    // right before provoking one.
    unsafe { core::arch::asm!("lidt [{}]", in(reg) &ptr, options(readonly, nostack, preserves_flags)) }
}

/// The mnemonic of an exception vector.
pub fn vector_name(v: u64) -> &'static str {
    const NAMES: [&str; 32] = [
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS", "#GP", "#PF", "#15",
        "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "#22", "#23", "#24", "#25", "#26", "#27", "#HV", "#VC", "#SX", "#31",
    ];
    NAMES.get(v as usize).copied().unwrap_or("?")
}

use core::sync::atomic::{AtomicU64, Ordering};

static UD_PROBES: AtomicU64 = AtomicU64::new(0);

// A `ud2` the exception handler recognises and steps over: the probe of
// the return path (handler → `iretq` → interrupted code, with `rip`
// changed by the handler) that `#PF` fix-ups will use. (`int3` would be
// the classic probe, but KVM's instruction emulator on the development
// hosts cannot emulate it.)
global_asm!(".section .text", ".global ud_probe", "ud_probe:", "    ud2", "    ret",);

unsafe extern "C" {
    fn ud_probe();
}

/// Execute the recognised `ud2` once; returns how many probes have been
/// taken and resumed so far.
pub fn run_ud_probe() -> u64 {
    // SAFETY: `ud_probe` raises #UD at a known address, which the handler
    // steps over, then returns normally; it touches no memory.
    unsafe { ud_probe() };
    UD_PROBES.load(Ordering::Relaxed)
}

/// A handler for true guest page faults (demand paging): returns `true`
/// when it resolved the fault.
pub type PageFaultHook = fn(cr2: u64, error_code: u64) -> bool;

static PF_HOOK: AtomicU64 = AtomicU64::new(0);

/// Install the handler for true guest page faults.
pub fn set_page_fault_hook(hook: PageFaultHook) {
    PF_HOOK.store(hook as usize as u64, Ordering::Release);
}

fn page_fault_hook() -> Option<PageFaultHook> {
    let raw = PF_HOOK.load(Ordering::Acquire);
    // SAFETY: only `set_page_fault_hook` stores non-zero values, and it
    // stores a valid `PageFaultHook`.
    (raw != 0).then(|| unsafe { core::mem::transmute::<usize, PageFaultHook>(raw as usize) })
}

/// Finish an access-matrix probe: record how it ended and resume in ring 0
/// at `probe_return` (which restores the kernel stack it saved).
fn end_probe(frame: &mut TrapFrame, vector: u64) {
    crate::ktest::matrix::PROBE_VECTOR.store(1 + vector, Ordering::Relaxed);
    crate::ktest::matrix::PROBE_ACTIVE.store(0, Ordering::Relaxed);
    frame.rip = crate::ktest::matrix::probe_return_addr();
    frame.cs = super::gdt::KERNEL_CS as u64;
    frame.ss = super::gdt::KERNEL_DS as u64;
    frame.rflags = 0x2;
}

/// Start a fatal exception's report: a new line, and with several CPUs
/// online, which CPU took it.
fn on_cpu() {
    if crate::smp::online_count() > 1 {
        crate::kprint!("\nCPU {}: ", super::percpu::cpu_id());
    } else {
        crate::console::write_bytes(b"\n");
    }
}

/// Called by the common stub for every exception and interrupt.
/// Interrupts (vectors 32 and up) go to [`crate::smp::interrupt`] and are
/// acknowledged (not the spurious vector). The `ud2` of
/// [`run_ud_probe`] is counted and stepped over. Everything else prints
/// vector, error code, `rip` (and `cr2` for `#PF`), then ends the VM with
/// the failure status.
extern "C" fn exception_dispatch(frame: &mut TrapFrame) {
    let v = frame.vector;
    if v >= 32 {
        if v != apic::VECTOR_SPURIOUS as u64 {
            crate::smp::interrupt(v as u8);
            apic::eoi();
        }
        return;
    }
    if v == 6 && frame.rip == ud_probe as *const () as u64 {
        UD_PROBES.fetch_add(1, Ordering::Relaxed);
        frame.rip += 2;
        return;
    }
    if v == 6 && crate::ktest::matrix::PROBE_ACTIVE.load(Ordering::Relaxed) != 0 {
        return end_probe(frame, 6);
    }
    if v == 14 {
        let cr2 = arch::read_cr2();
        let error_code = match arch::mmu::classify_fault(cr2, frame.error_code, frame.rflags) {
            arch::mmu::Fault::Hidden => return,
            arch::mmu::Fault::Guest(ec) => ec,
        };
        if crate::ktest::matrix::PROBE_ACTIVE.load(Ordering::Relaxed) != 0 {
            crate::ktest::matrix::PROBE_EC.store(error_code, Ordering::Relaxed);
            return end_probe(frame, 14);
        }
        if let Some(hook) = page_fault_hook()
            && hook(cr2, error_code)
        {
            arch::mmu::fault_handled(cr2);
            return;
        }
        on_cpu();
        kprintln!("EXCEPTION {} ({}) error={:#x} rip={:#x} cr2={:#x}", v, vector_name(v), error_code, frame.rip, cr2);
    } else {
        on_cpu();
        kprintln!("EXCEPTION {} ({}) error={:#x} rip={:#x}", v, vector_name(v), frame.error_code, frame.rip);
    }
    kprintln!("  rsp={:#x} rflags={:#x} cs={:#x}", frame.rsp, frame.rflags, frame.cs);
    arch::exit(guest_abi::ports::EXIT_FAILURE)
}
