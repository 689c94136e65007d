//! `vmm compare`: one report over several `vmm bench` JSON files — the
//! nested three-way report (docs/nested.md).
//!
//! A column is a (host, MMU mode) pair: `npt/ept` is NPT (ept mode on the
//! `npt=1` host), `kvm-shadow/ept` KVM's own shadow MMU (ept mode on the
//! `npt=0` host), `npt/shadow` and `kvm-shadow/shadow` our shadow MMU on
//! each. Columns come from whatever modes the files hold, so a new MMU mode
//! (say `pv`) adds columns without any change here. Every column's time per
//! operation is divided by the baseline column's: `npt/ept` (or `ept/ept`)
//! when present, else the first column, or the one `--baseline` names.
//!
//! Trust: the input files are only read; a file that is not a bench report
//! is refused with its name, and a workload missing from a file leaves that
//! cell empty rather than failing.

use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// JSON schema version of the combined report.
pub const SCHEMA: u32 = 1;

#[derive(Debug, Deserialize)]
struct InReport {
    host: String,
    probe: InProbe,
    workloads: Vec<InWorkload>,
}

#[derive(Debug, Deserialize)]
struct InProbe {
    facts: InFacts,
}

#[derive(Debug, Deserialize)]
struct InFacts {
    second_stage: String,
}

#[derive(Debug, Deserialize)]
struct InWorkload {
    workload: String,
    modes: Vec<InMode>,
}

#[derive(Debug, Deserialize)]
struct InMode {
    mmu: String,
    ops: u64,
    wall_ns_per_op: f64,
    exits_per_op: f64,
}

/// One input file's host.
#[derive(Debug, Clone, Serialize)]
pub struct Host {
    /// Short name used in column ids: `npt`, `kvm-shadow`, `ept`, `pvm`, ...
    pub name: String,
    /// The host line of that bench report.
    pub host: String,
    /// The file it came from.
    pub file: PathBuf,
}

/// A (host, MMU mode) column.
#[derive(Debug, Clone, Serialize)]
pub struct Column {
    /// `HOST/MODE`, e.g. `npt/ept`.
    pub id: String,
    /// The host's short name.
    pub host: String,
    /// The MMU mode.
    pub mmu: String,
    /// What the column measures, in words.
    pub label: String,
    /// Whether every ratio is relative to this column.
    pub baseline: bool,
}

/// One workload in one column.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// The column's id.
    pub column: String,
    /// Operations per run.
    pub ops: u64,
    /// Host wall time per operation, ns (median of the runs).
    pub time_ns_per_op: f64,
    /// VM exits to the VMM per operation.
    pub exits_per_op: f64,
    /// `time_ns_per_op` over the baseline column's.
    pub ratio_to_baseline: Option<f64>,
}

/// One workload across the columns.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The workload.
    pub workload: String,
    /// One cell per column that measured it, in column order.
    pub cells: Vec<Cell>,
}

/// The combined report.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// [`SCHEMA`].
    pub schema: u32,
    /// The hosts, one per input file.
    pub hosts: Vec<Host>,
    /// The baseline column's id.
    pub baseline: String,
    /// The columns, baseline first.
    pub columns: Vec<Column>,
    /// Per workload.
    pub workloads: Vec<Row>,
}

/// The short name of a host, from its probe's second stage.
fn host_name(second_stage: &str) -> String {
    match second_stage {
        "host-shadow" => "kvm-shadow".into(),
        "npt" | "ept" | "pvm" => second_stage.into(),
        _ => "unknown".into(),
    }
}

fn host_words(name: &str) -> String {
    match name {
        "npt" => "the NPT host (npt=1)".into(),
        "ept" => "the EPT host (ept=1)".into(),
        "kvm-shadow" => "the KVM-shadow host (npt=0)".into(),
        "pvm" => "the PVM host (emulated)".into(),
        other => format!("the {other} host"),
    }
}

fn column_label(host: &str, mmu: &str) -> String {
    let base = host.split('#').next().unwrap_or(host);
    let on = host_words(base);
    match (base, mmu) {
        ("npt", "ept") => format!("NPT: ept mode on {on}"),
        ("ept", "ept") => format!("EPT: ept mode on {on}"),
        ("kvm-shadow", "ept") => format!("KVM's shadow MMU: ept mode on {on}"),
        (_, "shadow") => format!("our shadow MMU: shadow mode on {on}"),
        (_, "pv") => format!("our paravirtual shadow MMU: pv mode on {on}"),
        _ => format!("{mmu} mode on {on}"),
    }
}

fn mode_rank(mmu: &str) -> usize {
    match mmu {
        "ept" => 0,
        "shadow" => 1,
        "pv" => 2,
        _ => 3,
    }
}

/// Why a comparison could not be made, and which exit code that is.
#[derive(Debug)]
pub enum CompareError {
    /// Bad usage (an unknown `--baseline`): exit 2.
    Usage(String),
    /// An input file unreadable or not a bench report: exit 3.
    Input(String),
}

