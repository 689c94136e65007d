//! Shadow mode in the VMM: the `shadow` crate's MMU wired to KVM.
//!
//! - The page-table zone is a `KVM_MEM_READONLY` slot from the guest's
//!   first `LOAD_CR3` on (nothing is shadowed before: the guest builds its
//!   own tables first, untrapped), so every guest page-table write after it
//!   exits as an MMIO write: [`ShadowBackend::pte_write`] applies it to
//!   guest RAM and lets the MMU update or zap what derives from it.
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
//!   at the next shadow hypercall ([`ShadowBackend::note_vcpu_efer`]). 1 GiB
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
//!   KVM which pool pages the guest wrote ([`ShadowBackend::check_pool`]) and
//!   rewrites each that differs from the VMM's copy, then makes the host
//!   forget. A guest that scribbles over the pool and comes back through
//!   `LOAD_CR3` finds exactly the shadow its own tables imply. (A read-only
//!   pool slot would be simpler, but with EPT A/D bits on, Intel CPUs treat
//!   guest page-table reads as writes — SDM vol. 3C §29.3.5 — so the vCPU
//!   could not walk it.)

//!
//! - **SMP** (docs/shadow.md, "SMP"; the module doc of `shadow::mmu`,
//!   "SMP"): one `ShadowMmu` per VM, and the VM's lock
//!   (`vm::run::Shared`, held for every exit and every entry's work) is
//!   the MMU lock. What is architecturally per vCPU — its `ShadowVcpu`
//!   (current root, paging mode, last fixed fault) and the guest's own
//!   CR0.WP and EFER.NXE — is kept per vCPU index: the acting vCPU's
//!   state is in the backend's working fields while it acts
//!   ([`ShadowBackend::activate`] swaps it in at every seam call), the
//!   others' wait parked. Every vCPU is registered with the MMU when the
//!   VM is built (`add_vcpus`), so shadow ids are vCPU indexes. After
//!   every exit (`after_exit`) and every entry's work, the vCPUs the MMU
//!   names in `flush_requests` are stopped — kicked out of `KVM_RUN` and
//!   waited for, or asked to do it at their next entry
//!   (`mmu::vcpu_handle`, "MMU requests") — before the acting vCPU resumes;
//!   each then does its entry work (`prepare_entry`: a root obsolete after
//!   a zap of everything rebuilt, its flush done) before it runs guest
//!   code. Host coherence with several vCPUs: on an EPT/NPT host a vCPU's
//!   own flush (CR4.PGE toggled) is `vcpu_flushed`; where the host shadows
//!   page tables the pool's memslot is re-registered — a VM-wide
//!   invalidation, done only with every other vCPU out of guest mode (a
//!   vCPU must not walk the pool while its slot is briefly gone) — and is
//!   `host_invalidated`. The MMU's remote-flush hook stops vCPUs the same
//!   way.
//!
//! Files: this one holds the backend's state, its construction and the
//! seam's events; [`controls`] emulates the guest's paging controls;
//! `coherence` keeps the host coherent and the pool honest. It depends on
//! the seam, and only `pv` depends on it.

mod coherence;
pub mod controls;

use crate::boot::layout::BOOT_TABLES;
use crate::error::Error;
use crate::mmu::explain::Explanation;
use crate::mmu::report::{Coherence, HandlerTimes, ShadowReport};
use crate::mmu::vcpu_handle::VcpuHandle;
use crate::mmu::window::MemWindow;
use crate::mmu::{GuestCpu, MmuBackend, MmuCounters, VcpuContext, VmContext};
use coherence::set_table_slots_readonly;
use controls::fault_rflags;
use ept::memmap::{GpaRange, SlotSpec};
use guest_abi::hypercall as hc;
use guest_abi::{Gpa, Gva};
use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::SyncReg;
use shadow::VcpuSet;
use shadow::{FaultOutcome, GuestPhys, PagingMode, ShadowError, ShadowMmu, ShadowVcpu, TableFrames};
use std::sync::Arc;
use std::time::Instant;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

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

/// A vCPU's shadow state while another vCPU acts (module doc, "SMP").
struct CpuState {
    sv: ShadowVcpu,
    guest_wp: bool,
    guest_nxe: bool,
}

