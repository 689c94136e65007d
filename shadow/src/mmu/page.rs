//! Shadow pages and their role (KVM's `struct kvm_mmu_page` and
//! `union kvm_mmu_page_role`, mmu_internal.h), and the pool addressing.

use super::*;

/// Access granted by the levels above a shadow page: bit 0 writable,
/// bit 1 user, bit 2 executable.
pub(super) type AccessBits = u8;
pub(super) const ACC_W: AccessBits = 1;
pub(super) const ACC_U: AccessBits = 2;
pub(super) const ACC_X: AccessBits = 4;
pub(super) const ACC_ALL: AccessBits = 7;

/// A shadow page's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct Role {
    pub(super) gfn: u64,
    pub(super) level: u8,
    pub(super) access: AccessBits,
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
        self.pages[page as usize].as_ref().map_or(0, |p| p.entries[idx as usize])
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
        gpa >= self.pool_base && gpa < self.pool_base + self.pages.len() as u64 * PAGE
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
