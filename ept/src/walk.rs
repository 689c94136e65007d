//! A display-oriented walk of the guest's page tables, for `--explain`, and
//! the two-dimensional walk cost model.
//!
//! The walk reads guest-physical memory through a callback and reports
//! every level it visits (table, index, entry, flags). It applies no
//! permission rules — that is the shadow walker's job (`shadow/`) — and it
//! never loops: at most four levels, and an entry pointing outside guest
//! memory ends the walk.
//!
//! Cost model (Bhargava et al., ASPLOS 2008): a TLB miss under nested
//! paging walks the guest's `n` levels, and every guest table pointer plus
//! the final GPA is itself translated by the host's `m`-level walk:
//! `(n + 1)(m + 1) - 1` memory references — 24 for 4 KiB pages at both
//! stages, against `n` natively and `n` for a walk of shadow tables.

use guest_abi::{Gpa, Gva};
use serde::Serialize;

/// Canonical-address check for 48-bit virtual addresses.
pub fn is_canonical(va: Gva) -> bool {
    let top = va.raw() >> 47;
    top == 0 || top == 0x1ffff
}

/// Entry flag names, low bit first.
const FLAGS: [(u64, &str); 10] = {
    use guest_abi::paging::{A, D, G, P, PCD, PS, PWT, RW, US, XD};
    [(P, "P"), (RW, "RW"), (US, "US"), (PWT, "PWT"), (PCD, "PCD"), (A, "A"), (D, "D"), (PS, "PS"), (G, "G"), (XD, "NX")]
};

/// The flags of a page-table entry as text ("P RW A PS").
pub fn flags_string(entry: u64) -> String {
    FLAGS.iter().filter(|(bit, _)| entry & bit != 0).map(|(_, n)| *n).collect::<Vec<_>>().join(" ")
}

/// "4 KiB", "2 MiB", "1 GiB".
pub fn size_name(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b => format!("{} KiB", b >> 10),
    }
}

/// One level of a walk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    /// "PML4", "PDPT", "PD" or "PT".
    pub table: &'static str,
    /// GPA of the table page.
    #[serde(serialize_with = "crate::json::hex")]
    pub table_gpa: Gpa,
    /// Index of the entry in the table.
    pub index: u64,
    /// The entry's value.
    #[serde(serialize_with = "crate::json::hex")]
    pub entry: u64,
}

/// How a walk ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "end", rename_all = "kebab-case")]
pub enum WalkEnd {
    /// Mapped: the GPA and the guest page size.
    Mapped {
        /// Guest-physical address of the byte.
        #[serde(serialize_with = "crate::json::hex")]
        gpa: Gpa,
        /// Guest page size (4 KiB, 2 MiB or 1 GiB).
        page_size: u64,
    },
    /// An entry on the way is not present.
    NotPresent,
    /// The address is not canonical.
    NonCanonical,
    /// A table pointer leads outside guest memory.
    TableOutsideMemory {
        /// The GPA that could not be read.
        #[serde(serialize_with = "crate::json::hex")]
        gpa: Gpa,
    },
}

/// A complete walk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Walk {
    /// The levels visited, root first.
    pub steps: Vec<Step>,
    /// How it ended.
    pub end: WalkEnd,
}

const NAMES: [&str; 4] = ["PML4", "PDPT", "PD", "PT"];
use guest_abi::paging::{ADDR_MASK, P, PS};

/// Walk `va` from the root table at `cr3`, reading 8-byte entries with
/// `read(gpa)` (`None` when the GPA is not guest memory).
pub fn walk(cr3: Gpa, va: Gva, read: impl Fn(Gpa) -> Option<u64>) -> Walk {
    let (cr3, va) = (cr3.raw(), va.raw());
    let mut steps = Vec::new();
    if !is_canonical(Gva(va)) {
        return Walk { steps, end: WalkEnd::NonCanonical };
    }
    let mut table = cr3 & ADDR_MASK;
    for (depth, name) in NAMES.iter().enumerate() {
        let level = 4 - depth as u32; // 4 = PML4 … 1 = PT
        let index = guest_abi::paging::table_index(va, level as u8) as u64;
        let at = Gpa(table + index * 8);
        let Some(entry) = read(at) else {
            return Walk { steps, end: WalkEnd::TableOutsideMemory { gpa: at } };
        };
        steps.push(Step { table: name, table_gpa: Gpa(table), index, entry });
        if entry & P == 0 {
            return Walk { steps, end: WalkEnd::NotPresent };
        }
        let leaf = level == 1 || ((level == 2 || level == 3) && entry & PS != 0);
        if leaf {
            let page_size = 1u64 << (12 + 9 * (level - 1));
            let base = entry & ADDR_MASK & !(page_size - 1);
            return Walk { steps, end: WalkEnd::Mapped { gpa: Gpa(base | (va & (page_size - 1))), page_size } };
        }
        table = entry & ADDR_MASK;
    }
    unreachable!("level 1 is always a leaf")
}

