//! In-guest tests of paging, address spaces, demand paging, copy-on-write
//! and the shadow-mode properties (staleness, isolation), on the guest's
//! real page tables. They pass in both MMU modes with the same verdicts;
//! in shadow mode every page-table write here traps to the VMM.
//!
//! Accesses that are meant to fault run outside `mm::with`, because the
//! page-fault hook needs the memory manager.

use super::{TestResult, check};
use crate::mm::{self, KernelMmu};
use core::sync::atomic::{AtomicU64, Ordering};
use guest_abi::{Gpa, Gva};
use guest_mm::aspace::AddressSpace;
use guest_mm::fault::{FaultFix, PfErrorCode};
use guest_mm::folio::FolioSize;
use guest_mm::paging::{FrameSource, MmuPlatform, Page, PhysFrame, PteFlags, Size2MiB, Size4KiB};
use guest_mm::phys::PhysMem;
use guest_mm::vma::Prot;

/// Where the tests put user mappings (lower half, far from anything).
pub const USER_BASE: u64 = 0x10_0000_0000;

/// Demand-zero faults the hook resolved (one per folio).
pub static DEMAND: AtomicU64 = AtomicU64::new(0);
/// Pages those faults mapped.
pub static DEMAND_PAGES: AtomicU64 = AtomicU64::new(0);
/// Copy-on-write breaks.
pub static COW: AtomicU64 = AtomicU64::new(0);
/// Faults a test expected and the hook recorded (see [`EXPECT`]).
pub static EXPECTED_HITS: AtomicU64 = AtomicU64::new(0);
/// Error code of the last expected fault.
pub static EXPECTED_EC: AtomicU64 = AtomicU64::new(0);
/// A test that wants to see a fault at this page sets it; the hook then
/// records the fault and restores a writable mapping (so the access can
/// complete). 0: none.
pub static EXPECT: AtomicU64 = AtomicU64::new(0);

