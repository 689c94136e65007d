//! Entry flags: [`PteFlags`], a hand-written bitflags newtype.
//!
//! Part of [`crate::paging`]; its module doc states the invariants.

/// The architectural bits, defined once for the guest and the VMM.
use guest_abi::paging as x86;

/// The flag bits of a page-table entry (everything but the address).
/// A hand-written bitflags type: values hold only the bits of
/// [`PteFlags::ALL`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
#[repr(transparent)]
pub struct PteFlags(pub(super) u64);

impl PteFlags {
    /// P: the entry maps something.
    pub const PRESENT: Self = Self(x86::P);
    /// R/W: writes allowed.
    pub const WRITABLE: Self = Self(x86::RW);
    /// U/S: user-mode accesses allowed.
    pub const USER: Self = Self(x86::US);
    /// PWT: write-through caching.
    pub const WRITE_THROUGH: Self = Self(x86::PWT);
    /// PCD: caching disabled.
    pub const NO_CACHE: Self = Self(x86::PCD);
    /// A: set by the CPU when the entry is used for a translation.
    pub const ACCESSED: Self = Self(x86::A);
    /// D: set by the CPU on the first write through a leaf.
    pub const DIRTY: Self = Self(x86::D);
    /// PS: the entry at level 2 or 3 maps a 2 MiB or 1 GiB page.
    pub const HUGE: Self = Self(x86::PS);
    /// G: global translation, kept across CR3 loads (with CR4.PGE).
    pub const GLOBAL: Self = Self(x86::G);
    /// Software (available bit 9): a copy-on-write page, read-only until
    /// its first write is resolved by the fault handler.
    pub const COW: Self = Self(1 << 9);
    /// Software (available bit 10): an anonymous frame owned by the
    /// address space and reference-counted (freed with its last mapping).
    pub const ANON: Self = Self(1 << 10);
    /// XD/NX: instruction fetches not allowed (with EFER.NXE).
    pub const NO_EXECUTE: Self = Self(x86::XD);

    /// Every flag bit.
    pub const ALL: Self = Self(0xfff | x86::XD);
    /// The bits `map` and `protect` accept for a leaf (all but P and PS,
    /// which the mapper owns, and bit 11).
    pub const LEAF_SETTABLE: Self = Self(0x7fe & !x86::PS | x86::XD);

    /// No flag.
    pub const fn empty() -> Self {
        Self(0)
    }
    /// The raw bits.
    pub const fn bits(self) -> u64 {
        self.0
    }
    /// The flag bits of `bits`, others dropped.
    pub const fn from_bits_truncate(bits: u64) -> Self {
        Self(bits & Self::ALL.0)
    }
    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
    /// Whether any flag of `other` is set.
    pub const fn intersects(self, other: Self) -> bool {
        self.0 & other.0 != 0
    }
    /// Both sets of flags.
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
    /// The flags of `self` not in `other`.
    pub const fn difference(self, other: Self) -> Self {
        Self(self.0 & !other.0)
    }
    /// The flags in both.
    pub const fn intersection(self, other: Self) -> Self {
        Self(self.0 & other.0)
    }
    /// Whether no flag is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// Set the flags of `other`.
    pub fn insert(&mut self, other: Self) {
        self.0 |= other.0;
    }
    /// Clear the flags of `other`.
    pub fn remove(&mut self, other: Self) {
        self.0 &= !other.0;
    }
    /// Set or clear the flags of `other`.
    pub fn set(&mut self, other: Self, on: bool) {
        if on { self.insert(other) } else { self.remove(other) }
    }
}

impl core::ops::BitOr for PteFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        self.union(rhs)
    }
}

impl core::ops::BitOrAssign for PteFlags {
    fn bitor_assign(&mut self, rhs: Self) {
        self.insert(rhs)
    }
}

impl core::ops::BitAnd for PteFlags {
    type Output = Self;
    fn bitand(self, rhs: Self) -> Self {
        self.intersection(rhs)
    }
}

impl core::ops::Sub for PteFlags {
    type Output = Self;
    fn sub(self, rhs: Self) -> Self {
        self.difference(rhs)
    }
}

impl core::fmt::Debug for PteFlags {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        const NAMES: [(PteFlags, &str); 13] = [
            (PteFlags::PRESENT, "P"),
            (PteFlags::WRITABLE, "RW"),
            (PteFlags::USER, "US"),
            (PteFlags::WRITE_THROUGH, "PWT"),
            (PteFlags::NO_CACHE, "PCD"),
            (PteFlags::ACCESSED, "A"),
            (PteFlags::DIRTY, "D"),
            (PteFlags::HUGE, "PS"),
            (PteFlags::GLOBAL, "G"),
            (PteFlags::COW, "COW"),
            (PteFlags::ANON, "ANON"),
            (PteFlags(1 << 11), "AVL11"),
            (PteFlags::NO_EXECUTE, "NX"),
        ];
        let mut first = true;
        for (flag, name) in NAMES {
            if self.contains(flag) {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        if first {
            f.write_str("-")?;
        }
        Ok(())
    }
}
