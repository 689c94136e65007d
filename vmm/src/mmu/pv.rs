//! pv mode in the VMM: the area a paravirtual guest shares with the VMM
//! (layout and guest contract: `guest_abi::pv`), on top of shadow mode's
//! MMU (`mmu::shadow`, `shadow::mmu`).
//!
//! - The page-table zone is ordinary writable RAM (`ept::memmap`): guest
//!   page-table writes do not exit. The guest queues the GPA of each entry
//!   it wrote; every pv sync point — `PV_FLUSH`, `SHADOW_FAULT`, `LOAD_CR3`,
//!   `FLUSH_TLB` — first applies the queue ([`PvArea::take_queue`],
//!   `ShadowMmu::apply_batch`), so the shadow is exactly what trapping each
//!   write would have made it (the property test of `shadow::mmu::pv`).
//! - After every hypercall that may have changed the root cache the VMM
//!   republishes the cached roots ([`PvArea::publish`]); a guest with an
//!   empty queue loads a published shadow root with its own `mov cr3`.
//!   The table is rewritten before the vCPU runs again, so an entry the
//!   guest finds is valid; at every sync point the VMM follows a switch it
//!   did not see from the vCPU's CR3 (a published shadow root names its
//!   guest root), never from anything the guest claims.
//! - **Host coherence.** A batch marks the host stale at most once, so a
//!   hypercall costs at most one invalidation. On an EPT/NPT host (the
//!   `ReloadCr3` strategy) a batch costs none: the CPU walks the shadow
//!   tables from memory, and the guest flushes its own TLB after the sync
//!   where hardware needs it (`invlpg`, a CR3 reload — the pv contract),
//!   which is all the invalidation there is; a guest that does not only
//!   keeps stale translations of its own memory. Where the host shadows
//!   page tables (re-registering the pool's slot) every batch that
//!   restricts a mapping still costs one.
//! - **Harvest.** `PV_HARVEST` is a sync point that then answers, from
//!   the A bits the CPU sets in the shadow leaves, which of the pages the
//!   guest names were used since it last asked (`shadow::mmu::harvest`):
//!   a whole aging scan for one exit, the guest's own entries untouched.
//! - **Trust.** The area is guest memory and guest input: the queue length
//!   is checked against the queue, every entry is validated
//!   (`ShadowMmu::apply_batch`), and the VMM reads the area once per sync
//!   into its own buffer. What the guest writes in the root table is
//!   overwritten and never read. The pool's dirty log (the check that
//!   repairs pool pages the guest wrote, `mmu::shadow`) is read at
//!   `LOAD_CR3` only, not at every sync: the guarantee of the trust model —
//!   a guest that scribbles over the pool and comes back through
//!   `LOAD_CR3` gets exactly what its tables allow — holds, while the
//!   hypercalls on the fault and flush paths skip its cost (measured in
//!   docs/pv.md). Between a scribble and the next `LOAD_CR3`
//!   the guest runs on what it wrote, as in shadow mode; the VMM never
//!   reads the pool to decide anything, and the shadow maps guest RAM only.

use crate::mmu::explain::Explanation;
use crate::mmu::report::{Coherence, ShadowReport};
use crate::mmu::shadow::ShadowBackend;
use crate::mmu::{MmuBackend, MmuCounters, VcpuContext, VmContext};
use ept::memmap::GpaRange;
use guest_abi::hypercall as hc;
use guest_abi::pv::{self as abi, BatchError};
use guest_abi::{Gpa, Gva};
use kvm_bindings::{kvm_regs, kvm_sregs};
use shadow::{BatchOutcome, PagingMode, ShadowError, VcpuSet};
use std::time::Instant;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// pv mode's backend: shadow mode's ([`ShadowBackend`]: the shadow MMU,
/// host coherence, paging controls) plus the shared area. Every sync
/// point first follows the root the vCPU is on and applies the write
/// queue; every hypercall ends by republishing the roots.
pub struct PvBackend {
    sh: ShadowBackend,
    area: Option<PvArea>,
    refused: u64,
    /// Warnings about refused write queues: their own name and budget.
    queue_warnings: crate::limits::Limited,
    zone: GpaRange,
    /// The VM's vCPUs (a layout-v2 area has a queue for each).
    cpus: u32,
}

