//! x86-64 four-level paging: PML4 → PDPT → PD → PT, with 4 KiB, 2 MiB and
//! 1 GiB pages (Intel SDM vol. 3A §4.5, "4-Level Paging and 5-Level
//! Paging"; entry formats in Tables 4-15 to 4-20).
//!
//! # Types
//!
//! Page sizes are types ([`Size4KiB`], [`Size2MiB`], [`Size1GiB`], all
//! [`PageSize`]), so a [`Page<S>`] can only be mapped to a
//! [`PhysFrame<S>`] of the same size, and both are aligned and in range by
//! construction. [`PteFlags`] is a hand-written bitflags newtype over the
//! flag bits of an entry; [`PageTableEntry`] is one raw 64-bit entry.
//!
//! # Invariants of a [`PageTable`]
//!
//! - Every table page (the root included) comes from a
//!   [`PageTableSource`] (the buddy allocator's `PGTABLE` zone), arrives
//!   all zeroes, and goes back only with its 512 entries zero: an entry is
//!   zeroed before the table that holds it is released, and a table is
//!   released once its last entry is cleared. So after every operation no
//!   table below the root is empty, except the PDPTs under the upper half
//!   of a root whose upper half is *pinned* (shared with other address
//!   spaces; see [`PageTable::new_pinned_upper`]), which are never freed
//!   by an unmap: other roots point at them.
//! - Non-leaf entries are `P | RW | US | A` and nothing else: the leaf alone
//!   decides the access rights (the SDM combines RW/US/NX over all levels,
//!   §4.6, so permissive upper levels delegate to the leaf). `A` is preset
//!   so the CPU never writes a non-leaf entry (in shadow mode each such
//!   write would be a trap).
//! - A leaf is a present entry at level 1 (PT), or at level 2 or 3 with
//!   `PS` set. `PS` is never set in a PML4 entry (reserved there, §4.5.4).
//!   Leaf flags are exactly those given to `map`/`protect` plus `P` (and
//!   `PS` above level 1); the PAT bit is not used (bit 7 at level 1 is
//!   PAT, not PS, so [`PteFlags::HUGE`] is stripped from given flags).
//! - Only the available bits 9 and 10 carry software state
//!   ([`PteFlags::COW`], [`PteFlags::ANON`]); the CPU ignores them
//!   (Table 4-19/4-20, "Ignored").
//!
//! # TLB discipline
//!
//! Making a not-present entry present needs no invalidation (SDM §4.10.4.3:
//! the processor does not cache not-present translations), so [`PageTable::map`]
//! returns no token. Every operation that changes or removes a present
//! leaf returns a `#[must_use]` [`MapperFlush`]; its `flush` executes
//! `invlpg` through the [`MmuPlatform`]. `invlpg` also drops every
//! paging-structure-cache entry of the current PCID (SDM §4.10.4.1), so it
//! covers table pages that an unmap freed as well. Bulk operations return a
//! [`MapperFlushAll`], or batch tokens in a [`FlushBatch`].

use core::marker::PhantomData;

use guest_abi::{Gpa, Gva};

use crate::buddy::{BuddyAllocator, ZonePref};
use crate::phys::{FRAME_WORDS, Pfn, PhysMem};

/// Entries in one table page.
pub const ENTRIES: usize = FRAME_WORDS;
/// First PML4 index of the upper (kernel) half of the address space.
pub const UPPER_HALF_FIRST: usize = 256;
/// Bits 12..=51 of an entry: the physical address it points at (SDM
/// §4.5.4, MAXPHYADDR at most 52).
pub use guest_abi::paging::ADDR_MASK;
/// The highest physical address + 1 an entry can name.
pub const PHYS_LIMIT: u64 = 1 << 52;
/// The 48 bits of a linear address that the tables translate.
pub const LINEAR_MASK: u64 = (1 << 48) - 1;
/// Flags of every non-leaf entry.
pub const TABLE_FLAGS: PteFlags =
    PteFlags::PRESENT.union(PteFlags::WRITABLE).union(PteFlags::USER).union(PteFlags::ACCESSED);

// ---------------------------------------------------------------- flags

/// The architectural bits, defined once for the guest and the VMM.
use guest_abi::paging as x86;

/// The flag bits of a page-table entry (everything but the address).
/// A hand-written bitflags type: values hold only the bits of
/// [`PteFlags::ALL`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
#[repr(transparent)]
pub struct PteFlags(u64);

