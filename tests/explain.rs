//! The translation chain (`--explain`, the `EXPLAIN` hypercall), the RAM
//! backings, and the host probe (`vmm info`), end to end.

mod common;
use common::*;

#[test]
fn explain_walks_the_chain_and_agrees_with_kvm_translate() {
    if !kvm_available() {
        return;
    }
    let json = temp_path("explain.json");
    let o = run(&[
        "run",
        "--explain",
        "0xffffffff80200000",
        "--explain",
        "0xffff888000006000",
        "--explain",
        "0x7fffdeadb000",
        "--stats-json",
        json.to_str().unwrap(),
    ]);
    assert_exit(&o, 0);
    let err = stderr(&o);
    // Kernel window: PML4[511] -> PDPT[510] -> PD[1], a 2 MiB page at GPA 2 MiB.
    assert!(err.contains("explain GVA 0xffffffff80200000 (guest CR3 0x9000, mmu=ept)"), "{err}");
    assert!(err.contains("PML4  table 0x00009000 [511]"), "{err}");
    assert!(err.contains("PDPT  table 0x0000b000 [510]"), "{err}");
    assert!(err.contains("GPA   0x200000 (guest page 2 MiB)"), "{err}");
    assert!(err.contains("KVM_TRANSLATE agrees: GPA 0x200000"), "{err}");
    assert!(err.contains("KVM_TRANSLATE agrees: GPA 0x6000"), "{err}");
    assert!(err.contains("KVM_TRANSLATE agrees: not mapped"), "{err}");
    assert!(!err.contains("DISAGREES"), "{err}");
    assert!(err.contains("walk  3 references native"), "{err}");

    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let explain = v["explain"].as_array().unwrap();
    assert_eq!(explain.len(), 3);
    // Addresses are "0x…" strings: a JSON number loses the low bits of a
    // kernel address in jq.
    let hex = |v: &serde_json::Value| {
        let s = v.as_str().unwrap_or_else(|| panic!("an address is a hex string: {v}"));
        u64::from_str_radix(s.strip_prefix("0x").expect("0x prefix"), 16).unwrap()
    };
    assert_eq!(explain[0]["gva"], "0xffffffff80200000");
    assert_eq!(explain[0]["walk"]["steps"][0]["table_gpa"], "0x9000");
    for e in &explain[..2] {
        let gpa = hex(&e["walk"]["end"]["gpa"]);
        assert_eq!(hex(&e["kvm_translate"]), gpa, "{e}");
        let hva = hex(&e["hva"]);
        match e["host"]["state"].as_str().unwrap() {
            // The HPA keeps the HVA's offset in its 4 KiB page.
            "present" => assert_eq!(hex(&e["host"]["hpa"]) & 0xfff, hva & 0xfff),
            "unavailable" => {}
            other => panic!("boot memory is touched, so it must be resident: {other}"),
        }
        assert_eq!(e["slot"]["kind"], "ram");
    }
    assert_eq!(explain[2]["walk"]["end"]["end"], "not-present");
}

#[test]
fn explain_hypercall_answers_the_gpa() {
    if !kvm_available() {
        return;
    }
    let (o, v) = stats_json(&["run", "--cmdline", "explain"], "explain-hypercall.json");
    assert_exit(&o, 0);
    assert!(stdout(&o).contains("explain checks passed"), "{}", stdout(&o));
    let err = stderr(&o);
    assert!(err.contains("explain GVA 0xffffffff802"), "the VMM prints the chain for the guest: {err}");
    assert_eq!(v["stats"]["hypercalls"]["explain"], 3, "{v}");
}

#[test]
fn hugetlb_backing_without_reserved_pages_fails_clearly() {
    if !kvm_available() {
        return;
    }
    let free: u64 = std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let o = run(&["run", "--backing", "hugetlb", "--stats"]);
    if free >= 128 {
        assert_exit(&o, 0);
        assert!(stderr(&o).contains("huge-page backed"), "{}", stderr(&o));
    } else {
        assert_exit(&o, 3);
        let line = error_line(&o);
        assert!(line.contains("needs 128 free 2 MiB hugetlb pages"), "{line}");
        assert!(line.contains("nr_hugepages"), "{line}");
    }
}

