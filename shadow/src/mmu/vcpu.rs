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
//!   without reaching into the vCPU, and the vCPU then has no current root
//!   until its next `LOAD_CR3`, `SHADOW_FAULT` or
//!   [`ShadowMmu::prepare_entry`] rebuilds the root of the guest CR3 it
//!   last loaded. Current or obsolete, its root page is listed once in the
//!   VM's `loaded` and never freed or reused while it is (its CR3 holds it).
//! - The last fixed fault counts only while the VM's change epoch is the
//!   one it was fixed in.
//! - `id` is the vCPU's index in the VM's flush state and in a
//!   [`VcpuSet`]; ids are handed out in order and not reused.
//!
//! The `ShadowVcpu` is owned by its vCPU thread, outside the MMU lock; the
//! VM keeps what other threads must see of it (its root page, its flush
//! state) in the `ShadowMmu`.

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
    pub(super) id: usize,
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

    /// Its id: its bit in a [`VcpuSet`] (0 for the first vCPU made).
    pub fn id(&self) -> usize {
        self.id
    }
}

impl ShadowMmu {
    /// The state of a new vCPU of this VM, with no root loaded yet, an
    /// empty TLB and the paging controls the MMU was made with; its id is
    /// the number of vCPUs made before it. At most [`MAX_VCPUS`]: the VMM
    /// refuses more before it gets here (a panic past it is a VMM bug, not
    /// guest input).
    pub fn new_vcpu(&mut self) -> ShadowVcpu {
        let id = self.tlb.cpus.len();
        assert!(id < MAX_VCPUS, "more than {MAX_VCPUS} vCPUs");
        let t = self.flush_ticket().0;
        self.tlb.cpus.push(Some(CpuTlb { flushed: t, requested: t, force: 0, owed: false }));
        ShadowVcpu { id, current: None, mode: self.rules, last_fixed: None }
    }

    /// `vcpu` is gone (its thread ended): its root is no longer held, and
    /// no flush is waited for from it.
    pub fn remove_vcpu(&mut self, pool: &mut impl GuestPhys, mut vcpu: ShadowVcpu) {
        self.unload(pool, &mut vcpu);
        self.leave_limbo(pool, vcpu.id, None);
        if let Some(c) = self.tlb.cpus.get_mut(vcpu.id) {
            *c = None;
        }
        self.release_quarantine();
    }

    /// The vCPUs registered now.
    pub fn vcpus(&self) -> VcpuSet {
        self.tlb.registered().fold(VcpuSet::EMPTY, |mut s, (i, _)| {
            s.insert(i);
            s
        })
    }

    /// The operation at hand is done for `vcpu` (out of `KVM_RUN`): what
    /// the quarantine may give it (`coherence.rs`).
    pub(super) fn act(&mut self, vcpu: &ShadowVcpu) {
        self.tlb.acting = Some(vcpu.id);
    }

    /// `vcpu`'s current root, unless a zap of everything made it obsolete:
    /// `(guest root, root page)`.
    pub(super) fn loaded_root(&self, vcpu: &ShadowVcpu) -> Option<(u64, u32)> {
        vcpu.current.filter(|l| l.generation == self.generation).map(|l| (l.guest_cr3, l.page))
    }

    /// Make `(guest root, root page)` `vcpu`'s current root.
    pub(super) fn set_loaded_root(
        &mut self,
        pool: &mut impl GuestPhys,
        vcpu: &mut ShadowVcpu,
        guest_cr3: u64,
        page: u32,
    ) {
        // Counted first, so the old root's release cannot free the new one.
        self.loaded.push(page);
        self.unload(pool, vcpu);
        vcpu.current = Some(Loaded { guest_cr3, page, generation: self.generation });
    }

    /// `vcpu` leaves its root (current or obsolete): the last vCPU to leave
    /// a root that is no longer cached, or was zapped, releases its page.
    pub(super) fn unload(&mut self, pool: &mut impl GuestPhys, vcpu: &mut ShadowVcpu) {
        let Some(old) = vcpu.current.take() else { return };
        if let Some(i) = self.loaded.iter().position(|&p| p == old.page) {
            self.loaded.swap_remove(i);
        }
        if self.loaded.contains(&old.page) {
            return;
        }
        if self.held.contains(&old.page) {
            self.release_held(old.page);
        } else if old.generation == self.generation {
            self.release_if_orphan(pool, old.page);
        }
    }

    /// A held page no vCPU's CR3 holds any more (none loaded, none in
    /// limbo) goes to quarantine.
    pub(super) fn release_held(&mut self, page: u32) {
        if self.loaded.contains(&page) || self.limbo.iter().any(|l| l.0 == page) {
            return;
        }
        if let Some(i) = self.held.iter().position(|&p| p == page) {
            self.held.swap_remove(i);
            self.quarantine.push_back((page, self.tlb.now));
        }
    }

    /// A vCPU whose root a zap of everything made obsolete gets the root of
    /// the guest CR3 it last loaded again (KVM's `kvm_mmu_reload`); returns
    /// the new root, `None` when its root was not obsolete.
    pub(super) fn reload_obsolete(
        &mut self,
        vcpu: &mut ShadowVcpu,
        pool: &mut impl GuestPhys,
        guest: &mut impl GuestPhys,
    ) -> Result<Option<ShadowRoot>, ShadowError> {
        match vcpu.current {
            Some(l) if l.generation != self.generation => self.load_cr3(vcpu, pool, guest, Gpa(l.guest_cr3)).map(Some),
            _ => Ok(None),
        }
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
