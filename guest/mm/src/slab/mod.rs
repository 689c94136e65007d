//! The slab allocator, in the shape of Linux's SLUB (`mm/slub.c`).
//!
//! # Structure
//!
//! A [`KmemCache`] hands out objects of one size. Its memory comes in
//! *slabs*: naturally aligned blocks of `2^order` frames taken from the
//! [buddy allocator](crate::buddy), cut into `objects` equal objects. Each
//! free object holds, in its first word, the guest-physical address of the
//! next free object of its slab (the *free pointer*), so free objects cost
//! no memory besides themselves. A slab's descriptor (its free list head,
//! how many objects are in use, its list links, its cache and list) lives
//! in the buddy metadata of its head frame, the block's
//! [`BlockTag`], as Linux's `struct slab` overlays
//! `struct page`; so an object's slab is found by rounding its address
//! down to the slab size, and its descriptor by looking the slab up.
//!
//! # Slab lifecycle
//!
//! - **cpu**: at most one slab per cache is *frozen* as the CPU slab. Its
//!   free objects are on the cache's CPU free list, which the fast paths
//!   pop and push without touching any descriptor (SLUB's lockless
//!   `c->freelist`). A frozen slab counts all its objects as in use.
//! - **full**: when the CPU free list runs dry, the CPU slab (all objects
//!   in use) goes to the full list, and a new CPU slab is taken from the
//!   partial list, else the empty list, else the buddy allocator.
//! - **partial**: a free into a full slab moves it to the partial list.
//! - **empty**: a free that empties a slab moves it to the empty list; an
//!   empty slab beyond the cache's `max_empty` is returned to the buddy
//!   allocator at once. [`KmemCache::shrink`] returns them all (and the
//!   CPU slab if it is unused).
//!
//! # Invariants (checked by [`KmemCache::check_invariants`])
//!
//! - Every slab of the cache is on exactly one of the partial, full and
//!   empty lists, or is the CPU slab; its descriptor says which, and names
//!   the cache. Partial slabs have `0 < inuse < objects`, full slabs
//!   `inuse == objects` and no free object, empty slabs `inuse == 0`; the
//!   empty list never holds more than `max_empty` slabs.
//! - For every slab but the CPU slab, `inuse` plus the length of its free
//!   list is `objects`; the CPU free list holds only objects of the CPU
//!   slab. Free lists hold object starts, each once, and end.
//! - An object is aligned to the cache's alignment: slabs are naturally
//!   aligned (at least 4 KiB) and the object stride is a multiple of the
//!   alignment, which is at most 4 KiB.
//! - Out of memory is `None`, never a panic (the `GlobalAlloc` contract).
//!
//! A free is checked as SLUB does without `slub_debug`: the object must
//! be an object start in a slab of this cache, and must not be the object
//! at the head of its free list (the `CONFIG_SLAB_FREELIST_HARDENED`
//! check); a free into a slab with no object in use is refused. Deeper
//! double frees are found by [`KmemCache::check_invariants`], not on the
//! fast path. A free pointer that does not point into the CPU slab (the
//! trace of a use after free) is never followed: the rest of that list is
//! dropped and counted in [`CacheStats::corruptions`].
//!
//! [`Kmalloc`] is the set of power-of-two caches `kmalloc-8` …
//! `kmalloc-4096`; larger or more strictly aligned requests go straight to
//! the buddy allocator.

use guest_abi::Gpa;

use crate::PAGE_SIZE;
use crate::buddy::{BlockTag, BuddyAllocator, FreeError, MAX_ORDER, ZonePref};
use crate::phys::{PAGE_SHIFT, Pfn, PhysMem};

/// End of a free list held in objects (never an object address: objects
/// are at least 8-byte aligned).
const FREELIST_END: u64 = u64::MAX;
/// End of a slab list, or of a descriptor's free list (as an offset).
const NIL: u32 = u32::MAX;
/// `KmemCache::cpu_base` when there is no CPU slab.
const NO_CPU_SLAB: u64 = u64::MAX;
/// High bits of a descriptor's list byte, so that a block that is not a
/// slab (its tag is all zeroes when allocated) is never taken for one.
const SLAB_MAGIC: u8 = 0xa0;
/// Fewest objects a slab is sized for (Linux's `slub_min_objects` idea).
const MIN_OBJECTS: u32 = 8;
/// Largest slab order.
const MAX_SLAB_ORDER: u8 = 3;
/// Most objects in a slab: 8-byte objects in an order-0 slab. (A cache
/// only takes a larger order when objects exceed 512 bytes, and then has
/// at most `32 KiB / 513 < 64` objects.)
const MAX_OBJECTS: u32 = PAGE_SIZE as u32 / 8;
/// Default number of empty slabs a cache keeps.
pub const DEFAULT_MAX_EMPTY: u32 = 2;
/// The largest alignment a cache can honour.
pub const MAX_ALIGN: u32 = PAGE_SIZE as u32;

