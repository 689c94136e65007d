//! The per-vCPU half of the shadow MMU: what one vCPU has in hand.
//!
//! A [`ShadowVcpu`] holds the vCPU's current shadow root (and the guest
//! CR3 it shadows), the paging controls the vCPU's guest set (CR0.WP,
//! EFER.NXE, CR4.SMEP/SMAP, RFLAGS.AC) and the last fault answered
//! `Fixed` (invariant 7) — KVM's `vcpu->arch.mmu` root and `cpu_role`.
//! Shadow pages, the reverse map and the pool belong to the VM
//! ([`ShadowMmu`], `vm.rs`).
//!
//! # Invariants
//!
//! - The current root counts only while its generation is the VM's
//!   ([`ShadowMmu::loaded_root`]): a zap of everything makes it obsolete
//!   without reaching into the vCPU, and the vCPU then has no current root.
//!   While it counts, its root page is in use, pinned in the root cache and
//!   listed once in the VM's `loaded`.
//! - The last fixed fault counts only while the VM's change epoch is the
//!   one it was fixed in.
//!
//! One vCPU state is in use per VM today.

use super::*;

/// A vCPU's current root: the guest root, its shadow page, and the VM
/// generation it was loaded in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Loaded {
    pub(super) guest_cr3: u64,
    pub(super) page: u32,
    pub(super) generation: u64,
}

/// The shadow-MMU state of one vCPU (module doc); made by
/// [`ShadowMmu::new_vcpu`], used with the `ShadowMmu` it came from. Not
/// `Clone`: the VM counts the roots its vCPUs hold, and a copy would hold
/// one uncounted.
#[derive(Debug)]
pub struct ShadowVcpu {
    pub(super) current: Option<Loaded>,
    pub(super) mode: PagingMode,
    /// The last fault answered `Fixed` (address, error code, VM change
    /// epoch), until anything changes (invariant 7).
    pub(super) last_fixed: Option<(u64, u32, u64)>,
}

impl ShadowVcpu {
    /// The paging controls in force on this vCPU.
    pub fn mode(&self) -> PagingMode {
        self.mode
    }
}

impl ShadowMmu {
    /// The state of a vCPU of this VM, with no root loaded yet and the
    /// paging controls the MMU was made with.
    pub fn new_vcpu(&self) -> ShadowVcpu {
        ShadowVcpu { current: None, mode: self.rules, last_fixed: None }
    }

    /// `vcpu`'s current root, unless a zap of everything made it obsolete:
    /// `(guest root, root page)`.
    pub(super) fn loaded_root(&self, vcpu: &ShadowVcpu) -> Option<(u64, u32)> {
        vcpu.current.filter(|l| l.generation == self.generation).map(|l| (l.guest_cr3, l.page))
    }

    /// Make `(guest root, root page)` `vcpu`'s current root.
    pub(super) fn set_loaded_root(&mut self, vcpu: &mut ShadowVcpu, guest_cr3: u64, page: u32) {
        if let Some((_, old)) = self.loaded_root(vcpu)
            && let Some(i) = self.loaded.iter().position(|&p| p == old)
        {
            self.loaded.swap_remove(i);
        }
        self.loaded.push(page);
        vcpu.current = Some(Loaded { guest_cr3, page, generation: self.generation });
    }

    /// The GPA of `vcpu`'s current shadow root (what its CR3 holds).
    pub fn current_root(&self, vcpu: &ShadowVcpu) -> Option<ShadowRoot> {
        self.loaded_root(vcpu).map(|(_, p)| ShadowRoot(Gpa(self.page_gpa(p))))
    }

    /// The guest CR3 `vcpu`'s current root shadows.
    pub fn guest_cr3(&self, vcpu: &ShadowVcpu) -> Option<Gpa> {
        self.loaded_root(vcpu).map(|(g, _)| Gpa(g))
    }
}
