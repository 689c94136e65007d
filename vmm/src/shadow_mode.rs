//! Shadow mode in the VMM: the `shadow` crate's MMU wired to KVM.
//!
//! - The page-table zone is a `KVM_MEM_READONLY` slot, so every guest
//!   page-table write exits as an MMIO write: [`ShadowState::pte_write`]
//!   applies it to guest RAM and lets the MMU update or zap what derives
//!   from it.
//! - The shadow tables live in the shadow pool, a VMM-private slot above
//!   RAM (`ept::MemoryMap`).
//! - `LOAD_CR3` points the vCPU's CR3 at the shadow root
//!   (`KVM_SET_SREGS`); `SHADOW_FAULT` resolves hidden faults; `FLUSH_TLB`
//!   re-reads the paging controls.
//! - **Paging controls** (`shadow::mmu`, "Paging controls"): the vCPU
//!   runs with CR0.WP = 1 and, when the guest's CPUID has NX, EFER.NXE = 1
//!   whatever the guest set, as KVM does under shadow paging; the guest's
//!   own WP comes with `FLUSH_TLB(cr0, efer)`, its own NXE with
//!   `FLUSH_TLB` or, when it clears NXE with `wrmsr`, from the vCPU's EFER
//!   at the next shadow hypercall ([`ShadowState::note_vcpu_efer`]). 1 GiB
//!   pages and MAXPHYADDR follow the CPUID the guest was given.
//! - **Only trapped tables** (`shadow::mmu` invariant 6): the page-table
//!   zone and the VMM's boot tables (a read-only slot of their own in
//!   shadow mode) may hold guest paging structures; `LOAD_CR3` of a root
//!   elsewhere answers `ERR_FAULT`, and an entry pointing at a table
//!   elsewhere is a reserved-bit `#PF`.
//! - **Host coherence** (DESIGN.md event 5, HOST.md): before the guest runs
//!   again after a change that removed or restricted a shadow mapping, the
//!   VMM makes the host forget — on a host whose KVM shadows page tables by
//!   deleting and re-adding the pool's memslot, on an EPT/NPT host by
//!   reloading CR3 (a TLB flush). Counted and timed.
//! - **The pool is guest-writable** (the trust model of `shadow::mmu`): the
//!   vCPU must be able to walk the pool, so it is guest-physical memory, and
//!   nothing traps a guest's own `mov cr3` to tables that map it. So the
//!   MMU keeps its truth in VMM memory and only ever *writes* the pool, and
//!   the pool's slot logs dirty pages (`KVM_MEM_LOG_DIRTY_PAGES`): at every
//!   shadow hypercall, and before the slot is re-registered, the VMM asks
//!   KVM which pool pages the guest wrote ([`ShadowState::check_pool`]) and
//!   rewrites each that differs from the VMM's copy, then makes the host
//!   forget. A guest that scribbles over the pool and comes back through
//!   `LOAD_CR3` finds exactly the shadow its own tables imply. (A read-only
//!   pool slot would be simpler, but with EPT A/D bits on, Intel CPUs treat
//!   guest page-table reads as writes — SDM vol. 3C §29.3.5 — so the vCPU
//!   could not walk it.)

use ept::memmap::SlotSpec;
use guest_abi::hypercall as hc;
use serde::Serialize;
use shadow::{FaultOutcome, GuestPhys, PagingMode, ShadowError, ShadowMmu, ShadowStats, TableFrames};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A window of guest-physical memory as the shadow MMU sees it: words
/// read and written through `vm-memory`, and only `[start, end)` counted as
/// memory. Guest RAM is `[0, ram)`; the shadow pool is its own slot.
pub struct MemWindow<'a> {
    /// The memory behind the window.
    pub mem: &'a GuestMemoryMmap,
    /// First GPA inside.
    pub start: u64,
    /// One past the last GPA inside.
    pub end: u64,
}

impl<'a> MemWindow<'a> {
    /// Guest RAM, `[0, ram)`.
    pub fn ram(mem: &'a GuestMemoryMmap, ram: u64) -> Self {
        MemWindow { mem, start: 0, end: ram }
    }

    /// Whether the page at `gpa` lies inside the window.
    pub fn is_ram_page(&self, gpa: u64) -> bool {
        self.is_ram(gpa & !0xfff, 4096)
    }
}

impl GuestPhys for MemWindow<'_> {
    fn read_u64(&self, gpa: u64) -> u64 {
        self.mem.read_obj(GuestAddress(gpa)).unwrap_or(0)
    }
    fn write_u64(&mut self, gpa: u64, value: u64) {
        let _ = self.mem.write_obj(value, GuestAddress(gpa));
    }
    fn is_ram(&self, gpa: u64, len: u64) -> bool {
        gpa >= self.start && gpa.checked_add(len).is_some_and(|e| e <= self.end)
    }
}