/// Shadow mode's state in a VM: the [`MmuBackend`] of `--mmu shadow`.
/// Everything in it is private: the run loop reaches it only through the
/// backend's methods.
pub struct ShadowBackend {
    /// The MMU.
    mmu: ShadowMmu,
    /// The MMU's state of the acting vCPU (`active`; module doc, "SMP").
    vcpu: ShadowVcpu,
    /// The vCPU whose state is in `vcpu`, `guest_wp` and `guest_nxe`.
    active: u32,
    /// The other vCPUs' state, by index (`None` at `active`, and for every
    /// index when the VM has one vCPU).
    parked: Vec<Option<CpuState>>,
    /// Every vCPU's handle, by index, when the VM has several: for the
    /// kicks of remote flushes.
    handles: Option<Arc<[VcpuHandle]>>,
    /// The pool's memslot.
    pool_slot: SlotSpec,
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
    /// or only at `LOAD_CR3` (pv mode: `mmu::pv`, "Trust").
    check_pool_always: bool,
    /// The boot tables' and the zone's slots are read-only (from the first
    /// `LOAD_CR3` on).
    boot_tables_locked: bool,
    /// Times the vCPU was found with CR0.WP clear (`note_vcpu_wp`).
    wp_cleared_silently: u64,
}

impl ShadowBackend {
    /// Shadow mode over the pool slot `pool_slot`, for a guest with these
    /// CPU facts, whose page tables may live in `tables` only.
    pub fn new(pool_slot: SlotSpec, coherence: Coherence, cpu: GuestCpu, tables: TableFrames) -> ShadowBackend {
        let pages = (pool_slot.len / 4096) as u32;
        let mode =
            PagingMode { maxphyaddr: cpu.maxphyaddr, pdpe1gb: cpu.pdpe1gb, amd: cpu.amd, ..PagingMode::default() };
        let mut mmu = ShadowMmu::new(pool_slot.gpa, pages, mode);
        mmu.set_table_frames(&mut NoPool, tables);
        // Tearing down an address space that is not loaded, or evicting a
        // root, needs no host invalidation until such a root is loaded.
        mmu.set_defer_unreachable(true);
        ShadowBackend {
            vcpu: mmu.new_vcpu(),
            active: 0,
            parked: Vec::new(),
            handles: None,
            mmu,
            pool_slot,
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
            wp_cleared_silently: 0,
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
            wp_cleared_silently: self.wp_cleared_silently,
        }
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
        self.mmu.set_mode(&mut self.vcpu, pool, ram, mode);
        let r = match self.mmu.handle_fault(&mut self.vcpu, pool, ram, cr2, error_code as u32) {
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
            self.mmu.pte_written(&mut self.vcpu, pool, ram, gpa, data.len() as u64);
        }
        self.times.pte_write += t.elapsed();
    }
}

impl ShadowBackend {
    /// Shadow mode for the VM `vm` and its vCPU `vcpu`, whose boot tables
    /// are written:
    /// the pool is the map's shadow-pool slot, guest paging structures may
    /// live in the page-table zone `pt_zone` and the boot tables only, and
    /// the coherence strategy follows the host probe.
    pub fn create(vm: &VmContext, vcpu: &mut VcpuContext, pt_zone: GpaRange) -> crate::Result<ShadowBackend> {
        let pool = vm.map.shadow_pool().ok_or(Error::MemoryMapInconsistent("shadow mode without a shadow pool"))?;
        let slot = *vm.map.slot_of(pool.start).ok_or(Error::MemoryMapInconsistent("the shadow pool has no memslot"))?;
        vm.ram.hva(&vm.map, pool.start).ok_or(Error::MemoryMapInconsistent("the shadow pool is not mapped"))?;
        let coherence = if ept::probe::second_stage().host_shadows_page_tables() {
            Coherence::ReregisterPoolSlot
        } else {
            Coherence::ReloadCr3
        };
        preset_accessed(vm.ram.memory(), BOOT_TABLES);
        // Until the first LOAD_CR3 the vCPU walks the boot tables itself,
        // and an AMD CPU's nested walk treats guest page-table accesses as
        // writes (AMD APM vol. 2 §15.25.10), which a read-only slot turns
        // into an exit KVM cannot complete (measured on the nested NPT
        // host: a triple fault at the first instruction). So they stay
        // writable until the first LOAD_CR3 — nothing is shadowed from them
        // before — and trap from then on ([`ShadowBackend::lock_boot_tables`]).
        // So does the page-table zone: the guest builds its own tables
        // (the direct map of all RAM) before its first LOAD_CR3, and those
        // writes need no trap (issue 22, item 6).
        set_table_slots_readonly(vm, false)?;
        // The paging controls are read at every SHADOW_FAULT: have KVM
        // copy the system registers out at each exit instead of paying a
        // KVM_GET_SREGS ioctl per fault.
        vcpu.fd.set_sync_valid_reg(SyncReg::SystemRegister);
        // Guest paging structures may live where writes trap: the
        // page-table zone and the VMM's boot tables.
        let boot = BOOT_TABLES;
        let tables = TableFrames::new(&[(pt_zone.start, pt_zone.end), (boot.start, boot.end)]);
        Ok(ShadowBackend::new(slot, coherence, vm.cpu, tables))
    }

