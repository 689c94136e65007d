//! Physical memory access: the one seam between the memory manager's logic
//! and real memory.
//!
//! Everything in this crate that reads or writes a physical frame does so
//! through [`PhysMem`], so the same allocator code runs in the guest (over
//! [`DirectMap`], the kernel's direct map of all RAM) and on the host under
//! `cargo test` (over [`ArenaMem`], a bounds-checked slice of words).
//!
//! Invariants:
//! - Accesses are 8-byte words at 8-byte-aligned guest-physical addresses,
//!   or whole 4 KiB frames. Nothing else is needed by the buddy allocator,
//!   the slab allocator's free pointers, or page-table entries.
//! - Methods take `&self`: physical memory is a shared bus, like
//!   `vm-memory`'s `GuestMemory`, so several parts of the memory manager
//!   (allocator, page tables, slabs) can hold the same accessor. Neither
//!   implementation hands out references into the memory, so no Rust
//!   reference ever aliases a word being written.
//! - [`ArenaMem`] is entirely safe code: an access outside the arena panics
//!   (host tests only). [`DirectMap`] is the only `unsafe` in the crate; its
//!   constructor's contract is what makes its accesses sound.

use core::cell::Cell;
use core::sync::atomic::{AtomicU64, Ordering};

use guest_abi::Gpa;

use crate::PAGE_SIZE;

/// Number of 64-bit words in a 4 KiB frame (also the number of entries in
/// a page-table page).
pub const FRAME_WORDS: usize = (PAGE_SIZE / 8) as usize;

/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;

/// A physical frame number: a guest-physical address divided by
/// [`PAGE_SIZE`].
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Debug)]
#[repr(transparent)]
pub struct Pfn(pub u64);

impl Pfn {
    /// The frame that contains `addr`.
    #[inline]
    pub const fn containing(addr: Gpa) -> Self {
        Self(addr.0 >> PAGE_SHIFT)
    }

    /// The frame that starts at `addr`, or `None` if `addr` is not
    /// page-aligned.
    #[inline]
    pub const fn from_addr(addr: Gpa) -> Option<Self> {
        if addr.0 & (PAGE_SIZE - 1) == 0 { Some(Self(addr.0 >> PAGE_SHIFT)) } else { None }
    }

    /// The guest-physical address of the first byte of this frame.
    #[inline]
    pub const fn addr(self) -> Gpa {
        Gpa(self.0 << PAGE_SHIFT)
    }

    /// The frame `n` frames after this one.
    #[inline]
    pub const fn add(self, n: u64) -> Self {
        Self(self.0 + n)
    }

    /// Whether this frame is the first of a naturally aligned block of
    /// `2^order` frames.
    #[inline]
    pub const fn is_aligned(self, order: u8) -> bool {
        self.0 & ((1u64 << order) - 1) == 0
    }
}

/// A half-open range of frames `start..end`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct FrameRange {
    /// First frame in the range.
    pub start: Pfn,
    /// First frame after the range.
    pub end: Pfn,
}

impl FrameRange {
    /// The frames `start..end`.
    #[inline]
    pub const fn new(start: Pfn, end: Pfn) -> Self {
        Self { start, end }
    }

    /// The frames covering the bytes `start..start + len` (both rounded
    /// outwards to page boundaries).
    #[inline]
    pub const fn from_bytes(start: Gpa, len: u64) -> Self {
        let end = (start.0 + len + PAGE_SIZE - 1) >> PAGE_SHIFT;
        Self { start: Pfn::containing(start), end: Pfn(end) }
    }

    /// Number of frames in the range (0 if `end <= start`).
    #[inline]
    pub const fn len(self) -> u64 {
        self.end.0.saturating_sub(self.start.0)
    }

    /// Whether the range holds no frame.
    #[inline]
    pub const fn is_empty(self) -> bool {
        self.len() == 0
    }

    /// Whether `pfn` lies in the range.
    #[inline]
    pub const fn contains(self, pfn: Pfn) -> bool {
        self.start.0 <= pfn.0 && pfn.0 < self.end.0
    }
}

/// Access to guest-physical memory.
///
/// Word accesses must be 8-byte aligned; implementations may panic (host)
/// or misbehave (guest) otherwise. Callers only pass frames they own.
pub trait PhysMem {
    /// Read the 64-bit word at `addr`.
    fn read_u64(&self, addr: Gpa) -> u64;

