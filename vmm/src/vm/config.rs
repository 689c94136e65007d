//! What a VM is made from: the kernel source, the sizes, the MMU mode
//! ([`VmConfig`]), and the checks of the memory size against the layout.
//! Nothing here touches KVM; a configuration is checked before anything is
//! built (`vm::builder`).

use crate::boot::layout::{self, MAX_MEMORY, MIN_MEMORY};
use crate::error::{Error, Result};
use ept::Backing;
use guest_abi::MmuMode;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The kernel bundled into this binary by `build.rs`.
pub static BUNDLED_KERNEL: &[u8] = include_bytes!(env!("GUEST_KERNEL_ELF"));

/// Where the guest kernel comes from.
#[derive(Debug, Clone)]
pub enum KernelSource {
    /// The kernel built from `guest/kernel` and embedded in the binary.
    Bundled,
    /// An ELF file.
    File(PathBuf),
}

/// Everything needed to create and run a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The guest kernel.
    pub kernel: KernelSource,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// MMU virtualisation mode.
    pub mmu: MmuMode,
    /// What backs guest RAM.
    pub backing: Backing,
    /// Size of the shadow pool (shadow mode only).
    pub shadow_pool: u64,
    /// Guest command line.
    pub cmdline: String,
    /// Wall-clock limit for the run.
    pub timeout: Duration,
    /// When the process started (for the setup-time statistic).
    pub process_start: Instant,
    /// Number of vCPUs, `1..=guest_abi::MAX_CPUS` (more than one: ept
    /// mode only, with the in-kernel irqchip).
    pub vcpus: u32,
}

impl VmConfig {
    /// The bundled kernel on `memory` bytes of 4 KiB-backed RAM in `mmu`
    /// mode, with the CLI's defaults for everything else (16 MiB shadow
    /// pool, no command line, a 60 s timeout, one vCPU); change fields as
    /// needed.
    pub fn bundled(memory: u64, mmu: MmuMode) -> VmConfig {
        VmConfig {
            kernel: KernelSource::Bundled,
            memory,
            mmu,
            backing: Backing::Anon4k,
            shadow_pool: 16 << 20,
            cmdline: String::new(),
            timeout: Duration::from_secs(60),
            process_start: Instant::now(),
            vcpus: 1,
        }
    }
}

/// Check the memory size against the layout.
pub fn check_memory_size(memory: u64) -> Result<()> {
    if memory < MIN_MEMORY {
        return Err(Error::MemoryTooSmall(memory, MIN_MEMORY));
    }
    if memory > MAX_MEMORY {
        return Err(Error::MemoryTooLarge(memory, MAX_MEMORY));
    }
    if !memory.is_multiple_of(layout::LARGE_PAGE_SIZE) {
        return Err(Error::MemoryUnaligned(memory));
    }
    Ok(())
}

/// Whether mode `mmu` runs several vCPUs (every mode since issue 18).
pub fn smp_supported(mmu: MmuMode) -> bool {
    matches!(mmu, MmuMode::Ept | MmuMode::Shadow | MmuMode::Pv)
}

/// Check a vCPU count against the limits and the MMU mode: 1 to
/// `guest_abi::MAX_CPUS`, and one unless the mode runs several
/// ([`smp_supported`]).
pub fn check_vcpus(vcpus: u32, mmu: MmuMode) -> Result<()> {
    if vcpus == 0 || vcpus > guest_abi::MAX_CPUS {
        return Err(Error::BadVcpuCount(vcpus));
    }
    if vcpus > 1 && !smp_supported(mmu) {
        return Err(Error::SmpUnsupported { mode: mmu.name(), vcpus });
    }
    Ok(())
}