impl std::fmt::Display for CompareError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CompareError::Usage(s) | CompareError::Input(s) => f.write_str(s),
        }
    }
}

/// Read bench reports and combine them.
pub fn compare(files: &[PathBuf], baseline: Option<&str>) -> Result<Comparison, CompareError> {
    let mut inputs = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(f).map_err(|e| CompareError::Input(format!("cannot read {}: {e}", f.display())))?;
        let report: InReport = serde_json::from_str(&text).map_err(|e| {
            CompareError::Input(format!("{} is not a vmm bench report (JSON from vmm bench --json): {e}", f.display()))
        })?;
        inputs.push(report);
    }
    from_reports(files, inputs, baseline)
}

fn from_reports(files: &[PathBuf], inputs: Vec<InReport>, baseline: Option<&str>) -> Result<Comparison, CompareError> {
    let mut hosts: Vec<Host> = Vec::new();
    for (f, r) in files.iter().zip(&inputs) {
        let mut name = host_name(&r.probe.facts.second_stage);
        let same = hosts.iter().filter(|h| h.name.split('#').next() == Some(name.as_str())).count();
        if same > 0 {
            name = format!("{name}#{}", same + 1);
        }
        hosts.push(Host { name, host: r.host.clone(), file: f.clone() });
    }
    // Columns: every (host, mode) the files hold, ordered by mode, then file.
    let mut keys: Vec<(usize, usize, String)> = Vec::new();
    for (fi, r) in inputs.iter().enumerate() {
        for m in r.workloads.iter().flat_map(|w| &w.modes) {
            if !keys.iter().any(|(f, _, mmu)| *f == fi && *mmu == m.mmu) {
                keys.push((fi, mode_rank(&m.mmu), m.mmu.clone()));
            }
        }
    }
    keys.sort_by_key(|(fi, rank, _)| (*rank, *fi));
    let id = |fi: usize, mmu: &str| format!("{}/{mmu}", hosts[fi].name);
    let ids: Vec<String> = keys.iter().map(|(fi, _, mmu)| id(*fi, mmu)).collect();
    if ids.is_empty() {
        return Err(CompareError::Input("the reports hold no measurements".into()));
    }
    let base = match baseline {
        Some(b) if ids.iter().any(|i| i == b) => b.to_string(),
        Some(b) => {
            return Err(CompareError::Usage(format!("unknown --baseline '{b}': the columns are {}", ids.join(", "))));
        }
        None => ids.iter().find(|i| *i == "npt/ept" || *i == "ept/ept").unwrap_or(&ids[0]).clone(),
    };
    // Baseline first, the rest in order.
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_by_key(|&k| ids[k] != base);
    let columns: Vec<Column> = order
        .iter()
        .map(|&k| {
            let (fi, _, mmu) = &keys[k];
            Column {
                id: ids[k].clone(),
                host: hosts[*fi].name.clone(),
                mmu: mmu.clone(),
                label: column_label(&hosts[*fi].name, mmu),
                baseline: ids[k] == base,
            }
        })
        .collect();
    // Workloads in the order of first appearance.
    let mut names: Vec<String> = Vec::new();
    for w in inputs.iter().flat_map(|r| &r.workloads) {
        if !names.contains(&w.workload) {
            names.push(w.workload.clone());
        }
    }
    let find = |k: usize, workload: &str| {
        let (fi, _, mmu) = &keys[k];
        inputs[*fi].workloads.iter().find(|w| w.workload == workload)?.modes.iter().find(|m| &m.mmu == mmu)
    };
    let base_k = order[0];
    let workloads = names
        .iter()
        .map(|name| {
            let base_time = find(base_k, name).map(|m| m.wall_ns_per_op).filter(|t| *t > 0.0);
            let cells = order
                .iter()
                .filter_map(|&k| {
                    let m = find(k, name)?;
                    Some(Cell {
                        column: ids[k].clone(),
                        ops: m.ops,
                        time_ns_per_op: m.wall_ns_per_op,
                        exits_per_op: m.exits_per_op,
                        ratio_to_baseline: base_time.map(|b| m.wall_ns_per_op / b),
                    })
                })
                .collect();
            Row { workload: name.clone(), cells }
        })
        .collect();
    Ok(Comparison { schema: SCHEMA, hosts, baseline: base, columns, workloads })
}

/// A time per operation with a unit that keeps it readable.
pub fn format_time(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.1} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

