//! Locks: a ticket spinlock ([`SpinLock`]), its interrupt-safe variant
//! ([`IrqSpinLock`]), the allocators' lock ([`AllocLock`], the ticket lock
//! as a `guest_mm::sync::RawLock`), a write-once cell ([`InitOnce`]), and
//! the kernel's lock order.
//!
//! # Lock order (a CPU holding a lock takes only locks further down)
//!
//! 1. `mm::MM` — the memory manager's address-space side (page tables,
//!    the user address space, the deferred-free gather). A TLB shootdown
//!    is started only by its holder, so one shootdown is in flight at a
//!    time (`tlb.rs`); the holder waits for the acknowledgements at a
//!    wait point. The allocators are no longer behind it.
//! 2. A kmalloc cache lock (`mm::KMALLOC`, one per size class: the slab's
//!    slow paths; its fast paths take no lock).
//! 3. A per-CPU page lock (`mm::PCP`, one per CPU: its order-0 lists; the
//!    owning CPU takes it uncontended, others only to drain).
//! 4. The zone lock (inside the `PerCpuBuddy`: the buddy allocator's
//!    zones, free lists and metadata).
//! 5. `report::BUFFER` — the report record being sent.
//! 6. `console::LOCK` — one line of console output (re-entrant on the same
//!    CPU, so a panic while printing still prints).
//!
//! Locks 2-4 are [`AllocLock`]s; no allocator path takes two cache locks,
//! and pcp locks nest only in the invariant check, in CPU order. A holder
//! of 2-4 never waits for an interrupt-driven event (no shootdown is
//! started under them), so a CPU that waits for one halted, serving IPIs,
//! cannot block a shootdown. Every allocator call runs with interrupts off
//! (`mm::on_this_cpu`), which is what lets it use the CPU's lock-free
//! per-CPU data (`guest_mm::percpu::ThisCpu`).
//!
//! `tlb::BATCH` (a plain [`SpinLock`]) is taken only by the holder of
//! `mm::MM`, for a few instructions; it nests inside MM and takes nothing.
//!
//! Interrupt handlers take no lock and never allocate (they only flush
//! TLBs, read atomics and send IPIs), so a lock holder that waits for an
//! interrupt-driven event (a shootdown's acknowledgements) cannot deadlock
//! with a handler.
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
//! - [`AllocLock`] is taken only with interrupts off (every allocator call
//!   is made so); its waiters wait halted like [`IrqSpinLock`]'s. It counts
//!   the acquisitions on each CPU (in that CPU's own cache line) so the
//!   memory manager can tell its fast paths from its slow ones.
//! - [`InitOnce`] is written at most once; a reader sees the value only
//!   after the write completed (release/acquire on its state).

use crate::arch::{self, percpu};
use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use guest_mm::percpu::CachePadded;

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

    /// Take the lock if it is free, without waiting.
    fn try_acquire(&self) -> bool {
        let me = percpu::cpu_id();
        let serving = self.serving.load(Ordering::Acquire);
        if self.owner.load(Ordering::Relaxed) == me
            || self
                .next
                .compare_exchange(serving, serving.wrapping_add(1), Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return false;
        }
        self.owner.store(me, Ordering::Relaxed);
        true
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

/// The allocators' lock: a [`TicketLock`] whose waiters wait halted, taken
/// only with interrupts off (module doc), counting acquisitions per CPU.
pub struct AllocLock(TicketLock);

/// [`AllocLock`] acquisitions by each CPU, in its own cache line.
static ALLOC_LOCKS_TAKEN: [CachePadded<AtomicU64>; percpu::MAX_CPUS] =
    [const { CachePadded(AtomicU64::new(0)) }; percpu::MAX_CPUS];

impl AllocLock {
    fn count_here() {
        let slot = &ALLOC_LOCKS_TAKEN[percpu::cpu_id() as usize % percpu::MAX_CPUS];
        // Only this CPU writes its slot (interrupts are off): no
        // read-modify-write needed.
        slot.store(slot.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }
}

/// [`AllocLock`]s this CPU has taken since boot.
pub fn alloc_locks_taken_here() -> u64 {
    ALLOC_LOCKS_TAKEN[percpu::cpu_id() as usize % percpu::MAX_CPUS].load(Ordering::Relaxed)
}

// SAFETY: the ticket lock gives the lock to one CPU at a time (one ticket
// is served at a time, and `try_acquire` only takes the ticket being
// served), with acquire ordering when taken (the `Acquire` load or fence
// in `acquire`, the `Acquire` exchange in `try_acquire`) and release
// ordering when given back (the `SeqCst` increment of `serving`). Only the
// holder calls `unlock` (the trait's contract), on the CPU that took it.
unsafe impl guest_mm::sync::RawLock for AllocLock {
    const INIT: Self = AllocLock(TicketLock::new());

    #[inline]
    fn lock(&self) {
        self.0.acquire(true);
        Self::count_here();
    }

    #[inline]
    fn try_lock(&self) -> bool {
        let taken = self.0.try_acquire();
        if taken {
            Self::count_here();
        }
        taken
    }

    #[inline]
    unsafe fn unlock(&self) {
        self.0.release();
    }
}

/// A value written once (at boot, by the boot CPU) and read by every CPU
/// afterwards without a lock.
pub struct InitOnce<T> {
    /// 0: empty, 1: being written, 2: written.
    state: AtomicU8,
    value: UnsafeCell<MaybeUninit<T>>,
}

// SAFETY: the value is written once, before `state` becomes 2 (release),
// and only shared (`&T`) after a reader saw 2 (acquire); `T: Sync` because
// every CPU reads it, `T: Send` because the writer's CPU hands it over.
unsafe impl<T: Send + Sync> Sync for InitOnce<T> {}

impl<T> InitOnce<T> {
    /// An empty cell.
    pub const fn new() -> Self {
        InitOnce { state: AtomicU8::new(0), value: UnsafeCell::new(MaybeUninit::uninit()) }
    }

    /// Store `v`; `Err(v)` if the cell was already written (or is being).
    pub fn set(&self, v: T) -> Result<&T, T> {
        if self.state.compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed).is_err() {
            return Err(v);
        }
        // SAFETY: state 1 is ours alone (the exchange above), and no reader
        // reaches the value before state 2.
        let r = unsafe { (*self.value.get()).write(v) };
        self.state.store(2, Ordering::Release);
        Ok(r)
    }

    /// The value, once written.
    #[inline]
    pub fn get(&self) -> Option<&T> {
        if self.state.load(Ordering::Acquire) == 2 {
            // SAFETY: state 2 means the value was written and will never
            // be written again (module doc).
            Some(unsafe { (*self.value.get()).assume_init_ref() })
        } else {
            None
        }
    }
}

impl<T> Default for InitOnce<T> {
    fn default() -> Self {
        Self::new()
    }
}
