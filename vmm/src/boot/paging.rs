//! The boot page tables.
//!
//! Three views of the first `min(ram, 1 GiB)` of RAM with 2 MiB pages, all
//! through one PD: identity (PML4[0] → PDPT_LOW[0] → PD), the direct map at
//! `DIRECT_MAP_BASE` (PML4[273] → the same PDPT_LOW), and the kernel window
//! at `KERNEL_VMA` (PML4[511] → PDPT_HIGH[510] → PD). PD entries beyond RAM
//! stay zero, so the boot tables never map a GPA outside guest RAM.

use crate::boot::layout::{
    BOOT_MAP_LIMIT, DIRECT_MAP_BASE, KERNEL_VMA, LARGE_PAGE_SIZE, PD_START, PDPT_HIGH_START, PDPT_LOW_START, PML4_START,
};
use crate::error::{Error, Result};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub use guest_abi::paging::{P as PTE_P, PS as PTE_PS, RW as PTE_RW};

/// The index of `va` in the table of `level` (4 = PML4 … 1 = PT).
pub const fn table_index(va: u64, level: u32) -> u64 {
    guest_abi::paging::table_index(va, level as u8) as u64
}

fn write_entry(mem: &GuestMemoryMmap, table: u64, index: u64, value: u64) -> Result<()> {
    let addr = table + index * 8;
    mem.write_obj(value, GuestAddress(addr)).map_err(|e| Error::GuestMemory(addr, e.to_string()))
}

/// Write the boot tables for `ram` bytes of RAM (a multiple of 2 MiB);
/// returns how many bytes they map.
pub fn setup_page_tables(mem: &GuestMemoryMmap, ram: u64) -> Result<u64> {
    let mapped = ram.min(BOOT_MAP_LIMIT);
    write_entry(mem, PML4_START, table_index(0, 4), PDPT_LOW_START | PTE_P | PTE_RW)?;
    write_entry(mem, PML4_START, table_index(DIRECT_MAP_BASE, 4), PDPT_LOW_START | PTE_P | PTE_RW)?;
    write_entry(mem, PML4_START, table_index(KERNEL_VMA, 4), PDPT_HIGH_START | PTE_P | PTE_RW)?;
    write_entry(mem, PDPT_LOW_START, table_index(0, 3), PD_START | PTE_P | PTE_RW)?;
    write_entry(mem, PDPT_HIGH_START, table_index(KERNEL_VMA, 3), PD_START | PTE_P | PTE_RW)?;
    for i in 0..mapped / LARGE_PAGE_SIZE {
        write_entry(mem, PD_START, i, (i * LARGE_PAGE_SIZE) | PTE_P | PTE_RW | PTE_PS)?;
    }
    Ok(mapped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::layout::MIB;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
    }

    fn read(mem: &GuestMemoryMmap, addr: u64) -> u64 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// Walk the tables the way the CPU would (4-level, 2 MiB leaves).
    fn walk(mem: &GuestMemoryMmap, va: u64) -> Option<u64> {
        let mut table = PML4_START;
        for level in (2..=4).rev() {
            let e = read(mem, table + table_index(va, level) * 8);
            if e & PTE_P == 0 {
                return None;
            }
            if level == 2 {
                assert!(e & PTE_PS != 0);
                return Some((e & guest_abi::paging::ADDR_MASK_2M) + (va & (LARGE_PAGE_SIZE - 1)));
            }
            table = e & guest_abi::paging::ADDR_MASK;
        }
        unreachable!()
    }

    #[test]
    fn three_views_of_low_memory() {
        let m = mem(64 * MIB);
        assert_eq!(setup_page_tables(&m, 64 * MIB).unwrap(), 64 * MIB);
        for gpa in [0u64, 0x6000, 0x20_1234, 63 * MIB + 5] {
            assert_eq!(walk(&m, gpa), Some(gpa), "identity {gpa:#x}");
            assert_eq!(walk(&m, DIRECT_MAP_BASE + gpa), Some(gpa), "direct map {gpa:#x}");
            assert_eq!(walk(&m, KERNEL_VMA + gpa), Some(gpa), "kernel window {gpa:#x}");
        }
    }

    #[test]
    fn nothing_beyond_ram_is_mapped() {
        let m = mem(64 * MIB);
        setup_page_tables(&m, 64 * MIB).unwrap();
        assert_eq!(walk(&m, 64 * MIB), None);
        assert_eq!(walk(&m, DIRECT_MAP_BASE + 100 * MIB), None);
        assert_eq!(walk(&m, 0x0000_7fff_dead_b000), None);
        for i in 32..512 {
            assert_eq!(read(&m, PD_START + i * 8), 0);
        }
    }

    #[test]
    fn boot_map_is_capped_at_one_gib() {
        let m = mem(16 * MIB);
        // Only the table pages matter for this test; the RAM size is what
        // the tables are told, not what backs them.
        assert_eq!(setup_page_tables(&m, 4096 * MIB).unwrap(), BOOT_MAP_LIMIT);
        assert_eq!(read(&m, PD_START + 511 * 8), (511 * LARGE_PAGE_SIZE) | PTE_P | PTE_RW | PTE_PS);
    }
}
