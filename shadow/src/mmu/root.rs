//! Roots: `LOAD_CR3`, the root cache and the prefill of a new root (KVM's
//! `kvm_mmu_load`, `prev_roots` and `mmu_alloc_shadow_roots`, mmu.c).
//!
//! # Invariants
//!
//! - Every cached root is pinned (`ShadowPage::root`) and is freed only when
//!   evicted from the cache (least recently loaded first) and unreferenced;
//!   a root some vCPU runs on (`loaded`) is never evicted — with every
//!   cached root loaded the cache holds one more — nor freed.
//! - A root a vCPU runs on has its kernel half shadowed (`needs_prefill`
//!   clear) as far as the hinted slots go: fault delivery must not fault.
//!   `Err(PoolTooSmall)` means not even those fit, and `load_cr3` then
//!   starts over from an empty pool once before reporting it.
//! - A prefill shadows only guest entries with A set and nothing reserved
//!   (invariant 2), and stops [`PREFILL_RESERVE`] pages short of an empty
//!   pool; the user-half prefill creates at most [`USER_PREFILL_PAGES`].
//! - New paging rules ([`ShadowMmu::set_mode`]) zap everything first.

use super::*;

/// The root of a shadow address space: a page of the VMM's shadow pool,
/// what the vCPU's CR3 holds in shadow mode — never a guest table. Only
/// [`ShadowMmu`] makes one, so a guest root cannot pass for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShadowRoot(pub(super) Gpa);

impl std::fmt::LowerHex for ShadowRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::LowerHex::fmt(&self.0, f)
    }
}

impl ShadowRoot {
    /// Its guest-physical address in the pool (the value for the vCPU's
    /// CR3).
    pub const fn gpa(self) -> Gpa {
        self.0
    }
}

impl ShadowMmu {
    /// Change CR0.WP / EFER.NXE / CR4.SMEP/SMAP: every shadow entry was
    /// computed under the old rules, so zap everything and rebuild the
    /// current root — at a new pool page: the caller must point the vCPU's
    /// CR3 at [`ShadowMmu::current_root`] again.
    ///
    /// RFLAGS.AC alone changes nothing in the shadow (the vCPU enforces
    /// SMAP on the shadow leaf's US bit itself), so it never zaps.
    pub fn set_mode(
        &mut self,
        vcpu: &mut ShadowVcpu,
        pool: &mut impl GuestPhys,
        guest: &mut impl GuestPhys,
        mode: PagingMode,
    ) {
        self.act(vcpu);
        vcpu.mode = mode;
        let same_rules = PagingMode { ac: self.rules.ac, ..mode } == self.rules;
        if same_rules {
            return;
        }
        self.rules = mode;
        self.epoch += 1;
        let current = self.loaded_root(vcpu).map(|(g, _)| g);
        self.zap_everything(pool);
        if let Some(cr3) = current {
            let _ = self.load_cr3(vcpu, pool, guest, Gpa(cr3));
        }
    }

    /// `LOAD_CR3(guest_cr3)`: find or build the shadow root of the guest's
    /// root `guest_cr3`; returns it (what the vCPU's CR3 must hold).
    pub fn load_cr3(
        &mut self,
        vcpu: &mut ShadowVcpu,
        pool: &mut impl GuestPhys,
        guest: &mut impl GuestPhys,
        guest_cr3: Gpa,
    ) -> Result<ShadowRoot, ShadowError> {
        self.act(vcpu);
        self.stats.cr3_loads += 1;
        vcpu.last_fixed = None;
        let guest_cr3 = guest_cr3.raw();
        let key = guest_cr3 & ADDR;
        if !self.tables.contains(Gpa(key)) {
            return Err(ShadowError::RootNotTrapped(Gpa(key)));
        }
        self.switch_root(vcpu, pool, guest, guest_cr3)
            .or_else(|e| match e {
                // The pool cannot hold what fault delivery needs next to
                // everything else in it: start over with an empty pool.
                ShadowError::PoolTooSmall => {
                    self.stats.pool_exhaustions += 1;
                    self.zap_everything(pool);
                    self.switch_root(vcpu, pool, guest, guest_cr3)
                }
                e => Err(e),
            })
            .map(|root| ShadowRoot(Gpa(root)))
    }

