//! [`MemWindow`]: a window of guest-physical memory as the shadow MMU
//! reads and writes it (its `GuestPhys`), over `vm-memory`. Neutral: the
//! shadow and pv backends and `explain` use it.
//!
//! Invariant: nothing outside `[start, end)` is memory — reads there
//! give 0 and writes vanish, so a guest-controlled address can never reach
//! host memory outside the window. No `unsafe`: the fast path is a
//! bounds-checked `vm-memory` volatile view.

use guest_abi::Gpa;
use shadow::GuestPhys;
use vm_memory::volatile_memory::VolatileArrayRef;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, VolatileMemory};

/// A window of guest-physical memory as the shadow MMU sees it: only
/// `[start, end)` counts as memory. Guest RAM is `[0, ram)`; the shadow
/// pool is its own slot.
///
/// Page-table entries are read and written as 8-byte words through a
/// `vm-memory` [`VolatileArrayRef`] over the window's host mapping, made
/// once per window: each access is an index check and one volatile load
/// or store, where `Bytes::read_obj` would look the region up and copy
/// through the generic slice path per entry (83 % of a root rebuild's time
/// before). The view is bounds-checked and needs no `unsafe` here;
/// anything it does not cover (an unaligned address, a window that spans
/// several regions) takes the `Bytes` path.
pub struct MemWindow<'a> {
    mem: &'a GuestMemoryMmap,
    start: u64,
    end: u64,
    /// The window as 8-byte words, word 0 at `start`, when the window lies
    /// in one region.
    words: Option<VolatileArrayRef<'a, u64, ()>>,
}

impl<'a> MemWindow<'a> {
    /// `[start, end)` of `mem`.
    pub fn new(mem: &'a GuestMemoryMmap, start: Gpa, end: Gpa) -> Self {
        let (start, end) = (start.raw(), end.raw());
        let words = (|| {
            let region = mem.find_region(GuestAddress(start))?;
            let offset = usize::try_from(start.checked_sub(region.start_addr().raw_value())?).ok()?;
            let n = usize::try_from(end.checked_sub(start)? / 8).ok()?;
            let mapping: &'a vm_memory::MmapRegion = region;
            mapping.get_array_ref::<u64>(offset, n).ok()
        })();
        MemWindow { mem, start, end, words }
    }

    /// Guest RAM, `[0, ram)`.
    pub fn ram(mem: &'a GuestMemoryMmap, ram: u64) -> Self {
        Self::new(mem, Gpa(0), Gpa(ram))
    }

    /// The memory behind the window.
    pub fn memory(&self) -> &'a GuestMemoryMmap {
        self.mem
    }

    /// Whether the page at `gpa` lies inside the window.
    pub fn is_ram_page(&self, gpa: Gpa) -> bool {
        let gpa = gpa.raw();
        self.is_ram(Gpa(gpa & !0xfff), 4096)
    }

    /// The index of the word at `gpa` in the fast view, if it has one.
    #[inline]
    fn word(&self, gpa: u64) -> Option<(&VolatileArrayRef<'a, u64, ()>, usize)> {
        let words = self.words.as_ref()?;
        let off = gpa.checked_sub(self.start)?;
        let index = usize::try_from(off / 8).ok()?;
        (off % 8 == 0 && index < words.len()).then_some((words, index))
    }
}

impl GuestPhys for MemWindow<'_> {
    #[inline]
    fn read_u64(&self, gpa: Gpa) -> u64 {
        let gpa = gpa.raw();
        match self.word(gpa) {
            Some((words, i)) => words.load(i),
            None => self.mem.read_obj(GuestAddress(gpa)).unwrap_or(0),
        }
    }
    #[inline]
    fn write_u64(&mut self, gpa: Gpa, value: u64) {
        let gpa = gpa.raw();
        match self.word(gpa) {
            Some((words, i)) => words.store(i, value),
            None => {
                let _ = self.mem.write_obj(value, GuestAddress(gpa));
            }
        }
    }
    fn is_ram(&self, gpa: Gpa, len: u64) -> bool {
        let gpa = gpa.raw();
        gpa >= self.start && gpa.checked_add(len).is_some_and(|e| e <= self.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_reads_and_writes_words_through_its_view_and_nothing_outside() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x10_0000), 0x4000)]).unwrap();
        let mut w = MemWindow::new(&mem, Gpa(0x10_0000), Gpa(0x10_4000));
        assert!(w.words.is_some(), "one region: the fast view is used");
        w.write_u64(Gpa(0x10_0008), 0x1122_3344_5566_7788);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x10_0008)).unwrap(), 0x1122_3344_5566_7788);
        assert_eq!(w.read_u64(Gpa(0x10_0008)), 0x1122_3344_5566_7788);
        w.write_u64(Gpa(0x10_3ff8), 7);
        assert_eq!(w.read_u64(Gpa(0x10_3ff8)), 7);
        // Unaligned: the Bytes path, same bytes.
        assert_eq!(w.read_u64(Gpa(0x10_000c)), 0x1122_3344);
        // Outside the memory: reads 0, writes vanish, no panic.
        assert_eq!(w.read_u64(Gpa(0x10_4000)), 0);
        w.write_u64(Gpa(0x10_4000), 1);
        assert_eq!(w.read_u64(Gpa(0x0ff8)), 0);
        // A window larger than its region has no fast view but still works.
        let w = MemWindow::new(&mem, Gpa(0x10_0000), Gpa(0x10_8000));
        assert!(w.words.is_none());
        assert_eq!(w.read_u64(Gpa(0x10_3ff8)), 7);
    }
}
