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
//!   CR0.WP = 0 under SMEP/SMAP, livelock detection; its module doc is the
//!   five-minute explanation (after KVM's `mmu.rst`) and states the
//!   invariants and the paging controls the vCPU runs with. Its state is
//!   split as KVM's: [`ShadowMmu`] per VM (shadow pages, reverse map,
//!   pool, root cache, coherence, counters), [`ShadowVcpu`] per vCPU
//!   (current root, paging controls, last fixed fault). Its files, after
//!   KVM's `arch/x86/kvm/mmu/`:
//!   - `mmu/vm.rs`, `mmu/vcpu.rs`: the per-VM and per-vCPU state;
//!   - `mmu/page.rs`: shadow pages and roles (`mmu_internal.h`);
//!   - `mmu/spte.rs`: the shadow leaf, CR0.WP = 0, SMEP, SMAP (`spte.c`);
//!   - `mmu/root.rs`: `LOAD_CR3`, the root cache, prefill;
//!   - `mmu/fault.rs`: `SHADOW_FAULT` (`paging_tmpl.h`);
//!   - `mmu/sync.rs`: trapped PTE writes, zapping, `FLUSH_TLB`;
//!   - `mmu/page_track.rs`: the frames whose writes trap (`page_track.c`);
//!   - `mmu/pool.rs`: allocation, quarantine, the zap of everything;
//!   - `mmu/coherence.rs`: TLB generations and the vCPUs' flushes, the
//!     quarantine, deferral, pool repair;
//!   - `mmu/pv.rs`: pv mode's batches, prefetch and published roots;
//!   - `mmu/remote.rs`: pv on SMP, every queue at a sync point and the
//!     paravirtual remote TLB flush;
//!   - `mmu/invariants.rs`, `mmu/stats.rs`, `mmu/error.rs`: the checker,
//!     the counters, the errors.
//!
//! `tests/exactness.rs` checks the MMU under every paging control against
//! the SDM with a modelled vCPU (CR4.SMEP/SMAP included, which the
//! development hosts cannot give a guest); `mmu/smp_tests.rs` drives
//! several vCPUs with modelled TLBs against what hardware may translate.
#![deny(unsafe_code)]

pub mod mmu;
pub mod walker;

pub use guest_abi::{Gpa, Gva};
pub use mmu::{
    BatchOutcome, EntryWork, FaultOutcome, FlushTicket, MAX_VCPUS, RemoteFlush, RemoteFlushOutcome, ShadowError,
    ShadowMmu, ShadowRoot, ShadowStats, ShadowVcpu, TableFrames, VcpuSet,
};
pub use walker::{Access, GuestPhys, PageFault, PagingMode, Translation, walk};
