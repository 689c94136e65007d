//! Removing mappings and tearing tables down: [`PageTable::unmap`],
//! [`PageTable::unmap_leaf`], [`PageTable::clear_range`] and
//! [`PageTable::free_tables`].
//!
//! Part of [`crate::paging`]; its module doc states the invariants. Here:
//! an entry is zeroed before the table holding it is released, and a
//! table that an unmap leaves empty is freed at once (the root and pinned
//! upper-half PDPTs aside), so no empty table stays below the root; every
//! removal of a present leaf returns the flush to perform.

use super::*;

impl PageTable {
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

    pub(super) fn unmap_at<M: PhysMem, T: PageTableSource>(
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
    pub(super) fn prune<M: PhysMem, T: PageTableSource>(
        &mut self,
        mem: &M,
        src: &mut T,
        path: &Path,
        va: u64,
        level: u8,
    ) {
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
