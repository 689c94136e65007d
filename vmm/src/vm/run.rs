//! The run loop of one vCPU: `KVM_RUN`, the exit decoded (`vcpu::exit`),
//! and each exit dispatched — to the UART and the exit device, to the MMU
//! backend (the mode's hypercalls, `LOAD_CR3`, `SHADOW_FAULT`,
//! `FLUSH_TLB`, trapped page-table writes, host coherence before each
//! entry: `mmu`'s seam), or to the hypercall device (`REPORT`, `NOW`,
//! `EXPLAIN`). It holds no mode-specific code.
//!
//! It runs on [`VmState`] (per-VM: memory, devices, the MMU backend),
//! shared by every vCPU thread behind one mutex ([`Shared`]: taken to
//! prepare an entry and to handle an exit, never across `KVM_RUN`), and
//! one [`Vcpu`] (per-vCPU: its file descriptor, its exit counts). A VM
//! with several vCPUs runs one such loop per vCPU thread (`vm::smp`). A
//! kick (`mmu::vcpu_handle`) ends `KVM_RUN` with `EINTR`; the loop clears
//! `immediate_exit` and looks at the timeout and the stop flag before it
//! enters again. A kick with neither set is the supervisor's periodic
//! one (`Vm::run`, every `vcpu::progress::TICK`, to every running vCPU):
//! the vCPU samples its own progress and enters again.
//!
//! No progress (`vcpu::progress`, one watch per vCPU): every exit is
//! counted by the vCPU's watch before it is handled (an unbacked-MMIO
//! exit repeated with nothing changed ends the run), and each periodic
//! kick samples the registers; either way the error names the
//! instruction, and with several vCPUs `vm::smp` names the vCPU.
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
use crate::mmu::vcpu_handle::VcpuHandle;
use crate::stats::{BenchPhase, ExitReason, RunStats};
use crate::vcpu::Vcpu;
use crate::vcpu::exit::Action;
use guest_abi::hypercall as hc;
use guest_abi::ports::exit_status;
use guest_abi::{Gpa, Gva};
use kvm_ioctls::SyncReg;
use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use vm_memory::{Bytes, GuestAddress};

impl VmState {
    /// The translation chain of `gva` in the address space of `vcpu`.
    pub(super) fn explain(&self, vcpu: &VcpuContext, gva: Gva) -> Result<Explanation> {
        crate::mmu::explain::explain(&self.ctx, vcpu, self.mmu.as_ref(), self.config.mmu.name(), gva)
    }

