//! `vmm test`: run the guest's in-kernel test suites and report them the
//! way `cargo test` does.
//!
//! The guest runs with `test=FILTER` on its command line; every test sends
//! one `REPORT` record. The VMM prints one `test NAME ... ok|FAILED` line
//! per record, a `MODE: N passed, N failed` line per MMU mode and a final
//! `N passed, N failed` line. The guest's console is kept and shown only
//! when something failed, so a clean run stays readable.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use vmm::devices::hypercall::Report;
use vmm::error::Result;
use vmm::vm::{Vm, VmConfig};

/// A console sink that keeps everything in memory.
#[derive(Clone, Default)]
pub struct CapturedConsole(Arc<Mutex<Vec<u8>>>);

impl CapturedConsole {
    /// Everything written so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

impl Write for CapturedConsole {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One test's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TestOutcome {
    /// `suite::test`.
    pub name: String,
    /// Whether it passed.
    pub passed: bool,
    /// Guest cycles.
    pub cycles: u64,
    /// Failure message.
    pub message: String,
}

/// The results of one mode.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModeResults {
    /// `ept` or `shadow`.
    pub mmu: &'static str,
    /// Per test, in the order they ran.
    pub tests: Vec<TestOutcome>,
    /// Why the run ended abnormally (a crash, a timeout), if it did.
    pub error: Option<String>,
    /// Whether the guest itself said every test passed.
    pub guest_success: bool,
}

impl ModeResults {
    /// Passed tests.
    pub fn passed(&self) -> usize {
        self.tests.iter().filter(|t| t.passed).count()
    }

    /// Failed tests, plus one for a run that ended abnormally (a crash, a
    /// timeout, or a failure status that no test result explains).
    pub fn failed(&self) -> usize {
        let failed = self.tests.iter().filter(|t| !t.passed).count();
        failed + usize::from(self.error.is_some() || (!self.guest_success && failed == 0))
    }
}

/// Run the suites once in the mode of `config`, printing as they report.
/// `config.cmdline` is extended with `test=FILTER`.
pub fn run_mode(mut config: VmConfig, filter: &str, out: &mut dyn Write) -> Result<ModeResults> {
    let mmu = config.mmu.name();
    config.cmdline = format!("{} test={filter}", config.cmdline).trim().to_string();
    // Under QEMU TCG with NPT the "hardware" that walks an ept-mode
    // guest's tables is QEMU's model of it, which differs from silicon in
    // places (it does not reserve PML4E bit 8 on AMD, where the APM and
    // KVM do): tell the tests that compare against the host MMU.
    if ept::probe::second_stage() == ept::probe::SecondStage::Npt && ept::probe::identity().in_qemu_tcg() {
        config.cmdline.push_str(" hostmmu=qemu-tcg");
    }
    let config_cmdline = config.cmdline.clone();
    let console = CapturedConsole::default();
    let mut vm = Vm::new(config, Box::new(console.clone()))?;
    let outcome = vm.run();
    if let Ok(exit) = &outcome.end
        && let Some(word) = exit.refused_cmdline_word(&config_cmdline)
    {
        let _ = write!(out, "{}", console.text());
        return Err(vmm::Error::GuestCmdline(word));
    }
    let tests: Vec<TestOutcome> = outcome
        .reports
        .into_iter()
        .filter_map(|r| match r {
            Report::Test { name, passed, cycles, message } => Some(TestOutcome { name, passed, cycles, message }),
            _ => None,
        })
        .collect();
    for t in &tests {
        if t.passed {
            let _ = writeln!(out, "test {} ... ok", t.name);
        } else {
            let _ = writeln!(out, "test {} ... FAILED", t.name);
            let _ = writeln!(out, "    {}", t.message);
        }
    }
    let (error, guest_success) = match outcome.end {
        Ok(exit) => (None, exit.success()),
        Err(e) => (Some(e.to_string()), false),
    };
    let results = ModeResults { mmu, tests, error, guest_success };
    if let Some(e) = &results.error {
        let _ = writeln!(out, "error: the {mmu} run ended early: {e}");
    }
    if results.failed() > 0 {
        let _ = writeln!(out, "--- guest console ({mmu}) ---\n{}--- end of guest console ---", console.text());
    }
    let _ = writeln!(out, "{mmu}: {} passed, {} failed", results.passed(), results.failed());
    Ok(results)
}