impl PvBackend {
    /// pv mode for a VM whose vCPU, RAM and boot tables are set up;
    /// `pt_zone` is the page-table zone `[start, end)` (a writable slot in
    /// pv mode: `ept::memmap`).
    pub fn create(vm: &VmContext, vcpu: &mut VcpuContext, pt_zone: GpaRange) -> crate::Result<PvBackend> {
        let mut sh = ShadowBackend::create(vm, vcpu, pt_zone)?;
        sh.check_pool_at_load_cr3_only();
        // A pv guest loads published roots without an exit: every change
        // must be coherent before it runs again (at most one invalidation
        // per hypercall, whatever the batch held).
        sh.mmu_mut().0.set_defer_unreachable(false);
        // A context switch that misses the root cache costs the LOAD_CR3
        // alone: the new root gets the used part of its user half at once.
        sh.mmu_mut().0.set_prefill_user_half(true);
        let queue_warnings =
            crate::limits::Limited::new("warnings about refused pv write-queue entries", crate::limits::MAX_WARNINGS);
        Ok(PvBackend { sh, area: None, refused: 0, queue_warnings, zone: pt_zone, cpus: 1 })
    }

    /// A sync point (`at`: the hypercall, for the warning): follow a
    /// published root the guest loaded itself (the vCPU's CR3: the VMM
    /// trusts no claim about it), apply the write queue. Returns `OK` or the
    /// batch error for the guest.
    fn sync(&mut self, vm: &mut VmContext, vcpu: &VcpuContext, at: &str) -> crate::Result<u64> {
        self.sync_or_flush(vm, vcpu, at, None)
    }

    /// [`PvBackend::sync`], or with `remote`, `PV_FLUSH_REMOTE`'s: every
    /// queue applied, then the vCPUs of `remote` owe a flush
    /// (`ShadowMmu::flush_remote`; `after_exit` stops those in guest mode
    /// before the caller resumes).
    fn sync_or_flush(
        &mut self,
        vm: &mut VmContext,
        vcpu: &VcpuContext,
        at: &str,
        remote: Option<VcpuSet>,
    ) -> crate::Result<u64> {
        self.sh.activate(vcpu.index());
        let t = Instant::now();
        let hw_root = vcpu.sync_sregs().cr3;
        let guest_flushes = self.sh.coherence() == Coherence::ReloadCr3;
        let me = vcpu.index() as usize;
        let zone = (self.zone.start, self.zone.end);
        let mut others_refused = 0;
        let batch = {
            let (mut ram, mut pool) = self.sh.windows(vm);
            let (mmu, cpu) = self.sh.mmu_mut();
            if let Err(ShadowError::PoolTooSmall) = mmu.follow_shadow_root(cpu, &mut pool, &mut ram, Gpa(hw_root)) {
                return Err(self.sh.pool_too_small(hw_root));
            }
            let followed = mmu.current_root(cpu);
            let stale_before = mmu.host_stale();
            let r = match self.area.as_mut() {
                // Layout version 2: every vCPU's ring, applied in vCPU
                // order; the caller is answered for its own.
                Some(area) if area.cpus > 0 => {
                    let rings = area.take_rings(vm.ram.memory());
                    let slices: Vec<&[u64]> = rings.iter().map(|q| q.as_deref().unwrap_or(&[])).collect();
                    let outcomes = match remote {
                        Some(targets) => mmu.flush_remote(cpu, &mut pool, &mut ram, &slices, zone, targets).batches,
                        None => mmu.sync_queues(cpu, &mut pool, &mut ram, &slices, zone),
                    };
                    let mut mine = hc::OK;
                    for (i, (ring, outcome)) in rings.iter().zip(&outcomes).enumerate() {
                        let r = match (ring, outcome) {
                            (Err(why), _) => abi::batch_error(0, *why),
                            (Ok(_), BatchOutcome { refused: None, .. }) => hc::OK,
                            (Ok(_), BatchOutcome { applied, refused: Some(why) }) => abi::batch_error(*applied, *why),
                        };
                        if i == me {
                            mine = r;
                        } else if r != hc::OK {
                            others_refused += 1;
                        }
                    }
                    area.entries = rings.into_iter().nth(me).and_then(Result::ok).unwrap_or_default();
                    mine
                }
                area => {
                    let r = match area.map(|a| a.take_queue(vm.ram.memory())) {
                        None | Some(Ok([])) => hc::OK,
                        Some(Err(why)) => abi::batch_error(0, why),
                        Some(Ok(entries)) => match mmu.apply_batch(cpu, &mut pool, &mut ram, entries, zone) {
                            BatchOutcome { refused: None, .. } => hc::OK,
                            BatchOutcome { applied, refused: Some(why) } => abi::batch_error(applied, why),
                        },
                    };
                    if let Some(targets) = remote {
                        mmu.flush_remote(cpu, &mut pool, &mut ram, &[], zone, targets);
                    }
                    r
                }
            };
            // On an EPT/NPT host the CPU walks the shadow tables from
            // memory, and the guest's own invlpg or CR3 reload after its
            // sync is the TLB flush the contract asks of it: a batch needs
            // no host invalidation there (the quarantine still waits for a
            // real one). Changes the VMM makes on its own account (evictions,
            // rebuilds, repairs) still get theirs.
            if !stale_before && mmu.host_stale() && guest_flushes {
                mmu.host_flush_left_to_guest();
            }
            (r, followed)
        };
        let (batch, followed) = batch;
        if others_refused > 0 {
            self.refused += others_refused;
            if self.queue_warnings.allow() {
                log::warn!("pv write queue of {others_refused} other vCPU(s) refused at {at} on vCPU {me}");
            }
        }
        if batch != hc::OK {
            self.refused += 1;
            if self.queue_warnings.allow() {
                log::warn!(
                    "pv write queue refused at {at}: {batch:#x} (entries from the index in bits 8..32 on not applied; the guest is told)"
                );
            }
        }
        // A batch that exhausted the pool rebuilt the root the vCPU is on
        // elsewhere: follow it (a vCPU on tables of the guest's own making
        // is left where it is).
        if followed.map(|r| r.gpa().raw()) == Some(hw_root & !0xfff) && {
            let (mmu, cpu) = self.sh.mmu();
            mmu.current_root(cpu) != followed
        } {
            self.sh.point_vcpu(vcpu)?;
        }
        self.sh.times_mut().batch += t.elapsed();
        Ok(batch)
    }

