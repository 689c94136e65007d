//! The VMM library: boots the bundled guest kernel under KVM and
//! virtualises its MMU three ways — `ept`, `shadow`, `pv`
//! (docs/architecture.md). The binary (`main.rs`) and its binary-only
//! module tree `cli/` (the command line, the run/test/bench/info/compare
//! commands, their tables and charts) sit on top of this library and
//! reach it as `vmm::`; everything a test drives is here.
//!
//! Module map, each depending only on modules listed before it (no import
//! cycle: `python3 scripts/modcycles.py vmm/src` prints none):
//!
//! - [`size`]: sizes and durations, parsed and printed.
//! - [`error`]: what went wrong, and which exit code that means.
//! - [`limits`]: the bounds on what a guest can make the VMM keep or print.
//! - [`boot`]: [`boot::layout`] names every boot-time address; the rest
//!   loads the kernel and writes the boot structures.
//! - [`devices`]: the UART, the exit device and the hypercall port.
//! - [`mmu`]: the seam between the run loop and the MMU modes — its
//!   neutral types (per-VM [`mmu::VmContext`], per-vCPU
//!   [`mmu::VcpuContext`], the report, the memory window, the counters,
//!   `explain`) and the backends as leaf modules: [`mmu::ept`],
//!   [`mmu::shadow`], [`mmu::pv`].
//! - [`stats`]: what a run counted (exits by reason, hypercalls, times).
//! - [`vcpu`]: per-vCPU state ([`vcpu::Vcpu`]), exit decoding, the
//!   supervision of the vCPU thread.
//! - [`vm`]: configuration, the builder, the [`vm::Vm`] handle and its
//!   lifecycle, per-VM state, and the run loop over one vCPU.

pub mod boot;
pub mod devices;
pub mod error;
pub mod limits;
pub mod mmu;
pub mod size;
pub mod stats;
pub mod vcpu;
pub mod vm;

pub use error::{Error, Result};
