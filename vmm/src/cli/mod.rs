//! The command line (docs/cli.md). Sizes take units, times
//! take units, `--help` shows every default and the exit codes.

pub mod bench;
pub mod chart;
pub mod commands;
pub mod compare;
pub mod guest_tests;
pub mod info;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;
use vmm::size::{parse_duration, parse_size};

const EXIT_CODES: &str = "\
Exit codes:
  0  the guest ended with success
  1  the guest ended with a failure status (failed test, panic, exception)
  2  bad command-line usage (also: a --cmdline word the guest kernel refused)
  3  the VM could not be set up (KVM, kernel image, memory)
  4  the guest crashed the vCPU (triple fault, instruction the host cannot emulate, halt)
  5  --timeout expired";

/// A KVM-based VMM that boots its own guest kernel and virtualises its MMU.
#[derive(Debug, Parser)]
#[command(name = "vmm", version, about, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a guest kernel and run it until it exits.
    #[command(after_help = EXIT_CODES)]
    Run(RunArgs),
    /// Run the guest kernel's in-guest test suites.
    #[command(after_help = EXIT_CODES)]
    Test(TestArgs),
    /// Run the workloads under each MMU mode (ept, shadow, pv) and compare
    /// them with ept.
    #[command(after_help = EXIT_CODES)]
    Bench(BenchArgs),
    /// Probe the host: KVM, its second-stage translation, huge pages, and a
    /// calibration run that tells hardware virtualisation from emulation.
    Info(InfoArgs),
    /// Combine `vmm bench` JSON reports (e.g. from the nested NPT and
    /// KVM-shadow hosts) into one report: a column per (host, MMU mode),
    /// each column's time per operation relative to a baseline column.
    #[command(after_help = COMPARE_EXIT_CODES)]
    Compare(CompareArgs),
}

const COMPARE_EXIT_CODES: &str = "\
Exit codes:
  0  the report was written
  2  bad command-line usage (an unknown --baseline column)
  3  an input file unreadable or not a vmm bench report, or an output file not writable";

/// Options of `vmm compare`.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// `vmm bench` JSON reports, one per host (report.json of `vmm bench --out DIR`).
    #[arg(value_name = "REPORT.json", required = true)]
    pub reports: Vec<PathBuf>,

    /// The column every ratio is relative to, as HOST/MODE (e.g. npt/ept)
    /// [default: npt/ept or ept/ept when present, else the first column].
    #[arg(long, value_name = "HOST/MODE")]
    pub baseline: Option<String>,

    /// Folder for the combined report (report.json, report.svg).
    #[arg(long, value_name = "DIR", default_value = "compare-report")]
    pub out: PathBuf,

    /// Write the JSON report here instead of DIR/report.json.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Write the SVG chart here instead of DIR/report.svg.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
}

/// Options of `vmm test`.
#[derive(Debug, Args)]
pub struct TestArgs {
    /// MMU mode(s) to run the suites in; with more than one, the results must agree.
    #[arg(long, value_enum, default_value = "all")]
    pub mmu: MmuArg,

    /// Size of the shadow pool (shadow and pv mode) [default: 16M; at most 1G].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub shadow_pool: Option<u64>,

    /// Run only the tests whose name contains this text.
    #[arg(long, value_name = "PATTERN", default_value = "")]
    pub filter: String,

    /// Guest kernel ELF [default: the kernel bundled in this binary].
    #[arg(long, value_name = "ELF")]
    pub kernel: Option<PathBuf>,

    /// Guest RAM, with a unit. The guest initialises per-frame metadata
    /// only as memory is used, so the size barely changes the run time.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
    pub memory: u64,

    /// Extra words for the guest's command line.
    #[arg(long, value_name = "STR", default_value = "")]
    pub cmdline: String,

    /// End a run that is still going after this long (ms, s, m, h).
    #[arg(long, value_name = "DURATION", default_value = "180s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// vCPUs of the ept-mode run (1 to 64; shadow and pv run one). Without it, every mode runs on one
    /// vCPU and the SMP suites (smp::) run again in ept mode on 2.
    #[arg(long, value_name = "N", value_parser = parse_vcpus)]
    pub vcpus: Option<u32>,
}