    /// Write the 64-bit word at `addr`.
    fn write_u64(&self, addr: Gpa, value: u64);

    /// Fill `frame` with zeroes.
    fn zero_frame(&self, frame: Pfn) {
        let base = frame.addr().0;
        for i in 0..FRAME_WORDS as u64 {
            self.write_u64(Gpa(base + i * 8), 0);
        }
    }

    /// Copy the whole of `src` into `dst` (distinct frames).
    fn copy_frame(&self, dst: Pfn, src: Pfn) {
        let (d, s) = (dst.addr().0, src.addr().0);
        for i in 0..FRAME_WORDS as u64 {
            self.write_u64(Gpa(d + i * 8), self.read_u64(Gpa(s + i * 8)));
        }
    }

    /// Whether every word of `frame` is zero, found by reading only (page
    /// tables in shadow mode trap on every write, never on a read).
    fn frame_is_zero(&self, frame: Pfn) -> bool {
        let base = frame.addr().0;
        (0..FRAME_WORDS as u64).all(|i| self.read_u64(Gpa(base + i * 8)) == 0)
    }
}

impl<T: PhysMem + ?Sized> PhysMem for &T {
    #[inline]
    fn read_u64(&self, addr: Gpa) -> u64 {
        (**self).read_u64(addr)
    }
    #[inline]
    fn write_u64(&self, addr: Gpa, value: u64) {
        (**self).write_u64(addr, value)
    }
    #[inline]
    fn zero_frame(&self, frame: Pfn) {
        (**self).zero_frame(frame)
    }
    #[inline]
    fn copy_frame(&self, dst: Pfn, src: Pfn) {
        (**self).copy_frame(dst, src)
    }
    #[inline]
    fn frame_is_zero(&self, frame: Pfn) -> bool {
        (**self).frame_is_zero(frame)
    }
}

/// Physical memory modelled by a caller-owned slice of words, standing for
/// the RAM at guest-physical `base..base + 8 * words.len()`.
///
/// Safe and bounds-checked: any access outside the arena, or unaligned,
/// panics. Meant for host tests and benches; needs no allocator (the caller
/// owns the backing slice, e.g. a `Vec<u64>`).
pub struct ArenaMem<'a> {
    base: u64,
    words: &'a [Cell<u64>],
}

impl<'a> ArenaMem<'a> {
    /// An arena standing for the RAM at `base` (page-aligned) backed by
    /// `backing`, whose length must be a whole number of frames.
    ///
    /// # Panics
    ///
    /// If `base` is not page-aligned or `backing` is not a whole number of
    /// frames.
    pub fn new(base: Gpa, backing: &'a mut [u64]) -> Self {
        assert!(base.0.is_multiple_of(PAGE_SIZE), "arena base not page-aligned");
        assert!(backing.len().is_multiple_of(FRAME_WORDS), "arena not a whole number of frames");
        Self { base: base.0, words: Cell::from_mut(backing).as_slice_of_cells() }
    }

    /// The frames this arena covers.
    pub fn frames(&self) -> FrameRange {
        FrameRange::from_bytes(Gpa(self.base), self.words.len() as u64 * 8)
    }

    /// The word at `addr`: one test for alignment and one bounds check
    /// (an address below the base wraps to a huge offset); the reason for
    /// a bad access is worked out only on the way to the panic.
    #[inline]
    fn word(&self, addr: Gpa) -> &Cell<u64> {
        let off = addr.0.wrapping_sub(self.base);
        if off.is_multiple_of(8)
            && let Ok(i) = usize::try_from(off / 8)
            && let Some(w) = self.words.get(i)
        {
            return w;
        }
        self.bad_access(addr)
    }

    #[cold]
    #[inline(never)]
    fn bad_access(&self, addr: Gpa) -> ! {
        assert!(addr.0.is_multiple_of(8), "unaligned physical word access");
        assert!(addr.0 >= self.base, "physical access below the arena");
        panic!("physical access beyond the arena")
    }

    fn frame_words(&self, frame: Pfn) -> &[Cell<u64>] {
        let off = frame.addr().0.checked_sub(self.base).expect("physical access below the arena");
        let first = (off / 8) as usize;
        self.words.get(first..first + FRAME_WORDS).expect("physical access beyond the arena")
    }
}

