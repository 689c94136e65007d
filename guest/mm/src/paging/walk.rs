//! The page table itself: [`PageTable`], its construction, and the walks
//! that only read it (translation, leaf lookup, the next leaf of a range),
//! with the entry accessors the other files share. Mapping is in `map.rs`,
//! unmapping and teardown in `unmap.rs`, the checker in `invariants.rs`.
//!
//! Part of [`crate::paging`]; its module doc states the invariants. Here:
//! a walk reads entries only through [`read_entry`] and never writes; it
//! stops at the first not-present entry or leaf, so it never follows a
//! leaf's frame as a table.

use super::*;

/// A successful translation.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Translation {
    /// The physical address the virtual address maps to.
    pub addr: Gpa,
    /// The first address of the frame the page maps to.
    pub frame: Gpa,
    /// The leaf's flags, without `PS` (the size says it).
    pub flags: PteFlags,
    /// The page size.
    pub size: PageSizeKind,
}

/// A leaf entry found by a walk.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Leaf {
    /// First virtual address of the page.
    pub va: Gva,
    /// Physical address of the entry itself (to read or update it).
    pub entry_addr: Gpa,
    /// The entry.
    pub entry: PageTableEntry,
    /// The page size.
    pub size: PageSizeKind,
}

impl Leaf {
    /// The leaf's flags without `PS`.
    pub const fn flags(&self) -> PteFlags {
        self.entry.flags().difference(PteFlags::HUGE)
    }
}

/// Address of entry `idx` of `table`.
#[inline]
pub(super) fn entry_addr(table: Pfn, idx: usize) -> Gpa {
    Gpa(table.addr().0 + idx as u64 * 8)
}

#[inline]
pub(super) fn read_entry<M: PhysMem>(mem: &M, table: Pfn, idx: usize) -> PageTableEntry {
    PageTableEntry(mem.read_u64(entry_addr(table, idx)))
}

#[inline]
pub(super) fn write_entry<M: PhysMem>(mem: &M, table: Pfn, idx: usize, e: PageTableEntry) {
    mem.write_u64(entry_addr(table, idx), e.0)
}

/// The path of tables a walk went through: `tables[level]` is the table
/// at that level (index 4 = the root), valid for levels above the walk's
/// stopping level.
#[derive(Clone, Copy)]
pub(super) struct Path {
    pub(super) tables: [Pfn; 5],
}

/// Four-level page tables rooted at one PML4 page.
///
/// The value is a handle: it owns the root page, and tables are reached
/// through the [`PhysMem`] passed to each call. See the module
/// documentation for the invariants every method keeps.
#[derive(Debug, PartialEq, Eq)]
pub struct PageTable {
    pub(super) root: Pfn,
    pub(super) pinned_upper: bool,
}

impl PageTable {
    /// Empty page tables: one root page from `src`. `None` if `src` is
    /// exhausted.
    pub fn new<T: PageTableSource>(src: &mut T) -> Option<Self> {
        Some(Self { root: src.alloc_table()?, pinned_upper: false })
    }

    /// Empty page tables whose upper-half PDPTs, once created, are never
    /// freed by an unmap (they are, or will be, shared with other roots:
    /// the kernel template and every address space).
    pub fn new_pinned_upper<T: PageTableSource>(src: &mut T) -> Option<Self> {
        Some(Self { root: src.alloc_table()?, pinned_upper: true })
    }

    /// Take over existing tables rooted at `root` (built by this module).
    pub const fn from_root(root: Pfn, pinned_upper: bool) -> Self {
        Self { root, pinned_upper }
    }

    /// The PML4 page (what CR3 points at).
    pub const fn root(&self) -> Pfn {
        self.root
    }

    /// Whether upper-half PDPTs are pinned.
    pub const fn pinned_upper(&self) -> bool {
        self.pinned_upper
    }