fn ok<T, E: Copy>(r: Result<T, E>, what: impl Fn(E) -> &'static str) -> Result<T, &'static str> {
    r.map_err(what)
}

/// The page-fault hook: the user address space's fault handler, plus the
/// expected-fault recorder of the staleness and isolation tests.
pub fn user_fault(cr2: u64, ec: u64) -> bool {
    let expect = EXPECT.load(Ordering::Relaxed);
    if expect != 0 && cr2 & !0xfff == expect {
        EXPECTED_HITS.fetch_add(1, Ordering::Relaxed);
        EXPECTED_EC.store(ec, Ordering::Relaxed);
        EXPECT.store(0, Ordering::Relaxed);
        // A test that rewrote one paging entry by hand asks for it back.
        let restore_at = RESTORE_AT.swap(0, Ordering::Relaxed);
        if restore_at != 0 {
            let v = RESTORE_VALUE.load(Ordering::Relaxed);
            return mm::with(|m| m.buddy.mem().write_u64(Gpa(restore_at), v)).is_some();
        }
        // Map the page writable to the frame the test stashed (anonymous
        // when it is a real frame, so destroy frees it).
        return mm::with(|m| {
            m.ctx(|cx, _, user| {
                let Some(a) = user.as_mut() else { return false };
                let stash = STASH.load(Ordering::Relaxed);
                let page = Page::<Size4KiB>::containing_address(Gva(cr2)).ok();
                let frame = PhysFrame::<Size4KiB>::from_start_address(Gpa(stash)).ok();
                let (Some(page), Some(frame)) = (page, frame) else { return false };
                let mut flags = PteFlags::WRITABLE | PteFlags::ACCESSED | PteFlags::DIRTY;
                if stash != 0 {
                    flags |= PteFlags::ANON;
                }
                let pt = a.page_table_mut();
                if pt.translate(cx.mem, Gva(cr2)).is_some() {
                    match pt.unmap(cx.mem, &mut cx.frames, page) {
                        Ok((_, _, f)) => f.flush(cx.mmu),
                        Err(_) => return false,
                    }
                }
                pt.map(cx.mem, &mut cx.frames, page, frame, flags).is_ok()
            })
        })
        .unwrap_or(false);
    }
    let r = mm::with(|m| m.ctx(|cx, _, user| user.as_mut().map(|a| a.handle_fault(cx, Gva(cr2), PfErrorCode(ec)))));
    match r {
        Some(Some(Ok(fix))) => {
            match fix {
                FaultFix::DemandZero(_) => {
                    DEMAND_PAGES.fetch_add(1, Ordering::Relaxed);
                    DEMAND.fetch_add(1, Ordering::Relaxed)
                }
                FaultFix::DemandFolio(_, size) => {
                    DEMAND_PAGES.fetch_add(size.pages(), Ordering::Relaxed);
                    DEMAND.fetch_add(1, Ordering::Relaxed)
                }
                FaultFix::CowCopied(_) | FaultFix::CowReused(_) => COW.fetch_add(1, Ordering::Relaxed),
                FaultFix::Spurious(_) => 0,
            };
            true
        }
        _ => false,
    }
}

static STASH: AtomicU64 = AtomicU64::new(0);
/// With [`EXPECT`]: instead of mapping a page, the hook writes
/// [`RESTORE_VALUE`] to the paging entry at this GPA (0: none).
pub static RESTORE_AT: AtomicU64 = AtomicU64::new(0);
/// See [`RESTORE_AT`].
pub static RESTORE_VALUE: AtomicU64 = AtomicU64::new(0);

/// Install a fresh user address space with one read/write VMA of `pages`
/// pages at [`USER_BASE`] and switch to it.
pub fn enter_user(pages: u64) -> TestResult {
    mm::with(|m| {
        m.ctx(|cx, kpt, user| {
            if user.is_some() {
                return Err("a user address space is already installed");
            }
            let mut a = ok(mm::new_address_space(cx, kpt), |e| e.as_str())?;
            if pages > 0 {
                ok(a.add_vma(Gva(USER_BASE), Gva(USER_BASE + pages * 4096), Prot::READ | Prot::WRITE), |e| e.as_str())?;
            }
            a.switch_to(cx.mmu);
            *user = Some(a);
            Ok(())
        })
    })
    .ok_or("memory manager not initialised")?
}

/// Switch back to the kernel tables and destroy the user address space.
pub fn leave_user() -> TestResult {
    mm::with(|m| {
        m.ctx(|cx, kpt, user| {
            KernelMmu.load_cr3(kpt.root());
            if let Some(a) = user.take() {
                crate::mm::destroy(cx, a);
            }
        })
    })
    .ok_or("memory manager not initialised")
}

/// Frames the buddy allocator has handed out, over every zone.
pub fn frames_in_use() -> u64 {
    mm::with(|m| {
        guest_mm::buddy::ZoneId::ALL
            .iter()
            .map(|&z| {
                let s = m.buddy.stats(z);
                s.managed_pages - s.free_total()
            })
            .sum()
    })
    .unwrap_or(0)
}

pub(crate) fn user_ptr(page: u64) -> *mut u64 {
    (USER_BASE + page * 4096) as *mut u64
}

/// map / translate / protect / unmap of 4 KiB and 2 MiB pages, with the
/// flush tokens honoured; no table page leaks.
pub fn paging_map_protect_unmap() -> TestResult {
    let before = frames_in_use();
    enter_user(0)?;
    let r = mm::with(|m| {
        m.ctx(|cx, _, user| -> TestResult {
            let a = user.as_mut().ok_or("no user space")?;
            let frame = cx.frames.alloc_frame().ok_or("out of memory")?;
            let page = Page::<Size4KiB>::from_start_address(Gva(USER_BASE)).map_err(|_| "page")?;
            let pf = PhysFrame::<Size4KiB>::from_start_address(frame.addr()).map_err(|_| "frame")?;
            let rw = PteFlags::WRITABLE | PteFlags::ACCESSED | PteFlags::DIRTY;
            ok(a.page_table_mut().map(cx.mem, &mut cx.frames, page, pf, rw), |e| e.as_str())?;
            let t = a.page_table().translate(cx.mem, Gva(USER_BASE + 0x18)).ok_or("not mapped after map")?;
            check(t.addr.0 == frame.addr().0 + 0x18, "translate gave the wrong address")?;
            // SAFETY: just mapped, writable; our address space is current.
            unsafe { user_ptr(0).add(3).write_volatile(0xfeed) };
            check(cx.mem.read_u64(Gpa(frame.addr().0 + 0x18)) == 0xfeed, "write did not reach the frame")?;
            ok(a.page_table_mut().protect(cx.mem, page, PteFlags::ACCESSED), |e| e.as_str())?.flush(cx.mmu);
            let t = a.page_table().translate(cx.mem, Gva(USER_BASE)).ok_or("protect unmapped the page")?;
            check(!t.flags.contains(PteFlags::WRITABLE), "protect left the page writable")?;
            let (f, _, flush) = ok(a.page_table_mut().unmap(cx.mem, &mut cx.frames, page), |e| e.as_str())?;
            flush.flush(cx.mmu);
            check(f.start().0 == frame.addr().0, "unmap returned another frame")?;
            check(a.page_table().translate(cx.mem, Gva(USER_BASE)).is_none(), "still mapped after unmap")?;
            cx.frames.free_frame(frame);
            // A 2 MiB page (translate only: no frame is touched).
            let big = Page::<Size2MiB>::from_start_address(Gva(USER_BASE + (2 << 20))).map_err(|_| "page")?;
            let bf = PhysFrame::<Size2MiB>::from_start_address(Gpa(2 << 20)).map_err(|_| "frame")?;
            ok(a.page_table_mut().map(cx.mem, &mut cx.frames, big, bf, PteFlags::ACCESSED), |e| e.as_str())?;
            let t = a.page_table().translate(cx.mem, Gva(USER_BASE + (2 << 20) + 0x1234)).ok_or("2M not mapped")?;
            check(t.addr.0 == (2 << 20) + 0x1234, "2 MiB translation wrong")?;
            let (_, _, flush) = ok(a.page_table_mut().unmap(cx.mem, &mut cx.frames, big), |e| e.as_str())?;
            flush.flush(cx.mmu);
            Ok(())
        })
    })
    .ok_or("memory manager not initialised")?;
    leave_user()?;
    r?;
    check(frames_in_use() == before, "page-table pages or frames leaked")
}

/// Touching fresh pages of a VMA: one demand-zero fault each (one per
/// 16 KiB folio with `anon=` 16k and up: the 16 KiB area fits no larger
/// one), zeroed.
pub fn demand_paging_zero_fills() -> TestResult {
    let before = frames_in_use();
    let d0 = DEMAND.load(Ordering::Relaxed);
    let p0 = DEMAND_PAGES.load(Ordering::Relaxed);
    enter_user(4)?;
    let mut good = true;
    for i in 0..4 {
        // SAFETY: inside the VMA; the hook maps it on first touch.
        unsafe {
            good &= user_ptr(i).read_volatile() == 0;
            user_ptr(i).write_volatile(i + 100);
        }
    }
    // SAFETY: mapped above.
    let sum: u64 = (0..4).map(|i| unsafe { user_ptr(i).read_volatile() }).sum();
    let faults = DEMAND.load(Ordering::Relaxed) - d0;
    let pages = DEMAND_PAGES.load(Ordering::Relaxed) - p0;
    leave_user()?;
    check(good, "a fresh page was not zero")?;
    check(sum == 406, "written values lost")?;
    check(pages == 4, "not exactly the four pages demand-mapped")?;
    let want = if mm::anon_folio() == FolioSize::K4 { 4 } else { 1 };
    check(faults == want, "not one demand fault per page (4k) or per 16 KiB folio")?;
    check(frames_in_use() == before, "destroy leaked frames or tables")
}

/// A fork shares pages copy-on-write: the child's write copies, the parent
/// keeps its data.
pub fn fork_copy_on_write() -> TestResult {
    let before = frames_in_use();
    enter_user(2)?;
    // SAFETY: inside the VMA (demand-paged).
    unsafe {
        user_ptr(0).write_volatile(7);
        user_ptr(1).write_volatile(8);
    }
    let c0 = COW.load(Ordering::Relaxed);
    let parent = mm::with(|m| {
        m.ctx(|cx, _, user| -> Result<AddressSpace, &'static str> {
            let a = user.as_mut().ok_or("no user space")?;
            let (child, flush) = a.fork(cx).map_err(|e| {
                e.flush.flush(cx.mmu);
                e.error.as_str()
            })?;
            flush.flush(cx.mmu);
            // Run the child: it becomes the user space the hook serves.
            let parent = user.replace(child).ok_or("no parent")?;
            user.as_ref().ok_or("no child")?.switch_to(cx.mmu);
            Ok(parent)
        })
    })
    .ok_or("memory manager not initialised")??;
    // SAFETY: mapped (copy-on-write) in the child.
    let child_saw = unsafe { user_ptr(0).read_volatile() };
    // SAFETY: as above; this write breaks the sharing.
    unsafe { user_ptr(0).write_volatile(70) };
    let cows = COW.load(Ordering::Relaxed) - c0;
    // Back to the parent; the child goes away.
    mm::with(|m| {
        m.ctx(|cx, _, user| {
            if let Some(child) = user.replace(parent) {
                user.as_ref().expect("parent").switch_to(cx.mmu);
                crate::mm::destroy(cx, child);
            }
        })
    });
    // SAFETY: the parent's pages (now read-only, COW, or reused).
    let parent_sees = unsafe { user_ptr(0).read_volatile() };
    leave_user()?;
    check(child_saw == 7, "the child did not see the parent's data")?;
    check(cows == 1, "not exactly one copy-on-write break")?;
    check(parent_sees == 7, "the child's write leaked into the parent")?;
    check(frames_in_use() == before, "fork/destroy leaked frames or tables")
}

