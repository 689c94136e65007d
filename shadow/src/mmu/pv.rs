//! pv mode's part of the shadow MMU: write batches, prefetch, published
//! roots (the shared-area layout is `guest_abi::pv`).
//!
//! # Semantics
//!
//! In pv mode the guest writes its page tables itself and queues the GPA of
//! every entry it wrote. [`ShadowMmu::apply_batch`] brings the shadow in
//! line with a queue: each entry goes through the very path a trapped write
//! takes ([`ShadowMmu::pte_written`]: update in place or zap), reading the
//! entry's *current* value from guest memory — so applying a batch after
//! the writes gives the same shadow as trapping each write as it happened
//! (the property test in `tests.rs` checks it), and an entry for a frame
//! that has since been freed or reused costs only a look-up. Between sync
//! points the shadow may hold translations the guest has changed: exactly
//! what a TLB may hold until `invlpg` or a CR3 load (SDM vol. 3 §4.10.4),
//! so a guest that syncs where hardware makes it flush sees x86 semantics.
//!
//! # Trust
//!
//! A batch is guest input. Every entry is checked before it is applied —
//! 8-byte aligned, no unknown flag bits, inside the page-table zone — and
//! the first entry that fails stops the batch: [`BatchOutcome`] says how
//! many were applied and why the next one was not. Nothing a batch holds
//! can make the shadow map more than the guest's tables allow, or anything
//! but guest RAM: entries only say *where* to look, the walker-side checks
//! (`leaf_spte`, reserved bits, table frames) decide *what* is mapped.
//! The work per batch is bounded by its length (at most
//! `guest_abi::pv::QUEUE_CAP` entries, each O(derived pages ≤ 32)), and a
//! batch marks the host stale at most once — the VMM invalidates once
//! before the guest runs again, whatever the batch held.

use super::*;
use guest_abi::pv::{BatchError, ENTRY_PAGE};

/// What [`ShadowMmu::apply_batch`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Entries applied, from the first on.
    pub applied: usize,
    /// The first entry not applied (its index is `applied`) and why; none
    /// after it was applied either.
    pub refused: Option<BatchError>,
}

impl ShadowMmu {
    /// Apply the write-queue `entries` (module doc): each an 8-byte entry's
    /// GPA, or a page GPA with `ENTRY_PAGE` for a rewritten page, inside
    /// `zone` (`[start, end)`, the page-table zone). Stops at the first bad
    /// entry. The current root's kernel half is refilled once, at the end.
    pub fn apply_batch(
        &mut self,
        vcpu: &mut ShadowVcpu,
        pool: &mut impl GuestPhys,
        guest: &mut impl GuestPhys,
        entries: &[u64],
        zone: (Gpa, Gpa),
    ) -> BatchOutcome {
        self.act(vcpu);
        self.stats.batches += 1;
        let mut outcome = BatchOutcome { applied: 0, refused: None };
        for &e in entries {
            let whole_page = e & ENTRY_PAGE != 0;
            let gpa = e & !ENTRY_PAGE;
            if e & 6 != 0 || (whole_page && gpa & 0xfff != 0) {
                outcome.refused = Some(BatchError::Unaligned);
                break;
            }
            if gpa < zone.0.raw() || gpa >= zone.1.raw() {
                outcome.refused = Some(BatchError::OutsideZone);
                break;
            }
            // A whole page rewritten is handled as a partial write: every
            // shadow entry derived from the page is zapped.
            self.sync_written(pool, guest, gpa, if whole_page { PAGE } else { 8 });
            outcome.applied += 1;
        }
        self.stats.batch_entries += outcome.applied as u64;
        self.refill_current_root(vcpu, pool, guest);
        outcome
    }

    /// Make `va`'s translation in the current root current, from the
    /// guest's tables and without touching them: the path is shadowed when
    /// every level is present with A set and nothing reserved, and the leaf
    /// gets the same permissions a hidden fault would give it (writable only
    /// if the guest entry is dirty). KVM's `pte_prefetch`, for the address
    /// the guest just mapped. Returns whether a leaf was installed.
    pub fn prefetch(
        &mut self,
        vcpu: &ShadowVcpu,
        pool: &mut impl GuestPhys,
        guest: &mut impl GuestPhys,
        va: Gva,
    ) -> bool {
        self.act(vcpu);
        let va = va.raw();
        let Some((_, mut page)) = self.loaded_root(vcpu) else { return false };
        let Some(mut role) = self.pages[page as usize].as_ref().map(|p| p.role) else { return false };
        for level in (1..=4u8).rev() {
            self.work += 1;
            let idx = guest_abi::paging::table_index(va, level) as u64;
            let gpa = (role.gfn << 12) + idx * 8;
            if !guest.is_ram(Gpa(gpa), 8) {
                return false;
            }
            let gpte = guest.read_u64(Gpa(gpa));
            if !shadowable(gpte, level, &self.rules) {
                return false;
            }
            if maps_page(gpte, level) {
                let Some(spte) = self.leaf_spte(guest, role, gpte) else { return false };
                self.set_leaf(pool, page, idx, spte);
                self.stats.prefetches += 1;
                return true;
            }
            if !self.tables.contains(Gpa(gpte & ADDR)) {
                return false;
            }
            let child_role = role.child(gpte, &self.rules);
            if !self.by_role.contains_key(&child_role) && self.free_pages() <= PREFILL_RESERVE {
                return false;
            }
            let Some(child) = self.link_child(pool, page, idx, child_role) else { return false };
            page = child;
            role = child_role;
        }
        false
    }

