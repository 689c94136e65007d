//! The run loop of one vCPU: `KVM_RUN`, the exit decoded (`vcpu::exit`),
//! and each exit dispatched — to the UART and the exit device, to the MMU
//! backend (the mode's hypercalls, `LOAD_CR3`, `SHADOW_FAULT`,
//! `FLUSH_TLB`, trapped page-table writes, host coherence before each
//! entry: `mmu`'s seam), or to the hypercall device (`REPORT`, `NOW`,
//! `EXPLAIN`). It holds no mode-specific code.
//!
//! It runs on [`VmState`] (per-VM: memory, devices, the MMU backend) and
//! one [`Vcpu`] (per-vCPU: its file descriptor, its exit counts), so a VM
//! with several vCPUs would run one such loop per vCPU thread.
//!
//! Invariants: registers are read through the sync-regs area of `kvm_run`
//! (`KVM_SYNC_X86_REGS`), so a hypercall costs one exit and no extra ioctl;
//! the result goes back the same way. A guest is hostile: every exit it can
//! cause is counted and answered, none panics the VMM, and what it can make
//! the VMM keep or print is bounded (`limits`).

use super::{GuestExit, RunOutcome, VmState};
use crate::devices::hypercall::{self, HypercallContext, Report};
use crate::error::{Error, Result};
use crate::limits::ReportBudget;
use crate::mmu::VcpuContext;
use crate::mmu::explain::Explanation;
use crate::stats::{BenchPhase, ExitReason, RunStats};
use crate::vcpu::Vcpu;
use crate::vcpu::exit::Action;
use guest_abi::hypercall as hc;
use guest_abi::ports::exit_status;
use guest_abi::{Gpa, Gva};
use kvm_ioctls::SyncReg;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use vm_memory::{Bytes, GuestAddress};

impl VmState {
    /// The translation chain of `gva` in the address space of `vcpu`.
    pub(super) fn explain(&self, vcpu: &VcpuContext, gva: Gva) -> Result<Explanation> {
        crate::mmu::explain::explain(&self.ctx, vcpu, self.mmu.as_ref(), self.config.mmu.name(), gva)
    }

    /// Run `vcpu` until the guest ends, the vCPU dies or `expired` is set;
    /// its statistics and the guest's reports make the outcome.
    pub(super) fn run_vcpu(&mut self, vcpu: &mut Vcpu, expired: &AtomicBool) -> RunOutcome {
        vcpu.stats = RunStats {
            memory: self.config.memory,
            backing: self.config.backing.to_string(),
            mmu: self.config.mmu.name(),
            ..Default::default()
        };
        let mut reports = Vec::new();
        let mut budget = ReportBudget::default();
        let started = Instant::now();
        vcpu.stats.setup_time = started.duration_since(self.config.process_start);
        let end = self.run_until_end(vcpu, expired, &mut reports, &mut budget);
        let mut stats = std::mem::take(&mut vcpu.stats);
        stats.reports_dropped = budget.dropped;
        stats.explain_suppressed = self.explain_prints.suppressed();
        stats.warnings_suppressed = self.ctx.warnings().suppressed() + self.mmu.warnings_suppressed();
        stats.run_time = started.elapsed();
        self.serial.writer_mut().drain();
        stats.huge_backed = self.ctx.ram().huge_backed_bytes().ok();
        stats.shadow = self.mmu.report();
        stats.guest_boot_cycles = reports.iter().find_map(|r| match r {
            Report::Boot { boot_cycles, .. } => Some(*boot_cycles),
            _ => None,
        });
        RunOutcome { end, stats, reports }
    }

