//! The vCPU: its per-vCPU state ([`Vcpu`]), the decoding of its exits
//! (`exit`) and the supervision of its thread ([`supervise`]).
//!
//! **Per-vCPU state** lives in [`Vcpu`]: the vCPU file descriptor and its
//! index ([`VcpuContext`], what an MMU backend may touch), its exit counts
//! and the rest of its run statistics, its bench snapshot, and its
//! no-progress watch ([`progress`]: each vCPU thread samples its own, at
//! its exits and at the supervisor's periodic kicks). Everything
//! VM-wide (memory, memory map, devices, the MMU backend) is the VM's
//! (`vm::VmState`). The run loop (`vm::run`) takes the VM's state and one
//! `Vcpu`, so that a VM with several vCPUs runs one loop per vCPU thread
//! over the same VM state (`vm::smp`). vCPU 0 boots the guest; the others
//! start at the guest's `CPU_ON` ([`handle`]).
//!
//! Trust: nothing here reads guest memory but [`progress`], which decodes
//! the (guest-chosen) instruction bytes the run loop hands it; exit data
//! is copied out of `kvm_run` once (`exit`) and every count is bounded by
//! `u64`.

pub(crate) mod exit;
pub mod progress;
pub mod supervise;

use crate::mmu::{MmuCounters, VcpuContext};
use crate::stats::{ExitCounts, RunStats};
use std::time::Instant;

/// The counters at a workload's `BENCH_BEGIN`: when, the exits so far, the
/// MMU backend's counters.
pub(crate) type BenchSnapshot = (Instant, ExitCounts, Option<MmuCounters>);

/// One vCPU's state: what the MMU may touch ([`VcpuContext`]), what the
/// run counts about it, and its open bench phase.
pub struct Vcpu {
    /// The vCPU file descriptor and index.
    pub(crate) ctx: VcpuContext,
    /// Exits by reason, hypercalls by name, bench phases (the run's
    /// statistics while the VM has one vCPU).
    pub(crate) stats: RunStats,
    /// Counters at the last `BENCH_BEGIN`.
    pub(crate) bench_start: Option<BenchSnapshot>,
    /// Whether it still makes progress (issue 22, item 4).
    pub(crate) progress: progress::ProgressWatch,
}

impl Vcpu {
    /// The vCPU `ctx`, with nothing counted yet.
    pub fn new(ctx: VcpuContext) -> Vcpu {
        Vcpu { ctx, stats: RunStats::default(), bench_start: None, progress: progress::ProgressWatch::default() }
    }

    /// The vCPU's index in its VM.
    pub fn index(&self) -> u32 {
        self.ctx.index()
    }
}