impl PteFlags {
    /// P: the entry maps something.
    pub const PRESENT: Self = Self(x86::P);
    /// R/W: writes allowed.
    pub const WRITABLE: Self = Self(x86::RW);
    /// U/S: user-mode accesses allowed.
    pub const USER: Self = Self(x86::US);
    /// PWT: write-through caching.
    pub const WRITE_THROUGH: Self = Self(x86::PWT);
    /// PCD: caching disabled.
    pub const NO_CACHE: Self = Self(x86::PCD);
    /// A: set by the CPU when the entry is used for a translation.
    pub const ACCESSED: Self = Self(x86::A);
    /// D: set by the CPU on the first write through a leaf.
    pub const DIRTY: Self = Self(x86::D);
    /// PS: the entry at level 2 or 3 maps a 2 MiB or 1 GiB page.
    pub const HUGE: Self = Self(x86::PS);
    /// G: global translation, kept across CR3 loads (with CR4.PGE).
    pub const GLOBAL: Self = Self(x86::G);
    /// Software (available bit 9): a copy-on-write page, read-only until
    /// its first write is resolved by the fault handler.
    pub const COW: Self = Self(1 << 9);
    /// Software (available bit 10): an anonymous frame owned by the
    /// address space and reference-counted (freed with its last mapping).
    pub const ANON: Self = Self(1 << 10);
    /// XD/NX: instruction fetches not allowed (with EFER.NXE).
    pub const NO_EXECUTE: Self = Self(x86::XD);

    /// Every flag bit.
    pub const ALL: Self = Self(0xfff | x86::XD);
    /// The bits `map` and `protect` accept for a leaf (all but P and PS,
    /// which the mapper owns, and bit 11).
    pub const LEAF_SETTABLE: Self = Self(0x7fe & !x86::PS | x86::XD);

    /// No flag.
    pub const fn empty() -> Self {
        Self(0)
    }
    /// The raw bits.
    pub const fn bits(self) -> u64 {
        self.0
    }
    /// The flag bits of `bits`, others dropped.
    pub const fn from_bits_truncate(bits: u64) -> Self {
        Self(bits & Self::ALL.0)
    }
    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
    /// Whether any flag of `other` is set.
    pub const fn intersects(self, other: Self) -> bool {
        self.0 & other.0 != 0
    }
    /// Both sets of flags.
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
    /// The flags of `self` not in `other`.
    pub const fn difference(self, other: Self) -> Self {
        Self(self.0 & !other.0)
    }
    /// The flags in both.
    pub const fn intersection(self, other: Self) -> Self {
        Self(self.0 & other.0)
    }
    /// Whether no flag is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// Set the flags of `other`.
    pub fn insert(&mut self, other: Self) {
        self.0 |= other.0;
    }
    /// Clear the flags of `other`.
    pub fn remove(&mut self, other: Self) {
        self.0 &= !other.0;
    }
    /// Set or clear the flags of `other`.
    pub fn set(&mut self, other: Self, on: bool) {
        if on { self.insert(other) } else { self.remove(other) }
    }
}

impl core::ops::BitOr for PteFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        self.union(rhs)
    }
}

impl core::ops::BitOrAssign for PteFlags {
    fn bitor_assign(&mut self, rhs: Self) {
        self.insert(rhs)
    }
}

impl core::ops::BitAnd for PteFlags {
    type Output = Self;
    fn bitand(self, rhs: Self) -> Self {
        self.intersection(rhs)
    }
}

impl core::ops::Sub for PteFlags {
    type Output = Self;
    fn sub(self, rhs: Self) -> Self {
        self.difference(rhs)
    }
}

