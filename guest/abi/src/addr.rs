//! Typed addresses of the four address spaces of the translation chain
//! GVA → GPA → HVA → HPA.
//!
//! Each is a transparent `u64` newtype so that a guest-virtual address can
//! never be passed where a guest-physical one is expected. Conversions
//! between them are translation steps (a page-table walk, the memory map,
//! `/proc/self/pagemap`) and live with the code that performs them; this
//! module only offers arithmetic that stays within one address space.

macro_rules! address_type {
    ($(#[$doc:meta])* $name:ident, $short:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw address.
            #[inline]
            pub const fn raw(self) -> u64 {
                self.0
            }

            /// This address plus `off` bytes, or `None` on overflow.
            #[inline]
            pub const fn checked_add(self, off: u64) -> Option<Self> {
                match self.0.checked_add(off) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }

            /// The offset of this address within a page of `page_size`
            /// bytes (a power of two).
            #[inline]
            pub const fn page_offset(self, page_size: u64) -> u64 {
                self.0 & (page_size - 1)
            }

            /// This address rounded down to a multiple of `align` (a power of two).
            #[inline]
            pub const fn align_down(self, align: u64) -> Self {
                Self(self.0 & !(align - 1))
            }

            /// Whether this address is a multiple of `align` (a power of two).
            #[inline]
            pub const fn is_aligned(self, align: u64) -> bool {
                self.0 & (align - 1) == 0
            }
        }

        impl core::fmt::Debug for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                write!(f, concat!($short, ":{:#x}"), self.0)
            }
        }

        impl core::fmt::LowerHex for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                core::fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

address_type!(
    /// Guest-virtual address: what guest code dereferences.
    Gva,
    "GVA"
);
address_type!(
    /// Guest-physical address: what the guest's page tables map to.
    Gpa,
    "GPA"
);
address_type!(
    /// Host-virtual address: where the VMM has mapped a guest-physical page.
    Hva,
    "HVA"
);
address_type!(
    /// Host-physical address: the machine frame behind a host-virtual page.
    Hpa,
    "HPA"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_helpers_agree() {
        let a = Gpa(0x20_1234);
        assert_eq!(a.page_offset(0x1000), 0x234);
        assert_eq!(a.align_down(0x1000), Gpa(0x20_1000));
        assert!(a.align_down(0x20_0000).is_aligned(0x20_0000));
        assert!(!a.is_aligned(0x1000));
        assert_eq!(Gva(u64::MAX).checked_add(1), None);
    }
}