    /// A shadow-mode event `event` (hypercall `at`) as a pv sync point:
    /// sync first, then shadow mode's handling, then republish the roots. A
    /// refused queue is answered with its batch error, as `PV_FLUSH`
    /// answers it, and the event is not handled: the guest learns at once
    /// that writes it queued were not applied (issue 22, item 2).
    fn synced(
        &mut self,
        vm: &mut VmContext,
        vcpu: &mut VcpuContext,
        at: &str,
        event: impl FnOnce(&mut ShadowBackend, &mut VmContext, &mut VcpuContext) -> crate::Result<u64>,
    ) -> crate::Result<u64> {
        let batch = self.sync(vm, vcpu, at)?;
        if batch != hc::OK {
            self.publish(vm);
            return Ok(batch);
        }
        let r = event(&mut self.sh, vm, vcpu)?;
        self.publish(vm);
        Ok(r)
    }

    /// Republish the cached roots if they changed.
    fn publish(&mut self, vm: &VmContext) {
        if let Some(area) = self.area.as_mut() {
            area.publish(vm.ram.memory(), self.sh.mmu().0.published_roots().map(|(g, s)| (g, s.gpa())));
        }
    }

    /// `PV_FLUSH(gva)`: sync, then make `gva` current and shadow every
    /// other leaf the batch made valid (`ShadowMmu::prefetch_batch`: a
    /// large folio's fault costs this one exit, with no hidden fault on
    /// its other pages).
    fn pv_flush(&mut self, vm: &mut VmContext, vcpu: &mut VcpuContext, regs: &kvm_regs) -> crate::Result<u64> {
        let batch = self.sync(vm, vcpu, "PV_FLUSH")?;
        let t = Instant::now();
        let (mut ram, mut pool) = self.sh.windows(vm);
        let (mmu, cpu) = self.sh.mmu_mut();
        mmu.flush(cpu);
        // The entries applied: all of them, or those before the refused one.
        let applied = abi::decode_batch_error(batch).map_or(usize::MAX, |(applied, _)| applied);
        let entries = self.area.as_ref().map_or(&[][..], |a| &a.entries[..a.entries.len().min(applied)]);
        let va = (regs.rdi != abi::NO_GVA).then_some(Gva(regs.rdi));
        mmu.prefetch_batch(cpu, &mut pool, &mut ram, va, entries);
        self.sh.times_mut().batch += t.elapsed();
        Ok(batch)
    }
}

