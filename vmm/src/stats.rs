//! Per-run statistics: exits by reason, hypercalls by name, and where the
//! time went. Counts are deterministic for a given guest and command line,
//! so tests assert them; times are reported, never asserted.

use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

macro_rules! exit_reasons {
    ($($(#[$doc:meta])* $variant:ident => $name:literal,)*) => {
        /// Why the vCPU came back to the VMM, as counted by [`ExitCounts`].
        /// The names are the keys of `--stats-json`'s `exits` object.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum ExitReason {
            $($(#[$doc])* $variant,)*
        }

        impl ExitReason {
            /// Every reason, in declaration order.
            pub const ALL: &'static [ExitReason] = &[$(ExitReason::$variant,)*];

            /// The reason's name in reports and `--stats-json`.
            pub const fn name(self) -> &'static str {
                match self {
                    $(ExitReason::$variant => $name,)*
                }
            }
        }
    };
}

exit_reasons! {
    /// `KVM_RUN` returned `EINTR`/`EAGAIN` (the kick signal).
    Interrupted => "interrupted",
    /// A write to the UART.
    SerialOut => "io-out:serial",
    /// A read of the UART.
    SerialIn => "io-in:serial",
    /// A write to the exit device.
    ExitDevice => "io-out:exit",
    /// A hypercall.
    Hypercall => "io-out:hypercall",
    /// A write to a port nothing claims.
    UnclaimedOut => "io-out:unclaimed",
    /// A read of a port nothing claims.
    UnclaimedIn => "io-in:unclaimed",
    /// A trapped guest page-table write (shadow mode).
    PageTableWrite => "mmio-write:page-table",
    /// A write to guest-physical memory nothing backs.
    MmioWrite => "mmio-write",
    /// A read of guest-physical memory nothing backs.
    MmioRead => "mmio-read",
    /// `hlt`.
    Hlt => "hlt",
    /// A triple fault.
    Shutdown => "shutdown",
    /// `KVM_EXIT_INTERNAL_ERROR`.
    InternalError => "internal-error",
    /// `KVM_EXIT_FAIL_ENTRY`.
    FailEntry => "fail-entry",
    /// Anything else.
    Unexpected => "unexpected",
}

/// Exits by [`ExitReason`]: one counter per reason. Serialises as an object
/// of the non-zero counters by name, in name order (as the map it replaces).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitCounts([u64; ExitReason::ALL.len()]);

impl Default for ExitCounts {
    fn default() -> Self {
        ExitCounts([0; ExitReason::ALL.len()])
    }
}

impl ExitCounts {
    /// Count one exit of `reason`.
    pub fn count(&mut self, reason: ExitReason) {
        self.0[reason as usize] += 1;
    }

    /// How many exits of `reason`.
    pub fn get(&self, reason: ExitReason) -> u64 {
        self.0[reason as usize]
    }

    /// All exits.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// The non-zero counters, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (ExitReason, u64)> + '_ {
        let mut v: Vec<(ExitReason, u64)> =
            ExitReason::ALL.iter().map(|&r| (r, self.get(r))).filter(|&(_, n)| n > 0).collect();
        v.sort_by_key(|(r, _)| r.name());
        v.into_iter()
    }

    /// The counts since `earlier` (a snapshot of the same run).
    pub fn since(&self, earlier: &ExitCounts) -> ExitCounts {
        let mut d = ExitCounts::default();
        for (i, n) in d.0.iter_mut().enumerate() {
            *n = self.0[i].saturating_sub(earlier.0[i]);
        }
        d
    }

    /// Add `other`'s counts.
    pub fn add(&mut self, other: &ExitCounts) {
        for (n, m) in self.0.iter_mut().zip(other.0) {
            *n += m;
        }
    }

    /// Take one `reason` back (saturating).
    pub fn uncount(&mut self, reason: ExitReason) {
        let n = &mut self.0[reason as usize];
        *n = n.saturating_sub(1);
    }
}

impl Serialize for ExitCounts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        for (r, n) in self.iter() {
            m.serialize_entry(r.name(), &n)?;
        }
        m.end()
    }
}

