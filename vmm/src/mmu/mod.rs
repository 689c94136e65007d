//! The seam between the run loop and an MMU mode, and the types every mode
//! shares.
//!
//! The run loop (`vm::run`) knows nothing of how guest memory is virtualised:
//! it calls an [`MmuBackend`] at the events where the modes differ —
//!
//! | event | method |
//! | --- | --- |
//! | a hypercall the mode owns (first refusal) | [`MmuBackend::hypercall`] |
//! | `LOAD_CR3` | [`MmuBackend::load_cr3`] |
//! | `SHADOW_FAULT` (a fault report) | [`MmuBackend::fault`] |
//! | `FLUSH_TLB` | [`MmuBackend::flush`] |
//! | an MMIO write (first refusal: trapped page-table writes) | [`MmuBackend::mmio_write`] |
//! | host coherence before the guest runs again | [`MmuBackend::before_entry`] |
//! | other vCPUs an exit's MMU change must reach (SMP) | [`MmuBackend::after_exit`] |
//! | the VM's other vCPUs and their handles (SMP) | [`MmuBackend::add_vcpus`] |
//! | the guest's paging controls and root, for explain and tools | [`MmuBackend::guest_paging_mode`], [`MmuBackend::guest_root`] |
//! | explain's view of the mode's own tables | [`MmuBackend::explain`] |
//! | bench snapshots and the end-of-run report | [`MmuBackend::counters`], [`MmuBackend::report`] |
//!
//! — and every mode is one implementation, a leaf module that depends on
//! this seam and never the reverse: [`ept::EptBackend`] (the vCPU walks the
//! guest's tables; nothing to do), [`shadow::ShadowBackend`] (shadow
//! tables in the VMM), [`pv::PvBackend`] (the same shadow MMU, with the
//! guest's write queue and published roots). A new mode adds a backend and
//! a case to the builder's `create_backend` (`vm::builder`); the run loop
//! does not change. A backend with hypercalls of its own takes them in
//! [`MmuBackend::hypercall`], which sees every hypercall before the VMM's
//! table does, and claims MMIO writes (a page-table zone of its own, a
//! shared page) in [`MmuBackend::mmio_write`].
//!
//! **Per-VM and per-vCPU state.** A backend method receives the two halves
//! of the machine separately: [`VmContext`] is per-VM (the VM file
//! descriptor, guest RAM, the memory map, the memory size, the guest's CPU
//! facts, the warning budget) and [`VcpuContext`] is per-vCPU (the vCPU
//! file descriptor and its index). The backend object itself (`self`) is
//! the mode's VM-wide state (shadow tables, pool, handler times). State
//! that is architecturally per-vCPU (the current root, the guest's CR0.WP
//! and EFER.NXE) is kept per vCPU index by the shadow backend (its
//! module doc, "SMP"). With several vCPUs the VM half is taken
//! exclusively (`&mut`) by one vCPU thread at a time, as `self` is: the
//! VM's lock (`vm::run::Shared`) is the MMU lock.
//!
//! Neutral types: [`window::MemWindow`] (guest-physical memory as the
//! shadow MMU reads it), [`report`] (the end-of-run report, handler times,
//! the coherence strategy), [`MmuCounters`], [`GuestCpu`], and
//! [`explain`] (the translation chain of one address, over any backend).
//!
//! Trust: the guest controls everything a backend reads from guest RAM
//! and every hypercall argument; the backends validate them (their module
//! docs). The contexts' fields are private to this module tree: the rest
//! of the VMM reads them through accessors.

pub mod ept;
pub mod explain;
pub mod pv;
pub mod report;
pub mod shadow;
pub mod vcpu_handle;
pub mod window;

use crate::error::{Error, Result, kvm_err};
use crate::limits::Limited;
use ::ept::GuestRam;
use ::ept::memmap::MemoryMap;
use ::shadow::PagingMode;
use explain::Explanation;
use guest_abi::hypercall as hc;
use guest_abi::{Gpa, Gva, MmuMode};
use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::{VcpuFd, VmFd};
use report::ShadowReport;
use std::time::Duration;

