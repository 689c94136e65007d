//! The buddy page allocator, in the shape of Linux's `mm/page_alloc.c`.
//!
//! # Structure
//!
//! The allocator manages one contiguous span of frames `base..base + n`,
//! described by a caller-supplied array of [`FrameMeta`] (Linux's
//! `struct page` array; the guest carves it out of RAM at boot, sized with
//! [`meta_bytes`]). Frames are divided among three [zones](ZoneId):
//! `DMA` (below 16 MiB), `PGTABLE` (the page-table zone named in
//! `BootInfo`, which takes precedence where it overlaps DMA) and `NORMAL`
//! (the rest). Each zone has `free_area[order]` for orders
//! `0..=MAX_ORDER`: a doubly-linked list of free blocks of `2^order`
//! frames, and a small [hot list](HOT_HIGH) of order-0 frames in front of
//! it (Linux's `per_cpu_pages`).
//!
//! # Invariants (checked by [`BuddyAllocator::check_invariants`])
//!
//! - Every frame is in exactly one of these states: `Reserved` (never given
//!   to the allocator), the head of a free block (on exactly one free list,
//!   that of its zone and order), the head of an allocated block, a hot
//!   order-0 frame (on exactly one hot list), or a tail frame inside a free
//!   or allocated block. Only a block's head carries its order; tails are
//!   marked as tails, so freeing an address inside a block is caught.
//! - A block of order `k` is naturally aligned (its absolute pfn is a
//!   multiple of `2^k`), lies inside the span, and within one zone.
//! - Fully merged: no free block has a free buddy (`pfn ^ (1 << k)`) of
//!   the same order and zone below `MAX_ORDER`. So once every frame has been
//!   freed and the hot lists drained, the free lists hold exactly the
//!   maximal blocks they held after [`BuddyAllocator::add_free_range`].
//! - Free-list links live in the metadata, never in the free frames. The
//!   allocator therefore never writes a frame it manages, except to zero
//!   one for [`BuddyAllocator::alloc_zeroed`]: this is what lets the
//!   `PGTABLE` zone hand out zeroed page-table pages without writing them
//!   (in shadow mode each such write would trap to the VMM).
//! - Every free or hot `PGTABLE` frame is all zeroes. Page-table pages go
//!   out only through [`BuddyAllocator::alloc_pgtable`] and come back only
//!   through [`BuddyAllocator::free_pgtable`], which (when verification is
//!   on, by default in debug builds) reads the 512 entries and refuses a
//!   page that is not clear. Ordinary allocations never fall back into
//!   `PGTABLE`.
//! - A rejected [`free`](BuddyAllocator::free) (double free, wrong order,
//!   address inside a block or outside the allocator) changes nothing.
//! - An allocated block's head metadata carries a [`BlockTag`] that belongs
//!   to the block's owner (the slab allocator's descriptor); it is all
//!   zeroes when the block is handed out (cleared when a hot frame is
//!   freed, and when a block leaves the free lists).
//!
//! The hot lists hold order-0 frames that the buddy lists count as
//! allocated; a higher-order allocation that fails drains its zone's hot
//! list and retries, so hot frames never cause a spurious failure.
//!
//! # Deferred initialisation (Linux's `DEFERRED_STRUCT_PAGE_INIT`)
//!
//! Writing every frame's metadata up front costs `O(frames)` at boot,
//! which under emulation is seconds per GiB. An allocator made with
//! [`BuddyAllocator::new_deferred`] writes none at creation, and tracks the
//! span by *section*: one naturally aligned block of [`MAX_ORDER`]
//! ([`SECTION_FRAMES`] frames, 4 MiB; absolute pfns, so a block never
//! crosses a section boundary). Each section is in one of three states,
//! kept in a caller-supplied byte array:
//!
//! - *untouched*: its metadata has never been written and is all zeroes
//!   (it reads as `Reserved`); none of its frames is managed.
//! - *deferred*: wholly given to the allocator by
//!   [`add_free_range`](BuddyAllocator::add_free_range), wholly inside one
//!   zone, and entirely free; its metadata is still all zeroes and it is on
//!   no free list. Its frames count in the zone's
//!   [`ZoneStats::deferred_pages`] (and `managed_pages`), not `free_pages`.
//! - *initialised*: its metadata is authoritative, as in the eager
//!   allocator (every frame `Reserved` with its zone, or managed).
//!
//! [`add_free_range`](BuddyAllocator::add_free_range) defers every untouched
//! section the range covers entirely and that lies in one zone, and
//! initialises the rest (the range's ragged ends, zone boundaries). When a
//! zone's free lists cannot serve an allocation, the lowest deferred section
//! of that zone is initialised as one free block of `MAX_ORDER` and pushed
//! on the free lists ("grown"), before the hot list is drained and before
//! the allocation fails: so a deferred frame never causes a spurious
//! failure, and every invariant above holds for the initialised sections
//! unchanged ("fully merged" counts a deferred section as the free block of
//! `MAX_ORDER` it will become). A frame of a deferred section is handed
//! out only after its section is grown, and neither it nor its metadata is
//! read before; freeing one is refused as a double free (it is free),
//! freeing a frame of an untouched section as not managed.
//!
//! Trust assumption: the caller of `new_deferred` passes metadata and
//! section arrays that are all zeroes (the guest carves them out of the
//! zeroed RAM the VMM hands over). Metadata that is not zero inside an
//! untouched or deferred section is not detected (reading it is what the
//! deferral saves); [`BuddyAllocator::deferred_metadata_is_zero`] checks it
//! for tests. An allocator made with [`BuddyAllocator::new`] has every
//! section initialised from the start.

use crate::phys::{FrameRange, Pfn, PhysMem};

