//! The guest-physical memory map.
//!
//! ```text
//! 0 ─ RAM ─ pt_zone.start ─ PT zone ─ pt_zone.end ─ RAM ─ ram_size ─ reserved gap ─ pool_base ─ shadow pool ─┤
//! ```
//!
//! One [`MemoryMap`] value is built from the configuration and checked once
//! ([`MemoryMap::new`]); the VMM registers exactly its [`SlotSpec`]s with KVM.
//! Invariants, each checked:
//! - regions are sorted, page-aligned (to the backing's page size for RAM)
//!   and do not overlap;
//! - the page-table zone lies inside RAM;
//! - RAM is three slots (below the zone, the zone, above it) in both modes,
//!   so the MMU mode is the only variable; only the zone's read-only flag
//!   differs (set in shadow mode so every guest page-table write exits) —
//!   and, in shadow mode, the VMM's boot page tables
//!   ([`MemoryMapConfig::boot_tables`]) below the zone are a read-only slot
//!   of their own, for the same reason;
//! - the shadow pool, when present, lies above RAM after a reserved gap and
//!   is not part of guest RAM: hypercalls and the guest's memory map never
//!   name it;
//! - the number of slots fits the host's limit.

use guest_abi::Gpa;
use guest_abi::MmuMode;
use serde::Serialize;

/// 4 KiB.
pub const PAGE_SIZE: u64 = 4096;
/// 1 GiB.
pub const GIB: u64 = 1 << 30;

/// What a region of guest-physical space holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RegionKind {
    /// Ordinary guest RAM.
    Ram,
    /// The page-table zone (guest RAM too).
    PageTables,
    /// Nothing: accesses exit to the VMM as MMIO (reads see all ones).
    Reserved,
    /// The VMM's shadow page tables (shadow mode only).
    ShadowPool,
}

impl RegionKind {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            RegionKind::Ram => "ram",
            RegionKind::PageTables => "page-tables",
            RegionKind::Reserved => "reserved",
            RegionKind::ShadowPool => "shadow-pool",
        }
    }
}

/// One region of guest-physical space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Region {
    /// First GPA.
    #[serde(serialize_with = "crate::json::hex")]
    pub start: Gpa,
    /// Length in bytes.
    pub len: u64,
    /// What it holds.
    pub kind: RegionKind,
}

impl Region {
    /// One past the last GPA.
    pub fn end(&self) -> Gpa {
        Gpa(self.start.raw() + self.len)
    }

    /// Whether `gpa` lies inside.
    pub fn contains(&self, gpa: Gpa) -> bool {
        gpa >= self.start && gpa < self.end()
    }
}

/// One KVM memslot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SlotSpec {
    /// Slot number.
    pub slot: u32,
    /// First GPA.
    #[serde(serialize_with = "crate::json::hex")]
    pub gpa: Gpa,
    /// Length in bytes.
    pub len: u64,
    /// `KVM_MEM_READONLY`: guest writes exit as MMIO.
    pub readonly: bool,
    /// What the slot holds.
    pub kind: RegionKind,
}

impl SlotSpec {
    /// The slot's `KVM_SET_USER_MEMORY_REGION` flags: `KVM_MEM_READONLY`
    /// for the trapped page-table zone, and `KVM_MEM_LOG_DIRTY_PAGES` for
    /// the shadow pool — the guest can map the pool with tables of its own
    /// (nothing traps a `mov cr3`), so the VMM asks KVM which pool pages
    /// the guest wrote and rewrites them (`vmm::mmu::shadow`).
    pub fn kvm_flags(&self) -> u32 {
        let mut flags = 0;
        if self.readonly {
            flags |= kvm_bindings::KVM_MEM_READONLY;
        }
        if self.kind == RegionKind::ShadowPool {
            flags |= kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
        }
        flags
    }
}

/// A guest-physical range `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GpaRange {
    /// First byte.
    pub start: Gpa,
    /// One past the last byte.
    pub end: Gpa,
}

impl GpaRange {
    /// `[start, end)`.
    pub const fn new(start: Gpa, end: Gpa) -> GpaRange {
        GpaRange { start, end }
    }

    /// Its length in bytes (0 when `end <= start`).
    pub const fn len(self) -> u64 {
        self.end.raw().saturating_sub(self.start.raw())
    }

    /// Whether it holds no byte.
    pub const fn is_empty(self) -> bool {
        self.end.raw() <= self.start.raw()
    }

    /// Whether `gpa` lies inside.
    pub fn contains(self, gpa: Gpa) -> bool {
        self.start <= gpa && gpa < self.end
    }
}

