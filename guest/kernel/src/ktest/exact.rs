//! Shadow-mode exactness at the edges (issue 11): paging structures outside
//! the page-table zone, and 1 GiB pages on a CPU that may not have them.
//! Each test knows what hardware does (ept mode, where the host's MMU
//! walks our tables) and what shadow mode documents (README, "shadow
//! mode"); both verdicts are the same `ok`.
//!
//! The probes rewrite one paging entry by hand, read [`USER_BASE`] from
//! ring 0, and let the page-fault hook record a fault and put the entry
//! back ([`RESTORE_AT`]), so the read completes either way.

use super::vm_suites::{
    EXPECT, EXPECTED_EC, EXPECTED_HITS, RESTORE_AT, RESTORE_VALUE, USER_BASE, enter_user, leave_user, user_ptr,
};
use super::{TestResult, check};
use crate::{arch, hypercall, mm};
use core::sync::atomic::Ordering;
use guest_abi::hypercall as hc;
use guest_abi::{Gpa, Gva};
use guest_mm::buddy::ZonePref;
use guest_mm::paging::{FrameSource, Page, PhysFrame, PteFlags, Size4KiB};
use guest_mm::phys::{Pfn, PhysMem};

use guest_abi::paging::{A, ADDR_MASK as ADDR, D, P, PS, RW, US};

/// Map [`USER_BASE`] to a fresh frame holding `value`; returns the GPAs of
/// its PDPTE and PDE.
fn map_user_base(value: u64) -> Result<(Gpa, Gpa), &'static str> {
    map_user_base_at(value).map(|(_, pdpte, pde)| (pdpte, pde))
}

/// As [`map_user_base`], with the PML4E's GPA first.
fn map_user_base_at(value: u64) -> Result<(Gpa, Gpa, Gpa), &'static str> {
    mm::with(|m| {
        m.ctx(|cx, _, user| -> Result<(Gpa, Gpa, Gpa), &'static str> {
            let a = user.as_mut().ok_or("no user space")?;
            let f = cx.frames.alloc_frame().ok_or("out of memory")?.addr();
            cx.mem.write_u64(f, value);
            let page = Page::<Size4KiB>::from_start_address(Gva(USER_BASE)).map_err(|_| "page")?;
            let frame = PhysFrame::<Size4KiB>::from_start_address(f).map_err(|_| "frame")?;
            let flags = PteFlags::WRITABLE | PteFlags::USER | PteFlags::ACCESSED | PteFlags::DIRTY | PteFlags::ANON;
            a.page_table_mut().map(cx.mem, &mut cx.frames, page, frame, flags).map_err(|e| e.as_str())?;
            let idx = |lvl: u32| (USER_BASE >> (12 + 9 * (lvl - 1))) & 0x1ff;
            let pml4e = Gpa(a.page_table().root().addr().0 + idx(4) * 8);
            let pdpte = Gpa((cx.mem.read_u64(pml4e) & ADDR) + idx(3) * 8);
            let pde = Gpa((cx.mem.read_u64(pdpte) & ADDR) + idx(2) * 8);
            Ok((pml4e, pdpte, pde))
        })
    })
    .ok_or("memory manager not initialised")?
}

fn write_phys(gpa: Gpa, v: u64) -> TestResult {
    mm::with(|m| m.buddy.mem().write_u64(gpa, v)).ok_or("memory manager not initialised")
}

fn read_phys(gpa: Gpa) -> Result<u64, &'static str> {
    mm::with(|m| m.buddy.mem().read_u64(gpa)).ok_or("memory manager not initialised")
}

/// Write `entry` at `at`, read [`USER_BASE`] from ring 0, put the old entry
/// back. Returns the value read and the fault's error code, if it faulted
/// (the hook restores the entry, so the read then sees the old mapping).
fn probe_with(at: Gpa, entry: u64) -> Result<(u64, Option<u64>), &'static str> {
    let old = read_phys(at)?;
    write_phys(at, entry)?;
    arch::mmu::invlpg(USER_BASE);
    let h0 = EXPECTED_HITS.load(Ordering::Relaxed);
    RESTORE_VALUE.store(old, Ordering::Relaxed);
    RESTORE_AT.store(at.0, Ordering::Relaxed);
    EXPECT.store(USER_BASE, Ordering::Relaxed);
    // SAFETY: USER_BASE is mapped (by `entry`, or again by the hook).
    let v = unsafe { user_ptr(0).read_volatile() };
    EXPECT.store(0, Ordering::Relaxed);
    RESTORE_AT.store(0, Ordering::Relaxed);
    let faulted = EXPECTED_HITS.load(Ordering::Relaxed) != h0;
    write_phys(at, old)?;
    arch::mmu::invlpg(USER_BASE);
    Ok((v, faulted.then(|| EXPECTED_EC.load(Ordering::Relaxed))))
}

