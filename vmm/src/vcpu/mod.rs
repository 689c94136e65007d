//! The vCPU: exit decoding and the supervision of its thread.

pub(crate) mod exit;
pub mod supervise;