impl core::fmt::Debug for PteFlags {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        const NAMES: [(PteFlags, &str); 13] = [
            (PteFlags::PRESENT, "P"),
            (PteFlags::WRITABLE, "RW"),
            (PteFlags::USER, "US"),
            (PteFlags::WRITE_THROUGH, "PWT"),
            (PteFlags::NO_CACHE, "PCD"),
            (PteFlags::ACCESSED, "A"),
            (PteFlags::DIRTY, "D"),
            (PteFlags::HUGE, "PS"),
            (PteFlags::GLOBAL, "G"),
            (PteFlags::COW, "COW"),
            (PteFlags::ANON, "ANON"),
            (PteFlags(1 << 11), "AVL11"),
            (PteFlags::NO_EXECUTE, "NX"),
        ];
        let mut first = true;
        for (flag, name) in NAMES {
            if self.contains(flag) {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        if first {
            f.write_str("-")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- entries

/// One raw 64-bit page-table entry.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Debug)]
#[repr(transparent)]
pub struct PageTableEntry(pub u64);

impl PageTableEntry {
    /// An entry pointing at `addr` (masked to [`ADDR_MASK`]) with `flags`.
    pub const fn new(addr: Gpa, flags: PteFlags) -> Self {
        Self((addr.0 & ADDR_MASK) | flags.0)
    }
    /// The flag bits.
    pub const fn flags(self) -> PteFlags {
        PteFlags::from_bits_truncate(self.0)
    }
    /// The physical address the entry points at.
    pub const fn addr(self) -> Gpa {
        Gpa(self.0 & ADDR_MASK)
    }
    /// Whether P is set.
    pub const fn is_present(self) -> bool {
        self.0 & PteFlags::PRESENT.0 != 0
    }
    /// Whether this entry, found at `level` (1 = PT … 4 = PML4), maps a
    /// page rather than pointing at a table.
    pub const fn is_leaf_at(self, level: u8) -> bool {
        self.is_present() && (level == 1 || (level <= 3 && self.0 & PteFlags::HUGE.0 != 0))
    }
    /// This entry with `flags` replacing its flag bits.
    pub const fn with_flags(self, flags: PteFlags) -> Self {
        Self((self.0 & ADDR_MASK) | flags.0)
    }
}

// ---------------------------------------------------------------- sizes

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
    const fn from_level(level: u8) -> Self {
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
    start: Gpa,
    _size: PhantomData<S>,
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

// ---------------------------------------------------------------- platform

/// Where page-table pages come from, and go back to.
pub trait PageTableSource {
    /// A table page, all zeroes, or `None` when there is none left.
    fn alloc_table(&mut self) -> Option<Pfn>;
    /// Give back a table page whose 512 entries are all zero.
    fn free_table(&mut self, table: Pfn);
}

impl<T: PageTableSource + ?Sized> PageTableSource for &mut T {
    fn alloc_table(&mut self) -> Option<Pfn> {
        (**self).alloc_table()
    }
    fn free_table(&mut self, table: Pfn) {
        (**self).free_table(table)
    }
}

impl<M: PhysMem> PageTableSource for BuddyAllocator<'_, M> {
    fn alloc_table(&mut self) -> Option<Pfn> {
        self.alloc_pgtable()
    }
    fn free_table(&mut self, table: Pfn) {
        // The mapper only frees tables it emptied; a refusal is a bug in
        // this module, and the page stays allocated (a leak the tests see).
        let refused = self.free_pgtable(table).is_err();
        debug_assert!(!refused, "page-table page refused by the buddy allocator");
    }
}

/// Where ordinary data frames (for anonymous memory) come from.
pub trait FrameSource: PageTableSource {
    /// A 4 KiB frame (contents unspecified), or `None`.
    fn alloc_frame(&mut self) -> Option<Pfn>;
    /// Give back a frame from [`alloc_frame`](Self::alloc_frame).
    fn free_frame(&mut self, frame: Pfn);
}

impl<T: FrameSource + ?Sized> FrameSource for &mut T {
    fn alloc_frame(&mut self) -> Option<Pfn> {
        (**self).alloc_frame()
    }
    fn free_frame(&mut self, frame: Pfn) {
        (**self).free_frame(frame)
    }
}

impl<M: PhysMem> FrameSource for BuddyAllocator<'_, M> {
    fn alloc_frame(&mut self) -> Option<Pfn> {
        self.alloc(0, ZonePref::Normal)
    }
    fn free_frame(&mut self, frame: Pfn) {
        let refused = self.free(frame, 0).is_err();
        debug_assert!(!refused, "data frame refused by the buddy allocator");
    }
}

/// The MMU operations that differ between the guest's two modes: in ept
/// mode they are the instructions (`mov cr3`, `invlpg`); in shadow mode a
/// CR3 load is the `LOAD_CR3` hypercall. Host tests use a recording fake.
pub trait MmuPlatform {
    /// Make `root` (a PML4 page) the current address space; flushes every
    /// non-global TLB entry (SDM §4.10.4.1).
    fn load_cr3(&self, root: Pfn);
    /// Invalidate the TLB entry of the page containing `va`, of any size,
    /// and the paging-structure caches (SDM §4.10.4.1, INVLPG).
    fn invlpg(&self, va: Gva);
    /// Invalidate every non-global TLB entry (a CR3 reload).
    fn flush_all(&self);
}

impl<T: MmuPlatform + ?Sized> MmuPlatform for &T {
    fn load_cr3(&self, root: Pfn) {
        (**self).load_cr3(root)
    }
    fn invlpg(&self, va: Gva) {
        (**self).invlpg(va)
    }
    fn flush_all(&self) {
        (**self).flush_all()
    }
}

/// A pending invalidation of one page's translation: call
/// [`flush`](Self::flush) once the change should be visible, or
/// [`ignore`](Self::ignore) when the address space is not loaded.
#[must_use = "a changed mapping stays cached in the TLB until flushed: call flush() or ignore()"]
#[derive(Debug, PartialEq, Eq)]
pub struct MapperFlush(Gva);

impl MapperFlush {
    /// A pending invalidation of `page`.
    pub const fn new(page: Gva) -> Self {
        Self(page)
    }
    /// The page to invalidate.
    pub const fn page(&self) -> Gva {
        self.0
    }
    /// Invalidate the page (`invlpg`).
    pub fn flush(self, mmu: &impl MmuPlatform) {
        mmu.invlpg(self.0)
    }
    /// Drop the invalidation (the address space is not loaded, or a later
    /// full flush covers it).
    pub fn ignore(self) {}
}

/// A pending invalidation of the whole TLB (after a bulk change).
#[must_use = "changed mappings stay cached in the TLB until flushed: call flush() or ignore()"]
#[derive(Debug, PartialEq, Eq)]
pub struct MapperFlushAll(());

impl MapperFlushAll {
    /// A pending full invalidation.
    pub const fn new() -> Self {
        Self(())
    }
    /// Invalidate everything (a CR3 reload).
    pub fn flush(self, mmu: &impl MmuPlatform) {
        mmu.flush_all()
    }
    /// Drop the invalidation.
    pub fn ignore(self) {}
}

impl Default for MapperFlushAll {
    fn default() -> Self {
        Self::new()
    }
}

/// Gathers page invalidations (Linux's `mmu_gather`, in small): up to
/// [`FlushBatch::CAPACITY`] pages are flushed one by one; beyond that, one
/// full flush is cheaper.
#[must_use = "gathered invalidations must be flushed: call finish()"]
#[derive(Debug)]
pub struct FlushBatch {
    pages: [Gva; Self::CAPACITY],
    count: usize,
    overflow: bool,
}

impl FlushBatch {
    /// Most pages flushed one by one.
    pub const CAPACITY: usize = 32;

    /// An empty batch.
    pub const fn new() -> Self {
        Self { pages: [Gva(0); Self::CAPACITY], count: 0, overflow: false }
    }
    /// Add a pending page invalidation.
    pub fn add(&mut self, flush: MapperFlush) {
        if self.count < Self::CAPACITY {
            self.pages[self.count] = flush.0;
            self.count += 1;
        } else {
            self.overflow = true;
        }
    }
    /// Add a pending full invalidation.
    pub fn add_all(&mut self, flush: MapperFlushAll) {
        flush.ignore();
        self.overflow = true;
    }
    /// How many pages are pending (not counting an overflow).
    pub const fn len(&self) -> usize {
        self.count
    }
    /// Whether nothing is pending.
    pub const fn is_empty(&self) -> bool {
        self.count == 0 && !self.overflow
    }
    /// Execute the gathered invalidations.
    pub fn finish(self, mmu: &impl MmuPlatform) {
        if self.overflow {
            mmu.flush_all();
        } else {
            self.pages[..self.count].iter().for_each(|&p| mmu.invlpg(p));
        }
    }
    /// Drop the gathered invalidations (the address space is not loaded).
    pub fn ignore(self) {}
}

impl Default for FlushBatch {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------- errors

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

// ---------------------------------------------------------------- walks

/// A successful translation.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Translation {
    /// The physical address the virtual address maps to.
    pub addr: Gpa,
    /// The first address of the frame the page maps to.
    pub frame: Gpa,
    /// The leaf's flags, without `PS` (the size says it).
    pub flags: PteFlags,
    /// The page size.
    pub size: PageSizeKind,
}

/// A leaf entry found by a walk.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Leaf {
    /// First virtual address of the page.
    pub va: Gva,
    /// Physical address of the entry itself (to read or update it).
    pub entry_addr: Gpa,
    /// The entry.
    pub entry: PageTableEntry,
    /// The page size.
    pub size: PageSizeKind,
}

impl Leaf {
    /// The leaf's flags without `PS`.
    pub const fn flags(&self) -> PteFlags {
        self.entry.flags().difference(PteFlags::HUGE)
    }
}

/// Address of entry `idx` of `table`.
#[inline]
fn entry_addr(table: Pfn, idx: usize) -> Gpa {
    Gpa(table.addr().0 + idx as u64 * 8)
}

#[inline]
fn read_entry<M: PhysMem>(mem: &M, table: Pfn, idx: usize) -> PageTableEntry {
    PageTableEntry(mem.read_u64(entry_addr(table, idx)))
}

#[inline]
fn write_entry<M: PhysMem>(mem: &M, table: Pfn, idx: usize, e: PageTableEntry) {
    mem.write_u64(entry_addr(table, idx), e.0)
}

/// The path of tables a walk went through: `tables[level]` is the table
/// at that level (index 4 = the root), valid for levels above the walk's
/// stopping level.
#[derive(Clone, Copy)]
struct Path {
    tables: [Pfn; 5],
}

/// Four-level page tables rooted at one PML4 page.
///
/// The value is a handle: it owns the root page, and tables are reached
/// through the [`PhysMem`] passed to each call. See the module
/// documentation for the invariants every method keeps.
#[derive(Debug, PartialEq, Eq)]
pub struct PageTable {
    root: Pfn,
    pinned_upper: bool,
}

impl PageTable {
    /// Empty page tables: one root page from `src`. `None` if `src` is
    /// exhausted.
    pub fn new<T: PageTableSource>(src: &mut T) -> Option<Self> {
        Some(Self { root: src.alloc_table()?, pinned_upper: false })
    }

    /// Empty page tables whose upper-half PDPTs, once created, are never
    /// freed by an unmap (they are, or will be, shared with other roots:
    /// the kernel template and every address space).
    pub fn new_pinned_upper<T: PageTableSource>(src: &mut T) -> Option<Self> {
        Some(Self { root: src.alloc_table()?, pinned_upper: true })
    }

    /// Take over existing tables rooted at `root` (built by this module).
    pub const fn from_root(root: Pfn, pinned_upper: bool) -> Self {
        Self { root, pinned_upper }
    }

    /// The PML4 page (what CR3 points at).
    pub const fn root(&self) -> Pfn {
        self.root
    }

    /// Whether upper-half PDPTs are pinned.
    pub const fn pinned_upper(&self) -> bool {
        self.pinned_upper
    }

    /// Map `page` to `frame` with `flags` (P and, above 4 KiB, PS are added;
    /// bits outside [`PteFlags::LEAF_SETTABLE`] are dropped). Creates the
    /// missing tables. Needs no TLB flush (module documentation).
    pub fn map<S: PageSize, M: PhysMem, T: PageTableSource>(
        &mut self,
        mem: &M,
        src: &mut T,
        page: Page<S>,
        frame: PhysFrame<S>,
        flags: PteFlags,
    ) -> Result<(), MapError> {
        let flags = flags.intersection(PteFlags::LEAF_SETTABLE).union(PteFlags::PRESENT);
        let flags = if S::LEVEL > 1 { flags.union(PteFlags::HUGE) } else { flags };
        self.install(mem, src, page.start().0, S::LEVEL, PageTableEntry::new(frame.start(), flags)).map(|_| ())
    }

    /// Map `pages` consecutive pages from `page` to consecutive frames from
    /// `frame`, as that many [`map`](Self::map) calls would, but walking
    /// the tables once per leaf table instead of once per page: the kernel
    /// maps all of RAM with it at boot. On an error the pages before the
    /// failing one stay mapped. Needs no TLB flush.
    pub fn map_range<S: PageSize, M: PhysMem, T: PageTableSource>(
        &mut self,
        mem: &M,
        src: &mut T,
        page: Page<S>,
        frame: PhysFrame<S>,
        pages: u64,
        flags: PteFlags,
    ) -> Result<(), MapError> {
        let Some(last_va) =
            pages.checked_sub(1).map(|n| n.checked_mul(S::SIZE).and_then(|b| page.start().0.checked_add(b)))
        else {
            return Ok(());
        };
        let last_pa = frame.start().0.checked_add((pages - 1).saturating_mul(S::SIZE));
        match (last_va, last_pa) {
            (Some(v), Some(p)) if is_canonical(v) && (v ^ page.start().0) >> 47 == 0 && p < 1 << 52 => {}
            _ => return Err(MapError::NotCanonical),
        }
        let flags = flags.intersection(PteFlags::LEAF_SETTABLE).union(PteFlags::PRESENT);
        let flags = if S::LEVEL > 1 { flags.union(PteFlags::HUGE) } else { flags };
        let mut i = 0;
        while i < pages {
            let (va, pa) = (page.start().0 + i * S::SIZE, frame.start().0 + i * S::SIZE);
            let (table, fresh) = self.install(mem, src, va, S::LEVEL, PageTableEntry::new(Gpa(pa), flags))?;
            i += 1;
            // The rest of this leaf table, entry by entry; a table this call
            // just took from the source is all zeroes (the source's
            // contract), so its entries need not be read first.
            let first = table_index(va, S::LEVEL) + 1;
            let n = (ENTRIES - first).min((pages - i) as usize);
            // Consecutive frames: add the page size to the whole entry (the
            // last frame's address was checked to fit below bit 52, so the
            // flag bits above it never change).
            let mut entry = PageTableEntry::new(Gpa(pa), flags).0;
            if fresh {
                // The guest kernel maps all of RAM with this loop at boot.
                for idx in first..first + n {
                    entry += S::SIZE;
                    write_entry(mem, table, idx, PageTableEntry(entry));
                }
                i += n as u64;
                continue;
            }
            for idx in first..first + n {
                let e = read_entry(mem, table, idx);
                if e.is_present() {
                    return Err(if e.is_leaf_at(S::LEVEL) { MapError::AlreadyMapped } else { MapError::TableInTheWay });
                }
                entry += S::SIZE;
                write_entry(mem, table, idx, PageTableEntry(entry));
                i += 1;
            }
        }
        Ok(())
    }

    /// Remove the mapping of `page`. Returns the frame, the flags it had
    /// (without PS) and the flush to perform. Tables left empty are freed.
    pub fn unmap<S: PageSize, M: PhysMem, T: PageTableSource>(
        &mut self,
        mem: &M,
        src: &mut T,
        page: Page<S>,
    ) -> Result<(PhysFrame<S>, PteFlags, MapperFlush), UnmapError> {
        let (entry, flush) = self.unmap_at(mem, src, page.start().0, S::LEVEL)?;
        let frame = PhysFrame { start: entry.addr(), _size: PhantomData };
        Ok((frame, entry.flags().difference(PteFlags::HUGE), flush))
    }

    /// Replace the flags of the mapping of `page` (as in `map`: P and PS
    /// kept by the mapper). Returns the flush to perform.
    pub fn protect<S: PageSize, M: PhysMem>(
        &mut self,
        mem: &M,
        page: Page<S>,
        flags: PteFlags,
    ) -> Result<MapperFlush, UnmapError> {
        let (table, idx, old) = self.find_exact(mem, page.start().0, S::LEVEL)?;
        let mut flags = flags.intersection(PteFlags::LEAF_SETTABLE).union(PteFlags::PRESENT);
        if S::LEVEL > 1 {
            flags.insert(PteFlags::HUGE);
        }
        write_entry(mem, table, idx, old.with_flags(flags));
        Ok(MapperFlush::new(page.start()))
    }

    /// The translation of `va`, as the CPU would find it, or `None` if it
    /// is not mapped (or not canonical).
    pub fn translate<M: PhysMem>(&self, mem: &M, va: Gva) -> Option<Translation> {
        let leaf = self.leaf(mem, va)?;
        let bytes = leaf.size.bytes();
        let frame = leaf.entry.addr().0 & !(bytes - 1);
        Some(Translation {
            addr: Gpa(frame | (va.0 & (bytes - 1))),
            frame: Gpa(frame),
            flags: leaf.flags(),
            size: leaf.size,
        })
    }

    /// The leaf entry that maps `va`, if any.
    pub fn leaf<M: PhysMem>(&self, mem: &M, va: Gva) -> Option<Leaf> {
        if !is_canonical(va.0) {
            return None;
        }
        let mut table = self.root;
        let mut level = 4u8;
        loop {
            let idx = table_index(va.0, level);
            let e = read_entry(mem, table, idx);
            if !e.is_present() {
                return None;
            }
            if e.is_leaf_at(level) {
                let span = level_span(level);
                return Some(Leaf {
                    va: Gva(va.0 & !(span - 1)),
                    entry_addr: entry_addr(table, idx),
                    entry: e,
                    size: PageSizeKind::from_level(level),
                });
            }
            table = Pfn::containing(e.addr());
            level -= 1;
        }
    }

    /// Rewrite the leaf mapping `va` with `f(old flags)` (P and PS are
    /// kept by the mapper; the frame is unchanged). Returns the leaf as it
    /// was and the flush to perform.
    pub fn update_leaf<M: PhysMem>(
        &mut self,
        mem: &M,
        va: Gva,
        f: impl FnOnce(PteFlags) -> PteFlags,
    ) -> Result<(Leaf, MapperFlush), UnmapError> {
        let leaf = self.leaf(mem, va).ok_or(UnmapError::NotMapped)?;
        let mut flags = f(leaf.flags()).intersection(PteFlags::LEAF_SETTABLE).union(PteFlags::PRESENT);
        if leaf.size != PageSizeKind::Size4KiB {
            flags.insert(PteFlags::HUGE);
        }
        mem.write_u64(leaf.entry_addr, leaf.entry.with_flags(flags).0);
        Ok((leaf, MapperFlush::new(leaf.va)))
    }

    /// Replace the leaf mapping `va` by `frame` with `flags` (same size).
    /// Returns the leaf as it was and the flush to perform.
    pub fn remap_leaf<M: PhysMem>(
        &mut self,
        mem: &M,
        va: Gva,
        frame: Gpa,
        flags: PteFlags,
    ) -> Result<(Leaf, MapperFlush), UnmapError> {
        let leaf = self.leaf(mem, va).ok_or(UnmapError::NotMapped)?;
        let mut flags = flags.intersection(PteFlags::LEAF_SETTABLE).union(PteFlags::PRESENT);
        if leaf.size != PageSizeKind::Size4KiB {
            flags.insert(PteFlags::HUGE);
        }
        mem.write_u64(leaf.entry_addr, PageTableEntry::new(frame, flags).0);
        Ok((leaf, MapperFlush::new(leaf.va)))
    }

    /// Remove the leaf mapping `va`, whatever its size. Returns it and the
    /// flush to perform; tables left empty are freed.
    pub fn unmap_leaf<M: PhysMem, T: PageTableSource>(
        &mut self,
        mem: &M,
        src: &mut T,
        va: Gva,
    ) -> Result<(Leaf, MapperFlush), UnmapError> {
        let leaf = self.leaf(mem, va).ok_or(UnmapError::NotMapped)?;
        let (_, flush) = self.unmap_at(mem, src, leaf.va.0, leaf.size.level())?;
        Ok((leaf, flush))
    }

    /// The first leaf whose page starts at or after `from` and before
    /// `end`, in table order: both are taken as 48-bit linear positions
    /// (bits 63..=48 dropped), so the lower half comes first, then the
    /// upper half; `Gva(1 << 47)` ends the lower half and `Gva(u64::MAX)`
    /// the whole space. Visits only present entries.
    pub fn next_leaf<M: PhysMem>(&self, mem: &M, from: Gva, end: Gva) -> Option<Leaf> {
        let (from, end) = (from.0 & LINEAR_MASK, end.0 & LINEAR_MASK);
        if from >= end {
            return None;
        }
        Self::next_in(mem, self.root, 4, 0, from, end)
    }

    fn next_in<M: PhysMem>(mem: &M, table: Pfn, level: u8, base: u64, from: u64, end: u64) -> Option<Leaf> {
        let span = level_span(level);
        let first = if from > base { ((from - base) / span) as usize } else { 0 };
        for idx in first..ENTRIES {
            let va = base + idx as u64 * span;
            if va >= end {
                return None;
            }
            let e = read_entry(mem, table, idx);
            if !e.is_present() {
                continue;
            }
            if e.is_leaf_at(level) {
                if va >= from {
                    return Some(Leaf {
                        va: Gva(canonicalize(va)),
                        entry_addr: entry_addr(table, idx),
                        entry: e,
                        size: PageSizeKind::from_level(level),
                    });
                }
                continue;
            }
            if let Some(l) = Self::next_in(mem, Pfn::containing(e.addr()), level - 1, va, from, end) {
                return Some(l);
            }
        }
        None
    }

    /// Count the table pages reachable from the root, the root included,
    /// and check the structural invariants of the module documentation.
    /// For tests: it reads every table.
    pub fn check_invariants<M: PhysMem>(&self, mem: &M) -> Result<usize, &'static str> {
        self.check_in(mem, self.root, 4, 0)
    }

    fn check_in<M: PhysMem>(&self, mem: &M, table: Pfn, level: u8, base: u64) -> Result<usize, &'static str> {
        let mut count = 1;
        let mut present = 0;
        for idx in 0..ENTRIES {
            let e = read_entry(mem, table, idx);
            if !e.is_present() {
                if e.0 != 0 {
                    return Err("not-present entry with stray bits");
                }
                continue;
            }
            present += 1;
            let va = base + idx as u64 * level_span(level);
            if level == 4 && e.flags().contains(PteFlags::HUGE) {
                return Err("PS set in a PML4 entry");
            }
            if e.is_leaf_at(level) {
                if !e.addr().is_aligned(level_span(level)) {
                    return Err("leaf frame not aligned to its page size");
                }
                continue;
            }
            if e.flags() != TABLE_FLAGS {
                return Err("non-leaf entry with flags other than P|RW|US|A");
            }
            count += self.check_in(mem, Pfn::containing(e.addr()), level - 1, va)?;
        }
        let pinned = self.pinned_upper && level == 3 && base >= (UPPER_HALF_FIRST as u64) << 39;
        if level < 4 && present == 0 && !pinned {
            return Err("empty table below the root");
        }
        Ok(count)
    }

