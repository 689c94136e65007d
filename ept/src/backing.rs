//! The host memory behind guest RAM, and the KVM memslots over it.
//!
//! Three backings (`--backing`): anonymous 4 KiB pages (`4k`, with
//! `MADV_NOHUGEPAGE` so a host in THP `always` mode does not change the
//! experiment), transparent huge pages (`thp`: a 2 MiB-aligned anonymous
//! mapping with `MADV_HUGEPAGE`) and hugetlb pages (`hugetlb`, 2 MiB or
//! 1 GiB, `MAP_HUGETLB`). When the host cannot give what was asked (THP
//! disabled, too few free hugetlb pages) creation fails with a message that
//! says what to change — never a silent fallback to another page size.
//!
//! Invariants: guest RAM is one host mapping, so GPA→HVA is `base + GPA`
//! for all of RAM; the shadow pool, when the map has one, is a separate
//! 4 KiB mapping that is not part of the guest-RAM `GuestMemoryMmap`; both
//! mappings live exactly as long as the [`GuestRam`] (they are unmapped in
//! `Drop`, after the `vm-memory` views of them are gone).

use crate::memmap::{MemoryMap, RegionKind, SlotSpec};
use guest_abi::{Gpa, Hva};
use serde::Serialize;
use std::fmt;
use std::str::FromStr;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// Size of a hugetlb page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum HugePageSize {
    /// 2 MiB.
    #[serde(rename = "2M")]
    Size2M,
    /// 1 GiB.
    #[serde(rename = "1G")]
    Size1G,
}

impl HugePageSize {
    /// Bytes.
    pub fn bytes(self) -> u64 {
        match self {
            HugePageSize::Size2M => 2 << 20,
            HugePageSize::Size1G => 1 << 30,
        }
    }

    /// The `sysfs` directory of this page size.
    pub fn sysfs_dir(self) -> String {
        format!("/sys/kernel/mm/hugepages/hugepages-{}kB", self.bytes() >> 10)
    }

    fn mmap_flag(self) -> i32 {
        // MAP_HUGE_SHIFT is 26: the flag encodes log2 of the page size.
        match self {
            HugePageSize::Size2M => 21 << libc::MAP_HUGE_SHIFT,
            HugePageSize::Size1G => 30 << libc::MAP_HUGE_SHIFT,
        }
    }
}

/// What backs guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backing {
    /// Anonymous memory in 4 KiB pages.
    #[serde(rename = "4k")]
    Anon4k,
    /// Transparent huge pages (`MADV_HUGEPAGE`).
    Thp,
    /// hugetlb pages of the given size.
    Hugetlb(HugePageSize),
}

impl Backing {
    /// The alignment guest RAM needs with this backing.
    pub fn alignment(self) -> u64 {
        match self {
            Backing::Anon4k => 4096,
            Backing::Thp => 2 << 20,
            Backing::Hugetlb(s) => s.bytes(),
        }
    }
}

impl fmt::Display for Backing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backing::Anon4k => write!(f, "4k"),
            Backing::Thp => write!(f, "thp"),
            Backing::Hugetlb(HugePageSize::Size2M) => write!(f, "hugetlb-2m"),
            Backing::Hugetlb(HugePageSize::Size1G) => write!(f, "hugetlb-1g"),
        }
    }
}

impl FromStr for Backing {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "4k" => Ok(Backing::Anon4k),
            "thp" => Ok(Backing::Thp),
            "hugetlb" | "hugetlb-2m" | "hugetlb:2m" => Ok(Backing::Hugetlb(HugePageSize::Size2M)),
            "hugetlb-1g" | "hugetlb:1g" => Ok(Backing::Hugetlb(HugePageSize::Size1G)),
            _ => Err(format!("unknown backing '{s}': use 4k, thp, hugetlb (2 MiB pages) or hugetlb-1g")),
        }
    }
}