/// The largest block order: blocks are `2^0 ..= 2^MAX_ORDER` frames
/// (4 KiB to 4 MiB), as in Linux (`MAX_PAGE_ORDER`).
pub const MAX_ORDER: u8 = 10;
/// Number of orders, `0..=MAX_ORDER`.
pub const NR_ORDERS: usize = MAX_ORDER as usize + 1;
/// First frame above the DMA zone (16 MiB, the ISA DMA limit).
pub const DMA_LIMIT: Pfn = Pfn((16 << 20) >> 12);
/// Capacity of each zone's hot list; a free that finds it full first
/// returns [`HOT_BATCH`] of its oldest frames to the buddy lists (Linux's
/// `pcp->high`).
pub const HOT_HIGH: usize = 64;
/// How many frames a hot list takes from, or gives back to, the buddy
/// lists at a time (Linux's `pcp->batch`).
pub const HOT_BATCH: usize = 16;

/// Number of zones.
pub const NR_ZONES: usize = 3;

/// Frames per section, the unit of deferred initialisation: one block of
/// [`MAX_ORDER`].
pub const SECTION_FRAMES: u64 = 1 << MAX_ORDER;

// Section states, as raw bytes so that an all-zero array is valid.
const SEC_UNTOUCHED: u8 = 0;
const SEC_DEFERRED: u8 = 1;
const SEC_INIT: u8 = 2;
// `untouched_run` tests eight states at once against zero.
const _: () = assert!(SEC_UNTOUCHED == 0);

/// Bytes of section-state array [`BuddyAllocator::new_deferred`] needs for a
/// span of `frames` frames (whatever its base).
pub const fn section_bytes(frames: u64) -> u64 {
    frames.div_ceil(SECTION_FRAMES) + 1
}

/// End of a free list.
const NIL: u32 = u32::MAX;

/// A memory zone.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
#[repr(u8)]
pub enum ZoneId {
    /// Frames below 16 MiB ([`DMA_LIMIT`]).
    Dma = 0,
    /// All other frames, except the page-table zone.
    Normal = 1,
    /// The page-table zone: every page-table page comes from here.
    PageTables = 2,
}

impl ZoneId {
    /// Every zone, in index order.
    pub const ALL: [ZoneId; NR_ZONES] = [ZoneId::Dma, ZoneId::Normal, ZoneId::PageTables];

    /// The zone's name, as Linux spells it.
    pub const fn as_str(self) -> &'static str {
        match self {
            ZoneId::Dma => "DMA",
            ZoneId::Normal => "Normal",
            ZoneId::PageTables => "PageTables",
        }
    }

    const fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            0 => Some(ZoneId::Dma),
            1 => Some(ZoneId::Normal),
            2 => Some(ZoneId::PageTables),
            _ => None,
        }
    }
}

/// Where an ordinary allocation may come from, in order (Linux's zonelist).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ZonePref {
    /// `NORMAL`, falling back to `DMA` when `NORMAL` cannot serve.
    Normal,
    /// `DMA` only (memory below 16 MiB).
    Dma,
}

impl ZonePref {
    /// The zones tried, in order.
    pub const fn zonelist(self) -> &'static [ZoneId] {
        match self {
            ZonePref::Normal => &[ZoneId::Normal, ZoneId::Dma],
            ZonePref::Dma => &[ZoneId::Dma],
        }
    }
}

// Frame states, stored as a raw byte so that any bit pattern of a
// `FrameMeta` is a valid value (the guest carves the array out of RAM).
const RESERVED: u8 = 0;
const TAIL: u8 = 1;
const FREE: u8 = 2;
const ALLOCATED: u8 = 3;
const HOT: u8 = 4;

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
    prev: u32,
    /// Next block on the free list (span index), or `NIL`.
    next: u32,
    /// Owner's words while allocated.
    owner: [u32; 2],
    /// Block order (meaningful for block heads and hot frames).
    order: u8,
    /// `RESERVED`, `TAIL`, `FREE`, `ALLOCATED` or `HOT`.
    state: u8,
    /// The frame's zone, a [`ZoneId`] as a byte.
    zone: u8,
    _pad: u8,
}

impl FrameMeta {
    /// A reserved frame's metadata, to fill a fresh array with.
    pub const RESERVED: FrameMeta =
        FrameMeta { prev: NIL, next: NIL, owner: [0; 2], order: 0, state: RESERVED, zone: 0, _pad: 0 };

    /// Give the (allocated) block headed by this frame a clear tag.
    #[inline]
    fn clear_tag(&mut self) {
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

/// Per-zone counters (Linux's `/proc/zoneinfo` and `/proc/vmstat`, in
/// small).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct ZoneStats {
    /// Frames given to the zone by [`BuddyAllocator::add_free_range`].
    pub managed_pages: u64,
    /// Frames on the zone's free lists.
    pub free_pages: u64,
    /// Free frames in deferred sections: managed, free, but not yet on the
    /// free lists (see the module documentation).
    pub deferred_pages: u64,
    /// Frames on the zone's hot list (free for callers, allocated for the
    /// buddy lists).
    pub hot_pages: u64,
    /// Successful allocations served by the zone.
    pub allocs: u64,
    /// Successful frees into the zone.
    pub frees: u64,
    /// Blocks split in two (`expand`).
    pub splits: u64,
    /// Pairs of buddies merged.
    pub merges: u64,
    /// Allocations for which this zone was the first choice and no zone
    /// of the zonelist could serve.
    pub failures: u64,
}

impl ZoneStats {
    /// Frames free for callers: on the free lists, on the hot list, or in
    /// deferred sections.
    pub const fn free_total(&self) -> u64 {
        self.free_pages + self.hot_pages + self.deferred_pages
    }
}

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
    /// The order is above [`MAX_ORDER`].
    InvalidOrder,
    /// A page-table page passed to [`BuddyAllocator::free`], or another
    /// page passed to [`BuddyAllocator::free_pgtable`].
    WrongZone,
    /// A page-table page with a non-zero entry passed to
    /// [`BuddyAllocator::free_pgtable`]; it stays allocated.
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

impl core::fmt::Display for FreeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl core::error::Error for FreeError {}

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
    /// The section-state array is shorter than [`section_bytes`] of the span.
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

impl core::fmt::Display for InitError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl core::error::Error for InitError {}

/// Head and length of one `free_area[order]` list.
#[derive(Clone, Copy, Debug)]
struct FreeArea {
    head: u32,
    nr_free: u64,
}

/// A stack of hot order-0 frames (span indices); the bottom is the oldest.
#[derive(Clone, Copy, Debug)]
struct HotList {
    frames: [u32; HOT_HIGH],
    count: usize,
}

impl HotList {
    /// Take the most recently freed frame, if any.
    #[inline]
    fn pop(&mut self) -> Option<u32> {
        let n = self.count.checked_sub(1)?;
        // `count <= HOT_HIGH` always; `get` turns the bounds check into the
        // same branch as the empty test.
        let idx = *self.frames.get(n)?;
        self.count = n;
        Some(idx)
    }