/// Large anonymous folios on the real tables (issue 20), at the `anon=`
/// size: one fault maps a whole folio (a 2 MiB one as one PMD leaf), whose
/// other pages then take no fault; a munmap of one page inside it frees
/// exactly that page; an mprotect of one page takes write from that page
/// only, and giving it back costs one copy-on-write reuse.
/// At `anon=4k` every step holds page by page.
pub fn folios_fault_unmap_mprotect() -> TestResult {
    let before = frames_in_use();
    let size = mm::anon_folio();
    let touched = size.pages().max(4);
    // Two whole 2 MiB pages at USER_BASE (aligned): every size fits.
    enter_user(1024)?;
    let (d0, p0, c0) =
        (DEMAND.load(Ordering::Relaxed), DEMAND_PAGES.load(Ordering::Relaxed), COW.load(Ordering::Relaxed));
    // SAFETY: inside the VMA (demand-paged).
    unsafe { user_ptr(0).write_volatile(100) };
    let first = (DEMAND.load(Ordering::Relaxed) - d0, DEMAND_PAGES.load(Ordering::Relaxed) - p0);
    for i in 1..touched {
        // SAFETY: inside the VMA.
        unsafe { user_ptr(i).write_volatile(100 + i) };
    }
    let faults = DEMAND.load(Ordering::Relaxed) - d0;
    let at = |i: u64| Gva(USER_BASE + i * 4096);
    let leaf_size = mm::with(|m| {
        m.ctx(|cx, _, user| user.as_ref().and_then(|a| a.page_table().translate(cx.mem, at(0))).map(|t| t.size))
    })
    .flatten();
    let body = || -> TestResult {
        check(first == (1, size.pages()), "the first touch did not map one whole folio")?;
        check(faults == touched / size.pages(), "a page of a mapped folio faulted again")?;
        let huge = leaf_size == Some(guest_mm::paging::PageSizeKind::Size2MiB);
        check(huge == (size == FolioSize::M2), "a 2 MiB folio is one PMD leaf (and only then)")?;
        // munmap one page inside the folio: exactly that frame goes (a
        // split THP gains one page-table page).
        let f1 = frames_in_use();
        mm::with(|m| m.ctx(|cx, _, user| user.as_mut().map(|a| a.munmap(cx, at(1), at(2)).map(|f| f.flush(cx.mmu)))))
            .flatten()
            .ok_or("no user space")?
            .map_err(|e| e.as_str())?;
        let want = if huge { f1 } else { f1 - 1 };
        check(frames_in_use() == want, "munmap of one page freed other than that page")?;
        // mprotect one page read-only: only it loses write.
        mm::with(|m| {
            m.ctx(|cx, _, user| {
                user.as_mut().map(|a| a.mprotect(cx, at(2), at(3), Prot::READ).map(|f| f.flush(cx.mmu)))
            })
        })
        .flatten()
        .ok_or("no user space")?
        .map_err(|e| e.as_str())?;
        let writable = |i| {
            mm::with(|m| {
                m.ctx(|cx, _, user| {
                    user.as_ref()
                        .and_then(|a| a.page_table().translate(cx.mem, at(i)))
                        .is_some_and(|t| t.flags.contains(PteFlags::WRITABLE))
                })
            })
            .unwrap_or(false)
        };
        check(!writable(2) && writable(0) && writable(3), "mprotect changed other pages than its own")?;
        mm::with(|m| {
            m.ctx(|cx, _, user| {
                user.as_mut().map(|a| a.mprotect(cx, at(2), at(3), Prot::READ | Prot::WRITE).map(|f| f.flush(cx.mmu)))
            })
        })
        .flatten()
        .ok_or("no user space")?
        .map_err(|e| e.as_str())?;
        // SAFETY: mapped read-only in a writable area: a COW reuse.
        unsafe { user_ptr(2).write_volatile(202) };
        check(COW.load(Ordering::Relaxed) - c0 == 1, "giving write back did not cost one COW reuse")?;
        // SAFETY: mapped.
        let kept = (0..touched)
            .filter(|&i| i != 1)
            .all(|i| unsafe { user_ptr(i).read_volatile() } == if i == 2 { 202 } else { 100 + i });
        check(kept, "the folio's other pages lost their data")
    };
    let r = body();
    leave_user()?;
    r?;
    check(frames_in_use() == before, "folios leaked frames or tables")
}