/// What shadow mode needs to know of the CPU the guest was given (its
/// CPUID, as set with `KVM_SET_CPUID2`).
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

/// Set A in every present entry of the page tables in `[start, end)`, and
/// D in every large-page leaf. The VMM's boot tables sit in a read-only
/// slot in shadow mode, where the vCPU cannot set A/D itself (measured on
/// `kvm_pvm`: the bits stay clear, and the shadow MMU shadows only entries
/// with A set, so the first `LOAD_CR3` would find nothing to shadow).
pub fn preset_accessed(mem: &GuestMemoryMmap, (start, end): (u64, u64)) {
    use shadow::walker::{A, D, P, PS};
    for gpa in (start..end).step_by(8) {
        let Ok(e) = mem.read_obj::<u64>(GuestAddress(gpa)) else { continue };
        if e & P != 0 {
            let v = e | A | if e & PS != 0 { D } else { 0 };
            let _ = mem.write_obj(v, GuestAddress(gpa));
        }
    }
}

/// An empty pool: what a fresh MMU's first zap touches (nothing).
struct NoPool;

impl GuestPhys for NoPool {
    fn read_u64(&self, _: u64) -> u64 {
        0
    }
    fn write_u64(&mut self, _: u64, _: u64) {}
    fn is_ram(&self, _: u64, _: u64) -> bool {
        false
    }
}

/// How the host is made to forget stale shadow translations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Coherence {
    /// Delete and re-add the pool's memslot (hosts whose KVM shadows page
    /// tables: PVM, or KVM with ept=0/npt=0).
    ReregisterPoolSlot,
    /// Reload CR3 (EPT/NPT hosts: the hardware re-walks the tables).
    ReloadCr3,
}

impl std::fmt::Display for Coherence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Coherence::ReregisterPoolSlot => "re-register the pool memslot",
            Coherence::ReloadCr3 => "reload CR3",
        })
    }
}

/// Time spent in each handler, and how often.
#[derive(Debug, Default, Clone, Serialize)]
pub struct HandlerTimes {
    /// `SHADOW_FAULT` handling.
    #[serde(rename = "fault_ns", serialize_with = "ept::json::ns")]
    pub fault: Duration,
    /// Page-table write traps.
    #[serde(rename = "pte_write_ns", serialize_with = "ept::json::ns")]
    pub pte_write: Duration,
    /// `LOAD_CR3` handling (including `KVM_SET_SREGS`).
    #[serde(rename = "load_cr3_ns", serialize_with = "ept::json::ns")]
    pub load_cr3: Duration,
    /// Host invalidations.
    #[serde(rename = "invalidate_ns", serialize_with = "ept::json::ns")]
    pub invalidate: Duration,
    /// Reading the pool's dirty log and repairing guest-written pool pages.
    pub pool_check: Duration,
    /// How many times the dirty log was read.
    pub pool_checks: u64,
}

impl HandlerTimes {
    /// Time in all handlers.
    pub fn total(&self) -> Duration {
        self.fault + self.pte_write + self.load_cr3 + self.invalidate + self.pool_check
    }
}

/// The shadow-mode report of one run.
#[derive(Debug, Clone, Serialize)]
pub struct ShadowReport {
    /// The MMU's counters.
    pub stats: ShadowStats,
    /// Time in each handler.
    pub times: HandlerTimes,
    /// The coherence strategy.
    pub coherence: Coherence,
    /// Pool size in pages.
    pub pool_pages: u32,
}

/// Shadow mode's state in a VM.
pub struct ShadowState {
    /// The MMU.
    pub mmu: ShadowMmu,
    /// The pool's memslot.
    pub pool_slot: SlotSpec,
    /// The pool's host address.
    pub pool_hva: u64,
    /// The coherence strategy.
    pub coherence: Coherence,
    /// Handler times.
    pub times: HandlerTimes,
    /// MAXPHYADDR of the vCPU.
    pub maxphyaddr: u8,
    /// The guest's own CR0.WP. In shadow mode the vCPU always runs with
    /// CR0.WP = 1, as KVM's shadow MMU does (mmu.rst, `role.cr0_wp`): with
    /// WP = 0 the CPU would let supervisor writes through read-only shadow
    /// leaves and the VMM could not emulate the D bit. The guest's WP = 0
    /// is emulated in the shadow instead (writable, supervisor-only
    /// leaves), and the guest reports its CR0 with `FLUSH_TLB(cr0)`.
    pub guest_wp: bool,
    /// Warnings about `SHADOW_FAULT`s that could not be handled (bounded).
    pub warnings: crate::limits::Limited,
    /// The guest's own EFER.NXE. When the guest's CPUID has NX the vCPU
    /// always runs with NXE = 1 (`force_nx`), as KVM does under shadow
    /// paging: shadow leaves can then carry XD of their own (CR0.WP = 0
    /// with SMEP), and every fetch fault says so in its error code (with
    /// NXE = 0 and SMEP = 0 it would look like a read: SDM vol. 3 §4.7).
    pub guest_nxe: bool,
    /// Whether the vCPU's EFER.NXE is forced on (the guest's CPUID has NX).
    pub force_nx: bool,
    /// 1 GiB pages in the guest's CPUID (0x80000001 EDX bit 26).
    pub pdpe1gb: bool,
    /// An AMD vendor in the guest's CPUID.
    pub amd: bool,
    pool_pages: u32,
}

