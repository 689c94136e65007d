//! `vmm info`: the host probe (docs/architecture.md, "The host probe").
//!
//! The static facts come from `ept::probe`; the calibration boots the
//! bundled guest on a `dec; jnz` loop and divides the host time it took by
//! the instructions it ran. Hardware virtualisation runs the loop at native
//! speed (well under 5 ns per instruction); KVM's instruction emulator
//! takes hundreds of nanoseconds. Every report of this project starts with
//! this verdict, so an emulated number is never mistaken for a hardware one.
//!
//! Speed alone cannot tell a nested host from hardware: QEMU's TCG runs a
//! nested guest at a few ns per instruction, inside the "native" band. So
//! the headline of a recognised nested host comes from evidence instead —
//! the CPUID hypervisor signature, DMI and the KVM module
//! (`ept::probe::HostIdentity`) — e.g. "AMD NPT inside QEMU TCG — ...".

use ept::probe::HostFacts;
use serde::Serialize;
use std::fmt::Write as _;
use std::time::{Duration, Instant};
use vmm::devices::hypercall::Report;
use vmm::error::Result;
use vmm::vm::{Vm, VmConfig};

/// Above this, the guest is emulated.
pub const EMULATED_NS_PER_INSN: f64 = 20.0;
/// Below this, the guest runs natively.
pub const NATIVE_NS_PER_INSN: f64 = 5.0;

/// How the host runs guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Hardware virtualisation: guest code runs natively.
    Native,
    /// KVM's instruction emulator runs the guest.
    Emulating,
    /// In between: neither clearly native nor clearly emulated.
    Uncertain,
}

impl Verdict {
    /// From nanoseconds per guest instruction.
    pub fn from_ns_per_insn(ns: f64) -> Verdict {
        if ns > EMULATED_NS_PER_INSN {
            Verdict::Emulating
        } else if ns < NATIVE_NS_PER_INSN {
            Verdict::Native
        } else {
            Verdict::Uncertain
        }
    }

    /// The word used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Native => "native",
            Verdict::Emulating => "emulating",
            Verdict::Uncertain => "uncertain",
        }
    }
}

/// The calibration run.
#[derive(Debug, Clone, Serialize)]
pub struct Calibration {
    /// Loop iterations (two instructions each).
    pub iterations: u64,
    /// Host nanoseconds for the loop.
    pub ns: u64,
    /// Guest TSC cycles for the loop.
    pub cycles: u64,
    /// Nanoseconds per guest instruction.
    pub ns_per_instruction: f64,
    /// What that says about the host.
    pub verdict: Verdict,
}

/// The whole probe.
#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    /// Schema version of the JSON form.
    pub schema: u32,
    /// The verdict, repeated at the top for readers of the JSON.
    pub verdict: Verdict,
    /// The one-line description of the host every report carries (the
    /// headline without its `host: ` prefix).
    pub host: String,
    /// For a recognised nested host (e.g. NPT inside QEMU TCG), its label.
    pub nested: Option<String>,
    /// Static facts.
    pub facts: HostFacts,
    /// The calibration, if it ran.
    pub calibration: Option<Calibration>,
    /// Why it did not, if it did not.
    pub calibration_error: Option<String>,
}

/// Boot the guest on the calibration loop.
pub fn calibrate(iterations: u64, process_start: Instant) -> Result<Calibration> {
    let config = VmConfig {
        cmdline: format!("calibrate={iterations}"),
        timeout: Duration::from_secs(120),
        process_start,
        ..VmConfig::bundled(64 << 20, guest_abi::MmuMode::Ept)
    };
    let mut vm = Vm::new(config, Box::new(std::io::sink()))?;
    let outcome = vm.run();
    outcome.end?;
    let (iterations, ns, cycles) = outcome
        .reports
        .iter()
        .find_map(|r| match r {
            Report::Calibration { iterations, ns, cycles } => Some((*iterations, *ns, *cycles)),
            _ => None,
        })
        .ok_or_else(|| vmm::Error::UnexpectedExit { what: "the guest sent no calibration report".into(), rip: 0 })?;
    let ns_per_instruction = ns as f64 / (2 * iterations) as f64;
    Ok(Calibration {
        iterations,
        ns,
        cycles,
        ns_per_instruction,
        verdict: Verdict::from_ns_per_insn(ns_per_instruction),
    })
}

