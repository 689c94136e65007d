//! x86-64 four-level paging: the one definition of its bits, shared by the
//! guest's paging manager, the VMM's boot tables, the shadow walker and
//! MMU, and explain.
//!
//! Intel SDM vol. 3A §4.5 (4-level paging, tables 4-14 to 4-20), §4.7
//! (page-fault error code), §2.5 (CR0, CR4), §2.2.1 (EFER); AMD APM vol. 2
//! §5.3 and §5.4.

/// Entry flag: present (bit 0).
pub const P: u64 = 1 << 0;
/// Entry flag: writable (bit 1).
pub const RW: u64 = 1 << 1;
/// Entry flag: user accessible (bit 2).
pub const US: u64 = 1 << 2;
/// Entry flag: page-level write-through (bit 3).
pub const PWT: u64 = 1 << 3;
/// Entry flag: page-level cache disable (bit 4).
pub const PCD: u64 = 1 << 4;
/// Entry flag: accessed (bit 5).
pub const A: u64 = 1 << 5;
/// Entry flag: dirty (bit 6; leaves only).
pub const D: u64 = 1 << 6;
/// Entry flag: page size — a leaf at PDPT (1 GiB) or PD (2 MiB) level
/// (bit 7).
pub const PS: u64 = 1 << 7;
/// Entry flag: global (bit 8; leaves only).
pub const G: u64 = 1 << 8;
/// Entry flag: execute disable (bit 63, with EFER.NXE).
pub const XD: u64 = 1 << 63;
/// The physical-address field of a 2 MiB leaf, bits 51:21.
pub const ADDR_MASK_2M: u64 = 0x000f_ffff_ffe0_0000;
/// The physical-address field of an entry, bits 51:12 (the architectural
/// maximum; bits at or above MAXPHYADDR are reserved).
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Entries per table.
pub const ENTRIES: usize = 512;
/// The size of a table, and of a small page.
pub const PAGE_SIZE: u64 = 4096;

/// The index of `va` in the table at `level` (4 = PML4 … 1 = PT).
pub const fn table_index(va: u64, level: u8) -> usize {
    ((va >> (12 + 9 * (level as u32 - 1))) & 0x1ff) as usize
}

/// In a 1 GiB PDPT leaf, address bits 29:13 are reserved (the page is
/// 1 GiB aligned; bit 12 is PAT).
pub const RSVD_1G_LEAF: u64 = 0x3fff_e000;
/// In a 2 MiB PD leaf, address bits 20:13 are reserved.
pub const RSVD_2M_LEAF: u64 = 0x001f_e000;
/// PML4E bit 8: reserved on AMD CPUs (APM vol. 2 §5.3.3, figure 5-18;
/// KVM's `nonleaf_bit8_rsvd`), ignored on Intel.
pub const PML4E_BIT8: u64 = 1 << 8;

/// The reserved bits of a present entry `entry` at `level` (4 = PML4 …
/// 1 = PT): physical-address bits at or above `maxphyaddr` (up to bit 51);
/// XD without EFER.NXE (`nxe`); PS in a PML4 entry, and bit 8 too on an
/// AMD CPU (`amd`, by the CPUID vendor); PS in a PDPT entry without 1 GiB
/// pages (`pdpe1gb`); the low address bits of a 1 GiB or 2 MiB leaf. SDM
/// vol. 3A §4.5.4, tables 4-14 to 4-20.
pub const fn reserved_bits(level: u8, entry: u64, maxphyaddr: u8, nxe: bool, pdpe1gb: bool, amd: bool) -> u64 {
    let maxphy = if maxphyaddr < 32 {
        32
    } else if maxphyaddr > 52 {
        52
    } else {
        maxphyaddr as u32
    };
    let mut mask = ((1u64 << 52) - 1) & !((1u64 << maxphy) - 1); // bits maxphy..51
    if !nxe {
        mask |= XD;
    }
    let ps = entry & PS != 0;
    match level {
        4 => mask |= PS | if amd { PML4E_BIT8 } else { 0 },
        3 if ps && !pdpe1gb => mask |= PS,
        3 if ps => mask |= RSVD_1G_LEAF,
        2 if ps => mask |= RSVD_2M_LEAF,
        _ => {}
    }
    mask
}

/// CR0.ET (bit 4): extension type (always 1 on modern CPUs).
pub const CR0_ET: u64 = 1 << 4;
/// CR0.NE (bit 5): native FPU error reporting.
pub const CR0_NE: u64 = 1 << 5;
/// CR0.WP (bit 16): supervisor writes honour read-only pages.
pub const CR0_WP: u64 = 1 << 16;
/// CR0.PG (bit 31): paging.
pub const CR0_PG: u64 = 1 << 31;
/// CR0.PE (bit 0): protected mode.
pub const CR0_PE: u64 = 1 << 0;
/// CR4.PAE (bit 5).
pub const CR4_PAE: u64 = 1 << 5;
/// CR4.OSFXSR (bit 9): the OS supports FXSAVE/SSE.
pub const CR4_OSFXSR: u64 = 1 << 9;
/// CR4.PGE (bit 7): global pages; toggling it flushes the whole TLB.
pub const CR4_PGE: u64 = 1 << 7;
/// CR4.SMEP (bit 20).
pub const CR4_SMEP: u64 = 1 << 20;
/// CR4.SMAP (bit 21).
pub const CR4_SMAP: u64 = 1 << 21;
/// EFER.LME (bit 8): long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA (bit 10): long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// EFER.NXE (bit 11): execute-disable bits are honoured.
pub const EFER_NXE: u64 = 1 << 11;
/// RFLAGS.IF (bit 9): interrupts enabled.
pub const RFLAGS_IF: u64 = 1 << 9;
/// RFLAGS.AC (bit 18): alignment check / SMAP override.
pub const RFLAGS_AC: u64 = 1 << 18;

/// `#PF` error-code bits (SDM vol. 3 §4.7).
pub mod pf {
    /// The fault was a protection violation (the page was present).
    pub const P: u32 = 1 << 0;
    /// The access was a write.
    pub const W: u32 = 1 << 1;
    /// The access was made in user mode.
    pub const U: u32 = 1 << 2;
    /// A reserved bit was set in a paging-structure entry.
    pub const RSVD: u32 = 1 << 3;
    /// The access was an instruction fetch.
    pub const ID: u32 = 1 << 4;
}
