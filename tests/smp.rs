//! `--vcpus`: bad values, the SMP suites at 2 and 4 vCPUs, one vCPU's
//! crash ending the whole VM with its name, the timeout with every vCPU
//! spinning, per-vCPU statistics, and the SMP suites in every mode (shadow
//! and pv since issue 18).
//!
//! Event counts are asserted (CPU_ON calls, one kick per AP), never times
//! beyond "it ended well before the safety timeout".

mod common;

use common::*;
use std::time::{Duration, Instant};

#[test]
fn bad_vcpu_counts_are_refused_with_the_limit_named() {
    for (cmd, bad) in [("run", "0"), ("run", "65"), ("test", "0"), ("bench", "100"), ("run", "many")] {
        let o = run(&[cmd, "--vcpus", bad]);
        assert_exit(&o, 2);
        let err = stderr(&o);
        assert!(err.contains(&format!("'{bad}'")) && err.contains("1 to 64"), "{cmd} --vcpus {bad}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn the_smp_suites_pass_at_2_and_4_vcpus() {
    if !kvm_available() {
        return;
    }
    for (mmu, n) in [("ept", "2"), ("ept", "4"), ("shadow", "2"), ("shadow", "4"), ("pv", "2"), ("pv", "4")] {
        let o = run(&["test", "--mmu", mmu, "--vcpus", n, "--filter", "smp::", "--timeout", "120s"]);
        assert_exit(&o, 0);
        let out = stdout(&o);
        let smp_tests = out.lines().filter(|l| l.starts_with("test smp::") && l.ends_with(" ... ok")).count();
        assert!(smp_tests >= 9, "{out}");
        assert!(out.contains(&format!("{mmu} ({n} vCPUs): {smp_tests} passed, 0 failed")), "{out}");
        for t in [
            "smp::alloc_free_storm",
            "smp::parallel_demand_faults",
            "smp::unmap_while_reading",
            "smp::fork_while_threads_write",
            "smp::write_protect_from_another_root",
            "smp::lazy_cpus_are_skipped_then_flush",
            "smp::access_matrix_on_every_cpu",
        ] {
            assert!(out.contains(&format!("test {t} ... ok")), "{t} at {n} vCPUs:\n{out}");
        }
    }
}

#[test]
fn the_default_test_run_repeats_the_smp_suites_on_two_vcpus() {
    if !kvm_available() {
        return;
    }
    let o = run(&["test", "--mmu", "ept", "--filter", "smp::"]);
    assert_exit(&o, 0);
    let out = stdout(&o);
    let smp_tests = out.lines().filter(|l| l.starts_with("test smp::") && l.ends_with(" ... ok")).count() / 2;
    assert!(smp_tests >= 9, "{out}");
    assert!(out.contains(&format!("ept: {smp_tests} passed, 0 failed")), "{out}");
    assert!(out.contains(&format!("ept (2 vCPUs): {smp_tests} passed, 0 failed")), "{out}");
}

#[test]
fn a_triple_fault_on_an_ap_ends_the_vm_and_names_the_vcpu() {
    if !kvm_available() {
        return;
    }
    let start = Instant::now();
    let o = run(&["run", "--vcpus", "4", "--cmdline", "crash=ap-triple", "--timeout", "60s"]);
    assert_exit(&o, 4);
    let line = error_line(&o);
    assert!(line.starts_with("error: vCPU 1: guest triple fault (KVM_EXIT_SHUTDOWN)"), "{line}");
    assert!(stdout(&o).contains("smp: 4 of 4 CPUs online"), "console output kept:\n{}", stdout(&o));
    assert!(start.elapsed() < Duration::from_secs(30), "the other vCPUs were not stopped at once");
}

#[test]
fn the_timeout_ends_four_spinning_vcpus_and_joins_them() {
    if !kvm_available() {
        return;
    }
    let start = Instant::now();
    let (o, json) =
        stats_json(&["run", "--vcpus", "4", "--cmdline", "crash=smp-hang", "--timeout", "1s"], "smp-hang.json");
    let json = &json["stats"];
    assert_exit(&o, 5);
    assert!(error_line(&o).contains("timeout"), "{}", stderr(&o));
    assert!(start.elapsed() < Duration::from_secs(20), "a vCPU thread was not stopped");
    // Per-vCPU statistics: every AP was started once and kicked out of
    // KVM_RUN once; the totals are the sums.
    let vcpus = json["vcpus"].as_array().expect("per-vCPU stats");
    assert_eq!(vcpus.len(), 4);
    assert_eq!(json["hypercalls"]["cpu_on"], 3);
    let mut total = 0;
    for (i, v) in vcpus.iter().enumerate() {
        assert_eq!(v["index"], i as u64);
        total += v["total_exits"].as_u64().unwrap();
        if i > 0 {
            assert_eq!(v["exits"]["interrupted"], 1, "vCPU {i}: one kick");
        }
    }
    assert_eq!(json["exits"].as_object().unwrap().values().map(|n| n.as_u64().unwrap()).sum::<u64>(), total);
}

#[test]
fn one_vcpu_writes_no_per_vcpu_stats() {
    if !kvm_available() {
        return;
    }
    let (o, json) = stats_json(&["run"], "one-vcpu.json");
    let json = &json["stats"];
    assert_exit(&o, 0);
    assert!(json.get("vcpus").is_none(), "{json}");
    assert!(json["exits"]["io-out:exit"] == 1, "{json}");
}

#[test]
fn a_vcpu_that_makes_no_progress_ends_the_vm_at_once_and_is_named() {
    if !kvm_available() {
        return;
    }
    // vCPU 0 retries an lgdt from unbacked memory forever (issue 22's
    // detector, one per vCPU thread); the APs were never started.
    let start = Instant::now();
    let o = run(&["run", "--vcpus", "2", "--memory", "64M", "--cmdline", "crash=lgdt-unbacked", "--timeout", "60s"]);
    assert_exit(&o, 4);
    let line = error_line(&o);
    assert!(
        line.starts_with("error: vCPU 0: the guest makes no progress at rip=") && line.contains("`lgdt ["),
        "{line}"
    );
    assert!(start.elapsed() < Duration::from_secs(30), "ended by the timeout, not at once");
}

#[test]
fn aps_waiting_for_cpu_on_are_not_sampled_and_progress_kicks_do_not_end_the_run() {
    if !kvm_available() {
        return;
    }
    // vCPU 0 spins for good (no instruction the detector can blame) while
    // the periodic progress kicks run for 2 s; the APs never get CPU_ON.
    let (o, json) = stats_json(&["run", "--vcpus", "4", "--cmdline", "crash=hang", "--timeout", "2s"], "hang-4.json");
    let json = &json["stats"];
    assert_exit(&o, 5);
    assert!(error_line(&o).contains("timeout"), "{}", stderr(&o));
    let vcpus = json["vcpus"].as_array().expect("per-vCPU stats");
    assert_eq!(vcpus.len(), 4);
    assert_eq!(vcpus[0]["exits"]["interrupted"], 1, "vCPU 0: one kick ends it, the samples are not exits");
    for (i, v) in vcpus.iter().enumerate().skip(1) {
        assert_eq!(v["total_exits"], 0, "vCPU {i} never entered the guest");
    }
}

/// Exits of a bench phase (every reason).
fn phase_exits(b: &serde_json::Value) -> u64 {
    b["exits"].as_object().expect("exits").values().map(|v| v.as_u64().unwrap()).sum()
}

#[test]
fn a_pv_shootdown_costs_one_exit_per_operation_at_any_vcpu_count() {
    if !kvm_available() {
        return;
    }
    // `shootdown`: CPU 0 unmaps a page per operation while the others read
    // in the same address space. In pv mode the shootdown is one
    // PV_FLUSH_REMOTE (the VMM applies the queue and flushes the readers),
    // not one IPI per reader; on one CPU it is the PV_FLUSH of the unmap.
    for n in ["1", "2", "4"] {
        let (o, v) = stats_json(
            &["run", "--mmu", "pv", "--vcpus", n, "--cmdline", "workload=shootdown size=32", "--timeout", "120s"],
            &format!("shootdown-pv-{n}.json"),
        );
        assert_exit(&o, 0);
        let b = &v["stats"]["bench"][0];
        assert_eq!((b["name"].as_str(), b["ok"].as_bool()), (Some("shootdown"), Some(true)), "{v}");
        assert_eq!(phase_exits(b), 32, "--vcpus {n}: one exit per unmap: {b}");
        let remote = b["shadow"]["remote_flushes"].as_u64().unwrap();
        assert_eq!(remote, if n == "1" { 0 } else { 32 }, "--vcpus {n}: {b}");
    }
}

#[test]
fn a_switch_to_a_cached_root_costs_no_exit_on_any_vcpu_in_pv_mode() {
    if !kvm_available() {
        return;
    }
    // `ctxsw` on 4 vCPUs: each switches 64 times among 4 cached roots
    // (after a warm-up pass), a phase of its own: the guest loads the
    // published shadow roots itself.
    let (o, v) = stats_json(
        &["run", "--mmu", "pv", "--vcpus", "4", "--cmdline", "workload=ctxsw size=64", "--timeout", "120s"],
        "ctxsw-pv-4.json",
    );
    assert_exit(&o, 0);
    let phases = v["stats"]["bench"].as_array().expect("bench phases");
    assert_eq!(phases.len(), 4, "one phase per vCPU: {v}");
    for (i, b) in phases.iter().enumerate() {
        assert_eq!(b["vcpu"], i as u64, "{b}");
        assert_eq!(b["ok"], true, "{b}");
        assert_eq!(phase_exits(b), 0, "vCPU {i}: {b}");
    }
    // Shadow mode, for contrast: every switch is a LOAD_CR3 (a cache hit).
    let (o, v) = stats_json(
        &["run", "--mmu", "shadow", "--vcpus", "2", "--cmdline", "workload=ctxsw size=64", "--timeout", "120s"],
        "ctxsw-shadow-2.json",
    );
    assert_exit(&o, 0);
    for b in v["stats"]["bench"].as_array().expect("bench phases") {
        assert_eq!(phase_exits(b), 64, "{b}");
    }
}

#[test]
fn hostile_guests_end_the_same_on_four_vcpus_in_shadow_and_pv_mode() {
    if !kvm_available() {
        return;
    }
    // A guest that scribbles the shadow pool, clears CR0.WP behind the
    // VMM's back, queues entries the VMM must refuse, or livelocks, ends
    // exactly as on one vCPU when the VM has four: no panic, no hang (the
    // safety timeout), the same exit status. (The crash modes run before
    // the kernel starts its APs, which wait for CPU_ON: this covers the
    // VMM's SMP paths — per-vCPU shadow state, flush requests to vCPUs
    // that never ran, the layout-v2 pv area — not concurrent hostility.)
    for mmu in ["shadow", "pv"] {
        for mode in ["scribble", "wp-off-silent", "pv-bad-queue", "livelock"] {
            let cmd = format!("crash={mode}");
            let one = run(&["run", "--mmu", mmu, "--cmdline", &cmd, "--timeout", "60s"]);
            let four = run(&["run", "--mmu", mmu, "--vcpus", "4", "--cmdline", &cmd, "--timeout", "60s"]);
            assert_eq!(four.status.code(), one.status.code(), "{mmu} {cmd}: {}", stderr(&four));
            assert!(!stderr(&four).contains("panicked"), "{mmu} {cmd}: {}", stderr(&four));
        }
    }
}