/// Switching among address spaces: each sees its own page at the same VA.
pub fn address_spaces_switch() -> TestResult {
    let before = frames_in_use();
    enter_user(1)?;
    // SAFETY: inside the VMA.
    unsafe { user_ptr(0).write_volatile(1) };
    let other = mm::with(|m| {
        m.ctx(|cx, kpt, _| -> Result<AddressSpace, &'static str> {
            let mut b = ok(mm::new_address_space(cx, kpt), |e| e.as_str())?;
            ok(b.add_vma(Gva(USER_BASE), Gva(USER_BASE + 4096), Prot::READ | Prot::WRITE), |e| e.as_str())?;
            Ok(b)
        })
    })
    .ok_or("memory manager not initialised")??;
    let mut other = Some(other);
    let mut seen = [0u64; 4];
    for (round, s) in seen.iter_mut().enumerate() {
        mm::with(|m| {
            m.ctx(|cx, _, user| {
                let cur = user.take();
                *user = other.take();
                other = cur;
                user.as_ref().expect("a space").switch_to(cx.mmu);
            })
        });
        // SAFETY: inside the VMA of whichever space is current.
        unsafe {
            if round < 2 {
                let v = user_ptr(0).read_volatile();
                user_ptr(0).write_volatile(v + 10 * (round as u64 + 2));
            }
            *s = user_ptr(0).read_volatile();
        }
    }
    mm::with(|m| {
        m.ctx(|cx, kpt, _| {
            KernelMmu.load_cr3(kpt.root());
            if let Some(o) = other.take() {
                crate::mm::destroy(cx, o);
            }
        })
    });
    leave_user()?;
    check(seen == [20, 31, 20, 31], "address spaces leaked into each other")?;
    check(frames_in_use() == before, "leaked frames or tables")
}

