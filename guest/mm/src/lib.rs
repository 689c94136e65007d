//! The guest kernel's memory manager (buddy allocator with zones, slab
//! allocator, four-level paging, address spaces, demand paging, aging).
//!
//! Pure logic over a physical-memory access trait ([`phys::PhysMem`]), so
//! that everything here runs unchanged on the host under `cargo test`.
//!
//! Modules, bottom up: [`phys`] (memory access), [`buddy`] (frames, zones,
//! page-table pages), [`slab`] (objects), [`paging`] (four-level tables,
//! flush tokens, the MMU platform hook), [`vma`] (areas), [`aspace`]
//! (address spaces, fork with copy-on-write, munmap, mprotect), [`folio`]
//! (anonymous folio sizes), [`fault`] (demand paging in folios, COW break,
//! segfaults), [`aging`] (accessed-bit clock and reclaim);
//! beside them [`sync`] (the lock abstraction) and [`percpu`] (CPU ids and
//! per-CPU slots) for the SMP front ends.
//!
//! Invariants of the crate as a whole:
//! - `no_std`, allocation-free, no floating point, and no `core::fmt` on any
//!   path the guest executes (errors carry `as_str()` for that reason): the
//!   guest kernel is built without SSE, and precompiled `core::fmt` uses it.
//! - `unsafe` is denied everywhere except the guest's direct-map accessor
//!   ([`phys::DirectMap`]), the lock abstraction ([`sync`]) and the
//!   per-CPU slots ([`percpu`]); the allocators are safe code over them.
//! - SMP: the allocators themselves ([`buddy::BuddyAllocator`],
//!   [`slab::KmemCache`]) take `&mut self`; their per-CPU front ends
//!   ([`buddy::PerCpuBuddy`], [`slab::PerCpuCache`], [`slab::PerCpuKmalloc`])
//!   take `&self` and a CPU, keep the shared parts behind a
//!   [`sync::RawLock`] the kernel supplies, and state their lock order.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]
#![warn(missing_docs)]

/// `Display` and `core::error::Error` for error enums whose text is their
/// `as_str()` (which needs no formatting machinery, for the guest's paths):
/// the text is written once, in `as_str`.
macro_rules! display_as_str {
    ($($error:ty),+ $(,)?) => {$(
        impl core::fmt::Display for $error {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl core::error::Error for $error {}
    )+};
}
pub(crate) use display_as_str;

pub mod aging;
pub mod aspace;
pub mod buddy;
pub mod fault;
pub mod folio;
pub mod paging;
pub mod percpu;
pub mod phys;
pub mod slab;
pub mod sync;
#[cfg(test)]
mod testutil;
pub mod vma;

/// Size of a base page.
pub const PAGE_SIZE: u64 = 4096;
/// Size of a large page (PD-level mapping).
pub const LARGE_PAGE_SIZE: u64 = 2 << 20;
/// Size of a huge page (PDPT-level mapping).
pub const HUGE_PAGE_SIZE: u64 = 1 << 30;