    /// Remove every mapping whose page starts in `[from, end)` (taken as
    /// in [`next_leaf`](Self::next_leaf)), calling `f` with each leaf before its entry is
    /// cleared, then free the tables left empty (pinned PDPTs aside).
    /// Returns the flush to perform.
    pub fn clear_range<M: PhysMem, T: PageTableSource>(
        &mut self,
        mem: &M,
        src: &mut T,
        from: Gva,
        end: Gva,
        mut f: impl FnMut(Leaf),
    ) -> MapperFlushAll {
        let mut at = from;
        while let Some(leaf) = self.next_leaf(mem, at, end) {
            f(leaf);
            if let Ok((_, flush)) = self.unmap_at(mem, src, leaf.va.0, leaf.size.level()) {
                flush.ignore();
            }
            match leaf.va.0.checked_add(leaf.size.bytes()) {
                Some(next) if next & LINEAR_MASK != 0 => at = Gva(canonicalize(next)),
                _ => break,
            }
        }
        MapperFlushAll::new()
    }

    /// Free every table page, the root included. Leaves still mapped are
    /// dropped (their frames are the caller's business); every entry is
    /// zeroed before its table is released, so the source's invariant
    /// holds. A root that borrows its upper half from another (an address
    /// space) must zero those entries first, or the shared tables go too.
    pub fn free_tables<M: PhysMem, T: PageTableSource>(self, mem: &M, src: &mut T) {
        Self::free_subtree(mem, src, self.root, 4);
    }

