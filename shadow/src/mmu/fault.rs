//! `SHADOW_FAULT`: the guest walk and the shadow path it implies (KVM's
//! `FNAME(page_fault)` and `FNAME(fetch)`, paging_tmpl.h).
//!
//! # Invariants
//!
//! - The walk uses the faulting vCPU's paging controls (RFLAGS.AC included)
//!   and only tables in trapped frames (invariant 6); a failed walk is the
//!   guest's own `#PF` with the walker's error code, and changes no shadow.
//! - A successful walk installs the shadow path of exactly that translation
//!   (invariants 1, 2), with the leaf from `spte.rs`; the answer is `Fixed`
//!   only when the leaf was installed or was not needed. A 4 KiB leaf also
//!   brings the used entries of its aligned block of `PTE_PREFETCH` beside
//!   it (KVM's `pte_prefetch`), each as a hidden fault would make it: the
//!   guest entries are only read.
//! - The same fault fixed twice with nothing changed in between is
//!   invariant 7's case, never an endless loop.
//! - A pool exhaustion midway zaps everything and rebuilds the vCPU's root
//!   once; a second one is [`ShadowError::PoolTooSmall`].

use super::*;

/// What a shadow fault resolved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOutcome {
    /// The shadow now maps the address: retry the access (a hidden fault).
    Fixed,
    /// The guest's own tables forbid the access: deliver a `#PF` with this
    /// error code to the guest.
    GuestFault(u32),
}

impl ShadowMmu {
    /// `SHADOW_FAULT(cr2, error_code)`.
    pub fn handle_fault(
        &mut self,
        vcpu: &mut ShadowVcpu,
        pool: &mut impl GuestPhys,
        guest: &mut impl GuestPhys,
        cr2: Gva,
        error_code: u32,
    ) -> Result<FaultOutcome, ShadowError> {
        self.act(vcpu);
        // A root a zap of everything (done for another vCPU) made obsolete
        // is rebuilt first; the VMM points CR3 at the new one.
        self.reload_obsolete(vcpu, pool, guest)?;
        let (guest_cr3, mut root) = self.loaded_root(vcpu).ok_or(ShadowError::NoRoot)?;
        let guest_cr3 = Gpa(guest_cr3);
        let cr2 = cr2.raw();
        let access = Access::from_error_code(error_code);
        let repeat = vcpu.last_fixed == Some((cr2, error_code, self.epoch));
        vcpu.last_fixed = None;
        if repeat {
            // Invariant 7. The retried access faulted again although the
            // shadow now grants what the walk allowed. An implicit
            // supervisor access (GDT, IDT, TSS, ...) with SMAP faults even
            // with AC = 1 (SDM vol. 3 §4.6.1), and its error code looks like
            // an explicit access: walk it as one with AC = 0.
            if vcpu.mode.smap && vcpu.mode.ac && !access.user && !access.fetch {
                let implicit = PagingMode { ac: false, ..vcpu.mode };
                let mut zoned = Zoned { mem: guest, tables: self.tables };
                if let Err(f) = walker::walk(&mut zoned, guest_cr3, Gva(cr2), access, &implicit) {
                    self.stats.guest_faults += 1;
                    return Ok(FaultOutcome::GuestFault(f.error_code));
                }
            }
            return Err(ShadowError::Livelock { cr2: Gva(cr2), error_code });
        }
        // User mode is running (even if this access faults for the
        // guest): the user-writable leaves made for supervisor writes must
        // go before it can use them (module doc, "Paging controls").
        if access.user && !self.user_write_leaves.is_empty() {
            self.end_user_write_leaves(pool);
        }
        let mut zoned = Zoned { mem: guest, tables: self.tables };
        let t = match walker::walk(&mut zoned, guest_cr3, Gva(cr2), access, &vcpu.mode) {
            Ok(t) => t,
            Err(f) => {
                self.stats.guest_faults += 1;
                return Ok(FaultOutcome::GuestFault(f.error_code));
            }
        };
        // A supervisor fetch from a user page (SMEP off) needs an
        // executable user leaf, which user mode could then run: end them
        // too.
        if access.fetch && t.user && !self.user_write_leaves.is_empty() {
            self.end_user_write_leaves(pool);
        }
        for attempt in 0..2 {
            if self.install(pool, guest, root, cr2, &t, access)? {
                self.stats.hidden_faults += 1;
                vcpu.last_fixed = Some((cr2, error_code, self.epoch));
                return Ok(FaultOutcome::Fixed);
            }
            if attempt == 0 {
                // Pool exhausted: start over with an empty pool.
                self.stats.pool_exhaustions += 1;
                self.zap_everything(pool);
                self.load_cr3(vcpu, pool, guest, guest_cr3)?;
                root = self.loaded_root(vcpu).ok_or(ShadowError::NoRoot)?.1;
            }
        }
        Err(ShadowError::PoolTooSmall)
    }