    /// pv mode's backend (`mmu::pv`) builds on this one: the MMU, the
    /// handler times, and the dirty-log policy.
    pub(crate) fn mmu_mut(&mut self) -> (&mut ShadowMmu, &mut ShadowVcpu) {
        (&mut self.mmu, &mut self.vcpu)
    }

    /// The MMU, read-only.
    pub(crate) fn mmu(&self) -> (&ShadowMmu, &ShadowVcpu) {
        (&self.mmu, &self.vcpu)
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
    pub(crate) fn point_vcpu(&self, vcpu: &VcpuContext) -> crate::Result<()> {
        let sregs = vcpu.sregs()?;
        self.enter_root(vcpu, sregs)
    }

    /// The error for a pool that cannot hold what the guest needs.
    pub(crate) fn pool_too_small(&self, cr3: u64) -> Error {
        self.pool_exhausted(Gpa(cr3))
    }

    /// Guest RAM and the pool, as the MMU's two windows.
    pub(crate) fn windows<'a>(&self, vm: &'a VmContext) -> (MemWindow<'a>, MemWindow<'a>) {
        let pool_mem = vm.ram.pool().expect("shadow mode has a pool");
        (MemWindow::ram(vm.ram.memory(), vm.memory), self.pool(pool_mem))
    }

    fn pool_exhausted(&self, cr3: Gpa) -> Error {
        Error::ShadowPoolExhausted { pool: self.pool_slot.len, cr3: cr3.raw() }
    }

    /// Make vCPU `index`'s state the working one (module doc, "SMP"): the
    /// caller holds the VM's lock and acts for that vCPU.
    pub(crate) fn activate(&mut self, index: u32) {
        if index == self.active {
            return;
        }
        let Some(next) = self.parked.get_mut(index as usize).and_then(Option::take) else { return };
        let prev = CpuState {
            sv: std::mem::replace(&mut self.vcpu, next.sv),
            guest_wp: std::mem::replace(&mut self.guest_wp, next.guest_wp),
            guest_nxe: std::mem::replace(&mut self.guest_nxe, next.guest_nxe),
        };
        self.parked[self.active as usize] = Some(prev);
        self.active = index;
    }

    /// Stop the vCPUs the MMU says must flush before the acting vCPU
    /// (`me`) runs again: kicked out of `KVM_RUN` and waited for, or asked
    /// to flush at their next entry; then they count as stopped with the
    /// flush owed (`ShadowMmu::vcpus_stopped`).
    fn stop_requested(&mut self, me: u32) {
        let Some(handles) = self.handles.as_ref() else { return };
        let ask = self.mmu.flush_requests().minus(VcpuSet::single(me as usize));
        if ask.is_empty() {
            return;
        }
        let ticket = self.mmu.flush_ticket();
        for id in ask.iter() {
            if let Some(h) = handles.get(id) {
                h.stop_for_mmu();
            }
        }
        self.mmu.vcpus_stopped(ask, ticket);
    }

