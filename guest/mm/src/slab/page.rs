//! The slab page: a naturally aligned buddy block cut into objects, its
//! descriptor (kept in the block's [`BlockTag`], as Linux's `struct slab`
//! overlays `struct page`), the free pointers in its free objects, and the
//! lists of slabs a cache keeps (partial, full, empty).
//!
//! Part of [`crate::slab`], whose module doc states the cache's
//! invariants. Here:
//!
//! - A descriptor's list byte carries [`SLAB_MAGIC`] in its high bits, so
//!   a block that is not a slab (its tag is all zeroes when allocated) is
//!   never taken for one; [`desc`] of a slab whose tag is lost panics (a
//!   bug of this allocator, never of its caller).
//! - A free object's first word is the address of the next free object of
//!   its slab, or [`FREELIST_END`]; the descriptor keeps the first as a
//!   byte offset, or [`NIL`].
//! - The slab lists are doubly linked through the descriptors (pfns,
//!   `NIL`-terminated); a list head's `len` is the list's length, and each
//!   slab's descriptor names the list it is on.

use crate::buddy::{BlockTag, BuddyAllocator};
use crate::phys::{Pfn, PhysMem};

/// End of a free list held in objects (never an object address: objects
/// are at least 8-byte aligned).
pub(super) const FREELIST_END: u64 = u64::MAX;
/// End of a slab list, or of a descriptor's free list (as an offset).
pub(super) const NIL: u32 = u32::MAX;
/// High bits of a descriptor's list byte, so that a block that is not a
/// slab (its tag is all zeroes when allocated) is never taken for one.
const SLAB_MAGIC: u8 = 0xa0;

/// Which list a slab is on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub(super) enum SlabList {
    Cpu = 0,
    Partial = 1,
    Full = 2,
    Empty = 3,
}

/// A slab's descriptor, stored in its head frame's [`BlockTag`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct SlabDesc {
    /// Previous and next slab on the same list (pfns), or `NIL`.
    pub(super) prev: u32,
    pub(super) next: u32,
    /// Byte offset of the first free object, or `NIL`.
    pub(super) freelist: u32,
    /// Objects in use (all of them while frozen as the CPU slab).
    pub(super) inuse: u16,
    /// The owning cache's id.
    pub(super) cache: u8,
    pub(super) list: SlabList,
}

impl SlabDesc {
    fn to_tag(self) -> BlockTag {
        let word = self.inuse as u32 | (self.cache as u32) << 16 | ((SLAB_MAGIC | self.list as u8) as u32) << 24;
        [self.prev, self.next, self.freelist, word]
    }

    /// The descriptor in `tag`, or `None` if the block is not a slab.
    pub(super) fn from_tag(tag: BlockTag) -> Option<Self> {
        let list_byte = (tag[3] >> 24) as u8;
        if list_byte & 0xf0 != SLAB_MAGIC {
            return None;
        }
        let list = match list_byte & 0x0f {
            0 => SlabList::Cpu,
            1 => SlabList::Partial,
            2 => SlabList::Full,
            3 => SlabList::Empty,
            _ => return None,
        };
        Some(SlabDesc {
            prev: tag[0],
            next: tag[1],
            freelist: tag[2],
            inuse: tag[3] as u16,
            cache: (tag[3] >> 16) as u8,
            list,
        })
    }
}

/// The descriptor of `slab` (a pfn), which must be a slab.
pub(super) fn desc<M: PhysMem>(buddy: &BuddyAllocator<'_, M>, slab: u32) -> SlabDesc {
    match buddy.block_tag(Pfn(slab as u64)).and_then(|(_, tag)| SlabDesc::from_tag(tag)) {
        Some(d) => d,
        None => panic!("slab descriptor lost"),
    }
}

/// Store `d` as the descriptor of `slab` (a pfn), an allocated block.
pub(super) fn set_desc<M: PhysMem>(buddy: &mut BuddyAllocator<'_, M>, slab: u32, d: SlabDesc) {
    let ok = buddy.set_block_tag(Pfn(slab as u64), d.to_tag());
    debug_assert!(ok, "slab is not an allocated block");
}

/// Head and length of a list of slabs.
#[derive(Clone, Copy, Debug)]
pub(super) struct SlabListHead {
    pub(super) head: u32,
    pub(super) len: u32,
}

impl SlabListHead {
    const EMPTY: SlabListHead = SlabListHead { head: NIL, len: 0 };
}

/// A cache's lists of slabs that are not its CPU slab (SLUB keeps the
/// partial ones per NUMA node, in `kmem_cache_node`).
#[derive(Clone, Copy, Debug)]
pub(super) struct SlabLists {
    pub(super) partial: SlabListHead,
    pub(super) full: SlabListHead,
    pub(super) empty: SlabListHead,
}

impl SlabLists {
    pub(super) const EMPTY: SlabLists =
        SlabLists { partial: SlabListHead::EMPTY, full: SlabListHead::EMPTY, empty: SlabListHead::EMPTY };

    fn list_mut(&mut self, list: SlabList) -> &mut SlabListHead {
        match list {
            SlabList::Partial => &mut self.partial,
            SlabList::Full => &mut self.full,
            SlabList::Empty | SlabList::Cpu => &mut self.empty,
        }
    }

    /// Put `slab` (descriptor `d`, on no list) at the head of `list`.
    pub(super) fn push<M: PhysMem>(
        &mut self,
        buddy: &mut BuddyAllocator<'_, M>,
        slab: u32,
        mut d: SlabDesc,
        list: SlabList,
    ) {
        let head = self.list_mut(list);
        let old = head.head;
        head.head = slab;
        head.len += 1;
        d.prev = NIL;
        d.next = old;
        d.list = list;
        set_desc(buddy, slab, d);
        if old != NIL {
            let mut o = desc(buddy, old);
            o.prev = slab;
            set_desc(buddy, old, o);
        }
    }

    /// Take `slab` off its list; returns it.
    pub(super) fn unlink<M: PhysMem>(&mut self, buddy: &mut BuddyAllocator<'_, M>, slab: u32) -> u32 {
        let mut d = desc(buddy, slab);
        if d.prev == NIL {
            self.list_mut(d.list).head = d.next;
        } else {
            let mut p = desc(buddy, d.prev);
            p.next = d.next;
            set_desc(buddy, d.prev, p);
        }
        if d.next != NIL {
            let mut n = desc(buddy, d.next);
            n.prev = d.prev;
            set_desc(buddy, d.next, n);
        }
        self.list_mut(d.list).len -= 1;
        d.prev = NIL;
        d.next = NIL;
        set_desc(buddy, slab, d);
        slab
    }
}