    /// Snapshot the counters at a workload's `BENCH_BEGIN`; turn the
    /// difference into a [`BenchPhase`] at its `BENCH`.
    fn bench_marker(&mut self, vcpu: &mut Vcpu, report: Option<&Report>) {
        let mmu_now = self.mmu.counters();
        match report {
            Some(Report::BenchBegin { .. }) => {
                vcpu.bench_start = Some((Instant::now(), vcpu.stats.exits, mmu_now));
            }
            Some(Report::Bench { name, ops, cycles, ok }) => {
                let Some((t0, exits0, mmu0)) = vcpu.bench_start.take() else { return };
                let mut exits = vcpu.stats.exits.since(&exits0);
                // The closing REPORT is the measurement's own exit.
                exits.uncount(ExitReason::Hypercall);
                let (shadow, shadow_handler_time) = match (mmu0, mmu_now) {
                    (Some(c0), Some(c1)) => {
                        (Some(c1.shadow.since(&c0.shadow)), Some(c1.handler_time.saturating_sub(c0.handler_time)))
                    }
                    _ => (None, None),
                };
                vcpu.stats.bench.push(BenchPhase {
                    name: name.clone(),
                    ops: *ops,
                    cycles: *cycles,
                    ok: *ok,
                    wall: t0.elapsed(),
                    exits,
                    shadow,
                    shadow_handler_time,
                });
            }
            _ => {}
        }
    }

    /// `EXPLAIN(gva)`: print the chain to stderr now (the first
    /// [`crate::limits::MAX_EXPLAIN_PRINTS`] of a run; the rest are only
    /// counted); answer the GPA, or `ERR_FAULT` when the address is not
    /// mapped.
    fn explain_hypercall(&mut self, vcpu: &Vcpu, gva: Gva) -> u64 {
        match self.explain(&vcpu.ctx, gva) {
            Ok(e) => {
                if self.explain_prints.allow() {
                    // Through the diagnostics queue: a blocked stderr must
                    // not block the vCPU thread.
                    let _ = self.diag.write_all(e.render().as_bytes());
                    self.diag.drain();
                }
                e.gpa().map_or(hc::ERR_FAULT, Gpa::raw)
            }
            Err(err) => {
                if self.ctx.warnings().allow() {
                    log::warn!("EXPLAIN({gva:#x}) failed: {err}");
                }
                hc::ERR_FAULT
            }
        }
    }

    /// Hypercall `nr`, from one table: the MMU backend has first refusal
    /// (a mode's own hypercalls), then the MMU events every mode answers
    /// (`LOAD_CR3`, `SHADOW_FAULT`, `FLUSH_TLB`; ept mode answers
    /// `ERR_UNAVAILABLE`), `EXPLAIN`, and the device's own (`REPORT`,
    /// `NOW`, unknown numbers).
    fn hypercall(
        &mut self,
        vcpu: &mut Vcpu,
        nr: u32,
        reports: &mut Vec<Report>,
        budget: &mut ReportBudget,
    ) -> Result<u64> {
        let r = vcpu.ctx.regs();
        if let Some(result) = self.mmu.hypercall(&mut self.ctx, &mut vcpu.ctx, nr, &r)? {
            return Ok(result);
        }
        Ok(match nr {
            hc::LOAD_CR3 => self.mmu.load_cr3(&mut self.ctx, &mut vcpu.ctx, Gpa(r.rdi), &r)?,
            hc::SHADOW_FAULT => self.mmu.fault(&mut self.ctx, &mut vcpu.ctx, Gva(r.rdi), r.rsi, &r)?,
            hc::FLUSH_TLB => self.mmu.flush(&mut self.ctx, &mut vcpu.ctx, r.rdi, r.rsi, &r)?,
            hc::EXPLAIN => self.explain_hypercall(vcpu, Gva(r.rdi)),
            _ => {
                let mut ctx = HypercallContext {
                    mem: self.ctx.ram().memory(),
                    ram: self.config.memory,
                    epoch: self.epoch,
                    reports,
                    budget,
                };
                hypercall::handle(&mut ctx, nr, [r.rdi, r.rsi, r.rcx, r.r8])
            }
        })
    }

