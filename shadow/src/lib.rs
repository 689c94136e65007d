//! Software shadow paging: the x86-64 guest page-table walker and the
//! shadow MMU kept by the VMM (docs/architecture.md, "Shadow mode").
//!
//! This crate has no KVM dependency so that all of its logic is testable on
//! any host.
//!
//! - [`walker`]: the guest page-table walk with the full x86-64 rules — P,
//!   RW, US, NX (with EFER.NXE), PSE at PD level and at PDPT level when the
//!   guest's CPUID has 1 GiB pages, CR0.WP, reserved bits (MAXPHYADDR
//!   included), SMEP/SMAP with RFLAGS.AC, tables only in frames whose
//!   writes trap — returning either the
//!   translation with its effective permissions or the exact `#PF` error
//!   code (Intel SDM vol. 3 §4.6, §4.7), and setting A/D bits the way KVM's
//!   own walker does. It never loops and never panics on hostile tables.
//! - [`mmu`]: the shadow MMU — shadow pages with roles, the root cache,
//!   the reverse map, A/D emulation, PTE-write handling, host coherence,
//!   CR0.WP = 0 under SMEP/SMAP, livelock detection; its module doc states
//!   the invariants and the paging controls the vCPU runs with.
//!
//! `tests/exactness.rs` checks the MMU under every paging control against
//! the SDM with a modelled vCPU (CR4.SMEP/SMAP included, which the
//! development hosts cannot give a guest).
#![deny(unsafe_code)]

pub mod mmu;
pub mod walker;

pub use guest_abi::{Gpa, Gva};
pub use mmu::{BatchOutcome, FaultOutcome, ShadowError, ShadowMmu, ShadowRoot, ShadowStats, ShadowVcpu, TableFrames};
pub use walker::{Access, GuestPhys, PageFault, PagingMode, Translation, walk};
