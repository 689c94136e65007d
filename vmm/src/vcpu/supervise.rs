//! The vCPU thread's supervisor: run work on a thread of its own, report
//! its panic at once, and hold the caller's deadline whatever the thread
//! does (kicking it out of `KVM_RUN` with a signal, and abandoning it if it
//! does not stop).

use crate::mmu::vcpu_handle::kick_signal;
use std::time::{Duration, Instant};

/// How long after the timeout the vCPU thread may take to stop before the
/// run ends without it.
pub const VCPU_STOP_GRACE: Duration = Duration::from_secs(1);

/// How a supervised thread ended.
#[derive(Debug)]
pub enum Supervised<T> {
    /// It returned this.
    Done(T),
    /// It panicked with this message.
    Panicked(String),
    /// It was still running [`VCPU_STOP_GRACE`] (or the given grace) after
    /// the timeout; it was left running.
    Stuck,
}

/// The text of a panic payload.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic without a message)".to_string()
    }
}

/// Run `work` on a thread named `name` and wait for it at most `timeout`.
/// Until then the thread is kicked out of `KVM_RUN` every `tick` (when
/// given), and `on_tick` runs (it kicks the other vCPU threads of a VM
/// with several), so that the vCPU loop can check its progress even when
/// the guest never exits (`vcpu::progress`); the loop must treat a kick
/// before the timeout as a sample, not an exit.
/// A panic is reported as soon as it happens, with its message. At the
/// timeout, `on_timeout` runs once (it tells the work to stop) and the
/// thread is kicked with the vCPU kick signal every 20 ms (out of
/// `KVM_RUN`); if it has still not returned after `grace`, it is left
/// running and `Stuck` is returned: the caller's deadline holds whatever
/// the thread is doing.
pub fn supervise<T: Send + 'static>(
    name: &str,
    timeout: Duration,
    grace: Duration,
    tick: Option<Duration>,
    mut on_tick: impl FnMut(),
    on_timeout: impl FnOnce(),
    work: impl FnOnce() -> T + Send + 'static,
) -> Supervised<T> {
    use std::os::unix::thread::JoinHandleExt;
    use std::sync::mpsc::RecvTimeoutError;
    install_kick_handler();
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new().name(name.into()).spawn(move || {
        // `tx` moves in: a panic drops it, which wakes the waiter at once.
        let _ = tx.send(work());
    });
    let handle = match spawned {
        Ok(h) => h,
        Err(e) => return Supervised::Panicked(format!("cannot start the {name} thread: {e}")),
    };
    let finished = |handle: std::thread::JoinHandle<()>, got: Option<T>| match (handle.join(), got) {
        (_, Some(v)) => Supervised::Done(v),
        (Err(payload), None) => Supervised::Panicked(panic_message(&*payload)),
        (Ok(()), None) => Supervised::Panicked("the thread ended without a result".into()),
    };
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let wait = tick.map_or(left, |t| t.min(left));
        match rx.recv_timeout(wait) {
            Ok(v) => return finished(handle, Some(v)),
            Err(RecvTimeoutError::Disconnected) => return finished(handle, None),
            Err(RecvTimeoutError::Timeout) if Instant::now() >= deadline => break,
            Err(RecvTimeoutError::Timeout) => {
                // SAFETY: as for the kicks below: the handle is neither
                // joined nor detached, and the kick handler is installed.
                unsafe { libc::pthread_kill(handle.as_pthread_t(), kick_signal()) };
                on_tick();
            }
        }
    }
    on_timeout();
    let expired_at = Instant::now();
    loop {
        // SAFETY: the handle is neither joined nor detached, so its
        // pthread_t is valid (even if the thread has just ended); the kick
        // handler is installed, so the signal only interrupts a blocking
        // call such as KVM_RUN.
        unsafe { libc::pthread_kill(handle.as_pthread_t(), kick_signal()) };
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(v) => return finished(handle, Some(v)),
            Err(RecvTimeoutError::Disconnected) => return finished(handle, None),
            Err(RecvTimeoutError::Timeout) if expired_at.elapsed() >= grace => {
                // Dropping the handle detaches the thread.
                return Supervised::Stuck;
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    crate::mmu::vcpu_handle::on_kick_signal();
}

/// Install the handler of the signal that kicks a vCPU out of `KVM_RUN`
/// (it sets the thread's `immediate_exit`, `mmu::vcpu_handle`); without it the
/// signal would kill the process.
pub(crate) fn install_kick_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler) {
            log::warn!("cannot install the vCPU kick handler: {e}; --timeout may not interrupt a busy guest");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    // These check what ends a run, not how fast: the bounds are far from
    // the expected times and only catch a wait for the full timeout.

    #[test]
    fn a_panic_on_the_vcpu_thread_is_reported_at_once_with_its_message() {
        let start = Instant::now();
        let r = supervise(
            "vcpu-test",
            Duration::from_secs(120),
            VCPU_STOP_GRACE,
            None,
            || {},
            || {},
            || -> u32 { panic!("shadow walk hit an impossible entry") },
        );
        match r {
            Supervised::Panicked(msg) => assert_eq!(msg, "shadow walk hit an impossible entry"),
            other => panic!("{other:?}"),
        }
        assert!(start.elapsed() < Duration::from_secs(60), "reported at the timeout, not at once");
    }

    #[test]
    fn a_thread_that_ignores_the_timeout_is_left_behind() {
        let start = Instant::now();
        let told = Arc::new(AtomicBool::new(false));
        let t = told.clone();
        // A handler that runs far past the deadline and never looks at it.
        let r = supervise(
            "vcpu-test",
            Duration::from_millis(200),
            Duration::from_millis(200),
            None,
            || {},
            move || t.store(true, Ordering::SeqCst),
            || std::thread::sleep(Duration::from_secs(600)),
        );
        assert!(matches!(r, Supervised::Stuck), "{r:?}");
        assert!(told.load(Ordering::SeqCst), "on_timeout ran");
        assert!(start.elapsed() < Duration::from_secs(300), "waited for the handler");
    }

    #[test]
    fn a_thread_that_stops_when_told_is_done() {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let r = supervise(
            "vcpu-test",
            Duration::from_millis(100),
            Duration::from_secs(60),
            Some(Duration::from_millis(10)),
            || {},
            move || s.store(true, Ordering::SeqCst),
            move || {
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                7
            },
        );
        assert!(matches!(r, Supervised::Done(7)), "{r:?}");
    }

    #[test]
    fn every_tick_runs_on_tick_until_the_work_is_done() {
        // The work waits for three ticks (no time assumed: only the
        // safety timeout bounds it).
        let ticks = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let seen = ticks.clone();
        let r = supervise(
            "vcpu-test",
            Duration::from_secs(120),
            VCPU_STOP_GRACE,
            Some(Duration::from_millis(10)),
            || {
                ticks.fetch_add(1, Ordering::SeqCst);
            },
            || {},
            move || {
                while seen.load(Ordering::SeqCst) < 3 {
                    std::thread::sleep(Duration::from_millis(5));
                }
                7
            },
        );
        assert!(matches!(r, Supervised::Done(7)), "{r:?}");
    }
}
