//! Virtual memory areas: the ranges of an address space's user half that
//! may hold pages, and with which rights (Linux's `vm_area_struct`, reduced
//! to anonymous memory).
//!
//! # Invariants of a [`VmaList`]
//!
//! - At most [`MAX_VMAS`] areas, in a fixed array (no allocation), sorted
//!   by start address and pairwise disjoint.
//! - Every area is non-empty, page-aligned at both ends, and inside the
//!   user half (`end <= 2^47`).
//! - Pages inside an area are mapped lazily by the fault handler with the
//!   area's rights; no page outside every area is ever mapped by it.

use guest_abi::Gva;

use crate::PAGE_SIZE;
use crate::aspace::USER_END;

/// Most areas in one address space.
pub const MAX_VMAS: usize = 16;

/// Access rights of an area (Linux's `VM_READ`/`VM_WRITE`/`VM_EXEC`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Debug)]
pub struct Prot(u8);

impl Prot {
    /// Readable.
    pub const READ: Self = Self(1);
    /// Writable.
    pub const WRITE: Self = Self(2);
    /// Executable.
    pub const EXEC: Self = Self(4);
    /// Readable and writable.
    pub const RW: Self = Self(3);

    /// No right.
    pub const fn empty() -> Self {
        Self(0)
    }
    /// Whether every right of `other` is granted.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
    /// Both sets of rights.
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
}

impl core::ops::BitOr for Prot {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        self.union(rhs)
    }
}

/// One area `[start, end)`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Vma {
    /// First address.
    pub start: Gva,
    /// First address after the area.
    pub end: Gva,
    /// Access rights.
    pub prot: Prot,
}

impl Vma {
    /// Whether `addr` lies in the area.
    pub const fn contains(&self, addr: Gva) -> bool {
        self.start.0 <= addr.0 && addr.0 < self.end.0
    }
}

/// Why an area was refused. Nothing was changed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum VmaError {
    /// `start >= end`.
    Empty,
    /// An end not page-aligned.
    Unaligned,
    /// Beyond the user half.
    NotUser,
    /// Overlaps an existing area.
    Overlap,
    /// [`MAX_VMAS`] areas already (or a split would need more).
    Full,
    /// The range does not lie inside one area.
    NotMapped,
    /// No page-table page to split a 2 MiB page across the range's edge.
    NoMemory,
}

impl VmaError {
    /// A description that needs no formatting machinery.
    pub const fn as_str(self) -> &'static str {
        match self {
            VmaError::Empty => "empty area",
            VmaError::Unaligned => "area not page-aligned",
            VmaError::NotUser => "area outside the user half",
            VmaError::Overlap => "area overlaps another",
            VmaError::Full => "too many areas",
            VmaError::NotMapped => "range not inside one area",
            VmaError::NoMemory => "no page-table page to split a huge page",
        }
    }
}

/// The areas of one address space. See the module documentation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmaList {
    vmas: [Vma; MAX_VMAS],
    len: usize,
}

impl Default for VmaList {
    fn default() -> Self {
        Self::new()
    }
}

impl VmaList {
    /// No area.
    pub const fn new() -> Self {
        Self { vmas: [Vma { start: Gva(0), end: Gva(0), prot: Prot(0) }; MAX_VMAS], len: 0 }
    }

    /// The areas, sorted by start.
    pub fn as_slice(&self) -> &[Vma] {
        &self.vmas[..self.len]
    }

    /// Add an area.
    pub fn insert(&mut self, vma: Vma) -> Result<(), VmaError> {
        if vma.start >= vma.end {
            return Err(VmaError::Empty);
        }
        if !vma.start.is_aligned(PAGE_SIZE) || !vma.end.is_aligned(PAGE_SIZE) {
            return Err(VmaError::Unaligned);
        }
        if vma.end > USER_END {
            return Err(VmaError::NotUser);
        }
        let pos = self.as_slice().partition_point(|v| v.start < vma.start);
        let overlaps_prev = pos > 0 && self.vmas[pos - 1].end > vma.start;
        let overlaps_next = pos < self.len && self.vmas[pos].start < vma.end;
        if overlaps_prev || overlaps_next {
            return Err(VmaError::Overlap);
        }
        if self.len == MAX_VMAS {
            return Err(VmaError::Full);
        }
        self.vmas.copy_within(pos..self.len, pos + 1);
        self.vmas[pos] = vma;
        self.len += 1;
        Ok(())
    }

    /// The area containing `addr`.
    pub fn find(&self, addr: Gva) -> Option<Vma> {
        let pos = self.as_slice().partition_point(|v| v.start <= addr);
        (pos > 0 && self.vmas[pos - 1].contains(addr)).then(|| self.vmas[pos - 1])
    }

    /// Remove the area that starts at `start`.
    pub fn remove(&mut self, start: Gva) -> Option<Vma> {
        let pos = self.as_slice().iter().position(|v| v.start == start)?;
        let vma = self.vmas[pos];
        self.vmas.copy_within(pos + 1..self.len, pos);
        self.len -= 1;
        Some(vma)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vma(start: u64, end: u64) -> Vma {
        Vma { start: Gva(start), end: Gva(end), prot: Prot::RW }
    }

    #[test]
    fn areas_stay_sorted_and_disjoint() {
        let mut l = VmaList::new();
        l.insert(vma(0x5000, 0x8000)).unwrap();
        l.insert(vma(0x1000, 0x2000)).unwrap();
        l.insert(vma(0x2000, 0x5000)).unwrap();
        assert_eq!(l.as_slice().iter().map(|v| v.start.0).collect::<std::vec::Vec<_>>(), [0x1000, 0x2000, 0x5000]);
        assert_eq!(l.insert(vma(0x7000, 0x9000)), Err(VmaError::Overlap));
        assert_eq!(l.insert(vma(0x0, 0x1001)), Err(VmaError::Unaligned));
        assert_eq!(l.insert(vma(0x0, 0x1000 + 0x1000)), Err(VmaError::Overlap));
        assert_eq!(l.insert(vma(0x3000, 0x3000)), Err(VmaError::Empty));
        assert_eq!(l.insert(vma(0x7fff_ffff_f000, 0x8000_0000_1000)), Err(VmaError::NotUser));
        assert_eq!(l.find(Gva(0x4fff)).unwrap().start, Gva(0x2000));
        assert_eq!(l.find(Gva(0x8000)), None);
        assert_eq!(l.find(Gva(0xfff)), None);
        assert_eq!(l.remove(Gva(0x2000)).unwrap().end, Gva(0x5000));
        assert_eq!(l.find(Gva(0x3000)), None);
        assert_eq!(l.remove(Gva(0x2000)), None);
    }

    #[test]
    fn a_full_list_refuses_another_area() {
        let mut l = VmaList::new();
        for i in 0..MAX_VMAS as u64 {
            l.insert(vma(i * 0x2000, i * 0x2000 + 0x1000)).unwrap();
        }
        assert_eq!(l.insert(vma(0x10_0000, 0x10_1000)), Err(VmaError::Full));
        assert!(Prot::RW.contains(Prot::WRITE) && !Prot::READ.contains(Prot::WRITE));
        assert_eq!(VmaError::Full.as_str(), "too many areas");
    }
}