#[test]
fn thp_backing_reports_huge_pages_or_fails_clearly() {
    if !kvm_available() {
        return;
    }
    let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    let o = run(&["run", "--backing", "thp", "--stats"]);
    if mode.contains("[never]") || mode.is_empty() {
        assert_exit(&o, 3);
        assert!(error_line(&o).contains("transparent huge pages"), "{}", stderr(&o));
    } else {
        assert_exit(&o, 0);
        let err = stderr(&o);
        assert!(err.contains("(thp backing)"), "{err}");
        let line = err.lines().find(|l| l.contains("huge-page backed")).expect("huge-page line");
        assert!(!line.contains("backed    0 B"), "the guest touched its kernel, so some RAM is huge: {line}");
    }
}

#[test]
fn info_probes_the_host_and_calibrates() {
    if !kvm_available() {
        return;
    }
    let o = run(&["info", "--calibration-loops", "20000"]);
    assert_exit(&o, 0);
    let out = stdout(&o);
    let first = out.lines().next().unwrap_or_default();
    assert!(first.starts_with("host: "), "{out}");
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert!(first.starts_with("host: emulating"), "this host emulates the guest: {out}");
        assert!(out.contains("kvm_pvm"), "{out}");
    }
    assert!(out.contains("KVM_CAP_SYNC_REGS"), "{out}");

    let o = run(&["info", "--json", "--calibration-loops", "20000"]);
    assert_exit(&o, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["schema"], 1);
    assert_eq!(v["calibration"]["iterations"], 20000);
    assert!(v["calibration"]["ns_per_instruction"].as_f64().unwrap() > 0.0);
    assert_eq!(v["facts"]["kvm_api_version"], 12);
    // The host line without a repeated "host: " prefix, and the evidence
    // behind it.
    let host = v["host"].as_str().unwrap();
    assert!(!host.starts_with("host:"), "{host}");
    let stem = host.split(" (").next().unwrap();
    assert!(
        first.starts_with(&format!("host: {stem} (")),
        "the JSON's host is the text's first line: {host} / {first}"
    );
    assert!(v["facts"]["identity"].get("hypervisor_signature").is_some(), "{v}");
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert_eq!(v["facts"]["identity"]["kvm_module"], "kvm_pvm");
        assert_eq!(v["nested"], serde_json::Value::Null, "the PVM host is not a nested SVM host");
    }
}

/// `--explain`'s chain is checked by the architectural walker (the shadow
/// walker's rules), read-only: a leaf with a reserved address bit is shown
/// with the `#PF` a supervisor read takes, and no entry gains an A bit.
#[test]
fn explain_applies_the_walker_rules_and_sets_no_accessed_bit() {
    use guest_abi::{Gpa, Gva};
    use vm_memory::{Bytes, GuestAddress};
    if !common::kvm_available() {
        return;
    }
    let config = vmm::vm::VmConfig::bundled(64 << 20, guest_abi::MmuMode::Ept);
    let mut vm = vmm::vm::Vm::new(config, Box::new(std::io::sink())).expect("create a VM");
    let mem = vm.memory().clone();
    // PML4 at 32 MiB → PDPT → PD → PT; 0x1000 maps 36 MiB, 0x2000 maps it
    // with bit 51 set (reserved: MAXPHYADDR < 52 here).
    let (pml4, pdpt, pd, pt) = (32u64 << 20, (32 << 20) + 0x1000, (32 << 20) + 0x2000, (32 << 20) + 0x3000);
    let table = 0x7; // P RW US, A clear
    for (at, v) in [
        (pml4, pdpt | table),
        (pdpt, pd | table),
        (pd, pt | table),
        (pt + 8, (36 << 20) | table),
        (pt + 16, (36 << 20) | table | (1 << 51)),
    ] {
        mem.write_obj(v, GuestAddress(at)).unwrap();
    }
    vm.set_cr3(Gpa(pml4)).unwrap();
    let ok = vm.explain(Gva(0x1000)).unwrap();
    assert_eq!(ok.gpa(), Some(Gpa(36 << 20)));
    assert_eq!(ok.refused, None, "{}", ok.render());
    let bad = vm.explain(Gva(0x2000)).unwrap();
    assert_eq!(bad.gpa(), Some(Gpa((1 << 51) | (36 << 20))), "the display walk shows what the entry says");
    let r = bad.refused.expect("a reserved bit refuses the access");
    assert_eq!((r.error_code, r.level), (0x9, 1), "P | RSVD at the PT entry");
    assert!(bad.render().contains("#PF error code 0x9"), "{}", bad.render());
    for at in [pml4, pdpt, pd, pt + 8, pt + 16] {
        assert_eq!(mem.read_obj::<u64>(GuestAddress(at)).unwrap() & 0x20, 0, "A set at {at:#x}");
    }
}
