//! Booting the guest: load the kernel ELF, write the boot structures (GDT,
//! page tables, `BootInfo`, command line) into guest memory, and compute the
//! vCPU's initial registers for 64-bit long mode.
//!
//! Each concern is its own small module with functions that take guest
//! memory and are unit-tested by reading that memory back.

pub mod bootinfo;
pub mod gdt;
pub mod layout;
pub mod loader;
pub mod paging;
pub mod regs;
