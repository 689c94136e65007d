//! The subcommands' code: each takes its parsed arguments, drives the VMM
//! library (`vmm::vm`) and the reports of this tree, prints, and returns
//! the process exit code (`vmm::error::exit_code`). Bad input is refused
//! here, before any VM is built, with an error naming the bad word.

use super::{BenchArgs, CompareArgs, InfoArgs, MmuArg, RunArgs, TestArgs};
use guest_abi::MmuMode;
use std::path::Path;
use std::time::Instant;
use vmm::error::exit_code;
use vmm::vm::{KernelSource, Vm, VmConfig};

/// Check before a run that `path` can be written (creating its folder),
/// so that a long run does not end in "cannot write". Leaves no new file
/// behind.
fn check_output(flag: &str, path: &Path) -> Result<(), String> {
    let fail = |e: &dyn std::fmt::Display| format!("{flag} {}: {e}", path.display());
    if path.is_dir() {
        return Err(fail(&"is a folder; give a file name"));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| fail(&format!("cannot create its folder: {e}")))?;
    }
    let existed = path.exists();
    std::fs::OpenOptions::new().append(true).create(true).open(path).map_err(|e| fail(&e))?;
    if !existed {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// [`check_output`] for each path; prints the error and gives the exit code.
fn check_outputs(paths: &[(&str, Option<&Path>)]) -> Result<(), i32> {
    for (flag, path) in paths {
        if let Some(p) = path
            && let Err(e) = check_output(flag, p)
        {
            eprintln!("error: {e}");
            return Err(exit_code::USAGE);
        }
    }
    Ok(())
}

/// Say so when `--shadow-pool` was given but no mode run has a pool.
fn warn_unused_pool(mmu: MmuArg, shadow_pool: Option<u64>) {
    if shadow_pool.is_some() && mmu.modes().iter().all(|m| *m == guest_abi::MmuMode::Ept) {
        eprintln!("warning: --shadow-pool is ignored with --mmu ept (only shadow and pv mode have a shadow pool)");
    }
}

/// `vmm run`.
pub fn run(args: RunArgs, process_start: Instant) -> i32 {
    let mmu = args.mmu.mode();
    if mmu == guest_abi::MmuMode::Ept && args.shadow_pool.is_some() {
        eprintln!("warning: --shadow-pool is ignored with --mmu ept (only shadow and pv mode have a shadow pool)");
    }
    if let Err(code) = check_outputs(&[("--stats-json", args.stats_json.as_deref())]) {
        return code;
    }
    let config = VmConfig {
        kernel: args.kernel.clone().map_or(KernelSource::Bundled, KernelSource::File),
        memory: args.memory,
        mmu,
        backing: args.backing,
        shadow_pool: args.shadow_pool.unwrap_or(vmm::mmu::DEFAULT_SHADOW_POOL),
        cmdline: args.cmdline.clone(),
        timeout: args.timeout,
        process_start,
        vcpus: args.vcpus,
    };
    let mut vm = match Vm::new(config, Box::new(std::io::stdout())) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("error: {e}");
            return e.exit_code();
        }
    };
    let outcome = vm.run();
    if args.stats {
        eprint!("{}", outcome.stats.render());
    }
    let mut explanations = Vec::new();
    for &gva in &args.explain {
        match vm.explain(guest_abi::Gva(gva)) {
            Ok(e) => {
                eprint!("{}", e.render());
                explanations.push(e);
            }
            Err(e) => eprintln!("explain {gva:#x}: {e}"),
        }
    }
    if let Some(path) = &args.stats_json {
        let json = serde_json::json!({
            "schema": 1,
            "stats": outcome.stats,
            "reports": outcome.reports,
            "explain": explanations,
        });
        if let Err(e) = std::fs::write(path, serde_json::to_string_pretty(&json).unwrap_or_default() + "\n") {
            eprintln!("error: cannot write {}: {e}", path.display());
            return exit_code::SETUP;
        }
    }
    match outcome.end {
        Ok(exit) if exit.success() => exit_code::SUCCESS,
        Ok(exit) if exit.refused_cmdline_word(&args.cmdline).is_some() => {
            let e = vmm::Error::GuestCmdline(exit.refused_cmdline_word(&args.cmdline).unwrap_or_default());
            eprintln!("error: {e}");
            e.exit_code()
        }
        Ok(exit) => {
            eprintln!(
                "error: the guest ended with failure status {} (it wrote {:#x} to the exit device)",
                exit.status, exit.value
            );
            exit_code::GUEST_FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

/// `vmm info`.
pub fn info(args: InfoArgs, process_start: Instant) -> i32 {
    let kvm = match vmm::vm::kvm::open() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("error: {e}");
            return e.exit_code();
        }
    };
    let report = super::info::probe(&kvm, args.calibration_loops, process_start);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    } else {
        print!("{}", report.render());
    }
    if report.calibration.is_some() { exit_code::SUCCESS } else { exit_code::GUEST_CRASH }
}

