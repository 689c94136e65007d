//! Giving frames to the allocator at boot
//! ([`add_free_range`](BuddyAllocator::add_free_range), Linux's
//! `memblock_free_all`), and deferred initialisation of their metadata
//! (Linux's `DEFERRED_STRUCT_PAGE_INIT`).
//!
//! Part of [`crate::buddy`], whose module doc states the allocator's
//! invariants and the trust assumption of
//! [`new_deferred`](BuddyAllocator::new_deferred).
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
//!   [`deferred_pages`](super::ZoneStats::deferred_pages) (and
//!   `managed_pages`), not `free_pages`.
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
//! failure, and every invariant of [`crate::buddy`] holds for the
//! initialised sections unchanged ("fully merged" counts a deferred
//! section as the free block of `MAX_ORDER` it will become). A frame of a deferred section is handed
//! out only after its section is grown, and neither it nor its metadata is
//! read before; freeing one is refused as a double free (it is free),
//! freeing a frame of an untouched section as not managed.
//!
//! Invariants of the section array, checked by
//! [`check_invariants`](BuddyAllocator::check_invariants): a deferred
//! section is whole, inside the span and inside one zone, and at or above
//! its zone's `deferred_cursor`; a zone's `deferred_pages` is
//! [`SECTION_FRAMES`] times its deferred sections.

use super::frame::{FREE, FrameMeta, RESERVED, TAIL};
use super::{BuddyAllocator, InitError, MAX_ORDER, ZoneId};
use crate::phys::{FrameRange, Pfn, PhysMem};

/// Frames per section, the unit of deferred initialisation: one block of
/// [`MAX_ORDER`].
pub const SECTION_FRAMES: u64 = 1 << MAX_ORDER;

// Section states, as raw bytes so that an all-zero array is valid.
pub(super) const SEC_UNTOUCHED: u8 = 0;
pub(super) const SEC_DEFERRED: u8 = 1;
pub(super) const SEC_INIT: u8 = 2;
// `untouched_run` tests eight states at once against zero.
const _: () = assert!(SEC_UNTOUCHED == 0);

/// Bytes of section-state array [`BuddyAllocator::new_deferred`] needs for a
/// span of `frames` frames (whatever its base).
pub const fn section_bytes(frames: u64) -> u64 {
    frames.div_ceil(SECTION_FRAMES) + 1
}

impl<M: PhysMem> BuddyAllocator<'_, M> {
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
        let boundaries = self.zone_boundaries();
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

    /// The section holding span index `idx`.
    #[inline]
    pub(super) fn section_of(&self, idx: u32) -> usize {
        (((self.base + idx as u64) >> MAX_ORDER) - (self.base >> MAX_ORDER)) as usize
    }

    /// Absolute first pfn of section `sec` (possibly below the span).
    pub(super) fn section_start(&self, sec: usize) -> Pfn {
        Pfn(((self.base >> MAX_ORDER) + sec as u64) << MAX_ORDER)
    }

    /// First pfn after the section holding `pfn`.
    pub(super) fn section_end(&self, pfn: u64) -> u64 {
        (pfn | (SECTION_FRAMES - 1)) + 1
    }

    #[inline]
    pub(super) fn section_state(&self, sec: usize) -> u8 {
        if self.sections.is_empty() { SEC_INIT } else { self.sections[sec] }
    }

    /// The zone of `[start, end)` if it is one whole section inside one
    /// zone of a deferring allocator, so that it can be deferred.
    pub(super) fn deferrable(&self, start: u64, end: u64) -> Option<ZoneId> {
        let boundaries = self.zone_boundaries();
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

    /// Initialise the lowest deferred section of `zone` as one free block
    /// of `MAX_ORDER` on the free lists. `false` if the zone has none.
    #[cold]
    pub(super) fn grow(&mut self, zone: ZoneId) -> bool {
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
}