/// Which list a slab is on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum SlabList {
    Cpu = 0,
    Partial = 1,
    Full = 2,
    Empty = 3,
}

/// A slab's descriptor, stored in its head frame's [`BlockTag`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct SlabDesc {
    /// Previous and next slab on the same list (pfns), or `NIL`.
    prev: u32,
    next: u32,
    /// Byte offset of the first free object, or `NIL`.
    freelist: u32,
    /// Objects in use (all of them while frozen as the CPU slab).
    inuse: u16,
    /// The owning cache's id.
    cache: u8,
    list: SlabList,
}

impl SlabDesc {
    fn to_tag(self) -> BlockTag {
        let word = self.inuse as u32 | (self.cache as u32) << 16 | ((SLAB_MAGIC | self.list as u8) as u32) << 24;
        [self.prev, self.next, self.freelist, word]
    }

    fn from_tag(tag: BlockTag) -> Option<Self> {
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

/// Head and length of a list of slabs.
#[derive(Clone, Copy, Debug)]
struct SlabListHead {
    head: u32,
    len: u32,
}

impl SlabListHead {
    const EMPTY: SlabListHead = SlabListHead { head: NIL, len: 0 };
}

/// Per-cache counters (Linux's `/sys/kernel/slab/*/`, in small).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct CacheStats {
    /// Objects handed out.
    pub allocs: u64,
    /// Objects taken back.
    pub frees: u64,
    /// Slabs taken from the buddy allocator.
    pub slabs_allocated: u64,
    /// Slabs returned to the buddy allocator.
    pub slabs_freed: u64,
    /// Allocations that failed for want of memory.
    pub failures: u64,
    /// Free pointers found pointing outside the CPU slab (use after free);
    /// the objects behind them are leaked rather than handed out.
    pub corruptions: u64,
}

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

impl core::fmt::Display for SlabError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl core::error::Error for SlabError {}

/// Why a cache could not be created.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CacheError {
    /// The alignment is not a power of two, or above [`MAX_ALIGN`].
    BadAlign,
    /// The object (rounded to its alignment) does not fit a slab of the
    /// largest order.
    TooLarge,
}

/// A cache of equal-sized objects. See the module documentation.
#[derive(Debug)]
pub struct KmemCache {
    name: &'static str,
    id: u8,
    /// Object stride: the requested size rounded up to the alignment.
    size: u32,
    /// `size - 1` if `size` is a power of two, else 0 (modulo by mask).
    size_mask: u32,
    /// Bytes of a slab's objects, `objects * size` (the end of the last).
    objects_bytes: u32,
    /// `!(slab_bytes - 1)`: an address's slab base is `addr & slab_mask`.
    slab_mask: u64,
    align: u32,
    order: u8,
    objects: u32,
    zone: ZonePref,
    max_empty: u32,
    /// The frozen CPU slab (pfn), or `NIL`.
    cpu_slab: u32,
    /// The CPU slab's address, or `NO_CPU_SLAB` (never a slab address: a
    /// slab is page-aligned), kept with `cpu_slab` for the free fast path.
    cpu_base: u64,
    /// First free object of the CPU slab, or `FREELIST_END`.
    cpu_freelist: u64,
    partial: SlabListHead,
    full: SlabListHead,
    empty: SlabListHead,
    stats: CacheStats,
}