/// The prefix of the SMP suites' names, which `vmm test` runs again on two
/// vCPUs.
const SMP_SUITES: &str = "smp::";

/// `vmm test`.
pub fn test(args: TestArgs, process_start: Instant) -> i32 {
    if let Err(code) = check_outputs(&[("--json", args.json.as_deref())]) {
        return code;
    }
    warn_unused_pool(args.mmu, args.shadow_pool);
    let mut stdout = std::io::stdout();
    let mut modes = Vec::new();
    let selected = args.mmu.modes();
    let smp = args.vcpus.unwrap_or(1);
    // Several vCPUs run in the modes `vmm::vm::smp_supported` names: a
    // lone other mode is refused; with several modes, the others run on
    // one vCPU.
    if smp > 1 && !selected.iter().any(|&m| vmm::vm::smp_supported(m)) {
        let e = vmm::Error::SmpUnsupported { mode: selected[0].name(), vcpus: smp };
        eprintln!("error: {e}");
        return exit_code::USAGE;
    }
    if smp > 1 && selected.iter().any(|&m| !vmm::vm::smp_supported(m)) {
        let one: Vec<&str> = selected.iter().filter(|&&m| !vmm::vm::smp_supported(m)).map(|m| m.name()).collect();
        println!("note: {} run(s) on one vCPU (SMP in that mode is not built yet)", one.join(", "));
    }
    let config_for = |mmu: MmuMode, vcpus: u32| VmConfig {
        kernel: args.kernel.clone().map_or(KernelSource::Bundled, KernelSource::File),
        memory: args.memory,
        mmu,
        backing: ept::Backing::Anon4k,
        shadow_pool: args.shadow_pool.unwrap_or(vmm::mmu::DEFAULT_SHADOW_POOL),
        cmdline: args.cmdline.clone(),
        timeout: args.timeout,
        process_start,
        vcpus,
    };
    for mmu in selected.iter().copied() {
        let config = config_for(mmu, if vmm::vm::smp_supported(mmu) { smp } else { 1 });
        match super::guest_tests::run_mode(config, &args.filter, &mut stdout) {
            Ok(r) => modes.push(r),
            Err(e) => {
                eprintln!("error: {e}");
                return e.exit_code();
            }
        }
    }
    // With several modes, every mode must give the first one's verdicts
    // and access-matrix records (ept first: the host's MMU is the
    // reference). Before issue 22 only exactly two modes were compared.
    let mut disagreements = 0;
    if let Some((reference, others)) = modes.split_first() {
        for other in others {
            for line in super::guest_tests::disagreements(reference, other) {
                disagreements += 1;
                println!("{line}");
            }
        }
    }
    // By default the SMP suites run a second time in every selected mode,
    // on two vCPUs (a second boot per mode: the other suites stay on one,
    // which keeps the default run short on a small host — docs/testing.md
    // has the measured cost).
    let smp_filter = SMP_SUITES.contains(args.filter.as_str()) || args.filter.contains(SMP_SUITES);
    if args.vcpus.is_none() && smp_filter {
        let filter = if args.filter.len() > SMP_SUITES.len() { args.filter.as_str() } else { SMP_SUITES };
        for mmu in selected.iter().copied() {
            // (Not after a run of that mode that ended early: it would
            // only end early too.)
            if !modes.iter().any(|m| m.mmu == mmu.name() && m.error.is_none()) || !vmm::vm::smp_supported(mmu) {
                continue;
            }
            match super::guest_tests::run_mode(config_for(mmu, 2), filter, &mut stdout) {
                Ok(r) => modes.push(r),
                Err(e) => {
                    eprintln!("error: {e}");
                    return e.exit_code();
                }
            }
        }
    }
    // A filter that matches nothing is a typo, not a success.
    if modes.iter().all(|m| m.tests.is_empty() && m.error.is_none() && m.guest_success) {
        if args.filter.is_empty() {
            eprintln!("error: the guest kernel ran no tests (does it speak the test protocol?)");
            return exit_code::GUEST_FAILURE;
        }
        eprintln!("error: no in-guest test name contains '{}' (--filter)", args.filter);
        return exit_code::USAGE;
    }
    let passed: usize = modes.iter().map(|m| m.passed()).sum();
    let failed: usize = modes.iter().map(|m| m.failed()).sum::<usize>() + disagreements;
    println!("{passed} passed, {failed} failed");
    if let Some(path) = &args.json {
        // The host, from evidence only (no calibration run): the nested
        // label (e.g. "AMD NPT inside QEMU TCG — ...") or the second stage.
        let stage = ept::probe::second_stage();
        let host = ept::probe::identity().nested_label(stage).unwrap_or_else(|| stage.describe().to_string());
        let json = serde_json::json!({ "schema": 1, "host": host, "modes": modes, "passed": passed, "failed": failed });
        if let Err(e) = std::fs::write(path, serde_json::to_string_pretty(&json).unwrap_or_default() + "\n") {
            eprintln!("error: cannot write {}: {e}", path.display());
            return exit_code::SETUP;
        }
    }
    if failed == 0 { exit_code::SUCCESS } else { exit_code::GUEST_FAILURE }
}

