//! `vmm bench`: the report's shape, its host line, the event counts it
//! shows, and the JSON and SVG files.

mod common;
use common::*;

#[test]
fn bench_compares_modes_and_writes_json_and_svg() {
    if !kvm_available() {
        return;
    }
    let (json, svg) = (temp_path("bench.json"), temp_path("bench.svg"));
    let o = run(&[
        "bench",
        "--workload",
        "ctxsw",
        "--workload",
        "tlb",
        "--repeat",
        "1",
        "--size",
        "8",
        "--json",
        json.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ]);
    assert_exit(&o, 0);
    let out = stdout(&o);
    let first = out.lines().next().unwrap_or_default();
    assert!(first.starts_with("host: "), "the report starts with the host probe: {out}");
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert!(first.starts_with("host: emulating"), "{out}");
        // One line saying the ratios mean nothing here, and what to run instead.
        let second = out.lines().nth(1).unwrap_or_default();
        assert!(second.contains("carry no meaning") && second.contains("scripts/nested.sh --three-way"), "{out}");
    }
    assert!(out.contains("ctxsw   shadow/ept: wall time x"), "{out}");
    // Every mode gets its line against ept (the default runs all three).
    assert!(out.contains("ctxsw   pv/ept: wall time x"), "{out}");

    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["schema"], 1);
    let host = v["host"].as_str().unwrap();
    assert_eq!(format!("host: {host}"), first, "the JSON's host line has no repeated 'host: ' prefix");
    let ws = v["workloads"].as_array().unwrap();
    assert_eq!(ws.len(), 2);
    for w in ws {
        let modes = w["modes"].as_array().unwrap();
        assert_eq!(modes.len(), 3, "the default is all three modes: {w}");
        assert_eq!((modes[1]["mmu"].as_str(), modes[2]["mmu"].as_str()), (Some("shadow"), Some("pv")), "{w}");
        assert_eq!(modes[2]["walk_refs_per_tlb_miss"], 4);
        assert_eq!(modes[0]["mmu"], "ept");
        assert_eq!(modes[0]["exits_per_op"], 0.0, "ept takes no exits: {w}");
        assert_eq!(modes[0]["walk_refs_per_tlb_miss"], 24);
        assert_eq!(modes[1]["walk_refs_per_tlb_miss"], 4);
        assert!(w["time_ratio"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(ws[0]["modes"][1]["exits_per_op"], 1.0, "a shadow context switch is one exit");
    assert_eq!(ws[1]["modes"][1]["exits_per_op"], 0.0, "tlb takes no exits in shadow mode");
    assert_eq!(ws[0]["modes"][2]["exits_per_op"], 0.0, "a pv context switch among cached roots takes none");

    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.starts_with("<svg"), "{}", &chart[..chart.len().min(200)]);
    assert!(chart.contains("ctxsw") && chart.contains("tlb"), "workload labels missing");
    // The chart carries the host label, the labelled baseline and a value
    // on every bar (2 workloads x 3 series).
    assert!(chart.contains("host: "), "host label missing");
    assert!(chart.contains("1 = ept mode"), "baseline label missing");
    let labels = |prefix: char| chart.lines().filter(|l| l.trim_start().starts_with(prefix)).count();
    assert_eq!(labels('×'), 4, "a ratio label per time bar: {chart}");
    assert_eq!(labels('+'), 2, "an exits label per exits bar");
}

#[test]
fn bench_refuses_unknown_workloads_and_a_chart_of_one_mode() {
    let o = run(&["bench", "--workload", "nope"]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("unknown workload 'nope'"), "{}", stderr(&o));
    let o = run(&["bench", "--mmu", "ept", "--svg", "/tmp/x.svg"]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("needs --mmu all or --mmu both"), "{}", stderr(&o));
}

#[test]
fn a_failed_bench_run_says_why_in_the_guests_words() {
    if !kvm_available() {
        return;
    }
    // A 64 MiB `tlb` working set cannot fit in a 64 MiB guest: the run
    // fails, and the error carries the guest's reason, not just a status.
    let out = temp_path("bench-tlbset");
    let o = run(&[
        "bench",
        "--mmu",
        "ept",
        "--workload",
        "tlb",
        "--size",
        "1",
        "--repeat",
        "1",
        "--memory",
        "64M",
        "--cmdline",
        "tlbset=16384",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("working set larger than free memory (raise --memory)"), "{}", stderr(&o));
}

#[test]
fn bench_passes_guest_words_to_every_run_and_names_the_folio_size() {
    if !kvm_available() {
        return;
    }
    let out = temp_path("bench-anon");
    let json = out.join("report.json");
    let o = run(&[
        "bench",
        "--workload",
        "fault",
        "--size",
        "64",
        "--repeat",
        "1",
        "--mmu",
        "both",
        "--cmdline",
        "anon=2m",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_exit(&o, 0);
    assert!(
        stdout(&o).contains("guest: anon=2m (anonymous folio size), command line 'anon=2m'; host backing 4k"),
        "{}",
        stdout(&o)
    );
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!((v["anon"].as_str(), v["cmdline"].as_str()), (Some("2m"), Some("anon=2m")), "{v}");
    assert_eq!(v["backing"], "4k");
    // The modelled walk of a 2 MiB guest page over 4 KiB host pages: 19
    // references for the 2D walk, 4 for the shadow's (4 KiB leaves).
    let refs = |m: usize| v["workloads"][0]["modes"][m]["walk_refs_per_tlb_miss"].as_u64();
    assert_eq!((refs(0), refs(1)), (Some(19), Some(4)), "{v}");
    // The words reached the guest: 64 pages in one THP cost shadow mode a
    // handful of exits in all (a 4 KiB page costs two).
    let shadow = &v["workloads"][0]["modes"][1];
    assert!(shadow["exits_per_op"].as_f64().unwrap() < 0.1, "{shadow}");
    // A word the guest refuses is a usage error naming it; workload= and
    // size= belong to --workload and --size.
    let o = run(&["bench", "--workload", "fault", "--repeat", "1", "--mmu", "ept", "--cmdline", "anon=3m"]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("refused the --cmdline word 'anon=3m'"), "{}", stderr(&o));
    let o = run(&["bench", "--cmdline", "size=3"]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("--cmdline word 'size=3'"), "{}", stderr(&o));
}

/// A minimal `vmm bench` JSON report of one host.
fn bench_json(second_stage: &str, host: &str, modes: &[(&str, f64, f64)]) -> String {
    let modes: Vec<serde_json::Value> = modes
        .iter()
        .map(|&(mmu, t, x)| serde_json::json!({ "mmu": mmu, "ops": 8, "wall_ns_per_op": t, "exits_per_op": x }))
        .collect();
    serde_json::json!({
        "schema": 1,
        "host": host,
        "probe": { "facts": { "second_stage": second_stage } },
        "workloads": [ { "workload": "fork", "modes": modes } ],
    })
    .to_string()
}

#[test]
fn compare_makes_the_three_way_report() {
    let (npt, kvm) = (temp_path("npt.json"), temp_path("kvm.json"));
    std::fs::write(&npt, bench_json("npt", "AMD NPT inside QEMU TCG", &[("ept", 1e6, 0.0), ("shadow", 12e6, 80.0)]))
        .unwrap();
    std::fs::write(
        &kvm,
        bench_json(
            "host-shadow",
            "KVM shadow MMU (npt=0) inside QEMU TCG",
            &[("ept", 4e6, 0.0), ("shadow", 24e6, 80.0)],
        ),
    )
    .unwrap();
    let out = temp_path("three-way");
    let o = run(&["compare", npt.to_str().unwrap(), kvm.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_exit(&o, 0);
    let table = stdout(&o);
    for line in [
        "  npt          AMD NPT inside QEMU TCG",
        "  kvm-shadow   KVM shadow MMU (npt=0) inside QEMU TCG",
        "npt/ept            NPT: ept mode on the NPT host (npt=1)  [baseline]",
        "kvm-shadow/ept     KVM's shadow MMU: ept mode on the KVM-shadow host (npt=0)",
        "fork    kvm-shadow/ept          8     4.00 ms      0.00     ×4.0",
        "fork    npt/shadow              8    12.00 ms     80.00      ×12",
        "fork    kvm-shadow/shadow       8    24.00 ms     80.00      ×24",
    ] {
        assert!(table.contains(line), "missing {line:?} in\n{table}");
    }
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(v["baseline"], "npt/ept");
    let ratios: Vec<f64> = v["workloads"][0]["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["ratio_to_baseline"].as_f64().unwrap())
        .collect();
    assert_eq!(ratios, [1.0, 4.0, 12.0, 24.0]);
    let chart = std::fs::read_to_string(out.join("report.svg")).unwrap();
    assert!(chart.contains("1 = NPT: ept mode on the NPT host"), "the baseline is labelled");
    assert!(chart.contains("kvm-shadow: KVM shadow MMU (npt=0) inside QEMU TCG"), "the host labels are drawn");

    // An unknown baseline is a usage error naming the columns; a file that
    // is not a bench report is refused with its name.
    let o = run(&["compare", npt.to_str().unwrap(), "--baseline", "nope/ept", "--out", out.to_str().unwrap()]);
    assert_exit(&o, 2);
    assert_eq!(error_line(&o), "error: unknown --baseline 'nope/ept': the columns are npt/ept, npt/shadow");
    let junk = temp_path("junk.json");
    std::fs::write(&junk, "{\"schema\": 1}").unwrap();
    let o = run(&["compare", junk.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_exit(&o, 3);
    let want = format!("error: {} is not a vmm bench report", junk.display());
    assert!(error_line(&o).starts_with(&want), "{}", error_line(&o));
}

// ---- `workload=aging`: what page reclaim's accessed-bit harvesting costs
// per pass in each mode (docs/benchmarks.md, docs/pv.md "Page aging"). One
// pass ages a 512-page working set whose hot half (256 pages) was written
// since the last pass, then writes the hot half again; the workload checks
// after every pass that the hot half is active and the cold half inactive.
// Counts are deterministic.

/// Passes measured.
const PASSES: u64 = 4;
/// Pages written between passes.
const HOT: u64 = 256;

/// The measured phase of `workload=aging size=PASSES` (plus `extra`
/// command-line words) in `mmu` mode.
fn aging_phase(mmu: &str, extra: &str) -> serde_json::Value {
    let cmd = format!("workload=aging size={PASSES} {extra}");
    let (o, v) = stats_json(
        &["run", "--mmu", mmu, "--memory", "64M", "--cmdline", cmd.trim()],
        &format!("aging-{mmu}-{}.json", extra.replace('=', "-")),
    );
    assert_exit(&o, 0);
    let b = v["stats"]["bench"][0].clone();
    assert_eq!((b["name"].as_str(), b["ops"].as_u64()), (Some("aging"), Some(PASSES)), "{v}");
    assert_eq!(b["ok"], true, "the workload's self-check failed: {v}");
    b
}

fn aging_exits(b: &serde_json::Value) -> u64 {
    b["exits"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum()
}

fn aging_count(b: &serde_json::Value, key: &str) -> u64 {
    b["shadow"][key].as_u64().unwrap_or_else(|| panic!("no {key}: {b}"))
}

#[test]
fn aging_costs_no_exit_in_ept_mode_and_two_per_re_accessed_page_in_shadow_mode() {
    if !kvm_available() {
        return;
    }
    assert_eq!(aging_exits(&aging_phase("ept", "")), 0);
    let b = aging_phase("shadow", "");
    // Per pass: every cleared A bit is a trapped page-table write (which
    // zaps the shadow leaf), every re-written hot page a hidden fault that
    // sets A again, and the flush of more than 32 pages one LOAD_CR3.
    assert_eq!(aging_count(&b, "pte_writes"), HOT * PASSES, "{b}");
    assert_eq!(b["exits"]["mmio-write:page-table"], HOT * PASSES, "{b}");
    assert_eq!(aging_count(&b, "hidden_faults"), HOT * PASSES, "{b}");
    assert_eq!(aging_count(&b, "cr3_loads"), PASSES, "{b}");
    assert_eq!(aging_exits(&b), (2 * HOT + 1) * PASSES, "{b}");
}

#[test]
fn pv_aging_is_one_sync_for_the_clears_plus_a_fault_per_page_without_harvest() {
    if !kvm_available() {
        return;
    }
    let b = aging_phase("pv", "harvest=off");
    // The pass's clears are one lazy-MMU bracket: one PV_FLUSH applies all
    // 256 queued writes; every re-written hot page still faults A back in.
    assert_eq!(aging_count(&b, "batches"), PASSES, "{b}");
    assert_eq!(aging_count(&b, "batch_entries"), HOT * PASSES, "{b}");
    assert_eq!(aging_count(&b, "hidden_faults"), HOT * PASSES, "{b}");
    assert_eq!(aging_exits(&b), (1 + HOT) * PASSES, "{b}");
    assert!(aging_count(&b, "host_invalidations") <= PASSES, "{b}");
}

#[test]
fn pv_aging_with_harvest_is_one_exit_a_pass_and_no_fault() {
    if !kvm_available() {
        return;
    }
    let b = aging_phase("pv", "");
    // One PV_HARVEST per pass, naming both lists' pages; no entry is
    // written, so nothing is queued, nothing zapped and nothing refaults.
    assert_eq!(aging_count(&b, "harvests"), PASSES, "{b}");
    assert_eq!(aging_count(&b, "harvest_pages"), 512 * PASSES, "{b}");
    assert_eq!(aging_exits(&b), PASSES, "{b}");
    assert_eq!(
        (aging_count(&b, "hidden_faults"), aging_count(&b, "pte_writes"), aging_count(&b, "zaps")),
        (0, 0, 0),
        "{b}"
    );
    assert!(aging_count(&b, "host_invalidations") <= PASSES, "at most one per pass: {b}");
    // The target of issue 19: at most a quarter of trapping shadow's exits.
    let shadow = (2 * HOT + 1) * PASSES;
    assert!(aging_exits(&b) * 4 <= shadow, "{b}");
}