impl KmemCache {
    /// A cache named `name` (for reports) of objects of `size` bytes aligned
    /// to `align` (a power of two, at most [`MAX_ALIGN`]; at least 8 is
    /// used), with slabs from `zone`. `id` tells this cache's slabs from
    /// other caches' and must be unique among the caches sharing a buddy
    /// allocator.
    pub const fn new(name: &'static str, id: u8, size: u32, align: u32, zone: ZonePref) -> Result<Self, CacheError> {
        if !align.is_power_of_two() || align > MAX_ALIGN {
            return Err(CacheError::BadAlign);
        }
        let align = if align < 8 { 8 } else { align };
        let size = if size < 8 { 8 } else { size };
        let size = match size.checked_next_multiple_of(align) {
            Some(s) => s,
            None => return Err(CacheError::TooLarge),
        };
        // The smallest order giving MIN_OBJECTS objects, capped.
        let mut order = 0u8;
        while order < MAX_SLAB_ORDER && ((PAGE_SIZE as u32) << order) / size < MIN_OBJECTS {
            order += 1;
        }
        let objects = ((PAGE_SIZE as u32) << order) / size;
        if objects == 0 || objects > MAX_OBJECTS {
            return Err(CacheError::TooLarge);
        }
        Ok(KmemCache {
            name,
            id,
            size,
            size_mask: if size.is_power_of_two() { size - 1 } else { 0 },
            objects_bytes: objects * size,
            slab_mask: !((PAGE_SIZE << order) - 1),
            align,
            order,
            objects,
            zone,
            max_empty: DEFAULT_MAX_EMPTY,
            cpu_slab: NIL,
            cpu_base: NO_CPU_SLAB,
            cpu_freelist: FREELIST_END,
            partial: SlabListHead::EMPTY,
            full: SlabListHead::EMPTY,
            empty: SlabListHead::EMPTY,
            stats: CacheStats { allocs: 0, frees: 0, slabs_allocated: 0, slabs_freed: 0, failures: 0, corruptions: 0 },
        })
    }

