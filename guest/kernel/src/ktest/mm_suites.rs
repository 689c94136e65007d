//! In-guest tests of the memory manager running on real guest memory (the
//! host tests in `guest/mm` cover the volume; these check that the same
//! code works through the kernel's direct map and as its heap).

use super::{TestResult, check};
use crate::mm;
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::alloc::{GlobalAlloc, Layout};
use guest_mm::buddy::{FreeError, ZoneId, ZonePref};
use guest_mm::phys::PhysMem;

fn with_mm<R>(f: impl FnOnce(&mut mm::MemoryManager) -> R) -> Result<R, &'static str> {
    mm::with(f).ok_or("memory manager not initialised")
}

/// Blocks of orders 0..=4 are naturally aligned and all come back.
pub fn buddy_alloc_aligned_and_returned() -> TestResult {
    with_mm(|m| {
        let before = m.buddy.stats(ZoneId::Normal).free_total();
        let mut blocks = [(guest_mm::phys::Pfn(0), 0u8); 5];
        for (order, slot) in blocks.iter_mut().enumerate() {
            let pfn = m.buddy.alloc(order as u8, ZonePref::Normal).ok_or("out of memory")?;
            check(pfn.is_aligned(order as u8), "block not naturally aligned")?;
            check(m.buddy.zone_of(pfn) == Some(ZoneId::Normal), "block from the wrong zone")?;
            *slot = (pfn, order as u8);
        }
        for (pfn, order) in blocks {
            m.buddy.free(pfn, order).map_err(|e| e.as_str())?;
        }
        let after = m.buddy.stats(ZoneId::Normal).free_total();
        check(after == before, "frames leaked")
    })?
}

/// Page-table pages come from the page-table zone, already zero.
pub fn buddy_pgtable_pages_are_zero() -> TestResult {
    with_mm(|m| {
        let pfn = m.buddy.alloc_pgtable().ok_or("page-table zone empty")?;
        check(m.buddy.zone_of(pfn) == Some(ZoneId::PageTables), "page-table page outside its zone")?;
        check(m.buddy.mem().frame_is_zero(pfn), "page-table page not zero")?;
        m.buddy.free_pgtable(pfn).map_err(|e| e.as_str())
    })?
}

/// A double free is refused, not absorbed.
pub fn buddy_double_free_refused() -> TestResult {
    with_mm(|m| {
        let pfn = m.buddy.alloc(1, ZonePref::Normal).ok_or("out of memory")?;
        m.buddy.free(pfn, 1).map_err(|e| e.as_str())?;
        check(m.buddy.free(pfn, 1) == Err(FreeError::DoubleFree), "double free not detected")?;
        m.buddy.check_invariants()
    })?
}

