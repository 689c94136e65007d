//! The zones: which frames each holds, the order in which ordinary
//! allocations try them, their counters, and the state kept per zone.
//!
//! Part of [`crate::buddy`], whose module doc states the allocator's
//! invariants. Here:
//!
//! - A frame's zone follows from its pfn alone (the page-table zone first,
//!   then below [`DMA_LIMIT`](super::DMA_LIMIT), then the rest), and never changes.
//! - [`ZonePref::zonelist`] never names [`ZoneId::PageTables`]: ordinary
//!   allocations never fall back into the page-table zone.
//! - A [`Zone`]'s counters describe its lists exactly: `free_pages` is the
//!   frames on its free lists; `hot_pages` is not kept but read from the
//!   hot list's length.

use super::NR_ORDERS;
use super::free_lists::FreeArea;
use super::zone_hot_list::ZoneHotList;

/// Number of zones.
pub const NR_ZONES: usize = 3;

/// A memory zone.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
#[repr(u8)]
pub enum ZoneId {
    /// Frames below 16 MiB ([`DMA_LIMIT`](super::DMA_LIMIT)).
    Dma = 0,
    /// All other frames, except the page-table zone.
    Normal = 1,
    /// The page-table zone: every page-table page comes from here.
    PageTables = 2,
}

impl ZoneId {
    /// Every zone, in index order.
    pub const ALL: [ZoneId; NR_ZONES] = [ZoneId::Dma, ZoneId::Normal, ZoneId::PageTables];

    /// The zone's name, as Linux spells it.
    pub const fn as_str(self) -> &'static str {
        match self {
            ZoneId::Dma => "DMA",
            ZoneId::Normal => "Normal",
            ZoneId::PageTables => "PageTables",
        }
    }

    pub(super) const fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            0 => Some(ZoneId::Dma),
            1 => Some(ZoneId::Normal),
            2 => Some(ZoneId::PageTables),
            _ => None,
        }
    }
}

/// Where an ordinary allocation may come from, in order (Linux's zonelist).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ZonePref {
    /// `NORMAL`, falling back to `DMA` when `NORMAL` cannot serve.
    Normal,
    /// `DMA` only (memory below 16 MiB).
    Dma,
}

impl ZonePref {
    /// The zones tried, in order.
    pub const fn zonelist(self) -> &'static [ZoneId] {
        match self {
            ZonePref::Normal => &[ZoneId::Normal, ZoneId::Dma],
            ZonePref::Dma => &[ZoneId::Dma],
        }
    }
}

/// Per-zone counters (Linux's `/proc/zoneinfo` and `/proc/vmstat`, in
/// small).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct ZoneStats {
    /// Frames given to the zone by
    /// [`BuddyAllocator::add_free_range`](super::BuddyAllocator::add_free_range).
    pub managed_pages: u64,
    /// Frames on the zone's free lists.
    pub free_pages: u64,
    /// Free frames in deferred sections: managed, free, but not yet on the
    /// free lists (see the module documentation).
    pub deferred_pages: u64,
    /// Frames on the zone's hot list (free for callers, allocated for the
    /// buddy lists).
    pub hot_pages: u64,
    /// Successful allocations served by the zone.
    pub allocs: u64,
    /// Successful frees into the zone.
    pub frees: u64,
    /// Blocks split in two (`expand`).
    pub splits: u64,
    /// Pairs of buddies merged.
    pub merges: u64,
    /// Allocations for which this zone was the first choice and no zone
    /// of the zonelist could serve.
    pub failures: u64,
}

impl ZoneStats {
    /// Frames free for callers: on the free lists, on the hot list, or in
    /// deferred sections.
    pub const fn free_total(&self) -> u64 {
        self.free_pages + self.hot_pages + self.deferred_pages
    }
}

/// One zone: its free areas, hot list and counters (Linux's
/// `struct zone`). `stats.hot_pages` is not kept here: it is the hot
/// list's length, filled in when the counters are read.
#[derive(Clone, Copy, Debug)]
pub(super) struct Zone {
    pub(super) free_area: [FreeArea; NR_ORDERS],
    pub(super) hot: ZoneHotList,
    pub(super) stats: ZoneStats,
}

impl Zone {
    pub(super) const EMPTY: Zone = Zone {
        free_area: [FreeArea::EMPTY; NR_ORDERS],
        hot: ZoneHotList::EMPTY,
        stats: ZoneStats {
            managed_pages: 0,
            free_pages: 0,
            deferred_pages: 0,
            hot_pages: 0,
            allocs: 0,
            frees: 0,
            splits: 0,
            merges: 0,
            failures: 0,
        },
    };
}