    /// The cache's name.
    pub const fn name(&self) -> &'static str {
        self.name
    }

    /// Object stride in bytes (the size rounded up to the alignment).
    pub const fn object_size(&self) -> u32 {
        self.size
    }

    /// Alignment of every object.
    pub const fn align(&self) -> u32 {
        self.align
    }

    /// Order of the cache's slabs.
    pub const fn slab_order(&self) -> u8 {
        self.order
    }

    /// Objects per slab.
    pub const fn objects_per_slab(&self) -> u32 {
        self.objects
    }

    /// The counters.
    pub const fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Slabs on the partial, full and empty lists, and whether there is a
    /// CPU slab.
    pub const fn slab_counts(&self) -> (u32, u32, u32, bool) {
        (self.partial.len, self.full.len, self.empty.len, self.cpu_slab != NIL)
    }

    /// How many empty slabs the cache keeps before returning them to the
    /// buddy allocator (default [`DEFAULT_MAX_EMPTY`]). Takes effect at the
    /// next free that empties a slab, or [`shrink`](Self::shrink).
    pub fn set_max_empty(&mut self, n: u32) {
        self.max_empty = n;
    }

    /// Allocate an object; `None` when the buddy allocator is out of memory.
    /// Its contents are whatever was there (the first word is the stale
    /// free pointer).
    // Always inlined, as Linux's `slab_alloc_node` and `slab_free` are:
    // the fast path is a few instructions, the slow path a call.
    #[inline(always)]
    pub fn alloc<M: PhysMem>(&mut self, buddy: &mut BuddyAllocator<'_, M>) -> Option<Gpa> {
        let obj = self.cpu_freelist;
        if obj != FREELIST_END {
            self.cpu_freelist = self.follow_free_pointer(buddy, obj);
            self.stats.allocs += 1;
            return Some(Gpa(obj));
        }
        self.alloc_slow(buddy)
    }

    /// The free pointer of the free CPU-slab object `obj`: the next object
    /// of the CPU free list, or `FREELIST_END`. A free pointer that leaves
    /// the CPU slab was overwritten after a free: it is not followed (the
    /// rest of the list is dropped, and counted).
    #[inline]
    fn follow_free_pointer<M: PhysMem>(&mut self, buddy: &BuddyAllocator<'_, M>, obj: u64) -> u64 {
        let next = buddy.mem().read_u64(Gpa(obj));
        if (next ^ obj) & self.slab_mask != 0 && next != FREELIST_END {
            self.stats.corruptions += 1;
            return FREELIST_END;
        }
        next
    }

    /// Take the next slab with free objects as the CPU slab, and allocate
    /// from it.
    #[cold]
    #[inline(never)]
    fn alloc_slow<M: PhysMem>(&mut self, buddy: &mut BuddyAllocator<'_, M>) -> Option<Gpa> {
        if self.cpu_slab != NIL {
            // The CPU free list ran dry: every object is in use.
            let slab = self.cpu_slab;
            self.cpu_slab = NIL;
            self.cpu_base = NO_CPU_SLAB;
            let mut d = self.desc(buddy, slab);
            d.freelist = NIL;
            d.inuse = self.objects as u16;
            self.push(buddy, slab, d, SlabList::Full);
        }
        let slab = if self.partial.head != NIL {
            self.unlink(buddy, self.partial.head)
        } else if self.empty.head != NIL {
            self.unlink(buddy, self.empty.head)
        } else {
            match self.new_slab(buddy) {
                Some(slab) => slab,
                None => {
                    self.stats.failures += 1;
                    return None;
                }
            }
        };
        // Freeze it: its free list becomes the CPU free list.
        let mut d = self.desc(buddy, slab);
        let base = (slab as u64) << PAGE_SHIFT;
        self.cpu_freelist = if d.freelist == NIL { FREELIST_END } else { base + d.freelist as u64 };
        d.freelist = NIL;
        d.inuse = self.objects as u16;
        d.list = SlabList::Cpu;
        d.prev = NIL;
        d.next = NIL;
        self.set_desc(buddy, slab, d);
        self.cpu_slab = slab;
        self.cpu_base = base;
        // Not `self.alloc`: a recursive fast path is not inlined.
        let obj = self.cpu_freelist;
        if obj == FREELIST_END {
            // A slab on the partial or empty list always has a free object.
            self.stats.failures += 1;
            return None;
        }
        self.cpu_freelist = self.follow_free_pointer(buddy, obj);
        self.stats.allocs += 1;
        Some(Gpa(obj))
    }

    /// A fresh slab from the buddy allocator, every object on its free
    /// list, on no list.
    fn new_slab<M: PhysMem>(&mut self, buddy: &mut BuddyAllocator<'_, M>) -> Option<u32> {
        let pfn = buddy.alloc(self.order, self.zone)?;
        if pfn.0 >= NIL as u64 {
            // Beyond what a descriptor can name (16 TiB): not usable here.
            let _ = buddy.free(pfn, self.order);
            return None;
        }
        let base = pfn.addr().0;
        let size = self.size as u64;
        for i in 0..self.objects as u64 {
            let next = if i + 1 == self.objects as u64 { FREELIST_END } else { base + (i + 1) * size };
            buddy.mem().write_u64(Gpa(base + i * size), next);
        }
        let slab = pfn.0 as u32;
        let d = SlabDesc { prev: NIL, next: NIL, freelist: 0, inuse: 0, cache: self.id, list: SlabList::Empty };
        self.set_desc(buddy, slab, d);
        self.stats.slabs_allocated += 1;
        Some(slab)
    }

    /// Free the object at `addr`, allocated from this cache. A bad free is
    /// refused with the reason and changes nothing.
    // Always inlined, as Linux's `slab_alloc_node` and `slab_free` are:
    // the fast path is a few instructions, the slow path a call.
    #[inline(always)]
    pub fn free<M: PhysMem>(&mut self, buddy: &mut BuddyAllocator<'_, M>, addr: Gpa) -> Result<(), SlabError> {
        let slab_base = addr.0 & self.slab_mask;
        if slab_base == self.cpu_base {
            self.check_offset(addr.0 - slab_base)?;
            if addr.0 == self.cpu_freelist {
                return Err(SlabError::DoubleFree);
            }
            buddy.mem().write_u64(addr, self.cpu_freelist);
            self.cpu_freelist = addr.0;
            self.stats.frees += 1;
            return Ok(());
        }
        self.free_slow(buddy, addr, slab_base)
    }

    /// Whether `off` (bytes into a slab) is an object start.
    #[inline]
    fn check_offset(&self, off: u64) -> Result<(), SlabError> {
        let rem = if self.size_mask != 0 { off & self.size_mask as u64 } else { off % self.size as u64 };
        if rem != 0 || off >= self.objects_bytes as u64 {
            return Err(SlabError::NotObjectStart);
        }
        Ok(())
    }

    #[cold]
    #[inline(never)]
    fn free_slow<M: PhysMem>(
        &mut self,
        buddy: &mut BuddyAllocator<'_, M>,
        addr: Gpa,
        slab_base: u64,
    ) -> Result<(), SlabError> {
        let pfn = Pfn(slab_base >> PAGE_SHIFT);
        let Some((order, tag)) = buddy.block_tag(pfn) else { return Err(SlabError::Foreign) };
        let Some(mut d) = SlabDesc::from_tag(tag) else { return Err(SlabError::Foreign) };
        if order != self.order || d.cache != self.id || d.list == SlabList::Cpu {
            return Err(SlabError::Foreign);
        }
        let off = addr.0 - slab_base;
        self.check_offset(off)?;
        if d.inuse == 0 || d.freelist == off as u32 {
            return Err(SlabError::DoubleFree);
        }
        let slab = pfn.0 as u32;
        let next = if d.freelist == NIL { FREELIST_END } else { slab_base + d.freelist as u64 };
        buddy.mem().write_u64(addr, next);
        d.freelist = off as u32;
        d.inuse -= 1;
        self.stats.frees += 1;
        let target = if d.inuse == 0 { SlabList::Empty } else { SlabList::Partial };
        if d.list == target {
            self.set_desc(buddy, slab, d);
            return Ok(());
        }
        // Move it: unlink keeps the updated free list and count.
        self.set_desc(buddy, slab, d);
        self.unlink(buddy, slab);
        let d = self.desc(buddy, slab);
        if target == SlabList::Empty && self.empty.len >= self.max_empty {
            self.discard(buddy, slab);
        } else {
            self.push(buddy, slab, d, target);
        }
        Ok(())
    }

    /// Return every empty slab to the buddy allocator, and the CPU slab too
    /// if none of its objects is in use (Linux's `kmem_cache_shrink`).
    pub fn shrink<M: PhysMem>(&mut self, buddy: &mut BuddyAllocator<'_, M>) {
        self.flush_cpu_slab(buddy);
        while self.empty.head != NIL {
            let slab = self.unlink(buddy, self.empty.head);
            self.discard(buddy, slab);
        }
    }

    /// Unfreeze the CPU slab: count its free objects, give them back to its
    /// descriptor, and put it on the list its use says.
    fn flush_cpu_slab<M: PhysMem>(&mut self, buddy: &mut BuddyAllocator<'_, M>) {
        if self.cpu_slab == NIL {
            return;
        }
        let slab = self.cpu_slab;
        let base = (slab as u64) << PAGE_SHIFT;
        let mut d = self.desc(buddy, slab);
        let (mut free, mut obj) = (0u32, self.cpu_freelist);
        while obj != FREELIST_END && free < self.objects {
            free += 1;
            obj = buddy.mem().read_u64(Gpa(obj));
        }
        d.freelist = if self.cpu_freelist == FREELIST_END { NIL } else { (self.cpu_freelist - base) as u32 };
        d.inuse = (self.objects - free) as u16;
        self.cpu_slab = NIL;
        self.cpu_base = NO_CPU_SLAB;
        self.cpu_freelist = FREELIST_END;
        let list = match d.inuse {
            0 => SlabList::Empty,
            n if n as u32 == self.objects => SlabList::Full,
            _ => SlabList::Partial,
        };
        self.push(buddy, slab, d, list);
    }

    /// Return a slab (on no list) to the buddy allocator.
    fn discard<M: PhysMem>(&mut self, buddy: &mut BuddyAllocator<'_, M>, slab: u32) {
        if buddy.free(Pfn(slab as u64), self.order).is_ok() {
            self.stats.slabs_freed += 1;
        }
    }

    // ---- slab lists, through the descriptors in the buddy metadata ----

    fn desc<M: PhysMem>(&self, buddy: &BuddyAllocator<'_, M>, slab: u32) -> SlabDesc {
        match buddy.block_tag(Pfn(slab as u64)).and_then(|(_, tag)| SlabDesc::from_tag(tag)) {
            Some(d) => d,
            None => panic!("slab descriptor lost"),
        }
    }

    fn set_desc<M: PhysMem>(&self, buddy: &mut BuddyAllocator<'_, M>, slab: u32, d: SlabDesc) {
        let ok = buddy.set_block_tag(Pfn(slab as u64), d.to_tag());
        debug_assert!(ok, "slab is not an allocated block");
    }

    fn list_mut(&mut self, list: SlabList) -> &mut SlabListHead {
        match list {
            SlabList::Partial => &mut self.partial,
            SlabList::Full => &mut self.full,
            SlabList::Empty | SlabList::Cpu => &mut self.empty,
        }
    }

    /// Put `slab` (descriptor `d`, on no list) at the head of `list`.
    fn push<M: PhysMem>(&mut self, buddy: &mut BuddyAllocator<'_, M>, slab: u32, mut d: SlabDesc, list: SlabList) {
        let head = self.list_mut(list);
        let old = head.head;
        head.head = slab;
        head.len += 1;
        d.prev = NIL;
        d.next = old;
        d.list = list;
        self.set_desc(buddy, slab, d);
        if old != NIL {
            let mut o = self.desc(buddy, old);
            o.prev = slab;
            self.set_desc(buddy, old, o);
        }
    }

    /// Take `slab` off its list; returns it.
    fn unlink<M: PhysMem>(&mut self, buddy: &mut BuddyAllocator<'_, M>, slab: u32) -> u32 {
        let mut d = self.desc(buddy, slab);
        if d.prev == NIL {
            self.list_mut(d.list).head = d.next;
        } else {
            let mut p = self.desc(buddy, d.prev);
            p.next = d.next;
            self.set_desc(buddy, d.prev, p);
        }
        if d.next != NIL {
            let mut n = self.desc(buddy, d.next);
            n.prev = d.prev;
            self.set_desc(buddy, d.next, n);
        }
        self.list_mut(d.list).len -= 1;
        d.prev = NIL;
        d.next = NIL;
        self.set_desc(buddy, slab, d);
        slab
    }

    /// Check every invariant of the module documentation by walking every
    /// list and free list. For tests.
    pub fn check_invariants<M: PhysMem>(&self, buddy: &BuddyAllocator<'_, M>) -> Result<(), &'static str> {
        let mut live_slabs = 0u64;
        for (list, head) in
            [(SlabList::Partial, self.partial), (SlabList::Full, self.full), (SlabList::Empty, self.empty)]
        {
            let (mut prev, mut cur, mut n) = (NIL, head.head, 0u32);
            while cur != NIL {
                let (order, tag) = buddy.block_tag(Pfn(cur as u64)).ok_or("slab not an allocated block")?;
                let d = SlabDesc::from_tag(tag).ok_or("slab without a descriptor")?;
                if order != self.order || d.cache != self.id || d.list != list || d.prev != prev {
                    return Err("slab of another order, cache or list, or a broken back link");
                }
                let free = self.walk_freelist(buddy, cur, d.freelist)?;
                if d.inuse as u32 + free != self.objects {
                    return Err("inuse plus free objects is not objects per slab");
                }
                let ok = match list {
                    SlabList::Partial => d.inuse > 0 && (d.inuse as u32) < self.objects,
                    SlabList::Full => d.inuse as u32 == self.objects,
                    _ => d.inuse == 0,
                };
                if !ok {
                    return Err("slab on the wrong list for its use");
                }
                n += 1;
                if n > head.len {
                    return Err("slab list longer than its count (or a cycle)");
                }
                (prev, cur) = (cur, d.next);
            }
            if n != head.len {
                return Err("slab list shorter than its count");
            }
            live_slabs += n as u64;
        }
        if self.empty.len > self.max_empty {
            return Err("more empty slabs than max_empty");
        }
        let cpu_base = if self.cpu_slab == NIL { NO_CPU_SLAB } else { (self.cpu_slab as u64) << PAGE_SHIFT };
        if self.cpu_base != cpu_base {
            return Err("CPU slab address disagrees with the CPU slab");
        }
        if self.cpu_slab != NIL {
            live_slabs += 1;
            let (order, tag) = buddy.block_tag(Pfn(self.cpu_slab as u64)).ok_or("CPU slab not an allocated block")?;
            let d = SlabDesc::from_tag(tag).ok_or("CPU slab without a descriptor")?;
            if order != self.order || d.cache != self.id || d.list != SlabList::Cpu || d.freelist != NIL {
                return Err("CPU slab descriptor wrong");
            }
            let base = (self.cpu_slab as u64) << PAGE_SHIFT;
            let first = if self.cpu_freelist == FREELIST_END {
                NIL
            } else {
                u32::try_from(self.cpu_freelist.wrapping_sub(base)).map_err(|_| "CPU free list outside the CPU slab")?
            };
            self.walk_freelist(buddy, self.cpu_slab, first)?;
        } else if self.cpu_freelist != FREELIST_END {
            return Err("CPU free list without a CPU slab");
        }
        if self.stats.slabs_allocated - self.stats.slabs_freed != live_slabs {
            return Err("slab counters disagree with the lists");
        }
        Ok(())
    }

    /// Length of the free list starting at byte offset `first` of `slab`,
    /// checking that it holds distinct object starts of the slab and ends.
    fn walk_freelist<M: PhysMem>(
        &self,
        buddy: &BuddyAllocator<'_, M>,
        slab: u32,
        first: u32,
    ) -> Result<u32, &'static str> {
        let base = (slab as u64) << PAGE_SHIFT;
        let mut seen = [0u64; MAX_OBJECTS as usize / 64];
        let (mut off, mut n) = (first as u64, 0u32);
        if first == NIL {
            return Ok(0);
        }
        loop {
            self.check_offset(off).map_err(|_| "free list holds a non-object address")?;
            let i = (off / self.size as u64) as usize;
            if seen[i / 64] & (1 << (i % 64)) != 0 {
                return Err("free list holds an object twice");
            }
            seen[i / 64] |= 1 << (i % 64);
            n += 1;
            let next = buddy.mem().read_u64(Gpa(base + off));
            if next == FREELIST_END {
                return Ok(n);
            }
            off = next.checked_sub(base).ok_or("free list leaves its slab")?;
        }
    }
}

