//! The contract between the VMM and the guest kernel.
//!
//! Everything both sides must agree on lives here and nowhere else: the
//! [`BootInfo`] record the VMM hands the guest in `rdi`, the I/O port
//! numbers, the hypercall numbers and results, the report records, and the
//! typed addresses of the four address spaces (GVA, GPA, HVA, HPA).
//!
//! Invariants:
//! - Every shared structure is `#[repr(C)]` with explicit padding and only
//!   integer fields, so its layout is the same in the freestanding guest and
//!   in the host VMM, and any bit pattern is a valid value (the VMM reads
//!   guest-written records without trusting them).
//! - [`BOOT_INFO_VERSION`] changes whenever [`BootInfo`]'s layout does.
//! - The crate is `no_std` and allocation-free; it builds for the guest
//!   (no SSE, no `core::fmt` needed) and for the host.
#![no_std]
#![deny(unsafe_code)]

pub mod addr;
pub mod boot;
pub mod hypercall;
pub mod paging;
pub mod ports;
pub mod pv;
pub mod report;

pub use addr::{Gpa, Gva, Hpa, Hva};
pub use boot::{
    BOOT_INFO_MAGIC, BOOT_INFO_VERSION, BootInfo, DIRECT_MAP_BASE, KERNEL_VMA, MAX_CPUS, MemRegion, MemRegionKind,
    MmuMode,
};
