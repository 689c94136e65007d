//! The second stage of the translation chain GVA→GPA→HVA→HPA, and the host
//! it runs on (docs/architecture.md, "Crates").
//!
//! - [`memmap`]: the guest-physical layout (RAM, page-table zone, shadow
//!   pool, reserved gaps) as one value, and the KVM memslots derived from
//!   it. Nothing else in the project decides slots.
//! - [`backing`]: the host memory behind guest RAM — 4 KiB pages, THP or
//!   hugetlb — created as `vm-memory` regions, with no silent fallback.
//! - [`pagemap`]: HVA→HPA through `/proc/self/pagemap`, and how much of a
//!   mapping is really backed by huge pages (`/proc/self/smaps`).
//! - [`walk`]: a display-oriented walk of the guest's page tables (each
//!   level's index and entry) and the two-dimensional walk cost model.
//! - [`probe`]: what the host offers: KVM capabilities, the second-stage
//!   translation (EPT, NPT, PVM or none), what the host itself runs on
//!   (CPUID hypervisor leaf, DMI), THP and hugetlb.
//! - [`json`]: addresses as hex strings and durations as nanoseconds in
//!   every JSON the project writes.

pub mod backing;
pub mod json;
pub mod memmap;
pub mod pagemap;
pub mod probe;
pub mod walk;

pub use backing::{Backing, GuestRam, HugePageSize};
pub use memmap::{GpaRange, MemoryMap, MemoryMapConfig, RegionKind, SlotSpec};