/// Number of kmalloc size classes: 8, 16, …, 4096 bytes.
pub const NR_KMALLOC_CACHES: usize = 10;
/// The largest request served by a slab cache.
pub const KMALLOC_MAX_CACHE_SIZE: usize = 4096;
/// Cache ids `KMALLOC_ID_BASE..KMALLOC_ID_BASE + NR_KMALLOC_CACHES` are
/// kmalloc's; named caches should use others.
pub const KMALLOC_ID_BASE: u8 = 1;

const KMALLOC_NAMES: [&str; NR_KMALLOC_CACHES] = [
    "kmalloc-8",
    "kmalloc-16",
    "kmalloc-32",
    "kmalloc-64",
    "kmalloc-128",
    "kmalloc-256",
    "kmalloc-512",
    "kmalloc-1k",
    "kmalloc-2k",
    "kmalloc-4k",
];

/// Where a request of a given size and alignment is served.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SizeClass {
    /// By `kmalloc-(8 << i)`.
    Cache(usize),
    /// By the buddy allocator, a block of this order.
    Pages(u8),
    /// By nobody: larger or more aligned than a `MAX_ORDER` block.
    TooLarge,
}

/// The size class of a request (`align` a power of two, as `Layout`
/// guarantees).
#[inline]
pub const fn size_class(size: usize, align: usize) -> SizeClass {
    let need = if size > align { size } else { align };
    if need <= KMALLOC_MAX_CACHE_SIZE {
        // ceil(log2(max(need, 8))) - 3 without a branch: the top bit of
        // `(need - 1) | 7` is bit ceil(log2(need)) - 1 for `need >= 9`, and
        // bit 2 for `need <= 8`.
        return SizeClass::Cache((need.saturating_sub(1) | 7).ilog2() as usize - 2);
    }
    let pages = need.div_ceil(PAGE_SIZE as usize);
    let order = usize::BITS - (pages - 1).leading_zeros();
    if order > MAX_ORDER as u32 { SizeClass::TooLarge } else { SizeClass::Pages(order as u8) }
}

