//! One raw page-table entry: [`PageTableEntry`].
//!
//! Part of [`crate::paging`]; its module doc states the invariants.

use super::*;

/// One raw 64-bit page-table entry.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Debug)]
#[repr(transparent)]
pub struct PageTableEntry(pub u64);

impl PageTableEntry {
    /// An entry pointing at `addr` (masked to [`ADDR_MASK`]) with `flags`.
    pub const fn new(addr: Gpa, flags: PteFlags) -> Self {
        Self((addr.0 & ADDR_MASK) | flags.0)
    }
    /// The flag bits.
    pub const fn flags(self) -> PteFlags {
        PteFlags::from_bits_truncate(self.0)
    }
    /// The physical address the entry points at.
    pub const fn addr(self) -> Gpa {
        Gpa(self.0 & ADDR_MASK)
    }
    /// Whether P is set.
    pub const fn is_present(self) -> bool {
        self.0 & PteFlags::PRESENT.0 != 0
    }
    /// Whether this entry, found at `level` (1 = PT … 4 = PML4), maps a
    /// page rather than pointing at a table.
    pub const fn is_leaf_at(self, level: u8) -> bool {
        self.is_present() && (level == 1 || (level <= 3 && self.0 & PteFlags::HUGE.0 != 0))
    }
    /// This entry with `flags` replacing its flag bits.
    pub const fn with_flags(self, flags: PteFlags) -> Self {
        Self((self.0 & ADDR_MASK) | flags.0)
    }
}
