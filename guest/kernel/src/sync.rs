//! Locks: a ticket spinlock ([`SpinLock`]) and its interrupt-safe variant
//! ([`IrqSpinLock`]), and the kernel's lock order.
//!
//! # Lock order (a CPU holding a lock takes only locks further down)
//!
//! 1. `mm::MM` — the memory manager (buddy, slab, page tables, the user
//!    address space, the deferred-free gather). A TLB shootdown is started
//!    only by its holder, so one shootdown is in flight at a time
//!    (`tlb.rs`); the holder waits for the acknowledgements at a wait point.
//! 2. `report::BUFFER` — the report record being sent.
//! 3. `console::LOCK` — one line of console output (re-entrant on the same
//!    CPU, so a panic while printing still prints).
//!
//! `tlb::BATCH` (a plain [`SpinLock`]) is taken only by the holder of
//! `mm::MM`, for a few instructions; it nests inside MM and takes nothing.
//!
//! Interrupt handlers take no lock (they only flush TLBs, read atomics and
//! send IPIs), so a lock holder that waits for an interrupt-driven event
//! (a shootdown's acknowledgements) cannot deadlock with a handler.
//!
//! # Invariants
//!
//! - Tickets: `next` is the next ticket handed out, `serving` the one that
//!   owns the lock; FIFO, so no CPU starves (Linux's pre-qspinlock x86
//!   ticket lock).
//! - [`IrqSpinLock`] disables interrupts before taking a ticket and
//!   restores the caller's IF when the guard drops: no interrupt runs on a
//!   CPU while it holds the lock. A waiter does not spin in ring 0 (slow to
//!   interrupt here, docs/host.md): it registers in `waiters` and waits
//!   with `cli; check; sti; hlt`, so it serves shootdown IPIs meanwhile;
//!   the unlocker wakes every registered waiter with an IPI. The waiter's
//!   store to `waiters` and load of `serving`, and the unlocker's store to
//!   `serving` and load of `waiters`, are all `SeqCst`: one of the two
//!   sides sees the other, so no wake-up is lost.
//! - Taking a lock this CPU already holds is a bug and panics ("lock
//!   re-entered") instead of deadlocking: `owner` records the holder.
//! - With one CPU there is never contention; a waiter exists only with
//!   other CPUs online, whose APICs are enabled.

use crate::arch::{self, percpu};
use core::cell::UnsafeCell;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const NO_OWNER: u32 = u32::MAX;

/// The ticket lock itself, without data.
pub struct TicketLock {
    next: AtomicU32,
    serving: AtomicU32,
    owner: AtomicU32,
    waiters: AtomicU64,
}

impl TicketLock {
    /// An unlocked lock.
    pub const fn new() -> Self {
        TicketLock {
            next: AtomicU32::new(0),
            serving: AtomicU32::new(0),
            owner: AtomicU32::new(NO_OWNER),
            waiters: AtomicU64::new(0),
        }
    }

    /// Whether this CPU holds the lock.
    pub fn held_here(&self) -> bool {
        self.owner.load(Ordering::Relaxed) == percpu::cpu_id()
    }

    /// Take the lock. `sleep`: wait at a wait point (interrupts on while
    /// halted) rather than spinning with `pause`.
    fn acquire(&self, sleep: bool) {
        let me = percpu::cpu_id();
        if self.owner.load(Ordering::Relaxed) == me {
            panic!("lock re-entered");
        }
        let ticket = self.next.fetch_add(1, Ordering::Relaxed);
        if self.serving.load(Ordering::Acquire) != ticket {
            let bit = 1u64 << (me % 64);
            if sleep {
                self.waiters.fetch_or(bit, Ordering::SeqCst);
                arch::wait_until(|| self.serving.load(Ordering::SeqCst) == ticket);
                self.waiters.fetch_and(!bit, Ordering::Relaxed);
            } else {
                while self.serving.load(Ordering::Acquire) != ticket {
                    core::hint::spin_loop();
                }
            }
        }
        core::sync::atomic::fence(Ordering::Acquire);
        self.owner.store(me, Ordering::Relaxed);
    }

    fn release(&self) {
        self.owner.store(NO_OWNER, Ordering::Relaxed);
        self.serving.fetch_add(1, Ordering::SeqCst);
        let waiters = self.waiters.load(Ordering::SeqCst);
        if waiters != 0 {
            crate::smp::wake_mask(waiters);
        }
    }
}

impl Default for TicketLock {
    fn default() -> Self {
        Self::new()
    }
}

/// A ticket spinlock: waiters spin with `pause`. For sections of a few
/// instructions only, never held across a wait point.
pub struct SpinLock<T> {
    lock: TicketLock,
    data: UnsafeCell<T>,
}

// SAFETY: the ticket lock gives one CPU at a time the `&mut T`; `T: Send`
// because it is handed from CPU to CPU.
unsafe impl<T: Send> Sync for SpinLock<T> {}

impl<T> SpinLock<T> {
    /// A lock around `data`.
    pub const fn new(data: T) -> Self {
        SpinLock { lock: TicketLock::new(), data: UnsafeCell::new(data) }
    }

    /// Take the lock.
    pub fn lock(&self) -> SpinGuard<'_, T> {
        self.lock.acquire(false);
        SpinGuard { lock: self }
    }
}

/// Holds a [`SpinLock`].
pub struct SpinGuard<'a, T> {
    lock: &'a SpinLock<T>,
}

impl<T> Deref for SpinGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock.
        unsafe { &*self.lock.data.get() }
    }
}

impl<T> DerefMut for SpinGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the lock, and `&mut self` is unique.
        unsafe { &mut *self.lock.data.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.lock.release();
    }
}

/// An interrupt-safe ticket lock: interrupts are off while it is held,
/// and a waiter waits halted (module doc).
pub struct IrqSpinLock<T> {
    lock: TicketLock,
    data: UnsafeCell<T>,
}

// SAFETY: as for `SpinLock`.
unsafe impl<T: Send> Sync for IrqSpinLock<T> {}

impl<T> IrqSpinLock<T> {
    /// A lock around `data`.
    pub const fn new(data: T) -> Self {
        IrqSpinLock { lock: TicketLock::new(), data: UnsafeCell::new(data) }
    }

    /// Disable interrupts and take the lock; panics if this CPU holds it.
    pub fn lock(&self) -> IrqGuard<'_, T> {
        let irq = arch::interrupts_enabled();
        arch::disable_interrupts();
        self.lock.acquire(true);
        IrqGuard { lock: self, irq }
    }

    /// Whether this CPU holds the lock.
    pub fn held_here(&self) -> bool {
        self.lock.held_here()
    }
}

/// Holds an [`IrqSpinLock`]; restores the interrupt flag when dropped.
pub struct IrqGuard<'a, T> {
    lock: &'a IrqSpinLock<T>,
    irq: bool,
}

impl<T> Deref for IrqGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock.
        unsafe { &*self.lock.data.get() }
    }
}

impl<T> DerefMut for IrqGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the lock, and `&mut self` is unique.
        unsafe { &mut *self.lock.data.get() }
    }
}

impl<T> Drop for IrqGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.lock.release();
        if self.irq {
            arch::enable_interrupts();
        }
    }
}