/// The kmalloc cache of a request, as [`size_class`], by a tree of
/// compares: each way through it ends in a constant index, so once the
/// branches are predicted the cache's address does not wait for the size
/// (a computed index puts the size computation on the critical path of
/// every allocation: about 2 ns measured).
#[inline(always)]
const fn cache_of(size: usize, align: usize) -> Option<usize> {
    let need = if size > align { size } else { align };
    if need <= 64 {
        if need <= 16 {
            if need <= 8 { Some(0) } else { Some(1) }
        } else if need <= 32 {
            Some(2)
        } else {
            Some(3)
        }
    } else if need <= 512 {
        if need <= 128 {
            Some(4)
        } else if need <= 256 {
            Some(5)
        } else {
            Some(6)
        }
    } else if need <= 1024 {
        Some(7)
    } else if need <= 2048 {
        Some(8)
    } else if need <= KMALLOC_MAX_CACHE_SIZE {
        Some(9)
    } else {
        None
    }
}

/// The kmalloc caches (`kmalloc-8` … `kmalloc-4k`) in front of the buddy
/// allocator: the guest's general-purpose heap.
#[derive(Debug)]
pub struct Kmalloc {
    caches: [KmemCache; NR_KMALLOC_CACHES],
    zone: ZonePref,
    large_allocs: u64,
    large_frees: u64,
}

