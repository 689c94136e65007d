//! Per-CPU data for the SMP allocators: CPU ids ([`CpuId`]), the token a
//! CPU holds while it uses its own lock-free data ([`ThisCpu`], Linux's
//! `this_cpu_ptr` under `preempt_disable`), and the array of per-CPU slots
//! ([`PerCpu`]) each CPU reaches without a lock.
//!
//! How the guest kernel uses it: its GS-based per-CPU area knows the CPU's
//! id; with interrupts off (so that nothing else on that CPU can enter the
//! allocator) it makes a `ThisCpu` for that id and passes `&mut` to the
//! allocators' per-CPU paths. Host tests make one token per thread, each
//! with its own id.
//!
//! Invariants and trust assumptions:
//! - At most one [`ThisCpu`] for a given id is in use at any time. This is
//!   the contract of [`ThisCpu::new`] (an `unsafe fn`), and it is all that
//!   makes [`PerCpu::get`] sound: the slot of CPU `i` is reached only
//!   through `&mut` the token of id `i`, or through `&mut PerCpu`.
//! - A token is neither `Send` nor `Sync` nor `Clone`: it stays with the
//!   context that made it, and one token cannot open the same slot twice.
//! - Slots are cache-line aligned ([`CachePadded`]) so that CPUs working on
//!   their own slots do not share lines.
#![allow(unsafe_code)]

use core::cell::UnsafeCell;
use core::marker::PhantomData;
use core::ops::{Deref, DerefMut};

/// Most CPUs the per-CPU structures have room for (the VMM's `--vcpus`
/// limit).
pub const MAX_CPUS: usize = 64;

/// A CPU's id: `0..MAX_CPUS` (the APIC id, in this project).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct CpuId(u8);

impl CpuId {
    /// The boot CPU.
    pub const BOOT: CpuId = CpuId(0);

    /// CPU `i`, or `None` if `i >= MAX_CPUS`.
    pub const fn new(i: usize) -> Option<Self> {
        if i < MAX_CPUS { Some(CpuId(i as u8)) } else { None }
    }

    /// The id as an index.
    #[inline]
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

/// The right to use CPU `id`'s lock-free per-CPU data: held by the one
/// context running on that CPU with interrupts off (or by one host
/// thread standing for that CPU).
#[derive(Debug)]
pub struct ThisCpu {
    id: CpuId,
    /// Neither `Send` nor `Sync`.
    _local: PhantomData<*mut ()>,
}

impl ThisCpu {
    /// The token of CPU `id`.
    ///
    /// # Safety
    ///
    /// No other `ThisCpu` of the same id is in use while this one is: in
    /// the kernel, the caller runs on CPU `id` with interrupts (and any
    /// other way back into the allocators on this CPU) off until the token
    /// is dropped; a CPU that has gone offline may have its token made by
    /// another CPU to flush its data.
    pub const unsafe fn new(id: CpuId) -> Self {
        ThisCpu { id, _local: PhantomData }
    }

    /// The CPU's id.
    #[inline]
    pub const fn id(&self) -> CpuId {
        self.id
    }
}

/// `T` alone on its cache line(s).
#[derive(Clone, Copy, Default, Debug)]
#[repr(align(64))]
pub struct CachePadded<T>(pub T);

impl<T> Deref for CachePadded<T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> DerefMut for CachePadded<T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

/// A value with a constant initial state, so that per-CPU arrays can be
/// built in a `static` (the guest kernel's stacks are small).
pub trait ConstInit {
    /// The initial value.
    const INIT: Self;
}

/// One `T` per CPU, each reached without a lock by its own CPU.
pub struct PerCpu<T> {
    slots: [CachePadded<UnsafeCell<T>>; MAX_CPUS],
}

// SAFETY: slot `i` is reached only through `&mut` the unique token of CPU
// `i` (`get`) or through `&mut self`, so no two threads ever reach one slot
// at once; moving a `T` between threads that way needs `T: Send`.
unsafe impl<T: Send> Sync for PerCpu<T> {}

impl<T: ConstInit> PerCpu<T> {
    /// Every slot `T::INIT`.
    pub const fn new() -> Self {
        PerCpu { slots: [const { CachePadded(UnsafeCell::new(T::INIT)) }; MAX_CPUS] }
    }
}

impl<T: ConstInit> Default for PerCpu<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> PerCpu<T> {
    /// The calling CPU's slot.
    #[inline(always)]
    pub fn get<'a>(&'a self, cpu: &'a mut ThisCpu) -> &'a mut T {
        let slot = &self.slots[cpu.id.index()];
        // SAFETY: `cpu` is the only token of its id in use (`ThisCpu::new`'s
        // contract) and is borrowed mutably for as long as the result
        // lives, so this is the only reference to the slot.
        unsafe { &mut *slot.0.get() }
    }

    /// CPU `cpu`'s slot; `&mut self` proves no CPU is using it.
    pub fn get_mut(&mut self, cpu: CpuId) -> &mut T {
        self.slots[cpu.index()].0.get_mut()
    }

    /// Every slot, in CPU order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.slots.iter_mut().map(|s| s.0.get_mut())
    }
}

impl<T> core::fmt::Debug for PerCpu<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("PerCpu { .. }")
    }
}