    fn free_subtree<M: PhysMem, T: PageTableSource>(mem: &M, src: &mut T, table: Pfn, level: u8) {
        for idx in 0..ENTRIES {
            let e = read_entry(mem, table, idx);
            if e.is_present() && !e.is_leaf_at(level) {
                Self::free_subtree(mem, src, Pfn::containing(e.addr()), level - 1);
            }
            if e.0 != 0 {
                write_entry(mem, table, idx, PageTableEntry(0));
            }
        }
        src.free_table(table);
    }

    /// Create, in every empty upper-half slot of the root, an empty PDPT, so
    /// that roots copied from this one later see every kernel mapping made
    /// afterwards (Linux preallocates the kernel's top-level entries for
    /// the same reason). Stops early if `src` runs out.
    pub fn preallocate_upper<M: PhysMem, T: PageTableSource>(&mut self, mem: &M, src: &mut T) -> Result<(), MapError> {
        for idx in UPPER_HALF_FIRST..ENTRIES {
            if !read_entry(mem, self.root, idx).is_present() {
                let t = src.alloc_table().ok_or(MapError::OutOfTables)?;
                write_entry(mem, self.root, idx, PageTableEntry::new(t.addr(), TABLE_FLAGS));
            }
        }
        Ok(())
    }

    // ---- internals ----

