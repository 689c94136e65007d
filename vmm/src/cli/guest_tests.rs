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
    /// The access-matrix records the tests sent (`MATRIX` reports, in case
    /// order): compared across modes, the first mode's as the reference.
    #[serde(skip)]
    pub matrix: Vec<u16>,
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
    // On a kvm_pvm host the "hardware" is KVM's instruction emulator, which
    // faults a supervisor fetch from a user page under CR4.SMAP without
    // SMEP (#PF 0x11; the SDM allows it, and so do QEMU TCG and the shadow
    // walker): the SMEP/SMAP rows cannot use it as their reference.
    if ept::probe::second_stage() == ept::probe::SecondStage::Pvm {
        config.cmdline.push_str(" hostmmu=kvm-pvm");
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
    let mut chunks: Vec<(u32, Vec<u16>)> = Vec::new();
    let tests: Vec<TestOutcome> = outcome
        .reports
        .into_iter()
        .filter_map(|r| match r {
            Report::Test { name, passed, cycles, message } => Some(TestOutcome { name, passed, cycles, message }),
            Report::Matrix { first, records } => {
                chunks.push((first, records));
                None
            }
            _ => None,
        })
        .collect();
    chunks.sort_by_key(|c| c.0);
    let matrix = chunks.into_iter().flat_map(|c| c.1).collect();
    for t in &tests {
        if t.passed {
            let _ = writeln!(out, "test {} ... ok", t.name);
            if !t.message.is_empty() {
                // A passing test's note: a skip and why.
                let _ = writeln!(out, "    ({})", t.message);
            }
        } else {
            let _ = writeln!(out, "test {} ... FAILED", t.name);
            let _ = writeln!(out, "    {}", t.message);
        }
    }
    let (error, guest_success) = match outcome.end {
        Ok(exit) => (None, exit.success()),
        Err(e) => (Some(e.to_string()), false),
    };
    let results = ModeResults { mmu, tests, error, guest_success, matrix };
    if let Some(e) = &results.error {
        let _ = writeln!(out, "error: the {mmu} run ended early: {e}");
    }
    if results.failed() > 0 {
        let _ = writeln!(out, "--- guest console ({mmu}) ---\n{}--- end of guest console ---", console.text());
    }
    let _ = writeln!(out, "{mmu}: {} passed, {} failed", results.passed(), results.failed());
    Ok(results)
}

/// Where `other` disagrees with `reference` (the first mode run: ept, whose
/// page walks the host's MMU does): a test's verdict, a test that did not
/// run, or access-matrix records (the first 12 differing cases named, then
/// the count). One line each.
pub fn disagreements(reference: &ModeResults, other: &ModeResults) -> Vec<String> {
    let verdict = |p: bool| if p { "ok" } else { "FAILED" };
    let mut out = Vec::new();
    for t in &reference.tests {
        match other.tests.iter().find(|u| u.name == t.name) {
            Some(u) if u.passed == t.passed => {}
            Some(u) => out.push(format!(
                "MODES DISAGREE on {}: {} {}, {} {}",
                t.name,
                reference.mmu,
                verdict(t.passed),
                other.mmu,
                verdict(u.passed)
            )),
            None => out.push(format!("MODES DISAGREE on {}: it did not run in {} mode", t.name, other.mmu)),
        }
    }
    let (a, b) = (&reference.matrix, &other.matrix);
    if a.len() != b.len() {
        out.push(format!(
            "MODES DISAGREE on the access-matrix records: {} sent {}, {} sent {}",
            reference.mmu,
            a.len(),
            other.mmu,
            b.len()
        ));
    } else {
        let differing: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
        for &i in differing.iter().take(12) {
            out.push(format!(
                "MODES DISAGREE on access-matrix case {i}: {} {:#05x}, {} {:#05x} (bit 0 fault, bits 1-5 error code, bit 6 A, bit 7 D)",
                reference.mmu, a[i], other.mmu, b[i]
            ));
        }
        if differing.len() > 12 {
            out.push(format!("MODES DISAGREE on {} access-matrix cases in all", differing.len()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(mmu: &'static str, tests: &[(&str, bool)], matrix: &[u16]) -> ModeResults {
        ModeResults {
            mmu,
            tests: tests
                .iter()
                .map(|&(n, p)| TestOutcome { name: n.into(), passed: p, cycles: 0, message: String::new() })
                .collect(),
            error: None,
            guest_success: true,
            matrix: matrix.to_vec(),
        }
    }

    #[test]
    fn verdicts_and_matrix_records_are_compared_with_the_reference() {
        let ept = mode("ept", &[("a", true), ("b", true)], &[0, 1, 0x11]);
        assert!(disagreements(&ept, &mode("pv", &[("a", true), ("b", true)], &[0, 1, 0x11])).is_empty());
        let d = disagreements(&ept, &mode("shadow", &[("a", false)], &[0, 1, 0]));
        assert_eq!(
            d,
            [
                "MODES DISAGREE on a: ept ok, shadow FAILED",
                "MODES DISAGREE on b: it did not run in shadow mode",
                "MODES DISAGREE on access-matrix case 2: ept 0x011, shadow 0x000 (bit 0 fault, bits 1-5 error code, bit 6 A, bit 7 D)"
            ]
        );
        let d = disagreements(&ept, &mode("pv", &[("a", true), ("b", true)], &[]));
        assert_eq!(d, ["MODES DISAGREE on the access-matrix records: ept sent 3, pv sent 0"]);
    }
}
