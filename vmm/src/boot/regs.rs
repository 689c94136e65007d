//! The vCPU's initial registers: 64-bit long mode with paging on, as
//! Firecracker's `arch/x86_64/regs.rs` sets it up.
//!
//! `CR4.OSFXSR` stays clear on purpose (docs/architecture.md): an SSE instruction in
//! the guest is a bug and must surface as an error, not run.

use super::gdt::{BOOT_GDT, kvm_segment_from_gdt};
use crate::boot::layout::{BOOT_GDT_START, BOOT_IDT_START, BOOT_INFO_START, BOOT_STACK_POINTER, PML4_START};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};

// The control-register bits (CR4.OSFXSR is kept clear).
pub use guest_abi::paging::{
    CR0_ET, CR0_NE, CR0_PE, CR0_PG, CR0_WP, CR4_OSFXSR, CR4_PAE, EFER_LMA, EFER_LME, EFER_NXE,
};

/// Long-mode system registers on top of `sregs` (as read from the vCPU).
/// `nx` says whether the guest's CPUID offers NX, so EFER.NXE may be set.
pub fn long_mode_sregs(mut sregs: kvm_sregs, nx: bool) -> kvm_sregs {
    let code = kvm_segment_from_gdt(BOOT_GDT[1], 1);
    let data = kvm_segment_from_gdt(BOOT_GDT[2], 2);
    let tss = kvm_segment_from_gdt(BOOT_GDT[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_START;
    sregs.cr4 = (sregs.cr4 | CR4_PAE) & !CR4_OSFXSR;
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    if nx {
        sregs.efer |= EFER_NXE;
    }
    sregs
}

/// General-purpose registers at entry: `rip` = the ELF entry, a boot
/// stack, `rdi` = the GPA of `BootInfo`, reserved flag bit 1 set.
pub fn entry_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rdi: BOOT_INFO_START,
        ..Default::default()
    }
}

/// The FPU state at reset (FCW 0x37f, MXCSR 0x1f80), as Firecracker sets it.
pub fn reset_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_with_paging_and_no_sse() {
        let s = long_mode_sregs(kvm_sregs { cr4: CR4_OSFXSR, ..Default::default() }, true);
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG | CR0_WP), CR0_PE | CR0_PG | CR0_WP);
        assert_eq!(s.cr4 & CR4_PAE, CR4_PAE);
        assert_eq!(s.cr4 & CR4_OSFXSR, 0, "SSE must stay disabled");
        assert_eq!(s.efer & (EFER_LME | EFER_LMA | EFER_NXE), EFER_LME | EFER_LMA | EFER_NXE);
        assert_eq!(s.cr3, PML4_START);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.cs.selector, 0x08);
        assert_eq!(s.ss.selector, 0x10);
        assert_eq!(s.gdt.base, BOOT_GDT_START);
        assert_eq!(s.gdt.limit, 31);
    }

    #[test]
    fn no_nxe_without_cpu_support() {
        let s = long_mode_sregs(kvm_sregs::default(), false);
        assert_eq!(s.efer & EFER_NXE, 0);
    }

    #[test]
    fn entry_registers() {
        let r = entry_regs(0xffff_ffff_8020_0000);
        assert_eq!(r.rip, 0xffff_ffff_8020_0000);
        assert_eq!(r.rdi, BOOT_INFO_START);
        assert_eq!(r.rsp % 16, 0);
        assert_eq!(r.rflags, 2);
    }
}