    /// Build the shadow path below `root` for a successful walk; `false` if
    /// the pool ran out.
    pub(super) fn install(
        &mut self,
        pool: &mut impl GuestPhys,
        guest: &mut impl GuestPhys,
        root: u32,
        va: u64,
        t: &walker::Translation,
        access: Access,
    ) -> Result<bool, ShadowError> {
        let mut page = root;
        let mut role = self.pages[page as usize].as_ref().expect("root exists").role;
        for depth in 0..t.levels as usize {
            self.work += 1;
            let level = 4 - depth as u8;
            let idx = guest_abi::paging::table_index(va, level) as u64;
            let gpte = guest.read_u64(t.entry_gpas[depth]);
            if depth + 1 == t.levels as usize {
                let Some(spte) = self.leaf_spte(guest, role, gpte) else { return Ok(true) };
                let (spte, user_write) = self.wp_off_write_leaf(spte, access);
                self.set_leaf(pool, page, idx, spte);
                if role.level == 1 && !user_write {
                    self.prefetch_neighbours(pool, guest, page, role, idx);
                }
                if user_write {
                    self.zap_user_leaves_except(pool, (page, idx));
                    self.user_write_leaves.push((page, idx, spte));
                }
                return Ok(true);
            }
            let child_role = role.child(gpte, &self.rules);
            match self.link_child(pool, page, idx, child_role) {
                Some(child) => {
                    page = child;
                    role = child_role;
                }
                None => return Ok(false),
            }
        }
        Ok(true)
    }

    /// After a hidden fault installed leaf `idx` of the level-1 `page`
    /// (role `role`): shadow every other entry of its aligned block of
    /// [`PTE_PREFETCH`] that the shadow does not map and whose guest entry
    /// may be shadowed (present, A set, nothing reserved: invariant 2),
    /// with the leaf a hidden fault would give it (KVM's
    /// `FNAME(pte_prefetch)`). The pages of a large folio mapped into a
    /// fresh page table then cost one hidden fault, not one each. Reads
    /// the guest's entries only.
    fn prefetch_neighbours(
        &mut self,
        pool: &mut impl GuestPhys,
        guest: &mut impl GuestPhys,
        page: u32,
        role: Role,
        idx: u64,
    ) {
        let first = idx & !(PTE_PREFETCH - 1);
        for i in first..first + PTE_PREFETCH {
            self.work += 1;
            let gpa = Gpa((role.gfn << 12) + i * 8);
            if i == idx || self.entry(page, i) & P != 0 || !guest.is_ram(gpa, 8) {
                continue;
            }
            if let Some(spte) = self.leaf_spte(guest, role, guest.read_u64(gpa)) {
                self.set_leaf(pool, page, i, spte);
                self.stats.pte_prefetches += 1;
            }
        }
    }

    /// Make entry `idx` of `page` point at the shadow page for
    /// `child_role`, creating it if needed; `None` if the pool is empty.
    pub(super) fn link_child(
        &mut self,
        pool: &mut impl GuestPhys,
        page: u32,
        idx: u64,
        child_role: Role,
    ) -> Option<u32> {
        let old = self.entry(page, idx);
        if old & P != 0 {
            // A leaf here (the guest turned a large page into a table) or a
            // child of another role is zapped; only the right child is kept.
            let level = self.pages[page as usize].as_ref().map_or(1, |p| p.role.level);
            if let Some(cur) = self.child_of(old, level)
                && self.pages.get(cur as usize).and_then(|p| p.as_ref()).is_some_and(|p| p.role == child_role)
            {
                return Some(cur);
            }
            self.zap_entry(pool, page, idx);
        }
        let child = self.get_or_create(pool, child_role)?;
        self.put(pool, page, idx, self.page_gpa(child) | P | RW | US | A);
        self.work += 1;
        if let Some(c) = self.pages[child as usize].as_mut() {
            c.parents.insert((page, idx as u16));
        }
        Some(child)
    }
}
