//! The x86-64 four-level guest page-table walker.
//!
//! Rules reproduced (Intel SDM vol. 3, §4.5 "4-level paging", §4.6 "Access
//! rights", §4.7 "Page-fault exceptions", §4.8 "Accessed and dirty flags"):
//!
//! - **Presence.** A walk stops at the first entry with P = 0: `#PF` with
//!   error-code P = 0.
//! - **Reserved bits.** In a present entry: physical-address bits at or
//!   above MAXPHYADDR (up to bit 51; MAXPHYADDR is CPUID 0x80000008
//!   EAX[7:0] of the guest's CPUID); bit 63 (XD) when EFER.NXE = 0; PS in
//!   a PML4 entry, and bit 8 too on an AMD CPU (AMD APM vol. 2 §5.3.3,
//!   figure 5-18; KVM's `__reset_rsvds_bits_mask`, `nonleaf_bit8_rsvd`:
//!   the guest's CPUID vendor decides); PS in a PDPT entry when the
//!   guest's CPUID has no 1 GiB pages (CPUID 0x80000001 EDX bit 26, SDM
//!   vol. 3 §4.5, table 4-15); in a 1 GiB PDPT leaf the address bits
//!   29:13, in a 2 MiB PD leaf bits 20:13. The walk stops there: `#PF`
//!   with P = 1, RSVD = 1.
//! - **Outside RAM.** A table or page that does not lie in guest RAM (the
//!   caller's [`GuestPhys::is_ram`]) is treated like a reserved bit: shadow
//!   mode must never build a translation to the shadow pool or to anything
//!   but guest RAM (the isolation property of docs/architecture.md). A large page must
//!   lie wholly in RAM: one that only partly does (a 1 GiB page at 0 in a
//!   512 MiB guest) faults as a whole, where hardware would translate its
//!   in-RAM part — a deliberate difference (docs/shadow.md).
//! - **Untrapped tables.** A paging structure (the root included) in a
//!   frame the caller cannot trap writes to ([`GuestPhys::may_hold_tables`]
//!   false) is treated like a reserved bit in the entry that points at it
//!   (for the root: in the PML4 entry used), so no shadow is ever built from
//!   a table whose changes the VMM would not see.
//! - **Permissions**, once the walk reaches a leaf: writable = RW at every
//!   level, user = US at every level, executable = no XD at any level (when
//!   NXE = 1). A user access needs a user page; a user write needs a
//!   writable page; a supervisor write to a read-only page faults only with
//!   CR0.WP = 1; a fetch from an XD page faults; with CR4.SMEP a supervisor
//!   fetch from a user page faults; with CR4.SMAP a supervisor data access
//!   to a user page faults unless RFLAGS.AC = 1 (§4.6.1; an *implicit*
//!   supervisor access — GDT, IDT, TSS — faults even with AC = 1: walk it
//!   with `ac = false`).
//! - **Error code.** P (1 unless not present), W/R (the access writes),
//!   U/S (CPL 3), RSVD, I/D (a fetch, when NXE = 1 or SMEP = 1).
//! - **A/D bits.** Only a walk that succeeds sets them, as KVM's walker
//!   does (arch/x86/kvm/mmu/paging_tmpl.h): A in every entry used, D in the
//!   leaf for a write. A faulting access changes nothing.
//!
//! The walk reads at most four entries and never follows a pointer twice,
//! so self-referencing or cyclic tables cannot make it loop.

// The entry flags and `#PF` error-code bits: the one definition in
// `guest_abi::paging`.
pub use guest_abi::paging::{A, D, P, PS, RW, US, XD, pf};
pub use guest_abi::{Gpa, Gva};

