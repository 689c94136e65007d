//! A handle per vCPU thread, to kick it out of `KVM_RUN` and to send it
//! requests (Firecracker's `VcpuHandle`): the kick is the `immediate_exit`
//! flag of the thread's own `kvm_run`, set by the kick signal's handler on
//! that thread, plus the signal itself, which ends a blocking `KVM_RUN`
//! with `EINTR` (Documentation/virt/kvm/api.rst, `immediate_exit`).
//!
//! It lives beside the seam's [`VcpuContext`](super::VcpuContext) because
//! the MMU backends kick vCPUs for remote flushes; under `vcpu/` it made
//! `mmu` and `vcpu` import each other (`scripts/modcycles.py`).
//!
//! Invariants:
//! - A vCPU thread registers its `kvm_run` mapping ([`KickGuard::register`])
//!   for as long as it runs the vCPU and deregisters it before the mapping
//!   can go (the guard's drop); the mapping belongs to the vCPU's file
//!   descriptor, which outlives the thread (it is owned by the VM).
//! - The signal handler touches only this thread's registered `kvm_run`
//!   (a thread-local, const-initialised, no destructor: async-signal-safe).
//! - A kicked thread's next `KVM_RUN` returns `EINTR` at once; the run
//!   loop clears `immediate_exit` and looks at the stop flags before
//!   entering again, so a kick is never lost, whether it arrives in
//!   `KVM_RUN` or while the thread handles an exit. A kick with no stop
//!   flag set is the periodic progress sample (`vcpu::progress`), never
//!   the end of the run.
//! - A thread is signalled only while it is attached: a kick holds the
//!   handle's thread lock while it signals, and a thread detaches under
//!   that lock before it ends.
//! - Requests (start an application processor, `CPU_ON`) are kept in the
//!   handle under its mutex; the thread waits for one on the condition
//!   variable, so a vCPU that was never started never calls `KVM_RUN`.
//! - MMU requests (shadow and pv mode on SMP: a remote flush, a root to
//!   rebuild) use two atomics outside every lock, KVM's `vcpu->requests`
//!   and `vcpu->mode`: the vCPU thread stores `in_guest` then loads
//!   `mmu_request` before `KVM_RUN` ([`VcpuHandle::enter_guest`]), and a
//!   requester stores `mmu_request` then loads `in_guest`
//!   ([`VcpuHandle::stop_for_mmu`]); both `SeqCst`, so either the vCPU
//!   sees the request before it enters or the requester sees it in guest
//!   mode and kicks it. Leaving guest mode ([`VcpuHandle::leave_guest`])
//!   takes no lock, so a requester may wait for it while holding the VM's
//!   lock without deadlock.

use kvm_bindings::kvm_run;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

