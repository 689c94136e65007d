//! The registered in-guest test suites. Add a test by adding a line to
//! [`ALL`]; names are `suite::test`.

use super::{TestCase, TestResult, check, exact, mm_suites, vm_suites};
use crate::{arch, hypercall};
use guest_abi::hypercall as hc;

/// Every test, in the order they run.
pub static ALL: &[TestCase] = &[
    TestCase { name: "boot::memory_map_is_sorted_and_covers_ram", run: boot_memory_map },
    TestCase { name: "mem::memmove_handles_overlap_both_ways", run: memmove_overlap },
    TestCase { name: "mem::memset_and_memcmp", run: memset_memcmp },
    TestCase { name: "fmt::ufmt_formats_without_core_fmt", run: ufmt_formats },
    TestCase { name: "hypercall::now_is_monotonic", run: now_monotonic },
    TestCase { name: "hypercall::unknown_number_is_refused", run: unknown_refused },
    TestCase { name: "exceptions::handler_resumes_through_iretq", run: exception_resumes },
    TestCase { name: "arch::tsc_advances", run: tsc_advances },
    TestCase { name: "arch::rep_bsf_is_emulated", run: rep_bsf },
    TestCase { name: "buddy::alloc_is_aligned_and_returned", run: mm_suites::buddy_alloc_aligned_and_returned },
    TestCase { name: "buddy::pgtable_pages_come_zeroed", run: mm_suites::buddy_pgtable_pages_are_zero },
    TestCase { name: "buddy::double_free_is_refused", run: mm_suites::buddy_double_free_refused },
    TestCase { name: "buddy::all_ram_is_managed", run: mm_suites::buddy_all_ram_is_managed },
    TestCase { name: "slab::objects_are_distinct_and_aligned", run: mm_suites::slab_objects_distinct_and_aligned },
    TestCase { name: "heap::vec_and_box", run: mm_suites::heap_vec_and_box },
    TestCase { name: "heap::oom_returns_null", run: mm_suites::heap_oom_returns_null },
    TestCase { name: "paging::map_protect_unmap_4k_and_2m", run: vm_suites::paging_map_protect_unmap },
    TestCase { name: "paging::map_1g_translates", run: vm_suites::paging_1g_translates },
    TestCase { name: "aspace::switch_keeps_spaces_apart", run: vm_suites::address_spaces_switch },
    TestCase { name: "demand::zero_fill_one_fault_per_page", run: vm_suites::demand_paging_zero_fills },
    TestCase { name: "cow::fork_then_write_copies", run: vm_suites::fork_copy_on_write },
    TestCase { name: "folio::fault_unmap_mprotect_keep_pages_exact", run: vm_suites::folios_fault_unmap_mprotect },
    TestCase { name: "aging::follows_accessed_and_dirty_bits", run: vm_suites::aging_follows_accessed_and_dirty_bits },
    TestCase { name: "shadow::stale_mappings_fault_every_time", run: vm_suites::stale_mappings_fault },
    TestCase { name: "isolation::pte_beyond_ram", run: vm_suites::pte_beyond_ram },
    TestCase { name: "exact::tables_outside_the_zone_never_go_stale", run: exact::tables_outside_the_zone },
    TestCase { name: "exact::load_cr3_outside_the_zone_is_refused", run: exact::load_cr3_outside_the_zone },
    TestCase { name: "exact::pdpte_ps_follows_the_cpuid", run: exact::pdpte_ps_follows_the_cpuid },
    TestCase { name: "exact::efer_nxe_is_forced_in_shadow_mode", run: exact::efer_nxe_is_forced_in_shadow_mode },
    TestCase { name: "exact::pml4e_bit_8_follows_the_vendor", run: exact::pml4e_bit_8_follows_the_vendor },
    TestCase { name: "matrix::smep_smap_rows", run: super::matrix::smep_smap_rows },
    TestCase { name: "meta::fails_when_asked", run: fails_when_asked },
];