/// Probe the host, calibration included.
pub fn probe(kvm: &kvm_ioctls::Kvm, iterations: u64, process_start: Instant) -> HostReport {
    let facts = ept::probe::probe(kvm);
    let (calibration, calibration_error) = match calibrate(iterations, process_start) {
        Ok(c) => (Some(c), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let verdict = match &calibration {
        Some(c) => c.verdict,
        // Without a calibration, fall back on what the CPU flags say.
        None if facts.cpu_hw_virt => Verdict::Uncertain,
        None => Verdict::Emulating,
    };
    let nested = facts.identity.nested_label(facts.second_stage);
    let mut report =
        HostReport { schema: 1, verdict, host: String::new(), nested, facts, calibration, calibration_error };
    report.host = report.summary();
    report
}

impl HostReport {
    /// The one-line verdict that heads every report.
    pub fn headline(&self) -> String {
        format!("host: {}", self.summary())
    }

    /// The headline without its `host: ` prefix (the JSON's `host` field).
    pub fn summary(&self) -> String {
        let speed = self
            .calibration
            .as_ref()
            .map(|c| format!("{:.1} ns per guest instruction", c.ns_per_instruction))
            .unwrap_or_else(|| "calibration failed".into());
        if let Some(label) = &self.nested {
            return format!("{label} ({speed})");
        }
        match self.verdict {
            Verdict::Emulating => format!(
                "emulating — KVM runs the guest instruction by instruction ({speed}); times here are NOT hardware times"
            ),
            Verdict::Native => format!("native — hardware virtualisation runs the guest ({speed})"),
            Verdict::Uncertain => format!("uncertain — neither clearly native nor emulated ({speed})"),
        }
    }

    /// The text form.
    pub fn render(&self) -> String {
        let f = &self.facts;
        let mut s = String::new();
        let _ = writeln!(s, "{}", self.headline());
        let _ = writeln!(s, "kvm:");
        let _ = writeln!(s, "  API version         {}", f.kvm_api_version);
        let _ = writeln!(s, "  memory slots        {}", f.max_memslots);
        for c in &f.capabilities {
            let state = if c.value > 0 { format!("yes ({})", c.value) } else { "no".into() };
            let _ = writeln!(s, "  {:<24}{}{}", c.name, state, if c.required { "  (required)" } else { "" });
        }
        let _ = writeln!(s, "second stage:         {}", f.second_stage.describe());
        let _ = writeln!(s, "cpu vmx/svm:          {}", if f.cpu_hw_virt { "yes" } else { "no" });
        let id = &f.identity;
        let _ = writeln!(
            s,
            "hypervisor (cpuid):   {}",
            match (&id.hypervisor_signature, id.hypervisor) {
                (Some(sig), Some(name)) => format!("{name} (\"{sig}\")"),
                (Some(sig), None) => format!("unknown (\"{sig}\")"),
                (None, _) => "none (bare metal, or the bit is hidden)".into(),
            }
        );
        if let Some(v) = &id.dmi_sys_vendor {
            let _ = writeln!(
                s,
                "dmi:                  {v}{}",
                id.dmi_product_name.as_ref().map(|p| format!(" / {p}")).unwrap_or_default()
            );
        }
        if let Some(m) = id.kvm_module {
            let _ = writeln!(s, "kvm module:           {m}");
        }
        let _ = writeln!(
            s,
            "host shadows tables:  {}",
            if f.second_stage.host_shadows_page_tables() {
                "yes — shadow mode must invalidate the host's copy after restricting a mapping"
            } else {
                "no"
            }
        );
        let _ = writeln!(s, "memory:");
        if let Some(m) = f.host_memory {
            let _ = writeln!(s, "  host RAM + swap     {}", vmm::size::format_size(m & !((1 << 20) - 1)));
        }
        let _ = writeln!(s, "  THP                 {}", f.thp.as_deref().unwrap_or("not supported"));
        for p in &f.hugetlb {
            let size = if p.size == ept::HugePageSize::Size2M { "2 MiB" } else { "1 GiB" };
            let _ = writeln!(s, "  hugetlb {size:<6}      {} free", p.free);
        }
        match (&self.calibration, &self.calibration_error) {
            (Some(c), _) => {
                let _ = writeln!(s, "calibration:");
                let _ = writeln!(s, "  loop                {} iterations x 2 instructions", c.iterations);
                let _ = writeln!(s, "  host time           {:.3} ms", c.ns as f64 / 1e6);
                let _ = writeln!(s, "  guest TSC           {} cycles", c.cycles);
                let _ = writeln!(s, "  per instruction     {:.1} ns -> {}", c.ns_per_instruction, c.verdict.name());
            }
            (None, Some(e)) => {
                let _ = writeln!(s, "calibration: failed: {e}");
            }
            (None, None) => {}
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_thresholds() {
        assert_eq!(Verdict::from_ns_per_insn(600.0), Verdict::Emulating);
        assert_eq!(Verdict::from_ns_per_insn(0.3), Verdict::Native);
        assert_eq!(Verdict::from_ns_per_insn(10.0), Verdict::Uncertain);
    }
}
