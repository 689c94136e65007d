//! Making and changing mappings: [`PageTable::map`] and
//! [`PageTable::map_range`] (creating the tables on the way), the
//! protection and leaf rewrites, and the kernel's upper-half
//! preallocation.
//!
//! Part of [`crate::paging`]; its module doc states the invariants. Here:
//! a new table is taken from the [`PageTableSource`] all zeroes and linked
//! with [`TABLE_FLAGS`]; a [`map`](PageTable::map) that fails changes
//! nothing (it frees the tables it created), a
//! [`map_range`](PageTable::map_range) that fails keeps the pages before
//! the failing one; leaf flags are masked to
//! [`PteFlags::LEAF_SETTABLE`] plus `P` (and `PS` above level 1); making an
//! entry present returns no flush, changing a present one returns a
//! [`MapperFlush`].

use super::*;

impl PageTable {
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

    /// Replace the 2 MiB leaf that maps `va` by a page table of 512 4 KiB
    /// leaves with the same frames and flags (Linux's `__split_huge_pmd`):
    /// the translations do not change, only their size. The new table is
    /// filled before it is linked, so no walk ever sees it half built.
    /// Returns `Ok(None)` when `va` is not in a 2 MiB leaf (nothing to
    /// split), else the flush to perform (SDM vol. 3A §4.10.4.2: a change
    /// of page size must be invalidated, lest both sizes be cached).
    pub fn split_large_leaf<M: PhysMem, T: PageTableSource>(
        &mut self,
        mem: &M,
        src: &mut T,
        va: Gva,
    ) -> Result<Option<MapperFlush>, MapError> {
        let Some(leaf) = self.leaf(mem, va) else { return Ok(None) };
        if leaf.size != PageSizeKind::Size2MiB {
            return Ok(None);
        }
        let table = src.alloc_table().ok_or(MapError::OutOfTables)?;
        let flags = leaf.flags();
        let base = leaf.entry.addr().0;
        for idx in 0..ENTRIES {
            write_entry(mem, table, idx, PageTableEntry::new(Gpa(base + idx as u64 * 4096), flags));
        }
        mem.write_u64(leaf.entry_addr, PageTableEntry::new(table.addr(), TABLE_FLAGS).0);
        Ok(Some(MapperFlush::new(leaf.va)))
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
}