/// A page written through a writable mapping, then write-protected or
/// unmapped, must fault on the next write — every time. In shadow mode
/// this fails if the VMM does not make the host forget the old, writable
/// shadow entry.
pub fn stale_mappings_fault() -> TestResult {
    enter_user(1)?;
    // SAFETY: inside the VMA.
    unsafe { user_ptr(0).write_volatile(5) };
    let frame = mm::with(|m| {
        m.ctx(|cx, _, user| {
            user.as_ref().and_then(|a| a.page_table().translate(cx.mem, Gva(USER_BASE))).map(|t| t.frame.0)
        })
    })
    .flatten()
    .ok_or("page not mapped")?;
    STASH.store(frame, Ordering::Relaxed);
    let mut hits = 0;
    for round in 0..3u64 {
        let unmap = round == 1;
        mm::with(|m| {
            m.ctx(|cx, _, user| {
                let a = user.as_mut().expect("user space");
                let page = Page::<Size4KiB>::from_start_address(Gva(USER_BASE)).expect("aligned");
                if unmap {
                    if let Ok((_, _, flush)) = a.page_table_mut().unmap(cx.mem, &mut cx.frames, page) {
                        flush.flush(cx.mmu);
                    }
                } else if let Ok(flush) = a.page_table_mut().protect(cx.mem, page, PteFlags::ACCESSED | PteFlags::DIRTY)
                {
                    flush.flush(cx.mmu);
                }
            })
        });
        let h0 = EXPECTED_HITS.load(Ordering::Relaxed);
        EXPECT.store(USER_BASE, Ordering::Relaxed);
        // SAFETY: faults (recorded by the hook, which restores the mapping).
        unsafe { user_ptr(0).write_volatile(6 + round) };
        EXPECT.store(0, Ordering::Relaxed);
        hits += EXPECTED_HITS.load(Ordering::Relaxed) - h0;
    }
    // SAFETY: mapped again by the hook.
    let last = unsafe { user_ptr(0).read_volatile() };
    leave_user()?;
    check(hits == 3, "a write-protected or unmapped page did not fault")?;
    check(last == 8, "the retried write was lost")
}

