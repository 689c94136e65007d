//! Shadow mode's emulation of the guest's paging controls (`shadow::mmu`,
//! "Paging controls"): the vCPU runs with CR0.WP = 1 and, when the
//! guest's CPUID has NX, EFER.NXE = 1 whatever the guest set, as KVM does
//! under shadow paging (KVM's mmu.rst, `role.cr0_wp`); the guest's own WP
//! and NXE are kept here and given to the shadow walker. 1 GiB pages,
//! MAXPHYADDR and the vendor follow the CPUID the guest was given.
//!
//! These controls are architecturally per-vCPU: the backend keeps the
//! guest's WP and NXE per vCPU index, and the acting vCPU's are in the
//! working fields these methods read (`mmu::shadow`, "SMP").

use super::ShadowBackend;
use crate::mmu::{VcpuContext, paging_mode};
use guest_abi::Gva;
use guest_abi::paging::{CR0_WP, EFER_NXE};
use kvm_bindings::kvm_sregs;
use shadow::PagingMode;

impl ShadowBackend {
    /// The paging controls the guest believes in: the vCPU's, with CR0.WP
    /// and EFER.NXE replaced by the guest's own.
    pub fn guest_mode(&self, sregs: &kvm_bindings::kvm_sregs, rflags: u64) -> PagingMode {
        let vcpu = paging_mode(sregs, rflags, self.maxphyaddr);
        PagingMode {
            wp: self.guest_wp,
            nxe: if self.force_nx { self.guest_nxe } else { vcpu.nxe },
            pdpe1gb: self.pdpe1gb,
            amd: self.amd,
            ..vcpu
        }
    }

    /// The vCPU's system registers as shadow mode runs them: CR0.WP set,
    /// and EFER.NXE set when forced.
    pub fn vcpu_sregs(&self, mut sregs: kvm_bindings::kvm_sregs) -> kvm_bindings::kvm_sregs {
        sregs.cr0 |= CR0_WP;
        if self.force_nx {
            sregs.efer |= EFER_NXE;
        }
        sregs
    }

    /// Learn the guest's EFER.NXE from the vCPU's EFER at an exit: the VMM
    /// keeps NXE set, so a clear NXE means the guest cleared it (`wrmsr`)
    /// since. Returns whether it did — then the vCPU must get NXE back, and
    /// an error code taken with NXE = 0 cannot tell a fetch from a read.
    pub fn note_vcpu_efer(&mut self, efer: u64) -> bool {
        if self.force_nx && efer & EFER_NXE == 0 {
            self.guest_nxe = false;
            return true;
        }
        false
    }

    /// `FLUSH_TLB(cr0, efer)`: the guest's own controls (0: unchanged).
    pub fn note_guest_controls(&mut self, cr0: u64, efer: u64) {
        if cr0 != 0 {
            self.guest_wp = cr0 & CR0_WP != 0;
        }
        if efer != 0 && self.force_nx {
            self.guest_nxe = efer & EFER_NXE != 0;
        }
    }

    /// Point the vCPU at the current shadow root with shadow mode's
    /// controls (CR0.WP and, when forced, EFER.NXE set): `sregs` as read
    /// from the vCPU, written back with one `KVM_SET_SREGS`. KVM resets
    /// the vCPU's MMU context (a TLB flush) on `KVM_SET_SREGS` only when
    /// CR3 or a paging control changes (`__set_sregs_common`,
    /// `mmu_reset_needed`); writing the values it already has changes
    /// nothing — which is why host coherence toggles CR4.PGE
    /// (`Coherence::ReloadCr3`) rather than rewriting CR3.
    pub(super) fn enter_root(&self, vcpu: &VcpuContext, sregs: kvm_sregs) -> crate::Result<()> {
        let mut sregs = self.vcpu_sregs(sregs);
        if let Some(root) = self.mmu.current_root(&self.vcpu) {
            sregs.cr3 = root.gpa().raw();
        }
        vcpu.set_sregs(&sregs)
    }
}