    /// Write the leaf `entry` at `level` for `va`, creating tables above it.
    /// Returns the table that holds the entry, and whether this call
    /// created it (then its other entries are all zero).
    pub(crate) fn install<M: PhysMem, T: PageTableSource>(
        &mut self,
        mem: &M,
        src: &mut T,
        va: u64,
        level: u8,
        entry: PageTableEntry,
    ) -> Result<(Pfn, bool), MapError> {
        let mut path = Path { tables: [self.root; 5] };
        let mut table = self.root;
        let mut l = 4u8;
        let mut fresh = false;
        while l > level {
            let idx = table_index(va, l);
            let e = read_entry(mem, table, idx);
            fresh = !e.is_present();
            table = if fresh {
                let Some(t) = src.alloc_table() else {
                    // Free the tables this call created (they are empty).
                    self.prune(mem, src, &path, va, l);
                    return Err(MapError::OutOfTables);
                };
                write_entry(mem, table, idx, PageTableEntry::new(t.addr(), TABLE_FLAGS));
                t
            } else if e.is_leaf_at(l) {
                return Err(MapError::ParentIsHuge);
            } else {
                Pfn::containing(e.addr())
            };
            l -= 1;
            path.tables[l as usize] = table;
        }
        let idx = table_index(va, level);
        let e = read_entry(mem, table, idx);
        if e.is_present() {
            return Err(if e.is_leaf_at(level) { MapError::AlreadyMapped } else { MapError::TableInTheWay });
        }
        write_entry(mem, table, idx, entry);
        Ok((table, fresh))
    }