fn alloc_normal_frame() -> Result<Gpa, &'static str> {
    let f = mm::with(|m| m.buddy.alloc_zeroed(0, ZonePref::Normal)).flatten().ok_or("no frame")?;
    Ok(f.addr())
}

fn free_frame(f: Gpa) -> TestResult {
    mm::with(|m| m.buddy.free(Pfn::containing(f), 0)).ok_or("memory manager not initialised")?.map_err(|e| e.as_str())
}

/// A page table outside the page-table zone (issue 11, item 7). In ept
/// mode the host walks it, and a change to it followed by `invlpg` is
/// seen at once. In shadow mode writes to it would not trap, so the VMM
/// refuses it as hardware refuses a reserved bit: the PDE pointing at it
/// faults with P | RSVD — never a translation that silently goes stale.
pub fn tables_outside_the_zone() -> TestResult {
    enter_user(0)?;
    let r = (|| -> TestResult {
        let (_, pde_at) = map_user_base(0xa)?;
        let pt = alloc_normal_frame()?;
        let (b, c) = (alloc_normal_frame()?, alloc_normal_frame()?);
        write_phys(b, 0xb)?;
        write_phys(c, 0xc)?;
        write_phys(pt, b.0 | P | RW | US | A | D)?;
        let pde = pt.0 | P | RW | US | A;
        let first = probe_with(pde_at, pde)?;
        // Change the outside table's entry and flush, as a kernel would.
        write_phys(pt, c.0 | P | RW | US | A | D)?;
        let second = probe_with(pde_at, pde)?;
        for f in [pt, b, c] {
            free_frame(f)?;
        }
        if arch::mmu::is_shadow() {
            check(first == (0xa, Some(0x9)) && second == (0xa, Some(0x9)), "a table outside the zone was shadowed")
        } else {
            check(first == (0xb, None), "the host did not walk the table outside the zone")?;
            check(second == (0xc, None), "the host kept a stale translation")
        }
    })();
    leave_user()?;
    r
}

/// `LOAD_CR3` of a root outside the page-table zone is refused with
/// `ERR_FAULT` (shadow mode; ept mode has no `LOAD_CR3`).
pub fn load_cr3_outside_the_zone() -> TestResult {
    let root = alloc_normal_frame()?;
    let r = hypercall::call(hc::LOAD_CR3, root.0, 0, 0, 0);
    free_frame(root)?;
    if arch::mmu::is_shadow() {
        check(r == hc::ERR_FAULT, "LOAD_CR3 accepted a root outside the page-table zone")
    } else {
        check(r == hc::ERR_UNAVAILABLE, "LOAD_CR3 is not a hypercall in ept mode")
    }
}

/// Whether the CPU the VMM gave us has 1 GiB pages (CPUID 0x80000001
/// EDX bit 26).
fn has_1g_pages() -> bool {
    // SAFETY: cpuid has no side effects (it exits to KVM, which answers
    // from the CPUID the VMM set).
    #[allow(unused_unsafe)]
    let r = unsafe { core::arch::x86_64::__cpuid(0x8000_0001) };
    r.edx & (1 << 26) != 0
}

/// A PDPTE with PS = 1 (issue 11, item 5): a 1 GiB page where the CPUID
/// has them, a reserved-bit fault (P | RSVD) where it does not — in both
/// modes alike (shadow mode used to answer the vCPU's fault "fixed"
/// forever on a guest with 1 GiB of RAM or more). Where the page is
/// partly outside RAM, shadow mode faults with RSVD as a whole where the
/// hardware would translate the part inside (docs/shadow.md's documented
/// difference, item 6).
pub fn pdpte_ps_follows_the_cpuid() -> TestResult {
    enter_user(0)?;
    let r = (|| -> TestResult {
        let (pdpte_at, _) = map_user_base(0xa)?;
        let (v, fault) = probe_with(pdpte_at, PS | P | RW | US | A | D)?; // 1 GiB at GPA 0
        let ram = crate::boot::info().ram_size;
        let expect_fault = !has_1g_pages() || (arch::mmu::is_shadow() && ram < 1 << 30);
        if expect_fault {
            check(fault == Some(0x9), "PS in a PDPTE did not fault with P | RSVD")?;
            check(v == 0xa, "the restored mapping did not read back")
        } else {
            // GPA 0 is the boot area: its first word, read through the 1 GiB page.
            let want = read_phys(Gpa(0))?;
            check(fault.is_none() && v == want, "the 1 GiB page did not translate")
        }
    })();
    leave_user()?;
    r
}

fn read_efer() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reading EFER (MSR 0xC0000080) has no side effects; ring 0.
    unsafe { core::arch::asm!("rdmsr", in("ecx") 0xc000_0080u32, out("eax") lo, out("edx") hi) };
    (hi as u64) << 32 | lo as u64
}

fn write_efer(v: u64) {
    // SAFETY: toggles EFER.NXE only; no live kernel mapping uses XD while it
    // is clear (see mm.rs), and the caller restores it.
    unsafe { core::arch::asm!("wrmsr", in("ecx") 0xc000_0080u32, in("eax") v as u32, in("edx") (v >> 32) as u32) };
    arch::mmu::note_guest_efer(v);
}