impl Comparison {
    /// The terminal table.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "hosts:");
        for h in &self.hosts {
            let _ = writeln!(s, "  {:<12} {}", h.name, h.host);
        }
        let _ = writeln!(s, "columns (ratio = time per op / the baseline's):");
        let w = self.columns.iter().map(|c| c.id.len()).max().unwrap_or(8).max(8);
        for c in &self.columns {
            let _ = writeln!(s, "  {:<w$}  {}{}", c.id, c.label, if c.baseline { "  [baseline]" } else { "" });
        }
        let _ = writeln!(
            s,
            "{:<7} {:<w$} {:>7} {:>11} {:>9} {:>8}",
            "work", "column", "ops", "time/op", "exits/op", "ratio"
        );
        for r in &self.workloads {
            for c in &r.cells {
                let ratio = c.ratio_to_baseline.map(crate::cli::chart::format_ratio).unwrap_or_else(|| "-".into());
                let _ = writeln!(
                    s,
                    "{:<7} {:<w$} {:>7} {:>11} {:>9.2} {:>8}",
                    r.workload,
                    c.column,
                    c.ops,
                    format_time(c.time_ns_per_op),
                    c.exits_per_op,
                    ratio
                );
            }
        }
        let _ = writeln!(
            s,
            "time/op = host wall time per workload operation (median of runs); exits/op = exits to the VMM (KVM's own exits inside the host kernel are not counted)"
        );
        s
    }

    /// Write the SVG chart: per workload, every non-baseline column's
    /// ratio to the baseline.
    pub fn write_svg(&self, path: &Path) -> Result<(), String> {
        let others: Vec<&Column> = self.columns.iter().filter(|c| !c.baseline).collect();
        if others.is_empty() {
            return Err("the chart needs at least two columns".into());
        }
        let base = self.columns.iter().find(|c| c.baseline).map(|c| c.label.clone()).unwrap_or_default();
        crate::cli::chart::RatioChart {
            title: "time per operation relative to the baseline (log scale)".into(),
            hosts: self.hosts.iter().map(|h| format!("{}: {}", h.name, h.host)).collect(),
            baseline: base,
            y_desc: format!("time / {}", self.baseline),
            groups: self.workloads.iter().map(|r| r.workload.clone()).collect(),
            series: others
                .iter()
                .map(|c| {
                    let values = self
                        .workloads
                        .iter()
                        .map(|r| r.cells.iter().find(|x| x.column == c.id).and_then(|x| x.ratio_to_baseline))
                        .collect();
                    crate::cli::chart::Series::ratios(format!("{} — {}", c.id, c.label), values)
                })
                .collect(),
        }
        .write_svg(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(stage: &str, modes: &[(&str, f64, f64)]) -> InReport {
        InReport {
            host: format!("{stage} host"),
            probe: InProbe { facts: InFacts { second_stage: stage.into() } },
            workloads: vec![InWorkload {
                workload: "fault".into(),
                modes: modes
                    .iter()
                    .map(|&(mmu, t, x)| InMode { mmu: mmu.into(), ops: 256, wall_ns_per_op: t, exits_per_op: x })
                    .collect(),
            }],
        }
    }

    #[test]
    fn three_way_columns_and_ratios() {
        let files = [PathBuf::from("npt.json"), PathBuf::from("kvm.json")];
        let c = from_reports(
            &files,
            vec![
                report("npt", &[("ept", 100.0, 0.0), ("shadow", 300.0, 2.0)]),
                report("host-shadow", &[("ept", 200.0, 0.0), ("shadow", 800.0, 2.0)]),
            ],
            None,
        )
        .unwrap();
        let ids: Vec<&str> = c.columns.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["npt/ept", "kvm-shadow/ept", "npt/shadow", "kvm-shadow/shadow"]);
        assert_eq!(c.baseline, "npt/ept");
        assert!(c.columns[1].label.starts_with("KVM's shadow MMU"));
        let ratios: Vec<f64> = c.workloads[0].cells.iter().map(|x| x.ratio_to_baseline.unwrap()).collect();
        assert_eq!(ratios, [1.0, 2.0, 3.0, 8.0]);
        assert_eq!(c.workloads[0].cells[2].exits_per_op, 2.0);
    }

    #[test]
    fn a_new_mode_is_more_columns() {
        let c = from_reports(
            &[PathBuf::from("a.json")],
            vec![report("npt", &[("pv", 150.0, 1.0), ("ept", 100.0, 0.0), ("shadow", 300.0, 2.0)])],
            None,
        )
        .unwrap();
        let ids: Vec<&str> = c.columns.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["npt/ept", "npt/shadow", "npt/pv"]);
        assert!(c.columns[2].label.contains("paravirtual"));
    }

    #[test]
    fn baseline_choice() {
        let files = [PathBuf::from("a.json")];
        let two = || vec![report("host-shadow", &[("ept", 200.0, 0.0), ("shadow", 100.0, 2.0)])];
        let c = from_reports(&files, two(), Some("kvm-shadow/shadow")).unwrap();
        assert_eq!(c.columns[0].id, "kvm-shadow/shadow");
        assert_eq!(c.workloads[0].cells[1].ratio_to_baseline, Some(2.0));
        let e = from_reports(&files, two(), Some("npt/ept")).unwrap_err().to_string();
        assert_eq!(e, "unknown --baseline 'npt/ept': the columns are kvm-shadow/ept, kvm-shadow/shadow");
    }
}