/// Number of page-table levels a walk needs to reach a page of `page_size`.
pub fn levels_for(page_size: u64) -> u32 {
    match page_size {
        s if s >= 1 << 30 => 2,
        s if s >= 1 << 21 => 3,
        _ => 4,
    }
}

/// Memory references of a two-dimensional (nested) walk with `guest`
/// guest levels and `host` second-stage levels.
pub const fn nested_walk_refs(guest: u32, host: u32) -> u32 {
    (guest + 1) * (host + 1) - 1
}

/// The walk-cost model for one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WalkCost {
    /// References of a native walk (guest tables on bare metal).
    pub native: u32,
    /// References of a two-dimensional EPT/NPT walk.
    pub nested: u32,
    /// References of a walk of shadow tables (classic shadow paging, where
    /// the shadow tables map GVA→HPA directly).
    pub shadow: u32,
}

/// The cost model for a guest page of `guest_page` bytes backed by host
/// pages of `host_page` bytes.
pub fn walk_cost(guest_page: u64, host_page: u64) -> WalkCost {
    let (g, h) = (levels_for(guest_page), levels_for(host_page));
    // A shadow entry can map no more than both stages do.
    WalkCost { native: g, nested: nested_walk_refs(g, h), shadow: levels_for(guest_page.min(host_page)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn classic_figures() {
        assert_eq!(nested_walk_refs(4, 4), 24);
        assert_eq!(walk_cost(4096, 4096), WalkCost { native: 4, nested: 24, shadow: 4 });
        assert_eq!(walk_cost(2 << 20, 4096), WalkCost { native: 3, nested: 19, shadow: 4 });
        assert_eq!(walk_cost(2 << 20, 2 << 20), WalkCost { native: 3, nested: 15, shadow: 3 });
        assert_eq!(walk_cost(1 << 30, 1 << 30), WalkCost { native: 2, nested: 8, shadow: 2 });
        assert_eq!(walk_cost(4096, 1 << 30), WalkCost { native: 4, nested: 14, shadow: 4 });
    }

    fn tables(entries: &[(u64, u64)]) -> impl Fn(Gpa) -> Option<u64> {
        let m: HashMap<u64, u64> = entries.iter().copied().collect();
        move |gpa| if gpa.raw() < 0x10_0000 { Some(*m.get(&gpa.raw()).unwrap_or(&0)) } else { None }
    }

    #[test]
    fn walks_4k_and_2m_mappings() {
        // PML4 at 0x1000, PDPT at 0x2000, PD at 0x3000, PT at 0x4000.
        let read =
            tables(&[(0x1000, 0x2003), (0x2000, 0x3003), (0x3000, 0x4003), (0x3008, 0x40_0083), (0x4008, 0x9063)]);
        let w = walk(Gpa(0x1000), Gva(0x1234), &read);
        assert_eq!(w.end, WalkEnd::Mapped { gpa: Gpa(0x9234), page_size: 4096 });
        assert_eq!(w.steps.len(), 4);
        assert_eq!((w.steps[3].table, w.steps[3].index), ("PT", 1));
        assert_eq!(flags_string(w.steps[3].entry), "P RW A D");
        let w = walk(Gpa(0x1000), Gva(0x20_0042), &read);
        assert_eq!(w.end, WalkEnd::Mapped { gpa: Gpa(0x40_0042), page_size: 2 << 20 });
        assert_eq!(w.steps.len(), 3);
    }

    #[test]
    fn hostile_tables_end_the_walk() {
        assert_eq!(walk(Gpa(0x1000), Gva(0x8000_0000_0000), |_| Some(0)).end, WalkEnd::NonCanonical);
        assert_eq!(walk(Gpa(0x1000), Gva(0x1000), tables(&[])).end, WalkEnd::NotPresent);
        // A PML4 entry pointing far outside memory.
        let w = walk(Gpa(0x1000), Gva(0), tables(&[(0x1000, 0x7_0000_0003)]));
        assert_eq!(w.end, WalkEnd::TableOutsideMemory { gpa: Gpa(0x7_0000_0000) });
        // A self-referencing PML4 still ends after four levels.
        let w = walk(Gpa(0x1000), Gva(0), tables(&[(0x1000, 0x1003)]));
        assert_eq!(w.steps.len(), 4);
        assert!(matches!(w.end, WalkEnd::Mapped { gpa: Gpa(0x1000), .. }));
    }

    #[test]
    fn flags_are_named() {
        assert_eq!(flags_string(0x8000_0000_0000_0187), "P RW US PS G NX");
        assert_eq!(size_name(4096), "4 KiB");
        assert_eq!(size_name(2 << 20), "2 MiB");
    }
}
