//! Shadow mode in the VMM: the `shadow` crate's MMU wired to KVM.
//!
//! - The page-table zone is a `KVM_MEM_READONLY` slot from the guest's
//!   first `LOAD_CR3` on (nothing is shadowed before: the guest builds its
//!   own tables first, untrapped), so every guest page-table write after it
//!   exits as an MMIO write: [`ShadowState::pte_write`] applies it to guest
//!   RAM and lets the MMU update or zap what derives from it.
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
//! - **Host coherence** (docs/architecture.md, "Shadow mode" event 5; docs/host.md): before the guest runs
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

use crate::error::Error;
use crate::explain::Explanation;
use crate::mmu::{GuestCpu, Machine, MmuBackend, MmuCounters, kvm_err, paging_mode};
use crate::stats::ExitReason;
use ept::memmap::{GpaRange, SlotSpec};
use guest_abi::hypercall as hc;
use guest_abi::paging::{CR0_WP, CR4_PGE, EFER_NXE};
use guest_abi::{Gpa, Gva, Hva};
use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::SyncReg;
use serde::Serialize;
use shadow::{FaultOutcome, GuestPhys, PagingMode, ShadowError, ShadowMmu, ShadowStats, TableFrames};
use std::time::{Duration, Instant};
use vm_memory::volatile_memory::VolatileArrayRef;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, VolatileMemory};

/// A window of guest-physical memory as the shadow MMU sees it: only
/// `[start, end)` counts as memory. Guest RAM is `[0, ram)`; the shadow
/// pool is its own slot.
///
/// Page-table entries are read and written as 8-byte words through a
/// `vm-memory` [`VolatileArrayRef`] over the window's host mapping, made
/// once per window: each access is an index check and one volatile load
/// or store, where `Bytes::read_obj` would look the region up and copy
/// through the generic slice path per entry (83 % of a root rebuild's time
/// before). The view is bounds-checked and needs no `unsafe` here;
/// anything it does not cover (an unaligned address, a window that spans
/// several regions) takes the `Bytes` path.
pub struct MemWindow<'a> {
    mem: &'a GuestMemoryMmap,
    start: u64,
    end: u64,
    /// The window as 8-byte words, word 0 at `start`, when the window lies
    /// in one region.
    words: Option<VolatileArrayRef<'a, u64, ()>>,
}

impl<'a> MemWindow<'a> {
    /// `[start, end)` of `mem`.
    pub fn new(mem: &'a GuestMemoryMmap, start: Gpa, end: Gpa) -> Self {
        let (start, end) = (start.raw(), end.raw());
        let words = (|| {
            let region = mem.find_region(GuestAddress(start))?;
            let offset = usize::try_from(start.checked_sub(region.start_addr().raw_value())?).ok()?;
            let n = usize::try_from(end.checked_sub(start)? / 8).ok()?;
            let mapping: &'a vm_memory::MmapRegion = region;
            mapping.get_array_ref::<u64>(offset, n).ok()
        })();
        MemWindow { mem, start, end, words }
    }

    /// Guest RAM, `[0, ram)`.
    pub fn ram(mem: &'a GuestMemoryMmap, ram: u64) -> Self {
        Self::new(mem, Gpa(0), Gpa(ram))
    }

    /// The memory behind the window.
    pub fn memory(&self) -> &'a GuestMemoryMmap {
        self.mem
    }

    /// Whether the page at `gpa` lies inside the window.
    pub fn is_ram_page(&self, gpa: Gpa) -> bool {
        let gpa = gpa.raw();
        self.is_ram(Gpa(gpa & !0xfff), 4096)
    }

    /// The index of the word at `gpa` in the fast view, if it has one.
    #[inline]
    fn word(&self, gpa: u64) -> Option<(&VolatileArrayRef<'a, u64, ()>, usize)> {
        let words = self.words.as_ref()?;
        let off = gpa.checked_sub(self.start)?;
        let index = usize::try_from(off / 8).ok()?;
        (off % 8 == 0 && index < words.len()).then_some((words, index))
    }
}