/// `vmm bench`.
pub fn bench(args: BenchArgs, process_start: Instant) -> i32 {
    warn_unused_pool(args.mmu, args.shadow_pool);
    let mut workloads = Vec::new();
    let names: Vec<String> = if args.workloads.is_empty() {
        super::bench::WORKLOADS.iter().map(|(n, _)| n.to_string()).collect()
    } else {
        args.workloads.clone()
    };
    for n in names {
        match super::bench::WORKLOADS.iter().find(|(w, _)| *w == n) {
            Some((_, default)) => workloads.push((n, args.size.unwrap_or(*default))),
            None => {
                let known: Vec<&str> = super::bench::WORKLOADS.iter().map(|(w, _)| *w).collect();
                eprintln!("error: unknown workload '{n}' ({})", known.join(", "));
                return exit_code::USAGE;
            }
        }
    }
    if let Some(w) =
        args.cmdline.split_ascii_whitespace().find(|w| w.starts_with("workload=") || w.starts_with("size="))
    {
        eprintln!("error: --cmdline word '{w}': the workload and its size are given with --workload and --size");
        return exit_code::USAGE;
    }
    let charted = matches!(args.mmu, MmuArg::Both | MmuArg::All);
    if args.svg.is_some() && !charted {
        eprintln!("error: --svg charts shadow against ept: it needs --mmu all or --mmu both");
        return exit_code::USAGE;
    }
    let json = args.json.clone().unwrap_or_else(|| args.out.join("report.json"));
    let svg = args.svg.clone().or_else(|| charted.then(|| args.out.join("report.svg")));
    let json_flag = if args.json.is_some() { "--json" } else { "--out" };
    let svg_flag = if args.svg.is_some() { "--svg" } else { "--out" };
    if let Err(code) = check_outputs(&[(json_flag, Some(&json)), (svg_flag, svg.as_deref())]) {
        return code;
    }
    let kvm = match vmm::vm::kvm::open() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("error: {e}");
            return e.exit_code();
        }
    };
    let probe = super::info::probe(&kvm, 20_000, process_start);
    let most = args.vcpus.iter().copied().max().unwrap_or(1);
    if most > 1
        && let Some(mode) = args.mmu.modes().into_iter().find(|&m| !vmm::vm::smp_supported(m))
    {
        eprintln!("error: {}", vmm::Error::SmpUnsupported { mode: mode.name(), vcpus: most });
        return exit_code::USAGE;
    }
    let mut vcpus = args.vcpus.clone();
    vcpus.dedup();
    let plan = super::bench::BenchPlan {
        vcpus,
        workloads,
        modes: args.mmu.modes(),
        repeat: args.repeat.max(1),
        memory: args.memory,
        shadow_pool: args.shadow_pool.unwrap_or(vmm::mmu::DEFAULT_SHADOW_POOL),
        cmdline: args.cmdline.split_ascii_whitespace().collect::<Vec<_>>().join(" "),
        backing: args.backing,
        process_start,
    };
    let total = (plan.workloads.len() * plan.modes.len() * plan.vcpus.len() * (plan.repeat as usize + 1)) as u64;
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    let report = super::bench::run(&plan, probe, |msg| {
        bar.set_message(msg.to_string());
        bar.inc(1);
    });
    bar.finish_and_clear();
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return if e.contains(super::bench::REFUSED_WORD) { exit_code::USAGE } else { exit_code::GUEST_FAILURE };
        }
    };
    print!("{}", report.render());
    // A chart from an earlier run must not sit beside this run's report.
    let stale_svg = args.out.join("report.svg");
    if svg.is_none() && args.json.is_none() && stale_svg.exists() {
        match std::fs::remove_file(&stale_svg) {
            Ok(()) => eprintln!("removed {} (an earlier run's chart; this run has one mode)", stale_svg.display()),
            Err(e) => eprintln!("warning: cannot remove the earlier chart {}: {e}", stale_svg.display()),
        }
    }
    for path in [Some(&json), svg.as_ref()].into_iter().flatten() {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && let Err(e) = std::fs::create_dir_all(dir)
        {
            eprintln!("error: cannot create {}: {e}", dir.display());
            return exit_code::SETUP;
        }
    }
    if let Err(e) = std::fs::write(&json, serde_json::to_string_pretty(&report).unwrap_or_default() + "\n") {
        eprintln!("error: cannot write {}: {e}", json.display());
        return exit_code::SETUP;
    }
    let mut written = vec![json.display().to_string()];
    if let Some(svg) = &svg {
        if let Err(e) = report.write_svg(svg) {
            eprintln!("error: cannot write {}: {e}", svg.display());
            return exit_code::SETUP;
        }
        written.push(svg.display().to_string());
    }
    eprintln!("wrote {}", written.join(", "));
    exit_code::SUCCESS
}

