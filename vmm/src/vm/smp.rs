//! A VM with several vCPUs: one thread per vCPU, the guest's `CPU_ON`, and
//! the end of the run (docs/architecture.md, "SMP").
//!
//! Threads and ownership: the supervised thread (`Vm::run`) runs vCPU 0
//! and starts one scoped thread per application processor; each thread
//! owns its [`Vcpu`] (file descriptor, statistics). The VM's state is
//! shared behind one mutex (`run::Shared`), taken to prepare an entry and
//! to handle an exit, never across `KVM_RUN`. [`Smp`] (shared through an
//! `Arc`, no lock of its own but per-handle ones) holds the handles and
//! the end of the run. Lock order: `Shared`, then a handle's request
//! mutex (`CPU_ON` is handled under `Shared`); `Smp::end` is taken alone.
//!
//! Application processors start in long mode at the guest's request
//! (`CPU_ON`, like PSCI on arm64), not by INIT/SIPI: with the in-kernel
//! irqchip an AP is created UNINITIALIZED and its thread does not call
//! `KVM_RUN` until `CPU_ON` gives it registers; it then sets them, the
//! boot vCPU's boot sregs, and `KVM_SET_MP_STATE(RUNNABLE)`
//! (docs/host.md).
//!
//! The end: the first vCPU whose loop ends (the exit device, a triple
//! fault, an unhandled exit, an error, the timeout on vCPU 0, a panic)
//! records the outcome with its index, sets `stop` and kicks every other
//! vCPU (`immediate_exit` + signal, `mmu::vcpu_handle`); every thread then
//! returns and the scope joins them all. No thread is left behind, and
//! the console is drained by the caller afterwards.

use super::GuestExit;
use super::run::{Shared, run_loop};
use crate::error::{Error, Result, kvm_err};
use crate::mmu::vcpu_handle::{KickGuard, StartRequest, VcpuHandle};
use crate::vcpu::Vcpu;
use guest_abi::hypercall as hc;
use kvm_bindings::{KVM_MP_STATE_RUNNABLE, kvm_mp_state, kvm_regs, kvm_sregs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the vCPU threads of a VM with several vCPUs share besides the VM's
/// state.
pub(crate) struct Smp {
    /// One per vCPU, by index (shared with the MMU backend, which kicks
    /// vCPUs for remote flushes: `mmu::vcpu_handle`, "MMU requests").
    handles: Arc<[VcpuHandle]>,
    /// The boot vCPU's boot sregs, which every AP starts with.
    boot_sregs: kvm_sregs,
    /// Set once the run is over: every loop returns.
    stop: AtomicBool,
    /// The first ending: which vCPU, and how.
    end: Mutex<Option<(u32, Result<GuestExit>)>>,
}

impl Smp {
    /// For `cpus` vCPUs whose APs start with `boot_sregs`.
    pub(crate) fn new(cpus: u32, boot_sregs: kvm_sregs) -> Smp {
        Smp {
            handles: (0..cpus).map(|_| VcpuHandle::default()).collect::<Vec<_>>().into(),
            boot_sregs,
            stop: AtomicBool::new(false),
            end: Mutex::new(None),
        }
    }

    /// The vCPUs' handles, for the MMU backend's kicks.
    pub(crate) fn handles(&self) -> Arc<[VcpuHandle]> {
        self.handles.clone()
    }

    /// `CPU_ON(cpu, entry, stack, arg)` (guest_abi::hypercall::CPU_ON).
    pub(crate) fn cpu_on(&self, cpu: u64, entry: u64, stack: u64, arg: u64) -> u64 {
        if cpu == 0 || cpu >= self.handles.len() as u64 {
            return hc::ERR_INVALID;
        }
        if !ept::walk::is_canonical(guest_abi::Gva(entry)) || !ept::walk::is_canonical(guest_abi::Gva(stack)) {
            return hc::ERR_FAULT;
        }
        if !self.handles[cpu as usize].request_start(StartRequest { entry, stack, arg }) {
            return hc::ERR_INVALID;
        }
        hc::OK
    }

    /// Record how vCPU `index` ended (the first ending wins; `Stopped` is
    /// not an ending), then stop and kick every vCPU.
    fn finish(&self, index: u32, r: Result<GuestExit>) {
        if !matches!(r, Err(Error::Stopped)) {
            let mut end = self.end.lock().unwrap_or_else(|p| p.into_inner());
            if end.is_none() {
                *end = Some((index, r));
            }
        }
        self.stop_all();
    }

    /// Kick every application processor that `CPU_ON` started (the
    /// periodic progress sample, `vcpu::progress`): with neither `stop` nor
    /// the timeout set, its loop samples its progress and enters again.
    pub(crate) fn kick_started_aps(&self) {
        for h in self.handles.iter().skip(1).filter(|h| h.is_started()) {
            h.kick();
        }
    }

    /// Stop and kick every vCPU.
    fn stop_all(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.handles.iter() {
            h.kick();
        }
    }
}

/// Ends the run if a vCPU thread unwinds (a VMM bug): without it the
/// other threads would run on until the timeout.
struct EndOnPanic<'a>(&'a Smp, u32);

impl Drop for EndOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Stop the others at once; the panic's message comes with the
            // join (an AP) or through `supervise` (vCPU 0).
            self.0.stop_all();
        }
        self.0.handles[self.1 as usize].detach_thread();
    }
}

