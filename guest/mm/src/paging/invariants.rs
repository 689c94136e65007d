//! The structural checker, [`PageTable::check_invariants`]: reads every
//! table and checks the invariants of [`crate::paging`]'s module doc that
//! the tables themselves show (entry flags, alignment, no empty table
//! below the root). For tests.
//!
//! Part of [`crate::paging`]. It only reads.

use super::*;

impl PageTable {
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
}
