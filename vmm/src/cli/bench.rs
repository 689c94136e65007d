//! `vmm bench`: the same workloads under ept, shadow and pv paging, side by
//! side (docs/architecture.md, "Workloads").
//!
//! Every run is a fresh VM. Per workload and mode: one warm-up run (thrown
//! away), then `--repeat` measured runs; every figure is the median over
//! them. Counts (exits, hidden faults, PTE-write traps, CR3 loads) are
//! deterministic; times are not, and on an emulating host they are
//! emulation times — the report's first line says which kind of host made
//! it (the `vmm info` probe).

use crate::cli::info::HostReport;
use guest_abi::MmuMode;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};
use vmm::stats::BenchPhase;
use vmm::vm::{Vm, VmConfig};

/// The workloads, in report order, with their default sizes: small enough
/// to finish in seconds under emulation, big enough to amortise setup.
pub const WORKLOADS: [(&str, u64); 8] = [
    ("fault", 256),
    ("fork", 8),
    ("ctxsw", 256),
    ("mmap", 32),
    ("tlb", 2000),
    ("alloc", 500),
    ("aging", 8),
    ("shootdown", 32),
];

/// JSON schema version of the report (new keys may be added within one).
pub const SCHEMA: u32 = 1;

/// What a failed run's message says when the guest refused a `--cmdline`
/// word (the caller's usage error, not the guest's failure).
pub const REFUSED_WORD: &str = "the guest kernel refused the --cmdline word";

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchPlan {
    /// Workloads with their sizes.
    pub workloads: Vec<(String, u64)>,
    /// Modes.
    pub modes: Vec<MmuMode>,
    /// Measured runs per workload and mode.
    pub repeat: u32,
    /// Guest RAM.
    pub memory: u64,
    /// Shadow pool.
    pub shadow_pool: u64,
    /// Extra guest command-line words for every run (`--cmdline`).
    pub cmdline: String,
    /// Host memory behind guest RAM (`--backing`).
    pub backing: ept::Backing,
    /// When the process started.
    pub process_start: Instant,
    /// vCPU counts: every workload and mode runs at each.
    pub vcpus: Vec<u32>,
}

/// Medians of one workload in one mode, per operation.
#[derive(Debug, Clone, Serialize)]
pub struct ModeFigures {
    /// `ept`, `shadow` or `pv`.
    pub mmu: &'static str,
    /// vCPUs of the runs (the workloads measure on vCPU 0; `shootdown`
    /// makes the others readers).
    pub vcpus: u32,
    /// Operations per run.
    pub ops: u64,
    /// Host wall time per operation, ns.
    pub wall_ns_per_op: f64,
    /// Guest TSC cycles per operation.
    pub cycles_per_op: f64,
    /// VM exits per operation, all reasons.
    pub exits_per_op: f64,
    /// VM exits per operation by reason.
    pub exits_by_reason: BTreeMap<String, f64>,
    /// Hidden faults per operation (shadow).
    pub hidden_faults_per_op: f64,
    /// Faults passed to the guest per operation (shadow).
    pub guest_faults_per_op: f64,
    /// PTE-write traps per operation (shadow).
    pub pte_writes_per_op: f64,
    /// CR3 loads through the VMM per operation (shadow).
    pub cr3_loads_per_op: f64,
    /// Host invalidations per operation (shadow).
    pub host_invalidations_per_op: f64,
    /// Paravirtual remote TLB flushes (`PV_FLUSH_REMOTE`) per operation
    /// (pv mode on several vCPUs: a shootdown each).
    pub remote_flushes_per_op: f64,
    /// VMM time in shadow handlers per operation, ns.
    pub vmm_handler_ns_per_op: f64,
    /// Memory references of one TLB miss, as modelled (`ept::walk`): a 2D
    /// walk (ept) or one walk of the shadow tables (shadow, pv), for the
    /// run's guest page (2 MiB at `anon=2m`, else 4 KiB) over its host
    /// backing's page (24 and 4 at 4 KiB over 4 KiB).
    pub walk_refs_per_tlb_miss: u32,
    /// Runs measured.
    pub runs: u32,
}

