//! x86-64 four-level paging: PML4 → PDPT → PD → PT, with 4 KiB, 2 MiB and
//! 1 GiB pages (Intel SDM vol. 3A §4.5, "4-Level Paging and 5-Level
//! Paging"; entry formats in Tables 4-15 to 4-20).
//!
//! # Types
//!
//! Page sizes are types ([`Size4KiB`], [`Size2MiB`], [`Size1GiB`], all
//! [`PageSize`]), so a [`Page<S>`] can only be mapped to a
//! [`PhysFrame<S>`] of the same size, and both are aligned and in range by
//! construction. [`PteFlags`] is a hand-written bitflags newtype over the
//! flag bits of an entry; [`PageTableEntry`] is one raw 64-bit entry.
//!
//! # Invariants of a [`PageTable`]
//!
//! - Every table page (the root included) comes from a
//!   [`PageTableSource`] (the buddy allocator's `PGTABLE` zone), arrives
//!   all zeroes, and goes back only with its 512 entries zero: an entry is
//!   zeroed before the table that holds it is released, and a table is
//!   released once its last entry is cleared. So after every operation no
//!   table below the root is empty, except the PDPTs under the upper half
//!   of a root whose upper half is *pinned* (shared with other address
//!   spaces; see [`PageTable::new_pinned_upper`]), which are never freed
//!   by an unmap: other roots point at them.
//! - Non-leaf entries are `P | RW | US | A` and nothing else: the leaf alone
//!   decides the access rights (the SDM combines RW/US/NX over all levels,
//!   §4.6, so permissive upper levels delegate to the leaf). `A` is preset
//!   so the CPU never writes a non-leaf entry (in shadow mode each such
//!   write would be a trap).
//! - A leaf is a present entry at level 1 (PT), or at level 2 or 3 with
//!   `PS` set. `PS` is never set in a PML4 entry (reserved there, §4.5.4).
//!   Leaf flags are exactly those given to `map`/`protect` plus `P` (and
//!   `PS` above level 1); the PAT bit is not used (bit 7 at level 1 is
//!   PAT, not PS, so [`PteFlags::HUGE`] is stripped from given flags).
//! - Only the available bits 9 and 10 carry software state
//!   ([`PteFlags::COW`], [`PteFlags::ANON`]); the CPU ignores them
//!   (Table 4-19/4-20, "Ignored").
//!
//! # TLB discipline
//!
//! Making a not-present entry present needs no invalidation (SDM §4.10.4.3:
//! the processor does not cache not-present translations), so [`PageTable::map`]
//! returns no token. Every operation that changes or removes a present
//! leaf returns a `#[must_use]` [`MapperFlush`]; its `flush` executes
//! `invlpg` through the [`MmuPlatform`]. `invlpg` also drops every
//! paging-structure-cache entry of the current PCID (SDM §4.10.4.1), so it
//! covers table pages that an unmap freed as well. Bulk operations return a
//! [`MapperFlushAll`], or batch tokens in a [`FlushBatch`].

use core::marker::PhantomData;

use guest_abi::{Gpa, Gva};

use crate::buddy::{BuddyAllocator, ZonePref};
use crate::phys::{FRAME_WORDS, Pfn, PhysMem};

/// Entries in one table page.
pub const ENTRIES: usize = FRAME_WORDS;
/// First PML4 index of the upper (kernel) half of the address space.
pub const UPPER_HALF_FIRST: usize = 256;
/// Bits 12..=51 of an entry: the physical address it points at (SDM
/// §4.5.4, MAXPHYADDR at most 52).
pub use guest_abi::paging::ADDR_MASK;
/// The highest physical address + 1 an entry can name.
pub const PHYS_LIMIT: u64 = 1 << 52;
/// The 48 bits of a linear address that the tables translate.
pub const LINEAR_MASK: u64 = (1 << 48) - 1;
/// Flags of every non-leaf entry.
pub const TABLE_FLAGS: PteFlags =
    PteFlags::PRESENT.union(PteFlags::WRITABLE).union(PteFlags::USER).union(PteFlags::ACCESSED);

// The sections of paging, one module each; everything public is
// re-exported here, so `paging::X` names it as before.
mod entry;
mod error;
mod flags;
mod invariants;
mod map;
mod platform;
mod size;
mod unmap;
mod walk;

pub use entry::*;
pub use error::*;
pub use flags::*;
pub use platform::*;
pub use size::*;
pub use walk::*;

#[cfg(test)]
pub(crate) mod tests;
