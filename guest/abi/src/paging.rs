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

/// CR0.WP (bit 16): supervisor writes honour read-only pages.
pub const CR0_WP: u64 = 1 << 16;
/// CR0.PG (bit 31): paging.
pub const CR0_PG: u64 = 1 << 31;
/// CR0.PE (bit 0): protected mode.
pub const CR0_PE: u64 = 1 << 0;
/// CR4.PAE (bit 5).
pub const CR4_PAE: u64 = 1 << 5;
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
