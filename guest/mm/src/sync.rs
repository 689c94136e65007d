//! The lock abstraction the shared parts of the SMP allocators sit behind
//! ([`RawLock`], in the shape of the `lock_api` crate's `RawMutex`), the
//! [`Lock`] built on it, and [`SpinLock`], a test-and-test-and-set
//! implementation for host tests and benches.
//!
//! The guest kernel implements [`RawLock`] with its own spinlock (a ticket
//! lock, possibly one that also disables interrupts: the raw lock may keep
//! whatever state it needs, such as the saved interrupt flag, in itself);
//! host tests use [`SpinLock`]. Nothing here needs `std`.
//!
//! Invariants and trust assumptions:
//! - [`RawLock`] is an `unsafe trait`: an implementation promises mutual
//!   exclusion (between a `lock`/successful `try_lock` and the matching
//!   `unlock`, no other context returns from `lock` or succeeds in
//!   `try_lock`) and acquire/release ordering, so that everything written
//!   under the lock is seen by the next holder. [`Lock`] relies on exactly
//!   this and nothing else.
//! - A [`LockGuard`] is the only way to reach a [`Lock`]'s data through a
//!   shared reference, and unlocks when dropped; it is not `Send` (a
//!   kernel lock is released on the CPU that took it).
//! - This module and [`crate::percpu`] are the crate's `unsafe` besides
//!   [`crate::phys::DirectMap`].
#![allow(unsafe_code)]

use core::cell::UnsafeCell;
use core::marker::PhantomData;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicBool, Ordering};

/// A lock without data (`lock_api::RawMutex` in small).
///
/// # Safety
///
/// Implementations must provide mutual exclusion with acquire ordering on
/// `lock`/`try_lock` and release ordering on `unlock`, as the module doc
/// states.
pub unsafe trait RawLock {
    /// An unlocked lock.
    const INIT: Self;

    /// Take the lock, waiting as long as needed.
    fn lock(&self);

    /// Take the lock if it is free; `true` if taken.
    fn try_lock(&self) -> bool;

    /// Release the lock.
    ///
    /// # Safety
    ///
    /// The lock is held by the calling context.
    unsafe fn unlock(&self);
}

/// Data of type `T` behind a [`RawLock`].
pub struct Lock<R, T: ?Sized> {
    raw: R,
    data: UnsafeCell<T>,
}

// SAFETY: the data is reached from several threads only through a guard,
// one at a time (the raw lock's contract), so `T: Send` suffices, as for
// `std::sync::Mutex`.
unsafe impl<R: RawLock + Sync, T: ?Sized + Send> Sync for Lock<R, T> {}

impl<R: RawLock, T> Lock<R, T> {
    /// `value`, unlocked.
    pub const fn new(value: T) -> Self {
        Self { raw: R::INIT, data: UnsafeCell::new(value) }
    }

    /// The data, giving up the lock.
    pub fn into_inner(self) -> T {
        self.data.into_inner()
    }
}

impl<R: RawLock, T: ?Sized> Lock<R, T> {
    /// Take the lock.
    #[inline]
    pub fn lock(&self) -> LockGuard<'_, R, T> {
        self.raw.lock();
        LockGuard { lock: self, _not_send: PhantomData }
    }

    /// Take the lock if it is free.
    #[inline]
    pub fn try_lock(&self) -> Option<LockGuard<'_, R, T>> {
        if self.raw.try_lock() { Some(LockGuard { lock: self, _not_send: PhantomData }) } else { None }
    }

    /// The data, without locking: `&mut self` proves no one else holds it.
    pub fn get_mut(&mut self) -> &mut T {
        self.data.get_mut()
    }
}

impl<R: RawLock, T: core::fmt::Debug> core::fmt::Debug for Lock<R, T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.try_lock() {
            Some(g) => f.debug_tuple("Lock").field(&&*g).finish(),
            None => f.write_str("Lock(<locked>)"),
        }
    }
}

/// The held lock of a [`Lock`]; unlocks when dropped.
pub struct LockGuard<'a, R: RawLock, T: ?Sized> {
    lock: &'a Lock<R, T>,
    /// Not `Send`: released where it was taken.
    _not_send: PhantomData<*mut ()>,
}

impl<R: RawLock, T: ?Sized> Deref for LockGuard<'_, R, T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock, so no other reference to the
        // data exists (the raw lock's contract).
        unsafe { &*self.lock.data.get() }
    }
}

impl<R: RawLock, T: ?Sized> DerefMut for LockGuard<'_, R, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes this the only use of
        // the guard.
        unsafe { &mut *self.lock.data.get() }
    }
}

impl<R: RawLock, T: ?Sized> Drop for LockGuard<'_, R, T> {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: the guard exists only while its lock is held by this
        // context, and is dropped once.
        unsafe { self.lock.raw.unlock() }
    }
}

/// A test-and-test-and-set spinlock: for host tests and benches (the
/// guest kernel brings its own ticket lock, which is fair).
#[derive(Debug)]
pub struct SpinLock(AtomicBool);

// SAFETY: `lock` and `try_lock` succeed only by swapping `false` for
// `true` with acquire ordering, and `unlock` stores `false` with release
// ordering: mutual exclusion and the orderings the trait asks for.
unsafe impl RawLock for SpinLock {
    const INIT: Self = SpinLock(AtomicBool::new(false));

    #[inline]
    fn lock(&self) {
        while !self.try_lock() {
            while self.0.load(Ordering::Relaxed) {
                core::hint::spin_loop();
            }
        }
    }

    #[inline]
    fn try_lock(&self) -> bool {
        self.0.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok()
    }

    #[inline]
    unsafe fn unlock(&self) {
        self.0.store(false, Ordering::Release);
    }
}
