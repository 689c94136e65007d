//! A hostile or broken guest must not make the VMM grow without bound,
//! print without bound, or hold the run past its timeout; and explaining
//! the guest must not change it. Each test provokes that with one of the
//! bundled kernel's `crash=` modes (guest/kernel/src/crash.rs).

mod common;
use common::*;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The count in a `name: ... N what` phrase of the guest's output.
fn count_before(text: &str, what: &str) -> u64 {
    let at = text.find(what).unwrap_or_else(|| panic!("no {what:?} in {text}"));
    text[..at].split_whitespace().last().unwrap().trim_end_matches(',').parse().unwrap()
}

#[test]
fn a_report_flood_keeps_a_bounded_number_and_says_so_once() {
    if !kvm_available() {
        return;
    }
    let json = temp_path("flood.json");
    let o = run(&["run", "--memory", "64M", "--cmdline", "crash=report-flood", "--stats-json", json.to_str().unwrap()]);
    assert_exit(&o, 0);
    let out = stdout(&o);
    // Ten times the 4 MiB budget in records of 4 KiB.
    assert_eq!(count_before(&out, "sent"), 10240, "{out}");
    let (accepted, refused) = (count_before(&out, "accepted"), count_before(&out, "refused"));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    // The boot record plus the accepted ones are kept; every refusal is counted.
    assert_eq!(v["reports"].as_array().unwrap().len() as u64, accepted + 1, "{out}");
    assert_eq!(v["stats"]["reports_dropped"].as_u64(), Some(refused), "{out}");
    assert_eq!(accepted, 1008, "4 MiB / (4096 B + the parsed record): {out}");
    let err = stderr(&o);
    assert_eq!(err.matches("REPORT records").count(), 1, "said once: {err}");
}

#[test]
fn an_explain_flood_prints_a_bounded_number_and_says_so_once() {
    if !kvm_available() {
        return;
    }
    let (o, v) = stats_json(&["run", "--memory", "64M", "--cmdline", "crash=explain-flood"], "explain-flood.json");
    assert_exit(&o, 0);
    assert!(stdout(&o).contains("explain flood: 640 calls, 0 wrong answers"), "{}", stdout(&o));
    let err = stderr(&o);
    assert_eq!(err.matches("explain GVA").count(), 64, "{err}");
    assert_eq!(err.matches("more than 64 EXPLAIN outputs").count(), 1, "{err}");
    assert_eq!(v["stats"]["explain_suppressed"], 576, "{v}");
}

