//! The VMM: boots the bundled guest kernel under KVM and virtualises its
//! MMU (docs/architecture.md). The binary (`main.rs`) is a thin shell over [`cli`] and
//! [`vm`]; everything is here so that tests can drive it.
//!
//! Module map: [`layout`] names every boot-time address; [`boot`] writes the
//! boot structures and loads the kernel; [`devices`] are the UART, the exit
//! device and the hypercall port; [`vm`] owns the VM and the vCPU loop
//! ([`supervise`] runs it under the deadline); [`mmu`] is the seam between
//! that loop and the MMU modes (ept, [`shadow_mode`]); [`stats`] counts
//! what happened; [`error`] says what went wrong and which exit code that
//! means.

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