    /// Walk to the entry at `level` for `va`, which must be a leaf.
    fn find_exact<M: PhysMem>(&self, mem: &M, va: u64, level: u8) -> Result<(Pfn, usize, PageTableEntry), UnmapError> {
        self.walk_exact(mem, va, level).map(|(path, idx, e)| (path.tables[level as usize], idx, e))
    }

    fn walk_exact<M: PhysMem>(&self, mem: &M, va: u64, level: u8) -> Result<(Path, usize, PageTableEntry), UnmapError> {
        let mut path = Path { tables: [self.root; 5] };
        let mut table = self.root;
        let mut l = 4u8;
        while l > level {
            let e = read_entry(mem, table, table_index(va, l));
            if !e.is_present() {
                return Err(UnmapError::NotMapped);
            }
            if e.is_leaf_at(l) {
                return Err(UnmapError::SizeMismatch(PageSizeKind::from_level(l)));
            }
            table = Pfn::containing(e.addr());
            l -= 1;
            path.tables[l as usize] = table;
        }
        let idx = table_index(va, level);
        let e = read_entry(mem, table, idx);
        if !e.is_leaf_at(level) {
            return Err(UnmapError::NotMapped);
        }
        Ok((path, idx, e))
    }

    fn unmap_at<M: PhysMem, T: PageTableSource>(
        &mut self,
        mem: &M,
        src: &mut T,
        va: u64,
        level: u8,
    ) -> Result<(PageTableEntry, MapperFlush), UnmapError> {
        let (path, idx, e) = self.walk_exact(mem, va, level)?;
        write_entry(mem, path.tables[level as usize], idx, PageTableEntry(0));
        self.prune(mem, src, &path, va, level);
        Ok((e, MapperFlush::new(Gva(canonicalize(va & !(level_span(level) - 1))))))
    }

    /// Free the tables of `path` from `level` up that are empty, clearing
    /// their parent entries first (the root and pinned PDPTs are kept).
    fn prune<M: PhysMem, T: PageTableSource>(&mut self, mem: &M, src: &mut T, path: &Path, va: u64, level: u8) {
        let mut l = level;
        while l < 4 {
            let table = path.tables[l as usize];
            if l == 3 && self.pinned_upper && table_index(va, 4) >= UPPER_HALF_FIRST {
                return;
            }
            if !mem.frame_is_zero(table) {
                return;
            }
            write_entry(mem, path.tables[l as usize + 1], table_index(va, l + 1), PageTableEntry(0));
            src.free_table(table);
            l += 1;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
