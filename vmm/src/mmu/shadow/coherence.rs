//! Shadow mode's host coherence and pool integrity (the module doc of
//! `mmu::shadow`, "Host coherence" and "The pool is guest-writable";
//! docs/architecture.md, "Shadow mode" event 5; docs/host.md).
//!
//! - Before the guest runs again after a change that removed or
//!   restricted a shadow mapping, the host forgets it: the pool's memslot
//!   is deleted and re-added ([`Coherence::ReregisterPoolSlot`], hosts
//!   whose KVM shadows page tables) or CR4.PGE is toggled and restored
//!   ([`Coherence::ReloadCr3`], EPT/NPT hosts; a PGE change flushes the
//!   whole TLB, global entries too: Intel SDM vol. 3A §4.10.4.1).
//! - The pool's dirty log says which pool pages the guest wrote; each that
//!   differs from the MMU's copy is rewritten from it before the VMM
//!   trusts the pool again (at shadow hypercalls, and before the slot is
//!   re-registered, which drops the log).
//! - The boot tables' slot turns read-only at the first `LOAD_CR3`.
//!
//! - With several vCPUs the entry work follows the MMU's per-vCPU flush
//!   state instead (`mmu::shadow`, "SMP"): [`flush_vcpu_tlb`] is one
//!   vCPU's flush, the re-registration everyone's.
//!
//! Memslots change only through `ept::GuestRam::reregister`.

use super::ShadowBackend;
use super::controls::fault_path_gvas;
use crate::error::kvm_err;
use crate::mmu::report::Coherence;
use crate::mmu::{VcpuContext, VmContext};
use guest_abi::paging::{CR0_PG, CR0_WP, CR4_PGE};
use kvm_bindings::{kvm_regs, kvm_sregs};
use std::time::Instant;

impl ShadowBackend {
    /// Ask KVM which pool pages were written since the last call (the
    /// slot's dirty log; reading it clears it): first give the guest the D
    /// bits the hardware set in read-only leaves there (writes under a
    /// CR0.WP = 0 the guest did not report: `ShadowMmu::harvest_dirty_leaves`),
    /// then rewrite every page that differs from the MMU's copy. Returns
    /// the number of pages repaired; a repair leaves the host stale, so the
    /// caller invalidates before the guest runs again (as after any change).
    pub fn check_pool(&mut self, vm: &VmContext) -> Result<u64, kvm_ioctls::Error> {
        let t = Instant::now();
        let bitmap = vm.fd.get_dirty_log(self.pool_slot.slot, self.pool_slot.len as usize)?;
        let dirty: Vec<u64> = bitmap
            .iter()
            .enumerate()
            .flat_map(|(w, &bits)| (0..64u64).filter(move |b| bits & (1 << b) != 0).map(move |b| w as u64 * 64 + b))
            .collect();
        let (mut ram, mut pool) = self.windows(vm);
        let harvested = self.mmu.harvest_dirty_leaves(&mut pool, &mut ram, dirty.iter().copied());
        if harvested > 0 {
            log::debug!("{harvested} guest entries got the D bit of a write under the guest's own CR0.WP = 0");
        }
        let repaired = self.mmu.repair_pool_pages(&mut pool, dirty);
        if repaired > 0 {
            log::debug!("the guest wrote {repaired} shadow pool page(s); rewritten from the VMM's copy");
        }
        self.times.pool_check += t.elapsed();
        self.times.pool_checks += 1;
        Ok(repaired)
    }

    /// If a shadow mapping was removed or restricted, make the host forget
    /// its copy (the module doc, "Host coherence").
    pub(super) fn restore_host_coherence(&mut self, vm: &VmContext, vcpu: &VcpuContext) -> crate::Result<()> {
        if !self.mmu.host_stale() {
            return Ok(());
        }
        let t = Instant::now();
        match self.coherence {
            Coherence::ReregisterPoolSlot => {
                // Deleting the slot drops its dirty log: collect it first.
                self.check_pool(vm).map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
                vm.ram
                    .reregister(&vm.map, &vm.fd, &self.pool_slot, self.pool_slot.kvm_flags())
                    .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
            }
            Coherence::ReloadCr3 => flush_vcpu_tlb(vcpu)?,
        }
        self.mmu.host_invalidated();
        self.times.invalidate += t.elapsed();
        Ok(())
    }

