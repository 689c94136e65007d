//! `vmm test`: the in-guest suites, reported like `cargo test`.

mod common;
use common::*;

/// (passed, failed) from the final `N passed, N failed` line.
fn totals(out: &str) -> (usize, usize) {
    let last = out.lines().last().unwrap_or_default();
    let nums: Vec<usize> = last.split(|c: char| !c.is_ascii_digit()).filter_map(|w| w.parse().ok()).collect();
    assert!(last.ends_with(" failed") && nums.len() == 2, "closing line: {last:?}");
    (nums[0], nums[1])
}

#[test]
fn all_guest_tests_pass_and_are_counted() {
    if !kvm_available() {
        return;
    }
    let json = temp_path("guest-tests.json");
    let o = run(&["test", "--mmu", "ept", "--json", json.to_str().unwrap()]);
    assert_exit(&o, 0);
    let out = stdout(&o);
    let ok_lines = out.lines().filter(|l| l.starts_with("test ") && l.ends_with(" ... ok")).count();
    assert!(ok_lines >= 9, "{out}");
    assert!(out.contains("test exceptions::handler_resumes_through_iretq ... ok"), "{out}");
    // The SMP suites run a second time, on two vCPUs, by default.
    let smp = out.lines().filter(|l| l.starts_with("test smp::") && l.ends_with(" ... ok")).count() / 2;
    assert!(smp >= 6, "{out}");
    assert!(out.contains(&format!("ept: {} passed, 0 failed", ok_lines - smp)), "{out}");
    assert!(out.contains(&format!("ept (2 vCPUs): {smp} passed, 0 failed")), "{out}");
    assert_eq!(totals(&out), (ok_lines, 0));
    assert!(!out.contains("guest console"), "a clean run hides the console: {out}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["passed"], ok_lines);
    assert_eq!(v["modes"][0]["mmu"], "ept");
    assert_eq!(v["modes"][0]["vcpus"], 1);
    assert_eq!(v["modes"][1]["vcpus"], 2);
}

#[test]
fn filter_selects_tests_by_name() {
    if !kvm_available() {
        return;
    }
    let o = run(&["test", "--mmu", "ept", "--filter", "mem::"]);
    assert_exit(&o, 0);
    let out = stdout(&o);
    assert_eq!(totals(&out), (2, 0), "{out}");
    assert!(out.lines().filter(|l| l.starts_with("test ")).all(|l| l.starts_with("test mem::")), "{out}");
}

#[test]
fn a_failing_guest_test_fails_the_run_and_shows_why() {
    if !kvm_available() {
        return;
    }
    let o = run(&["test", "--mmu", "ept", "--filter", "meta::", "--cmdline", "fail-on-request"]);
    assert_exit(&o, 1);
    let out = stdout(&o);
    assert!(out.contains("test meta::fails_when_asked ... FAILED\n    failed on request"), "{out}");
    assert!(out.contains("--- guest console (ept) ---"), "{out}");
    assert_eq!(totals(&out), (0, 1));
}

#[test]
fn a_crashing_guest_counts_as_a_failure() {
    if !kvm_available() {
        return;
    }
    // The crash happens before the tests start.
    let o = run(&["test", "--mmu", "ept", "--cmdline", "crash=triple"]);
    assert_exit(&o, 1);
    let out = stdout(&o);
    assert!(out.contains("error: the ept run ended early: guest triple fault"), "{out}");
    assert_eq!(totals(&out), (0, 1));
}