/// A guest PTE pointing beyond guest RAM: in shadow mode the access faults
/// with the reserved bit set (the VMM never maps anything but RAM); in ept
/// mode there is no RAM there and the read sees all ones (unbacked).
pub fn pte_beyond_ram() -> TestResult {
    let beyond = crate::boot::info().ram_size.next_multiple_of(1 << 30) + (1 << 30);
    enter_user(0)?;
    STASH.store(0, Ordering::Relaxed);
    mm::with(|m| {
        m.ctx(|cx, _, user| {
            let a = user.as_mut().expect("user space");
            let page = Page::<Size4KiB>::from_start_address(Gva(USER_BASE)).expect("aligned");
            let frame = PhysFrame::<Size4KiB>::from_start_address(Gpa(beyond)).expect("aligned");
            let _ = a.page_table_mut().map(cx.mem, &mut cx.frames, page, frame, PteFlags::ACCESSED);
        })
    });
    let shadow = crate::arch::mmu::is_shadow();
    let h0 = EXPECTED_HITS.load(Ordering::Relaxed);
    if shadow {
        // The hook restores a mapping to frame 0 (STASH) so the read completes.
        EXPECT.store(USER_BASE, Ordering::Relaxed);
    }
    // SAFETY: either faults (shadow; the hook repairs) or reads unbacked memory.
    let v = unsafe { user_ptr(0).read_volatile() };
    EXPECT.store(0, Ordering::Relaxed);
    let hits = EXPECTED_HITS.load(Ordering::Relaxed) - h0;
    let ec = EXPECTED_EC.load(Ordering::Relaxed);
    leave_user()?;
    if shadow {
        check(hits == 1, "shadow mode mapped memory beyond RAM")?;
        check(ec & 0x8 != 0 && ec & 0x1 != 0, "the fault lacks P and RSVD in its error code")
    } else {
        check(hits == 0 && v == u64::MAX, "beyond RAM should read as all ones in ept mode")
    }
}