// Inlined, as the guest's `DirectMap` is, so that what the host measures
// is the allocators and not a call per word.
impl PhysMem for ArenaMem<'_> {
    #[inline]
    fn read_u64(&self, addr: Gpa) -> u64 {
        self.word(addr).get()
    }

    #[inline]
    fn write_u64(&self, addr: Gpa, value: u64) {
        self.word(addr).set(value)
    }

    fn zero_frame(&self, frame: Pfn) {
        self.frame_words(frame).iter().for_each(|w| w.set(0));
    }

    fn copy_frame(&self, dst: Pfn, src: Pfn) {
        let (d, s) = (self.frame_words(dst), self.frame_words(src));
        d.iter().zip(s).for_each(|(d, s)| d.set(s.get()));
    }

    fn frame_is_zero(&self, frame: Pfn) -> bool {
        self.frame_words(frame).iter().all(|w| w.get() == 0)
    }
}

/// Physical memory modelled like [`ArenaMem`], but shareable between
/// threads: the words are `AtomicU64`s accessed with relaxed ordering
/// (plain moves on x86-64, as the guest's direct map does), for the host
/// tests and benches of the SMP allocators. Safe and bounds-checked: a bad
/// access panics, as with [`ArenaMem`]. Ordering between threads comes
/// from the allocators' locks and atomics, never from these accesses.
#[derive(Clone, Copy)]
pub struct SharedArenaMem<'a> {
    base: u64,
    words: &'a [AtomicU64],
}

impl<'a> SharedArenaMem<'a> {
    /// An arena standing for the RAM at `base` (page-aligned) backed by
    /// `backing`, whose length must be a whole number of frames.
    ///
    /// # Panics
    ///
    /// If `base` is not page-aligned or `backing` is not a whole number of
    /// frames.
    pub fn new(base: Gpa, backing: &'a [AtomicU64]) -> Self {
        assert!(base.0.is_multiple_of(PAGE_SIZE), "arena base not page-aligned");
        assert!(backing.len().is_multiple_of(FRAME_WORDS), "arena not a whole number of frames");
        Self { base: base.0, words: backing }
    }

    /// The frames this arena covers.
    pub fn frames(&self) -> FrameRange {
        FrameRange::from_bytes(Gpa(self.base), self.words.len() as u64 * 8)
    }

    #[inline]
    fn word(&self, addr: Gpa) -> &AtomicU64 {
        let off = addr.0.wrapping_sub(self.base);
        if off.is_multiple_of(8)
            && let Ok(i) = usize::try_from(off / 8)
            && let Some(w) = self.words.get(i)
        {
            return w;
        }
        bad_access(addr, self.base)
    }
}

#[cold]
#[inline(never)]
fn bad_access(addr: Gpa, base: u64) -> ! {
    assert!(addr.0.is_multiple_of(8), "unaligned physical word access");
    assert!(addr.0 >= base, "physical access below the arena");
    panic!("physical access beyond the arena")
}

impl PhysMem for SharedArenaMem<'_> {
    #[inline]
    fn read_u64(&self, addr: Gpa) -> u64 {
        self.word(addr).load(Ordering::Relaxed)
    }

    #[inline]
    fn write_u64(&self, addr: Gpa, value: u64) {
        self.word(addr).store(value, Ordering::Relaxed)
    }
}

/// Told of every write to watched frames through a [`DirectMap`]: how a
/// paravirtual shadow-paging guest records its page-table writes for the
/// VMM (`guest_abi::pv`), the way Xen PV and Linux's paravirt MMU ops hook
/// `set_pte`.
pub trait TableWrites: Sync {
    /// The 8-byte word at `addr` (in a watched frame) was written.
    fn entry_written(&self, addr: Gpa);
    /// The whole watched `frame` was rewritten (zeroed or copied into).
    fn frame_rewritten(&self, frame: Pfn);
}

/// The guest kernel's direct map: physical address `pa` is readable and
/// writable at virtual address `offset + pa`.
#[derive(Clone, Copy)]
pub struct DirectMap {
    offset: u64,
    /// Frames whose writes are reported, and to whom.
    watch: Option<(FrameRange, &'static dyn TableWrites)>,
}

impl core::fmt::Debug for DirectMap {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DirectMap").field("offset", &self.offset).field("watch", &self.watch.map(|w| w.0)).finish()
    }
}

