//! The page table itself: [`PageTable`], its walks, maps, unmaps and protections.
//!
//! Part of [`crate::paging`]; its module doc states the invariants.

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
fn entry_addr(table: Pfn, idx: usize) -> Gpa {
    Gpa(table.addr().0 + idx as u64 * 8)
}

#[inline]
pub(super) fn read_entry<M: PhysMem>(mem: &M, table: Pfn, idx: usize) -> PageTableEntry {
    PageTableEntry(mem.read_u64(entry_addr(table, idx)))
}

#[inline]
fn write_entry<M: PhysMem>(mem: &M, table: Pfn, idx: usize, e: PageTableEntry) {
    mem.write_u64(entry_addr(table, idx), e.0)
}

/// The path of tables a walk went through: `tables[level]` is the table
/// at that level (index 4 = the root), valid for levels above the walk's
/// stopping level.
#[derive(Clone, Copy)]
struct Path {
    tables: [Pfn; 5],
}

/// Four-level page tables rooted at one PML4 page.
///
/// The value is a handle: it owns the root page, and tables are reached
/// through the [`PhysMem`] passed to each call. See the module
/// documentation for the invariants every method keeps.
#[derive(Debug, PartialEq, Eq)]
pub struct PageTable {
    root: Pfn,
    pinned_upper: bool,
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

    /// Map `page` to `frame` with `flags` (P and, above 4 KiB, PS are added;
    /// bits outside [`PteFlags::LEAF_SETTABLE`] are dropped). Creates the
    /// missing tables. Needs no TLB flush (module documentation).
    pub fn map<S: PageSize, M: PhysMem, T: PageTableSource>(
        &mut self,
        mem: &M,
        src: &mut T,
        page: Page<S>,
        frame: PhysFrame<S>,
        flags: PteFlags,
    ) -> Result<(), MapError> {
        let flags = flags.intersection(PteFlags::LEAF_SETTABLE).union(PteFlags::PRESENT);
        let flags = if S::LEVEL > 1 { flags.union(PteFlags::HUGE) } else { flags };
        self.install(mem, src, page.start().0, S::LEVEL, PageTableEntry::new(frame.start(), flags)).map(|_| ())
    }

    /// Map `pages` consecutive pages from `page` to consecutive frames from
    /// `frame`, as that many [`map`](Self::map) calls would, but walking
    /// the tables once per leaf table instead of once per page: the kernel
    /// maps all of RAM with it at boot. On an error the pages before the
    /// failing one stay mapped. Needs no TLB flush.
    pub fn map_range<S: PageSize, M: PhysMem, T: PageTableSource>(
        &mut self,
        mem: &M,
        src: &mut T,
        page: Page<S>,
        frame: PhysFrame<S>,
        pages: u64,
        flags: PteFlags,
    ) -> Result<(), MapError> {
        let Some(last_va) =
            pages.checked_sub(1).map(|n| n.checked_mul(S::SIZE).and_then(|b| page.start().0.checked_add(b)))
        else {
            return Ok(());
        };
        let last_pa = frame.start().0.checked_add((pages - 1).saturating_mul(S::SIZE));
        match (last_va, last_pa) {
            (Some(v), Some(p)) if is_canonical(v) && (v ^ page.start().0) >> 47 == 0 && p < 1 << 52 => {}
            _ => return Err(MapError::NotCanonical),
        }
        let flags = flags.intersection(PteFlags::LEAF_SETTABLE).union(PteFlags::PRESENT);
        let flags = if S::LEVEL > 1 { flags.union(PteFlags::HUGE) } else { flags };
        let mut i = 0;
        while i < pages {
            let (va, pa) = (page.start().0 + i * S::SIZE, frame.start().0 + i * S::SIZE);
            let (table, fresh) = self.install(mem, src, va, S::LEVEL, PageTableEntry::new(Gpa(pa), flags))?;
            i += 1;
            // The rest of this leaf table, entry by entry; a table this call
            // just took from the source is all zeroes (the source's
            // contract), so its entries need not be read first.
            let first = table_index(va, S::LEVEL) + 1;
            let n = (ENTRIES - first).min((pages - i) as usize);
            // Consecutive frames: add the page size to the whole entry (the
            // last frame's address was checked to fit below bit 52, so the
            // flag bits above it never change).
            let mut entry = PageTableEntry::new(Gpa(pa), flags).0;
            if fresh {
                // The guest kernel maps all of RAM with this loop at boot.
                for idx in first..first + n {
                    entry += S::SIZE;
                    write_entry(mem, table, idx, PageTableEntry(entry));
                }
                i += n as u64;
                continue;
            }
            for idx in first..first + n {
                let e = read_entry(mem, table, idx);
                if e.is_present() {
                    return Err(if e.is_leaf_at(S::LEVEL) { MapError::AlreadyMapped } else { MapError::TableInTheWay });
                }
                entry += S::SIZE;
                write_entry(mem, table, idx, PageTableEntry(entry));
                i += 1;
            }
        }
        Ok(())
    }