/// Guest-physical memory as the walker sees it.
pub trait GuestPhys {
    /// Read the 8-byte entry at `gpa` (8-aligned, inside RAM).
    fn read_u64(&self, gpa: Gpa) -> u64;
    /// Write the 8-byte entry at `gpa` (to set A/D bits).
    fn write_u64(&mut self, gpa: Gpa, value: u64);
    /// Whether `[gpa, gpa + len)` lies inside guest RAM.
    fn is_ram(&self, gpa: Gpa, len: u64) -> bool;
    /// Whether the 4 KiB frame at `gpa` may hold a paging structure (shadow
    /// mode: whether guest writes to it trap). Everything, unless the
    /// caller says otherwise.
    fn may_hold_tables(&self, gpa: Gpa) -> bool {
        let _ = gpa;
        true
    }
}

/// The paging controls that change the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagingMode {
    /// CR0.WP: supervisor writes honour read-only pages.
    pub wp: bool,
    /// EFER.NXE: bit 63 is XD instead of reserved.
    pub nxe: bool,
    /// CR4.SMEP.
    pub smep: bool,
    /// CR4.SMAP.
    pub smap: bool,
    /// RFLAGS.AC (overrides SMAP for explicit accesses).
    pub ac: bool,
    /// MAXPHYADDR (CPUID 0x80000008 EAX[7:0]), 36..=52.
    pub maxphyaddr: u8,
    /// 1 GiB pages (CPUID 0x80000001 EDX bit 26): without them PS in a
    /// PDPT entry is a reserved bit.
    pub pdpe1gb: bool,
    /// An AMD (or Hygon) CPU by the guest's CPUID vendor: bit 8 of a PML4
    /// entry is then reserved.
    pub amd: bool,
}

impl Default for PagingMode {
    fn default() -> Self {
        PagingMode {
            wp: true,
            nxe: true,
            smep: false,
            smap: false,
            ac: false,
            maxphyaddr: 46,
            pdpe1gb: true,
            amd: false,
        }
    }
}

/// One memory access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access {
    /// A write (else a read or a fetch).
    pub write: bool,
    /// In user mode (CPL 3).
    pub user: bool,
    /// An instruction fetch.
    pub fetch: bool,
}

impl Access {
    /// The access a `#PF` error code describes.
    pub fn from_error_code(ec: u32) -> Access {
        Access { write: ec & pf::W != 0, user: ec & pf::U != 0, fetch: ec & pf::ID != 0 }
    }
}

/// A successful translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// Guest-physical address of the byte.
    pub gpa: Gpa,
    /// Page size: 4 KiB, 2 MiB or 1 GiB.
    pub page_size: u64,
    /// Effective permissions: writable (RW everywhere).
    pub writable: bool,
    /// Effective permissions: user (US everywhere).
    pub user: bool,
    /// Effective permissions: executable (no XD anywhere, or NXE = 0).
    pub executable: bool,
    /// The leaf entry's D bit after the walk.
    pub dirty: bool,
    /// The leaf entry after the walk (A/D updated).
    pub leaf: u64,
    /// Where the leaf entry lives.
    pub leaf_gpa: Gpa,
    /// How many levels the walk used (4 for a 4 KiB page).
    pub levels: u8,
    /// The entries' addresses, root first (`levels` of them valid).
    pub entry_gpas: [Gpa; 4],
}

/// A page fault the walk produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageFault {
    /// The error code the CPU would push.
    pub error_code: u32,
    /// The level (4 = PML4 … 1 = PT) whose entry caused it, or 0 for a
    /// permission fault found after the walk.
    pub level: u8,
}

use guest_abi::paging::ADDR_MASK as ADDR_BITS;

/// The reserved bits of a present entry at `level` (4..=1), given PS.
pub fn reserved_mask(mode: &PagingMode, level: u8, entry: u64) -> u64 {
    guest_abi::paging::reserved_bits(level, entry, mode.maxphyaddr, mode.nxe, mode.pdpe1gb, mode.amd)
}