/// The RFLAGS whose AC the walk of `SHADOW_FAULT(cr2, error_code, rflags)`
/// uses: the faulting context's, when the guest passed it (RFLAGS bit 1 is
/// always set, so 0 means "not given"), else the vCPU's now.
pub fn fault_rflags(passed: u64, vcpu_now: u64) -> u64 {
    if passed != 0 { passed } else { vcpu_now }
}

/// What exception delivery touches, as guest-virtual addresses in the
/// vCPU's registers: the IDT, GDT and TSS bases, RIP and RSP. The shadow
/// MMU prefills their PML4 slots before the rest of the kernel half
/// (`ShadowMmu::set_prefill_hints`), so a pool too small for the whole
/// kernel half still leaves the guest able to take a fault.
pub fn fault_path_gvas(sregs: &kvm_bindings::kvm_sregs, regs: &kvm_bindings::kvm_regs) -> [Gva; 5] {
    [sregs.idt.base, sregs.gdt.base, sregs.tr.base, regs.rip, regs.rsp].map(Gva)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmu::GuestCpu;
    use crate::mmu::report::Coherence;
    use ept::memmap::SlotSpec;
    use guest_abi::Gpa;
    use shadow::TableFrames;

    fn state(cpu: GuestCpu) -> ShadowBackend {
        let slot =
            SlotSpec { slot: 3, gpa: Gpa(2 << 30), len: 64 << 12, readonly: false, kind: ept::RegionKind::ShadowPool };
        ShadowBackend::new(slot, Coherence::ReloadCr3, cpu, TableFrames::ALL)
    }

    #[test]
    fn smap_checks_the_ac_of_the_faulting_context() {
        const AC: u64 = guest_abi::paging::RFLAGS_AC;
        let sh = state(GuestCpu { maxphyaddr: 48, nx: true, pdpe1gb: false, amd: false });
        let sregs = kvm_bindings::kvm_sregs { cr4: guest_abi::paging::CR4_SMAP, efer: EFER_NXE, ..Default::default() };
        // The handler cleared AC on entry; the faulting access had it set.
        let rflags = fault_rflags(0x2 | AC, 0x2);
        assert!(sh.guest_mode(&sregs, rflags).ac);
        // An older guest that passes nothing: the vCPU's AC.
        assert!(!sh.guest_mode(&sregs, fault_rflags(0, 0x2)).ac);
        assert!(sh.guest_mode(&sregs, fault_rflags(0, 0x2 | AC)).ac);
    }

    #[test]
    fn the_vcpu_runs_with_wp_and_nxe_while_the_guest_keeps_its_own() {
        let mut sh = state(GuestCpu { maxphyaddr: 48, nx: true, pdpe1gb: false, amd: false });
        let guest = kvm_bindings::kvm_sregs { cr0: 0x8000_0011, efer: 0x500, ..Default::default() }; // WP = 0, NXE = 0
        let vcpu = sh.vcpu_sregs(guest);
        assert_eq!((vcpu.cr0 & CR0_WP, vcpu.efer & EFER_NXE), (CR0_WP, EFER_NXE));
        // The guest cleared NXE with wrmsr: noticed once, then it is the guest's.
        assert!(sh.note_vcpu_efer(guest.efer));
        assert!(!sh.note_vcpu_efer(vcpu.efer));
        let mode = sh.guest_mode(&vcpu, 0);
        assert!(!mode.nxe && !mode.pdpe1gb && mode.maxphyaddr == 48);
        // FLUSH_TLB(cr0, efer) reports both.
        sh.note_guest_controls(guest.cr0, guest.efer | EFER_NXE);
        let mode = sh.guest_mode(&vcpu, 0);
        assert!(mode.nxe && !mode.wp);
        // Without NX in the guest's CPUID nothing is forced.
        let sh = state(GuestCpu { maxphyaddr: 48, nx: false, pdpe1gb: true, amd: false });
        assert_eq!(sh.vcpu_sregs(guest).efer & EFER_NXE, 0);
        assert!(sh.guest_mode(&guest, 0).pdpe1gb);
    }
}
