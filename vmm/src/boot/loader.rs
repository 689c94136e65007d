//! Loading the guest kernel ELF.
//!
//! `linux-loader` copies the `PT_LOAD` segments to their physical
//! addresses, but it does not check the machine, the class, the type, or
//! whether the segments fit in guest RAM. So [`inspect`] reads the headers
//! first and refuses anything that is not a 64-bit x86-64 executable with
//! an entry point inside one of its segments, before anything is copied.
//!
//! Invariants of an accepted image (what [`load`] may then copy):
//! - every `PT_LOAD` header, empty ones included, has `p_filesz ≤ p_memsz`
//!   and its file bytes inside the file (`linux-loader` copies `p_filesz`
//!   bytes at `p_paddr` for every `PT_LOAD` with file bytes, whatever
//!   `p_memsz` says);
//! - every byte of every segment lies inside guest RAM and inside the first
//!   GiB (all the boot page tables map), outside the boot area (boot GDT,
//!   IDT, `BootInfo`, command line, boot stack, boot page tables) and
//!   outside the page-table zone;
//! - the whole span of the image, lowest to highest segment byte, also
//!   avoids the boot area and the page-table zone: the memory map gives the
//!   guest one kernel region for that span, and it must not overlap
//!   anything else (`bootinfo::memory_map`).
//!
//! Reading the file ([`read_kernel`]) trusts nothing about the path either:
//! only a regular file is read (a device such as `/dev/zero` never ends, a
//! FIFO may never deliver), it is opened without blocking so that a FIFO
//! cannot stall the open itself, and its size is checked against
//! [`kernel_file_limit`] before a byte is read; the read stops one byte past
//! the limit in case the file grows meanwhile.

use crate::boot::layout::{BOOT_AREA_END, BOOT_MAP_LIMIT, KERNEL_VMA, LARGE_PAGE_SIZE, MAX_MEMORY};
use crate::error::{Error, Result};
use linux_loader::loader::{KernelLoader, elf::Elf};
use std::io::{Cursor, Read};
use std::path::Path;
use vm_memory::GuestMemoryMmap;

/// The largest kernel file accepted for `ram` bytes of guest RAM: the RAM
/// size, and never more than the first GiB, which is all the boot page
/// tables map and so the most any loadable image can occupy. (A file is
/// larger than its image only by headers, symbols and debug information.)
pub fn kernel_file_limit(ram: u64) -> u64 {
    ram.min(BOOT_MAP_LIMIT)
}

