//! The boot GDT and the segment registers derived from it.
//!
//! The guest loads its own GDT within its first instructions; this one only
//! has to make the long-mode state that `KVM_SET_SREGS` installs
//! consistent: null, 64-bit code, data, TSS (the Firecracker layout).

use crate::boot::layout::{BOOT_GDT_MAX, BOOT_GDT_START, BOOT_IDT_START};
use crate::error::{Error, Result};
use kvm_bindings::kvm_segment;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Build a GDT entry from access/flags bits (`flags` = the 12 bits
/// `G D/B L AVL . . . . P DPL S TYPE` as in the Intel SDM vol. 3 §3.4.5),
/// base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, code (0x08), data (0x10), TSS (0x18).
pub const BOOT_GDT: [u64; BOOT_GDT_MAX] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff), // code: G, L, P, DPL0, S, execute/read, accessed
    gdt_entry(0xc093, 0, 0xfffff), // data: G, D/B, P, DPL0, S, read/write, accessed
    gdt_entry(0x808b, 0, 0xfffff), // TSS: G, P, busy 64-bit TSS
];

fn base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

fn limit(entry: u64) -> u32 {
    let raw = (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0x0000_0000_0000_ffff)) as u32;
    // With G set the limit counts 4 KiB units.
    if (entry >> 55) & 1 == 1 { (raw << 12) | 0xfff } else { raw }
}

/// The `kvm_segment` that loading selector `index * 8` from a GDT holding
/// `entry` produces.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: base(entry),
        limit: limit(entry),
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: if present == 1 { 0 } else { 1 },
    }
}

/// Write the boot GDT and an empty boot IDT into guest memory.
pub fn write_gdt_and_idt(mem: &GuestMemoryMmap) -> Result<()> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        let addr = BOOT_GDT_START + 8 * i as u64;
        mem.write_obj(*entry, GuestAddress(addr)).map_err(|e| Error::GuestMemory(addr, e.to_string()))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START)).map_err(|e| Error::GuestMemory(BOOT_IDT_START, e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64_bit_ring_0() {
        let cs = kvm_segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!(cs.selector, 0x08);
        assert_eq!((cs.l, cs.db, cs.dpl, cs.present, cs.s), (1, 0, 0, 1, 1));
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.base, 0);
    }

    #[test]
    fn data_and_tss_segments() {
        let ds = kvm_segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!((ds.selector, ds.type_, ds.db, ds.l, ds.present), (0x10, 0x3, 1, 0, 1));
        let tr = kvm_segment_from_gdt(BOOT_GDT[3], 3);
        assert_eq!((tr.selector, tr.type_, tr.s, tr.present), (0x18, 0xb, 0, 1));
        let null = kvm_segment_from_gdt(BOOT_GDT[0], 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn entry_round_trips_base_and_limit() {
        let e = gdt_entry(0x0093, 0x1234_5678, 0xabcde);
        assert_eq!(base(e), 0x1234_5678);
        assert_eq!(limit(e), 0xabcde);
    }

    #[test]
    fn gdt_is_written_where_the_sregs_point() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        write_gdt_and_idt(&mem).unwrap();
        for (i, want) in BOOT_GDT.iter().enumerate() {
            let got: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8 * i as u64)).unwrap();
            assert_eq!(got, *want);
        }
        let idt: u64 = mem.read_obj(GuestAddress(BOOT_IDT_START)).unwrap();
        assert_eq!(idt, 0);
    }
}
