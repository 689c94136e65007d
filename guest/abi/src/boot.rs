//! The boot-info record: what the VMM tells the guest at entry.
//!
//! The VMM writes one [`BootInfo`] into guest RAM and passes its GPA in
//! `rdi`. The guest checks [`BootInfo::magic`] and [`BootInfo::version`]
//! before trusting anything else in it.
//!
//! Version 2 (SMP) appended [`BootInfo::cpus`] and [`BootInfo::reserved2`]
//! after `regions`; every earlier field keeps its offset. A guest refuses
//! a record of any other version.

/// `BootInfo::magic`: "MMUVBOOT" in little-endian ASCII.
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"MMUVBOOT");
/// `BootInfo::version`; bumped whenever the layout changes.
pub const BOOT_INFO_VERSION: u32 = 2;
/// Most vCPUs a VM may have (`BootInfo::cpus`; the guest's CPU masks are
/// one `u64`).
pub const MAX_CPUS: u32 = 64;
/// Guest-virtual base of the direct map of RAM the boot page tables set up
/// (`GVA = DIRECT_MAP_BASE + GPA`, as Linux's `PAGE_OFFSET`).
pub const DIRECT_MAP_BASE: u64 = 0xffff_8880_0000_0000;
/// Guest-virtual base of the kernel image window (`GVA = KERNEL_VMA + GPA`
/// for the kernel image; the top 2 GiB, as the kernel code model needs).
pub const KERNEL_VMA: u64 = 0xffff_ffff_8000_0000;
/// Maximum number of memory-map entries.
pub const MAX_MEM_REGIONS: usize = 16;
/// Maximum length of the command line, in bytes (no terminator).
pub const MAX_CMDLINE_LEN: usize = 2048;

/// How the guest's memory is virtualised.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmuMode {
    /// Hardware-assisted: the vCPU walks the guest's tables, KVM's
    /// second-stage tables map GPA→HPA.
    Ept = 1,
    /// Software shadow page tables kept by the VMM; every guest
    /// page-table write traps.
    Shadow = 2,
    /// Paravirtual shadow paging: the same shadow MMU, but the guest writes
    /// its tables directly, records each write in a queue shared with the
    /// VMM ([`crate::pv`]) and syncs at hypercalls.
    Pv = 3,
}

impl MmuMode {
    /// Decode the raw value stored in [`BootInfo::mmu_mode`].
    pub const fn from_raw(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Ept),
            2 => Some(Self::Shadow),
            3 => Some(Self::Pv),
            _ => None,
        }
    }

    /// The mode's name as the command line spells it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Ept => "ept",
            Self::Shadow => "shadow",
            Self::Pv => "pv",
        }
    }

    /// Whether the VMM keeps shadow page tables (shadow and pv modes).
    pub const fn is_shadowed(self) -> bool {
        matches!(self, Self::Shadow | Self::Pv)
    }
}

/// What a memory-map entry holds.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemRegionKind {
    /// Free RAM the guest may allocate.
    Usable = 1,
    /// RAM the VMM uses for boot structures (boot GDT, page tables, this
    /// record, the command line); free once the guest has its own.
    Boot = 2,
    /// The loaded kernel image.
    Kernel = 3,
    /// The page-table zone: every guest page-table page comes from here.
    PageTables = 4,
    /// Not to be touched.
    Reserved = 5,
}

impl MemRegionKind {
    /// Decode a raw kind.
    pub const fn from_raw(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Usable),
            2 => Some(Self::Boot),
            3 => Some(Self::Kernel),
            4 => Some(Self::PageTables),
            5 => Some(Self::Reserved),
            _ => None,
        }
    }

    /// A short name for printing.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Usable => "usable",
            Self::Boot => "boot",
            Self::Kernel => "kernel",
            Self::PageTables => "page-tables",
            Self::Reserved => "reserved",
        }
    }
}

/// One entry of the guest-physical memory map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemRegion {
    /// First guest-physical address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// A [`MemRegionKind`] as `u32`.
    pub kind: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

impl MemRegion {
    /// One past the last address, saturating.
    pub const fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }
}