impl ShadowState {
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
}

/// The RFLAGS whose AC the walk of `SHADOW_FAULT(cr2, error_code, rflags)`
/// uses: the faulting context's, when the guest passed it (RFLAGS bit 1 is
/// always set, so 0 means "not given"), else the vCPU's now.
pub fn fault_rflags(passed: u64, vcpu_now: u64) -> u64 {
    if passed != 0 { passed } else { vcpu_now }
}

/// CR0.WP.
pub const CR0_WP: u64 = 1 << 16;
/// EFER.NXE.
pub const EFER_NXE: u64 = 1 << 11;

/// What exception delivery touches, as guest-virtual addresses in the
/// vCPU's registers: the IDT, GDT and TSS bases, RIP and RSP. The shadow
/// MMU prefills their PML4 slots before the rest of the kernel half
/// (`ShadowMmu::set_prefill_hints`), so a pool too small for the whole
/// kernel half still leaves the guest able to take a fault.
pub fn fault_path_gvas(sregs: &kvm_bindings::kvm_sregs, regs: &kvm_bindings::kvm_regs) -> [u64; 5] {
    [sregs.idt.base, sregs.gdt.base, sregs.tr.base, regs.rip, regs.rsp]
}

/// The paging controls from the vCPU's system registers (1 GiB pages
/// assumed: the caller knows the guest's CPUID).
pub fn paging_mode(sregs: &kvm_bindings::kvm_sregs, rflags: u64, maxphyaddr: u8) -> PagingMode {
    PagingMode {
        wp: sregs.cr0 & (1 << 16) != 0,
        nxe: sregs.efer & EFER_NXE != 0,
        smep: sregs.cr4 & (1 << 20) != 0,
        smap: sregs.cr4 & (1 << 21) != 0,
        ac: rflags & (1 << 18) != 0,
        maxphyaddr,
        // Not registers: the caller sets them from the guest's CPUID.
        pdpe1gb: true,
        amd: false,
    }
}

impl ShadowState {
    /// Shadow mode over the pool slot `pool_slot`, for a guest with these
    /// CPU facts, whose page tables may live in `tables` only.
    pub fn new(
        pool_slot: SlotSpec,
        pool_hva: u64,
        coherence: Coherence,
        cpu: GuestCpu,
        tables: TableFrames,
    ) -> ShadowState {
        let pages = (pool_slot.len / 4096) as u32;
        let mode =
            PagingMode { maxphyaddr: cpu.maxphyaddr, pdpe1gb: cpu.pdpe1gb, amd: cpu.amd, ..PagingMode::default() };
        let mut mmu = ShadowMmu::new(pool_slot.gpa, pages, mode);
        mmu.set_table_frames(&mut NoPool, tables);
        ShadowState {
            mmu,
            pool_slot,
            pool_hva,
            coherence,
            times: HandlerTimes::default(),
            maxphyaddr: cpu.maxphyaddr,
            guest_wp: true,
            warnings: crate::limits::Limited::new(
                "warnings about SHADOW_FAULTs the VMM could not handle",
                crate::limits::MAX_WARNINGS,
            ),
            guest_nxe: true,
            force_nx: cpu.nx,
            pdpe1gb: cpu.pdpe1gb,
            amd: cpu.amd,
            pool_pages: pages,
        }
    }