    /// Remove the mapping of `page`. Returns the frame, the flags it had
    /// (without PS) and the flush to perform. Tables left empty are freed.
    pub fn unmap<S: PageSize, M: PhysMem, T: PageTableSource>(
        &mut self,
        mem: &M,
        src: &mut T,
        page: Page<S>,
    ) -> Result<(PhysFrame<S>, PteFlags, MapperFlush), UnmapError> {
        let (entry, flush) = self.unmap_at(mem, src, page.start().0, S::LEVEL)?;
        let frame = PhysFrame { start: entry.addr(), _size: PhantomData };
        Ok((frame, entry.flags().difference(PteFlags::HUGE), flush))
    }

    /// Replace the flags of the mapping of `page` (as in `map`: P and PS
    /// kept by the mapper). Returns the flush to perform.
    pub fn protect<S: PageSize, M: PhysMem>(
        &mut self,
        mem: &M,
        page: Page<S>,
        flags: PteFlags,
    ) -> Result<MapperFlush, UnmapError> {
        let (table, idx, old) = self.find_exact(mem, page.start().0, S::LEVEL)?;
        let mut flags = flags.intersection(PteFlags::LEAF_SETTABLE).union(PteFlags::PRESENT);
        if S::LEVEL > 1 {
            flags.insert(PteFlags::HUGE);
        }
        write_entry(mem, table, idx, old.with_flags(flags));
        Ok(MapperFlush::new(page.start()))
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

    /// Rewrite the leaf mapping `va` with `f(old flags)` (P and PS are
    /// kept by the mapper; the frame is unchanged). Returns the leaf as it
    /// was and the flush to perform.
    pub fn update_leaf<M: PhysMem>(
        &mut self,
        mem: &M,
        va: Gva,
        f: impl FnOnce(PteFlags) -> PteFlags,
    ) -> Result<(Leaf, MapperFlush), UnmapError> {
        let leaf = self.leaf(mem, va).ok_or(UnmapError::NotMapped)?;
        let mut flags = f(leaf.flags()).intersection(PteFlags::LEAF_SETTABLE).union(PteFlags::PRESENT);
        if leaf.size != PageSizeKind::Size4KiB {
            flags.insert(PteFlags::HUGE);
        }
        mem.write_u64(leaf.entry_addr, leaf.entry.with_flags(flags).0);
        Ok((leaf, MapperFlush::new(leaf.va)))
    }

    /// Replace the leaf mapping `va` by `frame` with `flags` (same size).
    /// Returns the leaf as it was and the flush to perform.
    pub fn remap_leaf<M: PhysMem>(
        &mut self,
        mem: &M,
        va: Gva,
        frame: Gpa,
        flags: PteFlags,
    ) -> Result<(Leaf, MapperFlush), UnmapError> {
        let leaf = self.leaf(mem, va).ok_or(UnmapError::NotMapped)?;
        let mut flags = flags.intersection(PteFlags::LEAF_SETTABLE).union(PteFlags::PRESENT);
        if leaf.size != PageSizeKind::Size4KiB {
            flags.insert(PteFlags::HUGE);
        }
        mem.write_u64(leaf.entry_addr, PageTableEntry::new(frame, flags).0);
        Ok((leaf, MapperFlush::new(leaf.va)))
    }

    /// Remove the leaf mapping `va`, whatever its size. Returns it and the
    /// flush to perform; tables left empty are freed.
    pub fn unmap_leaf<M: PhysMem, T: PageTableSource>(
        &mut self,
        mem: &M,
        src: &mut T,
        va: Gva,
    ) -> Result<(Leaf, MapperFlush), UnmapError> {
        let leaf = self.leaf(mem, va).ok_or(UnmapError::NotMapped)?;
        let (_, flush) = self.unmap_at(mem, src, leaf.va.0, leaf.size.level())?;
        Ok((leaf, flush))
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

    /// Count the table pages reachable from the root, the root included,
    /// and check the structural invariants of the module documentation.
    /// For tests: it reads every table.
    pub fn check_invariants<M: PhysMem>(&self, mem: &M) -> Result<usize, &'static str> {
        self.check_in(mem, self.root, 4, 0)
    }

    fn check_in<M: PhysMem>(&self, mem: &M, table: Pfn, level: u8, base: u64) -> Result<usize, &'static str> {
        let mut count = 1;
        let mut present = 0;
        for idx in 0..ENTRIES {
            let e = read_entry(mem, table, idx);
            if !e.is_present() {
                if e.0 != 0 {
                    return Err("not-present entry with stray bits");
                }
                continue;
            }
            present += 1;
            let va = base + idx as u64 * level_span(level);
            if level == 4 && e.flags().contains(PteFlags::HUGE) {
                return Err("PS set in a PML4 entry");
            }
            if e.is_leaf_at(level) {
                if !e.addr().is_aligned(level_span(level)) {
                    return Err("leaf frame not aligned to its page size");
                }
                continue;
            }
            if e.flags() != TABLE_FLAGS {
                return Err("non-leaf entry with flags other than P|RW|US|A");
            }
            count += self.check_in(mem, Pfn::containing(e.addr()), level - 1, va)?;
        }
        let pinned = self.pinned_upper && level == 3 && base >= (UPPER_HALF_FIRST as u64) << 39;
        if level < 4 && present == 0 && !pinned {
            return Err("empty table below the root");
        }
        Ok(count)
    }