/// Page aging over real accessed/dirty bits: pages touched since the last
/// scan stay active, idle clean pages are reclaimed, dirty ones kept. In
/// shadow mode this holds only if the VMM's A/D emulation is exact.
pub fn aging_follows_accessed_and_dirty_bits() -> TestResult {
    use guest_mm::aging::Lru;
    let before = frames_in_use();
    enter_user(4)?;
    // SAFETY: inside the VMA (demand-paged): 0 and 1 read (clean), 2 and 3 written.
    unsafe {
        let _ = user_ptr(0).read_volatile();
        let _ = user_ptr(1).read_volatile();
        user_ptr(2).write_volatile(2);
        user_ptr(3).write_volatile(3);
    }
    let mut lru: Lru<8> = Lru::new();
    for i in 0..4 {
        lru.add(Gva(USER_BASE + i * 4096)); // new pages start inactive
    }
    let scan = |lru: &mut Lru<8>, shrink: bool| {
        mm::with(|m| {
            m.ctx(|cx, _, user| {
                let a = user.as_mut().expect("user space");
                if shrink {
                    lru.shrink_inactive(a, cx, 8, true);
                } else {
                    lru.age_active(a, cx, 8, true);
                }
            })
        })
    };
    let body = |lru: &mut Lru<8>| -> Result<(bool, u64, u64), &'static str> {
        scan(lru, true); // all four were used: A cleared, promoted (second chance)
        check(lru.active().len() == 4, "a used page was not promoted")?;
        // SAFETY: mapped; this read must set A again (through the shadow in shadow mode).
        unsafe {
            let _ = user_ptr(0).read_volatile();
        }
        scan(lru, false); // 1, 2, 3 idle: inactive; 0 used: stays active
        check(lru.active().len() == 1 && lru.inactive().len() == 3, "the accessed bit was not tracked")?;
        scan(lru, true); // 1 clean: reclaimed; 2, 3 dirty: kept
        let mapped1 = mm::with(|m| {
            m.ctx(|cx, _, user| {
                user.as_ref().and_then(|a| a.page_table().translate(cx.mem, Gva(USER_BASE + 4096))).is_some()
            })
        })
        .unwrap_or(true);
        // SAFETY: page 1 was reclaimed; touching it demand-zeroes it again.
        let v1 = unsafe { user_ptr(1).read_volatile() };
        // SAFETY: page 2 was kept.
        let v2 = unsafe { user_ptr(2).read_volatile() };
        Ok((mapped1, v1, v2))
    };
    let r = body(&mut lru);
    leave_user()?;
    let (mapped1, v1, v2) = r?;
    let st = lru.stats();
    check(st.reclaimed == 1 && st.kept_dirty == 2, "reclaim did not follow the dirty bits")?;
    check(!mapped1, "the reclaimed page is still mapped")?;
    check(v1 == 0 && v2 == 2, "page contents wrong after reclaim")?;
    check(frames_in_use() == before, "aging leaked frames or tables")
}

/// A 1 GiB mapping: translated through the PDPT leaf (translate only: a
/// 1 GiB frame is larger than the guest's RAM).
pub fn paging_1g_translates() -> TestResult {
    enter_user(0)?;
    let r = mm::with(|m| {
        m.ctx(|cx, _, user| -> TestResult {
            use guest_mm::paging::Size1GiB;
            let a = user.as_mut().ok_or("no user space")?;
            let page = Page::<Size1GiB>::from_start_address(Gva(USER_BASE)).map_err(|_| "page")?;
            let frame = PhysFrame::<Size1GiB>::from_start_address(Gpa(0)).map_err(|_| "frame")?;
            ok(a.page_table_mut().map(cx.mem, &mut cx.frames, page, frame, PteFlags::ACCESSED), |e| e.as_str())?;
            let t = a.page_table().translate(cx.mem, Gva(USER_BASE + 0x1234_5678)).ok_or("1G not mapped")?;
            check(t.addr.0 == 0x1234_5678, "1 GiB translation wrong")?;
            let (_, _, flush) = ok(a.page_table_mut().unmap(cx.mem, &mut cx.frames, page), |e| e.as_str())?;
            flush.flush(cx.mmu);
            check(a.page_table().translate(cx.mem, Gva(USER_BASE)).is_none(), "1G still mapped")
        })
    })
    .ok_or("memory manager not initialised")?;
    leave_user()?;
    r
}