/// Run vCPU 0 on this thread and every AP on a thread of its own; return
/// the first ending, naming its vCPU.
pub(super) fn run_all(
    shared: &Mutex<Shared<'_>>,
    smp: &Arc<Smp>,
    bsp: &mut Vcpu,
    aps: &mut [Vcpu],
    expired: &AtomicBool,
    timeout: Duration,
) -> Result<GuestExit> {
    std::thread::scope(|scope| {
        let mut threads = Vec::new();
        for ap in aps.iter_mut() {
            let index = ap.index();
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn_scoped(scope, move || ap_thread(shared, smp, ap, expired, timeout));
            match spawned {
                Ok(t) => threads.push((index, t)),
                Err(e) => smp.finish(index, Err(Error::Io(e))),
            }
        }
        {
            let _guard = EndOnPanic(smp, 0);
            smp.handles[0].attach_current_thread();
            // SAFETY: vCPU 0's kvm_run mapping lives as long as its file
            // descriptor, which outlives this call; the guard deregisters
            // it.
            let kick = unsafe { KickGuard::register(bsp.ctx.fd_mut().get_kvm_run()) };
            let r = run_loop(shared, bsp, expired, Some(&smp.stop), Some(&smp.handles[0]), timeout);
            drop(kick);
            smp.finish(0, r);
        }
        // Join each AP here, so that a panicking one (a VMM bug) ends the
        // run with its message instead of unwinding the scope.
        for (index, t) in threads {
            if let Err(payload) = t.join() {
                let message = crate::vcpu::supervise::panic_message(&*payload);
                smp.finish(index, Err(Error::VcpuPanicked(format!("vCPU {index}: {message}"))));
            }
        }
    });
    let (index, r) = smp.end.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or((0, Err(Error::Stopped)));
    r.map_err(|e| match e {
        // VM-wide endings name no vCPU.
        Error::Timeout(_) | Error::ConsoleBlocked { .. } => e,
        e => Error::OnVcpu { index, source: Box::new(e) },
    })
}

/// An application processor's thread: wait for `CPU_ON`, start in long
/// mode, run until the VM ends.
fn ap_thread(shared: &Mutex<Shared<'_>>, smp: &Smp, ap: &mut Vcpu, expired: &AtomicBool, timeout: Duration) {
    let index = ap.index();
    let _guard = EndOnPanic(smp, index);
    let handle = &smp.handles[index as usize];
    handle.attach_current_thread();
    let Some(req) = handle.wait_for_start(&smp.stop) else { return };
    if let Err(e) = start_ap(smp, ap, req) {
        smp.finish(index, Err(e));
        return;
    }
    // SAFETY: the AP's kvm_run mapping lives as long as its file
    // descriptor, which outlives this thread; the guard deregisters it.
    let kick = unsafe { KickGuard::register(ap.ctx.fd_mut().get_kvm_run()) };
    let r = run_loop(shared, ap, expired, Some(&smp.stop), Some(handle), timeout);
    drop(kick);
    smp.finish(index, r);
}

/// Give the AP its `CPU_ON` registers (guest_abi::hypercall::CPU_ON) and
/// make it runnable.
fn start_ap(smp: &Smp, ap: &mut Vcpu, req: StartRequest) -> Result<()> {
    let fd = ap.ctx.fd();
    // The boot vCPU's control registers and segments, but the AP's own
    // APIC base (the boot vCPU's has the BSP flag, bit 8) and no pending
    // interrupt.
    let own = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let sregs = kvm_sregs { apic_base: own.apic_base, interrupt_bitmap: own.interrupt_bitmap, ..smp.boot_sregs };
    fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    fd.set_fpu(&crate::boot::regs::reset_fpu()).map_err(kvm_err("KVM_SET_FPU"))?;
    let regs = kvm_regs {
        rip: req.entry,
        rsp: req.stack,
        rdi: req.arg,
        rsi: ap.index() as u64,
        rflags: 0x2,
        ..Default::default()
    };
    fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
    fd.set_mp_state(kvm_mp_state { mp_state: KVM_MP_STATE_RUNNABLE }).map_err(kvm_err("KVM_SET_MP_STATE"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_on_checks_its_arguments_and_starts_a_cpu_once() {
        let smp = Smp::new(4, kvm_sregs::default());
        let ok_va = 0xffff_ffff_8020_0000;
        assert_eq!(smp.cpu_on(0, ok_va, ok_va, 0), hc::ERR_INVALID, "the boot vCPU runs already");
        assert_eq!(smp.cpu_on(4, ok_va, ok_va, 0), hc::ERR_INVALID, "no vCPU 4 of 4");
        assert_eq!(smp.cpu_on(u64::MAX, ok_va, ok_va, 0), hc::ERR_INVALID);
        assert_eq!(smp.cpu_on(1, 0x0000_8000_0000_0000, ok_va, 0), hc::ERR_FAULT, "non-canonical entry");
        assert_eq!(smp.cpu_on(1, ok_va, 0xffff_0000_0000_0000, 0), hc::ERR_FAULT, "non-canonical stack");
        assert_eq!(smp.cpu_on(1, ok_va, ok_va, 7), hc::OK);
        assert_eq!(smp.cpu_on(1, ok_va, ok_va, 7), hc::ERR_INVALID, "started twice");
        let req = smp.handles[1].wait_for_start(&AtomicBool::new(false));
        assert_eq!(req, Some(StartRequest { entry: ok_va, stack: ok_va, arg: 7 }));
    }

    #[test]
    fn the_first_ending_wins_and_stops_everyone() {
        let smp = Smp::new(2, kvm_sregs::default());
        smp.finish(1, Err(Error::TripleFault { rip: 0x1234 }));
        smp.finish(0, Err(Error::Stopped));
        assert!(smp.stop.load(Ordering::SeqCst));
        let end = smp.end.lock().unwrap().take();
        assert!(matches!(end, Some((1, Err(Error::TripleFault { rip: 0x1234 })))), "{end:?}");
        assert_eq!(smp.handles[1].wait_for_start(&smp.stop), None, "a waiting AP leaves");
    }
}