/// What the memory map is built from.
#[derive(Debug, Clone, Copy)]
pub struct MemoryMapConfig {
    /// Guest RAM size.
    pub ram_size: u64,
    /// Page-table zone `[start, end)`.
    pub pt_zone: GpaRange,
    /// Page tables the VMM wrote below the zone `[start, end)` (its boot
    /// tables; empty: none). In shadow mode they get a read-only slot of
    /// their own, like the zone, so guest writes to them trap too.
    pub boot_tables: GpaRange,
    /// Shadow pool size (0: none).
    pub shadow_pool: u64,
    /// The MMU mode.
    pub mmu: MmuMode,
    /// RAM alignment the backing needs (its page size).
    pub alignment: u64,
    /// How many slots the host allows.
    pub max_slots: usize,
}

/// Why a memory map is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemoryMapError {
    #[error("{what} [{start:#x}-{end:#x}) is not aligned to {align:#x}")]
    Unaligned { what: &'static str, start: u64, end: u64, align: u64 },
    #[error("{a} [{a_start:#x}-{a_end:#x}) overlaps {b} [{b_start:#x}-{b_end:#x})")]
    Overlap { a: &'static str, a_start: u64, a_end: u64, b: &'static str, b_start: u64, b_end: u64 },
    #[error("the page-table zone [{0:#x}-{1:#x}) does not lie inside guest RAM")]
    ZoneOutsideRam(Gpa, Gpa),
    #[error("the memory map needs {need} memory slots; the host allows {max}")]
    TooManySlots { need: usize, max: usize },
    #[error("the memory map does not fit in the guest-physical address space")]
    Overflow,
}

/// The guest-physical memory map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryMap {
    /// Regions, sorted and non-overlapping.
    pub regions: Vec<Region>,
    /// KVM memslots, sorted by GPA.
    pub slots: Vec<SlotSpec>,
    /// Guest RAM size: `[0, ram_size)` is RAM.
    pub ram_size: u64,
}

/// The GPA where the shadow pool starts for `ram_size` bytes of RAM: the
/// next GiB boundary after RAM plus one GiB of reserved gap, so no
/// off-by-one page-table entry can reach it from RAM.
pub fn shadow_pool_base(ram_size: u64) -> Option<Gpa> {
    ram_size.checked_next_multiple_of(GIB)?.checked_add(GIB).map(Gpa)
}

impl MemoryMap {
    /// Build and check the map.
    pub fn new(c: &MemoryMapConfig) -> Result<MemoryMap, MemoryMapError> {
        let align = c.alignment.max(PAGE_SIZE);
        let check_align = |what, start: u64, end: u64, align: u64| {
            if !start.is_multiple_of(align) || !end.is_multiple_of(align) {
                Err(MemoryMapError::Unaligned { what, start, end, align })
            } else {
                Ok(())
            }
        };
        check_align("guest RAM", 0, c.ram_size, align)?;
        let (zs, ze) = (c.pt_zone.start.raw(), c.pt_zone.end.raw());
        check_align("the page-table zone", zs, ze, PAGE_SIZE)?;
        if zs >= ze || ze > c.ram_size || zs == 0 {
            return Err(MemoryMapError::ZoneOutsideRam(c.pt_zone.start, c.pt_zone.end));
        }

        let (bs, be) = (c.boot_tables.start.raw(), c.boot_tables.end.raw());
        let mut regions = if c.mmu.is_shadowed() && bs < be {
            check_align("the boot page tables", bs, be, PAGE_SIZE)?;
            if be > zs {
                return Err(MemoryMapError::Overlap {
                    a: "boot page tables",
                    a_start: bs,
                    a_end: be,
                    b: RegionKind::PageTables.name(),
                    b_start: zs,
                    b_end: ze,
                });
            }
            let mut r = Vec::new();
            if bs > 0 {
                r.push(Region { start: Gpa(0), len: bs, kind: RegionKind::Ram });
            }
            r.push(Region { start: Gpa(bs), len: be - bs, kind: RegionKind::PageTables });
            if be < zs {
                r.push(Region { start: Gpa(be), len: zs - be, kind: RegionKind::Ram });
            }
            r
        } else {
            vec![Region { start: Gpa(0), len: zs, kind: RegionKind::Ram }]
        };
        regions.push(Region { start: Gpa(zs), len: ze - zs, kind: RegionKind::PageTables });
        if c.ram_size > ze {
            regions.push(Region { start: Gpa(ze), len: c.ram_size - ze, kind: RegionKind::Ram });
        }
        if c.shadow_pool > 0 {
            check_align("the shadow pool", 0, c.shadow_pool, PAGE_SIZE)?;
            let base = shadow_pool_base(c.ram_size).ok_or(MemoryMapError::Overflow)?.raw();
            base.checked_add(c.shadow_pool).ok_or(MemoryMapError::Overflow)?;
            regions.push(Region { start: Gpa(c.ram_size), len: base - c.ram_size, kind: RegionKind::Reserved });
            regions.push(Region { start: Gpa(base), len: c.shadow_pool, kind: RegionKind::ShadowPool });
        }
        for w in regions.windows(2) {
            if w[0].end() > w[1].start {
                return Err(MemoryMapError::Overlap {
                    a: w[0].kind.name(),
                    a_start: w[0].start.raw(),
                    a_end: w[0].end().raw(),
                    b: w[1].kind.name(),
                    b_start: w[1].start.raw(),
                    b_end: w[1].end().raw(),
                });
            }
        }

        let slots: Vec<SlotSpec> = regions
            .iter()
            .filter(|r| r.kind != RegionKind::Reserved)
            .enumerate()
            .map(|(i, r)| SlotSpec {
                slot: i as u32,
                gpa: r.start,
                len: r.len,
                // Shadow mode traps every page-table write; pv mode only writes
                // to the VMM's boot tables (the guest queues its own).
                readonly: r.kind == RegionKind::PageTables
                    && (c.mmu == MmuMode::Shadow || (c.mmu == MmuMode::Pv && r.start != Gpa(zs))),
                kind: r.kind,
            })
            .collect();
        if slots.len() > c.max_slots {
            return Err(MemoryMapError::TooManySlots { need: slots.len(), max: c.max_slots });
        }
        Ok(MemoryMap { regions, slots, ram_size: c.ram_size })
    }

