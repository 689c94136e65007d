//! The command line (DESIGN.md, "Command line"). Sizes take units, times
//! take units, `--help` shows every default and the exit codes.

use crate::size::{parse_duration, parse_size};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

const EXIT_CODES: &str = "\
Exit codes:
  0  the guest ended with success
  1  the guest ended with a failure status (failed test, panic, exception)
  2  bad command-line usage
  3  the VM could not be set up (KVM, kernel image, memory)
  4  the guest crashed the vCPU (triple fault, instruction the host cannot emulate)
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
    /// Run the workloads under ept and shadow paging and compare them.
    #[command(after_help = EXIT_CODES)]
    Bench(BenchArgs),
    /// Probe the host: KVM, its second-stage translation, huge pages, and a
    /// calibration run that tells hardware virtualisation from emulation.
    Info(InfoArgs),
}

/// Options of `vmm test`.
#[derive(Debug, Args)]
pub struct TestArgs {
    /// MMU mode(s) to run the suites in; with `both`, the results must agree.
    #[arg(long, value_enum, default_value = "ept")]
    pub mmu: MmuArg,

    /// Size of the shadow pool (shadow mode).
    #[arg(long, value_name = "SIZE", default_value = "16M", value_parser = parse_size)]
    pub shadow_pool: u64,

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

    /// End a run that is still going after this long.
    #[arg(long, value_name = "DURATION", default_value = "180s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// Options of `vmm bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// MMU mode(s) to measure.
    #[arg(long, value_enum, default_value = "both")]
    pub mmu: MmuArg,

    /// Workload to run (repeatable): fault, fork, ctxsw, mmap, tlb, alloc [default: all].
    #[arg(long = "workload", value_name = "NAME")]
    pub workloads: Vec<String>,

    /// Operations per run [default: each workload's own, see the README].
    #[arg(long, value_name = "N")]
    pub size: Option<u64>,

    /// Measured runs per workload and mode (after one warm-up run).
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub repeat: u32,

    /// Guest RAM per run.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size)]
    pub memory: u64,

    /// Size of the shadow pool (shadow mode).
    #[arg(long, value_name = "SIZE", default_value = "16M", value_parser = parse_size)]
    pub shadow_pool: u64,

    /// Folder for the report files (report.json, and report.svg with both modes).
    #[arg(long, value_name = "DIR", default_value = "bench-report")]
    pub out: PathBuf,

    /// Write the JSON report here instead of DIR/report.json.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Write the SVG chart here instead of DIR/report.svg (needs --mmu both).
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
}

/// Options of `vmm info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Print the probe as JSON instead of text.
    #[arg(long)]
    pub json: bool,

    /// Iterations of the calibration loop (two guest instructions each).
    #[arg(long, value_name = "N", default_value_t = 200_000)]
    pub calibration_loops: u64,
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
    /// Software shadow page tables kept by the VMM.
    Shadow,
    /// Both, one after the other (`vmm test` and `vmm bench` only).
    Both,
}

impl MmuArg {
    /// The modes this argument selects.
    pub fn modes(self) -> Vec<guest_abi::MmuMode> {
        match self {
            MmuArg::Ept => vec![guest_abi::MmuMode::Ept],
            MmuArg::Shadow => vec![guest_abi::MmuMode::Shadow],
            MmuArg::Both => vec![guest_abi::MmuMode::Ept, guest_abi::MmuMode::Shadow],
        }
    }
}

/// Options of `vmm run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Guest kernel ELF to boot [default: the kernel bundled in this binary].
    #[arg(long, value_name = "ELF")]
    pub kernel: Option<PathBuf>,

    /// Guest RAM, with a unit (K, M, G); a multiple of 2 MiB (of the huge
    /// page size with hugetlb), at least 32M.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
    pub memory: u64,

    /// How the guest's memory is virtualised.
    #[arg(long, value_enum, default_value = "ept")]
    pub mmu: MmuArg,

    /// Size of the shadow pool (shadow mode): the VMM-private memory that
    /// holds the shadow page tables. When it fills up, everything is zapped.
    #[arg(long, value_name = "SIZE", default_value = "16M", value_parser = parse_size)]
    pub shadow_pool: u64,

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

    /// End the guest if it is still running after this long (ms, s, m, h).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Print exit counts by reason and timings to stderr when the VM ends.
    #[arg(long)]
    pub stats: bool,

    /// Also write the statistics as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

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
    }
}