/// Every usable frame and the page-table zone are managed, the RAM beyond
/// the boot direct map (1 GiB) included, and memory up there can be
/// allocated, written, read back and freed. With no RAM beyond the boot
/// map (the default memory size) only the first part has something to
/// check; `tests/scale.rs` runs this at 2 GiB in every MMU mode.
pub fn buddy_all_ram_is_managed() -> TestResult {
    let info = crate::boot::info();
    let limit = info.boot_mapped.min(info.ram_size);
    // Frames the memory map gives to the allocator, and those above the
    // boot map (where nothing is carved out for metadata).
    let (mut given, mut above) = (0u64, 0u64);
    for r in info.regions() {
        let kind = guest_abi::MemRegionKind::from_raw(r.kind);
        if matches!(kind, Some(guest_abi::MemRegionKind::Usable | guest_abi::MemRegionKind::PageTables)) {
            given += r.len / guest_mm::PAGE_SIZE;
            above += r.end().saturating_sub(r.start.max(limit)) / guest_mm::PAGE_SIZE;
        }
    }
    with_mm(|m| {
        let managed: u64 = ZoneId::ALL.iter().map(|&z| m.buddy.stats(z).managed_pages).sum();
        // Everything but the metadata carve-out (under 0.6 % of RAM + 1 page).
        check(managed <= given && given - managed <= info.ram_size / guest_mm::PAGE_SIZE / 170 + 1, "RAM not managed")?;
        let free = |m: &mut mm::MemoryManager| ZoneId::ALL.map(|z| m.buddy.stats(z).free_total());
        let before = free(m);
        // Take blocks, largest first, until one lies above the boot map (the
        // allocator takes the lowest deferred section first, so this walks
        // up through RAM; the RAM above may be smaller than 4 MiB), write
        // it through the direct map, then give everything back. No heap
        // here (the heap is this allocator): about one block per 4 MiB
        // below the boot map, plus the ragged pieces, is taken.
        const MAX_TAKEN: usize = 512;
        let mut taken = [(guest_mm::phys::Pfn(0), 0u8); MAX_TAKEN];
        let (mut n, mut high) = (0, None);
        let mut order = guest_mm::buddy::MAX_ORDER;
        while above > 0 && high.is_none() && n < MAX_TAKEN {
            let Some(pfn) = m.buddy.alloc(order, ZonePref::Normal) else {
                if order == 0 {
                    break;
                }
                order -= 1;
                continue;
            };
            if pfn.addr().0 >= limit {
                high = Some((pfn, order));
            }
            taken[n] = (pfn, order);
            n += 1;
        }
        let ok = match high {
            Some((pfn, order)) => {
                let last = pfn.addr().0 + (guest_mm::PAGE_SIZE << order) - 8;
                let words = [pfn.addr().0, last];
                for (i, &gpa) in words.iter().enumerate() {
                    m.buddy.mem().write_u64(guest_abi::Gpa(gpa), 0x0005_ca1e_0000 + i as u64);
                }
                words
                    .iter()
                    .enumerate()
                    .all(|(i, &gpa)| m.buddy.mem().read_u64(guest_abi::Gpa(gpa)) == 0x0005_ca1e_0000 + i as u64)
            }
            None => above == 0,
        };
        for &(pfn, order) in &taken[..n] {
            m.buddy.free(pfn, order).map_err(|e| e.as_str())?;
        }
        check(ok, "no block above the boot map could be allocated, written and read back")?;
        check(free(m) == before, "frames leaked")
    })?
}

/// kmalloc objects are distinct, aligned, and hold what is written.
pub fn slab_objects_distinct_and_aligned() -> TestResult {
    let mut ptrs = [core::ptr::null_mut::<u64>(); 16];
    let layout = Layout::from_size_align(64, 64).map_err(|_| "bad layout")?;
    for (i, p) in ptrs.iter_mut().enumerate() {
        // SAFETY: a valid non-zero-size layout.
        *p = unsafe { crate::mm::KernelHeap.alloc(layout) } as *mut u64;
        check(!p.is_null(), "kmalloc-64 returned null")?;
        check((*p as usize).is_multiple_of(64), "object misaligned")?;
        // SAFETY: the block is ours, 64 bytes.
        unsafe { p.write_volatile(i as u64 * 3) };
    }
    for (i, p) in ptrs.iter().enumerate() {
        // SAFETY: written above, still allocated.
        check(unsafe { p.read_volatile() } == i as u64 * 3, "object contents overwritten")?;
        check(ptrs[..i].iter().all(|q| q != p), "the same object handed out twice")?;
    }
    for p in ptrs {
        // SAFETY: allocated above with this layout.
        unsafe { crate::mm::KernelHeap.dealloc(p as *mut u8, layout) };
    }
    // SAFETY: between suites the other CPUs wait idle, outside the
    // allocators.
    unsafe { crate::mm::check_heap() }
}

/// `Vec` and `Box` work on the kernel heap, including growth.
pub fn heap_vec_and_box() -> TestResult {
    let mut v: Vec<u64> = Vec::new();
    for i in 0..300u64 {
        v.push(i);
    }
    check(v.iter().sum::<u64>() == 300 * 299 / 2, "vector contents wrong")?;
    let b = Box::new([7u8; 5000]); // larger than a page: the buddy path
    check(b.iter().all(|&x| x == 7), "boxed array wrong")?;
    drop(b);
    drop(v);
    // SAFETY: between suites the other CPUs wait idle, outside the
    // allocators.
    unsafe { crate::mm::check_heap() }
}

/// An impossible request gets null, as `GlobalAlloc` requires.
pub fn heap_oom_returns_null() -> TestResult {
    let layout = Layout::from_size_align(1 << 40, 8).map_err(|_| "bad layout")?;
    // SAFETY: a valid layout; null is the expected answer.
    let p = unsafe { crate::mm::KernelHeap.alloc(layout) };
    check(p.is_null(), "a 1 TiB allocation did not fail")
}
