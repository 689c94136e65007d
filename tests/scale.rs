//! The guest at scale: the memory manager manages all of RAM, the part
//! beyond the boot direct map (1 GiB) included, in every MMU mode.

mod common;
use common::*;

/// Every MMU mode `vmm test --mmu` accepts, but `both` (read from its help,
/// so a new mode is covered without editing this test).
fn mmu_modes() -> Vec<String> {
    let o = run(&["test", "-h"]);
    assert_exit(&o, 0);
    let help = stdout(&o);
    let mmu = help.lines().skip_while(|l| !l.trim_start().starts_with("--mmu")).collect::<Vec<_>>().join(" ");
    let values = mmu.split("[possible values: ").nth(1).and_then(|v| v.split(']').next()).expect("--mmu's values");
    let modes: Vec<String> = values
        .split(',')
        .map(|m| m.trim().to_string())
        .filter(|m| !m.is_empty() && m != "both" && m != "all")
        .collect();
    assert!(modes.iter().any(|m| m == "ept") && modes.iter().any(|m| m == "shadow"), "{modes:?}");
    modes
}

#[test]
fn memory_beyond_the_first_gib_is_allocated_and_freed_in_every_mmu_mode() {
    if !kvm_available() {
        return;
    }
    for mode in mmu_modes() {
        let o = run(&["test", "--memory", "2G", "--mmu", &mode, "--filter", "buddy::all_ram_is_managed"]);
        assert_exit(&o, 0);
        let out = stdout(&o);
        assert!(out.contains("test buddy::all_ram_is_managed ... ok"), "{mode}: {out}");
        assert!(out.lines().last().is_some_and(|l| l.starts_with("1 passed, 0 failed")), "{mode}: {out}");
    }
}

/// Issue 22, item 6: the memory manager's bring-up must not grow with RAM
/// in shadow and pv mode. Nothing is shadowed before the guest's first
/// `LOAD_CR3`, so the kernel builds its tables (the direct map of all RAM)
/// first, while the VMM keeps the page-table zone writable: no write of
/// them traps (shadow) or is queued (pv). Counted, not timed: the
/// page-table writes the shadow MMU handled and the hypercalls made are the
/// same at 8 GiB as at 64 MiB (on `main` before the fix: 4,109 against 38
/// trapped or queued writes).
#[test]
fn bringing_up_the_memory_manager_costs_no_more_exits_at_8_gib_than_at_64_mib() {
    if !kvm_available() {
        return;
    }
    for mode in ["shadow", "pv"] {
        let counts = |memory: &str| {
            let (o, v) = stats_json(
                &["run", "--mmu", mode, "--memory", memory, "--cmdline", "test=boot"],
                &format!("bringup-{mode}-{memory}.json"),
            );
            assert_exit(&o, 0);
            let writes = v["stats"]["shadow"]["stats"]["pte_writes"].as_u64().unwrap_or_else(|| panic!("{v}"));
            (writes, v["stats"]["hypercalls"].clone())
        };
        let (small, big) = (counts("64M"), counts("8G"));
        assert_eq!(big, small, "{mode}: page-table writes handled and hypercalls, 8 GiB against 64 MiB");
        assert_eq!(big.0, 0, "{mode}: the kernel's tables are built before anything is shadowed");
    }
}