    /// Push a frame; the caller has made room (`count < HOT_HIGH`).
    #[inline]
    fn push(&mut self, idx: u32) {
        self.frames[self.count] = idx;
        self.count += 1;
    }
}

/// One zone: its free areas, hot list and counters.
#[derive(Clone, Copy, Debug)]
struct Zone {
    free_area: [FreeArea; NR_ORDERS],
    hot: HotList,
    stats: ZoneStats,
}

impl Zone {
    const EMPTY: Zone = Zone {
        free_area: [FreeArea { head: NIL, nr_free: 0 }; NR_ORDERS],
        hot: HotList { frames: [0; HOT_HIGH], count: 0 },
        stats: ZoneStats {
            managed_pages: 0,
            free_pages: 0,
            deferred_pages: 0,
            hot_pages: 0,
            allocs: 0,
            frees: 0,
            splits: 0,
            merges: 0,
            failures: 0,
        },
    };

    /// Put the free block headed by `idx` (already marked `FREE` with its
    /// order) at the head of `free_area[order]`.
    fn push(&mut self, meta: &mut [FrameMeta], order: u8, idx: u32) {
        let area = &mut self.free_area[order as usize];
        let old = area.head;
        meta[idx as usize].prev = NIL;
        meta[idx as usize].next = old;
        if old != NIL {
            meta[old as usize].prev = idx;
        }
        area.head = idx;
        area.nr_free += 1;
        self.stats.free_pages += 1 << order;
    }

    /// Unlink the free block headed by `idx` from `free_area[order]`.
    fn remove(&mut self, meta: &mut [FrameMeta], order: u8, idx: u32) {
        let FrameMeta { prev, next, .. } = meta[idx as usize];
        if prev == NIL {
            self.free_area[order as usize].head = next;
        } else {
            meta[prev as usize].next = next;
        }
        if next != NIL {
            meta[next as usize].prev = prev;
        }
        meta[idx as usize].prev = NIL;
        meta[idx as usize].next = NIL;
        self.free_area[order as usize].nr_free -= 1;
        self.stats.free_pages -= 1 << order;
    }

    /// Unlink and return the first block of `free_area[order]`.
    fn pop(&mut self, meta: &mut [FrameMeta], order: u8) -> Option<u32> {
        let head = self.free_area[order as usize].head;
        if head == NIL {
            return None;
        }
        self.remove(meta, order, head);
        Some(head)
    }
}

/// The buddy allocator over one span of frames. See the module
/// documentation for its structure and invariants.
pub struct BuddyAllocator<'m, M> {
    mem: M,
    meta: &'m mut [FrameMeta],
    /// Absolute pfn of span index 0.
    base: u64,
    pgtables: FrameRange,
    zones: [Zone; NR_ZONES],
    verify_pgtables: bool,
    /// Per section (index 0 = the section holding `base`): `SEC_*`. Empty
    /// for an eager allocator, whose sections are all initialised.
    sections: &'m mut [u8],
    /// Per zone: no deferred section of the zone has a lower index.
    deferred_cursor: [usize; NR_ZONES],
}

impl<'m, M: PhysMem> BuddyAllocator<'m, M> {
    /// An allocator for the span of `meta.len()` frames starting at `base`,
    /// with `pgtables` as its page-table zone (possibly empty). Every frame
    /// starts reserved: give the usable ones with
    /// [`add_free_range`](Self::add_free_range).
    pub fn new(mem: M, meta: &'m mut [FrameMeta], base: Pfn, pgtables: FrameRange) -> Result<Self, InitError> {
        let a = Self::bare(mem, meta, &mut [], base, pgtables)?;
        for i in 0..a.meta.len() {
            let zone = a.expected_zone(base.add(i as u64));
            a.meta[i] = FrameMeta { zone: zone as u8, ..FrameMeta::RESERVED };
        }
        Ok(a)
    }

    /// Like [`new`](Self::new), but with deferred initialisation (see the
    /// module documentation): `O(1)`, nothing is written. `meta` and
    /// `sections` must be all zeroes (the trust assumption documented
    /// there); `sections` must hold at least [`section_bytes`]`(meta.len())`
    /// bytes.
    pub fn new_deferred(
        mem: M,
        meta: &'m mut [FrameMeta],
        sections: &'m mut [u8],
        base: Pfn,
        pgtables: FrameRange,
    ) -> Result<Self, InitError> {
        if (sections.len() as u64) < section_bytes(meta.len() as u64) {
            return Err(InitError::SectionArrayTooSmall);
        }
        Self::bare(mem, meta, sections, base, pgtables)
    }

    fn bare(
        mem: M,
        meta: &'m mut [FrameMeta],
        sections: &'m mut [u8],
        base: Pfn,
        pgtables: FrameRange,
    ) -> Result<Self, InitError> {
        let len = meta.len() as u64;
        if len >= NIL as u64 || base.0.checked_add(len).is_none_or(|end| end > u64::MAX >> 12) {
            return Err(InitError::SpanTooLarge);
        }
        let span = FrameRange::new(base, base.add(len));
        if !pgtables.is_empty() && (pgtables.start < span.start || pgtables.end > span.end) {
            return Err(InitError::PageTablesOutsideSpan);
        }
        Ok(Self {
            mem,
            meta,
            base: base.0,
            pgtables,
            zones: [Zone::EMPTY; NR_ZONES],
            verify_pgtables: cfg!(debug_assertions),
            sections,
            deferred_cursor: [0; NR_ZONES],
        })
    }

    /// Whether page-table pages are read to check they are all zero when
    /// added and freed (default: in debug builds).
    pub fn set_verify_pgtables(&mut self, on: bool) {
        self.verify_pgtables = on;
    }

