//! Shadow pages and their role (KVM's `struct kvm_mmu_page` and
//! `union kvm_mmu_page_role`, mmu_internal.h), and the pool addressing.
//!
//! # Invariants
//!
//! - One shadow page per role; a page's `entries` are the truth and the pool
//!   copy is written from them only (`put`), never read to decide.
//! - `parents` lists every shadow entry pointing at the page: a page with no
//!   parent that is not a pinned root is freed.
//! - A child's access is its parent's ANDed with the guest entry's RW, US
//!   and ¬XD, so a role never grants more than the path above it.

use super::*;

/// Access granted by the levels above a shadow page: bit 0 writable,
/// bit 1 user, bit 2 executable.
pub(super) type AccessBits = u8;
pub(super) const ACC_W: AccessBits = 1;
pub(super) const ACC_U: AccessBits = 2;
pub(super) const ACC_X: AccessBits = 4;
pub(super) const ACC_ALL: AccessBits = 7;

/// A shadow page's role: what it shadows and under which access; pages
/// are looked up by it, so equal roles share one shadow page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct Role {
    /// The guest table frame shadowed.
    pub(super) gfn: u64,
    /// 4 = PML4 … 1 = PT.
    pub(super) level: u8,
    /// The access the levels above grant.
    pub(super) access: AccessBits,
}

impl Role {
    /// The role of the root shadowing the guest PML4 at `guest_root`.
    pub(super) fn root(guest_root: u64) -> Role {
        Role { gfn: guest_root >> 12, level: 4, access: ACC_ALL }
    }

    /// The role of the shadow page for the table that entry `gpte` of a
    /// page of this role points at.
    pub(super) fn child(self, gpte: u64, rules: &PagingMode) -> Role {
        Role { gfn: (gpte & ADDR) >> 12, level: self.level - 1, access: child_access(self.access, gpte, rules) }
    }
}

#[derive(Debug)]
pub(super) struct ShadowPage {
    pub(super) role: Role,
    /// `(parent page, index)` of every shadow entry pointing here: a set,
    /// so unlinking one of 400,000 sharers is O(1), not a scan.
    pub(super) parents: HashSet<(u32, u16)>,
    /// Pinned as a root.
    pub(super) root: bool,
    /// A root whose kernel half may have lost entries since it was last
    /// prefilled (set when an entry of a level-4 page is zapped).
    pub(super) needs_prefill: bool,
    /// Every guest entry of this page that prefill would shadow was
    /// shadowed, and none of this page's entries was zapped since: a
    /// prefill reaching it again need not descend (cleared by a zap).
    pub(super) prefilled: bool,
    /// The page's 512 entries as the VMM wrote them: the truth. The pool
    /// copy is written from here and never read back (the trust model).
    pub(super) entries: Box<[u64; 512]>,
}

impl ShadowMmu {
    pub(super) fn page_gpa(&self, page: u32) -> u64 {
        self.pool_base + page as u64 * PAGE
    }

    /// The pool page holding `gpa`, if `gpa` lies in the pool.
    pub(super) fn page_of(&self, gpa: u64) -> Option<u32> {
        self.in_pool_raw(gpa).then(|| ((gpa - self.pool_base) / PAGE) as u32)
    }

    /// The child shadow page a present non-leaf entry `e` of a level-`level`
    /// page points at (`None` for a leaf or anything outside the pool).
    pub(super) fn child_of(&self, e: u64, level: u8) -> Option<u32> {
        if e & P == 0 || level == 1 || e & PS != 0 {
            return None;
        }
        self.page_of(e & ADDR)
    }

    /// Entry `idx` of shadow page `page`, from the VMM's copy (0 for a page
    /// not in use). The pool is never read to decide anything: a guest
    /// can write it (see the module doc, "Trust model").
    pub(super) fn entry(&self, page: u32, idx: u64) -> u64 {
        self.pages.get(page as usize).and_then(|p| p.as_ref()).map_or(0, |p| p.entries[idx as usize])
    }

    /// Set entry `idx` of `page` in the VMM's copy and in the pool.
    pub(super) fn put(&mut self, pool: &mut impl GuestPhys, page: u32, idx: u64, value: u64) {
        let at = self.page_gpa(page) + idx * 8;
        if let Some(p) = self.pages[page as usize].as_mut() {
            p.entries[idx as usize] = value;
        }
        pool.write_u64(Gpa(at), value);
    }

    /// Whether `gpa` lies in the pool.
    pub fn in_pool(&self, gpa: Gpa) -> bool {
        self.in_pool_raw(gpa.raw())
    }

    pub(super) fn in_pool_raw(&self, gpa: u64) -> bool {
        gpa >= self.pool_base && gpa < self.pool_base + u64::from(self.capacity) * PAGE
    }
}

/// The access a child grants given its parent's and the guest entry.
pub(super) fn child_access(parent: AccessBits, gpte: u64, mode: &PagingMode) -> AccessBits {
    let mut a = parent;
    if gpte & RW == 0 {
        a &= !ACC_W;
    }
    if gpte & US == 0 {
        a &= !ACC_U;
    }
    if mode.nxe && gpte & XD != 0 {
        a &= !ACC_X;
    }
    a
}
