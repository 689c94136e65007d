//! The guest's devices: the UART console, the exit device, the hypercall
//! port. All are port-I/O devices dispatched from the vCPU loop.

pub mod hypercall;
pub mod serial;