    /// `PV_FLUSH(va)`'s shadowing after the batch `entries` (the applied
    /// ones) was applied: make `va` current ([`ShadowMmu::prefetch`]), then
    /// shadow every leaf the batch wrote whose table had no shadow page
    /// when the batch was applied but has one now — a fault that mapped a
    /// large folio into a fresh page table wrote all its PTEs before the
    /// prefetch of `va` derived a shadow page from that table, and without
    /// this each other page of the folio would take a hidden fault (KVM's
    /// `FNAME(pte_prefetch)` fills neighbours of a fault the same way).
    /// Each leaf gets what a hidden fault would give it ([`shadowable`]
    /// guest entries only, A set, writable only if dirty); an entry already
    /// present was synced in place by the batch and is left alone. Returns
    /// how many leaves were filled. Entries only say where to look (the
    /// module doc's trust rule): one whose frame has no shadow page costs a
    /// look-up.
    pub fn prefetch_batch(
        &mut self,
        vcpu: &ShadowVcpu,
        pool: &mut impl GuestPhys,
        guest: &mut impl GuestPhys,
        va: Option<Gva>,
        entries: &[u64],
    ) -> usize {
        if let Some(va) = va {
            self.prefetch(vcpu, pool, guest, va);
        }
        let mut filled = 0;
        for &e in entries {
            if e & ENTRY_PAGE != 0 || e & 7 != 0 {
                continue;
            }
            let Some(derived) = self.rmap.get(&(e >> 12)) else { continue };
            if !guest.is_ram(Gpa(e), 8) {
                continue;
            }
            let idx = (e & 0xfff) / 8;
            for page in derived.clone() {
                self.work += 1;
                let Some(role) = self.pages[page as usize].as_ref().map(|p| p.role) else { continue };
                if self.entry(page, idx) & P != 0 {
                    continue;
                }
                let gpte = guest.read_u64(Gpa(e));
                if !maps_page(gpte, role.level) {
                    continue;
                }
                if let Some(spte) = self.leaf_spte(guest, role, gpte) {
                    self.set_leaf(pool, page, idx, spte);
                    filled += 1;
                }
            }
        }
        self.stats.batch_fills += filled as u64;
        filled
    }

    /// Make the root of `guest_cr3` current if it is not (pv mode: the
    /// guest may have loaded a published shadow root itself since the
    /// last exit). Not counted as a CR3 load when it already is current.
    pub fn follow_guest_root(
        &mut self,
        vcpu: &mut ShadowVcpu,
        pool: &mut impl GuestPhys,
        guest: &mut impl GuestPhys,
        guest_cr3: Gpa,
    ) -> Result<ShadowRoot, ShadowError> {
        self.act(vcpu);
        match self.loaded_root(vcpu) {
            Some((g, p)) if g == guest_cr3.raw() & ADDR => Ok(ShadowRoot(Gpa(self.page_gpa(p)))),
            _ => self.load_cr3(vcpu, pool, guest, guest_cr3),
        }
    }

    /// Make the cached root whose shadow root lies at `shadow_root` (the
    /// vCPU's CR3) current, as if its guest root had been loaded: a pv guest
    /// may switch to a published root without an exit. Returns whether it
    /// is a cached root (anything else — a stale or made-up address — is
    /// ignored: the guest then runs on what it loaded, which only hurts
    /// itself). On SMP the VMM calls it at every exit: it is how the MMU
    /// learns a vCPU left a root in limbo (`remote.rs`), and a vCPU found on
    /// one is moved to its guest root's shadow — point CR3 at
    /// [`ShadowMmu::current_root`] whenever it differs.
    pub fn follow_shadow_root(
        &mut self,
        vcpu: &mut ShadowVcpu,
        pool: &mut impl GuestPhys,
        guest: &mut impl GuestPhys,
        shadow_root: Gpa,
    ) -> Result<bool, ShadowError> {
        self.act(vcpu);
        let hw_page = self.page_of(shadow_root.raw() & ADDR);
        // SMP: a published root the guest loaded and another vCPU evicted
        // or zapped since (`remote.rs`): back to its guest root.
        if let Some(g) = hw_page.and_then(|p| self.limbo_root(p)) {
            self.load_cr3(vcpu, pool, guest, Gpa(g))?;
            self.leave_limbo(pool, vcpu.id, None);
            return Ok(true);
        }
        self.leave_limbo(pool, vcpu.id, hw_page);
        let Some(page) = hw_page else { return Ok(false) };
        match self.loaded_root(vcpu) {
            Some((_, p)) if p == page => Ok(true),
            _ => match self.roots.iter().find(|&&(_, p)| p == page) {
                Some(&(g, _)) => self.load_cr3(vcpu, pool, guest, Gpa(g)).map(|_| true),
                None => Ok(false),
            },
        }
    }

    /// The roots a pv guest may load by itself, most recent first:
    /// `(guest root, shadow root GPA)` of every cached root whose kernel
    /// half is shadowed (one that lost entries is left out until the next
    /// `LOAD_CR3` refills it: fault delivery must not fault).
    pub fn published_roots(&self) -> impl Iterator<Item = (Gpa, ShadowRoot)> + '_ {
        self.roots
            .iter()
            .filter(|&&(_, p)| self.pages[p as usize].as_ref().is_some_and(|sp| !sp.needs_prefill))
            .map(|&(g, p)| (Gpa(g), ShadowRoot(Gpa(self.page_gpa(p)))))
    }
}