fn error_code(mode: &PagingMode, access: Access, present: bool, rsvd: bool) -> u32 {
    let mut ec = 0;
    if present {
        ec |= pf::P;
    }
    if access.write {
        ec |= pf::W;
    }
    if access.user {
        ec |= pf::U;
    }
    if rsvd {
        ec |= pf::RSVD;
    }
    if access.fetch && (mode.nxe || mode.smep) {
        ec |= pf::ID;
    }
    ec
}

/// Whether an access with these effective permissions is allowed (SDM
/// vol. 3 §4.6.1).
pub fn permitted(mode: &PagingMode, access: Access, writable: bool, user: bool, executable: bool) -> bool {
    if access.user {
        if !user {
            return false;
        }
        if access.write && !writable {
            return false;
        }
        if access.fetch && !executable {
            return false;
        }
        return true;
    }
    // Supervisor.
    if access.fetch {
        return executable && !(mode.smep && user);
    }
    if user && mode.smap && !mode.ac {
        return false;
    }
    !(access.write && !writable && mode.wp)
}

/// Walk `va` from the PML4 at `cr3` for `access`. On success the A bits
/// (and D for a write) are set in guest memory and the translation is
/// returned; otherwise nothing changes and the `#PF` is returned.
pub fn walk(
    mem: &mut impl GuestPhys,
    cr3: Gpa,
    va: Gva,
    access: Access,
    mode: &PagingMode,
) -> Result<Translation, PageFault> {
    let fault = |present, rsvd, level| Err(PageFault { error_code: error_code(mode, access, present, rsvd), level });
    let va = va.raw();
    let mut table = cr3.raw() & ADDR_BITS;
    if !mem.may_hold_tables(Gpa(table)) {
        return fault(true, true, 4);
    }
    let (mut writable, mut user, mut executable) = (true, true, true);
    let mut entry_gpas = [Gpa(0); 4];
    let mut entries = [0u64; 4];
    for level in (1..=4u8).rev() {
        let slot = (4 - level) as usize;
        let index = guest_abi::paging::table_index(va, level) as u64;
        let entry_gpa = Gpa(table + index * 8);
        if !mem.is_ram(entry_gpa, 8) {
            return fault(true, true, level);
        }
        let entry = mem.read_u64(entry_gpa);
        if entry & P == 0 {
            return fault(false, false, level);
        }
        if entry & reserved_mask(mode, level, entry) != 0 {
            return fault(true, true, level);
        }
        entry_gpas[slot] = entry_gpa;
        entries[slot] = entry;
        writable &= entry & RW != 0;
        user &= entry & US != 0;
        if mode.nxe {
            executable &= entry & XD == 0;
        }
        let leaf = level == 1 || (level <= 3 && entry & PS != 0);
        if !leaf {
            table = entry & ADDR_BITS;
            if !mem.may_hold_tables(Gpa(table)) {
                return fault(true, true, level);
            }
            continue;
        }
        let page_size = 1u64 << (12 + 9 * (level as u32 - 1));
        let base = entry & ADDR_BITS & !(page_size - 1);
        if !mem.is_ram(Gpa(base), page_size) {
            return fault(true, true, level);
        }
        if !permitted(mode, access, writable, user, executable) {
            return fault(true, false, 0);
        }
        let used = (4 - level + 1) as usize;
        for i in 0..used {
            if entries[i] & A == 0 {
                entries[i] |= A;
                mem.write_u64(entry_gpas[i], entries[i]);
            }
        }
        let last = used - 1;
        if access.write && entries[last] & D == 0 {
            entries[last] |= D;
            mem.write_u64(entry_gpas[last], entries[last]);
        }
        return Ok(Translation {
            gpa: Gpa(base | (va & (page_size - 1))),
            page_size,
            writable,
            user,
            executable,
            dirty: entries[last] & D != 0,
            leaf: entries[last],
            leaf_gpa: entry_gpas[last],
            levels: used as u8,
            entry_gpas,
        });
    }
    unreachable!("level 1 is always a leaf")
}

#[cfg(test)]
mod tests;
