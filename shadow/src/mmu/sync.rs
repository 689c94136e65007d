//! Guest page-table writes: each shadow entry derived from the written guest
//! entry is updated in place or zapped (KVM's `kvm_mmu_pte_write`, mmu.c,
//! reached through page tracking).
//!
//! # Invariants
//!
//! - After [`ShadowMmu::pte_written`] no shadow entry derived from the
//!   written entry grants more than the guest entry now does: an aligned
//!   8-byte write of a leaf that may be shadowed updates the leaf in place
//!   (marking the host stale if it grants less), anything else zaps; a
//!   partial or misaligned write zaps the whole derived page (invariant 3).
//! - A zap unlinks the child, frees it when nothing else points at it, and
//!   marks the host stale (or defers it, `coherence.rs`).
//! - A write to a kernel-half slot of a root marks that root for refill, and
//!   the writing vCPU's current root is refilled before it runs again.
//! - Every write moves the VM's change epoch on (invariant 7).

use super::*;

impl ShadowMmu {
    /// Write leaf `spte` at entry `idx` of `page`: a child it replaces is
    /// unlinked first, and a replaced leaf that granted more marks the host
    /// stale.
    pub(super) fn set_leaf(&mut self, pool: &mut impl GuestPhys, page: u32, idx: u64, spte: u64) {
        let old = self.entry(page, idx);
        let level = self.pages[page as usize].as_ref().map_or(1, |p| p.role.level);
        if self.child_of(old, level).is_some() {
            self.zap_entry(pool, page, idx);
        } else if old & P != 0 && restricts(old, spte) {
            self.mark_stale(page);
        }
        self.put(pool, page, idx, spte);
    }

    /// Clear entry `idx` of `page`; unlink (and maybe free) its child.
    pub(super) fn zap_entry(&mut self, pool: &mut impl GuestPhys, page: u32, idx: u64) {
        self.work += 1;
        let old = self.entry(page, idx);
        if old & P == 0 {
            return;
        }
        self.put(pool, page, idx, 0);
        self.mark_stale(page);
        self.stats.zaps += 1;
        if let Some(p) = self.pages[page as usize].as_mut() {
            p.prefilled = false;
            if p.role.level == 4 {
                p.needs_prefill = true;
            }
        }
        let level = self.pages[page as usize].as_ref().map_or(1, |p| p.role.level);
        if let Some(child) = self.child_of(old, level) {
            if let Some(c) = self.pages[child as usize].as_mut() {
                c.parents.remove(&(page, idx as u16));
            }
            self.release_if_orphan(pool, child);
        }
    }

    /// A guest write of `len` bytes at `gpa` to a page-table page, already
    /// applied to guest memory. Updates or zaps every shadow entry derived
    /// from the written entry.
    pub fn pte_written(
        &mut self,
        vcpu: &mut ShadowVcpu,
        pool: &mut impl GuestPhys,
        guest: &mut impl GuestPhys,
        gpa: Gpa,
        len: u64,
    ) {
        self.act(vcpu);
        self.sync_written(pool, guest, gpa.raw(), len);
        self.refill_current_root(vcpu, pool, guest);
    }

    /// [`ShadowMmu::pte_written`] without the refill of the current root's
    /// kernel half (a batch refills once, at its end).
    pub(super) fn sync_written(&mut self, pool: &mut impl GuestPhys, guest: &mut impl GuestPhys, gpa: u64, len: u64) {
        self.stats.pte_writes += 1;
        self.epoch += 1;
        let gfn = gpa >> 12;
        let Some(derived) = self.rmap.get(&gfn).cloned() else { return };
        let aligned = len == 8 && gpa.is_multiple_of(8);
        for page in derived {
            self.work += 1;
            let Some(role) = self.pages[page as usize].as_ref().map(|p| p.role) else { continue };
            if !aligned {
                self.stats.page_zaps += 1;
                for idx in 0..512 {
                    self.zap_entry(pool, page, idx);
                }
                continue;
            }
            let idx = (gpa & 0xfff) / 8;
            if role.level == 4
                && idx >= 256
                && let Some(p) = self.pages[page as usize].as_mut()
            {
                // A kernel-half slot of a root changed, present before or
                // not: fault delivery may need it, so the root is refilled
                // before it runs again (and pv mode does not publish it
                // until then).
                p.needs_prefill = true;
            }
            let gpte = guest.read_u64(Gpa(gpa & !7));
            let leaf = maps_page(gpte, role.level);
            let old = self.entry(page, idx);
            let old_leaf = old & P != 0 && (role.level == 1 || old & PS != 0);
            match (leaf, self.leaf_spte(guest, role, gpte)) {
                (true, Some(spte)) if old & P == 0 || old_leaf => {
                    if old & P != 0 && restricts(old, spte) {
                        self.mark_stale(page);
                    }
                    self.put(pool, page, idx, spte);
                    self.stats.pte_updates_in_place += 1;
                }
                _ => self.zap_entry(pool, page, idx),
            }
        }
    }

    /// After a change that zapped entries of the current root's kernel half,
    /// shadow them again at once: the next fault must be deliverable.
    pub(super) fn refill_current_root(
        &mut self,
        vcpu: &mut ShadowVcpu,
        pool: &mut impl GuestPhys,
        guest: &mut impl GuestPhys,
    ) {
        if let Some((cr3, root)) = self.loaded_root(vcpu)
            && self.pages[root as usize].as_ref().is_some_and(|p| p.needs_prefill)
            && self.prefill_kernel_half(pool, guest, root).is_err()
        {
            // As in load_cr3: start over; if even that fails, the next
            // LOAD_CR3 or SHADOW_FAULT reports it.
            self.stats.pool_exhaustions += 1;
            self.zap_everything(pool);
            let _ = self.switch_root(vcpu, pool, guest, cr3);
        }
    }

    /// `FLUSH_TLB`: shadow entries are kept coherent on every write, so a
    /// flush only matters to a host that caches shadow translations.
    pub fn flush(&mut self, vcpu: &mut ShadowVcpu) {
        self.act(vcpu);
        self.stats.flushes += 1;
        vcpu.last_fixed = None;
    }
}
