//! Anonymous folio sizes: how much memory one demand-zero fault maps
//! (Linux's multi-size THP, `/sys/kernel/mm/transparent_hugepage/
//! hugepages-<size>kB/enabled`, and PMD-sized THP).
//!
//! # Rules
//!
//! - [`FolioSize::K4`] is a single 4 KiB page (the default). `K16` and
//!   `K64` are order-2 and order-4 blocks from the buddy allocator, mapped
//!   as 4 KiB PTEs (Linux's mTHP); `M2` is an order-9 block mapped by one
//!   PMD leaf (THP).
//! - A fault tries the configured order first and then every smaller one
//!   ([`FolioSize::fallbacks`]), down to 4 KiB: an order is used only when
//!   its naturally aligned range lies inside the VMA, holds no mapping yet,
//!   and the allocator has a block of that order (Linux's
//!   `thp_vma_suitable_order` + `pte_range_none` + the allocation).
//! - The block is split into order-0 frames at once (Linux's `split_page`
//!   for the non-compound case), so every 4 KiB frame has its own
//!   reference count and is freed alone when its last mapping goes: a
//!   partially unmapped folio gives back exactly the pages unmapped.

/// The size of the anonymous folios a fault maps.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Debug)]
pub enum FolioSize {
    /// 4 KiB: one page per fault.
    #[default]
    K4,
    /// 16 KiB (order 2), mapped as four PTEs.
    K16,
    /// 64 KiB (order 4), mapped as sixteen PTEs.
    K64,
    /// 2 MiB (order 9), mapped by one PMD leaf.
    M2,
}

impl FolioSize {
    /// Every size, smallest first.
    pub const ALL: [FolioSize; 4] = [FolioSize::K4, FolioSize::K16, FolioSize::K64, FolioSize::M2];
    /// The names [`FolioSize::parse`] accepts, in [`FolioSize::ALL`] order.
    pub const NAMES: [&'static str; 4] = ["4k", "16k", "64k", "2m"];

    /// The buddy order of one folio.
    pub const fn order(self) -> u8 {
        match self {
            FolioSize::K4 => 0,
            FolioSize::K16 => 2,
            FolioSize::K64 => 4,
            FolioSize::M2 => 9,
        }
    }

    /// Base pages in one folio.
    pub const fn pages(self) -> u64 {
        1 << self.order()
    }

    /// Bytes in one folio.
    pub const fn bytes(self) -> u64 {
        crate::PAGE_SIZE << self.order()
    }

    /// Its name (`4k`, `16k`, `64k`, `2m`).
    pub const fn as_str(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    /// The size named `name`, one of [`FolioSize::NAMES`].
    pub fn parse(name: &str) -> Option<FolioSize> {
        Self::NAMES.iter().position(|&n| n == name).map(|i| Self::ALL[i])
    }

    /// This size and every smaller one, largest first: the orders a fault
    /// tries in turn.
    pub fn fallbacks(self) -> impl Iterator<Item = FolioSize> {
        Self::ALL.into_iter().rev().filter(move |&s| s <= self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_orders_and_fallbacks() {
        for s in FolioSize::ALL {
            assert_eq!(FolioSize::parse(s.as_str()), Some(s));
            assert_eq!(s.bytes(), 4096 * s.pages());
        }
        assert_eq!(FolioSize::parse("8k"), None);
        assert_eq!(FolioSize::M2.bytes(), crate::LARGE_PAGE_SIZE);
        assert_eq!(FolioSize::K64.order(), 4);
        let f: std::vec::Vec<_> = FolioSize::K64.fallbacks().collect();
        assert_eq!(f, [FolioSize::K64, FolioSize::K16, FolioSize::K4]);
        assert_eq!(FolioSize::K4.fallbacks().count(), 1);
    }
}