    /// Run the VM's vCPUs (`bsp`, and the application processors `aps`,
    /// each on a thread of its own) until the guest ends, a vCPU dies or
    /// `expired` is set; their statistics (per vCPU and in total) and the
    /// guest's reports make the outcome.
    pub(super) fn run_vcpus(&mut self, bsp: &mut Vcpu, aps: &mut [Vcpu], expired: &AtomicBool) -> RunOutcome {
        let fresh = RunStats {
            memory: self.config.memory,
            backing: self.config.backing.to_string(),
            mmu: self.config.mmu.name(),
            ..Default::default()
        };
        bsp.stats = fresh.clone();
        for ap in aps.iter_mut() {
            ap.stats = fresh.clone();
        }
        let started = Instant::now();
        bsp.stats.setup_time = started.duration_since(self.config.process_start);
        let timeout = self.config.timeout;
        let smp = self.smp.clone();
        let shared = Mutex::new(Shared { vm: self, reports: Vec::new(), budget: ReportBudget::default() });
        let end = match &smp {
            Some(smp) if !aps.is_empty() => super::smp::run_all(&shared, smp, bsp, aps, expired, timeout),
            _ => run_loop(&shared, bsp, expired, None, None, timeout),
        };
        let Shared { reports, budget, .. } = shared.into_inner().unwrap_or_else(|p| p.into_inner());
        let mut stats = std::mem::take(&mut bsp.stats);
        if !aps.is_empty() {
            stats.merge_vcpus(std::iter::once((0, &stats.clone())).chain(aps.iter().map(|ap| (ap.index(), &ap.stats))));
            // Phases measured on application processors follow vCPU 0's.
            for ap in aps.iter_mut() {
                stats.bench.append(&mut ap.stats.bench);
            }
        }
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
                    vcpu: vcpu.index(),
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
        if nr == hc::CPU_ON {
            return Ok(match &self.smp {
                Some(smp) => smp.cpu_on(r.rdi, r.rsi, r.rcx, r.r8),
                // One vCPU: there is no CPU to start.
                None => hc::ERR_INVALID,
            });
        }
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

/// What the vCPU threads of one run share, behind one lock: the VM's state
/// and the run's reports. A thread holds the lock to prepare an entry and
/// to handle an exit, never across `KVM_RUN`.
pub(super) struct Shared<'a> {
    pub(super) vm: &'a mut VmState,
    pub(super) reports: Vec<Report>,
    pub(super) budget: ReportBudget,
}

/// Lock `shared`; a panic of another vCPU thread (which ends the run)
/// does not make the state unusable for the others' last steps.
pub(super) fn lock<'a, 'b>(shared: &'a Mutex<Shared<'b>>) -> std::sync::MutexGuard<'a, Shared<'b>> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared<'_> {
    /// Handle one exit of `vcpu`: `Some` when the guest ended the VM.
    fn handle(&mut self, vcpu: &mut Vcpu, action: Action) -> Result<Option<GuestExit>> {
        let Shared { vm, reports, budget } = self;
        let vm = &mut **vm;
        // The no-progress detector (`vcpu::progress`): an unbacked-MMIO
        // exit repeated with nothing changed, or any other exit.
        match &action {
            Action::MmioRead(addr) => {
                let regs = vcpu.ctx.regs();
                if let Some(why) = vcpu.progress.mmio_exit(false, *addr, &[], &regs) {
                    return Err(vm.no_progress(vcpu, &regs, why));
                }
            }
            Action::MmioWrite(addr, data, len) if !vm.ctx.map().slot_of(Gpa(*addr)).is_some_and(|s| s.readonly) => {
                let regs = vcpu.ctx.regs();
                if let Some(why) = vcpu.progress.mmio_exit(true, *addr, &data[..*len], &regs) {
                    return Err(vm.no_progress(vcpu, &regs, why));
                }
            }
            _ => vcpu.progress.exit(),
        }
        match action {
            Action::SerialOut => {
                vcpu.stats.exit(ExitReason::SerialOut);
                vm.serial.writer_mut().drain();
            }
            Action::SerialIn => vcpu.stats.exit(ExitReason::SerialIn),
            Action::ExitDevice(value) => {
                vcpu.stats.exit(ExitReason::ExitDevice);
                return Ok(Some(GuestExit { value, status: exit_status(value) }));
            }
            Action::Hypercall(nr) => {
                vcpu.stats.exit(ExitReason::Hypercall);
                vcpu.stats.hypercall(hc::name(nr));
                let result = vm.hypercall(vcpu, nr, reports, budget)?;
                vcpu.ctx.fd_mut().sync_regs_mut().regs.rax = result;
                vcpu.ctx.fd_mut().set_sync_dirty_reg(SyncReg::Register);
                if nr == hc::REPORT && result == hc::OK {
                    vm.bench_marker(vcpu, reports.last());
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
            Action::MmioWrite(addr, data, len) => {
                match vm.mmu.mmio_write(&mut vm.ctx, &mut vcpu.ctx, Gpa(addr), &data[..len]) {
                    true => vcpu.stats.exit(ExitReason::PageTableWrite),
                    false => {
                        vcpu.stats.exit(ExitReason::MmioWrite);
                        log::debug!("guest wrote unbacked GPA {addr:#x}");
                    }
                }
            }
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
                return Err(vm.internal_error(vcpu));
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
        vm.mmu.after_exit(&mut vm.ctx, &mut vcpu.ctx)?;
        Ok(None)
    }
}

/// Run `vcpu` until the guest ends the VM (`Ok`), the vCPU dies (`Err`),
/// `expired` is set (the timeout) or `stop` is (another vCPU ended the
/// VM: [`Error::Stopped`]).
pub(super) fn run_loop(
    shared: &Mutex<Shared<'_>>,
    vcpu: &mut Vcpu,
    expired: &AtomicBool,
    stop: Option<&AtomicBool>,
    handle: Option<&VcpuHandle>,
    timeout: std::time::Duration,
) -> Result<GuestExit> {
    loop {
        if expired.load(Ordering::SeqCst) {
            return Err(Error::Timeout(timeout));
        }
        if stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
            return Err(Error::Stopped);
        }
        // The MMU's requests so far are served by the entry work below
        // (`mmu::vcpu_handle`, "MMU requests").
        if let Some(h) = handle {
            h.take_mmu_request();
        }
        {
            let mut g = lock(shared);
            let vm = &mut *g.vm;
            vm.mmu.before_entry(&mut vm.ctx, &mut vcpu.ctx)?;
        }
        if handle.is_some_and(|h| !h.enter_guest()) {
            continue;
        }
        let run_area: *const kvm_bindings::kvm_run = vcpu.ctx.fd_mut().get_kvm_run();
        let ran = vcpu.ctx.fd_mut().run();
        // Out of guest mode before any lock is taken, with the CR3 KVM
        // copied out (the MMU's remote flush reads it: `mmu::vcpu_handle`).
        if let Some(h) = handle {
            // SAFETY: `run_area` is this vCPU's kvm_run mapping, alive as
            // long as its file descriptor; KVM filled the sync-regs area
            // before KVM_RUN returned, and the exit being decoded borrows
            // only the I/O data or the exit union, not this field. (In ept
            // mode the system registers are not synced and the value is
            // unused.)
            let cr3 = unsafe { std::ptr::addr_of!((*run_area).s.regs.sregs.cr3).read_volatile() };
            h.leave_guest(cr3);
        }
        let action = match ran {
            Ok(exit) => Action::from_exit(exit, &mut lock(shared).vm.serial),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A kick (mmu::vcpu_handle) or a signal.
                vcpu.ctx.fd_mut().set_kvm_immediate_exit(0);
                if expired.load(Ordering::SeqCst) || stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
                    // The end of the run: counted, and the loop's head
                    // returns.
                    vcpu.stats.exit(ExitReason::Interrupted);
                } else if handle.is_some_and(VcpuHandle::mmu_request_pending) {
                    // The MMU's kick (a remote flush): the loop's head
                    // does the entry work. Not an exit of the guest's.
                } else {
                    // The supervisor's periodic kick (`Vm::run`): a
                    // progress sample of this vCPU, not an exit of the
                    // guest's, and never the end of the run.
                    lock(shared).vm.progress_tick(vcpu)?;
                }
                continue;
            }
            Err(e) => return Err(Error::Kvm { what: "KVM_RUN", source: e }),
        };
        if let Some(end) = lock(shared).handle(vcpu, action)? {
            return Ok(end);
        }
    }
}