/// Per-VM: what a backend may touch of the VM at an exit — the VM, guest
/// memory and the memory map, the guest's CPU facts, the warning budget.
pub struct VmContext {
    /// The VM.
    fd: VmFd,
    /// Guest RAM (and the VMM-private regions such as the shadow pool).
    ram: GuestRam,
    /// The guest-physical memory map.
    map: MemoryMap,
    /// Guest RAM size in bytes (`[0, memory)` is RAM).
    memory: u64,
    /// What the guest's CPUID says.
    cpu: GuestCpu,
    /// Warnings about refused guest requests (bounded; shared by the VMM
    /// and the backend).
    warnings: Limited,
}

impl VmContext {
    /// The VM `fd` with its memory `ram` laid out by `map` (`memory` bytes
    /// of RAM), for a guest with CPU facts `cpu`.
    pub fn new(fd: VmFd, ram: GuestRam, map: MemoryMap, memory: u64, cpu: GuestCpu) -> VmContext {
        let warnings = Limited::new("warnings about refused shadow-MMU requests", crate::limits::MAX_WARNINGS);
        VmContext { fd, ram, map, memory, cpu, warnings }
    }

    /// Guest RAM and the VMM-private regions.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The guest-physical memory map.
    pub fn map(&self) -> &MemoryMap {
        &self.map
    }

    /// What the guest's CPUID says.
    pub fn cpu(&self) -> GuestCpu {
        self.cpu
    }

    /// Guest RAM size in bytes.
    pub fn memory(&self) -> u64 {
        self.memory
    }

    /// The bounded warnings about refused guest requests.
    pub fn warnings(&mut self) -> &mut Limited {
        &mut self.warnings
    }
}

/// Per-vCPU: what a backend may touch of one vCPU — its file descriptor
/// and its index.
pub struct VcpuContext {
    fd: VcpuFd,
    index: u32,
}

impl VcpuContext {
    /// vCPU number `index` of its VM.
    pub fn new(fd: VcpuFd, index: u32) -> VcpuContext {
        VcpuContext { fd, index }
    }

    /// The vCPU's index in its VM (0: the boot vCPU).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The vCPU's file descriptor.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The vCPU's file descriptor, mutably (`KVM_RUN`, the sync-regs area).
    pub fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// The vCPU's system registers (`KVM_GET_SREGS`).
    pub fn sregs(&self) -> Result<kvm_sregs> {
        self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))
    }

    /// Set the vCPU's system registers (`KVM_SET_SREGS`).
    pub fn set_sregs(&self, sregs: &kvm_sregs) -> Result<()> {
        self.fd.set_sregs(sregs).map_err(kvm_err("KVM_SET_SREGS"))
    }

    /// The general registers as of this exit (the sync-regs area).
    pub fn regs(&self) -> kvm_regs {
        self.fd.sync_regs().regs
    }

    /// The system registers as of this exit (the sync-regs area; valid
    /// only when the backend asked KVM to copy them out).
    pub fn sync_sregs(&self) -> kvm_sregs {
        self.fd.sync_regs().sregs
    }
}

/// A backend's counters at one moment (for bench phases).
#[derive(Debug, Clone, Copy)]
pub struct MmuCounters {
    /// The shadow MMU's counters.
    pub shadow: ::shadow::ShadowStats,
    /// VMM time in the backend's handlers.
    pub handler_time: Duration,
}

/// One MMU mode, as the run loop sees it. Every method has the ept
/// answer as its default except the ones every mode must state.
pub trait MmuBackend: Send {
    /// Hypercall `nr` with the vCPU's registers `regs`: `Some(result)` when
    /// the backend owns `nr` (it sees every hypercall before the VMM's
    /// table); `None` leaves it to the table.
    fn hypercall(
        &mut self,
        _vm: &mut VmContext,
        _vcpu: &mut VcpuContext,
        _nr: u32,
        _regs: &kvm_regs,
    ) -> Result<Option<u64>> {
        Ok(None)
    }

    /// `LOAD_CR3(root)`: the guest switches to the tables at `root`.
    fn load_cr3(&mut self, _vm: &mut VmContext, _vcpu: &mut VcpuContext, _root: Gpa, _regs: &kvm_regs) -> Result<u64> {
        Ok(hc::ERR_UNAVAILABLE)
    }

    /// `SHADOW_FAULT(cr2, error_code)`: a `#PF` reached the guest.
    fn fault(
        &mut self,
        _vm: &mut VmContext,
        _vcpu: &mut VcpuContext,
        _cr2: Gva,
        _error_code: u64,
        _regs: &kvm_regs,
    ) -> Result<u64> {
        Ok(hc::ERR_UNAVAILABLE)
    }

