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