impl PvBackend {
    /// `PV_HARVEST(gva, pages, bitmap)` (`guest_abi::hypercall`): check the
    /// arguments, sync, then answer from the shadow leaves' A bits
    /// (`ShadowMmu::harvest`). The bitmap is guest input, read once into a
    /// VMM buffer; it may not lie in the page-table zone or the boot
    /// tables (the VMM writes it back and must not change a guest table
    /// behind the write queue). Its last word is cut to `pages` bits. A
    /// harvest marks the host stale at most once; on an EPT/NPT host none
    /// (the guest reloads CR3 after it, as for a batch).
    fn pv_harvest(&mut self, vm: &mut VmContext, vcpu: &mut VcpuContext, regs: &kvm_regs) -> crate::Result<u64> {
        let (base, pages, bitmap) = (regs.rdi, regs.rsi, regs.rcx);
        if pages == 0 || pages > abi::HARVEST_PAGES || base & 0xfff != 0 {
            return Ok(hc::ERR_INVALID);
        }
        let len = pages.div_ceil(64) * 8;
        let overlaps = |r: GpaRange| bitmap < r.end.raw() && bitmap + len > r.start.raw();
        if bitmap % 8 != 0
            || bitmap.checked_add(len).is_none_or(|end| end > vm.memory)
            || overlaps(self.zone)
            || overlaps(crate::boot::layout::BOOT_TABLES)
        {
            return Ok(hc::ERR_FAULT);
        }
        let batch = self.sync(vm, vcpu, "PV_HARVEST")?;
        if batch != hc::OK {
            return Ok(batch);
        }
        let t = Instant::now();
        let mut bytes = vec![0u8; len as usize];
        if vm.ram.memory().read_slice(&mut bytes, GuestAddress(bitmap)).is_err() {
            return Ok(hc::ERR_FAULT);
        }
        let mut words: Vec<u64> =
            bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
        if pages % 64 != 0
            && let Some(last) = words.last_mut()
        {
            *last &= (1 << (pages % 64)) - 1;
        }
        let guest_flushes = self.sh.coherence() == Coherence::ReloadCr3;
        {
            let (ram, mut pool) = self.sh.windows(vm);
            let (mmu, cpu) = self.sh.mmu_mut();
            let stale_before = mmu.host_stale();
            mmu.harvest(cpu, &mut pool, &ram, Gva(base), &mut words);
            if !stale_before && mmu.host_stale() && guest_flushes {
                mmu.host_flush_left_to_guest();
            }
        }
        let out: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let _ = vm.ram.memory().write_slice(&out, GuestAddress(bitmap));
        self.sh.times_mut().batch += t.elapsed();
        Ok(hc::OK)
    }

    /// `PV_FLUSH_REMOTE(cpus, ranges, count)` (guest_abi::hypercall): the
    /// ranges are checked, not used (a flush of everything is a superset).
    fn pv_flush_remote(&mut self, vm: &mut VmContext, vcpu: &mut VcpuContext, regs: &kvm_regs) -> crate::Result<u64> {
        if self.area.as_ref().is_none_or(|a| a.cpus == 0) {
            return Ok(hc::ERR_UNAVAILABLE);
        }
        let (ranges, count) = (regs.rsi, regs.rcx);
        if count > abi::FLUSH_RANGES_CAP as u64 {
            return Ok(hc::ERR_INVALID);
        }
        if count > 0 && ranges.checked_add(count * 8).is_none_or(|end| end > vm.memory) {
            return Ok(hc::ERR_FAULT);
        }
        let targets = if regs.rdi == abi::ALL_CPUS { VcpuSet(u64::MAX) } else { VcpuSet(regs.rdi) };
        self.sync_or_flush(vm, vcpu, "PV_FLUSH_REMOTE", Some(targets))
    }

    /// Follow a root the vCPU loaded itself (at every exit that may change
    /// the MMU outside a sync: the library's limbo needs every vCPU's CR3).
    fn follow(&mut self, vm: &VmContext, vcpu: &VcpuContext) -> crate::Result<()> {
        if self.cpus < 2 {
            return Ok(());
        }
        self.sh.activate(vcpu.index());
        let hw_root = vcpu.sync_sregs().cr3;
        if hw_root == 0 {
            return Ok(());
        }
        let (mut ram, mut pool) = self.sh.windows(vm);
        let (mmu, cpu) = self.sh.mmu_mut();
        match mmu.follow_shadow_root(cpu, &mut pool, &mut ram, Gpa(hw_root)) {
            Err(ShadowError::PoolTooSmall) => Err(self.sh.pool_too_small(hw_root)),
            _ => Ok(()),
        }
    }
}