    /// At the first `LOAD_CR3`: the boot tables and the page-table zone
    /// trap from now on (see `create`), before anything is shadowed from
    /// them.
    pub(super) fn lock_boot_tables(&mut self, vm: &VmContext) -> crate::Result<()> {
        if !self.boot_tables_locked {
            set_table_slots_readonly(vm, true)?;
            self.boot_tables_locked = true;
        }
        Ok(())
    }

    /// At every exit (`before_entry`, and first thing at a shadow
    /// hypercall): a vCPU whose CR0.WP is clear means the guest cleared WP
    /// with its own `mov cr0`, which does not exit, and did not report it
    /// with `FLUSH_TLB` — supervisor writes then go through read-only
    /// shadow leaves without a fault, and the guest's entries would never
    /// get D. Detected here as a cleared EFER.NXE is: the D bits the writes
    /// left in the pool go to the guest's entries (`check_pool`), the
    /// guest's WP = 0 is emulated from now on (as if reported), and the
    /// vCPU gets WP = 1 back. The window this leaves (docs/shadow.md,
    /// "What the guest must do"): a guest that clears and sets WP again
    /// between two exits is caught by the pool's dirty log at the next
    /// check (every shadow hypercall in shadow mode; the next `LOAD_CR3` in
    /// pv mode).
    pub(super) fn note_vcpu_wp(&mut self, vm: &VmContext, vcpu: &VcpuContext, rflags: u64) -> crate::Result<()> {
        let cr0 = vcpu.sync_sregs().cr0;
        if cr0 & CR0_PG == 0 || cr0 & CR0_WP != 0 || self.mmu.current_root(&self.vcpu).is_none() {
            return Ok(());
        }
        self.check_pool(vm).map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
        self.guest_wp = false;
        self.wp_cleared_silently += 1;
        let sregs = vcpu.sregs()?;
        let mode = self.guest_mode(&sregs, rflags);
        let (mut ram, mut pool) = self.windows(vm);
        self.mmu.set_mode(&mut self.vcpu, &mut pool, &mut ram, mode);
        self.enter_root(vcpu, sregs)
    }

    /// At each shadow hypercall, first: repair what the guest wrote to the
    /// pool through tables of its own, and tell the MMU what fault delivery
    /// touches now.
    pub(super) fn enter_hypercall(
        &mut self,
        vm: &VmContext,
        vcpu: &VcpuContext,
        regs: &kvm_regs,
        load_cr3: bool,
    ) -> crate::Result<()> {
        self.note_vcpu_wp(vm, vcpu, regs.rflags)?;
        if self.check_pool_always || load_cr3 {
            self.check_pool(vm).map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
        }
        self.mmu.set_prefill_hints(&fault_path_gvas(&vcpu.sync_sregs(), regs));
        Ok(())
    }
}

/// Flush one vCPU's TLB, global entries too: KVM flushes the guest TLB on
/// `KVM_SET_SREGS` only when a paging control really changes, so toggle
/// CR4.PGE and back (a PGE change flushes everything: Intel SDM vol. 3A
/// §4.10.4.1).
pub(super) fn flush_vcpu_tlb(vcpu: &VcpuContext) -> crate::Result<()> {
    let sregs = vcpu.sregs()?;
    let toggled = kvm_sregs { cr4: sregs.cr4 ^ CR4_PGE, ..sregs };
    vcpu.set_sregs(&toggled)?;
    vcpu.set_sregs(&sregs)
}

/// Register the memslots where guest page tables trap — the VMM's boot
/// tables and, in shadow mode, the page-table zone — read-only (their
/// steady state: `ept::memmap`) or writable (until the first `LOAD_CR3`,
/// when nothing is shadowed yet): KVM needs a delete and re-add to change
/// the flag (`GuestRam::reregister`).
pub(super) fn set_table_slots_readonly(vm: &VmContext, readonly: bool) -> crate::Result<()> {
    let trapping: Vec<_> =
        vm.map.slots.iter().filter(|s| s.readonly && s.kind == ept::RegionKind::PageTables).copied().collect();
    for slot in trapping {
        let flags = if readonly { slot.kvm_flags() } else { slot.kvm_flags() & !kvm_bindings::KVM_MEM_READONLY };
        vm.ram.reregister(&vm.map, &vm.fd, &slot, flags).map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}
