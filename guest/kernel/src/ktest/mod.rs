//! The in-guest test registry and runner (`test` / `test=PATTERN` on the
//! command line; `vmm test` drives it).
//!
//! Each test is a name and a function returning `Err(reason)` on failure.
//! The runner times each with `rdtsc`, sends one `REPORT` record of kind
//! `TEST` per test (the VMM prints the `test NAME ... ok` lines from
//! those), prints failures to the console, and ends the VM with success
//! only if every selected test passed. Tests run in registry order, one
//! after another, in the kernel's single thread; a test that crashes the
//! kernel ends the run, and the VMM reports the tests that never reported.
//!
//! Keep tests small: the guest is emulated on the development machines
//! (about 1 µs per instruction). Volume belongs in the host tests.

mod exact;
pub mod matrix;
mod mm_suites;
mod smp_suites;
mod suites;
pub mod vm_suites;

use crate::{arch, kprintln};
use guest_abi::report::{MAX_TEST_TEXT, TestRecord, kind};

/// A test's verdict: `Err` carries a static reason.
pub type TestResult = Result<(), &'static str>;

/// One registered test.
pub struct TestCase {
    /// `suite::name`.
    pub name: &'static str,
    /// The test.
    pub run: fn() -> TestResult,
}

/// Fail with `msg` unless `cond`.
pub fn check(cond: bool, msg: &'static str) -> TestResult {
    if cond { Ok(()) } else { Err(msg) }
}

/// A note a passing test leaves for its report line (a skip and why);
/// `vmm test` prints it after `ok`. Cleared by each report.
static NOTE: core::sync::atomic::AtomicPtr<u8> = core::sync::atomic::AtomicPtr::new(core::ptr::null_mut());
static NOTE_LEN: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

/// Leave `msg` on the running test's report line, if it passes.
pub fn note(msg: &'static str) {
    NOTE_LEN.store(msg.len(), core::sync::atomic::Ordering::Relaxed);
    NOTE.store(msg.as_ptr() as *mut u8, core::sync::atomic::Ordering::Relaxed);
}

fn take_note() -> &'static str {
    let p = NOTE.swap(core::ptr::null_mut(), core::sync::atomic::Ordering::Relaxed);
    if p.is_null() {
        return "";
    }
    let len = NOTE_LEN.load(core::sync::atomic::Ordering::Relaxed);
    // SAFETY: `note` stored the pointer and length of a `&'static str`.
    unsafe { core::str::from_utf8_unchecked(core::slice::from_raw_parts(p, len)) }
}

/// Report one test: the failure message, or for a passing test its note
/// (`TestRecord` says which by `passed`).
fn report(name: &str, result: TestResult, cycles: u64) {
    let note = take_note();
    let msg = result.err().unwrap_or(note);
    let name = &name.as_bytes()[..name.len().min(MAX_TEST_TEXT)];
    let msg = &msg.as_bytes()[..msg.len().min(MAX_TEST_TEXT - name.len())];
    let rec = TestRecord {
        passed: result.is_ok() as u32,
        name_len: name.len() as u32,
        msg_len: msg.len() as u32,
        reserved: 0,
        cycles,
    };
    if let Err(why) = crate::report::send(kind::TEST, &[crate::report::bytes_of(&[rec]), name, msg]) {
        crate::panic::fatal(why);
    }
}

/// Substring search by hand: `str::contains` reaches `core`'s precompiled
/// `simd_contains`, which uses SSE2 and `tzcnt` (BMI1) — instructions the
/// emulating hosts cannot run (tests/no_sse.rs catches such calls).
fn contains(haystack: &str, needle: &str) -> bool {
    let (h, n) = (haystack.as_bytes(), needle.as_bytes());
    n.is_empty() || (n.len() <= h.len() && (0..=h.len() - n.len()).any(|i| &h[i..i + n.len()] == n))
}

/// Run every test whose name contains `filter` (all for an empty filter)
/// and end the VM.
pub fn run(filter: &str) -> ! {
    crate::arch::idt::set_page_fault_hook(vm_suites::user_fault);
    let (mut passed, mut failed) = (0u32, 0u32);
    let (t0, ns0) = (arch::rdtsc(), crate::hypercall::now_ns());
    for t in suites::ALL {
        if !contains(t.name, filter) {
            continue;
        }
        let start = arch::rdtsc();
        let result = (t.run)();
        let cycles = arch::rdtsc().wrapping_sub(start);
        if let Err(why) = result {
            kprintln!("test {} FAILED: {}", t.name, why);
            failed += 1;
        } else {
            passed += 1;
        }
        report(t.name, result, cycles);
    }
    kprintln!("guest tests: {} passed, {} failed", passed, failed);
    if crate::smp::online_count() > 1 {
        use core::sync::atomic::Ordering::Relaxed;
        let (cycles, ns) = (arch::rdtsc().wrapping_sub(t0), crate::hypercall::now_ns().saturating_sub(ns0));
        let n = crate::tlb::SHOOTDOWNS.load(Relaxed);
        let wait = crate::tlb::WAIT_CYCLES.load(Relaxed);
        // Mean wait in ns, from the TSC rate over the run (NOW is host time).
        let mean_ns = if n == 0 || cycles == 0 { 0 } else { (wait / n) * ns / cycles };
        kprintln!(
            "smp: {} shootdowns, {} IPIs, {} pv remote flushes, {} lazy skips, mean initiator wait {} ns",
            n,
            crate::tlb::IPIS.load(Relaxed),
            crate::tlb::PV_REMOTE_FLUSHES.load(Relaxed),
            crate::tlb::LAZY_SKIPS.load(Relaxed),
            mean_ns
        );
    }
    arch::exit(if failed == 0 { guest_abi::ports::EXIT_SUCCESS } else { guest_abi::ports::EXIT_FAILURE })
}
