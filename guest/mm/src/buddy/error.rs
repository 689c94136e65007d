//! Why the buddy allocator refused something: a free ([`FreeError`]), or
//! its creation or a range to add ([`InitError`]).
//!
//! Part of [`crate::buddy`], whose module doc states the allocator's
//! invariants. Here: a refusal changes nothing, and every error has one
//! text, its `as_str()`, which needs no formatting machinery (the guest
//! has no `core::fmt` on its paths); `Display` writes that same text.

/// Why a free was refused. The allocator's state is unchanged.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FreeError {
    /// The frame is outside the allocator's span (a foreign address).
    OutOfRange,
    /// The frame was never given to the allocator (reserved).
    NotManaged,
    /// The frame lies inside a block, not at its head (a wrong address, or
    /// a second free of a block that has since merged).
    NotBlockHead,
    /// The block is already free.
    DoubleFree,
    /// The block was allocated with another order.
    WrongOrder {
        /// The order the block was allocated with.
        allocated: u8,
    },
    /// The order is above [`MAX_ORDER`](super::MAX_ORDER).
    InvalidOrder,
    /// A page-table page passed to
    /// [`BuddyAllocator::free`](super::BuddyAllocator::free), or another
    /// page passed to
    /// [`BuddyAllocator::free_pgtable`](super::BuddyAllocator::free_pgtable).
    WrongZone,
    /// A page-table page with a non-zero entry passed to
    /// [`BuddyAllocator::free_pgtable`](super::BuddyAllocator::free_pgtable);
    /// it stays allocated.
    NotZeroed,
}

impl FreeError {
    /// A description that needs no formatting machinery.
    pub const fn as_str(self) -> &'static str {
        match self {
            FreeError::OutOfRange => "frame outside the allocator",
            FreeError::NotManaged => "frame not managed by the allocator",
            FreeError::NotBlockHead => "frame inside a block, not at its head",
            FreeError::DoubleFree => "block already free",
            FreeError::WrongOrder { .. } => "block allocated with another order",
            FreeError::InvalidOrder => "order above MAX_ORDER",
            FreeError::WrongZone => "page-table page freed as ordinary memory, or the reverse",
            FreeError::NotZeroed => "page-table page freed with non-zero entries",
        }
    }
}

/// Why the allocator could not be set up, or a range not added.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum InitError {
    /// More frames than span indices (`u32::MAX - 1`), or a span that
    /// overflows the physical address space.
    SpanTooLarge,
    /// The page-table zone is not inside the span.
    PageTablesOutsideSpan,
    /// The range to add is not inside the span.
    RangeOutsideSpan,
    /// Part of the range to add is already managed.
    AlreadyManaged,
    /// A frame of the page-table zone being added is not all zeroes.
    PageTablesNotZeroed,
    /// The section-state array is shorter than
    /// [`section_bytes`](super::section_bytes) of the span.
    SectionArrayTooSmall,
}

impl InitError {
    /// A description that needs no formatting machinery.
    pub const fn as_str(self) -> &'static str {
        match self {
            InitError::SpanTooLarge => "span too large",
            InitError::PageTablesOutsideSpan => "page-table zone outside the span",
            InitError::RangeOutsideSpan => "range outside the span",
            InitError::AlreadyManaged => "range already managed",
            InitError::PageTablesNotZeroed => "page-table zone frame not zeroed",
            InitError::SectionArrayTooSmall => "section-state array too small for the span",
        }
    }
}

crate::display_as_str!(FreeError, InitError);
