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
//! Memslots change only through `ept::GuestRam::reregister`.

use super::ShadowBackend;
use super::controls::fault_path_gvas;
use crate::boot::layout::BOOT_TABLES;
use crate::error::kvm_err;
use crate::mmu::report::Coherence;
use crate::mmu::{VcpuContext, VmContext};
use guest_abi::paging::CR4_PGE;
use kvm_bindings::{kvm_regs, kvm_sregs};
use std::time::Instant;
use vm_memory::GuestMemoryMmap;

impl ShadowBackend {
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
                let pool_mem = vm.ram.pool().expect("shadow mode has a pool");
                self.check_pool(&vm.fd, pool_mem).map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
                vm.ram
                    .reregister(&vm.map, &vm.fd, &self.pool_slot, self.pool_slot.kvm_flags())
                    .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
            }
            Coherence::ReloadCr3 => {
                // KVM flushes the guest TLB on KVM_SET_SREGS only when a
                // paging control really changes: toggle CR4.PGE and back
                // (a PGE change flushes everything, global entries too).
                let sregs = vcpu.sregs()?;
                let toggled = kvm_sregs { cr4: sregs.cr4 ^ CR4_PGE, ..sregs };
                vcpu.set_sregs(&toggled)?;
                vcpu.set_sregs(&sregs)?;
            }
        }
        self.mmu.host_invalidated();
        self.times.invalidate += t.elapsed();
        Ok(())
    }

    /// At the first `LOAD_CR3`: the boot tables trap from now on (see
    /// `create`), before anything is shadowed from them.
    pub(super) fn lock_boot_tables(&mut self, vm: &VmContext) -> crate::Result<()> {
        if !self.boot_tables_locked {
            set_boot_tables_readonly(vm, true)?;
            self.boot_tables_locked = true;
        }
        Ok(())
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
        if self.check_pool_always || load_cr3 {
            let pool_mem = vm.ram.pool().expect("shadow mode has a pool");
            self.check_pool(&vm.fd, pool_mem).map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
        }
        self.mmu.set_prefill_hints(&fault_path_gvas(&vcpu.sync_sregs(), regs));
        Ok(())
    }
}

/// Register the memslot of the VMM's boot page tables read-only (its
/// steady state in shadow and pv mode: `ept::memmap`) or writable: KVM
/// needs a delete and re-add to change the flag (`GuestRam::reregister`).
pub(super) fn set_boot_tables_readonly(vm: &VmContext, readonly: bool) -> crate::Result<()> {
    let start = BOOT_TABLES.start;
    let Some(slot) = vm.map.slot_of(start).copied().filter(|s| s.gpa == start && s.kind == ept::RegionKind::PageTables)
    else {
        return Ok(());
    };
    let flags = if readonly { slot.kvm_flags() } else { slot.kvm_flags() & !kvm_bindings::KVM_MEM_READONLY };
    vm.ram.reregister(&vm.map, &vm.fd, &slot, flags).map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))
}