    /// The shadow pool as a window over its memory.
    pub fn pool<'a>(&self, mem: &'a GuestMemoryMmap) -> MemWindow<'a> {
        MemWindow { mem, start: self.pool_slot.gpa, end: self.pool_slot.gpa + self.pool_slot.len }
    }

    /// The report for `--stats`.
    pub fn report(&self) -> ShadowReport {
        ShadowReport {
            stats: self.mmu.stats(),
            times: self.times.clone(),
            coherence: self.coherence,
            pool_pages: self.pool_pages,
        }
    }

    /// Ask KVM which pool pages the guest wrote since the last call (the
    /// slot's dirty log; reading it clears it) and rewrite every one that
    /// differs from the MMU's copy. Returns the number of pages repaired;
    /// a repair leaves the host stale, so the caller invalidates before the
    /// guest runs again (as after any change).
    pub fn check_pool(&mut self, vm: &kvm_ioctls::VmFd, mem: &GuestMemoryMmap) -> Result<u64, kvm_ioctls::Error> {
        let t = Instant::now();
        let bitmap = vm.get_dirty_log(self.pool_slot.slot, self.pool_slot.len as usize)?;
        let dirty = bitmap
            .iter()
            .enumerate()
            .flat_map(|(w, &bits)| (0..64u64).filter(move |b| bits & (1 << b) != 0).map(move |b| w as u64 * 64 + b));
        let mut pool = self.pool(mem);
        let repaired = self.mmu.repair_pool_pages(&mut pool, dirty);
        if repaired > 0 {
            log::debug!("the guest wrote {repaired} shadow pool page(s); rewritten from the VMM's copy");
        }
        self.times.pool_check += t.elapsed();
        self.times.pool_checks += 1;
        Ok(repaired)
    }

    /// `SHADOW_FAULT(cr2, error_code)` → the hypercall result, or the
    /// MMU's verdict that the guest cannot go on (a livelock, or an access
    /// shadow paging cannot emulate: `shadow::mmu`'s module doc).
    pub fn fault(
        &mut self,
        ram: &mut MemWindow<'_>,
        pool: &mut MemWindow<'_>,
        cr2: u64,
        error_code: u64,
        mode: PagingMode,
    ) -> Result<u64, ShadowError> {
        let t = Instant::now();
        // The controls as of this exit (sync regs): a guest that changed
        // EFER.NXE or CR4 without FLUSH_TLB gets a rebuilt shadow here
        // instead of a hidden fault that repeats forever.
        self.mmu.set_mode(pool, ram, mode);
        let r = match self.mmu.handle_fault(pool, ram, cr2, error_code as u32) {
            Ok(FaultOutcome::Fixed) => hc::FAULT_FIXED,
            Ok(FaultOutcome::GuestFault(ec)) => hc::FAULT_GUEST | ec as u64,
            Err(e @ (ShadowError::PoolTooSmall | ShadowError::Livelock { .. })) => {
                self.times.fault += t.elapsed();
                return Err(e);
            }
            Err(e) => {
                // Bounded: a guest can send this before its first LOAD_CR3
                // as often as it likes.
                if self.warnings.allow() {
                    log::warn!("SHADOW_FAULT({cr2:#x}, {error_code:#x}) failed: {e}");
                }
                hc::ERR_UNAVAILABLE
            }
        };
        self.times.fault += t.elapsed();
        Ok(r)
    }

    /// A guest write of `data` to page-table GPA `gpa`.
    pub fn pte_write(&mut self, ram: &mut MemWindow<'_>, pool: &mut MemWindow<'_>, gpa: u64, data: &[u8]) {
        let t = Instant::now();
        if ram.mem.write_slice(data, GuestAddress(gpa)).is_ok() {
            self.mmu.pte_written(pool, ram, gpa, data.len() as u64);
        }
        self.times.pte_write += t.elapsed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(cpu: GuestCpu) -> ShadowState {
        let slot =
            SlotSpec { slot: 3, gpa: 2 << 30, len: 64 << 12, readonly: false, kind: ept::RegionKind::ShadowPool };
        ShadowState::new(slot, 0, Coherence::ReloadCr3, cpu, TableFrames::ALL)
    }

    #[test]
    fn smap_checks_the_ac_of_the_faulting_context() {
        const AC: u64 = 1 << 18;
        let sh = state(GuestCpu { maxphyaddr: 48, nx: true, pdpe1gb: false, amd: false });
        let sregs = kvm_bindings::kvm_sregs { cr4: 1 << 21, efer: EFER_NXE, ..Default::default() };
        // The handler cleared AC on entry; the faulting access had it set.
        let rflags = fault_rflags(0x2 | AC, 0x2);
        assert!(sh.guest_mode(&sregs, rflags).ac);
        // An older guest that passes nothing: the vCPU's AC.
        assert!(!sh.guest_mode(&sregs, fault_rflags(0, 0x2)).ac);
        assert!(sh.guest_mode(&sregs, fault_rflags(0, 0x2 | AC)).ac);
    }

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