impl MmuBackend for PvBackend {
    fn hypercall(
        &mut self,
        vm: &mut VmContext,
        vcpu: &mut VcpuContext,
        nr: u32,
        regs: &kvm_regs,
    ) -> crate::Result<Option<u64>> {
        let r = match nr {
            hc::PV_SETUP if self.area.is_some() => hc::ERR_INVALID,
            hc::PV_SETUP if !matches!(regs.rsi, 0 | abi::LAYOUT_V1 | abi::LAYOUT_V2) => hc::ERR_INVALID,
            hc::PV_SETUP => {
                let shadowed = [self.zone, crate::boot::layout::BOOT_TABLES];
                let cpus = if regs.rsi == abi::LAYOUT_V2 { self.cpus } else { 0 };
                match PvArea::setup(vm.ram.memory(), vm.memory, Gpa(regs.rdi), &shadowed, cpus) {
                    Ok(area) => {
                        self.area = Some(area);
                        hc::OK
                    }
                    Err(SetupError::BadAddress) => hc::ERR_FAULT,
                    Err(SetupError::OverlapsTables) => hc::ERR_OVERLAP,
                }
            }
            hc::PV_FLUSH => self.pv_flush(vm, vcpu, regs)?,
            hc::PV_HARVEST => self.pv_harvest(vm, vcpu, regs)?,
            hc::PV_FLUSH_REMOTE => self.pv_flush_remote(vm, vcpu, regs)?,
            _ => return Ok(None),
        };
        self.publish(vm);
        Ok(Some(r))
    }

    fn load_cr3(
        &mut self,
        vm: &mut VmContext,
        vcpu: &mut VcpuContext,
        root: Gpa,
        regs: &kvm_regs,
    ) -> crate::Result<u64> {
        self.synced(vm, vcpu, "LOAD_CR3", |sh, vm, vcpu| sh.load_cr3(vm, vcpu, root, regs))
    }

    fn fault(
        &mut self,
        vm: &mut VmContext,
        vcpu: &mut VcpuContext,
        cr2: Gva,
        error_code: u64,
        regs: &kvm_regs,
    ) -> crate::Result<u64> {
        self.synced(vm, vcpu, "SHADOW_FAULT", |sh, vm, vcpu| sh.fault(vm, vcpu, cr2, error_code, regs))
    }

    fn flush(
        &mut self,
        vm: &mut VmContext,
        vcpu: &mut VcpuContext,
        cr0: u64,
        efer: u64,
        regs: &kvm_regs,
    ) -> crate::Result<u64> {
        self.synced(vm, vcpu, "FLUSH_TLB", |sh, vm, vcpu| sh.flush(vm, vcpu, cr0, efer, regs))
    }

    fn mmio_write(&mut self, vm: &mut VmContext, vcpu: &mut VcpuContext, gpa: Gpa, data: &[u8]) -> bool {
        // Only the VMM's boot tables trap in pv mode.
        if self.follow(vm, vcpu).is_err() {
            return false;
        }
        let r = self.sh.mmio_write(vm, vcpu, gpa, data);
        if r {
            self.publish(vm);
        }
        r
    }

    fn before_entry(&mut self, vm: &mut VmContext, vcpu: &mut VcpuContext) -> crate::Result<()> {
        self.follow(vm, vcpu)?;
        self.sh.before_entry(vm, vcpu)?;
        // The entry work may have rebuilt or evicted roots.
        self.publish(vm);
        Ok(())
    }

    fn after_exit(&mut self, vm: &mut VmContext, vcpu: &mut VcpuContext) -> crate::Result<()> {
        self.sh.after_exit(vm, vcpu)
    }

    fn add_vcpus(
        &mut self,
        vm: &VmContext,
        aps: &mut [&mut VcpuContext],
        handles: std::sync::Arc<[crate::mmu::vcpu_handle::VcpuHandle]>,
    ) -> crate::Result<()> {
        self.cpus = handles.len() as u32;
        self.sh.add_vcpus(vm, aps, handles)?;
        // The guest loads published roots itself: a root evicted or zapped
        // waits in limbo until every vCPU's CR3 is known to be elsewhere.
        self.sh.mmu_mut().0.set_guest_loads_roots(true);
        Ok(())
    }

    fn guest_paging_mode(&self, sregs: &kvm_sregs, rflags: u64) -> PagingMode {
        self.sh.guest_paging_mode(sregs, rflags)
    }

    fn guest_root(&self, vcpu_cr3: u64) -> Gpa {
        // A root the guest loaded itself is one the VMM published.
        let published =
            self.area.as_ref().and_then(|a| a.published().iter().find(|&&(_, s)| s == Gpa(vcpu_cr3 & !0xfff)));
        match published {
            Some(&(guest, _)) => guest,
            None => self.sh.guest_root(vcpu_cr3),
        }
    }

    fn explain(&self, vm: &VmContext, e: &mut Explanation) {
        self.sh.explain(vm, e)
    }

    fn counters(&self) -> Option<MmuCounters> {
        self.sh.counters()
    }

    fn report(&self) -> Option<ShadowReport> {
        self.sh.report().map(|r| ShadowReport { pv: true, pv_refused: self.refused, ..r })
    }