    /// Remove every mapping whose page starts in `[from, end)` (taken as
    /// in [`next_leaf`](Self::next_leaf)), calling `f` with each leaf before its entry is
    /// cleared, then free the tables left empty (pinned PDPTs aside).
    /// Returns the flush to perform.
    pub fn clear_range<M: PhysMem, T: PageTableSource>(
        &mut self,
        mem: &M,
        src: &mut T,
        from: Gva,
        end: Gva,
        mut f: impl FnMut(Leaf),
    ) -> MapperFlushAll {
        let mut at = from;
        while let Some(leaf) = self.next_leaf(mem, at, end) {
            f(leaf);
            if let Ok((_, flush)) = self.unmap_at(mem, src, leaf.va.0, leaf.size.level()) {
                flush.ignore();
            }
            match leaf.va.0.checked_add(leaf.size.bytes()) {
                Some(next) if next & LINEAR_MASK != 0 => at = Gva(canonicalize(next)),
                _ => break,
            }
        }
        MapperFlushAll::new()
    }

    /// Free every table page, the root included. Leaves still mapped are
    /// dropped (their frames are the caller's business); every entry is
    /// zeroed before its table is released, so the source's invariant
    /// holds. A root that borrows its upper half from another (an address
    /// space) must zero those entries first, or the shared tables go too.
    pub fn free_tables<M: PhysMem, T: PageTableSource>(self, mem: &M, src: &mut T) {
        Self::free_subtree(mem, src, self.root, 4);
    }

    fn free_subtree<M: PhysMem, T: PageTableSource>(mem: &M, src: &mut T, table: Pfn, level: u8) {
        for idx in 0..ENTRIES {
            let e = read_entry(mem, table, idx);
            if e.is_present() && !e.is_leaf_at(level) {
                Self::free_subtree(mem, src, Pfn::containing(e.addr()), level - 1);
            }
            if e.0 != 0 {
                write_entry(mem, table, idx, PageTableEntry(0));
            }
        }
        src.free_table(table);
    }