/// Issue 11, item 3: shadow mode runs the vCPU with EFER.NXE = 1 whatever
/// the guest sets, so that a fetch fault's error code always says "fetch"
/// (with NXE = 0 and SMEP = 0 it would look like a read). The guest's own
/// NXE still governs its walks (the access matrix's NXE = 0 blocks are
/// identical in both modes); what it reads back from EFER is the
/// documented difference.
pub fn efer_nxe_is_forced_in_shadow_mode() -> TestResult {
    const NXE: u64 = guest_abi::paging::EFER_NXE;
    let efer = read_efer();
    check(efer & NXE != 0, "EFER.NXE is clear at boot")?;
    write_efer(efer & !NXE);
    if arch::mmu::is_shadow() {
        // The VMM notices the cleared NXE at this hypercall and sets it again.
        hypercall::call(hc::FLUSH_TLB, 0, efer & !NXE, 0, 0);
    }
    let seen = read_efer();
    write_efer(efer);
    if arch::mmu::is_shadow() {
        hypercall::call(hc::FLUSH_TLB, 0, efer, 0, 0);
    }
    // Cleared without telling the VMM: the next page fault's exit tells it
    // (and that fault is retried with NXE = 1, so its error code is exact).
    enter_user(0)?;
    // A page whose PTE has no A bit (and no XD, reserved with NXE = 0):
    // shadow mode must take a hidden fault on it.
    let (_, pde_at) = map_user_base(7)?;
    let pte_at = Gpa((read_phys(pde_at)? & ADDR) + ((USER_BASE >> 12) & 0x1ff) * 8);
    write_phys(pte_at, read_phys(pte_at)? & !A)?;
    arch::mmu::invlpg(USER_BASE);
    write_efer(efer & !NXE);
    // SAFETY: mapped just above.
    let v = unsafe { user_ptr(0).read_volatile() };
    let seen_after_fault = read_efer();
    write_efer(efer);
    if arch::mmu::is_shadow() {
        hypercall::call(hc::FLUSH_TLB, 0, efer, 0, 0);
    }
    leave_user()?;
    check(v == 7, "the page read back wrong")?;
    if arch::mmu::is_shadow() {
        check(seen & NXE != 0, "shadow mode let the vCPU run with EFER.NXE = 0")?;
        check(seen_after_fault & NXE != 0, "shadow mode did not notice EFER.NXE cleared at a page fault")
    } else {
        check(seen & NXE == 0 && seen_after_fault & NXE == 0, "EFER.NXE did not clear")
    }
}

/// Whether the CPU the VMM gave us is an AMD (or Hygon) one (CPUID 0).
fn is_amd() -> bool {
    // SAFETY: as in `has_1g_pages`.
    #[allow(unused_unsafe)]
    let r = unsafe { core::arch::x86_64::__cpuid(0) };
    let v = |x: u32| x.to_le_bytes();
    let (b, d, c) = (v(r.ebx), v(r.edx), v(r.ecx));
    let vendor = [b[0], b[1], b[2], b[3], d[0], d[1], d[2], d[3], c[0], c[1], c[2], c[3]];
    &vendor == b"AuthenticAMD" || &vendor == b"HygonGenuine"
}

/// Bit 8 of a PML4E is reserved on AMD CPUs and ignored on Intel ones
/// (AMD APM vol. 2 figure 5-18): shadow mode follows the vendor of the
/// CPUID the guest was given, as the hardware walk in ept mode does.
pub fn pml4e_bit_8_follows_the_vendor() -> TestResult {
    enter_user(0)?;
    let r = (|| -> TestResult {
        let (pml4e_at, _, _) = map_user_base_at(0xa)?;
        let pml4e = read_phys(pml4e_at)?;
        let (v, fault) = probe_with(pml4e_at, pml4e | 1 << 8)?;
        check(v == 0xa, "the mapping did not read back")?;
        let hardware_walks =
            guest_abi::MmuMode::from_raw(crate::boot::info().mmu_mode) == Some(guest_abi::MmuMode::Ept);
        let qemu_model = crate::cmdline::value(crate::boot::cmdline(), "hostmmu") == Some("qemu-tcg");
        if is_amd() && hardware_walks && qemu_model {
            // QEMU's TCG walker does not reserve PML4E bit 8 (AMD APM vol. 2
            // §5.3.3 and KVM do): the host MMU is no reference here. Shadow
            // and pv mode, whose walker follows the vendor, still must fault.
            check(fault.is_none() || fault == Some(0x9), "PML4E bit 8 gave an unexpected fault")
        } else if is_amd() {
            check(fault == Some(0x9), "PML4E bit 8 did not fault with P | RSVD on an AMD CPU")
        } else {
            check(fault.is_none(), "PML4E bit 8 faulted on a non-AMD CPU")
        }
    })();
    leave_user()?;
    r
}