thread_local! {
    /// This thread's `kvm_run`, while it runs a vCPU.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub(crate) fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// The kick signal's handler: make this thread's next (or current)
/// `KVM_RUN` return at once.
pub(crate) fn on_kick_signal() {
    let _ = KVM_RUN.try_with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's registered kvm_run
            // mapping, valid while registered (module invariants); a
            // volatile byte store is what the kernel reads at entry.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

/// Registration of this thread's `kvm_run` for the kick; cleared on drop.
pub struct KickGuard(());

impl KickGuard {
    /// Register `run` (the vCPU's mapping) for this thread.
    ///
    /// # Safety
    /// `run` must stay mapped until the guard is dropped.
    pub unsafe fn register(run: *mut kvm_run) -> KickGuard {
        KVM_RUN.with(|p| p.set(run));
        KickGuard(())
    }
}

impl Drop for KickGuard {
    fn drop(&mut self) {
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    }
}

/// Where an application processor starts (`CPU_ON`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartRequest {
    /// `rip`.
    pub entry: u64,
    /// `rsp`.
    pub stack: u64,
    /// `rdi`.
    pub arg: u64,
}

/// One vCPU thread's handle.
#[derive(Default)]
pub struct VcpuHandle {
    /// The thread's `pthread_t` (0 until it runs and once it is about to
    /// end). A mutex, not an atomic: a kick signals the thread while
    /// holding it, so a thread that has detached cannot be signalled after
    /// it ended (the periodic kick comes from another thread at any time).
    thread: Mutex<u64>,
    /// Whether `CPU_ON` was accepted for it.
    started: AtomicBool,
    request: Mutex<Option<StartRequest>>,
    wake: Condvar,
    /// Between [`VcpuHandle::enter_guest`] and [`VcpuHandle::leave_guest`]
    /// (KVM's `vcpu->mode == IN_GUEST_MODE`).
    in_guest: AtomicBool,
    /// The MMU wants this vCPU to do its entry work before it runs guest
    /// code again (KVM's `vcpu->requests`).
    mmu_request: AtomicBool,
    /// Times the MMU kicked this vCPU out of `KVM_RUN`.
    mmu_kicks: std::sync::atomic::AtomicU64,
    /// The vCPU's CR3 when it last left guest mode (shadow and pv mode:
    /// the sync regs of `KVM_RUN`'s return; 0 until it ran).
    cr3: std::sync::atomic::AtomicU64,
}

impl VcpuHandle {
    /// Record the calling thread as this vCPU's.
    pub fn attach_current_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        *self.thread.lock().unwrap_or_else(|p| p.into_inner()) = me as u64;
    }

    /// Forget the thread (it is about to end): once this returns, no kick
    /// signals it.
    pub fn detach_thread(&self) {
        *self.thread.lock().unwrap_or_else(|p| p.into_inner()) = 0;
    }

    /// Whether `CPU_ON` was accepted for this vCPU.
    pub fn is_started(&self) -> bool {
        self.started.load(Ordering::SeqCst)
    }

    /// Kick the thread out of `KVM_RUN` (or out of its wait for a start).
    pub fn kick(&self) {
        self.wake.notify_all();
        let t = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        if *t != 0 {
            // SAFETY: `*t` is a live thread's pthread_t: a thread clears it
            // (`detach_thread`, under this lock, which we hold) before it
            // ends, so it cannot end and be joined while we signal it. The
            // kick handler is installed (`supervise`), so the signal only
            // interrupts.
            unsafe { libc::pthread_kill(*t as libc::pthread_t, kick_signal()) };
        }
    }

    /// Before `KVM_RUN`, with no VM lock held: mark the vCPU in guest mode;
    /// `false` (and out of guest mode again) when an MMU request arrived
    /// meanwhile — the caller does its entry work again first.
    pub fn enter_guest(&self) -> bool {
        self.in_guest.store(true, Ordering::SeqCst);
        if self.mmu_request.load(Ordering::SeqCst) {
            self.in_guest.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// After `KVM_RUN` returned, before any lock is taken, with the CR3
    /// it returned with: recorded first, so a requester that saw the vCPU
    /// leave guest mode reads it ([`VcpuHandle::cr3`]).
    pub fn leave_guest(&self, cr3: u64) {
        self.cr3.store(cr3, Ordering::SeqCst);
        self.in_guest.store(false, Ordering::SeqCst);
    }

    /// The vCPU's CR3 as it last left guest mode (0: never ran). Exact
    /// for a vCPU [`VcpuHandle::stop_for_mmu`] stopped while the caller
    /// holds the VM's lock: it cannot run again before.
    pub fn cr3(&self) -> u64 {
        self.cr3.load(Ordering::SeqCst)
    }

    /// At the head of the run loop, before the entry work: the requests
    /// so far are about to be served. Returns whether one was pending.
    pub fn take_mmu_request(&self) -> bool {
        self.mmu_request.swap(false, Ordering::SeqCst)
    }

    /// Whether an MMU request is pending (a kick that was the MMU's, not
    /// the periodic progress sample).
    pub fn mmu_request_pending(&self) -> bool {
        self.mmu_request.load(Ordering::SeqCst)
    }

    /// Ask the vCPU to do its entry work before it runs guest code again,
    /// and if it is in guest mode kick it and wait until it is out (KVM's
    /// `kvm_make_all_cpus_request` with `KVM_REQUEST_WAIT`). Returns
    /// whether it had to be kicked. Safe under the VM's lock: leaving
    /// guest mode takes none.
    pub fn stop_for_mmu(&self) -> bool {
        self.mmu_request.store(true, Ordering::SeqCst);
        if !self.in_guest.load(Ordering::SeqCst) {
            return false;
        }
        self.mmu_kicks.fetch_add(1, Ordering::Relaxed);
        self.kick();
        let mut spins = 0u32;
        while self.in_guest.load(Ordering::SeqCst) {
            spins += 1;
            if spins.is_multiple_of(1024) {
                // The kick signal may have reached the thread just before
                // it entered (then `immediate_exit` ends the entry) or be
                // lost to a thread between registrations: send it again.
                self.kick();
            }
            std::thread::yield_now();
        }
        true
    }

    /// Times the MMU kicked this vCPU out of `KVM_RUN`.
    pub fn mmu_kicks(&self) -> u64 {
        self.mmu_kicks.load(Ordering::Relaxed)
    }

    /// Accept a start request unless one was accepted before.
    pub fn request_start(&self, req: StartRequest) -> bool {
        if self.started.swap(true, Ordering::SeqCst) {
            return false;
        }
        *self.request.lock().unwrap_or_else(|p| p.into_inner()) = Some(req);
        self.wake.notify_all();
        true
    }

    /// Wait for a start request until `stop` says the VM is over.
    pub fn wait_for_start(&self, stop: &AtomicBool) -> Option<StartRequest> {
        let mut req = self.request.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if stop.load(Ordering::SeqCst) {
                return None;
            }
            if let Some(r) = req.take() {
                return Some(r);
            }
            // A timeout too, so a notification sent between the check and
            // the wait costs at most this long.
            req = self.wake.wait_timeout(req, Duration::from_millis(50)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vcpu_starts_once() {
        let h = VcpuHandle::default();
        let r = StartRequest { entry: 1, stack: 2, arg: 3 };
        assert!(h.request_start(r));
        assert!(!h.request_start(r), "a second CPU_ON is refused");
        assert_eq!(h.wait_for_start(&AtomicBool::new(false)), Some(r));
    }

    #[test]
    fn an_mmu_request_is_seen_before_entry_or_answered_by_a_kick() {
        let h = VcpuHandle::default();
        // Outside guest mode: no kick, the request waits for the entry.
        assert!(!h.stop_for_mmu());
        assert!(!h.enter_guest(), "the pending request stops the entry");
        assert!(h.take_mmu_request());
        assert!(h.enter_guest());
        h.leave_guest(0x1000);
        assert_eq!(h.cr3(), 0x1000);
        assert_eq!(h.mmu_kicks(), 0);
    }

    #[test]
    fn a_waiting_vcpu_leaves_when_the_vm_stops() {
        let h = std::sync::Arc::new(VcpuHandle::default());
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (h2, s2) = (h.clone(), stop.clone());
        let t = std::thread::spawn(move || h2.wait_for_start(&s2));
        stop.store(true, Ordering::SeqCst);
        h.kick();
        assert_eq!(t.join().unwrap(), None);
    }
}