/// One workload in every mode.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadReport {
    /// Name.
    pub workload: String,
    /// Per mode.
    pub modes: Vec<ModeFigures>,
    /// shadow/ept of wall time per op, when both ran.
    pub time_ratio: Option<f64>,
    /// shadow/ept of guest cycles per op.
    pub cycles_ratio: Option<f64>,
    /// shadow − ept exits per op (ept is 0 on every workload).
    pub extra_exits_per_op: Option<f64>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// [`SCHEMA`].
    pub schema: u32,
    /// The host probe's one-line description (its headline without the
    /// `host: ` prefix).
    pub host: String,
    /// The host probe.
    pub probe: HostReport,
    /// The extra guest command-line words of every run (`--cmdline`; empty
    /// when none).
    pub cmdline: String,
    /// The anonymous folio size the guest ran with (`anon=`; `4k` unless
    /// the command line said otherwise).
    pub anon: String,
    /// The host backing of guest RAM (`--backing`: `4k`, `thp`,
    /// `hugetlb-2m`, `hugetlb-1g`).
    pub backing: String,
    /// Per workload.
    pub workloads: Vec<WorkloadReport>,
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// Run one workload once; its measured phase.
pub fn run_once(plan: &BenchPlan, workload: &str, size: u64, mmu: MmuMode, vcpus: u32) -> Result<BenchPhase, String> {
    let config = VmConfig {
        shadow_pool: plan.shadow_pool,
        backing: plan.backing,
        cmdline: format!("{} workload={workload} size={size}", plan.cmdline).trim_start().to_string(),
        timeout: Duration::from_secs(600),
        process_start: plan.process_start,
        vcpus,
        ..VmConfig::bundled(plan.memory, mmu)
    };
    let cmdline = config.cmdline.clone();
    let console = ConsoleTail::default();
    let mut vm = Vm::new(config, Box::new(console.clone())).map_err(|e| e.to_string())?;
    let outcome = vm.run();
    if let Ok(exit) = &outcome.end
        && let Some(word) = exit.refused_cmdline_word(&cmdline)
    {
        return Err(format!("{REFUSED_WORD} '{word}'"));
    }
    match outcome.end {
        Ok(exit) if exit.success() => {}
        Ok(exit) => return Err(format!("the guest failed (status {}){}", exit.status, console.last_line_note())),
        Err(e) => return Err(e.to_string()),
    }
    let phase = outcome.stats.bench.into_iter().next().ok_or("the workload reported no measured phase")?;
    if !phase.ok {
        return Err("the workload's self-check failed".into());
    }
    Ok(phase)
}

