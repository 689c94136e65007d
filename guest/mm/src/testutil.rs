//! Shared host-test fixtures: a buddy allocator over an arena with a
//! page-table zone, and a recording fake of the MMU platform.

use std::cell::RefCell;
use std::vec::Vec;

use guest_abi::Gva;

use crate::buddy::{BuddyAllocator, DMA_LIMIT, FrameMeta, ZoneId};
use crate::paging::MmuPlatform;
use crate::phys::{ArenaMem, FRAME_WORDS, FrameRange, Pfn};

/// First frame of the fixture (the start of the NORMAL zone).
pub const BASE: Pfn = DMA_LIMIT;
/// Frames of the page-table zone, at the start of the span.
pub const PGTABLE_FRAMES: u64 = 512;
/// Frames of ordinary memory, after the page-table zone.
pub const NORMAL_FRAMES: u64 = 1024;

/// Run `f` with an arena and a buddy allocator managing all of it
/// (`pgtable_frames` frames of page-table zone, then `normal_frames`).
pub fn with_mm_sized<R>(
    pgtable_frames: u64,
    normal_frames: u64,
    f: impl FnOnce(&ArenaMem<'_>, &mut BuddyAllocator<'_, &ArenaMem<'_>>) -> R,
) -> R {
    let frames = pgtable_frames + normal_frames;
    let mut backing = vec![0u64; frames as usize * FRAME_WORDS];
    let mut meta = vec![FrameMeta::default(); frames as usize];
    let mem = ArenaMem::new(BASE.addr(), &mut backing);
    let pgtables = FrameRange::new(BASE, BASE.add(pgtable_frames));
    let mut buddy = BuddyAllocator::new(&mem, &mut meta, BASE, pgtables).unwrap();
    buddy.set_verify_pgtables(true);
    buddy.add_free_range(FrameRange::new(BASE, BASE.add(frames))).unwrap();
    f(&mem, &mut buddy)
}

/// [`with_mm_sized`] with the default sizes.
pub fn with_mm<R>(f: impl FnOnce(&ArenaMem<'_>, &mut BuddyAllocator<'_, &ArenaMem<'_>>) -> R) -> R {
    with_mm_sized(PGTABLE_FRAMES, NORMAL_FRAMES, f)
}

/// Page-table pages in use (allocated and not freed).
pub fn tables_in_use<M: crate::phys::PhysMem>(buddy: &BuddyAllocator<'_, M>) -> u64 {
    let s = buddy.stats(ZoneId::PageTables);
    s.managed_pages - s.free_pages - s.hot_pages
}

/// Ordinary frames in use.
#[allow(dead_code)] // used by the modules built next
pub fn frames_in_use<M: crate::phys::PhysMem>(buddy: &BuddyAllocator<'_, M>) -> u64 {
    let s = buddy.stats(ZoneId::Normal);
    s.managed_pages - s.free_pages - s.hot_pages
}

/// One call the memory manager made to the platform.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MmuEvent {
    /// `load_cr3(root)`.
    LoadCr3(Pfn),
    /// `invlpg(va)`.
    Invlpg(Gva),
    /// `flush_all()`.
    FlushAll,
}

/// A platform that records every call.
#[derive(Default, Debug)]
pub struct RecordingMmu {
    pub events: RefCell<Vec<MmuEvent>>,
}

impl RecordingMmu {
    /// The events so far, emptying the record.
    pub fn take(&self) -> Vec<MmuEvent> {
        std::mem::take(&mut *self.events.borrow_mut())
    }
}

impl MmuPlatform for RecordingMmu {
    fn load_cr3(&self, root: Pfn) {
        self.events.borrow_mut().push(MmuEvent::LoadCr3(root));
    }
    fn invlpg(&self, va: Gva) {
        self.events.borrow_mut().push(MmuEvent::Invlpg(va));
    }
    fn flush_all(&self) {
        self.events.borrow_mut().push(MmuEvent::FlushAll);
    }
}
