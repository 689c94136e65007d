//! Why a paging operation failed.
//!
//! Part of [`crate::paging`]; its module doc states the invariants.

use super::*;

/// Why a [`PageTable::map`] failed. Nothing was changed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MapError {
    /// A page of the same size is already mapped there.
    AlreadyMapped,
    /// A larger page already covers the address.
    ParentIsHuge,
    /// Smaller pages are mapped inside the range of the new (large) page.
    TableInTheWay,
    /// The page-table source has no page left.
    OutOfTables,
    /// A range to map leaves the canonical half it starts in, or wraps.
    NotCanonical,
}

impl MapError {
    /// A description that needs no formatting machinery.
    pub const fn as_str(self) -> &'static str {
        match self {
            MapError::AlreadyMapped => "page already mapped",
            MapError::ParentIsHuge => "a larger page covers the address",
            MapError::TableInTheWay => "smaller pages mapped inside the range",
            MapError::OutOfTables => "no page-table page left",
            MapError::NotCanonical => "range leaves its canonical half",
        }
    }
}

/// Why an unmap or protect failed. Nothing was changed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum UnmapError {
    /// No page of the given size starts at the address (nothing there, or
    /// only smaller pages inside its range).
    NotMapped,
    /// A larger page covers the address.
    SizeMismatch(PageSizeKind),
}

impl UnmapError {
    /// A description that needs no formatting machinery.
    pub const fn as_str(self) -> &'static str {
        match self {
            UnmapError::NotMapped => "no page of that size mapped there",
            UnmapError::SizeMismatch(_) => "a larger page covers the address",
        }
    }
}