    fn warnings_suppressed(&self) -> u64 {
        self.sh.warnings_suppressed() + self.queue_warnings.suppressed()
    }
}

/// The registered shared area.
#[derive(Debug)]
pub struct PvArea {
    gpa: Gpa,
    /// Layout version 2: the vCPUs with a ring each (0: version 1).
    cpus: u32,
    generation: u64,
    published: Vec<(Gpa, Gpa)>,
    entries: Vec<u64>,
}

/// Why `PV_SETUP` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupError {
    /// Not page-aligned, or not wholly inside guest RAM.
    BadAddress,
    /// Overlapping memory the VMM shadows (the page-table zone, the boot
    /// tables): the VMM's writes to the area would change guest page
    /// tables without the shadow following (issue 22, item 1).
    OverlapsTables,
}

impl PvArea {
    /// `PV_SETUP(gpa)`: the area at `gpa` in RAM of `ram` bytes, clear of
    /// every range in `shadowed` (memory the VMM shadows, which nothing but
    /// the guest's tracked writes may change).
    /// `cpus` > 0: layout version 2, a ring per vCPU.
    pub fn setup(
        mem: &GuestMemoryMmap,
        ram: u64,
        gpa: Gpa,
        shadowed: &[GpaRange],
        cpus: u32,
    ) -> Result<PvArea, SetupError> {
        let len = if cpus > 0 { abi::area_pages_v2(cpus) } else { abi::AREA_PAGES } * 4096;
        if !gpa.is_aligned(4096) || gpa.raw().checked_add(len).is_none_or(|end| end > ram) {
            return Err(SetupError::BadAddress);
        }
        let end = Gpa(gpa.raw() + len);
        if shadowed.iter().any(|r| gpa < r.end && r.start < end) {
            return Err(SetupError::OverlapsTables);
        }
        let mut area =
            PvArea { gpa, cpus, generation: 0, published: Vec::new(), entries: Vec::with_capacity(abi::QUEUE_CAP) };
        let _ = mem.write_obj(0u64, GuestAddress(gpa.raw()));
        for cpu in 0..cpus {
            // Empty rings: head = tail = 0.
            let page = gpa.raw() + abi::queue_page(cpu) * 4096;
            let _ = mem.write_obj([0u64; 2], GuestAddress(page));
        }
        area.write_roots(mem);
        Ok(area)
    }