    /// The physical memory accessor.
    pub fn mem(&self) -> &M {
        &self.mem
    }

    /// The frames this allocator covers.
    pub fn span(&self) -> FrameRange {
        FrameRange::new(Pfn(self.base), Pfn(self.base + self.meta.len() as u64))
    }

    /// The page-table zone.
    pub fn pgtable_zone(&self) -> FrameRange {
        self.pgtables
    }

    /// The zone of `pfn`, or `None` if it is outside the span.
    pub fn zone_of(&self, pfn: Pfn) -> Option<ZoneId> {
        let idx = self.index(pfn)?;
        if self.section_state(self.section_of(idx)) != SEC_INIT {
            return Some(self.expected_zone(pfn));
        }
        ZoneId::from_raw(self.meta[idx as usize].zone)
    }

    /// The counters of `zone`.
    pub fn stats(&self, zone: ZoneId) -> ZoneStats {
        let z = &self.zones[zone as usize];
        ZoneStats { hot_pages: z.hot.count as u64, ..z.stats }
    }

    /// Give the frames of `range` to the allocator (Linux's
    /// `memblock_free_all`). They must be inside the span and not yet
    /// managed; page-table zone frames must be all zeroes (checked by
    /// reading when verification is on). On error nothing is added.
    pub fn add_free_range(&mut self, range: FrameRange) -> Result<(), InitError> {
        if range.is_empty() {
            return Ok(());
        }
        let span = self.span();
        if range.start < span.start || range.end > span.end {
            return Err(InitError::RangeOutsideSpan);
        }
        // Validate everything before changing anything. Frames of untouched
        // sections are unmanaged (their metadata is all zeroes) and are not
        // read.
        let (first, last) = ((range.start.0 - self.base) as usize, (range.end.0 - self.base) as usize);
        if self.sections.is_empty() {
            if self.meta[first..last].iter().any(|m| m.state != RESERVED) {
                return Err(InitError::AlreadyManaged);
            }
        } else {
            let (s0, s1) = (self.section_of(first as u32), self.section_of(last as u32 - 1) + 1);
            // Untouched sections are the common case: skip them in a tight
            // scan (boot adds thousands of them).
            let mut sec = s0 + self.untouched_run(s0, s1);
            while sec < s1 {
                match self.sections[sec] {
                    SEC_DEFERRED => return Err(InitError::AlreadyManaged),
                    _ => {
                        let start = self.section_start(sec).0.max(range.start.0);
                        let end = self.section_end(start).min(range.end.0);
                        let (a, b) = ((start - self.base) as usize, (end - self.base) as usize);
                        if self.meta[a..b].iter().any(|m| m.state != RESERVED) {
                            return Err(InitError::AlreadyManaged);
                        }
                    }
                }
                sec += 1;
                sec += self.untouched_run(sec, s1);
            }
        }
        if self.verify_pgtables {
            let start = range.start.max(self.pgtables.start);
            let end = range.end.min(self.pgtables.end);
            if (start.0..end.0).any(|p| !self.mem.frame_is_zero(Pfn(p))) {
                return Err(InitError::PageTablesNotZeroed);
            }
        }
        let mut pfn = range.start.0;
        while pfn < range.end.0 {
            let sec = self.section_of((pfn - self.base) as u32);
            if self.section_state(sec) == SEC_UNTOUCHED {
                // A run of whole untouched sections inside one zone is
                // deferred in one go.
                let whole = self.zone_end(pfn).min(range.end.0) & !(SECTION_FRAMES - 1);
                if pfn.is_multiple_of(SECTION_FRAMES) && whole > pfn {
                    let most = ((whole - pfn) / SECTION_FRAMES) as usize;
                    let n = self.untouched_run(sec, sec + most);
                    self.sections[sec..sec + n].fill(SEC_DEFERRED);
                    let zone = self.expected_zone(Pfn(pfn)) as usize;
                    let frames = n as u64 * SECTION_FRAMES;
                    self.zones[zone].stats.managed_pages += frames;
                    self.zones[zone].stats.deferred_pages += frames;
                    self.deferred_cursor[zone] = self.deferred_cursor[zone].min(sec);
                    pfn += frames;
                    if n > 0 {
                        continue;
                    }
                }
                self.init_section(sec);
            }
            let end = self.section_end(pfn).min(range.end.0);
            self.add_initialised(pfn, end);
            pfn = end;
        }
        Ok(())
    }

    /// Give `[start, end)` (inside one initialised section, all reserved)
    /// to the free lists as maximal blocks.
    fn add_initialised(&mut self, start: u64, end: u64) {
        let (first, last) = ((start - self.base) as usize, (end - self.base) as usize);
        for m in &mut self.meta[first..last] {
            m.state = TAIL;
        }
        let boundaries = [DMA_LIMIT.0, self.pgtables.start.0, self.pgtables.end.0];
        let mut pfn = start;
        while pfn < end {
            // The largest naturally aligned block at `pfn` that fits in the
            // range and does not straddle a zone boundary.
            let mut order = (pfn.trailing_zeros() as u8).min(MAX_ORDER);
            while pfn + (1 << order) > end || boundaries.iter().any(|&b| pfn < b && b < pfn + (1 << order)) {
                order -= 1;
            }
            let idx = (pfn - self.base) as u32;
            let zone = self.meta[idx as usize].zone as usize;
            self.zones[zone].stats.managed_pages += 1 << order;
            self.free_block(idx, order);
            pfn += 1 << order;
        }
    }

    /// Allocate a naturally aligned block of `2^order` frames from the first
    /// zone of `pref`'s zonelist that can serve it. `None` when no zone can
    /// (or `order > MAX_ORDER`). The contents are whatever was there.
    #[inline]
    pub fn alloc(&mut self, order: u8, pref: ZonePref) -> Option<Pfn> {
        // Fast path: an order-0 frame from the preferred zone's hot list
        // (Linux's `rmqueue_pcplist`).
        if order == 0 {
            let z = &mut self.zones[pref.zonelist()[0] as usize];
            if let Some(idx) = z.hot.pop() {
                z.stats.allocs += 1;
                // Hot frames are span indices, so `get_mut` never fails; it
                // is the bounds check the compiler would otherwise insert,
                // folded into the branch to the slow path.
                if let Some(m) = self.meta.get_mut(idx as usize) {
                    // A hot frame's tag was cleared when it was freed.
                    m.state = ALLOCATED;
                    return Some(Pfn(self.base + idx as u64));
                }
            }
        }
        self.alloc_slow(order, pref)
    }