    /// The translation of `va`, as the CPU would find it, or `None` if it
    /// is not mapped (or not canonical).
    pub fn translate<M: PhysMem>(&self, mem: &M, va: Gva) -> Option<Translation> {
        let leaf = self.leaf(mem, va)?;
        let bytes = leaf.size.bytes();
        let frame = leaf.entry.addr().0 & !(bytes - 1);
        Some(Translation {
            addr: Gpa(frame | (va.0 & (bytes - 1))),
            frame: Gpa(frame),
            flags: leaf.flags(),
            size: leaf.size,
        })
    }

    /// The leaf entry that maps `va`, if any.
    pub fn leaf<M: PhysMem>(&self, mem: &M, va: Gva) -> Option<Leaf> {
        if !is_canonical(va.0) {
            return None;
        }
        let mut table = self.root;
        let mut level = 4u8;
        loop {
            let idx = table_index(va.0, level);
            let e = read_entry(mem, table, idx);
            if !e.is_present() {
                return None;
            }
            if e.is_leaf_at(level) {
                let span = level_span(level);
                return Some(Leaf {
                    va: Gva(va.0 & !(span - 1)),
                    entry_addr: entry_addr(table, idx),
                    entry: e,
                    size: PageSizeKind::from_level(level),
                });
            }
            table = Pfn::containing(e.addr());
            level -= 1;
        }
    }

    /// The first leaf whose page starts at or after `from` and before
    /// `end`, in table order: both are taken as 48-bit linear positions
    /// (bits 63..=48 dropped), so the lower half comes first, then the
    /// upper half; `Gva(1 << 47)` ends the lower half and `Gva(u64::MAX)`
    /// the whole space. Visits only present entries.
    pub fn next_leaf<M: PhysMem>(&self, mem: &M, from: Gva, end: Gva) -> Option<Leaf> {
        let (from, end) = (from.0 & LINEAR_MASK, end.0 & LINEAR_MASK);
        if from >= end {
            return None;
        }
        Self::next_in(mem, self.root, 4, 0, from, end)
    }

    fn next_in<M: PhysMem>(mem: &M, table: Pfn, level: u8, base: u64, from: u64, end: u64) -> Option<Leaf> {
        let span = level_span(level);
        let first = if from > base { ((from - base) / span) as usize } else { 0 };
        for idx in first..ENTRIES {
            let va = base + idx as u64 * span;
            if va >= end {
                return None;
            }
            let e = read_entry(mem, table, idx);
            if !e.is_present() {
                continue;
            }
            if e.is_leaf_at(level) {
                if va >= from {
                    return Some(Leaf {
                        va: Gva(canonicalize(va)),
                        entry_addr: entry_addr(table, idx),
                        entry: e,
                        size: PageSizeKind::from_level(level),
                    });
                }
                continue;
            }
            if let Some(l) = Self::next_in(mem, Pfn::containing(e.addr()), level - 1, va, from, end) {
                return Some(l);
            }
        }
        None
    }

    // ---- internals ----

    /// Walk to the entry at `level` for `va`, which must be a leaf.
    pub(super) fn find_exact<M: PhysMem>(
        &self,
        mem: &M,
        va: u64,
        level: u8,
    ) -> Result<(Pfn, usize, PageTableEntry), UnmapError> {
        self.walk_exact(mem, va, level).map(|(path, idx, e)| (path.tables[level as usize], idx, e))
    }

    pub(super) fn walk_exact<M: PhysMem>(
        &self,
        mem: &M,
        va: u64,
        level: u8,
    ) -> Result<(Path, usize, PageTableEntry), UnmapError> {
        let mut path = Path { tables: [self.root; 5] };
        let mut table = self.root;
        let mut l = 4u8;
        while l > level {
            let e = read_entry(mem, table, table_index(va, l));
            if !e.is_present() {
                return Err(UnmapError::NotMapped);
            }
            if e.is_leaf_at(l) {
                return Err(UnmapError::SizeMismatch(PageSizeKind::from_level(l)));
            }
            table = Pfn::containing(e.addr());
            l -= 1;
            path.tables[l as usize] = table;
        }
        let idx = table_index(va, level);
        let e = read_entry(mem, table, idx);
        if !e.is_leaf_at(level) {
            return Err(UnmapError::NotMapped);
        }
        Ok((path, idx, e))
    }
}