#[test]
fn the_timeout_holds_when_stdout_is_blocked() {
    if !kvm_available() {
        return;
    }
    // The guest prints forever into a pipe nobody reads: it fills after
    // 64 KiB. The run must still end at its timeout.
    let start = Instant::now();
    let mut child = vmm()
        .args(["run", "--memory", "64M", "--timeout", "3s", "--cmdline", "crash=chatter"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm");
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        // Far beyond 3 s plus the grace: only a VMM stuck on the pipe gets here.
        if start.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let status = status.expect("the VMM was still running 90 s into a 3 s timeout: it blocked on stdout");
    assert_eq!(status.code(), Some(5));
    let mut err = String::new();
    use std::io::Read;
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(err.contains("error: timeout: the guest was still running after 3s"), "{err}");
    assert!(err.contains("bytes of guest console output were not written"), "{err}");
}

#[test]
fn halting_with_interrupts_enabled_is_not_called_disabled() {
    if !kvm_available() {
        return;
    }
    let o = run(&["run", "--memory", "64M", "--cmdline", "crash=sti-hlt"]);
    assert_exit(&o, 4);
    let line = error_line(&o);
    assert!(line.contains("halted with interrupts enabled"), "{line}");
    let o = run(&["run", "--memory", "64M", "--cmdline", "crash=hlt"]);
    assert_exit(&o, 4);
    assert!(error_line(&o).contains("halted with interrupts disabled"), "{}", error_line(&o));
}

/// The rendered explanations on stderr, one string each.
fn explanations(err: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for l in err.lines() {
        if l.starts_with("explain GVA") {
            out.push(String::new());
        }
        if let Some(last) = out.last_mut()
            && !l.trim_start().starts_with("HPA")
        {
            last.push_str(l);
            last.push('\n');
        }
    }
    out
}

#[test]
fn explaining_does_not_set_accessed_bits() {
    if !kvm_available() {
        return;
    }
    for mmu in ["ept", "shadow"] {
        // The identity map's entries: set up by the VMM, never used by the
        // guest (it runs in the kernel window), so their A bits are clear.
        let o = run(&["run", "--memory", "64M", "--mmu", mmu, "--explain", "0x1000", "--explain", "0x1000"]);
        assert_exit(&o, 0);
        let e = explanations(&stderr(&o));
        assert_eq!(e.len(), 2, "{}", stderr(&o));
        assert_eq!(e[0], e[1], "{mmu}: the second explanation differs from the first");
        if mmu == "ept" {
            assert!(e[0].lines().any(|l| l.contains("PML4") && !l.contains(" A")), "{}", e[0]);
        }
    }
}

/// Issue 22, item 4: a guest `lgdt` from unbacked memory in ept mode made
/// the host's emulator exit with the same MMIO read at the same RIP with
/// the same registers, over and over (373,369 times in 3 s), until
/// `--timeout`. The VMM now ends the run at once, exit 4, naming the
/// instruction.
#[test]
fn an_instruction_that_exits_the_same_way_forever_ends_the_run_at_once() {
    if !kvm_available() {
        return;
    }
    let start = Instant::now();
    let o = run(&["run", "--mmu", "ept", "--memory", "64M", "--cmdline", "crash=lgdt-unbacked", "--timeout", "60s"]);
    assert_exit(&o, 4);
    let err = error_line(&o);
    assert!(
        err.starts_with("error: the guest makes no progress at rip=")
            && err.contains("`lgdt [")
            && err.contains("times in a row as the same MMIO read of unbacked GPA 0x4001000"),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(30), "ended by the timeout, not at once");
    // A guest that spins on purpose is still left to --timeout (exit 5).
    let o = run(&["run", "--memory", "64M", "--cmdline", "crash=hang", "--timeout", "2s"]);
    assert_exit(&o, 5);
}

/// Issue 22, item 1: `PV_SETUP` of an area inside the page-table zone or
/// over the VMM's boot tables was answered OK, and the VMM then wrote its
/// area over guest page tables behind the shadow's back. It is refused
/// with `ERR_OVERLAP` (guest_abi::hypercall).
#[test]
fn a_pv_area_over_shadowed_page_tables_is_refused() {
    if !kvm_available() {
        return;
    }
    for (word, at) in [("pv-area-zone", "0x1000000"), ("pv-area-boot-tables", "0xa000")] {
        let cmdline = format!("crash={word}");
        let o = run(&["run", "--mmu", "pv", "--memory", "64M", "--cmdline", &cmdline]);
        let out = stdout(&o);
        assert!(out.contains(&format!("PV_SETUP({at}) refused")), "{word}: {out}");
        assert_exit(&o, 0);
    }
}

/// Issue 22, item 2: a refused write-queue entry was reported only by
/// `PV_FLUSH`; at `LOAD_CR3` (and the other sync points) the entries from
/// it on were dropped without a word to the guest. Now every sync point
/// answers the batch error, and the VMM's warning has its own name and
/// budget (not "SHADOW_FAULTs the VMM could not handle").
#[test]
fn a_refused_queue_entry_is_reported_at_every_sync_point() {
    if !kvm_available() {
        return;
    }
    let (o, v) =
        stats_json(&["run", "--mmu", "pv", "--memory", "64M", "--cmdline", "crash=pv-bad-queue"], "bad-queue.json");
    let out = stdout(&o);
    assert!(out.contains("4 of 4 sync points reported the refused entry"), "{out}");
    assert_exit(&o, 0);
    assert_eq!(v["stats"]["shadow"]["pv_refused"], 4, "{v}");
    let err = stderr(&o);
    assert_eq!(err.matches("pv write queue refused").count(), 4, "{err}");
    for at in ["LOAD_CR3", "SHADOW_FAULT", "FLUSH_TLB", "PV_FLUSH"] {
        assert!(err.contains(&format!("pv write queue refused at {at}")), "{at}: {err}");
    }
    assert!(!err.contains("SHADOW_FAULTs the VMM could not handle"), "{err}");
}

/// Issue 22, item 3: a ring-0 guest that clears CR0.WP with its own
/// `mov cr0` (nothing exits) and does not report it with `FLUSH_TLB`
/// wrote through read-only shadow leaves, and its entries never got the D
/// bit hardware sets. The VMM now notices at the next exit (WP found clear)
/// or at the next pool check (the D bit the write left in the shadow leaf)
/// and sets D in the guest's entry.
#[test]
fn writes_under_an_unreported_cr0_wp_0_still_set_the_dirty_bit() {
    if !kvm_available() {
        return;
    }
    for mmu in ["shadow", "pv"] {
        let (o, v) = stats_json(
            &["run", "--mmu", mmu, "--memory", "64M", "--cmdline", "crash=wp-off-silent"],
            &format!("wp-off-{mmu}.json"),
        );
        let out = stdout(&o);
        assert!(out.contains("(a) WP set again before the exit: D 1; (b) WP clear at the exit: D 1"), "{mmu}: {out}");
        assert_exit(&o, 0);
        let sh = &v["stats"]["shadow"];
        assert_eq!(sh["stats"]["wp_off_dirty"], 2, "{mmu}: {v}");
        assert_eq!(sh["wp_cleared_silently"], 1, "{mmu}: {v}");
    }
}