/// Options of `vmm bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// MMU mode(s) to measure.
    #[arg(long, value_enum, default_value = "all")]
    pub mmu: MmuArg,

    /// Workload to run (repeatable): fault, fork, ctxsw, mmap, tlb, alloc, aging, shootdown [default: all].
    #[arg(long = "workload", value_name = "NAME")]
    pub workloads: Vec<String>,

    /// Operations per run, at least 1 [default: each workload's own: fault 256, fork 8, ctxsw 256, mmap 32,
    /// tlb 2000, alloc 500, aging 8, shootdown 32].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub size: Option<u64>,

    /// Measured runs per workload and mode (after one warm-up run), at least 1.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: u32,

    /// Guest RAM per run.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size)]
    pub memory: u64,

    /// Size of the shadow pool (shadow and pv mode) [default: 16M; at most 1G].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub shadow_pool: Option<u64>,

    /// Extra words for the guest's command line in every run, the same in
    /// every mode (e.g. `anon=64k`: the anonymous folio size; `tlbset=16384`:
    /// a 64 MiB working set for `tlb`); not `workload=` or `size=`
    /// (--workload and --size say those).
    #[arg(long, value_name = "WORDS", default_value = "")]
    pub cmdline: String,

    /// Host memory behind guest RAM in every run, as for `vmm run`: 4k,
    /// thp, hugetlb (2 MiB) or hugetlb-1g. No fallback: if the host cannot
    /// give it, the VMM says so and exits.
    #[arg(long, value_name = "BACKING", default_value = "4k")]
    pub backing: ept::Backing,

    /// Folder for the report files (report.json, and report.svg when ept and shadow both ran).
    #[arg(long, value_name = "DIR", default_value = "bench-report")]
    pub out: PathBuf,

    /// Write the JSON report here instead of DIR/report.json.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Write the SVG chart here instead of DIR/report.svg (needs ept and shadow: --mmu all or both).
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,

    /// vCPUs per run, 1 to 64; a comma-separated list (1,2,4) measures
    /// every workload and mode at each count.
    #[arg(long, value_name = "N[,N..]", default_value = "1", value_delimiter = ',', value_parser = parse_vcpus)]
    pub vcpus: Vec<u32>,
}

/// Options of `vmm info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Print the probe as JSON instead of text.
    #[arg(long)]
    pub json: bool,

    /// Iterations of the calibration loop (two guest instructions each), at least 1.
    #[arg(long, value_name = "N", default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub calibration_loops: u64,
}

/// Parse a vCPU count: 1 to `guest_abi::MAX_CPUS`.
pub fn parse_vcpus(s: &str) -> Result<u32, String> {
    let max = guest_abi::MAX_CPUS;
    match s.trim().parse::<u32>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("'{s}' is not a vCPU count: give 1 to {max}")),
    }
}

/// Parse a guest-virtual address: `0x`-prefixed hexadecimal or decimal.
pub fn parse_address(s: &str) -> Result<u64, String> {
    let t = s.trim().replace('_', "");
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    };
    r.map_err(|_| format!("invalid address '{s}': expected hexadecimal (0xffffffff80200000) or decimal"))
}

/// An MMU mode on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MmuArg {
    /// Hardware-assisted: the vCPU walks the guest's tables (EPT/NPT below).
    Ept,
    /// Software shadow page tables kept by the VMM; every guest page-table write traps.
    Shadow,
    /// Paravirtual shadow paging: the guest queues its page-table writes and syncs at hypercalls.
    Pv,
    /// ept and shadow, one after the other (`vmm test` and `vmm bench` only).
    Both,
    /// ept, shadow and pv, one after the other (`vmm test` and `vmm bench` only).
    All,
}

impl MmuArg {
    /// The modes this argument selects.
    pub fn modes(self) -> Vec<guest_abi::MmuMode> {
        match self {
            MmuArg::Ept => vec![guest_abi::MmuMode::Ept],
            MmuArg::Shadow => vec![guest_abi::MmuMode::Shadow],
            MmuArg::Pv => vec![guest_abi::MmuMode::Pv],
            MmuArg::Both => vec![guest_abi::MmuMode::Ept, guest_abi::MmuMode::Shadow],
            MmuArg::All => vec![guest_abi::MmuMode::Ept, guest_abi::MmuMode::Shadow, guest_abi::MmuMode::Pv],
        }
    }
}

/// The MMU mode of `vmm run`: one mode (`both` and `all` are for `test` and `bench`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RunMmuArg {
    /// Hardware-assisted: the vCPU walks the guest's tables (EPT/NPT below).
    Ept,
    /// Software shadow page tables kept by the VMM; every guest page-table write traps.
    Shadow,
    /// Paravirtual shadow paging: the guest queues its page-table writes and syncs at hypercalls.
    Pv,
}