    /// Take the write queue out of guest memory (and empty it there): the
    /// entries, or [`BatchError::Count`] when the length is beyond the queue
    /// (nothing is applied then).
    pub fn take_queue(&mut self, mem: &GuestMemoryMmap) -> Result<&[u64], BatchError> {
        let len: u64 = mem.read_obj(GuestAddress(self.gpa.raw())).unwrap_or(0);
        // Whatever the outcome, the last batch's entries are gone: they are
        // what `PV_FLUSH` shadows after the sync.
        self.entries.clear();
        if len == 0 {
            return Ok(&[]);
        }
        let _ = mem.write_obj(0u64, GuestAddress(self.gpa.raw()));
        if len > abi::QUEUE_CAP as u64 {
            return Err(BatchError::Count);
        }
        let mut bytes = vec![0u8; len as usize * 8];
        let _ = mem.read_slice(&mut bytes, GuestAddress(self.gpa.raw() + abi::QUEUE_FIRST as u64 * 8));
        self.entries.extend(bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))));
        Ok(&self.entries)
    }

    /// Layout version 2: take every vCPU's ring (entries `head..tail`,
    /// read once into VMM memory; `head = tail` stored back whatever the
    /// outcome), by vCPU index; [`BatchError::Count`] for a ring whose
    /// owner claims more than it holds (nothing of it is applied).
    pub fn take_rings(&mut self, mem: &GuestMemoryMmap) -> Vec<Result<Vec<u64>, BatchError>> {
        self.entries.clear();
        (0..self.cpus)
            .map(|cpu| {
                let page = self.gpa.raw() + abi::queue_page(cpu) * 4096;
                let tail: u64 = mem.read_obj(GuestAddress(page + abi::RING_TAIL as u64 * 8)).unwrap_or(0);
                let head: u64 = mem.read_obj(GuestAddress(page + abi::RING_HEAD as u64 * 8)).unwrap_or(0);
                if tail == head {
                    return Ok(Vec::new());
                }
                let _ = mem.write_obj(tail, GuestAddress(page + abi::RING_HEAD as u64 * 8));
                let (first, count) = abi::ring_pending(tail, head)?;
                Ok((0..count as u64)
                    .map(|k| {
                        let word = abi::ring_word(first.wrapping_add(k)) as u64;
                        mem.read_obj::<u64>(GuestAddress(page + word * 8)).unwrap_or(0)
                    })
                    .collect())
            })
            .collect()
    }

    /// Publish `roots` (guest root, shadow root's GPA), most recent first,
    /// at most `ROOTS_CAP`: rewritten only when they changed. Returns
    /// whether the table was rewritten.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, roots: impl Iterator<Item = (Gpa, Gpa)>) -> bool {
        let roots: Vec<(Gpa, Gpa)> = roots.take(abi::ROOTS_CAP).collect();
        if roots == self.published {
            return false;
        }
        self.published = roots;
        self.write_roots(mem);
        true
    }

    /// Write the root table: an open-addressed hash on the guest root's
    /// frame number, probed linearly (the guest's look-up,
    /// `arch::mmu::published_root`), then the generation and the count.
    fn write_roots(&mut self, mem: &GuestMemoryMmap) {
        let mut table = vec![0u64; 2 * abi::ROOTS_CAP];
        for &(guest, shadow) in &self.published {
            let (guest, shadow) = (guest.raw(), shadow.raw());
            let start = ((guest >> 12) % abi::ROOTS_CAP as u64) as usize;
            if let Some(slot) = (0..abi::ROOTS_CAP).map(|k| (start + k) % abi::ROOTS_CAP).find(|&s| table[2 * s] == 0) {
                table[2 * slot] = guest;
                table[2 * slot + 1] = shadow;
            }
        }
        self.generation += 1;
        let page = self.gpa.raw() + 4096;
        let bytes: Vec<u8> = [self.generation, self.published.len() as u64]
            .iter()
            .chain(table.iter())
            .flat_map(|w| w.to_le_bytes())
            .collect();
        let _ = mem.write_slice(&bytes, GuestAddress(page));
    }

    /// The roots published now.
    pub fn published(&self) -> &[(Gpa, Gpa)] {
        &self.published
    }

    /// The area's GPA.
    pub fn gpa(&self) -> Gpa {
        self.gpa
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn setup_refuses_an_area_outside_ram_or_unaligned() {
        let m = mem();
        assert_eq!(PvArea::setup(&m, 1 << 20, Gpa(0x1001), &[], 0).unwrap_err(), SetupError::BadAddress);
        assert_eq!(PvArea::setup(&m, 1 << 20, Gpa((1 << 20) - 4096), &[], 0).unwrap_err(), SetupError::BadAddress);
        assert_eq!(PvArea::setup(&m, 1 << 20, Gpa(!0xfff), &[], 0).unwrap_err(), SetupError::BadAddress);
        assert!(PvArea::setup(&m, 1 << 20, Gpa((1 << 20) - 8192), &[], 0).is_ok());
    }

    /// Issue 22, item 1: an area over anything the VMM shadows is refused.
    #[test]
    fn setup_refuses_an_area_over_shadowed_tables() {
        let m = mem();
        let zone = GpaRange::new(Gpa(0x4_0000), Gpa(0x8_0000));
        let boot = GpaRange::new(Gpa(0x9000), Gpa(0xd000));
        for at in [0x8000, 0x9000, 0xa000, 0xc000, 0x3_f000, 0x4_0000, 0x7_f000] {
            assert_eq!(
                PvArea::setup(&m, 1 << 20, Gpa(at), &[zone, boot], 0).unwrap_err(),
                SetupError::OverlapsTables,
                "{at:#x}"
            );
        }
        // Touching ranges are fine: 0x7000..0x9000, 0xd000..0xf000, 0x8_0000...
        for at in [0x7000, 0xd000, 0x8_0000] {
            assert!(PvArea::setup(&m, 1 << 20, Gpa(at), &[zone, boot], 0).is_ok(), "{at:#x}");
        }
    }

    #[test]
    fn the_queue_is_read_once_emptied_and_bounded() {
        let m = mem();
        let mut a = PvArea::setup(&m, 1 << 20, Gpa(0x8000), &[], 0).unwrap();
        assert_eq!(a.take_queue(&m).unwrap(), &[] as &[u64]);
        m.write_obj(3u64, GuestAddress(0x8000)).unwrap();
        for (i, v) in [0x1000u64, 0x1008, 0x2001].iter().enumerate() {
            m.write_obj(*v, GuestAddress(0x8010 + i as u64 * 8)).unwrap();
        }
        assert_eq!(a.take_queue(&m).unwrap(), &[0x1000, 0x1008, 0x2001]);
        assert_eq!(m.read_obj::<u64>(GuestAddress(0x8000)).unwrap(), 0, "emptied");
        // A hostile length: refused, emptied, nothing read.
        m.write_obj(abi::QUEUE_CAP as u64 + 1, GuestAddress(0x8000)).unwrap();
        assert_eq!(a.take_queue(&m).unwrap_err(), BatchError::Count);
        m.write_obj(u64::MAX, GuestAddress(0x8000)).unwrap();
        assert_eq!(a.take_queue(&m).unwrap_err(), BatchError::Count);
        assert_eq!(m.read_obj::<u64>(GuestAddress(0x8000)).unwrap(), 0);
    }

    #[test]
    fn v2_rings_are_read_per_vcpu_across_wraparound_and_bounded() {
        let m = mem();
        let mut a = PvArea::setup(&m, 1 << 20, Gpa(0x8000), &[], 3).unwrap();
        // A v2 area for 3 vCPUs is 4 pages; one that does not fit is refused.
        assert!(PvArea::setup(&m, 1 << 20, Gpa((1 << 20) - 3 * 4096), &[], 3).is_err());
        let ring = |cpu: u32| 0x8000 + abi::queue_page(cpu) * 4096;
        // vCPU 0: two entries; vCPU 2: one entry just past the wrap.
        m.write_obj(0x1000u64, GuestAddress(ring(0) + abi::ring_word(0) as u64 * 8)).unwrap();
        m.write_obj(0x1008u64, GuestAddress(ring(0) + abi::ring_word(1) as u64 * 8)).unwrap();
        m.write_obj(2u64, GuestAddress(ring(0))).unwrap();
        let n = abi::QUEUE_CAP as u64;
        m.write_obj(n, GuestAddress(ring(2) + 8)).unwrap();
        m.write_obj(0x2008u64, GuestAddress(ring(2) + abi::ring_word(n) as u64 * 8)).unwrap();
        m.write_obj(n + 1, GuestAddress(ring(2))).unwrap();
        let rings = a.take_rings(&m);
        assert_eq!(rings, vec![Ok(vec![0x1000, 0x1008]), Ok(vec![]), Ok(vec![0x2008])]);
        assert_eq!(m.read_obj::<u64>(GuestAddress(ring(0) + 8)).unwrap(), 2, "head = tail");
        assert_eq!(a.take_rings(&m), vec![Ok(vec![]), Ok(vec![]), Ok(vec![])], "read once");
        // A hostile tail: that ring refused (and emptied), the others not.
        m.write_obj(u64::MAX, GuestAddress(ring(1))).unwrap();
        assert_eq!(a.take_rings(&m), vec![Ok(vec![]), Err(BatchError::Count), Ok(vec![])]);
        assert_eq!(m.read_obj::<u64>(GuestAddress(ring(1) + 8)).unwrap(), u64::MAX);
    }

    #[test]
    fn published_roots_are_found_by_the_guests_probe_and_rewritten_only_on_change() {
        let m = mem();
        let mut a = PvArea::setup(&m, 1 << 20, Gpa(0x8000), &[], 0).unwrap();
        // Two roots whose frames collide in the hash.
        let roots =
            [(Gpa(0x100_0000), Gpa(0x8000_0000)), (Gpa(0x100_0000 + abi::ROOTS_CAP as u64 * 4096), Gpa(0x8000_1000))];
        assert!(a.publish(&m, roots.iter().copied()));
        assert!(!a.publish(&m, roots.iter().copied()), "unchanged: not rewritten");
        let word = |i: usize| m.read_obj::<u64>(GuestAddress(0x9000 + i as u64 * 8)).unwrap();
        let probe = |root: u64| {
            let start = ((root >> 12) % abi::ROOTS_CAP as u64) as usize;
            for k in 0..abi::ROOTS_CAP {
                let s = (start + k) % abi::ROOTS_CAP;
                match word(abi::ROOTS_FIRST + 2 * s) {
                    0 => return None,
                    g if g == root => return Some(word(abi::ROOTS_FIRST + 2 * s + 1)),
                    _ => {}
                }
            }
            None
        };
        assert_eq!(probe(roots[0].0.raw()), Some(roots[0].1.raw()));
        assert_eq!(probe(roots[1].0.raw()), Some(roots[1].1.raw()));
        assert_eq!(probe(0x200_0000), None);
        assert_eq!((word(0), word(1)), (2, 2), "generation 2 (setup, publish), two roots");
        a.publish(&m, std::iter::empty());
        assert_eq!(probe(roots[0].0.raw()), None, "an evicted root disappears");
    }
}
