//! The SPTE rules: the shadow leaf for a guest leaf (KVM's `make_spte`,
//! spte.c), and CR0.WP = 0 under SMEP and SMAP (the mmu module doc,
//! "Paging controls").
//!
//! # Invariants
//!
//! - A shadow leaf exists only for a present guest leaf with A set and no
//!   reserved bit, maps only guest RAM, carries the effective permissions of
//!   the walk (US, RW only if the guest entry is dirty, XD) and never more.
//! - A writable user leaf for a supervisor write under CR0.WP = 0 and SMAP
//!   exists only while no other user leaf lets user mode run; the first
//!   user-mode access ends it.
//! - `restricts` is conservative: any change of frame or loss of a
//!   permission counts.

use super::*;

impl ShadowMmu {
    /// The shadow leaf for guest leaf `gpte` under a page of role `role`,
    /// or `None` when it must not be shadowed (no A bit, outside RAM).
    pub(super) fn leaf_spte(&self, guest: &impl GuestPhys, role: Role, gpte: u64) -> Option<u64> {
        if !shadowable(gpte, role.level, &self.rules) {
            return None;
        }
        let size = 1u64 << (12 + 9 * (role.level as u32 - 1));
        let base = gpte & ADDR & !(size - 1);
        if !guest.is_ram(Gpa(base), size) {
            return None;
        }
        let access = child_access(role.access, gpte, &self.rules);
        // D only on writable leaves: a read-only leaf keeps D clear, so
        // that a write the hardware lets through it (the guest's own
        // CR0.WP = 0, not reported) leaves D set in the pool, where
        // `harvest_dirty_leaves` finds it.
        let mut spte = base | P | A;
        if role.level > 1 {
            spte |= PS;
        }
        if access & ACC_U != 0 {
            spte |= US;
        }
        if access & ACC_W != 0 && gpte & D != 0 {
            spte |= RW | D;
        }
        if self.rules.nxe && access & ACC_X == 0 {
            spte |= XD;
        }
        // No user leaf may be executable while a user-writable leaf for a
        // supervisor write exists: user mode must fault first.
        if !self.user_write_leaves.is_empty() && spte & US != 0 {
            spte |= XD;
        }
        Some(spte)
    }

    /// The leaf for `access` given the ordinary leaf `spte` (module doc,
    /// "Paging controls"; KVM's `FNAME(page_fault)`, paging_tmpl.h), and
    /// whether it is a user-writable leaf for a supervisor write. With
    /// CR0.WP = 0 a supervisor write ignores R/W (SDM vol. 3 §4.6.1): the
    /// leaf becomes writable and supervisor-only, and with CR4.SMEP also XD
    /// if the guest page is a user page (a supervisor fetch from it must
    /// still fault, `#PF` 0x11). Under CR4.SMAP a user page stays a user
    /// leaf (writable, XD) so that SMAP keeps checking supervisor accesses.
    pub(super) fn wp_off_write_leaf(&self, spte: u64, access: Access) -> (u64, bool) {
        let user_page = spte & US != 0;
        if !access.write || access.user || self.rules.wp || spte & RW != 0 {
            return (spte, false);
        }
        if user_page && self.rules.smap {
            return (spte | RW | D | XD, true);
        }
        let mut leaf = (spte | RW | D) & !US;
        if user_page && self.rules.smep {
            leaf |= XD;
        }
        (leaf, false)
    }

    /// A user-mode access: the user-writable leaves made for supervisor
    /// writes (module doc, "Paging controls") must not serve it. Zap them;
    /// the access refaults and gets the ordinary leaf.
    pub(super) fn end_user_write_leaves(&mut self, pool: &mut impl GuestPhys) {
        for (page, idx, spte) in std::mem::take(&mut self.user_write_leaves) {
            if self.pages[page as usize].is_some() && pool.read_u64(Gpa(self.page_gpa(page) + idx * 8)) == spte {
                self.zap_entry(pool, page, idx);
            }
        }
    }

    /// Zap every user-accessible leaf in the pool except `keep`: user mode
    /// must fault before it can use a user-writable leaf made for a
    /// supervisor write. O(pool), for a rare combination of controls.
    pub(super) fn zap_user_leaves_except(&mut self, pool: &mut impl GuestPhys, keep: (u32, u64)) {
        for page in 0..self.pages.len() as u32 {
            let Some(role) = self.pages[page as usize].as_ref().map(|p| p.role) else { continue };
            // A root holds no leaves, and under a supervisor-only parent no
            // leaf is a user leaf.
            if role.level == 4 || role.access & ACC_U == 0 {
                continue;
            }
            let level = role.level;
            for idx in 0..512u64 {
                if (page, idx) == keep {
                    continue;
                }
                let e = pool.read_u64(Gpa(self.page_gpa(page) + idx * 8));
                let leaf = e & P != 0 && (level == 1 || e & PS != 0);
                if leaf && e & US != 0 {
                    self.zap_entry(pool, page, idx);
                }
            }
        }
    }
}

/// Whether `new` grants less than `old` (another frame, or a permission
/// bit removed): the host must forget `old`. US counts either way: under
/// CR4.SMAP a user page forbids supervisor data accesses (implicit ones
/// always, Intel SDM vol. 3 §4.6.1) and under CR4.SMEP supervisor fetches,
/// so a supervisor leaf becoming a user leaf takes rights away too. (Found
/// by the SMEP/SMAP access-matrix rows on the nested host whose KVM shadows
/// page tables: an implicit supervisor read of a page whose leaf had just
/// gained US went through on the host's stale supervisor translation.)
pub(super) fn restricts(old: u64, new: u64) -> bool {
    if new & P == 0 || (old & ADDR) != (new & ADDR) {
        return true;
    }
    (old & RW != 0 && new & RW == 0) || (old & US) != (new & US) || (old & XD == 0 && new & XD != 0)
}

/// Whether guest entry `gpte` of a level-`level` table may be shadowed at
/// all: present, accessed (invariant 2) and without reserved bits.
pub(super) fn shadowable(gpte: u64, level: u8, rules: &PagingMode) -> bool {
    gpte & (P | A) == (P | A) && gpte & walker::reserved_mask(rules, level, gpte) == 0
}

/// Whether guest entry `gpte` of a level-`level` table maps a page (a PT
/// entry, or PS in a PD or PDPT entry) rather than a table.
pub(super) fn maps_page(gpte: u64, level: u8) -> bool {
    level == 1 || (level <= 3 && gpte & PS != 0)
}
