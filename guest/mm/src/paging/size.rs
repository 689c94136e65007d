//! Page sizes as types, pages and frames: [`PageSize`], [`Page`], [`PhysFrame`], address helpers.
//!
//! Part of [`crate::paging`]; its module doc states the invariants.

use super::*;

mod sealed {
    pub trait Sealed {}
}

/// A page size, as a type.
pub trait PageSize: Copy + Eq + Ord + core::fmt::Debug + sealed::Sealed {
    /// Bytes in a page.
    const SIZE: u64;
    /// The level whose entry maps a page of this size (1 = PT, 2 = PD,
    /// 3 = PDPT).
    const LEVEL: u8;
    /// The same size as a value.
    const KIND: PageSizeKind;
}

/// 4 KiB pages, mapped by a PT entry.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Size4KiB {}
/// 2 MiB pages, mapped by a PD entry with PS.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Size2MiB {}
/// 1 GiB pages, mapped by a PDPT entry with PS.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Size1GiB {}

impl sealed::Sealed for Size4KiB {}
impl sealed::Sealed for Size2MiB {}
impl sealed::Sealed for Size1GiB {}

impl PageSize for Size4KiB {
    const SIZE: u64 = crate::PAGE_SIZE;
    const LEVEL: u8 = 1;
    const KIND: PageSizeKind = PageSizeKind::Size4KiB;
}
impl PageSize for Size2MiB {
    const SIZE: u64 = crate::LARGE_PAGE_SIZE;
    const LEVEL: u8 = 2;
    const KIND: PageSizeKind = PageSizeKind::Size2MiB;
}
impl PageSize for Size1GiB {
    const SIZE: u64 = crate::HUGE_PAGE_SIZE;
    const LEVEL: u8 = 3;
    const KIND: PageSizeKind = PageSizeKind::Size1GiB;
}

/// A page size as a value (what a translation finds).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum PageSizeKind {
    /// 4 KiB.
    Size4KiB,
    /// 2 MiB.
    Size2MiB,
    /// 1 GiB.
    Size1GiB,
}

impl PageSizeKind {
    /// Bytes in a page.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSizeKind::Size4KiB => Size4KiB::SIZE,
            PageSizeKind::Size2MiB => Size2MiB::SIZE,
            PageSizeKind::Size1GiB => Size1GiB::SIZE,
        }
    }
    /// The level whose entry maps it.
    pub const fn level(self) -> u8 {
        match self {
            PageSizeKind::Size4KiB => 1,
            PageSizeKind::Size2MiB => 2,
            PageSizeKind::Size1GiB => 3,
        }
    }
    pub(super) const fn from_level(level: u8) -> Self {
        match level {
            1 => PageSizeKind::Size4KiB,
            2 => PageSizeKind::Size2MiB,
            _ => PageSizeKind::Size1GiB,
        }
    }
}

/// Why an address cannot start a page or frame.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AddrError {
    /// Not a multiple of the page size.
    Unaligned,
    /// A virtual address whose bits 63..=47 are not all equal (SDM §3.3.7.1).
    NotCanonical,
    /// A physical address at or above 2^52.
    BeyondPhysLimit,
}

impl AddrError {
    /// A description that needs no formatting machinery.
    pub const fn as_str(self) -> &'static str {
        match self {
            AddrError::Unaligned => "address not aligned to the page size",
            AddrError::NotCanonical => "virtual address not canonical",
            AddrError::BeyondPhysLimit => "physical address beyond 2^52",
        }
    }
}

/// Whether `va` is canonical for 48-bit linear addresses.
pub const fn is_canonical(va: u64) -> bool {
    let top = va >> 47;
    top == 0 || top == (1 << 17) - 1
}

/// `va` with bits 63..=48 copied from bit 47.
pub const fn canonicalize(va: u64) -> u64 {
    (((va << 16) as i64) >> 16) as u64
}

/// The index into the table at `level` (4 = PML4 … 1 = PT) that `va` selects.
pub const fn table_index(va: u64, level: u8) -> usize {
    ((va >> (12 + 9 * (level as u32 - 1))) & 0x1ff) as usize
}

/// Bytes one entry at `level` covers.
pub const fn level_span(level: u8) -> u64 {
    1 << (12 + 9 * (level as u32 - 1))
}

/// A virtual page of size `S`: canonical and `S`-aligned by construction.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Page<S: PageSize = Size4KiB> {
    start: Gva,
    _size: PhantomData<S>,
}

impl<S: PageSize> Page<S> {
    /// The page starting at `start`.
    pub const fn from_start_address(start: Gva) -> Result<Self, AddrError> {
        if !is_canonical(start.0) {
            return Err(AddrError::NotCanonical);
        }
        if start.0 & (S::SIZE - 1) != 0 {
            return Err(AddrError::Unaligned);
        }
        Ok(Self { start, _size: PhantomData })
    }
    /// The page containing `addr`.
    pub const fn containing_address(addr: Gva) -> Result<Self, AddrError> {
        if !is_canonical(addr.0) {
            return Err(AddrError::NotCanonical);
        }
        Ok(Self { start: Gva(addr.0 & !(S::SIZE - 1)), _size: PhantomData })
    }
    /// The first address of the page.
    pub const fn start(self) -> Gva {
        self.start
    }
    /// Bytes in the page.
    pub const fn size(self) -> u64 {
        S::SIZE
    }
}

/// A physical frame of size `S`: aligned and below 2^52 by construction.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct PhysFrame<S: PageSize = Size4KiB> {
    pub(super) start: Gpa,
    pub(super) _size: PhantomData<S>,
}

impl<S: PageSize> PhysFrame<S> {
    /// The frame starting at `start`.
    pub const fn from_start_address(start: Gpa) -> Result<Self, AddrError> {
        if start.0 >= PHYS_LIMIT {
            return Err(AddrError::BeyondPhysLimit);
        }
        if start.0 & (S::SIZE - 1) != 0 {
            return Err(AddrError::Unaligned);
        }
        Ok(Self { start, _size: PhantomData })
    }
    /// The frame containing `addr`.
    pub const fn containing_address(addr: Gpa) -> Result<Self, AddrError> {
        if addr.0 >= PHYS_LIMIT {
            return Err(AddrError::BeyondPhysLimit);
        }
        Ok(Self { start: Gpa(addr.0 & !(S::SIZE - 1)), _size: PhantomData })
    }
    /// The first address of the frame.
    pub const fn start(self) -> Gpa {
        self.start
    }
    /// The frame number of its first 4 KiB.
    pub const fn pfn(self) -> Pfn {
        Pfn::containing(self.start)
    }
}

impl PhysFrame<Size4KiB> {
    /// The 4 KiB frame `pfn` (always valid: a `Pfn` is below 2^52 in practice;
    /// higher bits are masked as the entry format would).
    pub const fn from_pfn(pfn: Pfn) -> Self {
        Self { start: Gpa(pfn.addr().0 & ADDR_MASK), _size: PhantomData }
    }
}