/// `vmm compare`.
pub fn compare(args: CompareArgs) -> i32 {
    let report = match super::compare::compare(&args.reports, args.baseline.as_deref()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return match e {
                super::compare::CompareError::Usage(_) => exit_code::USAGE,
                super::compare::CompareError::Input(_) => exit_code::SETUP,
            };
        }
    };
    let json = args.json.clone().unwrap_or_else(|| args.out.join("report.json"));
    let svg = args.svg.clone().unwrap_or_else(|| args.out.join("report.svg"));
    for path in [&json, &svg] {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && let Err(e) = std::fs::create_dir_all(dir)
        {
            eprintln!("error: cannot create {}: {e}", dir.display());
            return exit_code::SETUP;
        }
    }
    print!("{}", report.render());
    if let Err(e) = std::fs::write(&json, serde_json::to_string_pretty(&report).unwrap_or_default() + "\n") {
        eprintln!("error: cannot write {}: {e}", json.display());
        return exit_code::SETUP;
    }
    let mut written = vec![json.display().to_string()];
    if report.columns.len() > 1 {
        if let Err(e) = report.write_svg(&svg) {
            eprintln!("error: cannot write {}: {e}", svg.display());
            return exit_code::SETUP;
        }
        written.push(svg.display().to_string());
    }
    eprintln!("wrote {}", written.join(", "));
    exit_code::SUCCESS
}