/// Why the host could not give the backing.
#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    #[error(
        "--backing thp: transparent huge pages are disabled on this host (/sys/kernel/mm/transparent_hugepage/enabled is '{0}'); set it to madvise or always, or use --backing 4k"
    )]
    ThpDisabled(String),
    #[error("--backing thp: this host kernel has no transparent huge pages (no /sys/kernel/mm/transparent_hugepage)")]
    ThpUnsupported,
    #[error(
        "--backing {backing}: needs {need} free {size} hugetlb page{}, the host has {free}; reserve them with 'echo {need} > {dir}/nr_hugepages' (as root)",
        if *need == 1 { "" } else { "s" }
    )]
    HugetlbShort { backing: Backing, size: &'static str, need: u64, free: u64, dir: String },
    #[error("--backing {backing}: this host has no {size} hugetlb pages ({dir} is missing)")]
    HugetlbUnsupported { backing: Backing, size: &'static str, dir: String },
    #[error("guest RAM of {} exceeds this host's memory ({})", mib(*want), mib(*have))]
    TooLarge { want: u64, have: u64 },
    #[error("the host cannot map {} for {what}: {source}", mib(*len))]
    Mmap {
        what: &'static str,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("madvise on guest RAM failed: {0}")]
    Madvise(#[source] std::io::Error),
    #[error("vm-memory refused the mapping: {0}")]
    Region(String),
}

fn mib(n: u64) -> String {
    format!("{} MiB", n >> 20)
}

/// An anonymous mapping this module created and unmaps on drop.
struct HostMapping {
    addr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain process memory with no thread affinity; the
// raw pointer is only an address. Access goes through vm-memory's volatile
// accessors and KVM.
unsafe impl Send for HostMapping {}
// SAFETY: as above; `HostMapping` itself offers no access to the memory.
unsafe impl Sync for HostMapping {}

impl Drop for HostMapping {
    fn drop(&mut self) {
        // SAFETY: `addr..addr+len` is a mapping this module created and
        // nothing else unmaps; the vm-memory views of it are dropped first
        // (field order in GuestRam).
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

fn mmap_anon(len: u64, extra_flags: i32, what: &'static str) -> Result<HostMapping, BackingError> {
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | extra_flags;
    // SAFETY: a fresh anonymous mapping at an address the kernel picks; no
    // existing memory is affected.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len as usize, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
    if p == libc::MAP_FAILED {
        return Err(BackingError::Mmap { what, len, source: std::io::Error::last_os_error() });
    }
    Ok(HostMapping { addr: p.cast(), len: len as usize })
}

/// An anonymous mapping of `len` bytes whose start is `align`-aligned:
/// map `len + align`, then give back the unaligned head and the tail.
fn mmap_aligned(len: u64, align: u64, what: &'static str) -> Result<HostMapping, BackingError> {
    let over = mmap_anon(len + align, 0, what)?;
    let base = over.addr as u64;
    let start = base.next_multiple_of(align);
    let (head, tail) = (start - base, base + len + align - (start + len));
    std::mem::forget(over);
    // SAFETY: both ranges are parts of the mapping just created (which is
    // forgotten, so it is not unmapped twice); what remains is exactly
    // `start..start+len`, owned by the returned HostMapping.
    unsafe {
        if head > 0 {
            libc::munmap(base as *mut libc::c_void, head as usize);
        }
        if tail > 0 {
            libc::munmap((start + len) as *mut libc::c_void, tail as usize);
        }
    }
    Ok(HostMapping { addr: start as *mut u8, len: len as usize })
}

fn madvise(m: &HostMapping, advice: i32) -> Result<(), BackingError> {
    // SAFETY: advice on a mapping we own; it changes no contents.
    if unsafe { libc::madvise(m.addr.cast(), m.len, advice) } != 0 {
        return Err(BackingError::Madvise(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The THP mode in force (`always`, `madvise` or `never`), if the host has THP.
pub fn thp_mode() -> Option<String> {
    let s = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
    let start = s.find('[')?;
    let end = s[start..].find(']')? + start;
    Some(s[start + 1..end].to_string())
}

/// Free hugetlb pages of `size`, if the host supports that size.
pub fn hugetlb_free(size: HugePageSize) -> Option<u64> {
    std::fs::read_to_string(format!("{}/free_hugepages", size.sysfs_dir())).ok()?.trim().parse().ok()
}

/// Total host memory in bytes (`MemTotal` + `SwapTotal`).
pub fn host_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        s.lines().find(|l| l.starts_with(name))?.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb << 10)
    };
    Some(field("MemTotal:")? + field("SwapTotal:").unwrap_or(0))
}

fn create_ram(len: u64, backing: Backing) -> Result<HostMapping, BackingError> {
    match backing {
        Backing::Anon4k => {
            let m = mmap_anon(len, 0, "guest RAM")?;
            // Only matters when THP is in `always` mode; ignore hosts without THP.
            if thp_mode().is_some() {
                madvise(&m, libc::MADV_NOHUGEPAGE)?;
            }
            Ok(m)
        }
        Backing::Thp => {
            match thp_mode().as_deref() {
                None => return Err(BackingError::ThpUnsupported),
                Some("never") => return Err(BackingError::ThpDisabled("never".into())),
                Some(_) => {}
            }
            let m = mmap_aligned(len, 2 << 20, "guest RAM")?;
            madvise(&m, libc::MADV_HUGEPAGE)?;
            Ok(m)
        }
        Backing::Hugetlb(size) => {
            let label = if size == HugePageSize::Size2M { "2 MiB" } else { "1 GiB" };
            let need = len.div_ceil(size.bytes());
            match hugetlb_free(size) {
                None => {
                    return Err(BackingError::HugetlbUnsupported { backing, size: label, dir: size.sysfs_dir() });
                }
                Some(free) if free < need => {
                    return Err(BackingError::HugetlbShort { backing, size: label, need, free, dir: size.sysfs_dir() });
                }
                Some(_) => {}
            }
            // Without MAP_NORESERVE the pages are reserved now, so a race
            // with another user of the pool fails here, not at first touch.
            // SAFETY: a fresh hugetlb mapping at an address the kernel picks.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | size.mmap_flag(),
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(BackingError::Mmap { what: "guest RAM", len, source: std::io::Error::last_os_error() });
            }
            Ok(HostMapping { addr: p.cast(), len: len as usize })
        }
    }
}

fn memory_over(m: &HostMapping, gpa: u64) -> Result<GuestMemoryMmap, BackingError> {
    // SAFETY: `m` is a live RW mapping of exactly `m.len` bytes that
    // outlives the region (GuestRam drops the views before the mappings).
    let region = unsafe { MmapRegionBuilder::new(m.len).with_raw_mmap_pointer(m.addr) }
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS)
        .build()
        .map_err(|e| BackingError::Region(e.to_string()))?;
    let region = GuestRegionMmap::new(region, GuestAddress(gpa)).ok_or(BackingError::Region("overflow".into()))?;
    GuestMemoryMmap::from_regions(vec![region]).map_err(|e| BackingError::Region(e.to_string()))
}

/// Guest RAM (and the shadow pool) for one VM.
pub struct GuestRam {
    // Field order matters: the vm-memory views drop before the mappings.
    mem: GuestMemoryMmap,
    pool: Option<GuestMemoryMmap>,
    ram_mapping: HostMapping,
    pool_mapping: Option<HostMapping>,
    backing: Backing,
}

impl GuestRam {
    /// Create the host memory for `map` with `backing`.
    pub fn new(map: &MemoryMap, backing: Backing) -> Result<GuestRam, BackingError> {
        if let Some(have) = host_memory()
            && map.ram_size > have
        {
            return Err(BackingError::TooLarge { want: map.ram_size, have });
        }
        let ram_mapping = create_ram(map.ram_size, backing)?;
        let mem = memory_over(&ram_mapping, 0)?;
        let (pool, pool_mapping) = match map.shadow_pool() {
            Some(r) => {
                let m = mmap_anon(r.len, 0, "the shadow pool")?;
                (Some(memory_over(&m, r.start.raw())?), Some(m))
            }
            None => (None, None),
        };
        Ok(GuestRam { mem, pool, ram_mapping, pool_mapping, backing })
    }

    /// Guest RAM, `[0, ram_size)`.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The shadow pool, if the map has one.
    pub fn pool(&self) -> Option<&GuestMemoryMmap> {
        self.pool.as_ref()
    }

    /// The backing in use.
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// Host-virtual address of guest RAM's first byte.
    pub fn ram_hva(&self) -> Hva {
        Hva(self.ram_mapping.addr as u64)
    }

    /// GPA→HVA for RAM and the pool: the memory-map step of the chain.
    pub fn hva(&self, map: &MemoryMap, gpa: Gpa) -> Option<Hva> {
        let region = map.region_of(gpa)?;
        let gpa = gpa.raw();
        match region.kind {
            RegionKind::Ram | RegionKind::PageTables => Some(Hva(self.ram_mapping.addr as u64 + gpa)),
            RegionKind::ShadowPool => {
                self.pool_mapping.as_ref().map(|m| Hva(m.addr as u64 + (gpa - region.start.raw())))
            }
            RegionKind::Reserved => None,
        }
    }

    /// Register every slot of `map` with KVM.
    pub fn register(&self, map: &MemoryMap, vm: &kvm_ioctls::VmFd) -> Result<(), kvm_ioctls::Error> {
        for s in &map.slots {
            self.set_slot(map, vm, s, s.kvm_flags(), s.len)?;
        }
        Ok(())
    }

    /// Delete slot `s` of `map` and add it back over the same host memory
    /// with KVM flags `flags`: how a slot changes its flags (KVM refuses a
    /// flags change in place, except dirty logging), and how a host whose
    /// KVM shadows page tables is made to drop every translation through
    /// the slot. The one place besides [`GuestRam::register`] that gives
    /// KVM a memslot (`crate::memmap` decides every slot, nothing else
    /// does); `s` must be one of `map`'s slots.
    pub fn reregister(
        &self,
        map: &MemoryMap,
        vm: &kvm_ioctls::VmFd,
        s: &SlotSpec,
        flags: u32,
    ) -> Result<(), kvm_ioctls::Error> {
        self.set_slot(map, vm, s, flags, 0)?;
        self.set_slot(map, vm, s, flags, s.len)
    }

    /// `KVM_SET_USER_MEMORY_REGION` for slot `s` over its host memory in
    /// this `GuestRam`, `memory_size` bytes (0 deletes the slot).
    fn set_slot(
        &self,
        map: &MemoryMap,
        vm: &kvm_ioctls::VmFd,
        s: &SlotSpec,
        flags: u32,
        memory_size: u64,
    ) -> Result<(), kvm_ioctls::Error> {
        let hva = self.hva(map, s.gpa).expect("slots lie in RAM or the pool");
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: s.slot,
            flags,
            guest_phys_addr: s.gpa.raw(),
            memory_size,
            userspace_addr: hva.raw(),
        };
        // SAFETY: the host range lies inside a mapping owned by this
        // GuestRam (`hva` maps only RAM and the pool, and `s` lies in one
        // of them), which the VMM keeps alive as long as the VM; deleting
        // or re-adding the slot over the same range changes nothing else.
        unsafe { vm.set_user_memory_region(region) }
    }

    /// Bytes of guest RAM currently backed by huge pages, from
    /// `/proc/self/smaps` (THP: `AnonHugePages`; hugetlb: `*_Hugetlb`).
    pub fn huge_backed_bytes(&self) -> std::io::Result<u64> {
        crate::pagemap::huge_backed_bytes(self.ram_hva(), self.ram_mapping.len as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memmap::{GpaRange, MemoryMapConfig};
    use guest_abi::MmuMode;
    use vm_memory::Bytes;

    const MIB: u64 = 1 << 20;

    fn map(ram: u64, pool: u64) -> MemoryMap {
        MemoryMap::new(&MemoryMapConfig {
            ram_size: ram,
            pt_zone: GpaRange::new(Gpa(16 * MIB), Gpa(20 * MIB)),
            boot_tables: GpaRange::default(),
            shadow_pool: pool,
            mmu: MmuMode::Ept,
            alignment: 2 * MIB,
            max_slots: 32,
        })
        .unwrap()
    }

    #[test]
    fn backing_names_round_trip() {
        for b in ["4k", "thp", "hugetlb-2m", "hugetlb-1g"] {
            assert_eq!(b.parse::<Backing>().unwrap().to_string(), b);
        }
        assert_eq!("hugetlb".parse::<Backing>(), Ok(Backing::Hugetlb(HugePageSize::Size2M)));
        assert!("huge".parse::<Backing>().unwrap_err().contains("unknown backing"));
    }

    #[test]
    fn gpa_to_hva_is_linear_over_ram_and_separate_for_the_pool() {
        let m = map(64 * MIB, 4 * MIB);
        let ram = GuestRam::new(&m, Backing::Anon4k).unwrap();
        let base = ram.ram_hva().raw();
        assert_eq!(ram.hva(&m, Gpa(0)), Some(Hva(base)));
        assert_eq!(ram.hva(&m, Gpa(17 * MIB)), Some(Hva(base + 17 * MIB)));
        let pool = m.shadow_pool().unwrap();
        let pool_hva = ram.hva(&m, pool.start).unwrap().raw();
        assert!(pool_hva < base || pool_hva >= base + 64 * MIB, "the pool is a separate mapping");
        assert_eq!(ram.hva(&m, Gpa(64 * MIB)), None, "the gap has no HVA");
        // Writes through vm-memory land at the HVA.
        ram.memory().write_obj(0xfeed_u64, GuestAddress(17 * MIB)).unwrap();
        // SAFETY: the address lies inside the live RAM mapping.
        let v = unsafe { std::ptr::read_volatile((base + 17 * MIB) as *const u64) };
        assert_eq!(v, 0xfeed);
        // The pool is not guest RAM.
        assert!(ram.memory().read_obj::<u64>(GuestAddress(pool.start.raw())).is_err());
        assert!(ram.pool().unwrap().read_obj::<u64>(GuestAddress(pool.start.raw())).is_ok());
    }

    #[test]
    fn thp_backing_gets_huge_pages_when_the_host_has_thp() {
        let m = map(32 * MIB, 0);
        match thp_mode().as_deref() {
            Some("always") | Some("madvise") => {
                let ram = GuestRam::new(&m, Backing::Thp).unwrap();
                assert!(ram.ram_hva().is_aligned(2 * MIB), "THP needs 2 MiB alignment");
                // Touch every page, then ask smaps.
                for gpa in (0..32 * MIB).step_by(4096) {
                    ram.memory().write_obj(1u8, GuestAddress(gpa)).unwrap();
                }
                let huge = ram.huge_backed_bytes().unwrap();
                assert!(huge >= 2 * MIB, "no huge pages after touching 32 MiB: {huge}");
            }
            Some(other) => {
                let e = GuestRam::new(&m, Backing::Thp).err().unwrap();
                assert!(e.to_string().contains(other), "{e}");
            }
            None => assert!(matches!(GuestRam::new(&m, Backing::Thp), Err(BackingError::ThpUnsupported))),
        }
    }

    #[test]
    fn four_k_backing_has_no_huge_pages() {
        let m = map(32 * MIB, 0);
        let ram = GuestRam::new(&m, Backing::Anon4k).unwrap();
        for gpa in (0..32 * MIB).step_by(4096) {
            ram.memory().write_obj(1u8, GuestAddress(gpa)).unwrap();
        }
        assert_eq!(ram.huge_backed_bytes().unwrap(), 0);
    }

    #[test]
    fn hugetlb_without_enough_free_pages_is_a_clear_error() {
        let m = map(32 * MIB, 0);
        let backing = Backing::Hugetlb(HugePageSize::Size2M);
        match hugetlb_free(HugePageSize::Size2M) {
            Some(free) if free < 16 => {
                let e = GuestRam::new(&m, backing).err().unwrap();
                let msg = e.to_string();
                assert!(msg.contains("needs 16 free 2 MiB hugetlb pages"), "{msg}");
                assert!(msg.contains("nr_hugepages"), "{msg}");
            }
            Some(_) => {
                let ram = GuestRam::new(&m, backing).unwrap();
                ram.memory().write_obj(1u8, GuestAddress(0)).unwrap();
                assert!(ram.huge_backed_bytes().unwrap() >= 2 * MIB);
            }
            None => assert!(matches!(GuestRam::new(&m, backing), Err(BackingError::HugetlbUnsupported { .. }))),
        }
    }

    #[test]
    fn ram_larger_than_the_host_is_refused() {
        let Some(have) = host_memory() else { return };
        let big = (have + (1 << 30)).next_multiple_of(1 << 30);
        let m = map(big, 0);
        assert!(matches!(GuestRam::new(&m, Backing::Anon4k), Err(BackingError::TooLarge { .. })));
    }
}