impl RunMmuArg {
    /// The mode.
    pub fn mode(self) -> guest_abi::MmuMode {
        match self {
            RunMmuArg::Ept => guest_abi::MmuMode::Ept,
            RunMmuArg::Shadow => guest_abi::MmuMode::Shadow,
            RunMmuArg::Pv => guest_abi::MmuMode::Pv,
        }
    }
}

/// Options of `vmm run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Guest kernel ELF to boot [default: the kernel bundled in this binary].
    #[arg(long, value_name = "ELF")]
    pub kernel: Option<PathBuf>,

    /// Guest RAM, with a unit (K, M, G; a bare number is refused); a multiple of 2 MiB (of the huge
    /// page size with hugetlb), at least 32M.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
    pub memory: u64,

    /// How the guest's memory is virtualised.
    #[arg(long, value_enum, default_value = "ept")]
    pub mmu: RunMmuArg,

    /// Size of the shadow pool (shadow and pv mode; ignored, with a warning,
    /// in ept mode): the VMM-private memory that holds the shadow page
    /// tables. When it fills up, everything is zapped [default: 16M; at
    /// most 1G].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub shadow_pool: Option<u64>,

    /// What backs guest RAM on the host: 4k pages, transparent huge pages,
    /// or hugetlb pages (hugetlb = hugetlb-2m, or hugetlb-1g). No fallback:
    /// if the host cannot give it, the VMM says so and exits.
    #[arg(long, value_name = "BACKING", default_value = "4k")]
    pub backing: ept::Backing,

    /// Print the GVA→GPA→HVA→HPA chain of this guest-virtual address when
    /// the guest has ended (repeatable).
    #[arg(long, value_name = "GVA", value_parser = parse_address)]
    pub explain: Vec<u64>,

    /// Command line passed to the guest kernel.
    #[arg(long, value_name = "STR", default_value = "")]
    pub cmdline: String,

    /// End the guest if it is still running after this long (ms, s, m, h;
    /// fractions like 1.5s too). Holds even when stdout is blocked.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Print exit counts by reason and timings to stderr when the VM ends.
    #[arg(long)]
    pub stats: bool,

    /// Also write the statistics as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<PathBuf>,

    /// vCPUs of the VM, 1 to 64 (more than one: --mmu ept only; the guest starts them with CPU_ON).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = parse_vcpus)]
    pub vcpus: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn vcpu_counts_outside_1_to_64_are_refused_with_the_limit() {
        assert_eq!(parse_vcpus("4"), Ok(4));
        assert_eq!(parse_vcpus("64"), Ok(64));
        for bad in ["0", "65", "-1", "two", ""] {
            let e = parse_vcpus(bad).unwrap_err();
            assert!(e.contains(&format!("'{bad}'")) && e.contains("1 to 64"), "{e}");
        }
        let Command::Run(a) = Cli::try_parse_from(["vmm", "run"]).unwrap().command else { panic!() };
        assert_eq!(a.vcpus, 1, "run defaults to one vCPU");
        let Command::Bench(b) = Cli::try_parse_from(["vmm", "bench"]).unwrap().command else { panic!() };
        assert_eq!(b.vcpus, [1], "bench defaults to one vCPU");
        let Command::Bench(b) = Cli::try_parse_from(["vmm", "bench", "--vcpus", "1,2,4"]).unwrap().command else {
            panic!()
        };
        assert_eq!(b.vcpus, [1, 2, 4]);
        assert!(Cli::try_parse_from(["vmm", "bench", "--vcpus", "1,65"]).is_err());
        let Command::Test(t) = Cli::try_parse_from(["vmm", "test", "--vcpus", "4"]).unwrap().command else { panic!() };
        assert_eq!(t.vcpus, Some(4));
        assert!(Cli::try_parse_from(["vmm", "run", "--vcpus", "65"]).is_err());
    }

    #[test]
    fn bench_help_names_every_workload_with_its_default_size() {
        let mut cmd = Cli::command();
        let bench = cmd.find_subcommand_mut("bench").expect("bench").render_long_help().to_string();
        let flat = bench.split_whitespace().collect::<Vec<_>>().join(" ");
        for (name, size) in bench::WORKLOADS {
            assert!(flat.contains(&format!("{name} {size}")), "bench --help lacks '{name} {size}':\n{bench}");
        }
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_and_units() {
        let Command::Run(a) = Cli::try_parse_from(["vmm", "run"]).unwrap().command else { panic!() };
        assert_eq!(a.memory, 256 << 20);
        assert_eq!(a.timeout, Duration::from_secs(60));
        assert_eq!(a.backing, ept::Backing::Anon4k);
        // `vmm test` runs with as much RAM as `run` (the guest's deferred
        // per-frame initialisation makes the size nearly free).
        let Command::Test(t) = Cli::try_parse_from(["vmm", "test"]).unwrap().command else { panic!() };
        assert_eq!(t.memory, 256 << 20);
        let Command::Run(a) = Cli::try_parse_from([
            "vmm",
            "run",
            "--memory",
            "1G",
            "--timeout",
            "500ms",
            "--backing",
            "thp",
            "--explain",
            "0xffff_8880_0000_6000",
            "--explain",
            "4096",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        assert_eq!(a.memory, 1 << 30);
        assert_eq!(a.timeout, Duration::from_millis(500));
        assert_eq!(a.backing, ept::Backing::Thp);
        assert_eq!(a.explain, vec![0xffff_8880_0000_6000, 4096]);
    }

    #[test]
    fn bad_sizes_are_usage_errors() {
        let e = Cli::try_parse_from(["vmm", "run", "--memory", "lots"]).unwrap_err();
        assert!(e.to_string().contains("invalid size"), "{e}");
    }

    #[test]
    fn bad_backing_and_address_are_usage_errors() {
        let e = Cli::try_parse_from(["vmm", "run", "--backing", "huge"]).unwrap_err();
        assert!(e.to_string().contains("unknown backing"), "{e}");
        let e = Cli::try_parse_from(["vmm", "run", "--explain", "0xzz"]).unwrap_err();
        assert!(e.to_string().contains("invalid address"), "{e}");
    }

    #[test]
    fn help_shows_defaults() {
        let mut cmd = Cli::command();
        let help = cmd.find_subcommand_mut("run").unwrap().render_long_help().to_string();
        assert!(help.contains("[default: 256M]"), "{help}");
        assert!(help.contains("[default: 60s]"), "{help}");
        assert!(help.contains("[default: 4k]"), "{help}");
        assert!(help.contains("Exit codes"), "{help}");
        assert!(!help.contains("both"), "run takes one mode: {help}");
    }

    #[test]
    fn zero_counts_are_refused_naming_the_flag() {
        for args in [
            &["vmm", "bench", "--repeat", "0"][..],
            &["vmm", "bench", "--size", "0"],
            &["vmm", "info", "--calibration-loops", "0"],
        ] {
            let e = Cli::try_parse_from(args).unwrap_err().to_string();
            assert!(e.contains(args[2]) && e.contains("'0'"), "{e}");
        }
        let e = Cli::try_parse_from(["vmm", "run", "--mmu", "both"]).unwrap_err().to_string();
        assert!(e.contains("'both'"), "{e}");
    }

    #[test]
    fn test_and_bench_run_all_three_modes_by_default_and_take_each_alone() {
        use guest_abi::MmuMode::{Ept, Pv, Shadow};
        let Command::Test(t) = Cli::try_parse_from(["vmm", "test"]).unwrap().command else { panic!() };
        assert_eq!(t.mmu.modes(), [Ept, Shadow, Pv]);
        let Command::Bench(b) = Cli::try_parse_from(["vmm", "bench"]).unwrap().command else { panic!() };
        assert_eq!(b.mmu.modes(), [Ept, Shadow, Pv]);
        // `both` keeps its meaning: ept and shadow.
        let Command::Bench(b) = Cli::try_parse_from(["vmm", "bench", "--mmu", "both"]).unwrap().command else {
            panic!()
        };
        assert_eq!(b.mmu.modes(), [Ept, Shadow]);
        let Command::Test(t) = Cli::try_parse_from(["vmm", "test", "--mmu", "pv"]).unwrap().command else { panic!() };
        assert_eq!(t.mmu.modes(), [Pv]);
        let Command::Run(r) = Cli::try_parse_from(["vmm", "run", "--mmu", "pv"]).unwrap().command else { panic!() };
        assert_eq!(r.mmu.mode(), Pv);
        let e = Cli::try_parse_from(["vmm", "run", "--mmu", "all"]).unwrap_err().to_string();
        assert!(e.contains("'all'") && e.contains("pv"), "{e}");
    }

    #[test]
    fn sizes_need_units_and_durations_take_fractions() {
        let e = Cli::try_parse_from(["vmm", "run", "--memory", "64"]).unwrap_err().to_string();
        assert!(e.contains("give a unit"), "{e}");
        let Command::Run(a) = Cli::try_parse_from(["vmm", "run", "--timeout", "1.5s"]).unwrap().command else {
            panic!()
        };
        assert_eq!(a.timeout, Duration::from_millis(1500));
    }
}