fn boot_memory_map() -> TestResult {
    let info = crate::boot::info();
    let regions = info.regions();
    check(!regions.is_empty(), "empty memory map")?;
    let mut cursor = 0;
    for r in regions {
        check(r.start == cursor, "gap or overlap in the memory map")?;
        cursor = r.end();
    }
    check(cursor == info.ram_size, "memory map does not end at the RAM size")?;
    let zone = info.pt_zone;
    check(
        regions.iter().any(|r| {
            r.start == zone.start && r.len == zone.len && r.kind == guest_abi::MemRegionKind::PageTables as u32
        }),
        "page-table zone missing from the map",
    )
}

fn memmove_overlap() -> TestResult {
    let mut buf = [0u8; 16];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = i as u8;
    }
    // SAFETY: both ranges lie inside `buf`.
    unsafe { crate::mem::memmove(buf.as_mut_ptr().add(2), buf.as_ptr(), 8) };
    check(buf[2..10] == [0, 1, 2, 3, 4, 5, 6, 7], "forward-overlapping memmove corrupted data")?;
    // SAFETY: both ranges lie inside `buf`.
    unsafe { crate::mem::memmove(buf.as_mut_ptr(), buf.as_ptr().add(2), 8) };
    check(buf[..8] == [0, 1, 2, 3, 4, 5, 6, 7], "backward-overlapping memmove corrupted data")
}

fn memset_memcmp() -> TestResult {
    let mut a = [1u8; 32];
    let b = [7u8; 32];
    // SAFETY: `a` is 32 bytes.
    unsafe { crate::mem::memset(a.as_mut_ptr(), 7, 32) };
    // SAFETY: both are 32 bytes.
    check(unsafe { crate::mem::memcmp(a.as_ptr(), b.as_ptr(), 32) } == 0, "memset/memcmp mismatch")?;
    a[31] = 6;
    // SAFETY: both are 32 bytes.
    check(unsafe { crate::mem::memcmp(a.as_ptr(), b.as_ptr(), 32) } < 0, "memcmp ordering wrong")
}

struct Buf {
    bytes: [u8; 64],
    len: usize,
}

impl ufmt::uWrite for Buf {
    type Error = ();
    fn write_str(&mut self, s: &str) -> Result<(), ()> {
        let end = self.len + s.len();
        if end > self.bytes.len() {
            return Err(());
        }
        self.bytes[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

fn ufmt_formats() -> TestResult {
    let mut b = Buf { bytes: [0; 64], len: 0 };
    ufmt::uwrite!(b, "{} {:#x} {}", 12345u64, 0xdead_beefu64, -7i32).map_err(|_| "ufmt write failed")?;
    check(&b.bytes[..b.len] == b"12345 0xdeadbeef -7", "ufmt output differs")
}

fn now_monotonic() -> TestResult {
    let a = hypercall::now_ns();
    let b = hypercall::now_ns();
    check(!hc::is_error(a) && b >= a, "NOW went backwards or failed")
}

fn unknown_refused() -> TestResult {
    check(hypercall::call(0x7777, 1, 2, 3, 4) == hc::ERR_UNKNOWN, "unknown hypercall not refused")
}

fn exception_resumes() -> TestResult {
    let first = arch::idt::run_ud_probe();
    let second = arch::idt::run_ud_probe();
    check(second == first + 1 && first >= 1, "#UD probe not counted and resumed")
}

fn tsc_advances() -> TestResult {
    let a = arch::rdtsc();
    let b = arch::rdtsc();
    check(b > a, "TSC did not advance")
}

/// Passes unless the command line says `fail-on-request`: lets the VMM's
/// tests check how a failing guest test is reported.
fn fails_when_asked() -> TestResult {
    let cmdline = crate::boot::cmdline();
    check(crate::cmdline::value(cmdline, "fail-on-request").is_none(), "failed on request (fail-on-request)")
}

/// `rep bsf` (the `tzcnt` encoding LLVM emits for `trailing_zeros`) must
/// behave as `bsf` for non-zero inputs under KVM's emulator.
fn rep_bsf() -> TestResult {
    for (v, want) in [(1u64, 0u64), (0x80, 7), (0x10_0000_0000, 36), (u64::MAX, 0), (1 << 63, 63)] {
        let got: u64;
        // SAFETY: register-only instruction.
        unsafe { core::arch::asm!("rep bsf {o}, {i}", o = out(reg) got, i = in(reg) v, options(nomem, nostack)) };
        check(got == want, "rep bsf gave a wrong bit index")?;
    }
    Ok(())
}