impl DirectMap {
    /// A direct map at `offset`.
    ///
    /// # Safety
    ///
    /// For as long as the returned value (or a copy) is used, every
    /// physical address the memory manager is given (the frames handed to
    /// its allocators) must be mapped readable and writable at
    /// `offset + pa`, and no Rust reference may alias those bytes while
    /// the memory manager accesses them.
    #[allow(unsafe_code)]
    pub const unsafe fn new(offset: u64) -> Self {
        Self { offset, watch: None }
    }

    /// The same map, reporting every write to a frame in `frames` to
    /// `writes` (after the store): word writes with
    /// [`TableWrites::entry_written`], whole-frame zeroing and copies with
    /// [`TableWrites::frame_rewritten`].
    pub const fn watching(self, frames: FrameRange, writes: &'static dyn TableWrites) -> Self {
        Self { watch: Some((frames, writes)), ..self }
    }

    #[inline]
    fn watched(&self, frame: Pfn) -> Option<&'static dyn TableWrites> {
        match self.watch {
            Some((range, w)) if range.contains(frame) => Some(w),
            _ => None,
        }
    }

    /// The virtual address at which `addr` is mapped.
    #[inline]
    pub const fn virt(&self, addr: Gpa) -> u64 {
        self.offset.wrapping_add(addr.0)
    }

    /// The physical address mapped at virtual address `virt` (the inverse
    /// of [`DirectMap::virt`]).
    #[inline]
    pub const fn phys(&self, virt: u64) -> Gpa {
        Gpa(virt.wrapping_sub(self.offset))
    }
}

#[allow(unsafe_code)]
impl PhysMem for DirectMap {
    #[inline]
    fn read_u64(&self, addr: Gpa) -> u64 {
        debug_assert!(addr.0.is_multiple_of(8), "unaligned physical word access");
        // SAFETY: `new`'s contract: `addr` is mapped at `virt(addr)` and not
        // aliased by a reference; the address is 8-aligned (callers' rule).
        // Volatile because the CPU itself writes page-table words (A/D bits).
        unsafe { core::ptr::read_volatile(self.virt(addr) as *const u64) }
    }

    #[inline]
    fn write_u64(&self, addr: Gpa, value: u64) {
        debug_assert!(addr.0.is_multiple_of(8), "unaligned physical word access");
        // SAFETY: as in `read_u64`.
        unsafe { core::ptr::write_volatile(self.virt(addr) as *mut u64, value) }
        if let Some(w) = self.watched(Pfn::containing(addr)) {
            w.entry_written(addr);
        }
    }

    #[inline]
    fn zero_frame(&self, frame: Pfn) {
        // SAFETY: `new`'s contract covers the whole frame, which is
        // page-aligned and PAGE_SIZE bytes long.
        unsafe { core::ptr::write_bytes(self.virt(frame.addr()) as *mut u8, 0, PAGE_SIZE as usize) }
        if let Some(w) = self.watched(frame) {
            w.frame_rewritten(frame);
        }
    }