impl Kmalloc {
    /// The kmalloc caches, taking slabs and large blocks from `zone`.
    pub const fn new(zone: ZonePref) -> Self {
        Kmalloc {
            caches: [
                kmalloc_cache(0, zone),
                kmalloc_cache(1, zone),
                kmalloc_cache(2, zone),
                kmalloc_cache(3, zone),
                kmalloc_cache(4, zone),
                kmalloc_cache(5, zone),
                kmalloc_cache(6, zone),
                kmalloc_cache(7, zone),
                kmalloc_cache(8, zone),
                kmalloc_cache(9, zone),
            ],
            zone,
            large_allocs: 0,
            large_frees: 0,
        }
    }

    /// The cache `kmalloc-(8 << i)`.
    pub fn cache(&self, i: usize) -> &KmemCache {
        &self.caches[i]
    }

    /// Large (buddy) allocations and frees so far.
    pub const fn large_counts(&self) -> (u64, u64) {
        (self.large_allocs, self.large_frees)
    }

    /// Allocate `size` bytes aligned to `align` (a power of two); `None`
    /// when out of memory or the request cannot be served.
    // Always inlined, as Linux's `slab_alloc_node` and `slab_free` are:
    // the fast path is a few instructions, the slow path a call.
    #[inline(always)]
    pub fn alloc<M: PhysMem>(&mut self, buddy: &mut BuddyAllocator<'_, M>, size: usize, align: usize) -> Option<Gpa> {
        match cache_of(size, align) {
            Some(i) => self.caches[i].alloc(buddy),
            None => self.alloc_large(buddy, size_class(size, align)),
        }
    }

