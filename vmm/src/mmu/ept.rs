//! ept mode's backend: hardware second stage. The vCPU walks the guest's
//! own tables and KVM's EPT/NPT maps GPA → HPA (Intel SDM vol. 3C §29.3,
//! AMD APM vol. 2 §15.25), so no exit is the MMU's: every event of the
//! seam keeps its default answer (`ERR_UNAVAILABLE` for the shadow
//! hypercalls). It holds no per-vCPU state; its only VM-wide state is the
//! guest's CPU facts.

use super::{GuestCpu, MmuBackend, paging_mode};
use kvm_bindings::kvm_sregs;
use shadow::PagingMode;

/// Hardware second stage: the vCPU walks the guest's tables, KVM's EPT/NPT
/// maps GPA → HPA. No exit is the MMU's.
pub struct EptBackend {
    cpu: GuestCpu,
}

impl EptBackend {
    /// ept mode for a guest with CPU facts `cpu`.
    pub fn new(cpu: GuestCpu) -> EptBackend {
        EptBackend { cpu }
    }
}

impl MmuBackend for EptBackend {
    fn guest_paging_mode(&self, sregs: &kvm_sregs, rflags: u64) -> PagingMode {
        PagingMode { pdpe1gb: self.cpu.pdpe1gb, amd: self.cpu.amd, ..paging_mode(sregs, rflags, self.cpu.maxphyaddr) }
    }
}