    #[inline]
    fn copy_frame(&self, dst: Pfn, src: Pfn) {
        debug_assert!(dst != src, "copy_frame onto itself");
        // SAFETY: `new`'s contract covers both frames; distinct frames never
        // overlap.
        unsafe {
            core::ptr::copy_nonoverlapping(
                self.virt(src.addr()) as *const u8,
                self.virt(dst.addr()) as *mut u8,
                PAGE_SIZE as usize,
            )
        }
        if let Some(w) = self.watched(dst) {
            w.frame_rewritten(dst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pfn_and_address_round_trip() {
        assert_eq!(Pfn::containing(Gpa(0x1234_5678)), Pfn(0x12345));
        assert_eq!(Pfn::from_addr(Gpa(0x1234_5000)), Some(Pfn(0x12345)));
        assert_eq!(Pfn::from_addr(Gpa(0x1234_5008)), None);
        assert_eq!(Pfn(7).addr(), Gpa(0x7000));
        assert!(Pfn(8).is_aligned(3));
        assert!(!Pfn(12).is_aligned(3));
        assert_eq!(FrameRange::from_bytes(Gpa(0x1800), 0x1000), FrameRange::new(Pfn(1), Pfn(3)));
        assert_eq!(FrameRange::new(Pfn(5), Pfn(3)).len(), 0);
    }

    #[test]
    fn arena_reads_back_writes_at_its_base() {
        let mut backing = vec![0u64; 2 * FRAME_WORDS];
        let mem = ArenaMem::new(Gpa(0x10_0000), &mut backing);
        assert_eq!(mem.frames(), FrameRange::new(Pfn(0x100), Pfn(0x102)));
        mem.write_u64(Gpa(0x10_0ff8), 42);
        assert_eq!(mem.read_u64(Gpa(0x10_0ff8)), 42);
        assert!(!mem.frame_is_zero(Pfn(0x100)));
        mem.copy_frame(Pfn(0x101), Pfn(0x100));
        assert_eq!(mem.read_u64(Gpa(0x10_1ff8)), 42);
        mem.zero_frame(Pfn(0x100));
        assert!(mem.frame_is_zero(Pfn(0x100)));
        assert_eq!(backing[2 * FRAME_WORDS - 1], 42);
    }

    #[test]
    #[should_panic(expected = "beyond the arena")]
    fn arena_rejects_access_beyond_its_end() {
        let mut backing = vec![0u64; FRAME_WORDS];
        ArenaMem::new(Gpa(0), &mut backing).read_u64(Gpa(PAGE_SIZE));
    }

    #[test]
    #[should_panic(expected = "below the arena")]
    fn arena_rejects_access_below_its_base() {
        let mut backing = vec![0u64; FRAME_WORDS];
        ArenaMem::new(Gpa(PAGE_SIZE), &mut backing).read_u64(Gpa(0));
    }

    #[test]
    #[should_panic(expected = "unaligned")]
    fn arena_rejects_unaligned_access() {
        let mut backing = vec![0u64; FRAME_WORDS];
        ArenaMem::new(Gpa(0), &mut backing).read_u64(Gpa(4));
    }

    #[test]
    #[allow(unsafe_code)]
    fn direct_map_over_host_memory_behaves_like_the_arena() {
        // A direct map whose "RAM" at physical 0x4000.. is this host buffer.
        let mut backing = vec![0u64; 2 * FRAME_WORDS];
        let host = backing.as_mut_ptr() as u64;
        // SAFETY: frames 4 and 5 are `backing`, which lives to the end of
        // the test and is not referenced while `mem` is used.
        let mem = unsafe { DirectMap::new(host.wrapping_sub(0x4000)) };
        assert_eq!(mem.virt(Gpa(0x4000)), host);
        assert_eq!(mem.phys(host), Gpa(0x4000));
        mem.write_u64(Gpa(0x4010), 7);
        assert_eq!(mem.read_u64(Gpa(0x4010)), 7);
        assert!(!mem.frame_is_zero(Pfn(4)));
        mem.copy_frame(Pfn(5), Pfn(4));
        assert_eq!(mem.read_u64(Gpa(0x5010)), 7);
        mem.zero_frame(Pfn(4));
        assert!(mem.frame_is_zero(Pfn(4)));
        assert_eq!(backing[FRAME_WORDS + 2], 7);
    }

    #[test]
    #[allow(unsafe_code)]
    fn a_watching_direct_map_reports_every_write_to_watched_frames_only() {
        use std::sync::Mutex;
        #[derive(Default)]
        struct Log(Mutex<std::vec::Vec<(u64, bool)>>);
        impl TableWrites for Log {
            fn entry_written(&self, addr: Gpa) {
                self.0.lock().unwrap().push((addr.0, false));
            }
            fn frame_rewritten(&self, frame: Pfn) {
                self.0.lock().unwrap().push((frame.addr().0, true));
            }
        }
        let log: &'static Log = std::boxed::Box::leak(std::boxed::Box::default());
        let mut backing = vec![0u64; 3 * FRAME_WORDS];
        let host = backing.as_mut_ptr() as u64;
        // SAFETY: frames 4..7 are `backing`, alive and unreferenced while
        // `mem` is used.
        let mem = unsafe { DirectMap::new(host.wrapping_sub(0x4000)) }
            .watching(FrameRange::from_bytes(Gpa(0x5000), 0x2000), log);
        mem.write_u64(Gpa(0x4010), 1); // not watched
        mem.write_u64(Gpa(0x5010), 2);
        mem.zero_frame(Pfn(6));
        mem.copy_frame(Pfn(5), Pfn(4));
        mem.copy_frame(Pfn(4), Pfn(5)); // into an unwatched frame
        mem.zero_frame(Pfn(4));
        assert_eq!(*log.0.lock().unwrap(), [(0x5010, false), (0x6000, true), (0x5000, true)]);
        assert_eq!(mem.read_u64(Gpa(0x5010)), 1, "the copy was made");
    }
}
