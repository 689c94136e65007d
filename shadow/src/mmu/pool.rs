//! The shadow pool: allocation, freeing, quarantine and the zap of
//! everything (KVM's `kvm_mmu_alloc_shadow_page`, `kvm_mmu_commit_zap_page`,
//! `kvm_mmu_zap_all`).
//!
//! # Invariants
//!
//! - A page taken for use is zeroed in the pool first, whatever the guest
//!   wrote there (trust model), and enters the role index and reverse map.
//! - A freed page goes to quarantine, not to the free list: a vCPU or the
//!   host may still cache translations through it until every vCPU has
//!   flushed (`coherence.rs`). Reusing a quarantined page early is allowed
//!   only to the acting vCPU, once every other vCPU has flushed, and makes
//!   it owe a flush.
//! - A page a vCPU's CR3 holds (`loaded`) is never freed: a root evicted
//!   from the cache is freed when the last vCPU leaves it.
//! - A zap of everything empties the root cache, starts a new generation (so
//!   every vCPU's root is obsolete), holds the root pages vCPUs' CR3s still
//!   point at, and records a change every vCPU must flush.

use super::*;

impl ShadowMmu {
    /// Pool pages the acting vCPU could take now: free, or quarantined and
    /// flushed by every other vCPU (with one vCPU: every quarantined page,
    /// reusable before the guest runs again).
    pub(super) fn free_pages(&self) -> usize {
        let others = self.tlb.min_flushed_except(self.tlb.acting);
        self.free.len()
            + self.quarantine.partition_point(|&(_, tag)| tag <= others)
            + (self.capacity as usize - self.pages.len())
    }

    pub(super) fn get_or_create(&mut self, pool: &mut impl GuestPhys, role: Role) -> Option<u32> {
        if let Some(&p) = self.by_role.get(&role) {
            return Some(p);
        }
        // A quarantined page may be reused before the guest runs again when
        // no other vCPU can still cache it; the acting vCPU then owes a
        // flush (`coherence.rs`).
        let p = match self.free.pop() {
            Some(p) => p,
            // A page never taken (module invariants in `vm.rs`).
            None if self.pages.len() < self.capacity as usize => {
                self.pages.push(None);
                (self.pages.len() - 1) as u32
            }
            None => self.take_quarantined(pool)?,
        };
        // The VMM zeroed this page when it was freed, but the guest may have
        // written it since (see "Trust model"): zero it again, from nothing
        // read back.
        let base = self.page_gpa(p);
        for i in 0..512 {
            pool.write_u64(Gpa(base + i * 8), 0);
        }
        self.work += 512;
        self.pages[p as usize] = Some(ShadowPage {
            role,
            parents: HashSet::new(),
            root: false,
            needs_prefill: true,
            prefilled: false,
            entries: Box::new([0; 512]),
        });
        self.by_role.insert(role, p);
        self.rmap.entry(role.gfn).or_default().push(p);
        self.stats.pages_in_use += 1;
        self.stats.pages_peak = self.stats.pages_peak.max(self.stats.pages_in_use);
        Some(p)
    }

    /// Free `page` if nothing points at it, it is not a cached root and no
    /// vCPU's CR3 holds it.
    pub(super) fn release_if_orphan(&mut self, pool: &mut impl GuestPhys, page: u32) {
        let orphan = self.pages[page as usize].as_ref().is_some_and(|p| p.parents.is_empty() && !p.root)
            && !self.limbo.iter().any(|l| l.0 == page);
        #[cfg(test)]
        let orphan = orphan && (self.sabotage == Sabotage::EvictLoadedRoots || !self.loaded.contains(&page));
        #[cfg(not(test))]
        let orphan = orphan && !self.loaded.contains(&page);
        if orphan {
            self.free_page(pool, page);
        }
    }

    pub(super) fn free_page(&mut self, pool: &mut impl GuestPhys, page: u32) {
        self.work += 512;
        for idx in 0..512 {
            self.zap_entry(pool, page, idx);
        }
        let Some(sp) = self.pages[page as usize].take() else { return };
        self.by_role.remove(&sp.role);
        if let Some(v) = self.rmap.get_mut(&sp.role.gfn) {
            // At most one page per (level, access) role of a frame: ≤ 32.
            self.work += v.len() as u64;
            v.retain(|&p| p != page);
            if v.is_empty() {
                self.rmap.remove(&sp.role.gfn);
            }
        }
        self.stats.pages_in_use -= 1;
        // Its parents' entries were cleared by whoever unlinked it; a vCPU
        // or the host may still cache translations through it: quarantine
        // until every vCPU has flushed.
        if !self.deferring() {
            self.changed();
        }
        #[cfg(test)]
        if self.sabotage == Sabotage::NoQuarantine {
            self.free.push(page);
            return;
        }
        self.quarantine.push_back((page, self.tlb.now));
    }

    /// Zap everything, on the VM's own account (no vCPU acting): every
    /// shadow page, every root. The roots vCPUs' CR3s hold are zeroed and
    /// held until each vCPU has left them (its next `LOAD_CR3`, fault or
    /// entry rebuilds its root).
    pub fn zap_all(&mut self, pool: &mut impl GuestPhys) {
        self.tlb.acting = None;
        self.zap_everything(pool);
    }

    /// [`ShadowMmu::zap_all`] within an operation for the acting vCPU.
    pub(super) fn zap_everything(&mut self, pool: &mut impl GuestPhys) {
        for (g, r) in std::mem::take(&mut self.roots) {
            if let Some(p) = self.pages[r as usize].as_mut() {
                p.root = false;
            }
            self.enter_limbo(r, g);
        }
        self.generation += 1;
        self.changed();
        self.user_write_leaves.clear();
        for page in 0..self.pages.len() as u32 {
            if let Some(sp) = self.pages[page as usize].take() {
                // Re-zero what the VMM wrote (its copy says where).
                let base = self.page_gpa(page);
                for (idx, &e) in sp.entries.iter().enumerate() {
                    if e != 0 {
                        pool.write_u64(Gpa(base + idx as u64 * 8), 0);
                    }
                }
                self.work += 512;
                self.by_role.remove(&sp.role);
                if self.loaded.contains(&page) || self.limbo.iter().any(|l| l.0 == page) {
                    self.held.push(page);
                } else {
                    self.quarantine.push_back((page, self.tlb.now));
                }
                self.stats.page_zaps += 1;
            }
        }
        self.rmap.clear();
        self.stats.pages_in_use = 0;
    }
}
