//! What the host offers: KVM's API and capabilities, the second-stage
//! translation, huge pages. The calibration that tells native execution
//! from instruction emulation boots a guest, so it lives in the VMM
//! (`vmm info`); this module gathers everything that can be read without
//! running one.

use crate::backing::{HugePageSize, hugetlb_free, thp_mode};
use kvm_ioctls::{Cap, Kvm};
use serde::Serialize;

/// How the host's KVM translates guest-physical addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecondStage {
    /// Intel VMX with EPT (`kvm_intel` `ept=Y`).
    Ept,
    /// AMD SVM with NPT (`kvm_amd` `npt=1`).
    Npt,
    /// VMX/SVM loaded with EPT/NPT off: KVM shadows the guest's tables.
    HostShadow,
    /// The PVM flavour of KVM (`kvm_pvm`): no hardware virtualisation;
    /// guests that do not speak PVM are run by the instruction emulator
    /// and their page tables are shadowed by KVM.
    Pvm,
    /// None of the above could be identified.
    Unknown,
}

impl SecondStage {
    /// Whether the host's KVM caches translations of page tables that the
    /// VMM writes (so shadow mode must invalidate them; HOST.md).
    pub fn host_shadows_page_tables(self) -> bool {
        matches!(self, SecondStage::HostShadow | SecondStage::Pvm | SecondStage::Unknown)
    }

    /// A short description.
    pub fn describe(self) -> &'static str {
        match self {
            SecondStage::Ept => "Intel EPT (kvm_intel ept=Y)",
            SecondStage::Npt => "AMD NPT (kvm_amd npt=1)",
            SecondStage::HostShadow => "none: KVM shadows guest page tables (ept/npt disabled)",
            SecondStage::Pvm => "none: kvm_pvm (no VMX/SVM; guests run under KVM's instruction emulator)",
            SecondStage::Unknown => "unknown",
        }
    }
}

fn param(module: &str, name: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/module/{module}/parameters/{name}")).ok().map(|s| s.trim().to_string())
}

fn truthy(v: &str) -> bool {
    matches!(v, "Y" | "y" | "1")
}

/// Identify the second stage from `/sys/module`.
pub fn second_stage() -> SecondStage {
    classify(
        std::path::Path::new("/sys/module/kvm_pvm").exists(),
        param("kvm_intel", "ept").as_deref(),
        param("kvm_amd", "npt").as_deref(),
    )
}

/// The decision behind [`second_stage`].
pub fn classify(pvm: bool, intel_ept: Option<&str>, amd_npt: Option<&str>) -> SecondStage {
    match (intel_ept, amd_npt) {
        (Some(v), _) if truthy(v) => SecondStage::Ept,
        (_, Some(v)) if truthy(v) => SecondStage::Npt,
        (Some(_), _) | (_, Some(_)) => SecondStage::HostShadow,
        (None, None) if pvm => SecondStage::Pvm,
        _ => SecondStage::Unknown,
    }
}

/// Whether the CPU advertises hardware virtualisation (`vmx` or `svm`).
pub fn cpu_has_hw_virt() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| {
            s.lines().filter(|l| l.starts_with("flags")).any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

/// One KVM capability.
#[derive(Debug, Clone, Serialize)]
pub struct Capability {
    /// Its `KVM_CAP_*` name.
    pub name: &'static str,
    /// What `KVM_CHECK_EXTENSION` answered (0: absent).
    pub value: i32,
    /// Whether the VMM needs it to run at all.
    pub required: bool,
}

/// hugetlb pages of one size.
#[derive(Debug, Clone, Serialize)]
pub struct HugetlbPool {
    /// Page size.
    pub size: HugePageSize,
    /// Free pages.
    pub free: u64,
}

/// Everything the probe found.
#[derive(Debug, Clone, Serialize)]
pub struct HostFacts {
    /// KVM API version.
    pub kvm_api_version: i32,
    /// Capabilities the VMM relies on.
    pub capabilities: Vec<Capability>,
    /// Memory slots the host allows.
    pub max_memslots: usize,
    /// The second-stage translation.
    pub second_stage: SecondStage,
    /// Whether the CPU has VMX/SVM.
    pub cpu_hw_virt: bool,
    /// THP mode (`always`, `madvise`, `never`), if the host has THP.
    pub thp: Option<String>,
    /// hugetlb pools.
    pub hugetlb: Vec<HugetlbPool>,
    /// Host memory (RAM + swap) in bytes.
    pub host_memory: Option<u64>,
}

/// Read the host facts.
pub fn probe(kvm: &Kvm) -> HostFacts {
    let caps: [(&'static str, Cap, bool); 6] = [
        ("KVM_CAP_USER_MEMORY", Cap::UserMemory, true),
        ("KVM_CAP_SYNC_REGS", Cap::SyncRegs, true),
        ("KVM_CAP_READONLY_MEM", Cap::ReadonlyMem, false),
        ("KVM_CAP_IMMEDIATE_EXIT", Cap::ImmediateExit, false),
        ("KVM_CAP_SET_GUEST_DEBUG", Cap::SetGuestDebug, false),
        ("KVM_CAP_VCPU_EVENTS", Cap::VcpuEvents, false),
    ];
    HostFacts {
        kvm_api_version: kvm.get_api_version(),
        capabilities: caps
            .iter()
            .map(|&(name, cap, required)| Capability { name, value: kvm.check_extension_int(cap), required })
            .collect(),
        max_memslots: kvm.get_nr_memslots(),
        second_stage: second_stage(),
        cpu_hw_virt: cpu_has_hw_virt(),
        thp: thp_mode(),
        hugetlb: [HugePageSize::Size2M, HugePageSize::Size1G]
            .into_iter()
            .filter_map(|size| hugetlb_free(size).map(|free| HugetlbPool { size, free }))
            .collect(),
        host_memory: crate::backing::host_memory(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert_eq!(classify(false, Some("Y"), None), SecondStage::Ept);
        assert_eq!(classify(false, None, Some("1")), SecondStage::Npt);
        assert_eq!(classify(false, Some("N"), None), SecondStage::HostShadow);
        assert_eq!(classify(true, None, None), SecondStage::Pvm);
        assert_eq!(classify(false, None, None), SecondStage::Unknown);
        assert!(SecondStage::Pvm.host_shadows_page_tables());
        assert!(!SecondStage::Ept.host_shadows_page_tables());
    }
}
