//! The MMU platform hooks: the two places where ept and shadow mode differ
//! for the guest (DESIGN.md, "Shadow mode").
//!
//! - **CR3 loads** go through [`load_cr3`]: `mov cr3` in ept mode, the
//!   `LOAD_CR3` hypercall in shadow mode (the VMM points the vCPU at the
//!   shadow root).
//! - **Page faults** first ask the VMM (`SHADOW_FAULT`) in shadow mode:
//!   most are hidden faults the VMM fixes; only true guest faults reach the
//!   kernel's own handling, with the error code the guest's tables give.
//!
//! Nothing else in the kernel knows which mode it runs in.

use crate::hypercall;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use guest_abi::MmuMode;
use guest_abi::hypercall as hc;

static SHADOW: AtomicBool = AtomicBool::new(false);
/// In shadow mode the hardware CR3 holds the shadow root; the guest's own
/// root is remembered here.
static GUEST_CR3: AtomicU64 = AtomicU64::new(0);

fn hardware_cr3() -> u64 {
    let v: u64;
    // SAFETY: reading CR3 has no side effects; ring 0.
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Record the mode and, in shadow mode, move the vCPU onto a shadow of the
/// current tables.
pub fn init(mode: Option<MmuMode>) {
    if mode == Some(MmuMode::Shadow) {
        let boot_root = hardware_cr3();
        SHADOW.store(true, Ordering::Relaxed);
        // SAFETY: the tables the CPU runs on now: they map the kernel.
        unsafe { load_cr3(boot_root) };
    }
}

/// Whether the VMM shadows our page tables.
pub fn is_shadow() -> bool {
    SHADOW.load(Ordering::Relaxed)
}

/// The guest-physical root of the current address space (as the guest
/// sees it: in shadow mode the VMM remembers the guest's value).
#[allow(dead_code)] // used by the address-space code
pub fn read_cr3() -> u64 {
    if is_shadow() { GUEST_CR3.load(Ordering::Relaxed) } else { hardware_cr3() }
}

/// Switch to the address space rooted at `root` (a GPA).
///
/// # Safety
/// `root` must be the root of a valid four-level address space that maps
/// the running kernel (its code, stacks, IDT/GDT/TSS and data) as the
/// current one does — the kernel half every address space shares — and
/// stays so while it is loaded. Anything else faults the next instruction
/// or silently maps other memory.
pub unsafe fn load_cr3(root: u64) {
    if is_shadow() {
        let r = hypercall::call(hc::LOAD_CR3, root, 0, 0, 0);
        if hc::is_error(r) {
            crate::panic::fatal("LOAD_CR3 refused by the VMM");
        }
        GUEST_CR3.store(root, Ordering::Relaxed);
        return;
    }
    // SAFETY: the caller passes the root of a valid address space that maps
    // the kernel (this function's contract).
    unsafe { core::arch::asm!("mov cr3, {}", in(reg) root, options(nostack, preserves_flags)) };
}

/// Flush the TLB entry of `va` after changing its mapping.
#[allow(dead_code)] // used by the paging code
pub fn invlpg(va: u64) {
    // SAFETY: invalidating a TLB entry has no memory effects. In shadow mode
    // the VMM already updated the shadow on the PTE write; invlpg still
    // flushes the hardware TLB, as on bare metal.
    unsafe { core::arch::asm!("invlpg [{}]", in(reg) va, options(nostack, preserves_flags)) };
}

/// What a page fault turned out to be.
pub enum Fault {
    /// A hidden fault: the VMM fixed its shadow; retry.
    Hidden,
    /// A true guest fault with this error code.
    Guest(u64),
}

/// The first step of `#PF` handling; `rflags` is the interrupted context's
/// (its AC is the one SMAP checked).
pub fn classify_fault(cr2: u64, error_code: u64, rflags: u64) -> Fault {
    if !is_shadow() {
        return Fault::Guest(error_code);
    }
    let r = hypercall::call(hc::SHADOW_FAULT, cr2, error_code, rflags, 0);
    if r == hc::FAULT_FIXED {
        Fault::Hidden
    } else if r & hc::FAULT_GUEST != 0 && !hc::is_error(r) {
        Fault::Guest(r & 0xffff_ffff)
    } else {
        crate::panic::fatal("SHADOW_FAULT refused by the VMM")
    }
}
