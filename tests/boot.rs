//! Boot the bundled guest under KVM and check what it prints, how it ends,
//! and what the VMM counted. Also the guest's crash modes: each failure the
//! VMM must report, provoked for real.

mod common;
use common::*;

#[test]
fn bundled_guest_boots_prints_its_memory_map_and_exits_zero() {
    if !kvm_available() {
        return;
    }
    let o = run(&["run"]);
    assert_exit(&o, 0);
    let out = stdout(&o);
    assert!(out.contains("mmuvirt guest kernel"), "{out}");
    assert!(out.contains("mmu=ept, RAM 256 MiB"), "{out}");
    assert!(out.contains("memory map (6 regions):"), "{out}");
    // The page-table zone of a 256 MiB guest: 16 MiB, 32 MiB long.
    assert!(out.contains("[0x0001000000-0x0002ffffff] page-tables 32 MiB"), "{out}");
    assert!(out.contains("kernel"), "{out}");
    assert!(out.trim_end().ends_with("boot ok"), "{out}");
}

#[test]
fn memory_size_and_cmdline_reach_the_guest() {
    if !kvm_available() {
        return;
    }
    let o = run(&["run", "--memory", "64M", "--cmdline", "fail-on-request size=7"]);
    assert_exit(&o, 0);
    let out = stdout(&o);
    assert!(out.contains("RAM 64 MiB"), "{out}");
    assert!(out.contains("page-table zone: 0x1000000, 8 MiB"), "{out}");
    assert!(out.contains("[0x0001800000-0x0003ffffff] usable 40 MiB"), "{out}");
    assert!(out.contains("cmdline: \"fail-on-request size=7\""), "{out}");
}

#[test]
fn stats_count_exits_by_reason() {
    if !kvm_available() {
        return;
    }
    let json = temp_path("stats.json");
    let o = run(&["run", "--stats", "--stats-json", json.to_str().unwrap()]);
    assert_exit(&o, 0);
    let err = stderr(&o);
    assert!(err.contains("setup time"), "{err}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let exits = &v["stats"]["exits"];
    // One boot report, one exit-device write; every other exit is console output.
    assert_eq!(exits["io-out:exit"], 1, "{v}");
    assert_eq!(exits["io-out:hypercall"], 1, "{v}");
    assert_eq!(v["stats"]["hypercalls"]["report"], 1, "{v}");
    let serial = exits["io-out:serial"].as_u64().unwrap();
    let printed = stdout(&o).len() as u64;
    assert!(serial >= 1 && serial <= printed, "{serial} serial exits for {printed} bytes");
    assert_eq!(v["reports"][0]["type"], "boot", "{v}");
    assert_eq!(v["reports"][0]["regions"], 6, "{v}");
    assert!(v["stats"]["guest_boot_cycles"].as_u64().unwrap() > 0);
    // Durations are integer nanoseconds (not serde's {secs, nanos}).
    let setup = v["stats"]["setup_time_ns"].as_u64().expect("setup_time_ns is an integer");
    let run = v["stats"]["run_time_ns"].as_u64().expect("run_time_ns is an integer");
    assert!(setup > 0 && run > 0, "{v}");
    assert!(v["stats"].get("setup_time").is_none(), "{v}");
}

#[test]
fn guest_page_fault_is_reported_with_cr2_and_fails_the_run() {
    if !kvm_available() {
        return;
    }
    let o = run(&["run", "--cmdline", "crash=pf"]);
    assert_exit(&o, 1);
    let out = stdout(&o);
    // A supervisor read of a non-present page: error code 0.
    assert!(out.contains("EXCEPTION 14 (#PF) error=0x0"), "{out}");
    assert!(out.contains("cr2=0x7fffdeadb000"), "{out}");
    assert!(error_line(&o).contains("failure status 35"), "{}", stderr(&o));
}

#[test]
fn guest_invalid_opcode_is_reported() {
    if !kvm_available() {
        return;
    }
    let o = run(&["run", "--cmdline", "crash=ud"]);
    assert_exit(&o, 1);
    let out = stdout(&o);
    assert!(out.contains("EXCEPTION 6 (#UD)"), "{out}");
    assert!(out.contains("rip=0xffffffff802"), "{out}");
}

#[test]
fn guest_panic_prints_location_and_message() {
    if !kvm_available() {
        return;
    }
    let o = run(&["run", "--cmdline", "crash=panic"]);
    assert_exit(&o, 1);
    let out = stdout(&o);
    assert!(out.contains("PANIC at src/crash.rs:"), "{out}");
    assert!(out.contains("deliberate panic (crash=panic)"), "{out}");
}

#[test]
fn triple_fault_is_a_one_line_error() {
    if !kvm_available() {
        return;
    }
    let o = run(&["run", "--cmdline", "crash=triple"]);
    assert_exit(&o, 4);
    assert!(error_line(&o).starts_with("error: guest triple fault (KVM_EXIT_SHUTDOWN)"), "{}", stderr(&o));
}

#[test]
fn sse_instruction_is_refused_clearly() {
    if !kvm_available() {
        return;
    }
    let o = run(&["run", "--cmdline", "crash=sse"]);
    let line = error_line(&o);
    if o.status.code() == Some(4) {
        // Emulating host: KVM cannot emulate pxor; the VMM shows its bytes.
        assert!(line.contains("could not emulate"), "{line}");
        assert!(line.contains("bytes: 66 0f ef c0"), "{line}");
    } else {
        // Hardware host: CR4.OSFXSR is clear, so the CPU raises #UD.
        assert_exit(&o, 1);
        assert!(stdout(&o).contains("EXCEPTION 6 (#UD)"), "{}", stdout(&o));
    }
}

#[test]
fn nonsense_hypercalls_get_error_results() {
    if !kvm_available() {
        return;
    }
    // ept mode refuses PV_HARVEST as unavailable, pv mode for its arguments.
    for mmu in ["ept", "pv"] {
        let (o, v) = stats_json(
            &["run", "--mmu", mmu, "--cmdline", "crash=hypercall"],
            &format!("nonsense-hypercalls-{mmu}.json"),
        );
        assert_exit(&o, 0);
        let out = stdout(&o);
        assert!(out.contains("hypercall checks passed"), "{mmu}: {out}");
        assert_eq!(out.matches("refused ok").count(), 11, "{mmu}: {out}");
        assert_eq!(v["stats"]["hypercalls"]["unknown"], 1, "{mmu}: {v}");
    }
}

#[test]
fn timeout_ends_a_guest_that_never_exits() {
    if !kvm_available() {
        return;
    }
    let start = std::time::Instant::now();
    let o = run(&["run", "--cmdline", "crash=hang", "--timeout", "1s"]);
    assert_exit(&o, 5);
    assert_eq!(error_line(&o), "error: timeout: the guest was still running after 1s");
    // Generous bound: only catches a timeout that does not fire at all.
    assert!(start.elapsed() < std::time::Duration::from_secs(30));
}