impl GuestPhys for MemWindow<'_> {
    #[inline]
    fn read_u64(&self, gpa: Gpa) -> u64 {
        let gpa = gpa.raw();
        match self.word(gpa) {
            Some((words, i)) => words.load(i),
            None => self.mem.read_obj(GuestAddress(gpa)).unwrap_or(0),
        }
    }
    #[inline]
    fn write_u64(&mut self, gpa: Gpa, value: u64) {
        let gpa = gpa.raw();
        match self.word(gpa) {
            Some((words, i)) => words.store(i, value),
            None => {
                let _ = self.mem.write_obj(value, GuestAddress(gpa));
            }
        }
    }
    fn is_ram(&self, gpa: Gpa, len: u64) -> bool {
        let gpa = gpa.raw();
        gpa >= self.start && gpa.checked_add(len).is_some_and(|e| e <= self.end)
    }
}

/// Set A in every present entry of the page tables in `[start, end)`, and
/// D in every large-page leaf. The VMM's boot tables sit in a read-only
/// slot in shadow mode, where the vCPU cannot set A/D itself (measured on
/// `kvm_pvm`: the bits stay clear, and the shadow MMU shadows only entries
/// with A set, so the first `LOAD_CR3` would find nothing to shadow).
pub fn preset_accessed(mem: &GuestMemoryMmap, tables: GpaRange) {
    use guest_abi::paging::{A, D, P, PS};
    for gpa in (tables.start.raw()..tables.end.raw()).step_by(8) {
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
    fn read_u64(&self, _: Gpa) -> u64 {
        0
    }
    fn write_u64(&mut self, _: Gpa, _: u64) {}
    fn is_ram(&self, _: Gpa, _: u64) -> bool {
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
    /// pv mode: applying write-queue batches.
    #[serde(rename = "batch_ns", serialize_with = "ept::json::ns")]
    pub batch: Duration,
    /// How many times the dirty log was read.
    pub pool_checks: u64,
}

impl HandlerTimes {
    /// Time in all handlers.
    pub fn total(&self) -> Duration {
        self.fault + self.pte_write + self.load_cr3 + self.invalidate + self.pool_check + self.batch
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
    /// pv mode.
    pub pv: bool,
    /// pv mode: batches refused (a bad entry or queue length).
    pub pv_refused: u64,
}

/// Shadow mode's state in a VM: the [`MmuBackend`] of `--mmu shadow`.
/// Everything in it is private: the run loop reaches it only through the
/// backend's methods.
pub struct ShadowState {
    /// The MMU.
    mmu: ShadowMmu,
    /// The pool's memslot.
    pool_slot: SlotSpec,
    /// The pool's host address.
    pool_hva: Hva,
    /// The coherence strategy.
    coherence: Coherence,
    /// Handler times.
    times: HandlerTimes,
    /// MAXPHYADDR of the vCPU.
    maxphyaddr: u8,
    /// The guest's own CR0.WP. In shadow mode the vCPU always runs with
    /// CR0.WP = 1, as KVM's shadow MMU does (mmu.rst, `role.cr0_wp`): with
    /// WP = 0 the CPU would let supervisor writes through read-only shadow
    /// leaves and the VMM could not emulate the D bit. The guest's WP = 0
    /// is emulated in the shadow instead (writable, supervisor-only
    /// leaves), and the guest reports its CR0 with `FLUSH_TLB(cr0)`.
    guest_wp: bool,
    /// Warnings about `SHADOW_FAULT`s that could not be handled (bounded).
    warnings: crate::limits::Limited,
    /// The guest's own EFER.NXE. When the guest's CPUID has NX the vCPU
    /// always runs with NXE = 1 (`force_nx`), as KVM does under shadow
    /// paging: shadow leaves can then carry XD of their own (CR0.WP = 0
    /// with SMEP), and every fetch fault says so in its error code (with
    /// NXE = 0 and SMEP = 0 it would look like a read: SDM vol. 3 §4.7).
    guest_nxe: bool,
    /// Whether the vCPU's EFER.NXE is forced on (the guest's CPUID has NX).
    force_nx: bool,
    /// 1 GiB pages in the guest's CPUID (0x80000001 EDX bit 26).
    pdpe1gb: bool,
    /// An AMD vendor in the guest's CPUID.
    amd: bool,
    pool_pages: u32,
    /// Read the pool's dirty log at every shadow hypercall (shadow mode),
    /// or only at `LOAD_CR3` (pv mode: `pv_mode`, "Trust").
    check_pool_always: bool,
    /// The boot tables' and the zone's slots are read-only (from the first
    /// `LOAD_CR3` on).
    boot_tables_locked: bool,
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

/// What exception delivery touches, as guest-virtual addresses in the
/// vCPU's registers: the IDT, GDT and TSS bases, RIP and RSP. The shadow
/// MMU prefills their PML4 slots before the rest of the kernel half
/// (`ShadowMmu::set_prefill_hints`), so a pool too small for the whole
/// kernel half still leaves the guest able to take a fault.
pub fn fault_path_gvas(sregs: &kvm_bindings::kvm_sregs, regs: &kvm_bindings::kvm_regs) -> [Gva; 5] {
    [sregs.idt.base, sregs.gdt.base, sregs.tr.base, regs.rip, regs.rsp].map(Gva)
}

impl ShadowState {
    /// Shadow mode over the pool slot `pool_slot`, for a guest with these
    /// CPU facts, whose page tables may live in `tables` only.
    pub fn new(
        pool_slot: SlotSpec,
        pool_hva: Hva,
        coherence: Coherence,
        cpu: GuestCpu,
        tables: TableFrames,
    ) -> ShadowState {
        let pages = (pool_slot.len / 4096) as u32;
        let mode =
            PagingMode { maxphyaddr: cpu.maxphyaddr, pdpe1gb: cpu.pdpe1gb, amd: cpu.amd, ..PagingMode::default() };
        let mut mmu = ShadowMmu::new(pool_slot.gpa, pages, mode);
        mmu.set_table_frames(&mut NoPool, tables);
        // Tearing down an address space that is not loaded, or evicting a
        // root, needs no host invalidation until such a root is loaded.
        mmu.set_defer_unreachable(true);
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
            check_pool_always: true,
            boot_tables_locked: false,
        }
    }

    /// The bounded warnings about `SHADOW_FAULT`s (for tests of the bound).
    pub fn fault_warnings(&self) -> &crate::limits::Limited {
        &self.warnings
    }

    /// The shadow pool as a window over its memory.
    pub fn pool<'a>(&self, mem: &'a GuestMemoryMmap) -> MemWindow<'a> {
        MemWindow::new(mem, self.pool_slot.gpa, Gpa(self.pool_slot.gpa.raw() + self.pool_slot.len))
    }

    /// The report for `--stats`.
    pub fn shadow_report(&self) -> ShadowReport {
        ShadowReport {
            stats: self.mmu.stats(),
            times: self.times.clone(),
            coherence: self.coherence,
            pool_pages: self.pool_pages,
            pv: false,
            pv_refused: 0,
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
    pub fn handle_fault(
        &mut self,
        ram: &mut MemWindow<'_>,
        pool: &mut MemWindow<'_>,
        cr2: Gva,
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
    pub fn pte_write(&mut self, ram: &mut MemWindow<'_>, pool: &mut MemWindow<'_>, gpa: Gpa, data: &[u8]) {
        let t = Instant::now();
        if ram.memory().write_slice(data, GuestAddress(gpa.raw())).is_ok() {
            self.mmu.pte_written(pool, ram, gpa, data.len() as u64);
        }
        self.times.pte_write += t.elapsed();
    }
}

impl ShadowState {
    /// Shadow mode for the VM in `m`, whose boot tables are written:
    /// the pool is the map's shadow-pool slot, guest paging structures may
    /// live in the page-table zone `pt_zone` and the boot tables only, and
    /// the coherence strategy follows the host probe.
    pub fn create(m: &mut Machine, pt_zone: GpaRange) -> crate::Result<ShadowState> {
        let pool = m.map.shadow_pool().ok_or(Error::MemoryMapInconsistent("shadow mode without a shadow pool"))?;
        let slot = *m.map.slot_of(pool.start).ok_or(Error::MemoryMapInconsistent("the shadow pool has no memslot"))?;
        let hva = m.ram.hva(&m.map, pool.start).ok_or(Error::MemoryMapInconsistent("the shadow pool is not mapped"))?;
        let coherence = if ept::probe::second_stage().host_shadows_page_tables() {
            Coherence::ReregisterPoolSlot
        } else {
            Coherence::ReloadCr3
        };
        preset_accessed(m.ram.memory(), crate::layout::BOOT_TABLES);
        // Until the first LOAD_CR3 the vCPU walks the boot tables itself,
        // and an AMD CPU's nested walk treats guest page-table accesses as
        // writes (AMD APM vol. 2 §15.25.10), which a read-only slot turns
        // into an exit KVM cannot complete (measured on the nested NPT
        // host: a triple fault at the first instruction). So they stay
        // writable until the first LOAD_CR3 — nothing is shadowed from them
        // before — and trap from then on ([`ShadowState::lock_boot_tables`]).
        // So does the page-table zone: the guest builds its own tables
        // (the direct map of all RAM) before its first LOAD_CR3, and those
        // writes need no trap (issue 22, item 6).
        set_table_slots_readonly(m, false)?;
        // The paging controls are read at every SHADOW_FAULT: have KVM
        // copy the system registers out at each exit instead of paying a
        // KVM_GET_SREGS ioctl per fault.
        m.vcpu.set_sync_valid_reg(SyncReg::SystemRegister);
        // Guest paging structures may live where writes trap: the
        // page-table zone and the VMM's boot tables.
        let boot = crate::layout::BOOT_TABLES;
        let tables = TableFrames::new(&[(pt_zone.start, pt_zone.end), (boot.start, boot.end)]);
        Ok(ShadowState::new(slot, hva, coherence, m.cpu, tables))
    }

    /// pv mode's backend (`pv_mode`) builds on this one: the MMU, the
    /// handler times, and the dirty-log policy.
    pub(crate) fn mmu_mut(&mut self) -> &mut ShadowMmu {
        &mut self.mmu
    }

    /// The MMU, read-only.
    pub(crate) fn mmu(&self) -> &ShadowMmu {
        &self.mmu
    }

    /// The handler times.
    pub(crate) fn times_mut(&mut self) -> &mut HandlerTimes {
        &mut self.times
    }

    /// How the host is made to forget.
    pub(crate) fn coherence(&self) -> Coherence {
        self.coherence
    }

    /// Read the pool's dirty log only at `LOAD_CR3` (pv mode).
    pub(crate) fn check_pool_at_load_cr3_only(&mut self) {
        self.check_pool_always = false;
    }

    /// Point the vCPU at the current shadow root (see `enter_root`).
    pub(crate) fn point_vcpu(&self, m: &mut Machine) -> crate::Result<()> {
        let sregs = m.sregs()?;
        self.enter_root(m, sregs)
    }

    /// The error for a pool that cannot hold what the guest needs.
    pub(crate) fn pool_too_small(&self, cr3: u64) -> Error {
        self.pool_exhausted(Gpa(cr3))
    }

    /// Warnings budget (bounded).
    pub(crate) fn warn_allowed(&mut self) -> bool {
        self.warnings.allow()
    }

    /// Guest RAM and the pool, as the MMU's two windows.
    pub(crate) fn windows<'a>(&self, m: &'a Machine) -> (MemWindow<'a>, MemWindow<'a>) {
        let pool_mem = m.ram.pool().expect("shadow mode has a pool");
        (MemWindow::ram(m.ram.memory(), m.memory), self.pool(pool_mem))
    }

    /// At each shadow hypercall, first: repair what the guest wrote to the
    /// pool through tables of its own, and tell the MMU what fault delivery
    /// touches now.
    fn enter_hypercall(&mut self, m: &Machine, regs: &kvm_regs, load_cr3: bool) -> crate::Result<()> {
        if self.check_pool_always || load_cr3 {
            let pool_mem = m.ram.pool().expect("shadow mode has a pool");
            self.check_pool(&m.vm, pool_mem).map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
        }
        self.mmu.set_prefill_hints(&fault_path_gvas(&m.sync_sregs(), regs));
        Ok(())
    }

    /// Point the vCPU at the current shadow root with shadow mode's
    /// controls (CR0.WP and, when forced, EFER.NXE set): `sregs` as read
    /// from the vCPU, written back with one `KVM_SET_SREGS`. KVM resets
    /// the vCPU's MMU context (a TLB flush) on `KVM_SET_SREGS` only when
    /// CR3 or a paging control changes (`__set_sregs_common`,
    /// `mmu_reset_needed`); writing the values it already has changes
    /// nothing — which is why host coherence toggles CR4.PGE
    /// ([`Coherence::ReloadCr3`]) rather than rewriting CR3.
    fn enter_root(&self, m: &mut Machine, sregs: kvm_sregs) -> crate::Result<()> {
        let mut sregs = self.vcpu_sregs(sregs);
        if let Some(root) = self.mmu.current_root() {
            sregs.cr3 = root.gpa().raw();
        }
        m.set_sregs(&sregs)
    }

    fn pool_exhausted(&self, cr3: Gpa) -> Error {
        Error::ShadowPoolExhausted { pool: self.pool_slot.len, cr3: cr3.raw() }
    }

    /// If a shadow mapping was removed or restricted, make the host forget
    /// its copy (the module doc, "Host coherence").
    fn restore_host_coherence(&mut self, m: &mut Machine) -> crate::Result<()> {
        if !self.mmu.host_stale() {
            return Ok(());
        }
        let t = Instant::now();
        match self.coherence {
            Coherence::ReregisterPoolSlot => {
                // Deleting the slot drops its dirty log: collect it first.
                let pool_mem = m.ram.pool().expect("shadow mode has a pool");
                self.check_pool(&m.vm, pool_mem).map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
                let mut region = kvm_bindings::kvm_userspace_memory_region {
                    slot: self.pool_slot.slot,
                    flags: self.pool_slot.kvm_flags(),
                    guest_phys_addr: self.pool_slot.gpa.raw(),
                    memory_size: 0,
                    userspace_addr: self.pool_hva.raw(),
                };
                // SAFETY: deleting the pool slot, then adding it back over
                // the same host mapping, which the GuestRam keeps alive.
                unsafe { m.vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
                region.memory_size = self.pool_slot.len;
                // SAFETY: as above.
                unsafe { m.vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
            }
            Coherence::ReloadCr3 => {
                // KVM flushes the guest TLB on KVM_SET_SREGS only when a
                // paging control really changes: toggle CR4.PGE and back
                // (a PGE change flushes everything, global entries too).
                let sregs = m.sregs()?;
                let toggled = kvm_sregs { cr4: sregs.cr4 ^ CR4_PGE, ..sregs };
                m.set_sregs(&toggled)?;
                m.set_sregs(&sregs)?;
            }
        }
        self.mmu.host_invalidated();
        self.times.invalidate += t.elapsed();
        Ok(())
    }
}

/// Register the memslots where guest page tables trap — the VMM's boot
/// tables and, in shadow mode, the page-table zone — read-only (their
/// steady state: `ept::memmap`) or writable (until the first `LOAD_CR3`,
/// when nothing is shadowed yet).
fn set_table_slots_readonly(m: &mut Machine, readonly: bool) -> crate::Result<()> {
    let trapping: Vec<_> =
        m.map.slots.iter().filter(|s| s.readonly && s.kind == ept::RegionKind::PageTables).copied().collect();
    for slot in trapping {
        let hva = m.ram.hva(&m.map, slot.gpa).ok_or(Error::MemoryMapInconsistent("a page-table slot is not mapped"))?;
        let flags = if readonly { slot.kvm_flags() } else { slot.kvm_flags() & !kvm_bindings::KVM_MEM_READONLY };
        let mut region = kvm_bindings::kvm_userspace_memory_region {
            slot: slot.slot,
            flags,
            guest_phys_addr: slot.gpa.raw(),
            memory_size: 0,
            userspace_addr: hva.raw(),
        };
        // SAFETY: deleting a page-table slot and adding it back over the
        // same host mapping, which the GuestRam keeps alive; only the
        // read-only flag changes (KVM needs a delete to change it).
        unsafe { m.vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        region.memory_size = slot.len;
        // SAFETY: as above.
        unsafe { m.vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

impl ShadowState {
    /// At the first `LOAD_CR3`: the boot tables and the page-table zone
    /// trap from now on (see `create`), before anything is shadowed from
    /// them.
    fn lock_boot_tables(&mut self, m: &mut Machine) -> crate::Result<()> {
        if !self.boot_tables_locked {
            set_table_slots_readonly(m, true)?;
            self.boot_tables_locked = true;
        }
        Ok(())
    }
}

impl MmuBackend for ShadowState {
    fn load_cr3(&mut self, m: &mut Machine, root: Gpa, regs: &kvm_regs) -> crate::Result<u64> {
        self.lock_boot_tables(m)?;
        self.enter_hypercall(m, regs, true)?;
        let t = Instant::now();
        let sregs = m.sregs()?;
        let result = {
            let (mut ram, mut pool) = self.windows(m);
            if !ram.is_ram_page(root) {
                return Ok(hc::ERR_FAULT);
            }
            self.note_vcpu_efer(sregs.efer);
            let mode = self.guest_mode(&sregs, regs.rflags);
            self.mmu.set_mode(&mut pool, &mut ram, mode);
            self.mmu.load_cr3(&mut pool, &mut ram, root)
        };
        match result {
            Ok(_) => {}
            Err(ShadowError::PoolTooSmall) => return Err(self.pool_exhausted(root)),
            Err(e) => {
                // A root outside the page-table zone (its changes would not
                // trap: shadow::mmu invariant 6) is the guest's mistake;
                // anything else is logged (bounded). Either way the guest
                // stays on its old root, which a rule change above may have
                // rebuilt elsewhere.
                let answer = if let ShadowError::RootNotTrapped(_) = e {
                    hc::ERR_FAULT
                } else {
                    if m.warnings.allow() {
                        log::warn!("LOAD_CR3({root:#x}) failed: {e}");
                    }
                    hc::ERR_UNAVAILABLE
                };
                if self.mmu.current_root().is_some() {
                    self.enter_root(m, sregs)?;
                }
                return Ok(answer);
            }
        }
        self.enter_root(m, sregs)?;
        self.times.load_cr3 += t.elapsed();
        Ok(hc::OK)
    }

    fn fault(&mut self, m: &mut Machine, cr2: Gva, error_code: u64, regs: &kvm_regs) -> crate::Result<u64> {
        self.enter_hypercall(m, regs, false)?;
        let root_before = self.mmu.current_root();
        let vcpu_sregs = m.sync_sregs();
        if self.note_vcpu_efer(vcpu_sregs.efer) {
            // The guest cleared EFER.NXE since the last exit: this error
            // code cannot tell a fetch from a read. Give the vCPU its NXE
            // back and let the access retry.
            let sregs = m.sregs()?;
            let mode = self.guest_mode(&sregs, regs.rflags);
            let (mut ram, mut pool) = self.windows(m);
            self.mmu.set_mode(&mut pool, &mut ram, mode);
            self.enter_root(m, sregs)?;
            return Ok(hc::FAULT_FIXED);
        }
        // SMAP checks the faulting context's RFLAGS.AC (passed in rcx), not
        // the handler's.
        let mode = self.guest_mode(&vcpu_sregs, fault_rflags(regs.rcx, regs.rflags));
        let result = {
            let pool_mem = m.ram.pool().expect("shadow mode has a pool");
            let mut ram = MemWindow::ram(m.ram.memory(), m.memory);
            let mut pool = self.pool(pool_mem);
            self.handle_fault(&mut ram, &mut pool, cr2, error_code, mode)
        };
        let result = result.map_err(|e| match e {
            ShadowError::PoolTooSmall => self.pool_exhausted(self.mmu.guest_cr3().unwrap_or_default()),
            e => Error::ShadowMmu(e, regs.rip),
        })?;
        // Pool exhaustion zaps everything and may rebuild the root in
        // another pool page: the vCPU must follow it.
        if self.mmu.current_root().is_some() && self.mmu.current_root() != root_before {
            self.enter_root(m, m.sregs()?)?;
        }
        Ok(result)
    }

    fn flush(&mut self, m: &mut Machine, cr0: u64, efer: u64, regs: &kvm_regs) -> crate::Result<u64> {
        self.enter_hypercall(m, regs, false)?;
        // The guest may have changed CR0.WP, EFER.NXE or CR4: a new rule
        // set rebuilds the shadow at a new root, which the vCPU is pointed
        // at (a CR3 change: KVM flushes). Otherwise there is nothing to
        // flush: the shadow follows every trapped write, and what a write
        // restricted the host forgets before re-entry (host coherence).
        // FLUSH_TLB(cr0, efer): the guest's CR0 and EFER
        // after it changed paging controls (0: unchanged). Its WP and NXE
        // are the guest's own; the vCPU keeps WP = 1 and NXE = 1 (see
        // `guest_wp`, `guest_nxe`).
        let sregs = m.sregs()?;
        self.note_vcpu_efer(sregs.efer);
        self.note_guest_controls(cr0, efer);
        let mode = self.guest_mode(&sregs, regs.rflags);
        let (mut ram, mut pool) = self.windows(m);
        self.mmu.set_mode(&mut pool, &mut ram, mode);
        self.mmu.flush();
        self.enter_root(m, sregs)?;
        Ok(hc::OK)
    }

    fn mmio_write(&mut self, m: &mut Machine, gpa: Gpa, data: &[u8]) -> Option<ExitReason> {
        let trapped = m.map.slot_of(gpa).is_some_and(|s| s.readonly && s.kind == ept::RegionKind::PageTables);
        if !trapped {
            return None;
        }
        let (mut ram, mut pool) = self.windows(m);
        self.pte_write(&mut ram, &mut pool, gpa, data);
        Some(ExitReason::PageTableWrite)
    }

    fn before_entry(&mut self, m: &mut Machine) -> crate::Result<()> {
        self.restore_host_coherence(m)
    }

    fn guest_paging_mode(&self, sregs: &kvm_sregs, rflags: u64) -> PagingMode {
        self.guest_mode(sregs, rflags)
    }

    fn guest_root(&self, vcpu_cr3: u64) -> Gpa {
        // The vCPU's CR3 is the shadow root once the guest has loaded one;
        // the guest's own root is the one the shadow MMU shadows.
        // (Before the first LOAD_CR3 the vCPU still runs on the guest's
        // own boot tables: its CR3 is then the guest's root.)
        self.mmu.guest_cr3().unwrap_or(Gpa(vcpu_cr3))
    }

    fn explain(&self, m: &Machine, e: &mut Explanation) {
        if let Some(pool_mem) = m.ram.pool() {
            let pool = self.pool(pool_mem);
            e.shadow_root = self.mmu.current_root();
            e.shadow_leaf = self.mmu.shadow_leaf(&pool, e.gva);
        }
    }

    fn counters(&self) -> Option<MmuCounters> {
        Some(MmuCounters { shadow: self.mmu.stats(), handler_time: self.times.total() })
    }

    fn report(&self) -> Option<ShadowReport> {
        Some(self.shadow_report())
    }

    fn warnings_suppressed(&self) -> u64 {
        self.warnings.suppressed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_reads_and_writes_words_through_its_view_and_nothing_outside() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x10_0000), 0x4000)]).unwrap();
        let mut w = MemWindow::new(&mem, Gpa(0x10_0000), Gpa(0x10_4000));
        assert!(w.words.is_some(), "one region: the fast view is used");
        w.write_u64(Gpa(0x10_0008), 0x1122_3344_5566_7788);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x10_0008)).unwrap(), 0x1122_3344_5566_7788);
        assert_eq!(w.read_u64(Gpa(0x10_0008)), 0x1122_3344_5566_7788);
        w.write_u64(Gpa(0x10_3ff8), 7);
        assert_eq!(w.read_u64(Gpa(0x10_3ff8)), 7);
        // Unaligned: the Bytes path, same bytes.
        assert_eq!(w.read_u64(Gpa(0x10_000c)), 0x1122_3344);
        // Outside the memory: reads 0, writes vanish, no panic.
        assert_eq!(w.read_u64(Gpa(0x10_4000)), 0);
        w.write_u64(Gpa(0x10_4000), 1);
        assert_eq!(w.read_u64(Gpa(0x0ff8)), 0);
        // A window larger than its region has no fast view but still works.
        let w = MemWindow::new(&mem, Gpa(0x10_0000), Gpa(0x10_8000));
        assert!(w.words.is_none());
        assert_eq!(w.read_u64(Gpa(0x10_3ff8)), 7);
    }

    fn state(cpu: GuestCpu) -> ShadowState {
        let slot =
            SlotSpec { slot: 3, gpa: Gpa(2 << 30), len: 64 << 12, readonly: false, kind: ept::RegionKind::ShadowPool };
        ShadowState::new(slot, Hva(0), Coherence::ReloadCr3, cpu, TableFrames::ALL)
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
