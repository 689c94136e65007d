//! The shadow pool: allocation, freeing, quarantine and the zap of
//! everything (KVM's `kvm_mmu_alloc_shadow_page`, `kvm_mmu_commit_zap_page`,
//! `kvm_mmu_zap_all`).
//!
//! # Invariants
//!
//! - A page taken for use is zeroed in the pool first, whatever the guest
//!   wrote there (trust model), and enters the role index and reverse map.
//! - A freed page goes to quarantine, not to the free list: the host may
//!   still cache translations through it until it is invalidated
//!   ([`ShadowMmu::host_invalidated`]). Reusing a quarantined page early
//!   marks the host stale.
//! - A zap of everything empties the root cache, starts a new generation (so
//!   every vCPU's root is obsolete) and marks the host stale.

use super::*;

impl ShadowMmu {
    /// Free pool pages (quarantined ones included: they are reusable before
    /// the guest runs again).
    pub(super) fn free_pages(&self) -> usize {
        self.free.len() + self.quarantine.len() + (self.capacity as usize - self.pages.len())
    }

    pub(super) fn get_or_create(&mut self, pool: &mut impl GuestPhys, role: Role) -> Option<u32> {
        if let Some(&p) = self.by_role.get(&role) {
            return Some(p);
        }
        // Quarantined pages may be reused before the guest runs again: the
        // host is invalidated before then anyway (quarantine ⇒ stale).
        let p = match self.free.pop() {
            Some(p) => p,
            // A page never taken (module invariants in `vm.rs`).
            None if self.pages.len() < self.capacity as usize => {
                self.pages.push(None);
                (self.pages.len() - 1) as u32
            }
            None => {
                // The host may still cache translations through a
                // quarantined page (a deferred change): it must forget them
                // before the guest runs again.
                let p = self.quarantine.pop()?;
                self.stale = true;
                p
            }
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

    /// Free `page` if nothing points at it and it is not a root.
    pub(super) fn release_if_orphan(&mut self, pool: &mut impl GuestPhys, page: u32) {
        let orphan = self.pages[page as usize].as_ref().is_some_and(|p| p.parents.is_empty() && !p.root);
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
        // Its parents' entries were cleared by whoever unlinked it; the
        // host may still cache translations through it: quarantine.
        self.quarantine.push(page);
        if !self.defer {
            self.stale = true;
        }
    }

    /// Zap everything: every shadow page, every root.
    pub fn zap_all(&mut self, pool: &mut impl GuestPhys) {
        for (_, r) in self.roots.drain(..) {
            if let Some(p) = self.pages[r as usize].as_mut() {
                p.root = false;
            }
        }
        self.loaded.clear();
        self.generation += 1;
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
                self.quarantine.push(page);
                self.stats.page_zaps += 1;
            }
        }
        self.rmap.clear();
        self.stats.pages_in_use = 0;
        self.stale = true;
    }
}
