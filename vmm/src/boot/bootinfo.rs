//! The `BootInfo` record and the command line, written into guest memory.

use crate::boot::layout::{BOOT_AREA_END, BOOT_INFO_START, CMDLINE_START, DIRECT_MAP_BASE, PAGE_SIZE};
use crate::error::{Error, Result};
use guest_abi::boot::MAX_CMDLINE_LEN;
use guest_abi::{BootInfo, MemRegion, MemRegionKind, MmuMode};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// What goes into the boot record.
#[derive(Debug, Clone)]
pub struct BootInfoParams<'a> {
    /// Guest RAM size.
    pub ram: u64,
    /// How much of RAM the boot page tables map.
    pub boot_mapped: u64,
    /// `[start, end)` of the kernel image.
    pub kernel: (u64, u64),
    /// `[start, end)` of the page-table zone.
    pub pt_zone: (u64, u64),
    /// The MMU mode.
    pub mmu: MmuMode,
    /// The guest command line.
    pub cmdline: &'a str,
}

/// Build the memory map: the boot area, the kernel, the page-table zone,
/// and usable RAM in every gap, sorted and non-overlapping.
pub fn memory_map(p: &BootInfoParams<'_>) -> Vec<MemRegion> {
    let page_up = |x: u64| (x + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
    let mut carved = vec![
        (0, BOOT_AREA_END, MemRegionKind::Boot),
        (p.kernel.0 & !(PAGE_SIZE - 1), page_up(p.kernel.1), MemRegionKind::Kernel),
        (p.pt_zone.0, p.pt_zone.1, MemRegionKind::PageTables),
    ];
    carved.sort_by_key(|c| c.0);
    let mut out = Vec::new();
    let mut cursor = 0;
    for (start, end, kind) in carved {
        if start > cursor {
            out.push(MemRegion { start: cursor, len: start - cursor, kind: MemRegionKind::Usable as u32, reserved: 0 });
        }
        out.push(MemRegion { start, len: end - start, kind: kind as u32, reserved: 0 });
        cursor = end;
    }
    if p.ram > cursor {
        out.push(MemRegion { start: cursor, len: p.ram - cursor, kind: MemRegionKind::Usable as u32, reserved: 0 });
    }
    out
}

/// Build the boot record.
pub fn build(p: &BootInfoParams<'_>) -> Result<BootInfo> {
    if p.cmdline.len() > MAX_CMDLINE_LEN {
        return Err(Error::CmdlineTooLong(p.cmdline.len(), MAX_CMDLINE_LEN));
    }
    let mut info = BootInfo::new();
    info.mmu_mode = p.mmu as u32;
    info.ram_size = p.ram;
    info.direct_map_base = DIRECT_MAP_BASE;
    info.boot_mapped = p.boot_mapped;
    info.pt_zone = MemRegion {
        start: p.pt_zone.0,
        len: p.pt_zone.1 - p.pt_zone.0,
        kind: MemRegionKind::PageTables as u32,
        reserved: 0,
    };
    for r in memory_map(p) {
        let kind = MemRegionKind::from_raw(r.kind).expect("memory_map builds valid kinds");
        assert!(info.push_region(r.start, r.len, kind), "the memory map has at most 7 entries");
    }
    info.cmdline_gpa = CMDLINE_START;
    info.cmdline_len = p.cmdline.len() as u32;
    Ok(info)
}

/// The bytes of a boot record, exactly as the guest sees it.
fn as_bytes(info: &BootInfo) -> &[u8] {
    // SAFETY: BootInfo is #[repr(C)] with only integer fields and explicit
    // padding fields, so every byte is initialised; the slice borrows it.
    unsafe { std::slice::from_raw_parts((info as *const BootInfo).cast::<u8>(), std::mem::size_of::<BootInfo>()) }
}

/// Build the boot record and write it and the command line into guest memory.
pub fn write(mem: &GuestMemoryMmap, p: &BootInfoParams<'_>) -> Result<BootInfo> {
    let info = build(p)?;
    mem.write_slice(as_bytes(&info), GuestAddress(BOOT_INFO_START))
        .map_err(|e| Error::GuestMemory(BOOT_INFO_START, e.to_string()))?;
    mem.write_slice(p.cmdline.as_bytes(), GuestAddress(CMDLINE_START))
        .map_err(|e| Error::GuestMemory(CMDLINE_START, e.to_string()))?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::layout::MIB;

    fn params(cmdline: &str) -> BootInfoParams<'_> {
        BootInfoParams {
            ram: 256 * MIB,
            boot_mapped: 256 * MIB,
            kernel: (0x20_0000, 0x23_5028),
            pt_zone: (16 * MIB, 48 * MIB),
            mmu: MmuMode::Ept,
            cmdline,
        }
    }

    #[test]
    fn memory_map_covers_ram_exactly_once() {
        let map = memory_map(&params(""));
        let mut cursor = 0;
        for r in &map {
            assert_eq!(r.start, cursor, "gap or overlap before {r:x?}");
            assert!(r.len > 0);
            cursor = r.end();
        }
        assert_eq!(cursor, 256 * MIB);
        let kinds: Vec<_> = map.iter().map(|r| MemRegionKind::from_raw(r.kind).unwrap()).collect();
        use MemRegionKind::*;
        assert_eq!(kinds, [Boot, Usable, Kernel, Usable, PageTables, Usable]);
        assert_eq!(map[2].end(), 0x23_6000, "kernel rounded up to a page");
    }

    #[test]
    fn record_and_cmdline_are_readable_back() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MIB as usize)]).unwrap();
        let written = write(&mem, &params("crash=pf test=all")).unwrap();
        let mut raw = vec![0u8; std::mem::size_of::<BootInfo>()];
        mem.read_slice(&mut raw, GuestAddress(BOOT_INFO_START)).unwrap();
        assert_eq!(raw, as_bytes(&written));
        assert!(written.is_valid());
        assert_eq!(written.pt_zone.start, 16 * MIB);
        let mut cmd = vec![0u8; written.cmdline_len as usize];
        mem.read_slice(&mut cmd, GuestAddress(written.cmdline_gpa)).unwrap();
        assert_eq!(cmd, b"crash=pf test=all");
    }

    #[test]
    fn overlong_cmdline_is_refused() {
        let long = "x".repeat(MAX_CMDLINE_LEN + 1);
        assert!(matches!(build(&params(&long)), Err(Error::CmdlineTooLong(..))));
    }
}