    /// Find or build the root for `guest_cr3` (a trapped frame) and make it
    /// current; `Err` when the pool cannot hold what its kernel half's
    /// hinted slots need.
    pub(super) fn switch_root(
        &mut self,
        vcpu: &mut ShadowVcpu,
        pool: &mut impl GuestPhys,
        guest: &mut impl GuestPhys,
        guest_cr3: u64,
    ) -> Result<u64, ShadowError> {
        let key = guest_cr3 & ADDR;
        if let Some(pos) = self.roots.iter().position(|&(g, _)| g == key) {
            let entry = self.roots.remove(pos).expect("position is valid");
            self.roots.push_front(entry);
            self.stats.root_hits += 1;
            self.set_loaded_root(pool, vcpu, entry.0, entry.1);
            self.promote_deferred(entry.1);
            // A guest frame reused as a new PML4 (or kernel-half entries
            // rewritten) zapped entries of this root: everything fault
            // delivery touches must be shadowed again before the guest runs.
            if self.pages[entry.1 as usize].as_ref().is_some_and(|p| p.needs_prefill) {
                self.prefill_kernel_half(pool, guest, entry.1)?;
            }
            return Ok(self.page_gpa(entry.1));
        }
        self.stats.root_misses += 1;
        let page = match self.get_or_create(pool, Role::root(key)) {
            Some(p) => p,
            None => {
                self.stats.pool_exhaustions += 1;
                self.zap_everything(pool);
                self.get_or_create(pool, Role::root(key)).ok_or(ShadowError::PoolTooSmall)?
            }
        };
        if let Some(p) = self.pages[page as usize].as_mut() {
            p.root = true;
        }
        self.roots.push_front((key, page));
        // Evict the least recently loaded roots no vCPU runs on (all of
        // them loaded: the cache grows past its capacity until one is left).
        while self.roots.len() > self.root_cap {
            #[cfg(test)]
            let victim = if self.sabotage == Sabotage::EvictLoadedRoots {
                Some(self.roots.len() - 1)
            } else {
                self.roots.iter().rposition(|(_, p)| !self.loaded.contains(p) && *p != page)
            };
            #[cfg(not(test))]
            let victim = self.roots.iter().rposition(|(_, p)| !self.loaded.contains(p) && *p != page);
            let Some(victim) = victim else { break };
            let (guest_root, old) = self.roots.remove(victim).expect("position is valid");
            if let Some(p) = self.pages[old as usize].as_mut() {
                p.root = false;
            }
            self.enter_limbo(old, guest_root);
            self.release_if_orphan(pool, old);
        }
        self.set_loaded_root(pool, vcpu, key, page);
        self.promote_deferred(page);
        self.prefill_kernel_half(pool, guest, page)?;
        self.prefill_user_half(pool, guest, page);
        Ok(self.page_gpa(page))
    }

    /// Eagerly shadow the kernel half (PML4 entries 256..512) of a new
    /// root: everything the fault-delivery path touches (IDT, GDT, TSS, IST
    /// stacks, handler code) lives there and must not fault. Only entries
    /// with A set are shadowed (invariant 2); the kernel maps itself with A
    /// (and D where writable) set.
    ///
    /// Order: the PML4 slots named by [`ShadowMmu::set_prefill_hints`] (what
    /// fault delivery touches) first, then slot 511 (the kernel image, by
    /// convention), then the rest. The budget is the pool itself: a prefill
    /// stops when creating one more shadow page would leave fewer than
    /// [`PREFILL_RESERVE`] pages free for the next fault's path; the rest of
    /// the kernel half is then shadowed on demand. Subtrees already
    /// prefilled (shared with another root) are linked, not walked again,
    /// so a new root costs O(its new shadow pages), not O(kernel half).
    ///
    /// `Err` when not even the hinted slots fit in the pool.
    pub(super) fn prefill_kernel_half(
        &mut self,
        pool: &mut impl GuestPhys,
        guest: &mut impl GuestPhys,
        root: u32,
    ) -> Result<(), ShadowError> {
        let role = self.pages[root as usize].as_ref().map(|p| p.role).expect("root exists");
        let mut seen = [false; 256];
        let hints = self.prefill_hints.clone();
        let hinted = hints.len();
        let mut result = Ok(());
        for (n, slot) in hints.into_iter().chain([511]).chain(256..511).enumerate() {
            if std::mem::replace(&mut seen[slot as usize - 256], true) {
                continue;
            }
            if !self.prefill(pool, guest, root, role, slot..slot + 1) {
                if n < hinted {
                    result = Err(ShadowError::PoolTooSmall);
                }
                break;
            }
        }
        if let Some(p) = self.pages[root as usize].as_mut() {
            p.needs_prefill = false;
        }
        result
    }