/// The boot record. Lives in guest RAM at the GPA passed in `rdi`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`BOOT_INFO_VERSION`].
    pub version: u32,
    /// A [`MmuMode`] as `u32`.
    pub mmu_mode: u32,
    /// Total guest RAM in bytes (guest-physical `0..ram_size`).
    pub ram_size: u64,
    /// Guest-virtual base of the direct map set up by the boot page tables
    /// (`GVA = direct_map_base + GPA`).
    pub direct_map_base: u64,
    /// How much of RAM the boot page tables map (from GPA 0), in bytes.
    pub boot_mapped: u64,
    /// The page-table zone (also listed in `regions`).
    pub pt_zone: MemRegion,
    /// Number of valid entries in `regions`.
    pub region_count: u32,
    /// Length of the command line in bytes.
    pub cmdline_len: u32,
    /// Guest-physical address of the command line (UTF-8, not terminated).
    pub cmdline_gpa: u64,
    /// The memory map, sorted by start address, non-overlapping.
    pub regions: [MemRegion; MAX_MEM_REGIONS],
    /// Number of vCPUs the VMM created, `1..=MAX_CPUS`; vCPU `i` has APIC
    /// id `i` and starts at the guest's `CPU_ON` request (version 2).
    pub cpus: u32,
    /// Reserved, zero (version 2).
    pub reserved2: u32,
}

impl BootInfo {
    /// An empty record with magic and version set.
    pub const fn new() -> Self {
        BootInfo {
            magic: BOOT_INFO_MAGIC,
            version: BOOT_INFO_VERSION,
            mmu_mode: MmuMode::Ept as u32,
            ram_size: 0,
            direct_map_base: 0,
            boot_mapped: 0,
            pt_zone: MemRegion { start: 0, len: 0, kind: MemRegionKind::PageTables as u32, reserved: 0 },
            region_count: 0,
            cmdline_len: 0,
            cmdline_gpa: 0,
            regions: [MemRegion { start: 0, len: 0, kind: 0, reserved: 0 }; MAX_MEM_REGIONS],
            cpus: 1,
            reserved2: 0,
        }
    }

    /// Whether magic and version match this build of the ABI.
    pub const fn is_valid(&self) -> bool {
        self.magic == BOOT_INFO_MAGIC && self.version == BOOT_INFO_VERSION
    }

    /// The number of CPUs, clamped to `1..=MAX_CPUS` (a hostile or zero
    /// value never makes the guest index past its per-CPU arrays).
    pub const fn cpu_count(&self) -> u32 {
        if self.cpus == 0 {
            1
        } else if self.cpus > MAX_CPUS {
            MAX_CPUS
        } else {
            self.cpus
        }
    }

    /// The valid entries of the memory map (clamped to the array).
    pub fn regions(&self) -> &[MemRegion] {
        let n = (self.region_count as usize).min(MAX_MEM_REGIONS);
        &self.regions[..n]
    }

    /// Append a region; `false` if the map is full.
    pub fn push_region(&mut self, start: u64, len: u64, kind: MemRegionKind) -> bool {
        let n = self.region_count as usize;
        if n >= MAX_MEM_REGIONS {
            return false;
        }
        self.regions[n] = MemRegion { start, len, kind: kind as u32, reserved: 0 };
        self.region_count += 1;
        true
    }
}

impl Default for BootInfo {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_stable() {
        // The guest and the VMM are compiled separately; a silent layout
        // change would make the guest read garbage.
        assert_eq!(core::mem::size_of::<MemRegion>(), 24);
        assert_eq!(core::mem::size_of::<BootInfo>(), 80 + 16 * 24 + 8);
        assert_eq!(core::mem::offset_of!(BootInfo, regions), 80);
        // Version 2 appended the CPU count after the regions.
        assert_eq!(core::mem::offset_of!(BootInfo, cpus), 80 + 16 * 24);
        assert_eq!(core::mem::offset_of!(BootInfo, reserved2), 80 + 16 * 24 + 4);
        assert_eq!(BOOT_INFO_VERSION, 2);
    }

    #[test]
    fn cpu_count_is_clamped() {
        let mut b = BootInfo::new();
        assert_eq!(b.cpu_count(), 1);
        b.cpus = 0;
        assert_eq!(b.cpu_count(), 1);
        b.cpus = 4;
        assert_eq!(b.cpu_count(), 4);
        b.cpus = u32::MAX;
        assert_eq!(b.cpu_count(), MAX_CPUS);
    }

    #[test]
    fn other_versions_are_refused() {
        let mut b = BootInfo::new();
        assert!(b.is_valid());
        b.version = 1;
        assert!(!b.is_valid());
    }

    #[test]
    fn region_list_is_bounded() {
        let mut b = BootInfo::new();
        for i in 0..MAX_MEM_REGIONS as u64 {
            assert!(b.push_region(i * 0x1000, 0x1000, MemRegionKind::Usable));
        }
        assert!(!b.push_region(0, 1, MemRegionKind::Usable));
        assert_eq!(b.regions().len(), MAX_MEM_REGIONS);
        b.region_count = u32::MAX; // hostile value: still clamped
        assert_eq!(b.regions().len(), MAX_MEM_REGIONS);
    }
}