/// The end of a bench run's console, kept so that a failed run can say
/// why: the guest's last line (e.g. "workload tlb failed: out of
/// memory"). Bounded: only the last [`ConsoleTail::KEEP`] bytes stay.
#[derive(Clone, Default)]
struct ConsoleTail(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl ConsoleTail {
    const KEEP: usize = 512;

    /// `": LAST LINE"` of the console, or nothing when it printed none.
    fn last_line_note(&self) -> String {
        let buf = self.0.lock().map(|b| b.clone()).unwrap_or_default();
        let text = String::from_utf8_lossy(&buf);
        match text.lines().rev().map(str::trim).find(|l| !l.is_empty()) {
            Some(line) => format!(": {line}"),
            None => String::new(),
        }
    }
}

impl std::io::Write for ConsoleTail {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut buf) = self.0.lock() {
            buf.extend_from_slice(data);
            let excess = buf.len().saturating_sub(Self::KEEP);
            buf.drain(..excess);
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The guest page size the `anon=` word of `cmdline` gives user memory
/// (the first such word, as the guest reads it): 2 MiB for `2m`, else
/// 4 KiB (16 and 64 KiB folios are mapped as 4 KiB PTEs).
fn anon_of(cmdline: &str) -> &str {
    cmdline.split_ascii_whitespace().find_map(|w| w.strip_prefix("anon=")).unwrap_or("4k")
}

fn guest_page(anon: &str) -> u64 {
    if anon == "2m" { 2 << 20 } else { 4096 }
}

fn figures(mmu: MmuMode, vcpus: u32, phases: &[BenchPhase], guest_page: u64, host_page: u64) -> ModeFigures {
    let per = |f: &dyn Fn(&BenchPhase) -> f64| {
        let mut v: Vec<f64> = phases.iter().map(|p| f(p) / p.ops.max(1) as f64).collect();
        median(&mut v)
    };
    let sh = |f: fn(&shadow::ShadowStats) -> u64| move |p: &BenchPhase| p.shadow.as_ref().map_or(0.0, |s| f(s) as f64);
    let mut reasons: BTreeMap<String, f64> = BTreeMap::new();
    for (r, _) in phases.iter().flat_map(|p| p.exits.iter()) {
        reasons.entry(r.name().to_string()).or_insert_with(|| per(&|p: &BenchPhase| p.exits.get(r) as f64));
    }
    ModeFigures {
        mmu: mmu.name(),
        vcpus,
        ops: phases.first().map_or(0, |p| p.ops),
        wall_ns_per_op: per(&|p| p.wall.as_nanos() as f64),
        cycles_per_op: per(&|p| p.cycles as f64),
        exits_per_op: per(&|p| p.total_exits() as f64),
        exits_by_reason: reasons,
        hidden_faults_per_op: per(&sh(|s| s.hidden_faults)),
        guest_faults_per_op: per(&sh(|s| s.guest_faults)),
        pte_writes_per_op: per(&sh(|s| s.pte_writes)),
        cr3_loads_per_op: per(&sh(|s| s.cr3_loads)),
        host_invalidations_per_op: per(&sh(|s| s.host_invalidations)),
        remote_flushes_per_op: per(&sh(|s| s.remote_flushes)),
        vmm_handler_ns_per_op: per(&|p| p.shadow_handler_time.map_or(0.0, |d| d.as_nanos() as f64)),
        walk_refs_per_tlb_miss: match mmu {
            MmuMode::Ept => ept::walk::walk_cost(guest_page, host_page).nested,
            MmuMode::Shadow | MmuMode::Pv => ept::walk::walk_cost(guest_page, host_page).shadow,
        },
        runs: phases.len() as u32,
    }
}

/// Run the plan. `progress` is told each run as it starts.
pub fn run(plan: &BenchPlan, probe: HostReport, mut progress: impl FnMut(&str)) -> Result<BenchReport, String> {
    let mut workloads = Vec::new();
    for (name, size) in &plan.workloads {
        let mut modes = Vec::new();
        for &mmu in &plan.modes {
            for &n in &plan.vcpus {
                let what = format!("{name} ({}, {n} vCPU{})", mmu.name(), if n == 1 { "" } else { "s" });
                let fail = |e: String| format!("{name} in {} mode at {n} vCPUs: {e}", mmu.name());
                progress(&format!("{what} warm-up"));
                run_once(plan, name, *size, mmu, n).map_err(fail)?;
                let mut phases = Vec::new();
                for r in 0..plan.repeat {
                    progress(&format!("{what} run {}/{}", r + 1, plan.repeat));
                    phases.push(run_once(plan, name, *size, mmu, n).map_err(fail)?);
                }
                modes.push(figures(mmu, n, &phases, guest_page(anon_of(&plan.cmdline)), plan.backing.alignment()));
            }
        }
        // The ratios compare the first vCPU count's runs.
        let find = |m: &str| modes.iter().find(|f| f.mmu == m);
        let (time_ratio, cycles_ratio, extra_exits_per_op) = match (find("ept"), find("shadow")) {
            (Some(e), Some(s)) => (
                Some(s.wall_ns_per_op / e.wall_ns_per_op.max(1e-9)),
                Some(s.cycles_per_op / e.cycles_per_op.max(1e-9)),
                Some(s.exits_per_op - e.exits_per_op),
            ),
            _ => (None, None, None),
        };
        workloads.push(WorkloadReport { workload: name.clone(), modes, time_ratio, cycles_ratio, extra_exits_per_op });
    }
    Ok(BenchReport {
        schema: SCHEMA,
        host: probe.summary(),
        probe,
        cmdline: plan.cmdline.clone(),
        anon: anon_of(&plan.cmdline).to_string(),
        backing: plan.backing.to_string(),
        workloads,
    })
}

impl BenchReport {
    /// The terminal table.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "host: {}", self.host);
        if let Some(note) = self.emulation_note() {
            let _ = writeln!(s, "{note}");
        }
        let _ = writeln!(
            s,
            "guest: anon={} (anonymous folio size), command line '{}'; host backing {}",
            self.anon, self.cmdline, self.backing
        );
        let _ = writeln!(
            s,
            "{:<7} {:<6} {:>6} {:>12} {:>12} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>10} {:>6}",
            "work",
            "mmu",
            "ops",
            "wall ns/op",
            "cycles/op",
            "exits/op",
            "hidden",
            "guestpf",
            "pte-wr",
            "cr3",
            "hinv",
            "rflush",
            "vmm ns/op",
            "walk"
        );
        let several = self.workloads.iter().flat_map(|w| &w.modes).any(|m| m.vcpus > 1);
        for w in &self.workloads {
            for m in &w.modes {
                let _ = writeln!(
                    s,
                    "{:<7} {:<6} {:>6} {:>12.0} {:>12.0} {:>9.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>7.2} {:>10.0} {:>6}",
                    w.workload,
                    if several { format!("{}@{}", m.mmu, m.vcpus) } else { m.mmu.to_string() },
                    m.ops,
                    m.wall_ns_per_op,
                    m.cycles_per_op,
                    m.exits_per_op,
                    m.hidden_faults_per_op,
                    m.guest_faults_per_op,
                    m.pte_writes_per_op,
                    m.cr3_loads_per_op,
                    m.host_invalidations_per_op,
                    m.remote_flushes_per_op,
                    m.vmm_handler_ns_per_op,
                    m.walk_refs_per_tlb_miss
                );
            }
            // Every mode against ept (the JSON keeps shadow/ept in its
            // ratio fields; the per-mode figures carry the rest).
            for ept in w.modes.iter().filter(|m| m.mmu == "ept") {
                for m in w.modes.iter().filter(|m| m.mmu != "ept" && m.vcpus == ept.vcpus) {
                    let t = m.wall_ns_per_op / ept.wall_ns_per_op;
                    let c = m.cycles_per_op / ept.cycles_per_op;
                    let x = m.exits_per_op - ept.exits_per_op;
                    let at = if several { format!(" at {} vCPUs", m.vcpus) } else { String::new() };
                    let _ = writeln!(
                        s,
                        "{:<7} {}/ept{at}: wall time x{t:.2}, guest cycles x{c:.2}, +{x:.2} exits per op",
                        w.workload, m.mmu
                    );
                }
            }
        }
        let _ = writeln!(
            s,
            "per op = per workload operation (median of runs); hidden/guestpf/pte-wr/cr3/hinv = shadow-MMU events (hinv: host invalidations, which depend on the host); rflush = pv remote flushes (PV_FLUSH_REMOTE); mmu@N = at N vCPUs; walk = modelled memory references per TLB miss (guest page: 2 MiB at anon=2m, else 4 KiB; over the host backing's page)"
        );
        s
    }

    /// On a host the probe calls emulating, the one line that says the
    /// ratios mean nothing there and where to get meaningful ones.
    pub fn emulation_note(&self) -> Option<&'static str> {
        (self.probe.verdict == crate::cli::info::Verdict::Emulating).then_some(
            "note: every mode is emulated instruction by instruction here, so the ratios to ept carry no meaning on this host; `scripts/nested.sh --three-way` gives the nested three-way report (NPT, KVM's shadow MMU, ours)",
        )
    }

    /// Write the SVG chart: per workload, the shadow/ept ratio of wall time
    /// and of guest cycles, and 1 + shadow's extra exits per op (ept takes
    /// none), on a log scale around the baseline 1 = ept mode.
    pub fn write_svg(&self, path: &std::path::Path) -> Result<(), String> {
        let rows: Vec<&WorkloadReport> = self.workloads.iter().filter(|w| w.time_ratio.is_some()).collect();
        if rows.is_empty() {
            return Err("the chart needs both modes (--mmu both)".into());
        }
        let values = |f: &dyn Fn(&WorkloadReport) -> Option<f64>| rows.iter().map(|w| f(w)).collect::<Vec<_>>();
        use crate::cli::chart::Series;
        let mut hosts = vec![format!("host: {}", self.host)];
        if let Some(note) = self.emulation_note() {
            hosts.push(note.to_string());
        }
        crate::cli::chart::RatioChart {
            title: "shadow paging vs EPT: cost per operation, shadow / ept (log scale)".into(),
            hosts,
            baseline: "ept mode".into(),
            y_desc: "shadow / ept".into(),
            groups: rows.iter().map(|w| w.workload.clone()).collect(),
            series: vec![
                Series::ratios("wall time", values(&|w| w.time_ratio)),
                Series::ratios("guest cycles", values(&|w| w.cycles_ratio)),
                Series {
                    label: "1 + extra exits per op (ept takes none; the bar says +extra)".into(),
                    values: values(&|w| w.extra_exits_per_op.map(|x| 1.0 + x)),
                    text: |v| format!("+{:.0}", v - 1.0),
                },
            ],
        }
        .write_svg(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
    }
}