    /// Everything [`alloc`](Self::alloc) does beyond its fast path.
    #[inline(never)]
    fn alloc_slow(&mut self, order: u8, pref: ZonePref) -> Option<Pfn> {
        let zonelist = pref.zonelist();
        if order == 0 {
            for &zone in zonelist {
                if let Some(idx) = self.hot_alloc(zone) {
                    return Some(self.pfn(idx));
                }
            }
        } else if order <= MAX_ORDER {
            for &zone in zonelist {
                if let Some(idx) = self.zone_alloc(zone, order) {
                    return Some(self.pfn(idx));
                }
            }
        }
        self.zones[zonelist[0] as usize].stats.failures += 1;
        None
    }

    /// [`alloc`](Self::alloc), with every frame of the block zeroed.
    pub fn alloc_zeroed(&mut self, order: u8, pref: ZonePref) -> Option<Pfn> {
        let pfn = self.alloc(order, pref)?;
        for i in 0..1 << order {
            self.mem.zero_frame(pfn.add(i));
        }
        Some(pfn)
    }

    /// Free the block of `2^order` frames at `pfn`, allocated by
    /// [`alloc`](Self::alloc) with that order. A bad free is refused with
    /// the reason and changes nothing.
    #[inline]
    pub fn free(&mut self, pfn: Pfn, order: u8) -> Result<(), FreeError> {
        // Fast path (Linux's `free_unref_page`): an order-0 frame that heads
        // an allocated order-0 block of an ordinary zone, onto a hot list
        // with room. These are exactly the checks of `check_free` and the
        // zone check below, in the order that costs least; anything else,
        // including every bad free, takes the slow path, which reports it.
        // An offset below the base wraps to a huge value and fails `get`.
        let off = pfn.0.wrapping_sub(self.base);
        if order == 0
            && off < self.meta.len() as u64
            && let Some(m) = self.meta.get_mut(off as usize)
            && m.state == ALLOCATED
            && m.order == 0
        {
            // One arm per ordinary zone, each with its zone as a constant:
            // the hot list's address is then known before the metadata
            // is read (a predicted branch, not a load on the critical
            // path). Page-table frames are refused by the slow path.
            let zone = m.zone;
            let z = if zone == ZoneId::Normal as u8 {
                &mut self.zones[ZoneId::Normal as usize]
            } else if zone == ZoneId::Dma as u8 {
                &mut self.zones[ZoneId::Dma as usize]
            } else {
                return self.free_slow(pfn, order);
            };
            if z.hot.count < HOT_HIGH {
                m.clear_tag();
                m.state = HOT;
                z.stats.frees += 1;
                z.hot.push(off as u32);
                return Ok(());
            }
        }
        self.free_slow(pfn, order)
    }

    /// Everything [`free`](Self::free) does beyond its fast path.
    #[inline(never)]
    fn free_slow(&mut self, pfn: Pfn, order: u8) -> Result<(), FreeError> {
        let idx = self.check_free(pfn, order)?;
        let m = &mut self.meta[idx as usize];
        let zone = m.zone;
        if zone == ZoneId::PageTables as u8 {
            return Err(FreeError::WrongZone);
        }
        m.clear_tag();
        self.zones[zone as usize].stats.frees += 1;
        if order == 0 {
            self.hot_free(zone as usize, idx);
        } else {
            self.free_block(idx, order);
        }
        Ok(())
    }

    /// Allocate a page-table page from the page-table zone. It is all
    /// zeroes, and the allocator has not written it. `None` when the zone is
    /// exhausted: page tables never come from another zone.
    pub fn alloc_pgtable(&mut self) -> Option<Pfn> {
        match self.hot_alloc(ZoneId::PageTables) {
            Some(idx) => Some(self.pfn(idx)),
            None => {
                self.zones[ZoneId::PageTables as usize].stats.failures += 1;
                None
            }
        }
    }

    /// Free a page-table page from [`alloc_pgtable`](Self::alloc_pgtable).
    /// All its 512 entries must be zero; when verification is on this is
    /// checked by reading, and a page with a non-zero entry is refused
    /// ([`FreeError::NotZeroed`]) and stays allocated.
    pub fn free_pgtable(&mut self, pfn: Pfn) -> Result<(), FreeError> {
        let idx = self.check_free(pfn, 0)?;
        let zone = self.meta[idx as usize].zone;
        if zone != ZoneId::PageTables as u8 {
            return Err(FreeError::WrongZone);
        }
        if self.verify_pgtables && !self.mem.frame_is_zero(pfn) {
            return Err(FreeError::NotZeroed);
        }
        self.meta[idx as usize].clear_tag();
        self.zones[zone as usize].stats.frees += 1;
        self.hot_free(zone as usize, idx);
        Ok(())
    }

    /// Return every hot frame to the buddy lists (Linux's
    /// `drain_all_pages`), after which free memory is fully merged.
    pub fn drain_hot_lists(&mut self) {
        for zone in 0..NR_ZONES {
            self.hot_drain(zone, HOT_HIGH);
        }
    }

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

    /// Call `f(head, order, zone)` for every block on the free lists.
    pub fn for_each_free_block(&self, mut f: impl FnMut(Pfn, u8, ZoneId)) {
        for zone in ZoneId::ALL {
            for order in 0..=MAX_ORDER {
                let mut idx = self.zones[zone as usize].free_area[order as usize].head;
                while idx != NIL {
                    f(self.pfn(idx), order, zone);
                    idx = self.meta[idx as usize].next;
                }
            }
        }
    }