/// What one workload's measured phase cost, from the VMM's counters
/// (snapshots at the `BENCH_BEGIN` and `BENCH` reports).
#[derive(Debug, Clone, Serialize)]
pub struct BenchPhase {
    /// Workload name.
    pub name: String,
    /// The vCPU that measured it (0 unless a workload measures on
    /// several: `ctxsw` on SMP).
    pub vcpu: u32,
    /// Operations done.
    pub ops: u64,
    /// Guest TSC cycles.
    pub cycles: u64,
    /// The workload's self-check passed.
    pub ok: bool,
    /// Host wall time of the phase (JSON: `wall_ns`).
    #[serde(rename = "wall_ns", serialize_with = "ept::json::ns")]
    pub wall: Duration,
    /// Exits during the phase by reason (the closing `REPORT` excluded).
    pub exits: ExitCounts,
    /// Shadow-MMU counters during the phase (shadow mode).
    pub shadow: Option<shadow::ShadowStats>,
    /// VMM time in shadow handlers during the phase.
    #[serde(rename = "shadow_handler_time_ns", serialize_with = "ept::json::ns_opt")]
    pub shadow_handler_time: Option<Duration>,
}

impl BenchPhase {
    /// All exits of the phase.
    pub fn total_exits(&self) -> u64 {
        self.exits.total()
    }
}

/// Statistics of one VM run.
#[derive(Debug, Default, Clone, Serialize)]
pub struct RunStats {
    /// VM exits by reason (`io-out:serial`, `io-out:hypercall`, ...).
    pub exits: ExitCounts,
    /// Hypercalls by name.
    pub hypercalls: BTreeMap<&'static str, u64>,
    /// Process start → first `KVM_RUN` (the first guest instruction).
    #[serde(rename = "setup_time_ns", serialize_with = "ept::json::ns")]
    pub setup_time: Duration,
    /// First `KVM_RUN` → the VM ended.
    #[serde(rename = "run_time_ns", serialize_with = "ept::json::ns")]
    pub run_time: Duration,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// The backing of guest RAM (`4k`, `thp`, `hugetlb-2m`, `hugetlb-1g`).
    pub backing: String,
    /// Bytes of guest RAM backed by huge pages at the end of the run
    /// (`/proc/self/smaps`), if readable.
    pub huge_backed: Option<u64>,
    /// Guest cycles from kernel entry to its boot report, if it sent one.
    pub guest_boot_cycles: Option<u64>,
    /// The MMU mode.
    pub mmu: &'static str,
    /// Shadow-mode counters and handler times (shadow mode only).
    pub shadow: Option<crate::mmu::report::ShadowReport>,
    /// Workload phases the guest measured.
    pub bench: Vec<BenchPhase>,
    /// `REPORT` records refused because the run's budget was spent
    /// (`limits::MAX_KEPT_REPORT_BYTES`).
    pub reports_dropped: u64,
    /// `EXPLAIN` hypercalls answered but not printed (past
    /// `limits::MAX_EXPLAIN_PRINTS`).
    pub explain_suppressed: u64,
    /// Warnings about refused guest requests not printed (past
    /// `limits::MAX_WARNINGS` of a kind).
    pub warnings_suppressed: u64,
    /// Bytes of guest console output never written (the output was
    /// blocked until the end of the run).
    pub console_unwritten: u64,
    /// With more than one vCPU: each vCPU's exits and hypercalls (the
    /// fields above are then the totals). Absent from the JSON with one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub vcpus: Vec<VcpuStats>,
}

/// One vCPU's share of a run's exits.
#[derive(Debug, Default, Clone, Serialize)]
pub struct VcpuStats {
    /// The vCPU's index (= its APIC id).
    pub index: u32,
    /// Its exits by reason.
    pub exits: ExitCounts,
    /// Its exits in total.
    pub total_exits: u64,
    /// Its hypercalls by name.
    pub hypercalls: BTreeMap<&'static str, u64>,
}