    /// A request beyond the caches: a block from the buddy allocator.
    #[inline(never)]
    fn alloc_large<M: PhysMem>(&mut self, buddy: &mut BuddyAllocator<'_, M>, class: SizeClass) -> Option<Gpa> {
        let SizeClass::Pages(order) = class else { return None };
        let pfn = buddy.alloc(order, self.zone)?;
        self.large_allocs += 1;
        Some(pfn.addr())
    }

    /// Free `addr`, allocated by [`alloc`](Self::alloc) with the same `size`
    /// and `align`. A bad free is refused and changes nothing.
    // Always inlined, as Linux's `slab_alloc_node` and `slab_free` are:
    // the fast path is a few instructions, the slow path a call.
    #[inline(always)]
    pub fn free<M: PhysMem>(
        &mut self,
        buddy: &mut BuddyAllocator<'_, M>,
        addr: Gpa,
        size: usize,
        align: usize,
    ) -> Result<(), SlabError> {
        match cache_of(size, align) {
            Some(i) => self.caches[i].free(buddy, addr),
            None => self.free_large(buddy, addr, size_class(size, align)),
        }
    }

    /// Free a request beyond the caches: a block of the buddy allocator.
    #[inline(never)]
    fn free_large<M: PhysMem>(
        &mut self,
        buddy: &mut BuddyAllocator<'_, M>,
        addr: Gpa,
        class: SizeClass,
    ) -> Result<(), SlabError> {
        let SizeClass::Pages(order) = class else { return Err(SlabError::Foreign) };
        let pfn = Pfn::from_addr(addr).ok_or(SlabError::NotObjectStart)?;
        buddy.free(pfn, order).map_err(SlabError::Pages)?;
        self.large_frees += 1;
        Ok(())
    }

    /// [`KmemCache::shrink`] every cache.
    pub fn shrink<M: PhysMem>(&mut self, buddy: &mut BuddyAllocator<'_, M>) {
        self.caches.iter_mut().for_each(|c| c.shrink(buddy));
    }

    /// [`KmemCache::check_invariants`] of every cache.
    pub fn check_invariants<M: PhysMem>(&self, buddy: &BuddyAllocator<'_, M>) -> Result<(), &'static str> {
        self.caches.iter().try_for_each(|c| c.check_invariants(buddy))
    }
}

/// `kmalloc-(8 << i)`: objects of `8 << i` bytes aligned to their size.
const fn kmalloc_cache(i: usize, zone: ZonePref) -> KmemCache {
    let size = 8u32 << i;
    match KmemCache::new(KMALLOC_NAMES[i], KMALLOC_ID_BASE + i as u8, size, size, zone) {
        Ok(c) => c,
        Err(_) => panic!("kmalloc size class not constructible"),
    }
}

#[cfg(test)]
mod tests;
