//! Shadow mode end to end: the same guest and suites under `--mmu shadow`,
//! with the shadow MMU's event counts (deterministic) asserted.

mod common;
use common::*;

fn stats_json(args: &[&str], name: &str) -> (std::process::Output, serde_json::Value) {
    let json = temp_path(name);
    let mut all = args.to_vec();
    all.extend_from_slice(&["--stats-json", json.to_str().unwrap()]);
    let o = run(&all);
    let v = serde_json::from_str(&std::fs::read_to_string(&json).unwrap_or_default()).unwrap_or_default();
    (o, v)
}

#[test]
fn suites_pass_in_both_modes_with_the_same_verdicts() {
    if !kvm_available() {
        return;
    }
    let o = run(&["test", "--mmu", "both"]);
    assert_exit(&o, 0);
    let out = stdout(&o);
    let ept = out.lines().find(|l| l.starts_with("ept: ")).expect("ept summary").to_string();
    let shadow = out.lines().find(|l| l.starts_with("shadow: ")).expect("shadow summary").to_string();
    assert_eq!(ept.trim_start_matches("ept: "), shadow.trim_start_matches("shadow: "), "{out}");
    assert!(!out.contains("DISAGREE"), "{out}");
}

#[test]
fn shadow_boot_runs_on_a_shadow_root_with_one_cr3_load() {
    if !kvm_available() {
        return;
    }
    let (o, v) = stats_json(&["run", "--mmu", "shadow", "--memory", "64M"], "shadow-boot.json");
    assert_exit(&o, 0);
    assert!(stdout(&o).contains("mmu=shadow"), "{}", stdout(&o));
    let sh = &v["stats"]["shadow"]["stats"];
    assert_eq!(sh["cr3_loads"], 1, "{v}");
    assert_eq!(sh["root_misses"], 1, "{v}");
    assert_eq!(sh["guest_faults"], 0, "{v}");
    // The kernel half is prefilled, so booting takes no hidden fault.
    assert_eq!(sh["hidden_faults"], 0, "{v}");
    assert_eq!(v["stats"]["hypercalls"]["load_cr3"], 1, "{v}");
}

#[test]
fn ept_mode_takes_no_mmu_exits() {
    if !kvm_available() {
        return;
    }
    let (o, v) = stats_json(&["run", "--memory", "64M", "--cmdline", "test"], "ept-exits.json");
    assert_exit(&o, 0);
    assert!(v["stats"]["shadow"].is_null(), "{v}");
    let exits = v["stats"]["exits"].as_object().unwrap();
    for reason in exits.keys() {
        assert!(
            matches!(reason.as_str(), "io-out:serial" | "io-out:hypercall" | "io-out:exit"),
            "ept mode took a {reason} exit: {v}"
        );
    }
    let hc = v["stats"]["hypercalls"].as_object().unwrap();
    for name in ["load_cr3", "shadow_fault", "flush_tlb"] {
        assert!(!hc.contains_key(name), "ept mode made {name} hypercalls: {v}");
    }
}

#[test]
fn explain_shows_the_shadow_entry_the_vcpu_walks() {
    if !kvm_available() {
        return;
    }
    let o = run(&["run", "--mmu", "shadow", "--memory", "64M", "--explain", "0xffffffff80200000"]);
    assert_exit(&o, 0);
    let err = stderr(&o);
    assert!(err.contains("(guest CR3 0x9000, mmu=shadow)"), "the guest's root, not the shadow's: {err}");
    assert!(err.contains("level-2 leaf 0x00000000002000e3"), "{err}");
    assert!(err.contains("KVM_TRANSLATE agrees: GPA 0x200000"), "{err}");
}
