//! Why the slab allocator refused something: a free ([`SlabError`]) or a
//! cache's creation ([`CacheError`]).
//!
//! Part of [`crate::slab`]. Invariants: a refused free changes nothing;
//! every [`SlabError`] has one text, its `as_str()`, which needs no
//! formatting machinery (the guest has no `core::fmt` on its paths), and
//! a refusal passed on from the buddy allocator keeps the buddy's text.

use crate::buddy::FreeError;

/// Why a free was refused. The cache is unchanged.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SlabError {
    /// The address is not in a slab of this cache.
    Foreign,
    /// The address is inside an object, not at its start.
    NotObjectStart,
    /// The object is already free.
    DoubleFree,
    /// A large allocation's pages were refused by the buddy allocator.
    Pages(FreeError),
}

impl SlabError {
    /// A description that needs no formatting machinery.
    pub const fn as_str(self) -> &'static str {
        match self {
            SlabError::Foreign => "address not in a slab of this cache",
            SlabError::NotObjectStart => "address not at the start of an object",
            SlabError::DoubleFree => "object already free",
            SlabError::Pages(e) => e.as_str(),
        }
    }
}

crate::display_as_str!(SlabError);

/// Why a cache could not be created.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CacheError {
    /// The alignment is not a power of two, or above [`MAX_ALIGN`](super::MAX_ALIGN).
    BadAlign,
    /// The object (rounded to its alignment) does not fit a slab of the
    /// largest order.
    TooLarge,
}
