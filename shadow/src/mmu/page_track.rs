//! The guest frames that may hold paging structures (invariant 6): those
//! whose writes trap, as KVM's write-tracked pages (page_track.c).
//!
//! # Invariants
//!
//! - The walker sees guest memory through [`TableFrames`]: a table outside
//!   them is a reserved-bit fault, so no shadow is derived from a frame the
//!   VMM does not see written.
//! - Changing the frames zaps everything derived so far.

use super::*;

/// The guest frames that may hold paging structures (invariant 6): up to
/// four GPA ranges, or everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableFrames {
    pub(super) ranges: [(u64, u64); 4],
    pub(super) n: usize,
    pub(super) all: bool,
}

impl TableFrames {
    /// Every frame (no trapping restriction: host tests).
    pub const ALL: TableFrames = TableFrames { ranges: [(0, 0); 4], n: 0, all: true };

    /// The frames in `ranges` (`[start, end)` each; at most four are kept).
    pub fn new(ranges: &[(Gpa, Gpa)]) -> TableFrames {
        let mut t = TableFrames { ranges: [(0, 0); 4], n: 0, all: false };
        for &r in ranges.iter().take(4) {
            t.ranges[t.n] = (r.0.raw(), r.1.raw());
            t.n += 1;
        }
        t
    }

    /// Whether the frame holding `gpa` may hold a table.
    pub fn contains(&self, gpa: Gpa) -> bool {
        let gpa = gpa.raw();
        self.all || self.ranges[..self.n].iter().any(|&(s, e)| gpa >= s && gpa < e)
    }
}

/// Guest memory seen through [`TableFrames`]: what the walker reads.
pub(super) struct Zoned<'a, G: GuestPhys> {
    pub(super) mem: &'a mut G,
    pub(super) tables: TableFrames,
}

impl<G: GuestPhys> GuestPhys for Zoned<'_, G> {
    fn read_u64(&self, gpa: Gpa) -> u64 {
        self.mem.read_u64(gpa)
    }
    fn write_u64(&mut self, gpa: Gpa, value: u64) {
        self.mem.write_u64(gpa, value)
    }
    fn is_ram(&self, gpa: Gpa, len: u64) -> bool {
        self.mem.is_ram(gpa, len)
    }
    fn may_hold_tables(&self, gpa: Gpa) -> bool {
        self.tables.contains(gpa) && self.mem.may_hold_tables(gpa)
    }
}

impl ShadowMmu {
    /// Restrict guest paging structures to `tables` (invariant 6): the
    /// frames whose writes trap. Everything derived so far is zapped.
    pub fn set_table_frames(&mut self, pool: &mut impl GuestPhys, tables: TableFrames) {
        self.tables = tables;
        if self.stats.pages_in_use > 0 || !self.loaded.is_empty() {
            self.zap_all(pool);
        }
        self.epoch += 1;
    }
}