    /// A root built anew (a cache miss: an address space not run for a
    /// while, or never) gets the part of its user half the guest has used
    /// — entries with A set, as the kernel half — up to
    /// [`USER_PREFILL_PAGES`] new shadow pages: the first accesses after
    /// the switch then take no hidden fault (a context switch that misses
    /// the cache costs the `LOAD_CR3` alone). Past the budget the rest is
    /// shadowed on demand. Only when enabled
    /// ([`ShadowMmu::set_prefill_user_half`]: pv mode).
    pub(super) fn prefill_user_half(&mut self, pool: &mut impl GuestPhys, guest: &mut impl GuestPhys, root: u32) {
        if !self.prefill_user {
            return;
        }
        let Some(role) = self.pages[root as usize].as_ref().map(|p| p.role) else { return };
        self.prefill_budget = USER_PREFILL_PAGES;
        self.prefill(pool, guest, root, role, 0..256);
        self.prefill_budget = usize::MAX;
    }

    /// Prefill the used part of a new root's user half (see
    /// `prefill_user_half`); off by default.
    pub fn set_prefill_user_half(&mut self, on: bool) {
        self.prefill_user = on;
    }

    /// The PML4 slots fault delivery needs, from guest-virtual addresses
    /// the VMM reads in the vCPU's registers (IDT, GDT and TSS bases, RIP,
    /// RSP): a later prefill shadows them before anything else. Addresses
    /// in the lower half are ignored (only the kernel half is prefilled).
    pub fn set_prefill_hints(&mut self, gvas: &[Gva]) {
        self.prefill_hints.clear();
        for &va in gvas {
            let slot = guest_abi::paging::table_index(va.raw(), 4) as u64;
            if slot >= 256 && !self.prefill_hints.contains(&slot) {
                self.prefill_hints.push(slot);
            }
        }
    }

    /// Shadow entries `range` of `page` (role `role`) and, recursively, the
    /// tables below them; `false` if it stopped early to keep
    /// [`PREFILL_RESERVE`] pages free.
    pub(super) fn prefill(
        &mut self,
        pool: &mut impl GuestPhys,
        guest: &mut impl GuestPhys,
        page: u32,
        role: Role,
        range: core::ops::Range<u64>,
    ) -> bool {
        for idx in range {
            self.work += 1;
            let gpte_gpa = (role.gfn << 12) + idx * 8;
            if !guest.is_ram(Gpa(gpte_gpa), 8) {
                return true;
            }
            let gpte = guest.read_u64(Gpa(gpte_gpa));
            if !shadowable(gpte, role.level, &self.rules) {
                continue;
            }
            if maps_page(gpte, role.level) {
                if let Some(spte) = self.leaf_spte(guest, role, gpte) {
                    self.set_leaf(pool, page, idx, spte);
                }
                continue;
            }
            if !self.tables.contains(Gpa(gpte & ADDR)) {
                continue;
            }
            let child_role = role.child(gpte, &self.rules);
            if !self.by_role.contains_key(&child_role) {
                if self.free_pages() <= PREFILL_RESERVE || self.prefill_budget == 0 {
                    return false;
                }
                self.prefill_budget -= 1;
            }
            let Some(child) = self.link_child(pool, page, idx, child_role) else { return false };
            if self.pages[child as usize].as_ref().is_some_and(|c| c.prefilled) {
                continue;
            }
            if !self.prefill(pool, guest, child, child_role, 0..512) {
                return false;
            }
            if let Some(c) = self.pages[child as usize].as_mut() {
                c.prefilled = true;
            }
        }
        true
    }
}
