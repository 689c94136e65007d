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
    let o = run(&["run", "--cmdline", "explain", "--stats"]);
    assert_exit(&o, 0);
    assert!(stdout(&o).contains("explain checks passed"), "{}", stdout(&o));
    let err = stderr(&o);
    assert!(err.contains("explain GVA 0xffffffff802"), "the VMM prints the chain for the guest: {err}");
    assert!(err.lines().any(|l| l.trim_start().starts_with("explain") && l.trim_end().ends_with(" 3")), "{err}");
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