    /// Create, in every empty upper-half slot of the root, an empty PDPT, so
    /// that roots copied from this one later see every kernel mapping made
    /// afterwards (Linux preallocates the kernel's top-level entries for
    /// the same reason). Stops early if `src` runs out.
    pub fn preallocate_upper<M: PhysMem, T: PageTableSource>(&mut self, mem: &M, src: &mut T) -> Result<(), MapError> {
        for idx in UPPER_HALF_FIRST..ENTRIES {
            if !read_entry(mem, self.root, idx).is_present() {
                let t = src.alloc_table().ok_or(MapError::OutOfTables)?;
                write_entry(mem, self.root, idx, PageTableEntry::new(t.addr(), TABLE_FLAGS));
            }
        }
        Ok(())
    }

    // ---- internals ----

    /// Write the leaf `entry` at `level` for `va`, creating tables above it.
    /// Returns the table that holds the entry, and whether this call
    /// created it (then its other entries are all zero).
    pub(crate) fn install<M: PhysMem, T: PageTableSource>(
        &mut self,
        mem: &M,
        src: &mut T,
        va: u64,
        level: u8,
        entry: PageTableEntry,
    ) -> Result<(Pfn, bool), MapError> {
        let mut path = Path { tables: [self.root; 5] };
        let mut table = self.root;
        let mut l = 4u8;
        let mut fresh = false;
        while l > level {
            let idx = table_index(va, l);
            let e = read_entry(mem, table, idx);
            fresh = !e.is_present();
            table = if fresh {
                let Some(t) = src.alloc_table() else {
                    // Free the tables this call created (they are empty).
                    self.prune(mem, src, &path, va, l);
                    return Err(MapError::OutOfTables);
                };
                write_entry(mem, table, idx, PageTableEntry::new(t.addr(), TABLE_FLAGS));
                t
            } else if e.is_leaf_at(l) {
                return Err(MapError::ParentIsHuge);
            } else {
                Pfn::containing(e.addr())
            };
            l -= 1;
            path.tables[l as usize] = table;
        }
        let idx = table_index(va, level);
        let e = read_entry(mem, table, idx);
        if e.is_present() {
            return Err(if e.is_leaf_at(level) { MapError::AlreadyMapped } else { MapError::TableInTheWay });
        }
        write_entry(mem, table, idx, entry);
        Ok((table, fresh))
    }

    /// Walk to the entry at `level` for `va`, which must be a leaf.
    fn find_exact<M: PhysMem>(&self, mem: &M, va: u64, level: u8) -> Result<(Pfn, usize, PageTableEntry), UnmapError> {
        self.walk_exact(mem, va, level).map(|(path, idx, e)| (path.tables[level as usize], idx, e))
    }

    fn walk_exact<M: PhysMem>(&self, mem: &M, va: u64, level: u8) -> Result<(Path, usize, PageTableEntry), UnmapError> {
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

    fn unmap_at<M: PhysMem, T: PageTableSource>(
        &mut self,
        mem: &M,
        src: &mut T,
        va: u64,
        level: u8,
    ) -> Result<(PageTableEntry, MapperFlush), UnmapError> {
        let (path, idx, e) = self.walk_exact(mem, va, level)?;
        write_entry(mem, path.tables[level as usize], idx, PageTableEntry(0));
        self.prune(mem, src, &path, va, level);
        Ok((e, MapperFlush::new(Gva(canonicalize(va & !(level_span(level) - 1))))))
    }

    /// Free the tables of `path` from `level` up that are empty, clearing
    /// their parent entries first (the root and pinned PDPTs are kept).
    fn prune<M: PhysMem, T: PageTableSource>(&mut self, mem: &M, src: &mut T, path: &Path, va: u64, level: u8) {
        let mut l = level;
        while l < 4 {
            let table = path.tables[l as usize];
            if l == 3 && self.pinned_upper && table_index(va, 4) >= UPPER_HALF_FIRST {
                return;
            }
            if !mem.frame_is_zero(table) {
                return;
            }
            write_entry(mem, path.tables[l as usize + 1], table_index(va, l + 1), PageTableEntry(0));
            src.free_table(table);
            l += 1;
        }
    }
}