    /// Stop every vCPU but `me` (a VM-wide invalidation must not run under
    /// a vCPU in guest mode: module doc, "SMP").
    fn stop_others(&self, me: u32) {
        for (i, h) in self.handles.iter().flat_map(|hs| hs.iter().enumerate()) {
            if i != me as usize {
                h.stop_for_mmu();
            }
        }
    }

    /// The acting vCPU flushes before it enters (`ticket` from
    /// `prepare_entry`): its own TLB on an EPT/NPT host, everyone's by the
    /// pool slot's re-registration where the host shadows page tables.
    fn flush_vcpu(&mut self, vm: &VmContext, vcpu: &VcpuContext, ticket: shadow::FlushTicket) -> crate::Result<()> {
        let t = Instant::now();
        match self.coherence {
            Coherence::ReregisterPoolSlot => {
                self.stop_others(vcpu.index());
                self.check_pool(vm).map_err(crate::error::kvm_err("KVM_GET_DIRTY_LOG"))?;
                vm.ram
                    .reregister(&vm.map, &vm.fd, &self.pool_slot, self.pool_slot.kvm_flags())
                    .map_err(crate::error::kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
                self.mmu.host_invalidated();
            }
            Coherence::ReloadCr3 => {
                coherence::flush_vcpu_tlb(vcpu)?;
                self.mmu.vcpu_flushed(vcpu.index() as usize, ticket);
            }
        }
        self.times.invalidate += t.elapsed();
        Ok(())
    }

    /// The entry work of a vCPU of several (module doc, "SMP").
    fn smp_entry(&mut self, vm: &VmContext, vcpu: &VcpuContext) -> crate::Result<()> {
        let work = {
            let (mut ram, mut pool) = self.windows(vm);
            self.mmu.prepare_entry(&mut self.vcpu, &mut pool, &mut ram)
        };
        let work = work.map_err(|e| match e {
            ShadowError::PoolTooSmall => self.pool_exhausted(self.mmu.guest_cr3(&self.vcpu).unwrap_or_default()),
            e => Error::ShadowMmu(e, vcpu.regs().rip),
        })?;
        if work.root.is_some() {
            self.point_vcpu(vcpu)?;
        }
        if let Some(ticket) = work.flush {
            self.flush_vcpu(vm, vcpu, ticket)?;
        }
        self.stop_requested(vcpu.index());
        Ok(())
    }
}

impl MmuBackend for ShadowBackend {
    fn load_cr3(
        &mut self,
        vm: &mut VmContext,
        vcpu: &mut VcpuContext,
        root: Gpa,
        regs: &kvm_regs,
    ) -> crate::Result<u64> {
        self.activate(vcpu.index());
        self.lock_boot_tables(vm)?;
        self.enter_hypercall(vm, vcpu, regs, true)?;
        let t = Instant::now();
        let sregs = vcpu.sregs()?;
        let result = {
            let (mut ram, mut pool) = self.windows(vm);
            if !ram.is_ram_page(root) {
                return Ok(hc::ERR_FAULT);
            }
            self.note_vcpu_efer(sregs.efer);
            let mode = self.guest_mode(&sregs, regs.rflags);
            self.mmu.set_mode(&mut self.vcpu, &mut pool, &mut ram, mode);
            self.mmu.load_cr3(&mut self.vcpu, &mut pool, &mut ram, root)
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
                    if vm.warnings.allow() {
                        log::warn!("LOAD_CR3({root:#x}) failed: {e}");
                    }
                    hc::ERR_UNAVAILABLE
                };
                if self.mmu.current_root(&self.vcpu).is_some() {
                    self.enter_root(vcpu, sregs)?;
                }
                return Ok(answer);
            }
        }
        self.enter_root(vcpu, sregs)?;
        self.times.load_cr3 += t.elapsed();
        Ok(hc::OK)
    }

    fn fault(
        &mut self,
        vm: &mut VmContext,
        vcpu: &mut VcpuContext,
        cr2: Gva,
        error_code: u64,
        regs: &kvm_regs,
    ) -> crate::Result<u64> {
        self.activate(vcpu.index());
        self.enter_hypercall(vm, vcpu, regs, false)?;
        let root_before = self.mmu.current_root(&self.vcpu);
        let vcpu_sregs = vcpu.sync_sregs();
        if self.note_vcpu_efer(vcpu_sregs.efer) {
            // The guest cleared EFER.NXE since the last exit: this error
            // code cannot tell a fetch from a read. Give the vCPU its NXE
            // back and let the access retry.
            let sregs = vcpu.sregs()?;
            let mode = self.guest_mode(&sregs, regs.rflags);
            let (mut ram, mut pool) = self.windows(vm);
            self.mmu.set_mode(&mut self.vcpu, &mut pool, &mut ram, mode);
            self.enter_root(vcpu, sregs)?;
            return Ok(hc::FAULT_FIXED);
        }
        // SMAP checks the faulting context's RFLAGS.AC (passed in rcx), not
        // the handler's.
        let mode = self.guest_mode(&vcpu_sregs, fault_rflags(regs.rcx, regs.rflags));
        let result = {
            let pool_mem = vm.ram.pool().expect("shadow mode has a pool");
            let mut ram = MemWindow::ram(vm.ram.memory(), vm.memory);
            let mut pool = self.pool(pool_mem);
            self.handle_fault(&mut ram, &mut pool, cr2, error_code, mode)
        };
        let result = result.map_err(|e| match e {
            ShadowError::PoolTooSmall => self.pool_exhausted(self.mmu.guest_cr3(&self.vcpu).unwrap_or_default()),
            e => Error::ShadowMmu(e, regs.rip),
        })?;
        // Pool exhaustion zaps everything and may rebuild the root in
        // another pool page: the vCPU must follow it.
        if self.mmu.current_root(&self.vcpu).is_some() && self.mmu.current_root(&self.vcpu) != root_before {
            self.enter_root(vcpu, vcpu.sregs()?)?;
        }
        Ok(result)
    }

    fn flush(
        &mut self,
        vm: &mut VmContext,
        vcpu: &mut VcpuContext,
        cr0: u64,
        efer: u64,
        regs: &kvm_regs,
    ) -> crate::Result<u64> {
        self.activate(vcpu.index());
        self.enter_hypercall(vm, vcpu, regs, false)?;
        // The guest may have changed CR0.WP, EFER.NXE or CR4: a new rule
        // set rebuilds the shadow at a new root, which the vCPU is pointed
        // at (a CR3 change: KVM flushes). Otherwise there is nothing to
        // flush: the shadow follows every trapped write, and what a write
        // restricted the host forgets before re-entry (host coherence).
        // FLUSH_TLB(cr0, efer): the guest's CR0 and EFER
        // after it changed paging controls (0: unchanged). Its WP and NXE
        // are the guest's own; the vCPU keeps WP = 1 and NXE = 1 (see
        // `guest_wp`, `guest_nxe`).
        let sregs = vcpu.sregs()?;
        self.note_vcpu_efer(sregs.efer);
        self.note_guest_controls(cr0, efer);
        let mode = self.guest_mode(&sregs, regs.rflags);
        let (mut ram, mut pool) = self.windows(vm);
        self.mmu.set_mode(&mut self.vcpu, &mut pool, &mut ram, mode);
        self.mmu.flush(&mut self.vcpu);
        self.enter_root(vcpu, sregs)?;
        Ok(hc::OK)
    }

    fn mmio_write(&mut self, vm: &mut VmContext, vcpu: &mut VcpuContext, gpa: Gpa, data: &[u8]) -> bool {
        let trapped = vm.map.slot_of(gpa).is_some_and(|s| s.readonly && s.kind == ept::RegionKind::PageTables);
        if !trapped {
            return false;
        }
        self.activate(vcpu.index());
        let (mut ram, mut pool) = self.windows(vm);
        self.pte_write(&mut ram, &mut pool, gpa, data);
        true
    }

    fn before_entry(&mut self, vm: &mut VmContext, vcpu: &mut VcpuContext) -> crate::Result<()> {
        self.activate(vcpu.index());
        let rflags = vcpu.regs().rflags;
        self.note_vcpu_wp(vm, vcpu, rflags)?;
        if self.handles.is_some() {
            return self.smp_entry(vm, vcpu);
        }
        self.restore_host_coherence(vm, vcpu)
    }

    fn after_exit(&mut self, _vm: &mut VmContext, vcpu: &mut VcpuContext) -> crate::Result<()> {
        self.activate(vcpu.index());
        self.stop_requested(vcpu.index());
        Ok(())
    }

    fn add_vcpus(
        &mut self,
        _vm: &VmContext,
        aps: &mut [&mut VcpuContext],
        handles: Arc<[VcpuHandle]>,
    ) -> crate::Result<()> {
        self.activate(0);
        self.parked = (0..handles.len()).map(|_| None).collect();
        for ap in aps.iter_mut() {
            // The paging controls are read at every exit (see `create`).
            ap.fd.set_sync_valid_reg(SyncReg::SystemRegister);
            let sv = self.mmu.new_vcpu();
            debug_assert_eq!(sv.id(), ap.index() as usize, "shadow ids are vCPU indexes");
            if let Some(slot) = self.parked.get_mut(ap.index() as usize) {
                *slot = Some(CpuState { sv, guest_wp: true, guest_nxe: true });
            }
        }
        // The MMU's remote flush (a pool page or a limbo root held back by
        // vCPUs that have not flushed): stop them as after an exit.
        let hs = handles.clone();
        self.mmu.set_remote_flush(Box::new(move |set: VcpuSet| {
            set.iter()
                .filter_map(|id| {
                    let h = hs.get(id)?;
                    h.stop_for_mmu();
                    // Stopped under the VM's lock: its CR3 cannot change
                    // before the lock is released.
                    Some((id, Some(Gpa(h.cr3())).filter(|c| c.raw() != 0)))
                })
                .collect()
        }));
        self.handles = Some(handles);
        Ok(())
    }

    fn guest_paging_mode(&self, sregs: &kvm_sregs, rflags: u64) -> PagingMode {
        self.guest_mode(sregs, rflags)
    }

    fn guest_root(&self, vcpu_cr3: u64) -> Gpa {
        // The vCPU's CR3 is the shadow root once the guest has loaded one;
        // the guest's own root is the one the shadow MMU shadows.
        // (Before the first LOAD_CR3 the vCPU still runs on the guest's
        // own boot tables: its CR3 is then the guest's root.)
        self.mmu.guest_cr3(&self.vcpu).unwrap_or(Gpa(vcpu_cr3))
    }

    fn explain(&self, vm: &VmContext, e: &mut Explanation) {
        if let Some(pool_mem) = vm.ram.pool() {
            let pool = self.pool(pool_mem);
            e.shadow_root = self.mmu.current_root(&self.vcpu);
            e.shadow_leaf = self.mmu.shadow_leaf(&self.vcpu, &pool, e.gva);
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
    use crate::limits::MAX_WARNINGS;
    use ept::RegionKind;
    use ept::memmap::SlotSpec;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    #[test]
    fn shadow_faults_before_the_first_load_cr3_warn_a_bounded_number_of_times() {
        let ram_mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let pool_mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x100_0000), 0x4_0000)]).unwrap();
        let slot = SlotSpec {
            slot: 3,
            gpa: guest_abi::Gpa(0x100_0000),
            len: 0x4_0000,
            readonly: false,
            kind: RegionKind::ShadowPool,
        };
        let cpu = GuestCpu { maxphyaddr: 36, nx: true, pdpe1gb: true, amd: false };
        let mut sh = ShadowBackend::new(slot, Coherence::ReloadCr3, cpu, shadow::TableFrames::ALL);
        let mut ram = MemWindow::ram(&ram_mem, 0x10_0000);
        let mut pool = sh.pool(&pool_mem);
        let mode = shadow::PagingMode::default();
        // No root yet: every fault is refused, ten times the warning bound.
        for i in 0..10 * MAX_WARNINGS {
            let r = sh.handle_fault(&mut ram, &mut pool, guest_abi::Gva(0x1000 * i), 0, mode);
            assert_eq!(r, Ok(guest_abi::hypercall::ERR_UNAVAILABLE));
        }
        assert_eq!(sh.fault_warnings().seen, 10 * MAX_WARNINGS);
        assert_eq!(sh.fault_warnings().suppressed(), 9 * MAX_WARNINGS);
    }
}
