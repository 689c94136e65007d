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
    /// VMM writes (so shadow mode must invalidate them; docs/host.md).
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

/// What the host itself runs on, from evidence: the CPUID hypervisor leaf,
/// the DMI strings the firmware left, and which KVM module is loaded.
/// Nothing here is inferred from speed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HostIdentity {
    /// The 12-byte signature of CPUID leaf `0x4000_0000` (EBX, ECX, EDX),
    /// read only when CPUID.1:ECX bit 31 ("hypervisor present") is set:
    /// `TCGTCGTCGTCG` under QEMU's TCG, `KVMKVMKVM` under KVM.
    pub hypervisor_signature: Option<String>,
    /// The signature's hypervisor, when known (`QEMU TCG`, `KVM`, ...).
    pub hypervisor: Option<&'static str>,
    /// `/sys/class/dmi/id/sys_vendor` (`QEMU` in a QEMU machine).
    pub dmi_sys_vendor: Option<String>,
    /// `/sys/class/dmi/id/product_name`.
    pub dmi_product_name: Option<String>,
    /// The vendor module of the host's KVM: `kvm_amd`, `kvm_intel` or `kvm_pvm`.
    pub kvm_module: Option<&'static str>,
}

/// The hypervisor a CPUID signature names.
pub fn hypervisor_name(signature: &str) -> Option<&'static str> {
    Some(match signature.trim_end_matches('\0') {
        "TCGTCGTCGTCG" => "QEMU TCG",
        "KVMKVMKVM" => "KVM",
        "Microsoft Hv" => "Hyper-V",
        "VMwareVMware" => "VMware",
        "XenVMMXenVMM" => "Xen",
        "VBoxVBoxVBox" => "VirtualBox",
        "ACRNACRNACRN" => "ACRN",
        " lrpepyh  vr" => "Parallels",
        "bhyve bhyve " => "bhyve",
        _ => return None,
    })
}

/// The CPUID hypervisor signature, if the CPU says a hypervisor is present.
pub fn cpuid_hypervisor_signature() -> Option<String> {
    use std::arch::x86_64::__cpuid;
    // CPUID exists on every x86-64 CPU; leaf 1 always, and leaf
    // 0x4000_0000 is defined whenever ECX bit 31 of leaf 1 is set (Intel
    // SDM Vol. 2A, CPUID: "not used" bit reserved for hypervisors; AMD APM
    // Vol. 3, E.3.2: "reserved for use by hypervisor to indicate guest
    // status").
    let leaf1 = __cpuid(1);
    if leaf1.ecx & (1 << 31) == 0 {
        return None;
    }
    let l = __cpuid(0x4000_0000);
    let bytes: Vec<u8> = [l.ebx, l.ecx, l.edx].iter().flat_map(|r| r.to_le_bytes()).collect();
    Some(String::from_utf8_lossy(&bytes).trim_end_matches('\0').to_string())
}

fn dmi(field: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/class/dmi/id/{field}"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Gather the host's identity.
pub fn identity() -> HostIdentity {
    let hypervisor_signature = cpuid_hypervisor_signature();
    let module = |m: &'static str| std::path::Path::new(&format!("/sys/module/{m}")).exists().then_some(m);
    HostIdentity {
        hypervisor: hypervisor_signature.as_deref().and_then(hypervisor_name),
        hypervisor_signature,
        dmi_sys_vendor: dmi("sys_vendor"),
        dmi_product_name: dmi("product_name"),
        kvm_module: module("kvm_amd").or_else(|| module("kvm_intel")).or_else(|| module("kvm_pvm")),
    }
}

impl HostIdentity {
    /// Whether the host is itself a QEMU TCG machine: the CPUID signature
    /// says so, or (when a kernel hides the leaf) DMI says QEMU and no
    /// other hypervisor signature is present.
    pub fn in_qemu_tcg(&self) -> bool {
        self.hypervisor == Some("QEMU TCG")
            || (self.hypervisor_signature.is_none() && self.dmi_sys_vendor.as_deref() == Some("QEMU"))
    }

    /// The label every report carries for a nested host (`None` when the
    /// host is not a recognised nested one: then the speed verdict alone
    /// describes it).
    pub fn nested_label(&self, second_stage: SecondStage) -> Option<String> {
        let amd = self.kvm_module == Some("kvm_amd");
        let what = match second_stage {
            SecondStage::Npt => "AMD NPT".to_string(),
            SecondStage::Ept => "Intel EPT".to_string(),
            SecondStage::HostShadow => format!("KVM shadow MMU ({}=0)", if amd { "npt" } else { "ept" }),
            SecondStage::Pvm | SecondStage::Unknown => return None,
        };
        if self.in_qemu_tcg() {
            Some(format!(
                "{what} inside QEMU TCG — software-emulated hardware: times are emulation times, which rank the MMUs as hardware does but compress the distances between them"
            ))
        } else {
            self.hypervisor.map(|hv| {
                format!(
                    "{what} inside a {hv} guest — nested virtualisation: times include the outer hypervisor's exits"
                )
            })
        }
    }
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
    /// What the host itself runs on (hypervisor leaf, DMI, KVM module).
    pub identity: HostIdentity,
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
        identity: identity(),
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

    fn tcg(module: &'static str) -> HostIdentity {
        HostIdentity {
            hypervisor_signature: Some("TCGTCGTCGTCG".into()),
            hypervisor: hypervisor_name("TCGTCGTCGTCG"),
            dmi_sys_vendor: Some("QEMU".into()),
            dmi_product_name: Some("Standard PC (i440FX + PIIX, 1996)".into()),
            kvm_module: Some(module),
        }
    }

    #[test]
    fn nested_labels_from_evidence() {
        let npt = tcg("kvm_amd").nested_label(SecondStage::Npt).unwrap();
        assert!(npt.starts_with("AMD NPT inside QEMU TCG — software-emulated hardware"), "{npt}");
        // TCG keeps the order of the MMUs, not the size of their ratios
        // (docs/nested.md): the label must not promise hardware's ratios.
        assert!(npt.contains("compress the distances"), "{npt}");
        assert!(!npt.contains("follow hardware"), "{npt}");
        let shadow = tcg("kvm_amd").nested_label(SecondStage::HostShadow).unwrap();
        assert!(shadow.starts_with("KVM shadow MMU (npt=0) inside QEMU TCG"), "{shadow}");
        // DMI alone identifies QEMU when the CPUID leaf is absent.
        let dmi_only = HostIdentity { hypervisor_signature: None, hypervisor: None, ..tcg("kvm_amd") };
        assert!(dmi_only.nested_label(SecondStage::Npt).unwrap().contains("inside QEMU TCG"));
        // A KVM guest with nested EPT is nested, but not TCG.
        let kvm = HostIdentity {
            hypervisor_signature: Some("KVMKVMKVM".into()),
            hypervisor: hypervisor_name("KVMKVMKVM\0\0\0"),
            dmi_sys_vendor: Some("QEMU".into()),
            dmi_product_name: None,
            kvm_module: Some("kvm_intel"),
        };
        assert_eq!(
            kvm.nested_label(SecondStage::Ept).unwrap(),
            "Intel EPT inside a KVM guest — nested virtualisation: times include the outer hypervisor's exits"
        );
        // Bare metal, and the PVM host: no nested label.
        assert_eq!(HostIdentity::default().nested_label(SecondStage::Npt), None);
        assert_eq!(tcg("kvm_pvm").nested_label(SecondStage::Pvm), None);
    }
}