    /// `FLUSH_TLB(cr0, efer)`: the guest flushed its TLB, perhaps after
    /// changing its paging controls (0: unchanged).
    fn flush(
        &mut self,
        _vm: &mut VmContext,
        _vcpu: &mut VcpuContext,
        _cr0: u64,
        _efer: u64,
        _regs: &kvm_regs,
    ) -> Result<u64> {
        Ok(hc::ERR_UNAVAILABLE)
    }

    /// An MMIO write of `data` at `gpa`: `true` when the backend handled
    /// it (a trapped guest page-table write, counted as such), `false` to
    /// leave it to the VMM (a write to unbacked memory, ignored).
    fn mmio_write(&mut self, _vm: &mut VmContext, _vcpu: &mut VcpuContext, _gpa: Gpa, _data: &[u8]) -> bool {
        false
    }

    /// Just before the guest runs again (`KVM_RUN`): make the host forget
    /// what the handlers made stale.
    fn before_entry(&mut self, _vm: &mut VmContext, _vcpu: &mut VcpuContext) -> Result<()> {
        Ok(())
    }

    /// After every exit of `vcpu` was handled (still under the VM's lock):
    /// the other vCPUs an MMU change must reach before `vcpu` runs again
    /// are stopped (shadow and pv mode on SMP: `mmu::vcpu_handle`, "MMU
    /// requests").
    fn after_exit(&mut self, _vm: &mut VmContext, _vcpu: &mut VcpuContext) -> Result<()> {
        Ok(())
    }

    /// A VM of several vCPUs: the application processors `aps` (not
    /// started yet) and every vCPU's handle, by index (vCPU 0's included),
    /// for the MMU's remote flushes.
    fn add_vcpus(
        &mut self,
        _vm: &VmContext,
        _aps: &mut [&mut VcpuContext],
        _handles: std::sync::Arc<[crate::mmu::vcpu_handle::VcpuHandle]>,
    ) -> Result<()> {
        Ok(())
    }

    /// The paging controls the guest believes in, from the vCPU's
    /// registers.
    fn guest_paging_mode(&self, sregs: &kvm_sregs, rflags: u64) -> PagingMode;

    /// The root of the guest's own page tables, given the vCPU's CR3.
    fn guest_root(&self, vcpu_cr3: u64) -> Gpa {
        Gpa(vcpu_cr3)
    }

    /// Add this mode's own view of `e.gva` (its tables) to an explanation.
    fn explain(&self, _vm: &VmContext, _e: &mut Explanation) {}

    /// The counters now (bench phases take the difference of two).
    fn counters(&self) -> Option<MmuCounters> {
        None
    }

    /// The end-of-run report of this mode (`--stats`).
    fn report(&self) -> Option<ShadowReport> {
        None
    }

    /// Warnings this backend did not print (past its bound).
    fn warnings_suppressed(&self) -> u64 {
        0
    }
}

/// The smallest shadow pool for `memory` bytes of RAM: 10 pages for the
/// roots, the kernel window and a few user paths, plus one page directory
/// per GiB of direct map (the kernel half is shadowed eagerly, and fault
/// delivery depends on it).
pub fn min_shadow_pool(memory: u64) -> u64 {
    (10 + memory.div_ceil(crate::boot::layout::GIB)) * crate::boot::layout::PAGE_SIZE
}

/// The largest shadow pool (`--shadow-pool`): 1 GiB, 262,144 shadow
/// pages — far beyond what any workload here keeps in use (the pool is
/// zapped and rebuilt when full, so a larger one only delays that), and
/// small enough that what the host keeps per pool page stays small: KVM's
/// per-memslot metadata and the pool's dirty bitmap, read at every shadow
/// hypercall (32 KiB at the maximum). The VMM's own bookkeeping costs what
/// the pages in use cost, whatever the size (`shadow::mmu`).
pub const MAX_SHADOW_POOL: u64 = crate::boot::layout::GIB;

/// The shadow pool when `--shadow-pool` is not given.
pub const DEFAULT_SHADOW_POOL: u64 = 16 << 20;

