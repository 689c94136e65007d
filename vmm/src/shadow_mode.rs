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
use shadow::{FaultOutcome, GuestPhys, PagingMode, ShadowMmu, ShadowStats};
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
    pool_pages: u32,
}

impl ShadowState {
    /// The paging controls the guest believes in: the vCPU's, with CR0.WP
    /// replaced by the guest's own.
    pub fn guest_mode(&self, sregs: &kvm_bindings::kvm_sregs, rflags: u64) -> PagingMode {
        PagingMode { wp: self.guest_wp, ..paging_mode(sregs, rflags, self.maxphyaddr) }
    }
}

/// CR0.WP.
pub const CR0_WP: u64 = 1 << 16;

/// What exception delivery touches, as guest-virtual addresses in the
/// vCPU's registers: the IDT, GDT and TSS bases, RIP and RSP. The shadow
/// MMU prefills their PML4 slots before the rest of the kernel half
/// (`ShadowMmu::set_prefill_hints`), so a pool too small for the whole
/// kernel half still leaves the guest able to take a fault.
pub fn fault_path_gvas(sregs: &kvm_bindings::kvm_sregs, regs: &kvm_bindings::kvm_regs) -> [u64; 5] {
    [sregs.idt.base, sregs.gdt.base, sregs.tr.base, regs.rip, regs.rsp]
}

/// The paging controls from the vCPU's system registers.
pub fn paging_mode(sregs: &kvm_bindings::kvm_sregs, rflags: u64, maxphyaddr: u8) -> PagingMode {
    PagingMode {
        wp: sregs.cr0 & (1 << 16) != 0,
        nxe: sregs.efer & (1 << 11) != 0,
        smep: sregs.cr4 & (1 << 20) != 0,
        smap: sregs.cr4 & (1 << 21) != 0,
        ac: rflags & (1 << 18) != 0,
        maxphyaddr,
    }
}

impl ShadowState {
    /// Shadow mode over the pool slot `pool_slot`.
    pub fn new(pool_slot: SlotSpec, pool_hva: u64, coherence: Coherence, maxphyaddr: u8) -> ShadowState {
        let pages = (pool_slot.len / 4096) as u32;
        let mode = PagingMode { maxphyaddr, ..PagingMode::default() };
        ShadowState {
            mmu: ShadowMmu::new(pool_slot.gpa, pages, mode),
            pool_slot,
            pool_hva,
            coherence,
            times: HandlerTimes::default(),
            maxphyaddr,
            guest_wp: true,
            warnings: crate::limits::Limited::new(
                "warnings about SHADOW_FAULTs the VMM could not handle",
                crate::limits::MAX_WARNINGS,
            ),
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

    /// `SHADOW_FAULT(cr2, error_code)` → the hypercall result.
    pub fn fault(
        &mut self,
        ram: &mut MemWindow<'_>,
        pool: &mut MemWindow<'_>,
        cr2: u64,
        error_code: u64,
        mode: PagingMode,
    ) -> Result<u64, shadow::ShadowError> {
        let t = Instant::now();
        // The controls as of this exit (sync regs): a guest that changed
        // EFER.NXE or CR4 without FLUSH_TLB gets a rebuilt shadow here
        // instead of a hidden fault that repeats forever.
        self.mmu.set_mode(pool, ram, mode);
        let r = match self.mmu.handle_fault(pool, ram, cr2, error_code as u32) {
            Ok(FaultOutcome::Fixed) => hc::FAULT_FIXED,
            Ok(FaultOutcome::GuestFault(ec)) => hc::FAULT_GUEST | ec as u64,
            Err(e @ shadow::ShadowError::PoolTooSmall) => {
                self.times.fault += t.elapsed();
                return Err(e);
            }
            Err(e) => {
                // Bounded: a guest can send this before its first LOAD_CR3
                // as often as it likes.
                if self.warnings.allow() {
                    log::warn!("SHADOW_FAULT({cr2:#x}, {error_code:#x}) failed: {e:?}");
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