impl RunStats {
    /// Count one exit of `reason`.
    pub fn exit(&mut self, reason: ExitReason) {
        self.exits.count(reason);
    }

    /// Count one hypercall.
    pub fn hypercall(&mut self, name: &'static str) {
        *self.hypercalls.entry(name).or_default() += 1;
    }

    /// All exits.
    pub fn total_exits(&self) -> u64 {
        self.exits.total()
    }

    /// Make these the totals of `vcpus` (index, that vCPU's statistics),
    /// keeping each vCPU's share in [`RunStats::vcpus`].
    pub fn merge_vcpus<'a>(&mut self, vcpus: impl Iterator<Item = (u32, &'a RunStats)>) {
        let mut exits = ExitCounts::default();
        let mut hypercalls = BTreeMap::new();
        self.vcpus.clear();
        for (index, st) in vcpus {
            exits.add(&st.exits);
            for (name, n) in &st.hypercalls {
                *hypercalls.entry(*name).or_default() += n;
            }
            self.vcpus.push(VcpuStats {
                index,
                exits: st.exits,
                total_exits: st.exits.total(),
                hypercalls: st.hypercalls.clone(),
            });
        }
        self.exits = exits;
        self.hypercalls = hypercalls;
    }

    /// The human-readable report printed by `--stats`.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let _ = writeln!(s, "vmm stats:");
        let _ =
            writeln!(s, "  guest memory        {} ({} backing)", crate::size::format_size(self.memory), self.backing);
        if let Some(h) = self.huge_backed {
            let _ = writeln!(
                s,
                "  huge-page backed    {} of {} ({:.0}%, from /proc/self/smaps)",
                crate::size::format_size(h),
                crate::size::format_size(self.memory),
                100.0 * h as f64 / self.memory.max(1) as f64
            );
        }
        let _ = writeln!(
            s,
            "  setup time          {:.3} ms  (process start -> first guest instruction)",
            ms(self.setup_time)
        );
        let _ = writeln!(s, "  run time            {:.3} ms", ms(self.run_time));
        if let Some(c) = self.guest_boot_cycles {
            let _ = writeln!(s, "  guest boot          {c} cycles (rdtsc, kernel entry -> banner)");
        }
        let _ = writeln!(s, "  mmu                 {}", if self.mmu.is_empty() { "ept" } else { self.mmu });
        let _ = writeln!(s, "  exits               {}", self.total_exits());
        for (reason, n) in self.exits.iter() {
            let _ = writeln!(s, "    {:<22}{n:>10}", reason.name());
        }
        for v in &self.vcpus {
            let _ = writeln!(s, "    vCPU {:<17}{:>10}", v.index, v.total_exits);
            for (reason, n) in v.exits.iter() {
                let _ = writeln!(s, "      {:<20}{n:>10}", reason.name());
            }
        }
        if !self.hypercalls.is_empty() {
            let _ = writeln!(s, "  hypercalls");
            for (name, n) in &self.hypercalls {
                let _ = writeln!(s, "    {name:<22}{n:>10}");
            }
        }
        if self.reports_dropped + self.explain_suppressed + self.warnings_suppressed + self.console_unwritten > 0 {
            let _ = writeln!(s, "  bounded (what the guest caused beyond the VMM's limits)");
            let _ = writeln!(s, "    reports refused     {:>10}", self.reports_dropped);
            let _ = writeln!(s, "    EXPLAIN not printed {:>10}", self.explain_suppressed);
            let _ = writeln!(s, "    warnings not shown  {:>10}", self.warnings_suppressed);
            let _ = writeln!(s, "    console bytes lost  {:>10}", self.console_unwritten);
        }
        if let Some(sh) = &self.shadow {
            let st = &sh.stats;
            let us = |d: std::time::Duration, n: u64| if n == 0 { 0.0 } else { d.as_secs_f64() * 1e6 / n as f64 };
            let _ = writeln!(s, "  shadow MMU (pool {} pages, coherence: {})", sh.pool_pages, sh.coherence);
            let _ = writeln!(
                s,
                "    hidden faults       {:>10}   {:>8.2} us each in the VMM",
                st.hidden_faults,
                us(sh.times.fault, st.hidden_faults + st.guest_faults)
            );
            let _ = writeln!(s, "    guest faults        {:>10}", st.guest_faults);
            let _ = writeln!(
                s,
                "    PTE-write traps     {:>10}   {:>8.2} us each ({} updated in place)",
                st.pte_writes,
                us(sh.times.pte_write, st.pte_writes),
                st.pte_updates_in_place
            );
            let _ = writeln!(
                s,
                "    CR3 loads           {:>10}   {:>8.2} us each (root cache {} hits, {} misses)",
                st.cr3_loads,
                us(sh.times.load_cr3, st.cr3_loads),
                st.root_hits,
                st.root_misses
            );
            let _ = writeln!(
                s,
                "    zaps                {:>10}   ({} whole pages, {} pool exhaustions)",
                st.zaps, st.page_zaps, st.pool_exhaustions
            );
            let _ = writeln!(
                s,
                "    host invalidations  {:>10}   {:>8.2} us each",
                st.host_invalidations,
                us(sh.times.invalidate, st.host_invalidations)
            );
            let _ = writeln!(
                s,
                "    pool repairs        {:>10}   ({} dirty-log checks, {:.2} us each)",
                st.pool_repairs,
                sh.times.pool_checks,
                us(sh.times.pool_check, sh.times.pool_checks)
            );
            if st.batches > 0 || sh.pv {
                let _ = writeln!(
                    s,
                    "    pv batches          {:>10}   {:>8.2} us each ({} entries, {} refused, {} prefetches)",
                    st.batches,
                    us(sh.times.batch, st.batches),
                    st.batch_entries,
                    sh.pv_refused,
                    st.prefetches
                );
            }
            let _ = writeln!(s, "    TLB flushes         {:>10}", st.flushes);
            let _ = writeln!(s, "    shadow pages        {:>10}   (peak {})", st.pages_in_use, st.pages_peak);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_renders_exits() {
        let mut st = RunStats { memory: 256 << 20, ..Default::default() };
        st.exit(ExitReason::SerialOut);
        st.exit(ExitReason::SerialOut);
        st.exit(ExitReason::ExitDevice);
        st.hypercall("report");
        assert_eq!(st.total_exits(), 3);
        let text = st.render();
        assert!(text.contains("256 MiB"));
        assert!(text.lines().any(|l| l.contains("io-out:serial") && l.trim_end().ends_with('2')));
        assert!(text.contains("report"));
        let json = serde_json::to_value(st.exits).unwrap();
        assert_eq!(json, serde_json::json!({"io-out:exit": 1, "io-out:serial": 2}));
    }

    #[test]
    fn per_vcpu_counts_add_up_to_the_totals() {
        let mut a = RunStats::default();
        a.exit(ExitReason::SerialOut);
        a.hypercall("cpu_on");
        let mut b = RunStats::default();
        b.exit(ExitReason::SerialOut);
        b.exit(ExitReason::Interrupted);
        let mut total = a.clone();
        total.merge_vcpus([(0, &a), (1, &b)].into_iter());
        assert_eq!(total.total_exits(), 3);
        assert_eq!(total.exits.get(ExitReason::SerialOut), 2);
        assert_eq!(total.vcpus.len(), 2);
        assert_eq!(total.vcpus[1].total_exits, 2);
        let json = serde_json::to_value(&total).unwrap();
        assert_eq!(json["vcpus"][1]["index"], 1);
        assert_eq!(json["vcpus"][0]["hypercalls"]["cpu_on"], 1);
        assert!(serde_json::to_value(&a).unwrap().get("vcpus").is_none(), "one vCPU: no per-vCPU key");
        assert!(total.render().contains("vCPU 1"));
    }

    #[test]
    fn exit_reason_names_are_distinct() {
        let mut names: Vec<&str> = ExitReason::ALL.iter().map(|r| r.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ExitReason::ALL.len());
    }
}
