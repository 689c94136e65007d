//! Per-frame metadata (Linux's `struct page`, reduced to what the buddy
//! allocator needs) and the [`BlockTag`] an allocated block's owner keeps
//! in it.
//!
//! Part of [`crate::buddy`], whose module doc states the allocator's
//! invariants. Here:
//!
//! - Any bit pattern of a [`FrameMeta`] is a valid value (the guest carves
//!   the array out of RAM), so every field is a plain integer and the
//!   state a raw byte; an all-zero `FrameMeta` reads as reserved.
//! - The tag words of an allocated block's head belong to its owner; the
//!   allocator reads and writes them only through
//!   [`block_tag`](BuddyAllocator::block_tag) and
//!   [`set_block_tag`](BuddyAllocator::set_block_tag), and clears them
//!   when the block is handed out.

use super::BuddyAllocator;
use crate::phys::{Pfn, PhysMem};

/// End of a free list.
pub(super) const NIL: u32 = u32::MAX;

// Frame states, stored as a raw byte so that any bit pattern of a
// `FrameMeta` is a valid value (the guest carves the array out of RAM).
pub(super) const RESERVED: u8 = 0;
pub(super) const TAIL: u8 = 1;
pub(super) const FREE: u8 = 2;
pub(super) const ALLOCATED: u8 = 3;
pub(super) const HOT: u8 = 4;

/// Per-frame metadata (Linux's `struct page`, reduced to what the buddy
/// allocator needs). 20 bytes; all-zero bytes, or any bit pattern, is a
/// valid value, and [`BuddyAllocator::new`] overwrites whatever is there.
///
/// While a block is allocated, its head's `prev`, `next` and `owner` words
/// form the block's [`BlockTag`], which belongs to whoever allocated it
/// (the slab allocator keeps its slab descriptor there, as Linux's
/// `struct slab` overlays `struct page`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[repr(C)]
pub struct FrameMeta {
    /// Previous block on the free list (span index), or `NIL`.
    pub(super) prev: u32,
    /// Next block on the free list (span index), or `NIL`.
    pub(super) next: u32,
    /// Owner's words while allocated.
    pub(super) owner: [u32; 2],
    /// Block order (meaningful for block heads and hot frames).
    pub(super) order: u8,
    /// `RESERVED`, `TAIL`, `FREE`, `ALLOCATED` or `HOT`.
    pub(super) state: u8,
    /// The frame's zone, a [`ZoneId`](super::ZoneId) as a byte.
    pub(super) zone: u8,
    pub(super) _pad: u8,
}

impl FrameMeta {
    /// A reserved frame's metadata, to fill a fresh array with.
    pub const RESERVED: FrameMeta =
        FrameMeta { prev: NIL, next: NIL, owner: [0; 2], order: 0, state: RESERVED, zone: 0, _pad: 0 };

    /// Give the (allocated) block headed by this frame a clear tag.
    #[inline]
    pub(super) fn clear_tag(&mut self) {
        self.prev = 0;
        self.next = 0;
        self.owner = [0; 2];
    }
}

/// Four words kept in an allocated block's head metadata for the block's
/// owner. A newly allocated block's tag is all zeroes.
pub type BlockTag = [u32; 4];

/// Bytes of [`FrameMeta`] needed for a span of `frames` frames.
pub const fn meta_bytes(frames: u64) -> u64 {
    frames * core::mem::size_of::<FrameMeta>() as u64
}

impl<M: PhysMem> BuddyAllocator<'_, M> {
    /// The order and [`BlockTag`] of the allocated block headed by `pfn`, or
    /// `None` if `pfn` does not head an allocated block.
    #[inline]
    pub fn block_tag(&self, pfn: Pfn) -> Option<(u8, BlockTag)> {
        let m = self.meta.get(self.index(pfn)? as usize)?;
        if m.state != ALLOCATED {
            return None;
        }
        Some((m.order, [m.prev, m.next, m.owner[0], m.owner[1]]))
    }

    /// Set the [`BlockTag`] of the allocated block headed by `pfn`. Returns
    /// `false` (and changes nothing) if `pfn` does not head an allocated
    /// block.
    #[inline]
    pub fn set_block_tag(&mut self, pfn: Pfn, tag: BlockTag) -> bool {
        let Some(idx) = self.index(pfn) else { return false };
        let m = &mut self.meta[idx as usize];
        if m.state != ALLOCATED {
            return false;
        }
        [m.prev, m.next, m.owner[0], m.owner[1]] = tag;
        true
    }
}