/// Check a configuration's mode-specific sizes before anything is built.
pub fn check_config(mmu: MmuMode, memory: u64, shadow_pool: u64) -> Result<()> {
    match mmu {
        MmuMode::Shadow | MmuMode::Pv if shadow_pool < min_shadow_pool(memory) => {
            Err(Error::ShadowPoolTooSmall(shadow_pool, memory, min_shadow_pool(memory)))
        }
        MmuMode::Shadow | MmuMode::Pv if shadow_pool > MAX_SHADOW_POOL => {
            Err(Error::ShadowPoolTooLarge(shadow_pool, MAX_SHADOW_POOL))
        }
        _ => Ok(()),
    }
}

/// The size of the VMM-private shadow pool region mode `mmu` needs in the
/// memory map (0: none).
pub fn shadow_pool_size(mmu: MmuMode, shadow_pool: u64) -> u64 {
    match mmu {
        MmuMode::Shadow | MmuMode::Pv => shadow_pool,
        MmuMode::Ept => 0,
    }
}

/// What the VMM needs to know of the CPU the guest was given (its CPUID,
/// as set with `KVM_SET_CPUID2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestCpu {
    /// MAXPHYADDR (0x80000008 EAX[7:0]).
    pub maxphyaddr: u8,
    /// NX (0x80000001 EDX bit 20).
    pub nx: bool,
    /// 1 GiB pages (0x80000001 EDX bit 26).
    pub pdpe1gb: bool,
    /// The vendor is AMD or Hygon (leaf 0): PML4E bit 8 is reserved.
    pub amd: bool,
}

impl GuestCpu {
    /// The facts from CPUID entries `(function, eax, ebx, ecx, edx)`.
    pub fn from_cpuid(entries: impl Iterator<Item = (u32, u32, u32, u32, u32)>) -> GuestCpu {
        let mut cpu = GuestCpu { maxphyaddr: 36, nx: false, pdpe1gb: false, amd: false };
        for (function, eax, ebx, ecx, edx) in entries {
            match function {
                0 => {
                    let mut vendor = [0u8; 12];
                    vendor[..4].copy_from_slice(&ebx.to_le_bytes());
                    vendor[4..8].copy_from_slice(&edx.to_le_bytes());
                    vendor[8..].copy_from_slice(&ecx.to_le_bytes());
                    cpu.amd = &vendor == b"AuthenticAMD" || &vendor == b"HygonGenuine";
                }
                0x8000_0001 => {
                    cpu.nx = edx & (1 << 20) != 0;
                    cpu.pdpe1gb = edx & (1 << 26) != 0;
                }
                0x8000_0008 => cpu.maxphyaddr = (eax & 0xff) as u8,
                _ => {}
            }
        }
        cpu
    }
}

/// The paging controls from the vCPU's system registers (1 GiB pages
/// assumed: the caller knows the guest's CPUID).
pub fn paging_mode(sregs: &kvm_sregs, rflags: u64, maxphyaddr: u8) -> PagingMode {
    use guest_abi::paging::{CR0_WP, CR4_SMAP, CR4_SMEP, EFER_NXE, RFLAGS_AC};
    PagingMode {
        wp: sregs.cr0 & CR0_WP != 0,
        nxe: sregs.efer & EFER_NXE != 0,
        smep: sregs.cr4 & CR4_SMEP != 0,
        smap: sregs.cr4 & CR4_SMAP != 0,
        ac: rflags & RFLAGS_AC != 0,
        maxphyaddr,
        // Not registers: the caller sets them from the guest's CPUID.
        pdpe1gb: true,
        amd: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_cpu_comes_from_the_cpuid_the_guest_was_given() {
        // This host's KVM_GET_SUPPORTED_CPUID: NX, no 1 GiB pages, 48 bits.
        let amd = (0, 0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65); // "AuthenticAMD"
        let cpu = GuestCpu::from_cpuid(
            [amd, (0x8000_0001, 0, 0, 0, 0x23d3_fbff), (0x8000_0008, 0x3030, 0, 0, 0)].into_iter(),
        );
        assert_eq!(cpu, GuestCpu { maxphyaddr: 48, nx: true, pdpe1gb: false, amd: true });
        let intel = (0, 0x16, 0x756e_6547, 0x6c65_746e, 0x4965_6e69); // "GenuineIntel"
        let cpu = GuestCpu::from_cpuid([intel, (0x8000_0001, 0, 0, 0, 1 << 26)].into_iter());
        assert_eq!(cpu, GuestCpu { maxphyaddr: 36, nx: false, pdpe1gb: true, amd: false });
    }
}