/// What a non-regular file is, for the error message.
fn file_kind(ft: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Read the kernel file at `path` for a guest of `ram` bytes: a regular
/// file of at most [`kernel_file_limit`] bytes, or a clear error before
/// anything large is read.
pub fn read_kernel(path: &Path, ram: u64) -> Result<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    let read_err = |source| Error::KernelRead { path: path.to_path_buf(), source };
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a
    // writer. It changes nothing for a regular file.
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.file_type().is_file() {
        return Err(Error::KernelNotRegular { path: path.to_path_buf(), kind: file_kind(meta.file_type()) });
    }
    let limit = kernel_file_limit(ram);
    let too_large = |size| Error::KernelTooLarge { path: path.to_path_buf(), size, limit };
    if meta.len() > limit {
        return Err(too_large(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1).read_to_end(&mut bytes).map_err(read_err)?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

const PT_LOAD: u32 = 1;
const EM_X86_64: u16 = 62;
const ET_EXEC: u16 = 2;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;

/// One loadable segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Index among the program headers.
    pub index: usize,
    /// Guest-physical load address.
    pub paddr: u64,
    /// Virtual address.
    pub vaddr: u64,
    /// Size in memory.
    pub memsz: u64,
}

/// What [`inspect`] learnt from a valid kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelImage {
    /// Entry point (a virtual address).
    pub entry: u64,
    /// Loadable segments with a non-zero size.
    pub segments: Vec<Segment>,
}

impl KernelImage {
    /// Lowest and one-past-highest guest-physical address of the image.
    pub fn phys_range(&self) -> (u64, u64) {
        let start = self.segments.iter().map(|s| s.paddr).min().unwrap_or(0);
        let end = self.segments.iter().map(|s| s.paddr + s.memsz).max().unwrap_or(0);
        (start, end)
    }
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Check that `image` is a kernel this VMM can boot in `ram` bytes whose
/// page-table zone is `pt_zone` (`[start, end)`), and describe it. `name` is
/// used in error messages.
pub fn inspect(name: &str, image: &[u8], ram: u64, pt_zone: (u64, u64)) -> Result<KernelImage> {
    let foreign = |why: String| Error::KernelForeign { name: name.to_string(), why };
    if image.len() < 4 || &image[..4] != b"\x7fELF" {
        return Err(Error::KernelNotElf(name.to_string()));
    }
    if image.len() < EHDR_SIZE {
        return Err(foreign("the ELF header is truncated".into()));
    }
    match image[4] {
        2 => {}
        1 => return Err(foreign("it is a 32-bit ELF".into())),
        c => return Err(foreign(format!("unknown ELF class {c}"))),
    }
    if image[5] != 1 {
        return Err(foreign("it is big-endian".into()));
    }
    let machine = u16_at(image, 18);
    if machine != EM_X86_64 {
        return Err(foreign(format!("its machine is {machine} (x86-64 is {EM_X86_64})")));
    }
    let etype = u16_at(image, 16);
    if etype != ET_EXEC {
        let what = match etype {
            1 => "a relocatable object",
            3 => "a shared object or position-independent executable",
            4 => "a core dump",
            _ => "not an executable",
        };
        return Err(foreign(format!("it is {what} (ELF type {etype}); a statically linked executable is needed")));
    }
    let entry = u64_at(image, 24);
    let phoff = u64_at(image, 32);
    let phentsize = u16_at(image, 54) as usize;
    let phnum = u16_at(image, 56) as usize;
    if phentsize != PHDR_SIZE {
        return Err(foreign(format!("program header size {phentsize} (expected {PHDR_SIZE})")));
    }
    let table_end = usize::try_from(phoff)
        .ok()
        .and_then(|o| o.checked_add(phnum * PHDR_SIZE))
        .filter(|&e| e <= image.len())
        .ok_or_else(|| foreign("the program headers lie beyond the end of the file".into()))?;
    let phdrs = &image[phoff as usize..table_end];

    let mut segments = Vec::new();
    for index in 0..phnum {
        let p = &phdrs[index * PHDR_SIZE..(index + 1) * PHDR_SIZE];
        if u32_at(p, 0) != PT_LOAD {
            continue;
        }
        let (offset, vaddr, paddr, filesz, memsz) =
            (u64_at(p, 8), u64_at(p, 16), u64_at(p, 24), u64_at(p, 32), u64_at(p, 40));
        // Checked for every PT_LOAD, empty or not: linux-loader copies
        // p_filesz bytes of any of them.
        if filesz > memsz {
            return Err(foreign(format!(
                "segment {index} has more file bytes ({filesz:#x}) than memory bytes ({memsz:#x})"
            )));
        }
        if offset.checked_add(filesz).is_none_or(|e| e > image.len() as u64) {
            return Err(foreign(format!("segment {index} claims more file bytes than the file has")));
        }
        if memsz == 0 {
            // Nothing to copy (p_filesz is 0 too) and nothing in the map.
            continue;
        }
        let end = paddr.checked_add(memsz).ok_or_else(|| Error::SegmentOutsideRam {
            name: name.to_string(),
            index,
            start: paddr,
            end: u64::MAX,
            ram,
        })?;
        if end > ram {
            // A segment that an allowed --memory would hold means the memory
            // is too small; one that no allowed size holds is outside RAM.
            if paddr >= BOOT_AREA_END && end <= MAX_MEMORY.min(BOOT_MAP_LIMIT) {
                let needed = (end.max(crate::boot::layout::MIN_MEMORY) + LARGE_PAGE_SIZE - 1) & !(LARGE_PAGE_SIZE - 1);
                return Err(Error::MemoryTooSmallForKernel { name: name.to_string(), index, end, ram, needed });
            }
            return Err(Error::SegmentOutsideRam { name: name.to_string(), index, start: paddr, end, ram });
        }
        let overlap = |what: &'static str, (ws, we): (u64, u64)| -> Result<()> {
            if paddr < we && ws < end {
                return Err(Error::SegmentOverlap {
                    name: name.to_string(),
                    index,
                    start: paddr,
                    end,
                    what,
                    what_start: ws,
                    what_end: we,
                });
            }
            Ok(())
        };
        overlap("boot area", (0, BOOT_AREA_END))?;
        overlap("page-table zone", pt_zone)?;
        if end > BOOT_MAP_LIMIT {
            return Err(foreign(format!(
                "segment {index} [{paddr:#x}-{end:#x}) reaches beyond the first GiB, which is all the boot page tables map"
            )));
        }
        segments.push(Segment { index, paddr, vaddr, memsz });
    }
    if segments.is_empty() {
        return Err(foreign("it has no loadable segments".into()));
    }
    let image = KernelImage { entry, segments };
    // The memory map has one kernel region for the whole span: it must
    // not swallow the page-table zone (or the boot area) between segments.
    let (start, end) = image.phys_range();
    for (what, (ws, we)) in [("boot area", (0, BOOT_AREA_END)), ("page-table zone", pt_zone)] {
        if start < we && ws < end {
            return Err(Error::KernelSpanOverlap {
                name: name.to_string(),
                start,
                end,
                what,
                what_start: ws,
                what_end: we,
            });
        }
    }
    if !image.segments.iter().any(|s| entry >= s.vaddr && entry - s.vaddr < s.memsz) {
        return Err(foreign(format!("its entry point {entry:#x} lies outside its loadable segments")));
    }
    // The boot page tables map physical memory at the kernel window and
    // identity; a segment linked anywhere else would run unmapped.
    for s in &image.segments {
        if s.vaddr != s.paddr && s.vaddr != KERNEL_VMA.wrapping_add(s.paddr) {
            return Err(foreign(format!(
                "segment {} is linked at {:#x} for physical {:#x}; the boot map needs virtual = physical or {:#x} + physical",
                s.index, s.vaddr, s.paddr, KERNEL_VMA
            )));
        }
    }
    Ok(image)
}

/// Copy a kernel that [`inspect`] accepted into guest memory. The rest of
/// each segment (`.bss`) is already zero: guest RAM is fresh anonymous
/// memory.
pub fn load(name: &str, image: &[u8], mem: &GuestMemoryMmap) -> Result<()> {
    Elf::load(mem, None, &mut Cursor::new(image), None)
        .map(|_| ())
        .map_err(|source| Error::KernelLoad { name: name.to_string(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::layout::MIB;

    /// A minimal ELF with the given header fields and one PT_LOAD segment.
    fn elf(machine: u16, etype: u16, paddr: u64, memsz: u64, entry: u64) -> Vec<u8> {
        let mut b = vec![0u8; 0x200];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[16..18].copy_from_slice(&etype.to_le_bytes());
        b[18..20].copy_from_slice(&machine.to_le_bytes());
        b[24..32].copy_from_slice(&entry.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[52..54].copy_from_slice(&64u16.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        let p = &mut b[64..120];
        p[0..4].copy_from_slice(&PT_LOAD.to_le_bytes());
        p[8..16].copy_from_slice(&0x100u64.to_le_bytes());
        p[16..24].copy_from_slice(&KERNEL_VMA.wrapping_add(paddr).to_le_bytes());
        p[24..32].copy_from_slice(&paddr.to_le_bytes());
        p[32..40].copy_from_slice(&0x10u64.to_le_bytes());
        p[40..48].copy_from_slice(&memsz.to_le_bytes());
        b
    }

    const ZONE: (u64, u64) = (16 * MIB, 20 * MIB);
    const GOOD_ENTRY: u64 = KERNEL_VMA + 0x20_0000;

    #[test]
    fn accepts_a_kernel_in_ram() {
        let k = inspect("k", &elf(62, 2, 0x20_0000, 0x1000, GOOD_ENTRY), 32 * MIB, ZONE).unwrap();
        assert_eq!(k.entry, GOOD_ENTRY);
        assert_eq!(k.phys_range(), (0x20_0000, 0x20_1000));
    }

    #[test]
    fn refuses_foreign_files() {
        assert!(matches!(inspect("k", b"#!/bin/sh\n", 32 * MIB, ZONE), Err(Error::KernelNotElf(_))));
        assert!(matches!(inspect("k", b"", 32 * MIB, ZONE), Err(Error::KernelNotElf(_))));
        let arm = inspect("k", &elf(183, 2, 0x20_0000, 0x1000, GOOD_ENTRY), 32 * MIB, ZONE).unwrap_err();
        assert!(arm.to_string().contains("machine is 183"), "{arm}");
        let pie = inspect("k", &elf(62, 3, 0x20_0000, 0x1000, GOOD_ENTRY), 32 * MIB, ZONE).unwrap_err();
        assert!(pie.to_string().contains("position-independent"), "{pie}");
        let mut b32 = elf(62, 2, 0x20_0000, 0x1000, GOOD_ENTRY);
        b32[4] = 1;
        assert!(inspect("k", &b32, 32 * MIB, ZONE).unwrap_err().to_string().contains("32-bit"));
        let truncated = &elf(62, 2, 0x20_0000, 0x1000, GOOD_ENTRY)[..40];
        assert!(inspect("k", truncated, 32 * MIB, ZONE).unwrap_err().to_string().contains("truncated"));
    }

    #[test]
    fn refuses_segments_outside_ram_or_over_reserved_areas() {
        let huge = inspect("k", &elf(62, 2, 1 << 45, 0x1000, KERNEL_VMA.wrapping_add(1 << 45)), 32 * MIB, ZONE);
        assert!(matches!(huge, Err(Error::SegmentOutsideRam { .. })), "{huge:?}");
        let wrap = inspect("k", &elf(62, 2, u64::MAX - 10, 0x1000, GOOD_ENTRY), 32 * MIB, ZONE);
        assert!(matches!(wrap, Err(Error::SegmentOutsideRam { .. })), "{wrap:?}");
        let boot = inspect("k", &elf(62, 2, 0x8000, 0x1000, KERNEL_VMA + 0x8000), 32 * MIB, ZONE);
        assert!(matches!(boot, Err(Error::SegmentOverlap { what: "boot area", .. })), "{boot:?}");
        let zone = inspect("k", &elf(62, 2, 15 * MIB, 2 * MIB, KERNEL_VMA + 15 * MIB), 32 * MIB, ZONE);
        assert!(matches!(zone, Err(Error::SegmentOverlap { what: "page-table zone", .. })), "{zone:?}");
    }

    #[test]
    fn too_little_memory_names_the_size_needed() {
        let e = inspect("k", &elf(62, 2, 0x20_0000, 12 * MIB, GOOD_ENTRY), 8 * MIB, ZONE).unwrap_err();
        match e {
            Error::MemoryTooSmallForKernel { needed, .. } => assert_eq!(needed, 32 * MIB),
            other => panic!("{other:?}"),
        }
    }

    /// An ELF with `segs` PT_LOAD headers `(paddr, filesz, memsz)`, each
    /// linked at the kernel window, entry at the first segment.
    fn elf_with(segs: &[(u64, u64, u64)]) -> Vec<u8> {
        let mut b = elf(62, 2, segs[0].0, segs[0].2, KERNEL_VMA.wrapping_add(segs[0].0));
        b.resize(0x1000, 0);
        b[56..58].copy_from_slice(&(segs.len() as u16).to_le_bytes());
        for (i, &(paddr, filesz, memsz)) in segs.iter().enumerate() {
            let p = &mut b[64 + i * 56..120 + i * 56];
            p.fill(0);
            p[0..4].copy_from_slice(&PT_LOAD.to_le_bytes());
            p[8..16].copy_from_slice(&0x200u64.to_le_bytes());
            p[16..24].copy_from_slice(&KERNEL_VMA.wrapping_add(paddr).to_le_bytes());
            p[24..32].copy_from_slice(&paddr.to_le_bytes());
            p[32..40].copy_from_slice(&filesz.to_le_bytes());
            p[40..48].copy_from_slice(&memsz.to_le_bytes());
        }
        b
    }

    #[test]
    fn an_empty_segment_cannot_smuggle_file_bytes() {
        // p_memsz == 0 with file bytes at GPA 0, over the boot page tables,
        // and into the page-table zone: linux-loader would copy them all.
        for target in [0, crate::boot::layout::PML4_START, ZONE.0] {
            let e =
                inspect("k", &elf_with(&[(0x20_0000, 0x10, 0x1000), (target, 0x100, 0)]), 32 * MIB, ZONE).unwrap_err();
            assert!(e.to_string().contains("segment 1 has more file bytes (0x100) than memory bytes (0x0)"), "{e}");
        }
        // An empty segment with no file bytes is harmless and ignored.
        let k = inspect("k", &elf_with(&[(0x20_0000, 0x10, 0x1000), (0, 0, 0)]), 32 * MIB, ZONE).unwrap();
        assert_eq!(k.segments.len(), 1);
    }

    #[test]
    fn segments_on_both_sides_of_the_zone_are_refused() {
        let ram = 128 * MIB;
        let zone = (16 * MIB, 32 * MIB);
        for segs in [
            [(2 * MIB, 0x10, 0x1000), (64 * MIB, 0x10, 0x1000)],
            [(2 * MIB, 0x10, 0x1000), (ram - 0x1000, 0x10, 0x1000)],
        ] {
            let e = inspect("k", &elf_with(&segs), ram, zone).unwrap_err();
            assert!(matches!(e, Error::KernelSpanOverlap { what: "page-table zone", .. }), "{e}");
        }
        // One ending exactly at the end of RAM, alone, is fine.
        let k = inspect("k", &elf_with(&[(ram - 0x1000, 0x10, 0x1000)]), ram, zone).unwrap();
        assert_eq!(k.phys_range(), (ram - 0x1000, ram));
    }

    #[test]
    fn segments_beyond_the_boot_map_are_refused() {
        let e = inspect("k", &elf_with(&[(2 << 30, 0x10, 0x1000)]), 4 << 30, (16 * MIB, 272 * MIB)).unwrap_err();
        assert!(e.to_string().contains("beyond the first GiB"), "{e}");
    }

    mod layouts {
        use super::*;
        use crate::boot::bootinfo::{BootInfoParams, memory_map};
        use guest_abi::{MemRegionKind, MmuMode};
        use proptest::prelude::*;

        fn size() -> impl Strategy<Value = u64> {
            prop_oneof![Just(0u64), 1..0x1000u64, 0x1000..0x10_0000u64, Just(2 * MIB), 1..64 * MIB]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Any layout of segments gives a well-formed memory map or a
            /// clear error: the map covers RAM once, in order, without
            /// empty regions, fits the boot record, and every segment lies
            /// in the kernel region, which overlaps nothing the VMM builds.
            #[test]
            fn any_segment_layout_gives_a_well_formed_map_or_an_error(
                ram_mib in prop_oneof![Just(32u64), Just(64), Just(256), Just(1024), Just(2048)],
                raw in proptest::collection::vec((any::<u64>(), size(), size()), 1..5),
                pick in proptest::collection::vec(any::<prop::sample::Index>(), 1..5),
            ) {
                let ram = ram_mib * MIB;
                let zone = (crate::boot::layout::PT_ZONE_START, crate::boot::layout::PT_ZONE_START + crate::boot::layout::pt_zone_size(ram));
                let strategy_addrs: Vec<u64> = {
                    // A third at the addresses that matter, the rest anywhere in RAM.
                    let interesting = [0, BOOT_AREA_END, 2 * MIB, 16 * MIB, 64 * MIB, ram - 0x1000, ram - 2 * MIB, zone.1];
                    raw.iter().zip(pick.iter().cycle()).map(|((r, _, _), ix)| {
                        if r % 3 == 0 { ix.get(&interesting).to_owned() } else { (r % ram) & !0xfff }
                    }).collect()
                };
                let segs: Vec<(u64, u64, u64)> = raw.iter().zip(&strategy_addrs)
                    .map(|(&(_, a, b), &paddr)| (paddr, a.min(b).min(0x100), a.max(b)))
                    .collect();
                match inspect("k", &elf_with(&segs), ram, zone) {
                    Err(e) => {
                        let msg = e.to_string();
                        prop_assert!(msg.starts_with("kernel k") || msg.starts_with("memory size"), "{}", msg);
                    }
                    Ok(k) => {
                        let map = memory_map(&BootInfoParams {
                            ram,
                            boot_mapped: ram.min(BOOT_MAP_LIMIT),
                            kernel: k.phys_range(),
                            pt_zone: zone,
                            mmu: MmuMode::Ept,
                            cmdline: "",
                        });
                        prop_assert!(map.len() <= guest_abi::boot::MAX_MEM_REGIONS, "{:x?}", map);
                        let mut cursor = 0;
                        for r in &map {
                            prop_assert_eq!(r.start, cursor, "gap or overlap in {:x?}", map);
                            prop_assert!(r.len > 0, "empty region in {:x?}", map);
                            cursor = r.start + r.len;
                        }
                        prop_assert_eq!(cursor, ram);
                        let kernel: Vec<_> = map.iter().filter(|r| r.kind == MemRegionKind::Kernel as u32).collect();
                        prop_assert_eq!(kernel.len(), 1);
                        for s in &k.segments {
                            prop_assert!(kernel[0].start <= s.paddr && s.paddr + s.memsz <= kernel[0].start + kernel[0].len);
                        }
                        let zones: Vec<_> = map.iter().filter(|r| r.kind == MemRegionKind::PageTables as u32).collect();
                        prop_assert_eq!(zones.len(), 1);
                        prop_assert_eq!((zones[0].start, zones[0].start + zones[0].len), zone);
                    }
                }
            }
        }
    }

    #[test]
    fn the_kernel_file_limit_is_guest_ram_up_to_the_boot_map() {
        assert_eq!(kernel_file_limit(64 * MIB), 64 * MIB);
        assert_eq!(kernel_file_limit(8 << 30), BOOT_MAP_LIMIT);
    }

    #[test]
    fn read_kernel_reads_a_regular_file_within_the_limit_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("vmm-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ok = dir.join("k.elf");
        std::fs::write(&ok, b"\x7fELF0123").unwrap();
        assert_eq!(read_kernel(&ok, 32 * MIB).unwrap(), b"\x7fELF0123");
        // One byte over the limit is refused from its size.
        let big = dir.join("big.elf");
        std::fs::File::create(&big).unwrap().set_len(32 * MIB + 1).unwrap();
        let e = read_kernel(&big, 32 * MIB).unwrap_err();
        assert!(
            matches!(e, Error::KernelTooLarge { size, limit, .. } if size == 32 * MIB + 1 && limit == 32 * MIB),
            "{e}"
        );
        std::fs::File::create(&big).unwrap().set_len(32 * MIB).unwrap();
        assert_eq!(read_kernel(&big, 32 * MIB).unwrap().len() as u64, 32 * MIB);
        let e = read_kernel(Path::new("/dev/zero"), 32 * MIB).unwrap_err();
        assert!(matches!(e, Error::KernelNotRegular { kind: "a character device", .. }), "{e}");
        let e = read_kernel(&dir, 32 * MIB).unwrap_err();
        assert!(matches!(e, Error::KernelNotRegular { kind: "a directory", .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_an_entry_outside_the_image() {
        let e = inspect("k", &elf(62, 2, 0x20_0000, 0x1000, 0x1234), 32 * MIB, ZONE).unwrap_err();
        assert!(e.to_string().contains("entry point"), "{e}");
    }
}