    /// Call `f(frame, zone)` for every frame on the hot lists.
    pub fn for_each_hot_frame(&self, mut f: impl FnMut(Pfn, ZoneId)) {
        for zone in ZoneId::ALL {
            let hot = &self.zones[zone as usize].hot;
            for &idx in &hot.frames[..hot.count] {
                f(self.pfn(idx), zone);
            }
        }
    }

    /// Check every invariant of the module documentation, by walking the
    /// whole metadata array, every list, and (when verification is on)
    /// reading every free page-table frame. For tests: it is `O(frames)`.
    pub fn check_invariants(&self) -> Result<(), &'static str> {
        let mut heads = [[0u64; NR_ORDERS]; NR_ZONES];
        let mut free_pages = [0u64; NR_ZONES];
        let mut hot_frames = [0usize; NR_ZONES];
        let mut deferred = [0u64; NR_ZONES];
        let len = self.meta.len();
        let mut idx = 0usize;
        while idx < len {
            let sec = self.section_of(idx as u32);
            let state = self.section_state(sec);
            if state != SEC_INIT {
                // Untouched or deferred: metadata not read (see
                // `deferred_metadata_is_zero`). Blocks never cross a section
                // boundary, so `idx` is at the section's start.
                let start = self.base + idx as u64;
                let end = self.section_end(start);
                if state == SEC_DEFERRED {
                    let Some(zone) = self.deferrable(start, end) else {
                        return Err("deferred section not whole, or straddling zones");
                    };
                    if end > self.base + len as u64 {
                        return Err("deferred section beyond the span");
                    }
                    if sec < self.deferred_cursor[zone as usize] {
                        return Err("deferred section below its zone's cursor");
                    }
                    deferred[zone as usize] += SECTION_FRAMES;
                } else if state != SEC_UNTOUCHED {
                    return Err("section with an invalid state");
                }
                idx = (end - self.base) as usize;
                continue;
            }
            let m = self.meta[idx];
            let Some(zone) = ZoneId::from_raw(m.zone) else { return Err("frame with an invalid zone") };
            if zone != self.expected_zone(self.pfn(idx as u32)) {
                return Err("frame in the wrong zone");
            }
            match m.state {
                RESERVED => idx += 1,
                TAIL => return Err("tail frame outside any block"),
                HOT => {
                    if m.order != 0 {
                        return Err("hot frame with a non-zero order");
                    }
                    hot_frames[zone as usize] += 1;
                    if zone == ZoneId::PageTables
                        && self.verify_pgtables
                        && !self.mem.frame_is_zero(self.pfn(idx as u32))
                    {
                        return Err("hot page-table frame not zeroed");
                    }
                    idx += 1;
                }
                FREE | ALLOCATED => {
                    let order = m.order;
                    if order > MAX_ORDER {
                        return Err("block with an order above MAX_ORDER");
                    }
                    let size = 1usize << order;
                    if !self.pfn(idx as u32).is_aligned(order) {
                        return Err("block not naturally aligned");
                    }
                    if idx + size > len {
                        return Err("block beyond the span");
                    }
                    if self.meta[idx + 1..idx + size].iter().any(|t| t.state != TAIL || t.zone != m.zone) {
                        return Err("block with a non-tail frame or straddling zones");
                    }
                    if m.state == FREE {
                        heads[zone as usize][order as usize] += 1;
                        free_pages[zone as usize] += size as u64;
                        if let Some(b) = self.buddy_index(idx as u32, order) {
                            let bm = self.meta[b as usize];
                            if order < MAX_ORDER && bm.state == FREE && bm.order == order && bm.zone == m.zone {
                                return Err("free block with a free buddy: not fully merged");
                            }
                        }
                        if zone == ZoneId::PageTables && self.verify_pgtables {
                            let pfn = self.pfn(idx as u32);
                            if (0..size as u64).any(|i| !self.mem.frame_is_zero(pfn.add(i))) {
                                return Err("free page-table frame not zeroed");
                            }
                        }
                    }
                    idx += size;
                }
                _ => return Err("frame with an invalid state"),
            }
        }
        for zone in ZoneId::ALL {
            let z = &self.zones[zone as usize];
            for order in 0..=MAX_ORDER {
                let area = z.free_area[order as usize];
                let (mut prev, mut cur, mut n) = (NIL, area.head, 0u64);
                while cur != NIL {
                    let m = self.meta.get(cur as usize).ok_or("free-list link outside the span")?;
                    if m.prev != prev {
                        return Err("free-list back link broken");
                    }
                    if m.state != FREE || m.order != order || m.zone != zone as u8 {
                        return Err("free list holds a block of another state, order or zone");
                    }
                    n += 1;
                    if n > len as u64 {
                        return Err("free list has a cycle");
                    }
                    (prev, cur) = (cur, m.next);
                }
                if n != area.nr_free || n != heads[zone as usize][order as usize] {
                    return Err("free-list length differs from its count or from the free heads");
                }
            }
            if z.stats.free_pages != free_pages[zone as usize] {
                return Err("free_pages counter wrong");
            }
            if z.stats.deferred_pages != deferred[zone as usize] {
                return Err("deferred_pages counter wrong");
            }
            let hot = &z.hot.frames[..z.hot.count];
            if hot.len() != hot_frames[zone as usize] {
                return Err("hot-list length differs from the hot frames");
            }
            for (i, &h) in hot.iter().enumerate() {
                let m = self.meta.get(h as usize).ok_or("hot frame outside the span")?;
                if m.state != HOT || m.zone != zone as u8 || hot[..i].contains(&h) {
                    return Err("hot list holds a frame twice, or a frame not hot in its zone");
                }
            }
        }
        Ok(())
    }

    /// Call `f(first_frame, zone)` for every deferred section: free,
    /// managed frames not yet on the free lists.
    pub fn for_each_deferred_section(&self, mut f: impl FnMut(Pfn, ZoneId)) {
        for (sec, &state) in self.sections.iter().enumerate() {
            if state == SEC_DEFERRED {
                let pfn = self.section_start(sec);
                f(pfn, self.expected_zone(pfn));
            }
        }
    }

    /// Whether the metadata of every untouched and deferred section is all
    /// zeroes, as [`new_deferred`](Self::new_deferred) assumes and the
    /// allocator keeps. For tests: it reads the metadata deferral saves
    /// reading, `O(frames)`.
    pub fn deferred_metadata_is_zero(&self) -> bool {
        let zero = FrameMeta::default();
        (0..self.meta.len()).all(|i| self.section_state(self.section_of(i as u32)) == SEC_INIT || self.meta[i] == zero)
    }

    // ---- internals ----

    /// The section holding span index `idx`.
    #[inline]
    fn section_of(&self, idx: u32) -> usize {
        (((self.base + idx as u64) >> MAX_ORDER) - (self.base >> MAX_ORDER)) as usize
    }

    /// Absolute first pfn of section `sec` (possibly below the span).
    fn section_start(&self, sec: usize) -> Pfn {
        Pfn(((self.base >> MAX_ORDER) + sec as u64) << MAX_ORDER)
    }

    /// First pfn after the section holding `pfn`.
    fn section_end(&self, pfn: u64) -> u64 {
        (pfn | (SECTION_FRAMES - 1)) + 1
    }

    #[inline]
    fn section_state(&self, sec: usize) -> u8 {
        if self.sections.is_empty() { SEC_INIT } else { self.sections[sec] }
    }

    /// The zone of `[start, end)` if it is one whole section inside one
    /// zone of a deferring allocator, so that it can be deferred.
    fn deferrable(&self, start: u64, end: u64) -> Option<ZoneId> {
        let boundaries = [DMA_LIMIT.0, self.pgtables.start.0, self.pgtables.end.0];
        let whole = start.is_multiple_of(SECTION_FRAMES) && end == start + SECTION_FRAMES;
        if self.sections.is_empty() || !whole || boundaries.iter().any(|&b| start < b && b < end) {
            return None;
        }
        Some(self.expected_zone(Pfn(start)))
    }

    /// Write the metadata of the untouched section `sec` (its frames inside
    /// the span, reserved, with their zones) and mark it initialised.
    fn init_section(&mut self, sec: usize) {
        let mut start = self.section_start(sec).0.max(self.base);
        let end = self.section_end(start).min(self.base + self.meta.len() as u64);
        while start < end {
            let stop = self.zone_end(start).min(end);
            let zone = self.expected_zone(Pfn(start)) as u8;
            let (a, b) = ((start - self.base) as usize, (stop - self.base) as usize);
            self.meta[a..b].fill(FrameMeta { zone, ..FrameMeta::RESERVED });
            start = stop;
        }
        self.sections[sec] = SEC_INIT;
    }

    /// How many sections from `from` on (before `to`) are untouched: a
    /// scan eight state bytes at a time, because boot adds thousands of
    /// sections and each instruction costs about 1 µs under emulation.
    fn untouched_run(&self, from: usize, to: usize) -> usize {
        let states = &self.sections[from..to];
        let mut n = 0;
        for chunk in states.chunks_exact(8) {
            let Ok(word) = <[u8; 8]>::try_from(chunk) else { break };
            if u64::from_ne_bytes(word) != 0 {
                break;
            }
            n += 8;
        }
        n + states[n..].iter().position(|&st| st != SEC_UNTOUCHED).unwrap_or(states.len() - n)
    }

    /// The first zone boundary above `pfn` (`u64::MAX` if none).
    fn zone_end(&self, pfn: u64) -> u64 {
        [DMA_LIMIT.0, self.pgtables.start.0, self.pgtables.end.0]
            .into_iter()
            .filter(|&b| b > pfn)
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Initialise the lowest deferred section of `zone` as one free block
    /// of `MAX_ORDER` on the free lists. `false` if the zone has none.
    #[cold]
    fn grow(&mut self, zone: ZoneId) -> bool {
        let z = zone as usize;
        let mut sec = self.deferred_cursor[z];
        while sec < self.sections.len()
            && (self.sections[sec] != SEC_DEFERRED || self.expected_zone(self.section_start(sec)) != zone)
        {
            sec += 1;
        }
        self.deferred_cursor[z] = sec;
        if sec >= self.sections.len() {
            return false;
        }
        let head = (self.section_start(sec).0 - self.base) as usize;
        let tail = FrameMeta { zone: zone as u8, state: TAIL, ..FrameMeta::RESERVED };
        self.meta[head..head + SECTION_FRAMES as usize].fill(tail);
        self.meta[head] = FrameMeta { state: FREE, order: MAX_ORDER, ..tail };
        self.sections[sec] = SEC_INIT;
        let zn = &mut self.zones[z];
        zn.stats.deferred_pages -= SECTION_FRAMES;
        zn.push(self.meta, MAX_ORDER, head as u32);
        true
    }

    #[inline]
    fn pfn(&self, idx: u32) -> Pfn {
        Pfn(self.base + idx as u64)
    }

    #[inline]
    fn index(&self, pfn: Pfn) -> Option<u32> {
        let off = pfn.0.checked_sub(self.base)?;
        if off < self.meta.len() as u64 { Some(off as u32) } else { None }
    }

    /// The zone `pfn` belongs to by the layout (page-table zone first).
    fn expected_zone(&self, pfn: Pfn) -> ZoneId {
        if self.pgtables.contains(pfn) {
            ZoneId::PageTables
        } else if pfn < DMA_LIMIT {
            ZoneId::Dma
        } else {
            ZoneId::Normal
        }
    }

    /// Span index of the buddy of the block of `order` at `idx`: the block
    /// at absolute `pfn ^ (1 << order)`, if inside the span.
    #[inline]
    fn buddy_index(&self, idx: u32, order: u8) -> Option<u32> {
        buddy_of(self.base, self.meta.len() as u64, idx, order)
    }

    /// Validate a free of `(pfn, order)`: returns the span index of an
    /// allocated block head of exactly that order.
    #[inline]
    fn check_free(&self, pfn: Pfn, order: u8) -> Result<u32, FreeError> {
        if order > MAX_ORDER {
            return Err(FreeError::InvalidOrder);
        }
        let idx = self.index(pfn).ok_or(FreeError::OutOfRange)?;
        let m = self.meta[idx as usize];
        match m.state {
            ALLOCATED if m.order == order => Ok(idx),
            ALLOCATED => Err(FreeError::WrongOrder { allocated: m.order }),
            FREE | HOT => Err(FreeError::DoubleFree),
            TAIL => Err(FreeError::NotBlockHead),
            // A deferred section's metadata reads as reserved; its frames
            // are free.
            _ if self.section_state(self.section_of(idx)) == SEC_DEFERRED => Err(FreeError::DoubleFree),
            _ => Err(FreeError::NotManaged),
        }
    }

    /// Insert the block of `order` at `idx` (its frames tails or a head, not
    /// on any list) into its zone's free lists, merging with its buddy while
    /// the buddy is a free block of the same order and zone (Linux's
    /// `__free_one_page`).
    fn free_block(&mut self, mut idx: u32, mut order: u8) {
        let (base, len) = (self.base, self.meta.len() as u64);
        let zone = self.meta[idx as usize].zone;
        let z = &mut self.zones[zone as usize];
        while order < MAX_ORDER {
            let Some(buddy) = buddy_of(base, len, idx, order) else { break };
            let b = self.meta[buddy as usize];
            if b.state != FREE || b.order != order || b.zone != zone {
                break;
            }
            z.remove(self.meta, order, buddy);
            let (head, tail) = if buddy < idx { (buddy, idx) } else { (idx, buddy) };
            self.meta[tail as usize].state = TAIL;
            idx = head;
            order += 1;
            z.stats.merges += 1;
        }
        let m = &mut self.meta[idx as usize];
        m.state = FREE;
        m.order = order;
        z.push(self.meta, order, idx);
    }

    /// Take a block of `order` from `zone`'s free lists, splitting a larger
    /// one if needed (Linux's `__rmqueue_smallest` and `expand`). The block
    /// is returned marked allocated.
    fn rmqueue(&mut self, zone: ZoneId, order: u8) -> Option<u32> {
        let mut found = order;
        let idx = loop {
            if let Some(idx) = self.zones[zone as usize].pop(self.meta, found) {
                break idx;
            }
            if found == MAX_ORDER {
                // The free lists cannot serve: take a deferred section.
                if !self.grow(zone) {
                    return None;
                }
                continue;
            }
            found += 1;
        };
        let z = &mut self.zones[zone as usize];
        // expand: give back the upper half until the block has `order`.
        while found > order {
            found -= 1;
            let upper = idx + (1 << found);
            let m = &mut self.meta[upper as usize];
            m.state = FREE;
            m.order = found;
            z.push(self.meta, found, upper);
            z.stats.splits += 1;
        }
        let m = &mut self.meta[idx as usize];
        m.state = ALLOCATED;
        m.order = order;
        m.clear_tag();
        Some(idx)
    }

    /// A block of `order > 0` from `zone`, draining the zone's hot list and
    /// retrying once if the free lists alone cannot serve.
    fn zone_alloc(&mut self, zone: ZoneId, order: u8) -> Option<u32> {
        let idx = match self.rmqueue(zone, order) {
            Some(idx) => idx,
            None if self.zones[zone as usize].hot.count > 0 => {
                self.hot_drain(zone as usize, HOT_HIGH);
                self.rmqueue(zone, order)?
            }
            None => return None,
        };
        self.zones[zone as usize].stats.allocs += 1;
        Some(idx)
    }

    /// An order-0 frame from `zone`'s hot list, refilled with
    /// [`HOT_BATCH`] frames from the free lists when empty.
    #[inline]
    fn hot_alloc(&mut self, zone: ZoneId) -> Option<u32> {
        let z = zone as usize;
        if self.zones[z].hot.count == 0 {
            self.hot_refill(zone);
        }
        let z = &mut self.zones[z];
        if z.hot.count == 0 {
            return None;
        }
        z.hot.count -= 1;
        let idx = z.hot.frames[z.hot.count];
        z.stats.allocs += 1;
        // A hot frame's tag was cleared when it was freed.
        self.meta[idx as usize].state = ALLOCATED;
        Some(idx)
    }

    /// Move up to [`HOT_BATCH`] order-0 frames from the free lists to the
    /// (empty) hot list (Linux's `rmqueue_bulk`).
    fn hot_refill(&mut self, zone: ZoneId) {
        for _ in 0..HOT_BATCH {
            let Some(idx) = self.rmqueue(zone, 0) else { break };
            self.meta[idx as usize].state = HOT;
            let z = &mut self.zones[zone as usize];
            z.hot.frames[z.hot.count] = idx;
            z.hot.count += 1;
        }
    }

    /// Put the allocated order-0 frame `idx` on its zone's hot list, first
    /// draining [`HOT_BATCH`] old frames if the list is full.
    #[inline]
    fn hot_free(&mut self, zone: usize, idx: u32) {
        if self.zones[zone].hot.count == HOT_HIGH {
            self.hot_drain(zone, HOT_BATCH);
        }
        self.meta[idx as usize].state = HOT;
        let z = &mut self.zones[zone];
        z.hot.frames[z.hot.count] = idx;
        z.hot.count += 1;
    }

    /// Return the `n` oldest hot frames of `zone` (at most all of them) to
    /// the free lists (Linux's `free_pcppages_bulk`).
    fn hot_drain(&mut self, zone: usize, n: usize) {
        let n = n.min(self.zones[zone].hot.count);
        for i in 0..n {
            let idx = self.zones[zone].hot.frames[i];
            self.meta[idx as usize].state = ALLOCATED;
            self.free_block(idx, 0);
        }
        let z = &mut self.zones[zone];
        z.hot.frames.copy_within(n..z.hot.count, 0);
        z.hot.count -= n;
    }
}

/// Span index of the buddy of the block of `order` at span index `idx`, in
/// a span of `len` frames from absolute pfn `base`: the block at absolute
/// pfn `pfn ^ (1 << order)`, if it is inside the span.
#[inline]
fn buddy_of(base: u64, len: u64, idx: u32, order: u8) -> Option<u32> {
    let buddy = (base + idx as u64) ^ (1 << order);
    let off = buddy.checked_sub(base)?;
    if off < len { Some(off as u32) } else { None }
}

#[cfg(test)]
mod tests;