    /// The slot holding `gpa`, if any.
    pub fn slot_of(&self, gpa: Gpa) -> Option<&SlotSpec> {
        self.slots.iter().find(|s| gpa >= s.gpa && gpa.raw() - s.gpa.raw() < s.len)
    }

    /// The region holding `gpa`, if any.
    pub fn region_of(&self, gpa: Gpa) -> Option<&Region> {
        self.regions.iter().find(|r| r.contains(gpa))
    }

    /// Whether `[gpa, gpa + len)` lies inside guest RAM.
    pub fn ram_contains(&self, gpa: Gpa, len: u64) -> bool {
        gpa.raw().checked_add(len).is_some_and(|end| end <= self.ram_size)
    }

    /// The shadow pool, if the map has one.
    pub fn shadow_pool(&self) -> Option<&Region> {
        self.regions.iter().find(|r| r.kind == RegionKind::ShadowPool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(start: u64, end: u64) -> GpaRange {
        GpaRange::new(Gpa(start), Gpa(end))
    }

    const MIB: u64 = 1 << 20;

    fn config(mmu: MmuMode) -> MemoryMapConfig {
        MemoryMapConfig {
            ram_size: 256 * MIB,
            pt_zone: zone(16 * MIB, 48 * MIB),
            boot_tables: zone(0, 0),
            shadow_pool: 0,
            mmu,
            alignment: PAGE_SIZE,
            max_slots: 32,
        }
    }

    #[test]
    fn ept_mode_has_three_writable_ram_slots() {
        let m = MemoryMap::new(&config(MmuMode::Ept)).unwrap();
        assert_eq!(m.slots.len(), 3);
        assert!(m.slots.iter().all(|s| !s.readonly));
        assert_eq!(m.slots.iter().map(|s| s.len).sum::<u64>(), 256 * MIB);
        assert_eq!(m.slot_of(Gpa(16 * MIB)).unwrap().kind, RegionKind::PageTables);
        assert_eq!(m.slot_of(Gpa(48 * MIB)).unwrap().kind, RegionKind::Ram);
        assert!(m.slot_of(Gpa(256 * MIB)).is_none());
    }

    #[test]
    fn shadow_mode_traps_the_boot_tables_with_a_read_only_slot_of_their_own() {
        let c = MemoryMapConfig { shadow_pool: 16 * MIB, boot_tables: zone(0x9000, 0xd000), ..config(MmuMode::Shadow) };
        let m = MemoryMap::new(&c).unwrap();
        let boot = m.slot_of(Gpa(0xa000)).unwrap();
        assert!(boot.readonly && boot.kind == RegionKind::PageTables);
        assert_eq!((boot.gpa, boot.len), (Gpa(0x9000), 0x4000));
        assert!(!m.slot_of(Gpa(0x8000)).unwrap().readonly);
        assert!(!m.slot_of(Gpa(0xd000)).unwrap().readonly);
        assert_eq!(m.slots.iter().filter(|s| s.readonly).count(), 2);
        assert_eq!(m.slots.iter().filter(|s| s.kind != RegionKind::ShadowPool).map(|s| s.len).sum::<u64>(), 256 * MIB);
        // In ept mode nothing changes.
        let m = MemoryMap::new(&MemoryMapConfig { mmu: MmuMode::Ept, shadow_pool: 0, ..c }).unwrap();
        assert_eq!(m.slots.len(), 3);
    }

    #[test]
    fn pv_mode_leaves_the_zone_writable_but_traps_the_boot_tables() {
        let c = MemoryMapConfig { shadow_pool: 16 * MIB, boot_tables: zone(0x9000, 0xd000), ..config(MmuMode::Pv) };
        let m = MemoryMap::new(&c).unwrap();
        assert!(m.slot_of(Gpa(0xa000)).unwrap().readonly, "the VMM's boot tables still trap");
        let zone = m.slot_of(Gpa(20 * MIB)).unwrap();
        assert!(!zone.readonly && zone.kind == RegionKind::PageTables, "the guest writes its tables itself");
        assert_eq!(m.slots.iter().filter(|s| s.readonly).count(), 1);
        assert!(m.shadow_pool().is_some());
    }

    #[test]
    fn shadow_mode_makes_the_zone_read_only_and_adds_the_pool_above_a_gap() {
        let m = MemoryMap::new(&MemoryMapConfig { shadow_pool: 16 * MIB, ..config(MmuMode::Shadow) }).unwrap();
        let zone = m.slot_of(Gpa(20 * MIB)).unwrap();
        assert!(zone.readonly);
        assert_eq!(m.slots.iter().filter(|s| s.readonly).count(), 1);
        let pool = m.shadow_pool().unwrap();
        assert_eq!(pool.start, Gpa(2 * GIB));
        assert_eq!(m.region_of(Gpa(GIB)).unwrap().kind, RegionKind::Reserved);
        assert!(m.slot_of(Gpa(GIB)).is_none(), "the gap has no slot");
        assert!(!m.ram_contains(pool.start, 8), "the pool is not guest RAM");
        assert_eq!(m.slots.len(), 4);
    }

    #[test]
    fn misaligned_layouts_are_refused() {
        let e = MemoryMap::new(&MemoryMapConfig { ram_size: 255 * MIB, alignment: 2 * MIB, ..config(MmuMode::Ept) });
        assert!(matches!(e, Err(MemoryMapError::Unaligned { what: "guest RAM", .. })), "{e:?}");
        let e = MemoryMap::new(&MemoryMapConfig { pt_zone: zone(16 * MIB + 1, 48 * MIB), ..config(MmuMode::Ept) });
        assert!(matches!(e, Err(MemoryMapError::Unaligned { .. })), "{e:?}");
        let e = MemoryMap::new(&MemoryMapConfig {
            ram_size: 2 * GIB,
            alignment: GIB,
            pt_zone: zone(GIB, GIB + 16 * MIB),
            ..config(MmuMode::Ept)
        });
        assert!(e.is_ok(), "{e:?}");
    }

    #[test]
    fn zone_must_lie_inside_ram() {
        let e = MemoryMap::new(&MemoryMapConfig { pt_zone: zone(200 * MIB, 300 * MIB), ..config(MmuMode::Ept) });
        assert_eq!(e, Err(MemoryMapError::ZoneOutsideRam(Gpa(200 * MIB), Gpa(300 * MIB))));
        assert_eq!(
            e.unwrap_err().to_string(),
            "the page-table zone [0xc800000-0x12c00000) does not lie inside guest RAM"
        );
        let e = MemoryMap::new(&MemoryMapConfig { pt_zone: zone(48 * MIB, 16 * MIB), ..config(MmuMode::Ept) });
        assert!(matches!(e, Err(MemoryMapError::ZoneOutsideRam(..))));
    }

    #[test]
    fn slot_limit_is_enforced() {
        let e = MemoryMap::new(&MemoryMapConfig { max_slots: 2, ..config(MmuMode::Ept) });
        assert_eq!(e, Err(MemoryMapError::TooManySlots { need: 3, max: 2 }));
    }

    #[test]
    fn zone_at_the_top_of_ram_gives_two_slots() {
        let m =
            MemoryMap::new(&MemoryMapConfig { pt_zone: zone(192 * MIB, 256 * MIB), ..config(MmuMode::Ept) }).unwrap();
        assert_eq!(m.slots.len(), 2);
    }

    #[test]
    fn pool_base_overflow_is_an_error() {
        assert_eq!(shadow_pool_base(u64::MAX - 5), None);
        assert_eq!(shadow_pool_base(256 * MIB), Some(Gpa(2 * GIB)));
    }
}