    fn run_until_end(
        &mut self,
        vcpu: &mut Vcpu,
        expired: &AtomicBool,
        reports: &mut Vec<Report>,
        budget: &mut ReportBudget,
    ) -> Result<GuestExit> {
        loop {
            if expired.load(Ordering::SeqCst) {
                return Err(Error::Timeout(self.config.timeout));
            }
            self.mmu.before_entry(&mut self.ctx, &mut vcpu.ctx)?;
            let action = match vcpu.ctx.fd_mut().run() {
                Ok(exit) => Action::from_exit(exit, &mut self.serial),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    if expired.load(Ordering::SeqCst) {
                        vcpu.stats.exit(ExitReason::Interrupted);
                    } else {
                        // The supervisor's periodic kick: a progress
                        // sample, not an exit of the guest's.
                        self.progress_tick(vcpu)?;
                    }
                    continue;
                }
                Err(e) => return Err(Error::Kvm { what: "KVM_RUN", source: e }),
            };
            match &action {
                Action::MmioRead(addr) => {
                    let regs = vcpu.ctx.regs();
                    if let Some(why) = vcpu.progress.mmio_exit(false, *addr, &[], &regs) {
                        return Err(self.no_progress(vcpu, &regs, why));
                    }
                }
                Action::MmioWrite(addr, data, len)
                    if !self.ctx.map().slot_of(Gpa(*addr)).is_some_and(|s| s.readonly) =>
                {
                    let regs = vcpu.ctx.regs();
                    if let Some(why) = vcpu.progress.mmio_exit(true, *addr, &data[..*len], &regs) {
                        return Err(self.no_progress(vcpu, &regs, why));
                    }
                }
                _ => vcpu.progress.exit(),
            }
            match action {
                Action::SerialOut => {
                    vcpu.stats.exit(ExitReason::SerialOut);
                    self.serial.writer_mut().drain();
                }
                Action::SerialIn => vcpu.stats.exit(ExitReason::SerialIn),
                Action::ExitDevice(value) => {
                    vcpu.stats.exit(ExitReason::ExitDevice);
                    return Ok(GuestExit { value, status: exit_status(value) });
                }
                Action::Hypercall(nr) => {
                    vcpu.stats.exit(ExitReason::Hypercall);
                    vcpu.stats.hypercall(hc::name(nr));
                    let result = self.hypercall(vcpu, nr, reports, budget)?;
                    vcpu.ctx.fd_mut().sync_regs_mut().regs.rax = result;
                    vcpu.ctx.fd_mut().set_sync_dirty_reg(SyncReg::Register);
                    if nr == hc::REPORT && result == hc::OK {
                        self.bench_marker(vcpu, reports.last());
                    }
                }
                Action::OtherIoOut(port) => {
                    vcpu.stats.exit(ExitReason::UnclaimedOut);
                    log::debug!("guest wrote to unclaimed port {port:#x}; ignored");
                }
                Action::OtherIoIn(port) => {
                    vcpu.stats.exit(ExitReason::UnclaimedIn);
                    log::debug!("guest read unclaimed port {port:#x}; reads as all ones");
                }
                Action::MmioWrite(addr, data, len) => match self.mmu.mmio_write(&mut self.ctx, Gpa(addr), &data[..len])
                {
                    true => vcpu.stats.exit(ExitReason::PageTableWrite),
                    false => {
                        vcpu.stats.exit(ExitReason::MmioWrite);
                        log::debug!("guest wrote unbacked GPA {addr:#x}");
                    }
                },
                Action::MmioRead(addr) => {
                    // No device lives outside RAM: reads see all ones.
                    vcpu.stats.exit(ExitReason::MmioRead);
                    log::debug!("guest read unbacked GPA {addr:#x}");
                }
                Action::Hlt => {
                    vcpu.stats.exit(ExitReason::Hlt);
                    // No device of this VM ever raises an interrupt, so a
                    // halt never ends either way; but say which halt it was
                    // (RFLAGS.IF: `sti; hlt` waits for an interrupt).
                    let regs = vcpu.ctx.regs();
                    if regs.rflags & guest_abi::paging::RFLAGS_IF != 0 {
                        return Err(Error::GuestIdle { rip: regs.rip });
                    }
                    return Err(Error::GuestHalted { rip: regs.rip });
                }
                Action::Shutdown => {
                    vcpu.stats.exit(ExitReason::Shutdown);
                    return Err(Error::TripleFault { rip: vcpu.ctx.regs().rip });
                }
                Action::InternalError => {
                    vcpu.stats.exit(ExitReason::InternalError);
                    return Err(self.internal_error(vcpu));
                }
                Action::FailEntry(reason) => {
                    vcpu.stats.exit(ExitReason::FailEntry);
                    return Err(Error::FailEntry(reason));
                }
                Action::Other(what) => {
                    vcpu.stats.exit(ExitReason::Unexpected);
                    return Err(Error::UnexpectedExit { what, rip: vcpu.ctx.regs().rip });
                }
            }
        }
    }

    /// A periodic kick while the guest runs: end the run if the vCPU is
    /// stuck on an instruction that can only complete with an exit that
    /// never comes (`vcpu::progress`).
    fn progress_tick(&self, vcpu: &mut Vcpu) -> Result<()> {
        let regs = vcpu.ctx.fd().get_regs().map_err(|source| Error::Kvm { what: "KVM_GET_REGS", source })?;
        let sregs = vcpu.ctx.fd().get_sregs().map_err(|source| Error::Kvm { what: "KVM_GET_SREGS", source })?;
        let bytes = self.instruction_bytes(vcpu, regs.rip);
        let map = self.ctx.map();
        let gpa_of = |va: u64| {
            let t = vcpu.ctx.fd().translate_gva(va).ok().filter(|t| t.valid != 0)?;
            Some((t.physical_address, map.slot_of(Gpa(t.physical_address)).map(|s| s.readonly)))
        };
        match vcpu.progress.tick(&regs, &sregs, &bytes, gpa_of) {
            Some(why) => Err(self.no_progress(vcpu, &regs, why)),
            None => Ok(()),
        }
    }

    /// The error for a vCPU that makes no progress: the instruction at RIP
    /// named and its bytes.
    fn no_progress(&self, vcpu: &Vcpu, regs: &kvm_bindings::kvm_regs, why: String) -> Error {
        let bytes = self.instruction_bytes(vcpu, regs.rip);
        // The decoded instruction and only its own bytes (the text of one
        // instruction is bounded).
        let (instruction, len) = match crate::vcpu::progress::decode(&bytes, regs.rip) {
            Some((text, i)) => (text, i.len()),
            None => ("(undecodable)".to_string(), bytes.len()),
        };
        let hex = bytes[..len.min(bytes.len())].iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ");
        let bytes = if hex.is_empty() { "unreadable".to_string() } else { hex };
        Error::NoProgress { rip: regs.rip, instruction, bytes, why }
    }

    /// Describe a `KVM_EXIT_INTERNAL_ERROR`; for an emulation failure,
    /// include the instruction bytes at `rip`.
    fn internal_error(&self, vcpu: &mut Vcpu) -> Error {
        let rip = vcpu.ctx.regs().rip;
        let run = vcpu.ctx.fd_mut().get_kvm_run();
        // SAFETY: this is a KVM_EXIT_INTERNAL_ERROR exit, so the `internal`
        // member of the exit union is the valid one.
        let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
        if suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
            let bytes = self.instruction_bytes(vcpu, rip);
            let hex = if bytes.is_empty() {
                "unreadable".to_string()
            } else {
                bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
            };
            return Error::EmulationFailure { rip, bytes: hex, suberror };
        }
        Error::InternalError { rip, suberror }
    }

    /// Up to 15 bytes (the longest x86 instruction) at guest-virtual `rip`,
    /// translated page by page with `KVM_TRANSLATE`; stops at the first
    /// unmapped page.
    fn instruction_bytes(&self, vcpu: &Vcpu, rip: u64) -> Vec<u8> {
        let mut out = Vec::new();
        while out.len() < 15 {
            let va = rip.wrapping_add(out.len() as u64);
            let Ok(t) = vcpu.ctx.fd().translate_gva(va) else { break };
            if t.valid == 0 {
                break;
            }
            let in_page = (0x1000 - (va & 0xfff)) as usize;
            let n = in_page.min(15 - out.len());
            let mut buf = vec![0u8; n];
            if self.ctx.ram().memory().read_slice(&mut buf, GuestAddress(t.physical_address)).is_err() {
                break;
            }
            out.extend_from_slice(&buf);
        }
        out
    }
}
