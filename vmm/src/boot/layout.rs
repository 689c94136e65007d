//! The guest-physical and guest-virtual layout at boot, one named constant
//! per address (the Firecracker `arch/x86_64/layout.rs` habit).
//!
//! ```text
//! GPA 0x0000_0000  ┌──────────────────────────────┐
//!                  │ boot area (1 MiB):           │  boot GDT 0x500, boot IDT 0x520,
//!                  │  GDT, IDT, BootInfo, cmdline,│  BootInfo 0x6000, cmdline 0x7000,
//!                  │  boot stack, boot page tables│  stack top 0x8ff0, tables 0x9000..
//!     0x0010_0000  ├──────────────────────────────┤
//!                  │ usable                       │
//!     0x0020_0000  ├──────────────────────────────┤
//!                  │ kernel image (ELF PT_LOADs)  │  linked at KERNEL_VMA + 0x20_0000
//!                  ├──────────────────────────────┤
//!                  │ usable (DMA zone < 16 MiB)   │
//!     0x0100_0000  ├──────────────────────────────┤
//!                  │ page-table zone              │  pt_zone_size(ram)
//!                  ├──────────────────────────────┤
//!                  │ usable (NORMAL zone)         │
//!     ram_size     └──────────────────────────────┘
//! ```
//!
//! The boot page tables map `min(ram, 1 GiB)` three times with 2 MiB pages:
//! identity (GVA = GPA), the direct map at [`DIRECT_MAP_BASE`], and the
//! kernel window at [`KERNEL_VMA`]. Nothing beyond RAM is ever mapped.
//! Keep in sync with `guest/kernel/linker.ld`.

use ept::memmap::GpaRange;
use guest_abi::Gpa;
pub use guest_abi::{DIRECT_MAP_BASE, KERNEL_VMA};

/// Size of a base page.
pub const PAGE_SIZE: u64 = 0x1000;
/// Size of a PD-level large page.
pub const LARGE_PAGE_SIZE: u64 = 0x20_0000;
/// One mebibyte.
pub const MIB: u64 = 1 << 20;
/// One gibibyte.
pub const GIB: u64 = 1 << 30;

/// The boot GDT (four 8-byte descriptors, as Firecracker's `BOOT_GDT_OFFSET`).
pub const BOOT_GDT_START: u64 = 0x500;
/// Number of entries in the boot GDT.
pub const BOOT_GDT_MAX: usize = 4;
/// The boot IDT: empty. Until the guest loads its own, any exception is a
/// triple fault, which the VMM reports as such.
pub const BOOT_IDT_START: u64 = 0x520;
/// The `BootInfo` record.
pub const BOOT_INFO_START: u64 = 0x6000;
/// The command line.
pub const CMDLINE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU (a direct-map address; the kernel
/// switches to its own stack in its first instructions).
pub const BOOT_STACK_POINTER: u64 = DIRECT_MAP_BASE + 0x8ff0;
/// Boot PML4.
pub const PML4_START: u64 = 0x9000;
/// Boot PDPT for the identity map and the direct map (shared).
pub const PDPT_LOW_START: u64 = 0xa000;
/// Boot PDPT for the kernel window (PML4 entry 511).
pub const PDPT_HIGH_START: u64 = 0xb000;
/// Boot PD: 512 × 2 MiB = the first GiB, shared by all three maps.
pub const PD_START: u64 = 0xc000;
/// The boot page tables `[start, end)`: in shadow mode a read-only slot of
/// their own, so that guest writes to them trap like writes to the
/// page-table zone (the shadow MMU shadows only tables whose writes trap).
pub const BOOT_TABLES: GpaRange = GpaRange::new(Gpa(PML4_START), Gpa(PD_START + PAGE_SIZE));
/// End of the boot area.
pub const BOOT_AREA_END: u64 = MIB;

/// Where the bundled kernel's image starts (its `PT_LOAD` physical address).
pub const KERNEL_PHYS_START: u64 = 0x20_0000;

/// Start of the page-table zone: right after the DMA zone (16 MiB), as
/// Linux's ZONE_DMA ends there.
pub const PT_ZONE_START: u64 = 16 * MIB;
/// Smallest and largest page-table zone.
pub const PT_ZONE_MIN: u64 = 4 * MIB;
/// Largest page-table zone.
pub const PT_ZONE_MAX: u64 = 256 * MIB;

/// How much RAM the boot page tables map.
pub const BOOT_MAP_LIMIT: u64 = GIB;

/// Smallest guest RAM: the boot area, the DMA zone, a minimal page-table
/// zone and some NORMAL memory.
pub const MIN_MEMORY: u64 = 32 * MIB;
/// Largest guest RAM the VMM accepts.
pub const MAX_MEMORY: u64 = 64 * GIB;

/// Size of the page-table zone for `ram` bytes of RAM: one eighth of RAM,
/// clamped to [`PT_ZONE_MIN`]..=[`PT_ZONE_MAX`], a multiple of 2 MiB.
pub const fn pt_zone_size(ram: u64) -> u64 {
    let s = ram / 8;
    let s = if s < PT_ZONE_MIN {
        PT_ZONE_MIN
    } else if s > PT_ZONE_MAX {
        PT_ZONE_MAX
    } else {
        s
    };
    s & !(LARGE_PAGE_SIZE - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_structures_fit_in_the_boot_area_without_overlap() {
        let mut ranges = [
            (BOOT_GDT_START, BOOT_GDT_START + 8 * BOOT_GDT_MAX as u64),
            (BOOT_IDT_START, BOOT_IDT_START + 8),
            (BOOT_INFO_START, BOOT_INFO_START + core::mem::size_of::<guest_abi::BootInfo>() as u64),
            (CMDLINE_START, CMDLINE_START + guest_abi::boot::MAX_CMDLINE_LEN as u64),
            (PML4_START, PML4_START + PAGE_SIZE),
            (PDPT_LOW_START, PDPT_LOW_START + PAGE_SIZE),
            (PDPT_HIGH_START, PDPT_HIGH_START + PAGE_SIZE),
            (PD_START, PD_START + PAGE_SIZE),
        ];
        ranges.sort();
        for w in ranges.windows(2) {
            assert!(w[0].1 <= w[1].0, "{:x?} overlaps {:x?}", w[0], w[1]);
        }
        assert!(ranges.last().unwrap().1 <= BOOT_AREA_END);
        let stack = BOOT_STACK_POINTER - DIRECT_MAP_BASE;
        assert!(ranges.iter().all(|&(s, e)| stack <= s || stack > e));
    }

    #[test]
    fn pt_zone_is_clamped_and_aligned() {
        assert_eq!(pt_zone_size(MIN_MEMORY), PT_ZONE_MIN);
        assert_eq!(pt_zone_size(256 * MIB), 32 * MIB);
        assert_eq!(pt_zone_size(MAX_MEMORY), PT_ZONE_MAX);
        assert_eq!(pt_zone_size(100 * MIB) % LARGE_PAGE_SIZE, 0);
        assert!(PT_ZONE_START + pt_zone_size(MIN_MEMORY) < MIN_MEMORY);
    }
}
